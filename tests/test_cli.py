"""The command line, driven end to end through its real entry points."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

import agrel_sim
from agrel_sim import recorder
from agrel_sim.cli import main
from agrel_sim.experiment import Experiment


@pytest.fixture(autouse=True)
def in_tmp_folder(tmp_path, monkeypatch):
    """Runs write their result files under ./runs: keep them out of the repository."""
    monkeypatch.chdir(tmp_path)


def test_default_job_learns_digits(capsys):
    assert main(["train"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"epoch +1 +reward_p=0\.\d+", out), "one line per epoch with the reward probability"
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("summary: experiment=digits_deepagrel rule=deepagrel")
    assert float(re.search(r"test_acc=([0-9.]+)", summary).group(1)) >= 0.95


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    assert entry_points(group="console_scripts")["agrel-sim"].load() is main
    done = subprocess.run([sys.executable, "-m", "agrel_sim.cli", "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--seed" in done.stdout


def test_ctrl_c_while_the_commands_load_is_one_line(tmp_path):
    stand_in = tmp_path / "stand_in" / "torch"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("raise KeyboardInterrupt  # as Ctrl-C while torch loads\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(stand_in.parent), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "agrel_sim.cli", "table", str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "agrel-sim: interrupted\n", "table trains nothing: no word of epochs kept"


@pytest.mark.parametrize("stderr", [subprocess.PIPE, subprocess.STDOUT], ids=["stdout", "stdout-and-stderr"])
def test_a_closed_output_ends_a_run_in_one_line_and_keeps_its_finished_epochs(tmp_path, stderr):
    """``agrel-sim train | head -3``: the reader of its output leaves after the first epoch's line."""
    command = [sys.executable, "-m", "agrel_sim.cli", "train", "--max-epochs", "1000", "--patience", "1000", "--out", "run"]
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}  # a pipe is block-buffered unless main says otherwise
    train = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        for line in train.stdout:
            if line.startswith("epoch "):
                break
        train.stdout.close()
        err = train.stderr.read() if train.stderr else ""
        assert train.wait(timeout=60) == 141, err  # the shell's status for a process ended by SIGPIPE
    finally:
        train.kill()
        train.wait()
    if train.stderr:
        assert err.startswith("agrel-sim: stopped: its output was closed;") and err.count("\n") == 1, err
    with h5py.File(tmp_path / "run" / "run.h5", "r") as run:
        assert not run.attrs["complete"] and 1 <= len(run["epochs/epoch"]) <= 3, "each line reaches the reader as it is written, and the next one fails"
    assert (tmp_path / "run" / "checkpoint.pt").exists(), "its finished epochs can be continued"


