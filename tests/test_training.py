"""The training protocol: early stopping, the best epoch's test accuracy, the plateau schedule
of the learning rate, and resuming from a checkpoint."""

import dataclasses
import math
import os
import signal
import weakref

import h5py
import numpy as np
import pytest
import torch

from agrel_sim import ColumnNetwork, Dense, Rule, build
from agrel_sim import training
from agrel_sim.augmentation import Augmentation
from agrel_sim.datasets import Dataset, load_dataset
from agrel_sim.experiment import default_experiment
from agrel_sim.recorder import LogSettings
from agrel_sim.runs import run_experiment
from agrel_sim.training import TrainingSettings, load_checkpoint, train

DESCRIPTION = ColumnNetwork((1, 8, 8), [Dense(16)], 10, rule=Rule(learning_rate=0.4, init_range=0.1))
SETTINGS = TrainingSettings(batch_size=50, max_epochs=30, patience=4, validation_size=300, lr_decay_factor=0.5, lr_decay_patience=2)
# Validation accuracies by epoch: a plateau from epoch 2, a better value at epoch 6, then none.
SCRIPT = [0.5, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]


@pytest.fixture
def scripted_validation(monkeypatch):
    """Replace validation accuracy by :data:`SCRIPT` from a given epoch on; test accuracy stays real."""
    real = training.accuracy

    def start(first_epoch=1):
        script = iter(SCRIPT[first_epoch - 1:])

        def accuracy(net, data, images, labels, batch_size):
            return next(script) if len(labels) == SETTINGS.validation_size else real(net, data, images, labels, batch_size)

        monkeypatch.setattr(training, "accuracy", accuracy)

    return start


def test_early_stopping_plateau_decay_and_best_epoch_test_accuracy(scripted_validation, tmp_path):
    scripted_validation()
    data = load_dataset("digits")
    result = train(DESCRIPTION, data, SETTINGS, seed=3, progress=False, log=None, checkpoint=tmp_path / "checkpoint.pt")
    # Best at epoch 6; stop 4 epochs later. Decays after 2 epochs without improvement, counted
    # from the best epoch or the last decay: after epochs 4, 8 and 10 (the stop: the checkpoint
    # holds the rate a longer patience would go on with).
    assert (result.best_epoch, result.epochs, result.converged) == (6, 10, True)
    assert [m.learning_rate for m in result.history] == [0.4] * 4 + [0.2] * 4 + [0.1] * 2
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["learning_rate"] == 0.05 and state["last_decay"] == 10
    # The reported test accuracy is that of the best epoch's weights, not the last.
    net = build(DESCRIPTION, seed=3)
    net.load_weights(state["best_weights"])
    assert result.test_accuracy == training.accuracy(net, data, data.test_images, data.test_labels, 1000)
    assert not torch.equal(state["weights"]["layers.0.ff"], state["best_weights"]["layers.0.ff"])


def test_resuming_mid_schedule_equals_an_uninterrupted_run(scripted_validation, tmp_path):
    data = load_dataset("digits")
    scripted_validation()
    whole = train(DESCRIPTION, data, SETTINGS, seed=3, progress=False, log=None, checkpoint=tmp_path / "whole.pt")
    scripted_validation()
    train(DESCRIPTION, data, dataclasses.replace(SETTINGS, max_epochs=5), seed=3, progress=False, log=None, checkpoint=tmp_path / "part.pt")
    state = load_checkpoint(tmp_path / "part.pt")
    assert state["learning_rate"] == 0.2, "stopped after the first decay"
    scripted_validation(first_epoch=6)
    resumed = train(DESCRIPTION, data, SETTINGS, seed=3, progress=False, log=None, checkpoint=tmp_path / "part.pt", resume=state)
    strip = lambda history: [dataclasses.replace(m, seconds=0) for m in history]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    assert resumed.test_accuracy == whole.test_accuracy
    a, b = load_checkpoint(tmp_path / "part.pt"), load_checkpoint(tmp_path / "whole.pt")
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key


