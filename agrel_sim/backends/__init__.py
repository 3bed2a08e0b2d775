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

from agrel_sim.config import ConfigError
from agrel_sim.network import ColumnNetwork

BACKENDS = {"torch": "agrel_sim.backends.torch_backend", "brian2": "agrel_sim.backends.brian2_backend"}
# What a run gives every backend's build(); an experiment's backend_options cannot set them.
RUN_OPTIONS = ("device", "dtype", "seed")


class UnsupportedLayerError(NotImplementedError, ValueError):
    """A backend cannot build a layer kind; the message names the backend and the kind.

    A ``ValueError`` too, so that the command line reports it as bad input.
    """


def check_backend(network: ColumnNetwork, backend: str, options: dict, source: str) -> None:
    """Check, before any run, that ``backend`` exists, takes ``options`` and can build ``network``.

    Raises
    ------
    ConfigError
        For an unknown backend or option (naming ``source`` and the options there are), or a bad
        option value.
    UnsupportedLayerError, ValueError
        From the backend's ``check_network``.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"{source}: backend: unknown backend {backend!r}; available: {sorted(BACKENDS)}")
    module = importlib.import_module(BACKENDS[backend])
    accepted = [name for name in list(inspect.signature(module.build).parameters)[1:] if name not in RUN_OPTIONS]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        given_by_run = " (device, dtype and seed come from the run: --device, --dtype, --seed)" if unknown[0] in RUN_OPTIONS else ""
        raise ConfigError(f"{source}: backend_options.{unknown[0]}: not an option of the {backend} backend{given_by_run}; its options: {', '.join(accepted) or 'none'}")
    if options:
        try:
            module.check_options(options)
        except ValueError as error:  # its messages begin with the option's name
            raise ConfigError(f"{source}: backend_options.{error}") from None
    module.check_network(network)


def check_batch(network: ColumnNetwork, images, labels=None, actions=None, check_range: bool = True) -> None:
    """Check a batch of trials against the network before it runs, naming what is wrong.

    Labels and actions may have any integer dtype (the backends use them as int64).
    ``check_range=False`` skips checking that labels and actions lie in ``[0, n_actions)``,
    the one check that makes the host wait for a GPU.
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
    given = {name: values for name, values in (("labels", labels), ("actions", actions)) if values is not None}
    for name, values in given.items():
        if not torch.is_tensor(values) or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            kind = values.dtype if torch.is_tensor(values) else type(values).__name__
            raise TypeError(f"{name}: expected a tensor of integers (indices of actions; any integer dtype), got {kind}")
        if tuple(values.shape) != (batch,):
            raise ValueError(f"{name}: expected shape ({batch},), got {tuple(values.shape)}")
    if not given or not check_range:
        return
    outside = {name: ((values < 0) | (values >= network.n_actions)).any() for name, values in given.items()}
    if torch.stack(list(outside.values())).any():  # makes the host wait for a GPU
        name = next(name for name, flag in outside.items() if flag)
        values = given[name]
        raise ValueError(f"{name}: values must lie in [0, {network.n_actions}), got {int(values.min())}..{int(values.max())}")


def check_weight_keys(weights: dict, expected: set[str]) -> None:
    """Raise unless ``weights`` has exactly the keys ``expected``."""
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"weights: keys do not match the network (missing {missing}, unexpected {extra})")


def build(network: ColumnNetwork, backend: str = "torch", **options):
    """Build ``network`` with ``backend``.

    Parameters
    ----------
    network : ColumnNetwork
        The description.
    backend : str
        A key of :data:`BACKENDS`.
    **options
        Passed to the backend's builder (for torch: ``device``, ``dtype``, ``seed``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; available: {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend]).build(network, **options)
