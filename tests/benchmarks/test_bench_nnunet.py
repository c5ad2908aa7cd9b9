"""benchmarks/bench_nnunet.py at its tiny size against the real nnU-Net v2: the report has every row, nnU-Net
trained the same plan as ours, the DGST side really runs the DGST handler, and the masks agree.

Runs the script as a user does (a subprocess; each measurement in its own worker process). Needs nnunetv2
(``pip install -e ".[nnunet]"``); about a minute on one core.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (pip install -e '.[nnunet]'); the benchmark compares against it")

SCRIPT = REPO / "benchmarks" / "bench_nnunet.py"


def _lps_scan(path: Path) -> Path:
    """A 100 x 90 x 30 CT-like scan at the tiny plan's spacing, identity direction (LPS), a bright blob off centre."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    array = rng.normal(40.0, 60.0, size=(30, 90, 100))  # SimpleITK arrays are (z, y, x)
    z, y, x = np.ogrid[:30, :90, :100]
    array[(z - 12) ** 2 / 36 + (y - 30) ** 2 / 100 + (x - 70) ** 2 / 100 <= 1] += 300.0
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing((0.8, 0.8, 2.0))
    image.SetOrigin((-40.0, 12.5, -300.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.slow  # trains and runs both tools (nnU-Net's preprocessing and planning included): minutes
def test_tiny_benchmark_runs_both_sides_on_the_same_plan_and_the_masks_agree(tmp_path: Path) -> None:
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    scan = _lps_scan(tmp_path / "lps_ct.nii.gz")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--work", str(tmp_path / "work"),
         "--volumes", "small", "thick5mm", "--scan", str(scan),
         "--variants", "monai-gaussian", "monai-resampling", "monai-window", "--json", str(out), "--markdown", str(md)],
        capture_output=True, text=True, encoding="utf-8", timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    cfg = result["config"]
    assert cfg["threads"] == 1 and "bench_nnunet.py" in cfg["command"]

    train = result["train"]
    for side in ("ours-pretrain", "ours-dgst", "nnunet"):
        s = train["summary"][side]
        assert s["n"] == 1 and s["total"] >= s["compute"] > 0 and s["data"] >= 0
        run = train["raw"][side][0]
        assert run["threads"] == 1  # single-threaded as recorded
    assert train["raw"]["ours-dgst"][0]["dgst_handler"] is True
    nnunet = train["raw"]["nnunet"][0]
    # nnU-Net trained our plan: patch reversed to its (z, y, x), batch 2, deep supervision over n_stages - 1 outputs
    assert nnunet["patch_size"] == cfg["patch"][::-1]
    assert nnunet["batch_size"] == cfg["batch"] == 2
    assert nnunet["deep_supervision_outputs"] == len(cfg["filters"]) - 1

    # thick slices, resampled by both tools: the imported model's "nnunet" rule gives nnU-Net's mask, the
    # bundles' own trilinear rule does not
    thick = result["inference"]["thick5mm"]["summary"]["sides"]
    assert thick["ours"]["agreement"]["dice"] >= 0.99
    assert thick["ours-monai-resampling"]["agreement"]["dice"] < thick["ours"]["agreement"]["dice"]

    sides = result["inference"]["small"]["summary"]["sides"]
    assert set(sides) == {"ours", "nnunet", "ours-monai-gaussian", "ours-monai-resampling", "ours-monai-window"}
    # same weights, same windows (the tiny volume is tile-aligned, at the plan's spacing): with the bundle's
    # nnU-Net-style window weighting our pipeline gives nnU-Net's mask; MONAI's own Gaussian (centred between
    # voxels) moves some voxels
    ours = sides["ours"]["agreement"]
    assert ours["nnunet_voxels"] > 0 and ours["dice"] >= 0.99
    assert 0.5 < sides["ours-monai-gaussian"]["agreement"]["dice"] <= ours["dice"]

    # a scan as stored (LPS: identity direction) whose x and y are not window-aligned: the imported model keeps
    # the file's voxel order and places its windows at nnU-Net's rounded fractional steps, so the masks agree
    lps_sides = result["inference"]["scan-lps_ct"]["summary"]["sides"]
    lps = lps_sides["ours"]["agreement"]
    assert lps["shape"] == [30, 90, 100] and lps["nnunet_voxels"] > 0 and lps["dice"] >= 0.99
    # MONAI's own sliding window starts them at 0, 24, 48, 52: a different mask
    assert lps_sides["ours-monai-window"]["agreement"]["dice"] < 0.99

    text = md.read_text(encoding="utf-8")
    for row in ("| ours-pretrain |", "| ours-dgst |", "| nnunet |", "| ours-monai-gaussian |", "Command:"):
        assert row in text
