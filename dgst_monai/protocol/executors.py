"""Where benchmark jobs run: one after another in local processes, or as a submitit job array (Slurm).

A job is a folder: a cell (``cell.json``, :func:`dgst_monai.protocol.cell.run_cell`) or the foundation's
pre-training (``pretrain.json``, :func:`dgst_monai.protocol.cell.pretrain`). Jobs report progress through
``progress.json`` in their folder, which :class:`Progress` polls on a shared file system, so the runner shows
the same two bars (cells, training iterations) whichever executor runs them.

* :class:`LocalExecutor` (``--executor local``, the default): each job in its own process
  (``python -m dgst_monai.protocol.cell``), one at a time, its output in ``<folder>/log.txt``. The process dies
  with the runner (Linux ``PR_SET_PDEATHSIG``), so killing the runner stops the cell in progress too.
* :class:`SubmititExecutor` (``--executor slurm``): the jobs as one submitit job array
  (``AutoExecutor.map_array``); submitit's ``cluster="local"`` runs the same array as local processes
  (``--executor submitit-local``). A job has succeeded when its folder holds its result (``result.json``, or the
  pre-training's ``done.json``) and failed when the scheduler lists it as ended (Slurm: ``squeue``) without one,
  so it needs neither Slurm's accounting (``sacct``) nor submitit's result pickles. Each job writes ``job.json``
  (cluster, job id, host) into its folder when it starts.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgst_monai.files import atomic_write_json, read_json

__all__ = [
    "EXECUTORS",
    "Job",
    "LocalExecutor",
    "Progress",
    "SubmititExecutor",
    "make_executor",
    "run_job",
    "slurm_states",
    "thread_environment",
]

LOG_FILE = "log.txt"
#: What a job writes into its folder when it starts: the cluster, the job id (Slurm: ``<array job>_<task>``), host.
JOB_FILE = "job.json"
#: Slurm states of a job that has ended (``squeue --states=all``). PREEMPTED is not one: Slurm may requeue the job.
#: A job that ``squeue`` no longer lists (``MinJobAge`` after its end) has ended too.
SLURM_ENDED = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                         "TIMEOUT"})


@dataclass(frozen=True)
class Job:
    """A folder to run: ``kind`` is ``cell`` or ``pretrain``; ``iterations`` its training length (for the bar);
    ``threads`` the intra-op threads of its process (None: torch's default)."""

    kind: str
    folder: Path
    iterations: int
    threads: int | None = None

    @property
    def name(self) -> str:
        """Short name for the bars and messages."""
        return "foundation pre-training" if self.kind == "pretrain" else self.folder.name

    @property
    def result_file(self) -> Path:
        """The file the job writes last, when it has succeeded: ``done.json`` or the cell's ``result.json``."""
        from dgst_monai.protocol.cell import RESULT_FILE  # here: a job process sets its threads before torch loads

        return self.folder / ("done.json" if self.kind == "pretrain" else RESULT_FILE)


def thread_environment(threads: int | None) -> dict[str, str]:
    """Environment of a job process: its thread count, and idle OpenMP threads that sleep instead of spinning.

    On a shared CPU a spinning OpenMP worker waits for a thread that is not scheduled: measured here with other
    processes on both cores, sliding-window inference with the tiny preset took 67 s with OpenMP's active wait
    and 5.8 s with ``OMP_WAIT_POLICY=PASSIVE`` (3.1 s with one thread). A policy set by the user is kept.
    """
    env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(int(threads)), MKL_NUM_THREADS=str(int(threads)))
    return env


def _record_job(folder: Path) -> None:
    """Write :data:`JOB_FILE` into ``folder``: where this submitit job runs, for the user and the tests."""
    import submitit

    environment = submitit.JobEnvironment()
    record = {"cluster": environment.cluster, "job_id": environment.job_id, "host": environment.hostname}
    atomic_write_json(folder / JOB_FILE, record)


def run_job(kind: str, folder: str, threads: int | None = None) -> str:
    """Run one job in this submitit job's process; returns the folder."""
    os.environ.update(thread_environment(threads))  # before torch is imported below, so OpenMP reads it
    import torch

    from dgst_monai.protocol.cell import pretrain, run_cell

    if threads is not None:
        torch.set_num_threads(int(threads))
    _record_job(Path(folder))
    if kind == "pretrain":
        pretrain(folder)
    elif kind == "cell":
        run_cell(folder)
    else:
        raise ValueError(f"unknown job kind {kind!r}")
    return folder


