"""Backends build a runnable network from a :class:`~agrel_sim.network.ColumnNetwork`.

Each backend is a module with a ``build(network, device, dtype, seed, **options)`` function, a
``check_network(network)`` function that raises for what the backend cannot build and, if
``build`` takes options, a ``check_options(options)`` function that raises for a bad value; it
is imported only when it is asked for (so that using one backend never imports another's
dependencies).
"""

from __future__ import annotations

import importlib
import inspect

from agrel_sim.config import ConfigError, check_instance, is_count, is_number, shown
from agrel_sim.network import ColumnNetwork, check_weight_decay

BACKENDS = {"torch": "agrel_sim.backends.torch_backend", "brian2": "agrel_sim.backends.brian2_backend"}
# What a run gives every backend's build(); an experiment's backend_options cannot set them.
RUN_OPTIONS = ("device", "dtype", "seed")


# Backend options (the Brian2 backend's) that choose how a run is computed or what it records,
# not what it models: like the device and the logging, finished runs may differ in them.
NOT_MODELLING_OPTIONS = ("codegen_target", "trace_every")
# Options of earlier versions, and why they went: said where an experiment or a run file gives one.
REMOVED_OPTIONS = {
    "gate_threshold": "a Brian2 option until agrel-sim 0.4.0, whose gate was open while a column's activity was above it;"
    " since 0.5.0 the gate is open while the column's drive is above 0, the rule's gate once the layers settle",
}


def _removed(option: str) -> str:
    """For an option of :data:`REMOVED_OPTIONS`, a clause of its message saying why it went; else nothing."""
    return f" ({REMOVED_OPTIONS[option]})" if option in REMOVED_OPTIONS else ""


class DropoutLayer:
    """The part that a backend's dropout layer shares with every backend's: it has no weights.

    Its ``ff``, ``fb`` and ``bias`` raise ``AttributeError``, when read or assigned, so that
    weights set on it are not silently ignored; ``has_weights`` is False. A subclass sets ``name``.
    """

    has_weights = False

    def _no_weights(self, value=None):
        """No weights: reading or assigning them raises ``AttributeError``."""
        raise AttributeError(f"{self.name} is a dropout layer: it has no weights")

    ff = fb = bias = property(_no_weights, _no_weights)


class UnsupportedLayerError(NotImplementedError, ValueError):
    """A backend cannot build a layer kind; the message names the backend and the kind.

    A ``ValueError`` too, so that the command line reports it as bad input.
    """


def check_backend(network: ColumnNetwork, backend: str, options: dict, source: str) -> None:
    """Check, before any run, that ``backend`` exists, takes ``options`` and can build ``network``.

    Parameters
    ----------
    network : ColumnNetwork
        The network to build.
    backend : str
        A key of :data:`BACKENDS`.
    options : dict
        The backend's own keyword options (an experiment's ``[backend_options]``).
    source : str
        Where they come from (a file), for messages.

    Raises
    ------
    ConfigError
        For an unknown backend or option (naming ``source`` and the options there are), a bad
        option value, or a network the backend does not build (a layer kind or a rule; the
        backend's ``check_network`` says which).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"{source}: backend: unknown backend {backend!r}; available: {sorted(BACKENDS)}")
    module = importlib.import_module(BACKENDS[backend])
    accepted = list(resolved_options(backend, {}))  # its own options, at their defaults
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        given_by_run = " (device, dtype and seed come from the run: --device, --dtype, --seed)" if unknown[0] in RUN_OPTIONS else ""
        raise ConfigError(f"{source}: backend_options.{unknown[0]}: not an option of the {backend} backend{given_by_run}{_removed(unknown[0])}; its options: {', '.join(accepted) or 'none'}")
    if options:
        try:
            module.check_options(options)
        except ValueError as error:  # its messages begin with the option's name
            raise ConfigError(f"{source}: backend_options.{error}") from None
    try:
        module.check_network(network)
    except ValueError as error:  # UnsupportedLayerError included; its message names the model's field
        raise ConfigError(f"{source}: backend: the {backend} backend cannot build model {network.name!r} ({error})") from None


def resolved_options(backend: str, options: dict) -> dict:
    """``options`` with every other option of ``backend``'s ``build`` at its default: what a run
    of that backend ran with, in full.

    Parameters
    ----------
    backend : str
        A name in :data:`BACKENDS`.
    options : dict
        Keyword arguments of the backend's ``build``, as an experiment's ``[backend_options]``.

    Returns
    -------
    dict
    """
    defaults = {name: default for name, default in build_options(backend).items() if name not in RUN_OPTIONS}
    return {**defaults, **options}


def build_options(backend: str) -> dict:
    """The keyword options of ``backend``'s ``build`` (device, dtype, seed and its own), in
    order, with their defaults.

    Parameters
    ----------
    backend : str
        A key of :data:`BACKENDS`.

    Returns
    -------
    dict
        ``{option: default}``.
    """
    parameters = inspect.signature(importlib.import_module(BACKENDS[backend]).build).parameters
    return {name: parameter.default for name, parameter in list(parameters.items())[1:]}


def check_device(device, here: bool = True):
    """Raise a clear error for a device other than cpu, cuda or cuda:N, or a CUDA device this machine lacks.

    Parameters
    ----------
    device : str or torch.device
        The device asked for.
    here : bool
        The device is used on this machine, so it must have it; with ``False`` (a device of
        the cluster's jobs) only the form is checked.

    Returns
    -------
    torch.device
        The device, parsed.

    Raises
    ------
    ValueError
        Naming ``device`` and the devices there are.
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if parsed.type == "cpu" and parsed.index not in (None, 0):  # torch takes cpu:N, but there is one CPU device, cpu or cpu:0
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r} (torch has one CPU device, 'cpu'; its threads are set by OMP_NUM_THREADS)")
    if parsed.type == "cuda" and here:
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available on this machine; use 'cpu'")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device: {device!r} requested but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return parsed


