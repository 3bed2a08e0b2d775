"""Max-Boltzmann action selection matches epsilon and tau in distribution."""

import pytest
import torch

from agrel_sim.rule import exploration_draws, max_boltzmann, rpe, reward, select_action, winner_feedback
from devices import DEVICES

DRAWS = 200_000


def expected_distribution(q, epsilon, tau):
    greedy = torch.nn.functional.one_hot(q.argmax(), len(q)).double()
    return (1 - epsilon) * greedy + epsilon * torch.softmax(q.double() / tau, 0)


@pytest.mark.parametrize("epsilon, tau", [(0.02, 1.0), (0.3, 0.5), (1.0, 2.0)])
def test_action_frequencies_match_max_boltzmann(epsilon, tau):
    q = torch.tensor([0.2, 1.1, -0.4, 0.9, 0.0])
    actions = select_action(q.expand(DRAWS, -1), epsilon, tau, torch.Generator().manual_seed(7))
    counts = torch.bincount(actions, minlength=len(q)).double()
    expected = expected_distribution(q, epsilon, tau) * DRAWS
    sigma = (expected * (1 - expected / DRAWS)).sqrt()
    assert torch.all((counts - expected).abs() <= 5 * sigma + 1), (counts, expected)

    # The share of non-greedy actions: epsilon times the Boltzmann mass off the greedy action.
    non_greedy = (actions != q.argmax()).double().mean().item()
    p = epsilon * (1 - torch.softmax(q.double() / tau, 0)[q.argmax()].item())
    assert abs(non_greedy - p) <= 5 * (p * (1 - p) / DRAWS) ** 0.5 + 1e-9


@pytest.mark.parametrize("q, tau, dtype", [
    ([1e4, 1e4 - 0.01, 0.0, 0.0], 0.01, torch.float32),  # q / tau would round off their difference
    ([0.5, 1.0, 0.2], 1e-5, torch.float16),  # q / tau would overflow to inf, and softmax to NaN
])
def test_boltzmann_draws_are_exact_for_large_q_over_tau(q, tau, dtype):
    q = torch.tensor(q, dtype=dtype)
    actions = select_action(q.expand(DRAWS, -1), 1.0, tau, torch.Generator().manual_seed(2))
    counts = torch.bincount(actions, minlength=len(q)).double()
    expected = torch.softmax((q.double() - q.double().max()) / tau, 0) * DRAWS
    sigma = (expected * (1 - expected / DRAWS)).sqrt()
    assert torch.all((counts - expected).abs() <= 5 * sigma + 1), (counts, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_temperature_that_rounds_to_zero_is_greedy(dtype):
    q = torch.tensor([[0.1, 0.5, 0.3, 0.2], [0.4, 0.4, -1.0, 0.0]], dtype=dtype).repeat(500, 1)
    actions = select_action(q, 1.0, 1e-320, torch.Generator().manual_seed(0))  # every trial explores
    assert torch.all(actions[0::2] == 1), "the greedy action, the limit of the Boltzmann draw as tau -> 0"
    assert set(actions[1::2].tolist()) == {0, 1}, "a tie for the largest Q-value is drawn among its actions"


def test_boltzmann_draws_depend_on_tau():
    q = torch.tensor([0.0, 1.0])
    shares = [select_action(q.expand(DRAWS, -1), 1.0, tau, torch.Generator().manual_seed(1)).double().mean().item() for tau in (0.25, 4.0)]
    assert shares[0] == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item(), abs=0.01)
    assert shares[1] == pytest.approx(torch.sigmoid(torch.tensor(0.25)).item(), abs=0.01)


