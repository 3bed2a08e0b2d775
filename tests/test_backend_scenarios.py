"""Scenarios of DeepAGREL that every backend must reproduce, run through one fixture.

As Nengo's ``Simulator`` fixture does, ``build_net`` builds a description with each registered
backend in turn (the PyTorch backend also on CUDA, where there is a GPU); a backend that cannot
build a network (a layer kind, a rule) skips the scenario with its reason.
"""

import copy
import importlib
import math
import re

import numpy as np
import pytest
import torch

from agrel_sim import ColumnNetwork, Conv2d, Dense, Dropout, LocallyConnected2d, Rule, build
from agrel_sim.backends import BACKENDS
from devices import needs_cuda

BACKEND_DEVICES = [pytest.param((backend, "cpu"), id=backend) for backend in sorted(BACKENDS)]
BACKEND_DEVICES.append(pytest.param(("torch", "cuda"), id="torch-cuda", marks=needs_cuda))


@pytest.fixture(params=BACKEND_DEVICES)
def build_net(request):
    """A function that builds a description with the backend and device of this parametrisation,
    in float64 with seed 0 unless ``options`` say otherwise."""
    backend, device = request.param

    def make(description, **options):
        try:
            importlib.import_module(BACKENDS[backend]).check_network(description)
        except ValueError as error:  # a layer kind (UnsupportedLayerError) or a rule the backend does not build
            pytest.skip(str(error))
        return build(description, backend=backend, **{"device": device, "dtype": torch.float64, "seed": 0, **options})

    return make


def dense_net(hidden, n_inputs=4, n_actions=3, **rule):
    return ColumnNetwork((n_inputs,), [Dense(n) for n in hidden], n_actions, rule=Rule(learning_rate=0.5, init_range=0.5, **rule))