def test_a_stopped_run_goes_on_with_a_longer_patience_as_if_it_had_had_it(scripted_validation, tmp_path):
    data = load_dataset("digits")
    longer = dataclasses.replace(SETTINGS, patience=6)
    scripted_validation()
    whole = train(DESCRIPTION, data, longer, seed=3, progress=False, log=None, checkpoint=tmp_path / "whole.pt")
    assert (whole.best_epoch, whole.epochs) == (6, 12)
    scripted_validation()
    stopped = train(DESCRIPTION, data, SETTINGS, seed=3, progress=False, log=None, checkpoint=tmp_path / "part.pt")
    assert (stopped.epochs, stopped.converged) == (10, True)
    state = load_checkpoint(tmp_path / "part.pt")
    assert train(DESCRIPTION, data, SETTINGS, seed=3, progress=False, log=None, resume=state).epochs == 10, "the same patience stays stopped"
    scripted_validation(first_epoch=11)
    resumed = train(DESCRIPTION, data, longer, seed=3, progress=False, log=None, checkpoint=tmp_path / "part.pt", resume=state)
    strip = lambda history: [dataclasses.replace(m, seconds=0) for m in history]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    assert [m.learning_rate for m in resumed.history[-2:]] == [0.05, 0.05], "the decay decided at the first stop"
    assert (resumed.best_epoch, resumed.epochs, resumed.test_accuracy) == (whole.best_epoch, whole.epochs, whole.test_accuracy)
    a, b = load_checkpoint(tmp_path / "part.pt"), load_checkpoint(tmp_path / "whole.pt")
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key


def test_learning_rate_schedule_settings_are_checked():
    with pytest.raises(ValueError, match=r"lr_decay_factor: expected a number in \(0, 1\], got 1.5"):
        TrainingSettings(lr_decay_factor=1.5)
    with pytest.raises(ValueError, match="lr_decay_patience: expected an integer >= 1, got 0"):
        TrainingSettings(lr_decay_patience=0)


def test_training_runs_with_deterministic_full_precision_cudnn(monkeypatch):
    cudnn = torch.backends.cudnn
    before = cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32
    during = []
    real = training.accuracy

    def accuracy(*args):
        during.append((cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32))
        return real(*args)

    monkeypatch.setattr(training, "accuracy", accuracy)
    train(DESCRIPTION, load_dataset("digits"), dataclasses.replace(SETTINGS, max_epochs=1), progress=False, log=None)
    assert during and set(during) == {(True, False, False)}
    assert (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32) == before, "restored afterwards"


@pytest.mark.parametrize("field", ["train_labels", "test_labels"])
def test_labels_outside_the_actions_are_named_before_training(field, tmp_path):
    # train() checks the labels once, so that its batches skip the check (it waits for a GPU).
    data = load_dataset("digits")
    getattr(data, field)[7] = 10
    with pytest.raises(ValueError, match=rf"data set 'digits': {field} outside 0\.\.9 \(found 0\.\.10\)"):
        train(DESCRIPTION, data, SETTINGS, progress=False, log=None, checkpoint=tmp_path / "checkpoint.pt")
    assert not (tmp_path / "checkpoint.pt").exists()


def logged_images(folder):
    """The training images of every logged trial."""
    with h5py.File(folder / "run.h5", "r") as run:
        return run["trials"]["image"][:]


def test_the_validation_split_and_the_batch_order_are_drawn_by_the_seed(tmp_path, monkeypatch):
    experiment = default_experiment()
    experiment = dataclasses.replace(experiment, training=dataclasses.replace(experiment.training, max_epochs=1))
    every_trial = LogSettings(every_batches=1, trials_per_batch=experiment.training.batch_size)
    data = load_dataset("digits")
    n_train, size = len(data.train_labels), experiment.training.validation_size
    tested = []  # the images of each accuracy measured: validation after the epoch, then the test
    real = training.accuracy
    monkeypatch.setattr(training, "accuracy", lambda net, data, images, labels, batch_size: tested.append(images.clone()) or real(net, data, images, labels, batch_size))
    validation, order = {}, {}
    for seed in (0, 1):
        tested.clear()
        run_experiment(experiment, seed, tmp_path / f"seed{seed}", logging=every_trial, progress=False, log=None)
        trained = logged_images(tmp_path / f"seed{seed}")
        train_part, validation_part = training.split_validation(n_train, size, seed)
        assert sorted(trained.tolist()) == sorted(train_part.tolist()), "every training image once per epoch"
        assert not set(trained.tolist()) & set(validation_part.tolist()), "no validation image is trained on"
        assert torch.equal(tested[0], data.train_images[validation_part]) and torch.equal(tested[-1], data.test_images), "validated on the images set aside"
        validation[seed] = validation_part
        # The batch order as places in the training part: an order that ignored the seed would
        # be the same permutation of each seed's part.
        place = {int(image): index for index, image in enumerate(train_part)}
        order[seed] = [place[int(image)] for image in trained]
    assert not torch.equal(validation[0], validation[1]), "another seed, another split"
    assert order[0] != order[1], "another seed, another batch order"
    assert torch.equal(training.split_validation(n_train, size, 0)[1], validation[0]), "the same seed, the same split"