class Progress:
    """Two bars: finished cells, and training iterations (finished jobs plus the progress of running ones).

    Args:
        jobs: the jobs to follow.
        enabled: False shows nothing (the counts are kept all the same).
    """

    def __init__(self, jobs: Sequence[Job], enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.jobs = list(jobs)
        self._done_iterations = 0
        self._shown: tuple[int, str] = (-1, "")
        self.cells = tqdm(total=len(self.jobs), desc="cells", unit="cell", position=0, disable=not enabled)
        self.iterations = tqdm(
            total=sum(j.iterations for j in self.jobs), desc="iterations", unit="it", position=1, disable=not enabled
        )

    def poll(self, running: Sequence[Job]) -> None:
        """Move the iteration bar to the running jobs' progress and name what they are doing."""
        current, phases = 0, []
        for job in running:
            try:
                progress = read_json(job.folder / "progress.json", "progress")
                current += int(progress.get("iteration", 0))
                phases.append(f"{job.name}: {progress.get('phase', '')}")
            except (FileNotFoundError, ValueError):  # not written yet, or being replaced
                phases.append(f"{job.name}: starting")
        state = (min(self._done_iterations + current, self.iterations.total), "; ".join(phases)[:120])
        if state != self._shown:  # redraw on change only: off a terminal every redraw is a new line
            self._shown = state
            self.iterations.n = state[0]
            self.iterations.set_postfix_str(state[1], refresh=False)
            self.iterations.refresh()

    def finished(self, job: Job) -> None:
        """Count ``job`` as finished (successfully or not)."""
        self._done_iterations += job.iterations
        self.cells.update(1)
        self.iterations.n = min(self._done_iterations, self.iterations.total)
        self.iterations.refresh()

    def close(self) -> None:
        """Close both bars."""
        self.iterations.close()
        self.cells.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGKILL this process when its parent dies (a killed runner takes its cell along)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalExecutor:
    """Run jobs one after another, each in a fresh Python process (``python -m dgst_monai.protocol.cell``).

    Args:
        poll_seconds: how often the bars are refreshed while a job runs.

    Example::

        failures = LocalExecutor().run(jobs, Progress(jobs))
    """

    name = "local"

    def __init__(self, poll_seconds: float = 0.5) -> None:
        self.poll_seconds = poll_seconds

    def run(self, jobs: Sequence[Job], progress: Progress) -> dict[str, str]:
        """Run ``jobs`` in order; returns ``{job name: error}`` for those that failed (the others succeeded)."""
        failures: dict[str, str] = {}
        for job in jobs:
            argv = [sys.executable, "-m", "dgst_monai.protocol.cell"]
            argv += ["--pretrain", str(job.folder)] if job.kind == "pretrain" else [str(job.folder)]
            log_path = job.folder / LOG_FILE
            with open(log_path, "w", encoding="utf-8") as log:
                preexec = _die_with_parent if sys.platform.startswith("linux") else None
                env = {**os.environ, **thread_environment(job.threads)}
                process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec, env=env)
                while process.poll() is None:
                    progress.poll([job])
                    time.sleep(self.poll_seconds)
            if process.returncode != 0:
                failures[job.name] = f"exit status {process.returncode}; see {log_path}"
            progress.finished(job)
        return failures


def slurm_states() -> dict[str, str] | None:
    """This user's Slurm jobs and their states from ``squeue``, e.g. ``{"123_0": "RUNNING", "124": "CANCELLED"}``.

    Array tasks are listed one by one (``<array job>_<task>``, submitit's job ids); ended jobs stay listed for
    Slurm's ``MinJobAge`` (300 s by default). Returns None when ``squeue`` does not answer.
    """
    command = ["squeue", "--noheader", "--array", "--states=all", f"--user={os.getuid()}", "--format=%i|%T"]
    try:
        listing = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):  # a busy or restarting controller: ask again later
        return None
    return dict(line.strip().split("|", 1) for line in listing.splitlines() if "|" in line)