def random_batch(description, size, seed=1):
    """Images, labels and actions drawn on the CPU, for ``size`` trials."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((size, *description.input_shape), generator=g, dtype=torch.float64)
    return images, torch.randint(description.n_actions, (size,), generator=g), torch.randint(description.n_actions, (size,), generator=g)


def assert_unchanged(net, weights):
    for key, value in net.weights().items():
        assert torch.equal(value, weights[key]), key


@pytest.mark.filterwarnings("ignore:brian2 backend.*short of its fixed point:UserWarning")  # gates, not values, matter here
def test_gating_silences_feedback(build_net):
    net = build_net(dense_net([3, 3, 3]))
    for layer in net.layers[:3]:
        layer.ff = layer.ff.abs()  # every column active for positive input ...
    ff = net.layers[1].ff.clone()
    ff[1] = -1.0  # ... except column 1 of the second layer, driven below threshold
    net.layers[1].ff = ff
    images = torch.rand(6, 4, dtype=torch.float64) + 0.1
    before = net.weights()
    trials = net.run_trials(images, torch.zeros(6, dtype=torch.long), actions=torch.arange(6) % 3, record=True)
    after = net.weights()
    silent = trials.layers[1]
    assert torch.all(silent.ff[:, 1] == 0) and not silent.gate[:, 1].any()
    assert torch.all(silent.fb[:, 1] == 0), "a closed gate passes no feedback"
    assert torch.all(silent.fb[:, [0, 2]] != 0), "the open columns do receive feedback"
    assert torch.all(trials.layers[0].fb != 0), "and pass it on"
    # The silent column's synapses, incoming and outgoing, do not change; its neighbours' do.
    assert torch.equal(after["layers.1.ff"][1], before["layers.1.ff"][1])
    assert torch.equal(after["layers.2.ff"][:, 1], before["layers.2.ff"][:, 1])
    assert torch.all(after["layers.1.ff"][[0, 2]] != before["layers.1.ff"][[0, 2]])
    assert torch.all(after["layers.2.ff"][:, [0, 2]] != before["layers.2.ff"][:, [0, 2]])


@pytest.mark.filterwarnings("ignore:brian2 backend.*short of its fixed point:UserWarning")
def test_a_column_whose_drive_is_exactly_zero_has_a_closed_gate(build_net):
    # The gate opens where a > 0 (SPEC.md), not a >= 0: a blank input with the biases at their
    # initial 0 drives every hidden column to exactly 0, so none passes feedback or learns.
    net = build_net(dense_net([3], bias=True))
    before = net.weights()
    trials = net.run_trials(torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.long), actions=torch.tensor([0, 1, 2, 0]), record=True)
    after = net.weights()
    assert not trials.layers[0].gate.any() and torch.all(trials.layers[0].fb == 0)
    assert torch.equal(after["layers.0.bias"], before["layers.0.bias"])
    assert not torch.equal(after["output.bias"], before["output.bias"]), "the output's bias learns all the same"


def test_a_dropped_column_passes_no_feedback(build_net):
    net = build_net(ColumnNetwork((6,), [Dense(12), Dropout(0.5), Dense(5)], 3, rule=Rule(learning_rate=0.5, init_range=0.5)))
    images = torch.rand(8, 6, dtype=torch.float64)
    trials = net.run_trials(images, torch.zeros(8, dtype=torch.long), record=True)
    columns, dropout = trials.layers[0], trials.layers[1]
    assert (~dropout.gate).any() and dropout.gate.any()
    assert torch.all(dropout.ff[~dropout.gate] == 0) and torch.all(dropout.fb[~dropout.gate] == 0)
    # The columns below the dropout layer record the gate that learning used: open where the ff
    # neuron is active and the column was kept; the dropout layer's record shows the same columns.
    assert (columns.ff[~columns.gate] > 0).any(), "some active columns were dropped"
    assert torch.equal(columns.gate, dropout.ff > 0) and torch.all(columns.fb[~columns.gate] == 0)
    assert torch.equal(dropout.gate, columns.gate) and torch.equal(dropout.fb, columns.fb)


def test_only_the_selected_output_unit_learns(build_net):
    net = build_net(dense_net([5, 4]))
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 4, generator=g, dtype=torch.float64)
    before = net.weights()["output.ff"]
    net.run_trials(images, torch.tensor([0, 1, 2, 0]), actions=torch.full((4,), 2))
    change = net.weights()["output.ff"] - before
    assert change[2].abs().sum() > 0
    assert torch.all(change[[0, 1]] == 0)


def test_delta_sign_follows_reward(build_net):
    net = build_net(dense_net([4], n_inputs=5))
    for layer in net.layers:
        layer.ff = layer.ff.abs() * 0.3  # Q-values between 0 and 1
    image = torch.rand(1, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    label = torch.zeros(1, dtype=torch.long)
    for action, reward in ((0, 1.0), (1, 0.0)):
        q_before = net.q_values(image)[0, action]
        assert 0 < q_before < 1
        trials = net.run_trials(image, label, actions=torch.tensor([action]))
        assert trials.reward.item() == reward
        torch.testing.assert_close(trials.delta, trials.reward - trials.q[0, action], rtol=1e-12, atol=1e-12)
        q_after = net.q_values(image)[0, action]
        if reward:  # better than predicted: a burst, and the chosen action's value rises
            assert trials.delta.item() > 0 and q_after > q_before
        else:  # worse than predicted: a dip, and the value falls
            assert trials.delta.item() < 0 and q_after < q_before


def test_batch_update_is_the_mean_of_single_trial_updates(build_net):
    description = ColumnNetwork((5,), [Dense(4), Dense(4)], 3, rule=Rule(learning_rate=0.5, init_range=0.5, bias=True, feedback="independent"))
    net = build_net(description)
    g = torch.Generator().manual_seed(2)
    images = torch.rand(4, 5, generator=g, dtype=torch.float64)
    labels, actions = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 2, 2, 1])
    start = net.weights()
    net.run_trials(images, labels, actions=actions)
    batch_change = {k: v - start[k] for k, v in net.weights().items()}
    single = {k: torch.zeros_like(v) for k, v in start.items()}
    for i in range(4):
        net.load_weights(start)
        net.run_trials(images[i:i + 1], labels[i:i + 1], actions=actions[i:i + 1])
        for k, v in net.weights().items():
            single[k] += (v - start[k]) / 4
    for key in start:
        assert batch_change[key].abs().max() > 0, key
        torch.testing.assert_close(batch_change[key], single[key], rtol=1e-10, atol=1e-14)


def test_changing_the_learning_rate_between_batches_scales_the_change(build_net):
    # With weight decay the change is alpha * (four-factor term - decay * w): linear in alpha.
    description = ColumnNetwork((5,), [Dense(4)], 3, rule=Rule(learning_rate=0.5, init_range=0.5, bias=True, feedback="independent", weight_decay=0.1))
    net = build_net(description)
    images = torch.rand(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels, actions = torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1])
    start = net.weights()
    changes = {}
    for learning_rate in (0.5, 0.125):
        net.load_weights(start)
        net.learning_rate = learning_rate
        net.run_trials(images, labels, actions=actions)
        changes[learning_rate] = {k: v - start[k] for k, v in net.weights().items()}
    for key in start:
        assert changes[0.5][key].abs().max() > 0, key
        torch.testing.assert_close(changes[0.125][key], changes[0.5][key] / 4, rtol=1e-9, atol=1e-14)


def test_action_selection_follows_the_networks_epsilon_and_tau(build_net):
    # One input column drives one hidden column to activity 1, which drives the Q-values 0, 2
    # and 4: the greedy action is 2.
    trials = 60
    counts = {}
    for epsilon, tau in ((0.0, 1.0), (1.0, 0.05), (1.0, 1000.0)):
        net = build_net(dense_net([1], n_inputs=1).replace(action_selection={"epsilon": epsilon, "tau": tau}))
        net.layers[0].ff = torch.ones(1, 1)
        net.layers[1].ff = torch.tensor([[0.0], [2.0], [4.0]])
        actions = net.run_trials(torch.ones(trials, 1, dtype=torch.float64), torch.zeros(trials, dtype=torch.long), learn=False).action
        counts[epsilon, tau] = torch.bincount(actions, minlength=3).tolist()
    assert counts[0.0, 1.0] == [0, 0, trials], "epsilon 0: always the greedy action"
    assert counts[1.0, 0.05] == [0, 0, trials], "always a Boltzmann draw, so cold that it is greedy"
    # So hot that the Boltzmann distribution is uniform (to 0.3%): each action a third of the time.
    sd = (trials / 3 * 2 / 3) ** 0.5
    assert all(abs(count - trials / 3) < 5 * sd for count in counts[1.0, 1000.0]), counts


def test_the_same_seed_and_weights_draw_the_actions_of_the_torch_backend(build_net):
    # The backends' Q-values differ by up to 1.3e-4 here (Brian2's activity settles towards the
    # torch backend's), less than a fifth of the closest call between two actions.
    description = dense_net([6]).replace(action_selection={"epsilon": 0.7, "tau": 1.0})
    net = build_net(description, seed=3)
    reference = build(description, device=net.device, dtype=torch.float64, seed=3)
    g = torch.Generator().manual_seed(4)
    images, labels = torch.rand(20, 4, generator=g, dtype=torch.float64), torch.randint(3, (20,), generator=g)
    for batch in range(2):  # the second batch shows that both generators advanced alike
        trials = net.run_trials(images, labels, learn=False)
        expected = reference.run_trials(images, labels, learn=False)
        assert torch.equal(trials.action.cpu(), expected.action.cpu()), batch
        assert (trials.action != trials.q.argmax(1)).sum() >= 3, "some trials explored off the greedy action"


def test_weights_are_set_by_assignment_and_writes_into_them_raise(build_net):
    # A backend may hand out a copy of its weights (Brian2 does), where a write would be lost.
    net = build_net(ColumnNetwork((4,), [Dense(3)], 2, rule=Rule(init_range=0.5, bias=True, feedback="independent")))
    layer, start = net.layers[0], net.weights()
    read_only = r"layers\.0\.{}: weights read from a layer are read-only .* assigning a whole tensor"
    with pytest.raises(RuntimeError, match=read_only.format("ff")):
        layer.ff.mul_(0)
    with pytest.raises(RuntimeError, match=read_only.format("ff")):
        layer.ff[1] = -1.0
    with pytest.raises(RuntimeError, match=read_only.format("ff")):
        layer.ff[1][2] = 5.0  # through a view
    with pytest.raises(RuntimeError, match=read_only.format("fb")):
        layer.fb += 1
    with pytest.raises(RuntimeError, match=read_only.format("bias")):
        layer.bias.zero_()
    with pytest.raises(RuntimeError, match=read_only.format("ff")):
        torch.select(input=layer.ff, dim=0, index=1).zero_()  # a view made with keywords
    if layer.ff.device.type == "cpu":
        with pytest.raises(ValueError, match="read-only"):
            layer.ff.numpy()[0, 0] = 1.0
    # Copies are plain tensors and arrays: writing into them leaves the weights alone.
    copy.copy(layer.ff)[0, 0] = 123.0
    copy.deepcopy(layer.ff)[0, 0] = 123.0
    np.from_dlpack(layer.ff.cpu())[0, 1] = 7.0
    np.asarray(layer.ff.cpu(), dtype=np.float32)[0, 2] = 7.0
    assert_unchanged(net, start)
    # Reads that make no change work as on a plain tensor.
    assert layer.ff.to_sparse().layout == torch.sparse_coo
    assert layer.ff.requires_grad_().requires_grad and not net.weights()["layers.0.ff"].requires_grad
    ff = layer.ff.clone()
    ff[1] = -1.0
    layer.ff = ff
    layer.bias = layer.bias + 1
    after = net.weights()
    assert torch.equal(after["layers.0.ff"], ff) and torch.equal(after["layers.0.bias"], start["layers.0.bias"] + 1)
    assert torch.equal(after["layers.0.fb"], start["layers.0.fb"])
    without_biases = build_net(dense_net([3])).layers[0]
    assert without_biases.bias is None
    with pytest.raises(ValueError, match=r"layers\.0\.bias: this network has no biases"):
        without_biases.bias = torch.zeros(3)


def test_labels_and_actions_of_any_integer_dtype(build_net):
    net = build_net(dense_net([4]))
    g = torch.Generator().manual_seed(5)
    images, labels, actions = torch.rand(3, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2]), torch.tensor([2, 1, 1])
    expected = net.run_trials(images, labels, actions=actions, learn=False)
    for dtype in (torch.int32, torch.int16, torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        trials = net.run_trials(images, labels.to(dtype), actions=actions.to(dtype), learn=False)
        assert trials.action.dtype == torch.int64 and torch.equal(trials.action.cpu(), actions)
        assert torch.equal(trials.reward, expected.reward) and torch.equal(trials.delta, expected.delta)
    with pytest.raises(TypeError, match=r"actions: expected a tensor of integers .*got torch.float32"):
        net.run_trials(images, labels, actions=actions.float())
    with pytest.raises(TypeError, match=r"labels: expected a tensor of integers .*got torch.bool"):
        net.run_trials(images, labels > 0)
    with pytest.raises(TypeError, match=r"actions: expected a tensor of integers .*got list"):
        net.run_trials(images, labels, actions=[2, 1, 1])
    for dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch has no comparisons for these
        with pytest.raises(ValueError, match=r"labels: values must lie in \[0, 3\), got 0\.\.5"):
            net.run_trials(images, torch.tensor([0, 5, 1]).to(dtype))


def test_images_must_be_finite_rates(build_net):
    net = build_net(dense_net([3]))
    images, labels, start = torch.rand(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2]), net.weights()
    for value, message in ((float("nan"), "not finite"), (float("inf"), "not finite"), (-0.5, r"negative \(the lowest -0\.5\), but input columns are rates: rates must be >= 0;")):
        bad = images.clone()
        bad[1:, 2] = value
        with pytest.raises(ValueError, match=rf"images: 2 value\(s\), the first in image 1 of the batch, are {message}"):
            net.run_trials(bad, labels)
        with pytest.raises(ValueError, match=rf"images: 2 value\(s\), the first in image 1 of the batch, are {message}"):
            net.q_values(bad)
    assert_unchanged(net, start)
    net.run_trials(images * 3, labels)  # rates above 1 are fine


def test_in_place_functions_raise_for_weights_given_by_keyword_or_in_a_list(build_net):
    net = build_net(dense_net([3]))
    layer, start = net.layers[0], net.weights()
    read_only = r"layers\.0\.ff: weights read from a layer are read-only"
    for write in (
        lambda: torch.nn.init.uniform_(layer.ff, -1, 1),  # torch.nn.init passes the tensor as tensor=
        lambda: torch.nn.init.normal_(tensor=layer.ff),
        lambda: torch.nn.init.constant_(layer.ff, 0.3),
        lambda: torch.nn.init.kaiming_uniform_(layer.ff),
        lambda: torch._foreach_mul_([layer.ff], 0.0),
    ):
        with pytest.raises(RuntimeError, match=read_only):
            write()
    assert_unchanged(net, start)
    # An in-place function only reads its other arguments.
    copied = torch.zeros_like(start["layers.0.ff"])
    copied.copy_(layer.ff)
    torch._foreach_add_([copied], [layer.ff])
    assert torch.equal(copied, 2 * start["layers.0.ff"])


@pytest.mark.parametrize("value, message", [
    (float("nan"), r"values must be finite \(got NaN or inf\)"),
    (float("-inf"), r"values must be finite \(got NaN or inf\)"),
    (torch.complex128, r"expected real numbers, got torch\.complex128"),
    (torch.bool, r"expected real numbers, got torch\.bool"),
    (np.complex128, r"expected real numbers, got complex128"),
    (bool, r"expected real numbers, got bool"),
], ids=["nan", "inf", "complex_tensor", "bool_tensor", "complex_array", "bool_array"])
def test_assigned_weights_must_be_finite_real_numbers(build_net, value, message):
    net = build_net(dense_net([2], n_inputs=3, n_actions=2, bias=True, feedback="independent"))
    start = net.weights()

    def bad(key):
        shape = start[key].shape
        if isinstance(value, float):
            return torch.full(shape, value, dtype=torch.float64)
        return torch.ones(shape, dtype=value) if isinstance(value, torch.dtype) else np.ones(shape, dtype=value)

    for part in ("ff", "fb", "bias"):
        with pytest.raises(ValueError, match=rf"^layers\.0\.{part}: {message}$"):
            setattr(net.layers[0], part, bad(f"layers.0.{part}"))
    with pytest.raises(ValueError, match=rf"^output\.ff: {message}$"):
        net.load_weights({**start, "output.ff": bad("output.ff")})
    assert_unchanged(net, start)


def test_integer_weights_are_real_numbers(build_net):
    net = build_net(dense_net([2], n_inputs=3, n_actions=2))
    for value, weights in enumerate((np.ones((2, 3), dtype=np.int64), torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int64)), 2):
        net.layers[0].ff = weights * value
        assert torch.equal(net.weights()["layers.0.ff"].cpu(), torch.full((2, 3), value, dtype=torch.float64)), type(weights)


def test_numpy_weights_of_any_byte_order_and_precision_are_taken(build_net):
    net = build_net(dense_net([2], n_inputs=3, n_actions=2))
    for dtype in (">f8", "<f8", ">i4", np.longdouble, np.float16):
        weights = net.weights()
        weights["layers.0.ff"] = np.full((2, 3), 3, dtype=dtype)  # exact in every one of them
        net.load_weights(weights)
        assert torch.equal(net.weights()["layers.0.ff"].cpu(), torch.full((2, 3), 3.0, dtype=torch.float64)), dtype


def test_the_learning_rate_must_be_a_finite_number_above_zero(build_net):
    net = build_net(dense_net([3]))
    for value in (float("nan"), float("inf"), -0.1, 0, "0.1", True, None):
        with pytest.raises(ValueError, match=rf"^learning_rate: expected a finite number > 0, got {re.escape(repr(value))}$"):
            net.learning_rate = value
        assert net.learning_rate == 0.5
    net.learning_rate *= 0.5  # as a learning-rate schedule decays it
    net.learning_rate = np.float64(net.learning_rate)
    assert net.learning_rate == 0.25
    decaying = build_net(dense_net([3], weight_decay=1.0))
    with pytest.raises(ValueError, match=r"^learning_rate: learning_rate × weight_decay is 1\.5; it must be below 1"):
        decaying.learning_rate = 1.5
    assert decaying.learning_rate == 0.5


def test_a_learning_rate_the_network_cannot_hold_is_refused_as_build_refuses_it(build_net):
    net = build_net(dense_net([3]), dtype=torch.float32)  # the torch backend computes in float32, Brian2 in float64
    for value, problem in ((1e39, r"overflows torch\.float32, whose largest number is 3\.403e\+38; choose a smaller value or dtype float64"),
                           (1e-46, r"rounds to 0 in torch\.float32, so no weight would change; choose a larger value or dtype float64")):
        if net.computes_in == torch.float64:
            net.learning_rate = value
            assert net.learning_rate == value
        else:
            with pytest.raises(ValueError, match=rf"^learning_rate: {re.escape(repr(value))} {problem}$"):
                net.learning_rate = value
            assert net.learning_rate == 0.5
            with pytest.raises(ValueError, match=rf"rule\.learning_rate: {re.escape(repr(value))} {problem}$"):
                build_net(dense_net([3]).replace(rule={"learning_rate": value}), dtype=torch.float32)


@pytest.mark.parametrize("option, value, message", [
    ("device", "gpu", r"^device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'$"),
    ("seed", None, r"^seed: expected an integer from 0 to 2\*\*63 - 1, got None$"),
    ("seed", 1.5, r"^seed: expected an integer from 0 to 2\*\*63 - 1, got 1\.5$"),
    ("seed", True, r"^seed: expected an integer from 0 to 2\*\*63 - 1, got True$"),
    ("seed", -1, r"^seed: expected an integer from 0 to 2\*\*63 - 1, got -1$"),
    ("seed", 2**63, r"^seed: expected an integer from 0 to 2\*\*63 - 1, got 9223372036854775808 \(outside the 64-bit integers that torch takes\)$"),
], ids=["device_gpu", "seed_none", "seed_float", "seed_bool", "seed_negative", "seed_2_63"])
def test_build_names_a_bad_device_or_seed(build_net, option, value, message):
    with pytest.raises(ValueError, match=message):
        build_net(dense_net([3]), **{option: value})


def test_build_names_a_missing_cuda_device(build_net, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device: 'cuda' requested but CUDA is not available on this machine; use 'cpu'$"):
        build_net(dense_net([3]), device="cuda")


def test_input_that_does_not_match_the_network_is_named(build_net):
    net = build_net(ColumnNetwork((1, 8, 8), [Dense(5)], 3, name="tiny"))
    images, labels = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"images: expected shape \(batch, 1, 8, 8\) for network 'tiny'.*got \(2, 1, 7, 7\)"):
        net.run_trials(torch.zeros(2, 1, 7, 7), labels)
    with pytest.raises(TypeError, match="images: expected a floating-point tensor"):
        net.run_trials(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), labels)
    with pytest.raises(TypeError, match="images: expected a floating-point tensor"):
        net.q_values(torch.ones(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels: values must lie in \[0, 3\)"):
        net.run_trials(images, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"actions: values must lie in \[0, 3\)"):
        net.run_trials(images, labels, actions=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"actions: expected shape \(2,\)"):
        net.run_trials(images, labels, actions=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"layers\.0\.ff: expected a tensor of shape \(5, 64\), got \(64, 5\)"):
        net.layers[0].ff = torch.zeros(64, 5)
    for call in (lambda: net.run_trials(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), lambda: net.q_values(torch.zeros(0, 1, 8, 8))):
        with pytest.raises(ValueError, match=r"^images: expected at least one image, got an empty batch$"):
            call()


def test_load_weights_names_missing_and_unexpected_keys(build_net):
    net = build_net(dense_net([3]))  # tied: load_weights ignores the fb values, but not their keys
    start = net.weights()
    wrong = {**{key: value for key, value in start.items() if key != "output.fb"}, "output.gain": start["output.ff"]}
    with pytest.raises(ValueError, match=r"^weights: keys do not match the network \(missing \['output\.fb'\], unexpected \['output\.gain'\]\)$"):
        net.load_weights(wrong)
    assert_unchanged(net, start)


def test_load_weights_checks_every_entry_before_it_sets_any(build_net):
    net = build_net(dense_net([3]))  # tied: the fb values are not used, but checked
    start = net.weights()
    new = {key: value + 1 for key, value in start.items()}
    for key, value, message in (
        ("output.ff", torch.zeros(2), r"^output\.ff: expected a tensor of shape \(3, 3\), got \(2,\)$"),  # after layers.0.ff, which is not set
        ("layers.0.fb", torch.full_like(start["layers.0.fb"], float("nan")), r"^layers\.0\.fb: values must be finite \(got NaN or inf\)$"),
        ("output.fb", torch.full_like(start["output.fb"], float("inf")), r"^output\.fb: values must be finite \(got NaN or inf\)$"),  # the last entry too
    ):
        with pytest.raises(ValueError, match=message):
            net.load_weights({**new, key: value})
        assert_unchanged(net, start)
    net.load_weights(new)
    assert_unchanged(net, new)


def test_float32_requests_float32_tensors(build_net):
    net = build_net(dense_net([4]), dtype=torch.float32)
    images, labels, _ = random_batch(net.description, 2)
    trials = net.run_trials(images.float(), labels, record=True)
    assert trials.q.dtype == trials.delta.dtype == trials.reward.dtype == net.layers[0].ff.dtype == torch.float32
    assert trials.layers[0].ff.dtype == trials.layers[0].fb.dtype == net.q_values(images.float()).dtype == torch.float32


def test_a_refused_batch_counts_no_trials_and_changes_nothing(build_net):
    net = build_net(dense_net([3]))
    images, labels, _ = random_batch(net.description, 2)
    start = net.weights()
    with pytest.raises(ValueError, match=r"^labels: trials need the correct action of each trial, a tensor of shape \(batch,\); got None$"):
        net.run_trials(images, None)
    with pytest.raises(ValueError, match=r"^labels: values must lie in \[0, 3\), got 0\.\.3$"):
        net.run_trials(images, torch.tensor([0, 3]))
    assert net.trials_run == 0
    assert_unchanged(net, start)
    net.run_trials(images, labels)
    assert net.trials_run == 2


def test_ebp_refuses_forced_actions_and_counts_no_trials(build_net):
    net = build_net(dense_net([3], name="ebp"))
    images, labels, actions = random_batch(net.description, 2)
    start = net.weights()
    with pytest.raises(ValueError, match=r"^actions: forcing actions is meaningful only for rule 'deepagrel'$"):
        net.run_trials(images, labels, actions=actions)
    assert net.trials_run == 0
    assert_unchanged(net, start)
    net.run_trials(images, labels)
    assert net.trials_run == 2


OBSERVED_NETWORKS = [
    pytest.param(ColumnNetwork((6,), [Dense(5), Dense(4)], 3), id="dense"),
    pytest.param(ColumnNetwork((2, 8, 8), [Conv2d(3, 3), Dropout(0.4), Dense(9), Dropout(0.3), Dense(7)], 5), id="conv_dropout"),
]


@pytest.mark.parametrize("description", OBSERVED_NETWORKS)
@pytest.mark.parametrize("rule", ["deepagrel", "ebp"])
def test_observing_without_learning_changes_nothing(build_net, rule, description):
    net = build_net(description.replace(rule=dict(name=rule, learning_rate=0.7, init_range=0.5, bias=True, feedback="independent")))
    images, labels, _ = random_batch(description, 6)
    start = net.weights()
    trials = net.run_trials(images, labels, learn=False, record=True)
    assert_unchanged(net, start)
    assert all(record.changed is None for record in trials.layers)
    dropout = [index for index, layer in enumerate(description.layers) if isinstance(layer, Dropout)]
    assert all(torch.equal(trials.layers[i].ff, trials.layers[i - 1].ff) for i in dropout), "no dropout"
    torch.testing.assert_close(trials.q, net.q_values(images))


def overflowing(weights):
    """``weights`` with every ff and fb weight 1e200, the output's with every other input's
    -1e200: the second hidden layer's activity overflows to infinity, the Q-values (inf - inf)
    are NaN."""
    huge = {key: torch.full_like(value, 1e200) if not key.endswith(".bias") else value for key, value in weights.items()}
    for key in ("output.ff", "output.fb"):
        huge[key][:, 1::2] *= -1
    return huge


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("rule", ["deepagrel", "ebp"])
def test_evaluation_leaves_the_weights_alone_whatever_the_activity(build_net, rule):
    # Brian2's plasticity code multiplied the activity by a rate of 0 outside learning; 0 * NaN is
    # NaN, so it used to turn every weight that NaN activity reached into NaN, even in q_values.
    net = build_net(dense_net([2, 2], n_inputs=3, n_actions=2, name=rule, bias=True))
    huge = overflowing(net.weights())
    net.load_weights(huge)
    images, labels, _ = random_batch(net.description, 2)
    assert torch.isnan(net.q_values(images)).all()
    net.run_trials(images, labels, learn=False)
    assert_unchanged(net, huge)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
def test_restored_weights_recover_from_a_diverged_batch(build_net):
    # What training does after a diverged run: load the best weights, then go on. Nothing of the
    # NaN batch (Brian2: its accumulated change) may survive into later batches.
    description = dense_net([2, 2], n_inputs=3, n_actions=2)
    diverged, fresh = build_net(description), build_net(description)
    start = fresh.weights()
    images, labels, actions = random_batch(description, 2)
    diverged.load_weights(overflowing(start))
    diverged.run_trials(images, labels, actions=actions)
    assert all(torch.isnan(value).all() for value in diverged.weights().values()), "learning from NaN activity gives NaN weights"
    diverged.load_weights(start)
    for net in (diverged, fresh):
        net.run_trials(images, labels, actions=actions)
    assert_unchanged(diverged, fresh.weights())
    assert torch.equal(diverged.q_values(images), fresh.q_values(images))


@pytest.mark.parametrize("feedback", ["tied", "reciprocal", "independent"])
def test_setting_ff_or_fb_sets_both_when_tied_and_one_otherwise(build_net, feedback):
    net = build_net(dense_net([3], feedback=feedback))
    layer, start, tied = net.layers[0], net.weights(), feedback == "tied"
    layer.ff = torch.full((3, 4), 0.25)
    assert torch.all(layer.ff == 0.25)
    assert torch.equal(layer.fb.cpu(), torch.full((3, 4), 0.25, dtype=torch.float64) if tied else start["layers.0.fb"].cpu())
    layer.fb = torch.full((3, 4), -0.5)
    assert torch.all(layer.fb == -0.5)
    assert torch.all(layer.ff == (-0.5 if tied else 0.25)), "setting either sets both when tied, only fb otherwise"
    net.load_weights({**net.weights(), "layers.0.fb": torch.zeros(3, 4)})  # tied: the fb entries are ignored
    assert torch.all(layer.fb == (-0.5 if tied else 0.0)) and torch.all(layer.ff == (-0.5 if tied else 0.25))


FEEDBACK_NETWORKS = [  # a description and how many batches it learns from
    pytest.param(ColumnNetwork((6,), [Dense(5), Dense(4)], 3), 2, id="dense"),
    pytest.param(ColumnNetwork((1, 12, 12), [LocallyConnected2d(4, 3), Conv2d(4, 3, stride=2), Dropout(0.5), Dense(10), Dropout(0.3)], 5), 60, id="paper_like"),
]


@pytest.mark.parametrize("description, batches", FEEDBACK_NETWORKS)
@pytest.mark.parametrize("feedback", ["tied", "reciprocal"])
def test_tied_and_reciprocal_feedback_stay_exactly_equal_to_ff(build_net, feedback, description, batches):
    net = build_net(description.replace(rule=dict(learning_rate=0.2, init_range=0.5, bias=True, feedback=feedback)))
    start = net.weights()
    exactly_aligned = {layer.name: 1.0 for layer in net.layers if layer.has_weights}  # dropout layers have no weights
    assert net.feedback_alignment() == exactly_aligned
    for step in range(batches):
        images, labels, _ = random_batch(description, 10, seed=step)
        net.run_trials(images, labels)
        assert net.feedback_alignment() == exactly_aligned, step
    for layer in net.layers:
        if layer.has_weights:
            if feedback == "reciprocal":
                assert layer.fb.data_ptr() != layer.ff.data_ptr(), "separate tensors"
            assert torch.equal(layer.fb, layer.ff), layer.name
            assert not torch.equal(layer.ff, start[f"{layer.name}.ff"]), f"{layer.name} learnt"


@pytest.mark.parametrize("description", [
    pytest.param(ColumnNetwork((6,), [Dense(5), Dense(4)], 3), id="dense"),
    pytest.param(ColumnNetwork((2, 9, 9), [Conv2d(3, 3), Conv2d(4, 3), Conv2d(3, 2)], 5), id="conv"),
])
def test_independent_feedback_without_decay_gets_identical_updates(build_net, description):
    net = build_net(description.replace(rule=dict(learning_rate=0.7, init_range=0.5, feedback="independent")))
    images, labels, actions = random_batch(description, 6)
    before = net.weights()
    net.run_trials(images, labels, actions=actions)
    after = net.weights()
    for layer in net.layers:
        d_ff = after[f"{layer.name}.ff"] - before[f"{layer.name}.ff"]
        d_fb = after[f"{layer.name}.fb"] - before[f"{layer.name}.fb"]
        assert d_ff.abs().max() > 0, layer.name
        torch.testing.assert_close(d_ff, d_fb, rtol=1e-12, atol=1e-15)
        assert not torch.equal(after[f"{layer.name}.ff"], after[f"{layer.name}.fb"]), layer.name


def test_independent_feedback_with_weight_decay_comes_to_align_with_ff(build_net):
    # ff - fb shrinks by 1 - learning_rate * weight_decay at every update, while the identical
    # updates build what ff and fb share. Forced correct actions on a learnable task (the label
    # is the pair of inputs with the most mass); measured after every second batch, the same on
    # both backends to 0.001: layers.0 0.32, 0.25, 0.47, 0.83, 0.94; output -0.37, 0.21, 0.63,
    # 0.91, 0.97.
    description = ColumnNetwork((6,), [Dense(5)], 3, rule=Rule(learning_rate=1.0, init_range=0.5, feedback="independent", weight_decay=0.2))
    net = build_net(description)
    alignment = [net.feedback_alignment()]
    for step in range(8):
        images, _, _ = random_batch(description, 10, seed=step)
        labels = images.view(10, 3, 2).sum(2).argmax(1)
        net.run_trials(images, labels, actions=labels)
        if step % 2:
            alignment.append(net.feedback_alignment())
    assert list(alignment[0]) == ["layers.0", "output"]
    for name, first in alignment[0].items():
        last = alignment[-1][name]
        assert last > 0.9 and last > first + 0.5, f"{name}: {[round(a[name], 3) for a in alignment]}"


def test_ebp_has_no_feedback_weights_to_align(build_net):
    net = build_net(ColumnNetwork((1, 6, 6), [Conv2d(2, 3), Dropout(0.5), Dense(4)], 3, rule=Rule(name="ebp")))
    alignment = net.feedback_alignment()
    assert list(alignment) == ["layers.0", "layers.2", "output"] and all(math.isnan(cosine) for cosine in alignment.values())
