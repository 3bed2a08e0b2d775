"""Sweeps: many experiments × seeds, on local processes or a SLURM cluster (submitit).

A sweep file in ``experiments/`` lists experiments and seeds::

    name = "table1"
    experiments = ["mnist_conv3_deepagrel", "mnist_conv3_ebp"]   # names or paths
    seeds = [0, 1, 2]
    out = "runs/table1"          # optional; --out overrides

    [slurm]                      # optional: submitit parameters (timeout_min required for --executor slurm)
    timeout_min = 720
    slurm_partition = "gpu"
    gpus_per_node = 1

Each run records itself in ``<out>/<experiment>/seed<N>/run.h5``; runs whose run file is
complete are skipped and interrupted ones resume from their checkpoint, so a sweep can be
started again after a failure and only the missing work executes. A finished run goes on if its
experiment file now has a longer patience or more epochs; a run made with other settings (data
set, model, training, backend, dtype) stops the sweep with an error that names them, before
anything runs. What does not change the protocol, the experiment file's path, the device, the
logging and the Brian2 backend's ``codegen_target`` and ``trace_every``, is not compared for a
finished run; a run that goes on must have the ones it began with.

Locally, each run has a process of its own: a run whose process crashes or is killed fails
alone, and Ctrl-C ends every run in progress (each keeps its finished epochs) and starts no other.
Through submitit, a job that reaches its time limit is requeued and its run goes on from its
checkpoint, and so is a preempted one where the cluster signals preemptions (see
:class:`SubmititRun`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from agrel_sim.backends import check_device
from agrel_sim.config import FILE_KINDS, POSITIVE_INT, ConfigError, Fields, file_kind, find_named_file, home_expanded, in_the_way, is_count, is_folder_name, read_toml, shown
from agrel_sim.datasets import DatasetError, find_data
from agrel_sim.experiment import Experiment, load_experiment
from agrel_sim.recorder import stored_config
from agrel_sim.runs import CHECKPOINT_FILE, MAX_SEED, RUN_FILE, default_run_folder, holding_lock, is_complete, missing_folders, remove_empty_folders, resume_plan, run_config, stored_result, threads_of_epoch
from agrel_sim.training import load_checkpoint

EXECUTORS = ("local", "slurm", "submitit-local")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # submitit-local's time limit per job (submitit's own default is 2 minutes)
MAX_TIMEOUTS = 3  # the times a job out of time is requeued, at most (submitit's max_num_timeout)
# submitit signals a job this many seconds before its time limit, so that it can be requeued
# (its signal_delay_s): on SLURM by default, and always on its local executor.
SLURM_SIGNAL_DELAY_S = 90
LOCAL_SIGNAL_DELAY_S = 30
JOB_FOLDER = "%j"  # the folder of each job's files under OUT/submitit, named by its job ID (submitit's pattern)
POLL_S = 1  # seconds between looks at the submitit jobs running (as submitit's as_completed waits)


@dataclass(frozen=True)
class Sweep:
    """Experiments (as resolved file paths) × seeds, with an output folder and SLURM parameters.

    ``name``: the sweep's name; ``experiments``: paths of experiment files; ``seeds``: the seeds
    each experiment runs with; ``out``: the folder of the runs, ``<out>/<experiment>/seed<N>``;
    ``slurm``: the parameters of the file's ``[slurm]`` table, for submitit; ``source``: where the
    sweep came from. Read one with :func:`load_sweep`.

    Parameters
    ----------
    name : str
        The sweep's name.
    experiments : tuple of str
        Paths of the experiment files.
    seeds : tuple of int
        The seeds each experiment runs with, distinct, from 0 to :data:`~agrel_sim.runs.MAX_SEED`.
    out : str
        The folder of the runs.
    slurm : dict
        The ``[slurm]`` table's submitit parameters (empty by default).
    source : str
        The sweep file's path, or ``"<python>"`` (default) for a sweep made in code.
    """

    name: str
    experiments: tuple[str, ...]
    seeds: tuple[int, ...]
    out: str
    slurm: dict = field(default_factory=dict)
    source: str = "<python>"

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "Sweep":
        """Read a sweep file; a bad entry raises :class:`ConfigError` naming the file and the field.

        Parameters
        ----------
        path : str or os.PathLike
            The sweep file (TOML); experiment paths in it are relative to its folder.

        Returns
        -------
        Sweep
            The sweep, its experiments resolved to file paths; ``name`` defaults to the file's
            stem and ``out`` to ``runs/<name>``.

        Raises
        ------
        ConfigError
            For an experiment or model file given as a sweep file, an experiment entry that is
            not found or not an experiment file, or a missing, bad or unknown field.
        """
        path = Path(path)
        table = read_toml(path)
        advice = {
            "experiment": "run it with `agrel-sim train`, or list it in a sweep file's experiments",
            "model": "name it as the model of an experiment file, and list that in a sweep file's experiments",
        }
        kind = file_kind(table)
        if kind in advice:
            raise ConfigError(f"{path}: {FILE_KINDS[kind][1]}: {advice[kind]}")
        top = Fields(table, str(path))
        name = top.get("name", str, default=path.stem, check=is_folder_name, hint="a non-empty name without '/' or control characters (it names the sweep's folder runs/<name>)")
        entries = top.get("experiments", list, check=lambda v: v and all(isinstance(e, str) for e in v), hint="a non-empty list of experiment names or paths")
        experiments = []
        for index, entry in enumerate(entries):
            try:  # a path is relative to the sweep file's folder
                found = find_named_file(path.parent / home_expanded(entry, "path") if entry.endswith(".toml") else entry, "experiment", "AGREL_SIM_EXPERIMENTS")
                kind = file_kind(read_toml(found))
            except ConfigError as error:
                raise ConfigError(f"{path}: experiments[{index}]: {error}") from None
            if kind in ("sweep", "model"):
                raise ConfigError(f"{path}: experiments[{index}]: {found} is {FILE_KINDS[kind][1]}, not an experiment file; list experiment files, each naming a model and a data set")
            experiments.append(str(found))
        seeds = top.get("seeds", list, check=lambda v: v and all(is_count(s, 0) and s <= MAX_SEED for s in v) and len(set(v)) == len(v), hint=f"a non-empty list of distinct whole-number seeds from 0 to {MAX_SEED}")
        out = top.get("out", str, default=str(Path("runs") / name), check=lambda v: v.strip() != "", hint="a folder for the runs")
        slurm = top.get("slurm", dict, default={})
        top.finish()
        return cls(name, tuple(experiments), tuple(seeds), out, slurm, str(path))


def load_sweep(name_or_path: str | os.PathLike) -> Sweep:
    """Load a sweep file by path, or by name from the experiment search path.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A sweep file's path (``.toml``), or its name, looked up as ``NAME.toml`` in
        ``$AGREL_SIM_EXPERIMENTS``, then ``./experiments`` (:func:`~agrel_sim.config.find_named_file`).

    Returns
    -------
    Sweep
        The sweep (:meth:`Sweep.from_toml`).

    Raises
    ------
    ConfigError
        For a file that is not found or not a valid sweep file.
    """
    return Sweep.from_toml(find_named_file(name_or_path, "experiment", "AGREL_SIM_EXPERIMENTS", what="sweep"))


@dataclass(frozen=True)
class RunTask:
    """One run of a sweep: everything a worker process needs, as plain picklable data.

    Parameters
    ----------
    experiment_path : str
        The experiment file.
    seed : int
        The run's seed.
    folder : str
        The run folder, ``<out>/<experiment>/seed<N>``.
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    data_dir : str or None
        Folder of the data sets; None: the default search.
    threads : int
        The torch threads of the run.
    sweep_process : tuple of (int, str) or None
        For jobs that outlive the sweep (submitit's local executor): the sweep process's
        :func:`process_identity`, whose end ends the run; None otherwise.
    """

    experiment_path: str
    seed: int
    folder: str
    device: str
    data_dir: str | None
    threads: int
    sweep_process: tuple[int, str] | None = None  # for jobs that outlive the sweep: (pid, start time) of its process, whose end ends the run


def process_identity(pid: int) -> tuple[int, str]:
    """A process as :attr:`RunTask.sweep_process` names it: its pid and start time (a pid is used
    again once its process has ended; the pair is not).

    Parameters
    ----------
    pid : int
        The process id.

    Returns
    -------
    tuple of (int, str)
        ``pid`` and its start time (field 22 of ``/proc/<pid>/stat``, in clock ticks since boot).

    Raises
    ------
    OSError
        Where there is no such process (or no ``/proc``).
    """
    with open(f"/proc/{pid}/stat") as stat:  # the name in parentheses may hold spaces: the fields after it
        return pid, stat.read().rsplit(")", 1)[1].split()[19]


def _alive(process: tuple[int, str]) -> bool:
    try:
        return process_identity(process[0]) == process
    except OSError:  # no such process
        return False


def _end_with_sweep(process: tuple[int, str]) -> None:
    """Stop this job's run (as Ctrl-C does: after the batch at hand, its finished epochs kept)
    once the sweep's process has ended: a job of submitit's local executor outlives a sweep
    killed without a chance to cancel it, and would go on holding its run folder's lock."""
    while _alive(process):
        time.sleep(POLL_S)
    signal.raise_signal(signal.SIGINT)


def execute(task: RunTask) -> str:
    """Run one task in a worker (a process of its own, or a submitit job) and return its summary line.

    A run that is already complete, made with the task's settings, is not run again: its line
    is the one it finished with. So a job requeued after its run had finished (its signal came
    as the run ended, see :class:`SubmititRun`) reports the run.

    Parameters
    ----------
    task : RunTask
        The run to do; it is resumed from its folder where it has begun.

    Returns
    -------
    str
        ``"<experiment> seed=<N>: "`` and :meth:`~agrel_sim.training.RunResult.summary`.
    """
    from agrel_sim.runs import run_experiment

    torch.set_num_threads(task.threads)
    experiment = load_experiment(task.experiment_path)
    folder = Path(task.folder)
    if is_complete(folder) and resume_plan(folder, stored_config(run_config(experiment, task.device), experiment.logging), task.seed)[0] == "finished":
        result = stored_result(folder)
    else:
        result = run_experiment(experiment, task.seed, folder, device=task.device, data_dir=task.data_dir, resume=True, progress=False, log=None)
    return f"{experiment.name} seed={task.seed}: {result.summary()}"


class SubmititRun:
    """:func:`execute` as a submitit job that is requeued, not failed, when its time runs out.

    SLURM signals a job (USR2) ``signal_delay_s`` (90 s) before its time limit, and so does
    submitit's local executor (30 s before its ``timeout_min``). submitit's handler of that
    signal checkpoints the job (:meth:`checkpoint`) and requeues it, up to :data:`MAX_TIMEOUTS`
    times for a time limit; the requeued job resumes the run from its folder's last checkpoint.
    This is the protocol of submitit's ``helpers.Checkpointable``, written out so that this
    module imports without submitit.

    A preempted job is signalled so only where the cluster sets ``PreemptParameters=send_user_signal``
    (formerly ``SlurmctldParameters=preempt_send_user_signal``), and is then requeued too. By
    default SLURM preempts with SIGCONT and SIGTERM, which submitit's handler logs ("Bypassing
    signal SIGTERM") and ignores, and SIGKILL at the end of the grace time: the unfinished epoch
    is lost, and with ``PreemptMode=REQUEUE`` SLURM requeues the job, which resumes the run from
    its last checkpoint; otherwise the job ends without a result and the sweep, run again,
    continues the run.
    """

    def __call__(self, task: RunTask) -> tuple[bool, str]:
        """Run the task and return ``(ok, line)``, as a process of :func:`_run_processes` sends it.

        submitit's handler would requeue by raising ``SystemExit`` wherever the signal lands,
        and where that is a callback of the garbage collector, Python prints and drops it and
        the run goes on until the job is killed, unrequeued. So, while the task runs, the signal
        is turned into Ctrl-C (SIGINT): inside training's loop it stops the run after the batch
        at hand, and elsewhere (loading the data before, testing and storing the result after)
        it raises ``KeyboardInterrupt`` at once; then submitit's handler requeues the job. If the
        run ends all the same (the signal came as it finished), its line is returned, and a job
        requeued after its run had finished reports the run (:func:`execute`). Once the task
        has run, submitit's handler is back, so that a signal that comes as submitit stores
        the result requeues the job as submitit would.

        One window remains: a ``KeyboardInterrupt`` raised outside training's loop that lands
        in a callback of the garbage collector is dropped; before the loop, the run then goes
        on until the job is killed at its time limit, and the sweep reports the job as ended
        without a result (the run keeps its finished epochs, and running the sweep again
        continues it).

        A failure of the run, or submitit's refusal to requeue a job out of time too often, comes
        back as its line, not as a job traceback.
        """
        from submitit import JobEnvironment
        from submitit.core.utils import UncompletedJobError

        timeout_signal = getattr(signal, f"SIG{JobEnvironment.USR_SIG}")
        received = []

        def stop(signum, frame):
            received.append(signum)
            signal.raise_signal(signal.SIGINT)

        interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the job's parent ignored it
        requeue = signal.signal(timeout_signal, stop)
        if task.sweep_process is not None:
            threading.Thread(target=_end_with_sweep, args=(task.sweep_process,), daemon=True).start()
        outcome = None
        try:
            outcome = _outcome(lambda: execute(task))
        except KeyboardInterrupt:
            if not received:  # a cancelled job
                raise
        finally:
            signal.signal(timeout_signal, requeue)  # from now on, even after the return, submitit's handler takes the signal
            signal.signal(signal.SIGINT, interrupt)
        if outcome is not None:
            return outcome
        log = JobEnvironment().paths.stderr
        try:
            requeue(received[0], None)  # checkpoints and exits to be requeued, or raises
        except UncompletedJobError:  # "timed-out too many times": the only reason submitit gives for a checkpointable job
            return False, _out_of_time(log)
        except Exception as error:  # scontrol failed to requeue the job, say
            return False, f"{type(error).__name__}: {error}; its log: {log}"
        return False, f"the job was signalled but not requeued; its log: {log}"

    def checkpoint(self, task: RunTask):
        """The submission that requeues this job: the same task, which resumes the run.

        Parameters
        ----------
        task : RunTask
            The job's task.

        Returns
        -------
        submitit.helpers.DelayedSubmission
            This callable with ``task``.
        """
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, task)


