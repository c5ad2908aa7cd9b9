"""``dgst-monai benchmark --executor slurm`` on a real single-node Slurm (Debian's ``slurm-wlm`` and ``munge``).

The tests' tiny grid (:data:`test_protocol.TINY`: the foundation, Full and DGST cells, after the foundation's
pre-training) is submitted to slurmctld / slurmd started for the test, without Slurm accounting (``sacct``
fails). One running cell is cancelled with ``scancel``: that invocation ends with the cell failed, the next one
with the same arguments runs only that cell, and ``benchmark report`` merges all of them. The executor's failure
path (a job that ends without its result) is also checked on submitit's local cluster, without Slurm.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from slurm_helpers import missing_programs, single_node_cluster
from test_protocol import TINY

from dgst_monai.cli import main
from dgst_monai.protocol import run_benchmark
from dgst_monai.protocol.executors import SLURM_ENDED, Job, Progress, SubmititExecutor, slurm_states
from dgst_monai.protocol.runner import BenchmarkError

needs_slurm = pytest.mark.skipif(
    "slurmctld" in missing_programs(),
    reason="Slurm is not installed (Debian: apt-get install slurm-wlm munge; .ci/run installs them)",
)

CANCELLED = "dgst_1shot_seed0_gamma1"


@pytest.fixture
def slurm_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A single-node Slurm for this test; its ``SLURM_CONF`` is in the environment of every client."""
    assert not missing_programs(), f"{missing_programs()} missing beside slurmctld; apt-get install slurm-wlm munge"
    with single_node_cluster(tmp_path / "slurm") as env:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield env


def _job(folder: Path) -> dict[str, str]:
    return json.loads((folder / "job.json").read_text(encoding="utf-8"))


def _end_states(job_ids: list[str]) -> list[str]:
    """The jobs' states once each has ended (a job runs on for a moment after writing its result)."""
    deadline = time.monotonic() + 120
    while True:
        states = slurm_states() or {}  # the controller lists ended jobs for MinJobAge (300 s)
        if all(states.get(j) in SLURM_ENDED for j in job_ids) or time.monotonic() > deadline:
            return [states.get(j, "not listed") for j in job_ids]
        time.sleep(0.5)


def _cancel_third_cell(run: Future) -> str:
    """``scancel`` the cells' third array task as soon as Slurm runs it, before it can finish; returns its job id.

    A cell takes seconds here; its job needs longer to load torch, and Slurm kills it within 1.5 s (KillWait=0).
    """
    deadline = time.monotonic() + 400
    while True:
        running = [job for job, state in (slurm_states() or {}).items() if job.endswith("_2") and state == "RUNNING"]
        if running:
            subprocess.run(["scancel", running[0]], check=True, timeout=60)
            return running[0]
        assert not run.done(), f"the run ended before its third cell ran: {run.exception()}"
        assert time.monotonic() < deadline, "the third cell did not start"
        time.sleep(0.05)


def test_a_failed_submitit_job_is_reported_from_its_folder_and_log(tmp_path: Path):
    """A job that ends without its result fails, with its scheduler state and its log's end (no result pickle)."""
    pytest.importorskip("submitit", reason="submitit is a benchmark / dev dependency")
    job = Job("cell", tmp_path / "broken_cell", 0, threads=1)
    job.folder.mkdir()
    executor = SubmititExecutor(tmp_path / "submitit", "local", poll_seconds=0.1, state_seconds=0.5)
    failures = executor.run([job], Progress([job], enabled=False))
    assert list(failures) == ["broken_cell"]
    assert re.match(r"job \d+ ended \(\w+\) without result\.json; see \S+_log\.err\n", failures["broken_cell"])
    assert "FileNotFoundError" in failures["broken_cell"] and "cell.json" in failures["broken_cell"]
    assert json.loads((job.folder / "job.json").read_text(encoding="utf-8"))["cluster"] == "local"


@needs_slurm
@pytest.mark.slow  # a foundation pre-training and four cell jobs, one of them twice: over a minute
def test_cells_run_as_slurm_jobs_and_a_cancelled_cell_is_rerun(tmp_path: Path, slurm_cluster: dict[str, str]):
    out, cache = tmp_path / "run", tmp_path / "cache"
    arguments = {**TINY, "cache": cache, "executor": "slurm"}
    cancelled = out / "cells" / CANCELLED  # the grid's third cell: foundation, Full, DGST
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(run_benchmark, out, **arguments)
        cancelled_job = _cancel_third_cell(first)
        with pytest.raises(BenchmarkError, match=rf"1 cell\(s\) failed(.|\n)*{CANCELLED}: job {cancelled_job} ended "
                                                 r"\(CANCELLED\) without result\.json"):
            first.result(timeout=300)

    cells = sorted(p for p in (out / "cells").iterdir())
    assert [p.name for p in cells] == ["dgst_1shot_seed0_gamma1", "foundation", "full_1shot_seed0"]
    finished = [p for p in cells if p != cancelled]
    assert all((p / "result.json").is_file() for p in finished) and not (cancelled / "result.json").exists()
    # every job ran under Slurm: the pre-training alone, then the three cells as one array
    (pretraining,) = cache.glob("foundation_*/job.json")
    jobs = [json.loads(pretraining.read_text(encoding="utf-8")), *(_job(p) for p in finished)]
    array = cancelled_job.split("_")[0]
    assert {j["cluster"] for j in jobs} == {"slurm"}
    assert int(jobs[0]["job_id"]) < int(array) and {j["job_id"] for j in jobs[1:]} == {f"{array}_0", f"{array}_1"}
    assert _end_states([cancelled_job, *(j["job_id"] for j in jobs)]) == ["CANCELLED"] + ["COMPLETED"] * 3
    first_report = (out / "report.md").read_text(encoding="utf-8")
    assert "| Full |" in first_report and "DGST" not in first_report

    stamps = {p: p.stat().st_mtime_ns for c in finished for p in (c / "result.json", c / "job.json")}
    stamps[pretraining] = pretraining.stat().st_mtime_ns
    report = run_benchmark(out, **arguments)  # the same arguments: only the cancelled cell runs again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    rerun = _job(cancelled)
    assert rerun["cluster"] == "slurm" and re.fullmatch(r"\d+", rerun["job_id"])
    assert int(rerun["job_id"]) > int(cancelled_job.split("_")[0])  # a job of its own, after the array
    result = json.loads((cancelled / "result.json").read_text(encoding="utf-8"))
    assert result["id"] == CANCELLED and result["timing"]["iterations_timed"] == 2
    assert _end_states([rerun["job_id"]]) == ["COMPLETED"]
    assert "DGST" in report.read_text(encoding="utf-8")

    report.unlink()
    main(["benchmark", "report", str(out)])
    merged = report.read_text(encoding="utf-8")
    assert all(label in merged for label in ("| Full |", "| DGST", "Foundation")), merged
