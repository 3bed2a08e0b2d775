"""The training protocol shared by DeepAGREL and EBP (the paper's Table 1 protocol).

Training images are split, by the run's seed, into a training part and a validation part;
batches of trials are drawn by index from the training part each epoch; after every epoch the
validation accuracy is measured, and training stops when it has not improved for ``patience``
epochs. The test accuracy reported is that of the weights with the best validation accuracy.
Optionally the learning rate falls by a factor whenever validation accuracy reaches a plateau.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from agrel_sim.augmentation import Augmentation, augment
from agrel_sim.backends import build, check_device
from agrel_sim.config import check_instance, is_count, is_number, shown, written_beside
from agrel_sim.datasets import Dataset
from agrel_sim.network import ColumnNetwork


@dataclass(frozen=True)
class TrainingSettings:
    """Settings of the training protocol.

    Parameters
    ----------
    batch_size : int
        Trials per weight update (the paper: 100).
    max_epochs : int
        Upper bound on epochs; a run that reaches it has not converged. A run also stops, not
        converged, after an epoch whose training loss is not finite (it has diverged).
    patience : int
        Stop after this many epochs without a better validation accuracy (the paper: 20).
    validation_size : int
        Training images set aside, by the run's seed, for validation (the paper: 1,000).
    eval_batch_size : int
        Images per forward pass when measuring accuracy: a matter of memory, though the sums of
        a forward pass may round in another order (a run goes on only with the one it began with).
    augmentation : Augmentation or None
        Random zoom, shift and reflection of training images; ``None`` for none.
    lr_decay_factor : float
        Multiply the learning rate by this factor after ``lr_decay_patience`` epochs without a
        better validation accuracy (counted from the best epoch or from the last decay), as early
        stopping counts ``patience`` (``torch.optim.lr_scheduler.ReduceLROnPlateau`` decays one
        epoch later); 1.0 (the default) keeps the rule's learning rate constant.
    lr_decay_patience : int
        Epochs without improvement before each decay; fewer than ``patience`` where
        ``lr_decay_factor`` is below 1.
    """

    batch_size: int = 100
    max_epochs: int = 500
    patience: int = 20
    validation_size: int = 1000
    eval_batch_size: int = 1000
    augmentation: Augmentation | None = None
    lr_decay_factor: float = 1.0
    lr_decay_patience: int = 10

    def __post_init__(self):
        for key in ("batch_size", "max_epochs", "patience", "validation_size", "eval_batch_size", "lr_decay_patience"):
            if not is_count(getattr(self, key)):
                raise ValueError(f"{key}: expected an integer >= 1, got {shown(getattr(self, key), count=True)}")
        if not is_number(self.lr_decay_factor, lambda v: 0 < v <= 1):
            raise ValueError(f"lr_decay_factor: expected a number in (0, 1], got {shown(self.lr_decay_factor)}")
        if self.lr_decay_factor < 1 and self.lr_decay_patience >= self.patience:  # the run stops first
            default = " (the default)" if self.lr_decay_patience == type(self).lr_decay_patience else ""
            raise ValueError(
                f"lr_decay_patience: expected fewer epochs than patience = {self.patience} (the run would stop before its learning rate decays), got {self.lr_decay_patience}{default}; "
                "give a smaller lr_decay_patience or a larger patience, or lr_decay_factor = 1 for a constant learning rate"
            )
        if not (self.augmentation is None or isinstance(self.augmentation, Augmentation)):
            raise ValueError(f"augmentation: expected an Augmentation or None, got {self.augmentation!r}")


@dataclass
class EpochMetrics:
    """What one epoch measured.

    Parameters
    ----------
    epoch : int
        The epoch's number, from 1.
    reward_probability : float
        Share of training trials rewarded (EBP: share of correct greedy classifications, i.e.
        1 − training error).
    train_loss : float
        Mean cross-entropy (EBP) or mean ``δ²/2`` (DeepAGREL) over the epoch's trials.
    validation_accuracy : float
        Greedy accuracy on the validation images after the epoch, in [0, 1].
    seconds : float
        Wall time of the epoch.
    learning_rate : float
        Learning rate of the epoch's updates.
    """

    epoch: int
    reward_probability: float
    train_loss: float
    validation_accuracy: float
    seconds: float
    learning_rate: float


@dataclass
class RunResult:
    """The outcome of a training run.

    Parameters
    ----------
    test_accuracy : float
        Test accuracy of the weights with the best validation accuracy, in [0, 1] (NaN when
        the run diverged in its first epoch).
    best_epoch : int
        The epoch of those weights (0 when there are none).
    epochs : int
        The number of epochs run.
    converged : bool
        Whether the stopping criterion was met (not ``max_epochs``, no divergence).
    seconds : float
        Wall time of the training, over all its sessions when resumed.
    history : list of EpochMetrics
        One entry per epoch run, in order.
    diverged : bool
        Whether the run stopped at an epoch whose training loss was not finite.
    """

    test_accuracy: float
    best_epoch: int
    epochs: int
    converged: bool
    seconds: float
    history: list[EpochMetrics] = field(default_factory=list)
    diverged: bool = False

    def summary(self) -> str:
        """One line for logs and sweeps: test accuracy, best epoch, epochs, convergence (and
        divergence) and training time.

        Returns
        -------
        str
            ``key=value`` pairs separated by spaces (``diverged=True`` only for a diverged run).
        """
        return (
            f"test_acc={self.test_accuracy:.4f} best_epoch={self.best_epoch} epochs={self.epochs} "
            f"converged={self.converged}{' diverged=True' if self.diverged else ''} time={self.seconds:.1f}s"
        )


def diverged(metrics: EpochMetrics) -> bool:
    """Whether an epoch's training loss was not finite: the weights have run off to inf or NaN.

    Parameters
    ----------
    metrics : EpochMetrics
        What the epoch measured.

    Returns
    -------
    bool
        True when ``metrics.train_loss`` is inf or NaN.
    """
    return not math.isfinite(metrics.train_loss)


def check_model_fits(description: ColumnNetwork, dataset: str, image_shape: tuple[int, ...], n_classes: int) -> None:
    """Raise ValueError, naming the field ``model``, unless the network takes the images of the
    data set named ``dataset`` and has an action for each of its classes.

    Parameters
    ----------
    description : ColumnNetwork
        The network.
    dataset : str
        Name of the data set, for the message.
    image_shape : tuple of int
        Shape of one image of the data set: (C, H, W) or (features,).
    n_classes : int
        Number of classes of the data set.

    Raises
    ------
    ValueError
        When ``image_shape`` differs from ``description.input_shape`` or ``n_classes`` from
        ``description.n_actions``.
    """
    if tuple(image_shape) != description.input_shape:
        raise ValueError(
            f"model: {description.name!r} expects input of shape {list(description.input_shape)}, "
            f"but data set {dataset!r} has images of shape {list(image_shape)}; choose a model made for this data set"
        )
    if n_classes != description.n_actions:
        raise ValueError(f"model: {description.name!r} has {description.n_actions} actions, data set {dataset!r} has {n_classes} classes; choose a model made for this data set")


def check_fits(description: ColumnNetwork, data: Dataset, settings: TrainingSettings) -> None:
    """Raise ValueError, naming the setting, when ``data`` does not fit the network or the settings.

    Parameters
    ----------
    description : ColumnNetwork
        The network.
    data : Dataset
        The data set to train on.
    settings : TrainingSettings
        The training settings.

    Raises
    ------
    ValueError
        When the images or classes do not fit the network (:func:`check_model_fits`), an
        augmentation is asked for images that are not (C, H, W), or ``settings.validation_size``
        leaves no training images or fewer than a batch (:func:`check_data_sizes`).
    """
    check_model_fits(description, data.name, data.image_shape, data.n_classes)
    if settings.augmentation is not None and len(description.input_shape) != 3:
        raise ValueError(f"training.augmentation: zoom, shift and reflection need images [channels, height, width], but model {description.name!r} takes input of shape {list(description.input_shape)}; remove the augmentation")
    check_data_sizes(settings, len(data.train_labels), data.name)


def check_data_sizes(settings: TrainingSettings, n_train: int, dataset: str) -> None:
    """Raise ValueError, naming the setting, unless ``settings.validation_size`` leaves some of
    the ``n_train`` training images of data set ``dataset`` to train on, and a batch is at most
    an epoch's trials (those images, times ``augmentation.factor``).

    Parameters
    ----------
    settings : TrainingSettings
        The training settings.
    n_train : int
        Number of training images of the data set.
    dataset : str
        Name of the data set, for the message.

    Raises
    ------
    ValueError
        Unless ``0 < settings.validation_size < n_train`` and ``settings.batch_size`` is at most
        ``n_train - settings.validation_size`` times the augmentation's ``factor``.
    """
    if not 0 < settings.validation_size < n_train:
        raise ValueError(f"training.validation_size: expected 0 < validation_size < {n_train} (the training images of {dataset!r}), got {settings.validation_size}")
    left = n_train - settings.validation_size
    copies = settings.augmentation.factor if settings.augmentation is not None else 1  # an epoch's batches run across the copies
    if settings.batch_size > left * copies:
        images = f"the {left} training images of {dataset!r} that validation_size = {settings.validation_size} leaves"
        trials = images if copies == 1 else f"the {left * copies} trials of an epoch ({images}, × augmentation.factor = {copies})"
        raise ValueError(f"training.batch_size: expected at most {trials}, got {settings.batch_size}; give a smaller batch_size (or validation_size)")


def split_validation(n_train: int, validation_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training and validation parts, drawn by ``seed`` (``0 < validation_size < n_train``).

    Parameters
    ----------
    n_train : int
        Number of training images.
    validation_size : int
        Number of them set aside for validation.
    seed : int
        Seeds the random permutation (a CPU generator of its own).

    Returns
    -------
    train : Tensor of int64, shape (n_train - validation_size,)
        Indices of the training part, on the CPU.
    validation : Tensor of int64, shape (validation_size,)
        Indices of the validation part, on the CPU; disjoint from ``train``.

    Raises
    ------
    ValueError
        Unless both sizes are integers >= 1 and ``validation_size < n_train``.
    """
    if not (is_count(n_train) and is_count(validation_size) and validation_size < n_train):
        raise ValueError(f"validation_size: expected 0 < validation_size < n_train = {shown(n_train, count=True)}, got {shown(validation_size, count=True)}")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return order[validation_size:], order[:validation_size]


