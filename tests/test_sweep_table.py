"""Sweeps (local processes and submitit's local executor) and Table 1, end to end on tiny budgets."""

import contextlib
import csv
import fcntl
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from agrel_sim import sweep as sweep_module
from agrel_sim.cli import main
from agrel_sim.experiment import load_experiment
from agrel_sim.recorder import LAYOUT_VERSION
from agrel_sim.runs import is_complete, run_experiment
from agrel_sim.sweep import RunTask, execute, load_sweep, plan, run_sweep
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
    if executor == "submitit-local":  # a folder per job, named by its ID, and no other
        folders = [p.name for p in (runs / "submitit").iterdir() if p.is_dir()]
        assert len(folders) == 4 and all(name.isdigit() for name in folders), folders

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
    assert re.search(r"\| digits \| tiny \| none \| \d+\.\d\d ± \d+\.\d\d \| \d+\.\d\d ± \d+\.\d\d \| ≥ 2\.0 \| ≥ 2\.0 \| 1\.00\? \| 0/2, 0/2 \|", out), out
    assert "Note:" not in out, "both rules ran seeds 0 and 1"
    rows = list(csv.DictReader(open(runs / "table1.csv")))
    assert len(rows) == 1 and rows[0]["network"] == "tiny"
    assert (rows[0]["deepagrel_seeds"], rows[0]["ebp_seeds"]) == ("0 1", "0 1")


@pytest.mark.parametrize("executor", ["local", "submitit-local"])
def test_a_second_sweep_into_the_same_folder_stops_before_any_run(sweep_file, tmp_path, capsys, executor):
    out = tmp_path / "runs" / "tiny"
    out.mkdir(parents=True)
    with open(out / "sweep.lock", "w") as lock:  # as a sweep running there holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["sweep", str(sweep_file), "--executor", executor]) == 2
    captured = capsys.readouterr()
    assert "runs/tiny: another sweep is running its runs in this folder; run this one once it has ended" in captured.err
    assert captured.out == "", "no word on the other sweep's runs, which it may be changing"
    assert [path.name for path in out.iterdir()] == ["sweep.lock"], "no run started, no job folder made"
    assert main(["sweep", str(sweep_file), "--executor", executor]) == 0, "once it has ended"
    assert len(run_files(out)) == 4


def test_a_sweep_continues_runs_given_more_epochs_and_refuses_runs_made_otherwise(sweep_file, tmp_path, capsys):
    assert main(["sweep", str(sweep_file)]) == 0
    runs = tmp_path / "runs" / "tiny"
    (tmp_path / "tiny_ebp.toml").write_text(experiment("ebp").replace("max_epochs = 2", "max_epochs = 3"))
    assert main(["sweep", str(sweep_file)]) == 0
    assert "2 runs already finished, 2 to run (2 of them finished runs that go on: until they end again, table lists them as incomplete)" in capsys.readouterr().out
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


def test_a_sweep_notes_runs_that_go_on_with_another_thread_count(sweep_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep_module, "_usable_cores", lambda: 2)
    assert main(["sweep", str(sweep_file), "--jobs", "1"]) == 0  # 2 threads each
    assert "note:" not in capsys.readouterr().out
    (tmp_path / "tiny_ebp.toml").write_text(experiment("ebp").replace("max_epochs = 2", "max_epochs = 3"))
    assert main(["sweep", str(sweep_file), "--jobs", "2"]) == 0  # 1 thread each
    assert (
        "note: 2 of them go on with 1 torch threads each, where the sessions that trained their checkpoints had 2; the thread count orders torch's sums,"
        " so they go on, but not bit for bit as they would have (the --jobs and cores of the sweep that trained them keep it so)\n"
    ) in capsys.readouterr().out
    (tmp_path / "tiny_ebp.toml").write_text(experiment("ebp").replace("max_epochs = 2", "max_epochs = 4"))
    assert main(["sweep", str(sweep_file), "--jobs", "2"]) == 0
    assert "note:" not in capsys.readouterr().out, "the count of their last session"


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
    files = lambda: {path: path.stat().st_mtime_ns for path in runs.rglob("*") if path.is_file() and path.name != "sweep.lock"}  # noqa: E731
    before = files()
    assert main(["sweep", str(sweep_file)]) == 2
    assert re.search(rf"tiny_ebp/seed0/run\.h5: run-file layout version 2, but this agrel-sim writes {LAYOUT_VERSION}; it cannot resume the run", capsys.readouterr().err)
    assert files() == before, "no run was touched"
    with h5py.File(runs / "tiny_ebp" / "seed0" / "run.h5", "a") as run:
        run.attrs["layout_version"] = LAYOUT_VERSION
    (runs / "tiny_ebp" / "seed0" / "checkpoint.pt").unlink()
    before = files()
    assert main(["sweep", str(sweep_file)]) == 2
    assert re.search(r"tiny_ebp/seed0/run\.h5: this run is complete and its checkpoint checkpoint\.pt is gone", capsys.readouterr().err)
    assert files() == before, "no run was touched"


def test_submitit_local_keeps_jobs_running_and_starts_one_as_another_ends(sweep_file, monkeypatch):
    """Seed 0 of tiny_deepagrel runs long: the other runs start, two at a time, as runs end."""
    pytest.importorskip("submitit")
    monkeypatch.setattr(sweep_module, "POLL_S", 0)
    sweep = load_sweep(sweep_file)
    tasks, _ = plan(sweep, "runs")
    jobs = [FakeJob(str(index), (True, f"run {index}"), polls=5 if index == 0 else 1) for index in range(len(tasks))]
    executor = FakeLocalExecutor(jobs)
    lines = [line for _, _, line in sweep_module._run_submitit(executor, tasks, 2, sweep, sweep_file.parent / "controllers.log")]
    assert executor.given == [2, 1, 1] and lines == ["run 1", "run 2", "run 3", "run 0"]


