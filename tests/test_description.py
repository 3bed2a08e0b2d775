"""Model descriptions: TOML round trip and clear errors for bad input, before any training."""

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from agrel_sim import ColumnNetwork, ConfigError, Conv2d, Dense, LocallyConnected2d, Rule, build, load_model
from agrel_sim.network import ActionSelection, Dropout, Neuromodulator

GOOD = """
name = "tiny"
input_shape = [1, 8, 8]

[[layers]]
kind = "conv"
channels = 4
kernel_size = 3
stride = 2

[[layers]]
kind = "dropout"
rate = 0.5

[[layers]]
kind = "dense"
units = 16

[output]
actions = 10

[rule]
learning_rate = 0.1
feedback = "reciprocal"
"""


def write(tmp_path, text, name="net.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_package_names_training_and_analysis_and_imports_them_when_first_used():
    """``import agrel_sim`` stays quick (no torch, no h5py) for describing networks; the names of
    training, data, recording and analysis are the objects of their modules."""
    import ast
    import importlib
    import subprocess
    import sys

    import agrel_sim

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, agrel_sim; print(sorted({'torch', 'h5py', 'brian2'} & set(sys.modules)))"],
        capture_output=True, text=True, check=True,
    )
    assert loaded.stdout == "[]\n"
    lazy = agrel_sim._LAZY
    assert set(lazy) <= set(agrel_sim.__all__) and sorted(agrel_sim.__all__) == dir(agrel_sim)
    for name, module in lazy.items():
        assert getattr(agrel_sim, name) is getattr(importlib.import_module(module), name), name
    # What type checkers and editors are shown (the imports under TYPE_CHECKING) is the same.
    tree = ast.parse(Path(agrel_sim.__file__).read_text())
    checked = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    assert {alias.name: node.module for node in checked.body for alias in node.names} == lazy
    with pytest.raises(AttributeError, match="module 'agrel_sim' has no attribute 'trian'"):
        agrel_sim.trian


def test_toml_round_trip(tmp_path):
    network = ColumnNetwork.from_toml(write(tmp_path, GOOD))
    assert network.layer_shapes() == [(1, 8, 8), (4, 3, 3), (4, 3, 3), (16,), (10,)]
    assert network.rule.feedback == "reciprocal" and network.action_selection.epsilon == 0.02
    assert ColumnNetwork.from_dict(network.to_dict()) == network


def test_load_by_name_and_by_path(tmp_path, monkeypatch):
    write(tmp_path, GOOD, "tiny.toml")
    monkeypatch.setenv("AGREL_SIM_MODELS", str(tmp_path))
    assert load_model("tiny").name == "tiny"
    assert load_model(tmp_path / "tiny.toml").name == "tiny"
    with pytest.raises(ConfigError, match=r"(?s)model 'nope' not found; tried:.*nope\.toml"):
        load_model("nope")