def _out_of_time(log) -> str:
    """The line of a job that ran out of time once more than it may be requeued."""
    return (
        f"out of time {MAX_TIMEOUTS + 1} times, and submitit requeues a job {MAX_TIMEOUTS} times at most; the run keeps "
        f"its finished epochs: raise the time limit in the [slurm] table (timeout_min, or the local_timeout_min, slurm_timeout_min or slurm_time"
        f" that stands in for it with this executor), or run the sweep again to continue it; its log: {log}"
    )


def plan(sweep: Sweep, out: str | os.PathLike, device: str = "cpu", data_dir=None, threads: int = 1) -> tuple[list[RunTask], list[Path]]:
    """The tasks still to run and the folders of the runs that have already finished.

    Every experiment file is loaded and every existing run file checked against it first, so a
    bad file, two entries that would run in one folder (an experiment listed twice, or two
    experiment files of the same name), or a run made with other settings stops the sweep
    before anything runs. A complete run counts as finished whatever its device, logging and
    the backend options in :data:`~agrel_sim.runs.NOT_MODELLING` (they do not change the
    protocol); one that goes on must have the ones it began with. The
    data is not read here: a run that goes on checks it as it resumes.

    Parameters
    ----------
    sweep : Sweep
        The experiments and seeds.
    out : str or os.PathLike
        Folder of the runs, each in ``<out>/<experiment>/seed<N>``.
    device : str
        The device of every run.
    data_dir : str or os.PathLike or None
        Folder of the data sets, passed on to each task.
    threads : int
        The torch threads of each run.

    Returns
    -------
    tasks : list of RunTask
        The runs to start or continue, in the sweep's order.
    finished : list of Path
        The folders of the runs already finished with these settings.

    Raises
    ------
    ValueError
        For a bad experiment file, two entries that would share a run folder (a
        :class:`ConfigError`), or a run that cannot go on (see
        :func:`~agrel_sim.runs.resume_plan`).
    """
    tasks, finished, entries = [], [], {}
    for index, path in enumerate(sweep.experiments):
        experiment: Experiment = load_experiment(path)
        for seed in sweep.seeds:
            folder = default_run_folder(experiment, seed, out)
            entry = f"experiments[{index}] ({path}) seed {seed}"
            if folder in entries:
                raise ConfigError(
                    f"{sweep.source}: {entries[folder]} and {entry} would both run in {folder}; "
                    "list each experiment and seed once, and give each experiment file its own name"
                )
            entries[folder] = entry
            # A run made with other settings is never counted as this experiment's, and one that
            # cannot go on (another device, an older layout, ...) stops the sweep here.
            if resume_plan(folder, stored_config(run_config(experiment, device), experiment.logging), seed)[0] == "finished":
                finished.append(folder)
            else:
                tasks.append(RunTask(path, seed, str(folder), device, None if data_dir is None else str(data_dir), threads))
    return tasks, finished


