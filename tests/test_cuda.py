"""The PyTorch backend learns the same on a GPU as on the CPU. Skipped where there is no GPU.

The scenarios, the oracle of the rule and the run files run on CUDA too (``devices.DEVICES``);
here the two devices are compared with each other.
"""

import collections
import traceback
import warnings

import pytest
import torch

from agrel_sim import ColumnNetwork, Conv2d, Dense, LocallyConnected2d, Rule, build, load_model
from agrel_sim.augmentation import Augmentation, augment
from agrel_sim.experiment import Experiment
from agrel_sim.runs import run_experiment
from agrel_sim.training import full_precision_cudnn
from devices import needs_cuda

pytestmark = needs_cuda

# Every kind of layer with weights, strided and padded sheets included; no dropout, whose masks
# come from each device's own generator.
SHEETS = ColumnNetwork(
    (2, 10, 10), [Conv2d(6, 3, padding=1), LocallyConnected2d(4, 3, stride=2), Conv2d(5, 2, stride=2), Dense(12)], 6,
    rule=Rule(learning_rate=0.5, init_range=0.3, bias=True),
)


def learn(description, device, dtype, batch=16, batches=4):
    """Weights after ``batches`` batches of the same trials, and the last batch's Q-values.

    DeepAGREL is given the actions (each device draws its own); EBP learns from the labels alone.
    """
    net = build(description, device=device, dtype=dtype, seed=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(batches):
        images = torch.rand((batch, *description.input_shape), generator=g, dtype=torch.float64).to(dtype)
        labels, actions = (torch.randint(description.n_actions, (batch,), generator=g) for _ in range(2))
        trials = net.run_trials(images, labels, actions=actions if description.rule.name == "deepagrel" else None)
    return {k: v.double().cpu() for k, v in net.weights().items()}, trials.q.double().cpu()


def largest_relative_difference(a, b):
    """The largest difference of two dicts of tensors, relative to the largest entry of ``b``'s tensor."""
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-300)).item() for k in b)


@pytest.mark.parametrize("rule", ["deepagrel", "ebp"])
def test_cuda_learns_the_same_weights_as_the_cpu(rule):
    description = SHEETS.replace(rule={"name": rule})
    cpu, q_cpu = learn(description, "cpu", torch.float64)
    cuda, q_cuda = learn(description, "cuda", torch.float64)
    assert cuda.keys() == cpu.keys()
    assert largest_relative_difference(cuda, cpu) < 1e-12
    torch.testing.assert_close(q_cuda, q_cpu, rtol=1e-12, atol=1e-12)


def test_float32_convolutions_on_cuda_compute_in_float32_under_full_precision_cudnn():
    # With cuDNN's defaults an H200 computed the strided 32-channel convolution of mnist_conv3
    # in TF32 (10 mantissa bits). Measured there, relative to float64 on the CPU: 3e-4 in that
    # convolution's output against 9e-7 under full_precision_cudnn; after these batches 1.5e-5
    # against 2.2e-7 in the weights and 2.4e-4 against 4.8e-7 in the Q-values.
    description = load_model("mnist_conv3")
    description = description.replace(layers=[layer for layer in description.layers if layer.kind != "dropout"])
    reference, q_reference = learn(description, "cpu", torch.float64, batch=32)
    with full_precision_cudnn():
        cuda, q_cuda = learn(description, "cuda", torch.float32, batch=32)
    assert largest_relative_difference(cuda, reference) < 1e-6
    assert largest_relative_difference({"q": q_cuda}, {"q": q_reference}) < 1e-5


def test_augmentation_draws_on_the_device_and_repeats_with_its_generator():
    images = torch.rand((50, 3, 12, 12), generator=torch.Generator().manual_seed(0)).cuda()
    settings = Augmentation(factor=1, zoom=0.2, shift=0.2, flip=True)
    first = augment(images, settings, torch.Generator(device="cuda").manual_seed(5))
    again = augment(images, settings, torch.Generator(device="cuda").manual_seed(5))
    assert first.device.type == "cuda" and torch.equal(first, again)
    assert not torch.equal(first, images)


def test_training_batches_never_wait_for_the_gpu(tmp_path, monkeypatch):
    # torch's sync debug mode warns at every operation that makes the host wait for the GPU; the
    # hook counts them by the innermost line of agrel_sim that asked.
    counts = collections.Counter()

    def count(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack() if "agrel_sim" in f.filename]
        counts[f"{frames[-1].filename.rsplit('agrel_sim', 1)[-1]}:{frames[-1].lineno}" if frames else f"{filename}:{lineno}"] += 1

    model = {
        "name": "small", "input_shape": [1, 8, 8], "output": {"actions": 10},
        "layers": [{"kind": "conv", "channels": 8, "kernel_size": 3}, {"kind": "dropout", "rate": 0.5}, {"kind": "dense", "units": 32}],
    }
    batches = 0
    for rule in ("deepagrel", "ebp"):
        training = {"batch_size": 20, "max_epochs": 2, "patience": 10, "validation_size": 200, "augmentation": {"factor": 1}}
        experiment = Experiment.from_dict({"name": f"small_{rule}", "model": model, "dataset": "digits", "rule": {"name": rule}, "training": training}, "<test>")
        monkeypatch.setattr(warnings, "showwarning", count)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = run_experiment(experiment, out=tmp_path / rule, device="cuda", log=None)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        batches += -(-(1437 - 200) // 20) * result.epochs  # digits: 1,437 training images
    print(f"{batches} batches; synchronising lines: {dict(counts)}")
    # A line that waits once per batch of either rule counts at least half the batches; the
    # epoch's end (validation, run file, checkpoint) waits a few times per epoch.
    assert counts, "the hook saw no synchronisation, not even at the epochs' ends"
    per_batch = {line: n for line, n in counts.items() if n >= batches // 2}
    assert not per_batch, f"lines that wait for the GPU in every batch: {per_batch} ({batches} batches)"
