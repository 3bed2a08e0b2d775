"""Analysis of run files: reward curves, gating over training, gating and outcome, feedback
alignment, Table 1 data.

Load one run file or every run file under a folder (:func:`load_runs`); the functions below
return plain numpy arrays, and the ``plot_*`` functions draw them with matplotlib.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import reprlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from agrel_sim import __version__
from agrel_sim.config import ConfigError, in_the_way, is_count, shown
from agrel_sim.experiment import Experiment
from agrel_sim.recorder import (
    EPOCH_FIELDS, GATING_FIELDS, LAYOUT_VERSION, TRIAL_FIELDS, config_problem, parse_sessions, records_that_disagree, result_problem, true_or_false,
    whole_layout_version,
)
from agrel_sim.runs import DAMAGED_FILE_ERRORS, NOT_MODELLING, RUN_FILE, changed_settings, experiment_of, settings_of, shown_leaf, top_setting
from agrel_sim.table import is_diverged, row_key


class RunFileError(ValueError):
    """A path is not a readable run file of a layout this version understands."""


class RunChangedError(RunFileError):
    """A run file replaced since it was loaded (its run still training, or resumed): load it again."""


class IncompleteRunWarning(UserWarning):
    """A run file whose run did not end cleanly (killed, crashed or still running)."""


class OlderRunFileWarning(UserWarning):
    """A run file of an older layout that records something differently (the message says what)."""


_DAMAGED = "the run file is damaged: train the run again in a new folder, or move it out of the folder to analyse the others"


def _read(group: h5py.Group, name: str, index=()) -> np.ndarray:
    """``group[name][index]``, or a :class:`RunFileError` naming the file and the dataset where
    the dataset is missing or its data cannot be read (a damaged chunk)."""
    try:
        return group[name][index]
    except (KeyError, OSError) as error:
        raise RunFileError(f"{group.file.filename}: cannot read {group.name}/{name} ({error}); {_DAMAGED}") from None


@dataclass
class Run:
    """A run file's metadata and per-epoch metrics; the larger records are read on demand.

    Made by :func:`load_run`; each parameter is also the attribute of the same name.

    Parameters
    ----------
    path : Path
        The run file.
    config : dict
        The run's settings as the run file stores them (its ``config`` attribute): experiment,
        dataset, model, training, backend, ..., logging.
    seed : int
        The run's seed (the run file's ``seed`` attribute).
    rule : str
        ``"deepagrel"`` or ``"ebp"``.
    backend : str
        ``"torch"`` or ``"brian2"``.
    complete : bool
        Whether the run ended cleanly; False for a run killed, crashed or still running.
    epochs : dict of str to ndarray
        ``/epochs``: per finished epoch, each of :data:`~agrel_sim.recorder.EPOCH_FIELDS`.
    result : dict or None
        The attributes of ``/result`` (test accuracy, best epoch, seconds, ...); None until the
        run has ended.
    sessions : list of dict
        What each training session (the start, then every resume) ran on: versions, git
        commit, device, host (:func:`~agrel_sim.recorder.session`); empty for run files of
        agrel-sim 0.2.0 and older.
    software_version : str
        The agrel-sim that began the run (``"unknown"`` where the file does not say).
    file_version : tuple
        The identity of the file that was loaded (device, inode, modification time, size). A
        training run replaces its run file after every epoch, so a method that reads the file
        later raises :class:`RunChangedError` where it is no longer that file: what one
        :class:`Run` gives always comes from one version of the run.
    """

    path: Path
    config: dict
    seed: int
    rule: str
    backend: str
    complete: bool
    epochs: dict[str, np.ndarray]
    result: dict | None
    sessions: list[dict] = field(default_factory=list)
    software_version: str = "unknown"
    file_version: tuple = field(default=(), repr=False, compare=False)

    @contextlib.contextmanager
    def _open(self):
        """The run file, open for reading, where it is still the version loaded (:attr:`file_version`)."""
        with h5py.File(self.path, "r") as handle:
            if self.file_version and _file_version(handle) != self.file_version:
                raise RunChangedError(f"{self.path}: the run file was replaced since it was loaded (the run is still training, or was resumed); load it again")
            yield handle

    @property
    def layer_names(self) -> list[str]:
        """The recorded layers, bottom to top."""
        with self._open() as handle:
            return self._bottom_to_top(handle["layers"])

    def _bottom_to_top(self, present) -> list[str]:
        """The populations among ``present`` from the input to the output (HDF5 lists groups by
        name: layers.10 before layers.2)."""
        order = ["input", *(f"layers.{index}" for index in range(len(self.config["model"]["layers"]))), "output"]
        return [name for name in order if name in present]

    def trials(self, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """The logged trials: epoch, batch, image, label, action, reward, delta, q; ``rows``
        (default all) picks some, such as ``slice(-4, None)`` for the last four.

        Parameters
        ----------
        rows : slice
            Which logged trials to read, in the order they were logged; all by default.

        Returns
        -------
        dict of str to ndarray
            Each of :data:`~agrel_sim.recorder.TRIAL_FIELDS` (``epoch``, ``batch``, ``image``,
            ``label``, ``action``, ``reward``, ``delta``), shape (trials,), and ``q``, the
            Q-values the action was chosen from, shape (trials, actions). ``delta`` is the RPE
            reward minus q[action], NaN for EBP.

        Raises
        ------
        RunFileError
            Where a record cannot be read (a damaged file).
        RunChangedError
            Where the run file was replaced since it was loaded.
        """
        with self._open() as handle:
            return {name: _read(handle["trials"], name, rows) for name in (*TRIAL_FIELDS, "q")}

    def layer(self, name: str, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Traces of one layer for the logged trials (``rows`` of them, as in :meth:`trials`):
        units, ff, fb, gate; and its ``shape``.

        Parameters
        ----------
        name : str
            A recorded layer (:attr:`layer_names`): ``"layers.N"`` or ``"output"``.
        rows : slice
            Which logged trials to read, as in :meth:`trials`; all by default.

        Returns
        -------
        dict
            ``units`` (columns,): the flat indices of the traced columns in the layer's sheet;
            ``ff`` and ``fb`` (trials, columns): the feedforward and feedback activity (``fb``
            NaN for EBP); ``gate`` (trials, columns): 1 where the column's gate was open as
            learning used it; ``shape`` (tuple of int): the shape of the layer's sheet.

        Raises
        ------
        RunFileError
            For a ``name`` that is not a recorded layer, or a record that cannot be read.
        RunChangedError
            Where the run file was replaced since it was loaded.
        """
        with self._open() as handle:
            if not isinstance(name, str) or name not in handle["layers"]:
                raise RunFileError(f"{self.path}: no layer {name!r} is recorded; the layers are {', '.join(self.layer_names)}")
            group = handle["layers"][name]
            return {"units": _read(group, "units"), **{key: _read(group, key, rows) for key in ("ff", "fb", "gate")}, "shape": tuple(group.attrs["shape"])}

    @property
    def traced_trials(self) -> int:
        """How many trials have a time course (:meth:`timecourse`); 0 in a run without."""
        with self._open() as handle:
            return len(handle["timecourses"]["trial"]) if "timecourses" in handle else 0

    @property
    def has_timecourses(self) -> bool:
        """Whether any trial has a time course (:meth:`timecourse`)."""
        return self.traced_trials > 0

    def timecourse(self, index: int = -1) -> dict:
        """One traced trial's time course (Brian2 backend).

        Parameters
        ----------
        index : int
            Which traced trial, in the order they ran: 0 the first, -1 (default) the last.

        Returns
        -------
        dict
            ``t`` (steps,): seconds from the trial's start to the end of each time step;
            ``phases``: phase name to (start, end) in seconds, in the trial's order; ``delta``
            (steps,): the dopamine signal; ``epoch``, ``batch``, ``trial``; ``image``, ``label``,
            ``action``, ``reward`` and ``q`` (actions,), the Q-values the action was chosen from
            (None in run files of layouts before 4, which lack them); ``populations``: name to
            ``{"ff", "fb", "gate"}``, each (steps, columns), from the input to the output.

        Raises
        ------
        TypeError
            For an ``index`` that is not an integer.
        IndexError
            For an ``index`` beyond the traced trials.
        RunFileError
            For a run without time courses.
        """
        _check_trial_index("index", index)
        with self._open() as handle:
            if "timecourses" not in handle:
                raise RunFileError(f"{self.path}: no time courses: only the brian2 backend records them, with backend_options.trace_every > 0")
            group = handle["timecourses"]
            traced = len(group["trial"])
            if not -traced <= index < traced:
                raise IndexError(f"{self.path}: index {index} is out of range for its {traced} traced trials (0 to {traced - 1}, or -{traced} to -1 from the last)")
            phases = sorted(((name, (float(start), float(end))) for name, (start, end) in group.attrs.items()), key=lambda phase: phase[1][0])
            course = {"t": _read(group, "t"), "phases": dict(phases), "delta": _read(group, "delta", index)}
            course.update({name: int(_read(group, name, index)) for name in ("epoch", "batch", "trial")})
            for name, kind in (("image", int), ("label", int), ("action", int), ("reward", float), ("q", np.asarray)):  # since layout 4
                course[name] = kind(_read(group, name, index)) if name in group else None
            course["populations"] = {name: {field: _read(group[name], field, index) for field in ("ff", "fb", "gate")} for name in self._bottom_to_top(group)}
            return course

    def gating(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-batch gating summaries: ``{"epoch": ..., "batch": ..., layer: {field: ...}}``.

        Returns
        -------
        dict
            ``epoch`` and ``batch`` (batches,): each summarised training batch's epoch and its
            batch within the epoch (from 0); per recorded layer, a dict of each of
            :data:`~agrel_sim.recorder.GATING_FIELDS` (``open_fraction``, ``fb_mean_abs``,
            ``changed_fraction``) to an array of shape (batches,).

        Raises
        ------
        RunFileError
            Where a record cannot be read (a damaged file).
        RunChangedError
            Where the run file was replaced since it was loaded.
        """
        with self._open() as handle:
            group = handle["gating"]
            out = {"epoch": _read(group, "epoch"), "batch": _read(group, "batch")}
            for name in group:
                if isinstance(group[name], h5py.Group):
                    out[name] = {field: _read(group[name], field) for field in GATING_FIELDS}
            return out

    def alignment(self) -> dict[str, np.ndarray] | None:
        """Per epoch, how closely each layer's feedback weights mirror its feedforward weights.

        Returns
        -------
        dict or None
            ``epoch`` (rows,): 0 for the weights the run started with, then each finished
            epoch; per layer with weights (not dropout layers), bottom to top, an array (rows,)
            of the cosine similarity of its ff and fb weights at the end of that epoch
            (:func:`agrel_sim.rule.feedback_alignment`; NaN for EBP). None for run files of
            layouts before 5, which lack ``/alignment``; a layout-4 run resumed since holds rows
            only for the epochs trained after the resume.

        Raises
        ------
        RunFileError
            Where a record cannot be read (a damaged file).
        RunChangedError
            Where the run file was replaced since it was loaded.
        """
        with self._open() as handle:
            if "alignment" not in handle:
                return None
            group = handle["alignment"]
            return {"epoch": _read(group, "epoch"), **{name: _read(group, name) for name in self._bottom_to_top(group)}}

    def experiment(self) -> Experiment:
        """The experiment this run trained, rebuilt from the settings its run file stores
        (:func:`~agrel_sim.runs.experiment_of`): run it again with
        :func:`~agrel_sim.runs.run_experiment`, given the run's :attr:`seed` and the
        ``config["dtype"]`` and ``config["device"]`` it ran with, or write it out with
        :meth:`~agrel_sim.experiment.Experiment.to_toml`.

        Its ``backend_options`` hold every option of the backend, at its default where the
        experiment gave none (as the run file stores them); the other fields are the
        experiment's. A run resumed with a longer patience or epoch limit gives the limit in
        force since.

        Returns
        -------
        Experiment
            Its ``source`` names the run file.

        Raises
        ------
        RunFileError
            Where the run file lacks the training settings (one made by a
            :class:`~agrel_sim.recorder.RunFile` in Python holds only what it was given), or
            its settings are not those of an experiment of this agrel-sim (a run file of an
            older one, with an option since removed).
        """
        try:
            return experiment_of(self.config, self.software_version, f"{self.path}: config")
        except ConfigError as error:
            older = f" (the run was made by agrel-sim {self.software_version}; this is {__version__})" if self.software_version != __version__ else ""
            raise RunFileError(f"{error}{older}") from None


def _check_trial_index(name: str, index) -> None:
    """Raise ``TypeError`` unless ``index`` is an integer: which traced trial (0 the first, -1 the last)."""
    if not isinstance(index, numbers.Integral) or isinstance(index, bool):
        raise TypeError(f"{name}: expected an integer (0 the first traced trial, -1 the last), got {index!r}")


def load_run(path: str | Path) -> Run:
    """Open a run file, checking that it is one and that its layout is not newer than this code's.

    Parameters
    ----------
    path : str or os.PathLike
        The run file (``run.h5``).

    Returns
    -------
    Run
        Its settings, epochs and result; the other records are read when asked for.

    Raises
    ------
    RunFileError
        Naming the file: a folder, a missing or unreadable file, another kind of file, a newer
        layout, or a damaged run file (one that HDF5 cannot read, that lacks a record every run
        file has, whose records disagree on their rows, whose ``layout_version`` or ``complete``
        attribute is of another kind, whose ``config`` lacks what the analyses read, whose
        ``/result`` is no possible result of its epochs, or that is marked complete without one).

    Warns
    -----
    IncompleteRunWarning
        For a run that did not end cleanly (killed, crashed or still training).
    OlderRunFileWarning
        For a layout-1 or -2 file of a net with dropout, whose gates below the dropout read open.
    """
    path = Path(path)
    if path.is_dir():
        inside = f"give its run file {path / RUN_FILE}, or " if (path / RUN_FILE).is_file() else ""
        raise RunFileError(f"{path}: a folder, not a run file: {inside}load every run below it with load_runs")
    if not path.is_file():
        raise RunFileError(f"{path}: no such run file")
    try:
        if not h5py.is_hdf5(path):
            raise RunFileError(f"{path}: not an HDF5 file, so not a run file of agrel-sim (an empty or damaged one, or another file of that name); move it out of the folder to analyse the others")
        with h5py.File(path, "r") as handle:
            attrs = dict(handle.attrs)
            if "layout_version" not in attrs:
                raise RunFileError(f"{path}: an HDF5 file, but not a run file of agrel-sim (no layout_version)")
            version = _attribute(path, attrs, "layout_version", whole_layout_version)
            if version > LAYOUT_VERSION:
                raise RunFileError(
                    f"{path}: written with run-file layout version {version}, newer than the {LAYOUT_VERSION} "
                    "this agrel-sim reads; upgrade agrel-sim to analyse it"
                )
            records = [f"/epochs/{name}" for name in EPOCH_FIELDS if version > 1 or name != "learning_rate"] + ["/trials", "/layers", "/gating"]
            records += ["/alignment"] if version >= 5 else []
            missing = [f"the attribute {name}" for name in ("config", "seed", "rule", "backend") if name not in attrs]
            missing += [name for name in records if name not in handle]
            if "/layers" in handle and "/gating" in handle:
                for name, group in handle["layers"].items():
                    if name not in handle["gating"]:
                        missing.append(f"/gating/{name}")
                    if "shape" not in group.attrs:
                        missing.append(f"the attribute shape of /layers/{name}")
            if missing:
                raise RunFileError(f"{path}: a run file that lacks {', '.join(missing)}; {_DAMAGED}")
            disagree = records_that_disagree(handle)
            if disagree:
                raise RunFileError(f"{path}: a run file whose records disagree ({'; '.join(disagree)}); {_DAMAGED}")
            config = _attribute(path, attrs, "config", json.loads)
            _check_config(path, config, version)
            seed = _attribute(path, attrs, "seed", int)
            sessions = _attribute(path, attrs, "sessions", parse_sessions) if "sessions" in attrs else []
            epochs = {name: _read(handle["epochs"], name) for name in EPOCH_FIELDS if name in handle["epochs"]}
            if version == 1:  # before learning-rate schedules: the rule's constant learning rate
                epochs["learning_rate"] = np.full(len(epochs["epoch"]), config["model"]["rule"]["learning_rate"])
            if version < 3 and any(layer["kind"] == "dropout" for layer in config["model"]["layers"]):
                warnings.warn(
                    f"{path}: run-file layout version {version}: the gates recorded for layers below dropout layers show "
                    "ff activity only (a dropped column reads open); train the run again with this agrel-sim to analyse them",
                    OlderRunFileWarning,
                    stacklevel=2,
                )
            complete = _attribute(path, attrs, "complete", true_or_false) if "complete" in attrs else False
            result = dict(handle["result"].attrs) if "result" in handle else None
            problem = None if result is None else result_problem(result, len(epochs["epoch"]))
            if problem:
                raise RunFileError(f"{path}: {problem}; {_DAMAGED}")
            if complete and result is None:  # the recorder writes /result before it marks the run complete
                raise RunFileError(f"{path}: marked complete, but it lacks /result; {_DAMAGED}")
            file_version = _file_version(handle)
    except RunFileError:
        raise
    except PermissionError:
        raise RunFileError(f"{path}: no permission to read this run file; make it readable, or move it out of the folder to analyse the others") from None
    except DAMAGED_FILE_ERRORS as error:
        raise RunFileError(f"{path}: cannot be read as a run file ({type(error).__name__}: {error}); {_DAMAGED}") from None
    if not complete:
        warnings.warn(
            f"{path}: incomplete run (killed, crashed or still running); it holds {len(epochs['epoch'])} "
            "finished epochs, analysed as they are",
            IncompleteRunWarning,
            stacklevel=2,
        )
    software_version = str(attrs.get("software_version", "unknown"))
    return Run(path, config, seed, str(attrs["rule"]), str(attrs["backend"]), complete, epochs, result, sessions, software_version, file_version)


def _check_config(path: Path, config, version: int) -> None:
    """Raise :class:`RunFileError` unless the run file's ``config`` holds what the analyses read."""
    problem = config_problem(config, version)
    if problem:
        raise RunFileError(f"{path}: its config attribute {problem}; {_DAMAGED}")


def _file_version(handle: h5py.File) -> tuple:
    """The identity of the file open in ``handle`` (not of what its path names now)."""
    status = os.fstat(handle.id.get_vfd_handle())
    return status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size


def _attribute(path: Path, attrs: dict, name: str, convert):
    """The run file's attribute ``name`` through ``convert`` (``int``, ``json.loads``), or a
    :class:`RunFileError` naming the file and the attribute."""
    try:
        return convert(attrs[name])
    except (TypeError, ValueError) as error:
        raise RunFileError(f"{path}: bad {name} attribute ({error}); {_DAMAGED}") from None


def load_runs(path: str | Path) -> list[Run]:
    """Load a run file, or every run file (``run.h5``) in a folder and its subfolders.

    Parameters
    ----------
    path : str or os.PathLike
        A run file, or a folder searched below (links followed, each folder once).

    Returns
    -------
    list of Run
        One per run file (:func:`load_run`), in the order of their paths.

    Raises
    ------
    RunFileError
        For a path that does not exist, a folder without run files, a folder below ``path``
        that cannot be listed, or a run file that :func:`load_run` refuses.
    """
    path = Path(path)
    if path.is_dir():
        unreadable, seen, files = [], set(), []  # a run in a folder that cannot be listed would be left out unseen
        for folder, subfolders, names in os.walk(path, followlinks=True, onerror=unreadable.append):  # runs linked in from elsewhere count
            status = os.stat(folder)
            identity = (status.st_dev, status.st_ino)
            if identity in seen:  # a folder reached twice (linked twice, or a link cycle) counts once
                subfolders.clear()
                continue
            seen.add(identity)
            subfolders.sort()  # the first of two paths to a folder, in name order, is the one kept
            if RUN_FILE in names:
                files.append(Path(folder) / RUN_FILE)
        files.sort()
        if unreadable:
            error = unreadable[0]
            raise RunFileError(f"{error.filename}: cannot list this folder ({error.strerror}), so its runs would be left out; make it readable, or give a folder without it")
        if not files:
            raise RunFileError(f"{path}: no run files ({RUN_FILE}) in this folder or below it")
        return [load_run(f) for f in files]
    if not path.exists():
        raise RunFileError(f"{path}: no such folder of runs or run file")
    return [load_run(path)]


# -- what the runs show ------------------------------------------------------------------------

# What runs that share a Table 1 row and a rule must have in common: everything but the seed, the
# experiment's name and source, the device, the logging and the backend options in which runs of
# one model may differ (NOT_MODELLING).
ROW_SETTINGS = ("dataset", "data", "model", "training", "backend", "backend_options", "dtype")

# What the two rules of a row may differ in besides: the rule and its optimisation (each rule
# may need its own learning rate), and the settings only DeepAGREL uses.
RULE_SETTINGS = ("model.rule.name", "model.rule.learning_rate", "model.rule.feedback", "model.rule.weight_decay", "training.lr_decay_factor", "training.lr_decay_patience")
RULE_TABLES = ("model.action_selection.", "model.neuromodulator.")


def row_label(row: tuple[str, str, int]) -> str:
    """'mnist, mnist_conv3, no augmentation' for the row key of :func:`agrel_sim.table.row_key`.

    Parameters
    ----------
    row : tuple of (str, str, int)
        A Table 1 row key: data set, network, and augmentation factor (0 without augmentation).

    Returns
    -------
    str
        The row's label, as in figure titles and messages.
    """
    dataset, network, factor = row
    return f"{dataset}, {network}, {f'{factor}x augmentation' if factor else 'no augmentation'}"


def table_rows(runs: list[Run]) -> dict[tuple[str, str, int], dict[str, list[Run]]]:
    """Runs grouped by Table 1 row (data set, network, augmentation) and then by rule.

    The runs of one row and rule must differ only in their seed: runs made with other settings
    (a longer patience, another learning rate), on other data, or one seed twice, would be
    averaged into a figure that no protocol produced. The two rules of a row must share the
    protocol: they may differ only in :data:`RULE_SETTINGS` and :data:`RULE_TABLES`. Both raise
    :class:`RunFileError` naming two run files. Settings that older run files lack count as the
    value those runs behaved as (:func:`agrel_sim.runs.settings_of`); their data is unknown.

    Parameters
    ----------
    runs : list of Run
        The runs to group.

    Returns
    -------
    dict
        Row key (:func:`agrel_sim.table.row_key`: data set, network, augmentation factor) to
        rule (``"deepagrel"``, ``"ebp"``) to the list of its runs, in the order given.

    Raises
    ------
    RunFileError
        Naming two run files: runs of one row and rule that differ in more than their seed,
        runs of one row under different protocols, or one seed twice in a row and rule.
    """
    rows: dict[tuple, dict[str, list[Run]]] = {}
    seen: dict[tuple, list[tuple[Run, dict]]] = {}
    for run in runs:
        row = row_key(run.config)
        settings = {key: value for key, value in settings_of(run.config, run.software_version).items() if top_setting(key) in ROW_SETTINGS and key not in NOT_MODELLING}
        where = f"Table 1 row {row_label(row)}"
        # Against every run before it, not the first alone: one that lacks a record (an older
        # run file's data) must not let two that have it differ.
        for other, other_settings in seen.setdefault(row, []):
            differences = changed_settings(other_settings, settings)
            if other.rule == run.rule and differences:
                raise RunFileError(
                    f"{other.path} and {run.path}: runs of the {where}, {run.rule} made with different settings ({_listed(differences, other_settings, settings)}); "
                    "a row averages runs that differ only in their seed: give a folder with one setting per row (one sweep's out folder, say)"
                )
            if protocol := [key for key in differences if key not in RULE_SETTINGS and not key.startswith(RULE_TABLES)]:
                raise RunFileError(
                    f"{other.path} and {run.path}: the {other.rule} and {run.rule} runs of the {where} were made under different protocols ({_listed(protocol, other_settings, settings)}); "
                    "a row compares the two rules under one protocol, in which they may differ only in the rule's own settings (learning rate and its schedule, "
                    "weight decay, feedback, action selection, neuromodulator): give a folder with one protocol per row"
                )
            if other.rule == run.rule and other.seed == run.seed:
                raise RunFileError(f"{other.path} and {run.path}: seed {run.seed} twice in the {where}, {run.rule}; a row averages distinct seeds: remove or move one of them")
        seen[row].append((run, settings))
        rows.setdefault(row, {}).setdefault(run.rule, []).append(run)
    return rows


def _listed(keys: list[str], first: dict, second: dict) -> str:
    return "; ".join(f"{key}: {shown_leaf(first, key)} and {shown_leaf(second, key)}" for key in keys)


def averaged(run: Run) -> bool:
    """Whether Table 1 counts the run: it ended cleanly and has its result.

    An incomplete run is left out (of Figure 3 too): a killed run's epochs end where it was
    killed, not where its stopping criterion would have ended them. A diverged run counts as
    not converged, but its accuracy and epochs are not averaged (:func:`in_figure3`).

    Parameters
    ----------
    run : Run
        A loaded run.

    Returns
    -------
    bool
        True where the run is complete and has a ``/result``.
    """
    return run.complete and run.result is not None


def in_figure3(run: Run) -> bool:
    """Whether Figure 3 averages the run: the runs whose accuracy and epochs Table 1 averages.

    Parameters
    ----------
    run : Run
        A loaded run.

    Returns
    -------
    bool
        True where the run is :func:`averaged` and did not diverge.
    """
    return averaged(run) and not is_diverged(run.result)


def table1_records(runs: list[Run]) -> list[dict]:
    """The data behind Table 1: one record per complete run, for :func:`agrel_sim.table.table1`.

    The complete runs are grouped and checked by :func:`table_rows`.

    Parameters
    ----------
    runs : list of Run
        The runs; those not :func:`averaged` (incomplete, or without a result) are left out.

    Returns
    -------
    list of dict
        Per run, grouped by Table 1 row and rule: ``dataset`` (str), ``model`` (dict, the
        config's model settings), ``training`` (dict, empty where the config has none),
        ``seed`` (int), ``result`` (dict, the attributes of ``/result``) and ``path`` (Path).

    Raises
    ------
    RunFileError
        Where :func:`table_rows` refuses the complete runs.
    """
    return [
        {"dataset": run.config["dataset"], "model": run.config["model"], "training": run.config.get("training", {}), "seed": run.seed, "result": run.result, "path": run.path}
        for rules in table_rows([run for run in runs if averaged(run)]).values() for group in rules.values() for run in group
    ]


def reward_curves(runs: list[Run]) -> dict[tuple[str, str, int], dict[str, dict[str, np.ndarray]]]:
    """The paper's Figure 3: per Table 1 row and rule, reward probability per epoch, mean and 2σ over runs.

    For DeepAGREL the share of rewarded training trials, for EBP one minus the training error
    (the share of correct greedy choices). Only the runs whose accuracy and epochs Table 1
    averages count (:func:`in_figure3`): complete, not diverged. Runs stop at different epochs:
    each epoch averages the runs that reached it. Runs are grouped and checked by
    :func:`table_rows`, so runs of different data sets, networks or settings never share a
    curve.

    Parameters
    ----------
    runs : list of Run
        The runs (any iterable of :class:`Run`); those not :func:`in_figure3` are left out.

    Returns
    -------
    dict
        Row key (:func:`agrel_sim.table.row_key`) to rule to ``epoch`` (from 1), ``mean``,
        ``two_sigma`` (twice the sample standard deviation, NaN where fewer than 2 runs reached
        the epoch) and ``runs`` (how many runs each epoch averages), arrays of one length.

    Raises
    ------
    ValueError
        Where ``runs`` holds anything but :class:`Run` objects (a path, say).
    RunFileError
        Where :func:`table_rows` refuses the runs.
    """
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)  # a generator is read once
    if not all(isinstance(run, Run) for run in runs):
        raise ValueError(f"runs: expected a list of Run objects (load_runs(path) reads a folder of them), got {reprlib.repr(runs)}")
    curves = {}
    for row, rules in sorted(table_rows([run for run in runs if in_figure3(run)]).items()):
        curves[row] = {}
        for rule, group in sorted(rules.items()):
            series = [run.epochs["reward_probability"] for run in group]
            length = max(len(s) for s in series)
            padded = np.full((len(series), length), np.nan)
            for i, s in enumerate(series):
                padded[i, : len(s)] = s
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # one run has no spread: NaN
                curves[row][rule] = {
                    "epoch": np.arange(1, length + 1),
                    "mean": np.nanmean(padded, axis=0),
                    "two_sigma": 2 * np.nanstd(padded, axis=0, ddof=1),
                    "runs": np.sum(~np.isnan(padded), axis=0),
                }
    return curves


