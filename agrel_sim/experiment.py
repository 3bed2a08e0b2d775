"""Experiments bind a model to a data set, a rule and the training settings.

An experiment file in ``experiments/`` looks like::

    name = "mnist_fc3_deepagrel"
    model = "mnist_fc3"           # a model name (models/) or path, or an inline [model] table
    dataset = "mnist"
    backend = "torch"             # optional, or "brian2"; a top-level key, before the tables

    [rule]                        # overrides of the model's [rule]
    name = "deepagrel"
    learning_rate = 1.0

    [action_selection]            # optional: overrides of the model's [action_selection]
    epsilon = 0.1                 # (and of its [neuromodulator], the same way)

    [training]
    batch_size = 100
    patience = 20
    validation_size = 1000
    lr_decay_factor = 0.5         # optional: halve the learning rate after ...
    lr_decay_patience = 10        # ... 10 epochs without a better validation accuracy

    [training.augmentation]       # optional: random zoom, shift, reflection
    factor = 10                   # transformed copies of each image per epoch

    [logging]                     # optional: what the run file samples (LogSettings)
    every_batches = 50

    [backend_options]             # optional: the backend's own settings (see its build())

:meth:`Experiment.to_toml` writes such a file, its model inline.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from agrel_sim.augmentation import Augmentation
from agrel_sim.backends import BACKENDS, check_backend
from agrel_sim.config import FILE_KINDS, FRACTION, POSITIVE_INT, ConfigError, Fields, file_kind, find_named_file, home_expanded, is_folder_name, read_toml, write_toml
from agrel_sim.datasets import EMBEDDED_TRAIN_SIZES, LOADERS, SHAPES
from agrel_sim.network import ColumnNetwork, load_model
from agrel_sim.recorder import LogSettings
from agrel_sim.training import TrainingSettings, check_data_sizes, check_model_fits

NAME_HINT = "a non-empty name without '/' or control characters (it names the run folder runs/<name>/seed<N>)"

# The main job: `agrel-sim train` with no arguments. A small column network on scikit-learn's
# 8×8 digits, which needs no download.
DEFAULT_EXPERIMENT = {
    "name": "digits_deepagrel",
    "dataset": "digits",
    "model": {
        "name": "digits_dense",
        "input_shape": [1, 8, 8],
        "layers": [{"kind": "dense", "units": 128}, {"kind": "dense", "units": 64}],
        "output": {"actions": 10},
        "rule": {"name": "deepagrel", "learning_rate": 0.5, "init_range": 0.1},
    },
    "training": {"batch_size": 10, "max_epochs": 200, "patience": 30, "validation_size": 200},
}


@dataclass(frozen=True)
class Experiment:
    """A model, a data set and the training settings: everything a run needs but its seed.

    Parameters
    ----------
    name : str
        Names the run folder ``runs/<name>/seed<N>``: not empty, no ``/``.
    model : ColumnNetwork
        The network description, rule included.
    dataset : str
        A key of :data:`agrel_sim.datasets.LOADERS` (``"mnist"``, ``"cifar10"``, ``"digits"``, ...).
    training : TrainingSettings
        Batch size, early stopping, validation split, learning-rate decay and augmentation.
    source : str
        Where the experiment came from; error messages name it. Experiments that differ only
        in it are equal.
    backend : str, default "torch"
        A key of :data:`agrel_sim.backends.BACKENDS`.
    backend_options : dict
        The backend's own build options, other than ``device``, ``dtype`` and ``seed``.
    logging : LogSettings
        What the run file samples.

    Raises
    ------
    ConfigError
        For a field of the wrong kind or value, a model that does not take the data set's images
        or has not one action per class, or a model the backend cannot build (the message names
        the backend and the layer).
    """

    name: str
    model: ColumnNetwork
    dataset: str
    training: TrainingSettings
    source: str = dataclasses.field(default="<python>", compare=False)
    backend: str = "torch"
    backend_options: dict = dataclasses.field(default_factory=dict)
    logging: LogSettings = LogSettings()

    def __post_init__(self):
        if not is_folder_name(self.name):
            raise ConfigError(f"{self.source}: name: expected {NAME_HINT}, got {self.name!r}")
        for field, kind in (("model", ColumnNetwork), ("training", TrainingSettings), ("logging", LogSettings), ("backend_options", dict)):
            value = getattr(self, field)
            if not isinstance(value, kind):
                raise ConfigError(f"{self.source}: {field}: expected an object of class {kind.__name__}, got {type(value).__name__} {value!r}")
        if not (isinstance(self.dataset, str) and self.dataset in LOADERS):
            raise ConfigError(f"{self.source}: dataset: expected one of {sorted(LOADERS)}, got {self.dataset!r}")
        try:
            check_model_fits(self.model, self.dataset, *SHAPES[self.dataset])
            if self.dataset in EMBEDDED_TRAIN_SIZES:
                check_data_sizes(self.training, EMBEDDED_TRAIN_SIZES[self.dataset], self.dataset)
        except ValueError as error:  # its message names the field
            raise ConfigError(f"{self.source}: {error}") from None
        check_backend(self.model, self.backend, self.backend_options, self.source)

    @classmethod
    def from_dict(cls, table: dict, source: str = "<dict>") -> "Experiment":
        """Build an experiment from plain data (a parsed TOML file), checking every field.

        Parameters
        ----------
        table : dict
            The layout of the experiment files (see the module docstring).
        source : str
            Where the data came from: error messages name it, its stem is the default name, and
            a model path in ``table`` is relative to its folder.

        Returns
        -------
        Experiment
            The experiment, its ``source`` the given one.

        Raises
        ------
        ConfigError
            For a missing, unknown or invalid field, or a model file that cannot be loaded.
        """
        advice = {"sweep": "run it with `agrel-sim sweep`", "model": "give an experiment, which names its model and data set"}
        kind = file_kind(table)
        if kind in advice:
            raise ConfigError(f"{source}: {FILE_KINDS[kind][1]}: {advice[kind]}")
        top = Fields(table, source, top_level=EXPERIMENT_KEYS)
        name = top.get("name", str, default=Path(source).stem, check=is_folder_name, hint=NAME_HINT)  # before the model, which takes it
        model_entry = top.get("model", (str, dict), hint="a model name, a path to a .toml file, or a [model] table")
        if isinstance(model_entry, dict):
            model = ColumnNetwork.from_dict({"name": name, **model_entry}, f"{source}: model", top_level=EXPERIMENT_KEYS)
        else:
            try:
                model = load_model(_relative_to(model_entry, source))
            except ConfigError as error:
                raise ConfigError(f"{source}: model: {error}") from None
        overrides = {key: top.get(key, dict, default={}, hint=f"a table of fields of the model's [{key}]") for key in MODEL_OVERRIDES}
        if any(overrides.values()):  # checked field by field as part of the model, named as in this file
            described = model.to_dict()
            model = ColumnNetwork.from_dict({**described, **{key: {**described[key], **table} for key, table in overrides.items()}}, source, top_level=EXPERIMENT_KEYS)
        dataset = top.get("dataset", str, check=lambda v: v in LOADERS, hint=f"one of {sorted(LOADERS)}")
        training = _training_settings(top.sub("training"))
        backend = top.get("backend", str, "torch", lambda v: v in BACKENDS, f"one of {sorted(BACKENDS)}")
        backend_options = top.get("backend_options", dict, default={})
        logging = _log_settings(top.sub("logging"))
        top.finish()
        return cls(name, model, dataset, training, source, backend, backend_options, logging)

    def to_dict(self) -> dict:
        """The experiment as plain data, in the layout of the experiment files, its model as an
        inline ``[model]`` table (the rule included): what :meth:`from_dict` reads back as an
        equal experiment.

        Returns
        -------
        dict
            ``name``, ``model``, ``dataset``, ``backend``, ``training`` (with ``augmentation``
            where there is one), ``logging`` and, where given, ``backend_options``.
        """
        table = {
            "name": self.name, "model": self.model.to_dict(), "dataset": self.dataset, "backend": self.backend,
            "training": training_table(dataclasses.asdict(self.training)), "logging": dataclasses.asdict(self.logging),
        }
        return {**table, "backend_options": dict(self.backend_options)} if self.backend_options else table

    def to_toml(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the experiment as an experiment file, its model inline, for ``agrel-sim train
        PATH`` and sweep files, which :meth:`from_toml` reads back as an equal experiment.

        Parameters
        ----------
        path : str or os.PathLike
            The ``.toml`` file to write (put it in ``experiments/`` to run it by name).
        overwrite : bool
            Replace an existing file; False (default): an existing file is an error.

        Returns
        -------
        Path
            ``path``.

        Raises
        ------
        ConfigError
            For a name that does not end in ``.toml``, a folder that does not exist, an existing
            file without ``overwrite``, or a backend option that TOML cannot hold (such as a
            Brian2 quantity: give durations as numbers of milliseconds).
        OSError
            Where the file cannot be written.
        """
        return write_toml(path, self.to_dict(), "Experiment.to_toml", overwrite)

    def with_rule(self, rule: str) -> "Experiment":
        """The same experiment, learning rate included, with another rule, named ``<name>_as_<rule>``.

        The name tells its runs from those of an experiment file made for that rule (which may
        have another learning rate); with the experiment's own rule, the experiment is returned.

        Parameters
        ----------
        rule : str
            The rule's name, ``"deepagrel"`` or ``"ebp"``.

        Returns
        -------
        Experiment
            This experiment, or a copy with the model's ``rule.name`` replaced.

        Raises
        ------
        ConfigError
            For an unknown rule, or one the experiment's backend does not run.
        """
        if rule == self.model.rule.name:
            return self
        return dataclasses.replace(self, name=f"{self.name}_as_{rule}", model=self.model.replace(rule={"name": rule}))

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "Experiment":
        """Read an experiment from a TOML file (see the module docstring for the layout).

        Parameters
        ----------
        path : str or os.PathLike
            The ``.toml`` file of an experiment.

        Returns
        -------
        Experiment
            The experiment, its ``source`` the path.

        Raises
        ------
        ConfigError
            If the file cannot be read or a field is missing, unknown or invalid.
        """
        path = Path(path)
        return cls.from_dict(read_toml(path), str(path))