class SubmititExecutor:
    """Run jobs as one submitit job array: Slurm on a cluster, or submitit's local executor for trying it out.

    A job has succeeded once its :attr:`Job.result_file` exists. It has failed when the scheduler lists it as
    ended (Slurm: ``squeue``, see :func:`slurm_states`; local: its process has exited) at two state queries in a
    row and the file is still missing: one query's grace for a shared file system that shows the file late. So
    ``scancel`` on a job makes it fail in this run, and neither Slurm's accounting (``sacct``, which submitit's
    own job states need) nor submitit's result pickles are used.

    Args:
        folder: submitit's folder (job scripts, pickles, each job's stdout / stderr).
        cluster: ``"slurm"`` or ``"local"`` (all jobs at once as local processes); None lets submitit choose.
        parameters: submitit parameters (``AutoExecutor.update_parameters``), e.g. ``{"slurm_partition": "gpu",
            "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "timeout_min": 720,
            "slurm_array_parallelism": 16}``. ``timeout_min`` defaults to 720.
        poll_seconds: how often the result files and the bars are refreshed.
        state_seconds: how often the scheduler is asked for the jobs' states.

    Example::

        failures = SubmititExecutor("runs/bench/submitit", parameters={"slurm_partition": "gpu"}).run(jobs, progress)
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        cluster: str | None = "slurm",
        parameters: Mapping[str, Any] | None = None,
        poll_seconds: float = 2.0,
        state_seconds: float = 15.0,
    ) -> None:
        try:
            import submitit
        except ImportError:
            raise ImportError(
                "--executor slurm needs submitit: pip install 'dgst-monai[benchmark]' (or pip install submitit)"
            ) from None
        self.name = "submitit" if cluster is None else f"submitit ({cluster})"
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        self.executor.update_parameters(**{"timeout_min": 720, "name": "dgst-benchmark", **dict(parameters or {})})
        self.poll_seconds = poll_seconds
        self.state_seconds = state_seconds

    def _ended(self, handles: Sequence[Any]) -> dict[str, str] | None:
        """``{job id: state}`` of the ``handles`` whose job has ended; None when the scheduler did not answer."""
        if self.executor.cluster != "slurm":
            return {h.job_id: h.state for h in handles if h.done()}
        states = slurm_states()
        if states is None:
            return None
        return {
            h.job_id: states.get(h.job_id, "no longer listed by squeue")
            for h in handles
            if h.job_id not in states or states[h.job_id] in SLURM_ENDED
        }

    def run(self, jobs: Sequence[Job], progress: Progress) -> dict[str, str]:
        """Submit ``jobs`` as one array, follow them to the end; returns ``{job name: error}`` of the failed ones."""
        if not jobs:
            return {}
        for job in jobs:  # a result left by an earlier run with other settings must not count for this one
            job.result_file.unlink(missing_ok=True)
        handles = self.executor.map_array(
            run_job, [j.kind for j in jobs], [str(j.folder) for j in jobs], [j.threads for j in jobs]
        )
        pending = dict(zip(jobs, handles))
        failures: dict[str, str] = {}
        ended_before: set[str] = set()
        next_query = time.monotonic() + self.state_seconds
        while pending:
            ended = None
            if time.monotonic() >= next_query:
                ended, next_query = self._ended(list(pending.values())), time.monotonic() + self.state_seconds
            for job, handle in list(pending.items()):
                if not job.result_file.is_file():
                    if ended is None or handle.job_id not in ended or handle.job_id not in ended_before:
                        continue  # still running, or ended a moment ago: its result may yet show up
                    failures[job.name] = _job_error(job, handle, ended[handle.job_id])
                del pending[job]
                progress.finished(job)
            if ended is not None:
                ended_before = set(ended)
            progress.poll(list(pending))
            if pending:
                time.sleep(self.poll_seconds)
        return failures


def _job_error(job: Job, handle: Any, state: str) -> str:
    """Why ``job`` failed: its scheduler state and the end of its error log."""
    log = Path(handle.paths.stderr)
    tail = log.read_text(encoding="utf-8", errors="replace").strip()[-2000:] if log.is_file() else ""
    return f"job {handle.job_id} ended ({state}) without {job.result_file.name}; see {log}" + (f"\n{tail}" if tail else "")


#: ``--executor`` values.
EXECUTORS: tuple[str, ...] = ("local", "slurm", "submitit-local")


def make_executor(
    name: str, folder: str | os.PathLike[str], slurm: Mapping[str, Any] | None = None
) -> LocalExecutor | SubmititExecutor:
    """The executor called ``name`` (see :data:`EXECUTORS`); ``slurm`` holds submitit parameters."""
    if name == "local":
        if slurm:
            raise ValueError("--slurm parameters need --executor slurm (or submitit-local)")
        return LocalExecutor()
    if name in ("slurm", "submitit-local"):
        return SubmititExecutor(Path(folder) / "submitit", "slurm" if name == "slurm" else "local", slurm)
    raise ValueError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}")
