"""Trials per second of the Brian2 backend on a 64-32-10 column network, numpy against Cython.

    python benchmarks/brian2_trials.py [--batches 1 10 100] [--repeats 3] [--targets numpy cython]
                                       [--freeze-gc]

Each batch of trials is one Brian2 run of the default timeline (220 time steps of 1 ms per
trial: 100 ms stimulus, 20 ms selection, 80 ms feedback, 10 ms RPE, 10 ms plasticity) with
learning on. For every code generation target and batch size it prints the median wall time
of a batch over ``--repeats`` batches (after one batch of warm-up, which for Cython includes
compiling on first use) and the trials per second that follow from it.

Every Brian2 run starts with a full garbage collection (``gc.collect()`` in
``brian2.Network.run``) whose cost grows with the objects the process holds (torch alone adds
about 0.15 s); with ``--freeze-gc`` the objects that exist after set-up are moved out of the
collector's reach (``gc.freeze()``), which shows how much of the per-batch cost that is.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch

from agrel_sim import ColumnNetwork, Dense, Rule, build
from rule_vs_ebp import positive_int  # the script beside this one (its folder is on the path)

SHAPE = (64, 32, 10)


def network() -> ColumnNetwork:
    return ColumnNetwork((SHAPE[0],), [Dense(SHAPE[1])], SHAPE[2], rule=Rule(learning_rate=0.1, init_range=0.1), name="bench_64_32_10")


def batch_seconds(target: str, batch: int, repeats: int, freeze_gc: bool) -> float:
    net = build(network(), backend="brian2", codegen_target=target, seed=0)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, SHAPE[0], generator=g)
    labels = torch.randint(SHAPE[2], (batch,), generator=g)
    net.run_trials(images, labels)  # warm-up
    if freeze_gc:
        gc.collect()
        gc.freeze()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        net.run_trials(images, labels)
        times.append(time.perf_counter() - start)
    if freeze_gc:
        gc.unfreeze()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 10, 100], help="trials per batch (per Brian2 run)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed batches per measurement")
    parser.add_argument("--targets", nargs="+", choices=["numpy", "cython"], default=["numpy", "cython"])
    parser.add_argument("--freeze-gc", action="store_true", help="gc.freeze() after set-up (see above)")
    args = parser.parse_args()
    print(f"network {'-'.join(map(str, SHAPE))}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, freeze_gc={args.freeze_gc}")
    print(f"{'target':8} {'batch':>6} {'s/batch':>9} {'trials/s':>9}")
    for target in args.targets:
        for batch in args.batches:
            seconds = batch_seconds(target, batch, args.repeats, args.freeze_gc)
            print(f"{target:8} {batch:6d} {seconds:9.3f} {batch / seconds:9.1f}", flush=True)


if __name__ == "__main__":
    main()
