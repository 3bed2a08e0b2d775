"""Run files, checkpoints and exact resume after SIGKILL, and the analysis of run files."""

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import agrel_sim
from agrel_sim.analysis import IncompleteRunWarning, OlderRunFileWarning, RunFileError, load_run, load_runs, outcome_lines, summary
from agrel_sim.cli import main
from agrel_sim.datasets import DatasetError, load_dataset
from agrel_sim.experiment import Experiment, load_experiment
from agrel_sim.network import Dense
from agrel_sim.recorder import LAYOUT_VERSION, LogSettings, RunFile, check_resumable
from agrel_sim.runs import run_experiment, stored_result
from agrel_sim.training import load_checkpoint
from devices import DEVICES

MODEL = {
    "name": "small",
    "input_shape": [1, 8, 8],
    "layers": [{"kind": "conv", "channels": 4, "kernel_size": 3}, {"kind": "dropout", "rate": 0.2}, {"kind": "dense", "units": 32}],
    "output": {"actions": 10},
    "rule": {"learning_rate": 0.3, "init_range": 0.1},
}


def experiment(rule="deepagrel", epochs=3, factor=None, batch_size=20, learning_rate=0.3, feedback=None):
    training = {"batch_size": batch_size, "max_epochs": epochs, "patience": 100, "validation_size": 200}
    if factor:
        training["augmentation"] = {"factor": factor}
    rule_fields = {"name": rule, "learning_rate": learning_rate}
    if feedback:
        rule_fields.update(feedback=feedback, weight_decay=0.05)
    return Experiment.from_dict({"name": f"small_{rule}", "model": MODEL, "dataset": "digits", "rule": rule_fields, "training": training}, "<test>")


@pytest.mark.parametrize("rule", ["deepagrel", "ebp"])
def test_run_file_layout_is_readable_with_plain_h5py(tmp_path, rule):
    logging = LogSettings(every_batches=10, trials_per_batch=3, max_units=50)
    result = run_experiment(experiment(rule), seed=4, out=tmp_path, logging=logging, log=None)
    batches = -(-1237 // 20)  # per epoch
    sampled = 3 * len(range(0, batches, 10))
    with h5py.File(tmp_path / "run.h5", "r") as run:
        assert run.attrs["complete"] and run.attrs["layout_version"] == 5 and run.attrs["seed"] == 4
        assert run.attrs["rule"] == rule and run.attrs["backend"] == "torch" and "experiment" in run.attrs["config"]
        assert run["epochs"]["epoch"][:].tolist() == [1, 2, 3]
        np.testing.assert_allclose(run["epochs"]["validation_accuracy"][:], [m.validation_accuracy for m in result.history])
        np.testing.assert_array_equal(run["epochs"]["learning_rate"][:], [0.3] * 3)
        assert run["result"].attrs["test_accuracy"] == result.test_accuracy
        assert run["trials"]["label"].shape == (3 * sampled,) and run["trials"]["q"].shape == (3 * sampled, 10)
        labels = load_dataset("digits").train_labels.numpy()
        assert np.array_equal(labels[run["trials"]["image"][:]], run["trials"]["label"][:]), "each logged trial names its own training image"
        assert run["gating"]["batch"].shape == (3 * batches,)
        for name, size in (("layers.0", 144), ("layers.1", 144), ("layers.2", 32), ("output", 10)):
            layer = run["layers"][name]
            units = layer["units"][:]
            assert len(units) == min(size, 50) and np.all(np.diff(units) > 0) and units.max() < size
            assert layer["ff"].shape == layer["fb"].shape == layer["gate"].shape == (3 * sampled, len(units))
            assert layer["gate"].dtype == np.uint8
            ds = layer["ff"]
            assert ds.maxshape[0] is None and ds.chunks and ds.compression == "gzip" and ds.shuffle
            open_fraction = run["gating"][name]["open_fraction"][:]
            assert np.all((open_fraction >= 0) & (open_fraction <= 1))
            assert np.isnan(run["gating"][name]["fb_mean_abs"][:]).all() == (rule == "ebp")
        # The dropout layer (layers.1, rate 0.2) shows the columns of the layer below, scaled where kept.
        below, dropout = run["layers"]["layers.0"], run["layers"]["layers.1"]
        assert np.array_equal(dropout["units"][:], below["units"][:])
        kept = dropout["ff"][:] != 0
        np.testing.assert_allclose(dropout["ff"][:], below["ff"][:] * kept / 0.8, rtol=1e-6)
        assert np.isnan(run["gating"]["layers.1"]["changed_fraction"][:]).all(), "dropout has no synapses"
        changed = run["gating"]["layers.2"]["changed_fraction"][:]
        assert np.all((changed > 0) & (changed <= 1))
        delta = run["trials"]["delta"][:]
        if rule == "deepagrel":
            np.testing.assert_allclose(delta, run["trials"]["reward"][:] - run["trials"]["q"][:][np.arange(len(delta)), run["trials"]["action"][:]], rtol=1e-5, atol=1e-6)
            silent = run["layers"]["layers.2"]["gate"][:] == 0
            assert np.all(run["layers"]["layers.2"]["fb"][:][silent] == 0), "a closed gate silences the fb neuron"
        else:
            assert np.isnan(delta).all()
            assert all(np.isnan(run["layers"][name]["fb"][:]).all() for name in run["layers"]), "EBP has no fb neurons"
        # Tied feedback (the default) is aligned exactly; EBP has no feedback weights. Epoch 0:
        # the weights the run began with. The dropout layer (layers.1) has no weights.
        alignment = run["alignment"]
        assert sorted(alignment) == ["epoch", "layers.0", "layers.2", "output"]
        assert alignment["epoch"][:].tolist() == [0, 1, 2, 3] and alignment["epoch"].dtype == np.int32
        for name in ("layers.0", "layers.2", "output"):
            ds = alignment[name]
            assert ds.dtype == np.float64 and ds.maxshape[0] is None and ds.chunks and ds.compression == "gzip" and ds.shuffle
            assert ds[:].tolist() == [1.0] * 4 if rule == "deepagrel" else np.isnan(ds[:]).all()
        assert undescribed(run) == [] and run["epochs"]["seconds"].attrs["unit"] == "s"
        assert alignment["output"].attrs["description"].startswith("cosine similarity of the layer's feedforward weights and its feedback weights")
        assert run["layers"]["layers.2"]["gate"].attrs["description"].startswith("1 where the column's gate was open")


def undescribed(run: h5py.File) -> list[str]:
    """The datasets of ``run`` without a description, or with a unit other than 1 and s."""
    found = []
    run.visititems(lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) and not (item.attrs.get("description") and item.attrs.get("unit") in ("1", "s")) else None)
    return found


@pytest.mark.parametrize("rule", ["deepagrel", "ebp"])
@pytest.mark.parametrize("device", DEVICES)
def test_run_file_records_agree_with_their_definitions(tmp_path, device, rule, monkeypatch):
    from agrel_sim.analysis import gating_by_epoch, gating_by_outcome
    from agrel_sim.backends.torch_backend import TorchNetwork

    # Per learning batch, the share of each layer's ff weights that the batch changed, from
    # snapshots of the weights around it.
    changed = []
    run_trials = TorchNetwork.run_trials

    def snapshotting(net, *args, learn=True, **kwargs):
        before = net.weights()
        trials = run_trials(net, *args, learn=learn, **kwargs)
        if learn:
            after = net.weights()
            changed.append({key.removesuffix(".ff"): torch.count_nonzero(after[key] - before[key]).item() / after[key].numel() for key in after if key.endswith(".ff")})
        return trials

    monkeypatch.setattr(TorchNetwork, "run_trials", snapshotting)
    # Every trial of every batch logged, all columns traced: the summaries, of the first 10
    # trials of each batch, can be recomputed.
    logging = LogSettings(every_batches=1, trials_per_batch=20, max_units=10_000, summary_trials=10)
    dtype = "float64" if rule == "deepagrel" else torch.float64  # by name, or as build and train take it
    run_experiment(experiment(rule, epochs=2), seed=1, out=tmp_path, device=device, dtype=dtype, logging=logging, log=None)
    run = load_run(tmp_path / "run.h5")
    assert run.config["dtype"] == "float64"
    with pytest.raises(ValueError, match=r"dtype: expected one of \['float32', 'float64'\] \(or torch\.float32, torch\.float64\), got torch\.float16"):
        run_experiment(experiment(rule), dtype=torch.float16, log=None)
    trials, gating = run.trials(), run.gating()
    labels = load_dataset("digits").train_labels.numpy()
    assert np.array_equal(labels[trials["image"]], trials["label"]), "each logged trial names its training image"
    assert np.array_equal(trials["reward"], (trials["action"] == trials["label"]).astype(np.float32))
    for epoch in (1, 2):
        rows = trials["epoch"] == epoch
        assert run.epochs["reward_probability"][epoch - 1] == pytest.approx(np.mean(trials["reward"][rows]))
        if rule == "deepagrel":
            loss = np.mean(trials["delta"][rows].astype(np.float64) ** 2 / 2)
        else:  # cross-entropy of the softmax over the Q-values (the logits)
            q = trials["q"][rows].astype(np.float64)
            loss = np.mean(np.log(np.exp(q).sum(1)) - q[np.arange(len(q)), trials["label"][rows]])
        assert run.epochs["train_loss"][epoch - 1] == pytest.approx(loss, rel=1e-5)
    rewarded = trials["action"] == trials["label"]
    by_epoch, by_outcome = gating_by_epoch(run), gating_by_outcome(run)
    for name in ("layers.0", "layers.2"):
        layer = run.layer(name)
        batches = [(trials["epoch"] == e) & (trials["batch"] == b) for e, b in zip(gating["epoch"], gating["batch"])]
        per_batch = np.array([layer["gate"][rows][:10].mean() for rows in batches])
        np.testing.assert_allclose(gating[name]["open_fraction"], per_batch, rtol=1e-6)
        if rule == "deepagrel":
            np.testing.assert_allclose(gating[name]["fb_mean_abs"], [np.abs(layer["fb"][rows][:10]).mean() for rows in batches], rtol=1e-5)
        for epoch in (1, 2):
            assert by_epoch[name]["open_fraction"][epoch - 1] == pytest.approx(np.mean(per_batch[gating["epoch"] == epoch]), rel=1e-6)
        assert by_outcome[name]["epoch"].tolist() == [1, 2]
        counts = {}
        for outcome, mask in (("rewarded", rewarded), ("unrewarded", ~rewarded)):
            rows = [mask & (trials["epoch"] == epoch) for epoch in (1, 2)]
            counts[outcome] = np.array([r.sum() for r in rows])
            assert by_outcome[name][f"trials_{outcome}"].tolist() == counts[outcome].tolist()
            np.testing.assert_allclose(by_outcome[name][f"open_fraction_{outcome}"], [layer["gate"][r].mean() for r in rows], rtol=1e-6)
            fb_mean_abs = [np.abs(layer["fb"][r]).mean() for r in rows]  # NaN for EBP, which has no fb neurons
            np.testing.assert_allclose(by_outcome[name][f"fb_mean_abs_{outcome}"], fb_mean_abs, rtol=1e-5)
        weights = counts["rewarded"] * counts["unrewarded"] / (counts["rewarded"] + counts["unrewarded"])
        for field in ("open_fraction", "fb_mean_abs"):
            difference = by_outcome[name][f"{field}_rewarded"] - by_outcome[name][f"{field}_unrewarded"]
            assert by_outcome[name][f"{field}_difference"] == pytest.approx(np.sum(weights * difference) / np.sum(weights), rel=1e-6, nan_ok=True)
    assert len(changed) == len(gating["batch"]), "every training batch learns once"
    for name in ("layers.0", "layers.2", "output"):
        np.testing.assert_allclose(gating[name]["changed_fraction"], [batch[name] for batch in changed], rtol=1e-6)


def test_an_existing_run_is_not_overwritten(tmp_path):
    run_experiment(experiment(epochs=1), out=tmp_path, log=None)
    with pytest.raises(ValueError, match="a run file exists already; pass --resume"):
        run_experiment(experiment(epochs=1), out=tmp_path, log=None)
    first = stored_result(tmp_path)
    lines = []
    # A finished run's logging is not compared: the run is done whatever it would sample.
    again = run_experiment(experiment(epochs=1), out=tmp_path, resume=True, logging=LogSettings(every_batches=7), log=lines.append)
    assert again == first and lines[-1:] == [f"{tmp_path / 'run.h5'}: this run is already complete; its result follows (to go on, raise training.patience or training.max_epochs, e.g. with --patience)"]


def datasets(path):
    """Every dataset of a run file but the wall times, and its attributes but the software's
    version and the training sessions."""
    with h5py.File(path, "r") as run:
        found = {"attrs": {k: v for k, v in run.attrs.items() if k not in ("software_version", "sessions")}}
        found["result"] = {k: v for k, v in run["result"].attrs.items() if k != "seconds"}
        run.visititems(lambda name, item: found.update({name: item[()]}) if isinstance(item, h5py.Dataset) and name != "epochs/seconds" else None)
    return found


@pytest.mark.parametrize("device", DEVICES)
def test_a_finished_run_goes_on_with_more_epochs_as_if_it_had_had_them(tmp_path, device):
    whole = run_experiment(experiment(epochs=3), seed=2, out=tmp_path / "whole", device=device, log=None)
    run_experiment(experiment(epochs=2), seed=2, out=tmp_path / "part", device=device, log=None)
    finished = run_experiment(experiment(epochs=2), seed=2, out=tmp_path / "part", resume=True, device=device, log=None)
    assert finished == stored_result(tmp_path / "part") and finished.epochs == 2, "a finished run given its settings is not trained again"
    with pytest.raises(ValueError, match=r"cannot continue this run with other settings.*training\.max_epochs: 2 in the run, 1 now"):
        run_experiment(experiment(epochs=1), seed=2, out=tmp_path / "part", resume=True, device=device, log=None)
    resumed = run_experiment(experiment(epochs=3), seed=2, out=tmp_path / "part", resume=True, device=device, log=None)
    assert (resumed.epochs, resumed.test_accuracy) == (3, whole.test_accuracy)
    part, full = datasets(tmp_path / "part" / "run.h5"), datasets(tmp_path / "whole" / "run.h5")
    assert part.keys() == full.keys() and '"max_epochs": 3' in part["attrs"]["config"]
    for name in full:
        np.testing.assert_equal(part[name], full[name], err_msg=name)
    sessions = load_run(tmp_path / "part" / "run.h5").sessions
    assert [entry["from_epoch"] for entry in sessions] == [0, 2], "a session for the start and one for the resume"
    assert all(entry["device"].startswith(device) for entry in sessions)
    if device == "cuda":
        assert all(f"({torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, cuDNN " in entry["device"] for entry in sessions)

    (tmp_path / "part" / "checkpoint.pt").unlink()
    with pytest.raises(ValueError, match=r"this run is complete and its checkpoint checkpoint\.pt is gone"):
        run_experiment(experiment(epochs=4), seed=2, out=tmp_path / "part", resume=True, device=device, log=None)
    assert datasets(tmp_path / "part" / "run.h5")["result"] == full["result"], "a refusal leaves the finished run as it was"
    assert load_run(tmp_path / "part" / "run.h5").sessions == sessions, "a refused resume adds no session"


def test_a_run_file_names_the_software_and_machine_of_each_session(tmp_path):
    from agrel_sim import recorder

    before = datetime.now(timezone.utc).replace(microsecond=0)
    run_experiment(experiment(epochs=1), out=tmp_path, log=None)
    (entry,) = load_run(tmp_path / "run.h5").sessions
    began = datetime.fromisoformat(entry.pop("began"))
    assert before <= began <= datetime.now(timezone.utc)
    assert entry == {
        "from_epoch": 0, "agrel_sim": agrel_sim.__version__, **recorder.git_checkout(Path(recorder.__file__)),
        "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__, "h5py": h5py.__version__,
        "brian2": importlib.metadata.version("brian2"), "device": "cpu", "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "host": platform.node(),
    }
    assert re.search(
        rf"\n  session 1: from epoch 0, began {re.escape(began.isoformat())}, agrel-sim {re.escape(agrel_sim.__version__)}.*, "
        rf"torch {re.escape(torch.__version__)} on cpu \({torch.get_num_threads()} threads?\), host ",
        summary(load_run(tmp_path / "run.h5")),
    )


def test_a_session_on_cuda_names_the_gpu_and_the_versions_of_cuda_and_cudnn(monkeypatch):
    from agrel_sim.recorder import session

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: f"GPU of {device}")
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    assert session(torch.device("cuda:1"), 3)["device"] == "cuda:1 (GPU of cuda:1, CUDA 12.9, cuDNN 91002)"
    assert session("cpu", 3)["device"] == "cpu"


