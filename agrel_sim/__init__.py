"""agrel-sim: simulate deep networks of cortical columns that learn by reinforcement (DeepAGREL).

Describe a network once (:class:`ColumnNetwork`, in Python or a TOML file in ``models/``), then
build it with a backend (:func:`build`) and run batches of trials.
"""

from agrel_sim.backends import build
from agrel_sim.config import ConfigError
from agrel_sim.network import (
    ActionSelection,
    ColumnNetwork,
    Conv2d,
    Dense,
    Dropout,
    LocallyConnected2d,
    Neuromodulator,
    Rule,
    load_model,
)

__version__ = "0.6.0"

__all__ = [
    "ActionSelection",
    "ColumnNetwork",
    "ConfigError",
    "Conv2d",
    "Dense",
    "Dropout",
    "LocallyConnected2d",
    "Neuromodulator",
    "Rule",
    "build",
    "load_model",
    "__version__",
]
