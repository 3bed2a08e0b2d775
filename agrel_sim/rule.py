"""The parts of DeepAGREL that do not depend on the layer kind, as plain tensor functions.

Phase 2 (action selection) and phase 4 (the global reward-prediction error) of a trial; the
per-layer feedback pass and four-factor update live with each layer kind in the backends.
"""

from __future__ import annotations

import torch


def select_action(q: torch.Tensor, epsilon: float, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Max-Boltzmann action selection for a batch of trials.

    Parameters
    ----------
    q : Tensor, shape (B, L)
        Q-values of the L actions in each of B trials.
    epsilon : float
        Probability of exploring, i.e. of drawing from the Boltzmann distribution instead of
        taking the greedy action.
    tau : float
        Temperature of the Boltzmann distribution ``softmax(q / tau)``.
    generator : torch.Generator, optional
        Source of randomness (on ``q``'s device).

    Returns
    -------
    Tensor of int64, shape (B,)
        The selected action ``s`` of each trial.
    """
    greedy = q.argmax(dim=1)
    if epsilon == 0:
        return greedy
    explore = torch.rand(q.shape[0], generator=generator, device=q.device) < epsilon
    boltzmann = torch.multinomial(torch.softmax(q / tau, dim=1), 1, generator=generator).squeeze(1)
    return torch.where(explore, boltzmann, greedy)


def reward(actions: torch.Tensor, labels: torch.Tensor, reward_correct: float, reward_wrong: float, dtype: torch.dtype) -> torch.Tensor:
    """The reward of each trial: ``reward_correct`` if the action is the label, else ``reward_wrong``."""
    # Filled on the device, so that no value is copied from the host in every batch.
    return torch.full(actions.shape, reward_wrong, dtype=dtype, device=actions.device).masked_fill_(actions == labels, reward_correct)


def rpe(q: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """The global, dopamine-like reward-prediction error ``delta = r - q_s`` of each trial."""
    return rewards - q.gather(1, actions.unsqueeze(1)).squeeze(1)


def winner_feedback(actions: torch.Tensor, n_actions: int, dtype: torch.dtype) -> torch.Tensor:
    """Feedback activity of the output layer: ``z_s = 1`` for the selected action, 0 elsewhere."""
    return torch.nn.functional.one_hot(actions, n_actions).to(dtype)
