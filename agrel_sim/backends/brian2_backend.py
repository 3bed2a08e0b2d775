"""The Brian2 backend: small dense column networks whose trials unfold in time.

Every population of columns is two Brian2 ``NeuronGroup`` objects of rate neurons, the
feedforward neurons (activity ``y``) and the feedback neurons (activity ``fb``); the ff and fb
weights are ``Synapses``; one ``dopamine`` group holds the global reward-prediction error ``delta`` and
broadcasts it, through linked variables, to every plastic synapse. The input image is a clamped
population, the output layer's linear ff neurons are the Q-units.

Rate neurons (``[x]+ = max(0, x)``; the output layer is linear, its gate always open)::

    tau_ff dy/dt  = -y + [I_ff + b]+          I_ff = sum_p W[m, p] mask_p y_p     (ff synapses)
    tau_fb dfb/dt = -fb + gate * mask * I_fb  I_fb = sum_q W'[q, m] fb_q          (fb synapses)
    gate          = I_ff + b > 0 and mask > 0 (output layer: tau_fb dfb/dt = -fb + z)

A column's gate is open while its drive is above 0, that is while the rate it settles towards
is: at the fixed point exactly the rule's gate (``a > 0``), and a column whose drive turns
negative while the layers settle closes its gate at once, while its activity decays.

Dropout is the ``mask`` of the columns below a dropout layer, set at the start of every trial of
a learning batch: 0 for a dropped column (its gate closed, so that it passes no feedback and
its synapses do not learn, and the layer above sees no activity from it), ``1 / (1 - rate)``
for a kept one (the scale of its activity as the layer above sees it and of the feedback it
receives); 1 in every other trial. Columns without a dropout layer above have no ``mask``
(their equations are those above without it, so that such networks compute as before). The
columns kept are drawn for the whole batch before its first trial, layer by layer from the
bottom and before the draws of action selection, as the torch backend draws them.

One trial is a timeline of five phases, whose durations are options of :func:`build`:

``stimulus``
    All activity starts at 0 and the input columns are clamped to the image; the ff neurons
    settle, level by level. No feedback yet.
``selection``
    At its start the Q-values (the output ff activity) are read and
    :func:`agrel_sim.rule.max_boltzmann` picks the action ``s`` with the trial's row of the
    random numbers drawn for the whole batch before its first trial
    (:func:`agrel_sim.rule.exploration_draws`, as the torch backend draws them: the same seed
    and Q-values give the same actions), or the forced action is taken; the chosen output
    unit's motor signal ``z_s = 1`` turns on, and its fb neuron starts the feedback wave.
``feedback``
    The wave descends through the fb synapses, each column's gate multiplying its fb neuron's
    input, so that a silent column neither passes feedback on nor learns.
``rpe``
    At its start the dopamine group takes ``delta = r - q_s`` (:func:`agrel_sim.rule.rpe`): a
    burst when the outcome is better than predicted, a dip when worse; held to the trial's end.
``plasticity``
    Every ff synapse ``p -> m`` and its fb partner ``m -> p`` accumulate the four-factor change
    ``alpha * delta * y_p * gate_m * fb_m`` (``y_p * mask_p`` below a dropout layer: the activity
    the upper column sees), averaged over the time steps of this phase and
    over the trials of the batch; at the last step of a batch the accumulated change (and
    weight decay) is applied, so that a batch's update is the mean of single-trial updates from
    the same starting weights, as in the torch backend. Every batch starts from no accumulated
    change, and the plasticity code runs only in batches that learn: Q-values and trials with
    ``learn=False`` leave the weights untouched, whatever activity (even NaN) they produce.

The stimulus stays on and all neurons keep integrating throughout the trial; activity is reset
to 0 between trials. When the settling times are long compared with ``tau_ff`` and ``tau_fb``
the network reaches the fixed point that the torch backend computes in one pass, and the weight
changes agree; shorter settling times give a transient, time-resolved version of the rule.

A batch of trials runs as one Brian2 run (runtime mode, numpy or Cython code generation), with
two network operations that act at phase boundaries and record what is asked for. Weights are
read (as read-only copies) and set as torch tensors in the layouts of the torch backend (dense:
``(units, inputs)``); the simulation itself runs in float64.

Cost: every Brian2 run begins with a full ``gc.collect()`` and prepares its code, about 0.2 s
in a process that has imported torch, so large batches run faster per trial
(``benchmarks/brian2_trials.py``); a script can make the collection cheap by calling
``gc.freeze()`` once after its set-up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, field

_BRIAN2_IMPORTED_BEFORE = "brian2" in sys.modules

import brian2
import numpy as np
import torch
from brian2.devices.device import RuntimeDevice

from agrel_sim import rule as agrel
from agrel_sim.backends import (
    LEARNING_RATE, DropoutLayer, UnsupportedLayerError, check_batch, check_device, check_representable, check_seed, check_weights_to_load, resolved_options, weights_to_set,
)
from agrel_sim.backends.torch_backend import LayerActivity, ReadOnlyWeights, TorchNetwork, Trials, changed_fraction
from agrel_sim.config import is_count, is_number, shown
from agrel_sim.network import ColumnNetwork, Dense, Dropout

if not _BRIAN2_IMPORTED_BEFORE:
    # Importing Brian2 routes Python warnings into its log (logging.captureWarnings), where the
    # caller's warnings.catch_warnings and pytest.warns no longer see them: this backend's own
    # warnings (settling times too short) must reach the caller. A program that imported Brian2
    # itself keeps Brian2's routing.
    logging.captureWarnings(False)

BACKEND = "brian2"
CODEGEN_TARGETS = ("numpy", "cython")
PHASES = ("stimulus", "selection", "feedback", "rpe", "plasticity")
# A phase that leaves activity further than this from its fixed point (a fraction of a step)
# gets a warning: the trial is then a transient, not the torch backend's rule.
SETTLING_TOLERANCE = 0.01
# Time steps of a whole trial, far beyond any trial's need (the defaults: 220), short of where a
# dt too small for the phases rounds Brian2's clock off.
MAX_TRIAL_STEPS = 10**7


# ---------------------------------------------------------------------------------------------
# The neurons and synapses, as Brian2 model strings.

# The dopamine signals, linked into every plastic synapse.
NEUROMODULATION = """
delta : 1 (linked)
plasticity_rate : 1 (linked)
consolidate : 1 (linked)
"""


def ff_neuron_model(linear: bool, bias: bool, dropout: bool = False) -> str:
    """The feedforward neuron of a column: a rate neuron, rectified unless ``linear`` (Q-units).

    ``fb`` is linked to the column's feedback neuron, so that the column's own synapses can see
    the feedback that reaches it. A bias is a synapse from an always-active unit (``I_bias``).
    The gate is open while the drive is above 0 and the column is not dropped (and recorded so:
    ``_Episode._gate``); ``mask`` is the column's dropout (the module's docstring).

    Parameters
    ----------
    linear : bool
        Linear neurons (the output Q-units): the rate is the drive itself, the gate always open.
    bias : bool
        Whether the column has a bias, the input ``I_bias`` of a bias synapse.
    dropout : bool
        Whether a dropout layer lies above the columns: they have a ``mask``.

    Returns
    -------
    str
        The Brian2 model equations of the neuron group.
    """
    drive = "I_ff + I_bias" if bias else "I_ff"
    rate = drive if linear else f"clip({drive}, 0, inf)"
    lines = [f"dy/dt = (-y + {rate}) / tau_ff : 1", "I_ff : 1", "fb : 1 (linked)"]
    if linear:
        lines.append("gate = 1 : 1")
    elif dropout:
        lines += [f"gate = int({drive} > 0) * int(mask > 0) : 1", "mask : 1  # 0 where dropped, else the scale 1 / (1 - rate); 1 outside learning"]
    else:
        lines.append(f"gate = int({drive} > 0) : 1")
    if bias:
        lines.append("I_bias : 1")
    return "\n".join(lines)


def fb_neuron_model(top: bool, dropout: bool = False) -> str:
    """The feedback neuron of a column, driven through its gate (and dropout mask); at the top by
    the motor signal ``z`` of the selected action. ``y``, ``gate`` (and ``mask``) are linked to
    the column's feedforward neuron.

    Parameters
    ----------
    top : bool
        The output layer's feedback neurons, driven by ``z`` (gate always open) instead of the
        fb synapses from above.
    dropout : bool
        Whether a dropout layer lies above the column: its ``mask`` scales the feedback.

    Returns
    -------
    str
        The Brian2 model equations of the neuron group.
    """
    if top:
        return "\n".join(["dfb/dt = (-fb + z) / tau_fb : 1", "z : 1", "y : 1 (linked)", "gate = 1 : 1"])
    if dropout:
        return "\n".join(["dfb/dt = (-fb + gate * mask * I_fb) / tau_fb : 1", "I_fb : 1", "y : 1 (linked)", "gate : 1 (linked)", "mask : 1 (linked)"])
    return "\n".join(["dfb/dt = (-fb + gate * I_fb) / tau_fb : 1", "I_fb : 1", "y : 1 (linked)", "gate : 1 (linked)"])


STIMULUS_MODEL = """
y : 1                 # clamped to the image
gate = int(y > 0) : 1 # the gate of the input's fb neurons, which drive no learning
"""
BIAS_UNIT_MODEL = "y : 1  # always 1: biases are synapses from this unit"

DOPAMINE_MODEL = """
delta : 1 (shared)            # the reward-prediction error r - q_s, phasic
plasticity_rate : 1 (shared)  # alpha / (batch * plasticity steps) during the plasticity phase, else 0
consolidate : 1 (shared)      # 1 at the last step of a batch: apply the accumulated change
"""


# {lower}: the ff activity of the lower column as the upper one sees it (after its dropout mask).
FF_SYNAPSE_MODEL = "w : 1\ndw : 1\nI_ff_post = w * {lower} : 1 (summed)" + NEUROMODULATION
FB_SYNAPSE_MODEL = "w : 1\ndw : 1\nI_fb_post = w * fb_pre : 1 (summed)" + NEUROMODULATION
BIAS_SYNAPSE_MODEL = "w : 1\ndw : 1\nI_bias_post = w * y_pre : 1 (summed)" + NEUROMODULATION

# The four factors: dopamine (delta), presynaptic ff activity (as the upper column sees it,
# after dropout), gate and feedback of the upper column. Written in the same order for both
# directions, so tied weights stay bitwise equal.
# It runs in learning batches only, and dw is 0 at the start of every batch (Brian2Network._run).
FF_PLASTICITY = """
dw += plasticity_rate * delta * {lower} * gate_post * fb_post
w = w * (1 - consolidate * decay) + consolidate * dw
"""
FB_PLASTICITY = """
dw += plasticity_rate * delta * {lower} * gate_pre * fb_pre
w = w * (1 - consolidate * decay) + consolidate * dw
"""


# ---------------------------------------------------------------------------------------------
# Settings.

def _milliseconds(value, name: str) -> float:
    """A duration given as a Brian2 time quantity or as a plain number of milliseconds."""
    if isinstance(value, brian2.Quantity):
        if value.dim != brian2.second.dim or value.shape != ():
            raise ValueError(f"{name}: expected a duration (a time quantity or a number of milliseconds), got {value!r}")
        value = float(value / brian2.ms)
    elif not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name}: expected a duration (a time quantity or a number of milliseconds), got {value!r}")
    if not is_number(value, lambda v: v > 0):
        raise ValueError(f"{name}: expected a duration > 0, got {shown(value)} ms")
    return float(value)


@dataclass(frozen=True)
class Timeline:
    """The phases of a trial, in time steps of ``dt`` (milliseconds).

    Parameters
    ----------
    dt : float
        The integration time step (ms).
    steps : dict of str to int
        Time steps of each phase, in the order of :data:`PHASES`.
    """

    dt: float
    steps: dict[str, int]

    @classmethod
    def from_durations(cls, dt, durations: dict) -> "Timeline":
        """The timeline of phases lasting ``durations``, in steps of ``dt``.

        Parameters
        ----------
        dt : duration
            The time step: a Brian2 time quantity or a number of milliseconds.
        durations : dict of str to duration
            The duration of each phase of :data:`PHASES`, keyed by the phase's name.

        Returns
        -------
        Timeline
            The time step in milliseconds and the steps of each phase.

        Raises
        ------
        ValueError
            For a duration that is not > 0 or not a whole number of time steps (named as the
            option ``t_<phase>`` of :func:`build`).
        """
        dt = _milliseconds(dt, "dt")
        steps = {}
        for phase in PHASES:
            name = f"t_{phase}"
            duration = _milliseconds(durations[phase], name)
            if not math.isfinite(duration / dt):  # a dt of a few 1e-310 ms: too many steps to count
                raise ValueError(f"dt: {dt!r} ms makes {name} ({duration:g} ms) too many time steps long to count; at most {MAX_TRIAL_STEPS:,} are simulated in a trial: choose a larger dt")
            count = round(duration / dt)
            if count < 1 or abs(count * dt - duration) > 1e-9 * duration:
                raise ValueError(f"{name}: {duration} ms is not a whole number of time steps dt = {dt} ms")
            steps[phase] = count
        if sum(steps.values()) > MAX_TRIAL_STEPS:
            longest = max(steps, key=steps.get)
            raise ValueError(
                f"dt: {dt:g} ms makes a trial {_step_count(sum(steps.values()))} time steps long (t_{longest}: {_step_count(steps[longest])}); at most "
                f"{MAX_TRIAL_STEPS:,} are simulated: choose a larger dt, or a shorter t_{longest}"
            )
        return cls(dt, steps)

    @property
    def trial_steps(self) -> int:
        """The time steps of a whole trial, all five phases."""
        return sum(self.steps.values())

    def start(self, phase: str) -> int:
        """The time step (within a trial) at which ``phase`` begins.

        Parameters
        ----------
        phase : str
            One of :data:`PHASES`.

        Returns
        -------
        int
            The number of time steps of the phases before it.
        """
        return sum(self.steps[p] for p in PHASES[: PHASES.index(phase)])

    def phase_times(self) -> dict[str, tuple[float, float]]:
        """Start and end of each phase within a trial, in seconds.

        Returns
        -------
        dict of str to (float, float)
            ``(start, end)`` of each phase of :data:`PHASES`, keyed by its name.
        """
        return {p: (self.start(p) * self.dt / 1000, (self.start(p) + self.steps[p]) * self.dt / 1000) for p in PHASES}


def _step_count(count: int) -> str:
    """A number of time steps as a message shows it: digits grouped, or in powers of ten when long."""
    return f"{count:,}" if count < 10**15 else f"{float(count):.3g}"


def unsettled_fraction(steps: int, dt: float, tau: float, stages: int) -> float:
    """The fraction of a step that a chain of low-pass stages has still to go after ``steps``
    time steps of ``dt``.

    Every layer of rate neurons is a first-order low-pass filter of the layer before it, so a
    network settles level by level. As simulated, by exponential Euler, a stage moves in a time
    step from ``y`` to ``a*y + (1 - a)*u`` (``a = exp(-dt/tau)``), ``u`` the activity of the stage
    below at the step's start, so each stage adds a step's delay. A stage passes on a step at
    time 0 as the chance that a geometric number of steps (success chance ``p = 1 - a`` per
    step) is over, and a chain of ``stages`` as the chance that as many successes have come:
    the last stage is ``sum_{k < stages} C(steps, k) p**k a**(steps - k)`` short of its new
    value. As ``dt`` goes to 0 at a fixed ``steps*dt``, this is the continuous chain's
    ``exp(-x) * sum_{k < stages} x**k / k!``, ``x = steps*dt/tau``.

    Parameters
    ----------
    steps : int
        Time steps since the step at the chain's input.
    dt : float
        The time step (ms).
    tau : float
        The time constant of every stage (ms).
    stages : int
        The length of the chain: the levels of columns that settle one after another.

    Returns
    -------
    float
        The fraction of the step still to go at the last stage, in ``[0, 1]`` (1 with no
        steps or a zero ``dt / tau``).
    """
    rate = dt / tau
    if steps == 0 or rate == 0:
        return 1.0
    log_p = math.log(-math.expm1(-rate))
    # Each term in logarithms: the binomial coefficient and the powers alone overflow.
    terms = (
        math.lgamma(steps + 1) - math.lgamma(k + 1) - math.lgamma(steps - k + 1) + k * log_p - ((steps - k) * rate if steps > k else 0.0)
        for k in range(min(stages, steps + 1))
    )
    return sum(math.exp(term) for term in terms)


def warn_if_unsettled(stages: int, timeline: Timeline, tau_ff: float, tau_fb: float) -> None:
    """Warn when a phase is too short for ``stages`` levels of columns to settle.

    The ff activity must settle within ``t_stimulus`` (the Q-values are read then) and the fb
    activity within ``t_selection + t_feedback + t_rpe`` (plasticity begins then); a network
    twice as deep needs longer phases. The warning names the duration that brings the
    remainder of :func:`unsettled_fraction` down to :data:`SETTLING_TOLERANCE`.

    Parameters
    ----------
    stages : int
        Levels of columns that settle one after another (:func:`build` passes the hidden
        layers and the output).
    timeline : Timeline
        The phases of a trial.
    tau_ff, tau_fb : float
        Time constants of the ff and fb rate neurons (ms).

    Warns
    -----
    UserWarning
        When the ff or the fb activity is more than :data:`SETTLING_TOLERANCE` short of its
        fixed point.
    """
    steps = timeline.steps
    other_fb_steps = steps["selection"] + steps["rpe"]  # the phases around t_feedback before plasticity
    checks = (  # neurons, when they must have settled, the option that lengthens it, tau, steps to settle, of them not the option's
        ("ff", "when the Q-values are read", "t_stimulus", tau_ff, steps["stimulus"], 0),
        ("fb", "when plasticity begins", "t_feedback", tau_fb, steps["feedback"] + other_fb_steps, other_fb_steps),
    )
    for neurons, moment, option, tau, settling, others in checks:
        remainder = unsettled_fraction(settling, timeline.dt, tau, stages)
        if remainder <= SETTLING_TOLERANCE:
            continue
        room = MAX_TRIAL_STEPS - (timeline.trial_steps - settling)  # the most steps these phases may take
        enough = _steps_to_settle(settling, timeline.dt, tau, stages, room)
        if enough is None:
            remedy = f"no {option} brings that to {SETTLING_TOLERANCE:.0%} within the {MAX_TRIAL_STEPS:,} time steps of a trial simulated: choose a shorter tau_{neurons}"
        else:
            remedy = f"{option} = {(enough - others) * timeline.dt:g} ms brings that to {SETTLING_TOLERANCE:.0%}, near the torch backend's values"
        warnings.warn(
            f"{BACKEND} backend: with {stages} levels of columns the {neurons} activity is still {remainder:.2%} "
            f"short of its fixed point {moment} ({tau:g} ms time constants); {remedy} (shorter phases simulate a "
            f"transient version of the rule)",
            stacklevel=_first_caller_outside_agrel_sim(),
        )


def _steps_to_settle(too_few: int, dt: float, tau: float, stages: int, most: int) -> int | None:
    """The fewest time steps after which :func:`unsettled_fraction` is within
    :data:`SETTLING_TOLERANCE`, given that ``too_few`` are not enough (the remainder falls with
    time), or None where more than ``most`` would be needed: doubling, then bisection, so that a
    tau of many steps is found in a few dozen tries."""
    def settles(steps: int) -> bool:
        return unsettled_fraction(steps, dt, tau, stages) <= SETTLING_TOLERANCE

    if not settles(most):
        return None
    low, high = too_few, min(max(2 * too_few, 1), most)
    while not settles(high):
        low, high = high, min(2 * high, most)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if settles(middle) else (middle, high)
    return high


def _first_caller_outside_agrel_sim() -> int:
    """The ``stacklevel`` that makes a warning name the code that called into agrel-sim (the
    user's script, or the ``agrel-sim`` command): the caller of its outermost function on the
    stack, however many functions lie between, and past the standard library's frames around
    that function (one decorated by a ``contextlib`` context manager is called from within
    ``contextlib``)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames, frame = [], sys._getframe(2)  # stacklevel 1 is the function that warns; 2 its caller
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    inside = [index for index, frame in enumerate(frames) if os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep)]
    caller = inside[-1] + 1 if inside else 0
    while caller + 1 < len(frames) and frames[caller].f_globals.get("__name__", "").partition(".")[0] in sys.stdlib_module_names:
        caller += 1
    return caller + 2