def test_a_sweep_that_stops_before_any_run_leaves_no_lock_file_in_a_folder_it_found(sweep_file, tmp_path, capsys):
    folder = tmp_path / "runs" / "tiny" / "tiny_ebp" / "seed0"
    folder.mkdir(parents=True)
    (folder / "run.h5").write_text("garbage")  # runs copied here, say
    assert main(["sweep", str(sweep_file)]) == 2
    assert "run.h5: cannot read this run file" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == ["tiny_ebp"], "the sweep left its lock file behind"


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
    # More validation images than the embedded digits have training images: found as the file is read.
    (tmp_path / "tiny_ebp.toml").write_text(experiment("ebp").replace("validation_size = 100", "validation_size = 5000"))
    assert main(["sweep", str(sweep_file)]) == 2
    assert "tiny_ebp.toml: training.validation_size: expected 0 < validation_size < 1437 (the training images of 'digits'), got 5000" in capsys.readouterr().err
    assert run_files(tmp_path / "runs") == []
    # A learning rate beyond float32, the runs' dtype: found as each run builds its network.
    (tmp_path / "tiny_ebp.toml").write_text(experiment("ebp").replace('name = "ebp"', 'name = "ebp"\nlearning_rate = 1e39'))
    assert main(["sweep", str(sweep_file)]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("FAILED") == 2 and "rule.learning_rate: 1e+39 overflows torch.float32" in captured.out
    assert "run the same command again" in captured.err
    assert len(run_files(tmp_path / "runs")) == 2


@pytest.mark.parametrize("executor", ["local", "submitit-local"])
def test_a_sweep_whose_data_are_not_found_stops_before_any_run(sweep_file, tmp_path, capsys, executor):
    (tmp_path / "tiny_ebp.toml").write_text(experiment("ebp").replace('dataset = "digits"', 'dataset = "mnist"').replace('"tiny.toml"', '"mnist_fc3"'))
    assert main(["sweep", str(sweep_file), "--data-dir", str(tmp_path / "no-data"), "--executor", executor]) == 2
    assert re.search(rf"MNIST not found\. Searched:\n  {re.escape(str(tmp_path / 'no-data'))}/MNIST/raw\n", capsys.readouterr().err), "the sweep's --data-dir"
    assert not (tmp_path / "runs").exists(), "not even the runs that need no files"
    # Every data set missing is named at once, not one per attempt.
    (tmp_path / "tiny_deepagrel.toml").write_text(experiment("deepagrel").replace('dataset = "digits"', 'dataset = "cifar10"').replace('"tiny.toml"', '"cifar10_conv3"'))
    assert main(["sweep", str(sweep_file), "--data-dir", str(tmp_path / "no-data"), "--executor", executor]) == 2
    error = capsys.readouterr().err
    assert "CIFAR10 not found. Searched:" in error and "MNIST not found. Searched:" in error


def test_ctrl_c_ends_a_sweep_and_its_runs_keep_every_finished_epoch(sweep_file, tmp_path, python_sigint):
    long = experiment("deepagrel").replace("tiny_deepagrel", "tiny_long").replace("max_epochs = 2", "max_epochs = 100000\npatience = 100000")
    (tmp_path / "tiny_long.toml").write_text(long)
    sweep_file.write_text('name = "tiny"\nexperiments = ["tiny_long.toml"]\nseeds = [0, 1]\nout = "runs/tiny"\n')
    folder = tmp_path / "runs" / "tiny" / "tiny_long"
    command = [sys.executable, "-m", "agrel_sim.cli", "sweep", str(sweep_file)]
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (folder / "seed0" / "checkpoint.pt").exists():  # written at the end of each epoch
            if sweep.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run did not finish an epoch: {sweep.stderr.read()}")
            time.sleep(0.05)
        os.killpg(sweep.pid, signal.SIGINT)  # as Ctrl-C on a terminal: the whole process group
        _, err = sweep.communicate(timeout=30)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    assert sweep.returncode == 130 and "agrel-sim: interrupted" in err and "Traceback" not in err, err
    # The run's process was terminated: it must leave no named semaphore (tqdm's lock, say) for
    # the resource tracker to report as leaked as the sweep's process exits.
    assert "resource_tracker" not in err and "leaked" not in err, err
    assert not (folder / "seed1").exists(), "no other run started"
    with open(folder / "seed0" / "run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the run's process still holds it
    with h5py.File(folder / "seed0" / "run.h5", "r") as run:
        assert not run.attrs["complete"] and len(run["epochs/epoch"]) >= 1
    tasks, finished = plan(load_sweep(sweep_file), tmp_path / "runs" / "tiny")  # reads the run file and the checkpoint it goes on from
    assert [task.seed for task in tasks] == [0, 1] and finished == []


@pytest.mark.parametrize("executor", ["local", "submitit-local"])
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_sweep_leaves_no_run_training(sweep_file, tmp_path, kill, executor):
    long = experiment("deepagrel").replace("tiny_deepagrel", "tiny_long").replace("max_epochs = 2", "max_epochs = 100000\npatience = 100000")
    (tmp_path / "tiny_long.toml").write_text(long)
    sweep_file.write_text('name = "tiny"\nexperiments = ["tiny_long.toml"]\nseeds = [0]\nout = "runs/tiny"\n')
    folder = tmp_path / "runs" / "tiny" / "tiny_long" / "seed0"
    command = [sys.executable, "-m", "agrel_sim.cli", "sweep", str(sweep_file), "--executor", executor]
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (folder / "checkpoint.pt").exists():
            if sweep.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run did not finish an epoch: {sweep.stderr.read()}")
            time.sleep(0.05)
        os.kill(sweep.pid, kill)  # the sweep's process alone, as by hand: no handler of its own runs (submitit's jobs are not its children)
        sweep.wait(timeout=30)  # not its output, which its runs' processes hold open as long as they live
        deadline = time.monotonic() + 30
        with open(folder / "run.lock", "w") as lock:
            while True:  # the run's process sees its parent gone, ends, and the system releases its lock
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, "the run is still training"
                    time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)  # the sweep and its run, were they still there
        sweep.wait()
    with h5py.File(folder / "run.h5", "r") as run:
        assert not run.attrs["complete"] and len(run["epochs/epoch"]) >= 1, "its finished epochs are kept"


@pytest.mark.parametrize("to_group", [False, True], ids=["the sweep alone", "a terminal's Ctrl-C"])
def test_ctrl_c_on_a_submitit_local_sweep_cancels_its_jobs(sweep_file, tmp_path, python_sigint, to_group):
    long = experiment("deepagrel").replace("tiny_deepagrel", "tiny_long").replace("max_epochs = 2", "max_epochs = 100000\npatience = 100000")
    (tmp_path / "tiny_long.toml").write_text(long)
    sweep_file.write_text('name = "tiny"\nexperiments = ["tiny_long.toml"]\nseeds = [0, 1]\nout = "runs/tiny"\n')
    folder = tmp_path / "runs" / "tiny" / "tiny_long"
    command = [sys.executable, "-m", "agrel_sim.cli", "sweep", str(sweep_file), "--executor", "submitit-local", "--jobs", "2"]
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not all((folder / f"seed{seed}" / "checkpoint.pt").exists() for seed in (0, 1)):
            if sweep.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the runs did not finish an epoch: {sweep.stderr.read()}")
            time.sleep(0.05)
        # The sweep's process alone (its jobs are its to end), or the whole process group.
        (os.killpg if to_group else os.kill)(sweep.pid, signal.SIGINT)
        out, err = sweep.communicate(timeout=30)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    assert sweep.returncode == 130
    assert err.startswith("agrel-sim: interrupted; every finished epoch is kept") and "Traceback" not in err, err
    assert "KeyboardInterrupt" in (tmp_path / "runs" / "tiny" / "submitit" / "local_controllers.log").read_text(), "where the cancelled controllers said so"
    deadline = time.monotonic() + 30
    for seed in (0, 1):
        with open(folder / f"seed{seed}" / "run.lock", "w") as lock:
            while True:  # the cancelled job's process ends and the system releases its lock
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline, f"seed {seed} is still training"
                    time.sleep(0.1)


class OutOfTimeAfterEpoch(sweep_module.SubmititRun):
    """The job function of a sweep whose job gets submitit's time-out signal (USR2) as soon as
    it has saved the checkpoint of ``epoch``, as from submitit's executor when the job's time is
    up. Each job notes ``<process id> <epoch>`` in the file ``saves`` for each checkpoint it saves.

    The job loads this class from this file (``PYTHONPATH``), and its requeued job, which resumes
    the run after ``epoch``, is never signalled.
    """

    def __init__(self, epoch, saves):
        self.epoch, self.saves = epoch, saves

    def __call__(self, task):
        from submitit import JobEnvironment

        from agrel_sim import training

        save = training.save_checkpoint

        def save_then_time_out(path, state):
            save(path, state)
            with open(self.saves, "a") as saves:
                saves.write(f"{os.getpid()} {state['epoch']}\n")
            if state["epoch"] == self.epoch:
                signal.raise_signal(getattr(signal, f"SIG{JobEnvironment.USR_SIG}"))

        training.save_checkpoint = save_then_time_out  # in the job's own process, which ends with the job
        return super().__call__(task)


def test_a_submitit_job_out_of_time_is_requeued_and_its_run_goes_on_from_its_checkpoint(sweep_file, tmp_path, capsys, monkeypatch):
    """A real submitit-local job, signalled out of time after epoch 2 of 5: the signal stops the
    run after a batch of epoch 3, submitit requeues the job, and the requeued job goes on from
    epoch 2; the run ends as an uninterrupted run does.

    With a time limit under 10 minutes, submitit takes any signal for a time-out (not a
    preemption); the executor's own signal, 30 s before the limit, comes long after the run ended.
    """
    pytest.importorskip("submitit")
    saves = tmp_path / "saves"
    monkeypatch.setattr(sweep_module, "SubmititRun", lambda: OutOfTimeAfterEpoch(2, saves))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setattr(sweep_module, "_usable_cores", lambda: 1)  # the job's threads: cores ÷ jobs
    long = experiment("deepagrel").replace("tiny_deepagrel", "tiny_long").replace("max_epochs = 2", "max_epochs = 5\npatience = 5")
    (tmp_path / "tiny_long.toml").write_text(long)
    sweep_file.write_text('name = "tiny"\nexperiments = ["tiny_long.toml"]\nseeds = [0]\nout = "runs/tiny"\n[slurm]\nlocal_timeout_min = 5\n')
    assert main(["sweep", str(sweep_file), "--executor", "submitit-local"]) == 0
    assert re.search(r"tiny_long seed=0: test_acc=\S+ best_epoch=\d+ epochs=5 ", capsys.readouterr().out)
    log = "".join(path.read_text() for path in sorted((tmp_path / "runs" / "tiny" / "submitit").glob("*/*_0_log.*")))
    assert "this job is timed-out" in log and "Requeued job" in log, log
    jobs = {}
    for line in saves.read_text().splitlines():
        pid, epoch = map(int, line.split())
        jobs.setdefault(pid, []).append(epoch)
    assert list(jobs.values()) == [[1, 2], [3, 4, 5]], "the requeued job went on from the last finished epoch"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job trains: results depend on the thread count
    try:
        reference = run_experiment(load_experiment(tmp_path / "tiny_long.toml"), 0, log=None, progress=False)
    finally:
        torch.set_num_threads(threads)
    with h5py.File(tmp_path / "runs" / "tiny" / "tiny_long" / "seed0" / "run.h5", "r") as run:
        assert run.attrs["complete"] and run["epochs/epoch"][:].tolist() == [1, 2, 3, 4, 5]
        for name in ("reward_probability", "train_loss", "validation_accuracy", "learning_rate"):
            assert run["epochs"][name][:].tolist() == [getattr(metrics, name) for metrics in reference.history], name
        assert run["result"].attrs["test_accuracy"] == reference.test_accuracy


class NotInstalled(sweep_module.SubmititRun):
    """A job function that its job cannot load, as where agrel_sim is not installed."""

    def __reduce__(self):
        return importlib.import_module, ("agrel_sim_not_installed_here",)


class KilledInItsJob(sweep_module.SubmititRun):
    """A job function whose job's process is killed (SIGKILL) as it loads it, as by hand or by the
    system when memory runs out."""

    def __reduce__(self):
        return signal.raise_signal, (signal.SIGKILL,)


@pytest.mark.parametrize("case", ["killed", "not installed"])
def test_a_submitit_job_that_ends_without_its_runs_outcome_fails_in_one_line(sweep_file, tmp_path, capsys, monkeypatch, case):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setattr(submitit.core.core.Job, "_results_timeout_s", 0)  # no waiting for result files that never come
    if case == "killed":
        monkeypatch.setattr(sweep_module, "SubmititRun", KilledInItsJob)
        reason = (
            r"its job ended without a result \(submitit's job state: \w+\): its process was killed \(by hand, by the cluster, or by the "
            r"system when memory ran out\) or crashed, or only submitit's process around it was killed and the run goes on without it; "
            r"the run keeps its finished epochs, and running the sweep again continues it once no process of it is left "
            r"\(its run\.lock stops a second one meanwhile\)"
        )
    else:
        monkeypatch.setattr(sweep_module, "SubmititRun", NotInstalled)
        reason = r"ModuleNotFoundError: No module named 'agrel_sim_not_installed_here'"
    assert main(["sweep", str(sweep_file), "--executor", "submitit-local", "--jobs", "4"]) == 1
    captured = capsys.readouterr()
    log = r"\S*/runs/tiny/submitit/(\d+)/\1_0_log\.err"
    failures = [line for line in captured.out.splitlines() if line.startswith("FAILED")]
    assert len(failures) == 4 and all(re.fullmatch(rf"FAILED \S+\.toml seed=\d: {reason}; its log: {log}", line) for line in failures), captured.out
    assert "Traceback" not in captured.out + captured.err and len(captured.out.splitlines()) == 5, captured.out


class FakeJob:
    """A submitit job that is done at the ``polls``-th look, and whose ``result()`` returns ``outcome``, or raises it."""

    def __init__(self, name, outcome, polls=1):
        self.paths = type("Paths", (), {"stderr": Path(f"/logs/{name}_0_log.err")})()
        self.state = "COMPLETED"
        self.outcome, self.polls = outcome, polls

    def done(self):
        self.polls -= 1
        return self.polls <= 0

    def result(self):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class FakeLocalExecutor:
    """Hands out ``jobs``, in order, as the jobs of the tasks it is given; ``given`` counts the
    tasks of each submission."""

    cluster = "local"

    def __init__(self, jobs):
        self.jobs, self.given = jobs, []

    def map_array(self, function, tasks):
        self.given.append(len(tasks))
        jobs, self.jobs = self.jobs[:len(tasks)], self.jobs[len(tasks):]
        return jobs


def test_a_job_that_cannot_be_started_once_others_run_fails_alone(sweep_file, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setattr(sweep_module, "POLL_S", 0)
    sweep = load_sweep(sweep_file)
    tasks, _ = plan(sweep, "runs")
    long_run = FakeJob("0", (True, "run 0"), polls=5)
    executor = FakeLocalExecutor([long_run, FakeJob("1", (True, "run 1")), FakeJob("3", (True, "run 3"))])
    hand_out = executor.map_array

    def map_array(function, batch):  # the second submission fails, while the long run goes on
        if len(executor.given) == 1:
            executor.given.append(len(batch))
            raise OSError(28, "No space left on device")
        return hand_out(function, batch)

    executor.map_array = map_array
    outcomes = [(task.seed, ok, line) for task, ok, line in sweep_module._run_submitit(executor, tasks, 2, sweep, sweep_file.parent / "controllers.log")]
    assert outcomes[:2] == [(tasks[1].seed, True, "run 1"), (tasks[2].seed, False, "its job could not be started (OSError: [Errno 28] No space left on device); running the sweep again starts it")]
    assert [line for _, _, line in outcomes[2:]] == ["run 3", "run 0"], "the running job goes on, and the next one starts"


def test_a_submitit_job_whose_outcome_cannot_be_read_fails_alone_in_one_line(sweep_file):
    utils = pytest.importorskip("submitit").core.utils
    trace = "Traceback (most recent call last):\n  File ...\nsubmitit.core.utils.UncompletedJobError: Job not requeued because: timed-out too many times.\n"
    jobs = [
        FakeJob("1", AssertionError("You should use `results()` if your job has subtasks.")),
        FakeJob("2", OSError(5, "Input/output error")),
        FakeJob("3", utils.FailedJobError(f"Job (task=0) failed during processing with trace:\n----------------------\n{trace}\n----------------------\nYou can check full logs")),
        FakeJob("4", (True, "tiny_ebp seed=1: test_acc=0.5")),
    ]
    sweep = load_sweep(sweep_file)
    tasks, _ = plan(sweep, "runs")
    outcomes = [(ok, line) for _, ok, line in sweep_module._run_submitit(FakeLocalExecutor(jobs), tasks, 4, sweep, sweep_file.parent / "controllers.log")]
    assert outcomes == [
        (False, "its result could not be read (AssertionError: You should use `results()` if your job has subtasks.); its log: /logs/1_0_log.err"),
        (False, "its result could not be read (OSError: [Errno 5] Input/output error); its log: /logs/2_0_log.err"),
        (False, (
            "out of time 4 times, and submitit requeues a job 3 times at most; the run keeps its finished epochs: raise the time limit "
            "in the [slurm] table (timeout_min, or the local_timeout_min, slurm_timeout_min or slurm_time that stands in for it with this executor), or run the sweep again to continue it; its log: /logs/3_0_log.err"
        )),
        (True, "tiny_ebp seed=1: test_acc=0.5"),
    ]


class Submitit:
    """Stands for submitit's handler of its time-out signal in a job: it requeues the job
    (``SystemExit``), or, with ``refuse``, raises as where the job timed out too often."""

    def __init__(self, refuse=False):
        self.refuse, self.calls = refuse, 0

    def __call__(self, signum, frame):
        from submitit.core.utils import UncompletedJobError

        self.calls += 1
        if self.refuse:
            raise UncompletedJobError("Job not requeued because: timed-out too many times.")
        raise SystemExit(-1)


@pytest.fixture
def in_a_job(sweep_file, tmp_path, monkeypatch):
    """This process as a submitit job that runs seed 0 of tiny_deepagrel: its task, and its
    stand-in for submitit's handler of the time-out signal, installed for the test's duration."""
    pytest.importorskip("submitit")
    for name, value in (("SUBMITIT_EXECUTOR", "local"), ("SUBMITIT_FOLDER", str(tmp_path / "job")), ("SUBMITIT_LOCAL_JOB_ID", "7"), ("SUBMITIT_LOCAL_GLOBALID", "0")):
        monkeypatch.setenv(name, value)
    [task] = [task for task in plan(load_sweep(sweep_file), "runs", threads=torch.get_num_threads())[0] if "deepagrel" in task.experiment_path and task.seed == 0]
    handlers = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGINT)
    yield task
    signal.signal(signal.SIGUSR2, handlers[0])
    signal.signal(signal.SIGINT, handlers[1])


def test_a_submitit_job_signalled_as_its_run_ends_is_requeued_and_then_reports_the_run(in_a_job, monkeypatch):
    submitit = Submitit()
    signal.signal(signal.SIGUSR2, submitit)

    def signalled_as_it_ends(task):
        line = execute(task)
        signal.raise_signal(signal.SIGUSR2)  # its time is up just after the run was marked complete
        return line

    monkeypatch.setattr(sweep_module, "execute", signalled_as_it_ends)
    with pytest.raises(SystemExit):
        sweep_module.SubmititRun()(in_a_job)
    assert submitit.calls == 1 and is_complete(in_a_job.folder)
    monkeypatch.setattr(sweep_module, "execute", execute)  # the requeued job: the run is complete, made with these settings
    ok, line = sweep_module.SubmititRun()(in_a_job)
    with h5py.File(Path(in_a_job.folder) / "run.h5", "r") as run:
        result = dict(run["result"].attrs)
    assert ok and line == f"tiny_deepagrel seed=0: test_acc={result['test_accuracy']:.4f} best_epoch={result['best_epoch']} epochs=2 converged={result['converged']} time={result['seconds']:.1f}s", line


def test_once_a_submitit_job_has_run_its_signal_is_submitits_again(in_a_job):
    submitit = Submitit()
    signal.signal(signal.SIGUSR2, submitit)
    interrupt = signal.getsignal(signal.SIGINT)
    ok, line = sweep_module.SubmititRun()(in_a_job)
    assert ok and line.startswith("tiny_deepagrel seed=0: test_acc="), line
    assert signal.getsignal(signal.SIGUSR2) is submitit and signal.getsignal(signal.SIGINT) is interrupt
    with pytest.raises(SystemExit):  # as submitit stores the result: submitit requeues the job
        signal.raise_signal(signal.SIGUSR2)
    assert submitit.calls == 1


def test_a_submitit_job_out_of_time_too_often_fails_in_one_line(in_a_job, tmp_path, monkeypatch):
    signal.signal(signal.SIGUSR2, Submitit(refuse=True))

    def signalled(task):
        signal.raise_signal(signal.SIGUSR2)
        return execute(task)

    monkeypatch.setattr(sweep_module, "execute", signalled)
    assert sweep_module.SubmititRun()(in_a_job) == (False, (
        "out of time 4 times, and submitit requeues a job 3 times at most; the run keeps its finished epochs: raise the time limit "
        "in the [slurm] table (timeout_min, or the local_timeout_min, slurm_timeout_min or slurm_time that stands in for it with this executor), "
        f"or run the sweep again to continue it; its log: {tmp_path / 'job' / '7_0_log.err'}"
    ))


def test_submitit_local_jobs_get_a_week_unless_the_slurm_table_says_otherwise(sweep_file, tmp_path):
    pytest.importorskip("submitit")
    sweep = load_sweep(sweep_file)
    runner = sweep_module._submitit_executor("submitit-local", tmp_path, sweep)
    assert runner._executor.parameters["timeout_min"] == 7 * 24 * 60  # submitit's own default is 2 minutes
    sweep = sweep_module.Sweep(sweep.name, sweep.experiments, sweep.seeds, sweep.out, {"timeout_min": 30}, sweep.source)
    assert sweep_module._submitit_executor("submitit-local", tmp_path, sweep)._executor.parameters["timeout_min"] == 30


def crashing_execute(task):
    """:func:`execute`, but seed 1 of tiny_ebp kills its own process, seed 0 of tiny_ebp ends its
    process with status 0 and no result, and seed 0 of tiny_deepagrel waits for seed 1 of
    tiny_deepagrel to finish first."""
    folder = Path(task.folder)
    if folder.parent.name == "tiny_ebp" and task.seed == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if folder.parent.name == "tiny_ebp" and task.seed == 0:
        os._exit(0)
    if folder.parent.name == "tiny_deepagrel" and task.seed == 0:
        deadline = time.monotonic() + 60
        while not is_complete(folder.parent / "seed1") and time.monotonic() < deadline:
            time.sleep(0.05)
    return execute(task)


def test_a_killed_run_fails_alone_and_each_outcome_is_logged_as_its_run_ends(sweep_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep_module, "execute", crashing_execute)  # what each run's process runs
    assert main(["sweep", str(sweep_file), "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"FAILED \S*tiny_ebp\.toml seed=1: its process was killed by signal SIGKILL", out), out
    assert re.search(r"FAILED \S*tiny_ebp\.toml seed=0: its process exited with status 0 without a result", out), out
    assert out.count("FAILED") == 2, out
    assert out.index("tiny_deepagrel seed=1:") < out.index("tiny_deepagrel seed=0:"), out
    assert run_files(tmp_path / "runs" / "tiny") == ["tiny_deepagrel/seed0/run.h5", "tiny_deepagrel/seed1/run.h5"]


def test_a_sweep_refuses_two_entries_that_would_run_in_one_folder(sweep_file, tmp_path, capsys):
    (tmp_path / "copy.toml").write_text(experiment("deepagrel"))  # another file of the same name
    entry = r"experiments\[{}\] \(\S*{}\.toml\) seed 1"
    for experiments, first, second in (
        (["tiny_deepagrel.toml", "tiny_deepagrel.toml"], entry.format(0, "tiny_deepagrel"), entry.format(1, "tiny_deepagrel")),
        (["tiny_deepagrel.toml", "tiny_ebp.toml", "copy.toml"], entry.format(0, "tiny_deepagrel"), entry.format(2, "copy")),
    ):
        sweep_file.write_text(f"experiments = {json.dumps(experiments)}\nseeds = [1]\n")
        assert main(["sweep", str(sweep_file)]) == 2
        error = capsys.readouterr().err
        assert re.search(rf"sweep\.toml: {first} and {second} would both run in runs/sweep/tiny_deepagrel/seed1; list each experiment and seed once", error), error
    assert not (tmp_path / "runs").exists()


def test_a_bad_slurm_table_or_a_refused_submission_stops_the_sweep_before_any_run(sweep_file, tmp_path, capsys, monkeypatch):
    submitit = pytest.importorskip("submitit")
    text = sweep_file.read_text()
    for table, error in (
        ("cpus_per_tsk = 8", r"slurm\.cpus_per_tsk: submitit refuses it \(Unknown executor 'cpus' in parameter 'cpus_per_tsk'\.\)"),
        ("slurm_partitoin = 'gpu'", r"slurm\.slurm_partitoin: submitit refuses it \(Unknown argument 'partitoin' for executor 'slurm'"),
        ("tasks_per_node = 2", r"slurm: 2 tasks per job \(nodes × tasks_per_node\), but each run is one process; remove nodes and tasks_per_node"),
        # values that submitit takes unchecked, and fails on as a job starts or runs
        *((f"{key} = {value}", rf"slurm\.{key}: expected a whole number of minutes, longer than the 30 s before its end at which submitit signals the job to requeue it, got {value}")
          for key in ("timeout_min", "slurm_timeout_min") for value in ("-5", "0", "'1h'")),
        *((f"local_timeout_min = {value}", rf"slurm\.local_timeout_min: expected a number of minutes of at least 31 s \(submitit-local signals a job 30 s before its time limit, to requeue it\), got {shown}")
          for value, shown in (("'abc'", "'abc'"), ("-1", "-1.0"), ("0.3", "0.3"), ("0.5", "0.5"))),
        ("local_setup = 5", r"slurm\.local_setup: expected a list of shell commands \(strings\) run before each job, got 5"),
        ("slurm_setup = [1]", r"slurm\.slurm_setup: expected a list of shell commands \(strings\) run before each job, got \[1\]"),
        ("cpus_per_task = 0", r"slurm\.cpus_per_task: expected an integer >= 1, got 0"),
        ("slurm_array_parallelism = 0", r"slurm\.slurm_array_parallelism: expected an integer >= 1, got 0"),
        ("array_parallelism = -3", r"slurm\.array_parallelism: expected an integer >= 1, got -3"),
        ("mem_gb = -1", r"slurm\.mem_gb: expected a number of GB > 0, got -1\.0"),
        ("mem_gb = inf", r"slurm\.mem_gb: expected a number of GB > 0, got inf"),  # above 0, but no number of GB
        ("local_timeout_min = nan", r"slurm\.local_timeout_min: expected a number of minutes of at least 31 s .*, got nan"),
        ("slurm_mem_gb = 0", r"slurm\.slurm_mem_gb: expected a number of GB > 0, got 0\.0"),
        ("gpus_per_node = -1", r"slurm\.gpus_per_node: expected a number of GPUs >= 0, got -1"),
        ("gpus_per_node = true", r"slurm\.gpus_per_node: expected a number of GPUs >= 0, got True"),
    ):
        sweep_file.write_text(f"{text}[slurm]\n{table}\n")
        assert main(["sweep", str(sweep_file), "--executor", "submitit-local"]) == 2
        err = capsys.readouterr().err
        assert re.fullmatch(rf"agrel-sim: error: \S*sweep\.toml: {error}.*\n", err, re.DOTALL) and "Traceback" not in err, err
        assert not (tmp_path / "runs").exists(), "a refused table leaves no folder"
    sweep_file.write_text(f"{text}[slurm]\nlocal_timeout_min = 0.52\n")  # 31 s
    sweep_module.check_slurm_table(load_sweep(sweep_file), "submitit-local")
    # A value that submitit takes unchecked, and fails on as it starts the first job: nothing has run.
    sweep_file.write_text(f"{text}[slurm]\nlocal_gpus_per_node = 'x'\n")
    assert main(["sweep", str(sweep_file), "--executor", "submitit-local"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"sweep\.toml: submitting 1 run\(s\) failed: 'str' object cannot be interpreted as an integer; check the \[slurm\] table", err) and "Traceback" not in err, err

    def refused(self, function, tasks):
        raise submitit.core.utils.FailedJobError("sbatch: error: invalid partition specified: gpu")

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", refused)
    sweep_file.write_text(f"{text}[slurm]\nslurm_partition = 'gpu'\n")
    assert main(["sweep", str(sweep_file), "--executor", "submitit-local"]) == 2
    assert re.search(r"sweep\.toml: submitting 1 run\(s\) failed: sbatch: error: invalid partition specified: gpu; check the \[slurm\] table", capsys.readouterr().err)
    assert run_files(tmp_path) == []


def with_slurm_table(sweep_file, table):
    """The sweep of ``sweep_file`` with ``table`` as its ``[slurm]`` table."""
    sweep_file.write_text(f"{sweep_file.read_text().split('[slurm]')[0]}[slurm]\n{table}\n")
    return load_sweep(sweep_file)


def test_a_slurm_sweep_needs_a_time_limit(sweep_file):
    """submitit would ask SLURM for 5 minutes, and a run would fail after 4 × 5 minutes."""
    pytest.importorskip("submitit")
    with pytest.raises(ValueError, match=r"sweep\.toml: slurm\.timeout_min: missing; SLURM jobs need a time limit: give one in the \[slurm\] table, as a whole number of minutes"):
        run_sweep(load_sweep(sweep_file), executor="slurm")
    for limit in ("timeout_min", "slurm_timeout_min", "slurm_time"):  # any of them; local runs need none
        sweep_module.check_slurm_table(with_slurm_table(sweep_file, f"{limit} = 60"), "slurm")
    sweep_module.check_slurm_table(sweep_module.Sweep("s", (), (0,), "runs"), "submitit-local")


def test_a_slurm_sweep_checks_its_cores_per_run_before_it_reads_them(sweep_file):
    pytest.importorskip("submitit")
    for value, shown in (("[2]", r"\[2\]"), ("'abc'", "'abc'"), ("{ n = 2 }", r"\{'n': 2\}")):
        for key in ("cpus_per_task", "slurm_cpus_per_task"):
            with pytest.raises(ValueError, match=rf"sweep\.toml: slurm\.{key}: expected an integer >= 1, got {shown}$"):
                run_sweep(with_slurm_table(sweep_file, f"timeout_min = 60\n{key} = {value}"), executor="slurm")


def test_a_time_limit_must_outlast_submitits_signal_to_requeue(sweep_file):
    def check(table, executor):
        sweep_module.check_slurm_table(with_slurm_table(sweep_file, table), executor)

    check("timeout_min = 1", "submitit-local")  # signalled 30 s before its end
    with pytest.raises(ValueError, match=r"slurm\.timeout_min: expected a whole number of minutes, longer than the 90 s before its end at which submitit signals the job to requeue it, got 1"):
        check("timeout_min = 1", "slurm")
    check("timeout_min = 1\nslurm_signal_delay_s = 30", "slurm")
    with pytest.raises(ValueError, match=r"slurm\.timeout_min: expected a whole number of minutes, longer than the 300 s before its end"):
        check("timeout_min = 5\nslurm_signal_delay_s = 300", "slurm")  # signalled as it starts
    with pytest.raises(ValueError, match=r"slurm\.slurm_signal_delay_s: expected an integer >= 1, got 0"):
        check("timeout_min = 4\nslurm_signal_delay_s = 0", "slurm")
    # Signalled before min(0.8 T, T - 600 s), a job counts as preempted, and is requeued without end.
    check("timeout_min = 60\nslurm_signal_delay_s = 660", "slurm")
    with pytest.raises(ValueError, match=r"slurm\.slurm_signal_delay_s: 661 s before the end of timeout_min = 60 is too early: .* requeue it without end; give at most 660$"):
        check("timeout_min = 60\nslurm_signal_delay_s = 661", "slurm")
    with pytest.raises(ValueError, match=r"slurm\.slurm_signal_delay_s: 541 s before the end of slurm_time = 20 is too early: .*; give at most 540$"):
        check("slurm_time = 20\nslurm_signal_delay_s = 541", "slurm")


@pytest.mark.parametrize("table, device, error", [
    ("", "cpu", None),
    ("", "cuda", r"slurm\.gpus_per_node: missing; --device cuda needs a GPU in every job: give gpus_per_node = 1 in the \[slurm\] table$"),
    ("gpus_per_node = 0", "cuda", r"slurm\.gpus_per_node: missing"),
    ("gpus_per_node = 1", "cuda", None),
    ("slurm_gres = 'gpu:a100:1'", "cuda:0", None),
    ("gpus_per_node = 2", "cuda:1", None),
    ("gpus_per_node = 1", "cuda:1", r"slurm\.gpus_per_node: 1 GPU\(s\) per job, which a job sees as cuda:0 to cuda:0, but --device cuda:1; use --device cuda, or more GPUs per job$"),
])
def test_runs_on_a_cuda_device_need_gpus_in_their_jobs(sweep_file, table, device, error):
    """submitit shows a job only its own GPUs (none without gpus_per_node), as cuda:0 up."""
    sweep = with_slurm_table(sweep_file, f"timeout_min = 60\n{table}")
    for executor in ("slurm", "submitit-local"):
        with contextlib.nullcontext() if error is None else pytest.raises(ValueError, match=error):
            sweep_module.check_slurm_table(sweep, executor, device)


def test_a_sweep_for_slurm_checks_the_form_of_its_device(sweep_file):
    with pytest.raises(ValueError, match=r"device: expected 'cpu', 'cuda' or 'cuda:N', got 'cdua'"):
        run_sweep(load_sweep(sweep_file), executor="slurm", device="cdua")


@pytest.mark.skipif(shutil.which("srun") is not None, reason="this machine is a SLURM node")
def test_the_slurm_executor_off_a_cluster(sweep_file, tmp_path):
    sweep_file.write_text(sweep_file.read_text() + "[slurm]\ntimeout_min = 60\n")
    with pytest.raises(ValueError, match=r"executor slurm: Could not detect \"srun\".*; submit the sweep from a machine of the cluster"):
        run_sweep(load_sweep(sweep_file), executor="slurm")
    assert run_files(tmp_path) == []


def test_a_submitit_sweep_without_submitit_says_how_to_install_it(sweep_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed: importing it raises ImportError
    assert main(["sweep", str(sweep_file), "--executor", "submitit-local"]) == 2
    assert "executor: submitit is not installed; install it with `pip install -e \".[slurm]\"` in the agrel-sim checkout, or `pip install submitit`" in capsys.readouterr().err
    assert run_files(tmp_path) == []


@pytest.mark.parametrize("executor", ["local", "submitit-local"])
def test_a_sweep_into_a_file_stops_before_any_run(sweep_file, tmp_path, capsys, executor):
    (tmp_path / "afile").write_text("kept")
    for out in ("afile", "afile/sub"):
        assert main(["sweep", str(sweep_file), "--out", out, "--executor", executor]) == 2
        err = capsys.readouterr().err
        assert err == f"agrel-sim: error: {out}: cannot hold the sweep's runs, as afile is not a folder; choose another --out (or out in the sweep file)\n", err
    assert (tmp_path / "afile").read_text() == "kept" and run_files(tmp_path) == []
    (tmp_path / "link").symlink_to("gone")
    assert main(["sweep", str(sweep_file), "--out", "link/sweep", "--executor", executor]) == 2
    assert capsys.readouterr().err == "agrel-sim: error: link/sweep: cannot hold the sweep's runs, as link is a link to gone, which does not exist; choose another --out (or out in the sweep file)\n"
    assert not (tmp_path / "gone").exists()


def test_a_sweep_into_a_folder_that_cannot_be_made_stops_before_any_run(sweep_file, tmp_path, capsys, monkeypatch):
    made = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        made(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(["sweep", str(sweep_file), "--out", "new/locked/runs"]) == 2
    assert capsys.readouterr().err == "agrel-sim: error: new/locked/runs: cannot make the folder of the sweep's runs (Permission denied); choose another --out (or out in the sweep file)\n"
    assert not (tmp_path / "new").exists(), "the folders made to find out are gone"


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


def test_every_experiment_is_written_back_as_an_equal_one_that_trains(tmp_path, capsys):
    import dataclasses

    import brian2

    from agrel_sim import ConfigError, Experiment, LogSettings, default_experiment

    folder = Path(__file__).resolve().parent.parent / "experiments"
    logged = dataclasses.replace(default_experiment(), name="logged", logging=LogSettings(every_batches=3, trials_per_batch=2, max_units=7, summary_trials=5))
    for experiment in [default_experiment(), logged, *(load_experiment(p) for p in sorted(folder.glob("*.toml")) if p.stem != "table1")]:
        written = experiment.to_toml(tmp_path / f"{experiment.name}.toml")
        assert Experiment.from_toml(written) == dataclasses.replace(experiment, source=str(written)), experiment.name
    results = []
    for given in (str(tmp_path / "digits_deepagrel.toml"), None):  # the written default, then the embedded one
        assert main(["train", *([given] if given else []), "--max-epochs", "1", "--out", str(tmp_path / f"run_{given is None}"), "--quiet"]) == 0
        results.append(re.search(r"summary: experiment=digits_deepagrel .*(test_acc=\S+ best_epoch=\S+ epochs=\S+)", capsys.readouterr().out).group(1))
    assert results[0] == results[1], "the same run"
    brian = load_experiment("digits_brian2")
    in_quantities = dataclasses.replace(brian, backend_options={**brian.backend_options, "dt": 0.5 * brian2.ms})
    with pytest.raises(ConfigError, match=r"b\.toml: backend_options\.dt: 0\.5 \* msecond \(Quantity\) cannot be written to a TOML file.*a Brian2 duration as a number of milliseconds"):
        in_quantities.to_toml(tmp_path / "b.toml")
    assert not (tmp_path / "b.toml").exists()


def test_train_refuses_a_sweep_file(capsys):
    assert main(["train", "table1"]) == 2
    assert "a sweep file (it lists experiments): run it with `agrel-sim sweep`" in capsys.readouterr().err


def test_paths_in_sweep_and_experiment_files_may_begin_with_the_home_folder(sweep_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "models").mkdir(parents=True)
    (tmp_path / "home" / "models" / "tiny.toml").write_text(MODEL)
    (tmp_path / "home" / "e.toml").write_text(experiment("ebp").replace('"tiny.toml"', '"~/models/tiny.toml"').replace("max_epochs = 2", "max_epochs = 1"))
    sweep_file.write_text('name = "tiny"\nexperiments = ["~/e.toml"]\nseeds = [0]\nout = "~/runs"\n')
    assert main(["sweep", str(sweep_file)]) == 0
    assert run_files(tmp_path / "home" / "runs") == ["tiny_ebp/seed0/run.h5"] and not (tmp_path / "~").exists()


def test_a_file_of_one_kind_with_a_stray_key_of_another_is_told_of_the_key(tmp_path, capsys):
    (tmp_path / "e.toml").write_text('model = "mnist_fc3"\ndataset = "mnist"\nexperiments = ["x"]\n')
    assert main(["train", str(tmp_path / "e.toml")]) == 2
    assert re.search(r"e\.toml: experiments: unknown field; the fields here are: ", capsys.readouterr().err)


def test_bad_sweep_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "sweep.toml"
    path.write_text('experiments = ["no_such_experiment"]\nseeds = [0]\n')
    assert main(["sweep", str(path)]) == 2
    assert re.search(r"sweep\.toml: experiments\[0\]: experiment 'no_such_experiment' not found", capsys.readouterr().err)
    # A path is relative to the sweep file's folder, never to the working directory.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "e1.toml").write_text('model = "mnist_fc3"\ndataset = "mnist"\n')
    path.write_text('experiments = ["e1.toml"]\nseeds = [0]\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["sweep", str(path)]) == 2
    assert re.search(r"sweep\.toml: experiments\[0\]: .*e1\.toml: experiment file not found", capsys.readouterr().err)
    path.write_text('experiments = ["mnist_conv3_deepagrel"]\nseeds = [0]\nout = " "\n')
    assert main(["sweep", str(path)]) == 2
    assert "sweep.toml: out: expected a folder for the runs, got ' '" in capsys.readouterr().err
    for seeds in ("[true]", "[3, 3]", "[4294967296]"):
        path.write_text(f'experiments = ["mnist_conv3_deepagrel"]\nseeds = {seeds}\n')
        assert main(["sweep", str(path)]) == 2
        assert f"sweep.toml: seeds: expected a non-empty list of distinct whole-number seeds from 0 to 4294967295, got {seeds.replace('true', 'True')}" in capsys.readouterr().err
    for name in ("..", "a/b", "/tmp/elsewhere", " ", "a\tb"):  # the default out is runs/<name>
        path.write_text(f'name = "{name}"\nexperiments = ["mnist_conv3_deepagrel"]\nseeds = [0]\n')
        assert main(["sweep", str(path)]) == 2
        assert f"sweep.toml: name: expected a non-empty name without '/' or control characters (it names the sweep's folder runs/<name>), got {name!r}" in capsys.readouterr().err
    # A model that does not fit its data set stops the sweep before any data is read.
    (tmp_path / "elsewhere" / "e1.toml").write_text('model = "cifar10_conv3"\ndataset = "cifar100"\n')
    path.write_text('experiments = ["elsewhere/e1.toml"]\nseeds = [0]\n')
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs")]) == 2
    assert re.search(r"elsewhere/e1\.toml: model: 'cifar10_conv3' has 10 actions, data set 'cifar100' has 100 classes", capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()
    # An entry with folders but without .toml is not looked up as a name below the search folders.
    path.write_text('experiments = ["../experiments/mnist_conv3_deepagrel"]\nseeds = [0]\n')
    assert main(["sweep", str(path)]) == 2
    assert ("sweep.toml: experiments[0]: ../experiments/mnist_conv3_deepagrel: a path without .toml, not a name (names have no folders); "
            "give the experiment file's path with its .toml suffix, or its name alone") in capsys.readouterr().err
    # A sweep (this one, say) or a model listed as an experiment.
    for entry, kind in (("sweep.toml", "a sweep file (it lists experiments)"), ("elsewhere/net.toml", "a model file (it lists layers)")):
        (tmp_path / "elsewhere" / "net.toml").write_text(MODEL)
        path.write_text(f'experiments = ["{entry}"]\nseeds = [0]\n')
        assert main(["sweep", str(path)]) == 2
        assert re.search(rf"sweep\.toml: experiments\[0\]: \S*{entry} is {re.escape(kind)}, not an experiment file; list experiment files, each naming a model and a data set", capsys.readouterr().err)


def test_a_sweep_checks_its_jobs_and_device_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="jobs: expected a whole number of runs at once, at least 1, got 0"):
        run_sweep(load_sweep("table1"), tmp_path, jobs=0)
    with pytest.raises(ValueError, match="jobs: expected a whole number of runs at once, at least 1, got True"):
        run_sweep(load_sweep("table1"), tmp_path, jobs=True)
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        run_sweep(load_sweep("table1"), tmp_path, device="gpu")
    assert not any(tmp_path.iterdir())


def record(dataset, network, rule, accuracy, epochs, converged=True, augmentation=None, diverged=False, seed=0):
    return {
        "dataset": dataset, "model": {"name": network, "rule": {"name": rule}}, "seed": seed,
        "training": {"augmentation": {"factor": augmentation} if augmentation else None},
        "result": {"test_accuracy": accuracy, "epochs": epochs, "converged": converged, "diverged": diverged},
    }


def test_table1_statistics(tmp_path):
    records = [
        record("mnist", "mnist_conv3", "deepagrel", 0.99, 60), record("mnist", "mnist_conv3", "deepagrel", 0.98, 80, converged=False, seed=1),
        record("mnist", "mnist_conv3", "ebp", 0.992, 35), record("mnist", "mnist_conv3", "ebp", 0.99, 45, seed=1),
        record("mnist", "mnist_conv3", "ebp", 0.1, 3, converged=False, diverged=True, seed=2),
        record("cifar10", "cifar10_conv3", "ebp", 0.7, 50, augmentation=10),
        record("cifar10", "cifar10_conv3", "ebp", 0.65, 40, augmentation=2),
    ]
    rows = table1(records)
    assert [(r["dataset"], r["augmentation"]) for r in rows] == [("cifar10", "2x"), ("cifar10", "10x"), ("mnist", "none")]
    mnist = rows[2]
    assert mnist["deepagrel_acc_mean"] == pytest.approx(98.5) and mnist["deepagrel_acc_std"] == pytest.approx(0.7071, abs=1e-4)
    assert mnist["epoch_ratio"] == pytest.approx(70 / 40) and mnist["deepagrel_converged"] == "1/2"
    text = markdown(rows)
    # The diverged EBP run counts as not converged; its accuracy and epochs stay out of the means.
    # The DeepAGREL run that reached max_epochs first stays in: its mean epochs, and with them the
    # ratio, are lower bounds.
    assert "| mnist | mnist_conv3 | none | 98.50 ± 0.71 | 99.10 ± 0.14 | ≥ 70.0 | 40.0 | ≥ 1.75 | 1/2, 2/3 |" in text
    assert (mnist["deepagrel_runs"], mnist["deepagrel_capped"], mnist["ebp_runs"], mnist["ebp_capped"]) == (2, 1, 2, 0)
    capped_ebp = table1([record("mnist", "m", "deepagrel", 0.9, 60), record("mnist", "m", "ebp", 0.9, 30, converged=False)])
    assert "| 60.0 | ≥ 30.0 | ≤ 2.00 |" in markdown(capped_ebp)
    # One run has no spread: its accuracy stands alone, and the CSV leaves the deviation empty.
    assert "| cifar10 | cifar10_conv3 | 10x | – | 70.00 | – | 50.0 | – | 0/0, 1/1 |" in text
    write_csv(rows, tmp_path / "table1.csv")
    with open(tmp_path / "table1.csv", newline="") as handle:
        cifar = list(csv.DictReader(handle))[1]
    assert (cifar["ebp_acc_mean"], cifar["ebp_acc_std"]) == ("70.0", "")


def test_the_table_names_the_seeds_of_each_rule_and_notes_a_row_whose_rules_ran_different_ones(tmp_path):
    records = [
        *(record("digits", "tiny", "deepagrel", 0.9, 10, seed=seed) for seed in (1, 0)),
        *(record("digits", "tiny", "ebp", 0.9, 10, seed=seed) for seed in (5, 6)),
        *(record("mnist", "m", rule, 0.9, 10, seed=seed) for rule in ("deepagrel", "ebp") for seed in (0, 1)),
        record("cifar10", "c", "ebp", 0.5, 10, seed=3),  # one rule only: nothing is compared
    ]
    rows = table1(records)
    assert [(r["dataset"], r["deepagrel_seeds"], r["ebp_seeds"]) for r in rows] == [("cifar10", "", "3"), ("digits", "0 1", "5 6"), ("mnist", "0 1", "0 1")]
    notes = [line for line in markdown(rows).splitlines() if line.startswith("Note")]
    assert notes == [
        "Note: the rules of the row digits, tiny, augmentation none ran different seeds (DeepAGREL 0 1; EBP 5 6), "
        "so it compares them over different initial weights, validation splits and trials."
    ]
    write_csv(rows, tmp_path / "table1.csv")
    with open(tmp_path / "table1.csv", newline="") as handle:
        digits = list(csv.DictReader(handle))[1]
    assert (digits["deepagrel_seeds"], digits["ebp_seeds"]) == ("0 1", "5 6")


def test_table_never_writes_its_csv_over_a_runs_files(sweep_file, tmp_path, capsys):
    assert main(["train", "tiny_ebp.toml", "--quiet", "--out", "runs/ebp"]) == 0
    folder = tmp_path / "runs" / "ebp"
    shutil.copy(folder / "run.h5", tmp_path / "copy.csv")
    kept = {path: path.read_bytes() for path in (folder / "run.h5", folder / "checkpoint.pt", tmp_path / "copy.csv", sweep_file)}
    for path in (*kept, tmp_path / "elsewhere" / "run.h5"):
        capsys.readouterr()
        assert main(["table", "runs", "--csv", str(path)]) == 2
        why = "an HDF5 file (a run file?), which the CSV would overwrite; give another path" if path.suffix == ".csv" else (
            "its name does not end in .csv, and the CSV would overwrite whatever is there (a run's files, an experiment); give a path ending in .csv"
        )
        assert capsys.readouterr() == ("", f"agrel-sim: error: {path}: not a path for the CSV: {why} with --csv\n"), "the error is the only output"
    assert {path: path.read_bytes() for path in kept} == kept
    (tmp_path / "link.csv").symlink_to(folder / "checkpoint.pt")  # a link is replaced by the CSV, never written through
    assert main(["table", "runs", "--csv", "link.csv"]) == 0
    assert not (tmp_path / "link.csv").is_symlink() and (tmp_path / "link.csv").read_text().startswith("dataset,")
    assert {path: path.read_bytes() for path in kept} == kept and not list(tmp_path.glob("*.partial"))


EBP_EXPERIMENT = """
name = "digits_ebp"
dataset = "digits"
[model]
name = "digits_dense"
input_shape = [1, 8, 8]
layers = [{kind = "dense", units = 128}, {kind = "dense", units = 64}]
output = {actions = 10}
rule = {name = "ebp", learning_rate = 0.1, init_range = 0.1}
[action_selection]
epsilon = 0.3
[training]
batch_size = 10
max_epochs = 2
patience = 30
validation_size = 200
"""


def test_the_two_rules_of_a_row_must_share_the_protocol(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--max-epochs", "2", "--quiet", "--out", "runs/deepagrel"]) == 0  # the embedded default
    (tmp_path / "ebp.toml").write_text(EBP_EXPERIMENT)
    assert main(["train", "ebp.toml", "--quiet", "--out", "runs/ebp"]) == 0
    capsys.readouterr()
    assert main(["table", "runs"]) == 0, "the rule, its learning rate and its action selection may differ"
    out = capsys.readouterr().out
    # Both rules' runs reached max_epochs = 2 before the stopping criterion: lower bounds, no ratio bound.
    assert re.search(r"\| digits \| digits_dense \| none \| \d+\.\d\d \| \d+\.\d\d \| ≥ 2\.0 \| ≥ 2\.0 \| 1\.00\? \| 0/1, 0/1 \|", out), out
    assert "2 run(s) reached max_epochs before the stopping criterion" in out
    (tmp_path / "ebp.toml").write_text(EBP_EXPERIMENT.replace("patience = 30", "patience = 5"))
    assert main(["train", "ebp.toml", "--quiet", "--out", "runs/ebp_other"]) == 0
    shutil.rmtree(tmp_path / "runs" / "ebp")
    capsys.readouterr()
    assert main(["table", "runs"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"the deepagrel and ebp runs of the Table 1 row digits, digits_dense, no augmentation were made under different protocols \(training\.patience: 30 and 5\)", err), err


def test_table_of_an_empty_folder(tmp_path, capsys):
    assert main(["table", str(tmp_path)]) == 2
    assert "no run files (run.h5) in this folder or below it" in capsys.readouterr().err
    (tmp_path / "run.h5").write_text("{broken")
    assert main(["table", str(tmp_path)]) == 2
    assert "run.h5: not an HDF5 file, so not a run file of agrel-sim (an empty or damaged one, or another file of that name); move it out of the folder to analyse the others" in capsys.readouterr().err


def test_a_row_never_mixes_runs_on_two_copies_of_the_data(tmp_path, monkeypatch, capsys):
    from test_datasets import write_mnist

    monkeypatch.chdir(tmp_path)
    write_mnist(tmp_path / "copy1", n_train=40)
    write_mnist(tmp_path / "copy2", n_train=50)
    (tmp_path / "small.toml").write_text(
        'name = "small"\ndataset = "mnist"\nmodel = "mnist_fc3"\n[rule]\nname = "ebp"\nlearning_rate = 0.1\n'
        "[training]\nbatch_size = 20\nmax_epochs = 1\nvalidation_size = 10\n"
    )
    for seed, copy in ((0, "copy1"), (1, "copy1"), (2, "copy2")):
        assert main(["train", "small.toml", "--seed", str(seed), "--data-dir", copy, "--quiet", "--out", f"runs/seed{seed}"]) == 0
    with h5py.File(tmp_path / "runs" / "seed0" / "run.h5", "a") as run:  # as a run file written before data was recorded
        config = json.loads(run.attrs["config"])
        del config["data"]
        run.attrs["config"] = json.dumps(config)
    capsys.readouterr()
    assert main(["table", "runs"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"seed1/run\.h5 and .*seed2/run\.h5: runs of the Table 1 row mnist, mnist_fc3, no augmentation, ebp made with different settings \(data\.sha256: .*data\.train: 40 and 50\)", err), err


# A linear net at a learning rate that makes it diverge in its first epochs.
HOT = (
    'name = "hot"\ndataset = "digits"\n[model]\nname = "linear"\ninput_shape = [1, 8, 8]\nlayers = []\noutput = {actions = 10}\n'
    'rule = {name = "deepagrel", learning_rate = 1000.0, init_range = 0.1}\n'
    "[training]\nbatch_size = 50\nmax_epochs = 30\npatience = 4\nvalidation_size = 300\n"
)


def test_the_table_lists_diverged_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hot.toml").write_text(HOT)
    assert main(["train", "hot.toml", "--quiet", "--out", "runs/hot"]) == 0
    assert "diverged=True" in capsys.readouterr().out
    assert main(["table", "runs"]) == 0
    out = capsys.readouterr().out
    assert "| digits | linear | none | – | – | – | – | – | 0/1, 0/0 |" in out
    assert "1 diverged run(s), counted as not converged and left out of the accuracies and epochs (a lower learning rate may help): runs/hot/run.h5" in out
    assert "reached max_epochs" not in out, "a diverged run is not listed as capped"


def test_a_sweep_job_that_finds_its_diverged_run_finished_reports_it_diverged(tmp_path, monkeypatch, capsys):
    # A job requeued as its run ended finds the run complete and reports the line it finished with.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hot.toml").write_text(HOT)
    assert main(["train", "hot.toml", "--quiet", "--out", "runs/hot"]) == 0
    assert "converged=False diverged=True" in capsys.readouterr().out
    line = execute(RunTask(str(tmp_path / "hot.toml"), 0, str(tmp_path / "runs" / "hot"), "cpu", None, 1))
    assert line.startswith("hot seed=0: test_acc=") and "converged=False diverged=True time=" in line, line


def test_local_runs_share_only_the_cores_this_process_may_use_and_slurm_runs_those_of_their_job(sweep_file, monkeypatch):
    planned = []
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})  # as under taskset -c 0-3
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(sweep_module, "plan", lambda sweep, out, device, data_dir, threads: planned.append(threads) or ([], []))
    run_sweep(load_sweep(sweep_file), jobs=2, log=lambda line: None)
    run_sweep(load_sweep(sweep_file), jobs=8, log=lambda line: None)
    assert planned == [2, 1]
    # submitit lets slurm_<key> win over <key>.
    for table in ("cpus_per_task = 2\nslurm_cpus_per_task = 6", "cpus_per_task = 3"):
        run_sweep(with_slurm_table(sweep_file, f"timeout_min = 60\n{table}"), executor="slurm", log=lambda line: None)
    assert planned == [2, 1, 6, 3]


class FakeSlurmExecutor:
    """Records the parameters a SLURM submission would get; runs nothing."""

    cluster = "slurm"

    def __init__(self):
        self.parameters = {}

    def update_parameters(self, **parameters):
        self.parameters.update(parameters)

    def map_array(self, function, tasks):
        return []


@pytest.mark.parametrize("jobs, table, expected", [
    (None, {}, 4),  # every run at once: SLURM schedules them
    (3, {}, 3),
    (None, {"slurm_array_parallelism": 2}, None),  # the table's own, set with the other parameters
    (None, {"array_parallelism": 2}, None),  # submitit's older name for it
])
def test_slurm_array_parallelism(sweep_file, monkeypatch, jobs, table, expected):
    monkeypatch.setattr(sweep_module, "POLL_S", 0)
    executor = FakeSlurmExecutor()
    sweep = load_sweep(sweep_file)
    sweep = sweep_module.Sweep(sweep.name, sweep.experiments, sweep.seeds, sweep.out, table, sweep.source)
    tasks, _ = plan(sweep, "runs")
    assert len(tasks) == 4
    assert list(sweep_module._run_submitit(executor, tasks, jobs, sweep, sweep_file.parent / "controllers.log")) == []
    assert executor.parameters.get("slurm_array_parallelism") == expected


def test_table1_averages_are_means_with_the_sample_standard_deviation(tmp_path):
    # Three skewed runs per rule tell a mean from a median (two runs cannot).
    records = [
        *(record("mnist", "m", "deepagrel", accuracy, epochs, seed=seed) for seed, (accuracy, epochs) in enumerate([(0.90, 10), (0.91, 20), (0.98, 60)])),
        *(record("mnist", "m", "ebp", accuracy, epochs, seed=seed) for seed, (accuracy, epochs) in enumerate([(0.95, 10), (0.96, 10), (0.97, 40)])),
    ]
    (row,) = table1(records)
    assert row["deepagrel_acc_mean"] == pytest.approx(93.0) and row["ebp_acc_mean"] == pytest.approx(96.0)
    assert row["deepagrel_epochs"] == pytest.approx(30.0) and row["ebp_epochs"] == pytest.approx(20.0)
    assert row["epoch_ratio"] == pytest.approx(1.5), "30 / 20, not the medians' 20 / 10"
    # Sample std (n - 1): deviations -3, -2, +5 points give sqrt(38 / 2); -1, 0, +1 give 1.
    assert row["deepagrel_acc_std"] == pytest.approx(19 ** 0.5) and row["ebp_acc_std"] == pytest.approx(1.0)
    assert "| mnist | m | none | 93.00 ± 4.36 | 96.00 ± 1.00 | 30.0 | 20.0 | 1.50 | 3/3, 3/3 |" in markdown([row])
    # The Markdown rounds; the CSV keeps the values unrounded.
    rows = table1([record("mnist", "m", rule, accuracy, 10, seed=seed) for rule in ("deepagrel", "ebp") for seed, accuracy in enumerate((0.987654, 0.987652))])
    assert "| 98.77 ± 0.00 |" in markdown(rows)
    write_csv(rows, tmp_path / "table1.csv")
    with open(tmp_path / "table1.csv", newline="") as handle:
        (written,) = csv.DictReader(handle)
    assert float(written["deepagrel_acc_mean"]) == pytest.approx(98.7653, rel=1e-12)
    assert float(written["deepagrel_acc_std"]) == pytest.approx(100 * 0.000002 / 2 ** 0.5, rel=1e-6)
