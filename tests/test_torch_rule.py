"""The explicit DeepAGREL of the torch backend against its oracle and its defining properties."""

import math
import re

import pytest
import torch

from agrel_sim import ColumnNetwork, Conv2d, Dense, Dropout, LocallyConnected2d, Rule, build
from agrel_sim.backends.torch_backend import CHANGED_SAMPLE, _synapse_sample, changed_fraction
from agrel_sim.rule import feedback_alignment
from devices import DEVICES
from reference import reference_q

# Random nets with 3 or more hidden column layers, one family per layer kind.
ARCHITECTURES = {
    "dense": ((11,), [Dense(9), Dense(8), Dense(7)]),
    "conv": ((2, 9, 9), [Conv2d(3, 3), Conv2d(4, 3), Conv2d(3, 2)]),
    "strided_conv": ((2, 11, 11), [Conv2d(3, 3, stride=2), Conv2d(4, 3, stride=2, padding=1), Conv2d(3, 2, stride=2), Dense(6)]),
    "locally_connected": ((2, 8, 8), [LocallyConnected2d(3, 3), LocallyConnected2d(3, 3), LocallyConnected2d(2, 2)]),
    "strided_locally_connected": ((2, 10, 10), [LocallyConnected2d(3, 3, stride=2), LocallyConnected2d(3, 2, stride=2, padding=1), Dense(6)]),
    "dropout": ((2, 8, 8), [Conv2d(3, 3), Dropout(0.4), Dense(9), Dropout(0.3), Dense(7)]),
    "paper_like": ((1, 12, 12), [LocallyConnected2d(4, 3), Conv2d(4, 3, stride=2), Dropout(0.5), Dense(10), Dropout(0.3)]),
}


def make(kind, bias=False, feedback="tied", learning_rate=0.7, seed=0, n_actions=5, device="cpu", **rule):
    input_shape, layers = ARCHITECTURES[kind]
    description = ColumnNetwork(
        input_shape, layers, n_actions,
        rule=Rule(learning_rate=learning_rate, bias=bias, init_range=0.5, feedback=feedback, **rule),
        name=kind,
    )
    return build(description, device=device, dtype=torch.float64, seed=seed)


def random_batch(net, batch=6, seed=1):
    """Images, labels and actions drawn on the CPU (the same on every device), on the net's device."""
    g = torch.Generator().manual_seed(seed)
    shape = net.description.input_shape
    images = torch.rand((batch, *shape), generator=g, dtype=torch.float64)
    labels = torch.randint(net.description.n_actions, (batch,), generator=g)
    actions = torch.randint(net.description.n_actions, (batch,), generator=g)
    return images.to(net.device), labels.to(net.device), actions.to(net.device)