def gating_by_epoch(run: Run) -> dict[str, dict[str, np.ndarray]]:
    """Per layer, the per-batch gating summaries averaged over each epoch.

    Parameters
    ----------
    run : Run
        A loaded run.

    Returns
    -------
    dict of str to dict of str to ndarray
        Per recorded layer (:attr:`Run.layer_names`): ``epoch`` (epochs,), the epochs with
        summarised batches, and each of :data:`~agrel_sim.recorder.GATING_FIELDS`
        (``open_fraction``, ``fb_mean_abs``, ``changed_fraction``), shape (epochs,): the mean
        over the epoch's batches, NaN values left out (all NaN gives NaN).
    """
    gating = run.gating()
    epochs = np.unique(gating["epoch"])
    out = {}
    for name in run.layer_names:
        out[name] = {"epoch": epochs}
        for quantity in GATING_FIELDS:
            values = gating[name][quantity]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # NaN fields (e.g. no fb in EBP)
                out[name][quantity] = np.array([np.nanmean(values[gating["epoch"] == e]) for e in epochs])
    return out


def gating_by_outcome(run: Run) -> dict[str, dict]:
    """Per layer, gate and feedback activity of the logged trials, rewarded against not, epoch by epoch.

    Rewarded trials grow common as a run learns while its gates change with learning, so a
    comparison pooled over the whole run mixes the outcome with the stage of training and can
    reverse a difference that holds in every epoch. The comparison is therefore made within
    epochs: a ``*_difference`` is the weighted mean over epochs of rewarded minus unrewarded,
    each epoch weighted by ``n_r·n_u / (n_r + n_u)`` (its numbers of rewarded and unrewarded
    logged trials: the weights of a stratified difference of means), so that an epoch with
    trials of one outcome only counts for nothing. Trials whose Q-values are not finite (a
    diverged network, whose gates and choices no longer mean anything) are left out.

    Parameters
    ----------
    run : Run
        A loaded run; a trial counts as rewarded where its action equals its label.

    Returns
    -------
    dict
        Per layer name: ``epoch`` (the epochs with logged trials), ``trials_rewarded`` and
        ``trials_unrewarded`` (per epoch, the trials compared), ``trials_not_finite`` (per
        epoch, the trials left out for their Q-values), ``open_fraction_rewarded``,
        ``open_fraction_unrewarded``, ``fb_mean_abs_rewarded`` and ``fb_mean_abs_unrewarded``
        (per epoch, NaN where an epoch has no trial of that outcome; the ``fb`` ones always NaN
        for EBP, which has no feedback neurons), and ``open_fraction_difference`` and
        ``fb_mean_abs_difference`` (floats, NaN where no epoch has trials of both outcomes).
        Empty for a run that logged no trials (killed in its first epoch).
    """
    trials = run.trials()
    if not len(trials["label"]):
        return {}
    rewarded = trials["action"] == trials["label"]
    epochs = np.unique(trials["epoch"])
    kept = np.isfinite(trials["q"]).all(axis=1)
    outcomes = {outcome: [kept & (trials["epoch"] == e) & (rewarded == wanted) for e in epochs] for outcome, wanted in (("rewarded", True), ("unrewarded", False))}
    counts = {outcome: np.array([rows.sum() for rows in outcomes[outcome]]) for outcome in outcomes}
    not_finite = np.array([np.sum(~kept & (trials["epoch"] == e)) for e in epochs])
    # 0 for an epoch left without trials (all of them a diverged network's)
    weights = counts["rewarded"] * counts["unrewarded"] / np.maximum(counts["rewarded"] + counts["unrewarded"], 1)
    both = weights > 0
    out = {}
    for name in run.layer_names:
        layer = run.layer(name)
        row = {"epoch": epochs, "trials_rewarded": counts["rewarded"], "trials_unrewarded": counts["unrewarded"], "trials_not_finite": not_finite}
        for quantity, values in (("open_fraction", layer["gate"]), ("fb_mean_abs", np.abs(layer["fb"]))):
            for outcome, rows_by_epoch in outcomes.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # an epoch without this outcome; EBP's NaN fb
                    row[f"{quantity}_{outcome}"] = np.array([np.mean(values[rows]) for rows in rows_by_epoch])
            differences = (row[f"{quantity}_rewarded"] - row[f"{quantity}_unrewarded"])[both]
            row[f"{quantity}_difference"] = float(np.average(differences, weights=weights[both])) if both.any() else float("nan")
        out[name] = row
    return out