# ---------------------------------------------------------------------------------------------
# What a batch of trials returns.

@dataclass
class LayerTrace:
    """One population's activity at every time step of a trial.

    ``ff``, ``fb`` and ``gate`` are arrays of shape ``(time steps, columns)``; ``gate`` is bool.

    Parameters
    ----------
    name : str
        ``"input"``, ``"layers.N"`` or ``"output"``.
    ff : ndarray (T, columns)
        Activity of the feedforward neurons (for the input: the stimulus).
    fb : ndarray (T, columns)
        Activity of the feedback neurons.
    gate : ndarray of bool (T, columns)
        Whether each column's gate was open.
    """

    name: str
    ff: np.ndarray
    fb: np.ndarray
    gate: np.ndarray


@dataclass
class TrialTrace:
    """The time course of one trial, sampled at the end of every time step.

    Parameters
    ----------
    trial : int
        The trial's index among all trials this network has run (from 0).
    t : ndarray (T,)
        Time since the trial's start, in seconds.
    phases : dict of str to (float, float)
        Start and end of each phase, in seconds.
    delta : ndarray (T,)
        The dopamine signal: 0 until the RPE phase, then ``r - q_s``.
    layers : list of LayerTrace
        The input (``ff`` is the stimulus, ``fb`` the feedback that reaches it), each hidden
        layer, then the output (``ff`` are the Q-values, ``fb`` the selected action's signal).
    """

    trial: int
    t: np.ndarray
    phases: dict[str, tuple[float, float]]
    delta: np.ndarray
    layers: list[LayerTrace]


