"""Run files: one HDF5 file per run, written through h5py, readable with plain h5py.

Layout (version :data:`LAYOUT_VERSION`; every dataset but ``/layers/<layer>/units`` and
``/timecourses/t``, which are written once and not compressed, grows along its first axis,
chunked and compressed with gzip and shuffle)::

    /                         attrs: layout_version, software_version, seed, backend, rule,
                                     config (JSON text: the run's settings, see
                                     agrel_sim.runs.run_config, and logging),
                                     complete (False until the run ended cleanly),
                                     sessions (JSON text: a list, one entry per start or
                                     resume, see session)
    /epochs/<metric>          (epochs,)   epoch, reward_probability, train_loss,
                                          validation_accuracy, seconds, learning_rate
    /trials/<field>           (trials,)   epoch, batch, image (index into the training set; with
                                          augmentation, of the image the trial saw a random
                                          transform of), label, action, reward, delta;
                                          q: (trials, actions)
    /layers/<layer>/          attrs: shape (the layer's column sheet)
        units                 (units,)    flat indices of the sampled columns (a dropout
                                          layer: those of the layer below it)
        ff, fb                (trials, units) float32 activity of the ff / fb neurons (fb: NaN
                                          for EBP, which has none)
        gate                  (trials, units) uint8, 1 where the column's gate was open
    /gating/epoch, /gating/batch   (batches,)  every training batch
    /gating/<layer>/open_fraction, fb_mean_abs, changed_fraction   (batches,)  (the first two
                              over the first ``summary_trials`` trials of each batch)
    /alignment/epoch          (rows,)     epoch 0 (the weights a run starts with), then every
                                          finished epoch
    /alignment/<layer>        (rows,)     float64 cosine similarity of the layer's ff and fb
                                          weights at the end of the epoch (layers with
                                          weights: not dropout; NaN for EBP, which has none)
    /timecourses/             time-resolved trials (Brian2 backend; attrs: phase start/end, s)
        t                     (steps,)    time since the trial's start at the end of each
                                          step, s (from dt)
        epoch, batch, trial   (traced,)   which trials were traced (trial: int64, it counts
                                          every trial of the run)
        image, label, action, reward   (traced,)   as in /trials, for the traced trials
        q                     (traced, actions)   the Q-values the action was chosen from
        delta                 (traced, steps)   the dopamine signal
        <population>/ff, fb, gate   (traced, steps, columns), populations "input", layers, "output"
    /result                   attrs: test_accuracy, best_epoch, epochs, converged, diverged, seconds

Every dataset carries the attributes ``description`` and ``unit`` (:data:`DESCRIPTIONS`). Rows
of ``/trials`` and of ``/layers/<layer>/{ff,fb,gate}`` correspond one to one, shaped like the
trials table and TimeSeries of an NWB file (which would also need trial times in seconds).
Nothing is written during an epoch: the epoch's records are buffered (on the training device,
with no host synchronisation per batch) and added at its end to a copy of the file that then
replaces it (an atomic rename), so that a run killed at any moment leaves a file that opens and
holds every finished epoch, and a running run can be read at any time: the run file is never
open for writing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import numbers
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np
import torch

from agrel_sim.config import is_count, shown
from agrel_sim.network import RULES, Dropout
from agrel_sim.table import is_diverged

# 2: /epochs/learning_rate. 3: a column layer below a dropout layer records the gate that
# learning used (active and kept); version 2 recorded its ff activity alone (y > 0) there.
# 4: /timecourses/{image, label, action, reward, q}, and /timecourses/{epoch, batch} int32 as
# in /trials (int64 before). 5: /alignment; a run file of layout 4 gains it when it is resumed.
LAYOUT_VERSION = 5
RESUMABLE_LAYOUTS = (4, LAYOUT_VERSION)
EPOCH_FIELDS = ("epoch", "reward_probability", "train_loss", "validation_accuracy", "seconds", "learning_rate")
TRIAL_FIELDS = ("epoch", "batch", "image", "label", "action", "reward", "delta")
GATING_FIELDS = ("open_fraction", "fb_mean_abs", "changed_fraction")
# Per traced trial (with q and delta): what joins a time course to its trial.
TRACE_FIELDS = {"epoch": "i4", "batch": "i4", "trial": "i8", "image": "i4", "label": "i4", "action": "i4", "reward": "f4"}
_COMPRESSION = dict(compression="gzip", compression_opts=4, shuffle=True)

# What each dataset holds, and its unit ("1" for counts, indices, fractions and other pure
# numbers; "s" for times): written as the attributes description and unit of each dataset, so
# that the file explains itself to a reader with plain h5py. <layer> stands for a recorded
# layer (layers.N, output), <population> for a time-resolved one (input, layers.N, output).
DESCRIPTIONS = {
    "epochs/epoch": ("the epoch, from 1", "1"),
    "epochs/reward_probability": ("share of rewarded training trials in the epoch (EBP: 1 - training error)", "1"),
    "epochs/train_loss": ("mean of delta**2 / 2 over the epoch's training trials (EBP: cross-entropy)", "1"),
    "epochs/validation_accuracy": ("accuracy of the greedy action on the validation images after the epoch", "1"),
    "epochs/seconds": ("wall time of the epoch's training batches and validation", "s"),
    "epochs/learning_rate": ("learning rate of the epoch's updates", "1"),
    "trials/epoch": ("epoch of the logged trial", "1"),
    "trials/batch": ("batch of the logged trial within its epoch, from 0", "1"),
    "trials/image": ("index of the trial's image in the training set (with augmentation, the image that the trial saw a random transform of)", "1"),
    "trials/label": ("the image's class", "1"),
    "trials/action": ("the action chosen", "1"),
    "trials/reward": ("the reward given for the action", "1"),
    "trials/delta": ("reward-prediction error delta = reward - q[action] (NaN for EBP)", "1"),
    "trials/q": ("Q-values the action was chosen from (trials, actions)", "1"),
    "layers/<layer>/units": ("flat indices of the traced columns in the layer's sheet (attribute shape of the group)", "1"),
    "layers/<layer>/ff": ("activity of the feedforward neurons of the traced columns, row for row with /trials", "1"),
    "layers/<layer>/fb": ("activity of the feedback neurons of the traced columns, row for row with /trials (NaN for EBP)", "1"),
    "layers/<layer>/gate": ("1 where the column's gate was open as learning used it (its drive, and so its settled feedforward activity, above 0, and not dropped by a dropout layer above), row for row with /trials", "1"),
    "gating/epoch": ("epoch of the training batch", "1"),
    "gating/batch": ("training batch within its epoch, from 0", "1"),
    "gating/<layer>/open_fraction": ("fraction of the layer's gates open, over the batch's first summary_trials trials", "1"),
    "gating/<layer>/fb_mean_abs": ("mean absolute feedback activity, over the batch's first summary_trials trials", "1"),
    "gating/<layer>/changed_fraction": ("fraction of the layer's feedforward synapses whose update by the batch's learning is not zero, weight decay not counted (NaN for dropout layers)", "1"),
    "alignment/epoch": ("the epoch at whose end the weights were compared (0: before the first update)", "1"),
    "alignment/<layer>": ("cosine similarity of the layer's feedforward weights and its feedback weights arranged as their transpose, over all its synapses, biases excluded (NaN for EBP, which has no feedback weights)", "1"),
    "timecourses/t": ("time from the trial's start at the end of each time step; the group's attributes hold each phase's start and end, in s", "s"),
    "timecourses/epoch": ("epoch of the traced trial", "1"),
    "timecourses/batch": ("batch of the traced trial within its epoch, from 0", "1"),
    "timecourses/trial": ("the traced trial's number among all the run's trials, from 0", "1"),
    "timecourses/image": ("index of the traced trial's image in the training set (with augmentation, the image that the trial saw a random transform of)", "1"),
    "timecourses/label": ("the image's class", "1"),
    "timecourses/action": ("the action chosen", "1"),
    "timecourses/reward": ("the reward given for the action", "1"),
    "timecourses/q": ("Q-values the action was chosen from, read at the end of the stimulus phase (traced, actions)", "1"),
    "timecourses/delta": ("the dopamine signal delta at each time step (traced, steps)", "1"),
    "timecourses/<population>/ff": ("feedforward activity at each time step (traced, steps, columns)", "1"),
    "timecourses/<population>/fb": ("feedback activity at each time step (traced, steps, columns)", "1"),
    "timecourses/<population>/gate": ("1 where the column's gate was open, at each time step (traced, steps, columns)", "1"),
}


def _describe(group: h5py.Group) -> None:
    """Give every dataset in ``group`` the attributes description and unit of :data:`DESCRIPTIONS`."""
    def describe(name: str, item) -> None:
        if isinstance(item, h5py.Dataset):
            parts = item.name.strip("/").split("/")
            if len(parts) == 3:
                parts[1] = "<layer>" if parts[0] in ("layers", "gating") else "<population>"
            elif parts[0] == "alignment" and parts[1] != "epoch":
                parts[1] = "<layer>"
            item.attrs["description"], item.attrs["unit"] = DESCRIPTIONS["/".join(parts)]

    group.visititems(describe)


@dataclass(frozen=True)
class LogSettings:
    """What a run file samples.

    Parameters
    ----------
    every_batches : int
        Trials (``/trials`` and ``/layers``) are logged from every Nth training batch; gating
        summaries, and the time courses of the trials that the Brian2 backend traces (its option
        ``trace_every``), from every batch.
    trials_per_batch : int
        How many trials of such a batch are logged.
    max_units : int
        Layers with more columns are recorded in ``/layers`` on a fixed random subset of this
        many (drawn by the run's seed); Brian2 time courses hold every column.
    summary_trials : int
        The per-batch fractions of open gates and mean |fb| are taken over the first this many
        trials of every batch (all columns); the fraction of changed synapses covers the batch.
    """

    every_batches: int = 50
    trials_per_batch: int = 10
    max_units: int = 128
    summary_trials: int = 20

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not is_count(value):
                raise ValueError(f"logging.{name}: expected an integer >= 1, got {shown(value, count=True)}")


def stored_config(config: dict, settings: LogSettings) -> dict:
    """The configuration a run file stores (``/`` attribute ``config``): the experiment's and the logging's.

    Parameters
    ----------
    config : dict
        The run's settings (:func:`agrel_sim.runs.run_config`).
    settings : LogSettings
        What the run file samples.

    Returns
    -------
    dict
        ``config`` with the key ``logging`` set to ``settings`` as a dict.
    """
    return {**config, "logging": asdict(settings)}


def config_problem(config, version: int = LAYOUT_VERSION) -> str | None:
    """What a run file's ``config`` lacks of what the analyses (:mod:`agrel_sim.analysis`) read.

    Parameters
    ----------
    config : object
        The configuration (the parsed ``/`` attribute ``config``).
    version : int
        The run file's layout version (version 1 has no ``/epochs/learning_rate``: its rule's
        rate is read instead).

    Returns
    -------
    str or None
        What is missing or wrong, in words that follow "its config ..."; None where nothing is.
    """
    def lacks(value, names: str, kind) -> bool:
        for name in names.split("."):
            value = value.get(name) if isinstance(value, dict) else None
        return not isinstance(value, kind)

    if not isinstance(config, dict):
        return "lacks every setting"
    required = [("experiment", str), ("dataset", str), ("model.name", str), ("model.layers", list), ("model.rule", dict)]
    if "training" in config:  # a run file made in Python (RunFile) need not have one
        required.append(("training", dict))
        if isinstance(config["training"], dict) and config["training"].get("augmentation") is not None:
            required.append(("training.augmentation.factor", numbers.Integral))
    if version == 1:  # its learning rates are the rule's
        required.append(("model.rule.learning_rate", numbers.Real))
    for names, kind in required:
        if lacks(config, names, kind):
            return f"lacks {names} (or holds another kind of value)"
    for index, layer in enumerate(config["model"]["layers"]):
        if lacks(layer, "kind", str):
            return f"lacks model.layers[{index}].kind (or holds another kind of value)"
    if config["model"]["rule"].get("name") not in RULES:
        return f"names no rule of agrel-sim ({', '.join(RULES)}) in model.rule.name"
    return None


def session(device: torch.device, from_epoch: int) -> dict:
    """What one training session of a run (its start, or a resume) ran on.

    Parameters
    ----------
    device : torch.device
        The device the network computes on.
    from_epoch : int
        The last epoch finished before this session: 0 for a start.

    Returns
    -------
    dict
        ``from_epoch``; ``began`` (UTC, ISO 8601); the versions of ``agrel_sim``, ``python``
        and the packages that compute or write (``numpy``, ``torch``, ``h5py``, ``brian2``,
        None where Brian2 is not installed); ``commit`` and ``modified``
        (:func:`git_checkout`); ``device`` (on CUDA with the GPU's name and the CUDA and cuDNN
        versions), ``torch_threads``, ``platform`` and ``host``.
    """
    from agrel_sim import __version__

    device = torch.device(device)
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
    try:
        brian2 = metadata.version("brian2")  # the Brian2 backend imports it; torch runs need not
    except metadata.PackageNotFoundError:
        brian2 = None
    return {
        "from_epoch": from_epoch,
        "began": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "agrel_sim": __version__,
        **git_checkout(Path(__file__).resolve()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "h5py": h5py.__version__,
        "brian2": brian2,
        "device": name,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "host": platform.node(),
    }


def parse_sessions(text: str) -> list[dict]:
    """Read the ``sessions`` attribute of a run file.

    Parameters
    ----------
    text : str
        The attribute: JSON text, a list of objects (:func:`session`).

    Returns
    -------
    list of dict
        One entry per training session, in order.

    Raises
    ------
    ValueError
        Where ``text`` is not JSON or not a list of objects.
    """
    sessions = json.loads(text)
    if not (isinstance(sessions, list) and all(isinstance(entry, dict) for entry in sessions)):
        raise ValueError(f"expected a JSON list of objects, got {text[:80]!r}")
    return sessions


# Variables that would point git at another repository than the one holding the file.
_GIT_LOCATION = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR")


def git_checkout(source: Path) -> dict:
    """The git commit of the checkout that holds a file, and whether it is modified.

    Parameters
    ----------
    source : Path
        A file (agrel-sim's own, for :func:`session`).

    Returns
    -------
    dict
        ``commit`` (the checkout's HEAD) and ``modified`` (whether tracked files differ from
        it; untracked files do not count). Both None where git cannot say: git does not track
        ``source`` (an installed package, also in a virtual environment inside a clone), git
        is missing, or git refuses the checkout (one owned by another user).
    """
    environment = {key: value for key, value in os.environ.items() if key not in _GIT_LOCATION}

    def git(*arguments) -> str | None:
        try:  # --no-optional-locks: git status leaves the index alone, not to block the user's git
            done = subprocess.run(["git", "--no-optional-locks", "-C", str(source.parent), *arguments], capture_output=True, text=True, timeout=10, env=environment)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", source.name) is None:
        return {"commit": None, "modified": None}
    commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip() if commit else None, "modified": None if changes is None else bool(changes.strip())}


def whole_layout_version(value) -> int:
    """A run file's ``layout_version`` attribute.

    Parameters
    ----------
    value : object
        The attribute as HDF5 gives it (a NumPy integer).

    Returns
    -------
    int
        ``value``.

    Raises
    ------
    ValueError
        Unless ``value`` is a whole number from 1; the message shows it.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{np.asarray(value).tolist()!r}, where a whole number from 1 belongs")  # 5.7, not np.float64(5.7)
    return int(value)


def true_or_false(value) -> bool:
    """A run file's ``complete`` attribute.

    Parameters
    ----------
    value : object
        The attribute as HDF5 gives it (a NumPy boolean).

    Returns
    -------
    bool
        ``value``.

    Raises
    ------
    ValueError
        Unless ``value`` is a boolean; the message shows it.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{np.asarray(value).tolist()!r}, where true or false belongs")
    return bool(value)


def result_problem(result: dict, epochs: int) -> str | None:
    """What makes a run file's ``/result`` no possible result of a run that recorded ``epochs`` epochs.

    Parameters
    ----------
    result : dict
        The attributes of ``/result``.
    epochs : int
        The rows of ``/epochs``.

    Returns
    -------
    str or None
        Such as ``"/result holds no possible result (test_accuracy = 2.0)"``; None for a possible result.
    """
    kinds = {"test_accuracy": numbers.Real, "best_epoch": numbers.Integral, "epochs": numbers.Integral, "converged": (bool, np.bool_), "seconds": numbers.Real}
    wrong = [name for name, kind in kinds.items() if not isinstance(result.get(name), kind)]
    if not wrong and not (0 <= result["test_accuracy"] <= 1 or np.isnan(result["test_accuracy"]) and is_diverged(result)):
        wrong = ["test_accuracy"]  # NaN only where the run diverged in its first epoch: no weights to test
    if not wrong and result["epochs"] != epochs:
        return f"/result says {result['epochs']} epochs, but /epochs records {epochs}"
    if not wrong and not 0 <= result["best_epoch"] <= result["epochs"]:
        wrong = ["best_epoch", "epochs"]
    if wrong:
        values = ", ".join(f"{name} = {result.get(name, 'missing')}" for name in wrong)
        return f"/result holds no possible result ({values})"
    return None


def check_resumable(path: Path, attrs) -> None:
    """Refuse to continue a run file (its ``/`` attributes ``attrs``) that this version cannot.

    A run file of another layout would mix two layouts, but for layout 4, which lacks only
    ``/alignment``: it gains that group as it is resumed. A Brian2 run begun by another version
    of agrel-sim would match no uninterrupted run: the Brian2 backend's trials are not kept
    identical from one version to the next (the torch backend's are).

    Parameters
    ----------
    path : Path
        The run file, for the messages.
    attrs : mapping
        Its ``/`` attributes (``h5py`` attributes or a dict of them).

    Raises
    ------
    ValueError
        For a ``layout_version`` that is not a whole number from 1 or not one of
        :data:`RESUMABLE_LAYOUTS` (:data:`LAYOUT_VERSION`, and 4, whose run file gains
        ``/alignment`` as it is resumed), a ``complete`` that is not a boolean, a Brian2 run
        begun by another version of agrel-sim, or a ``sessions`` attribute that
        :func:`parse_sessions` refuses.
    """
    from agrel_sim import __version__

    for name, convert in (("layout_version", whole_layout_version), ("complete", true_or_false)):
        try:
            convert(attrs.get(name, False))
        except ValueError as error:
            raise ValueError(f"{path}: bad {name} attribute ({error}); the run file is damaged: move the run folder away and train the run again") from None
    version = int(attrs["layout_version"])
    if version not in RESUMABLE_LAYOUTS:
        raise ValueError(f"{path}: run-file layout version {version}, but this agrel-sim writes {LAYOUT_VERSION}; it cannot resume the run: start it again in a new folder")
    began = str(attrs.get("software_version", "unknown"))
    if str(attrs.get("backend", "torch")) == "brian2" and began != __version__:
        raise ValueError(f"{path}: a Brian2 run begun by agrel-sim {began} cannot be continued by agrel-sim {__version__}, whose Brian2 trials may differ; start it again in a new folder")
    try:
        parse_sessions(attrs.get("sessions", "[]"))  # none in files of agrel-sim 0.2.0 and older
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{path}: bad sessions attribute ({error}); to resume all the same, delete it"
            " (h5py: del run.attrs['sessions']), which forgets what the earlier sessions ran on"
        ) from None


def _append(dataset: h5py.Dataset, rows: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize(start + len(rows), axis=0)
    dataset[start:] = rows


def _growing(group: h5py.Group, name: str, dtype, width: int | None = None, chunk_rows: int = 1024) -> None:
    shape, maxshape, chunks = ((0,), (None,), (chunk_rows,)) if width is None else ((0, width), (None, width), (max(1, chunk_rows // 8), width))
    group.create_dataset(name, shape=shape, maxshape=maxshape, chunks=chunks, dtype=dtype, **_COMPRESSION)


def records_that_disagree(file: h5py.File) -> list[str]:
    """What in a run file (damaged, or edited by hand) breaks its layout's rules on rows: a
    group that is not one, and records whose rows do not match those they go with (those of
    ``/epochs``; of ``/trials`` and each layer's ff, fb and gate; of ``/gating`` and each
    layer's summaries; of ``/alignment``, where the file has it). Empty for a sound file;
    ``/timecourses`` is not checked.

    Parameters
    ----------
    file : h5py.File
        The open run file.

    Returns
    -------
    list of str
        One line per problem, naming the datasets or groups; empty for a sound file.
    """
    problems = []

    def groups(*paths: str) -> list[h5py.Group]:
        found = [file.get(path) for path in paths]
        problems.extend(f"/{path} is not a group" for path, item in zip(paths, found) if not isinstance(item, h5py.Group))
        return [item for item in found if isinstance(item, h5py.Group)]

    def datasets(parents: list[h5py.Group], names=None) -> list[h5py.Dataset]:
        return [parent[name] for parent in parents for name in (names or parent) if isinstance(parent.get(name), h5py.Dataset)]

    layers = [name for parent in groups("layers") for name in parent]
    families = [
        datasets(groups("epochs")),
        datasets(groups("trials")) + datasets(groups(*(f"layers/{name}" for name in layers)), ("ff", "fb", "gate")),
        datasets(groups("gating"), ("epoch", "batch")) + datasets(groups(*(f"gating/{name}" for name in layers))),
    ]
    if "alignment" in file:  # since layout 5
        families.append(datasets(groups("alignment")))
    for family in families:
        rows = {dataset.name: dataset.shape[0] if dataset.ndim else None for dataset in family}
        counts = list(rows.values())
        usual = max(counts, key=counts.count, default=None)
        like = next((name for name, count in rows.items() if count == usual), None)
        problems += [f"{name} has {count} rows where {like} has {usual}" for name, count in rows.items() if count != usual]
    return problems


def damaged_run_file(path: Path, error: Exception) -> ValueError:
    """The error for a run file ``path`` that HDF5 finds damaged (``error``) as a run goes on; the caller raises it.

    Parameters
    ----------
    path : Path
        The run file.
    error : Exception or str
        What HDF5 reported (or a description of the damage), quoted in the message.

    Returns
    -------
    ValueError
        The error, naming ``path`` and saying to train the run again.
    """
    return ValueError(f"{path}: the run file is damaged ({error}); move the run folder away and train the run again")


# The free space that an edit of the run file asks for, beyond a copy of the file: more than any epoch adds.
SPARE_SPACE = 64 * 2**20


@contextlib.contextmanager
def _unraisable_errors_about(path: Path, caught: list):
    """Collect in ``caught``, not print, the errors about ``path`` that Python cannot raise: h5py
    meets a failed write (a full disk) as it frees a dataset, where it cannot raise."""
    previous = sys.unraisablehook

    def hook(report):
        if str(path) in str(report.exc_value):
            caught.append(report.exc_value)
        else:
            previous(report)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


class RunFile:
    """Writes one run's records into an HDF5 file.

    Parameters
    ----------
    path : Path
        The run file (HDF5) to create, or to reopen with ``resume_after``.
    net : TorchNetwork or Brian2Network
        The built network (its layers name the groups; its ``backend`` is stored; its
        ``trials_run`` places each traced trial in its batch).
    config : dict
        The run's settings, stored as JSON text: :func:`agrel_sim.runs.run_config` makes them
        for an experiment. In Python, ``experiment`` and ``dataset`` (names) are enough: the
        network's ``model`` (its description's ``to_dict()``) and ``backend`` are added where
        not given, and must be the network's where given.
    seed : int
        The run's seed, stored as the attribute ``seed``; it also draws the sampled columns.
    settings : LogSettings
        What the run file samples.
    resume_after : int or None
        Reopen an existing file and drop whatever it holds beyond this epoch (records of an
        epoch that the checkpoint does not cover), instead of creating a new file. The file
        then stores ``config`` (a run continued with a longer patience, say) and no result until
        the run ends again.

    Raises
    ------
    ValueError
        Naming the file: for a folder or a missing folder at ``path``, a file there already
        (without ``resume_after``), a file that cannot be written, or, with ``resume_after``, a
        file that cannot be continued (another layout, records missing or disagreeing); naming
        ``config``, for settings that lack what the analyses read or that are not the network's.
    """

    def __init__(self, path: Path, net, config: dict, seed: int, settings: LogSettings = LogSettings(), resume_after: int | None = None):
        self.path = Path(path)
        self.settings = settings
        self.net = net
        self.layer_names = [layer.name for layer in net.layers]
        self.aligned_layers = [layer.name for layer in net.layers if layer.has_weights]
        self.file = None  # the partial copy, while an edit is open
        if config.get("backend", net.backend) != net.backend:
            raise ValueError(f"config: backend {config['backend']!r}, but the network was built by the {net.backend!r} backend")
        model = net.description.to_dict()
        if json.loads(json.dumps(config.get("model", model))) != json.loads(json.dumps(model)):
            raise ValueError("config: its model is not the description the network was built from; leave it out (the network's is stored) or give net.description.to_dict()")
        config = {**config, "model": model, "backend": net.backend}
        problem = config_problem(config)
        if problem:
            raise ValueError(f"config: it {problem}, which the analyses read; give at least experiment and dataset (names), or make it with agrel_sim.runs.run_config")
        if self.path.is_dir():
            raise ValueError(f"{self.path}: a folder; give the path of the run file to write, such as {self.path / 'run.h5'}")
        if not self.path.parent.is_dir():
            raise ValueError(f"{self.path}: there is no folder {self.path.parent} to write the run file in; make it first")
        if resume_after is None and self.path.exists():
            raise ValueError(f"{self.path}: a run file is there already; give resume_after to continue its run, or remove it (or write to another path) to start one")
        with self._editing(create=resume_after is None):
            if resume_after is None:
                self._create(net, config, seed)
            else:
                check_resumable(self.path, self.file.attrs)
                if self.file.attrs["layout_version"] == 4:  # its rows begin with the epochs trained from now on
                    if "alignment" in self.file:
                        raise damaged_run_file(self.path, "layout version 4, which has no /alignment, but the file has one")
                    self._create_alignment()
                    self.file.attrs["layout_version"] = LAYOUT_VERSION
                self._check_records()
                self._truncate_after(resume_after)
                self.file.attrs["config"] = json.dumps(stored_config(config, settings))
                self.file.attrs["complete"] = False
                if "result" in self.file:
                    del self.file["result"]
                before = parse_sessions(self.file.attrs.get("sessions", "[]"))
                self.file.attrs["sessions"] = json.dumps([*before, session(net.device, resume_after)])
                _describe(self.file)  # a file of agrel-sim 0.3.0 lacks the descriptions
            self.units = {name: torch.from_numpy(self.file["layers"][name]["units"][:]).to(net.device) for name in self.layer_names}
        self._new_epoch_buffers()

    @contextlib.contextmanager
    def _editing(self, create: bool = False):
        """Edit a copy of the run file and replace the file with it: at no moment is the run
        file itself half written, wherever the process is killed."""
        partial = self.path.with_name(self.path.name + ".partial")
        failed_writes = []
        try:
            # HDF5 can fail to write without an error and then crash as it closes the file: a
            # full disk is better found before.
            needed = (0 if create else self.path.stat().st_size) + SPARE_SPACE
            free = shutil.disk_usage(self.path.parent).free
            if free < needed:
                raise OSError(errno.ENOSPC, f"{free / 2**20:.1f} MiB free on its disk, below the {needed / 2**20:.1f} MiB that writing it asks for: a copy of the file and {SPARE_SPACE // 2**20} MiB to spare")
            largest = resource.getrlimit(resource.RLIMIT_FSIZE)[0]  # the shell's ulimit -f
            if largest != resource.RLIM_INFINITY and largest < needed:
                raise OSError(errno.EFBIG, f"the limit on the size of a file (ulimit -f) is {largest / 2**20:.1f} MiB, below the {needed / 2**20:.1f} MiB that writing it may reach: the file and {SPARE_SPACE // 2**20} MiB to spare")
            if not create:
                shutil.copyfile(self.path, partial)
            try:
                with _unraisable_errors_about(partial, failed_writes), h5py.File(partial, "w" if create else "a") as self.file:
                    yield
            except RuntimeError as error:  # h5py, as it closes a file whose writes failed (a disk quota, say)
                if error.__context__ is not None:  # the edit itself failed first: its error, not the close's
                    raise error.__context__ from None
                if "errno = " not in str(error):
                    raise
                failed_writes.append(error)
            self.file = None
            if failed_writes:  # HDF5's message names the system's error, its errno, and much else
                reason = re.search(r"error message = '([^']*)'", str(failed_writes[0]))
                raise OSError(errno.EIO, f"writing its new copy failed: {reason[1] if reason else failed_writes[0]}")
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(partial, self.path)
        except OSError as error:
            if error.errno is None:  # HDF5's own failures, such as a chunk that fails its checksum
                raise damaged_run_file(self.path, error) from None
            remedy = "raise the limit on the size of a file (ulimit -f)" if error.errno == errno.EFBIG else "make the run folder writable or free space"
            raise ValueError(  # no permission, a full or read-only disk, a file-size limit
                f"{self.path}: cannot write the run file ({error}); {remedy},"
                " then train again with --resume, which keeps the epochs already written"
            ) from None
        finally:  # after a failure, a copy or half a copy (the space it takes may be what is missing)
            with contextlib.suppress(OSError):
                partial.unlink()

    def _create(self, net, config: dict, seed: int) -> None:
        from agrel_sim import __version__

        attrs = self.file.attrs
        attrs["layout_version"] = LAYOUT_VERSION
        attrs["software_version"] = __version__
        attrs["seed"] = seed
        attrs["backend"] = net.backend
        attrs["rule"] = net.description.rule.name
        attrs["config"] = json.dumps(stored_config(config, self.settings))
        attrs["complete"] = False
        attrs["sessions"] = json.dumps([session(net.device, 0)])
        epochs = self.file.create_group("epochs")
        for name in EPOCH_FIELDS:
            _growing(epochs, name, "i4" if name == "epoch" else "f8", chunk_rows=256)
        trials = self.file.create_group("trials")
        for name in TRIAL_FIELDS:
            _growing(trials, name, "f4" if name in ("reward", "delta") else "i4")
        _growing(trials, "q", "f4", net.description.n_actions)
        gating = self.file.create_group("gating")
        _growing(gating, "epoch", "i4")
        _growing(gating, "batch", "i4")
        layers = self.file.create_group("layers")
        pick = torch.Generator().manual_seed(seed)
        units = None
        for layer, shape, kind in zip(net.layers, net.description.layer_shapes()[1:], [*net.description.layers, None]):
            size = int(np.prod(shape))
            if not isinstance(kind, Dropout):  # a dropout layer's record shows the columns of the layer below it
                units = torch.arange(size) if size <= self.settings.max_units else torch.randperm(size, generator=pick)[: self.settings.max_units].sort().values
            group = layers.create_group(layer.name)
            group.attrs["shape"] = list(shape)
            group.create_dataset("units", data=units.numpy().astype(np.int64))
            for name, dtype in (("ff", "f4"), ("fb", "f4"), ("gate", "u1")):
                _growing(group, name, dtype, len(units))
            summary = gating.create_group(layer.name)
            for name in GATING_FIELDS:
                _growing(summary, name, "f4")
        self._create_alignment()
        self._write_alignment(0)
        _describe(self.file)

    def _create_alignment(self) -> None:
        alignment = self.file.create_group("alignment")
        _growing(alignment, "epoch", "i4", chunk_rows=256)
        for name in self.aligned_layers:
            _growing(alignment, name, "f8", chunk_rows=256)

    def _write_alignment(self, epoch: int) -> None:
        """Add a row to ``/alignment``: the network's alignment now, after ``epoch`` (0: before any update)."""
        alignment = self.file["alignment"]
        _append(alignment["epoch"], np.array([epoch], dtype=np.int32))
        for name, cosine in self.net.feedback_alignment().items():
            _append(alignment[name], np.array([cosine]))

    def _check_records(self) -> None:
        """Raise the damaged file's error unless the file holds every record that a run of this
        network writes, their rows agreeing."""
        paths = [f"epochs/{name}" for name in EPOCH_FIELDS] + [f"trials/{name}" for name in (*TRIAL_FIELDS, "q")] + ["gating/epoch", "gating/batch"]
        paths += ["alignment/epoch"] + [f"alignment/{name}" for name in self.aligned_layers]
        for name in self.layer_names:
            paths += [f"layers/{name}/{field}" for field in ("units", "ff", "fb", "gate")] + [f"gating/{name}/{field}" for field in GATING_FIELDS]
        missing = [f"/{path}" for path in paths if not isinstance(self.file.get(path), h5py.Dataset)]
        problems = [f"it lacks {', '.join(missing)}"] if missing else records_that_disagree(self.file)
        if problems:
            raise damaged_run_file(self.path, "; ".join(problems))

    def _truncate_after(self, epoch: int) -> None:
        """Drop rows that belong to epochs after ``epoch``."""
        def keep(epochs_of_rows: h5py.Dataset) -> int:
            return int(np.searchsorted(epochs_of_rows[:], epoch, side="right"))

        groups = [
            (self.file["epochs"], keep(self.file["epochs"]["epoch"]), EPOCH_FIELDS),
            (self.file["trials"], keep(self.file["trials"]["epoch"]), (*TRIAL_FIELDS, "q")),
        ]
        n_trials = groups[1][1]
        groups += [(self.file["layers"][name], n_trials, ("ff", "fb", "gate")) for name in self.layer_names]
        n_batches = keep(self.file["gating"]["epoch"])
        groups += [(self.file["gating"], n_batches, ("epoch", "batch"))]
        groups += [(self.file["gating"][name], n_batches, GATING_FIELDS) for name in self.layer_names]
        groups += [(self.file["alignment"], keep(self.file["alignment"]["epoch"]), ("epoch", *self.aligned_layers))]
        if "timecourses" in self.file:
            timecourses = self.file["timecourses"]
            n_traced = keep(timecourses["epoch"])
            groups += [(timecourses, n_traced, (*TRACE_FIELDS, "q", "delta"))]
            groups += [(group, n_traced, ("ff", "fb", "gate")) for group in timecourses.values() if isinstance(group, h5py.Group)]
        for group, rows, names in groups:
            for name in names:
                group[name].resize(rows, axis=0)

    def _new_epoch_buffers(self) -> None:
        self.batches: list[tuple[int, torch.Tensor]] = []  # (batch number, gating summary tensor)
        self.trials: list[dict] = []
        self.traces: list[tuple[dict, object]] = []  # (the trial's TRACE_FIELDS and q, TrialTrace)

    def record_batch(self, epoch: int, batch: int, index: torch.Tensor, labels: torch.Tensor, trials) -> None:
        """Buffer one training batch (``trials`` from the network's ``run_trials(..., record=True)``
        for this batch, called just before: its traces are placed in the batch by ``trials_run``).

        Parameters
        ----------
        epoch : int
            The epoch, from 1.
        batch : int
            The batch within the epoch, from 0; trials are logged from every
            ``settings.every_batches``-th batch, gating summaries from every batch.
        index : Tensor of int64, shape (B,)
            Indices of the batch's images in the training set.
        labels : Tensor of int64, shape (B,)
            Their classes.
        trials : Trials or Brian2Trials
            The batch's outcome, with ``layers`` recorded.

        Raises
        ------
        ValueError
            For a traced trial (Brian2) that is not in this batch.
        """
        nan = torch.full((), float("nan"), device=trials.q.device)  # filled on the device: no host copy
        n = self.settings.summary_trials
        summary = []
        for layer in trials.layers:
            gate = layer.gate[:n]
            summary.append(torch.count_nonzero(gate) / gate.numel())
            summary.append(layer.fb[:n].abs().mean() if layer.fb is not None else nan)
            summary.append(layer.changed.float() if layer.changed is not None else nan)
        self.batches.append((batch, torch.stack(summary)))
        first = self.net.trials_run - len(index)  # run_trials has counted the batch already
        for trace in getattr(trials, "traces", ()):
            i = trace.trial - first
            if not 0 <= i < len(index):
                raise ValueError(f"record_batch: traced trial {trace.trial} is not in this batch (trials {first} to {first + len(index) - 1}); record each batch right after its run_trials")
            values = {"epoch": epoch, "batch": batch, "trial": trace.trial, "image": int(index[i]), "label": int(labels[i]), "action": int(trials.action[i]), "reward": float(trials.reward[i])}
            self.traces.append(({**values, "q": trials.q[i].cpu().numpy()}, trace))
        if batch % self.settings.every_batches:
            return
        k = self.settings.trials_per_batch
        record = {
            "epoch": torch.full((min(k, len(index)),), epoch), "batch": torch.full((min(k, len(index)),), batch),
            "image": index[:k], "label": labels[:k], "action": trials.action[:k], "reward": trials.reward[:k],
            "delta": trials.delta[:k] if trials.delta is not None else torch.full((min(k, len(index)),), float("nan")),
            "q": trials.q[:k].clone(),
        }
        for layer in trials.layers:
            units = self.units[layer.name]
            record[f"{layer.name}/ff"] = layer.ff[:k].flatten(1)[:, units].clone()
            record[f"{layer.name}/fb"] = layer.fb[:k].flatten(1)[:, units].clone() if layer.fb is not None else None
            record[f"{layer.name}/gate"] = layer.gate[:k].flatten(1)[:, units].clone()
        self.trials.append(record)

    def write_epoch(self, epoch: int, metrics) -> None:
        """Add the buffered epoch and its metrics to the run file.

        Parameters
        ----------
        epoch : int
            The epoch, from 1.
        metrics : EpochMetrics
            What the epoch measured (:class:`agrel_sim.training.EpochMetrics`).

        Raises
        ------
        ValueError
            Where the run file cannot be written or is damaged.
        """
        with self._editing():
            self._write_epoch(epoch, metrics)
        self._new_epoch_buffers()

    def _write_epoch(self, epoch: int, metrics) -> None:
        for name in EPOCH_FIELDS:
            _append(self.file["epochs"][name], np.array([getattr(metrics, name)]))
        self._write_alignment(epoch)
        if self.batches:
            numbers = np.array([b for b, _ in self.batches], dtype=np.int32)
            summaries = torch.stack([s for _, s in self.batches]).cpu().numpy().reshape(len(numbers), len(self.layer_names), len(GATING_FIELDS))
            _append(self.file["gating"]["epoch"], np.full(len(numbers), epoch, dtype=np.int32))
            _append(self.file["gating"]["batch"], numbers)
            for i, name in enumerate(self.layer_names):
                for j, field in enumerate(GATING_FIELDS):
                    _append(self.file["gating"][name][field], summaries[:, i, j])
        if self.trials:
            joined = {key: [r[key] for r in self.trials] for key in self.trials[0]}
            for name in (*TRIAL_FIELDS, "q"):
                _append(self.file["trials"][name], torch.cat(joined[name]).cpu().numpy())
            for name in self.layer_names:
                group = self.file["layers"][name]
                ff = torch.cat(joined[f"{name}/ff"]).cpu().numpy()
                fb = joined[f"{name}/fb"]
                _append(group["ff"], ff)
                _append(group["fb"], torch.cat(fb).cpu().numpy() if fb[0] is not None else np.full_like(ff, np.nan))
                _append(group["gate"], torch.cat(joined[f"{name}/gate"]).cpu().numpy().astype(np.uint8))
        if self.traces:
            self._write_timecourses()

    def _write_timecourses(self) -> None:
        values, first = self.traces[0]
        if "timecourses" not in self.file:
            group = self.file.create_group("timecourses")
            group.create_dataset("t", data=first.t)
            for phase, (start, end) in first.phases.items():
                group.attrs[phase] = [start, end]
            for name, dtype in TRACE_FIELDS.items():
                _growing(group, name, dtype, chunk_rows=64)
            _growing(group, "q", "f4", len(values["q"]), chunk_rows=64)
            _growing(group, "delta", "f4", len(first.t), chunk_rows=64)
            for population in first.layers:
                sub = group.create_group(population.name)
                shape = (0, *population.ff.shape)
                for name, dtype in (("ff", "f4"), ("fb", "f4"), ("gate", "u1")):
                    sub.create_dataset(name, shape=shape, maxshape=(None, *shape[1:]), chunks=(1, *shape[1:]), dtype=dtype, **_COMPRESSION)
            _describe(group)
        group = self.file["timecourses"]
        for name in (*TRACE_FIELDS, "q"):
            _append(group[name], np.stack([v[name] for v, _ in self.traces]))
        _append(group["delta"], np.stack([t.delta for _, t in self.traces]))
        for i, population in enumerate(first.layers):
            for name in ("ff", "fb", "gate"):
                _append(group[population.name][name], np.stack([getattr(t.layers[i], name) for _, t in self.traces]).astype(np.uint8 if name == "gate" else np.float32))

    def finish(self, result) -> None:
        """Store the run's result and mark the run file complete.

        Parameters
        ----------
        result : RunResult
            The run's outcome (:class:`agrel_sim.training.RunResult`); all its fields but
            ``history`` become attributes of ``/result``.

        Raises
        ------
        ValueError
            Where the run file cannot be written or is damaged.
        """
        with self._editing():
            group = self.file.require_group("result")
            for key, value in asdict(result).items():
                if key != "history":
                    group.attrs[key] = value
            self.file.attrs["complete"] = True