def hidden_layers(run: Run) -> list[str]:
    """The recorded hidden layers that have synapses of their own: not the dropout layers (whose
    records show the columns of the layer below them), not the output (whose gates are always
    open).

    Parameters
    ----------
    run : Run
        A loaded run.

    Returns
    -------
    list of str
        The layers' names (``"layers.N"``), from the input to the output.
    """
    kinds = {f"layers.{index}": layer["kind"] for index, layer in enumerate(run.config["model"]["layers"])}
    return [name for name in run.layer_names if name in kinds and kinds[name] != "dropout"]


def outcome_lines(run: Run) -> list[str]:
    """Lines of :func:`analyze` that compare each hidden layer's gates and feedback on rewarded
    and unrewarded trials, within epochs (:func:`gating_by_outcome`).

    Parameters
    ----------
    run : Run
        A loaded run.

    Returns
    -------
    list of str
        Indented lines: a heading that counts the epochs with trials of both outcomes, then per
        hidden layer (:func:`hidden_layers`) the differences in open gates and in mean |fb|;
        one line where no epoch has both; empty for a run without logged trials or hidden layers.
        Both first lines count the trials left out because their Q-values are not finite.
    """
    by_outcome, hidden = gating_by_outcome(run), hidden_layers(run)
    if not by_outcome or not hidden:
        return []
    counts = by_outcome[hidden[0]]
    both = int(np.sum((counts["trials_rewarded"] > 0) & (counts["trials_unrewarded"] > 0)))
    left, compared = int(counts["trials_not_finite"].sum()), int(counts["trials_rewarded"].sum() + counts["trials_unrewarded"].sum())
    left_out = f" ({left} of the {left + compared} left out: their Q-values are not finite)" if left else ""
    if not both:
        return [f"  rewarded against unrewarded trials: no epoch logged trials of both outcomes{left_out}"]
    lines = [f"  rewarded minus unrewarded logged trials, within epochs ({both} of {len(counts['epoch'])} epochs have both){left_out}:"]
    for name in hidden:
        row = by_outcome[name]
        fb = "no feedback (EBP)" if run.rule == "ebp" else f"{row['fb_mean_abs_difference']:+.4f}"
        lines.append(f"    {name:10s} open gates {row['open_fraction_difference']:+.3f}, |fb| {fb}")
    return lines