def epoch_batches(train_index: torch.Tensor, copies: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The batches of one epoch: ``copies`` passes over the images ``train_index``, each in a
    random order of its own (drawn by ``generator``, on the CPU), cut into batches of
    ``batch_size`` in turn, so that a batch may span the end of one pass and the start of the
    next; the last batch may be smaller. Each pass is drawn as the batches reach it, so that an
    epoch of many passes holds no more than one in memory.

    Parameters
    ----------
    train_index : Tensor of int64, shape (N,)
        Indices of the training images (on any device).
    copies : int
        Passes over them per epoch (the augmentation factor, 1 without augmentation).
    batch_size : int
        Images per batch.
    generator : torch.Generator
        CPU generator that draws the order of each pass.

    Yields
    ------
    Tensor of int64, shape (batch_size,)
        The indices of one batch, on ``train_index``'s device; the last may be shorter.
    """
    pending = train_index[:0]
    for _ in range(copies):
        pending = torch.cat([pending, train_index[torch.randperm(len(train_index), generator=generator).to(train_index.device)]])
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]
    if len(pending):
        yield pending


@torch.no_grad()
def accuracy(net, data: Dataset, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """Share of ``images`` whose greedy action (highest Q-value) is the label.

    Parameters
    ----------
    net : TorchNetwork or Brian2Network
        A built network (:func:`agrel_sim.backends.build`).
    data : Dataset
        The data set, whose ``scale`` turns the pixel values into activity.
    images : Tensor of uint8, shape (N, C, H, W) or (N, features)
        Pixel values of the images, on the network's device.
    labels : Tensor of int64, shape (N,)
        The class of each image.
    batch_size : int
        Images per forward pass.

    Returns
    -------
    float
        The greedy accuracy, in [0, 1].
    """
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for start in range(0, len(labels), batch_size):
        index = torch.arange(start, min(start + batch_size, len(labels)), device=images.device)
        q = net.q_values(data.batch(images, index, net.dtype), check_range=False)  # a Dataset's pixels are valid rates
        correct += (q.argmax(1) == labels[index]).sum()
    return correct.item() / len(labels)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write a checkpoint atomically: a crash mid-write never leaves a half file as the latest.

    Raises ValueError, naming ``path``, where it cannot be written (a full disk).

    Parameters
    ----------
    path : Path
        Where to write it; it is first written to ``path`` + ``.partial`` and renamed.
    state : dict
        What to save with ``torch.save``; :func:`train` writes the keys of ``CHECKPOINT_KEYS``.

    Raises
    ------
    ValueError
        Where the file cannot be written.
    """
    try:
        with written_beside(path) as partial, open(partial, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        try:  # torch words a full disk as "unexpected pos ..."
            free = f"; {shutil.disk_usage(path.parent).free / 2**20:,.1f} MiB free on its disk"
        except OSError:
            free = ""
        raise ValueError(
            f"{path}: cannot write the checkpoint ({type(error).__name__}: {str(error).splitlines()[0]}{free}); free space or make the"
            " run folder writable, then train again with --resume, which goes on from the last checkpoint written"
        ) from None


_DAMAGED_CHECKPOINT = "restore it from a copy, or move the run folder away and train the run again (its run file keeps the finished epochs for analysis)"


# What every checkpoint holds (:func:`train` writes them).
CHECKPOINT_KEYS = ("epoch", "weights", "best_weights", "best_accuracy", "best_epoch", "history", "rng", "learning_rate", "last_decay", "trials_run", "seconds")


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, checking every entry of its archive
    against its checksum (torch.load does not, so damaged weights would load unseen).

    Raises ValueError, naming ``path``, for a file that is not a readable checkpoint, a damaged
    one, one of an older agrel-sim, or one that lacks an entry.

    Parameters
    ----------
    path : Path
        The checkpoint file.

    Returns
    -------
    dict
        The state, with every key of ``CHECKPOINT_KEYS``, its tensors on the CPU.

    Raises
    ------
    ValueError
        For a file that is not a readable checkpoint, a damaged one, one of an older
        agrel-sim, or one that lacks an entry.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is None:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and zipfile raise several kinds for a damaged file
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error}); {_DAMAGED_CHECKPOINT}") from None
    if damaged is not None:
        raise ValueError(f"{path}: a damaged checkpoint (its entry {damaged} fails its checksum); {_DAMAGED_CHECKPOINT}")
    if not isinstance(state, dict) or "epoch" not in state:
        raise ValueError(f"{path}: not a checkpoint of agrel-sim; {_DAMAGED_CHECKPOINT}")
    if "learning_rate" not in state or "trials_run" not in state:
        raise ValueError(f"{path}: a checkpoint of an older agrel-sim, which this version cannot resume; start the run again in a new folder")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path}: a checkpoint that lacks {', '.join(missing)}; {_DAMAGED_CHECKPOINT}")
    return state


