"""The Brian2 backend: parity with the torch backend, its time course, its settings and errors."""

import gc
import itertools
import math
import re
import subprocess
import sys
import warnings

import brian2
import h5py
import numpy as np
import pytest
import torch

from agrel_sim import ColumnNetwork, Conv2d, Dense, Dropout, LocallyConnected2d, Rule, build
from agrel_sim.backends import UnsupportedLayerError, brian2_backend

TAU = 10.0  # ms, both time constants in the parity runs
# Many tests run short trials on purpose (to be quick, or to measure the transient).
pytestmark = pytest.mark.filterwarnings("ignore:brian2 backend.*short of its fixed point:UserWarning")


def describe(feedback="tied", bias=False, weight_decay=0.0, layers=(Dense(6), Dense(5)), n_inputs=8, n_actions=4):
    rule = Rule(learning_rate=0.5, init_range=0.5, feedback=feedback, bias=bias, weight_decay=weight_decay)
    return ColumnNetwork((n_inputs,), list(layers), n_actions, rule=rule, name="small")


def settled(description, settling, **options):
    """A Brian2 net whose ff and fb activity settle for ``settling`` time constants each."""
    return build(
        description, backend="brian2", dtype=torch.float64, tau_ff=TAU, tau_fb=TAU, dt=1.0,
        t_stimulus=settling * TAU, t_selection=TAU, t_feedback=(settling - 1) * TAU, t_rpe=1.0, t_plasticity=2.0,
        **options,
    )


def batches(description, sizes, seed=7):
    g = torch.Generator().manual_seed(seed)
    for size in sizes:
        images = torch.rand((size, *description.input_shape), generator=g, dtype=torch.float64)
        labels = torch.randint(description.n_actions, (size,), generator=g)
        actions = torch.randint(description.n_actions, (size,), generator=g)
        yield images, labels, actions


def with_biases(net):
    """Biases from -0.5 to 0.5: columns whose drive changes sign while the layers settle."""
    weights = net.weights()
    for key in weights:
        if key.endswith(".bias"):
            weights[key] = torch.linspace(-0.5, 0.5, len(weights[key]), dtype=torch.float64)
    net.load_weights(weights)
    return weights


# Settling time / tau -> bound on max|W_brian2 - W_torch| / max|W_torch - W_start| after the
# sequence of trials below (measured: tied 2.7e-1, 1.3e-2, 1.9e-5; independent with biases and
# decay 6.4e-2, 5.8e-3, 1.3e-5).
PARITY_TOLERANCE = {4: 0.4, 8: 0.04, 16: 1e-4}


@pytest.mark.parametrize("feedback, bias, weight_decay", [("tied", False, 0.0), ("independent", True, 0.1)])
def test_weights_match_torch_within_a_tolerance_that_shrinks_with_settling_time(feedback, bias, weight_decay):
    description = describe(feedback, bias, weight_decay, layers=(Dense(10), Dense(9), Dense(8)), n_inputs=12)
    errors = {}
    for settling, tolerance in PARITY_TOLERANCE.items():
        reference = build(description, dtype=torch.float64, seed=0)
        net = settled(description, settling, seed=0)
        start = with_biases(reference)
        net.load_weights(start)
        for images, labels, actions in batches(description, (5, 1, 6)):
            expected = reference.run_trials(images, labels, actions=actions)
            trials = net.run_trials(images, labels, actions=actions)
            assert torch.equal(trials.action, actions) and torch.equal(trials.reward, expected.reward)
        after, expected = net.weights(), reference.weights()
        change = max((expected[k] - start[k]).abs().max().item() for k in expected)
        errors[settling] = max((after[k] - expected[k]).abs().max().item() for k in expected) / change
        print(f"{feedback}: settling {settling} tau: max weight difference / max change = {errors[settling]:.2e} (tolerance {tolerance})")
        assert errors[settling] < tolerance, settling
    assert errors[4] > errors[8] > errors[16] > 0


def test_a_column_whose_drive_turns_negative_closes_its_gate_while_its_activity_decays():
    # Its activity decays towards 0 without reaching it; its gate follows the drive, so every gate
    # is the torch backend's, also for the columns still active at the trial's end.
    description = describe("independent", bias=True, layers=(Dense(10), Dense(9), Dense(8)), n_inputs=12)
    reference = build(description, dtype=torch.float64, seed=0)
    start = with_biases(reference)
    net = settled(description, 16, seed=0)
    net.load_weights(start)
    images, labels, actions = next(batches(description, (5,)))
    records = net.run_trials(images, labels, actions=actions, learn=False, record=True).layers
    expected = reference.run_trials(images, labels, actions=actions, learn=False, record=True).layers
    decaying = sum(int(((record.ff > 0) & ~record.gate).sum()) for record in records)
    assert decaying > 0, "the scenario has columns that are decaying at the trial's end"
    assert all(torch.equal(record.gate, reference.gate) for record, reference in zip(records, expected))
    # The gates recorded are those the simulation used: its own, read after the last trial.
    for record, layer in zip(records[:-1], net.layers[:-1]):
        assert np.array_equal(record.gate[-1].numpy(), layer.ff_neurons.gate[:] == 1) and np.array_equal(layer.fb_neurons.gate[:], layer.ff_neurons.gate[:])