def run_sweep(sweep: Sweep, out=None, jobs: int | None = None, executor: str = "local", device: str = "cpu", data_dir=None, log=print) -> list[str]:
    """Run the sweep's missing runs, log each outcome as it comes, and return the lines of the failed ones.

    Parameters
    ----------
    sweep : Sweep
        The experiments and seeds to run (see :func:`load_sweep`).
    out : str or os.PathLike or None
        Folder of the runs, each in ``<out>/<experiment>/seed<N>``; ``None``: the sweep file's ``out``.
    jobs : int, optional
        Runs at once (default 1), each with the usable cores ÷ ``jobs`` threads: locally and with
        submitit's local executor, a run starts as soon as another ends. For the slurm executor,
        SLURM jobs at once: all runs are submitted as one job array, and SLURM starts at most
        ``jobs`` of its tasks at once (submitit's ``slurm_array_parallelism``; default: the
        file's ``slurm.slurm_array_parallelism``, or all of them, leaving the scheduling to SLURM).
    executor : {"local", "slurm", "submitit-local"}
        A process per run on this machine; submitit on SLURM; submitit's local executor (the
        SLURM code path run on this machine, its jobs given :data:`LOCAL_TIMEOUT_MIN` unless
        the table sets a limit). The submitit executors take the parameters of the sweep file's
        ``[slurm]`` table, checked before anything runs (:func:`check_slurm_table`), and requeue
        a job out of time (:class:`SubmititRun`).
    device : str
        ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"``, for every run; with the slurm executor
        only its form is checked here, as the cluster's GPUs need not be on this machine.
    data_dir : str or os.PathLike or None
        Folder of the data sets, for every run (see :func:`agrel_sim.datasets.data_roots`).
    log : callable
        Receives the opening line and one line per run as it ends (default ``print``).

    Returns
    -------
    list of str
        For each run that failed (an error, a process that crashed or was killed, or a
        submitit job that ended without the run's outcome), how it ended, in one line; the
        other runs go on regardless.

    Raises
    ------
    ValueError
        Before any run, for bad arguments, an output folder that is not one, a bad ``[slurm]``
        table, a sweep that cannot go on (see :func:`plan`) or, but with the slurm executor, the
        files of the data sets that the runs to do need not found (a :class:`~agrel_sim.datasets.DatasetError`
        listing, for each data set missing, the paths searched); while submitting, when SLURM refuses the jobs.
    KeyboardInterrupt
        On Ctrl-C, once the local runs in progress have been ended (their finished epochs are
        kept) and none other started.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor: expected one of {EXECUTORS}, got {executor!r}")
    if jobs is not None and not is_count(jobs):
        raise ValueError(f"jobs: expected a whole number of runs at once, at least 1, got {shown(jobs, count=True)}")
    check_device(device, here=executor != "slurm")  # the machine that submits to SLURM need not have the cluster's GPUs
    if executor != "local":  # before its cores per run are read
        check_slurm_table(sweep, executor, device)
    out = home_expanded(out or sweep.out, "out")
    _check_out_folder(out)
    if executor == "slurm":
        threads = int(sweep.slurm.get("slurm_cpus_per_task", sweep.slurm.get("cpus_per_task", 1)))
    else:
        jobs = 1 if jobs is None else jobs
        threads = max(1, _usable_cores() // jobs)
    failures = []
    with _sweep_lock(out):  # before the runs are looked at: another sweep's may be going on
        tasks, finished = plan(sweep, out, device, data_dir, threads)
        if executor != "slurm":  # found here once, not by every run; a cluster's data folder need not be on this machine
            missing = []
            for dataset in sorted({load_experiment(task.experiment_path).dataset for task in tasks}):
                try:
                    find_data(dataset, data_dir)
                except DatasetError as error:
                    missing.append(str(error))
            if missing:  # all of them, so that one look at the message finds every data set to fetch
                raise DatasetError("\n\n".join(missing))
        going_on = sum(is_complete(Path(task.folder)) for task in tasks)  # their patience or max_epochs raised since
        again = f" ({going_on} of them finished runs that go on: until they end again, table lists them as incomplete)" if going_on else ""
        log(f"sweep {sweep.name}: {len(finished)} runs already finished, {len(tasks)} to run{again}, executor {executor}, out {out}")
        other_threads = _other_thread_counts(tasks)
        if other_threads:
            counts = ", ".join(str(count) for count in sorted(set(other_threads.values())))
            log(
                f"note: {len(other_threads)} of them go on with {threads} torch threads each, where the sessions that trained their checkpoints had {counts};"
                " the thread count orders torch's sums, so they go on, but not bit for bit as they would have"
                f" (the --jobs and cores of the sweep that trained them{', or [slurm] cpus_per_task,' if executor != 'local' else ''} keep it so)"
            )
        if not tasks:
            return []
        runner = None if executor == "local" else _submitit_executor(executor, out, sweep)  # its folder only where jobs will run
        if executor == "submitit-local":
            tasks = [replace(task, sweep_process=process_identity(os.getpid())) for task in tasks]
        outcomes = _run_processes(execute, tasks, jobs) if runner is None else _run_submitit(runner, tasks, jobs, sweep, out / "submitit" / CONTROLLER_LOG)
        with contextlib.closing(outcomes):  # on Ctrl-C too: ends the processes still running
            for task, ok, line in outcomes:
                log(line if ok else f"FAILED {task.experiment_path} seed={task.seed}: {line}")
                if not ok:
                    failures.append(line)
    return failures


def _other_thread_counts(tasks: list[RunTask]) -> dict[str, int]:
    """The torch threads of the session that trained the checkpoint's epoch, for each task's run
    that goes on from a checkpoint on the CPU with another count than the task's: ``{folder: threads}``."""
    other = {}
    for task in tasks:
        folder = Path(task.folder)
        if torch.device(task.device).type != "cpu" or not (folder / CHECKPOINT_FILE).is_file():
            continue  # the GPU's sums are not ordered by the CPU's threads; a run without a checkpoint starts afresh
        if load_experiment(task.experiment_path).backend == "torch" and (folder / RUN_FILE).is_file():
            threads = threads_of_epoch(folder / RUN_FILE, load_checkpoint(folder / CHECKPOINT_FILE)["epoch"])
            if threads not in (None, task.threads):
                other[task.folder] = threads
    return other