@contextlib.contextmanager
def ctrl_c_between_batches():
    """For the duration: Ctrl-C (SIGINT) is taken between two batches; yields the list of signals received.

    Python raises ``KeyboardInterrupt`` wherever the signal lands, and where that is a callback
    run by the garbage collector, the exception is printed and dropped and the run goes on. So,
    in the main thread and where SIGINT has a Python handler (Python's own, or the one Brian2
    installs when imported; not where it is ignored, as in a sweep's workers), that handler is
    replaced for the duration by one that only notes the signal, and the training loop raises
    ``KeyboardInterrupt`` after the batch it arrived in (an unfinished epoch is never kept).

    Yields
    ------
    list of int
        The SIGINT signals received so far; stays empty where the handler was not replaced.
    """
    received = []
    if threading.current_thread() is not threading.main_thread() or not callable(signal.getsignal(signal.SIGINT)):
        yield received
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def full_precision_cudnn():
    """For the duration: cuDNN's deterministic algorithms, no autotuning, and no TF32.

    By default cuDNN computes float32 convolutions in TF32 on recent GPUs (dense and locally
    connected layers, which use matrix products, stay in float32) and picks algorithms that may
    differ from run to run; both would make conv layers compute differently from the others and
    from the CPU. The previous settings are restored afterwards. On the CPU this changes nothing.
    """
    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = True, False, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = saved


