"""The command line, driven end to end through its real entry points."""

import json
import re
import subprocess
import sys

import h5py
import pytest

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
        (("learning_rate = 0.1", "learning_rate = -1.0"), r"tiny\.toml: rule\.learning_rate: expected a number > 0"),
        (("patience = 2", "patience = 2\nlr_decay_factor = 2"), r"tiny\.toml: training\.lr_decay_factor: expected a number in \(0, 1\]"),
        (("patience = 2", "patience = 2\nlr_decay_patience = 0"), r"tiny\.toml: training\.lr_decay_patience: expected an integer >= 1"),
        (('model = "net.toml"', 'model = "nowhere.toml"'), r"nowhere\.toml: model file not found"),
        (("[training]", "[action_selection]\nepsilon = 1.5\n[training]"), r"tiny\.toml: action_selection\.epsilon: expected"),
        (("[training]", "[neuromodulator]\nreward = 1.0\n[training]"), r"tiny\.toml: neuromodulator\.reward: unknown field"),
        (('dataset = "digits"', 'dataset = "digits"\naction_selection = 0.1'), r"tiny\.toml: action_selection: expected a table of fields of the model's \[action_selection\], got 0\.1"),
        (("learning_rate = 0.1", "learning_rate = inf"), r"tiny\.toml: rule\.learning_rate: expected a number > 0, got inf"),
        (("patience = 2", "patience = 2\n[training.augmentaton]\nfactor = 2"), r"tiny\.toml: training\.augmentaton: unknown field; the fields here are: augmentation, "),
        (('name = "tiny_ebp"', 'name = ""'), r"tiny\.toml: name: expected a non-empty name without '/' \(it names the run folder"),
        (('name = "tiny_ebp"', 'name = "../escaped"'), r"tiny\.toml: name: expected a non-empty name without '/'.*got '\.\./escaped'"),
        (('dataset = "digits"', 'dataset = "digits"\nbackend_options = {foo = 1}'), r"tiny\.toml: backend_options\.foo: not an option of the torch backend; its options: none"),
        (('dataset = "digits"', 'dataset = "digits"\nbackend = "brian2"\nbackend_options = {seed = 1}'), r"backend_options\.seed: not an option of the brian2 backend \(device, dtype and seed come from the run.*its options: tau_ff, "),
        (('dataset = "digits"', 'dataset = "digits"\nbackend = "brian2"'), r"tiny\.toml: layers\[0\]: the brian2 backend builds dense column layers only, not layer kind 'conv'"),
    ],
)
def test_bad_experiment_files_fail_before_training(tmp_path, capsys, change, message):
    (tmp_path / "net.toml").write_text(MODEL)
    (tmp_path / "tiny.toml").write_text(EXPERIMENT.replace(*change))
    assert main(["train", str(tmp_path / "tiny.toml")]) == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err), captured.err
    assert "epoch" not in captured.out


def test_an_experiment_file_that_is_not_utf8_is_named(tmp_path, capsys):
    (tmp_path / "net.toml").write_text(MODEL)
    (tmp_path / "tiny.toml").write_bytes(EXPERIMENT.replace('name = "tiny_ebp"', 'name = "caf\xe9"').encode("latin-1"))
    assert main(["train", str(tmp_path / "tiny.toml")]) == 2
    assert re.search(r"tiny\.toml: not valid TOML: TOML files are UTF-8 text, and this one is not .*save it as UTF-8", capsys.readouterr().err)


def test_unknown_experiment_name_lists_the_paths_tried(capsys):
    assert main(["train", "no_such_experiment"]) == 2
    assert re.search(r"experiment 'no_such_experiment' not found; tried:\n.*no_such_experiment\.toml", capsys.readouterr().err)


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