def check_seed(seed) -> None:
    """Raise a clear error for a seed that is not an integer in ``[0, 2**63 - 1]`` (what torch generators take).

    Parameters
    ----------
    seed : object
        The seed given.

    Raises
    ------
    ValueError
        Naming ``seed`` and the integers it may be.
    """
    if not is_count(seed, 0):
        raise ValueError(f"seed: expected an integer from 0 to 2**63 - 1, got {shown(seed, count=True)}")


NO_CHANGE = "no weight would change"  # what a learning rate of 0 would mean


def check_representable(network: ColumnNetwork, dtype) -> None:
    """Raise unless the description's numbers survive the floating-point type a backend computes in.

    Parameters
    ----------
    network : ColumnNetwork
    dtype : torch.dtype
        The type the weights, activities and rewards are held in.

    Raises
    ------
    ValueError
        Naming the field whose value overflows ``dtype``, or an ``init_range`` or
        ``learning_rate`` that rounds to 0 in it (a network that never learns).
    """
    rule = network.rule
    fields = {
        "neuromodulator.reward_correct": network.neuromodulator.reward_correct,
        "neuromodulator.reward_wrong": network.neuromodulator.reward_wrong,
        "rule.learning_rate": rule.learning_rate,
        "rule.init_range": rule.init_range,
        "rule.weight_decay": rule.weight_decay,
    }
    zero = {"rule.init_range": "every weight would start at 0", "rule.learning_rate": NO_CHANGE}
    for key, value in fields.items():
        check_in_dtype(f"{network.source}: {key}", value, dtype, zero.get(key))


def check_in_dtype(name: str, value: float, dtype, zero: str | None = None) -> None:
    """Raise ValueError naming ``name`` where ``value`` overflows ``dtype``, or, given ``zero``,
    where it rounds to 0 in ``dtype``.

    Parameters
    ----------
    name : str
        The setting, for the message (``rule.learning_rate``, say).
    value : float
        Its value.
    dtype : torch.dtype
        The floating-point type it will be held in.
    zero : str or None
        What a value of 0 would mean (``"no weight would change"``, say); None where 0 is harmless.
    """
    import torch

    info = torch.finfo(dtype)
    if abs(value) > info.max:
        raise ValueError(f"{name}: {value!r} overflows {dtype}, whose largest number is {info.max:.4g}; choose a smaller value or dtype float64")
    if zero is not None and torch.tensor(value, dtype=dtype) == 0:
        raise ValueError(f"{name}: {value!r} rounds to 0 in {dtype}, so {zero}; choose a larger value or dtype float64")