@full_precision_cudnn()
def train(
    description: ColumnNetwork,
    data: Dataset,
    settings: TrainingSettings = TrainingSettings(),
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
    log=print,
    run_file=None,
    checkpoint: str | os.PathLike | None = None,
    resume: dict | None = None,
    backend: str = "torch",
    backend_options: dict | None = None,
) -> RunResult:
    """Train ``description`` on ``data`` with its rule until early stopping.

    Parameters
    ----------
    description : ColumnNetwork
        The network; ``description.rule.name`` selects DeepAGREL or EBP.
    data : Dataset
        The training and test images with their labels.
    settings : TrainingSettings
        The training protocol (batch size, early stopping, augmentation, ...).
    seed : int
        Seeds the validation split, the batch order, the augmentation, the weights, action
        selection and dropout.
    device : str or torch.device
        Where to run: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    dtype : torch.dtype
        The precision, ``torch.float32`` or ``torch.float64``.
    progress : bool or None
        Show a progress bar; ``None``: only when the output is a terminal.
    log : callable or None
        Receives one line per epoch (and one more when the run diverges).
    run_file : callable or None
        Called with the built network; returns a :class:`~agrel_sim.recorder.RunFile` that
        records every batch and epoch (or ``None``).
    checkpoint : str or os.PathLike or None
        Where to write a checkpoint at the end of every epoch.
    resume : dict or None
        A checkpoint (:func:`load_checkpoint`) to continue from; the result is identical to an
        uninterrupted run with the same seed and ``settings``. A run that stopped continues if
        ``settings`` has a longer patience or more epochs, as if it had had them from the start.
    backend : str
        The backend that builds the network (:data:`agrel_sim.backends.BACKENDS`).
    backend_options : dict or None
        The backend's own settings, passed to its builder.

    Returns
    -------
    RunResult
        The test accuracy of the weights with the best validation accuracy (NaN when the run
        diverged in its first epoch), the best epoch, the epochs run, whether the run converged
        or diverged, its wall time and the per-epoch history.

    Notes
    -----
    Runs under :func:`full_precision_cudnn`.
    """
    for name, value, kind in (("description", description, ColumnNetwork), ("data", data, Dataset), ("settings", settings, TrainingSettings)):
        check_instance(name, value, kind)
    check_device(device)  # before the data move there
    check_fits(description, data, settings)
    checkpoint = None if checkpoint is None else Path(checkpoint)

    started = time.perf_counter()
    data = data.to(device)
    net = build(description, backend=backend, device=device, dtype=dtype, seed=seed, **(backend_options or {}))
    train_index, validation_index = (i.to(device) for i in split_validation(len(data.train_labels), settings.validation_size, seed))
    validation_images, validation_labels = data.train_images[validation_index], data.train_labels[validation_index]
    generators = {
        "order": torch.Generator().manual_seed(seed + 1),
        "augment": torch.Generator(device=device).manual_seed(seed + 2),
        "trials": net.generator,
    }
    augmentation = settings.augmentation
    copies = augmentation.factor if augmentation else 1

    best_accuracy, best_epoch, best_weights, history, first_epoch, elapsed = -1.0, 0, None, [], 1, 0.0
    last_decay = 0  # the epoch of the last learning-rate decay
    if resume is not None:
        try:
            history = [EpochMetrics(**m) for m in resume["history"]]
            if not diverged(history[-1]):  # a diverged run goes no further, and its last weights are not finite
                net.load_weights(resume["weights"])
            net.learning_rate, last_decay, net.trials_run = resume["learning_rate"], resume["last_decay"], resume["trials_run"]
            for name, generator in generators.items():
                generator.set_state(resume["rng"][name])
        except torch.cuda.OutOfMemoryError:  # not the checkpoint's fault: the command line says what to do
            raise
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:  # weights of another network, a generator state of another kind, ...
            raise ValueError(f"{checkpoint or 'resume'}: the checkpoint does not fit this run ({type(error).__name__}: {error}); {_DAMAGED_CHECKPOINT}") from None
        best_accuracy, best_epoch, best_weights = resume["best_accuracy"], resume["best_epoch"], resume["best_weights"]
        first_epoch, elapsed = resume["epoch"] + 1, resume["seconds"]
    recorder = run_file(net) if run_file is not None else None
    bar = tqdm(total=settings.max_epochs, initial=first_epoch - 1, desc=f"{description.name} {description.rule.name}", unit="epoch", disable=None if progress is None else not progress, leave=False)
    stopped = first_epoch > 1 and (history[-1].epoch - best_epoch >= settings.patience or diverged(history[-1]))
    epoch = first_epoch - 1
    with ctrl_c_between_batches() as interrupted, contextlib.closing(bar):  # the bar is cleared on an error too
        while not stopped and epoch < settings.max_epochs:
            epoch += 1
            epoch_started = time.perf_counter()
            rewarded = torch.zeros((), dtype=torch.float64, device=device)
            loss = torch.zeros((), dtype=torch.float64, device=device)
            for batch, index in enumerate(epoch_batches(train_index, copies, settings.batch_size, generators["order"])):
                labels = data.train_labels[index]
                images = data.batch(data.train_images, index, dtype)
                if augmentation:
                    images = augment(images, augmentation, generators["augment"])
                trials = net.run_trials(images, labels, record=recorder is not None, check_range=False)
                rewarded += (trials.action == labels).sum()
                loss += trials.loss * len(index) if trials.loss is not None else (trials.delta ** 2).sum() / 2
                if recorder is not None:
                    recorder.record_batch(epoch, batch, index, labels, trials)
                if interrupted:
                    raise KeyboardInterrupt
            validation = accuracy(net, data, validation_images, validation_labels, settings.eval_batch_size)
            trials_per_epoch = len(train_index) * copies
            metrics = EpochMetrics(epoch, rewarded.item() / trials_per_epoch, loss.item() / trials_per_epoch, validation, time.perf_counter() - epoch_started, net.learning_rate)
            history.append(metrics)
            if validation > best_accuracy and not diverged(metrics):
                best_accuracy, best_epoch, best_weights = validation, epoch, net.weights()
            stopped = epoch - best_epoch >= settings.patience or diverged(metrics)
            # Decided also at the stop, so that the checkpoint holds the rate with which a longer
            # patience would go on.
            if settings.lr_decay_factor < 1 and epoch - max(best_epoch, last_decay) >= settings.lr_decay_patience:
                net.learning_rate *= settings.lr_decay_factor
                last_decay = epoch
            if recorder is not None:
                recorder.write_epoch(epoch, metrics)
            if checkpoint is not None:
                save_checkpoint(checkpoint, {
                    "epoch": epoch, "weights": net.weights(), "best_weights": best_weights, "best_accuracy": best_accuracy,
                    "best_epoch": best_epoch, "history": [asdict(m) for m in history],
                    "rng": {name: g.get_state() for name, g in generators.items()},
                    "learning_rate": net.learning_rate, "last_decay": last_decay, "trials_run": net.trials_run,
                    "seconds": elapsed + time.perf_counter() - started,
                })
            bar.update()
            bar.set_postfix(reward_p=f"{metrics.reward_probability:.3f}", val_acc=f"{validation:.4f}")
            if log is not None:
                log(
                    f"epoch {epoch:3d}  reward_p={metrics.reward_probability:.4f}  loss={metrics.train_loss:.4f}  "
                    f"val_acc={validation:.4f}  lr={metrics.learning_rate:.3g}  time={metrics.seconds:.2f}s"
                )
                if diverged(metrics):
                    log(f"epoch {epoch}: the training loss is not finite: the network has diverged, so the run stops here (a lower learning rate may help)")
            if interrupted:  # arrived while the epoch was validated and saved
                raise KeyboardInterrupt
    if best_weights is None:  # diverged in its first epoch: no weights to test
        test = math.nan
    else:
        net.load_weights(best_weights)
        test = accuracy(net, data, data.test_images, data.test_labels, settings.eval_batch_size)
    ran_off = diverged(history[-1])
    result = RunResult(test, best_epoch, epoch, stopped and not ran_off, elapsed + time.perf_counter() - started, history, ran_off)
    if recorder is not None:
        recorder.finish(result)
    return result