# The model's tables that an experiment file may override field by field.
MODEL_OVERRIDES = ("rule", "action_selection", "neuromodulator")
# The keys of an experiment file's top level (Experiment.from_dict reads them all).
EXPERIMENT_KEYS = ("name", "model", "dataset", "backend", "backend_options", "training", "logging", *MODEL_OVERRIDES)


def training_table(training: dict) -> dict:
    """Training settings as plain data (``dataclasses.asdict`` of :class:`TrainingSettings`) in
    the layout of the experiment files, which have no ``augmentation`` table where there is none.

    Parameters
    ----------
    training : dict
        The settings, ``augmentation`` None or a dict.

    Returns
    -------
    dict
        ``training`` without a None ``augmentation``.
    """
    return {key: value for key, value in training.items() if not (key == "augmentation" and value is None)}


def _training_settings(fields: Fields) -> TrainingSettings:
    defaults = TrainingSettings()
    counts = ("batch_size", "max_epochs", "patience", "validation_size", "eval_batch_size")
    values = {key: fields.get(key, default=getattr(defaults, key), **POSITIVE_INT) for key in (*counts, "lr_decay_patience")}
    values["lr_decay_factor"] = fields.get("lr_decay_factor", float, defaults.lr_decay_factor, lambda v: 0 < v <= 1, "a number in (0, 1]; 1 keeps the learning rate constant")
    table = fields.sub("augmentation")  # read even when absent, so that a misspelt table name is told this one
    if "augmentation" in fields.table:
        standard = Augmentation()
        values["augmentation"] = Augmentation(
            factor=table.get("factor", default=standard.factor, **POSITIVE_INT),
            zoom=table.get("zoom", default=standard.zoom, **FRACTION),
            shift=table.get("shift", default=standard.shift, **FRACTION),
            flip=table.get("flip", bool, standard.flip),
        )
        table.finish()
    fields.finish()
    try:
        return TrainingSettings(**values)
    except ValueError as error:  # settings that do not go together; each alone was checked above
        raise ConfigError(f"{fields.source}: training.{error}") from None