@dataclass
class Brian2Trials(Trials):
    """:class:`~agrel_sim.backends.torch_backend.Trials` plus the time courses of the trials
    chosen for tracing (``trace_every``), in the order they ran.

    Parameters
    ----------
    q : Tensor (B, L)
        Q-values, read at the end of the stimulus phase.
    action : Tensor (B,)
        The selected (or forced) action.
    reward : Tensor (B,)
        The reward ``r`` of each trial.
    delta : Tensor (B,) or None
        The reward-prediction error ``r - q_s``.
    loss : Tensor () or None
        Always None (this backend runs DeepAGREL only).
    layers : list of LayerActivity or None
        Each layer's activity at the end of each trial, bottom to top; only when asked for.
    traces : list of TrialTrace
        The time courses of the traced trials.
    """

    traces: list[TrialTrace] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Thin classes around the Brian2 objects.

class DenseColumnPopulation:
    """A layer of dense columns: its ff and fb neurons and the ff and fb synapses from below.

    Parameters
    ----------
    name : str
        ``"layers.N"`` or ``"output"``, as in the torch backend.
    ff_neurons, fb_neurons : brian2.NeuronGroup
        The columns' feedforward and feedback neurons.
    ff_synapses : brian2.Synapses
        From the ff neurons of the layer below to :attr:`ff_neurons`.
    fb_synapses : brian2.Synapses
        From :attr:`fb_neurons` to the fb neurons of the layer below.
    bias_synapses : brian2.Synapses or None
        From the always-active bias unit to :attr:`ff_neurons` (when the rule has biases).
    weight_shape : tuple of int
        ``(units, inputs)``, the torch layout of the ff and fb weights.
    tied : bool
        ``tied`` feedback: setting ``ff`` or ``fb`` sets both.
    dtype : torch.dtype
        The floating-point type of the weights handed out.
    """

    has_weights = True

    def __init__(self, name, ff_neurons, fb_neurons, ff_synapses, fb_synapses, bias_synapses, weight_shape, tied, dtype):
        self.name = name
        self.ff_neurons, self.fb_neurons = ff_neurons, fb_neurons
        self.ff_synapses, self.fb_synapses, self.bias_synapses = ff_synapses, fb_synapses, bias_synapses
        self.weight_shape = weight_shape
        self.tied = tied
        self.dtype = dtype

    @property
    def ff(self) -> ReadOnlyWeights:
        """Feedforward weights ``(units, inputs)``: a read-only copy (in-place writes raise, as
        on the torch backend); assign a tensor to set them."""
        return ReadOnlyWeights.of(_tensor(self.ff_synapses.w[:].reshape(self.weight_shape), self.dtype), f"{self.name}.ff")

    @ff.setter
    def ff(self, value):
        matrix = _matrix(value, self.weight_shape, f"{self.name}.ff")
        self.ff_synapses.w[:] = matrix.ravel()
        if self.tied:
            self.fb_synapses.w[:] = matrix.ravel()

    @property
    def fb(self) -> ReadOnlyWeights:
        """Feedback weights ``fb[q, m]`` from upper column q to lower column m, the layout of
        :attr:`ff` (strict reciprocity reads ``fb == ff``), read as :attr:`ff`. In ``tied`` mode
        setting either sets both."""
        return ReadOnlyWeights.of(_tensor(self.fb_synapses.w[:].reshape(self.weight_shape), self.dtype), f"{self.name}.fb")

    @fb.setter
    def fb(self, value):
        if self.tied:
            self.ff = value
        else:
            self.fb_synapses.w[:] = _matrix(value, self.weight_shape, f"{self.name}.fb").ravel()

    @property
    def bias(self) -> ReadOnlyWeights | None:
        """The columns' biases, read as :attr:`ff`, or None when the rule has none."""
        if self.bias_synapses is None:
            return None
        return ReadOnlyWeights.of(_tensor(self.bias_synapses.w[:], self.dtype), f"{self.name}.bias")

    @bias.setter
    def bias(self, value):
        if self.bias_synapses is None:
            raise ValueError(f"{self.name}.bias: this network has no biases (rule.bias = false)")
        self.bias_synapses.w[:] = _matrix(value, (self.weight_shape[0],), f"{self.name}.bias")