SWEEP_LOCK = "sweep.lock"


@contextlib.contextmanager
def _sweep_lock(out: Path):
    """Hold ``out``'s :data:`SWEEP_LOCK` while the sweep's runs go on, or raise where another
    sweep holds it: two sweeps into one folder would each find runs locked by the other, and
    report them as failed. Folders made here are removed again where the sweep fails before
    anything else is in them (a refused ``[slurm]`` table, say)."""
    made = missing_folders(out)
    unwritable = (f"{out}: cannot write the sweep's lock there", "make the folder writable, or choose another --out (or out in the sweep file)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{unwritable[0]} ({error.strerror}); {unwritable[1]}") from None
    busy = (
        f"{out}: another sweep is running its runs in this folder; run this one once it has ended (it runs what is still"
        " missing then), or choose another --out (or out in the sweep file)"
    )
    with holding_lock(out / SWEEP_LOCK, made, busy, unwritable):
        yield


def _check_out_folder(out: Path) -> None:
    """Raise :class:`ValueError` unless ``out`` is a folder or can be made one (nothing
    :func:`~agrel_sim.config.in_the_way`; a place where folders can be made). The folders made to
    find out are removed again, so that a sweep stopped before its runs leaves none."""
    blocked = in_the_way(out)
    if blocked:
        raise ValueError(f"{out}: cannot hold the sweep's runs, as {blocked}; choose another --out (or out in the sweep file)")
    made = missing_folders(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{out}: cannot make the folder of the sweep's runs ({error.strerror or error}); choose another --out (or out in the sweep file)") from None
    finally:
        remove_empty_folders(made)


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a SLURM allocation)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _run_processes(function: Callable, tasks: list, jobs: int) -> Iterator[tuple]:
    """Yield ``(task, ok, line)`` for each task as it ends: ``function(task)`` in a process of its own, ``jobs`` at once.

    ``line`` is what the function returned, the error it raised, or how its process ended (a
    crash or a kill fails that task alone). When the generator is closed (or Ctrl-C reaches
    it), it starts no other task and terminates and joins the processes still running.
    """
    # "spawn": workers start clean, with no copy of the parent's torch threads or state.
    context = multiprocessing.get_context("spawn")
    waiting, running = deque(tasks), {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                task = waiting.popleft()
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_work, args=(function, task, sender, os.getpid()))
                process.start()
                running[receiver] = task, process
                sender.close()  # the process holds the only sending end: its end reads as EOF here
            for receiver in multiprocessing.connection.wait(list(running)):
                task, process = running.pop(receiver)
                try:
                    outcome = receiver.recv()
                except EOFError:  # it ended without a word: crashed or killed
                    outcome = None
                receiver.close()
                process.join()
                yield task, *(outcome or (False, _how_it_ended(process.exitcode)))
    finally:
        for _, process in running.values():
            process.terminate()  # safe: run files and checkpoints are replaced atomically, the lock dies with the process
        for _, process in running.values():
            process.join()


