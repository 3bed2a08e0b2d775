"""One run of an experiment with one seed, in a run folder.

A run folder holds the run file ``run.h5`` (see :mod:`agrel_sim.recorder`), replaced by an
edited copy after every epoch and marked complete when the run has ended cleanly, and
``checkpoint.pt``, written atomically after every epoch, just after the run file;
``resume=True`` continues a run from it. ``run.lock`` is locked while a process trains in the
folder, so that a second process (a sweep submitted twice, say) cannot write to the same run;
the operating system releases the lock when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import torch

from agrel_sim.backends import NOT_MODELLING_OPTIONS, REMOVED_OPTIONS, check_device, resolved_options
from agrel_sim.config import ConfigError, check_instance, home_expanded, in_the_way, is_count, shown
from agrel_sim.datasets import EMBEDDED, load_dataset
from agrel_sim.experiment import Experiment, training_table
from agrel_sim.recorder import LogSettings, RunFile, check_resumable, damaged_run_file, parse_sessions, records_that_disagree, result_problem, stored_config, true_or_false
from agrel_sim.training import RunResult, check_fits, load_checkpoint, train

RUN_FILE = "run.h5"
CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = "run.lock"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MAX_SEED = 2**32 - 1  # the usual 32-bit range; well inside what torch generators take (seed + 2 is used)
# What h5py raises for a damaged file: OSError, or, for a damaged object in the file, KeyError or
# RuntimeError ("bad symbol table node signature"), TypeError or ValueError for one of another
# kind, AttributeError for one it returns as None
DAMAGED_FILE_ERRORS = (OSError, KeyError, RuntimeError, TypeError, ValueError, AttributeError)


def default_run_folder(experiment: Experiment, seed: int, root: str | os.PathLike = "runs") -> Path:
    """``runs/<experiment>/seed<N>``.

    Parameters
    ----------
    experiment : Experiment
        The experiment; its ``name`` names the folder.
    seed : int
        The run's seed.
    root : str or os.PathLike
        The folder that holds the experiments' folders (default ``runs``).

    Returns
    -------
    Path
        ``root / experiment.name / f"seed{seed}"``.
    """
    return Path(root) / experiment.name / f"seed{seed}"


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether the run folder holds a run file marked complete.

    Parameters
    ----------
    folder : str or os.PathLike
        The run folder.

    Returns
    -------
    bool
        True where ``folder / RUN_FILE`` opens and its ``complete`` attribute is true; False
        where it is missing, unreadable or damaged (a ``complete`` that is not a boolean included).
    """
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as handle:
            return true_or_false(handle.attrs.get("complete", False))
    except DAMAGED_FILE_ERRORS:  # ValueError for a complete of another kind
        return False


