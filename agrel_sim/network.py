"""The backend-neutral description of a network of cortical columns.

A :class:`ColumnNetwork` is plain data: the input shape, an ordered list of column layers, the
output layer of Q-units (one per action), the action selector, the neuromodulator and the
parameters of the learning rule. Backends build a runnable form from it
(:func:`agrel_sim.build`). It can be written in Python or read from a TOML file in ``models/``::

    name = "digits_dense"
    input_shape = [1, 8, 8]

    [[layers]]
    kind = "dense"
    units = 64

    [output]
    actions = 10

    [action_selection]   # max-Boltzmann
    epsilon = 0.02
    tau = 1.0

    [neuromodulator]     # delta = r - q_s
    reward_correct = 1.0
    reward_wrong = 0.0

    [rule]
    name = "deepagrel"   # or "ebp"
    learning_rate = 0.05
    init_range = 0.05
    feedback = "tied"    # or "reciprocal", "independent"
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from agrel_sim.config import FILE_KINDS, FRACTION, POSITIVE_INT, ConfigError, Fields, file_kind, find_named_file, is_count, is_fraction, is_number, read_toml, shown, write_toml

FEEDBACK_MODES = ("tied", "reciprocal", "independent")
RULES = ("deepagrel", "ebp")
PYTHON = "<python>"  # the source of a description built in Python
# The keys of a model file's top level (ColumnNetwork.from_dict reads them all).
MODEL_KEYS = ("name", "input_shape", "layers", "output", "action_selection", "neuromodulator", "rule")

_non_negative_int = dict(kind=int, check=lambda v: v >= 0, hint="an integer >= 0")


@dataclass(frozen=True)
class Dense:
    """A layer of ``units`` columns, each connected to every column of the layer below.

    Parameters
    ----------
    units : int
        Number of columns, at least 1; a sheet below is flattened.
    """

    units: int
    kind: ClassVar[str] = "dense"

    def output_shape(self, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
        """The shape of this layer's columns above a population of ``shape`` (``where`` names
        the layer in errors).

        Parameters
        ----------
        shape : tuple of int
            The shape of the population below, ``(C, H, W)`` or ``(N,)``.
        where : str
            Names the layer in error messages (``"<source>: layers[2]"``); not used here.

        Returns
        -------
        tuple of int
            ``(units,)``.
        """
        return (self.units,)


@dataclass(frozen=True)
class _Sheet:
    """A C×H×W sheet of columns, each seeing a ``kernel_size``² window of the sheet below, which
    must be a sheet too (not a dense layer); the parameters are those of :class:`Conv2d`."""

    channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0

    def output_shape(self, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
        """The C×H×W shape of this sheet above a sheet of ``shape`` (``where`` names the layer in
        errors); raises :class:`~agrel_sim.config.ConfigError` when it does not fit.

        Parameters
        ----------
        shape : tuple of int
            The shape of the population below; must be a sheet ``(C, H, W)``.
        where : str
            Names the layer in error messages (``"<source>: layers[2]"``).

        Returns
        -------
        tuple of int
            ``(channels, H_out, W_out)``, ``H_out = (H + 2 * padding - kernel_size) // stride + 1``
            (likewise ``W_out``).

        Raises
        ------
        ConfigError
            If ``shape`` is a vector, or the kernel is larger than the padded sheet below.
        """
        if len(shape) != 3:
            raise ConfigError(
                f"{where}: a {self.kind} layer needs a C×H×W sheet below it, got a vector of "
                f"{shape[0]} columns; put {self.kind} layers before dense layers"
            )
        _, height, width = shape
        sizes = []
        for size in (height, width):
            padded = size + 2 * self.padding
            if self.kernel_size > padded:
                raise ConfigError(
                    f"{where}.kernel_size: kernel {self.kernel_size}×{self.kernel_size} is larger "
                    f"than its input {height}×{width} (padding {self.padding}); use a smaller "
                    "kernel, more padding, or fewer layers that shrink the sheet"
                )
            sizes.append((padded - self.kernel_size) // self.stride + 1)
        return (self.channels, *sizes)


@dataclass(frozen=True)
class Conv2d(_Sheet):
    """A convolutional sheet: one kernel per output channel, shared by all positions, each column
    seeing a ``kernel_size``² window of the sheet below (a sheet, not a dense layer).

    Parameters
    ----------
    channels : int
        Columns at each position, at least 1.
    kernel_size : int
        Side of the square window, at least 1 and at most the padded sheet below.
    stride : int, default 1
        Step between windows, at least 1.
    padding : int, default 0
        Rows and columns of zeros added on every side of the sheet below, at most
        ``kernel_size - 1``.
    """

    kind: ClassVar[str] = "conv"


@dataclass(frozen=True)
class LocallyConnected2d(_Sheet):
    """The geometry of :class:`Conv2d` with untied weights: one kernel per output position.

    Parameters are those of :class:`Conv2d`.

    Parameters
    ----------
    channels : int
        Columns at each position, at least 1.
    kernel_size : int
        Side of the square window, at least 1 and at most the padded sheet below.
    stride : int, default 1
        Step between windows, at least 1.
    padding : int, default 0
        Rows and columns of zeros added on every side of the sheet below, at most
        ``kernel_size - 1``.
    """

    kind: ClassVar[str] = "locally_connected"


@dataclass(frozen=True)
class Dropout:
    """Silences a random fraction ``rate`` of the columns below during learning trials.

    A dropped column's ff activity is 0 and it passes no feedback, like a ReLU below threshold.
    The survivors are scaled by ``1 / (1 - rate)`` so that nothing needs rescaling at test time.

    Parameters
    ----------
    rate : float
        The fraction dropped, in [0, 1). A dropout layer follows a column layer (or another dropout
        layer), never the input.
    """

    rate: float
    kind: ClassVar[str] = "dropout"

    def output_shape(self, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
        """``shape``: dropout keeps the columns below.

        Parameters
        ----------
        shape : tuple of int
            The shape of the population below.
        where : str
            Names the layer in error messages; not used here.

        Returns
        -------
        tuple of int
            ``shape`` itself.
        """
        return shape


Layer = Dense | Conv2d | LocallyConnected2d | Dropout
LAYER_KINDS: dict[str, type] = {k.kind: k for k in (Dense, Conv2d, LocallyConnected2d, Dropout)}


@dataclass(frozen=True)
class ActionSelection:
    """Max-Boltzmann action selection.

    With probability ``1 - epsilon`` the action with the highest Q-value is chosen; otherwise one
    is drawn from ``P(l) = exp(q_l / tau) / sum_k exp(q_k / tau)``.

    Parameters
    ----------
    epsilon : float, default 0.02
        The probability of exploring, in [0, 1].
    tau : float, default 1.0
        The temperature of the Boltzmann draw, > 0.
    """

    epsilon: float = 0.02
    tau: float = 1.0


@dataclass(frozen=True)
class Neuromodulator:
    """The global, dopamine-like reward-prediction error ``delta = r - q_s``.

    ``r`` is ``reward_correct`` when the selected action is the correct class, else
    ``reward_wrong``.

    Parameters
    ----------
    reward_correct : float, default 1.0
        The reward of a correct choice, finite, above ``reward_wrong``.
    reward_wrong : float, default 0.0
        The reward of a wrong choice, finite.
    """

    reward_correct: float = 1.0
    reward_wrong: float = 0.0


@dataclass(frozen=True)
class Rule:
    """Parameters of the learning rule.

    Parameters
    ----------
    name : {"deepagrel", "ebp"}
        DeepAGREL (reinforcement, four-factor plasticity) or the error-backpropagation baseline
        (softmax, cross-entropy, plain SGD).
    learning_rate : float
        The step size alpha.
    bias : bool
        Whether columns have a bias, learnt like a synapse whose presynaptic activity is 1.
    init_range : float
        Weights start uniform in ``[-init_range, init_range]``.
    feedback : {"tied", "reciprocal", "independent"}
        ``tied``: one tensor serves as ff and fb weights. ``reciprocal``: separate fb tensors
        that start equal to the ff ones and get the identical update. ``independent``: fb
        drawn independently, identical updates. Not used by ``ebp``, whose fb weights are always
        its ff weights (as ``tied``).
    weight_decay : float
        Each update also shrinks the ff and fb weights and the biases by ``learning_rate *
        weight_decay`` times themselves (as ``torch.optim.SGD`` does); with ``independent``
        feedback this makes fb converge towards ff. ``learning_rate * weight_decay`` must be
        below 1.
    """

    name: str = "deepagrel"
    learning_rate: float = 0.01
    bias: bool = False
    init_range: float = 0.05
    feedback: str = "tied"
    weight_decay: float = 0.0


def _check_fields(where: str, changes: dict, instance) -> None:
    """Raise ConfigError for a key of ``changes`` that is no field of the dataclass ``instance``."""
    names = [field.name for field in dataclasses.fields(instance)]
    unknown = [key for key in changes if key not in names]
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]!r} is no field of {type(instance).__name__}; its fields are: {', '.join(names)}")


@dataclass(frozen=True)
class ColumnNetwork:
    """A network of cortical columns, described independently of any backend.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, H, W)`` for images, ``(N,)`` for vectors.
    layers : list or tuple of Dense, Conv2d, LocallyConnected2d, Dropout
        The hidden column layers, bottom to top.
    n_actions : int
        Number of output Q-units, one per action (class), at least 2.
    action_selection : ActionSelection
        The max-Boltzmann action selector (``epsilon``, ``tau``).
    neuromodulator : Neuromodulator
        The rewards that set the reward-prediction error ``delta = r - q_s``.
    rule : Rule
        The learning rule and its parameters.
    name : str
        A label for logs and run files.
    source : str
        Where the description came from; error messages name it.

    Raises
    ------
    ConfigError
        If the description is inconsistent (a kernel larger than its input, a conv layer above
        a dense one, a parameter out of range, ...).
    """

    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    n_actions: int
    action_selection: ActionSelection = ActionSelection()
    neuromodulator: Neuromodulator = Neuromodulator()
    rule: Rule = Rule()
    name: str = "network"
    source: str = field(default=PYTHON, compare=False)

    def __post_init__(self):
        for key in ("input_shape", "layers"):  # any sequence is taken, never a string or a single layer
            value = getattr(self, key)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{self.source}: {key}: expected a list or tuple, got {type(value).__name__} {value!r}")
            object.__setattr__(self, key, tuple(value))
        for key, kind in (("action_selection", ActionSelection), ("neuromodulator", Neuromodulator), ("rule", Rule)):
            if not isinstance(getattr(self, key), kind):
                raise ConfigError(f"{self.source}: {key}: expected an object of class {kind.__name__} (or use network.replace({key}=dict(...))), got {getattr(self, key)!r}")
        _validate(self)

    def layer_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the column populations: the input, each hidden layer, then the output.

        Returns
        -------
        list of tuple of int
            ``input_shape``, the shape of each layer of :attr:`layers` (a dropout layer repeats
            the one below), then ``(n_actions,)``.

        Raises
        ------
        ConfigError
            If a sheet layer has a vector below it, or a kernel is larger than its padded input.
        """
        shapes = [self.input_shape]
        if self.layers and isinstance(self.layers[0], _Sheet) and len(self.input_shape) != 3:
            raise ConfigError(
                f"{self.source}: input_shape: {list(self.input_shape)} is a vector, but layers[0] is a {self.layers[0].kind} layer,"
                " which needs a sheet: give input_shape as [C, H, W]"
            )
        for index, layer in enumerate(self.layers):
            shapes.append(layer.output_shape(shapes[-1], f"{self.source}: layers[{index}]"))
        return shapes + [(self.n_actions,)]

    def replace(self, **changes) -> "ColumnNetwork":
        """A copy with fields replaced, checked as a new description is.

        Its messages name where it came from as ``"<source> changed by replace(rule)"`` (as
        ``<python>`` where the description was built in Python).

        Parameters
        ----------
        **changes
            Fields to replace; ``action_selection``, ``neuromodulator`` and ``rule`` also take a
            dict of their fields, which updates just those (``rule=dict(learning_rate=0.1)``).

        Returns
        -------
        ColumnNetwork

        Raises
        ------
        ConfigError
            For a field that the description (or its table) does not have, naming the fields it
            has, or a value that the new description's checks refuse.
        """
        _check_fields("replace", changes, self)
        if self.source != PYTHON:  # messages name where a value came from: not the file alone, when it is one of these
            changes.setdefault("source", f"{self.source} changed by replace({', '.join(changes)})")
        for key in ("action_selection", "neuromodulator", "rule"):
            if isinstance(changes.get(key), dict):
                _check_fields(f"replace: {key}", changes[key], getattr(self, key))
                changes[key] = dataclasses.replace(getattr(self, key), **changes[key])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The description as plain data, in the layout of the TOML files.

        Returns
        -------
        dict
            The fields by table, as :meth:`from_dict` reads them.
        """
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "layers": [{"kind": layer.kind, **dataclasses.asdict(layer)} for layer in self.layers],
            "output": {"actions": self.n_actions},
            "action_selection": dataclasses.asdict(self.action_selection),
            "neuromodulator": dataclasses.asdict(self.neuromodulator),
            "rule": dataclasses.asdict(self.rule),
        }

    def to_toml(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the description as a model file, which :meth:`from_toml` and
        :func:`load_model` read back as an equal description.

        Parameters
        ----------
        path : str or os.PathLike
            The ``.toml`` file to write (put it in ``models/`` to load it by name).
        overwrite : bool
            Replace an existing file; False (default): an existing file is an error.

        Returns
        -------
        Path
            ``path``.

        Raises
        ------
        ConfigError
            For a name that does not end in ``.toml``, a folder that does not exist, or an
            existing file without ``overwrite``.
        OSError
            Where the file cannot be written.
        """
        return write_toml(path, self.to_dict(), "ColumnNetwork.to_toml", overwrite)

    @classmethod
    def from_dict(cls, table: dict, source: str = "<dict>", top_level: tuple[str, ...] | None = None) -> "ColumnNetwork":
        """Build a description from plain data (a parsed TOML file), checking every field.

        Parameters
        ----------
        table : dict
            The layout of the TOML files (see the module docstring).
        source : str
            Where the data came from: error messages name it, and its stem is the default name.
        top_level : tuple of str or None
            For a table inside another file (an experiment's ``[model]``), the keys of that
            file's top level, which messages name as such where one turns up in this table;
            None (default): ``table`` is a model file's top level.

        Returns
        -------
        ColumnNetwork

        Raises
        ------
        ConfigError
            For a missing, unknown or invalid field, named with its place in ``table``.
        """
        if file_kind(table) in ("sweep", "experiment") and "layers" not in table:
            raise ConfigError(f"{source}: {FILE_KINDS[file_kind(table)][1]}, not a model file, which lists layers; give a model")
        top = Fields(table, source, top_level=MODEL_KEYS if top_level is None else top_level, inside=top_level is not None)
        name = top.get("name", str, default=Path(source).stem)
        input_shape = top.get(
            "input_shape", list, check=lambda v: len(v) in (1, 3) and all(is_count(n) for n in v),
            hint="a list of positive integers [C, H, W] or [N]",
        )
        layer_tables = top.get("layers", list, hint="a list of [[layers]] tables, bottom to top")
        layers = tuple(_layer_from_table(Fields(t, source, f"layers[{i}]", top.top_level)) for i, t in enumerate(layer_tables))

        output = top.sub("output", default_empty=False)
        n_actions = output.get("actions", int, check=lambda v: v >= 2, hint="an integer >= 2")
        output.finish()

        selection = top.sub("action_selection")
        action_selection = ActionSelection(epsilon=_number(selection, "epsilon", ActionSelection.epsilon), tau=_number(selection, "tau", ActionSelection.tau))
        selection.finish()

        modulator = top.sub("neuromodulator")
        neuromodulator = Neuromodulator(
            reward_correct=_number(modulator, "reward_correct", Neuromodulator.reward_correct),
            reward_wrong=_number(modulator, "reward_wrong", Neuromodulator.reward_wrong),
        )
        modulator.finish()

        rule_table = top.sub("rule")
        rule = Rule(
            name=rule_table.get("name", str, Rule.name, lambda v: v in RULES, f"one of {RULES}"),
            learning_rate=_number(rule_table, "learning_rate", Rule.learning_rate),
            bias=rule_table.get("bias", bool, Rule.bias, hint="true or false"),
            init_range=_number(rule_table, "init_range", Rule.init_range),
            feedback=rule_table.get("feedback", str, Rule.feedback, lambda v: v in FEEDBACK_MODES, f"one of {FEEDBACK_MODES}"),
            weight_decay=_number(rule_table, "weight_decay", Rule.weight_decay),
        )
        rule_table.finish()
        top.finish()
        return cls(tuple(input_shape), layers, n_actions, action_selection, neuromodulator, rule, name, source)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "ColumnNetwork":
        """Read a description from the TOML file ``path`` (a str or os.PathLike; see the module
        docstring for the layout); raises :class:`~agrel_sim.config.ConfigError` naming the file.

        Parameters
        ----------
        path : str or os.PathLike
            The ``.toml`` file of a model.

        Returns
        -------
        ColumnNetwork
            The description, its ``source`` the path.

        Raises
        ------
        ConfigError
            If the file cannot be read or a field is missing, unknown or invalid.
        """
        path = Path(path)
        return cls.from_dict(read_toml(path), str(path))