def _work(function: Callable, task, connection, parent: int) -> None:
    """The body of a process of :func:`_run_processes`, started by the process ``parent``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends this process
    # tqdm would guard its bars with a multiprocessing lock: in a spawned process, a named semaphore
    # that the parent's resource tracker reports as leaked at exit when this process is killed.
    # No other process writes this one's bars, so a thread lock does.
    tqdm.set_lock(threading.RLock())
    threading.Thread(target=_end_with_parent, args=(parent,), daemon=True).start()
    outcome = _outcome(lambda: function(task))
    with contextlib.suppress(OSError):  # the parent ended as the run did: nobody to tell
        connection.send(outcome)


def _end_with_parent(parent: int) -> None:
    """End this process once its parent, the sweep, has ended (killed, say): as the sweep ends its
    runs when it stops, and so that no run goes on holding its folder's lock against the sweep run
    again. The run keeps its finished epochs."""
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def _how_it_ended(exitcode: int) -> str:
    if exitcode >= 0:
        return f"its process exited with status {exitcode} without a result"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:  # a signal without a name (a real-time one)
        name = str(-exitcode)
    memory = " (by hand, or by the system when memory ran out)" if -exitcode == signal.SIGKILL else ""
    return f"its process was killed by signal {name}{memory}"


def check_slurm_table(sweep: Sweep, executor: str, device: str = "cpu") -> None:
    """Check the ``[slurm]`` values that submitit takes unchecked, or checks only as it starts a job.

    submitit checks the names and the types of the other values as they are set
    (:func:`_submitit_executor`).

    Parameters
    ----------
    sweep : Sweep
        Its ``slurm`` table is checked.
    executor : {"slurm", "submitit-local"}
        The executor the table is for: it sets how long before a time limit submitit signals a
        job (``slurm_signal_delay_s``, default :data:`SLURM_SIGNAL_DELAY_S`, on SLURM;
        :data:`LOCAL_SIGNAL_DELAY_S` locally).
    device : str
        The device of the runs: a CUDA device needs GPUs in every job (submitit shows a job
        only its own, as ``cuda:0`` up).

    Raises
    ------
    ConfigError
        Naming ``slurm.<key>`` and the values it takes: a time limit that leaves no time to run
        before submitit's signal to requeue, cores per run or jobs at once below 1, memory not above 0, GPUs
        per job below 0, setup commands that are not a list of strings, no GPUs per job (or fewer than ``cuda:N`` needs) for a CUDA device;
        and, for the slurm executor, a table without a time limit, or a signal so early that
        submitit would take a job out of time for a preempted one and requeue it without end.
    """
    table = Fields(sweep.slurm, sweep.source, "slurm")
    slurm_delay = table.get("slurm_signal_delay_s", **POSITIVE_INT, default=SLURM_SIGNAL_DELAY_S)
    delay = LOCAL_SIGNAL_DELAY_S if executor == "submitit-local" else slurm_delay
    # Whole minutes, as submitit reads the time limit to tell a job out of time from a preempted one.
    minutes = f"a whole number of minutes, longer than the {delay} s before its end at which submitit signals the job to requeue it"
    limits = ("timeout_min", "slurm_timeout_min", "slurm_time")
    for key in limits:
        table.get(key, int, default=None, check=lambda v: 60 * v > delay, hint=minutes)
    table.get(
        "local_timeout_min", float, default=None, check=lambda v: int(60 * v) > LOCAL_SIGNAL_DELAY_S,  # submitit-local's whole seconds
        hint=f"a number of minutes of at least {LOCAL_SIGNAL_DELAY_S + 1} s (submitit-local signals a job {LOCAL_SIGNAL_DELAY_S} s before its time limit, to requeue it)",
    )
    for key in ("cpus_per_task", "slurm_cpus_per_task", "array_parallelism", "slurm_array_parallelism"):  # each run's threads; jobs at once
        table.get(key, **POSITIVE_INT, default=None)
    for key in ("mem_gb", "slurm_mem_gb"):
        table.get(key, float, default=None, check=lambda v: v > 0, hint="a number of GB > 0")
    for key in ("gpus_per_node", "slurm_gpus_per_node"):
        table.get(key, int, default=None, check=lambda v: v >= 0, hint="a number of GPUs >= 0")
    for key in ("local_setup", "slurm_setup"):
        table.get(key, list, default=None, check=lambda v: all(isinstance(command, str) for command in v), hint="a list of shell commands (strings) run before each job")
    # Without one, submitit asks SLURM for 5 minutes, and a run would fail after 4 × 5 minutes
    # (3 requeues); any default here could exceed the partition's limit, and a job asking for
    # more than that waits in the queue forever where the cluster does not refuse it.
    if executor == "slurm" and not set(limits) & set(sweep.slurm):
        raise table.error("timeout_min", f"missing; SLURM jobs need a time limit: give one in the [slurm] table, as {minutes}, within the partition's limit")
    given = [key for key in limits if key in sweep.slurm] if executor == "slurm" else []
    for key in given:
        # submitit takes a signalled job for one out of time only once it has run
        # min(0.8 T, T - 600 s); a minute is left for the job's start.
        latest = max(12 * sweep.slurm[key], 600) - 60
        if slurm_delay > latest:
            raise table.error(
                "slurm_signal_delay_s",
                f"{slurm_delay} s before the end of {key} = {sweep.slurm[key]} is too early: submitit would take the job for a preempted"
                f" one, not one out of time, and requeue it without end; give at most {latest}",
            )
    parsed = check_device(device, here=False)
    if parsed.type != "cuda":
        return
    gpus = sweep.slurm.get("slurm_gpus_per_node", sweep.slurm.get("gpus_per_node"))
    if not gpus and "gpu" not in str(sweep.slurm.get("slurm_gres", "")):
        raise table.error("gpus_per_node", f"missing; --device {device} needs a GPU in every job: give gpus_per_node = 1 in the [slurm] table")
    if isinstance(gpus, int) and parsed.index is not None and parsed.index >= gpus:
        raise table.error(
            "gpus_per_node",
            f"{gpus} GPU(s) per job, which a job sees as cuda:0 to cuda:{gpus - 1}, but --device {device}; use --device cuda, or more GPUs per job",
        )


def _submitit_executor(executor: str, out: Path, sweep: Sweep):
    """A submitit executor with the sweep file's ``[slurm]`` parameters, which :func:`check_slurm_table`
    has checked, and submitit checks as they are set."""
    try:
        import submitit
    except ImportError:
        raise ValueError("executor: submitit is not installed; install it with `pip install -e \".[slurm]\"` in the agrel-sim checkout, or `pip install submitit`") from None
    folder = out / "submitit"
    made = missing_folders(folder)  # the local executor makes its folder at once
    try:
        return _configured_executor(submitit, executor, folder, sweep)
    except ValueError:  # a refused parameter: the sweep stops with nothing run, and leaves no empty folder
        remove_empty_folders(made)
        raise


def _configured_executor(submitit, executor: str, folder: Path, sweep: Sweep):
    """The submitit executor of :func:`_submitit_executor`, its jobs' files in ``folder``."""
    try:
        runner = submitit.AutoExecutor(
            folder=folder / JOB_FOLDER, cluster="slurm" if executor == "slurm" else "local",
            slurm_max_num_timeout=MAX_TIMEOUTS, local_max_num_timeout=MAX_TIMEOUTS,
        )
    except RuntimeError as error:  # no SLURM on this machine
        raise ValueError(f"executor slurm: {error}; submit the sweep from a machine of the cluster, or use --executor submitit-local") from None
    except OSError as error:  # the local executor makes its folder at once
        raise ValueError(f"{folder}: cannot make the folder of submitit's jobs ({error.strerror}); choose another --out (or out in the sweep file)") from None
    if executor == "submitit-local":  # no time limit to speak of: the [slurm] table's timeout_min, if any, sets one
        runner.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
    for key, value in sweep.slurm.items():  # one at a time first, so that an error names its key
        _set_parameters(runner, {key: value}, f"{sweep.source}: slurm.{key}")
    _set_parameters(runner, sweep.slurm, f"{sweep.source}: slurm")  # submitit lets slurm_<key> win over <key> only within one call
    tasks = runner._executor._num_tasks()  # nodes × tasks per node, as submitit counts the processes of a job
    if tasks != 1:
        raise ConfigError(
            f"{sweep.source}: slurm: {tasks} tasks per job (nodes × tasks_per_node), but each run is one process; "
            "remove nodes and tasks_per_node from the [slurm] table (cpus_per_task gives a run more cores)"
        )
    return runner