def missing_folders(folder: Path) -> list[Path]:
    """The folders on the way to ``folder``, itself included, that do not exist yet: innermost first.

    Parameters
    ----------
    folder : Path
        A folder to be made.

    Returns
    -------
    list of Path
        ``folder`` and its parents that do not exist, innermost first.
    """
    return [path for path in (folder, *folder.parents) if not path.exists()]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders``, innermost first, as far as they are empty: best effort, as other
    processes (runs of a sweep) may be making or removing the same folders. rmdir raises once a
    folder is not empty, or already gone.

    Parameters
    ----------
    folders : list of Path
        Folders to remove, innermost first (as :func:`missing_folders` lists them).
    """
    with contextlib.suppress(OSError):
        for path in folders:
            path.rmdir()


@contextlib.contextmanager
def locked(folder: Path):
    """Hold the run folder's lock, or raise if another process holds it.

    Folders made here are removed again if the run fails before writing anything into them
    (missing data files, say), so a failed start leaves no empty run folder behind (a parent
    folder that runs starting at the same moment share may stay, empty).

    Parameters
    ----------
    folder : Path
        The run folder; made, with its parents, where missing.

    Raises
    ------
    ValueError
        Where the folder cannot be made or written in, or another process holds its lock.
    """
    blocked = in_the_way(folder)
    if blocked:
        raise ValueError(f"{folder}: cannot make the run folder, as {blocked}; choose another --out")
    made = missing_folders(folder)
    for _ in range(5):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            break
        except FileNotFoundError as error:  # a parent just removed by another run's failed start (below), in a sweep: make it again
            missing = error
            continue
        except OSError as error:  # a file in the way, no permission, a read-only disk
            raise ValueError(f"{folder}: cannot make the run folder ({error.strerror}); choose another --out") from None
    else:
        raise ValueError(f"{folder}: cannot make the run folder ({missing.strerror}, five times: its parent folders keep disappearing, or folders cannot be made there); choose another --out")
    with holding_lock(
        folder / LOCK_FILE, made,
        busy=f"{folder}: another process is training in this run folder; wait for it to end or choose another --out",
        unwritable=(f"{folder}: cannot write in the run folder", "make it writable or choose another --out"),
    ):
        yield


@contextlib.contextmanager
def holding_lock(lock_file: Path, made: list[Path], busy: str, unwritable: tuple[str, str]):
    """Hold ``lock_file`` locked (the system releases it when the process ends, however it ends).

    Raises ``ValueError``: ``busy`` where another process holds it, and ``"{unwritable[0]}
    (reason); {unwritable[1]}"`` where it cannot be opened. Where the block raises, a lock file
    made here is removed again, and so are the folders ``made`` (innermost first, as
    :func:`missing_folders` lists them) that are then empty.

    Parameters
    ----------
    lock_file : Path
        The lock file, created where missing.
    made : list of Path
        Folders made for this lock, innermost first, to remove again if the block fails.
    busy : str
        The message where another process holds the lock.
    unwritable : tuple of (str, str)
        The message's beginning and its advice where the lock file cannot be opened.

    Raises
    ------
    ValueError
        Where another process holds the lock or the lock file cannot be opened.
    """
    existed = lock_file.exists()
    try:
        lock = open(lock_file, "w")
    except OSError as error:
        raise ValueError(f"{unwritable[0]} ({error.strerror}); {unwritable[1]}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(busy) from None
        try:
            yield
        except BaseException:
            if not existed:  # best effort: the block's own error must be the one raised
                with contextlib.suppress(OSError):
                    lock_file.unlink()
            remove_empty_folders(made)
            raise


def flatten(value, prefix: str = "") -> dict:
    """Nested dicts and lists as ``{"a.b[0].c": leaf}``, with ``"len(a.list)"`` for each list.

    Parameters
    ----------
    value : dict, list or object
        The nested value; anything else than a dict or list is a leaf.
    prefix : str
        The key of ``value`` itself ("" at the top).

    Returns
    -------
    dict
        Flattened key to leaf value (and ``len(...)`` keys to list lengths).
    """
    if isinstance(value, dict):
        items = ((f"{prefix}.{key}" if prefix else key, item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{prefix}[{index}]", item) for index, item in enumerate(value))
    else:
        return {prefix: value}
    leaves = {f"len({prefix})": len(value)} if isinstance(value, list) else {}
    for key, item in items:
        leaves.update(flatten(item, key))
    return leaves


# Settings added since the first run files, with the value that runs written before them
# behaved as (a constant learning rate, the torch backend, ...).
ADDED_SETTINGS = {"training.lr_decay_factor": 1.0, "training.lr_decay_patience": 10, "backend": "torch", "logging.summary_trials": 20}


def top_setting(key: str) -> str:
    """The top-level setting of a flattened key: ``model`` for ``model.layers[0].units`` or ``len(model.layers)``.

    Parameters
    ----------
    key : str
        A key of :func:`flatten`.

    Returns
    -------
    str
        The key's first part.
    """
    return re.split(r"[.[]", key.removeprefix("len(").removesuffix(")"), maxsplit=1)[0]


def shown_leaf(leaves: dict, key: str) -> str:
    """``repr(leaves[key])``, or ``absent``: a value in a message about two settings.

    Parameters
    ----------
    leaves : dict
        A flattened configuration (:func:`flatten`).
    key : str
        One of its keys, or a key it lacks.

    Returns
    -------
    str
        The value's ``repr``, or ``"absent"``.
    """
    return repr(leaves[key]) if key in leaves else "absent"


# The backend options of agrel-sim 0.3.0 and older where their experiment gave none: the run
# files of those versions hold only the options given; later ones hold every option of their
# version (gate_threshold up to 0.4.0: see agrel_sim.backends.REMOVED_OPTIONS).
EARLIER_BACKEND_DEFAULTS = {
    "torch": {},
    "brian2": {
        "tau_ff": 10.0, "tau_fb": 10.0, "dt": 1.0, "t_stimulus": 100.0, "t_selection": 20.0, "t_feedback": 80.0, "t_rpe": 10.0,
        "t_plasticity": 10.0, "gate_threshold": 1e-3, "codegen_target": "numpy", "trace_every": 0,
    },
}


def settings_of(config: dict, software_version: str | None = None) -> dict:
    """A run configuration, flattened, with :data:`ADDED_SETTINGS` where it lacks them, and the
    device ``cpu:0`` named ``cpu``.

    ``software_version`` is the agrel-sim that wrote it (a run file's ``software_version``;
    None: this one). Where that is 0.3.0 or older, or unknown, whose run files hold only the
    backend options given, the other options get their :data:`EARLIER_BACKEND_DEFAULTS`.

    Parameters
    ----------
    config : dict
        A run configuration (:func:`run_config`, possibly with ``seed`` and ``logging``).
    software_version : str or None
        The agrel-sim version that wrote it; None: this one.

    Returns
    -------
    dict
        The flattened settings (:func:`flatten`).
    """
    backend = config.get("backend", ADDED_SETTINGS["backend"])
    if "backend_options" in config and software_version is not None and _before_every_option(software_version):
        config = {**config, "backend_options": {**EARLIER_BACKEND_DEFAULTS.get(backend, {}), **config["backend_options"]}}
    settings = {**ADDED_SETTINGS, **flatten(config)}
    if settings.get("device") == "cpu:0":  # torch's other name for the CPU, which check_device accepts
        settings["device"] = "cpu"
    return settings


def _before_every_option(software_version: str) -> bool:
    """Whether run files of agrel-sim ``software_version`` hold only the backend options given:
    0.3.0 and older, or a version they do not name."""
    try:
        return tuple(int(part) for part in software_version.split(".")) <= (0, 3, 0)
    except ValueError:
        return True


# Settings in which finished runs may differ and still count as the same run: where the
# experiment file lies, and how a run is computed (device, Brian2's code generation) or recorded.
NOT_MODELLING = ("source", "device", "logging", *(f"backend_options.{name}" for name in NOT_MODELLING_OPTIONS))


# Records that run files written before them, and a sweep's plan (which reads no data), lack: they
# are compared only where both sides have them.
RECORDED_IF_KNOWN = ("data",)


def changed_settings(before: dict, now: dict) -> list[str]:
    """The keys of two flattened configurations whose values differ.

    A record of :data:`RECORDED_IF_KNOWN` that one side lacks altogether is unknown there, so it
    is not counted as a difference.

    Parameters
    ----------
    before, now : dict
        Two flattened configurations (:func:`settings_of`).

    Returns
    -------
    list of str
        The differing keys, sorted; a key one side lacks counts as differing.
    """
    def has(leaves, top):
        return any(top_setting(key) == top for key in leaves)

    unknown = {top for top in RECORDED_IF_KNOWN if not (has(before, top) and has(now, top))}
    return [key for key in sorted(before.keys() | now.keys()) if top_setting(key) not in unknown and before.get(key) != now.get(key)]


# Settings that may be raised when a run is continued: a run stopped by a patience or an epoch
# limit continues exactly as an uninterrupted run with the higher one would have gone on.
STOPPING = ("training.patience", "training.max_epochs")


def run_config(experiment: Experiment, device: str = "cpu", dtype: str = "float32", data: dict | None = None) -> dict:
    """The settings of a run of ``experiment`` (stored in its run file with the logging settings).

    ``data`` is the :meth:`~agrel_sim.datasets.Dataset.fingerprint` of the data the run trains
    on, recorded as ``data`` when given.

    Parameters
    ----------
    experiment : Experiment
        The experiment.
    device : str
        The device the run computes on.
    dtype : {"float32", "float64"}
        The floating-point type by name.
    data : dict or None
        The data's fingerprint, or None to record none.

    Returns
    -------
    dict
        ``experiment``, ``source``, ``dataset``, ``model``, ``training``, ``backend``,
        ``backend_options`` (every option, resolved), ``device``, ``dtype`` and, when given,
        ``data``.
    """
    config = {
        "experiment": experiment.name, "source": experiment.source, "dataset": experiment.dataset,
        "model": experiment.model.to_dict(), "training": dataclasses.asdict(experiment.training),
        "backend": experiment.backend, "backend_options": resolved_options(experiment.backend, experiment.backend_options), "device": device, "dtype": dtype,
    }
    return config if data is None else {**config, "data": data}


def experiment_of(config: dict, software_version: str | None = None, source: str = "<config>") -> Experiment:
    """The experiment of a run configuration as a run file stores it: the inverse of
    :func:`run_config`.

    Settings that run files of older agrel-sim versions lack get the values those runs ran with:
    those of :data:`ADDED_SETTINGS`, and the backend options of :data:`EARLIER_BACKEND_DEFAULTS`
    where ``software_version`` held only the options given.

    Parameters
    ----------
    config : dict
        The run configuration (a run file's ``config`` attribute).
    software_version : str or None
        The agrel-sim that wrote it; None: this one.
    source : str
        Where the configuration came from, for messages and the experiment's ``source``.

    Returns
    -------
    Experiment
        Its ``backend_options`` hold every option of the backend (as the run file does).

    Raises
    ------
    ConfigError
        Where the configuration lacks the model or training settings (a run file made by a
        :class:`~agrel_sim.recorder.RunFile` in Python holds only the settings it was given), or
        a setting is not one of an experiment of this agrel-sim (an option since removed).
    """
    missing = [key for key in ("training", "model") if key not in config]
    if missing:
        raise ConfigError(
            f"{source}: records no {missing[0]} settings, so its experiment cannot be rebuilt (a run file made by a"
            " RunFile in Python holds only the settings it was given; agrel-sim train and run_experiment record them all)"
        )
    backend = config.get("backend", ADDED_SETTINGS["backend"])
    options = config.get("backend_options", {})
    if software_version is not None and _before_every_option(software_version):
        options = {**EARLIER_BACKEND_DEFAULTS.get(backend, {}), **options}
    table = {
        "name": config["experiment"], "model": config["model"], "dataset": config["dataset"], "training": training_table(config["training"]),
        "backend": backend, "backend_options": options, "logging": config.get("logging", {}),
    }
    return Experiment.from_dict(table, source)


def check_same_run(path: Path, config: dict, seed: int, ignore: tuple[str, ...] = ("source",), resuming: bool = True) -> bool:
    """Refuse to continue the run in ``path`` with another seed or other settings than it began with.

    A run continued under other settings (another seed draws another validation split, say) or
    on other data (another copy of the data set, whose fingerprint differs) would be a mixture
    that no uninterrupted run produces. Settings in ``ignore``, top-level ones with everything
    below them or flattened keys (``backend_options.trace_every``), may differ: by default only
    ``source``, the path the experiment was read from, so that a moved checkout resumes its
    runs. The stopping criterion (:data:`STOPPING`) may be raised, never lowered. With
    ``resuming``, the run file must also be of a layout this version continues
    (:data:`agrel_sim.recorder.RESUMABLE_LAYOUTS`).

    Parameters
    ----------
    path : Path
        The run file.
    config : dict
        The settings now, as a run file stores them (:func:`agrel_sim.recorder.stored_config`).
    seed : int
        The seed now.
    ignore : tuple of str
        Top-level settings or flattened keys that may differ.
    resuming : bool
        Also check that the run file's layout can be continued
        (:func:`agrel_sim.recorder.check_resumable`).

    Returns
    -------
    bool
        Whether the stopping criterion was raised.

    Raises
    ------
    ValueError
        For a missing, unreadable or damaged run file, one made with a removed backend option,
        settings (other than those ignored) that differ, a lowered stopping criterion, or, with
        ``resuming``, a layout that cannot be continued.
    """
    try:
        with h5py.File(path, "r") as handle:
            attrs = dict(handle.attrs)
            before = settings_of({"seed": int(attrs["seed"]), **json.loads(attrs["config"])}, str(attrs.get("software_version", "unknown")))
    except DAMAGED_FILE_ERRORS as error:  # also a config attribute that is not JSON (ValueError)
        raise ValueError(
            f"{path}: the run file of this checkpoint is missing, unreadable or damaged ({type(error).__name__}: {error});"
            " move the run folder away and train the run again"
        ) from None
    if resuming:
        check_resumable(path, attrs)
    now = settings_of(json.loads(json.dumps({"seed": seed, **config})))
    changed = [key for key in changed_settings(before, now) if top_setting(key) not in ignore and key not in ignore]
    raised = [key for key in changed if key in STOPPING and key in before and key in now and now[key] > before[key]]
    differences = [f"{key}: {shown_leaf(before, key)} in the run, {shown_leaf(now, key)} now" for key in changed if key not in raised]
    removed = [f"{key}, {REMOVED_OPTIONS[option]}" for key in changed if (option := key.removeprefix("backend_options.")) in REMOVED_OPTIONS]
    if removed:
        raise ValueError(
            f"{path}: made with an option that this agrel-sim no longer has: {'; '.join(removed)}. This agrel-sim can neither continue"
            " the run nor count it as a run of the experiment now: train it again in another --out"
        )
    if differences:
        raise ValueError(
            f"{path}: cannot continue this run with other settings than it began with ("
            + "; ".join(differences) + "); continue it with the same experiment, seed, options and data (a longer patience"
            " or more epochs may be given), or choose another --out"
        )
    return bool(raised)


def check_readable(path: Path) -> None:
    """Raise unless ``path`` opens as a run file of agrel-sim, so that a run file that cannot be
    read now (no permission, held open for writing by another program, damaged), or another
    HDF5 file, is never taken for one with nothing in it and overwritten.

    Parameters
    ----------
    path : Path
        The run file.

    Raises
    ------
    ValueError
        Where it cannot be opened or read whole, or lacks the attributes ``layout_version``
        and ``config``.
    """
    try:
        with h5py.File(path, "r") as handle:
            attrs = set(handle.attrs)
            handle.visititems(lambda name, item: None)  # opens every group and dataset: damaged groups raise here, before the run writes
    except DAMAGED_FILE_ERRORS as error:
        raise ValueError(
            f"{path}: cannot read this run file ({error}); check its permissions and that no other program holds it open,"
            " or, if it is damaged, move the run folder away and train again"
        ) from None
    if not {"layout_version", "config"} <= attrs:  # a run file is written whole, with these attributes, or not at all
        raise ValueError(f"{path}: an HDF5 file but not a run file of agrel-sim (it lacks the layout_version and config attributes); move it away or choose another --out")


def check_records_readable(path: Path) -> None:
    """Raise unless every record of the run file ``path`` reads back. Opening a dataset reads
    none of its data, and HDF5 checks a chunk only as it reads it: a run that went on from a
    file damaged there would carry the damage into every later copy, and end "complete".

    Parameters
    ----------
    path : Path
        The run file.

    Raises
    ------
    ValueError
        Naming the record that cannot be read (see :func:`~agrel_sim.recorder.damaged_run_file`).
    """
    reading = "its structure"

    def read(name, item):
        nonlocal reading
        if isinstance(item, h5py.Dataset) and item.size:
            reading = f"/{name}"
            for chunk in item.iter_chunks() if item.chunks else [()]:
                item[chunk]

    try:
        with h5py.File(path, "r") as handle:
            handle.visititems(read)
    except DAMAGED_FILE_ERRORS as error:
        raise damaged_run_file(path, f"cannot read {reading}: {error}") from None


def recorded_epochs(path: Path) -> int:
    """How many epochs the run file records (0 for an HDF5 file that records none).

    Parameters
    ----------
    path : Path
        The run file.

    Returns
    -------
    int
        The rows of ``/epochs/epoch``.

    Raises
    ------
    ValueError
        Where the file cannot be read or is damaged.
    """
    try:
        with h5py.File(path, "r") as handle:
            return int(handle["epochs"]["epoch"].shape[0]) if "epochs/epoch" in handle else 0
    except DAMAGED_FILE_ERRORS as error:  # AttributeError: a group where the epochs' dataset should be
        raise ValueError(f"{path}: cannot read the epochs of this run file, it is damaged ({type(error).__name__}: {error}); move the run folder away and train the run again") from None


def stored_result(folder: Path) -> RunResult:
    """The result that a complete run stored in its run file (without its epochs' history).

    Raises ValueError, naming the run file, where its ``/result`` is missing or no possible
    result of its epochs (:func:`agrel_sim.recorder.result_problem`).

    Parameters
    ----------
    folder : Path
        The run folder.

    Returns
    -------
    RunResult
        From the ``/result`` attributes, with an empty ``history``.

    Raises
    ------
    ValueError
        Where the run file is missing or damaged or its ``/result`` is missing or no possible
        result of its epochs.
    """
    path = folder / RUN_FILE
    try:
        with h5py.File(path, "r") as handle:
            stored, epochs = dict(handle["result"].attrs), len(handle["epochs"]["epoch"])
    except DAMAGED_FILE_ERRORS as error:
        raise damaged_run_file(path, error) from None
    problem = result_problem(stored, epochs)
    if problem:
        raise damaged_run_file(path, problem)
    return RunResult(
        float(stored["test_accuracy"]), int(stored["best_epoch"]), int(stored["epochs"]), bool(stored["converged"]),
        float(stored["seconds"]), diverged=bool(stored.get("diverged", False)),
    )


def resume_plan(folder: Path, config: dict, seed: int) -> tuple[str, dict | None]:
    """What resuming the run folder does, for a run with ``config`` (as stored) and ``seed``.

    Parameters
    ----------
    folder : Path
        The run folder.
    config : dict
        The run's settings as a run file stores them (:func:`agrel_sim.recorder.stored_config`).
    seed : int
        The run's seed.

    Returns
    -------
    plan : str
        ``"start"``: there is nothing finished to continue (no run file, or a run killed before
        its first checkpoint, with at most one epoch recorded), so the run starts afresh.
        ``"finished"``: the run is complete and was made with these settings (on whatever
        device, in whatever run-file layout).
        ``"continue"``: an interrupted run, or a finished one whose patience or epoch limit is
        now higher, goes on from its checkpoint.
    checkpoint : dict or None
        The checkpoint to continue from (:func:`load_checkpoint`), for ``"continue"`` only.

    Raises
    ------
    ValueError
        For a run that cannot go on with these settings: other settings or a lowered stopping
        criterion, other data, another device, an older run-file layout or checkpoint, a damaged
        checkpoint, a run file with a record that cannot be read (to go on, every record is
        read: :func:`check_records_readable`), a run with finished epochs whose checkpoint is
        gone, or a checkpoint whose run file is.
    """
    path, checkpoint = folder / RUN_FILE, folder / CHECKPOINT_FILE
    if not path.exists() and not checkpoint.is_file():
        return "start", None
    if path.exists():
        check_readable(path)
    if is_complete(folder):
        if not check_same_run(path, config, seed, ignore=NOT_MODELLING, resuming=False):
            return "finished", None
        if not checkpoint.is_file():
            raise ValueError(f"{path}: this run is complete and its checkpoint {checkpoint.name} is gone, so it cannot go on; train it again in a new folder")
    elif not checkpoint.is_file():
        # The checkpoint of epoch 1 is written just after that epoch's record, so without one the
        # run file holds at most that epoch, unless the checkpoint was removed.
        epochs = recorded_epochs(path)
        if epochs > 1:
            raise ValueError(f"{path}: {epochs} finished epochs but no {checkpoint.name}, so the run cannot go on; restore the checkpoint, or move the folder away and train again")
        return "start", None
    check_same_run(path, config, seed)
    state = load_checkpoint(checkpoint)  # raises for a damaged or an older checkpoint
    check_checkpoint_of_run(path, state)
    check_records_readable(path)
    return "continue", state


def threads_of_epoch(path: Path, epoch: int) -> int | None:
    """The torch threads of the training session of the run file ``path`` that trained epoch
    ``epoch`` (the last one that began before it, :func:`~agrel_sim.recorder.session`), not of a
    later session that kept nothing; None where the file does not say (agrel-sim 0.2.0 and
    older). The thread count orders torch's sums on the CPU: a run goes on from its checkpoint
    bit for bit only with the count that trained the checkpoint's epoch.

    Parameters
    ----------
    path : Path
        The run file.
    epoch : int
        The epoch, from 1 (a checkpoint's ``epoch``).

    Returns
    -------
    int or None
        The session's ``torch_threads``; None where the file does not say.
    """
    with h5py.File(path, "r") as handle:
        sessions = parse_sessions(handle.attrs.get("sessions", "[]"))
    trained = [entry for entry in sessions if entry.get("from_epoch", 0) < epoch]
    return trained[-1].get("torch_threads") if trained else None


def check_checkpoint_of_run(path: Path, state: dict) -> None:
    """Raise ValueError unless the run file ``path`` records every epoch of the checkpoint
    ``state``, with the same validation accuracies and training losses: a run file restored from
    an older copy, or another run's checkpoint, would go on into a run that no training made.

    Parameters
    ----------
    path : Path
        The run file.
    state : dict
        The checkpoint (:func:`agrel_sim.training.load_checkpoint`); its ``history`` is compared.

    Raises
    ------
    ValueError
        Where the run file is damaged (its records disagreeing on their rows included), records
        fewer epochs than the checkpoint, or records another epoch number, validation accuracy
        or training loss for one of them.
    """
    try:
        with h5py.File(path, "r") as handle:
            disagree = records_that_disagree(handle)
            recorded = {name: handle["epochs"][name][:] for name in ("epoch", "validation_accuracy", "train_loss")}
    except DAMAGED_FILE_ERRORS as error:
        raise damaged_run_file(path, error) from None
    if disagree:
        raise damaged_run_file(path, "; ".join(disagree))
    history = state["history"]
    fix = "restore the run file and the checkpoint of one moment, or move the run folder away and train the run again"
    if len(recorded["epoch"]) < len(history):
        raise ValueError(f"{path}: records {len(recorded['epoch'])} epochs, but its checkpoint {CHECKPOINT_FILE} has finished {len(history)}; {fix}")
    for row, metrics in enumerate(history):
        for name, recorded_values in recorded.items():
            if not np.array_equal(recorded_values[row], metrics[name], equal_nan=True):
                raise ValueError(
                    f"{path}: epoch {metrics['epoch']} of its checkpoint {CHECKPOINT_FILE} ({name} {metrics[name]!r})"
                    f" is not the one it records ({name} {recorded_values[row].item()!r} in row {row}): the two are of different runs; {fix}"
                )


def run_experiment(
    experiment: Experiment,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    data_dir=None,
    resume: bool = False,
    logging: LogSettings | None = None,
    progress: bool | None = None,
    log=print,
) -> RunResult:
    """Load the data and train one run, recording it in the run folder ``out`` (if given).

    Parameters
    ----------
    experiment : Experiment
        What to run.
    seed : int
        The run's seed, 0 to :data:`MAX_SEED`.
    out : str or os.PathLike or None
        The run folder (a leading ``~`` is the home folder); ``None`` (default) writes no run
        file and no checkpoint.
    device : str
        ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"``.
    dtype : {"float32", "float64"} or torch.dtype
        The floating-point type, by name (a key of :data:`DTYPES`, as the run file stores it) or
        as ``torch.float32`` or ``torch.float64``.
    data_dir : str or os.PathLike or None
        Folder of the data sets; ``None``: ``$AGREL_SIM_DATA``, else ``./data``
        (see :func:`agrel_sim.datasets.data_roots`).
    resume : bool
        Continue from the folder's checkpoint (see :func:`resume_plan`), with the settings the
        run began with; ``experiment`` may have a higher patience or epoch limit, and a finished
        run then goes on (its run file takes the new settings); a finished run given its own
        settings is not trained again, and its stored result (without the epochs' history) is
        returned. Without it, a folder that already holds a run file is an error, so that no
        finished work is overwritten.
    logging : LogSettings or None
        What the run file samples; ``None``: the experiment's (its ``[logging]`` table).
    progress : bool or None
        Show a progress bar; ``None``: only when the output is a terminal.
    log : callable or None
        Receives a line on the data, one per epoch, and notes (default ``print``); ``None``: silent.

    Returns
    -------
    RunResult
        The test accuracy of the weights with the best validation accuracy, the epochs and the
        per-epoch history (see :func:`agrel_sim.training.train`).

    Raises
    ------
    ValueError
        For a bad seed, dtype or device, data that are missing or do not fit the model, a run
        folder in use by another process, a run file in ``out`` without ``resume``, or a run
        that cannot go on (see :func:`resume_plan`). The messages are those of ``agrel-sim
        train``: the ``--out`` and ``--resume`` they name are ``out`` and ``resume`` here.
    """
    check_instance("experiment", experiment, Experiment)
    logging = experiment.logging if logging is None else logging
    check_instance("logging", logging, LogSettings)
    check_device(device)
    if not (is_count(seed, 0) and seed <= MAX_SEED):
        raise ValueError(f"seed: expected an integer from 0 to {MAX_SEED}, got {shown(seed, count=True)}")
    if isinstance(dtype, torch.dtype):  # as build and train take it
        dtype = next((name for name, value in DTYPES.items() if value == dtype), dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)} (or torch.float32, torch.float64), got {dtype!r}")
    folder = home_expanded(out, "out") if out is not None else None
    with locked(folder) if folder is not None else contextlib.nullcontext():
        run_file, checkpoint, state = None, None, None
        if folder is not None:
            path, checkpoint = folder / RUN_FILE, folder / CHECKPOINT_FILE
            for item in (path, checkpoint):
                if item.is_dir():
                    raise ValueError(f"{item}: a folder, where the run's {item.name} belongs; move it away, or choose another --out")
            if not resume:
                if path.exists():
                    raise ValueError(f"{path}: a run file exists already; pass --resume to continue the run, or choose another --out")
                if checkpoint.exists():
                    raise ValueError(f"{checkpoint}: a checkpoint without its run file {RUN_FILE}; restore the run file, or choose another --out")
        data = load_dataset(experiment.dataset, data_dir)
        try:
            check_fits(experiment.model, data, experiment.training)
        except ValueError as error:
            raise ValueError(f"{experiment.source}: {error}") from None
        if log is not None:  # a short or padded copy of a data set shows here
            unread = "; an embedded data set, so the data folder given is not read" if data_dir is not None and experiment.dataset in EMBEDDED else ""
            log(f"data {data.name}: {len(data.train_labels):,} training images ({experiment.training.validation_size:,} of them for validation), {len(data.test_labels):,} test images{unread}")
        if folder is not None:
            config = run_config(experiment, device, dtype, data.fingerprint())
            plan, state = resume_plan(folder, stored_config(config, logging), seed) if resume else ("start", None)
            if plan == "finished":  # nothing to train: its result, as a sweep reports a finished run
                result = stored_result(folder)
                if log is not None:
                    log(
                        f"{path}: this run is already complete; its result follows"
                        + (" (it diverged: its training loss is not finite, so it cannot go on; train it again in a new folder, with a lower learning rate)" if result.diverged
                           else " (to go on, raise training.patience or training.max_epochs, e.g. with --patience)")
                    )
                return result
            if resume and plan == "start":
                path.unlink(missing_ok=True)  # a run killed before its first checkpoint: nothing to continue (resume_plan)
                if log is not None:
                    log(f"{folder}: no checkpoint to resume from; starting the run afresh")
            if plan == "continue" and experiment.backend == "torch" and torch.device(device).type == "cpu" and log is not None:
                threads = threads_of_epoch(path, state["epoch"])
                if threads not in (None, torch.get_num_threads()):
                    log(
                        f"{folder}: note: {torch.get_num_threads()} torch threads, where the session that trained its epoch {state['epoch']} had {threads}; the thread count"
                        f" orders torch's sums, so the run goes on, but not bit for bit as it would have (OMP_NUM_THREADS={threads} keeps it so)"
                    )
            resume_after = state["epoch"] if state is not None else None
            run_file = lambda net: RunFile(path, net, config, seed, logging, resume_after)  # noqa: E731
        return train(
            experiment.model, data, experiment.training, seed=seed, device=device, dtype=DTYPES[dtype],
            progress=progress, log=log, run_file=run_file, checkpoint=checkpoint, resume=state,
            backend=experiment.backend, backend_options=experiment.backend_options,
        )