class DropoutColumns(DropoutLayer):
    """A dropout layer: the ``mask`` of the columns below it (the module's docstring); no
    neurons and no weights of its own (:class:`~agrel_sim.backends.DropoutLayer`).

    Parameters
    ----------
    name : str
        ``"layers.N"``, as in the torch backend.
    rate : float
        The fraction of the columns below dropped in each trial of a learning batch.
    columns : DenseColumnPopulation
        The columns below (through any dropout layers between).
    """

    def __init__(self, name, rate, columns):
        self.name = name
        self.rate = rate
        self.columns = columns


def _four_factor_change(after: np.ndarray, before: np.ndarray, decay: float) -> np.ndarray:
    """``after - before * (1 - decay)``, with differences within rounding of the decay set to 0."""
    change = after - before * (1 - decay)
    change[np.abs(change) <= 1e-12 * np.abs(before)] = 0.0
    return change


def _tensor(array: np.ndarray, dtype) -> torch.Tensor:
    """A tensor that owns a copy of ``array`` (Brian2 may hand out views of its state)."""
    return torch.tensor(array, dtype=dtype)


def _matrix(value, shape, name) -> np.ndarray:
    """Weights to assign, checked by :func:`~agrel_sim.backends.weights_to_set`, as a float64 array."""
    return weights_to_set(value, shape, name, torch.float64).detach().cpu().numpy()


@contextlib.contextmanager
def _codegen_target(target: str):
    previous = brian2.prefs.codegen.target
    brian2.prefs.codegen.target = target
    try:
        yield
    finally:
        brian2.prefs.codegen.target = previous


@contextlib.contextmanager
def _generated_code(target: str):
    """:func:`_codegen_target`, naming the setting when Cython code cannot be built."""
    try:
        with _codegen_target(target):
            yield
    except Exception as error:  # Cython missing, no C++ compiler, a failed compilation: Brian2 raises many kinds
        if target != "cython":
            raise
        raise ValueError(
            f"codegen_target: Brian2 could not build its Cython code ({type(error).__name__}: {error}); "
            "install Cython and a C++ compiler, or set codegen_target = 'numpy'"
        ) from error