def simulated_chain(steps, dt, tau, stages):
    """What the last of ``stages`` low-pass stages, integrated as the backend does (exponential
    Euler, each stage driven by the one below as it was at the step's start), has still to go
    after ``steps`` steps of a unit step."""
    decay = math.exp(-dt / tau)
    chain = np.zeros(stages)
    for _ in range(steps):
        chain = decay * chain + (1 - decay) * np.concatenate([[1.0], chain[:-1]])
    return 1 - chain[-1]


def test_the_unsettled_fraction_is_that_of_the_simulated_chain():
    for steps, dt, tau, stages in [(100, 1.0, 10.0, 3), (5, 20.0, 10.0, 3), (40, 0.5, 3.0, 6), (2, 1.0, 0.5, 4), (7, 1.0, 1e-3, 3)]:
        assert brian2_backend.unsettled_fraction(steps, dt, tau, stages) == pytest.approx(simulated_chain(steps, dt, tau, stages), rel=1e-9, abs=1e-300)
    assert brian2_backend.unsettled_fraction(100, 1.0, 1e-200, 3) == 0.0, "a tiny tau: settled at once, no overflow"
    assert brian2_backend.unsettled_fraction(2, 1.0, 1e-320, 3) == 1.0, "each stage takes a step, however short its tau"
    assert brian2_backend.unsettled_fraction(0, 1.0, 10.0, 3) == 1.0
    fine = brian2_backend.unsettled_fraction(30_000, 1e-3, 10.0, 2)  # a fine dt: the continuous chain, exp(-x)(1 + x)
    assert fine == pytest.approx(4 * math.exp(-3), rel=1e-3)


