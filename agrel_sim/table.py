"""The paper's Table 1 from finished runs: test accuracy and epochs to stop, DeepAGREL against EBP."""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from agrel_sim.config import written_beside
from agrel_sim.network import RULES


def is_diverged(result: dict) -> bool:
    """Whether a run stopped because its loss ran off to inf or NaN.

    Parameters
    ----------
    result : dict
        A run's result (``/result`` of its run file): ``converged``, ``diverged`` (absent in
        runs written before divergence was recorded), ``test_accuracy``, ``epochs``, ...

    Returns
    -------
    bool
        Its ``diverged`` entry; False where there is none.
    """
    return bool(result.get("diverged", False))  # runs written before divergence was recorded had not


def is_capped(result: dict) -> bool:
    """Whether a run reached ``max_epochs`` before the stopping criterion (and did not diverge).

    Parameters
    ----------
    result : dict
        A run's result (``/result`` of its run file): ``converged``, ``diverged`` (absent in
        runs written before divergence was recorded), ``test_accuracy``, ``epochs``, ...

    Returns
    -------
    bool
        True for a run that neither converged nor diverged.
    """
    return not result["converged"] and not is_diverged(result)


@dataclass
class RuleStats:
    """The runs of one rule on one row: seeds, test accuracies, epochs to stop, convergence.

    A run that diverged (its loss ran off to inf or NaN) counts as not converged, and its
    accuracy and epochs stay out of the means: they describe a failure, not the protocol's end.
    A run that reached ``max_epochs`` before the stopping criterion (``capped``) counts as not
    converged but stays in the means: its epochs to stop are a lower bound, and so is the mean.

    Parameters
    ----------
    seeds : list of int
        The seed of every run, diverged ones included, in the order added.
    accuracies : list of float
        Test accuracy, in [0, 1], of every run that did not diverge.
    epochs : list of int
        Epochs run by every run that did not diverge.
    converged : list of bool
        Whether each run, diverged ones included, converged.
    capped : int
        How many runs that did not diverge reached ``max_epochs`` first.
    """

    seeds: list[int] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    capped: int = 0

    def add(self, record: dict) -> None:
        """Count one run, a record of :func:`agrel_sim.analysis.table1_records`: its seed,
        whether it converged and, unless it diverged, its test accuracy and epochs to stop.

        Parameters
        ----------
        record : dict
            With ``seed`` and ``result`` (the run's result: ``converged``, ``test_accuracy``,
            ``epochs`` and possibly ``diverged``).
        """
        result = record["result"]
        self.seeds.append(record["seed"])
        self.converged.append(bool(result["converged"]))
        if not is_diverged(result):
            self.accuracies.append(result["test_accuracy"])
            self.epochs.append(result["epochs"])
            self.capped += is_capped(result)

    @property
    def runs(self) -> int:
        """The runs whose accuracy and epochs are averaged (all but the diverged ones)."""
        return len(self.accuracies)

    def accuracy_mean_std(self) -> tuple[float, float | None]:
        """Mean and sample standard deviation; the deviation of a single run is undefined (None).

        Returns
        -------
        mean : float
            Mean test accuracy, in [0, 1], of the runs averaged (see :attr:`runs`).
        std : float or None
            Their sample standard deviation; None for a single run.

        Raises
        ------
        statistics.StatisticsError
            When no run is averaged.
        """
        mean = statistics.fmean(self.accuracies)
        return mean, statistics.stdev(self.accuracies) if self.runs > 1 else None

    def mean_epochs(self) -> float:
        """The mean number of epochs to stop over the runs averaged (see :attr:`runs`).

        Returns
        -------
        float
            The mean epochs.

        Raises
        ------
        statistics.StatisticsError
            When no run is averaged.
        """
        return statistics.fmean(self.epochs)


def row_key(record: dict) -> tuple[str, str, int]:
    """A Table 1 row: ``(data set, network, augmentation factor)``, the factor 0 without augmentation.

    Parameters
    ----------
    record : dict
        A record of :func:`agrel_sim.analysis.table1_records`: ``dataset``, ``model`` (with its
        ``name``) and, optionally, ``training`` (with its ``augmentation``, if any).

    Returns
    -------
    tuple of (str, str, int)
        The data set, the network's name and the augmentation factor.
    """
    augmentation = record.get("training", {}).get("augmentation")  # a run file made in Python may have no training
    return record["dataset"], record["model"]["name"], augmentation["factor"] if augmentation else 0


def augmentation_label(factor: int) -> str:
    """``"10x"`` for a factor of 10, ``"none"`` for 0.

    Parameters
    ----------
    factor : int
        The augmentation factor, 0 for none.

    Returns
    -------
    str
        The label of the table's augmentation column.
    """
    return f"{factor}x" if factor else "none"