def _set_parameters(runner, parameters: dict, where: str) -> None:
    try:
        runner.update_parameters(**parameters)
    except (NameError, ValueError, TypeError, AssertionError) as error:  # submitit's checks of names, values and types
        raise ConfigError(
            f"{where}: submitit refuses it ({str(error).splitlines()[0]}); the [slurm] table takes submitit's parameters: "
            "timeout_min, mem_gb, cpus_per_task, gpus_per_node, nodes, tasks_per_node, name, and slurm_<option> for "
            "other sbatch options (slurm_partition, slurm_account, ...)"
        ) from None


# Where the processes of submitit's local executor that watch its jobs write: a cancelled one
# (Ctrl-C) ends in a traceback of its KeyboardInterrupt, which is no news on the terminal.
CONTROLLER_LOG = "local_controllers.log"


@contextlib.contextmanager
def _inherited_stderr(path: Path):
    """Processes started within the block write their standard error to ``path`` (appended);
    this process's own is back as it was when the block ends."""
    sys.stderr.flush()
    kept = os.dup(2)
    try:
        with open(path, "a") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(kept, 2)
        os.close(kept)


def _run_submitit(runner, tasks: list[RunTask], jobs: int | None, sweep: Sweep, controller_log: Path) -> Iterator[tuple[RunTask, bool, str]]:
    """Yield ``(task, ok, line)`` for each task as its submitit job ends.

    On SLURM, every task is submitted at once, as one job array, and SLURM starts ``jobs`` of
    its tasks at once (the array's throttle, submitit's ``slurm_array_parallelism``). submitit's
    local executor starts each job it is given at once: it is given ``jobs`` tasks first, and
    another each time a job ends.

    When the generator is closed (or Ctrl-C reaches it), the jobs of submitit's local executor
    that are still running are cancelled and no other is started; SLURM jobs go on on the
    cluster (``scancel`` ends them). The processes of the local executor that watch its jobs
    write their standard error to ``controller_log``.
    """
    from submitit.core.utils import FailedJobError

    if runner.cluster == "slurm":
        if jobs is not None:
            runner.update_parameters(slurm_array_parallelism=jobs)
        elif not {"slurm_array_parallelism", "array_parallelism"} & set(sweep.slurm):
            runner.update_parameters(slurm_array_parallelism=len(tasks))
        at_once = len(tasks)
    else:
        at_once = jobs
    waiting, running, started = deque(tasks), {}, False
    try:
        while waiting or running:
            if waiting and len(running) < at_once:
                batch = [waiting.popleft() for _ in range(min(at_once - len(running), len(waiting)))]
                try:
                    with contextlib.nullcontext() if runner.cluster == "slurm" else _inherited_stderr(controller_log):
                        submitted = runner.map_array(SubmititRun(), batch)
                    running.update(zip(submitted, batch))
                # sbatch refused the jobs or could not be run, or a [slurm] value that submitit
                # takes unchecked failed as the local executor started a job (local_gpus_per_node = "x")
                except (FailedJobError, OSError, TypeError, ValueError) as error:
                    if not started and runner.cluster != "slurm" and isinstance(error, OSError):  # its files could not be written
                        raise ValueError(
                            f"{controller_log.parent}: submitting {len(batch)} run(s) failed: {error.strerror or error}; "
                            "free space there, or choose another --out (or out in the sweep file)"
                        ) from None
                    if not started:  # nothing runs yet: the settings are at fault, and the sweep stops
                        raise ValueError(
                            f"{sweep.source}: submitting {len(batch)} run(s) failed: {error}; "
                            "check the [slurm] table (partition, account, time and memory limits) against the cluster's"
                        ) from None
                    for task in batch:  # later, as a run that fails alone, leaving the others running
                        yield task, False, f"its job could not be started ({_error_line(error)}); running the sweep again starts it"
                    continue
                started = True
            ended = [job for job in running if job.done()]
            if not ended:
                time.sleep(POLL_S)
            for job in ended:
                yield running.pop(job), *_job_outcome(job)
    finally:
        if runner.cluster != "slurm":
            for job in running:
                if not job.done():
                    job.cancel(check=False)
            # The process that watches each local job makes a folder named JOB_FOLDER as it is, and leaves it empty.
            remove_empty_folders([controller_log.parent / JOB_FOLDER])


