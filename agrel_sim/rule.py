"""The parts of DeepAGREL that do not depend on the layer kind, as plain tensor functions.

Phase 2 (action selection) and phase 4 (the global reward-prediction error) of a trial, and how
closely a layer's feedback weights mirror its feedforward weights; the per-layer feedback pass
and four-factor update live with each layer kind in the backends.
"""

from __future__ import annotations

import torch

from agrel_sim.config import is_number, shown


def exploration_draws(batch: int, n_actions: int, epsilon: float, dtype: torch.dtype,
                      generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The random numbers of max-Boltzmann action selection for a batch of trials, drawn up front.

    Parameters
    ----------
    batch, n_actions : int
        The number of trials B and of actions L.
    epsilon : float
        Probability of exploring in each trial.
    dtype : torch.dtype
        Floating-point type of the Q-values the draws will be used with.
    generator : torch.Generator, optional
        Source of randomness (on ``device``).
    device : torch.device, optional
        Where to draw the numbers (default: torch's default device).

    Returns
    -------
    (explore, race) or None
        ``explore`` (B,) bool: whether each trial explores; ``race`` (B, L): Exp(1) draws for the
        Boltzmann choice (see :func:`max_boltzmann`). ``None`` for ``epsilon == 0``, which draws
        nothing. Row i belongs to trial i.

    Raises
    ------
    ValueError
        For an ``epsilon`` that is not a number in [0, 1].
    """
    if not is_number(epsilon, lambda v: 0 <= v <= 1):
        raise ValueError(f"epsilon: expected a probability of exploring, in [0, 1], got {shown(epsilon)}")
    if epsilon == 0:
        return None
    # float32 named, not torch's default dtype, which a program may change: the same seed, the same draws
    explore = torch.rand(batch, generator=generator, device=device, dtype=torch.float32) < epsilon
    race = torch.empty((batch, n_actions), dtype=dtype, device=device).exponential_(generator=generator)
    return explore, race


def max_boltzmann(q: torch.Tensor, tau: float, draws: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The actions that max-Boltzmann selects with the random numbers ``draws``.

    Parameters
    ----------
    q : Tensor, shape (B, L)
        Q-values of the L actions in each of B trials.
    tau : float
        Temperature of the Boltzmann distribution ``softmax(q / tau)``.
    draws : (explore, race) or None
        From :func:`exploration_draws` (rows for these B trials); ``None``: greedy.

    Returns
    -------
    Tensor of int64, shape (B,)
        The greedy action, or in exploring trials the Boltzmann draw
        ``argmax_l P(l) / race_l``: an exponential race, whose winner is ``l`` with probability
        ``P(l)``. This is how ``torch.multinomial`` draws one sample, and with the same generator
        it gives the same actions (runs recorded with ``multinomial`` reproduce).
    """
    check_q_values(q)
    if not is_number(tau, lambda v: v > 0):
        raise ValueError(f"tau: expected a temperature > 0, got {shown(tau)}")
    greedy = q.argmax(dim=1)
    if draws is None:
        return greedy
    explore, race = draws
    # The largest Q-value is taken out before dividing by tau: q / tau alone overflows in float16
    # and loses the differences between large Q-values in float32. With tau = 1 this is what
    # softmax does inside, so the draws are unchanged. The largest stay exactly 0: a tau that
    # rounds to 0 in q's dtype would make them 0 / 0 (the limit, tau -> 0, is greedy).
    below = q - q.gather(1, greedy.unsqueeze(1))
    shifted = torch.where(below == 0, 0.0, below / tau)
    boltzmann = (torch.softmax(shifted, dim=1) / race).argmax(dim=1)
    return torch.where(explore, boltzmann, greedy)


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

    Raises
    ------
    ValueError
        For ``q`` not a floating-point tensor of shape (B, L), ``epsilon`` outside [0, 1] or
        ``tau`` not above 0 (see :func:`check_q_values` for NaN Q-values).
    """
    check_q_values(q)
    draws = exploration_draws(q.shape[0], q.shape[1], epsilon, q.dtype, generator, q.device)
    return max_boltzmann(q, tau, draws)


def check_q_values(q) -> None:
    """Raise ValueError unless ``q`` is a floating-point tensor of shape (trials, actions).

    Finiteness is not checked, as that would wait for the device in every batch: a NaN is the
    greatest value to ``argmax``, so a row holding one picks it as the greedy action.

    Parameters
    ----------
    q : Tensor, shape (B, L)
        Q-values of the L actions in each of B trials.

    Raises
    ------
    ValueError
        For ``q`` not a floating-point tensor of two dimensions with at least one action.
    """
    if not (isinstance(q, torch.Tensor) and q.is_floating_point() and q.dim() == 2 and q.shape[1] >= 1):
        given = f"a {q.dtype} tensor of shape {tuple(q.shape)}" if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q: expected a floating-point tensor of Q-values, shape (trials, actions), got {given}")


def check_indices(name: str, values) -> None:
    """Raise ValueError unless ``values`` is a tensor of integers with one dimension (actions or
    labels, one per trial). Their range is not checked, as that would wait for the device in
    every batch.

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    values : Tensor, shape (B,)
        Actions or labels of B trials.

    Raises
    ------
    ValueError
        For ``values`` not a one-dimensional tensor of an integer dtype.
    """
    if not (isinstance(values, torch.Tensor) and values.dim() == 1 and not values.is_floating_point() and not values.is_complex() and values.dtype != torch.bool):
        given = f"a {values.dtype} tensor of shape {tuple(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{name}: expected a tensor of integers (int64), one per trial, shape (trials,), got {given}")


def reward(actions: torch.Tensor, labels: torch.Tensor, reward_correct: float, reward_wrong: float, dtype: torch.dtype) -> torch.Tensor:
    """The reward of each trial: ``reward_correct`` if the action is the label, else ``reward_wrong``.

    Parameters
    ----------
    actions : Tensor of int64, shape (B,)
        The selected action ``s`` of each of B trials (one of the network's actions: an action
        that is none, 12 of 10 say, is not caught here and counts as wrong).
    labels : Tensor of int64, shape (B,)
        The correct class of each trial.
    reward_correct, reward_wrong : float
        The reward ``r`` for a correct and for a wrong action.
    dtype : torch.dtype
        Floating-point type of the rewards.

    Returns
    -------
    Tensor, shape (B,)
        The reward ``r`` of each trial, on ``actions``' device.

    Raises
    ------
    ValueError
        For ``actions`` or ``labels`` not integer tensors of shape (B,) (see :func:`check_indices`).
    """
    check_indices("actions", actions)
    check_indices("labels", labels)
    if actions.shape != labels.shape:
        raise ValueError(f"actions, labels: expected one of each per trial, got shapes {tuple(actions.shape)} and {tuple(labels.shape)}")
    # Filled on the device, so that no value is copied from the host in every batch.
    return torch.full(actions.shape, reward_wrong, dtype=dtype, device=actions.device).masked_fill_(actions == labels, reward_correct)


def rpe(q: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """The global, dopamine-like reward-prediction error ``delta = r - q_s`` of each trial.

    Parameters
    ----------
    q : Tensor, shape (B, L)
        Q-values of the L actions in each of B trials.
    actions : Tensor of int64, shape (B,)
        The selected action ``s`` of each trial.
    rewards : Tensor, shape (B,)
        The reward ``r`` of each trial (see :func:`reward`).

    Returns
    -------
    Tensor, shape (B,)
        ``delta = r - q_s`` of each trial, in ``q``'s dtype.

    Raises
    ------
    ValueError
        For ``q`` that fails :func:`check_q_values`, ``actions`` not integers (see
        :func:`check_indices`), or ``actions`` and ``rewards`` not both of shape (B,).
    """
    check_q_values(q)
    check_indices("actions", actions)
    if not (tuple(actions.shape) == tuple(rewards.shape) == (q.shape[0],)):
        raise ValueError(f"actions, rewards: expected one of each per trial, shape ({q.shape[0]},) for q of shape {tuple(q.shape)}, got {tuple(actions.shape)} and {tuple(rewards.shape)}")
    return rewards - q.gather(1, actions.unsqueeze(1)).squeeze(1)


def winner_feedback(actions: torch.Tensor, n_actions: int, dtype: torch.dtype) -> torch.Tensor:
    """Feedback activity of the output layer: ``z_s = 1`` for the selected action, 0 elsewhere.

    Parameters
    ----------
    actions : Tensor of int64, shape (B,)
        The selected action ``s`` of each of B trials.
    n_actions : int
        The number of actions L (output units).
    dtype : torch.dtype
        Floating-point type of the feedback activity.

    Returns
    -------
    Tensor, shape (B, L)
        One-hot rows ``z``: 1 at the selected action of each trial, 0 elsewhere.

    Raises
    ------
    ValueError
        For ``actions`` not integers (see :func:`check_indices`).
    """
    check_indices("actions", actions)
    return torch.nn.functional.one_hot(actions, n_actions).to(dtype)


def feedback_alignment(ff: torch.Tensor, fb: torch.Tensor) -> float:
    """The cosine similarity between a layer's feedforward weights and its feedback weights.

    Strict reciprocity makes the feedback matrix the transpose of the feedforward one. The
    backends store the feedback weights in the layout of the feedforward ones (``fb[q, m]``,
    from upper column ``q`` to lower column ``m``, sits where ``ff[q, m]``, from ``m`` to
    ``q``, does), so the fb tensor is already that transpose and the two are compared entry by
    entry, over every weight the layer holds (for a convolution the shared kernel, whose
    entries each serve many synapses). Biases are excluded: they have no feedback partner.

    Parameters
    ----------
    ff, fb : Tensor
        The layer's feedforward and feedback weights, of one shape (a layer's ``ff`` and
        ``fb``).

    Returns
    -------
    float
        ``sum(ff * fb) / sqrt(sum(ff**2) * sum(fb**2))``, computed in float64: 1.0 exactly where
        ``fb`` equals ``ff`` (``tied`` and ``reciprocal`` feedback), near 0 for independent
        random draws; NaN where either is all zero or not finite.

    Raises
    ------
    ValueError
        For ``ff`` and ``fb`` of different shapes.
    """
    if ff.shape != fb.shape:
        raise ValueError(f"ff, fb: expected weights of one shape, got {tuple(ff.shape)} and {tuple(fb.shape)}")
    ff, fb = (weights.detach().to(torch.float64).flatten() for weights in (ff, fb))
    return (torch.dot(ff, fb) / torch.sqrt(torch.dot(ff, ff) * torch.dot(fb, fb))).item()