class Brian2Network:
    """A dense :class:`~agrel_sim.network.ColumnNetwork` built into Brian2 objects.

    Built by :func:`build`; see there and the module docstring for the parameters and the
    trial's timeline. The API is that of the torch backend: :meth:`run_trials`,
    :meth:`q_values`, :meth:`weights`, :meth:`load_weights`, :meth:`feedback_alignment`, and ``ff`` /
    ``fb`` per layer.

    Parameters
    ----------
    description : ColumnNetwork
        The description: dense and dropout layers only, rule ``deepagrel``.
    timeline : Timeline
        The phases of a trial.
    tau_ff, tau_fb : float
        Time constants of the ff and fb rate neurons (ms).
    codegen_target : {"numpy", "cython"}
        Brian2's runtime code generation target.
    trace_every : int
        Trace every ``trace_every``-th trial; 0: none.
    dtype : torch.dtype
        The floating-point type of returned tensors.
    seed : int
        Seeds the initial weights (those of the torch backend) and action selection.

    Attributes
    ----------
    backend : str
        ``"brian2"``, the key of this backend in :data:`agrel_sim.backends.BACKENDS`.
    description : ColumnNetwork
    layers : list of DenseColumnPopulation and DropoutColumns
        The hidden layers bottom to top, then the output layer, as in the torch backend.
    columns : list of DenseColumnPopulation
        The layers of :attr:`layers` that have columns and weights (not the dropout layers).
    timeline : Timeline
    network : brian2.Network
        The one Brian2 network that every batch of trials runs in.
    dopamine : brian2.NeuronGroup
        The neuromodulator: ``delta``, ``plasticity_rate``, ``consolidate``.
    device : torch.device
        Always the CPU (where returned tensors live).
    dtype : torch.dtype
        The floating-point type of returned tensors; the simulation runs in float64.
    """

    backend = BACKEND
    computes_in = torch.float64  # Brian2's state variables, whatever the dtype of the tensors returned

    def __init__(self, description: ColumnNetwork, timeline: Timeline, tau_ff: float, tau_fb: float,
                 codegen_target: str, trace_every: int, dtype: torch.dtype, seed: int):
        self.description = description
        self.timeline = timeline
        self.codegen_target = codegen_target
        self.trace_every = trace_every
        self.device = torch.device("cpu")
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)
        self.trials_run = 0
        # decay: set from the learning rate at the start of every batch (_run)
        self.namespace = {"tau_ff": tau_ff * brian2.ms, "tau_fb": tau_fb * brian2.ms, "decay": 0.0}
        self.learning_rate = description.rule.learning_rate
        self.clock = brian2.Clock(dt=timeline.dt * brian2.ms, name="trial_clock")
        self._episode = None
        self._made = []  # every group, synapses and operation, as it is made
        try:
            with _generated_code(codegen_target):  # connect() runs generated code too
                objects = self._build_populations()
            self._events = brian2.NetworkOperation(lambda: self._episode.start_of_step(), clock=self.clock, when="start", name="trial_events")
            self._observer = brian2.NetworkOperation(lambda: self._episode.end_of_step(), clock=self.clock, when="end", order=10, name="trial_observer")
            self._made += [self._events, self._observer]
            self.network = brian2.Network(*objects, self._events, self._observer)
            with _generated_code(codegen_target):  # generate (for Cython: compile) the code now
                self.network.run(0 * brian2.ms, namespace={})
        except Exception:
            self._discard()
            raise
        self.load_weights(TorchNetwork(description, dtype=torch.float64, seed=seed).weights())

    learning_rate = LEARNING_RATE

    def _discard(self):
        """Let the objects of a build that failed go quietly: Brian2 warns, as it deletes each
        object that never ran in a network, that it was probably lost by mistake, and a screen of
        those warnings would bury the build's own error."""
        for made in self._made:
            made._network = "discarded"  # what Brian2 checks: None in an object that never ran

    def _neurons(self, size, model, name, **options):
        self._made.append(brian2.NeuronGroup(size, model, clock=self.clock, name=name, namespace=self.namespace, **options))
        return self._made[-1]

    def _synapses(self, source, target, model, name):
        self._made.append(brian2.Synapses(source, target, model, clock=self.clock, name=name, namespace=self.namespace))
        return self._made[-1]

    def _link_dopamine(self, target):
        for name in ("delta", "plasticity_rate", "consolidate"):
            setattr(target, name, brian2.linked_var(self.dopamine, name))

    def _build_populations(self) -> list:
        """Create the groups, synapses and plasticity operations; return them all."""
        description, bias = self.description, self.description.rule.bias
        shapes = description.layer_shapes()
        n_input = math.prod(shapes[0])
        self.dopamine = self._neurons(1, DOPAMINE_MODEL, "dopamine")
        self.stimulus = self._neurons(n_input, STIMULUS_MODEL, "input_ff")
        self.input_feedback = self._neurons(n_input, fb_neuron_model(top=False), "input_fb", method="exponential_euler")
        self.input_feedback.y = brian2.linked_var(self.stimulus, "y")
        self.input_feedback.gate = brian2.linked_var(self.stimulus, "gate")
        objects = [self.dopamine, self.stimulus, self.input_feedback]
        self._plasticity = []  # the plasticity operations, active in learning batches only
        if bias:
            bias_unit = self._neurons(1, BIAS_UNIT_MODEL, "bias_unit")
            bias_unit.y = 1.0
            objects.append(bias_unit)
        below_ff, below_fb, below_masked = self.stimulus, self.input_feedback, False
        names = [f"layers.{i}" for i in range(len(description.layers))] + ["output"]
        self.layers = []
        for index, name in enumerate(names):
            top = name == "output"
            if not top and isinstance(description.layers[index], Dropout):
                self.layers.append(DropoutColumns(name, description.layers[index].rate, self.columns[-1]))  # never the input (ColumnNetwork refuses it)
                continue
            units, inputs = math.prod(shapes[index + 1]), math.prod(shapes[index])
            label = name.replace(".", "_")
            masked = not top and index + 1 < len(description.layers) and isinstance(description.layers[index + 1], Dropout)  # a dropout layer above
            ff = self._neurons(units, ff_neuron_model(linear=top, bias=bias, dropout=masked), f"{label}_ff", method="exponential_euler")
            fb = self._neurons(units, fb_neuron_model(top=top, dropout=masked), f"{label}_fb", method="exponential_euler")
            ff.fb = brian2.linked_var(fb, "fb")
            fb.y = brian2.linked_var(ff, "y")
            if not top:
                fb.gate = brian2.linked_var(ff, "gate")
            if masked:
                ff.mask = 1.0
                fb.mask = brian2.linked_var(ff, "mask")
            # Synapse k joins lower column k % inputs and upper column k // inputs, so the weight
            # array reshaped to (units, inputs) is the torch layout of both ff and fb.
            upper, lower = np.repeat(np.arange(units), inputs), np.tile(np.arange(inputs), units)
            ff_syn = self._synapses(below_ff, ff, FF_SYNAPSE_MODEL.format(lower="y_pre * mask_pre" if below_masked else "y_pre"), f"{label}_ff_synapses")
            ff_syn.connect(i=lower, j=upper)
            fb_syn = self._synapses(fb, below_fb, FB_SYNAPSE_MODEL, f"{label}_fb_synapses")
            fb_syn.connect(i=upper, j=lower)
            plastic = [
                (ff_syn, FF_PLASTICITY.format(lower="y_pre * mask_pre" if below_masked else "y_pre")),
                (fb_syn, FB_PLASTICITY.format(lower="y_post * mask_post" if below_masked else "y_post")),
            ]
            bias_syn = None
            if bias:  # a synapse whose presynaptic activity is 1, learnt like the others
                bias_syn = self._synapses(bias_unit, ff, BIAS_SYNAPSE_MODEL, f"{label}_bias_synapses")
                bias_syn.connect(i=np.zeros(units, dtype=int), j=np.arange(units))
                plastic.append((bias_syn, FF_PLASTICITY.format(lower="y_pre")))
            for synapses, code in plastic:
                self._link_dopamine(synapses)
                self._plasticity.append(synapses.run_regularly(code, when="end", name=f"{synapses.name}_plasticity"))
                objects += [synapses, self._plasticity[-1]]
            objects += [ff, fb]
            tied = description.rule.feedback == "tied"
            self.layers.append(DenseColumnPopulation(name, ff, fb, ff_syn, fb_syn, bias_syn, (units, inputs), tied, self.dtype))
            below_ff, below_fb, below_masked = ff, fb, masked
        return objects

    @property
    def columns(self) -> list[DenseColumnPopulation]:
        """The layers with columns and weights, bottom to top: :attr:`layers` less the dropout layers."""
        return [layer for layer in self.layers if layer.has_weights]

    # -- weights ------------------------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """Copies of all weights, keyed ``"<layer>.ff"``, ``"<layer>.fb"``, ``"<layer>.bias"``.

        In float64, the simulation's own precision, whatever ``dtype``: a checkpoint of them
        restores the network exactly.

        Returns
        -------
        dict of str to Tensor
            Float64 copies on the CPU, ``(units, inputs)`` for ``ff`` and ``fb``, ``(units,)``
            for ``bias``.
        """
        out = {}
        for layer in self.columns:
            synapses = {"ff": layer.ff_synapses, "fb": layer.fb_synapses, "bias": layer.bias_synapses}
            for part, group in synapses.items():
                if group is not None:
                    shape = (-1,) if part == "bias" else layer.weight_shape
                    out[f"{layer.name}.{part}"] = _tensor(group.w[:].reshape(shape), torch.float64)
        return out

    def load_weights(self, weights: dict) -> None:
        """Set weights from a dict as returned by :meth:`weights` (every key must be present;
        in ``tied`` mode the ``fb`` entries are checked but not used, as in the torch backend).
        Every entry is checked before any is set: a bad one leaves the network as it was.

        Parameters
        ----------
        weights : dict of str to Tensor
            Weights keyed as :meth:`weights` returns them, each of its layer's shape.

        Raises
        ------
        ValueError
            For missing or unexpected keys, or an entry that is not finite real numbers of the
            right shape.
        """
        check_weights_to_load(weights, self.weights(), torch.float64)
        for layer in self.columns:
            layer.ff = weights[f"{layer.name}.ff"]
            if not layer.tied:
                layer.fb = weights[f"{layer.name}.fb"]
            if self.description.rule.bias:
                layer.bias = weights[f"{layer.name}.bias"]

    def feedback_alignment(self) -> dict[str, float]:
        """How closely each layer's feedback weights mirror its feedforward weights.

        Returns
        -------
        dict of str to float
            For every layer with weights (not the dropout layers), the hidden ones bottom to top
            and then ``output``: the cosine
            similarity of its ``ff`` and ``fb`` synapses' weights, biases excluded
            (:func:`agrel_sim.rule.feedback_alignment`); 1.0 for ``tied`` and ``reciprocal``
            feedback.
        """
        return {layer.name: agrel.feedback_alignment(layer.ff, layer.fb) for layer in self.columns}

    # -- trials -------------------------------------------------------------------------------

    def _check_batch(self, images, labels=None, actions=None, check_range=True, trials=False) -> np.ndarray:
        return check_batch(self.description, images, labels, actions, check_range, trials=trials, dtype=torch.float64).detach().cpu().flatten(1).numpy()

    def _run(self, episode: "_Episode") -> None:
        """Run ``episode`` in one Brian2 run, the plasticity code only when it learns.

        The batch starts from no pending change, whatever an earlier run left in ``dw`` (an
        interrupted batch, NaN), and weights set since then are the ones it starts from.
        """
        self._drop_pending_change()
        for operation in self._plasticity:
            operation.active = episode.learn
        # Brian2 reads external constants from the namespace at the start of every run.
        self.namespace["decay"] = self.learning_rate * self.description.rule.weight_decay
        self._episode = episode
        try:
            with _codegen_target(self.codegen_target):
                self.network.run(episode.total_steps * self.timeline.dt * brian2.ms, namespace={})
        finally:
            self._episode = None
        if episode.step != episode.total_steps:
            raise RuntimeError(f"brian2 backend: the run took {episode.step} time steps, expected {episode.total_steps}")

    def _drop_pending_change(self) -> None:
        """Zero the accumulated weight changes and the dopamine signals."""
        for layer in self.columns:
            for synapses in (layer.ff_synapses, layer.fb_synapses, layer.bias_synapses):
                if synapses is not None:
                    synapses.dw[:] = 0.0
        for name in ("delta", "plasticity_rate", "consolidate"):
            _state(self.dopamine, name)[:] = 0.0

    def q_values(self, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """Q-values of a batch, read at the end of the stimulus phase; no feedback, no learning.

        Each image is one stimulus phase of the timeline, all in one Brian2 run;
        ``check_range=False`` skips checking the images' values (see :func:`check_batch`).

        Parameters
        ----------
        images : Tensor (B, *input_shape)
            Floating-point stimuli: rates, finite and ``>= 0``.
        check_range : bool, default True
            Check that the images are finite and ``>= 0``.

        Returns
        -------
        Tensor (B, n_actions)
            The Q-values, on the CPU in :attr:`dtype`.

        Raises
        ------
        TypeError, ValueError
            For a batch that does not fit the network.
        """
        stimuli = self._check_batch(images, check_range=check_range)
        episode = _Episode(self, stimuli, steps_per_trial=self.timeline.steps["stimulus"])
        self._run(episode)
        return torch.from_numpy(episode.q).to(self.dtype)

    def run_trials(self, images, labels, actions=None, learn=True, record=False, check_range=True) -> Brian2Trials:
        """Run a batch of trials, one after another in simulated time, from the same weights.

        Parameters
        ----------
        images : Tensor (B, *input_shape)
            Floating-point stimuli.
        labels : Tensor (B,) of any integer dtype
            The correct action of each trial.
        actions : Tensor (B,) of any integer dtype, optional
            Force these actions instead of selecting them.
        learn : bool
            Apply plasticity (and dropout): the mean of the B single-trial changes, at the end
            of the batch.
        record : bool
            Also return each layer's ff activity, fb activity and gate at the end of each trial.
        check_range : bool
            Check that images are finite and ``>= 0`` and that labels and actions lie in
            ``[0, n_actions)``, as the torch backend does (see :func:`~agrel_sim.backends.check_batch`).

        Returns
        -------
        Brian2Trials
            ``q`` (read at the end of the stimulus phase), ``action``, ``reward``, ``delta``,
            ``layers`` (when ``record``) and ``traces`` of the trials chosen by ``trace_every``.
        """
        stimuli = self._check_batch(images, labels, actions, check_range, trials=True)
        before = {layer.name: layer.ff_synapses.w[:].copy() for layer in self.columns} if record and learn else None
        decay = self.learning_rate * self.description.rule.weight_decay  # as the batch's end applies it
        episode = _Episode(
            self, stimuli, steps_per_trial=self.timeline.trial_steps, labels=labels.detach().cpu().long(),
            actions=None if actions is None else actions.detach().cpu().long(), learn=learn, record=record,
        )
        self._run(episode)
        self.trials_run += len(stimuli)
        q = torch.from_numpy(episode.q).to(self.dtype)
        chosen = torch.tensor(episode.actions, dtype=torch.long)
        rewards = agrel.reward(chosen, episode.labels, self.description.neuromodulator.reward_correct, self.description.neuromodulator.reward_wrong, self.dtype)
        records = None
        if record:
            # The fraction of synapses that the four-factor rule changed, as the torch backend counts
            # it: the change after the weight decay, less what is left of the decay's rounding.
            changed = {layer.name: changed_fraction(torch.from_numpy(_four_factor_change(layer.ff_synapses.w[:], before[layer.name], decay))) for layer in self.columns} if learn else {}
            records = [
                LayerActivity(layer.name, *(torch.from_numpy(np.stack(episode.records[layer.name][part])).to(self.dtype) for part in ("ff", "fb")),
                              torch.from_numpy(np.stack(episode.records[layer.name]["gate"])).bool(), changed.get(layer.name))
                for layer in self.layers
            ]
        return Brian2Trials(q, chosen, rewards, delta=torch.tensor(episode.deltas, dtype=self.dtype), layers=records, traces=episode.traces)


class _Episode:
    """One Brian2 run: a sequence of trials, driven at phase boundaries by network operations.

    With ``steps_per_trial`` equal to the stimulus phase only (``labels`` None), it measures
    Q-values: no selection, no dopamine, no learning.
    """

    def __init__(self, net: Brian2Network, stimuli, steps_per_trial, labels=None, actions=None, learn=False, record=False):
        self.net = net
        self.stimuli = stimuli
        self.steps_per_trial = steps_per_trial
        self.total_steps = steps_per_trial * len(stimuli)
        self.labels, self.forced, self.learn, self.record = labels, actions, learn, record
        n_actions = net.description.n_actions
        # Dropout, (B, columns) each: the scale of each dropout layer's columns up to that layer,
        # and the mask of each layer of columns below dropout (the scale of its top dropout layer).
        self.dropout_scales, self.mask_rows = self._draw_dropout() if learn else ({}, {})
        # The random numbers of action selection for the whole batch, drawn before its first
        # trial as the torch backend draws them (in the dtype it would run in); row i is trial i's.
        self.exploration = None
        if labels is not None and actions is None:
            selection = net.description.action_selection
            self.exploration = agrel.exploration_draws(len(stimuli), n_actions, selection.epsilon, net.dtype, net.generator)
        self.step = 0
        timeline = net.timeline
        self.selection_step = timeline.start("selection")
        self.rpe_step = timeline.start("rpe")
        self.plasticity_step = timeline.start("plasticity")
        self.plasticity_rate = net.learning_rate / (len(stimuli) * timeline.steps["plasticity"]) if learn else 0.0
        self.q = np.zeros((len(stimuli), n_actions))
        self.actions, self.deltas, self.traces = [], [], []
        self.records = {layer.name: {"ff": [], "fb": [], "gate": []} for layer in net.layers}
        self.tracing = None
        self.trial_scales = {}  # the current trial's rows of dropout_scales
        # Views of the state arrays (runtime mode: the arrays the generated code works on).
        self.ff_rates = {layer.name: _state(layer.ff_neurons, "y") for layer in net.columns}
        self.fb_rates = {"input": _state(net.input_feedback, "fb")} | {layer.name: _state(layer.fb_neurons, "fb") for layer in net.columns}
        self.drives = {layer.name: [_state(layer.ff_neurons, name) for name in ("I_ff", "I_bias") if name in layer.ff_neurons.variables] for layer in net.columns}
        self.masks = {layer.name: _state(layer.ff_neurons, "mask") for layer in net.columns if "mask" in layer.ff_neurons.variables}
        self.stimulus = _state(net.stimulus, "y")
        self.motor = _state(net.columns[-1].fb_neurons, "z")
        self.dopamine = {name: _state(net.dopamine, name) for name in ("delta", "plasticity_rate", "consolidate")}

    def _draw_dropout(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The columns kept in every trial, drawn as the torch backend's forward pass draws them
        (in float32, layer by layer from the bottom; none at rate 0), and their scale: for each
        dropout layer, ``(B, columns)``, the product of ``1 / (1 - rate)`` (0 where dropped) over
        it and the dropout layers between it and its columns (none where all of these have rate
        0); and, by the name of the columns' layer, that product over all their dropout layers."""
        scales = {}
        below = {}  # the columns' scale so far, by their layer's name
        for layer in self.net.layers:
            if not isinstance(layer, DropoutColumns):
                continue
            columns = layer.columns.name
            if layer.rate > 0:
                keep = torch.rand((len(self.stimuli), layer.columns.weight_shape[0]), generator=self.net.generator, dtype=torch.float32) >= layer.rate
                scale = keep.numpy().astype(np.float64) / (1 - layer.rate)
                below[columns] = below[columns] * scale if columns in below else scale
            if columns in below:  # a layer of rate 0 passes on the scale of those below it
                scales[layer.name] = below[columns]
        return scales, below

    def start_of_step(self):
        """The events at phase boundaries, before the neurons integrate this time step."""
        trial, step = divmod(self.step, self.steps_per_trial)
        if step == 0:
            self._begin_trial(trial)
        if self.labels is None:
            return
        if step == self.selection_step:
            self._select_action(trial)
        if step == self.rpe_step:
            self._dopamine_release(trial)
        if step == self.plasticity_step:
            self.dopamine["plasticity_rate"][:] = self.plasticity_rate
        if self.learn and self.step == self.total_steps - 1:
            self.dopamine["consolidate"][:] = 1.0

    def end_of_step(self):
        """Read-out and recording, after the neurons and synapses have been updated."""
        trial, step = divmod(self.step, self.steps_per_trial)
        if self.tracing is not None:
            self._sample(self.tracing)
        if step == self.selection_step - 1:  # the end of the stimulus phase
            self.q[trial] = self.ff_rates["output"]
        if step == self.steps_per_trial - 1:
            if self.record:
                self._record_end_of_trial()
            if self.tracing is not None:
                self.traces.append(self._finish_trace(self.tracing))
                self.tracing = None
            if self.learn and trial == len(self.stimuli) - 1:
                self.dopamine["consolidate"][:] = 0.0
        self.step += 1

    # -- events -------------------------------------------------------------------------------

    def _begin_trial(self, trial):
        """The inter-trial reset: all activity back to 0, the new stimulus on, the trial's
        dropout masks set, no dopamine."""
        for rates in (*self.ff_rates.values(), *self.fb_rates.values()):
            rates[:] = 0.0
        self.trial_scales = {name: scales[trial] for name, scales in self.dropout_scales.items()}
        for name, mask in self.masks.items():
            mask[:] = self.mask_rows[name][trial] if name in self.mask_rows else 1.0
        self.motor[:] = 0.0
        self.stimulus[:] = self.stimuli[trial]
        self.dopamine["delta"][:] = 0.0
        self.dopamine["plasticity_rate"][:] = 0.0
        every = self.net.trace_every
        index = self.net.trials_run + trial
        if self.labels is not None and every and index % every == 0:
            self.tracing = {"trial": index, "ff": [], "fb": [], "gate": [], "delta": []}

    def _select_action(self, trial):
        net = self.net
        q = torch.from_numpy(self.q[trial : trial + 1])
        if self.forced is None:
            draws = None if self.exploration is None else tuple(rows[trial : trial + 1] for rows in self.exploration)
            action = int(agrel.max_boltzmann(q, net.description.action_selection.tau, draws)[0])
        else:
            action = int(self.forced[trial])
        self.actions.append(action)
        self.motor[action] = 1.0  # z_s = 1: the selected unit's fb neuron starts the feedback wave

    def _dopamine_release(self, trial):
        net = self.net
        modulator = net.description.neuromodulator
        action = torch.tensor([self.actions[trial]])
        q = torch.from_numpy(self.q[trial : trial + 1])
        r = agrel.reward(action, self.labels[trial : trial + 1], modulator.reward_correct, modulator.reward_wrong, q.dtype)
        delta = float(agrel.rpe(q, action, r)[0])
        self.deltas.append(delta)
        self.dopamine["delta"][:] = delta

    # -- observation --------------------------------------------------------------------------

    def _populations(self):
        """Name, ff rates, fb rates and open gates, input to output: the gates as the models have
        them (:func:`ff_neuron_model`), from the drive the neurons integrated in this time step.
        A dropout layer shows its columns, as on the torch backend: their activity as the layer
        above sees it (scaled, 0 where dropped), their gate and their feedback."""
        net = self.net
        yield "input", self.stimulus, self.fb_rates["input"], self.stimulus > 0
        for layer in net.layers:
            if isinstance(layer, DropoutColumns):
                name = layer.columns.name
                ff = self.ff_rates[name] * self.trial_scales[layer.name] if layer.name in self.trial_scales else self.ff_rates[name]
                yield layer.name, ff, self.fb_rates[name], self._gate(name)
            else:
                yield layer.name, self.ff_rates[layer.name], self.fb_rates[layer.name], self._gate(layer.name)

    def _gate(self, name) -> np.ndarray:
        """The open gates of the columns of layer ``name``: the output's always; a hidden layer's
        where the drive is above 0 and the column is not dropped."""
        if name == "output":
            return np.ones(self.ff_rates[name].shape, dtype=bool)
        gate = sum(self.drives[name]) > 0
        return gate & (self.masks[name] > 0) if name in self.masks else gate

    def _sample(self, trace):
        ff, fb, gate = [], [], []
        for _, ff_rates, fb_rates, gates in self._populations():
            ff.append(ff_rates.copy())
            fb.append(fb_rates.copy())
            gate.append(gates)
        trace["ff"].append(ff)
        trace["fb"].append(fb)
        trace["gate"].append(gate)
        trace["delta"].append(float(self.dopamine["delta"][0]))

    def _finish_trace(self, trace) -> TrialTrace:
        timeline = self.net.timeline
        steps = len(trace["delta"])
        layers = [
            LayerTrace(name, np.stack([s[i] for s in trace["ff"]]), np.stack([s[i] for s in trace["fb"]]), np.stack([s[i] for s in trace["gate"]]))
            for i, (name, *_) in enumerate(self._populations())
        ]
        t = np.arange(1, steps + 1) * timeline.dt / 1000
        return TrialTrace(trace["trial"], t, timeline.phase_times(), np.array(trace["delta"]), layers)

    def _record_end_of_trial(self):
        for name, ff_rates, fb_rates, gates in list(self._populations())[1:]:
            record = self.records[name]
            record["ff"].append(ff_rates.copy())
            record["fb"].append(fb_rates.copy())
            record["gate"].append(gates)


