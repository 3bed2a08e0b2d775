"""One run of an experiment with one seed, and its result file.

A run writes ``<run folder>/result.json`` when it has finished, atomically (a temporary file
renamed into place), so that a file that exists is always a finished run: sweeps skip those.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from agrel_sim.datasets import load_dataset
from agrel_sim.experiment import Experiment
from agrel_sim.training import RunResult, train

RESULT_FILE = "result.json"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def default_run_folder(experiment: Experiment, seed: int, root: str | os.PathLike = "runs") -> Path:
    """``runs/<experiment>/seed<N>``."""
    return Path(root) / experiment.name / f"seed{seed}"


def check_device(device: str) -> None:
    """Raise a clear error for a CUDA device on a machine without one."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available on this machine; use 'cpu'")


def run_experiment(
    experiment: Experiment,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    data_dir=None,
    progress: bool | None = None,
    log=print,
) -> RunResult:
    """Load the data, train one run and, if ``out`` is given, write its result file there."""
    check_device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    data = load_dataset(experiment.dataset, data_dir)
    result = train(experiment.model, data, experiment.training, seed=seed, device=device, dtype=DTYPES[dtype], progress=progress, log=log)
    if out is not None:
        write_result(Path(out), experiment, seed, device, dtype, result)
    return result


def write_result(folder: Path, experiment: Experiment, seed: int, device: str, dtype: str, result: RunResult) -> Path:
    """Write ``folder/result.json`` atomically and return its path."""
    from agrel_sim import __version__

    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "experiment": experiment.name,
        "source": experiment.source,
        "dataset": experiment.dataset,
        "model": experiment.model.to_dict(),
        "training": dataclasses.asdict(experiment.training),
        "seed": seed,
        "device": device,
        "dtype": dtype,
        "version": __version__,
        "result": {k: v for k, v in dataclasses.asdict(result).items() if k != "history"},
        "history": [dataclasses.asdict(epoch) for epoch in result.history],
    }
    path = folder / RESULT_FILE
    partial = folder / (RESULT_FILE + ".partial")
    partial.write_text(json.dumps(record, indent=1))
    os.replace(partial, path)
    return path


def load_results(root: str | os.PathLike) -> list[dict]:
    """Every finished run's result record under ``root`` (a result file or a folder searched recursively)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder of runs")
    paths = [root] if root.is_file() else sorted(root.rglob(RESULT_FILE))
    records = []
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not a result file of agrel-sim (invalid JSON: {error})") from None
        if not isinstance(record, dict) or "test_accuracy" not in record.get("result", {}):
            raise ValueError(f"{path}: not a result file of agrel-sim (no result.test_accuracy)")
        record["path"] = str(path)
        records.append(record)
    return records
