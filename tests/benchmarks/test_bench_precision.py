"""benchmarks/bench_precision.py on a tiny checkpoint: both precisions segment the same scans through the
bundle's inference config, in alternating rounds, and the report's figures follow from the written masks."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from helpers import REPO

from dgst_monai.data.datalists import load_split, synthetic_datalist
from dgst_monai.predict import mask_path

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_precision  # noqa: E402


def test_both_precisions_segment_the_scans_and_the_agreement_is_measured(tiny_checkpoint, tmp_path):
    datalist = synthetic_datalist(tmp_path / "data", domain="mediastinum", n=2, fov_mm=(48.0, 48.0, 32.0))
    work = tmp_path / "work"
    result = bench_precision.main(["--checkpoint", str(tiny_checkpoint), "--preset", "tiny", "--datalist", datalist,
                                   "--split", "training", "--cases", "2", "--rounds", "2", "--work", str(work)])
    assert {p: len(s) for p, s in result["seconds"].items()} == {"float32": 2, "bfloat16": 2}
    assert result["ratio_bf16_to_fp32"] == result["median_s"]["bfloat16"] / result["median_s"]["float32"]
    cases = load_split(datalist, "training")
    assert [c["case_id"] for c in result["per_case"]] == [c["case_id"] for c in cases]
    for case, row in zip(cases, result["per_case"]):
        masks = {p: bench_precision.read_mask(mask_path(case["image"], work / p)) for p in bench_precision.PRECISIONS}
        label = bench_precision.read_mask(Path(case["label"]))
        assert row["voxels_differ"] == int((masks["float32"] ^ masks["bfloat16"]).sum())
        assert row["dice_bf16_vs_fp32"] == bench_precision.dice(masks["bfloat16"], masks["float32"])
        assert row["dsc_float32"] == bench_precision.dice(masks["float32"], label)
    assert result["mean"]["dsc_bfloat16"] == np.mean([r["dsc_bfloat16"] for r in result["per_case"]])