def summary(run: Run) -> str:
    """A few lines that describe a run.

    Parameters
    ----------
    run : Run
        A loaded run.

    Returns
    -------
    str
        Newline-separated lines: the run's settings and whether it is complete; its epochs
        (last reward probability, best validation accuracy, learning rates); its result where
        it has one; the alignment of its feedback with its feedforward weights, first and last
        recorded (DeepAGREL, layout 5); its training sessions; and its logged trials (mean RPE,
        share rewarded).
    """
    config = run.config
    lines = [
        f"{run.path}: experiment {config['experiment']}, model {config['model']['name']}, rule {run.rule}, "
        f"data {config['dataset']}, seed {run.seed}, backend {run.backend}, {'complete' if run.complete else 'INCOMPLETE'}",
        f"  epochs: {len(run.epochs['epoch'])}; last reward probability {run.epochs['reward_probability'][-1]:.4f}, "
        f"best validation accuracy {np.max(run.epochs['validation_accuracy']):.4f}, "
        f"learning rate {run.epochs['learning_rate'][0]:.3g} to {run.epochs['learning_rate'][-1]:.3g}" if len(run.epochs["epoch"]) else "  epochs: none finished",
    ]
    if run.result is not None:
        r = run.result
        diverged = " diverged=True" if is_diverged(r) else ""
        lines.append(f"  result: test_acc={r['test_accuracy']:.4f} best_epoch={r['best_epoch']} epochs={r['epochs']} converged={bool(r['converged'])}{diverged} time={r['seconds']:.1f}s")
    alignment = run.alignment()
    if alignment is not None and len(alignment["epoch"]) and run.rule != "ebp":
        first, last = (int(alignment["epoch"][index]) for index in (0, -1))
        layers = ", ".join(f"{name} {values[0]:.3f} → {values[-1]:.3f}" for name, values in alignment.items() if name != "epoch")
        lines.append(f"  feedback alignment (cosine of fb and ff weights), epoch {first} → {last}: {layers}")
    if run.sessions and run.sessions[0].get("from_epoch") != 0:
        lines.append(f"  sessions before epoch {run.sessions[0].get('from_epoch')}: not recorded (agrel-sim 0.2.0 or older)")
    lines += [f"  session {number}: {_session_line(entry, run.backend)}" for number, entry in enumerate(run.sessions, 1)]
    trials = run.trials()
    if len(trials["delta"]):
        if run.rule == "ebp":
            rpe = "no RPE (EBP)"
        elif np.isnan(trials["delta"]).all():
            rpe = "no finite RPE (the run diverged)"
        else:
            rpe = f"RPE mean {np.nanmean(trials['delta']):+.4f}"
        lines.append(f"  logged trials: {len(trials['delta'])}; {rpe}, rewarded {np.mean(trials['action'] == trials['label']):.3f}")
    else:
        lines.append("  logged trials: none")
    return "\n".join(lines)