def test_epsilon_zero_is_greedy():
    q = torch.randn(10_000, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(select_action(q, 0.0, 1.0, torch.Generator().manual_seed(0)), q.argmax(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_draws_are_those_of_torch_multinomial(device, dtype):
    # Runs recorded while select_action drew with torch.multinomial reproduce: the same actions,
    # and the generator left in the same state for the draws that follow.
    q = (torch.randn(500, 7, generator=torch.Generator().manual_seed(3), dtype=dtype) * 2).to(device)
    ours, multinomial = (torch.Generator(device=device).manual_seed(4) for _ in range(2))
    actions = select_action(q, 0.5, 0.7, ours)
    explore = torch.rand(500, generator=multinomial, device=device) < 0.5
    boltzmann = torch.multinomial(torch.softmax(q / 0.7, dim=1), 1, generator=multinomial).squeeze(1)
    expected = torch.where(explore, boltzmann, q.argmax(1))
    assert (expected != q.argmax(1)).sum() > 50, "many trials explore"
    assert torch.equal(actions, expected)
    assert torch.equal(ours.get_state(), multinomial.get_state())


def test_draws_made_up_front_give_each_trial_its_row():
    # The Brian2 backend draws a batch's random numbers before its first trial and uses row i in
    # trial i: trial by trial, the actions are those of the whole batch at once.
    q = torch.randn(50, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    draws = exploration_draws(50, 4, 0.6, torch.float64, torch.Generator().manual_seed(6))
    by_trial = torch.cat([max_boltzmann(q[i:i + 1], 0.5, tuple(rows[i:i + 1] for rows in draws)) for i in range(50)])
    assert torch.equal(by_trial, select_action(q, 0.6, 0.5, torch.Generator().manual_seed(6)))
    assert exploration_draws(50, 4, 0.0, torch.float64, torch.Generator()) is None, "greedy: nothing drawn"


def test_reward_and_rpe():
    actions, labels = torch.tensor([0, 2, 1]), torch.tensor([0, 1, 1])
    r = reward(actions, labels, 1.0, -0.5, torch.float64)
    assert r.tolist() == [1.0, -0.5, 1.0]
    q = torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.0, 0.2], [0.0, 0.9, 0.0]], dtype=torch.float64)
    assert torch.allclose(rpe(q, actions, r), torch.tensor([0.7, -0.7, 0.1], dtype=torch.float64))


@pytest.mark.parametrize("call, message", [
    (lambda q: select_action(q, 1.5, 1.0), r"epsilon: expected a probability of exploring, in \[0, 1\], got 1\.5"),
    (lambda q: select_action(q, -0.1, 1.0), r"epsilon: expected a probability of exploring, in \[0, 1\], got -0\.1"),
    (lambda q: select_action(q, 0.1, -1.0), r"tau: expected a temperature > 0, got -1\.0"),
    (lambda q: select_action(q, 0.0, 0.0), r"tau: expected a temperature > 0, got 0\.0"),
    (lambda q: select_action(q[0], 0.1, 1.0), r"q: expected a floating-point tensor of Q-values, shape \(trials, actions\), got a torch\.float32 tensor of shape \(3,\)"),
    (lambda q: select_action(q.long(), 0.1, 1.0), r"got a torch\.int64 tensor of shape \(2, 3\)"),
    (lambda q: select_action(q.tolist(), 0.1, 1.0), r"q: expected .*, got list"),
    (lambda q: rpe(q, torch.tensor([0, 1]), torch.tensor([[1.0], [0.0]])), r"actions, rewards: expected one of each per trial, shape \(2,\) for q of shape \(2, 3\), got \(2,\) and \(2, 1\)"),
    (lambda q: rpe(q, torch.tensor([0, 1]), torch.tensor([1.0])), r"got \(2,\) and \(1,\)"),
    (lambda q: rpe(q, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])), r"actions: expected a tensor of integers \(int64\), one per trial, shape \(trials,\), got a torch\.float32 tensor of shape \(2,\)"),
    (lambda q: reward(torch.tensor([0, 1]), torch.tensor([[0], [1]]), 1.0, 0.0, torch.float32), r"labels: expected a tensor of integers .* got a torch\.int64 tensor of shape \(2, 1\)"),
    (lambda q: reward(torch.tensor([True, False]), torch.tensor([0, 1]), 1.0, 0.0, torch.float32), r"actions: expected a tensor of integers .* got a torch\.bool tensor"),
    (lambda q: reward([0, 1], torch.tensor([0, 1]), 1.0, 0.0, torch.float32), r"actions: expected a tensor of integers .* got list"),
    (lambda q: reward(torch.tensor([0, 1]), torch.tensor([0, 1, 2]), 1.0, 0.0, torch.float32), r"actions, labels: expected one of each per trial, got shapes \(2,\) and \(3,\)"),
    (lambda q: winner_feedback(torch.tensor([0.0, 2.0]), 3, torch.float32), r"actions: expected a tensor of integers"),
])
def test_bad_arguments_are_named(call, message):
    q = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]])
    with pytest.raises(ValueError, match=message):
        call(q)