def test_names_are_looked_up_beside_the_package_only_in_its_checkout(tmp_path, monkeypatch):
    from agrel_sim import config

    site = tmp_path / "site-packages"  # an installed copy: another distribution's models/ may lie beside it
    for folder in ("agrel_sim", "models"):
        (site / folder).mkdir(parents=True)
    write(site / "models", GOOD, "tiny.toml")
    monkeypatch.setattr(config, "__file__", str(site / "agrel_sim" / "config.py"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        load_model("tiny")
    assert f"tried:\n  {tmp_path / 'models' / 'tiny.toml'}\ngive a path" in str(error.value)
    (site / "pyproject.toml").write_text("")  # a checkout (an editable install runs from it)
    assert load_model("tiny").name == "tiny"


def test_a_link_that_leads_to_no_model_file_is_named(tmp_path):
    (tmp_path / "loop.toml").symlink_to(tmp_path / "loop.toml")
    (tmp_path / "gone.toml").symlink_to(tmp_path / "moved.toml")
    for name in ("loop.toml", "gone.toml"):
        with pytest.raises(ConfigError, match=rf"{name}: a link that leads to no file \(its target is missing, or links loop\); point it at a model file, or give that file's path"):
            load_model(tmp_path / name)


def test_a_search_folder_that_does_not_exist_is_named(tmp_path, monkeypatch):
    # A misspelt folder must not let the repository's model of the same name be used instead.
    monkeypatch.setenv("AGREL_SIM_MODELS", str(tmp_path / "mymodel"))
    with pytest.raises(ConfigError, match=r"AGREL_SIM_MODELS: .*mymodel is not a folder; set AGREL_SIM_MODELS to folders of model files"):
        load_model("mnist_fc3")


def test_a_folder_or_an_unreadable_file_given_as_a_model_is_named(tmp_path):
    (tmp_path / "net.toml").mkdir()
    with pytest.raises(ConfigError, match=r"net\.toml: is a folder; give the path of a model file \(\.toml\)"):
        load_model(tmp_path / "net.toml")
    with pytest.raises(ConfigError, match=r"net\.toml: is a folder; give the path of a \.toml file$"):
        ColumnNetwork.from_toml(tmp_path / "net.toml")
    with pytest.raises(ConfigError, match=r"nowhere\.toml: no such file; give the path of a \.toml file$"):
        ColumnNetwork.from_toml(tmp_path / "nowhere.toml")


@pytest.mark.parametrize("arguments, message", [
    (dict(input_shape=784), r"input_shape: expected a list or tuple, got int 784"),
    (dict(layers=Dense(3)), r"layers: expected a list or tuple, got Dense"),
    (dict(layers="dense"), r"layers: expected a list or tuple, got str 'dense'"),
    (dict(rule=dict(learning_rate=0.1)), r"rule: expected an object of class Rule \(or use network\.replace\(rule=dict\(\.\.\.\)\)\), got \{'learning_rate': 0\.1\}"),
    (dict(action_selection=Rule()), r"action_selection: expected an object of class ActionSelection"),
    (dict(neuromodulator=None), r"neuromodulator: expected an object of class Neuromodulator .*got None"),
])
def test_a_network_built_in_code_with_a_wrong_kind_of_part_is_named(arguments, message):
    with pytest.raises(ConfigError, match=r"<python>: " + message):
        ColumnNetwork(**{"input_shape": (4,), "layers": [Dense(3)], "n_actions": 3, **arguments})


def test_an_experiment_built_in_code_is_checked_like_a_file():
    from agrel_sim.experiment import Experiment
    from agrel_sim.recorder import LogSettings
    from agrel_sim.training import TrainingSettings

    net = ColumnNetwork((1, 8, 8), [Dense(8)], 10)
    for arguments, message in [
        (("e", net, "digit", TrainingSettings()), r"dataset: expected one of \[.*'digits'.*\], got 'digit'"),
        (("e", net, ["digits"], TrainingSettings()), r"dataset: expected one of \[.*'digits'.*\], got \['digits'\]"),
        (("e", net.to_dict(), "digits", TrainingSettings()), r"model: expected an object of class ColumnNetwork, got dict"),
        (("e", net, "digits", {"batch_size": 5}), r"training: expected an object of class TrainingSettings, got dict"),
    ]:
        with pytest.raises(ConfigError, match=r"<python>: " + message):
            Experiment(*arguments)
    with pytest.raises(ConfigError, match=r"<python>: logging: expected an object of class LogSettings, got dict"):
        Experiment("e", net, "digits", TrainingSettings(), logging={"every_batches": 5})
    experiment = Experiment("e", net, "digits", TrainingSettings(), logging=LogSettings(every_batches=5))
    assert experiment.logging.every_batches == 5
    from agrel_sim.runs import run_experiment

    with pytest.raises(ValueError, match=r"logging: expected an object of class LogSettings, got dict"):
        run_experiment(experiment, logging={"every_batches": 5})


def test_a_learning_rate_decay_factor_of_1_keeps_the_rate():
    from agrel_sim.experiment import Experiment

    model = {"name": "linear", "input_shape": [1, 8, 8], "layers": [], "output": {"actions": 10}}
    for factor in (1, 1.0):
        experiment = Experiment.from_dict({"name": "e", "model": model, "dataset": "digits", "training": {"lr_decay_factor": factor}}, "<test>")
        assert experiment.training.lr_decay_factor == 1.0


def test_integers_beyond_64_bits_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"layers\[2\]\.units: expected an integer >= 1, got an integer of about 31 digits \(outside the 64-bit integers that torch takes\)"):
        ColumnNetwork.from_toml(write(tmp_path, GOOD.replace("units = 16", "units = 1" + "0" * 30)))
    with pytest.raises(ConfigError, match=r"net\.toml: not valid TOML: Exceeds the limit \(4300 digits\)"):
        ColumnNetwork.from_toml(write(tmp_path, GOOD + "x = " + "1" * 5000 + "\n"))


@pytest.mark.parametrize("value", ["[" * 2000 + "]" * 2000, "{a = " * 2000 + "1" + "}" * 2000], ids=["arrays", "inline tables"])
def test_values_nested_too_deeply_to_read_are_named(tmp_path, value):
    with pytest.raises(ConfigError, match=r"net\.toml: cannot be read: its arrays or tables are nested too deeply \(hundreds of levels\)"):
        ColumnNetwork.from_toml(write(tmp_path, "x = " + value + "\n" + GOOD))


def test_an_integer_too_large_for_a_float_is_named(tmp_path):
    text = GOOD.replace("learning_rate = 0.1", "learning_rate = 1" + "0" * 400)
    assert text != GOOD
    with pytest.raises(ConfigError, match=r"rule\.learning_rate: expected a finite number, got an integer of 401 digits"):
        ColumnNetwork.from_toml(write(tmp_path, text))


def test_every_repository_model_loads_by_name_and_is_written_back_as_an_equal_one(tmp_path):
    paths = sorted((Path(__file__).parent.parent / "models").glob("*.toml"))
    assert len(paths) >= 14, "the paper's Table 1 networks"
    for path in paths:
        network = load_model(path.stem)
        assert network.name == path.stem
        assert load_model(network.to_toml(tmp_path / path.name)) == network


def test_a_network_built_in_python_is_written_as_a_model_file_that_loads_by_name(tmp_path, monkeypatch):
    network = ColumnNetwork((1, 8, 8), [Conv2d(4, 3, stride=2, padding=1), Dropout(0.25), Dense(16)], 10, ActionSelection(0.1, 0.5),
                            Neuromodulator(2.0, -1.0), Rule(learning_rate=1e-3, bias=True, feedback="independent", weight_decay=0.5), name="mine")
    (tmp_path / "models").mkdir()
    path = network.to_toml(tmp_path / "models" / "mine.toml")
    assert path.read_text().startswith("# Written by agrel_sim's ColumnNetwork.to_toml.\n")
    monkeypatch.chdir(tmp_path)
    assert load_model("mine") == network
    other = network.replace(layers=[Dense(3)])
    with pytest.raises(ConfigError, match=r"mine\.toml: exists already; give another path, or pass overwrite=True to replace it"):
        other.to_toml(path)
    assert load_model("mine") == network, "left as it was"
    other.to_toml(path, overwrite=True)
    assert load_model("mine") == other and sorted(p.name for p in path.parent.iterdir()) == ["mine.toml"]
    (tmp_path / "folder.toml").mkdir()
    for bad, message in [
        ("mine.json", r"mine\.json: not a path for a TOML file: its name does not end in \.toml"), ("folder.toml", r"folder\.toml: is a folder"),
        ("nowhere/mine.toml", r"nowhere/mine\.toml: its folder .*nowhere does not exist; make it first"),
    ]:
        with pytest.raises(ConfigError, match=message):
            network.to_toml(tmp_path / bad, overwrite=True)


@pytest.mark.parametrize(
    "change, message",
    [
        (('kind = "dropout"', 'kind = "pooling"'), r"net\.toml: layers\[1\]\.kind: unknown layer kind 'pooling'"),
        (("units = 16\n", ""), r"net\.toml: layers\[2\]\.units: missing"),
        (("kernel_size = 3", "kernel_size = 11"), r"net\.toml: layers\[0\]\.kernel_size: kernel 11×11 is larger than its input 8×8"),
        (("channels = 4", "chanels = 4"), r"net\.toml: layers\[0\]\.chan+els: unknown field|layers\[0\]\.channels: missing"),
        (("units = 16\n", "units = 16\nname = 'tiny'\n"), r"net\.toml: layers\[2\]\.name: unknown field; the fields here are: kind, units; name is a key of the top level: move it above the file's first table"),
        (("channels = 4", "channels = 4\nchanels = 4"), r"net\.toml: layers\[0\]\.chanels: unknown field; the fields here are: channels, kernel_size, kind, padding, stride$"),
        (("rate = 0.5", "rate = 1.5"), r"net\.toml: layers\[1\]\.rate: expected a fraction in \[0, 1\), got 1\.5"),
        (('feedback = "reciprocal"', 'feedback = "mirror"'), r"net\.toml: rule\.feedback: expected one of"),
        (("[output]\nactions = 10", ""), r"net\.toml: output: missing table$"),
        (("[output]", "[outptu]"), r"net\.toml: output: missing table \(the file has 'outptu': a misspelling of 'output'\?\)$"),
        (("kind = \"dense\"", "knd = \"dense\""), r"net\.toml: layers\[2\]\.kind: missing; .* \(the table has 'knd': a misspelling of 'kind'\?\)$"),
        (("input_shape = [1, 8, 8]", "input_shape = [8, 8]"), r"net\.toml: input_shape: expected a list"),
        (("learning_rate = 0.1", "learning_rate = true"), r"net\.toml: rule\.learning_rate: expected a number > 0, got True"),
        (("learning_rate = 0.1", "learning_rate = 0.1\nbias = 1"), r"net\.toml: rule\.bias: expected true or false, got 1"),
        (("learning_rate = 0.1", "learning_rate = 0.1\ninit_range = 0"), r"net\.toml: rule\.init_range: expected a number > 0, got 0\.0"),
        (("[output]", "[action_selection]\ntau = -1\n[output]"), r"net\.toml: action_selection\.tau: expected a temperature > 0, got -1\.0"),
        (("stride = 2", "stride = 2 +"), r"net\.toml: not valid TOML"),
        (("learning_rate = 0.1", "learning_rate = inf"), r"net\.toml: rule\.learning_rate: expected a number > 0, got inf"),
        (("[output]", "[neuromodulator]\nreward_correct = nan\n[output]"), r"net\.toml: neuromodulator\.reward_correct: expected a finite number, got nan"),
        (("actions = 10", "actions = 1"), r"net\.toml: output\.actions: expected an integer >= 2, got 1"),
        (("input_shape = [1, 8, 8]", "input_shape = [64]"), r"net\.toml: input_shape: \[64\] is a vector, but layers\[0\] is a conv layer, which needs a sheet: give input_shape as \[C, H, W\]"),
        (("learning_rate = 0.1", "learning_rate = 0.5\nweight_decay = 2.0"), r"net\.toml: rule\.weight_decay: learning_rate × weight_decay is 1; it must be below 1"),
    ],
)
def test_bad_model_files_name_file_and_field(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        ColumnNetwork.from_toml(write(tmp_path, GOOD.replace(*change)))


def test_bad_descriptions_in_python():
    with pytest.raises(ConfigError, match=r"<python>: layers\[1\]: a conv layer needs a C×H×W sheet"):
        ColumnNetwork((1, 8, 8), [Dense(5), Conv2d(2, 3)], 3)
    with pytest.raises(ConfigError, match=r"layers\[1\]\.kernel_size: kernel 5×5 is larger than its input 3×3"):
        ColumnNetwork((1, 8, 8), [Conv2d(2, 3, stride=2), Conv2d(2, 5)], 3)
    with pytest.raises(ConfigError, match=r"layers\[0\]: unknown layer"):
        ColumnNetwork((4,), ["dense"], 3)
    with pytest.raises(ConfigError, match=r"rule\.init_range: expected a number > 0"):
        ColumnNetwork((4,), [Dense(3)], 3, rule=Rule(init_range=0))


@pytest.mark.parametrize("make, message", [
    (lambda: ColumnNetwork((1, 8, 8), [Conv2d(4, 3, padding=-1)], 10), r"layers\[0\]\.padding: expected an integer from 0 to kernel_size - 1 = 2, got -1"),
    (lambda: ColumnNetwork((1, 8, 8), [Conv2d(4, 3, padding=1.5)], 10), r"layers\[0\]\.padding: expected an integer from 0 to kernel_size - 1 = 2, got 1\.5"),
    (lambda: ColumnNetwork((1, 8, 8), [LocallyConnected2d(4, 3, padding=3)], 10), r"layers\[0\]\.padding: expected an integer from 0 to kernel_size - 1 = 2, got 3"),
    (lambda: ColumnNetwork((4,), [Dense(3), Dropout("0.5")], 3), r"layers\[1\]\.rate: expected a fraction in \[0, 1\), got '0\.5'"),
    (lambda: ColumnNetwork((4,), [Dense(3)], 3, rule=Rule(bias="no")), r"rule\.bias: expected true or false, got 'no'"),
    (lambda: ColumnNetwork((4,), [Dense(3)], 3, rule=Rule(learning_rate=None)), r"rule\.learning_rate: expected a number > 0, got None"),
    (lambda: ColumnNetwork((4,), [Dense(3)], 3, rule=Rule(learning_rate=float("inf"))), r"rule\.learning_rate: expected a number > 0, got inf"),
    (lambda: ColumnNetwork((4,), [Dense(3)], 3, neuromodulator=Neuromodulator(float("nan"))), r"neuromodulator\.reward_correct: expected a finite number, got nan"),
    (lambda: ColumnNetwork((4,), [Dense(3)], 3, action_selection=ActionSelection(epsilon="0.1")), r"action_selection\.epsilon: expected a probability in \[0, 1\], got '0\.1'"),
    (lambda: ColumnNetwork((4,), [Dense(3)], 3, rule=Rule(learning_rate=0.5, weight_decay=4)), r"rule\.weight_decay: learning_rate × weight_decay is 2; it must be below 1"),
    (lambda: ColumnNetwork((4,), [Dense(2**63)], 3), r"layers\[0\]\.units: expected an integer >= 1, got 9223372036854775808"),
    (lambda: ColumnNetwork((4,), [Dense(3), Dropout(1.0)], 3), r"layers\[1\]\.rate: expected a fraction in \[0, 1\), got 1\.0"),
    (lambda: ColumnNetwork((4,), [Dropout(0.5), Dense(3)], 3), r"layers\[0\]: dropout must follow a column layer, not the input"),
    (lambda: ColumnNetwork((1, 5, 5), [Conv2d(2, 6)], 3), r"layers\[0\]\.kernel_size: kernel 6×6 is larger than its input 5×5 \(padding 0\)"),
    (lambda: ColumnNetwork((4,), [Dense(3)], 3, name=3), r"name: expected a non-empty string, got 3"),
    (lambda: ColumnNetwork((4,), [Dense(3)], 3, name=" "), r"name: expected a non-empty string, got ' '"),
    (lambda: ColumnNetwork((4,), [Dense(2**70)], 3), r"layers\[0\]\.units: expected an integer >= 1, got 1180591620717411303424 \(outside the 64-bit integers that torch takes\)"),
    (lambda: ColumnNetwork((4,), [Dense(10**400)], 3), r"layers\[0\]\.units: expected an integer >= 1, got an integer of about 401 digits \(outside the 64-bit integers that torch takes\)"),
    (lambda: ColumnNetwork((4,), [Dense(3)], 3, rule=Rule(learning_rate=10**400)), r"rule\.learning_rate: expected a number > 0, got an integer of about 401 digits"),
    (lambda: ColumnNetwork((4,), [Dense(np.int64(3))], 3), r"layers\[0\]\.units: expected an integer >= 1, got np\.int64\(3\) \(a NumPy integer; give a Python one: int\(x\)\)"),
    (lambda: ColumnNetwork((4,), [Dense(3)], 3, rule=Rule(learning_rate=np.float64(-1))), r"rule\.learning_rate: expected a number > 0, got np\.float64\(-1\.0\)$"),
    # Settings are stored as JSON: other kinds of number would pass here and fail as the run file is written.
    (lambda: ColumnNetwork((4,), [Dense(3), Dropout(np.float32(0.5))], 3), r"layers\[1\]\.rate: expected a fraction in \[0, 1\), got np\.float32\(0\.5\) \(a NumPy float; give a Python float: float\(x\)\)"),
    (lambda: ColumnNetwork((4,), [Dense(3)], 3, rule=Rule(learning_rate=Fraction(1, 2))), r"rule\.learning_rate: expected a number > 0, got Fraction\(1, 2\) \(a Fraction; give a Python float: float\(x\)\)"),
    (lambda: ColumnNetwork((4,), [Dense(3)], 3, neuromodulator=Neuromodulator(np.int64(1))), r"neuromodulator\.reward_correct: expected a finite number, got np\.int64\(1\) \(a NumPy integer; give a Python one: int\(x\)\)"),
])
def test_descriptions_built_in_python_are_checked_like_files(make, message):
    with pytest.raises(ConfigError, match=r"<python>: " + message):
        make()


def test_a_value_set_by_replace_is_not_blamed_on_the_file():
    with pytest.raises(ConfigError, match=r"models/mnist_fc3\.toml changed by replace\(rule\): rule\.learning_rate: expected a number > 0, got -1"):
        load_model("mnist_fc3").replace(rule=dict(learning_rate=-1))
    assert load_model("mnist_fc3").replace(name="other") == load_model("mnist_fc3").replace(name="other", source="elsewhere")
    with pytest.raises(ConfigError, match=r"replace: rule: 'lr' is no field of Rule; its fields are: name, learning_rate, bias, init_range, feedback, weight_decay"):
        load_model("mnist_fc3").replace(rule=dict(lr=0.1))
    with pytest.raises(ConfigError, match=r"replace: 'actions' is no field of ColumnNetwork; its fields are: input_shape, layers, n_actions, .*source"):
        load_model("mnist_fc3").replace(actions=3)


def test_a_kernel_may_cover_its_whole_padded_input():
    assert ColumnNetwork((1, 5, 5), [Conv2d(2, 5)], 3).layer_shapes() == [(1, 5, 5), (2, 1, 1), (3,)]
    assert ColumnNetwork((1, 3, 3), [LocallyConnected2d(2, 5, padding=1)], 3).layer_shapes() == [(1, 3, 3), (2, 1, 1), (3,)]


def test_an_unknown_backend_is_named():
    # Batches and weights that do not match the network: tests/test_backend_scenarios.py, for every backend.
    with pytest.raises(ValueError, match=r"backend: unknown backend 'jax'; available: \['brian2', 'torch'\]"):
        build(ColumnNetwork((1, 8, 8), [Dense(5)], 3), backend="jax")


def test_the_defaults_are_the_spec_choices_in_python_and_in_toml():
    # SPEC.md: epsilon = 0.02 and tau = 1, r = 1 for the correct class else 0, no biases, W' tied
    # to W. A description written in Python and one read from a file that leaves these tables out
    # must be the same network.
    python = ColumnNetwork((4,), [Dense(3)], 2)
    from_file = ColumnNetwork.from_dict({"name": "network", "input_shape": [4], "layers": [{"kind": "dense", "units": 3}], "output": {"actions": 2}})
    for network in (python, from_file):
        selection, modulator = network.action_selection, network.neuromodulator
        assert (selection.epsilon, selection.tau) == (0.02, 1.0)
        assert (modulator.reward_correct, modulator.reward_wrong) == (1.0, 0.0)
        assert network.rule.bias is False and network.rule.feedback == "tied"
    assert python == from_file