def _session_line(entry: dict, backend: str) -> str:
    """One training session of a run in a line: where it began and what it ran on."""
    commit = entry.get("commit")
    source = f" (commit {str(commit)[:10]}{', modified' if entry.get('modified') else ''})" if commit else ""
    engine = f"brian2 {entry.get('brian2', '?')}" if backend == "brian2" else f"torch {entry.get('torch', '?')} on {entry.get('device', '?')} ({entry.get('torch_threads', '?')} thread{'' if entry.get('torch_threads') == 1 else 's'})"
    return f"from epoch {entry.get('from_epoch', '?')}, began {entry.get('began', '?')}, agrel-sim {entry.get('agrel_sim', '?')}{source}, {engine}, host {entry.get('host', '?')}"


# -- figures -----------------------------------------------------------------------------------

def _figure(**options):
    """A matplotlib Figure with constrained layout, made without pyplot, so that drawing one
    neither changes the caller's matplotlib backend nor keeps the figure open in pyplot."""
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **options)


LABELS = {"deepagrel": "DeepAGREL: reward probability", "ebp": "EBP: 1 − training error"}


FIGURE3_COLUMNS = 4  # panels in a line of Figure 3: the whole Table 1 (22 rows) in 6 lines


def plot_reward_curves(runs: list[Run], path: str | Path | None = None):
    """Figure 3 (:func:`reward_curves`): reward probability per epoch, mean ± 2σ over runs, per
    rule; a panel per Table 1 row, :data:`FIGURE3_COLUMNS` panels a line. The legend says how
    many runs the first and the last epoch average; no band is drawn where fewer than 2 runs
    remain.

    Parameters
    ----------
    runs : list of Run
        The runs, as :func:`reward_curves` takes them (:func:`figure3_runs` picks them).
    path : str or Path or None
        The image file to write, its format named by its suffix; missing folders are made; ``None`` (default):
        write nothing and return the Figure, to show (in a notebook) or to change.

    Returns
    -------
    Path or matplotlib.figure.Figure
        The file written, or, where ``path`` is None, the Figure.

    Raises
    ------
    ValueError
        Where ``runs`` holds anything but :class:`Run` objects, or the file cannot be written.
    RunFileError
        Where :func:`table_rows` refuses the runs.
    """
    curves = reward_curves(runs)
    panels = max(1, len(curves))
    columns = min(panels, FIGURE3_COLUMNS)
    lines = -(-panels // columns)
    fig = _figure(figsize=(6 * columns, 4 * lines))
    axes = fig.subplots(lines, columns, squeeze=False)
    for ax in axes.flat[panels:]:  # the last line's empty places
        ax.set_axis_off()
    if not curves:
        axes[0, 0].text(0.5, 0.5, "no complete run", ha="center", transform=axes[0, 0].transAxes)
    for ax, (row, rules) in zip(axes.flat, curves.items()):
        for rule, curve in rules.items():
            ax.plot(curve["epoch"], curve["mean"], marker="o", markersize=3, label=f"{LABELS.get(rule, rule)} ({_run_counts(curve['runs'])})")
            ax.fill_between(curve["epoch"], curve["mean"] - curve["two_sigma"], curve["mean"] + curve["two_sigma"], alpha=0.25)  # NaN 2σ: a gap
        ax.set(xlabel="epoch", ylabel="reward probability (mean ± 2σ of 2 or more runs)", title=row_label(row), ylim=(0, 1.01))
        _epoch_axis(ax)
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _epoch_axis(ax) -> None:
    """Whole epochs on the x axis, also where it spans less than one (a run of one epoch)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _run_counts(runs: np.ndarray) -> str:
    """'n=4' where every run reached the last epoch, else 'n=4 at epoch 1, 2 at epoch 5'."""
    first, last = int(runs[0]), int(runs[-1])
    return f"n={first}" if first == last else f"n={first} at epoch 1, {last} at epoch {len(runs)}"


def plot_gating(run: Run, path: str | Path | None = None):
    """Fraction of open gates and mean |fb| per hidden layer, and fraction of synapses changed
    per layer, the output's too, over epochs.

    Dropout layers are left out: their records show the columns of the layer below. So is the
    output from the first two panels: its gates are always open and its |fb| is the chosen
    action's one-hot signal, constants that would flatten the hidden layers' scale.

    Parameters
    ----------
    run : Run
        A loaded run.
    path : str or Path or None
        The image file to write; missing folders are made; ``None`` (default):
        write nothing and return the Figure, to show (in a notebook) or to change.

    Returns
    -------
    Path or matplotlib.figure.Figure
        The file written, or, where ``path`` is None, the Figure.

    Raises
    ------
    ValueError
        Where the file cannot be written.
    """
    stats = gating_by_epoch(run)
    hidden = hidden_layers(run)
    synaptic = hidden + [name for name in stats if name == "output"]
    panels = (("open_fraction", "fraction of open gates", hidden), ("fb_mean_abs", "mean |feedback|", hidden), ("changed_fraction", "fraction of synapses changed per batch", synaptic))
    fig = _figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    for ax, (quantity, title, names) in zip(axes, panels):
        for name in names:
            ax.plot(stats[name]["epoch"], stats[name][quantity], marker="o", markersize=3, color=f"C{synaptic.index(name)}", label=name)
        ax.set(xlabel="epoch", title=title)
        _epoch_axis(ax)
        if not any(np.isfinite(stats[name][quantity]).any() for name in names):
            ax.text(0.5, 0.5, _empty_gating_panel(run, names), ha="center", transform=ax.transAxes)
            ax.set(xticks=[], yticks=[])
    if axes[2].lines:
        axes[2].legend(fontsize=7)
    dropout = "; dropout layers left out (they show the columns below them)" if len(synaptic) < len(stats) else ""
    fig.suptitle(f"Gating over training: {run.config['experiment']} seed {run.seed}\n(output in the last panel only: its gates are always open{dropout})", fontsize=10)
    return _save(fig, path)


def _empty_gating_panel(run: Run, names: list[str]) -> str:
    """Why a panel of :func:`plot_gating` has no line."""
    if not len(run.epochs["epoch"]):
        return "no finished epoch"
    if not names:
        return "no hidden column layer"
    return "no feedback (EBP)"  # the one record that holds only NaN where there are epochs and layers


def plot_alignment(run: Run, path: str | Path | None = None):
    """Per layer with weights, the cosine similarity of its feedback and feedforward weights over epochs.

    Drawn from :meth:`Run.alignment`, from epoch 0, the weights the run started with:
    independent feedback with weight decay rises towards 1, tied and reciprocal feedback stay
    at 1. A run without finite alignment (EBP, a run file of layout 4 or older) gets a panel
    that says why.

    Parameters
    ----------
    run : Run
        A loaded run.
    path : str or Path or None
        The image file to write; missing folders are made; ``None`` (default):
        write nothing and return the Figure, to show (in a notebook) or to change.

    Returns
    -------
    Path or matplotlib.figure.Figure
        The file written, or, where ``path`` is None, the Figure.

    Raises
    ------
    ValueError
        Where the file cannot be written.
    """
    alignment = run.alignment()
    names = [] if alignment is None else [name for name in alignment if name != "epoch"]
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.set(xlabel="epoch", ylabel="cosine similarity of ff and fb weights", ylim=(-1.05, 1.05))
    _epoch_axis(ax)
    if any(np.isfinite(alignment[name]).any() for name in names):
        for index, name in enumerate(names):
            ax.plot(alignment["epoch"], alignment[name], marker="o", markersize=3, color=f"C{index}", label=name)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, _empty_alignment_panel(run, alignment), ha="center", transform=ax.transAxes)
        ax.set(xticks=[], yticks=[])
    feedback = "EBP" if run.rule == "ebp" else f"{run.config['model']['rule'].get('feedback', 'tied')} feedback"
    fig.suptitle(f"Feedback aligned with feedforward weights:\n{run.config['experiment']} seed {run.seed} ({feedback})", fontsize=10)
    return _save(fig, path)


def _empty_alignment_panel(run: Run, alignment: dict | None) -> str:
    """Why :func:`plot_alignment` draws no line."""
    if alignment is None:
        return "not recorded (a run file of layout 4 or older)"
    if not len(alignment["epoch"]):  # a new file has the row of epoch 0: this one was of layout 4
        return "not recorded before the run file's resume from layout 4,\nand no epoch finished since"
    return "no feedback weights (EBP)" if run.rule == "ebp" else "no finite alignment (the run diverged)"


def plot_rpe_distribution(run: Run, path: str | Path | None = None, bins: int = 40):
    """Histogram of the RPE δ of logged trials in the first, middle and last thirds of training
    (its epochs split as evenly as they go; a run of 1 or 2 epochs has 1 or 2 parts),
    over the range of every finite δ logged.

    Parameters
    ----------
    run : Run
        A loaded run.
    path : str or Path or None
        The image file to write; missing folders are made; ``None`` (default):
        write nothing and return the Figure, to show (in a notebook) or to change.
    bins : int
        How many histogram bins span that range (40 by default).

    Returns
    -------
    Path or matplotlib.figure.Figure
        The file written, or, where ``path`` is None, the Figure.

    Raises
    ------
    ValueError
        Where the file cannot be written.
    """
    trials = run.trials()
    delta, epoch = trials["delta"], trials["epoch"]
    finite = np.isfinite(delta)
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    if not len(delta):
        ax.text(0.5, 0.5, "no logged trials", ha="center", transform=ax.transAxes)
    elif run.rule == "ebp":
        ax.text(0.5, 0.5, "no RPE: this rule has none (EBP)", ha="center", transform=ax.transAxes)
    elif not finite.any():
        ax.text(0.5, 0.5, "no finite RPE (the run diverged)", ha="center", transform=ax.transAxes)
    else:
        span = (delta[finite].min(), delta[finite].max())  # every δ drawn, on bins that the parts share
        parts = [epochs for epochs in np.array_split(np.arange(1, int(epoch.max()) + 1), 3) if len(epochs)]  # fewer than 3 in a short run
        names = {1: ("all",), 2: ("early", "late"), 3: ("early", "middle", "late")}[len(parts)]
        for name, epochs in zip(names, parts):
            mask = np.isin(epoch, epochs) & finite
            if mask.any():
                which = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}–{epochs[-1]}"
                ax.hist(delta[mask], bins=bins, range=span, histtype="step", density=True, label=f"{name} ({which})")
        ax.legend()
    ax.set(xlabel="RPE δ = r − q_s", ylabel="density", title="Distribution of the dopamine-like RPE")
    return _save(fig, path)


def plot_activity_maps(run: Run, path: str | Path | None = None, trials: int = 4):
    """ff activity, fb activity and gate of the sampled units of each layer, for the last logged
    trials; a dropout layer's row (named so) shows the columns of the layer below it as learning
    saw them, the dropped ones silent.

    Parameters
    ----------
    run : Run
        A loaded run.
    path : str or Path or None
        The image file to write; missing folders are made; ``None`` (default):
        write nothing and return the Figure, to show (in a notebook) or to change.
    trials : int
        How many of the last logged trials to draw, one row each, at least 1 (4 by default).

    Returns
    -------
    Path or matplotlib.figure.Figure
        The file written, or, where ``path`` is None, the Figure.

    Raises
    ------
    ValueError
        For a ``trials`` that is not an integer of at least 1, or where the file cannot be
        written.
    """
    if not is_count(trials):
        raise ValueError(f"trials: expected an integer >= 1, got {shown(trials, count=True)}")
    names = run.layer_names
    dropout = {name for name in names if name.startswith("layers.")} - set(hidden_layers(run))
    last = slice(-trials, None)  # read no more than is drawn
    logged = run.trials(last)
    count = len(logged["label"])
    fig = _figure(figsize=(10, 1.3 * len(names) + 1))
    axes = fig.subplots(len(names), 3, squeeze=False)
    for row, name in enumerate(names):
        layer = run.layer(name, last)
        for col, quantity in enumerate(("ff", "fb", "gate")):
            data = layer[quantity] if count else np.zeros((1, len(layer["units"])))
            reach = (float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 0.0) or 1.0
            scale = {
                "ff": dict(cmap="viridis"),
                "fb": dict(cmap="coolwarm", vmin=-reach, vmax=reach),  # white at zero
                "gate": dict(cmap="gray", vmin=0, vmax=1),  # black closed, white open, in every layer
            }[quantity]
            image = axes[row, col].imshow(data, aspect="auto", interpolation="nearest", **scale)
            fig.colorbar(image, ax=axes[row, col], fraction=0.05, pad=0.02)
            axes[row, col].set_yticks(range(len(data)))
            axes[row, col].set_yticklabels([f"a={a} l={l}" for a, l in zip(logged["action"], logged["label"])] if count else [""], fontsize=6)
            axes[row, col].set_xticks([])
            if row == 0:
                axes[row, col].set_title(quantity)
        axes[row, 0].set_ylabel(f"{name}\n(dropout)" if name in dropout else name, fontsize=7)
    fig.suptitle("Activity of sampled columns (rows: trials, a = action, l = label; columns: units)")
    return _save(fig, path)


def plot_trial_timecourse(run: Run, path: str | Path | None = None, index: int = -1, units: int = 6):
    """One traced trial unfolding in time (Brian2 backend), its phases shaded.

    Per population above the input (whose ff activity is the image, clamped through the
    trial), but the dropout layers (:func:`hidden_layers`, whose traces show the columns below
    them): the ff and fb activity of the ``units`` columns whose ff activity varies most over
    the trial, in the output always with the chosen action's unit (black) and the Q-values it
    was chosen from; then the dopamine signal δ and the fraction of open gates per hidden layer.
    The title names the trial's label, action and reward (run files of layouts before 4 lack
    them).

    Parameters
    ----------
    run : Run
        A run with time courses (Brian2 backend, ``trace_every`` > 0).
    path : str or Path or None
        The image file to write; its suffix names the format (``.png``, ``.pdf``, ``.svg``); ``None`` (default):
        write nothing and return the Figure, to show (in a notebook) or to change.
    index : int
        Which traced trial (:meth:`Run.timecourse`): 0 the first, -1 (default) the last.
    units : int
        How many columns to draw per population, at least 1.

    Returns
    -------
    Path or matplotlib.figure.Figure
        The file written, or, where ``path`` is None, the Figure.

    Raises
    ------
    ValueError
        For a ``units`` that is not an integer of at least 1, or where the file cannot be written.
    TypeError, IndexError, RunFileError
        As :meth:`Run.timecourse` raises them for ``index``, or for a run without time courses.
    """
    if not is_count(units):
        raise ValueError(f"units: expected an integer >= 1, got {shown(units, count=True)}")
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    course = run.timecourse(index)
    t_ms = course["t"] * 1000
    names = [name for name in course["populations"] if name == "output" or name in hidden_layers(run)]
    fig = _figure(figsize=(12, 1.9 * (len(names) + 1) + 1.2))
    axes = fig.subplots(len(names) + 1, 2, sharex=True, squeeze=False)
    for row, name in enumerate(names):
        population = course["populations"][name]
        chosen = course["action"] if name == "output" else None
        columns = _most_varying_columns(population["ff"], units, keep=chosen)
        for unit in columns:
            style = dict(color="k", lw=2) if unit == chosen else dict(lw=1)
            label = f"column {unit}" if name != "output" else f"action {unit}" + (" (chosen)" if unit == chosen else "")
            axes[row, 0].plot(t_ms, population["ff"][:, unit], label=label, **style)
            axes[row, 1].plot(t_ms, population["fb"][:, unit], **style)
        if name == "output" and course["q"] is not None:  # read at the end of the stimulus phase
            axes[row, 0].plot(np.full(len(columns), course["phases"]["stimulus"][1] * 1000), course["q"][columns], "x", color="k", label="Q-values read")
        axes[row, 0].set_ylabel(name)
        axes[row, 1].legend(*axes[row, 0].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    axes[0, 0].set_title("feedforward activity y")
    axes[0, 1].set_title("feedback activity fb")
    axes[-1, 0].plot(t_ms, course["delta"], color="k")
    axes[-1, 0].set_ylabel("dopamine δ = r − q_s")
    for name in names[:-1]:
        axes[-1, 1].plot(t_ms, course["populations"][name]["gate"].mean(axis=1), label=name)
    if len(names) > 1:
        axes[-1, 1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        axes[-1, 1].text(0.5, 0.5, "no hidden layer", ha="center", transform=axes[-1, 1].transAxes)
    axes[-1, 1].set(ylabel="fraction of open gates", ylim=(0, 1.02))
    shades = [colormaps["Pastel1"](i) for i in range(len(course["phases"]))]
    for ax in axes.flat:
        for (start, end), shade in zip(course["phases"].values(), shades):
            ax.axvspan(start * 1000, end * 1000, color=shade, alpha=0.4, lw=0)
    for ax in axes[-1]:
        ax.set_xlabel("time in trial (ms)")
    phases = [Patch(color=shade, alpha=0.4, label=f"{phase} {start * 1000:g}–{end * 1000:g} ms") for (phase, (start, end)), shade in zip(course["phases"].items(), shades)]
    fig.legend(handles=phases, loc="outside lower center", ncol=len(phases), fontsize=8, title="phases of the trial", title_fontsize=8)
    outcome = "label, action and reward not recorded (a run file of an older layout)" if course["action"] is None else f"label {course['label']}, action {course['action']}, reward {course['reward']:g}"
    fig.suptitle(f"{run.config['experiment']} seed {run.seed}: trial {course['trial']} (epoch {course['epoch']}, batch {course['batch']}); {outcome}", fontsize=10)
    return _save(fig, path)


def _most_varying_columns(activity: np.ndarray, count: int, keep: int | None = None) -> list[int]:
    """The ``count`` columns of ``activity`` (steps, columns) whose activity spans the widest
    range over the trial, in index order; ``keep``, where given, is one of them."""
    spans = np.ptp(activity, axis=0)
    others = [int(unit) for unit in np.argsort(-spans, kind="stable") if unit != keep]
    return sorted(([] if keep is None else [keep]) + others[: count - (keep is not None)])


def _save(fig, path: str | Path | None):
    """Write ``fig`` to ``path`` and return the path; return ``fig`` itself where ``path`` is None."""
    if path is None:
        return fig
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)  # laid out by the figure's constrained layout
    except OSError as error:
        why = in_the_way(path.parent) or error.strerror or error
        raise ValueError(f"{path}: cannot write this figure ({why}); check that {path.parent} is, or can be made, a writable folder, or give another --out") from None
    return path


def analyze(path: str | Path, out: str | Path, trial: int | None = None) -> tuple[str, list[Path]]:
    """Summaries of every run under ``path`` and its figures in ``out``; returns (text, figure paths).

    Each run's figures go into the folder of ``out`` that lies where the run's folder lies
    under ``path`` (``out`` itself for a run file given alone), named
    ``<experiment>_seed<N>_<figure>.png``: runs of one experiment and seed in two folders keep
    their figures apart. ``reward_curves.png`` (Figure 3, :func:`plot_reward_curves`) averages
    the complete runs, as Table 1 does; a Table 1 row whose runs :func:`table_rows` refuses gets
    no panel, and the text says why. ``trial`` picks the traced trial drawn for Brian2 runs
    (:meth:`Run.timecourse`; ``None``, the default, the last): a run with fewer traced trials
    gets no trial figure, and a line of the text says so; ``ValueError`` where none has that
    trial, or where a trial is given and no run here is traced.

    Parameters
    ----------
    path : str or os.PathLike
        A run file, or a folder of runs searched below (:func:`load_runs`).
    out : str or os.PathLike
        The folder the figures are written into; missing folders are made.
    trial : int or None
        Which traced trial to draw for runs with time courses: 0 the first, -1 the last;
        ``None`` (default) the last.

    Returns
    -------
    text : str
        Per run its :func:`summary` and :func:`outcome_lines`, then the notes of
        :func:`figure3_runs` and a line per traced run without the trial ``trial``.
    figures : list of Path
        The figures written: ``reward_curves.png`` where Figure 3 draws any run, then per run
        its gating, alignment, RPE, activity and (where it has the trial) trial figures.

    Raises
    ------
    TypeError
        For a ``trial`` that is not an integer.
    ValueError
        For a ``trial`` that no run here has, or where a figure cannot be written.
    RunFileError
        Where :func:`load_runs` refuses ``path``.
    RunChangedError
        Where a run's file is replaced :data:`READ_ATTEMPTS` times while it is read.
    """
    if trial is not None:
        _check_trial_index("trial", trial)
    path, out = Path(path), Path(out)
    runs = load_runs(path)
    traced = {run.path: _consistently(run, lambda run: run.traced_trials) for run in runs}
    # Both checked before any figure is written.
    if trial is not None and not any(traced.values()):
        raise ValueError(
            f"trial {trial}: no run here has traced trials; only Brian2 runs trained with trace_every > 0 in [backend_options] have them; leave out --trial to analyse these runs"
        )
    trial = -1 if trial is None else trial
    if any(traced.values()) and not any(-count <= trial < count for count in traced.values()):
        raise ValueError(f"trial {trial}: no run here has that traced trial (the traced runs here have {' or '.join(map(str, sorted(set(traced.values()) - {0})))} traced trials); give 0 to n - 1, or -n to -1 from the last")
    root = path if path.is_dir() else path.parent
    drawn, notes = figure3_runs(runs)
    figures = [plot_reward_curves(drawn, out / "reward_curves.png")] if drawn else []  # the notes say why not
    texts, no_trial_figure = [], []
    for run in runs:
        folder = out / run.path.parent.relative_to(root)
        run_texts, run_figures, note = _consistently(run, lambda run: _analyze_run(run, folder, trial))
        texts += run_texts
        figures += run_figures
        no_trial_figure += note
    return "\n".join(texts + notes + no_trial_figure), figures


def _analyze_run(run: Run, folder: Path, trial: int) -> tuple[list[str], list[Path], list[str]]:
    """One run's part of :func:`analyze`: its summary lines, its figures in ``folder``, and a
    line where it has no traced trial ``trial``."""
    stem = f"{run.config['experiment']}_seed{run.seed}"
    texts = [summary(run), *outcome_lines(run)]
    figures = [
        plot_gating(run, folder / f"{stem}_gating.png"),
        plot_alignment(run, folder / f"{stem}_alignment.png"),
        plot_rpe_distribution(run, folder / f"{stem}_rpe.png"),
        plot_activity_maps(run, folder / f"{stem}_activity.png"),
    ]
    traced = run.traced_trials
    if -traced <= trial < traced:
        return texts, [*figures, plot_trial_timecourse(run, folder / f"{stem}_trial.png", index=trial)], []
    return texts, figures, [f"{run.path}: no trial figure: trial {trial} is out of range for its {traced} traced trials"] if traced else []


READ_ATTEMPTS = 5  # loads of a run whose file is replaced while it is read (its run still training)


def _consistently(run: Run, read):
    """``read(run)``, with ``run`` loaded again where its file was replaced meanwhile (a run
    still training replaces it after every epoch): what ``read`` gets is of one version."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read(run)
        except RunChangedError:
            if attempt == READ_ATTEMPTS:
                raise RunChangedError(f"{run.path}: the run file was replaced {READ_ATTEMPTS} times while it was read (its epochs take less time than its analysis); analyse it once it has finished") from None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IncompleteRunWarning)  # said when it was first loaded
                run = load_run(run.path)