def test_the_settling_time_named_is_the_shortest_for_any_time_constant():
    for dt, tau, stages in [(1.0, 10.0, 3), (1.0, 10.0, 6), (0.1, 3.0, 2), (1.0, 0.5, 4), (20.0, 10.0, 3)]:
        brute = next(n for n in itertools.count(1) if brian2_backend.unsettled_fraction(n, dt, tau, stages) <= brian2_backend.SETTLING_TOLERANCE)
        for too_few in {0, 1, brute // 3, brute - 1}:  # any number of steps that does not settle
            assert brian2_backend._steps_to_settle(too_few, dt, tau, stages, 10**7) == brute, (dt, tau, stages, too_few)
        assert brian2_backend._steps_to_settle(0, dt, tau, stages, brute - 1) is None
    steps = brian2_backend._steps_to_settle(100, 1.0, 1e6, 3, 10**9)  # a tau of 10**6 steps, found at once
    assert brian2_backend.unsettled_fraction(steps, 1.0, 1e6, 3) <= 0.01 < brian2_backend.unsettled_fraction(steps - 1, 1.0, 1e6, 3)


def test_q_values_read_early_are_short_by_the_unsettled_fraction_and_a_warning_says_so():
    # Positive weights and inputs keep every column active: the net is linear, each path from
    # the input to the output crosses the same number of stages, so the Q-values read after a
    # coarse t_stimulus are short of the torch backend's by exactly the unsettled fraction.
    description = describe(layers=(Dense(6), Dense(5)), n_inputs=8)
    reference = build(description, dtype=torch.float64, seed=1)
    positive = {name: weights.abs() for name, weights in reference.weights().items()}
    reference.load_weights(positive)
    images = torch.rand(5, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"with 3 levels of columns the ff activity is still 2\.00% short of its fixed point when the Q-values are read .* t_stimulus = 120 ms brings that to 1%"):
        net = build(description, backend="brian2", dtype=torch.float64, seed=1, dt=20.0, t_rpe=20.0, t_plasticity=20.0)
    net.load_weights(positive)
    shortfall = 1 - net.q_values(images) / reference.q_values(images)
    assert torch.allclose(shortfall, torch.full_like(shortfall, brian2_backend.unsettled_fraction(5, 20.0, 10.0, 3)), rtol=1e-6)


def test_a_time_constant_too_long_to_settle_within_a_trial_is_named():
    with pytest.warns(UserWarning, match=r"no t_stimulus brings that to 1% within the 10,000,000 time steps of a trial simulated: choose a shorter tau_ff"):
        build(describe(), backend="brian2", tau_ff=1e7)
    build(describe(), backend="brian2", tau_ff=1e-300)  # settled within a step a level: no warning, no overflow
    with pytest.raises(ValueError, match=r"^tau_fb: 1e-320 ms is so far below dt = 1 ms that dt / tau_fb overflows; any tau_fb below dt / 1000 settles within a time step: give one of those$"):
        build(describe(), backend="brian2", tau_fb=1e-320)


def test_a_time_step_too_small_for_the_phases_is_named():
    with pytest.raises(ValueError, match=r"^dt: 1e-05 ms makes a trial 22,000,000 time steps long \(t_stimulus: 10,000,000\); at most 10,000,000 are simulated: choose a larger dt, or a shorter t_stimulus$"):
        build(describe(), backend="brian2", dt=1e-5)
    with pytest.raises(ValueError, match=r"^dt: 1 ms makes a trial 1e\+300 time steps long \(t_stimulus: 1e\+300\); .* or a shorter t_stimulus$"):
        build(describe(), backend="brian2", t_stimulus=1e300)
    with pytest.raises(ValueError, match=r"^dt: 1e-310 ms makes t_stimulus \(100 ms\) too many time steps long to count; at most 10,000,000 are simulated in a trial: choose a larger dt$"):
        build(describe(), backend="brian2", dt=1e-310)


def test_the_settling_warning_names_the_caller_of_train_too():
    # train is decorated by a contextlib context manager: the frame between the caller and
    # agrel-sim is the standard library's, which the warning must not name.
    from agrel_sim.datasets import Dataset
    from agrel_sim.training import TrainingSettings, train

    description = describe(n_inputs=6, n_actions=3)
    pixels = torch.randint(0, 256, (12, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data = Dataset("tiny", pixels[:8], torch.arange(8) % 3, pixels[8:], torch.arange(4) % 3, 1 / 255, 3)
    settings = TrainingSettings(batch_size=4, max_epochs=1, patience=10, validation_size=4)
    with pytest.warns(UserWarning, match="brian2 backend: with 3 levels of columns") as caught:
        train(description, data, settings, progress=False, log=None, backend="brian2", backend_options=dict(t_stimulus=5, t_feedback=5, t_selection=1, t_rpe=1, t_plasticity=1))
    assert {w.filename for w in caught if "brian2 backend" in str(w.message)} == {__file__}


def test_initial_weights_are_the_torch_backends_for_the_same_seed():
    for feedback in ("tied", "reciprocal", "independent"):
        description = describe(feedback, bias=True)
        expected = build(description, dtype=torch.float64, seed=3).weights()
        weights = build(description, backend="brian2", dtype=torch.float64, seed=3).weights()
        assert weights.keys() == expected.keys()
        for key in expected:
            assert torch.equal(weights[key], expected[key]), (feedback, key)


def test_phases_too_short_for_a_deep_network_warn_and_the_durations_named_settle_it():
    description = describe(layers=[Dense(6) for _ in range(5)])
    images = next(batches(description, (3,)))[0]
    exact = build(description, dtype=torch.float64).q_values(images)
    with pytest.warns(UserWarning, match="brian2 backend: with 6 levels of columns") as caught:
        defaults = build(description, backend="brian2", dtype=torch.float64)
    messages = [str(w.message) for w in caught if "brian2 backend" in str(w.message)]
    assert {w.filename for w in caught if "brian2 backend" in str(w.message)} == {__file__}, "the warning names the caller"
    with pytest.warns(UserWarning, match="brian2 backend") as direct:
        brian2_backend.build(description, dtype=torch.float64)
    assert {w.filename for w in direct if "brian2 backend" in str(w.message)} == {__file__}
    assert len(messages) == 2 and "ff activity is still 7.73%" in messages[0] and "fb activity" in messages[1]
    named = dict(re.search(r"(t_\w+) = (\d+) ms", message).groups() for message in messages)
    assert named == {"t_stimulus": "134", "t_feedback": "104"}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="brian2 backend")
        settled_net = build(description, backend="brian2", dtype=torch.float64, **{k: float(v) for k, v in named.items()})
        build(describe(), backend="brian2")  # 3 levels settle in the default phases

    def error(net):
        return ((net.q_values(images) - exact).abs().max() / exact.abs().max()).item()

    print(f"Q-values off by {error(defaults):.4f} under the default phases, {error(settled_net):.4f} under those named")
    assert error(defaults) > 0.05 and error(settled_net) <= 0.01


def test_settled_activity_and_q_values_match_torch():
    description = describe()
    reference = build(description, dtype=torch.float64)
    net = settled(description, settling=16)
    images, labels, actions = next(batches(description, (3,)))
    close = dict(rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(net.q_values(images), reference.q_values(images), **close)
    expected = reference.run_trials(images, labels, actions=actions, learn=False, record=True)
    trials = net.run_trials(images, labels, actions=actions, learn=False, record=True)
    torch.testing.assert_close(trials.delta, expected.delta, **close)
    assert [r.name for r in trials.layers] == [r.name for r in expected.layers] == ["layers.0", "layers.1", "output"]
    for record, reference_record in zip(trials.layers, expected.layers):
        assert torch.equal(record.gate, reference_record.gate), record.name
        torch.testing.assert_close(record.ff, reference_record.ff, **close)
        torch.testing.assert_close(record.fb, reference_record.fb, **close)
    assert net.weights()["output.ff"].equal(reference.weights()["output.ff"]), "learn=False leaves the weights alone"


def test_dropout_drops_the_columns_that_torch_drops_and_learns_as_it_does():
    # The same seed drops the same columns (drawn as torch draws them, before the draws of action
    # selection), so the same actions are chosen; activity, gates, feedback and weight changes
    # agree, stacked dropout layers included (one of rate 0, which passes its input on).
    layers = (Dense(10), Dropout(0.5), Dropout(0.0), Dense(9), Dropout(0.3), Dropout(0.2), Dense(8))
    description = describe("independent", bias=True, layers=layers, n_inputs=12)
    reference = build(description, dtype=torch.float64, seed=3)
    net = settled(description, settling=16, seed=3)
    start = with_biases(reference)
    net.load_weights(start)
    close = dict(rtol=1e-3, atol=1e-6)  # four column layers, 16 time constants to settle
    for images, labels, _ in batches(description, (6, 5)):
        expected = reference.run_trials(images, labels, record=True)
        trials = net.run_trials(images, labels, record=True)
        assert torch.equal(trials.action, expected.action)
        assert [r.name for r in trials.layers] == [r.name for r in expected.layers] == [*(f"layers.{index}" for index in range(7)), "output"]
        for record, reference_record in zip(trials.layers, expected.layers):
            assert torch.equal(record.gate, reference_record.gate), record.name
            torch.testing.assert_close(record.ff, reference_record.ff, **close)
            torch.testing.assert_close(record.fb, reference_record.fb, **close)
            assert (record.changed is None) == (reference_record.changed is None), record.name
        assert ((trials.layers[0].ff > 0) & ~trials.layers[0].gate).any() and ((trials.layers[3].ff > 0) & ~trials.layers[3].gate).any(), "active columns dropped"
    after, expected = net.weights(), reference.weights()
    change = max((expected[k] - start[k]).abs().max().item() for k in expected)
    assert max((after[k] - expected[k]).abs().max().item() for k in expected) < 1e-4 * change
    images, _, _ = next(batches(description, (4,)))
    torch.testing.assert_close(net.q_values(images), reference.q_values(images), **close)  # no dropout outside learning


def test_greedy_selection_takes_the_highest_q_value():
    description = describe().replace(action_selection={"epsilon": 0.0})
    net = build(description, backend="brian2", dtype=torch.float64)
    images, labels, _ = next(batches(description, (5,)))
    trials = net.run_trials(images, labels, learn=False)
    assert torch.equal(trials.action, trials.q.argmax(1))
    assert torch.equal(trials.reward, (trials.action == labels).double())


def test_trace_shows_the_phases_of_a_trial():
    description = describe()
    net = build(description, backend="brian2", dtype=torch.float64, trace_every=2)
    images, labels, actions = next(batches(description, (3,)))
    before = net.weights()["layers.0.ff"].clone()  # the batch's updates come after its last trial
    trials = net.run_trials(images, labels, actions=actions)
    assert [trace.trial for trace in trials.traces] == [0, 2]
    trace = trials.traces[1]
    phases = trace.phases
    assert list(phases) == ["stimulus", "selection", "feedback", "rpe", "plasticity"]
    assert phases["stimulus"] == (0.0, 0.1) and phases["plasticity"][1] == pytest.approx(0.22)
    np.testing.assert_allclose(trace.t, np.arange(1, 221) * 1e-3)
    selection, rpe = round(phases["selection"][0] * 1000), round(phases["rpe"][0] * 1000)
    names = [layer.name for layer in trace.layers]
    assert names == ["input", "layers.0", "layers.1", "output"]
    for layer in trace.layers:
        assert layer.ff.shape == layer.fb.shape == layer.gate.shape and layer.ff.shape[0] == 220
        assert np.all(layer.fb[:selection] == 0), f"{layer.name}: no feedback before the selection"
    stimulus, hidden, output = trace.layers[0], trace.layers[1], trace.layers[3]
    np.testing.assert_array_equal(stimulus.ff, np.broadcast_to(images[2].numpy(), stimulus.ff.shape))
    # The rule's gate: open while the column's drive is above 0. The input holds still through
    # the trial, and with it the drive of the columns above it.
    drive = (before @ images[2].double()).numpy()
    assert np.any(drive > 0) and np.any(drive < 0)
    np.testing.assert_array_equal(hidden.gate, np.broadcast_to(drive > 0, hidden.gate.shape))
    # The feedforward sweep rises towards the Q-values read at the end of the stimulus phase.
    np.testing.assert_array_equal(output.ff[selection - 1], trials.q[2].numpy())
    assert np.all(np.abs(output.ff[9]) < np.abs(output.ff[selection - 1]))
    # The chosen action's fb neuron rises towards 1; the others stay silent.
    chosen = int(actions[2])
    assert 0.99 < output.fb[-1, chosen] < 1 and np.all(np.delete(output.fb, chosen, axis=1) == 0)
    assert np.all(np.diff(output.fb[selection:, chosen]) > 0)
    # The dopamine signal is 0 until the RPE phase, then the trial's delta.
    assert np.all(trace.delta[:rpe] == 0) and np.all(trace.delta[rpe:] == trials.delta[2].item())
    # Open gates let feedback through to the hidden columns; closed ones block it.
    assert np.all(hidden.fb[-1][~hidden.gate[-1]] == 0) and np.any(hidden.fb[-1][hidden.gate[-1]] != 0)
    untraced = net.run_trials(images[:1], labels[:1])
    assert untraced.traces == [], "trial 3 is not a multiple of trace_every"


def test_durations_accept_brian2_quantities():
    description = describe()
    by_number = build(description, backend="brian2", dtype=torch.float64, tau_ff=5, t_stimulus=60, dt=0.5)
    by_quantity = build(description, backend="brian2", dtype=torch.float64, tau_ff=5 * brian2.ms, t_stimulus=60 * brian2.ms, dt=0.5 * brian2.ms)
    assert by_number.timeline == by_quantity.timeline
    assert by_number.timeline.steps == {"stimulus": 120, "selection": 40, "feedback": 160, "rpe": 20, "plasticity": 20}
    images = next(batches(description, (2,)))[0]
    torch.testing.assert_close(by_number.q_values(images), by_quantity.q_values(images), rtol=0, atol=0)


def test_cython_code_generation_gives_the_numpy_result():
    pytest.importorskip("Cython", reason="the cython target needs Cython")
    # One hidden layer without biases, like benchmarks/brian2_trials.py: compiled once, then cached.
    description = describe(layers=(Dense(6),))
    images, labels, actions = next(batches(description, (2,)))
    weights = {}
    for target in ("numpy", "cython"):
        net = build(description, backend="brian2", dtype=torch.float64, codegen_target=target, t_stimulus=30, t_feedback=30)
        net.run_trials(images, labels, actions=actions)
        weights[target] = net.weights()
        kinds = {type(item.codeobj).__name__ for item in net.layers[0].ff_neurons.contained_objects if getattr(item, "codeobj", None)}
        assert kinds == {f"{target.capitalize()}CodeObject"}, "the code was generated for this target"
    assert brian2.prefs.codegen.target == "auto", "the setting is used for the run only"
    for key in weights["numpy"]:
        torch.testing.assert_close(weights["cython"][key], weights["numpy"][key], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("layers, index", [
    ([Conv2d(2, 3), Dense(4)], 0),
    ([LocallyConnected2d(2, 3), Dense(4)], 0),
], ids=["conv", "locally_connected"])
def test_other_layer_kinds_name_the_backend_and_the_kind(layers, index):
    description = ColumnNetwork((1, 6, 6), layers, 3)
    kind = layers[index].kind
    with pytest.raises(UnsupportedLayerError, match=rf"layers\[{index}\]: the brian2 backend builds dense column layers \(and dropout\) only, not layer kind '{kind}'"):
        build(description, backend="brian2")


@pytest.mark.parametrize("options, message", [
    (dict(dtype=torch.int64), r"dtype: .*float32 or torch.float64"),
    (dict(codegen_target="cpp_standalone"), r"codegen_target: expected one of \('numpy', 'cython'\)"),
    (dict(t_feedback=80.5), r"t_feedback: 80.5 ms is not a whole number of time steps dt = 1.0 ms"),
    (dict(tau_fb=-1), r"tau_fb: expected a duration > 0"),
    (dict(t_stimulus=10**400), r"t_stimulus: expected a duration > 0, got an integer of about 401 digits ms"),
    (dict(dt=2 * brian2.mV), r"dt: expected a duration"),
    (dict(t_rpe="10 ms"), r"t_rpe: expected a duration"),
    (dict(tau_ff=True), r"tau_ff: expected a duration \(a time quantity or a number of milliseconds\), got True"),
    (dict(tau_ff=float("inf")), r"tau_ff: expected a duration > 0, got inf ms"),
    (dict(trace_every=-1), r"trace_every: expected an integer >= 0"),
    (dict(gate_threshold=1e-3), r"^gate_threshold: not an option of the brian2 backend \(a Brian2 option until agrel-sim 0\.4\.0, .*\); its options: "),
])
def test_bad_settings_name_the_setting(options, message):
    with pytest.raises(ValueError, match=message):
        build(describe(), backend="brian2", **options)


def test_a_cuda_device_is_refused_with_the_cpu_named(monkeypatch):
    # As if there were a GPU: the device is a real one, but Brian2's runtime mode runs on the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for device in ("cuda", torch.device("cuda:0")):
        with pytest.raises(ValueError, match=r"^device: the brian2 backend runs on the CPU \(Brian2 runtime mode\), got 'cuda(:0)?'$"):
            build(describe(), backend="brian2", device=device)


def test_the_first_build_in_a_process_warns_its_caller():
    # Importing Brian2 (which the first build does) routes Python warnings into Brian2's log.
    script = """
import warnings
from agrel_sim import ColumnNetwork, Dense, Rule, build
description = ColumnNetwork((8,), [Dense(6) for _ in range(5)], 4, rule=Rule(init_range=0.5))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    build(description, backend="brian2")
print(sum("brian2 backend: with 6 levels of columns" in str(w.message) for w in caught))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout) == (0, "2\n"), done.stderr


def test_a_brian2_float_type_other_than_float64_is_refused():
    brian2.prefs.core.default_float_dtype = np.float32
    try:
        with pytest.raises(ValueError, match=r"the brian2 backend computes in float64, but brian2\.prefs\.core\.default_float_dtype is <class 'numpy\.float32'>; set it to numpy\.float64"):
            build(describe(), backend="brian2")
        brian2.prefs.core.default_float_dtype = np.dtype("float64")  # which Brian2 takes as a setting, and fails on as it runs
        with pytest.raises(ValueError, match=r"default_float_dtype is dtype\('float64'\); set it to numpy\.float64"):
            build(describe(), backend="brian2")
    finally:
        brian2.prefs.core.default_float_dtype = np.float64


def test_ebp_is_refused_with_a_pointer_to_torch():
    with pytest.raises(ValueError, match=r"rule.name: the brian2 backend simulates DeepAGREL only, got 'ebp'; use backend='torch'"):
        build(describe().replace(rule={"name": "ebp"}), backend="brian2")


def test_standalone_mode_is_refused():
    brian2.set_device("cpp_standalone", build_on_run=False)
    try:
        with pytest.raises(ValueError, match=r"the brian2 backend runs in Brian2's runtime mode, but the active Brian2 device is .*CPPStandaloneDevice"):
            build(describe(), backend="brian2")
    finally:
        brian2.set_device("runtime")
    assert build(describe(), backend="brian2").q_values(torch.rand(1, 8)).shape == (1, 4)


@pytest.mark.parametrize("failing", [(brian2.Network, "run"), (brian2.Synapses, "connect")])
def test_cython_code_that_cannot_be_built_names_the_setting(monkeypatch, failing):
    def no_compiler(self, *args, **kwargs):
        raise RuntimeError("command 'c++' failed: No such file or directory")

    monkeypatch.setattr(*failing, no_compiler)
    with brian2.utils.logger.catch_logs() as logs:
        with pytest.raises(ValueError, match=r"codegen_target: Brian2 could not build its Cython code \(RuntimeError: command 'c\+\+' failed.*set codegen_target = 'numpy'"):
            build(describe(), backend="brian2", codegen_target="cython")
        gc.collect()  # the objects made go: the error is the last thing said, not Brian2's warnings about them
    assert not [log for log in logs if "never included in a network" in log[2]]
    assert brian2.prefs.codegen.target == "auto"


def test_changed_fraction_counts_the_four_factor_change_alone():
    description = describe("reciprocal", weight_decay=0.1)
    reference, net = build(description, dtype=torch.float64, seed=0), settled(description, 16, seed=0)
    images, labels, actions = next(batches(description, (3,)))
    expected = [record.changed.item() for record in reference.run_trials(images, labels, actions=actions, record=True).layers]
    changed = [record.changed.item() for record in net.run_trials(images, labels, actions=actions, record=True).layers]
    assert changed == pytest.approx(expected) and min(expected) < 1, "weight decay changes every weight, the rule fewer"


def test_an_interrupted_batch_leaves_no_pending_change(monkeypatch):
    from agrel_sim.backends import brian2_backend

    description = describe().replace(action_selection={"epsilon": 0.0})  # greedy: no random numbers drawn
    images, labels, _ = next(batches(description, (3,)))
    interrupted, clean = settled(description, 4, seed=0), settled(description, 4, seed=0)
    calls = []

    def max_boltzmann(q, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the batch
        return q.argmax(1)

    monkeypatch.setattr(brian2_backend.agrel, "max_boltzmann", max_boltzmann)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run_trials(images, labels)
    assert interrupted.trials_run == 0
    monkeypatch.undo()
    for net in (interrupted, clean):
        net.run_trials(images, labels)
    for key, value in clean.weights().items():
        assert torch.equal(interrupted.weights()[key], value), key


def test_a_resumed_brian2_run_in_float32_repeats_the_uninterrupted_one(tmp_path):
    from agrel_sim.datasets import Dataset
    from agrel_sim.recorder import RunFile
    from agrel_sim.training import TrainingSettings, load_checkpoint, train

    description = describe(weight_decay=0.1, layers=(Dense(6), Dropout(0.3), Dense(5)), n_inputs=6, n_actions=3)  # the same columns dropped too
    g = torch.Generator().manual_seed(0)
    pixels = lambda n: torch.randint(0, 256, (n, 6), generator=g, dtype=torch.uint8)  # noqa: E731
    data = Dataset("tiny", pixels(24), torch.randint(0, 3, (24,), generator=g), pixels(6), torch.randint(0, 3, (6,), generator=g), 1 / 255, 3)
    options = dict(trace_every=3, tau_ff=2.0, tau_fb=2.0, t_stimulus=10, t_selection=2, t_feedback=10, t_rpe=2, t_plasticity=2)
    config = {"experiment": "tiny_brian2", "model": description.to_dict(), "dataset": "tiny", "backend": "brian2"}

    def run(name, epochs, resume=None, resume_after=None):
        settings = TrainingSettings(batch_size=4, max_epochs=epochs, patience=10, validation_size=4)
        recorder = lambda net: RunFile(tmp_path / f"{name}.h5", net, config, 1, resume_after=resume_after)  # noqa: E731
        return train(description, data, settings, seed=1, dtype=torch.float32, progress=False, log=None, run_file=recorder,
                     checkpoint=tmp_path / f"{name}.pt", resume=resume, backend="brian2", backend_options=options)

    whole = run("whole", 2)
    run("part", 1)
    resumed = run("part", 2, resume=load_checkpoint(tmp_path / "part.pt"), resume_after=1)
    assert resumed.test_accuracy == whole.test_accuracy
    a, b = load_checkpoint(tmp_path / "part.pt"), load_checkpoint(tmp_path / "whole.pt")
    assert a["trials_run"] == b["trials_run"] == 2 * 20
    for key in b["weights"]:
        assert b["weights"][key].dtype == torch.float64 and torch.equal(a["weights"][key], b["weights"][key]), key
    with h5py.File(tmp_path / "part.h5", "r") as part, h5py.File(tmp_path / "whole.h5", "r") as full:
        assert part["timecourses"]["trial"][:].tolist() == full["timecourses"]["trial"][:].tolist() == list(range(0, 40, 3))


def test_a_closed_gate_silences_feedback_in_the_simulation():
    # One hidden layer driven straight by the stimulus: a column whose drive is not above 0 is
    # silent all trial, and its fb neuron, gated by the simulated gate, never receives input
    # (the feedback that reaches it is not 0: its fb weights are those of the open columns).
    description = describe(layers=(Dense(40),), n_inputs=8)
    net = build(description, backend="brian2", dtype=torch.float64, t_stimulus=30, t_feedback=30)
    images, labels, actions = next(batches(description, (4,)))
    trials = net.run_trials(images, labels, actions=actions, learn=False, record=True)
    layer = trials.layers[0]
    closed = ~layer.gate
    assert closed.any() and layer.gate.any() and torch.all(layer.ff[closed] == 0)
    feedback = torch.nn.functional.one_hot(trials.action, description.n_actions).to(torch.float64) @ net.layers[-1].fb
    assert (feedback[closed] != 0).all() and torch.all(layer.fb[closed] == 0)
    assert (layer.fb[layer.gate] != 0).all()


def test_feedback_neurons_integrate_with_tau_fb():
    # A fast ff neuron (tau_ff = 1 ms, settled after t_stimulus = 20 ms) and a slow fb neuron
    # (tau_fb = 20 ms) with T = 40 ms = x tau_fb of feedback by the trial's end. The chosen output
    # unit's fb neuron filters the step z = 1 once: 1 - exp(-x) (exponential Euler is exact for a
    # constant input). A hidden column's fb neuron is the second filter of a chain, so its fb is
    # the settled one (the torch backend's) times 1 - exp(-x) (1 + x); dt = 0.1 ms keeps the
    # discretisation error near 0.1%. With tau_ff in their place, both would be near settled.
    description = ColumnNetwork((3,), [Dense(4)], 2, rule=Rule(learning_rate=0.5, init_range=0.5), name="tau")
    reference = build(description, dtype=torch.float64, seed=0)
    weights = {key: value.abs() for key, value in reference.weights().items()}  # every gate open
    reference.load_weights(weights)
    image, label, action = torch.tensor([[0.5, 0.8, 0.3]], dtype=torch.float64), torch.tensor([0]), torch.tensor([1])
    settled_fb = reference.run_trials(image, label, actions=action, learn=False, record=True).layers[0].fb
    net = build(description, backend="brian2", dtype=torch.float64, tau_ff=1.0, tau_fb=20.0, dt=0.1,
                t_stimulus=20.0, t_selection=10.0, t_feedback=20.0, t_rpe=5.0, t_plasticity=5.0)
    net.load_weights(weights)
    hidden, output = net.run_trials(image, label, actions=action, learn=False, record=True).layers
    x = 40.0 / 20.0
    assert output.fb[0, 0].item() == 0.0 and output.fb[0, 1].item() == pytest.approx(1 - math.exp(-x), rel=1e-6)
    assert torch.all(settled_fb > 0)
    torch.testing.assert_close(hidden.fb / settled_fb, torch.full_like(settled_fb, 1 - math.exp(-x) * (1 + x)), rtol=5e-3, atol=0)


def test_tied_weights_stay_equal_when_a_gate_closes_while_feedback_is_held():
    # SPEC.md: W' gets the identical update, and a feedback neuron whose feedforward partner is
    # silent does not learn. Column 0 of layers.1 has bias +0.5 and weight -1 from a column that
    # rises towards 0.6: its drive 0.5 - y turns negative at about 18 ms, after the feedback has
    # arrived. In the plasticity phase its gate is closed while its ff activity decays and its fb
    # neuron still holds activity: neither its ff nor its fb synapses may change.
    description = ColumnNetwork((1,), [Dense(1), Dense(2)], 2, rule=Rule(learning_rate=0.5, init_range=0.5, bias=True), name="gate")
    net = build(description, backend="brian2", dtype=torch.float64, tau_ff=10, tau_fb=10, dt=1.0, t_stimulus=10,
                t_selection=5, t_feedback=10, t_rpe=2, t_plasticity=5, trace_every=1)
    weights = {
        "layers.0.ff": [[0.6]], "layers.0.bias": [0.0],
        "layers.1.ff": [[-1.0], [0.3]], "layers.1.bias": [0.5, 0.5],
        "output.ff": [[0.5, 0.5], [0.25, 0.5]], "output.bias": [0.0, 0.0],
    }
    weights = {key: torch.tensor(value, dtype=torch.float64) for key, value in weights.items()}
    weights.update({key.replace(".ff", ".fb"): value for key, value in weights.items() if key.endswith(".ff")})
    net.load_weights(weights)
    trials = net.run_trials(torch.ones(1, 1, dtype=torch.float64), torch.tensor([0]), actions=torch.tensor([0]))
    trace = trials.traces[0]
    column = trace.layers[2]  # input, layers.0, layers.1, output
    plasticity = round(trace.phases["plasticity"][0] * 1000)  # in steps of 1 ms
    assert column.gate[:18, 0].all() and column.fb[11:18, 0].min() > 0, "open as the feedback arrives"
    assert not column.gate[18:, 0].any() and plasticity > 18
    assert (column.ff[plasticity:, 0] > 0.02).all() and (column.fb[plasticity:, 0] > 0.02).all(), "active, with fb held, in plasticity"
    after = net.weights()
    for layer in net.layers:
        assert torch.equal(layer.ff, layer.fb), f"{layer.name}: tied ff and fb get the identical update"
    assert torch.equal(after["layers.1.ff"][0], weights["layers.1.ff"][0]) and after["layers.1.bias"][0].item() == 0.5
    assert (after["layers.1.ff"][1] != weights["layers.1.ff"][1]).all(), "the open column learns"