def test_a_session_names_the_git_commit_of_the_checkout_it_runs_from(tmp_path, monkeypatch):
    from agrel_sim.recorder import git_checkout

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git looks for no repository above tmp_path
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)  # nor reads the user's settings (signed commits, say)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "elsewhere"))  # git_checkout looks at the file's checkout all the same
    repo = tmp_path / "repo"
    (repo / "venv").mkdir(parents=True)

    def git(*arguments):
        done = subprocess.run(["git", f"--git-dir={repo / '.git'}", f"--work-tree={repo}", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *arguments], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    git("init", "-q")
    (repo / "module.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("venv/\n")
    (repo / "venv" / "module.py").write_text("x = 1\n")
    git("add", "module.py", ".gitignore")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD")
    assert git_checkout(repo / "module.py") == {"commit": head, "modified": False}
    (repo / "module.py").write_text("x = 2\n")
    index = (repo / ".git" / "index").read_bytes()
    assert git_checkout(repo / "module.py") == {"commit": head, "modified": True}
    assert (repo / ".git" / "index").read_bytes() == index, "git status must not rewrite the index under the user's git"
    (repo / "notes.txt").write_text("untracked\n")
    git("checkout", "module.py")
    assert git_checkout(repo / "module.py") == {"commit": head, "modified": False}, "untracked files change no result"
    assert git_checkout(repo / "venv" / "module.py") == {"commit": None, "modified": None}, "an installed copy inside a clone"
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "module.py").write_text("x = 1\n")
    assert git_checkout(tmp_path / "loose" / "module.py") == {"commit": None, "modified": None}
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    assert git_checkout(repo / "module.py") == {"commit": None, "modified": None}, "no git"


def test_a_run_file_without_sessions_gains_one_when_resumed_and_bad_sessions_are_named(tmp_path):
    run_experiment(experiment(epochs=1), out=tmp_path, log=None)
    with h5py.File(tmp_path / "run.h5", "a") as run:
        del run.attrs["sessions"]  # as agrel-sim 0.2.0 wrote it, without the descriptions of 0.4.0
        run.visititems(lambda name, item: [item.attrs.pop(key) for key in ("description", "unit")] if isinstance(item, h5py.Dataset) else None)
    assert load_run(tmp_path / "run.h5").sessions == []
    run_experiment(experiment(epochs=2), out=tmp_path, resume=True, log=None)
    with h5py.File(tmp_path / "run.h5", "r") as run:
        assert undescribed(run) == [], "a resume describes the datasets"
    resumed = load_run(tmp_path / "run.h5")
    assert [entry["from_epoch"] for entry in resumed.sessions] == [1]
    assert "\n  sessions before epoch 1: not recorded (agrel-sim 0.2.0 or older)\n  session 1: from epoch 1, " in summary(resumed)
    with h5py.File(tmp_path / "run.h5", "a") as run:
        run.attrs["sessions"] = "[1, 2]"
    before = (tmp_path / "run.h5").read_bytes()
    with pytest.raises(ValueError, match=r"run\.h5: bad sessions attribute \(expected a JSON list of objects, got '\[1, 2\]'\); to resume all the same, delete it"):
        run_experiment(experiment(epochs=3), out=tmp_path, resume=True, log=None)
    assert (tmp_path / "run.h5").read_bytes() == before and not (tmp_path / "run.h5.partial").exists(), "refused before the file is copied"
    with h5py.File(tmp_path / "run.h5", "a") as run:
        del run.attrs["sessions"]  # as the message says
    run_experiment(experiment(epochs=3), out=tmp_path, resume=True, log=None)
    assert [entry["from_epoch"] for entry in load_run(tmp_path / "run.h5").sessions] == [2]


def test_table_refuses_runs_of_other_settings_or_one_seed_twice_and_lists_incomplete_ones(tmp_path, capsys):
    run_experiment(experiment(epochs=1), seed=0, out=tmp_path / "a" / "seed0", log=None)
    run_experiment(experiment(epochs=2), seed=1, out=tmp_path / "b" / "seed1", log=None)
    assert main(["table", str(tmp_path)]) == 2
    assert re.search(
        r"a/seed0/run\.h5 and .*b/seed1/run\.h5: runs of the Table 1 row digits, small, no augmentation, deepagrel "
        r"made with different settings \(training\.max_epochs: 1 and 2\); a row averages runs that differ only in their seed",
        capsys.readouterr().err,
    )
    shutil.rmtree(tmp_path / "b")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert main(["table", str(tmp_path)]) == 2
    assert re.search(r"a/seed0/run\.h5 and .*copy/seed0/run\.h5: seed 0 twice in the Table 1 row", capsys.readouterr().err)
    shutil.rmtree(tmp_path / "copy")
    other_net = dataclasses.replace(experiment(epochs=1), model=experiment().model.replace(layers=(*experiment().model.layers, Dense(8))))
    run_experiment(other_net, seed=1, out=tmp_path / "b" / "seed1", log=None)
    assert main(["table", str(tmp_path)]) == 2
    assert re.search(r"with different settings \(len\(model\.layers\): 3 and 4; model\.layers\[3\]\.kind: absent and 'dense'", capsys.readouterr().err)
    shutil.rmtree(tmp_path / "b")
    run_experiment(experiment(epochs=1), seed=1, out=tmp_path / "b" / "seed1", log=None)
    assert main(["table", str(tmp_path)]) == 0
    assert "| digits | small | none |" in capsys.readouterr().out
    # A setting that an older run file lacks counts as what that run did: the default.
    with h5py.File(tmp_path / "a" / "seed0" / "run.h5", "a") as run:
        config = json.loads(run.attrs["config"])
        del config["training"]["lr_decay_factor"]
        run.attrs["config"] = json.dumps(config)
    assert main(["table", str(tmp_path)]) == 0
    capsys.readouterr()
    with h5py.File(tmp_path / "b" / "seed1" / "run.h5", "a") as run:
        config = json.loads(run.attrs["config"])
        config["training"]["lr_decay_factor"] = 0.5
        run.attrs["config"] = json.dumps(config)
    assert main(["table", str(tmp_path)]) == 2
    assert "training.lr_decay_factor: 1.0 and 0.5" in capsys.readouterr().err
    with h5py.File(tmp_path / "b" / "seed1" / "run.h5", "a") as run:
        run.attrs["config"] = json.dumps({**config, "training": {**config["training"], "lr_decay_factor": 1.0}})
    edit_config(tmp_path / "b" / "seed1" / "run.h5", lambda config: config.update(dtype="float64"))
    assert main(["table", str(tmp_path)]) == 2
    assert "dtype: 'float32' and 'float64'" in capsys.readouterr().err
    edit_config(tmp_path / "b" / "seed1" / "run.h5", lambda config: config.update(dtype="float32"))

    # An incomplete run is left out of the table, and said so in one line.
    with h5py.File(tmp_path / "b" / "seed1" / "run.h5", "a") as run:
        run.attrs["complete"] = False
    assert main(["table", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "\n1 run(s); CSV written to" in out.out and re.search(r"1 incomplete run\(s\) left out .*b/seed1/run\.h5", out.out)
    assert out.err == ""
    assert main(["analyze", str(tmp_path / "b" / "seed1" / "run.h5"), "--out", str(tmp_path / "figures")]) == 0
    assert re.match(r"agrel-sim: warning: .*b/seed1/run\.h5: incomplete run", capsys.readouterr().err)


def test_a_failed_start_beside_other_runs_keeps_its_own_error_and_their_folders(tmp_path, monkeypatch):
    # Runs of a sweep share parent folders: another run's failed start may remove one just as
    # this run makes it, or remove it before this run's cleanup does.
    made, removed, real_mkdir, real_rmdir = [], [], Path.mkdir, Path.rmdir

    def mkdir_once_too_late(path, *args, **kwargs):
        if path.name == "seed0" and not made:
            made.append(path)
            raise FileNotFoundError(2, "No such file or directory")
        return real_mkdir(path, *args, **kwargs)

    def rmdir_already_gone(path):
        if path.name == "shared":
            real_rmdir(path)
            removed.append(path)
            raise FileNotFoundError(2, "No such file or directory")
        return real_rmdir(path)

    monkeypatch.setattr(Path, "mkdir", mkdir_once_too_late)
    monkeypatch.setattr(Path, "rmdir", rmdir_already_gone)

    def data_not_found(name, data_dir):
        raise DatasetError(f"{name}: not found")

    monkeypatch.setattr("agrel_sim.runs.load_dataset", data_not_found)
    with pytest.raises(DatasetError, match="digits: not found"):
        run_experiment(experiment(epochs=1), out=tmp_path / "shared" / "seed0", log=None)
    assert made and removed and not (tmp_path / "shared").exists()


def test_a_run_folder_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "taken").write_text("a file where the run folder should go")
    for out in ("taken", "taken/seed0"):
        with pytest.raises(ValueError, match=rf"{out}: cannot make the run folder, as \S+taken is not a folder; choose another --out$"):
            run_experiment(experiment(epochs=1), out=tmp_path / out, log=None)
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match=r"link/seed0: cannot make the run folder, as \S+link is a link to \S+gone, which does not exist; choose another --out$"):
        run_experiment(experiment(epochs=1), out=tmp_path / "link" / "seed0", log=None)
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("name", ["run.h5", "checkpoint.pt"])
@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_in_place_of_a_runs_file_is_named(tmp_path, name, resume):
    (tmp_path / "run" / name).mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"run/{re.escape(name)}: a folder, where the run's {re.escape(name)} belongs; move it away, or choose another --out"):
        run_experiment(experiment(epochs=1), out=tmp_path / "run", resume=resume, log=None)


def test_a_failed_start_leaves_no_empty_run_folder(tmp_path):
    on_mnist = load_experiment("mnist_fc3_deepagrel")
    with pytest.raises(ValueError, match="MNIST"):
        run_experiment(on_mnist, out=tmp_path / "runs" / "small" / "seed0", data_dir=tmp_path / "no_data", log=None)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made stays
    with pytest.raises(ValueError, match="MNIST"):
        run_experiment(on_mnist, out=tmp_path / "mine", data_dir=tmp_path / "no_data", log=None)
    assert (tmp_path / "mine").is_dir()


