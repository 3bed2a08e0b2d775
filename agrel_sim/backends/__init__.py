"""Backends build a runnable network from a :class:`~agrel_sim.network.ColumnNetwork`.

Each backend is a module with a ``build(network, **options)`` function, imported only when it
is asked for (so that using one backend never imports another's dependencies).
"""

from __future__ import annotations

import importlib

from agrel_sim.network import ColumnNetwork

BACKENDS = {"torch": "agrel_sim.backends.torch_backend", "brian2": "agrel_sim.backends.brian2_backend"}


class UnsupportedLayerError(NotImplementedError):
    """A backend cannot build a layer kind; the message names the backend and the kind."""


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
