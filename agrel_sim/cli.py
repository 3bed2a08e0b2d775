"""The ``agrel-sim`` command line: train, sweep, table, figure3, analyze."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import warnings
from pathlib import Path

# The commands import agrel_sim's modules (and with them torch, about a second) when they run, inside
# main's handling of Ctrl-C, so that an interrupt while they load ends as quietly as one later.

KEPT = "; every finished epoch is kept: `agrel-sim train ... --resume` (a run) or the same `agrel-sim sweep` command (a sweep) goes on from there"
TRAINING_COMMANDS = ("train", "sweep")  # those whose stop KEPT is said of


def _train(args) -> int:
    from tqdm.auto import tqdm

    from agrel_sim.config import home_expanded
    from agrel_sim.experiment import default_experiment, load_experiment
    from agrel_sim.runs import default_run_folder, run_experiment

    experiment = load_experiment(args.experiment) if args.experiment else default_experiment()
    if args.rule:
        try:
            experiment = experiment.with_rule(args.rule)
        except ValueError as error:
            raise ValueError(f"--rule {args.rule} does not fit experiment {experiment.name!r}: {error}") from None
    stopping = {name: value for name, value in (("max_epochs", args.max_epochs), ("patience", args.patience)) if value is not None}
    if stopping:
        try:
            training = dataclasses.replace(experiment.training, **stopping)
        except ValueError as error:  # a patience that does not go with the file's lr_decay_patience
            raise ValueError(f"--patience {args.patience} does not fit experiment {experiment.name!r}: {experiment.source}: training.{error}") from None
        experiment = dataclasses.replace(experiment, training=training)
    out = home_expanded(args.out, "--out") if args.out else default_run_folder(experiment, args.seed)
    model = experiment.model
    print(f"experiment {experiment.name} ({experiment.source}): model {model.name}, rule {model.rule.name}, learning rate {model.rule.learning_rate:g}, data {experiment.dataset}, seed {args.seed}, device {args.device}", flush=True)
    result = run_experiment(
        experiment, args.seed, out, device=args.device, dtype=args.dtype, data_dir=args.data_dir, resume=args.resume,
        log=None if args.quiet else tqdm.write,  # lines that leave the progress bar intact
        progress=False if args.quiet else None,
    )
    print(f"run file: {out / 'run.h5'}", flush=True)
    print(f"summary: experiment={experiment.name} rule={model.rule.name} seed={args.seed} {result.summary()}", flush=True)
    return 0


def _sweep(args) -> int:
    from agrel_sim.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.sweep)
    failures = run_sweep(sweep, args.out, jobs=args.jobs, executor=args.executor, device=args.device, data_dir=args.data_dir)
    if failures:
        print(f"agrel-sim: {len(failures)} run(s) failed; run the same command again to retry only those", file=sys.stderr)
        return 1
    return 0


def _averaged_runs(path: str) -> list:
    """The runs (:class:`agrel_sim.analysis.Run`) under ``path`` for Table 1 or Figure 3, which
    list incomplete runs as left out and use no gate records: loaded without the warnings about those."""
    from agrel_sim.analysis import IncompleteRunWarning, OlderRunFileWarning, load_runs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteRunWarning)
        warnings.simplefilter("ignore", OlderRunFileWarning)
        return load_runs(path)


def _beside(runs: str, name: str) -> Path:
    """``name`` in the folder ``runs``, or beside ``runs`` when it is a run file: where a
    command writes what it makes of them by default."""
    return (Path(runs) if Path(runs).is_dir() else Path(runs).parent) / name


def _table(args) -> int:
    from agrel_sim.analysis import table1_records
    from agrel_sim.config import home_expanded
    from agrel_sim.table import is_capped, is_diverged, markdown, table1, write_csv

    runs = _averaged_runs(args.runs)
    incomplete = [str(run.path) for run in runs if not run.complete]
    left_out = f"{len(incomplete)} incomplete run(s) left out (still running, killed or crashed; --resume or the sweep again finishes them): {', '.join(incomplete)}"
    records = table1_records(runs)
    if not records:
        raise ValueError(f"{args.runs}: no complete runs here" + (f"; {left_out}" if incomplete else ""))
    table = table1(records)
    csv_path = home_expanded(args.csv, "--csv") if args.csv else _beside(args.runs, "table1.csv")
    try:
        write_csv(table, csv_path)  # before the table is printed, so that a refused path is the only output
    except OSError as error:
        raise ValueError(f"{csv_path}: cannot write the CSV ({error.strerror}); give a writable path with --csv") from None
    print(markdown(table))
    print(f"\n{len(records)} run(s); CSV written to {csv_path}")
    diverged = [str(record["path"]) for record in records if is_diverged(record["result"])]
    if diverged:
        print(f"{len(diverged)} diverged run(s), counted as not converged and left out of the accuracies and epochs (a lower learning rate may help): {', '.join(diverged)}")
    at_max_epochs = [str(record["path"]) for record in records if is_capped(record["result"])]
    if at_max_epochs:
        print(f"{len(at_max_epochs)} run(s) reached max_epochs before the stopping criterion, counted as not converged; their epochs to stop are a lower bound (≥ in the table), "
              f"and a larger max_epochs continues them (train --resume --max-epochs N, or the sweep again): {', '.join(at_max_epochs)}")
    if incomplete:
        print(left_out)
    return 0


def _figure3(args) -> int:
    from matplotlib.backend_bases import FigureCanvasBase

    from agrel_sim.analysis import figure3_runs, plot_reward_curves
    from agrel_sim.config import home_expanded

    out = home_expanded(args.out, "--out") if args.out else _beside(args.runs, "figure3.png")
    formats = FigureCanvasBase.get_supported_filetypes()  # what savefig writes, by suffix
    if out.is_dir() or out.suffix[1:].lower() not in formats:
        raise ValueError(f"--out {out}: {'a folder' if out.is_dir() else 'not a name of an image file'}; give a file name whose suffix names its format: {', '.join(f'.{suffix}' for suffix in sorted(formats))}")
    _check_image_format(out)
    drawn, notes = figure3_runs(_averaged_runs(args.runs))
    for note in notes:
        print(note)
    if not drawn:
        raise ValueError(f"{args.runs}: no complete runs of a Table 1 row to draw" + ("; see the lines above" if notes else ""))
    print(f"Figure 3 ({len(drawn)} runs) written to {plot_reward_curves(drawn, out)}")
    return 0


def _check_image_format(out: Path) -> None:
    """Raise ValueError naming ``--out`` where matplotlib cannot write its format on this machine
    (``.pgf`` with text needs a TeX installation): found on a small figure, before any drawing."""
    import io

    from agrel_sim.analysis import _figure

    fig = _figure(figsize=(1, 1))
    fig.text(0.5, 0.5, "x")
    try:
        fig.savefig(io.BytesIO(), format=out.suffix[1:].lower())
    except Exception as error:  # each format's writer fails in its own way
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"--out {out}: matplotlib cannot write {out.suffix} files on this machine ({detail}); give a file name ending in .png, .pdf or .svg") from None


def _analyze(args) -> int:
    from agrel_sim.analysis import analyze
    from agrel_sim.config import home_expanded

    path = Path(args.path)
    out = home_expanded(args.out, "--out") if args.out else _beside(path, "analysis")
    text, figures = analyze(path, out, trial=args.trial)
    print(text)
    print(f"\n{len(figures)} figures written to {out}")
    return 0


class OutputError(OSError):
    """Writing the command's output (standard output) failed."""


