"""Sweeps: many experiments × seeds, on a local process pool or a SLURM cluster (submitit).

A sweep file in ``experiments/`` lists experiments and seeds::

    name = "table1"
    experiments = ["mnist_conv3_deepagrel", "mnist_conv3_ebp"]   # names or paths
    seeds = [0, 1, 2]
    out = "runs/table1"          # optional; --out overrides

    [slurm]                      # optional: submitit parameters for --executor slurm
    timeout_min = 720
    slurm_partition = "gpu"
    gpus_per_node = 1

Each run records itself in ``<out>/<experiment>/seed<N>/run.h5``; runs whose run file is
complete are skipped and interrupted ones resume from their checkpoint, so a sweep can be
started again after a failure and only the missing work executes. A finished run goes on if its
experiment file now has a longer patience or more epochs; a run made with any other settings
stops the sweep with an error that names them, before anything runs.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

from agrel_sim.config import ConfigError, Fields, find_named_file, read_toml
from agrel_sim.experiment import Experiment, load_experiment
from agrel_sim.recorder import LogSettings, stored_config
from agrel_sim.runs import check_device, default_run_folder, resume_plan, run_config

EXECUTORS = ("local", "slurm", "submitit-local")


@dataclass(frozen=True)
class Sweep:
    """Experiments (as resolved file paths) × seeds, with an output folder and SLURM parameters."""

    name: str
    experiments: tuple[str, ...]
    seeds: tuple[int, ...]
    out: str
    slurm: dict = field(default_factory=dict)
    source: str = "<python>"

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "Sweep":
        path = Path(path)
        top = Fields(read_toml(path), str(path))
        name = top.get("name", str, default=path.stem)
        entries = top.get("experiments", list, check=lambda v: v and all(isinstance(e, str) for e in v), hint="a non-empty list of experiment names or paths")
        experiments = []
        for index, entry in enumerate(entries):
            relative = path.parent / entry
            try:
                experiments.append(str(relative if entry.endswith(".toml") and relative.is_file() else find_named_file(entry, "experiment", "AGREL_SIM_EXPERIMENTS")))
            except ConfigError as error:
                raise ConfigError(f"{path}: experiments[{index}]: {error}") from None
        seeds = top.get("seeds", list, check=lambda v: v and all(isinstance(s, int) and s >= 0 for s in v), hint="a non-empty list of seeds >= 0")
        out = top.get("out", str, default=str(Path("runs") / name))
        slurm = top.get("slurm", dict, default={})
        top.finish()
        return cls(name, tuple(experiments), tuple(seeds), out, slurm, str(path))


def load_sweep(name_or_path: str | os.PathLike) -> Sweep:
    """Load a sweep file by path, or by name from the experiment search path."""
    return Sweep.from_toml(find_named_file(name_or_path, "experiment", "AGREL_SIM_EXPERIMENTS"))


@dataclass(frozen=True)
class RunTask:
    """One run of a sweep: everything a worker process needs, as plain picklable data."""

    experiment_path: str
    seed: int
    folder: str
    device: str
    data_dir: str | None
    threads: int


def execute(task: RunTask) -> str:
    """Run one task in a worker (a pool process or a SLURM job) and return its summary line."""
    import torch

    from agrel_sim.runs import run_experiment

    torch.set_num_threads(task.threads)
    experiment = load_experiment(task.experiment_path)
    result = run_experiment(experiment, task.seed, task.folder, device=task.device, data_dir=task.data_dir, resume=True, progress=False, log=None)
    return f"{experiment.name} seed={task.seed}: {result.summary()}"


def plan(sweep: Sweep, out: str | os.PathLike, device: str = "cpu", data_dir=None, threads: int = 1) -> tuple[list[RunTask], list[Path]]:
    """The tasks still to run and the folders of the runs that have already finished.

    Every experiment file is loaded and every existing run file checked against it first, so a
    bad file, or a run made with other settings, stops the sweep before anything runs.
    """
    tasks, finished = [], []
    for path in sweep.experiments:
        experiment: Experiment = load_experiment(path)
        for seed in sweep.seeds:
            folder = default_run_folder(experiment, seed, out)
            # A run made with other settings is never counted as this experiment's, and one that
            # cannot go on (another device, an older layout, ...) stops the sweep here.
            if resume_plan(folder, stored_config(run_config(experiment, device), LogSettings()), seed)[0] == "finished":
                finished.append(folder)
            else:
                tasks.append(RunTask(path, seed, str(folder), device, None if data_dir is None else str(data_dir), threads))
    return tasks, finished


def run_sweep(sweep: Sweep, out=None, jobs: int = 1, executor: str = "local", device: str = "cpu", data_dir=None, log=print) -> list[str]:
    """Run the sweep's missing runs and return the summary line of each one that failed.

    Parameters
    ----------
    jobs : int
        Runs at once (local executor), or SLURM jobs at once (submitit's array parallelism).
    executor : {"local", "slurm", "submitit-local"}
        A local process pool; submitit on SLURM; submitit's local executor (the SLURM code
        path run on this machine, for testing).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor: expected one of {EXECUTORS}, got {executor!r}")
    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"jobs: expected a whole number of runs at once, at least 1, got {jobs!r}")
    if executor != "slurm":  # the machine that submits to SLURM need not have the cluster's GPUs
        check_device(device)
    out = Path(out or sweep.out)
    threads = int(sweep.slurm.get("cpus_per_task", 1)) if executor == "slurm" else max(1, (os.cpu_count() or 1) // jobs)
    tasks, finished = plan(sweep, out, device, data_dir, threads)
    log(f"sweep {sweep.name}: {len(finished)} runs already finished, {len(tasks)} to run, executor {executor}, out {out}")
    if not tasks:
        return []
    if executor == "local":
        outcomes = _run_local(tasks, jobs)
    else:
        outcomes = _run_submitit(tasks, jobs, executor, out, sweep.slurm)
    failures = []
    for task, (ok, line) in zip(tasks, outcomes):
        log(line if ok else f"FAILED {task.experiment_path} seed={task.seed}: {line}")
        if not ok:
            failures.append(line)
    return failures


def _run_local(tasks: list[RunTask], jobs: int) -> list[tuple[bool, str]]:
    # "spawn": workers start clean, with no copy of the parent's torch threads or state.
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(execute, task) for task in tasks]
        return [_outcome(future.result) for future in futures]


def _run_submitit(tasks: list[RunTask], jobs: int, executor: str, out: Path, slurm: dict) -> list[tuple[bool, str]]:
    try:
        import submitit
    except ImportError:
        raise ValueError("executor: submitit is not installed; pip install 'agrel-sim[slurm]'") from None
    folder = out / "submitit" / "%j"
    if executor == "slurm":
        runner = submitit.AutoExecutor(folder=folder, cluster="slurm")
        runner.update_parameters(slurm_array_parallelism=jobs, **slurm)
        return [_outcome(job.result) for job in runner.map_array(execute, tasks)]
    runner = submitit.LocalExecutor(folder=folder)
    runner.update_parameters(timeout_min=int(slurm.get("timeout_min", 60)))
    outcomes = []
    for start in range(0, len(tasks), jobs):  # the local executor starts every job it is given at once
        outcomes += [_outcome(job.result) for job in runner.map_array(execute, tasks[start:start + jobs])]
    return outcomes


def _outcome(result) -> tuple[bool, str]:
    try:
        return True, result()
    except Exception as error:  # one failed run must not stop the others; it is reported
        return False, f"{type(error).__name__}: {error}"