def relative_error(value, reference):
    return ((value - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_decay", "decay"])
@pytest.mark.parametrize("feedback", ["tied", "reciprocal", "independent"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("device", DEVICES)
def test_four_factor_update_equals_alpha_delta_gradient_of_q_s(device, kind, bias, feedback, weight_decay):
    net = make(kind, bias=bias, feedback=feedback, weight_decay=weight_decay, device=device)
    images, labels, actions = random_batch(net)
    before = net.weights()
    trials = net.run_trials(images, labels, actions=actions, record=True)
    after = net.weights()

    # The oracle: alpha * delta * dq_s/dW by autograd through an independent forward pass,
    # with the same dropout masks and delta held fixed; averaged over the batch. The forward
    # pass computes with the ff weights and the gradient flows back through the fb weights
    # (W' = W unless feedback is independent); ff and fb get this change after the decay.
    keeps = {i: rec.gate for i, rec in enumerate(trials.layers) if isinstance(net.description.layers[min(i, len(net.description.layers) - 1)], Dropout)}
    learnt = {k: v.clone().requires_grad_(True) for k, v in before.items() if not k.endswith(".ff")}
    q = reference_q(net.description, {**before, **learnt}, images, keeps, through_feedback=True)
    torch.testing.assert_close(q.detach(), trials.q, rtol=1e-12, atol=1e-12)
    q_s = q.gather(1, actions[:, None]).squeeze(1)
    objective = (trials.delta * q_s).sum() * net.description.rule.learning_rate / len(images)
    oracle = dict(zip(learnt, torch.autograd.grad(objective, list(learnt.values()))))
    kept = 1 - net.description.rule.learning_rate * weight_decay

    assert torch.equal(trials.action, actions)
    for key in after:
        change = after[key] - before[key] * kept
        expected = oracle[key.replace(".ff", ".fb")]
        assert expected.abs().max() > 0, f"{key}: oracle is zero, the test would be vacuous"
        assert relative_error(change, expected) < 1e-10, key


def feedback_angle(layer):
    cosine = feedback_alignment(layer.ff, layer.fb)
    assert math.isfinite(cosine), layer.name
    return math.degrees(math.acos(min(1.0, cosine)))


def test_independent_feedback_with_weight_decay_aligns_with_ff():
    net = make("dense", feedback="independent", learning_rate=0.5, weight_decay=0.02, n_actions=3)
    # A learnable task: the label is which third of the input carries the most mass.
    g = torch.Generator().manual_seed(0)
    start = [feedback_angle(layer) for layer in net.layers]
    assert all(angle > 60 for angle in start), "independent draws start far from ffᵀ"
    for _ in range(600):
        images = torch.rand(20, 11, generator=g, dtype=torch.float64)
        labels = images[:, :9].view(20, 3, 3).sum(2).argmax(1)
        net.run_trials(images, labels)
    end = [feedback_angle(layer) for layer in net.layers]
    for layer, a, b in zip(net.layers, start, end):
        assert b < a / 3, f"{layer.name}: angle {a:.1f}° -> {b:.1f}°"


def test_every_feedback_mode_and_ebp_start_from_the_same_ff_weights():
    layers = [Conv2d(3, 3), Dropout(0.4), Dense(9)]
    weights = {
        mode: build(ColumnNetwork((2, 8, 8), layers, 7, rule=Rule(name=name, feedback=feedback, bias=True)), seed=4).weights()
        for mode, (name, feedback) in {"tied": ("deepagrel", "tied"), "reciprocal": ("deepagrel", "reciprocal"), "independent": ("deepagrel", "independent"), "ebp": ("ebp", "tied")}.items()
    }
    for key in weights["tied"]:
        if key.endswith(".ff"):
            assert all(torch.equal(w[key], weights["tied"][key]) for w in weights.values()), key
        if key.endswith(".fb"):
            assert not torch.equal(weights["independent"][key], weights["tied"][key]), key


@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_decay", "decay"])
def test_ebp_step_is_sgd_on_cross_entropy(weight_decay):
    input_shape, layers = ARCHITECTURES["strided_locally_connected"]
    rule = Rule(name="ebp", learning_rate=0.3, bias=True, init_range=0.5, weight_decay=weight_decay)
    net = build(ColumnNetwork(input_shape, layers, 5, rule=rule), dtype=torch.float64, seed=0)
    images, labels, _ = random_batch(net)
    before = net.weights()
    trials = net.run_trials(images, labels.int())  # labels of any integer dtype
    params = {k: v.clone().requires_grad_(True) for k, v in before.items() if not k.endswith(".fb")}
    loss = torch.nn.functional.cross_entropy(reference_q(net.description, params, images, {}), labels)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    torch.testing.assert_close(trials.loss, loss.detach())
    for key, grad in grads.items():  # the decay first, then the gradient step (weights and biases alike)
        expected = before[key] * (1 - 0.3 * weight_decay) - 0.3 * grad
        torch.testing.assert_close(net.weights()[key], expected, rtol=1e-12, atol=1e-12)


def test_ebp_records_the_gates_of_dropped_columns_closed():
    description = ColumnNetwork((6,), [Dense(12), Dropout(0.5), Dropout(0.5), Dense(5)], 3, rule=Rule(name="ebp", init_range=0.5))
    trials = build(description, seed=1).run_trials(torch.rand(8, 6), torch.zeros(8, dtype=torch.long), record=True)
    columns = trials.layers[0]
    assert (columns.ff[~columns.gate] > 0).any(), "some active columns were dropped"
    assert torch.equal(columns.gate, trials.layers[2].ff > 0), "kept by both stacked dropout layers"
    assert torch.equal(trials.layers[1].gate, columns.gate) and torch.equal(trials.layers[2].gate, columns.gate)


@pytest.mark.parametrize("name", ["deepagrel", "ebp"])
def test_a_small_weight_decay_in_float32_is_that_of_sgd(name):
    # 1 - 1e-7 is 1 - 1.19e-7 in float32: a decay applied as a factor (1 - decay) would be 19% too strong.
    rule = Rule(name=name, learning_rate=0.01, weight_decay=1e-5, init_range=0.5, bias=True)
    net = build(ColumnNetwork((200,), [Dense(100)], 3, rule=rule), dtype=torch.float32, seed=0)
    net.layers[0].bias = -0.5 - torch.rand(100)  # every column silent, its gate shut
    weights, bias = torch.nn.Parameter(net.layers[0].ff.clone()), torch.nn.Parameter(net.layers[0].bias.clone())
    net.run_trials(torch.zeros(10, 200), torch.zeros(10, dtype=torch.long))  # silent inputs: only the decay moves layers.0
    weights.grad, bias.grad = torch.zeros_like(weights), torch.zeros_like(bias)
    torch.optim.SGD([weights, bias], lr=0.01, weight_decay=1e-5).step()
    assert torch.equal(net.layers[0].ff, weights.detach()) and torch.equal(net.layers[0].bias, bias.detach())


def test_dropout_silences_its_share_of_columns_and_scales_up_the_rest():
    net = build(ColumnNetwork((20,), [Dense(1000), Dropout(0.8)], 3, rule=Rule(init_range=0.5)), dtype=torch.float64, seed=0)
    net.layers[0].ff = torch.full((1000, 20), 0.01)  # every column active
    images = torch.rand(50, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    columns, dropped = net.run_trials(images, torch.zeros(50, dtype=torch.long), record=True).layers[:2]
    assert (columns.ff > 0).all()
    assert dropped.gate.double().mean().item() == pytest.approx(0.2, abs=0.01)  # 50,000 draws: 0.2 ± 0.0018
    torch.testing.assert_close(dropped.ff, torch.where(dropped.gate, columns.ff / 0.2, 0.0))


def test_the_draws_of_a_seed_do_not_depend_on_torchs_default_dtype():
    description = ColumnNetwork((8,), [Dense(16), Dropout(0.5), Dense(8)], 4, rule=Rule(learning_rate=0.5, init_range=0.5))
    images = torch.rand(20, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(4, (20,), generator=torch.Generator().manual_seed(2))

    def one_batch():
        net = build(description.replace(action_selection={"epsilon": 0.5}), seed=3)
        trials = net.run_trials(images, labels)
        return trials.action, net.weights()

    actions, weights = one_batch()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as a program may set it
    try:
        other_actions, other_weights = one_batch()
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(actions, other_actions), "the same exploration"
    assert all(torch.equal(weights[key], other_weights[key]) for key in weights), "the same dropout masks"


def test_float64_values_beyond_float32_are_refused_by_a_float32_net():
    net = build(ColumnNetwork((4,), [Dense(3)], 2), dtype=torch.float32)
    start = net.weights()
    with pytest.raises(ValueError, match=r"^layers\.0\.ff: values must be finite in torch\.float32, whose largest is 3\.403e\+38; got 1e\+39$"):
        net.layers[0].ff = torch.full((3, 4), 1e39, dtype=torch.float64)
    assert all(torch.equal(value, start[key]) for key, value in net.weights().items())
    images = torch.zeros(2, 4, dtype=torch.float64)
    images[1, 2] = 1e39
    with pytest.raises(ValueError, match=r"^images: 1 value\(s\), the first in image 1 of the batch, are not finite \(NaN or inf, or beyond 3\.403e\+38, the largest torch\.float32 holds\)"):
        net.q_values(images)


@pytest.mark.parametrize("value, message", [
    (torch.float16, r"dtype: expected one of torch\.float32, torch\.float64, got torch\.float16"),
    ("float32", r"dtype: expected one of .*, got 'float32'"),
])
def test_build_names_a_bad_dtype(value, message):
    # Bad devices and seeds: tests/test_backend_scenarios.py, for every backend.
    with pytest.raises(ValueError, match=message):
        build(ColumnNetwork((4,), [Dense(3)], 2), dtype=value)


def test_a_dropout_layer_has_no_weights_to_read_or_set():
    net = build(ColumnNetwork((3,), [Dense(2), Dropout(0.5)], 2))
    dropout = net.layers[1]
    for part in ("ff", "fb", "bias"):
        with pytest.raises(AttributeError, match=r"layers\.1 is a dropout layer: it has no weights"):
            getattr(dropout, part)
        with pytest.raises(AttributeError, match=r"layers\.1 is a dropout layer: it has no weights"):
            setattr(dropout, part, torch.zeros(2, 3))


def test_changed_fraction_of_a_large_layer_is_measured_on_a_fixed_sample():
    size = 1000 * 1000
    g = torch.Generator().manual_seed(0)
    change = torch.rand(1000, 1000, generator=g, dtype=torch.float64) + 0.5
    change.view(-1)[torch.randperm(size, generator=g)[: size * 3 // 10]] = 0  # 30% of the synapses unchanged
    # A sample of n = 65536 of N = 10**6 synapses, drawn without regard to which changed: the
    # measured fraction has standard error sqrt(0.7 * 0.3 / n * (N - n) / (N - 1)) = 0.0017; 0.01
    # is six of them.
    measured = changed_fraction(change).item()
    assert abs(measured - 0.7) < 0.01
    assert measured * CHANGED_SAMPLE == round(measured * CHANGED_SAMPLE), "a count among CHANGED_SAMPLE synapses"
    # The sample is the same synapses every call, even once the cache is emptied: it depends on
    # the layer's size alone. A change on the sampled synapses alone reads as all, elsewhere as none.
    sample = _synapse_sample(size, change.device)
    _synapse_sample.cache_clear()
    assert torch.equal(_synapse_sample(size, change.device), sample)
    assert len(sample) == len(sample.unique()) == CHANGED_SAMPLE
    on_sample = torch.zeros(size, dtype=torch.float64)
    on_sample[sample] = 1.0
    assert changed_fraction(on_sample.view(1000, 1000)).item() == 1.0
    assert changed_fraction((1 - on_sample).view(1000, 1000)).item() == 0.0
    assert changed_fraction(change).item() == measured


@pytest.mark.parametrize("field, value", [
    ("neuromodulator", dict(reward_correct=1e39)),
    ("neuromodulator", dict(reward_wrong=-1e39)),
    ("rule", dict(init_range=1e39)),
])
def test_numbers_that_overflow_float32_are_named_at_build(field, value):
    description = ColumnNetwork((4,), [Dense(3)], 2).replace(**{field: value})
    (key, number), = value.items()
    with pytest.raises(ValueError, match=rf"^<python>: {field}\.{key}: {re.escape(repr(number))} overflows torch\.float32, whose largest number is 3\.403e\+38; choose a smaller value or dtype float64$"):
        build(description, dtype=torch.float32)
    build(description, dtype=torch.float64)  # float64 holds it


def test_an_init_range_or_learning_rate_that_rounds_to_zero_is_named_at_build():
    description = ColumnNetwork((4,), [Dense(3)], 2)
    with pytest.raises(ValueError, match=r"^<python>: rule\.init_range: 1e-46 rounds to 0 in torch\.float32, so every weight would start at 0; choose a larger value or dtype float64$"):
        build(description.replace(rule=dict(init_range=1e-46)), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^<python>: rule\.learning_rate: 1e-46 rounds to 0 in torch\.float32, so no weight would change"):
        build(description.replace(rule=dict(learning_rate=1e-46)), dtype=torch.float32)
    build(description.replace(rule=dict(init_range=1e-40)), dtype=torch.float32)  # subnormal, but not 0
