"""The benchmark runner on the tiny synthetic default, through the real bundle in real processes.

One module-scoped run (foundation, Full and DGST at 1 shot, 2 iterations, a budget checkpoint at iteration 1)
is checked for its numbers and files; further runs share its cache (data and pre-trained foundation) to test
the rerun, a run killed with SIGKILL mid-cell, and the submitit path.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bundle_support import BUNDLES

from dgst_monai.cli import main
from dgst_monai.protocol import run_benchmark, write_report
from dgst_monai.protocol.executors import Job, LocalExecutor, Progress
from dgst_monai.protocol.report import format_table, rank_marks, summarize_cells
from dgst_monai.protocol.runner import BenchmarkError

BUNDLE = str(BUNDLES / "ln_ct_dynunet")
#: The tests' grid: tiny network and phantoms, two fine-tuning iterations (one epoch of one iteration each).
TINY = dict(
    shots=[1], seeds=[0], methods=["full", "dgst"], preset="tiny", max_epochs=2, iterations_per_epoch=1,
    synthetic="tiny", bundle=BUNDLE, threads=1, progress=False,
)

pytestmark = pytest.mark.slow  # benchmark cells run as real processes, one killed and resumed: minutes


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("benchmark_cache")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("benchmark")
    run_benchmark(out, cache=cache, eval_at=[1], keep_checkpoints=True, **TINY)
    return out


def test_every_cell_is_scored_on_the_whole_test_split(tiny_run):
    splits = json.loads((tiny_run / "splits.json").read_text(encoding="utf-8"))
    test_ids = sorted(c["case_id"] for c in splits["test"])
    assert len(test_ids) == 2 and len(splits["training"]) == 8  # the seeded 8:2 split of 10 target cases
    rows = [r for r in read_rows(tiny_run / "per_case.csv") if r["domain"] == "target"]
    scored = {(r["cell"], r["iteration"]): sorted(x["case_id"] for x in rows if (x["cell"], x["iteration"]) ==
                                                  (r["cell"], r["iteration"])) for r in rows}
    # the final checkpoint (2) of each method, its budget checkpoint (1), and the foundation (0)
    assert sorted(scored) == [("dgst_1shot_seed0_gamma1", "1"), ("dgst_1shot_seed0_gamma1", "2"),
                              ("foundation", "0"), ("full_1shot_seed0", "1"), ("full_1shot_seed0", "2")]
    assert all(ids == test_ids for ids in scored.values())
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["nsd_1mm"]) <= 1.0
        assert int(float(r["gt_nodes"])) >= 1 and float(r["detected"]) <= float(r["gt_nodes"])


def test_every_final_checkpoint_is_also_scored_on_the_held_out_source_cases(tiny_run):
    state = json.loads((tiny_run / "benchmark.json").read_text(encoding="utf-8"))
    source_ids = sorted(c["case_id"] for c in json.loads(
        Path(state["protocol"]["source_test"]).read_text(encoding="utf-8"))["test"])
    assert len(source_ids) == 2 and all(i.startswith("source_test_") for i in source_ids)
    rows = [r for r in read_rows(tiny_run / "per_case.csv") if r["domain"] == "source"]
    scored = {(r["cell"], r["iteration"]) for r in rows}
    # the final checkpoint only (not the budget one), and the foundation itself
    assert sorted(scored) == [("dgst_1shot_seed0_gamma1", "2"), ("foundation", "0"), ("full_1shot_seed0", "2")]
    for cell in ("foundation", "full_1shot_seed0"):
        assert sorted(r["case_id"] for r in rows if r["cell"] == cell) == source_ids
    full = json.loads((tiny_run / "cells/full_1shot_seed0/result.json").read_text(encoding="utf-8"))
    assert full["source_retained"]["n_cases"] == 2
    assert full["source_retained"]["dice"]["mean"] == pytest.approx(
        sum(float(r["dice"]) for r in rows if r["cell"] == "full_1shot_seed0") / 2)
    report = (tiny_run / "report.md").read_text(encoding="utf-8")
    assert "| Method | 1-shot | retained 1-shot |" in report
    assert "## Adaptation against forgetting" in report and (tiny_run / "tradeoff.png").stat().st_size > 5000
    # unlabelled configurations are the bundle's defaults, which the section names
    defaults = json.loads((BUNDLES / "ln_ct_dynunet/configs/finetune.json").read_text(encoding="utf-8"))
    assert f"(learning rate {defaults['learning_rate']}, update `{defaults['update']}`)" in report


def test_the_budget_checkpoint_differs_from_the_final_one(tiny_run):
    rows = read_rows(tiny_run / "per_case.csv")
    full = {r["iteration"]: [float(x["dice"]) for x in rows if x["cell"] == r["cell"] and x["iteration"] ==
                             r["iteration"] and x["domain"] == "target"] for r in rows if r["cell"] == "full_1shot_seed0"}
    assert full["1"] != full["2"]  # two different weights were scored


def test_cells_record_cost_and_changed_entries(tiny_run):
    full = json.loads((tiny_run / "cells/full_1shot_seed0/result.json").read_text(encoding="utf-8"))
    dgst = json.loads((tiny_run / "cells/dgst_1shot_seed0_gamma1/result.json").read_text(encoding="utf-8"))
    foundation = json.loads((tiny_run / "cells/foundation/result.json").read_text(encoding="utf-8"))
    for r in (full, dgst):
        assert r["timing"]["iterations_timed"] == 2 and r["timing"]["median_s_per_iteration"] > 0
        assert r["peak_rss_mb"] > 100
    assert full["parameters"]["changed_fraction"] > 0.9
    # strict DGST: at most gamma (1) entry per filter per step, plus the always-trained biases and norms
    assert 0 < dgst["parameters"]["changed_entries"] <= dgst["parameters"]["steps_bound_fraction"] * dgst[
        "parameters"]["network_entries"] + 1e-6
    assert dgst["parameters"]["changed_fraction"] < 0.05
    assert foundation["iterations"] == 0 and foundation["parameters"]["changed_fraction"] == 0.0
    # the report sums what the cells cost and names the CPUs they ran on
    from dgst_monai.memory import cpu_model

    results = [json.loads(f.read_text(encoding="utf-8")) for f in tiny_run.glob("cells/*/result.json")]
    assert {r["cpu"] for r in results} == {cpu_model()}
    cpu_hours = sum(r["timing"]["cell_cpu_s"] for r in results if "timing" in r) / 3600
    line = next(x for x in (tiny_run / "report.md").read_text(encoding="utf-8").splitlines() if "Cost of" in x)
    assert f"{cpu_hours:.1f} h of CPU time" in line and f"{cpu_model()} ({len(results)})" in line


def test_report_marks_the_best_per_shot_level_and_writes_the_figures(tiny_run):
    report = (tiny_run / "report.md").read_text(encoding="utf-8")
    summary = [r for r in read_rows(tiny_run / "summary.csv")
               if r["final"] == "True" and r["method"] != "foundation" and r["domain"] == "target"]
    best = max(summary, key=lambda r: float(r["dice_mean"]))
    table = report.split("## Table 1: DSC (%)")[1].split("##")[0]
    bold = re.findall(r"\| (\S+) \| \*\*([\d.]+)\*\*", table)
    assert (best["label"], f"{100 * float(best['dice_mean']):.2f}") in bold
    for name in ("dsc_vs_shots.png", "dsc_vs_iteration_time.png", "dsc_vs_iterations.png", "qualitative.png"):
        assert (tiny_run / name).stat().st_size > 5000, name
        assert f"({name})" in report
    qualitative = sorted(p.name for p in (tiny_run / "cells/full_1shot_seed0/qualitative").iterdir())
    assert len(qualitative) == 2  # the two qualitative test cases, saved at the final checkpoint


def test_rank_marks_and_table_bold_and_underline():
    assert rank_marks([0.61, 0.70, 0.65]) == ["", "best", "second"]
    assert rank_marks([3.0, 1.0, 2.0], higher_is_better=False) == ["", "best", "second"]
    # equal as printed: both bold, the next one second; missing values unranked
    assert rank_marks([68.444, 68.436, 67.0, None, float("nan")]) == ["best", "best", "second", "", ""]
    table = format_table(
        ["Method", "5-shot", "10-shot"],
        [("Full", [(0.60, 0.1), (0.70, 0.1)]), ("Bias", [(0.65, 0.1), (0.71, 0.1)]),
         ("DGST", [(0.66, 0.1), (None, None)])],
    )
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "**66.00**" in rows["DGST"] and "<ins>65.00</ins>" in rows["Bias"] and "60.00 ±" in rows["Full"]
    assert "**71.00**" in rows["Bias"] and "<ins>70.00</ins>" in rows["Full"]  # per column
    assert rows["DGST"].endswith("|  |")


def test_summaries_over_seeds_average_the_seeds_means():
    def rows(cell, seed, dice):
        counts = {"gt_nodes": 1, "detected": 1, "pred_nodes": 1, "pred_true": 1, "rel_volume_error": 0.1,
                  "abs_volume_error_ml": 0.2}
        counts.update({f"{k}_{s}": v for k, v in list(counts.items())[:4] for s in ("lt10", "ge10")})
        return [{"cell": cell, "method": "full", "shots": "5", "seed": str(seed), "gamma": "", "iteration": "10",
                 "case_id": f"c{i}", "dice": str(d), "nsd_1mm": str(d), **{k: str(v) for k, v in counts.items()}}
                for i, d in enumerate(dice)]

    results = [{"id": f"s{seed}", "iterations": 10, "timing": {"median_s_per_iteration": t},
                "parameters": {"trainable_fraction": 1.0, "changed_fraction": 1.0}, "peak_rss_mb": 10.0 * seed}
               for seed, t in ((0, 1.0), (1, 3.0))]
    (summary,) = summarize_cells(results, rows("s0", 0, [0.5, 0.7]) + rows("s1", 1, [0.8, 0.8]))
    assert summary["n_seeds"] == 2 and summary["n_cases"] == 4 and summary["final"]
    assert summary["dice_mean"] == pytest.approx((0.6 + 0.8) / 2)
    assert summary["dice_std_seeds"] == pytest.approx(0.1) and summary["dice_std"] == summary["dice_std_seeds"]
    assert summary["dice_std_cases"] == pytest.approx(float(torch.tensor([0.5, 0.7, 0.8, 0.8]).std(correction=0)))
    assert summary["median_s_per_iteration"] == 2.0 and summary["peak_rss_mb"] == 10.0


def test_a_failed_job_is_reported_with_its_log(tmp_path):
    job = Job("cell", tmp_path / "broken_cell", 0)
    job.folder.mkdir()
    failures = LocalExecutor(poll_seconds=0.1).run([job], Progress([job], enabled=False))
    assert list(failures) == ["broken_cell"] and "log.txt" in failures["broken_cell"]
    assert "cell.json" in (job.folder / "log.txt").read_text(encoding="utf-8")  # the log names the missing file


def test_benchmark_report_command_rewrites_the_report(tiny_run, capsys):
    (tiny_run / "report.md").unlink()
    main(["benchmark", "report", str(tiny_run)])
    assert capsys.readouterr().out.strip() == str(tiny_run / "report.md")
    assert "## Table 1: DSC (%)" in (tiny_run / "report.md").read_text(encoding="utf-8")


def test_a_rerun_skips_finished_cells_and_refuses_other_settings(tiny_run, cache):
    results = sorted((tiny_run / "cells").glob("*/result.json"))
    stamps = {p: p.stat().st_mtime_ns for p in results}
    logs = {p: p.stat().st_mtime_ns for p in (tiny_run / "cells").glob("*/log.txt")}
    started = time.perf_counter()
    run_benchmark(tiny_run, cache=cache, eval_at=[1], keep_checkpoints=True, **TINY)
    assert {p: p.stat().st_mtime_ns for p in results} == stamps  # no cell ran again
    assert {p: p.stat().st_mtime_ns for p in (tiny_run / "cells").glob("*/log.txt")} == logs
    assert time.perf_counter() - started < 60
    with pytest.raises(BenchmarkError, match="other settings.*iterations"):
        run_benchmark(tiny_run, cache=cache, **{**TINY, "max_epochs": 3})


def test_a_run_killed_mid_cell_resumes_and_finishes(cache, tiny_run):
    """The command line adds a Bias cell of a new seed to the tiny run; SIGKILL it in that cell, rerun, and it
    finishes."""
    subsets_before = json.loads((tiny_run / "splits.json").read_text(encoding="utf-8"))["few_shot"]
    command = [
        sys.executable, "-m", "dgst_monai.cli", "benchmark", "--output", str(tiny_run), "--cache", str(cache),
        "--synthetic", "tiny", "--preset", "tiny", "--methods", "bias", "--shots", "1", "--seeds", "1",
        "--max_epochs", "2", "--iterations_per_epoch", "1", "--eval_at", "1", "--bundle", BUNDLE, "--threads", "1",
        "--progress=False",
    ]
    cell = tiny_run / "cells" / "bias_1shot_seed1"
    finished = {p: p.stat().st_mtime_ns for p in (tiny_run / "cells").glob("*/result.json")}
    runner = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # wait until the cell has trained or is scoring
            try:
                progress = json.loads((cell / "progress.json").read_text(encoding="utf-8"))
            except (FileNotFoundError, json.JSONDecodeError):
                progress = {}
            if progress.get("iteration", 0) >= 1:
                break
            assert runner.poll() is None, "the runner ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("the cell did not start in time")
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
    finally:
        if runner.poll() is None:
            runner.kill()
    time.sleep(2)  # the cell's process dies with its runner (PR_SET_PDEATHSIG)
    stalled = json.loads((cell / "progress.json").read_text(encoding="utf-8"))
    time.sleep(3)
    assert json.loads((cell / "progress.json").read_text(encoding="utf-8")) == stalled
    assert not (cell / "result.json").exists() and (cell / "work").exists()
    (cell / "work" / "left_by_the_killed_run").write_text("", encoding="utf-8")

    done = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((cell / "result.json").read_text(encoding="utf-8"))
    assert result["timing"]["iterations_timed"] == 2 and sorted(result["evaluations"]) == ["1", "2"]
    assert not (cell / "work").exists()  # started over in a clean folder, removed when scored
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # the finished cells did not run again
    assert "1 of 2 cells already finished" in done.stderr  # this command's grid: the foundation and Bias
    assert "| Bias |" in (tiny_run / "report.md").read_text(encoding="utf-8")
    # the grown grid's seed got its few-shot subset; seed 0's, which the finished cells used, is unchanged
    subsets = json.loads((tiny_run / "splits.json").read_text(encoding="utf-8"))["few_shot"]
    assert subsets["0"] == subsets_before["0"] and list(subsets["1"]) == ["1"] and "1" not in subsets_before


def test_the_submitit_path_runs_two_cells_as_separate_jobs(tmp_path, cache, tiny_run):
    pytest.importorskip("submitit", reason="submitit is a benchmark / dev dependency")
    out = tmp_path / "submitit"
    run_benchmark(out, cache=cache, executor="submitit-local", **{**TINY, "methods": ["full"]})
    results = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((out / "cells").glob("*/result.json"))]
    assert [r["id"] for r in results] == ["foundation", "full_1shot_seed0"]
    pids = {r["pid"] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids  # each cell in a job process of its own
    assert len(list((out / "submitit").glob("*_result.pkl"))) == 2
    # the same protocol as the local executor: the same weights, hence the same scores, as tiny_run's cells
    ours, theirs = read_rows(out / "per_case.csv"), read_rows(tiny_run / "per_case.csv")
    final = [{k: r[k] for k in ("cell", "case_id", "dice", "nsd_1mm")} for r in ours]
    assert final == [{k: r[k] for k in ("cell", "case_id", "dice", "nsd_1mm")} for r in theirs
                     if r["cell"] in ("foundation", "full_1shot_seed0") and r["iteration"] in ("0", "2")]
    (out / "report.md").unlink()
    write_report(out)  # what `benchmark report DIR` does with the merged cells
    assert "| Full |" in (out / "report.md").read_text(encoding="utf-8")


def test_protocol_options_are_checked_before_running(tmp_path, cache):
    with pytest.raises(ValueError, match="--eval_at"):
        run_benchmark(tmp_path / "a", cache=cache, eval_at=[5], **TINY)
    with pytest.raises(ValueError, match="unknown method"):
        run_benchmark(tmp_path / "b", cache=cache, **{**TINY, "methods": ["ful"]})
    with pytest.raises(ValueError, match="--foundation"):
        run_benchmark(tmp_path / "c", datalist=tmp_path / "d.json", **TINY)


def test_budget_checkpoints_are_taken_after_the_dgst_restore(tiny_run):
    models = tiny_run / "cells/dgst_1shot_seed0_gamma1/work/models"
    early = torch.load(models / "model_it1.pt", map_location="cpu", weights_only=True)
    final = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert early.keys() == final.keys()
    heads = ("output_block.", "deep_supervision_heads.", "super_head.")  # always trained whole
    kernels = [k for k in final if final[k].ndim == 5 and not any(h in k for h in heads)
               and not torch.equal(early[k], final[k])]
    assert kernels  # the second step moved some kernel entries
    for k in kernels:  # one strict DGST step between the two: at most gamma = 1 entry per filter
        rows = (early[k] != final[k]).reshape(final[k].shape[0], -1).sum(1)
        assert int(rows.max()) <= 1, k
