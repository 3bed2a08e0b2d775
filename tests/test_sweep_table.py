"""Sweeps (local pool and submitit's local executor) and Table 1, end to end on tiny budgets."""

import csv
import json
import re
from pathlib import Path

import h5py
import pytest
import torch

from agrel_sim.cli import main
from agrel_sim.experiment import load_experiment
from agrel_sim.sweep import load_sweep, plan, run_sweep
from agrel_sim.table import markdown, table1, write_csv

MODEL = """
input_shape = [1, 8, 8]
[[layers]]
kind = "dense"
units = 16
[output]
actions = 10
[rule]
learning_rate = 0.3
"""


def experiment(rule):
    return f"""
name = "tiny_{rule}"
model = "tiny.toml"
dataset = "digits"
[rule]
name = "{rule}"
[training]
batch_size = 50
max_epochs = 2
validation_size = 100
"""


@pytest.fixture
def sweep_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(MODEL)
    for rule in ("deepagrel", "ebp"):
        (tmp_path / f"tiny_{rule}.toml").write_text(experiment(rule))
    path = tmp_path / "sweep.toml"
    path.write_text('name = "tiny"\nexperiments = ["tiny_deepagrel.toml", "tiny_ebp.toml"]\nseeds = [0, 1]\nout = "runs/tiny"\n')
    return path


def run_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("run.h5"))


