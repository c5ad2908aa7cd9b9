"""benchmarks/bench_compile.py on the tiny plan (filters 4-8-16-32, patch 32x32x16): eager and compiled side by
side for each phase and precision, ratios that follow from the reported medians, compiled outputs that match
eager's, and a failing compile that is recorded while eager is still reported.

The fast tests compile with the ``aot_eager`` backend (dynamo and AOTAutograd, no code generation: seconds) and
with inductor whose C++ compiler is missing (it fails at once); the real inductor run is ``slow``: a cold
compile of even the tiny network takes about a minute per graph on one core.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, requires_cxx

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_compile  # noqa: E402
from bench_dgst import median  # noqa: E402

TINY = ["--preset", "tiny", "--base-filters", "4", "--patch", "32", "32", "16", "--threads", "1"]


def _check_case(case: dict, rounds: int) -> None:
    """Both variants ran every round, and the summary figures are those of the raw times."""
    variants = case["variants"]
    assert set(variants) == {"eager", "compiled"}, case["errors"]
    for v in variants.values():
        assert len(v["seconds"]) == rounds
        assert v["median_s"] == median(v["seconds"])
        assert v["compile_s"] == v["first_call_s"] - v["median_s"]
    eager, compiled = variants["eager"], variants["compiled"]
    ratio = case["ratios"]["compiled"]
    assert ratio["ratio"] == compiled["median_s"] / eager["median_s"]
    assert ratio["paired_ratio"] == median([c / e for c, e in zip(compiled["seconds"], eager["seconds"])])


def _tolerance(case: dict, v: dict) -> float:
    # bfloat16: inductor keeps fused intermediates in float32 where eager rounds each op's output to bfloat16
    return 1e-4 if case["precision"] == "float32" else 0.05 * v["max_abs_output"]


def test_eager_and_compiled_for_each_precision_and_phase_with_ratios_of_their_medians(tmp_path: Path) -> None:
    out, md = tmp_path / "compile.json", tmp_path / "compile.md"
    returned = bench_compile.main([*TINY, "--backend", "aot_eager", "--rounds", "2", "--warmup", "0",
                                   "--json", str(out), "--markdown", str(md)])
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["compile_works"] is True and returned["compile_works"] is True
    assert result["threads"] == 1 and result["filters"] == [4, 8, 16, 32] and result["patch"] == [32, 32, 16]
    assert [(c["phase"], c["precision"]) for c in result["cases"]] == [
        ("inference", "float32"), ("inference", "bfloat16"), ("train", "float32"), ("train", "bfloat16")]
    table = md.read_text(encoding="utf-8")
    for case in result["cases"]:
        assert case["errors"] == {}
        _check_case(case, rounds=2)
        compiled = case["variants"]["compiled"]
        # the same weights and input: aot_eager runs eager's own ATen ops
        assert compiled["max_abs_diff"] <= _tolerance(case, compiled)
        if case["phase"] == "train":  # the first step's loss and gradients too
            assert compiled["loss_abs_diff"] <= 1e-4 and compiled["max_abs_grad_diff"] <= 1e-4
            assert compiled["max_abs_grad"] > 0
        assert case["dynamo"]["unique_graphs"] >= 1
        ratio = f"{case['ratios']['compiled']['ratio']:.3f}"
        assert f"| {case['phase']} | {case['precision']} | compiled | " in table and f"| {ratio} |" in table


def test_a_failing_compile_is_recorded_and_eager_is_still_reported(tmp_path: Path) -> None:
    import torch._inductor.config as inductor_config

    # inductor without a working C++ compiler: the error surfaces at the compiled network's first call. The
    # config's own patch() restores the setting (monkeypatch.setattr would delete it from the config at undo)
    md = tmp_path / "compile.md"
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        result = bench_compile.main([*TINY, "--rounds", "1", "--warmup", "0", "--skip", "train",
                                     "--precisions", "float32", "--markdown", str(md)])
    assert result["compile_works"] is False
    [case] = result["cases"]
    assert (case["phase"], case["precision"]) == ("inference", "float32")
    assert set(case["errors"]) == {"compiled"} and "/nonexistent/g++" in case["errors"]["compiled"]
    assert set(case["variants"]) == {"eager"} and case["ratios"] == {}
    eager = case["variants"]["eager"]
    assert len(eager["seconds"]) == 1 and eager["median_s"] > 0
    table = md.read_text(encoding="utf-8")
    assert "| inference | float32 | compiled | failed |" in table
    assert "/nonexistent/g++" in table and "torch.compile failed" in table


@pytest.mark.slow
@pytest.mark.timeout(900)
@requires_cxx
def test_inductor_output_and_gradients_match_eager(tmp_path: Path) -> None:
    """Slow: inductor's cold compile (C++ code generation) of the tiny network, forward and backward, takes
    about two minutes on one core."""
    result = bench_compile.main([*TINY, "--rounds", "1", "--warmup", "1", "--precisions", "float32"])
    assert result["compile_works"] is True, [c["errors"] for c in result["cases"]]
    for case in result["cases"]:
        _check_case(case, rounds=1)
        compiled = case["variants"]["compiled"]
        assert compiled["max_abs_diff"] <= 1e-4 * max(1.0, compiled["max_abs_output"])
        assert compiled["first_call_s"] > compiled["median_s"]  # the first call compiled
        if case["phase"] == "train":
            assert compiled["max_abs_grad_diff"] <= 1e-4 * max(1.0, compiled["max_abs_grad"])
    assert torch.get_num_threads() == 1