def figure3_runs(runs: list[Run]) -> tuple[list[Run], list[str]]:
    """The runs that Figure 3 can draw (:func:`in_figure3`, of rows whose complete runs :func:`table_rows` accepts, diverged ones included),
    and a line for each run or row left out, saying why.

    Parameters
    ----------
    runs : list of Run
        The runs to draw, of any Table 1 rows.

    Returns
    -------
    drawn : list of Run
        The runs in Figure 3, row after row in the order of their row keys.
    notes : list of str
        The lines that name the incomplete and the diverged runs left out, and each row that
        :func:`table_rows` refuses, with its error.
    """
    notes = []
    incomplete = [str(run.path) for run in runs if not averaged(run)]
    if incomplete:
        notes.append(f"Figure 3 leaves out {len(incomplete)} incomplete run(s), as Table 1 does (still running, killed or crashed): {', '.join(incomplete)}")
    ran_off = [str(run.path) for run in runs if averaged(run) and is_diverged(run.result)]
    if ran_off:
        notes.append(f"Figure 3 leaves out {len(ran_off)} diverged run(s), as Table 1 leaves them out of its accuracies and epochs (a lower learning rate may help): {', '.join(ran_off)}")
    rows: dict[tuple, list[Run]] = {}
    for run in runs:
        if averaged(run):  # diverged runs too: table_rows checks them as Table 1 does
            rows.setdefault(row_key(run.config), []).append(run)
    drawn = []
    for row, group in sorted(rows.items()):
        try:
            table_rows(group)
        except RunFileError as error:
            notes.append(f"Figure 3 has no panel for the Table 1 row {row_label(row)}: {error}")
        else:
            drawn += [run for run in group if in_figure3(run)]
    return drawn, notes