def _layer_from_table(fields: Fields) -> Layer:
    kind = fields.get("kind", str, hint=f"the layer kind, one of {sorted(LAYER_KINDS)}")
    if kind not in LAYER_KINDS:
        raise fields.error("kind", f"unknown layer kind {kind!r}; known kinds: {sorted(LAYER_KINDS)}")
    if kind == "dense":
        layer = Dense(units=fields.get("units", **POSITIVE_INT))
    elif kind == "dropout":
        layer = Dropout(rate=fields.get("rate", **FRACTION))
    else:
        layer = LAYER_KINDS[kind](
            channels=fields.get("channels", **POSITIVE_INT),
            kernel_size=fields.get("kernel_size", **POSITIVE_INT),
            stride=fields.get("stride", default=1, **POSITIVE_INT),
            padding=fields.get("padding", default=0, **_non_negative_int),
        )
    fields.finish()
    return layer


# The numbers of a description and what each must be, in files (ColumnNetwork.from_dict) and in
# descriptions built in Python (_validate) alike.
NUMBER_RULES = {
    "action_selection.epsilon": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "action_selection.tau": (lambda v: v > 0, "a temperature > 0"),
    "neuromodulator.reward_correct": (lambda v: True, "a finite number"),
    "neuromodulator.reward_wrong": (lambda v: True, "a finite number"),
    "rule.learning_rate": (lambda v: v > 0, "a number > 0"),
    "rule.init_range": (lambda v: v > 0, "a number > 0"),
    "rule.weight_decay": (lambda v: v >= 0, "a number >= 0"),
}