def check_batch(network: ColumnNetwork, images, labels=None, actions=None, check_range: bool = True, *, trials: bool = False, dtype):
    """Check a batch against the network before it runs, naming what is wrong; return the images in ``dtype``.

    Parameters
    ----------
    network : ColumnNetwork
        The description the batch must fit.
    images : Tensor (B, *input_shape)
        Floating-point stimuli: rates, finite and ``>= 0``.
    labels, actions : Tensor (B,) or None
        Indices of actions, of any integer dtype (the backends use them as int64).
    check_range : bool
        Check the values: that images are finite and ``>= 0`` and that labels and actions lie
        in ``[0, n_actions)``. On a GPU these checks make the host wait for the device; with
        ``False`` only types and shapes are checked, which needs no wait.
    trials : bool
        The batch is run as trials, which need ``labels``.
    dtype : torch.dtype
        The floating-point type the backend computes in; images must be finite in it.

    Returns
    -------
    Tensor
        ``images`` converted to ``dtype``, on their device.

    Raises
    ------
    TypeError
        For images that are not a floating-point tensor, labels or actions not integer tensors.
    ValueError
        For a wrong shape, missing labels or (with ``check_range``) a value out of range.
    """
    import torch

    if not torch.is_tensor(images) or not images.is_floating_point():
        kind = images.dtype if torch.is_tensor(images) else type(images).__name__
        raise TypeError(f"images: expected a floating-point tensor (scale integer pixels first), got {kind}")
    expected = network.input_shape
    if tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"images: expected shape (batch, {', '.join(map(str, expected))}) for network "
            f"{network.name!r} ({network.source}), got {tuple(images.shape)}"
        )
    batch = images.shape[0]
    if batch == 0:
        raise ValueError("images: expected at least one image, got an empty batch")
    if trials and labels is None:
        raise ValueError("labels: trials need the correct action of each trial, a tensor of shape (batch,); got None")
    given = {name: values for name, values in (("labels", labels), ("actions", actions)) if values is not None}
    for name, values in given.items():
        if not torch.is_tensor(values) or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            kind = values.dtype if torch.is_tensor(values) else type(values).__name__
            raise TypeError(f"{name}: expected a tensor of integers (indices of actions; any integer dtype), got {kind}")
        if tuple(values.shape) != (batch,):
            raise ValueError(f"{name}: expected shape ({batch},), got {tuple(values.shape)}")
    stimuli = images.to(dtype)
    if not check_range:
        return stimuli
    not_finite, negative = ~torch.isfinite(stimuli), images < 0
    # In float64, indices of every integer dtype compare exactly with n_actions (torch has no
    # comparisons for uint16, uint32 and uint64).
    indices = {name: values.double() for name, values in given.items()}
    outside = {name: (values < 0) | (values >= network.n_actions) for name, values in indices.items()}
    flags = [not_finite.any(), negative.any(), *(where.any().to(images.device) for where in outside.values())]
    if not torch.stack(flags).any():  # makes the host wait for a GPU, once for all these checks
        return stimuli
    if not_finite.any():
        raise ValueError(
            f"images: {_count_and_first(not_finite)} not finite (NaN or inf, or beyond {torch.finfo(dtype).max:.4g}, the largest "
            f"{dtype} holds); replace them (torch.nan_to_num) or leave those images out"
        )
    if negative.any():
        raise ValueError(
            f"images: {_count_and_first(negative)} negative (the lowest {images.min().item():g}), but input columns are rates: "
            "rates must be >= 0; shift or clip the stimuli (images.clamp(min=0))"
        )
    name = next(name for name, where in outside.items() if where.any())
    values = indices[name]
    raise ValueError(f"{name}: values must lie in [0, {network.n_actions}), got {int(values.min())}..{int(values.max())}")


def _count_and_first(where) -> str:
    """``"N value(s), the first in image i of the batch, are"``, for a boolean mask over a batch of images."""
    return f"{where.sum().item()} value(s), the first in image {where.flatten(1).any(1).nonzero()[0].item()} of the batch, are"


def _set_learning_rate(net, value) -> None:
    if not is_number(value, lambda v: v > 0):
        raise ValueError(f"learning_rate: expected a finite number > 0, got {shown(value)}")
    check_weight_decay(value, net.description.rule.weight_decay, "learning_rate")
    check_in_dtype("learning_rate", value, net.computes_in, NO_CHANGE)
    net._learning_rate = value


