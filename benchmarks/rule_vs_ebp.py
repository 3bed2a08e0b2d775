"""Cost of a DeepAGREL training step against an EBP (autograd) step on the paper's MNIST nets.

    python benchmarks/rule_vs_ebp.py [--device cpu|cuda] [--feedback tied] [--repeats 100]
                                     [--nets mnist_conv3 mnist_loccon3 mnist_fc3]

For each net (batch 100): the median wall time of one training step of each rule, measured
alternately in one process, with the median ratio of adjacent steps, and the peak memory of one step above what the process held
before it (on the CPU: the rise of the resident set, VmHWM after resetting it through
/proc/self/clear_refs, each rule in a fresh process whose allocator returns freed blocks to the
system; on CUDA: torch.cuda.max_memory_allocated), in MiB. Steps run as in training, under
``full_precision_cudnn`` (on a GPU: deterministic cuDNN, no TF32) and without the check of the
images' range (which makes the host wait for a GPU).
Prints the DeepAGREL/EBP ratios side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from agrel_sim import build, load_model
from agrel_sim.backends import check_device
from agrel_sim.training import full_precision_cudnn

NETS = ("mnist_conv3", "mnist_loccon3", "mnist_fc3")
BATCH = 100


def make(net_name, rule, feedback, device):
    description = load_model(net_name).replace(rule={"name": rule, "feedback": feedback})
    net = build(description, device=device, seed=0)
    g = torch.Generator().manual_seed(0)
    images = torch.rand((BATCH, *description.input_shape), generator=g).to(device)
    labels = torch.randint(description.n_actions, (BATCH,), generator=g).to(device)
    return net, images, labels


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def checked_by(check):
    """An argparse type: the text as given, where ``check(text)`` raises no ValueError (whose
    message argparse then shows)."""
    def argument(text: str) -> str:
        try:
            check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return argument


device_here = checked_by(check_device)  # a device this machine has (cpu, cuda, cuda:N)
model_name = checked_by(load_model)  # the name or path of a model file


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@full_precision_cudnn()
def step_times(net_name, feedback, device, repeats):
    """Median step time of each rule, and the median ratio of steps taken back to back.

    The rules alternate step by step, so that both see the same machine load; the ratio of each
    adjacent pair is robust to load that drifts during the run.
    """
    runs = {rule: make(net_name, rule, feedback, device) for rule in ("deepagrel", "ebp")}
    times = {rule: [] for rule in runs}
    for round_ in range(repeats + 3):
        for rule, (net, images, labels) in runs.items():
            sync(device)
            start = time.perf_counter()
            net.run_trials(images, labels, check_range=False)
            sync(device)
            if round_ >= 3:  # warm-up rounds are not counted
                times[rule].append(time.perf_counter() - start)
    ratio = statistics.median(a / e for a, e in zip(times["deepagrel"], times["ebp"]))
    return {rule: statistics.median(t) for rule, t in times.items()}, ratio


def _resident_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@full_precision_cudnn()
def step_peak_memory(net_name, rule, feedback, device):
    """Peak bytes one training step needs above what the process holds before it."""
    net, images, labels = make(net_name, rule, feedback, device)
    net.run_trials(images, labels, check_range=False)  # warm-up: one-time allocations of the libraries
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        net.run_trials(images, labels, check_range=False)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM (peak resident set) to the current resident set
    net.run_trials(images, labels, check_range=False)
    return (_resident_kib("VmHWM") - before) * 1024


def peak_memory_in_fresh_process(net_name, rule, feedback, device):
    code = (
        f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import rule_vs_ebp as b; "
        f"print(json.dumps(b.step_peak_memory({net_name!r}, {rule!r}, {feedback!r}, {device!r})))"
    )
    # With a fixed mmap threshold glibc serves every block over 16 KiB by mmap and returns it to
    # the system when freed, so the resident set follows the live tensors instead of a cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_here, default="cpu")
    parser.add_argument("--feedback", default="tied", choices=["tied", "reciprocal", "independent"])
    parser.add_argument("--repeats", type=positive_int, default=100)
    parser.add_argument("--nets", type=model_name, nargs="+", default=list(NETS))
    args = parser.parse_args()
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} batch={BATCH} feedback={args.feedback}")
    print(f"{'net':16s} {'DeepAGREL ms':>12s} {'EBP ms':>8s} {'time ratio':>10s} {'DeepAGREL MiB':>13s} {'EBP MiB':>8s} {'mem ratio':>9s}")
    for net_name in args.nets:
        times, time_ratio = step_times(net_name, args.feedback, args.device, args.repeats)
        memory = {rule: peak_memory_in_fresh_process(net_name, rule, args.feedback, args.device) for rule in ("deepagrel", "ebp")}
        print(
            f"{net_name:16s} {times['deepagrel'] * 1e3:12.1f} {times['ebp'] * 1e3:8.1f} {time_ratio:10.3f} "
            f"{memory['deepagrel'] / 2**20:13.1f} {memory['ebp'] / 2**20:8.1f} {memory['deepagrel'] / memory['ebp']:9.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
