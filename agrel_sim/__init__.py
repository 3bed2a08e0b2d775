"""agrel-sim: simulate deep networks of cortical columns that learn by reinforcement (DeepAGREL).

Describe a network once (:class:`ColumnNetwork`, in Python or a TOML file in ``models/``), then
build it with a backend (:func:`build`) and run batches of trials, or train it by the paper's
protocol (:func:`train`, :func:`run_experiment`) and read the run file back (:func:`load_run`).
"""

import importlib
from typing import TYPE_CHECKING

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

# The names of training, data, recording and analysis, imported from their modules when first
# used: those modules import torch and h5py (seconds), which describing a network does not need.
_LAZY = {
    "Experiment": "agrel_sim.experiment",
    "default_experiment": "agrel_sim.experiment",
    "load_experiment": "agrel_sim.experiment",
    "Dataset": "agrel_sim.datasets",
    "load_dataset": "agrel_sim.datasets",
    "TrainingSettings": "agrel_sim.training",
    "RunResult": "agrel_sim.training",
    "train": "agrel_sim.training",
    "run_experiment": "agrel_sim.runs",
    "LogSettings": "agrel_sim.recorder",
    "RunFile": "agrel_sim.recorder",
    "Run": "agrel_sim.analysis",
    "load_run": "agrel_sim.analysis",
    "load_runs": "agrel_sim.analysis",
}

if TYPE_CHECKING:  # for type checkers and editors, which do not run __getattr__
    from agrel_sim.analysis import Run, load_run, load_runs
    from agrel_sim.datasets import Dataset, load_dataset
    from agrel_sim.experiment import Experiment, default_experiment, load_experiment
    from agrel_sim.recorder import LogSettings, RunFile
    from agrel_sim.runs import run_experiment
    from agrel_sim.training import RunResult, TrainingSettings, train


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups find it without this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)  # the public names, those imported when first used among them


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
    # imported when first used (_LAZY):
    "Experiment",
    "default_experiment",
    "load_experiment",
    "Dataset",
    "load_dataset",
    "TrainingSettings",
    "RunResult",
    "train",
    "run_experiment",
    "LogSettings",
    "RunFile",
    "Run",
    "load_run",
    "load_runs",
    "__version__",
]