def test_wrong_arguments_to_train_and_its_parts_are_named_before_any_work():
    data, settings = load_dataset("digits"), TrainingSettings(max_epochs=1)
    for call, message in (
        (lambda: train(DESCRIPTION.to_dict(), data, settings), r"description: expected an object of class ColumnNetwork, got dict \{"),
        (lambda: train(DESCRIPTION, "digits", settings), r"data: expected an object of class Dataset, got str 'digits'"),
        (lambda: train(DESCRIPTION, data, dict(batch_size=50)), r"settings: expected an object of class TrainingSettings, got dict \{'batch_size': 50\}"),
        (lambda: train(DESCRIPTION, data, settings, device="gpu"), r"device: expected 'cpu', 'cuda' or 'cuda:N'"),
        (lambda: build(DESCRIPTION.to_dict()), r"network: expected an object of class ColumnNetwork, got dict"),
        (lambda: build(DESCRIPTION.to_dict(), backend="brian2"), r"network: expected an object of class ColumnNetwork, got dict"),
        (lambda: build(DESCRIPTION, tau_ff=5.0), r"tau_ff: not an option of the torch backend; its options: device, dtype, seed"),
        (lambda: build(DESCRIPTION, backend="brian2", Tau_ff=5.0), r"Tau_ff: not an option of the brian2 backend; its options: device, dtype, seed, tau_ff, tau_fb, dt, "),
        (lambda: run_experiment(DESCRIPTION), r"experiment: expected an object of class Experiment, got ColumnNetwork"),
        (lambda: build(DESCRIPTION, seed=np.int64(1)), r"seed: expected an integer from 0 to 2\*\*63 - 1, got np\.int64\(1\) \(a NumPy integer; give a Python one: int\(x\)\)$"),
        (lambda: TrainingSettings(batch_size=np.int64(10)), r"batch_size: expected an integer >= 1, got np\.int64\(10\) \(a NumPy integer"),
        (lambda: training.split_validation(10, -2, 0), r"validation_size: expected 0 < validation_size < n_train = 10, got -2"),
        (lambda: training.split_validation(10, 10, 0), r"validation_size: expected 0 < validation_size < n_train = 10, got 10"),
        # data read from files (its sizes known only then): the check of the embedded data sets' experiments
        (lambda: train(DESCRIPTION, data, TrainingSettings(batch_size=1238, validation_size=200)), r"training\.batch_size: expected at most the 1237 training images of 'digits' that validation_size = 200 leaves, got 1238"),
        (lambda: train(DESCRIPTION, data, TrainingSettings(batch_size=2475, validation_size=200, augmentation=Augmentation(factor=2))),
         r"training\.batch_size: expected at most the 2474 trials of an epoch \(the 1237 training images of 'digits' that validation_size = 200 leaves, × augmentation\.factor = 2\), got 2475"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    # a batch that spans the copies of an augmented epoch is a full batch
    training.check_data_sizes(TrainingSettings(batch_size=2474, validation_size=200, augmentation=Augmentation(factor=2)), 1437, "digits")


def test_augmentation_needs_image_input():
    flat = ColumnNetwork((64,), [Dense(8)], 10)
    data = load_dataset("digits")
    data = dataclasses.replace(data, train_images=data.train_images.flatten(1), test_images=data.test_images.flatten(1))
    with pytest.raises(ValueError, match=r"training\.augmentation: zoom, shift and reflection need images \[channels, height, width\], but model .* takes input of shape \[64\]"):
        train(flat, data, TrainingSettings(max_epochs=1, augmentation=Augmentation(factor=2)), progress=False, log=None)


def test_augmented_training_transforms_every_batch_and_sees_each_image_factor_times(monkeypatch, tmp_path):
    seen = []
    real = training.augment

    def augment(images, settings, generator):
        out = real(images, settings, generator)
        seen.append((images.clone(), out))
        return out

    monkeypatch.setattr(training, "augment", augment)
    experiment = default_experiment()
    settings = dataclasses.replace(experiment.training, max_epochs=1, augmentation=Augmentation(factor=2))
    experiment = dataclasses.replace(experiment, training=settings)
    run_experiment(experiment, 0, tmp_path / "run", logging=LogSettings(every_batches=1, trials_per_batch=settings.batch_size), progress=False, log=None)
    trained = logged_images(tmp_path / "run")
    n_train = len(load_dataset("digits").train_labels) - settings.validation_size
    assert len(trained) == 2 * n_train and len(set(trained.tolist())) == n_train, "each training image twice per epoch"
    first, second = trained[:n_train].tolist(), trained[n_train:].tolist()
    assert sorted(first) == sorted(second) and first != second, "each pass over the images in an order of its own"
    with h5py.File(tmp_path / "run" / "run.h5", "r") as run:
        assert run["epochs"]["reward_probability"][0] == pytest.approx(np.mean(run["trials"]["reward"][:])), "the share of all the epoch's trials"
    assert len(seen) == -(-2 * n_train // settings.batch_size), "every batch goes through augmentation"
    changed = [not torch.equal(before, after) for before, after in seen]
    assert sum(changed) >= 0.9 * len(seen), "the batches are transformed"


@pytest.mark.parametrize("n, copies, batch_size", [(10, 1, 3), (10, 3, 4), (12, 2, 4), (5, 4, 7), (7, 2, 100)])
def test_an_epochs_batches_cut_its_passes_in_turn_and_draw_each_pass_as_it_is_reached(n, copies, batch_size):
    train_index = torch.arange(100, 100 + n)
    batches = list(training.epoch_batches(train_index, copies, batch_size, torch.Generator().manual_seed(5)))
    generator = torch.Generator().manual_seed(5)
    passes = torch.cat([train_index[torch.randperm(n, generator=generator)] for _ in range(copies)])
    assert [b.tolist() for b in batches] == [passes[start:start + batch_size].tolist() for start in range(0, n * copies, batch_size)]
    drawn = training.epoch_batches(torch.arange(10**6), 10**9, 100, torch.Generator().manual_seed(0))
    assert len(next(drawn)) == 100, "a billion passes cost one pass of memory"


def test_accuracy_is_measured_without_autograd():
    net = build(ColumnNetwork((1, 8, 8), [Dense(8)], 10, rule=Rule(name="ebp")))  # EBP's weights require gradients
    data = load_dataset("digits")
    grad_enabled = []
    q_values = net.q_values
    net.q_values = lambda *args, **kwargs: grad_enabled.append(torch.is_grad_enabled()) or q_values(*args, **kwargs)
    training.accuracy(net, data, data.test_images, data.test_labels, 100)
    assert grad_enabled and not any(grad_enabled), "no graph is built for a measurement"


def test_the_seed_draws_the_augmentation(monkeypatch):
    # Every training image alike: what augmentation makes of the first batch then depends on its
    # random zoom, shift and reflection alone.
    augmented = []  # per run, its augmented batches
    real = training.augment

    def augment(images, settings, generator):
        out = real(images, settings, generator)
        augmented[-1].append(out.clone())
        return out

    monkeypatch.setattr(training, "augment", augment)
    image = torch.randint(0, 256, (1, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.arange(60) % 10
    data = Dataset("alike", image.expand(60, 1, 8, 8).clone(), labels, image.expand(10, 1, 8, 8).clone(), labels[:10].clone(), 1 / 255, 10)
    settings = TrainingSettings(batch_size=10, max_epochs=1, validation_size=10, augmentation=Augmentation(factor=1))
    for seed in (0, 0, 1):
        augmented.append([])
        train(DESCRIPTION, data, settings, seed=seed, progress=False, log=None)
    first, same, other = (batches[0] for batches in augmented)
    assert torch.equal(first, same), "the same seed, the same transforms"
    assert all(not torch.allclose(a, b) for a, b in zip(first, other)), "another seed, another transform of every image"


def test_a_diverged_run_stops_unconverged_at_the_first_epoch_with_a_non_finite_loss(tmp_path):
    # A linear net learning Q-values at this rate runs off to inf within a few epochs.
    description = ColumnNetwork((1, 8, 8), [], 10, rule=Rule(learning_rate=1000.0, init_range=0.1))
    lines = []
    result = train(description, load_dataset("digits"), SETTINGS, progress=False, log=lines.append, checkpoint=tmp_path / "checkpoint.pt")
    losses = [m.train_loss for m in result.history]
    assert not result.converged and result.epochs < SETTINGS.patience
    assert all(map(math.isfinite, losses[:-1])) and not math.isfinite(losses[-1]), "stops at the first non-finite loss"
    assert lines[-1] == f"epoch {result.epochs}: the training loss is not finite: the network has diverged, so the run stops here (a lower learning rate may help)"
    resumed = train(description, load_dataset("digits"), dataclasses.replace(SETTINGS, patience=50), progress=False, log=None, resume=load_checkpoint(tmp_path / "checkpoint.pt"))
    assert (resumed.epochs, resumed.converged) == (result.epochs, False), "a diverged run stays stopped"


def test_training_checks_no_batch_values_that_would_make_the_host_wait_for_a_gpu(monkeypatch):
    from agrel_sim.backends import torch_backend

    checked = []
    real = torch_backend.check_batch

    def check_batch(*args, **kwargs):
        checked.append(args[4] if len(args) > 4 else kwargs.get("check_range", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "check_batch", check_batch)
    train(ColumnNetwork((1, 8, 8), [Dense(16)], 10), load_dataset("digits"), dataclasses.replace(SETTINGS, max_epochs=1), progress=False, log=None)
    assert checked and not any(checked), "training, validation and test batches skip the value checks (a Dataset's pixels are valid rates)"


def test_a_run_diverged_in_its_first_epoch_has_no_best_weights_to_test(tmp_path):
    description = ColumnNetwork((1, 8, 8), [Dense(16)], 10, rule=Rule(learning_rate=1e6))
    result = train(description, load_dataset("digits"), SETTINGS, progress=False, log=None, checkpoint=tmp_path / "checkpoint.pt")
    assert (result.epochs, result.best_epoch, result.diverged, result.converged) == (1, 0, True, False)
    assert math.isnan(result.test_accuracy), "no epoch gave weights worth testing"
    resumed = train(description, load_dataset("digits"), dataclasses.replace(SETTINGS, patience=50), progress=False, log=None, resume=load_checkpoint(tmp_path / "checkpoint.pt"))
    assert (resumed.epochs, resumed.diverged) == (1, True) and math.isnan(resumed.test_accuracy)


def test_ctrl_c_during_training_is_taken_between_batches_even_inside_a_collector_callback(monkeypatch, tmp_path, python_sigint):
    # Python's own handler would raise KeyboardInterrupt inside the callback, where it is dropped.
    real = training.accuracy

    def accuracy(net, data, images, labels, batch_size):
        if len(labels) == SETTINGS.validation_size and len(validations) == 1:  # in epoch 2
            weakref.finalize(Marker(), os.kill, os.getpid(), signal.SIGINT)  # runs as the marker dies
        validations.append(len(labels))
        return real(net, data, images, labels, batch_size)

    validations = []
    monkeypatch.setattr(training, "accuracy", accuracy)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(DESCRIPTION, load_dataset("digits"), SETTINGS, progress=False, log=None, checkpoint=tmp_path / "checkpoint.pt")
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2, "epoch 2 finished and was kept; no later epoch ran"
    assert signal.getsignal(signal.SIGINT) is before, "the handler in place before is back"


class Marker:
    """An object that dies as soon as it is made (nothing refers to it)."""


def test_a_checkpoint_that_cannot_be_written_says_how_much_space_is_free_and_leaves_nothing(tmp_path, monkeypatch):
    def fails_as_on_a_full_disk(state, handle):
        handle.write(b"PK\x03\x04 part of it")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 60511488 vs 60511440")

    monkeypatch.setattr(torch, "save", fails_as_on_a_full_disk)
    with pytest.raises(ValueError, match=(
        r"checkpoint\.pt: cannot write the checkpoint \(RuntimeError: \[enforce fail at inline_container\.cc:672\] \. unexpected pos 60511488 vs 60511440;"
        r" [\d,]+\.\d MiB free on its disk\); free space or make the run folder writable, then train again with --resume"
    )):
        training.save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})
    assert list(tmp_path.iterdir()) == [], "neither the checkpoint nor its partial copy"


def test_the_checkpoint_may_be_given_as_a_string(tmp_path):
    train(ColumnNetwork((1, 8, 8), [], 10), load_dataset("digits"), dataclasses.replace(SETTINGS, max_epochs=1), progress=False, log=None, checkpoint=str(tmp_path / "checkpoint.pt"))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_the_progress_bar_is_cleared_when_a_run_stops_on_an_error(tmp_path, monkeypatch):
    from tqdm import tqdm

    def full_disk(path, state):
        raise ValueError(f"{path}: cannot write the checkpoint")

    monkeypatch.setattr(training, "save_checkpoint", full_disk)
    experiment = default_experiment()
    with pytest.raises(ValueError, match="cannot write the checkpoint") as raised:  # keeps the frames, and with them the bar
        train(experiment.model, load_dataset(experiment.dataset), dataclasses.replace(experiment.training, max_epochs=2),
              progress=True, log=None, checkpoint=tmp_path / "checkpoint.pt")
    assert raised.traceback and not tqdm._instances, "a bar left open is drawn over by the error message"
