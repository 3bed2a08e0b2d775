"""Cost of recording a run file at the default logging settings, and the size it reaches.

    python benchmarks/logging_cost.py [--net mnist_conv3] [--rule deepagrel] [--batches 490]

Runs one epoch's worth of training steps (batch 100; 490 batches is an MNIST epoch with 1,000
images held out) twice, step by step alternately: without recording, and with
``run_trials(record=True)`` plus the run file's per-batch buffering, the epoch's write and flush
counted in; steps run as in training (under ``full_precision_cudnn``, without the check of the
images' range). Prints the time of each, their ratio (and the median ratio of adjacent steps,
which resists drifting machine load), the file's size after the epoch, what a second epoch of
logged steps (not timed) adds to it, and the size projected from these to a run of 100, 200 and
300 epochs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from agrel_sim import build, load_model
from agrel_sim.recorder import LogSettings, RunFile
from agrel_sim.training import EpochMetrics, full_precision_cudnn
from rule_vs_ebp import device_here, model_name, positive_int, sync  # the script beside this one (its folder is on the path)


@full_precision_cudnn()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", type=model_name, default="mnist_conv3")
    parser.add_argument("--rule", default="deepagrel", choices=["deepagrel", "ebp"])
    parser.add_argument("--batches", type=positive_int, default=490)
    parser.add_argument("--device", type=device_here, default="cpu")
    args = parser.parse_args()
    description = load_model(args.net).replace(rule={"name": args.rule})
    plain, logged = (build(description, device=args.device, seed=0) for _ in range(2))
    g = torch.Generator().manual_seed(0)
    images = torch.rand((100, *description.input_shape), generator=g).to(args.device)
    labels = torch.randint(description.n_actions, (100,), generator=g).to(args.device)
    index = torch.arange(100, device=args.device)
    settings = LogSettings()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.h5"
        recorder = RunFile(path, logged, {"experiment": "benchmark", "dataset": "random images"}, 0, settings)
        steps = {"plain": [], "logged": []}
        for batch in range(args.batches):  # sync: each time ends when a GPU's queued work is done
            sync(args.device)
            start = time.perf_counter()
            plain.run_trials(images, labels, check_range=False)
            sync(args.device)
            steps["plain"].append(time.perf_counter() - start)
            start = time.perf_counter()
            trials = logged.run_trials(images, labels, record=True, check_range=False)
            recorder.record_batch(1, batch, index, labels, trials)
            sync(args.device)
            steps["logged"].append(time.perf_counter() - start)
            del trials
        start = time.perf_counter()
        recorder.write_epoch(1, EpochMetrics(1, 0.5, 0.1, 0.5, 1.0, logged.learning_rate))
        sync(args.device)
        write = time.perf_counter() - start
        size = path.stat().st_size
        for batch in range(args.batches):  # a second epoch: what each further epoch adds (the file's fixed part once)
            recorder.record_batch(2, batch, index, labels, logged.run_trials(images, labels, record=True, check_range=False))
        recorder.write_epoch(2, EpochMetrics(2, 0.5, 0.1, 0.5, 1.0, logged.learning_rate))
        growth = path.stat().st_size - size
    plain_total, logged_total = sum(steps["plain"]), sum(steps["logged"]) + write
    # Adjacent steps see the same machine load: the median of their ratios resists load that
    # drifts during the run; the epoch's write is added as a share of the epoch.
    step_ratio = statistics.median(b / a for a, b in zip(steps["plain"], steps["logged"]))
    print(f"net={args.net} rule={args.rule} device={args.device} threads={torch.get_num_threads()} batches={args.batches} settings={settings}")
    print(f"epoch without logging {plain_total:.2f} s, with logging {logged_total:.2f} s (end-of-epoch write {write:.3f} s): ratio {logged_total / plain_total:.3f}")
    print(f"median ratio of adjacent steps {step_ratio:.3f}; with the write: {step_ratio + write / plain_total:.3f}")
    print(f"run file after one epoch: {size / 2**20:.2f} MiB, and {growth / 2**20:.2f} MiB more after a second; projected for 100 / 200 / 300 epochs: "
          + " / ".join(f"{(size + (n - 1) * growth) / 2**20:.0f} MiB" for n in (100, 200, 300)))


if __name__ == "__main__":
    main()
