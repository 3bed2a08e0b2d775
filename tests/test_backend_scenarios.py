"""Scenarios of DeepAGREL that every backend must reproduce, run through one fixture.

As Nengo's ``Simulator`` fixture does, ``build_net`` builds a description with each registered
backend in turn (the PyTorch backend also on CUDA, where there is a GPU); a backend that cannot
build a layer kind skips the scenario with its reason.
"""

import copy
import re

import numpy as np
import pytest
import torch

from agrel_sim import ColumnNetwork, Dense, Dropout, Rule, build
from agrel_sim.backends import BACKENDS, UnsupportedLayerError
from devices import needs_cuda

BACKEND_DEVICES = [pytest.param((backend, "cpu"), id=backend) for backend in sorted(BACKENDS)]
BACKEND_DEVICES.append(pytest.param(("torch", "cuda"), id="torch-cuda", marks=needs_cuda))


@pytest.fixture(params=BACKEND_DEVICES)
def build_net(request):
    """A function that builds a description with the backend and device of this parametrisation."""
    backend, device = request.param

    def make(description, seed=0):
        try:
            return build(description, backend=backend, device=device, dtype=torch.float64, seed=seed)
        except UnsupportedLayerError as error:
            pytest.skip(str(error))

    return make


def dense_net(hidden, n_inputs=4, n_actions=3):
    return ColumnNetwork((n_inputs,), [Dense(n) for n in hidden], n_actions, rule=Rule(learning_rate=0.5, init_range=0.5))


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
    for key, value in net.weights().items():
        assert torch.equal(value, start[key]), key
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
    for key, value in net.weights().items():
        assert torch.equal(value, start[key]), key
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
    for key, value in net.weights().items():
        assert torch.equal(value, start[key]), key
    # An in-place function only reads its other arguments.
    copied = torch.zeros_like(start["layers.0.ff"])
    copied.copy_(layer.ff)
    torch._foreach_add_([copied], [layer.ff])
    assert torch.equal(copied, 2 * start["layers.0.ff"])


@pytest.mark.parametrize("value, message", [
    (float("nan"), r"layers\.0\.ff: values must be finite \(got NaN or inf\)"),
    (float("-inf"), r"layers\.0\.ff: values must be finite \(got NaN or inf\)"),
    (1 + 2j, r"layers\.0\.ff: expected real numbers, got torch\.complex64"),
    (True, r"layers\.0\.ff: expected real numbers, got torch\.bool"),
], ids=["nan", "inf", "complex", "bool"])
def test_assigned_weights_must_be_finite_real_numbers(build_net, value, message):
    net = build_net(dense_net([3]))
    start = net.weights()
    with pytest.raises(ValueError, match=message):
        net.layers[0].ff = torch.full((3, 4), value)
    for key, weights in net.weights().items():
        assert torch.equal(weights, start[key]), key
    net.layers[0].ff = torch.ones(3, 4, dtype=torch.int64)  # integers are real numbers
    assert torch.equal(net.weights()["layers.0.ff"].cpu(), torch.ones(3, 4, dtype=torch.float64))


def test_the_learning_rate_must_be_a_finite_number_above_zero(build_net):
    net = build_net(dense_net([3]))
    for value in (float("nan"), float("inf"), -0.1, 0, "0.1", True, None):
        with pytest.raises(ValueError, match=rf"learning_rate: expected a finite number > 0, got {re.escape(repr(value))}$"):
            net.learning_rate = value
        assert net.learning_rate == 0.5
    net.learning_rate *= 0.5  # as a learning-rate schedule decays it
    net.learning_rate = np.float64(net.learning_rate)
    assert net.learning_rate == 0.25