def _log_settings(fields: Fields) -> LogSettings:
    defaults = LogSettings()
    values = {key: fields.get(key, default=value, **POSITIVE_INT) for key, value in dataclasses.asdict(defaults).items()}
    fields.finish()
    return LogSettings(**values)


def _relative_to(model: str, source: str) -> str:
    """A model path in an experiment file is relative to that file's folder; a leading ``~`` is
    the home folder, as in a shell."""
    if model.endswith(".toml"):
        path = home_expanded(model, "path")
        return str(Path(source).parent / path if not path.is_absolute() and Path(source).exists() else path)
    return model


def default_experiment() -> Experiment:
    """The embedded default experiment (:data:`DEFAULT_EXPERIMENT`).

    Returns
    -------
    Experiment
        A dense DeepAGREL network on the ``digits`` data set.
    """
    return Experiment.from_dict(DEFAULT_EXPERIMENT, "<embedded default>")


def load_experiment(name_or_path: str | os.PathLike) -> Experiment:
    """Load an experiment from a TOML path, or by name from ``$AGREL_SIM_EXPERIMENTS``,
    ``./experiments`` or the checkout's ``experiments/`` (see :func:`~agrel_sim.config.find_named_file`).

    Parameters
    ----------
    name_or_path : str or os.PathLike
        An experiment name such as ``"mnist_fc3_deepagrel"``, or the path of a ``.toml`` file.

    Returns
    -------
    Experiment
        The experiment read from the file found.

    Raises
    ------
    ConfigError
        If no file is found or the file is invalid.
    """
    return Experiment.from_toml(find_named_file(name_or_path, "experiment", "AGREL_SIM_EXPERIMENTS"))
