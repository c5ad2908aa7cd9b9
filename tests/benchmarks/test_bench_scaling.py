"""benchmarks/bench_scaling.py at ``--quick``, run as a user runs it: one width and patch for training, two
volumes for inference, and a report whose figures follow from its own measurements (about 20 s on one core)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from helpers import REPO

SCRIPT = REPO / "benchmarks" / "bench_scaling.py"


def _windows(volume: list[int], patch: list[int], overlap: float = 0.5) -> int:
    """MONAI's window count per axis: ceil((size - patch) / (patch * (1 - overlap))) + 1."""
    return math.prod(
        1 if v <= p else math.ceil((v - p) / (p * (1 - overlap))) + 1 for v, p in zip(volume, patch)
    )


def test_quick_scaling_run_reports_what_it_measured(tmp_path: Path) -> None:
    out, md = tmp_path / "scaling.json", tmp_path / "scaling.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--warmup", "0", "--json", str(out), "--markdown", str(md)],
        capture_output=True, text=True, encoding="utf-8", timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["threads"] == 1

    (case,) = result["train"]  # --quick: the narrowest width at the smallest patch
    assert case["filters"] == [8, 16, 32, 64, 80, 80] and case["patch"] == [64, 64, 32]
    assert case["parameters"] > 1e6 and case["full_s"] > 0 and case["dgst_s"] > 0
    assert math.isclose(case["ratio"], case["dgst_s"] / case["full_s"], rel_tol=1e-9)
    # DGST's own phases add work, a small fraction of a step
    assert case["added_s"] > 0 and 1.0 < case["added_ratio"] < 1.5

    assert [c["volume"] for c in result["inference"]] == [[64, 64, 64], [128, 128, 64]]
    for c in result["inference"]:
        assert c["voxels"] == math.prod(c["volume"])
        assert c["windows"] == _windows(c["volume"], [64, 64, 32])
        assert math.isclose(c["s_per_mvoxel"], c["seconds"] / c["voxels"] * 1e6, rel_tol=1e-9)
        assert math.isclose(c["s_per_window"], c["seconds"] / c["windows"], rel_tol=1e-9)

    text = md.read_text(encoding="utf-8")
    assert "| 8-16-32-64-80-80 | 64x64x32 |" in text and "| 128x128x64 | 1.05 | 27 |" in text