@pytest.mark.parametrize("executor", ["local", "submitit-local"])
def test_sweep_runs_missing_runs_only(sweep_file, tmp_path, capsys, executor):
    assert main(["sweep", str(sweep_file), "--executor", executor, "--jobs", "2"]) == 0
    runs = tmp_path / "runs" / "tiny"
    expected = [f"tiny_{rule}/seed{seed}/run.h5" for rule in ("deepagrel", "ebp") for seed in (0, 1)]
    assert run_files(runs) == expected
    assert "0 runs already finished, 4 to run" in capsys.readouterr().out

    # Re-running skips finished runs; a missing run is run again, alone.
    for leftover in (runs / "tiny_ebp" / "seed1").iterdir():
        leftover.unlink()
    before = (runs / "tiny_deepagrel" / "seed0" / "run.h5").stat().st_mtime_ns
    assert main(["sweep", str(sweep_file), "--executor", executor]) == 0
    assert "3 runs already finished, 1 to run" in capsys.readouterr().out
    assert run_files(runs) == expected
    assert (runs / "tiny_deepagrel" / "seed0" / "run.h5").stat().st_mtime_ns == before

    with h5py.File(runs / "tiny_ebp" / "seed1" / "run.h5", "r") as run:
        assert run.attrs["complete"] and run.attrs["seed"] == 1 and run.attrs["rule"] == "ebp"
        assert run["epochs"]["epoch"][:].tolist() == [1, 2]

    assert main(["table", str(runs)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| digits \| tiny \| none \| \d+\.\d\d ± \d+\.\d\d \| \d+\.\d\d ± \d+\.\d\d \| 2\.0 \| 2\.0 \| 1\.00 \| 0/2, 0/2 \|", out), out
    rows = list(csv.DictReader(open(runs / "table1.csv")))
    assert len(rows) == 1 and rows[0]["network"] == "tiny"


def test_a_sweep_continues_runs_given_more_epochs_and_refuses_runs_made_otherwise(sweep_file, tmp_path, capsys):
    assert main(["sweep", str(sweep_file)]) == 0
    runs = tmp_path / "runs" / "tiny"
    (tmp_path / "tiny_ebp.toml").write_text(experiment("ebp").replace("max_epochs = 2", "max_epochs = 3"))
    assert main(["sweep", str(sweep_file)]) == 0
    assert "2 runs already finished, 2 to run" in capsys.readouterr().out
    for seed in (0, 1):
        with h5py.File(runs / "tiny_ebp" / f"seed{seed}" / "run.h5", "r") as run:
            assert run.attrs["complete"] and run["epochs"]["epoch"][:].tolist() == [1, 2, 3]

    # Any other change would leave runs of two settings under one name: the sweep stops first.
    (tmp_path / "tiny_deepagrel.toml").write_text(experiment("deepagrel").replace("[training]", "learning_rate = 0.5\n[training]"))
    (tmp_path / "tiny_ebp.toml").write_text(experiment("ebp").replace("max_epochs = 2", "max_epochs = 4"))
    before = {path: path.stat().st_mtime_ns for path in runs.rglob("run.h5")}
    assert main(["sweep", str(sweep_file)]) == 2
    error = capsys.readouterr().err
    assert re.search(r"tiny_deepagrel/seed0/run\.h5: cannot continue this run with other settings.*model\.rule\.learning_rate: 0\.3 in the run, 0\.5 now", error), error
    assert {path: path.stat().st_mtime_ns for path in runs.rglob("run.h5")} == before, "no run was touched"


def test_a_sweep_counts_finished_runs_of_older_layouts_but_continues_none_of_them(sweep_file, tmp_path, capsys):
    assert main(["sweep", str(sweep_file)]) == 0
    runs = tmp_path / "runs" / "tiny"
    with h5py.File(runs / "tiny_ebp" / "seed0" / "run.h5", "a") as run:
        run.attrs["layout_version"] = 2
    with h5py.File(runs / "tiny_ebp" / "seed1" / "run.h5", "a") as run:  # layout 1 had no learning-rate schedule
        config = json.loads(run.attrs["config"])
        del config["training"]["lr_decay_factor"], config["training"]["lr_decay_patience"]
        run.attrs["config"], run.attrs["layout_version"] = json.dumps(config), 1
    assert main(["sweep", str(sweep_file)]) == 0
    assert "4 runs already finished, 0 to run" in capsys.readouterr().out

    # Given more epochs, they would have to go on: the sweep stops before any run instead.
    (tmp_path / "tiny_ebp.toml").write_text(experiment("ebp").replace("max_epochs = 2", "max_epochs = 3"))
    files = lambda: {path: path.stat().st_mtime_ns for path in runs.rglob("*") if path.is_file()}  # noqa: E731
    before = files()
    assert main(["sweep", str(sweep_file)]) == 2
    assert re.search(r"tiny_ebp/seed0/run\.h5: run-file layout version 2, but this agrel-sim writes 3; it cannot resume the run", capsys.readouterr().err)
    assert files() == before, "no run was touched"
    with h5py.File(runs / "tiny_ebp" / "seed0" / "run.h5", "a") as run:
        run.attrs["layout_version"] = 3
    (runs / "tiny_ebp" / "seed0" / "checkpoint.pt").unlink()
    before = files()
    assert main(["sweep", str(sweep_file)]) == 2
    assert re.search(r"tiny_ebp/seed0/run\.h5: this run is complete and its checkpoint checkpoint\.pt is gone", capsys.readouterr().err)
    assert files() == before, "no run was touched"


def test_submitit_local_runs_at_most_jobs_at_once(sweep_file, tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    given = []
    map_array = submitit.LocalExecutor.map_array

    def counted(self, function, tasks):
        given.append(len(tasks))
        return map_array(self, function, tasks)

    monkeypatch.setattr(submitit.LocalExecutor, "map_array", counted)
    assert run_sweep(load_sweep(sweep_file), tmp_path / "runs", jobs=3, executor="submitit-local") == []
    assert given == [3, 1]


def test_a_sweep_stops_before_any_run_for_a_checkpoint_it_cannot_continue(sweep_file, tmp_path, capsys):
    assert main(["sweep", str(sweep_file)]) == 0
    folder = tmp_path / "runs" / "tiny" / "tiny_ebp" / "seed1"
    with h5py.File(folder / "run.h5", "a") as run:
        run.attrs["complete"] = False  # as if killed
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    torch.save({key: value for key, value in state.items() if key != "trials_run"}, folder / "checkpoint.pt")
    assert main(["sweep", str(sweep_file)]) == 2
    assert re.search(r"tiny_ebp/seed1/checkpoint\.pt: a checkpoint of an older agrel-sim", capsys.readouterr().err)


def test_a_sweep_on_another_device_counts_finished_runs_but_cannot_continue_them(sweep_file, tmp_path):
    assert main(["sweep", str(sweep_file)]) == 0
    sweep = load_sweep(sweep_file)
    tasks, finished = plan(sweep, tmp_path / "runs" / "tiny", device="cuda")
    assert (len(tasks), len(finished)) == (0, 4)
    (tmp_path / "tiny_ebp.toml").write_text(experiment("ebp").replace("max_epochs = 2", "max_epochs = 3"))
    with pytest.raises(ValueError, match=r"tiny_ebp/seed0/run\.h5: cannot continue this run with other settings than it began with \(device: 'cpu' in the run, 'cuda' now\)"):
        plan(load_sweep(sweep_file), tmp_path / "runs" / "tiny", device="cuda")


def test_a_failing_run_is_reported_and_the_others_finish(sweep_file, tmp_path, capsys):
    (tmp_path / "tiny_ebp.toml").write_text(experiment("ebp").replace('dataset = "digits"', 'dataset = "mnist"'))
    assert main(["sweep", str(sweep_file), "--data-dir", str(tmp_path / "no-data")]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("FAILED") == 2 and "MNIST not found" in captured.out
    assert "run the same command again" in captured.err
    assert len(run_files(tmp_path / "runs")) == 2


def test_every_repository_experiment_and_the_table1_sweep_load():
    folder = Path(__file__).resolve().parent.parent / "experiments"
    sweep = load_sweep(folder / "table1.toml")
    assert len(sweep.experiments) == 44 and sweep.seeds == tuple(range(10))
    files = sorted(p for p in folder.glob("*.toml") if p.stem != "table1")
    assert {str(p) for p in files} >= set(sweep.experiments)
    settings = set()
    for path in files:
        experiment = load_experiment(path)
        assert experiment.name == path.stem
        assert (experiment.training.augmentation is not None) == ("_aug_" in path.stem)
        if str(path) in sweep.experiments:
            model = experiment.model
            settings.add((experiment.dataset, model.rule.name, model.rule.learning_rate, model.action_selection.epsilon if model.rule.name == "deepagrel" else None))
    # One setting per data set and rule: the rates chosen on the MNIST conv net, and on the
    # CIFAR-10 conv net for both CIFAR data sets (README).
    assert settings == {
        ("mnist", "deepagrel", 1.0, 0.02), ("mnist", "ebp", 0.2, None),
        ("cifar10", "deepagrel", 0.2, 0.02), ("cifar10", "ebp", 0.05, None),
        ("cifar100", "deepagrel", 0.2, 0.02), ("cifar100", "ebp", 0.05, None),
    }


def test_train_refuses_a_sweep_file(capsys):
    assert main(["train", "table1"]) == 2
    assert "a sweep file (it lists experiments): run it with `agrel-sim sweep`" in capsys.readouterr().err


def test_bad_sweep_file(tmp_path, capsys):
    path = tmp_path / "sweep.toml"
    path.write_text('experiments = ["no_such_experiment"]\nseeds = [0]\n')
    assert main(["sweep", str(path)]) == 2
    assert re.search(r"sweep\.toml: experiments\[0\]: experiment 'no_such_experiment' not found", capsys.readouterr().err)


def test_a_sweep_checks_its_jobs_and_device_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="jobs: expected a whole number of runs at once, at least 1, got 0"):
        run_sweep(load_sweep("table1"), tmp_path, jobs=0)
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        run_sweep(load_sweep("table1"), tmp_path, device="gpu")
    assert not any(tmp_path.iterdir())


def record(dataset, network, rule, accuracy, epochs, converged=True, augmented=False):
    return {
        "dataset": dataset, "model": {"name": network, "rule": {"name": rule}},
        "training": {"augmentation": {"factor": 10} if augmented else None},
        "result": {"test_accuracy": accuracy, "epochs": epochs, "converged": converged},
    }


def test_table1_statistics(tmp_path):
    records = [
        record("mnist", "mnist_conv3", "deepagrel", 0.99, 60), record("mnist", "mnist_conv3", "deepagrel", 0.98, 80, converged=False),
        record("mnist", "mnist_conv3", "ebp", 0.992, 35), record("mnist", "mnist_conv3", "ebp", 0.99, 45),
        record("cifar10", "cifar10_conv3", "ebp", 0.7, 50, augmented=True),
    ]
    rows = table1(records)
    assert [(r["dataset"], r["augmentation"]) for r in rows] == [("cifar10", "10x"), ("mnist", "none")]
    mnist = rows[1]
    assert mnist["deepagrel_acc_mean"] == pytest.approx(98.5) and mnist["deepagrel_acc_std"] == pytest.approx(0.7071, abs=1e-4)
    assert mnist["epoch_ratio"] == pytest.approx(70 / 40) and mnist["deepagrel_converged"] == "1/2"
    text = markdown(rows)
    assert "| mnist | mnist_conv3 | none | 98.50 ± 0.71 | 99.10 ± 0.14 | 70.0 | 40.0 | 1.75 | 1/2, 2/2 |" in text
    # One run has no spread: its accuracy stands alone, and the CSV leaves the deviation empty.
    assert "| cifar10 | cifar10_conv3 | 10x | – | 70.00 | – | 50.0 | – | 0/0, 1/1 |" in text
    write_csv(rows, tmp_path / "table1.csv")
    with open(tmp_path / "table1.csv", newline="") as handle:
        cifar = next(csv.DictReader(handle))
    assert (cifar["ebp_acc_mean"], cifar["ebp_acc_std"]) == ("70.0", "")


def test_table_of_an_empty_folder(tmp_path, capsys):
    assert main(["table", str(tmp_path)]) == 2
    assert "no run files (run.h5) in this folder or below it" in capsys.readouterr().err
    (tmp_path / "run.h5").write_text("{broken")
    assert main(["table", str(tmp_path)]) == 2
    assert "run.h5: not an HDF5 file, so not a run file of agrel-sim" in capsys.readouterr().err