def _state(group, name) -> np.ndarray:
    """The array behind a state variable (changed in place by the simulation and by events)."""
    return group.variables[name].get_value()


def check_network(network: ColumnNetwork) -> None:
    """Raise unless every layer is dense or dropout and the rule is DeepAGREL (what this backend builds).

    Parameters
    ----------
    network : ColumnNetwork
        The description to check.

    Raises
    ------
    UnsupportedLayerError
        For a layer kind other than dense and dropout (the message names the backend and the kind).
    ValueError
        For rule ``ebp``.
    """
    for index, layer in enumerate(network.layers):
        if not isinstance(layer, Dense | Dropout):
            raise UnsupportedLayerError(
                f"{network.source}: layers[{index}]: the {BACKEND} backend builds dense column layers (and dropout) only, "
                f"not layer kind {layer.kind!r}; use backend='torch' for this network"
            )
    if network.rule.name != "deepagrel":
        raise ValueError(f"{network.source}: rule.name: the {BACKEND} backend simulates DeepAGREL only, got {network.rule.name!r}; use backend='torch' for it")


def build(
    network: ColumnNetwork,
    device="cpu",
    dtype=torch.float32,
    seed: int = 0,
    tau_ff=10.0,
    tau_fb=10.0,
    dt=1.0,
    t_stimulus=100.0,
    t_selection=20.0,
    t_feedback=80.0,
    t_rpe=10.0,
    t_plasticity=10.0,
    codegen_target: str = "numpy",
    trace_every: int = 0,
) -> Brian2Network:
    """Build a dense column network (dense and dropout layers) into Brian2 objects (runtime mode).

    Durations are Brian2 time quantities (``10 * ms``) or plain numbers of milliseconds.

    Parameters
    ----------
    network : ColumnNetwork
        The description; dense and dropout layers only, rule ``deepagrel``.
    device : str or torch.device
        Must be the CPU (Brian2's runtime mode runs there); accepted for the common API.
    dtype : torch.dtype
        ``torch.float32`` or ``torch.float64``: the type of returned tensors. The simulation
        itself always runs in float64.
    seed : int
        The initial weights are those of the torch backend built with this seed (so both
        backends start from identical weights); it also seeds action selection.
    tau_ff, tau_fb : duration
        Time constants of the ff and fb rate neurons (default 10 ms each).
    dt : duration
        Integration time step (default 1 ms); every phase must last a whole number of steps.
    t_stimulus, t_selection, t_feedback, t_rpe, t_plasticity : duration
        Durations of the five phases (defaults 100, 20, 80, 10, 10 ms): the ff activity settles
        for ``t_stimulus`` before the Q-values are read; the feedback wave settles for
        ``t_selection + t_feedback`` (and keeps integrating through ``t_rpe``) before the
        plasticity phase.
    codegen_target : {"numpy", "cython"}
        Brian2's runtime code generation target (Cython compiles on first use and caches the
        compiled code in ``~/.cython``).
    trace_every : int
        Record the time course of every ``trace_every``-th trial (counting the trials of all
        its ``run_trials`` batches, from 0; ``q_values`` does not count) into
        :attr:`Brian2Trials.traces`; 0 (default) records none.

    Returns
    -------
    Brian2Network

    Raises
    ------
    UnsupportedLayerError
        For a layer kind other than dense and dropout (the message names the backend and the kind).
    ValueError
        For a device other than the CPU (one that is not cpu, cuda or cuda:N, or that this
        machine lacks, is named as by the torch backend), an unsupported dtype, a seed that is
        not an integer in ``[0, 2**63 - 1]``, rule ``ebp`` or a bad setting.

    Warns
    -----
    UserWarning
        When ``t_stimulus`` or the feedback phases are too short for a network of this depth to
        come within 1% of the fixed point that the torch backend computes (see
        :func:`unsettled_fraction`); the message names the duration that would.
    """
    check_network(network)
    check_seed(seed)
    check_device(device)
    check_representable(network, torch.float64)  # Brian2 computes in float64, whatever it returns
    if torch.device(device).type != "cpu":
        raise ValueError(f"device: the {BACKEND} backend runs on the CPU (Brian2 runtime mode), got {str(device)!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: the {BACKEND} backend returns torch.float32 or torch.float64 tensors, got {dtype}")
    if not isinstance(brian2.get_device(), RuntimeDevice):
        raise ValueError(f"the {BACKEND} backend runs in Brian2's runtime mode, but the active Brian2 device is {brian2.get_device()!r}; call brian2.set_device('runtime')")
    # The state variables' type: float64 gives the torch backend's numbers. The type itself, as
    # Brian2 calls it (it takes np.dtype("float64") as a setting, then fails as it runs).
    if brian2.prefs.core.default_float_dtype is not np.float64:
        raise ValueError(f"the {BACKEND} backend computes in float64, but brian2.prefs.core.default_float_dtype is {brian2.prefs.core.default_float_dtype!r}; set it to numpy.float64")
    settings = _settings(tau_ff, tau_fb, dt, t_stimulus, t_selection, t_feedback, t_rpe, t_plasticity, codegen_target, trace_every)
    timeline, tau_ff, tau_fb = settings[:3]
    stages = sum(isinstance(layer, Dense) for layer in network.layers) + 1  # the column layers and the output; dropout adds no neurons
    warn_if_unsettled(stages, timeline, tau_ff, tau_fb)
    return Brian2Network(network, *settings, dtype, seed)


