"""Smoke test of the whole pipeline: the demo at its tiny size, through the real bundle runs."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch

from dgst_monai.demo import run_demo


def test_demo_tiny_runs_every_stage_and_reports_dsc_nsd(tmp_path, capsys):
    """Pre-train, fine-tune (full, dgst) and evaluate on synthetic CT; the table and files hold real figures."""
    started = time.time()
    rows = run_demo(output=tmp_path, size="tiny", shots=2)
    elapsed = time.time() - started

    assert list(rows) == ["foundation (no fine-tuning)", "full (2-shot)", "dgst (2-shot)"]
    for summary in rows.values():
        for metric in ("dice", "nsd_1mm"):
            assert 0.0 <= summary[metric]["mean"] <= 1.0
            assert summary[metric]["n"] == summary["n_cases"] >= 1
    test_ids = [c["case_id"] for c in json.loads((tmp_path / "data/mediastinum/datalist.json").read_text(encoding="utf-8"))["test"]]
    with open(tmp_path / "finetune_dgst/eval/per_case_metrics.csv", encoding="utf-8") as f:
        assert sorted(r["case_id"] for r in csv.DictReader(f)) == sorted(test_ids)

    foundation = torch.load(tmp_path / "foundation/model.pt", map_location="cpu", weights_only=True)
    full = torch.load(tmp_path / "finetune_full/model.pt", map_location="cpu", weights_only=True)
    dgst = torch.load(tmp_path / "finetune_dgst/model.pt", map_location="cpu", weights_only=True)
    kernel = "downsamples.0.conv2.conv.weight"
    # full fine-tuning moves (nearly) every kernel entry; strict DGST at most one entry per output filter per step
    changed_full = (full[kernel] != foundation[kernel]).float().mean()
    changed_dgst = (dgst[kernel] != foundation[kernel]).view(foundation[kernel].shape[0], -1).sum(1)
    assert changed_full > 0.9
    assert int(changed_dgst.max()) <= 3  # tiny size: 3 optimizer steps, gamma 1
    assert int(changed_dgst.sum()) > 0

    table = capsys.readouterr().out
    assert "target DSC %" in table and "source DSC % (retained)" in table
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert list(results["source_retained"]) == list(rows)  # every model also scored on the held-out source cases
    source_test = json.loads((tmp_path / "data/hn/datalist.json").read_text(encoding="utf-8"))["test"]
    for name, summary in results["source_retained"].items():
        assert 0.0 <= summary["dice"]["mean"] <= 1.0 and summary["n_cases"] == len(source_test), name
    with open(tmp_path / "finetune_full/eval_source/per_case_metrics.csv", encoding="utf-8") as f:
        assert sorted(r["case_id"] for r in csv.DictReader(f)) == sorted(c["case_id"] for c in source_test)
    print(f"tiny demo: {elapsed:.0f} s")  # acceptance: under 2 minutes (measured, not asserted: see pytest -s)


def test_each_size_brings_shots_that_fit_and_a_bad_combination_is_one_line(tmp_path, capsys):
    """``dgst-monai demo --size tiny`` works without ``--shots`` (the size's own); shots beyond the size's
    target training cases stop before anything is written, in one line naming both settings."""
    from dgst_monai.cli import main
    from dgst_monai.demo import SIZES

    for size in SIZES.values():
        assert 0 < size.shots <= size.target_cases - max(1, round(0.2 * size.target_cases))
    with pytest.raises(SystemExit):
        main(["demo", "--size", "tiny", "--shots", "5", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert err == ("dgst-monai demo: error: --shots 5 does not fit --size tiny: it has 3 target training cases "
                   "(give --shots 1..3, or leave it out for 2)")
    assert not (tmp_path / "run").exists()