def _number(fields: Fields, key: str, default: float) -> float:
    """The number ``key`` of a description's table in a file, checked as :data:`NUMBER_RULES` says."""
    check, hint = NUMBER_RULES[fields.name(key)]
    return fields.get(key, float, default, check, hint)


def check_weight_decay(learning_rate: float, weight_decay: float, where: str) -> None:
    """Raise :class:`ConfigError`, its message beginning with ``where``, unless
    ``learning_rate × weight_decay`` is below 1: each update scales the weights by one minus it,
    which from 1 on zeroes or flips them.

    Parameters
    ----------
    learning_rate : float
        The step size alpha.
    weight_decay : float
        The rule's weight decay.
    where : str
        What the message names first (``"<source>: rule.weight_decay"`` or ``"learning_rate"``).

    Raises
    ------
    ConfigError
        If ``learning_rate * weight_decay >= 1``.
    """
    if learning_rate * weight_decay >= 1:
        raise ConfigError(
            f"{where}: learning_rate × weight_decay is {learning_rate * weight_decay:g}; it must be below 1, as each update"
            " scales the weights by 1 − learning_rate × weight_decay (from 1 on, it zeroes or flips them)"
        )


def _validate(network: ColumnNetwork) -> None:
    """Check a description built in Python as strictly as one read from a file."""
    source = network.source
    if not (isinstance(network.name, str) and network.name.strip()):
        raise ConfigError(f"{source}: name: expected a non-empty string, got {network.name!r}")
    if len(network.input_shape) not in (1, 3) or not all(is_count(n) for n in network.input_shape):
        raise ConfigError(f"{source}: input_shape: expected [C, H, W] or [N] of positive integers, got {list(network.input_shape)}")
    if not is_count(network.n_actions, minimum=2):
        raise ConfigError(f"{source}: output.actions: expected an integer >= 2, got {shown(network.n_actions, count=True)}")
    for index, layer in enumerate(network.layers):
        where = f"{source}: layers[{index}]"
        if not isinstance(layer, tuple(LAYER_KINDS.values())):
            raise ConfigError(f"{where}: unknown layer {layer!r}; known kinds: {sorted(LAYER_KINDS)}")
        if isinstance(layer, Dropout):
            if not is_fraction(layer.rate):
                raise ConfigError(f"{where}.rate: expected a fraction in [0, 1), got {shown(layer.rate)}")
            if index == 0:
                raise ConfigError(f"{where}: dropout must follow a column layer, not the input")
            continue
        sizes = {"units": layer.units} if isinstance(layer, Dense) else {"channels": layer.channels, "kernel_size": layer.kernel_size, "stride": layer.stride}
        for key, value in sizes.items():
            if not is_count(value):
                raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {shown(value, count=True)}")
        if not isinstance(layer, Dense) and not (is_count(layer.padding, minimum=0) and layer.padding < layer.kernel_size):
            # kernel_size - 1 is a "full" convolution; a wider border holds columns that see only zeros
            raise ConfigError(f"{where}.padding: expected an integer from 0 to kernel_size - 1 = {layer.kernel_size - 1}, got {shown(layer.padding, count=True)}")
    network.layer_shapes()  # raises on geometry errors
    for key, (check, hint) in NUMBER_RULES.items():
        table, name = key.split(".")
        value = getattr(getattr(network, table), name)
        if not is_number(value, check):
            raise ConfigError(f"{source}: {key}: expected {hint}, got {shown(value)}")
    modulator = network.neuromodulator
    if not modulator.reward_correct > modulator.reward_wrong:  # otherwise the rule learns to choose wrong, or learns no class at all
        raise ConfigError(f"{source}: neuromodulator.reward_correct: expected more than reward_wrong = {shown(modulator.reward_wrong)}, got {shown(modulator.reward_correct)}")
    rule = network.rule
    check_weight_decay(rule.learning_rate, rule.weight_decay, f"{source}: rule.weight_decay")
    if rule.name not in RULES:
        raise ConfigError(f"{source}: rule.name: expected one of {RULES}, got {rule.name!r}")
    if rule.feedback not in FEEDBACK_MODES:
        raise ConfigError(f"{source}: rule.feedback: expected one of {FEEDBACK_MODES}, got {rule.feedback!r}")
    if not isinstance(rule.bias, bool):
        raise ConfigError(f"{source}: rule.bias: expected true or false, got {rule.bias!r}")


def load_model(name_or_path: str | os.PathLike) -> ColumnNetwork:
    """Load a model description from a TOML path, or by name from ``$AGREL_SIM_MODELS``,
    ``./models`` or the checkout's ``models/`` (see :func:`~agrel_sim.config.find_named_file`).

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A model name such as ``"mnist_conv3"``, or the path of a ``.toml`` file.

    Returns
    -------
    ColumnNetwork

    Raises
    ------
    ConfigError
        If no file is found (for a name, the message lists every path tried) or the file is invalid.
    """
    return ColumnNetwork.from_toml(find_named_file(name_or_path, "model", "AGREL_SIM_MODELS"))