def _settings(tau_ff, tau_fb, dt, t_stimulus, t_selection, t_feedback, t_rpe, t_plasticity, codegen_target, trace_every):
    """:func:`build`'s settings, checked: ``(timeline, tau_ff, tau_fb, codegen_target, trace_every)``."""
    if codegen_target not in CODEGEN_TARGETS:
        raise ValueError(f"codegen_target: expected one of {CODEGEN_TARGETS} (Brian2 runtime mode), got {codegen_target!r}")
    if not is_count(trace_every, 0):
        raise ValueError(f"trace_every: expected an integer >= 0 (0: trace no trial), got {shown(trace_every, count=True)}")
    durations = dict(stimulus=t_stimulus, selection=t_selection, feedback=t_feedback, rpe=t_rpe, plasticity=t_plasticity)
    timeline = Timeline.from_durations(dt, durations)
    taus = {name: _milliseconds(tau, name) for name, tau in (("tau_ff", tau_ff), ("tau_fb", tau_fb))}
    for name, tau in taus.items():
        if not math.isfinite(timeline.dt / tau):  # the integration divides by it
            raise ValueError(f"{name}: {tau!r} ms is so far below dt = {timeline.dt:g} ms that dt / {name} overflows; any {name} below dt / 1000 settles within a time step: give one of those")
    return timeline, taus["tau_ff"], taus["tau_fb"], codegen_target, trace_every


def check_options(options: dict) -> None:
    """Raise ``ValueError`` for a bad value among ``options``, keyword arguments of :func:`build`
    (before any data loads; :func:`build` checks them again).

    Parameters
    ----------
    options : dict
        This backend's own options (an experiment's ``[backend_options]``; not ``device``,
        ``dtype`` or ``seed``); those missing are taken at their defaults.

    Raises
    ------
    ValueError
        For a bad value, its message beginning with the option's name.
    """
    _settings(**resolved_options("brian2", options))