@pytest.mark.parametrize("device, cuda_devices, message", [
    ("gpu", 1, r"device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ("cuda:x", 1, r"device: expected 'cpu', 'cuda' or 'cuda:N', got 'cuda:x'"),
    ("cpu:5", 1, r"device: expected 'cpu', 'cuda' or 'cuda:N', got 'cpu:5' \(torch has one CPU device, 'cpu'"),
    ("cuda", 0, r"device: 'cuda' requested but CUDA is not available on this machine; use 'cpu'"),
    ("cuda:2", 2, r"device: 'cuda:2' requested but this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"),
])
def test_devices_are_checked_before_the_run_folder_is_made(device, cuda_devices, message, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    with pytest.raises(ValueError, match=message):
        run_experiment(experiment(epochs=1), out=tmp_path / "run", device=device, log=None)
    assert not (tmp_path / "run").exists()


def test_cpu_0_is_the_cpu_as_torch_names_it(tmp_path):
    run_experiment(experiment(epochs=1), out=tmp_path / "run", device="cpu:0", log=None)  # runs begun so before cpu:N was refused go on
    run_experiment(experiment(epochs=2), out=tmp_path / "run", device="cpu:0", resume=True, log=None)
    assert run_experiment(experiment(epochs=3), out=tmp_path / "run", device="cpu", resume=True, log=None).epochs == 3  # one device


def test_a_run_resumed_with_another_thread_count_says_so(tmp_path):
    threads = torch.get_num_threads()
    lines = []
    try:
        torch.set_num_threads(1)
        run_experiment(experiment(epochs=1), out=tmp_path / "run", log=None)
        run_experiment(experiment(epochs=2), out=tmp_path / "run", resume=True, log=lines.append)
        with h5py.File(tmp_path / "run" / "run.h5", "a") as run:  # a session with 2 threads, killed before it finished epoch 3
            sessions = json.loads(run.attrs["sessions"])
            run.attrs["sessions"] = json.dumps([*sessions, {**sessions[-1], "from_epoch": 2, "torch_threads": 2}])
        run_experiment(experiment(epochs=3), out=tmp_path / "run", resume=True, log=lines.append)
        assert not any("note:" in line for line in lines), "the thread count that trained the checkpoint's epoch"
        torch.set_num_threads(2)
        run_experiment(experiment(epochs=4), out=tmp_path / "run", resume=True, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert f"{tmp_path / 'run'}: note: 2 torch threads, where the session that trained its epoch 3 had 1; the thread count orders torch's sums, so the run goes on, but not bit for bit as it would have (OMP_NUM_THREADS=1 keeps it so)" in lines


def test_a_second_process_cannot_train_in_a_busy_run_folder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(60)", str(tmp_path / "run.lock")],
        stdout=subprocess.PIPE,
    )
    try:
        holder.stdout.readline()  # the lock is held
        with pytest.raises(ValueError, match="another process is training in this run folder"):
            run_experiment(experiment(epochs=1), out=tmp_path, log=None)
        assert not (tmp_path / "run.h5").exists()
    finally:
        holder.kill()
        holder.wait()
    run_experiment(experiment(epochs=1), out=tmp_path, log=None)  # a killed holder releases the lock
    assert (tmp_path / "run.h5").exists()


def test_older_checkpoints_and_run_files_cannot_be_resumed(tmp_path):
    run_experiment(experiment(epochs=2), out=tmp_path, log=None)
    with h5py.File(tmp_path / "run.h5", "a") as run:
        run.attrs["complete"] = False  # as if killed
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "learning_rate"}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt: a checkpoint of an older agrel-sim.*start the run again"):
        run_experiment(experiment(epochs=2), out=tmp_path, resume=True, log=None)
    torch.save(state, tmp_path / "checkpoint.pt")
    with h5py.File(tmp_path / "run.h5", "a") as run:
        run.attrs["layout_version"] = 1
    with pytest.raises(ValueError, match=r"run\.h5: run-file layout version 1, but this agrel-sim writes 5"):
        run_experiment(experiment(epochs=2), out=tmp_path, resume=True, log=None)


def test_a_run_whose_records_are_damaged_does_not_go_on(tmp_path):
    # Opening the file reads no record: damage inside a chunk of data is found only by reading
    # it, and a run that went on would end "complete" with it. Here the last of many chunks.
    logging = LogSettings(every_batches=1, trials_per_batch=20)
    run_experiment(experiment(epochs=2), seed=0, out=tmp_path, logging=logging, log=None)
    with h5py.File(tmp_path / "run.h5", "r") as run:
        ff = run["layers/layers.0/ff"].id
        assert ff.get_num_chunks() > 2
        chunk = ff.get_chunk_info(ff.get_num_chunks() - 1)
    with open(tmp_path / "run.h5", "r+b") as handle:
        handle.seek(chunk.byte_offset + chunk.size // 2)
        handle.write(bytes(64))
    damaged = (tmp_path / "run.h5").read_bytes()
    with pytest.raises(ValueError, match=r"run\.h5: the run file is damaged \(cannot read /layers/layers\.0/ff: .*\); move the run folder away and train the run again"):
        run_experiment(experiment(epochs=3), seed=0, out=tmp_path, resume=True, logging=logging, log=None)
    assert (tmp_path / "run.h5").read_bytes() == damaged


def test_a_run_file_of_layout_4_resumes_and_records_the_alignment_from_then_on(tmp_path, monkeypatch):
    from agrel_sim.analysis import plot_alignment

    whole = tmp_path / "whole" / "run.h5"
    run_experiment(experiment(epochs=3, feedback="independent"), seed=2, out=whole.parent, log=None)
    old = tmp_path / "old" / "run.h5"
    run_experiment(experiment(epochs=2, feedback="independent"), seed=2, out=old.parent, log=None)
    with h5py.File(old, "a") as run:  # as agrel-sim wrote it before /alignment
        del run["alignment"]
        run.attrs["layout_version"] = 4
        attrs = dict(run.attrs)
    with pytest.raises(ValueError, match=r"run-file layout version 3, but this agrel-sim writes 5; it cannot resume the run"):
        check_resumable(old, {**attrs, "layout_version": 3})
    figures = drawn_figures(monkeypatch)
    layout_4 = load_run(old)
    assert layout_4.alignment() is None
    plot_alignment(layout_4, tmp_path / "alignment.png")
    assert [text.get_text() for text in figures[0].axes[0].texts] == ["not recorded (a run file of layout 4 or older)"]

    run_experiment(experiment(epochs=3, feedback="independent"), seed=2, out=old.parent, resume=True, log=None)
    resumed, uninterrupted = load_run(old).alignment(), load_run(whole).alignment()
    assert uninterrupted["epoch"].tolist() == [0, 1, 2, 3] and resumed["epoch"].tolist() == [3], "rows from the epochs trained since"
    assert list(resumed) == list(uninterrupted) == ["epoch", "layers.0", "layers.2", "output"]
    for name in ("layers.0", "layers.2", "output"):
        assert resumed[name].tolist() == uninterrupted[name][3:].tolist(), name
    with h5py.File(old, "r") as run:
        assert run.attrs["layout_version"] == 5 and undescribed(run) == []
    plot_alignment(load_run(old), tmp_path / "alignment.png")
    assert [line.get_label() for line in figures[1].axes[0].lines] == ["layers.0", "layers.2", "output"]


@pytest.mark.filterwarnings("ignore:brian2 backend.*short of its fixed point:UserWarning")  # short phases suffice here
@pytest.mark.parametrize("backend", ["torch", "brian2"])
def test_the_alignment_rows_are_the_networks_at_the_end_of_each_epoch(tmp_path, backend):
    from agrel_sim import ColumnNetwork, Dense, Rule, build
    from agrel_sim.training import EpochMetrics

    description = ColumnNetwork((6,), [Dense(5)], 3, rule=Rule(learning_rate=1.0, init_range=0.5, feedback="independent", weight_decay=0.2), name="tiny")
    options = {"t_stimulus": 20, "t_selection": 5, "t_feedback": 20, "t_rpe": 5, "t_plasticity": 5} if backend == "brian2" else {}
    net = build(description, backend=backend, **options)
    config = {"experiment": "tiny", "model": description.to_dict(), "dataset": "none"}
    recorder = RunFile(tmp_path / "run.h5", net, config, 0)
    expected = [net.feedback_alignment()]
    g = torch.Generator().manual_seed(0)
    for epoch in (1, 2, 3):
        for batch in range(3):
            images = torch.rand(10, 6, generator=g)
            labels = images.view(10, 3, 2).sum(2).argmax(1)  # forced correct actions on a learnable task
            recorder.record_batch(epoch, batch, torch.arange(10), labels, net.run_trials(images, labels, actions=labels, record=True))
        recorder.write_epoch(epoch, EpochMetrics(epoch, 1.0, 0.1, 0.5, 1.0, 1.0))
        expected.append(net.feedback_alignment())
    with pytest.warns(IncompleteRunWarning):
        alignment = load_run(tmp_path / "run.h5").alignment()
    assert list(alignment) == ["epoch", "layers.0", "output"] and alignment["epoch"].tolist() == [0, 1, 2, 3]
    for name in ("layers.0", "output"):
        assert alignment[name].tolist() == [row[name] for row in expected], name
        assert alignment[name][-1] > alignment[name][0] + 0.5, f"{name}: {alignment[name]}"
    RunFile(tmp_path / "run.h5", net, config, 0, resume_after=2)
    with h5py.File(tmp_path / "run.h5", "r") as run:
        assert run["alignment"]["epoch"][:].tolist() == [0, 1, 2] and run["alignment"]["output"].shape == (3,), "a resume drops the rows of later epochs"
        rows = {f"trials/{name}": item.shape[0] for name, item in run["trials"].items()}
        rows.update({f"layers/{layer}/{name}": run["layers"][layer][name].shape[0] for layer in run["layers"] for name in ("ff", "fb", "gate")})
        assert set(rows.values()) == {2 * 10}, f"and the logged trials of later epochs (10 an epoch): {rows}"


def test_a_run_resumes_only_with_the_settings_it_began_with(tmp_path):
    run_experiment(experiment(epochs=1), seed=3, out=tmp_path, log=None)
    with h5py.File(tmp_path / "run.h5", "a") as run:
        run.attrs["complete"] = False  # as if killed
    with pytest.raises(ValueError, match=r"run\.h5: cannot continue this run with other settings.*seed: 3 in the run, 4 now.*same experiment, seed"):
        run_experiment(experiment(epochs=1), seed=4, out=tmp_path, resume=True, log=None)
    with pytest.raises(ValueError, match=r"model\.rule\.learning_rate: 0\.3 in the run, 0\.5 now; training\.batch_size: 20 in the run, 10 now"):
        run_experiment(experiment(epochs=1, batch_size=10, learning_rate=0.5), seed=3, out=tmp_path, resume=True, log=None)
    run_experiment(experiment(epochs=1), seed=3, out=tmp_path, resume=True, log=None)  # the same settings resume
    with h5py.File(tmp_path / "run.h5", "a") as run:
        run.attrs["config"] = run.attrs["config"][:-1]  # damaged: no longer JSON
    with pytest.raises(ValueError, match=r"run\.h5: the run file of this checkpoint is missing, unreadable or damaged \(JSONDecodeError: .*\); move the run folder away and train the run again$"):
        run_experiment(experiment(epochs=1), seed=3, out=tmp_path, resume=True, log=None)
    (tmp_path / "run.h5").unlink()
    with pytest.raises(ValueError, match=r"run\.h5: the run file of this checkpoint is missing, unreadable or damaged \(FileNotFoundError: .*move the run folder away"):
        run_experiment(experiment(epochs=1), seed=3, out=tmp_path, resume=True, log=None)


def test_resume_never_overwrites_an_hdf5_file_that_is_not_a_run_file(tmp_path):
    with h5py.File(tmp_path / "run.h5", "w") as other:
        other["x"] = [1]
    with pytest.raises(ValueError, match=r"run\.h5: an HDF5 file but not a run file of agrel-sim .*; move it away or choose another --out$"):
        run_experiment(experiment(epochs=1), out=tmp_path, resume=True, log=None)
    with h5py.File(tmp_path / "run.h5", "r") as other:
        assert list(other) == ["x"]


def test_a_damaged_checkpoint_is_named(tmp_path, monkeypatch):
    from agrel_sim.backends.torch_backend import TorchNetwork

    run_experiment(experiment(epochs=1), out=tmp_path, log=None)
    with h5py.File(tmp_path / "run.h5", "a") as run:
        run.attrs["complete"] = False  # as if killed
    good = (tmp_path / "checkpoint.pt").read_bytes()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    with zipfile.ZipFile(tmp_path / "checkpoint.pt") as archive:  # the largest stored tensor, where a flipped byte still loads
        entry = max(archive.infolist(), key=lambda info: info.file_size)
    start = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra)
    damaged = bytearray(good)
    damaged[start + entry.file_size // 2] ^= 0xFF
    (tmp_path / "checkpoint.pt").write_bytes(bytes(damaged))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True).keys() == state.keys(), "torch reads it without a word"
    with pytest.raises(ValueError, match=rf"checkpoint\.pt: a damaged checkpoint \(its entry {re.escape(entry.filename)} fails its checksum\); restore it from a copy"):
        run_experiment(experiment(epochs=2), out=tmp_path, resume=True, log=None)
    torch.save({key: value for key, value in state.items() if key not in ("rng", "history")}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt: a checkpoint that lacks history, rng; restore it from a copy"):
        run_experiment(experiment(epochs=2), out=tmp_path, resume=True, log=None)
    for changed in ({"weights": {key: value[:1] for key, value in state["weights"].items()}}, {"rng": {**state["rng"], "order": torch.zeros(3, dtype=torch.uint8)}}):
        torch.save({**state, **changed}, tmp_path / "checkpoint.pt")
        with pytest.raises(ValueError, match=r"checkpoint\.pt: the checkpoint does not fit this run \((ValueError|RuntimeError): .*\); restore it from a copy"):
            run_experiment(experiment(epochs=2), out=tmp_path, resume=True, log=None)
    torch.save(state, tmp_path / "checkpoint.pt")

    def out_of_memory(self, weights):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(TorchNetwork, "load_weights", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # not the checkpoint's fault: the command line says what to do
        run_experiment(experiment(epochs=2), out=tmp_path, resume=True, log=None)
    monkeypatch.undo()
    (tmp_path / "checkpoint.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a readable checkpoint \(.*\); restore it from a copy, or move the run folder away and train the run again"):
        run_experiment(experiment(epochs=1), out=tmp_path, resume=True, log=None)
    torch.save({"weights": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a checkpoint of agrel-sim; restore it from a copy"):
        run_experiment(experiment(epochs=1), out=tmp_path, resume=True, log=None)


KILL_EXPERIMENT = """
name = "killed"
dataset = "digits"
[model]
input_shape = [1, 8, 8]
layers = [{kind = "conv", channels = 8, kernel_size = 3}, {kind = "dropout", rate = 0.3}, {kind = "dense", units = 64}]
output = {actions = 10}
rule = {learning_rate = 0.3, init_range = 0.1}
[training]
batch_size = 10
max_epochs = 5
patience = 100
validation_size = 200
[training.augmentation]
factor = 8
"""


def train_command(path, out, *extra):
    return [sys.executable, "-m", "agrel_sim.cli", "train", str(path), "--out", str(out), "--seed", "7", "--quiet", *extra]


def checkpoint_epoch(folder):
    try:
        return load_checkpoint(folder / "checkpoint.pt")["epoch"]
    except (FileNotFoundError, ValueError):
        return 0


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    path = tmp_path / "killed.toml"
    path.write_text(KILL_EXPERIMENT)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    process = subprocess.Popen(train_command(path, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while checkpoint_epoch(killed) < 2:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "training too slow to reach epoch 2"
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 3
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint_epoch(killed) < 5, "killed before the end"

    # The killed run's file opens with plain h5py and holds every finished epoch.
    finished = checkpoint_epoch(killed)
    with h5py.File(killed / "run.h5", "r") as run:
        assert not run.attrs["complete"]
        assert run["epochs"]["epoch"][:].tolist()[:finished] == list(range(1, finished + 1))
    with pytest.warns(IncompleteRunWarning, match="incomplete run"):
        assert len(load_run(killed / "run.h5").epochs["epoch"]) >= finished

    subprocess.run(train_command(path, killed, "--resume"), env=env, check=True, capture_output=True)
    subprocess.run(train_command(path, whole), env=env, check=True, capture_output=True)

    a, b = (load_checkpoint(folder / "checkpoint.pt") for folder in (killed, whole))
    assert a["epoch"] == b["epoch"] == 5
    for key in b["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
        assert torch.equal(a["best_weights"][key], b["best_weights"][key]), key
    part, full = datasets(killed / "run.h5"), datasets(whole / "run.h5")
    assert part["attrs"]["complete"] and part.keys() == full.keys()
    for name in full:
        np.testing.assert_equal(part[name], full[name], err_msg=name)


def test_ctrl_c_ends_a_run_with_a_message_and_the_run_goes_on_with_resume(tmp_path, python_sigint):
    path = tmp_path / "killed.toml"
    path.write_text(KILL_EXPERIMENT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(train_command(path, tmp_path / "run"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while checkpoint_epoch(tmp_path / "run") < 1:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "training too slow to reach epoch 1"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert process.stderr.read().strip().splitlines()[-1].startswith("agrel-sim: interrupted; every finished epoch is kept")
    assert checkpoint_epoch(tmp_path / "run") < 5
    done = subprocess.run(train_command(path, tmp_path / "run", "--resume"), env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "epochs=5 " in done.stdout, done.stderr


SHORT_EPOCHS = """
name = "short"
dataset = "digits"
[model]
input_shape = [1, 8, 8]
layers = [{kind = "dense", units = 16}]
output = {actions = 10}
[training]
batch_size = 400
max_epochs = 400
patience = 400
validation_size = 100
"""


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.3])
def test_a_kill_at_any_moment_leaves_a_readable_run_file(tmp_path, delay):
    # Epochs of a few batches: most of the time goes into writing the run file, so the kill
    # lands in or near a write.
    path = tmp_path / "short.toml"
    path.write_text(SHORT_EPOCHS)
    process = subprocess.Popen(train_command(path, tmp_path / "run"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "run.h5").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with h5py.File(tmp_path / "run" / "run.h5", "r") as run:
        epochs = run["epochs"]["epoch"][:].tolist()
        assert epochs == list(range(1, len(epochs) + 1)) and not run.attrs["complete"]
        assert run["gating"]["epoch"].shape[0] == len(epochs) * 4


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for rule in ("deepagrel", "ebp"):
        for seed in (0, 1):
            run_experiment(experiment(rule, epochs=2), seed=seed, out=root / rule / f"seed{seed}", log=None)
    return root


def test_analyze_writes_figures_and_summary(finished_runs, tmp_path, capsys):
    assert main(["analyze", str(finished_runs), "--out", str(tmp_path / "figures")]) == 0
    out = capsys.readouterr().out
    assert out.count("complete") >= 4 and "test_acc=" in out and "learning rate 0.3 to 0.3" in out
    assert out.count("rewarded minus unrewarded logged trials, within epochs (2 of 2 epochs have both):") == 4
    assert re.search(r"\n    layers\.0 +open gates [+-]0\.\d{3}, \|fb\| [+-]0\.\d{4}\n", out), "DeepAGREL"
    assert re.search(r"\n    layers\.0 +open gates [+-]0\.\d{3}, \|fb\| no feedback \(EBP\)\n", out)
    # Tied feedback: the alignment stays 1 (EBP, without feedback weights, gets no such line).
    assert out.count("  feedback alignment (cosine of fb and ff weights), epoch 0 → 2: layers.0 1.000 → 1.000, layers.2 1.000 → 1.000, output 1.000 → 1.000\n") == 2
    pngs = sorted(str(p.relative_to(tmp_path / "figures")) for p in (tmp_path / "figures").rglob("*.png"))
    assert "reward_curves.png" in pngs and "ebp/seed1/small_ebp_seed1_gating.png" in pngs and len(pngs) == 1 + 4 * 4
    assert "deepagrel/seed0/small_deepagrel_seed0_alignment.png" in pngs
    assert f"\n{len(pngs)} figures written to" in out
    for png in (tmp_path / "figures").rglob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # A trial asked of runs without time courses (torch runs) is refused, not ignored.
    assert main(["analyze", str(finished_runs), "--out", str(tmp_path / "trial"), "--trial", "0"]) == 2
    assert "agrel-sim: error: trial 0: no run here has traced trials; only Brian2 runs trained with trace_every > 0" in capsys.readouterr().err
    assert not (tmp_path / "trial").exists()


def test_figures_leave_the_callers_matplotlib_backend_and_pyplot_alone(finished_runs, tmp_path, monkeypatch):
    import matplotlib
    import matplotlib.pyplot as plt

    from agrel_sim.analysis import analyze

    def switch(backend, *args, **kwargs):
        raise AssertionError(f"the analysis switched matplotlib's backend to {backend}")

    monkeypatch.setattr(matplotlib, "use", switch)  # a notebook's inline backend would stop showing figures
    open_figures = plt.get_fignums()
    text, figures = analyze(finished_runs, tmp_path / "figures")
    assert len(figures) == 1 + 4 * 4 and all(figure.is_file() for figure in figures)
    assert plt.get_fignums() == open_figures, "no figure left open in pyplot"


def test_without_a_path_the_figures_are_returned_not_written(finished_runs, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from agrel_sim import analysis

    monkeypatch.chdir(tmp_path)
    run = load_run(finished_runs / "deepagrel" / "seed0" / "run.h5")
    figures = [analysis.plot_reward_curves(load_runs(finished_runs)), analysis.plot_gating(run), analysis.plot_alignment(run),
               analysis.plot_rpe_distribution(run, bins=10), analysis.plot_activity_maps(run, trials=2)]
    assert all(isinstance(figure, Figure) and figure.axes for figure in figures)
    assert [ax.get_title() for ax in figures[1].axes] == ["fraction of open gates", "mean |feedback|", "fraction of synapses changed per batch"]
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_activity_maps_share_one_scale_for_gates_and_centre_feedback_on_zero(finished_runs, tmp_path, monkeypatch):
    from agrel_sim import analysis

    drawn = []
    monkeypatch.setattr(analysis, "_save", lambda fig, path: drawn.append(fig))
    analysis.plot_activity_maps(load_run(finished_runs / "deepagrel" / "seed0" / "run.h5"), tmp_path / "activity.png")
    axes = [ax for ax in drawn[0].axes if ax.images]
    assert [ax.get_title() for ax in axes[:3]] == ["ff", "fb", "gate"]
    for ax in axes[1::3]:  # fb
        low, high = ax.images[0].get_clim()
        assert low == -high and high > 0
    assert all(ax.images[0].get_clim() == (0, 1) for ax in axes[2::3]), "a gate reads the same in every layer, the output's (always open) too"
    assert [ax.get_ylabel() for ax in axes[::3]] == ["layers.0", "layers.1\n(dropout)", "layers.2", "output"]
    assert len(axes[0].get_yticklabels()) == 4, "the last four logged trials"


def test_asking_a_run_for_what_it_did_not_record_is_named(finished_runs, tmp_path):
    from agrel_sim.analysis import plot_activity_maps, reward_curves

    run = load_run(finished_runs / "ebp" / "seed0" / "run.h5")
    with pytest.raises(RunFileError, match=r"run\.h5: no layer 'layers\.5' is recorded; the layers are layers\.0, layers\.1, layers\.2, output"):
        run.layer("layers.5")
    with pytest.raises(RunFileError, match=r"run\.h5: no layer 0 is recorded; the layers are layers\.0, layers\.1"):
        run.layer(0)
    with pytest.raises(ValueError, match=r"runs: expected a list of Run objects \(load_runs\(path\) reads a folder of them\), got \['runs/digits'\]"):
        reward_curves("runs/digits")
    with pytest.raises(ValueError, match=r"runs: expected a list of Run objects"):
        reward_curves([run, str(run.path)])
    curves = reward_curves(each for each in [run])
    assert curves and list(curves) == list(reward_curves([run])), "a generator is read once"
    with pytest.raises(RunFileError, match=r"run\.h5: no time courses: only the brian2 backend records them, with backend_options\.trace_every > 0"):
        run.timecourse()
    with pytest.raises(ValueError, match=r"trials: expected an integer >= 1, got -3"):
        plot_activity_maps(run, tmp_path / "maps.png", trials=-3)


@pytest.mark.parametrize("factor", [None, 2])
def test_a_run_files_experiment_trains_the_same_run_again(tmp_path, factor):
    logging = LogSettings(every_batches=3, trials_per_batch=2, max_units=7, summary_trials=5)
    original = dataclasses.replace(experiment(epochs=2, factor=factor, feedback="independent"), logging=logging)
    run_experiment(original, seed=5, out=tmp_path / "first", log=None)
    run = load_run(tmp_path / "first" / "run.h5")
    rebuilt = run.experiment()
    assert rebuilt == dataclasses.replace(original, source=f"{tmp_path / 'first' / 'run.h5'}: config")
    again = run_experiment(Experiment.from_toml(rebuilt.to_toml(tmp_path / "again.toml")), seed=run.seed, out=tmp_path / "again", log=None)
    assert again.test_accuracy == run.result["test_accuracy"]
    repeated = load_run(tmp_path / "again" / "run.h5").epochs
    assert all(np.array_equal(repeated[name], run.epochs[name]) for name in ("reward_probability", "train_loss", "validation_accuracy"))

    def as_written_by(version, **changes):  # the run file as an older agrel-sim wrote it
        with h5py.File(tmp_path / "first" / "run.h5", "a") as handle:
            config = {**json.loads(handle.attrs["config"]), **changes}
            handle.attrs["config"] = json.dumps({key: value for key, value in config.items() if value is not None})
            handle.attrs["software_version"] = version
        return load_run(tmp_path / "first" / "run.h5")

    # 0.1.0 recorded no backend: its runs were the torch backend's.
    assert as_written_by("0.1.0", backend=None, backend_options=None).experiment() == original
    # Up to 0.3.0 only the options given were recorded; those not given had the defaults of then,
    # among them Brian2's gate_threshold, an option since removed.
    for version, options in [("0.3.0", {"codegen_target": "numpy"}), ("0.4.0", {"gate_threshold": 0.1})]:
        with pytest.raises(RunFileError, match=rf"first/run\.h5: config: backend_options\.gate_threshold: not an option.*\(the run was made by agrel-sim {version}; this is "):
            as_written_by(version, backend="brian2", backend_options=options).experiment()


def test_a_run_file_made_in_python_without_training_settings_rebuilds_no_experiment(tmp_path):
    from agrel_sim.recorder import RunFile
    from agrel_sim.training import TrainingSettings, train

    model = experiment().model
    train(model, load_dataset("digits"), TrainingSettings(max_epochs=1, validation_size=300), seed=0, progress=False, log=None,
          run_file=lambda net: RunFile(tmp_path / "run.h5", net, {"experiment": "mine", "dataset": "digits"}, 0))
    with pytest.raises(RunFileError, match=r"run\.h5: config: records no training settings, so its experiment cannot be rebuilt \(a run file made by a RunFile in Python"):
        load_run(tmp_path / "run.h5").experiment()


def test_runs_recorded_in_python_without_training_settings_go_into_the_table(tmp_path, capsys):
    from agrel_sim.experiment import default_experiment
    from agrel_sim.recorder import RunFile
    from agrel_sim.training import TrainingSettings, train

    model = default_experiment().model
    config = {"experiment": "in_python", "model": model.to_dict(), "dataset": "digits"}  # no training settings
    train(model, load_dataset("digits"), TrainingSettings(max_epochs=1, validation_size=300), seed=0, progress=False, log=None,
          run_file=lambda net: RunFile(tmp_path / "run.h5", net, config, 0))
    assert main(["table", str(tmp_path)]) == 0
    assert "| digits | digits_dense | none |" in capsys.readouterr().out


def test_a_run_file_whose_epochs_are_no_dataset_is_named_on_resume(tmp_path, capsys):
    assert main(["train", "--max-epochs", "2", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    with h5py.File(tmp_path / "run" / "run.h5", "a") as run:  # an interrupted run whose checkpoint is gone: its epochs are counted
        run.attrs["complete"] = False
        del run["epochs/epoch"]
        run["epochs"].create_group("epoch")
    (tmp_path / "run" / "checkpoint.pt").unlink()
    assert main(["train", "--resume", "--max-epochs", "3", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "run.h5: cannot read the epochs of this run file, it is damaged (AttributeError: " in capsys.readouterr().err


def test_a_run_that_diverged_in_its_first_epoch_loads_with_no_test_accuracy(tmp_path):
    linear = {"name": "linear", "input_shape": [1, 8, 8], "layers": [], "output": {"actions": 10}, "rule": {"learning_rate": 1e30, "init_range": 0.1}}
    hot = Experiment.from_dict({"name": "hot", "model": linear, "dataset": "digits", "training": {"batch_size": 50, "validation_size": 300}}, "<test>")
    result = run_experiment(hot, seed=0, out=tmp_path, log=None)
    assert (result.diverged, result.epochs, result.best_epoch) == (True, 1, 0)
    assert math.isnan(load_run(tmp_path / "run.h5").result["test_accuracy"]), "no weights to test: a possible result"
    lines = []
    again = run_experiment(hot, seed=0, out=tmp_path, resume=True, log=lines.append)
    assert again.diverged and (again.epochs, again.best_epoch) == (1, 0)
    assert lines[-1:] == [f"{tmp_path / 'run.h5'}: this run is already complete; its result follows (it diverged: its training loss is not finite, so it cannot go on; train it again in a new folder, with a lower learning rate)"]


def test_the_summary_of_a_diverged_run_says_so(tmp_path):
    linear = {"name": "linear", "input_shape": [1, 8, 8], "layers": [], "output": {"actions": 10}, "rule": {"learning_rate": 1000.0, "init_range": 0.1}}
    hot = Experiment.from_dict({"name": "hot", "model": linear, "dataset": "digits", "training": {"batch_size": 50, "validation_size": 300}}, "<test>")
    result = run_experiment(hot, seed=0, out=tmp_path, log=None)
    assert result.diverged
    assert re.search(r"result: test_acc=.* converged=False diverged=True time=", summary(load_run(tmp_path / "run.h5")))


def test_reward_curves_and_gating_statistics(finished_runs, tmp_path):
    from agrel_sim.analysis import gating_by_epoch, gating_by_outcome, reward_curves

    runs = load_runs(finished_runs)
    curves = reward_curves(runs)
    assert list(curves) == [("digits", "small", False)] and set(curves["digits", "small", False]) == {"deepagrel", "ebp"}
    for rule, curve in curves["digits", "small", False].items():
        values = np.array([[r.epochs["reward_probability"][e] for r in runs if r.rule == rule] for e in range(2)])
        np.testing.assert_allclose(curve["mean"], values.mean(1))
        np.testing.assert_allclose(curve["two_sigma"], 2 * values.std(1, ddof=1))
    # Another network is another panel, never part of these curves.
    other = dataclasses.replace(experiment("deepagrel", epochs=1), model=experiment().model.replace(name="other"))
    run_experiment(other, seed=0, out=tmp_path / "other" / "seed0", log=None)
    curves = reward_curves([*runs, load_run(tmp_path / "other" / "seed0" / "run.h5")])
    assert list(curves) == [("digits", "other", False), ("digits", "small", False)]
    assert curves["digits", "other", False]["deepagrel"]["runs"].tolist() == [1]
    assert curves["digits", "small", False]["deepagrel"]["runs"].tolist() == [2, 2]
    stats = gating_by_epoch(runs[0])
    assert stats["layers.0"]["epoch"].tolist() == [1, 2]
    outcome = gating_by_outcome(runs[0])
    assert outcome["output"]["open_fraction_rewarded"].tolist() == [1.0, 1.0] and outcome["output"]["open_fraction_difference"] == 0
    assert sum(outcome["layers.2"]["trials_rewarded"] + outcome["layers.2"]["trials_unrewarded"]) == len(runs[0].trials()["label"])


def test_figure3_leaves_out_diverged_runs_as_table1_averages_them(finished_runs, tmp_path):
    from agrel_sim.analysis import figure3_runs, reward_curves

    shutil.copytree(finished_runs, tmp_path / "runs")
    with h5py.File(tmp_path / "runs" / "deepagrel" / "seed1" / "run.h5", "a") as run:
        run["result"].attrs["diverged"] = True
    runs = load_runs(tmp_path / "runs")
    curves = reward_curves(runs)["digits", "small", False]
    kept = next(run for run in runs if run.rule == "deepagrel" and run.seed == 0)
    assert curves["deepagrel"]["runs"].tolist() == [1, 1] and curves["ebp"]["runs"].tolist() == [2, 2]
    np.testing.assert_array_equal(curves["deepagrel"]["mean"], kept.epochs["reward_probability"])
    drawn, notes = figure3_runs(runs)
    assert len(drawn) == 3 and notes == [f"Figure 3 leaves out 1 diverged run(s), as Table 1 leaves them out of its accuracies and epochs (a lower learning rate may help): {tmp_path / 'runs' / 'deepagrel' / 'seed1' / 'run.h5'}"]
    # A diverged run made with other settings makes Table 1 refuse the row, so Figure 3 draws no panel for it.
    edit_config(tmp_path / "runs" / "deepagrel" / "seed1" / "run.h5", lambda config: config["training"].update(max_epochs=200))
    drawn, notes = figure3_runs(load_runs(tmp_path / "runs"))
    assert drawn == [] and re.search(r"^Figure 3 has no panel for the Table 1 row digits, small, no augmentation: .*training\.max_epochs: 2 and 200", notes[-1]), notes


def test_gating_by_epoch_averages_the_batches_of_each_epoch():
    from agrel_sim.analysis import gating_by_epoch

    class Run:  # what gating_by_epoch reads of a run
        layer_names = ["layers.0"]

        def gating(self):
            summaries = {"open_fraction": np.array([0.2, 0.4, 1.0]), "fb_mean_abs": np.array([1.0, 3.0, 5.0]), "changed_fraction": np.array([0.6, np.nan, np.nan])}
            return {"epoch": np.array([1, 1, 2]), "batch": np.array([0, 1, 0]), "layers.0": summaries}

    row = gating_by_epoch(Run())["layers.0"]
    assert row["epoch"].tolist() == [1, 2]
    np.testing.assert_allclose(row["open_fraction"], [0.3, 1.0])
    np.testing.assert_allclose(row["fb_mean_abs"], [2.0, 5.0])
    np.testing.assert_allclose(row["changed_fraction"], [0.6, np.nan])  # NaN values left out; an epoch of NaN only is NaN


def test_gating_by_outcome_compares_rewarded_and_unrewarded_trials_within_epochs():
    from agrel_sim.analysis import gating_by_outcome

    # Rewarded trials open more of ten gates than unrewarded ones in epochs 1 and 2 (by 1 and
    # 3), but most are in epoch 1, whose gates are mostly shut; epoch 3 has rewarded trials
    # only, and one trial of epoch 1 comes from a diverged network (Q-values NaN).
    rows = [(1, True, 3)] * 8 + [(1, False, 2)] * 2 + [(2, True, 9)] + [(2, False, 6)] * 19 + [(3, True, 5)] * 5 + [(1, False, 10)]  # (epoch, rewarded, open gates)
    epoch, rewarded = np.array([row[0] for row in rows]), np.array([row[1] for row in rows])
    gate = np.array([[1] * row[2] + [0] * (10 - row[2]) for row in rows], dtype=np.uint8)
    q = np.zeros((len(rows), 2))
    q[-1, 0] = np.nan  # one Q-value not finite is enough

    class Run:  # what gating_by_outcome reads of a run
        layer_names = ["layers.0"]

        def trials(self):
            return {"epoch": epoch, "label": np.zeros(len(rows), int), "action": np.where(rewarded, 0, 1), "q": q}

        def layer(self, name):
            return {"gate": gate, "fb": gate / 2}

    assert gate[:-1][rewarded[:-1]].mean() - gate[:-1][~rewarded[:-1]].mean() == pytest.approx(5.8 / 14 - 11.8 / 21), "pooled, the difference reverses"
    row = gating_by_outcome(Run())["layers.0"]
    assert row["epoch"].tolist() == [1, 2, 3]
    assert row["trials_rewarded"].tolist() == [8, 1, 5] and row["trials_unrewarded"].tolist() == [2, 19, 0], "the diverged trial left out"
    assert row["trials_not_finite"].tolist() == [1, 0, 0], "and counted"
    np.testing.assert_allclose(row["open_fraction_rewarded"], [0.3, 0.9, 0.5])
    np.testing.assert_allclose(row["open_fraction_unrewarded"], [0.2, 0.6, np.nan])
    weights = np.array([8 * 2 / 10, 1 * 19 / 20])  # n_r·n_u / (n_r + n_u); epoch 3 counts for nothing
    assert row["open_fraction_difference"] == pytest.approx(np.sum(weights * [0.1, 0.3]) / weights.sum())  # 0.174, not 0.2 unweighted
    assert row["fb_mean_abs_difference"] == pytest.approx(row["open_fraction_difference"] / 2)
    epoch[:] = [1] * 18 + [2] * 18
    rewarded[:] = [True] * 18 + [False] * 18  # no epoch with both outcomes: nothing to compare
    row = gating_by_outcome(Run())["layers.0"]
    assert np.isnan(row["open_fraction_difference"]) and np.isnan(row["open_fraction_unrewarded"][0])


def test_the_alignment_figure_draws_each_layer_with_weights_and_says_why_not_for_ebp(finished_runs, tmp_path, monkeypatch):
    from agrel_sim.analysis import plot_alignment

    figures = drawn_figures(monkeypatch)
    runs = [load_run(finished_runs / rule / "seed0" / "run.h5") for rule in ("deepagrel", "ebp")]
    for run in runs:
        plot_alignment(run, tmp_path / "alignment.png")
    deepagrel, ebp = (figure.axes[0] for figure in figures)
    alignment = runs[0].alignment()
    assert [line.get_label() for line in deepagrel.lines] == ["layers.0", "layers.2", "output"], "no line for the dropout layer"
    for line in deepagrel.lines:
        assert line.get_xdata().tolist() == [0, 1, 2] and line.get_ydata().tolist() == alignment[line.get_label()].tolist() == [1.0] * 3
    assert not ebp.lines and [text.get_text() for text in ebp.texts] == ["no feedback weights (EBP)"]


def test_the_rpe_histogram_shows_every_delta(finished_runs, tmp_path, monkeypatch):
    from agrel_sim.analysis import plot_rpe_distribution

    path = tmp_path / "run.h5"
    shutil.copy(finished_runs / "deepagrel" / "seed0" / "run.h5", path)
    with h5py.File(path, "a") as run:  # as with rewards of 5 and -1: RPEs well beyond ±1.5
        run["trials"]["delta"][:3] = [4.8, -6.7, np.nan]
    figures = drawn_figures(monkeypatch)
    plot_rpe_distribution(load_run(path), tmp_path / "rpe.png")
    for patch in figures[-1].axes[0].patches:
        xs = patch.get_path().vertices[:, 0]
        assert xs.min() == pytest.approx(-6.7) and xs.max() == pytest.approx(4.8)
    assert [text.get_text() for text in figures[-1].axes[0].get_legend().get_texts()] == ["early (epoch 1)", "late (epoch 2)"], "two epochs: two parts"
    with h5py.File(path, "a") as run:  # a network that diverged before any logged trial
        run["trials"]["delta"][:] = np.nan
    plot_rpe_distribution(load_run(path), tmp_path / "rpe.png")
    assert [text.get_text() for text in figures[-1].axes[0].texts] == ["no finite RPE (the run diverged)"]
    assert re.search(r"logged trials: \d+; no finite RPE \(the run diverged\), rewarded", summary(load_run(path)))


def test_figure3_puts_four_panels_in_a_line(finished_runs, tmp_path, monkeypatch):
    from agrel_sim import analysis

    curves = analysis.reward_curves(load_runs(finished_runs))
    (row, rules), = curves.items()
    many = {("digits", f"net{index}", None): rules for index in range(6)}  # six Table 1 rows
    monkeypatch.setattr(analysis, "reward_curves", lambda runs: many)
    figures = drawn_figures(monkeypatch)
    analysis.plot_reward_curves([], tmp_path / "figure3.png")
    grid = figures[-1].axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (2, 4)
    drawn = [ax for ax in figures[-1].axes if ax.axison]
    assert [ax.get_title() for ax in drawn] == [f"digits, net{index}, no augmentation" for index in range(6)]


def edit_config(path, edit):
    """Apply ``edit`` to the configuration stored in the run file at ``path``."""
    with h5py.File(path, "a") as run:
        config = json.loads(run.attrs["config"])
        edit(config)
        run.attrs["config"] = json.dumps(config)


def test_figure3_says_how_many_runs_each_epoch_averages(finished_runs, tmp_path, monkeypatch):
    from agrel_sim.analysis import plot_reward_curves, reward_curves

    shutil.copytree(finished_runs, tmp_path / "runs")
    with h5py.File(tmp_path / "runs" / "deepagrel" / "seed1" / "run.h5", "a") as run:  # as a run that stopped after epoch 1
        for name in run["epochs"]:
            run["epochs"][name].resize(1, axis=0)
        run["result"].attrs.update(epochs=1, best_epoch=1)
    runs = load_runs(tmp_path / "runs")
    curve = reward_curves(runs)["digits", "small", False]["deepagrel"]
    assert curve["runs"].tolist() == [2, 1]
    seed0 = next(run for run in runs if run.config["experiment"] == "small_deepagrel" and run.seed == 0)
    assert curve["mean"][1] == seed0.epochs["reward_probability"][1], "the mean of the runs that reached the epoch"
    assert np.isfinite(curve["two_sigma"][0]) and np.isnan(curve["two_sigma"][1]), "one run has no spread"
    figures = drawn_figures(monkeypatch)
    plot_reward_curves(runs, tmp_path / "figure3.png")
    ax = figures[0].axes[0]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["DeepAGREL: reward probability (n=2 at epoch 1, 1 at epoch 2)", "EBP: 1 − training error (n=2)"]
    deepagrel_band, ebp_band = ax.collections
    assert max(path.vertices[:, 0].max() for path in deepagrel_band.get_paths()) == 1, "no band where one run remains"
    assert max(path.vertices[:, 0].max() for path in ebp_band.get_paths()) == 2


def test_analyze_keeps_the_figures_of_every_run_apart_and_draws_the_rows_it_can(finished_runs, tmp_path, capsys):
    shutil.copytree(finished_runs / "deepagrel", tmp_path / "runs" / "a")
    shutil.copytree(finished_runs / "deepagrel" / "seed0", tmp_path / "runs" / "b" / "seed0")  # the same experiment and seed again
    shutil.copytree(finished_runs / "ebp" / "seed0", tmp_path / "runs" / "other")
    edit_config(tmp_path / "runs" / "other" / "run.h5", lambda config: config["model"].update(name="other"))  # a row of its own
    assert main(["analyze", str(tmp_path / "runs"), "--out", str(tmp_path / "figures")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Figure 3 has no panel for the Table 1 row digits, small, no augmentation: .*a/seed0/run\.h5 and .*b/seed0/run\.h5: seed 0 twice", out), out
    pngs = sorted(str(p.relative_to(tmp_path / "figures")) for p in (tmp_path / "figures").rglob("*.png"))
    assert "a/seed0/small_deepagrel_seed0_gating.png" in pngs and "b/seed0/small_deepagrel_seed0_gating.png" in pngs
    assert len(pngs) == 1 + 4 * 4 and f"\n{len(pngs)} figures written to" in out, "every file counted is there"
    assert "reward_curves.png" in pngs, "the other row is drawn"


def test_figure3_draws_the_rows_it_can_and_says_why_not_the_others(finished_runs, tmp_path, capsys):
    shutil.copytree(finished_runs / "deepagrel", tmp_path / "runs" / "deepagrel")
    shutil.copytree(finished_runs / "ebp", tmp_path / "runs" / "ebp")
    assert main(["figure3", str(tmp_path / "runs")]) == 0
    assert capsys.readouterr().out == f"Figure 3 (4 runs) written to {tmp_path / 'runs' / 'figure3.png'}\n"
    assert (tmp_path / "runs" / "figure3.png").read_bytes()[:4] == b"\x89PNG"
    edit_config(tmp_path / "runs" / "ebp" / "seed1" / "run.h5", lambda config: config["training"].update(max_epochs=200))
    assert main(["figure3", str(tmp_path / "runs"), "--out", str(tmp_path / "none.png")]) == 2
    out, err = capsys.readouterr()
    assert re.search(r"^Figure 3 has no panel for the Table 1 row digits, small, no augmentation: .*training\.max_epochs: 2 and 200", out)
    assert err == f"agrel-sim: error: {tmp_path / 'runs'}: no complete runs of a Table 1 row to draw; see the lines above\n"
    assert not (tmp_path / "none.png").exists()
    run_file = tmp_path / "runs" / "ebp" / "seed0" / "run.h5"
    before = run_file.read_bytes()
    for out, why in ((run_file, "not a name of an image file"), (tmp_path / "runs", "a folder")):
        assert main(["figure3", str(tmp_path / "runs" / "deepagrel"), "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"agrel-sim: error: --out {out}: {why}; give a file name whose suffix names its format: ")
    assert run_file.read_bytes() == before
    if shutil.which("xelatex") is None:  # matplotlib writes .pgf with text through TeX
        assert main(["figure3", str(tmp_path / "runs" / "deepagrel"), "--out", str(tmp_path / "f.pgf")]) == 2
        assert re.search(r"--out .*f\.pgf: matplotlib cannot write \.pgf files on this machine \('xelatex' not found.*\); give a file name ending in \.png, \.pdf or \.svg\n$", capsys.readouterr().err)


def test_brian2_runs_that_differ_in_recording_or_code_generation_share_a_table_row(finished_runs, tmp_path):
    from agrel_sim.analysis import table_rows
    from agrel_sim.experiment import load_experiment
    from agrel_sim.backends import resolved_options
    from agrel_sim.runs import ADDED_SETTINGS, EARLIER_BACKEND_DEFAULTS, resume_plan, run_config, settings_of

    older = settings_of({"backend": "brian2", "backend_options": {"trace_every": 100}}, "0.3.0")  # as agrel-sim 0.3.0 stored options
    assert older["backend_options.tau_ff"] == 10.0 and older["backend_options.trace_every"] == 100, "the defaults of then"
    assert set(EARLIER_BACKEND_DEFAULTS["brian2"]) - {"gate_threshold"} == set(resolved_options("brian2", {})), "a default of then for every option"
    stored = run_config(load_experiment("digits_brian2"))["backend_options"]  # what a run file holds: every option
    assert stored == {**resolved_options("brian2", {}), "codegen_target": "cython", "trace_every": 1000} and stored["t_stimulus"] == 100.0
    assert settings_of({"backend": "brian2", "backend_options": {"trace_every": 100}}) == {**ADDED_SETTINGS, "backend": "brian2", "backend_options.trace_every": 100}, "this version's: as they are"
    options = ({"trace_every": 100}, {"codegen_target": "cython"}, {"tau_ff": 10.0})  # the last as older files: the default, named
    for seed, given in enumerate(options):
        path = tmp_path / f"seed{seed}" / "run.h5"
        shutil.copytree(finished_runs / "deepagrel" / "seed0", path.parent)
        with h5py.File(path, "a") as run:
            run.attrs["seed"], run.attrs["software_version"] = seed, "0.3.0"
        edit_config(path, lambda config: config.update(backend="brian2", backend_options=given))
    rows = table_rows(load_runs(tmp_path))
    assert [run.seed for run in rows["digits", "small", 0]["deepagrel"]] == [0, 1, 2]
    edit_config(tmp_path / "seed2" / "run.h5", lambda config: config.update(backend_options={"tau_ff": 20.0}))
    with pytest.raises(RunFileError, match=r"backend_options\.tau_ff: 10\.0 and 20\.0\)"):
        table_rows(load_runs(tmp_path))
    # A sweep counts a finished run as finished whatever it recorded; a run that goes on must record as it began.
    path = tmp_path / "seed0" / "run.h5"
    with h5py.File(path, "a") as run:
        run.attrs["software_version"] = agrel_sim.__version__
        config = json.loads(run.attrs["config"])
    edit_config(path, lambda config: config.update(backend_options={**resolved_options("brian2", {}), "trace_every": 100}))
    untraced = {**config, "backend_options": {**resolved_options("brian2", {}), "trace_every": 0}}
    assert resume_plan(path.parent, untraced, 0) == ("finished", None)
    with pytest.raises(ValueError, match=r"backend_options\.trace_every: 100 in the run, 0 now"):
        resume_plan(path.parent, {**untraced, "training": {**config["training"], "max_epochs": 3}}, 0)
    edit_config(path, lambda config: config["backend_options"].update(tau_ff=20.0))
    with pytest.raises(ValueError, match=r"backend_options\.tau_ff: 20\.0 in the run, 10\.0 now"):
        resume_plan(path.parent, untraced, 0)


def test_brian2_runs_gated_on_their_activity_are_told_from_those_gated_on_their_drive(finished_runs, tmp_path):
    # agrel-sim 0.4.0 and older opened a Brian2 gate while the activity was above gate_threshold:
    # their runs may neither count as finished runs of an experiment now nor share a table row with its runs.
    from agrel_sim.analysis import table_rows
    from agrel_sim.experiment import load_experiment
    from agrel_sim.runs import changed_settings, resume_plan, run_config, settings_of

    now = run_config(load_experiment("digits_brian2"))
    older = {
        "0.4.0": {**now, "backend_options": {**now["backend_options"], "gate_threshold": 1e-3}},  # every option
        "0.3.0": {**now, "backend_options": {"trace_every": 1000, "codegen_target": "cython"}},  # those given
    }
    for version, config in older.items():
        assert changed_settings(settings_of(config, version), settings_of(now)) == ["backend_options.gate_threshold"], version
    for seed, (version, config) in enumerate([(agrel_sim.__version__, now), *older.items()]):
        path = tmp_path / f"seed{seed}" / "run.h5"
        shutil.copytree(finished_runs / "deepagrel" / "seed0", path.parent)
        with h5py.File(path, "a") as run:
            run.attrs["seed"], run.attrs["software_version"] = seed, version
        edit_config(path, lambda stored: stored.update(backend="brian2", backend_options=config["backend_options"]))
        if seed:
            with pytest.raises(RunFileError, match=r"backend_options\.gate_threshold: absent and 0\.001"):
                table_rows(load_runs(tmp_path))
            with h5py.File(path, "r") as run:
                stored = json.loads(run.attrs["config"])
            with pytest.raises(ValueError, match=r"run\.h5: made with an option that this agrel-sim no longer has: backend_options\.gate_threshold, a Brian2 option until agrel-sim 0\.4\.0, .*\. This agrel-sim can neither continue the run nor count it as a run of the experiment now: train it again in another --out$"):
                resume_plan(path.parent, {**stored, "backend_options": now["backend_options"]}, seed)
            shutil.rmtree(path.parent)


def test_table_and_analyze_agree_about_incomplete_runs(finished_runs, tmp_path, capsys):
    from agrel_sim.analysis import reward_curves

    shutil.copytree(finished_runs / "deepagrel", tmp_path / "runs")
    killed = tmp_path / "runs" / "seed7" / "run.h5"  # killed after 2 epochs, and begun with another epoch limit
    killed.parent.mkdir()
    shutil.copy(finished_runs / "deepagrel" / "seed0" / "run.h5", killed)
    with h5py.File(killed, "a") as run:
        run.attrs["seed"], run.attrs["complete"] = 7, False
        del run["result"]
    edit_config(killed, lambda config: config["training"].update(max_epochs=200))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteRunWarning)
        assert main(["table", str(tmp_path / "runs")]) == 0
        assert re.search(r"1 incomplete run\(s\) left out .*seed7/run\.h5", capsys.readouterr().out)
        assert main(["analyze", str(tmp_path / "runs"), "--out", str(tmp_path / "figures")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Figure 3 leaves out 1 incomplete run\(s\), as Table 1 does \(still running, killed or crashed\): .*seed7/run\.h5", out)
    assert len(list((tmp_path / "figures").rglob("*.png"))) == 1 + 3 * 4
    with pytest.warns(IncompleteRunWarning):
        runs = load_runs(tmp_path / "runs")
    assert reward_curves(runs)["digits", "small", False]["deepagrel"]["runs"].tolist() == [2, 2]


def test_the_gating_figure_leaves_out_dropout_layers_and_says_why_a_panel_is_empty(finished_runs, tmp_path, monkeypatch):
    from agrel_sim.analysis import plot_gating

    figures = drawn_figures(monkeypatch)
    for rule in ("deepagrel", "ebp"):
        plot_gating(load_run(finished_runs / rule / "seed0" / "run.h5"), tmp_path / "gating.png")
    for fig in figures:  # layers.1 is a dropout layer; the output's gates are always open
        gates, feedback, changed = fig.axes
        assert [line.get_label() for line in gates.lines] == ["layers.0", "layers.2"]
        assert [line.get_label() for line in changed.lines] == ["layers.0", "layers.2", "output"]
    assert [line.get_label() for line in figures[0].axes[1].lines] == ["layers.0", "layers.2"] and not figures[0].axes[1].texts
    assert [text.get_text() for text in figures[1].axes[1].texts] == ["no feedback (EBP)"]


def test_a_folder_given_as_a_run_file_is_named(finished_runs):
    with pytest.raises(RunFileError, match=r"ebp/seed0: a folder, not a run file: give its run file .*ebp/seed0/run\.h5, or load every run below it with load_runs"):
        load_run(finished_runs / "ebp" / "seed0")
    with pytest.raises(RunFileError, match=r"ebp: a folder, not a run file: load every run below it with load_runs$"):
        load_run(finished_runs / "ebp")


def test_a_path_that_is_not_there_is_named_as_a_run_file_or_a_folder_of_runs(tmp_path, capsys):
    with pytest.raises(RunFileError, match=r"nowhere/run\.h5: no such run file$"):
        load_run(tmp_path / "nowhere" / "run.h5")
    for command in ("table", "figure3", "analyze"):
        assert main([command, str(tmp_path / "nowhere")]) == 2
        assert capsys.readouterr().err == f"agrel-sim: error: {tmp_path / 'nowhere'}: no such folder of runs or run file\n", command


def test_layers_are_listed_bottom_to_top(tmp_path):
    deep = {**MODEL, "layers": [{"kind": "dense", "units": 6}] * 11}
    run = Experiment.from_dict({"name": "deep", "model": deep, "dataset": "digits", "training": {"max_epochs": 1, "validation_size": 200}}, "<test>")
    run_experiment(run, out=tmp_path, log=None)
    assert load_run(tmp_path / "run.h5").layer_names == [f"layers.{i}" for i in range(11)] + ["output"]


def test_bad_run_files_get_clear_messages(finished_runs, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(RunFileError, match="not an HDF5 file"):
        load_run(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle["x"] = [1, 2]
    with pytest.raises(RunFileError, match="an HDF5 file, but not a run file of agrel-sim"):
        load_run(other)
    newer = tmp_path / "newer.h5"
    shutil.copy(finished_runs / "ebp" / "seed0" / "run.h5", newer)
    with h5py.File(newer, "a") as handle:
        handle.attrs["layout_version"] = LAYOUT_VERSION + 1
    with pytest.raises(RunFileError, match=f"layout version {LAYOUT_VERSION + 1}, newer than the {LAYOUT_VERSION} this agrel-sim reads; upgrade"):
        load_run(newer)
    older = tmp_path / "older.h5"  # layout 1 had no learning-rate schedule: the rule's rate throughout
    shutil.copy(finished_runs / "ebp" / "seed0" / "run.h5", older)
    with h5py.File(older, "a") as handle:
        handle.attrs["layout_version"] = 1
        del handle["epochs"]["learning_rate"]
    with pytest.warns(OlderRunFileWarning, match=r"layout version 1: the gates recorded for layers below dropout layers show ff activity only"):
        np.testing.assert_array_equal(load_run(older).epochs["learning_rate"], [0.3, 0.3])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunFileError, match="no run files"):
        load_runs(empty)
    incomplete = tmp_path / "incomplete.h5"
    shutil.copy(finished_runs / "ebp" / "seed0" / "run.h5", incomplete)
    with h5py.File(incomplete, "a") as handle:
        handle.attrs["complete"] = False
    with pytest.warns(IncompleteRunWarning, match="incomplete run .* holds 2 finished epochs"):
        run = load_run(incomplete)
    assert not run.complete
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run(finished_runs / "ebp" / "seed0" / "run.h5")


def killed_in_its_first_epoch(source, path, seed):
    """A copy of the run file ``source`` at ``path``, as the run of ``seed`` killed before it finished an epoch leaves it."""
    path.parent.mkdir(parents=True)
    shutil.copy(source, path)
    with h5py.File(path, "a") as run:
        run.attrs["seed"] = seed
        run.attrs["complete"] = False
        del run["result"]
        run.visititems(lambda name, item: item.resize(0, axis=0) if isinstance(item, h5py.Dataset) and item.maxshape[0] is None else None)


def test_a_run_killed_in_its_first_epoch_does_not_block_the_others(finished_runs, tmp_path, capsys):
    from agrel_sim.analysis import (
        gating_by_epoch,
        gating_by_outcome,
        plot_reward_curves,
        reward_curves,
    )

    shutil.copytree(finished_runs / "deepagrel", tmp_path / "runs" / "deepagrel")
    killed_in_its_first_epoch(finished_runs / "ebp" / "seed0" / "run.h5", tmp_path / "runs" / "ebp" / "seed5" / "run.h5", seed=5)
    assert main(["analyze", str(tmp_path / "runs"), "--out", str(tmp_path / "figures")]) == 0
    out = capsys.readouterr().out
    assert out.count(", |fb| ") == 2 * 2 and "nan" not in out  # two runs of two hidden layers, not the dropout layer
    assert len(list((tmp_path / "figures").rglob("*.png"))) == 1 + 3 * 4
    with pytest.warns(IncompleteRunWarning, match="holds 0 finished epochs"):
        runs = load_runs(tmp_path / "runs")
    killed = runs[-1]
    assert list(reward_curves(runs)["digits", "small", False]) == ["deepagrel"], "a run without epochs adds no curve"
    assert reward_curves([killed]) == {}
    assert plot_reward_curves([killed], tmp_path / "none.png").read_bytes()[:4] == b"\x89PNG"
    assert gating_by_epoch(killed)["layers.0"]["epoch"].tolist() == []
    assert gating_by_outcome(killed) == {}
    lines = summary(killed).splitlines()[1:]
    assert lines[0] == "  epochs: none finished" and lines[-1] == "  logged trials: none"
    assert [line[:12] for line in lines[1:-1]] == ["  session 1:"]


def replace_file(path):
    """Replace ``path`` by a copy of itself, as a training run replaces its run file after an epoch."""
    shutil.copy(path, path.with_name("copy.partial"))
    os.replace(path.with_name("copy.partial"), path)


def test_a_run_reads_only_the_version_of_its_file_it_loaded(finished_runs, tmp_path, monkeypatch, capsys):
    from agrel_sim import analysis
    from agrel_sim.analysis import RunChangedError

    shutil.copytree(finished_runs / "ebp" / "seed0", tmp_path / "run")
    path = tmp_path / "run" / "run.h5"
    run = load_run(path)
    run_epochs = run.trials()["epoch"].tolist()
    replace_file(path)
    for read in (run.trials, run.gating, lambda: run.layer("layers.0"), lambda: run.layer_names, lambda: run.traced_trials):
        with pytest.raises(RunChangedError, match=r"run\.h5: the run file was replaced since it was loaded \(the run is still training, or was resumed\); load it again"):
            read()
    assert load_run(path).trials()["epoch"].tolist() == run_epochs, "loaded again, it reads"

    # analyze loads a run again whose file is replaced while its figures are drawn, and draws them from one version
    drawn, plot_gating = [], analysis.plot_gating

    def replaced_while_drawn(run, out):
        drawn.append(run)
        if len(drawn) == 1:
            replace_file(path)
        return plot_gating(run, out)

    monkeypatch.setattr(analysis, "plot_gating", replaced_while_drawn)
    assert main(["analyze", str(path), "--out", str(tmp_path / "figures")]) == 0
    assert len(drawn) == 2 and drawn[0].file_version != drawn[1].file_version
    assert len(list((tmp_path / "figures").glob("*.png"))) == 1 + 4

    def always_replaced(run, out):
        replace_file(path)
        return plot_gating(run, out)

    monkeypatch.setattr(analysis, "plot_gating", always_replaced)
    capsys.readouterr()
    assert main(["analyze", str(path), "--out", str(tmp_path / "figures2")]) == 2
    assert capsys.readouterr().err == f"agrel-sim: error: {path}: the run file was replaced 5 times while it was read (its epochs take less time than its analysis); analyse it once it has finished\n"


def test_a_folder_of_incomplete_runs_gets_no_figure3_and_no_table(finished_runs, tmp_path, capsys):
    killed_in_its_first_epoch(finished_runs / "ebp" / "seed0" / "run.h5", tmp_path / "runs" / "ebp" / "seed0" / "run.h5", seed=0)
    assert main(["analyze", str(tmp_path / "runs"), "--out", str(tmp_path / "figures")]) == 0
    out, err = capsys.readouterr()
    assert "holds 0 finished epochs" in err and "Figure 3 leaves out 1 incomplete run(s)" in out and "\n4 figures written to " in out
    assert not (tmp_path / "figures" / "reward_curves.png").exists()
    assert main(["table", str(tmp_path / "runs")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"agrel-sim: error: {tmp_path / 'runs'}: no complete runs here; 1 incomplete run(s) left out") and out == ""
    assert not (tmp_path / "runs" / "table1.csv").exists()


@pytest.mark.parametrize("command", ["analyze", "figure3"])
@pytest.mark.parametrize("cause", ["a file there", "a link to nothing", "no permission"])
def test_a_figure_folder_that_cannot_be_written_is_named(finished_runs, tmp_path, capsys, monkeypatch, cause, command):
    out = tmp_path / "figures"
    if cause == "a file there":
        out.write_text("a file where the figures should go")
        reason = ".*figures is not a folder"
    elif cause == "a link to nothing":
        out.symlink_to(tmp_path / "gone")
        reason = ".*figures is a link to .*gone, which does not exist"
    else:
        def refuse(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(type(out), "mkdir", refuse)
        reason = "Permission denied"
    written = {"analyze": out, "figure3": out / "figure3.png"}[command]  # a folder for analyze, an image for figure3
    assert main([command, str(finished_runs), "--out", str(written)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"agrel-sim: error: .*figures/[\w.]+\.png: cannot write this figure \({reason}\); check that .*figures is, or can be made, a writable folder, or give another --out\n", err), err


def test_an_unreadable_run_file_is_named(finished_runs, tmp_path, capsys, monkeypatch):
    def refuse(path):  # what h5py raises for a run file without read permission (tests may run as root, whom chmod does not stop)
        raise PermissionError(13, f"Unable to determine if file is accessible as hdf5 (unable to open file: name = '{path}', errno = 13, error message = 'Permission denied')")

    monkeypatch.setattr(h5py, "is_hdf5", refuse)
    for command in ("table", "analyze"):
        assert main([command, str(finished_runs / "ebp")]) == 2
        assert re.fullmatch(r"agrel-sim: error: .*ebp/seed0/run\.h5: no permission to read this run file; make it readable, or move it out of the folder to analyse the others\n", capsys.readouterr().err)


def test_runs_linked_into_a_folder_count_once_each(finished_runs, tmp_path):
    table = tmp_path / "table"
    (table / "more").mkdir(parents=True)
    (table / "deepagrel").symlink_to(finished_runs / "deepagrel")  # runs brought in from scratch storage
    (table / "more" / "again").symlink_to(finished_runs / "deepagrel")  # the same runs a second time
    (table / "more" / "loop").symlink_to(table)
    shutil.copytree(finished_runs / "ebp" / "seed0", table / "more" / "ebp0")
    found = sorted(str(run.path.relative_to(table)) for run in load_runs(table))
    assert found == ["deepagrel/seed0/run.h5", "deepagrel/seed1/run.h5", "more/ebp0/run.h5"]


def test_a_folder_of_runs_that_cannot_be_listed_is_named(finished_runs, capsys, monkeypatch):
    scandir = os.scandir

    def refuse(path="."):  # what listing a folder without read permission raises (tests may run as root)
        if str(path).endswith("ebp"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    assert main(["table", str(finished_runs)]) == 2
    assert re.fullmatch(r"agrel-sim: error: .*/ebp: cannot list this folder \(Permission denied\), so its runs would be left out; make it readable, or give a folder without it\n", capsys.readouterr().err)


def damage(path, dataset):
    """Flip every byte of the first stored chunk of ``dataset`` in the HDF5 file at ``path``."""
    with h5py.File(path, "r") as handle:
        chunk = handle[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as file:
        file.seek(chunk.byte_offset)
        data = file.read(chunk.size)
        file.seek(chunk.byte_offset)
        file.write(bytes(byte ^ 0xFF for byte in data))


def test_resuming_a_damaged_run_file_says_it_is_damaged(tmp_path, capsys):
    assert main(["train", "--max-epochs", "2", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    damage(tmp_path / "run" / "run.h5", "epochs/epoch")
    assert main(["train", "--resume", "--max-epochs", "3", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert re.search(r"run\.h5: the run file is damaged \(.*\); move the run folder away and train the run again", capsys.readouterr().err)


def test_a_run_file_is_written_only_where_the_path_names_a_new_file_in_a_folder(tmp_path):
    from agrel_sim import ColumnNetwork, build

    description = ColumnNetwork((6,), [Dense(5)], 3)
    net = build(description)
    config = {"experiment": "tiny", "model": description.to_dict(), "dataset": "none"}
    RunFile(tmp_path / "run.h5", net, config, 0)
    kept = (tmp_path / "run.h5").read_bytes()
    with pytest.raises(ValueError, match=r"run\.h5: a run file is there already; give resume_after to continue its run, or remove it"):
        RunFile(tmp_path / "run.h5", net, config, 0)
    assert (tmp_path / "run.h5").read_bytes() == kept
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}: a folder; give the path of the run file to write, such as .*run\.h5"):
        RunFile(tmp_path, net, config, 0)
    with pytest.raises(ValueError, match=r"there is no folder .*nowhere to write the run file in; make it first"):
        RunFile(tmp_path / "nowhere" / "run.h5", net, config, 0)



@pytest.mark.parametrize("signature", [b"SNOD", b"TREE", b"HEAP"], ids=["symbol table nodes", "B-trees", "local heaps"])
def test_a_run_file_whose_groups_are_damaged_is_named_by_every_command(tmp_path, capsys, signature):
    """HDF5 finds the groups of a file through these structures; h5py raises RuntimeError or
    KeyError, not OSError, where one is damaged."""
    assert main(["train", "--max-epochs", "2", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    path = tmp_path / "run" / "run.h5"
    damaged = path.read_bytes().replace(signature, bytes(len(signature)))
    assert damaged != path.read_bytes()
    path.write_bytes(damaged)
    for command in (["table", str(tmp_path / "run")], ["analyze", str(path), "--out", str(tmp_path / "figures")]):
        assert main(command) == 2
        message = r"agrel-sim: error: .*run\.h5: cannot be read as a run file \(\w+: .*\); the run file is damaged: train the run again in a new folder, or move it out of the folder to analyse the others\n"
        assert re.fullmatch(message, capsys.readouterr().err)
    assert main(["train", "--resume", "--max-epochs", "3", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert re.search(r"run\.h5: cannot read this run file \(.*\); check its permissions .* if it is damaged, move the run folder away", capsys.readouterr().err)
    assert path.read_bytes() == damaged, "left as it was"


@pytest.mark.parametrize("dataset", ["trials/delta", "layers/layers.2/fb", "gating/layers.0/open_fraction", "epochs/reward_probability"])
def test_a_damaged_dataset_is_named(finished_runs, tmp_path, capsys, dataset):
    shutil.copytree(finished_runs / "ebp", tmp_path / "runs")
    damage(tmp_path / "runs" / "seed1" / "run.h5", dataset)
    if not dataset.startswith("epochs/"):
        assert main(["table", str(tmp_path / "runs")]) == 0, "the table reads none of these"
        capsys.readouterr()
    assert main(["analyze", str(tmp_path / "runs"), "--out", str(tmp_path / "figures")]) == 2
    message = rf"agrel-sim: error: .*seed1/run\.h5: cannot read /{re.escape(dataset)} \(.*\); the run file is damaged: train the run again in a new folder, or move it out of the folder to analyse the others\n"
    assert re.fullmatch(message, capsys.readouterr().err)


def without(name):
    """An edit of a run file that deletes its object or attribute ``name``."""
    def edit(run):
        del (run if name in run else run.attrs)[name]

    return edit


def setting(name, value):
    """An edit of a run file that sets its attribute ``name`` to ``value``."""
    def edit(run):
        run.attrs[name] = value

    return edit


def in_config(change):
    """An edit of a run file that applies ``change`` to its config (a dict)."""
    def edit(run):
        config = json.loads(run.attrs["config"])
        change(config)
        run.attrs["config"] = json.dumps(config)

    return edit


def cut(name, rows=3):
    """An edit of a run file that keeps the first ``rows`` rows of its dataset ``name``."""
    def edit(run):
        run[name].resize(rows, axis=0)

    return edit


def a_dataset_in_place_of(name):
    """An edit of a run file that puts a dataset in place of its group ``name``."""
    def edit(run):
        del run[name]
        run[name] = np.zeros(3)

    return edit


def in_result(**values):
    """An edit of a run file that sets (``None``: deletes) attributes of its /result."""
    def edit(run):
        for name, value in values.items():
            if value is None:
                del run["result"].attrs[name]
            else:
                run["result"].attrs[name] = value

    return edit


@pytest.mark.parametrize("edit, message", [
    pytest.param(without("rule"), r"lacks the attribute rule", id="no rule"),
    pytest.param(without("config"), r"lacks the attribute config", id="no config"),
    pytest.param(without("epochs/validation_accuracy"), r"lacks /epochs/validation_accuracy", id="no validation accuracy"),
    pytest.param(without("trials"), r"lacks /trials", id="no trials"),
    pytest.param(without("gating/layers.1"), r"lacks /gating/layers\.1", id="no gating of a layer"),
    pytest.param(lambda run: run["layers"]["output"].attrs.__delitem__("shape"), r"lacks the attribute shape of /layers/output", id="no layer shape"),
    pytest.param(setting("config", "{not json"), r"bad config attribute \(Expecting property name enclosed in double quotes", id="config not JSON"),
    pytest.param(setting("layout_version", "three"), r"bad layout_version attribute \('three', where a whole number from 1 belongs\)", id="layout version not a number"),
    pytest.param(setting("layout_version", 5.7), r"bad layout_version attribute \(5\.7, where a whole number from 1 belongs\)", id="layout version not whole"),
    pytest.param(setting("layout_version", 0), r"bad layout_version attribute \(0, where a whole number from 1 belongs\)", id="layout version 0"),
    pytest.param(setting("complete", "false"), r"bad complete attribute \('false', where true or false belongs\)", id="complete a string"),
    pytest.param(setting("complete", 1), r"bad complete attribute \(1, where true or false belongs\)", id="complete a number"),
    pytest.param(setting("layout_version", np.bool_(True)), r"bad layout_version attribute \(True, where a whole number from 1 belongs\)", id="layout version a boolean"),
    pytest.param(without("result"), r"marked complete, but it lacks /result", id="complete without result"),
    pytest.param(setting("seed", "zero"), r"bad seed attribute", id="seed not a number"),
    pytest.param(setting("config", "{}"), r"its config attribute lacks experiment \(or holds another kind of value\)", id="config empty"),
    pytest.param(setting("config", "[1, 2]"), r"its config attribute lacks every setting", id="config a list"),
    pytest.param(in_config(lambda config: config.update(training="x")), r"its config attribute lacks training ", id="training not a table"),
    pytest.param(in_config(lambda config: config["model"].pop("rule")), r"its config attribute lacks model\.rule ", id="config without rule"),
    pytest.param(in_config(lambda config: config["model"]["rule"].update(name="hebb")), r"its config attribute names no rule of agrel-sim \(deepagrel, ebp\) in model\.rule\.name", id="unknown rule"),
    pytest.param(in_config(lambda config: config["model"]["layers"][0].pop("kind")), r"its config attribute lacks model\.layers\[0\]\.kind ", id="layer without kind"),
    pytest.param(in_config(lambda config: config["training"].update(augmentation={"zoom": 0.1})), r"its config attribute lacks training\.augmentation\.factor ", id="augmentation without factor"),
    pytest.param(in_result(test_accuracy=None), r"/result holds no possible result \(test_accuracy = missing\)", id="no test accuracy"),
    pytest.param(in_result(test_accuracy=float("nan")), r"/result holds no possible result \(test_accuracy = nan\)", id="test accuracy NaN"),
    pytest.param(in_result(test_accuracy=2.0), r"/result holds no possible result \(test_accuracy = 2\.0\)", id="test accuracy above 1"),
    pytest.param(in_result(test_accuracy=-0.5), r"/result holds no possible result \(test_accuracy = -0\.5\)", id="test accuracy below 0"),
    pytest.param(in_result(best_epoch=-1), r"/result holds no possible result \(best_epoch = -1, epochs = 2\)", id="best epoch before the first"),
    pytest.param(in_result(best_epoch=9), r"/result holds no possible result \(best_epoch = 9, epochs = 2\)", id="best epoch after the last"),
    pytest.param(in_result(epochs=99, best_epoch=50), r"/result says 99 epochs, but /epochs records 2", id="more epochs than recorded"),
    pytest.param(in_result(converged="yes"), r"/result holds no possible result \(converged = yes\)", id="converged not a bool"),
    pytest.param(in_result(seconds=None), r"/result holds no possible result \(seconds = missing\)", id="no seconds"),
    pytest.param(cut("trials/label"), r"records disagree \(/trials/label has 3 rows where /trials/action has \d+\)", id="labels cut short"),
    pytest.param(cut("layers/layers.0/gate"), r"records disagree \(/layers/layers\.0/gate has 3 rows where /trials/action has \d+\)", id="gates cut short"),
    pytest.param(cut("gating/layers.0/open_fraction"), r"records disagree \(/gating/layers\.0/open_fraction has 3 rows where /gating/epoch has \d+\)", id="gating cut short"),
    pytest.param(cut("epochs/seconds", 1), r"records disagree \(/epochs/seconds has 1 rows where /epochs/epoch has 2\)", id="epochs cut short"),
    pytest.param(cut("alignment/output", 2), r"records disagree \(/alignment/output has 2 rows where /alignment/epoch has 3\)", id="alignment cut short"),
    pytest.param(a_dataset_in_place_of("gating/layers.1"), r"records disagree \(/gating/layers\.1 is not a group\)", id="gating of a layer a dataset"),
    pytest.param(a_dataset_in_place_of("trials"), r"records disagree \(/trials is not a group\)", id="trials a dataset"),
    pytest.param(lambda run: (run["epochs"].__delitem__("epoch"), run["epochs"].create_group("epoch")), r"cannot be read as a run file \(TypeError: ", id="epochs a group"),
    pytest.param(without("epochs"), r"lacks /epochs/epoch, ", id="no epochs"),
    pytest.param(setting("sessions", "[{"), r"bad sessions attribute \(Expecting property name", id="sessions not JSON"),
    pytest.param(setting("sessions", '{"from_epoch": 0}'), r"bad sessions attribute \(expected a JSON list of objects", id="sessions not a list"),
])
def test_run_files_with_missing_or_bad_records_are_named(finished_runs, tmp_path, edit, message):
    path = tmp_path / "run.h5"
    shutil.copy(finished_runs / "ebp" / "seed0" / "run.h5", path)
    with h5py.File(path, "a") as run:
        edit(run)
    with pytest.raises(RunFileError, match=rf"run\.h5: .*{message}.*; the run file is damaged: train the run again") as raised:
        load_run(path)
    assert str(raised.value).count("the run file is damaged") == 1, "said once, not wrapped in a second message"


@pytest.mark.parametrize("edit, problem", [
    (without("trials/q"), r"it lacks /trials/q"),
    (without("layers/layers.0"), r"it lacks /layers/layers\.0/units, /layers/layers\.0/ff, /layers/layers\.0/fb, /layers/layers\.0/gate"),
    (cut("layers/layers.1/fb"), r"/layers/layers\.1/fb has 3 rows where /trials/action has \d+"),
    (a_dataset_in_place_of("gating/output"), r"/gating/output is not a group"),
    (cut("epochs/validation_accuracy", 1), r"/epochs/validation_accuracy has 1 rows where /epochs/epoch has 2"),
])
def test_resuming_a_run_file_that_lacks_records_or_whose_records_disagree_names_them(tmp_path, capsys, edit, problem):
    run = tmp_path / "run"
    assert main(["train", "--max-epochs", "2", "--out", str(run), "--quiet"]) == 0
    with h5py.File(run / "run.h5", "a") as handle:
        handle.attrs["complete"] = False  # as if killed
        edit(handle)
    kept = (run / "run.h5").read_bytes()
    assert main(["train", "--resume", "--max-epochs", "3", "--out", str(run), "--quiet"]) == 2
    assert re.search(rf"run\.h5: the run file is damaged \({problem}.*\); move the run folder away and train the run again", capsys.readouterr().err)
    assert not list(run.glob("*.partial")), "no partial copy left"
    assert (run / "run.h5").read_bytes() == kept


@pytest.mark.parametrize("edit, complete, problem", [
    (lambda run: run.__delitem__("result"), True, r"the run file is damaged \(.*'result' doesn't exist.*\); move the run folder away"),
    (lambda run: run["result"].attrs.__delitem__("test_accuracy"), True, r"the run file is damaged \(/result holds no possible result \(test_accuracy = missing\)\); move the run folder away"),
    (lambda run: run["result"].attrs.__setitem__("epochs", 99), True, r"the run file is damaged \(/result says 99 epochs, but /epochs records 2\); move the run folder away"),
    (lambda run: run.attrs.__setitem__("layout_version", "x"), False, r"bad layout_version attribute \('x', where a whole number from 1 belongs\); the run file is damaged: move the run folder away"),
    (lambda run: run.attrs.__setitem__("complete", "yes"), False, r"bad complete attribute \('yes', where true or false belongs\); the run file is damaged: move the run folder away"),
    (lambda run: run.attrs.__setitem__("layout_version", 4), False, r"the run file is damaged \(layout version 4, which has no /alignment, but the file has one\); move the run folder away"),
], ids=["complete without /result", "result without test_accuracy", "result of more epochs", "layout_version not a number", "complete not a boolean", "layout 4 with /alignment"])
def test_resuming_a_run_file_with_a_bad_result_or_layout_version_names_it(tmp_path, capsys, edit, complete, problem):
    run = tmp_path / "run"
    assert main(["train", "--max-epochs", "2", "--out", str(run), "--quiet"]) == 0
    with h5py.File(run / "run.h5", "a") as handle:
        handle.attrs["complete"] = complete
        edit(handle)
    assert main(["train", "--resume", "--max-epochs", "2" if complete else "3", "--out", str(run), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert re.fullmatch(rf"agrel-sim: error: \S+run\.h5: {problem}.*\n", error), error


def test_an_empty_run_like_file_is_named(tmp_path):
    path = tmp_path / "run.h5"
    with h5py.File(path, "w") as run:
        run.attrs["layout_version"] = LAYOUT_VERSION
        run.create_group("epochs")
    with pytest.raises(RunFileError, match=r"run\.h5: a run file that lacks the attribute config, the attribute seed, the attribute rule, the attribute backend, /epochs/epoch, .*, /trials, /layers, /gating, /alignment; the run file is damaged"):
        load_run(path)


def test_analysis_scripts_regenerate_table_and_figures(finished_runs, tmp_path):
    scripts = __import__("pathlib").Path(__file__).resolve().parent.parent / "analysis"
    table = subprocess.run([sys.executable, scripts / "table1.py", finished_runs, "--csv", tmp_path / "t.csv"], capture_output=True, text=True, check=True)
    assert "| digits | small | none |" in table.stdout and (tmp_path / "t.csv").is_file()
    subprocess.run([sys.executable, scripts / "figure3.py", finished_runs, "--out", tmp_path / "f3.png"], check=True, capture_output=True)
    assert (tmp_path / "f3.png").read_bytes()[:4] == b"\x89PNG"
    gating = subprocess.run([sys.executable, scripts / "gating_figures.py", finished_runs / "ebp", "--out", tmp_path / "g"], capture_output=True, text=True, check=True)
    assert len(list((tmp_path / "g").rglob("*.png"))) == 1 + 2 * 4 and "|fb| no feedback (EBP)" in gating.stdout


TRACED_BATCHES = ((torch.arange(5), torch.tensor([0, 1, 2, 0, 1])), (torch.arange(10, 14), torch.tensor([2, 2, 1, 0])))  # (index, labels)


def tiny_brian2(trace_every=4, layers=None):
    from agrel_sim import ColumnNetwork, Dense, Rule, build

    description = ColumnNetwork((6,), layers or [Dense(5)], 3, rule=Rule(learning_rate=0.5, init_range=0.5), name="tiny")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "brian2 backend: .* short of its fixed point", UserWarning)  # short phases suffice here
        return description, build(description, backend="brian2", trace_every=trace_every, t_stimulus=20, t_selection=5, t_feedback=20, t_rpe=5, t_plasticity=5)


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    """A Brian2 run file of one epoch of two batches (5 and 4 trials, every 4th trial traced:
    trials 0 and 4 of the first, 8 of the second) in a folder of its own; and the batches' trials."""
    from agrel_sim.recorder import RunFile
    from agrel_sim.training import EpochMetrics

    path = tmp_path_factory.mktemp("traced") / "run.h5"
    description, net = tiny_brian2()
    # A configuration made in Python need not name the backend: the run file takes the network's.
    recorder = RunFile(path, net, {"experiment": "tiny_brian2", "model": description.to_dict(), "dataset": "none"}, 0)
    images = torch.rand(5, 6, generator=torch.Generator().manual_seed(0))
    batches = []
    for batch, (index, labels) in enumerate(TRACED_BATCHES):
        batches.append(net.run_trials(images[: len(index)], labels, record=True))
        recorder.record_batch(1, batch, index, labels, batches[-1])
    recorder.write_epoch(1, EpochMetrics(1, 0.3, 0.1, 0.3, 1.0, 0.5))
    return path, batches


def test_brian2_time_courses_go_into_the_run_file_and_a_figure(traced_run, tmp_path):
    from agrel_sim.analysis import plot_trial_timecourse

    path, batches = traced_run
    with h5py.File(path, "r") as run:
        assert run.attrs["backend"] == "brian2"
        course = run["timecourses"]
        assert course["trial"][:].tolist() == [0, 4, 8] and course["t"].shape == (55,)
        assert course["delta"].shape == (3, 55) and course["layers.0"]["fb"].shape == (3, 55, 5)
        assert course["input"]["ff"].shape == (3, 55, 6) and course["output"]["gate"][:].all()
        assert np.all(course["delta"][:, :45] == 0) and np.all(course["delta"][:, 45:] != 0), "δ arrives in the RPE phase"
        assert list(course.attrs["rpe"]) == pytest.approx([0.045, 0.05])
        assert course["t"][0] == pytest.approx(0.001), "sampled at the end of each step"
        assert undescribed(run) == [] and course["t"].attrs["unit"] == "s" and "feedback activity" in course["layers.0"]["fb"].attrs["description"]
        # Each traced trial's own record, whatever the batch's size: trials 0 and 4 of the first batch, 3 of the second.
        where = [(0, 0), (0, 4), (1, 3)]
        assert course["batch"][:].tolist() == [0, 0, 1] and course["epoch"].dtype == course["label"].dtype == np.int32
        assert course["image"][:].tolist() == [int(TRACED_BATCHES[b][0][i]) for b, i in where]
        assert course["label"][:].tolist() == [int(TRACED_BATCHES[b][1][i]) for b, i in where] == [0, 1, 0]
        assert course["action"][:].tolist() == [int(batches[b].action[i]) for b, i in where]
        np.testing.assert_allclose(course["reward"][:], [float(batches[b].reward[i]) for b, i in where])
        np.testing.assert_allclose(course["q"][:], np.stack([batches[b].q[i].numpy() for b, i in where]), rtol=1e-6)
        np.testing.assert_allclose(course["delta"][:, -1], [float(batches[b].delta[i]) for b, i in where], rtol=1e-6)
        changed = run["gating"]["layers.0"]["changed_fraction"][:]
        assert changed.shape == (2,) and np.all((changed > 0) & (changed <= 1))
    with pytest.warns(IncompleteRunWarning):
        run = load_run(path)
    png = plot_trial_timecourse(run, tmp_path / "trial.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert run.timecourse(-3)["trial"] == 0
    with pytest.raises(IndexError, match=r"run\.h5: index 3 is out of range for its 3 traced trials \(0 to 2, or -3 to -1 from the last\)"):
        run.timecourse(3)


def test_a_brian2_dropout_layer_is_traced_and_recorded_as_its_columns_and_drawn_as_none(tmp_path, monkeypatch):
    # As on the torch backend, a dropout layer shows the columns below it: their activity as the
    # layer above sees it (scaled, 0 where dropped) and their gate and feedback, at every step.
    from agrel_sim import Dense, Dropout
    from agrel_sim.analysis import plot_trial_timecourse
    from agrel_sim.recorder import RunFile
    from agrel_sim.training import EpochMetrics

    description, net = tiny_brian2(trace_every=1, layers=[Dense(8), Dropout(0.5)])
    recorder = RunFile(tmp_path / "run.h5", net, {"experiment": "tiny_brian2", "model": description.to_dict(), "dataset": "none"}, 0)
    index, labels = TRACED_BATCHES[0]
    trials = net.run_trials(torch.rand(5, 6, generator=torch.Generator().manual_seed(0)), labels, record=True)
    recorder.record_batch(1, 0, index, labels, trials)
    recorder.write_epoch(1, EpochMetrics(1, 0.3, 0.1, 0.3, 1.0, 0.5))
    with h5py.File(tmp_path / "run.h5", "r") as run:
        columns, dropout = run["timecourses"]["layers.0"], run["timecourses"]["layers.1"]
        kept = trials.layers[1].gate.numpy() | (trials.layers[0].ff.numpy() == 0)  # kept, or silent anyway
        np.testing.assert_allclose(dropout["ff"][:], columns["ff"][:] * 2 * kept[:, None, :], rtol=1e-6)
        assert np.array_equal(dropout["gate"][:], columns["gate"][:]) and np.array_equal(dropout["fb"][:], columns["fb"][:])
        assert (~kept).any() and kept.any()
        assert not columns["gate"][:][..., ~kept[0]][0].any(), "a dropped column's gate is shut"
    figures = drawn_figures(monkeypatch)
    with pytest.warns(IncompleteRunWarning):
        plot_trial_timecourse(load_run(tmp_path / "run.h5"), tmp_path / "trial.png")
    assert [ax.get_ylabel() for ax in figures[0].axes[::2]] == ["layers.0", "output", "dopamine δ = r − q_s"], "no row repeats the columns below a dropout layer"


def test_a_traced_trial_comes_back_with_its_record_and_phases_in_order(traced_run, tmp_path):
    path, batches = traced_run
    with pytest.warns(IncompleteRunWarning):
        run = load_run(path)
    course = run.timecourse(2)
    assert list(course["phases"]) == ["stimulus", "selection", "feedback", "rpe", "plasticity"]
    assert course["phases"]["plasticity"] == pytest.approx((0.05, 0.055))
    assert (course["epoch"], course["batch"], course["trial"], course["image"], course["label"]) == (1, 1, 8, 13, 0)
    assert (course["action"], course["reward"]) == (int(batches[1].action[3]), float(batches[1].reward[3]))
    np.testing.assert_allclose(course["q"], batches[1].q[3].numpy(), rtol=1e-6)
    assert list(course["populations"]) == ["input", "layers.0", "output"]
    for index in (1.5, "0", True, None):
        with pytest.raises(TypeError, match=rf"index: expected an integer \(0 the first traced trial, -1 the last\), got {re.escape(repr(index))}"):
            run.timecourse(index)
    assert run.timecourse(np.int64(0))["trial"] == 0

    # A run file of layout 3 lacks the traced trials' records: they come back as None.
    older = tmp_path / "older.h5"
    shutil.copy(path, older)
    with h5py.File(older, "a") as handle:
        handle.attrs["layout_version"] = 3
        for name in ("image", "label", "action", "reward", "q"):
            del handle["timecourses"][name]
    with pytest.warns(IncompleteRunWarning):
        course = load_run(older).timecourse()
    assert (course["image"], course["label"], course["action"], course["reward"], course["q"]) == (None,) * 5 and course["trial"] == 8

    # HDF5 lists groups by name, layers.10 before layers.2: they come back bottom to top.
    deep = tmp_path / "deep.h5"
    shutil.copy(path, deep)
    with h5py.File(deep, "a") as handle:
        handle["timecourses"].move("layers.0", "layers.2")
        handle["timecourses"].copy("layers.2", "layers.10")
    edit_config(deep, lambda config: config["model"].update(layers=config["model"]["layers"] * 11))
    with pytest.warns(IncompleteRunWarning):
        assert list(load_run(deep).timecourse()["populations"]) == ["input", "layers.2", "layers.10", "output"]


def drawn_figures(monkeypatch):
    """The figures that the analysis draws from now on, kept instead of written."""
    from agrel_sim import analysis

    figures = []

    def keep(fig, path):
        figures.append(fig)
        return Path(path)

    monkeypatch.setattr(analysis, "_save", keep)
    return figures


def test_the_trial_figure_marks_the_chosen_action_and_names_lines_and_phases(traced_run, tmp_path, monkeypatch):
    from agrel_sim.analysis import plot_trial_timecourse

    path, batches = traced_run
    with pytest.warns(IncompleteRunWarning):
        run = load_run(path)
    figures = drawn_figures(monkeypatch)
    course = run.timecourse(0)
    plot_trial_timecourse(run, tmp_path / "trial.png", index=0, units=2)
    fig = figures[0]
    assert fig.get_suptitle().startswith(f"tiny_brian2 seed 0: trial 0 (epoch 1, batch 0); label 0, action {course['action']}, reward {course['reward']:g}")
    rows = [ax for ax in fig.axes[::2]]
    assert [ax.get_ylabel() for ax in rows] == ["layers.0", "output", "dopamine δ = r − q_s"], "no row for the clamped input"
    assert [text.get_text() for text in fig.legends[0].get_texts()] == ["stimulus 0–20 ms", "selection 20–25 ms", "feedback 25–45 ms", "rpe 45–50 ms", "plasticity 50–55 ms"]
    # The columns whose activity spans the widest range (a Q-value that falls, too), with the chosen action's.
    widest = [int(unit) for unit in np.argsort(-np.ptp(course["populations"]["output"]["ff"], axis=0))]
    other = next(unit for unit in widest if unit != course["action"])
    expected = [f"action {unit}" + (" (chosen)" if unit == course["action"] else "") for unit in sorted((course["action"], other))]
    assert [line.get_label() for line in rows[1].lines] == [*expected, "Q-values read"]
    assert [line.get_label() for line in rows[0].lines] == [f"column {unit}" for unit in sorted(np.argsort(-np.ptp(course["populations"]["layers.0"]["ff"], axis=0))[:2])]
    with pytest.raises(ValueError, match=r"units: expected an integer >= 1, got -1"):
        plot_trial_timecourse(run, tmp_path / "trial.png", units=-1)

    # The chosen action's unit is drawn whatever its activity: here the one that varies least.
    quiet = tmp_path / "quiet.h5"
    shutil.copy(path, quiet)
    with h5py.File(quiet, "a") as handle:
        handle["timecourses"]["action"][0] = widest[-1]
    with pytest.warns(IncompleteRunWarning):
        plot_trial_timecourse(load_run(quiet), tmp_path / "trial.png", index=0, units=1)
    assert [line.get_label() for line in figures[-1].axes[2].lines] == [f"action {widest[-1]} (chosen)", "Q-values read"]


def test_analyze_draws_the_traced_trial_asked_for(traced_run, tmp_path, monkeypatch, capsys):
    figures = drawn_figures(monkeypatch)
    folder = traced_run[0].parent
    assert main(["analyze", str(folder), "--out", str(tmp_path / "last")]) == 0
    assert [fig.get_suptitle() for fig in figures if "trial 8 (epoch 1, batch 1)" in fig.get_suptitle()], "by default the last traced trial"
    assert main(["analyze", str(folder), "--out", str(tmp_path / "figures"), "--trial", "1"]) == 0
    assert [fig.get_suptitle() for fig in figures if "trial 4 (epoch 1, batch 0)" in fig.get_suptitle()], "the second traced trial"
    capsys.readouterr()
    assert main(["analyze", str(folder), "--out", str(tmp_path / "none"), "--trial", "-4"]) == 2
    assert "agrel-sim: error: trial -4: no run here has that traced trial (the traced runs here have 3 traced trials)" in capsys.readouterr().err
    assert not (tmp_path / "none").exists(), "checked before any figure is written"
    # A run with fewer traced trials gets no trial figure, and a line says so; the others get theirs.
    shorter = tmp_path / "runs" / "short" / "run.h5"
    shutil.copytree(folder, tmp_path / "runs" / "long")
    shorter.parent.mkdir()
    shutil.copy(traced_run[0], shorter)
    with h5py.File(shorter, "a") as run:
        run["timecourses"].visititems(lambda name, item: item.resize(1, axis=0) if isinstance(item, h5py.Dataset) and item.maxshape[0] is None else None)
    figures.clear()
    assert main(["analyze", str(tmp_path / "runs"), "--out", str(tmp_path / "both"), "--trial", "2"]) == 0
    assert f"{shorter}: no trial figure: trial 2 is out of range for its 1 traced trials" in capsys.readouterr().out
    assert [fig.get_suptitle().split(";")[0] for fig in figures if "(epoch 1, batch" in fig.get_suptitle()] == ["tiny_brian2 seed 0: trial 8 (epoch 1, batch 1)"]


def test_resuming_drops_the_time_courses_of_later_epochs(traced_run, tmp_path):
    from agrel_sim.recorder import RunFile

    shutil.copy(traced_run[0], tmp_path / "run.h5")
    description, net = tiny_brian2()
    RunFile(tmp_path / "run.h5", net, {"experiment": "tiny_brian2", "model": description.to_dict(), "dataset": "none"}, 0, resume_after=0)
    with h5py.File(tmp_path / "run.h5", "r") as run:
        course = run["timecourses"]
        kept = {name: item.shape[0] for name, item in course.items() if isinstance(item, h5py.Dataset) and name != "t"}
        assert set(kept) == {"epoch", "batch", "trial", "image", "label", "action", "reward", "q", "delta"} and set(kept.values()) == {0}


def test_a_batch_is_recorded_with_its_own_trials(tmp_path):
    from agrel_sim.recorder import RunFile

    description, net = tiny_brian2(trace_every=2)
    recorder = RunFile(tmp_path / "run.h5", net, {"experiment": "tiny_brian2", "model": description.to_dict(), "dataset": "none"}, 0)
    images, labels = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2])
    first = net.run_trials(images, labels, record=True)
    second = net.run_trials(images, labels, record=True)
    with pytest.raises(ValueError, match=r"record_batch: traced trial 0 is not in this batch \(trials 3 to 5\); record each batch right after its run_trials"):
        recorder.record_batch(1, 0, torch.arange(3), labels, first)
    second.traces[0].trial = 6  # as if it were the first trial of the next batch
    with pytest.raises(ValueError, match=r"record_batch: traced trial 6 is not in this batch \(trials 3 to 5\)"):
        recorder.record_batch(1, 0, torch.arange(3), labels, second)


def test_a_configuration_made_in_python_gets_the_networks_model_and_must_hold_what_the_analyses_read(tmp_path):
    from agrel_sim import ColumnNetwork, Dense, build
    from agrel_sim.recorder import RunFile

    description = ColumnNetwork((6,), [Dense(5)], 3)
    net = build(description)
    RunFile(tmp_path / "run.h5", net, {"experiment": "tiny", "dataset": "none"}, 0)
    with pytest.warns(IncompleteRunWarning):
        assert load_run(tmp_path / "run.h5").config["model"] == json.loads(json.dumps(description.to_dict())), "the analyses read it"
    RunFile(tmp_path / "brian2.h5", build(description, backend="brian2"), {"experiment": "tiny", "dataset": "none"}, 0)
    with pytest.warns(IncompleteRunWarning):
        assert load_run(tmp_path / "brian2.h5").config["backend"] == "brian2", "a configuration without one would read as torch's"
    for config, message in (
        ({"experiment": "tiny"}, r"config: it lacks dataset \(or holds another kind of value\), which the analyses read; give at least experiment and dataset"),
        ({"dataset": "none", "model": description.to_dict()}, r"config: it lacks experiment "),
        ({"experiment": "tiny", "dataset": "none", "training": "x"}, r"config: it lacks training "),
        ({"experiment": "tiny", "dataset": "none", "model": ColumnNetwork((6,), [Dense(4)], 3).to_dict()}, r"config: its model is not the description the network was built from"),
    ):
        with pytest.raises(ValueError, match=message):
            RunFile(tmp_path / "other.h5", net, config, 0)
        assert not (tmp_path / "other.h5").exists()


def test_a_configuration_naming_another_backend_than_the_networks_is_refused(tmp_path):
    from agrel_sim import ColumnNetwork, Dense, build
    from agrel_sim.recorder import RunFile

    net = build(ColumnNetwork((6,), [Dense(5)], 3), backend="brian2")
    with pytest.raises(ValueError, match=r"config: backend 'torch', but the network was built by the 'brian2' backend"):
        RunFile(tmp_path / "run.h5", net, {"experiment": "tiny", "backend": "torch"}, 0)
    assert not (tmp_path / "run.h5").exists()


@pytest.mark.slow
def test_brian2_experiment_learns_digits(tmp_path):
    from agrel_sim.experiment import load_experiment

    result = run_experiment(load_experiment("digits_brian2"), seed=0, out=tmp_path, log=None)
    assert result.test_accuracy >= 0.9
    assert load_run(tmp_path / "run.h5").has_timecourses


def test_a_brian2_run_resumes_only_under_the_version_that_began_it(tmp_path):
    import agrel_sim

    now = {"layout_version": LAYOUT_VERSION, "software_version": agrel_sim.__version__}
    check_resumable(tmp_path / "run.h5", {**now, "backend": "brian2"})
    check_resumable(tmp_path / "run.h5", {**now, "backend": "torch", "software_version": "0.1.0"})  # torch keeps its trials
    with pytest.raises(ValueError, match=rf"run\.h5: a Brian2 run begun by agrel-sim 0\.1\.0 cannot be continued by agrel-sim {re.escape(agrel_sim.__version__)}"):
        check_resumable(tmp_path / "run.h5", {**now, "backend": "brian2", "software_version": "0.1.0"})
    with pytest.raises(ValueError, match=r"run-file layout version 2, but this agrel-sim writes"):
        check_resumable(tmp_path / "run.h5", {**now, "backend": "torch", "layout_version": 2})


def test_the_summary_names_the_best_validation_accuracy_and_the_last_reward_probability(tmp_path):
    # A run whose best epoch is not its last: the summary names the best validation accuracy.
    run_experiment(experiment(epochs=2), seed=0, out=tmp_path, log=None)
    with h5py.File(tmp_path / "run.h5", "a") as run:
        run["epochs"]["validation_accuracy"][:] = [0.8125, 0.5]
        run["epochs"]["reward_probability"][:] = [0.25, 0.75]
    assert "epochs: 2; last reward probability 0.7500, best validation accuracy 0.8125, learning rate 0.3 to 0.3" in summary(load_run(tmp_path / "run.h5"))


def test_the_outcome_lines_count_only_the_epochs_with_both_outcomes(tmp_path):
    # An epoch of one outcome counts for nothing in the rewarded-minus-unrewarded differences.
    run_experiment(experiment(epochs=2), seed=0, out=tmp_path, log=None)
    with h5py.File(tmp_path / "run.h5", "a") as run:  # epoch 1: one trial of each outcome at least; epoch 2: rewarded only
        epoch, label = run["trials"]["epoch"][:], run["trials"]["label"][:]
        action = label.copy()
        action[np.flatnonzero(epoch == 1)[0]] = (label[np.flatnonzero(epoch == 1)[0]] + 1) % 10
        run["trials"]["action"][:] = action
    lines = outcome_lines(load_run(tmp_path / "run.h5"))
    assert lines[0] == "  rewarded minus unrewarded logged trials, within epochs (1 of 2 epochs have both):", lines
    # Trials of a diverged network are left out, and the lines say how many.
    with h5py.File(tmp_path / "run.h5", "a") as run:
        q = run["trials"]["q"][:]
        q[np.flatnonzero(epoch == 1)] = np.nan
        q[np.flatnonzero(epoch == 2)[:3]] = np.inf
        run["trials"]["q"][:] = q
    logged = len(epoch)
    assert outcome_lines(load_run(tmp_path / "run.h5"))[0] == f"  rewarded against unrewarded trials: no epoch logged trials of both outcomes ({(epoch == 1).sum() + 3} of the {logged} left out: their Q-values are not finite)"


def test_a_network_without_hidden_layers_has_no_outcome_lines(tmp_path):
    linear = Experiment.from_dict({
        "name": "linear", "dataset": "digits", "model": {"input_shape": [1, 8, 8], "layers": [], "output": {"actions": 10}},
        "training": {"batch_size": 50, "max_epochs": 1, "validation_size": 200},
    }, "<test>")
    run_experiment(linear, seed=0, out=tmp_path, log=None)
    assert outcome_lines(load_run(tmp_path / "run.h5")) == []


def test_the_traced_columns_are_those_named_in_units(tmp_path):
    from agrel_sim import build

    # /layers/<layer>/{ff, gate} hold the columns named in units (the output's ff is the Q-values).
    logging = LogSettings(every_batches=5, trials_per_batch=4, max_units=4)
    run_experiment(experiment(epochs=1), seed=3, out=tmp_path, logging=logging, log=None)
    run = load_run(tmp_path / "run.h5")
    q, output = run.trials()["q"], run.layer("output")
    assert output["units"].tolist() != [0, 1, 2, 3], "a subset other than the first columns"
    np.testing.assert_allclose(output["ff"], q[:, output["units"]], rtol=1e-6)
    dense = run.layer("layers.2")  # 32 columns, 4 traced, no dropout layer above it
    assert dense["units"].tolist() != [0, 1, 2, 3] and dense["gate"].any()
    np.testing.assert_array_equal(dense["gate"], (dense["ff"] > 0).astype(np.uint8))
    # The subset is drawn by the run's seed: the same seed, the same columns; another, others.
    net = build(experiment().model)
    for seed in (3, 4):
        RunFile(tmp_path / f"seed{seed}.h5", net, {"experiment": "small", "dataset": "digits"}, seed, logging)
        with h5py.File(tmp_path / f"seed{seed}.h5", "r") as other:
            assert (other["layers"]["layers.2"]["units"][:].tolist() == dense["units"].tolist()) == (seed == 3), seed


def test_a_finished_run_continued_holds_no_result_until_it_ends_again(tmp_path, monkeypatch):
    # /result is absent while a finished run continued with a longer patience goes on.
    run_experiment(experiment(epochs=1), seed=0, out=tmp_path, log=None)

    class Stopped(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stopped

    monkeypatch.setattr(RunFile, "record_batch", stop)  # the continuation ends in its first batch
    with pytest.raises(Stopped):
        run_experiment(experiment(epochs=2), seed=0, out=tmp_path, resume=True, log=None)
    with h5py.File(tmp_path / "run.h5", "r") as run:
        assert not run.attrs["complete"] and "result" not in run and run["epochs"]["epoch"][:].tolist() == [1]
    with pytest.warns(IncompleteRunWarning):
        run = load_run(tmp_path / "run.h5")
    assert run.result is None and "\n  result:" not in summary(run)


def test_epoch_axes_count_whole_epochs_also_for_a_run_of_one_epoch(tmp_path, monkeypatch):
    figures = drawn_figures(monkeypatch)
    run_experiment(experiment(epochs=1), seed=0, out=tmp_path / "run", log=None)
    assert main(["analyze", str(tmp_path / "run"), "--out", str(tmp_path / "figures")]) == 0
    axes = [ax for fig in figures for ax in fig.axes if ax.get_xlabel() == "epoch" and ax.lines]
    assert len(axes) == 1 + 3 + 1, "Figure 3's panel, the gating figure's and the alignment figure's"
    for ax in axes:
        low, high = ax.get_xlim()
        from_epoch_0 = ax.get_ylabel().startswith("cosine")  # the alignment begins with the weights the run started with
        assert [tick for tick in ax.get_xticks() if low <= tick <= high] == ([0.0, 1.0] if from_epoch_0 else [1.0])