def _job_outcome(job) -> tuple[bool, str]:
    """What a :class:`SubmititRun` job returned, or one line on why it returned nothing, and where its log is."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return job.result()
    except FailedJobError as error:  # an error around the run: the job could not load it (no agrel_sim there), say
        trace = re.search(r"with trace:\n-+\n(.*?)\n-+\n", str(error), re.DOTALL)
        reason = trace.group(1).strip().splitlines()[-1] if trace else _error_line(error)
        if "timed-out too many times" in reason:  # signalled once more as submitit stored the run's result
            return False, _out_of_time(job.paths.stderr)
    except UncompletedJobError:  # no result at all: killed (out of memory, scancel), timed out unsignalled, ...
        # The local executor records no exit status: it calls a job whose run's process was killed
        # FINISHED, and one whose own process (its job id) was killed INTERRUPTED, while the run's
        # process may go on without it. SLURM's states say more (OUT_OF_MEMORY, CANCELLED, ...).
        reason = (
            f"its job ended without a result (submitit's job state: {job.state}): its process was killed (by hand, by the cluster, "
            "or by the system when memory ran out) or crashed, or only submitit's process around it was killed and the run goes on "
            "without it; the run keeps its finished epochs, and running the sweep again continues it once no process of it is left "
            "(its run.lock stops a second one meanwhile)"
        )
    except Exception as error:  # its result could not be read: a damaged file, a network file system's error, ...
        reason = f"its result could not be read ({_error_line(error)})"
    return False, f"{reason}; its log: {job.paths.stderr}"


def _error_line(error: Exception) -> str:
    """``Type: first line of the message``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _outcome(result) -> tuple[bool, str]:
    try:
        return True, result()
    except Exception as error:  # one failed run must not stop the others; it is reported, in one line
        return False, f"{type(error).__name__}: {' '.join(line.strip() for line in str(error).splitlines())}"