# The ``learning_rate`` attribute of every backend's network.
LEARNING_RATE = property(
    lambda net: net._learning_rate, _set_learning_rate,
    doc="The step size alpha of the next updates, a finite number > 0 whose product with the rule's weight_decay is below 1, "
        "neither overflowing nor rounding to 0 in the type the network computes in; may be changed between batches.",
)


def check_weight_keys(weights: dict, expected: set[str]) -> None:
    """Raise ValueError unless ``weights`` has exactly the keys ``expected``.

    Parameters
    ----------
    weights : dict
        Weights to load, by key (``layers.0.ff``, say).
    expected : set of str
        The network's keys.
    """
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"weights: keys do not match the network (missing {missing}, unexpected {extra})")


def check_weights_to_load(weights: dict, current: dict, dtype) -> None:
    """Check every entry of ``weights`` (:func:`weights_to_set`) against the network's weights
    ``current`` before any is set, so that a bad one leaves the network as it was; the ``fb``
    entries too where the network ignores them (``tied`` feedback).

    Parameters
    ----------
    weights : dict
        Weights to load, by key.
    current : dict of str to torch.Tensor
        The network's weights, whose keys and shapes they must have.
    dtype : torch.dtype
        The type the network holds them in.
    """
    check_weight_keys(weights, set(current))
    for key, value in current.items():
        weights_to_set(weights[key], value.shape, key, dtype)


def weights_to_set(value, shape, name: str, dtype):
    """Weights about to be assigned, checked, as a tensor of the type they are held in.

    Parameters
    ----------
    value : Tensor or array_like
        Real numbers (integer or floating-point, not bool or complex), finite.
    shape : tuple of int
        The shape ``value`` must have.
    name : str
        What is set (``"layers.0.ff"``), for the messages.
    dtype : torch.dtype
        The floating-point type the weights are held in; the values must be finite in it.

    Returns
    -------
    Tensor
        ``value`` in ``dtype``, on its device (NumPy values are read in their own dtype first,
        so that float64 values keep their precision).

    Raises
    ------
    ValueError
        For values that are not real numbers, a wrong shape, NaN or infinity, or values beyond
        the largest number ``dtype`` holds.
    """
    import numpy as np
    import torch

    if not torch.is_tensor(value):
        array = np.asarray(value)
        if array.dtype.kind not in "iuf":  # before torch sees it: it has no tensors of strings or objects
            raise ValueError(f"{name}: expected real numbers, got {array.dtype}")
        if array.dtype.itemsize > 8:  # long double, which torch lacks
            array = array.astype(np.float64)
        value = torch.tensor(array.astype(array.dtype.newbyteorder("=")))  # native byte order, which torch needs; a copy
    if value.dtype == torch.bool or value.dtype.is_complex:
        raise ValueError(f"{name}: expected real numbers, got {value.dtype}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected a tensor of shape {tuple(shape)}, got {tuple(value.shape)}")
    converted = value.to(dtype)
    if not torch.isfinite(converted).all():  # makes the host wait for a GPU: weights are set between batches
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{name}: values must be finite (got NaN or inf)")
        raise ValueError(f"{name}: values must be finite in {dtype}, whose largest is {torch.finfo(dtype).max:.4g}; got {value.abs().max().item():.4g}")
    return converted


def build(network: ColumnNetwork, backend: str = "torch", **options):
    """Build ``network`` with ``backend``.

    Parameters
    ----------
    network : ColumnNetwork
        The description.
    backend : str
        A key of :data:`BACKENDS`.
    **options
        Passed to the backend's builder: for every backend ``device``, ``dtype`` and ``seed``;
        for ``brian2`` also its timing and recording options (see
        :func:`agrel_sim.backends.brian2_backend.build`).

    Returns
    -------
    TorchNetwork or Brian2Network
        The network, ready to run trials.

    Raises
    ------
    ValueError
        For a ``network`` that is not a :class:`ColumnNetwork`, an unknown backend or an option
        the backend does not take (the message lists its options), and from the builder.
    """
    check_instance("network", network, ColumnNetwork)
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; available: {sorted(BACKENDS)}")
    accepted = list(build_options(backend))
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an option of the {backend} backend{_removed(unknown[0])}; its options: {', '.join(accepted)}")
    return importlib.import_module(BACKENDS[backend]).build(network, **options)
