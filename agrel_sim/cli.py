"""The ``agrel-sim`` command line."""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

from agrel_sim.config import ConfigError
from agrel_sim.datasets import load_dataset
from agrel_sim.experiment import default_experiment, load_experiment
from agrel_sim.training import train

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _train(args) -> int:
    experiment = load_experiment(args.experiment) if args.experiment else default_experiment()
    model = experiment.model
    if args.rule:
        model = model.replace(rule={"name": args.rule})
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    data = load_dataset(experiment.dataset)
    print(
        f"experiment {experiment.name} ({experiment.source}): model {model.name}, rule {model.rule.name}, "
        f"data {data.name} ({len(data.train_labels)} train / {len(data.test_labels)} test), "
        f"seed {args.seed}, device {args.device}",
        flush=True,
    )
    result = train(
        model, data, experiment.training, seed=args.seed, device=args.device, dtype=DTYPES[args.dtype],
        log=None if args.quiet else tqdm.write,  # lines that leave the progress bar intact
    )
    print(f"summary: experiment={experiment.name} rule={model.rule.name} seed={args.seed} {result.summary()}", flush=True)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="agrel-sim", description="Simulate deep networks of cortical columns that learn by reinforcement (DeepAGREL).")
    commands = root.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train one run of an experiment", description="Train one run; with no EXPERIMENT, the embedded default (8×8 digits, DeepAGREL).")
    train_cmd.add_argument("experiment", nargs="?", help="experiment name (in experiments/) or path to a .toml file")
    train_cmd.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    train_cmd.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    train_cmd.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    train_cmd.add_argument("--rule", choices=["deepagrel", "ebp"], help="override the experiment's rule")
    train_cmd.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    train_cmd.set_defaults(run=_train)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # ConfigError and the input checks of the backends
        print(f"agrel-sim: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