def table1(records: list[dict]) -> list[dict]:
    """One dict per row, with mean ± std test accuracy (%), mean epochs, epoch ratio, convergence.

    Per rule, ``<rule>_runs`` counts the runs averaged (all but the diverged ones),
    ``<rule>_capped`` those of them that reached ``max_epochs`` before the stopping criterion,
    and ``<rule>_seeds`` lists the seeds of all its runs, in order, separated by spaces.

    Parameters
    ----------
    records : list of dict
        Records of :func:`agrel_sim.analysis.table1_records`, one per run.

    Returns
    -------
    list of dict
        One row per ``(data set, network, augmentation)``, sorted: ``dataset``, ``network``,
        ``augmentation``; per rule ``<rule>_acc_mean``, ``<rule>_acc_std``, ``<rule>_epochs``
        (None without runs; std None for a single run), ``<rule>_converged`` (``"k/n"``),
        ``<rule>_runs``, ``<rule>_capped``, ``<rule>_seeds``; and ``epoch_ratio`` (DeepAGREL's
        mean epochs over EBP's, None unless both have runs).
    """
    rows: dict[tuple, dict[str, RuleStats]] = {}
    for record in records:
        rule = record["model"]["rule"]["name"]
        rows.setdefault(row_key(record), {r: RuleStats() for r in RULES})[rule].add(record)
    table = []
    for (dataset, network, factor), stats in sorted(rows.items()):
        row = {"dataset": dataset, "network": network, "augmentation": augmentation_label(factor)}
        for rule in RULES:
            s = stats[rule]
            if s.runs:
                mean, std = s.accuracy_mean_std()
                row[f"{rule}_acc_mean"] = 100 * mean
                row[f"{rule}_acc_std"] = None if std is None else 100 * std
                row[f"{rule}_epochs"] = s.mean_epochs()
            else:
                row[f"{rule}_acc_mean"] = row[f"{rule}_acc_std"] = row[f"{rule}_epochs"] = None
            row[f"{rule}_converged"] = f"{sum(s.converged)}/{len(s.converged)}"
            row[f"{rule}_runs"], row[f"{rule}_capped"] = s.runs, s.capped
            row[f"{rule}_seeds"] = " ".join(str(seed) for seed in sorted(s.seeds))
        both = stats["deepagrel"].runs and stats["ebp"].runs
        row["epoch_ratio"] = stats["deepagrel"].mean_epochs() / stats["ebp"].mean_epochs() if both else None
        table.append(row)
    return table


def _fmt(value, spec):
    return "–" if value is None else format(value, spec)


def _epochs(row: dict, rule: str) -> str:
    """Mean epochs to stop, '≥ mean' when some runs reached max_epochs first (a lower bound)."""
    text = _fmt(row[f"{rule}_epochs"], ".1f")
    return f"≥ {text}" if row[f"{rule}_capped"] else text


def _ratio(row: dict) -> str:
    """The epoch ratio, marked as a bound where capped runs make one of its means a lower bound:
    '≥' (DeepAGREL's), '≤' (EBP's), and '?' after it when both are, which bounds nothing."""
    text = _fmt(row["epoch_ratio"], ".2f")
    if row["epoch_ratio"] is None:
        return text
    capped = (bool(row["deepagrel_capped"]), bool(row["ebp_capped"]))
    return {(True, False): f"≥ {text}", (False, True): f"≤ {text}", (True, True): f"{text}?"}.get(capped, text)


def _accuracy(mean, std):
    """'mean ± std'; the mean alone for a single run; '–' for none."""
    if mean is None:
        return "–"
    return format(mean, ".2f") if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown(table: list[dict]) -> str:
    """Table 1 as Markdown, with a note under it for each row whose two rules ran different seeds.

    Mean epochs of runs that reached ``max_epochs`` before the stopping criterion are lower
    bounds, shown as '≥ mean'; the epoch ratio is then '≥ r' or '≤ r', or 'r?' when both rules
    have such runs.

    Parameters
    ----------
    table : list of dict
        The rows of :func:`table1`.

    Returns
    -------
    str
        The Markdown table (and notes), lines separated by newlines.
    """
    lines = [
        "| data set | network | augmentation | DeepAGREL acc (%) | EBP acc (%) | DeepAGREL epochs | EBP epochs | epoch ratio | converged (DeepAGREL, EBP) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        acc = {r: _accuracy(row[f"{r}_acc_mean"], row[f"{r}_acc_std"]) for r in RULES}
        lines.append(
            f"| {row['dataset']} | {row['network']} | {row['augmentation']} | {acc['deepagrel']} | {acc['ebp']} | "
            f"{_epochs(row, 'deepagrel')} | {_epochs(row, 'ebp')} | {_ratio(row)} | "
            f"{row['deepagrel_converged']}, {row['ebp_converged']} |"
        )
    notes = [
        f"Note: the rules of the row {row['dataset']}, {row['network']}, augmentation {row['augmentation']} ran different seeds "
        f"(DeepAGREL {row['deepagrel_seeds']}; EBP {row['ebp_seeds']}), so it compares them over different initial weights, validation splits and trials."
        for row in table if row["deepagrel_seeds"] and row["ebp_seeds"] and row["deepagrel_seeds"] != row["ebp_seeds"]
    ]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_csv(table: list[dict], path) -> None:
    """Table 1 as CSV, one row per Table 1 row, with the columns of :func:`table1`.

    Parameters
    ----------
    table : list of dict
        The rows of :func:`table1`.
    path : str or os.PathLike
        The CSV file to write (replaced atomically).

    Raises
    ------
    ValueError
        For a path that could overwrite other work: one whose name does not end in ``.csv`` (a
        run file, a checkpoint, an experiment or a sweep file), or an HDF5 file.
    OSError
        Where the file cannot be written.
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ValueError(f"{path}: not a path for the CSV: its name does not end in .csv, and the CSV would overwrite whatever is there (a run's files, an experiment); give a path ending in .csv with --csv")
    if h5py.is_hdf5(path):
        raise ValueError(f"{path}: not a path for the CSV: an HDF5 file (a run file?), which the CSV would overwrite; give another path with --csv")
    # Written beside it and renamed over it: a link at ``path`` is replaced, never written through
    # (into a run's checkpoint, say), and a failed write leaves whatever was there.
    with written_beside(path) as partial, open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]) if table else ["dataset"])
        writer.writeheader()
        writer.writerows(table)