class _CheckedOutput:
    """Standard output whose failed writes raise :class:`OutputError`, told apart from failures
    elsewhere; a closed pipe stays a ``BrokenPipeError``."""

    def __init__(self, stream):
        self.stream = stream

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def write(self, text: str) -> int:
        return self._checked(self.stream.write, text)

    def flush(self) -> None:
        self._checked(self.stream.flush)

    @staticmethod
    def _checked(call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as error:
            raise OutputError(error.errno, error.strerror) from error


def _to_nothing(stream) -> None:
    """Send what is still written to ``stream`` (its file descriptor) to the null device."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _given(text: str) -> str:
    """An argparse type: a name or path that is not empty (an unset shell variable gives one)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty; give a name or a path (is a shell variable unset?)")
    return text


def _integer_from(minimum: int, maximum: int | None = None):
    """An argparse type: an integer of at least ``minimum`` (and at most ``maximum``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}; give an integer of at least {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{value} is above {maximum}; give an integer of at most {maximum}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``agrel-sim`` with its commands train, sweep, table, figure3 and analyze.

    Each command's arguments carry a ``handler`` that :func:`main` calls with them.

    Returns
    -------
    argparse.ArgumentParser
    """
    from agrel_sim import __version__
    from agrel_sim.runs import DTYPES, MAX_SEED
    from agrel_sim.sweep import EXECUTORS

    root = argparse.ArgumentParser(prog="agrel-sim", description="Simulate deep networks of cortical columns that learn by reinforcement (DeepAGREL).")
    root.add_argument("--version", action="version", version=f"agrel-sim {__version__}")
    commands = root.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one run of an experiment", description="Train one run; with no EXPERIMENT, the embedded default (8×8 digits, DeepAGREL).")
    train.add_argument("experiment", nargs="?", type=_given, help="experiment name (looked up in $AGREL_SIM_EXPERIMENTS, ./experiments and the checkout's experiments/) or path to a .toml file")
    train.add_argument("--seed", type=_integer_from(0, MAX_SEED), default=0, help=f"seed of the run, 0 to {MAX_SEED} (default 0)")
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    train.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="precision of the weights and activity (default float32)")
    train.add_argument("--rule", choices=["deepagrel", "ebp"], help="run the experiment with this rule, at its learning rate; with the other rule than the experiment's, the run is named <experiment>_as_<rule>")
    train.add_argument("--max-epochs", type=_integer_from(1), help="override the experiment's training.max_epochs (a short trial run)")
    train.add_argument("--patience", type=_integer_from(1), help="override the experiment's training.patience (epochs without a better validation accuracy before stopping)")
    train.add_argument("--out", type=_given, help="run folder for the result (default runs/<experiment>/seed<N>)")
    train.add_argument("--data-dir", type=_given, help="folder holding the data sets (default $AGREL_SIM_DATA or ./data)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint; a finished run goes on when the patience or epoch limit in force (the experiment's, or --patience / --max-epochs) is higher than the run's")
    train.add_argument("--quiet", action="store_true", help="print only the experiment, run-file and summary lines: no progress bar, no data, per-epoch, resume or divergence lines")
    train.set_defaults(handler=_train)

    sweep = commands.add_parser("sweep", help="run every experiment × seed of a sweep file", description="Run a sweep; finished runs are skipped, so re-running retries only the missing ones.")
    sweep.add_argument("sweep", type=_given, help="sweep name (looked up as an experiment name is) or path to a .toml file")
    sweep.add_argument("--jobs", type=_integer_from(1), help="runs at once (default 1); with --executor slurm, SLURM jobs at once (default: the [slurm] table's slurm_array_parallelism, else the number of runs)")
    sweep.add_argument("--executor", choices=EXECUTORS, default="local", help="a process per run on this machine (default), slurm via submitit, or submitit-local")
    sweep.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, for every run (default cpu)")
    sweep.add_argument("--out", type=_given, help="output folder (default: the sweep file's out)")
    sweep.add_argument("--data-dir", type=_given, help="folder holding the data sets (default $AGREL_SIM_DATA or ./data)")
    sweep.set_defaults(handler=_sweep)

    table = commands.add_parser("table", help="print Table 1 from finished runs", description="Print the paper's Table 1 as Markdown from a folder of runs and write it as CSV.")
    table.add_argument("runs", type=_given, help="folder searched recursively for run files (run.h5)")
    table.add_argument("--csv", type=_given, help="CSV path, ending in .csv (default RUNS/table1.csv)")
    table.set_defaults(handler=_table)

    figure3 = commands.add_parser("figure3", help="draw Figure 3 from finished runs", description="Draw the paper's Figure 3 from a folder of runs: reward probability per epoch, DeepAGREL against EBP, mean ± 2σ over the complete runs, a panel per Table 1 row.")
    figure3.add_argument("runs", type=_given, help="folder searched recursively for run files (run.h5)")
    figure3.add_argument("--out", type=_given, help="image path (default RUNS/figure3.png; the suffix names the format: .png, .pdf, .svg)")
    figure3.set_defaults(handler=_figure3)

    analyze_cmd = commands.add_parser("analyze", help="summarise runs and draw their figures", description="Print a summary of a run file (or of every run under a folder) and write PNG figures: reward curves, gating per layer over epochs, the alignment of feedback with feedforward weights, RPE distribution, activity maps, and one traced trial of Brian2 runs.")
    analyze_cmd.add_argument("path", metavar="RUN_OR_DIR", type=_given, help="a run file (run.h5) or a folder of runs")
    analyze_cmd.add_argument("--out", type=_given, help="folder for the figures (default RUN_OR_DIR/analysis, or analysis beside a run file)")
    analyze_cmd.add_argument("--trial", type=int, metavar="N", help="which traced trial of a Brian2 run to draw, in the order they ran: 0 the first, -1 the last (default)")
    analyze_cmd.set_defaults(handler=_analyze)
    return root


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on the terminal, like errors (not Python's file and source line)."""
    print(f"agrel-sim: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Run ``agrel-sim`` with the arguments ``argv`` (default ``sys.argv[1:]``).

    Parameters
    ----------
    argv : list of str or None
        The command line after ``agrel-sim``; None: the process's own.

    Returns
    -------
    int
        The exit status: 0 on success, 1 when runs failed, memory ran out or the output could not
        be written (a full disk), 2 for bad input
        (the message on stderr names the field), 130 when interrupted by Ctrl-C, 141 when the
        reader of its output went away (a closed pipe).

    Raises
    ------
    SystemExit
        For arguments that do not parse (status 2, from argparse) and for ``--help``.
    """
    if hasattr(sys.stdout, "reconfigure"):  # a line at a time into a pipe (`| tee log`) too, as on a terminal
        sys.stdout.reconfigure(line_buffering=True)
    command = None
    with warnings.catch_warnings(), contextlib.ExitStack() as restore:  # Python's own display of warnings and stdout, on return
        warnings.showwarning = _show_warning
        restore.callback(setattr, sys, "stdout", sys.stdout)
        sys.stdout = _CheckedOutput(sys.stdout)
        try:
            args = parser().parse_args(argv)
            command = args.command
            return args.handler(args)
        except ValueError as error:  # bad input: configuration, data, devices, run files
            print(f"agrel-sim: error: {error}", file=sys.stderr)
            return 2
        except (MemoryError, RuntimeError) as error:
            # torch's CPU allocator raises a plain RuntimeError with one of these texts (CUDA's is
            # torch.cuda.OutOfMemoryError); the second, for a tensor of more than 2**63 bytes
            too_big = ("can't allocate memory", "Storage size calculation overflowed")
            import torch  # loaded already: the error came from it

            if not isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) and not any(text in str(error) for text in too_big):
                raise
            detail = (str(error).strip().splitlines() or [type(error).__name__])[-1]
            print(
                f"agrel-sim: error: out of memory ({detail}); check the layer sizes of the model, or lower"
                " training.batch_size or training.eval_batch_size in a new run folder (a run goes on only with the settings it began with);"
                " every finished epoch is kept",
                file=sys.stderr,
            )
            return 1
        except KeyboardInterrupt:
            print(f"agrel-sim: interrupted{KEPT if command in TRAINING_COMMANDS else ''}", file=sys.stderr)
            return 130  # the shell's status for a process ended by Ctrl-C
        except BrokenPipeError:  # the reader of its output has gone: `agrel-sim table RUNS | head -3`
            _to_nothing(sys.stdout)  # Python flushes stdout as it exits: into nothing, not the closed pipe again
            try:
                print(f"agrel-sim: stopped: its output was closed{KEPT if command in TRAINING_COMMANDS else ''}", file=sys.stderr, flush=True)
            except BrokenPipeError:  # stderr went to the same reader (`2>&1 | head`)
                _to_nothing(sys.stderr)
            return 141  # the shell's status for a process ended by SIGPIPE, as other commands in a pipe end
        except OutputError as error:  # `> log` on a full disk or over quota
            _to_nothing(sys.stdout)
            print(f"agrel-sim: error: cannot write its output ({error.strerror or error}){KEPT if command in TRAINING_COMMANDS else ''}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