def test_a_closed_output_ends_the_table_in_one_line(tmp_path):
    assert main(["train", "--max-epochs", "1", "--out", "runs/run", "--quiet"]) == 0
    reader, writer = os.pipe()
    os.close(reader)  # the reader has gone before the table is printed
    try:
        done = subprocess.run([sys.executable, "-m", "agrel_sim.cli", "table", "runs"], stdout=writer, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (141, "agrel-sim: stopped: its output was closed\n")

def test_version(capsys):
    from agrel_sim import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"agrel-sim {__version__}\n"
    done = subprocess.run([sys.executable, "-m", "agrel_sim", "--version"], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, f"agrel-sim {__version__}\n"), "python -m agrel_sim is the command line too"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full, whose writes fail as on a full disk")
def test_output_that_cannot_be_written_ends_a_command_in_one_line(tmp_path):
    assert main(["train", "--max-epochs", "1", "--out", str(tmp_path / "runs" / "run"), "--quiet"]) == 0
    for command, kept in ((["table", str(tmp_path / "runs")], ""), (["train", "--max-epochs", "1", "--out", str(tmp_path / "other")], "; every finished epoch is kept")):
        with open("/dev/full", "w") as full:
            done = subprocess.run([sys.executable, "-m", "agrel_sim", *command], stdout=full, stderr=subprocess.PIPE, text=True)
        assert done.returncode == 1 and done.stderr.startswith(f"agrel-sim: error: cannot write its output (No space left on device){kept}"), done.stderr
        assert done.stderr.count("\n") == 1, done.stderr


EXPERIMENT = """
name = "tiny_ebp"
dataset = "digits"
model = "net.toml"

[rule]
name = "ebp"
learning_rate = 0.1

[training]
batch_size = 20
max_epochs = 3
patience = 2
validation_size = 100
"""

MODEL = """
input_shape = [1, 8, 8]
[[layers]]
kind = "conv"
channels = 4
kernel_size = 3
[[layers]]
kind = "dense"
units = 16
[output]
actions = 10
"""


def test_experiment_file_with_model_path_and_rule_override(tmp_path, capsys):
    (tmp_path / "net.toml").write_text(MODEL)
    (tmp_path / "tiny.toml").write_text(EXPERIMENT)
    assert main(["train", str(tmp_path / "tiny.toml"), "--seed", "3", "--quiet"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "experiment=tiny_ebp rule=ebp seed=3" in summary and "epochs=3" in summary
    assert main(["train", str(tmp_path / "tiny.toml"), "--max-epochs", "1", "--out", str(tmp_path / "run")]) == 0
    assert "data digits: 1,437 training images (100 of them for validation), 360 test images\n" in capsys.readouterr().out


def test_a_run_resumes_from_a_moved_copy_of_its_experiment_file(tmp_path, capsys):
    for folder in ("a", "b"):  # a checkout moved from a to b, say
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "net.toml").write_text(MODEL)
        (tmp_path / folder / "tiny.toml").write_text(EXPERIMENT)
    assert main(["train", str(tmp_path / "a" / "tiny.toml"), "--max-epochs", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    with h5py.File(tmp_path / "run" / "run.h5", "a") as handle:  # as if killed
        handle.attrs["complete"] = False
    assert main(["train", str(tmp_path / "b" / "tiny.toml"), "--resume", "--max-epochs", "2", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "epochs=2" in capsys.readouterr().out.strip().splitlines()[-1]


def test_experiment_file_overrides_the_models_settings_field_by_field(tmp_path):
    (tmp_path / "net.toml").write_text(MODEL + "[action_selection]\nepsilon = 0.05\ntau = 0.5\n")
    overrides = "\n[action_selection]\nepsilon = 0.1\n[neuromodulator]\nreward_wrong = -1.0\n"
    (tmp_path / "tiny.toml").write_text(EXPERIMENT.replace("\n[training]", overrides + "\n[training]"))
    model = Experiment.from_toml(tmp_path / "tiny.toml").model
    assert (model.action_selection.epsilon, model.action_selection.tau) == (0.1, 0.5)
    assert (model.neuromodulator.reward_correct, model.neuromodulator.reward_wrong) == (1.0, -1.0)
    assert (model.rule.name, model.rule.learning_rate) == ("ebp", 0.1)


@pytest.mark.parametrize(
    "change, message",
    [
        (('dataset = "digits"', 'dataset = "svhn"'), r"tiny\.toml: dataset: expected one of"),
        (("patience = 2", "patiense = 2"), r"tiny\.toml: training\.patiense: unknown field"),
        (('dataset = "digits"\nmodel = "net.toml"', '[model]\ninput_shape = [1, 8, 8]\nlayers = [{kind = "dense", units = 16}]\noutput = {actions = 10}\ndataset = "digits"'),
         r"tiny\.toml: model: dataset: unknown field; .*; dataset is a key of the top level: move it above the file's first table"),
        (('dataset = "digits"\nmodel = "net.toml"', 'dataset = "digits"\n[model]\ninput_shape = [1, 8, 8]\n[[model.layers]]\nkind = "dense"\nunits = 16\noutput = {actions = 10}'),
         r"tiny\.toml: model: layers\[0\]\.output: unknown field; the fields here are: kind, units$"),  # a key of [model], not of the file's top level
        (("patience = 2", 'patience = 2\nbackend = "brian2"'), r"tiny\.toml: training\.backend: unknown field; the fields here are: .*; backend is a key of the top level: move it above the file's first table"),
        (("learning_rate = 0.1", "learning_rate = -1.0"), r"tiny\.toml: rule\.learning_rate: expected a number > 0"),
        (("patience = 2", "patience = 2\nlr_decay_factor = 2"), r"tiny\.toml: training\.lr_decay_factor: expected a number in \(0, 1\]"),
        (("patience = 2", "patience = 2\nlr_decay_patience = 0"), r"tiny\.toml: training\.lr_decay_patience: expected an integer >= 1"),
        (("patience = 2", "patience = 2\nlr_decay_factor = 0.5\nlr_decay_patience = 2"),
         r"tiny\.toml: training\.lr_decay_patience: expected fewer epochs than patience = 2 \(the run would stop before its learning rate decays\), got 2; give a smaller lr_decay_patience or a larger patience, or lr_decay_factor = 1"),
        (("patience = 2", "patience = 2\nlr_decay_factor = 0.5"), r"tiny\.toml: training\.lr_decay_patience: expected fewer epochs than patience = 2 \(.*\), got 10 \(the default\); "),
        (("[training]", "[neuromodulator]\nreward_correct = -1.0\nreward_wrong = 1.0\n[training]"), r"tiny\.toml: neuromodulator\.reward_correct: expected more than reward_wrong = 1\.0, got -1\.0$"),
        (("[training]", "[neuromodulator]\nreward_correct = 0.0\n[training]"), r"tiny\.toml: neuromodulator\.reward_correct: expected more than reward_wrong = 0\.0, got 0\.0$"),
        (("patience = 2", "patience = 2\n[training.augmentation]\nzoom = 1"), r"tiny\.toml: training\.augmentation\.zoom: expected a fraction in \[0, 1\), got 1\.0"),
        (('model = "net.toml"', 'model = "nowhere.toml"'), r"tiny\.toml: model: .*nowhere\.toml: model file not found"),
        (("[training]", "[action_selection]\nepsilon = 1.5\n[training]"), r"tiny\.toml: action_selection\.epsilon: expected"),
        (("[training]", "[neuromodulator]\nreward = 1.0\n[training]"), r"tiny\.toml: neuromodulator\.reward: unknown field"),
        (("[training]", "[logging]\nevery_batches = 0\n[training]"), r"tiny\.toml: logging\.every_batches: expected an integer >= 1, got 0"),
        (("batch_size = 20", "batch_size = 100000000000000000000"), r"tiny\.toml: training\.batch_size: expected an integer >= 1, got 100000000000000000000"),
        (('dataset = "digits"', 'dataset = "digits"\naction_selection = 0.1'), r"tiny\.toml: action_selection: expected a table of fields of the model's \[action_selection\], got 0\.1"),
        (("learning_rate = 0.1", "learning_rate = inf"), r"tiny\.toml: rule\.learning_rate: expected a number > 0, got inf"),
        (("patience = 2", "patience = 2\n[training.augmentaton]\nfactor = 2"), r"tiny\.toml: training\.augmentaton: unknown field; the fields here are: augmentation, "),
        (('name = "tiny_ebp"', 'name = ""'), r"tiny\.toml: name: expected a non-empty name without '/' or control characters \(it names the run folder"),
        (('name = "tiny_ebp"', r'name = "tiny\nebp"'), r"tiny\.toml: name: expected a non-empty name without '/' or control characters .*got 'tiny\\nebp'"),
        (('name = "tiny_ebp"', r'name = "tiny\u0000ebp"'), r"tiny\.toml: name: expected a non-empty name without '/' or control characters .*got 'tiny\\x00ebp'"),
        (('name = "tiny_ebp"\ndataset = "digits"\nmodel = "net.toml"', 'name = ""\ndataset = "digits"\nmodel = {input_shape = [1, 8, 8], layers = [{kind = "dense", units = 16}], output = {actions = 10}}'),
         r"tiny\.toml: name: expected a non-empty name"),  # the inline model takes the experiment's name: the error is the name's
        (('model = "net.toml"', 'model = ""'), r"tiny\.toml: model: an empty model name; give the name of a model file or its path \(\.toml\)"),
        (('name = "tiny_ebp"', 'name = "../escaped"'), r"tiny\.toml: name: expected a non-empty name without '/'.*got '\.\./escaped'"),
        (('dataset = "digits"', 'dataset = "digits"\nbackend_options = {foo = 1}'), r"tiny\.toml: backend_options\.foo: not an option of the torch backend; its options: none"),
        (('dataset = "digits"', 'dataset = "digits"\nbackend = "brian2"\nbackend_options = {seed = 1}'), r"backend_options\.seed: not an option of the brian2 backend \(device, dtype and seed come from the run.*its options: tau_ff, "),
        (('dataset = "digits"', 'dataset = "digits"\nbackend = "brian2"'), r"tiny\.toml: backend: the brian2 backend cannot build model 'net' \(.*tiny\.toml: layers\[0\]: the brian2 backend builds dense column layers \(and dropout\) only, not layer kind 'conv'; use backend='torch'"),
        (('dataset = "digits"', 'dataset = "mnist"'), r"tiny\.toml: model: 'net' expects input of shape \[1, 8, 8\], but data set 'mnist' has images of shape \[1, 28, 28\]; choose a model"),
        (('dataset = "digits"\nmodel = "net.toml"', 'dataset = "digits"\nmodel = {input_shape = [1, 8, 8], layers = [{kind = "dense", units = 16}], output = {actions = 3}}'),
         r"tiny\.toml: model: 'tiny_ebp' has 3 actions, data set 'digits' has 10 classes; choose a model"),
        (("learning_rate = 0.1", "learning_rate = 0.1\nbackend = 'brian2'"), r"tiny\.toml: rule\.backend: unknown field; .*; backend is a key of the top level: move it above the file's first table"),
        (('dataset = "digits"', 'dataset = "digits"\nbackend = "brian2"\nbackend_options = {gate_threshold = 0.001}'),
         r"tiny\.toml: backend_options\.gate_threshold: not an option of the brian2 backend \(a Brian2 option until agrel-sim 0\.4\.0, .* since 0\.5\.0 the gate is open while the column's drive is above 0, .*\); its options: tau_ff, "),
        (('dataset = "digits"', 'dataset = "digits"\nbackend = "brian2"\nbackend_options = {tau_ff = true}'), r"tiny\.toml: backend_options\.tau_ff: expected a duration \(a time quantity or a number of milliseconds\), got True"),
        (('dataset = "digits"', 'dataset = "digits"\nbackend = "brian2"\nbackend_options = {tau_ff = inf}'), r"tiny\.toml: backend_options\.tau_ff: expected a duration > 0, got inf ms"),
        (('dataset = "digits"', 'dataset = "digits"\nbackend = "brian2"\nbackend_options = {t_rpe = 0.3}'), r"tiny\.toml: backend_options\.t_rpe: 0\.3 ms is not a whole number of time steps"),
    ],
)
def test_bad_experiment_files_fail_before_training(tmp_path, capsys, change, message):
    (tmp_path / "net.toml").write_text(MODEL)
    (tmp_path / "tiny.toml").write_text(EXPERIMENT.replace(*change))
    assert main(["train", str(tmp_path / "tiny.toml")]) == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err), captured.err
    assert "epoch" not in captured.out


def test_a_patience_given_on_the_command_line_is_checked_with_the_files_settings(tmp_path, capsys):
    (tmp_path / "net.toml").write_text(MODEL)
    (tmp_path / "tiny.toml").write_text(EXPERIMENT.replace("patience = 2", "patience = 8\nlr_decay_factor = 0.5\nlr_decay_patience = 4"))
    assert main(["train", str(tmp_path / "tiny.toml"), "--patience", "4", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"agrel-sim: error: --patience 4 does not fit experiment 'tiny_ebp': \S+tiny\.toml: training\.lr_decay_patience: expected fewer epochs than patience = 4 \(.*\), got 4; give a smaller lr_decay_patience or a larger patience, .*\n", err), err
    assert not (tmp_path / "run").exists()


def test_a_run_folder_given_with_a_tilde_is_in_the_home_folder(tmp_path, capsys, monkeypatch):
    from agrel_sim.experiment import default_experiment
    from agrel_sim.runs import run_experiment

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--max-epochs", "1", "--quiet", "--out=~/runs/a"]) == 0  # no shell expands ~ after =
    assert (tmp_path / "home" / "runs" / "a" / "run.h5").is_file() and not (tmp_path / "~").exists()
    assert f"run file: {tmp_path / 'home' / 'runs' / 'a' / 'run.h5'}\n" in capsys.readouterr().out
    for command in (["train", "--max-epochs", "1"], ["analyze", str(tmp_path / "home" / "runs")], ["figure3", str(tmp_path / "home" / "runs")]):
        assert main([*command, "--out", "~agrel_sim_no_such_user/x"]) == 2
        assert capsys.readouterr().err == "agrel-sim: error: --out: '~agrel_sim_no_such_user/x': its ~ names no home folder of this machine; give the full path\n"
    assert main(["table", str(tmp_path / "home" / "runs"), "--csv=~/t.csv"]) == 0 and (tmp_path / "home" / "t.csv").is_file()
    experiment = default_experiment()
    experiment = dataclasses.replace(experiment, training=dataclasses.replace(experiment.training, max_epochs=1))
    run_experiment(experiment, out="~/runs/b", log=None, progress=False)  # from Python too
    assert (tmp_path / "home" / "runs" / "b" / "run.h5").is_file()


def test_an_experiment_file_that_is_not_utf8_is_named(tmp_path, capsys):
    (tmp_path / "net.toml").write_text(MODEL)
    (tmp_path / "tiny.toml").write_bytes(EXPERIMENT.replace('name = "tiny_ebp"', 'name = "caf\xe9"').encode("latin-1"))
    assert main(["train", str(tmp_path / "tiny.toml")]) == 2
    assert re.search(r"tiny\.toml: not valid TOML: TOML files are UTF-8 text, and this one is not .*save it as UTF-8", capsys.readouterr().err)
    (tmp_path / "tiny.toml").write_text(EXPERIMENT, encoding="utf-16")  # with its byte-order mark, as editors save "Unicode"
    assert main(["train", str(tmp_path / "tiny.toml")]) == 2
    assert re.search(r"tiny\.toml: not valid TOML: TOML files are UTF-8 text, and this one is not .*save it as UTF-8", capsys.readouterr().err)


def test_a_run_file_or_a_checkpoint_given_as_the_experiment_is_named(tmp_path, capsys):
    h5py.File(tmp_path / "run.h5", "w").close()
    torch.save({"epoch": 1}, tmp_path / "checkpoint.pt")
    for path in (tmp_path / "run.h5", tmp_path / "checkpoint.pt"):
        assert main(["train", str(path)]) == 2
        assert capsys.readouterr().err == f"agrel-sim: error: {path}: not TOML but a binary file (a run file or a checkpoint?); give the path of a .toml file\n"


def test_a_folder_given_as_the_experiment_or_the_sweep_is_named(tmp_path, capsys):
    (tmp_path / "settings").mkdir()
    for command in ("train", "sweep"):
        assert main([command, str(tmp_path / "settings")]) == 2
        what = "an experiment" if command == "train" else "a sweep"
        assert capsys.readouterr().err == f"agrel-sim: error: {tmp_path / 'settings'}: is a folder; give the path of {what} file (.toml), or the name of one\n"


def test_an_experiment_given_as_the_sweep_or_a_missing_sweep_is_named(tmp_path, capsys):
    assert main(["sweep", "mnist_fc3_deepagrel"]) == 2
    assert re.fullmatch(r"agrel-sim: error: \S*mnist_fc3_deepagrel\.toml: an experiment file \(it names a model\): run it with `agrel-sim train`, or list it in a sweep file's experiments\n", capsys.readouterr().err)
    assert main(["sweep", "table1x"]) == 2
    assert re.match(r"agrel-sim: error: sweep 'table1x' not found; tried:\n.*table1x\.toml", capsys.readouterr().err)


def test_a_model_file_given_as_the_experiment_or_the_sweep_is_named(tmp_path, capsys):
    (tmp_path / "net.toml").write_text(MODEL)
    assert main(["train", str(tmp_path / "net.toml")]) == 2
    assert "net.toml: a model file (it lists layers): give an experiment, which names its model and data set" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "net.toml")]) == 2
    assert "net.toml: a model file (it lists layers): name it as the model of an experiment file, and list that in a sweep file's experiments" in capsys.readouterr().err


@pytest.mark.parametrize("given", ["experiment", "sweep"])
def test_an_experiment_or_a_sweep_given_as_the_model_is_named(tmp_path, capsys, given):
    (tmp_path / "other.toml").write_text(EXPERIMENT if given == "experiment" else 'experiments = ["tiny.toml"]\nseeds = [0]\n')
    (tmp_path / "tiny.toml").write_text(EXPERIMENT.replace('model = "net.toml"', 'model = "other.toml"'))
    assert main(["train", str(tmp_path / "tiny.toml")]) == 2
    kind = {"experiment": r"an experiment file \(it names a model\)", "sweep": r"a sweep file \(it lists experiments\)"}[given]
    assert re.search(rf"tiny\.toml: model: \S*other\.toml: {kind}, not a model file, which lists layers; give a model\n", capsys.readouterr().err)


def test_unknown_experiment_name_lists_the_paths_tried(capsys, monkeypatch):
    monkeypatch.chdir(Path(agrel_sim.__file__).resolve().parent.parent)  # its ./experiments is the package's own
    assert main(["train", "no_such_experiment"]) == 2
    tried = re.search(r"experiment 'no_such_experiment' not found; tried:\n((?:  .*\n)+)", capsys.readouterr().err)
    assert tried and tried[1] == f"  {Path.cwd() / 'experiments' / 'no_such_experiment.toml'}\n", "each folder once"


@pytest.mark.parametrize("argv, message", [
    (["train", "--seed", "-1"], "argument --seed: -1 is below 0"),
    (["train", "--max-epochs", "0"], "argument --max-epochs: 0 is below 1"),
    (["train", "--patience", "0"], "argument --patience: 0 is below 1"),
    (["train", "--seed", "two"], "argument --seed: 'two' is not an integer"),
    (["sweep", "table1", "--jobs", "0"], "argument --jobs: 0 is below 1"),
])
def test_bad_counts_on_the_command_line_fail_before_any_run(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [
    ["train", ""], ["train", "--out", ""], ["train", "--data-dir", " "], ["sweep", ""], ["sweep", "table1", "--out", ""],
    ["sweep", "table1", "--data-dir", ""], ["table", ""], ["table", ".", "--csv", ""], ["figure3", ""], ["figure3", ".", "--out", ""],
    ["analyze", ""], ["analyze", ".", "--out", ""],
], ids=" ".join)
def test_an_empty_name_or_path_is_refused_not_taken_for_the_default(argv, capsys, tmp_path):
    """As an unset shell variable gives (``--out "$RUNS"``): not the default run folder, the
    embedded experiment or the current folder."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    flag = next((arg for arg in argv if arg.startswith("--")), None)
    assert re.search(rf"argument {flag or '.*'}: '\s*' is empty; give a name or a path \(is a shell variable unset\?\)", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["réseau", "re\u0301seau", "my net", "réseau\u00a02", "a\u202fb"])
def test_names_with_letters_and_spaces_of_any_script_are_taken(tmp_path, name):
    (tmp_path / "net.toml").write_text(MODEL)
    (tmp_path / "tiny.toml").write_text(EXPERIMENT.replace('name = "tiny_ebp"', f'name = "{name}"'))
    assert Experiment.from_toml(tmp_path / "tiny.toml").name == name


def test_an_experiment_file_with_a_byte_order_mark_is_read(tmp_path, capsys):
    (tmp_path / "net.toml").write_text(MODEL)
    (tmp_path / "tiny.toml").write_text(EXPERIMENT, encoding="utf-8-sig")  # as some editors save UTF-8
    assert Experiment.from_toml(tmp_path / "tiny.toml").name == "tiny_ebp"


def test_a_data_folder_given_for_an_embedded_data_set_is_said_to_be_unread(tmp_path, capsys):
    assert main(["train", "--max-epochs", "1", "--data-dir", str(tmp_path / "nowhere"), "--out", "given"]) == 0
    assert "360 test images; an embedded data set, so the data folder given is not read\n" in capsys.readouterr().out
    assert main(["train", "--max-epochs", "1", "--out", "not_given"]) == 0
    assert "360 test images\n" in capsys.readouterr().out


def test_max_epochs_and_patience_override_the_experiment(tmp_path, capsys):
    (tmp_path / "net.toml").write_text(MODEL)
    (tmp_path / "tiny.toml").write_text(EXPERIMENT)
    assert main(["train", str(tmp_path / "tiny.toml"), "--max-epochs", "1", "--patience", "7", "--quiet"]) == 0
    assert "epochs=1 " in capsys.readouterr().out.strip().splitlines()[-1]
    with h5py.File(tmp_path / "runs" / "tiny_ebp" / "seed0" / "run.h5", "r") as run:
        training = json.loads(run.attrs["config"])["training"]
    assert (training["max_epochs"], training["patience"]) == (1, 7), "the run file records the overrides"
    assert main(["train", str(tmp_path / "tiny.toml"), "--resume", "--max-epochs", "2", "--patience", "6", "--quiet"]) == 2
    assert "training.patience: 7 in the run, 6 now" in capsys.readouterr().err, "a patience is never lowered"
    assert main(["train", str(tmp_path / "tiny.toml"), "--resume", "--max-epochs", "2", "--patience", "7", "--quiet"]) == 0
    assert "epochs=2 " in capsys.readouterr().out.strip().splitlines()[-1]


def test_a_rule_the_backend_cannot_run_names_the_flag(tmp_path, capsys):
    assert main(["train", "digits_brian2", "--rule", "ebp", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"--rule ebp does not fit experiment 'digits_brian2': .*rule\.name: the brian2 backend simulates DeepAGREL only, got 'ebp'", err), err
    assert not (tmp_path / "run").exists()


def test_a_rule_override_keeps_the_learning_rate_and_is_named_apart(capsys):
    assert main(["train", "--rule", "ebp", "--max-epochs", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "experiment digits_deepagrel_as_ebp (<embedded default>): model digits_dense, rule ebp, learning rate 0.5," in out
    assert out.strip().splitlines()[-1].startswith("summary: experiment=digits_deepagrel_as_ebp rule=ebp seed=0")
    assert main(["train", "--rule", "deepagrel", "--max-epochs", "1", "--quiet"]) == 0
    assert "summary: experiment=digits_deepagrel rule=deepagrel" in capsys.readouterr().out, "the experiment's own rule changes nothing"


def test_a_folder_named_like_an_experiment_does_not_hide_it(tmp_path, monkeypatch, capsys):
    experiments = tmp_path / "mine"
    experiments.mkdir()
    (experiments / "net.toml").write_text(MODEL)
    (experiments / "tiny.toml").write_text(EXPERIMENT)
    monkeypatch.setenv("AGREL_SIM_EXPERIMENTS", str(experiments))
    (tmp_path / "tiny").mkdir()  # a run folder the user named after the experiment
    assert main(["train", "tiny", "--max-epochs", "1", "--quiet", "--out", "tiny/seed0"]) == 0
    assert "summary: experiment=tiny_ebp" in capsys.readouterr().out


def test_a_seed_beyond_the_range_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--seed", str(2**64 - 2)])
    assert "argument --seed: 18446744073709551614 is above 4294967295" in capsys.readouterr().err


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    assert main(["train", "--resume", "--max-epochs", "1", "--out", str(tmp_path / "typo")]) == 0
    assert f"{tmp_path / 'typo'}: no checkpoint to resume from; starting the run afresh" in capsys.readouterr().out


def test_resuming_a_finished_run_reports_its_result_without_training(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--max-epochs", "2", "--out", str(run), "--quiet"]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    written = (run / "run.h5").stat().st_mtime_ns, (run / "checkpoint.pt").stat().st_mtime_ns
    assert main(["train", "--resume", "--max-epochs", "2", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run / 'run.h5'}: this run is already complete; its result follows (to go on, raise training.patience" in out
    assert out.strip().splitlines()[-1] == first, "the summary line it finished with"
    assert ((run / "run.h5").stat().st_mtime_ns, (run / "checkpoint.pt").stat().st_mtime_ns) == written, "nothing written"


def test_finished_epochs_without_their_checkpoint_are_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--max-epochs", "3", "--out", str(run), "--quiet"]) == 0
    with h5py.File(run / "run.h5", "a") as handle:  # as if killed after epoch 3
        handle.attrs["complete"] = False
    (run / "checkpoint.pt").unlink()
    assert main(["train", "--resume", "--max-epochs", "5", "--out", str(run), "--quiet"]) == 2
    assert "run.h5: 3 finished epochs but no checkpoint.pt, so the run cannot go on; restore the checkpoint" in capsys.readouterr().err
    with h5py.File(run / "run.h5", "r") as handle:
        assert handle["epochs"]["epoch"][:].tolist() == [1, 2, 3]


def test_a_run_killed_before_its_first_checkpoint_starts_afresh(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--max-epochs", "1", "--out", str(run), "--quiet"]) == 0
    with h5py.File(run / "run.h5", "a") as handle:  # as if killed between epoch 1's record and its checkpoint
        handle.attrs["complete"] = False
    (run / "checkpoint.pt").unlink()
    assert main(["train", "--resume", "--max-epochs", "2", "--out", str(run)]) == 0
    assert f"{run}: no checkpoint to resume from; starting the run afresh" in capsys.readouterr().out
    with h5py.File(run / "run.h5", "r") as handle:
        assert handle.attrs["complete"] and handle["epochs"]["epoch"][:].tolist() == [1, 2]


def test_a_run_file_that_cannot_be_read_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.h5").write_bytes(b"not yet readable")  # no permission, held open, or damaged
    assert main(["train", "--resume", "--max-epochs", "1", "--out", str(run), "--quiet"]) == 2
    assert re.search(r"run\.h5: cannot read this run file \(.*\); check its permissions", capsys.readouterr().err)
    assert (run / "run.h5").read_bytes() == b"not yet readable"


def test_a_checkpoint_is_never_overwritten_without_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--max-epochs", "2", "--out", str(run), "--quiet"]) == 0
    (run / "run.h5").rename(tmp_path / "moved.h5")
    before = (run / "checkpoint.pt").read_bytes()
    assert main(["train", "--max-epochs", "1", "--out", str(run), "--quiet"]) == 2
    assert "checkpoint.pt: a checkpoint without its run file run.h5; restore the run file, or choose another --out" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("blocked, message", [
    ("run.lock", r"run: cannot write in the run folder \(Is a directory\); make it writable or choose another --out"),
    ("run.h5.partial", r"run\.h5: cannot write the run file \(.*\); make the run folder writable or free space, then train again with --resume"),
])
def test_a_run_folder_that_cannot_be_written_is_named(tmp_path, capsys, blocked, message):
    (tmp_path / "run" / blocked).mkdir(parents=True)  # root may write anywhere; a folder in the way fails for everyone
    assert main(["train", "--max-epochs", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_checkpoint_goes_on_only_with_the_run_file_of_its_run(tmp_path, capsys):
    older, run, other = tmp_path / "older", tmp_path / "run", tmp_path / "other"
    assert main(["train", "--max-epochs", "2", "--out", str(run), "--quiet"]) == 0
    shutil.copytree(run, older)
    assert main(["train", "--max-epochs", "4", "--out", str(run), "--resume", "--quiet"]) == 0
    assert main(["train", "--max-epochs", "2", "--seed", "1", "--out", str(other), "--quiet"]) == 0
    capsys.readouterr()
    fix = "restore the run file and the checkpoint of one moment, or move the run folder away and train the run again"

    shutil.copy(older / "run.h5", run / "run.h5")  # a run file restored from an older copy
    assert main(["train", "--max-epochs", "6", "--out", str(run), "--resume", "--quiet"]) == 2
    assert f"run.h5: records 2 epochs, but its checkpoint checkpoint.pt has finished 4; {fix}" in capsys.readouterr().err

    shutil.copy(other / "checkpoint.pt", older / "checkpoint.pt")  # seed 1's, beside seed 0's run file
    assert main(["train", "--max-epochs", "6", "--out", str(older), "--resume", "--quiet"]) == 2
    assert re.search(rf"run\.h5: epoch 1 of its checkpoint checkpoint\.pt \(validation_accuracy 0\.\d+\) is not the one it records \(validation_accuracy 0\.\d+ in row 0\): the two are of different runs; {fix}", capsys.readouterr().err)

    with h5py.File(other / "run.h5", "a") as handle:  # the same validation accuracies, another loss: the field that differs is named
        loss = handle["epochs/train_loss"][1].item()
        handle["epochs/train_loss"][1] = 0.5
    assert main(["train", "--max-epochs", "6", "--seed", "1", "--out", str(other), "--resume", "--quiet"]) == 2
    assert f"run.h5: epoch 2 of its checkpoint checkpoint.pt (train_loss {loss!r}) is not the one it records (train_loss 0.5 in row 1)" in capsys.readouterr().err


def test_a_full_disk_stops_a_run_between_epochs_and_keeps_the_epochs_written(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--max-epochs", "2", "--out", str(run), "--quiet"]) == 0
    usage = shutil.disk_usage(run)
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage._replace(free=recorder.SPARE_SPACE))
    assert main(["train", "--max-epochs", "3", "--out", str(run), "--resume", "--quiet"]) == 2
    assert re.search(r"run\.h5: cannot write the run file \(\[Errno 28\] 64\.0 MiB free on its disk, below the 64\.[1-9] MiB that writing it asks for: a copy of the file and 64 MiB to spare\); make the run folder writable or free space, then train again with --resume", capsys.readouterr().err)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "run.h5", "run.lock"]
    monkeypatch.undo()
    assert main(["train", "--max-epochs", "3", "--out", str(run), "--resume", "--quiet"]) == 0
    with h5py.File(run / "run.h5", "r") as handle:
        assert handle["epochs"]["epoch"][:].tolist() == [1, 2, 3] and handle.attrs["complete"]


def test_a_file_size_limit_below_the_run_files_needs_stops_the_run_with_a_clear_error(tmp_path):
    # Under `ulimit -f`, HDF5 met the limit as it closed the file: a page of tracebacks, once a
    # segmentation fault. The limit is found before HDF5 writes.
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    done = subprocess.run([sys.executable, "-m", "agrel_sim", "train", "--max-epochs", "2", "--out", str(tmp_path / "run"), "--quiet"],
                          preexec_fn=limit, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"agrel-sim: error: {tmp_path / 'run' / 'run.h5'}: cannot write the run file ([Errno 27] the limit on the size of a file (ulimit -f) is 1.0 MiB,"
        " below the 64.0 MiB that writing it may reach: the file and 64 MiB to spare); raise the limit on the size of a file (ulimit -f),"
        " then train again with --resume, which keeps the epochs already written"
    ]


def test_a_write_that_fails_as_hdf5_closes_the_file_is_not_kept(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--max-epochs", "2", "--out", str(run), "--quiet"]) == 0
    close = h5py.File.close

    def close_and_fail(self):
        failing = self.filename.endswith(".partial") and self.mode == "r+"
        close(self)
        if failing:
            raise RuntimeError("Can't decrement id ref count (unable to extend file properly, errno = 122, error message = 'Disk quota exceeded')")

    finished = (run / "run.h5").read_bytes()
    monkeypatch.setattr(h5py.File, "close", close_and_fail)
    assert main(["train", "--max-epochs", "3", "--out", str(run), "--resume", "--quiet"]) == 2
    assert "run.h5: cannot write the run file ([Errno 5] writing its new copy failed: Disk quota exceeded); make the run folder writable or free space" in capsys.readouterr().err
    assert not (run / "run.h5.partial").exists() and (run / "run.h5").read_bytes() == finished, "the run file as it was"

    def edit_and_fail(self, *args):
        raise ValueError("the edit's own error")

    monkeypatch.setattr(recorder.RunFile, "_check_records", edit_and_fail)  # the edit fails first: its error is the one named
    assert main(["train", "--max-epochs", "3", "--out", str(run), "--resume", "--quiet"]) == 2
    assert capsys.readouterr().err.strip().endswith("the edit's own error")


def test_a_write_that_hdf5_fails_without_raising_is_not_kept(tmp_path, capsys, monkeypatch):
    # h5py meets a failed write (a full disk) as it frees a dataset, where it cannot raise: Python
    # hands the error to sys.unraisablehook, as it does this one.
    run = tmp_path / "run"
    assert main(["train", "--max-epochs", "2", "--out", str(run), "--quiet"]) == 0

    class FreedDataset:
        def __del__(self):
            raise RuntimeError(f"Can't decrement id ref count (file write failed: filename = '{run / 'run.h5.partial'}', errno = 28, error message = 'No space left on device')")

    write_epoch = recorder.RunFile._write_epoch

    def write_epoch_and_fail(self, *args):
        write_epoch(self, *args)
        FreedDataset()  # freed at once

    monkeypatch.setattr(recorder.RunFile, "_write_epoch", write_epoch_and_fail)
    assert main(["train", "--max-epochs", "3", "--out", str(run), "--resume", "--quiet"]) == 2
    assert "run.h5: cannot write the run file ([Errno 5] writing its new copy failed: No space left on device); make the run folder writable or free space" in capsys.readouterr().err
    assert not (run / "run.h5.partial").exists()
    with h5py.File(run / "run.h5", "r") as handle:  # as the resumed session began it: epoch 3 is not in it
        assert handle["epochs"]["epoch"][:].tolist() == [1, 2] and not handle.attrs["complete"]


def test_a_run_folder_where_no_folder_can_be_made_is_named(tmp_path, capsys):
    out = "/proc/agrel_sim_run" if os.path.isdir("/proc/self") else None  # Linux: folders cannot be made there, and mkdir says ENOENT
    if out is None:
        pytest.skip("needs Linux's /proc")
    assert main(["train", "--max-epochs", "1", "--out", out, "--quiet"]) == 2
    assert re.search(r"/proc/agrel_sim_run: cannot make the run folder \(No such file or directory, five times: its parent folders keep disappearing, or folders cannot be made there\); choose another --out", capsys.readouterr().err)


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 512000000000000 bytes."),
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB."),
    RuntimeError("Storage size calculation overflowed with sizes=[9223372036854775807, 64]"),
])
def test_running_out_of_memory_is_one_line(monkeypatch, capsys, error):
    raised = [error, RuntimeError("a bug")]

    def run_experiment(*args, **kwargs):
        raise raised.pop(0)

    monkeypatch.setattr("agrel_sim.runs.run_experiment", run_experiment)
    assert main(["train"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("agrel-sim: error: out of memory (") and "check the layer sizes of the model, or lower training.batch_size" in err
    assert "in a new run folder (a run goes on only with the settings it began with)" in err
    with pytest.raises(RuntimeError, match="a bug"):  # other errors keep their traceback
        main(["train"])


def test_a_run_is_not_continued_on_another_copy_of_its_data(tmp_path, capsys):
    from test_datasets import write_mnist

    write_mnist(tmp_path / "copy1", n_train=40)
    write_mnist(tmp_path / "copy2", n_train=50)
    small = EXPERIMENT.replace('dataset = "digits"', 'dataset = "mnist"').replace('model = "net.toml"', 'model = "mnist_fc3"').replace("validation_size = 100", "validation_size = 10")
    (tmp_path / "small.toml").write_text(small)
    common = ["train", str(tmp_path / "small.toml"), "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*common, "--max-epochs", "1", "--data-dir", str(tmp_path / "copy1")]) == 0
    with h5py.File(tmp_path / "run" / "run.h5", "r") as handle:
        assert json.loads(handle.attrs["config"])["data"]["train"] == 40
    capsys.readouterr()
    assert main([*common, "--max-epochs", "2", "--resume", "--data-dir", str(tmp_path / "copy2")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"cannot continue this run with other settings than it began with \(data\.sha256: '[0-9a-f]{64}' in the run, '[0-9a-f]{64}' now; data\.train: 40 in the run, 50 now\)", err), err
    assert main([*common, "--max-epochs", "2", "--resume", "--data-dir", str(tmp_path / "copy1")]) == 0


@pytest.mark.parametrize("change, message", [
    (("validation_size = 100", "validation_size = 1437"), r"training\.validation_size: expected 0 < validation_size < 1437 \(the training images of 'digits'\), got 1437"),
    # one batch of 1,337 images an epoch, where the file says 1,338: a silent change of the protocol
    (("batch_size = 20", "batch_size = 1338"), r"training\.batch_size: expected at most the 1337 training images of 'digits' that validation_size = 100 leaves, got 1338; give a smaller batch_size \(or validation_size\)"),
])
def test_a_validation_split_or_a_batch_larger_than_the_data_names_the_file_and_field(tmp_path, capsys, change, message):
    (tmp_path / "net.toml").write_text(MODEL)
    (tmp_path / "tiny.toml").write_text(EXPERIMENT.replace(*change))
    assert main(["train", str(tmp_path / "tiny.toml"), "--out", str(tmp_path / "run")]) == 2
    out, err = capsys.readouterr()
    assert re.search(rf"tiny\.toml: {message}", err), err
    assert "of them for validation" not in out, "no line of sizes that do not fit"
    assert not (tmp_path / "run").exists()


def test_table_names_a_csv_path_it_cannot_write(tmp_path, capsys):
    assert main(["train", "--max-epochs", "1", "--quiet", "--out", str(tmp_path / "runs" / "seed0")]) == 0
    capsys.readouterr()
    assert main(["table", str(tmp_path / "runs"), "--csv", str(tmp_path / "no_folder" / "t.csv")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"{tmp_path / 'no_folder' / 't.csv'}: cannot write the CSV (No such file or directory); give a writable path with --csv" in err


def test_the_experiment_file_sets_what_the_run_file_samples(tmp_path):
    (tmp_path / "net.toml").write_text(MODEL)
    (tmp_path / "tiny.toml").write_text(EXPERIMENT + "\n[logging]\nevery_batches = 2\ntrials_per_batch = 3\n")
    assert main(["train", str(tmp_path / "tiny.toml"), "--max-epochs", "1", "--quiet", "--out", str(tmp_path / "run")]) == 0
    with h5py.File(tmp_path / "run" / "run.h5", "r") as run:
        batches = run["trials"]["batch"][:].tolist()
        logging = json.loads(run.attrs["config"])["logging"]
    assert (logging["every_batches"], logging["trials_per_batch"]) == (2, 3)
    n_batches = -(-(1437 - 100) // 20)  # digits' training images less the validation split, in batches of 20
    assert batches == [b for b in range(0, n_batches, 2) for _ in range(3)]


def test_a_toml_name_not_found_here_points_to_the_experiment_of_that_name_if_there_is_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "digits_brian2.toml"]) == 2
    found = Path(__file__).resolve().parent.parent / "experiments" / "digits_brian2.toml"
    assert capsys.readouterr().err == f"agrel-sim: error: digits_brian2.toml: experiment file not found; the experiment named 'digits_brian2' is {found}: give its name without .toml\n"
    assert main(["train", "no_such_experiment.toml"]) == 2
    assert capsys.readouterr().err == "agrel-sim: error: no_such_experiment.toml: experiment file not found\n"


def test_quiet_leaves_out_the_progress_bar_that_a_terminal_shows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    for quiet in ([], ["--quiet"]):
        assert main(["train", "--max-epochs", "1", "--out", f"run{len(quiet)}", *quiet]) == 0
        out, err = capsys.readouterr()
        assert ("1/1 [" in err) == (not quiet) and ("data digits:" in out) == (not quiet), (quiet, err)
