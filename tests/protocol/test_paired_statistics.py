"""Paired comparisons in benchmark reports: bootstrap intervals over seeds and cases, Wilcoxon p-values, marks."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from helpers import REPO

from dgst_monai.protocol.report import paired_table
from dgst_monai.protocol.statistics import paired_difference

RESULTS = REPO / "docs" / "results" / "synthetic" / "multisite"


def test_a_constant_gain_is_significant_and_no_difference_is_not():
    rng = np.random.default_rng(0)
    base = {(s, f"c{i}"): float(rng.uniform(0.2, 0.8)) for s in range(3) for i in range(12)}
    better = {k: v + 0.05 for k, v in base.items()}
    diff = paired_difference(better, base)
    assert diff.mean == pytest.approx(0.05) and diff.low == pytest.approx(0.05) and diff.high == pytest.approx(0.05)
    assert diff.significant and diff.p_value < 1e-4 and diff.pairs == 36 and diff.seeds == 3
    same = paired_difference(dict(base), base)
    assert same.mean == 0 and not same.significant and same.p_value == 1.0
    noisy = {k: v + rng.normal(0, 0.1) for k, v in base.items()}  # no systematic difference
    spread = paired_difference(noisy, base)
    assert spread.low < 0 < spread.high and not spread.significant


def test_only_pairs_with_both_scores_count_and_the_interval_is_reproducible():
    base = {(0, "a"): 0.5, (0, "b"): 0.6, (1, "a"): 0.4}
    other = {(0, "a"): 0.7, (0, "b"): 0.9, (2, "z"): 0.1}
    first, second = paired_difference(other, base), paired_difference(other, base)
    assert first.pairs == 2 and first == second
    assert paired_difference({(5, "x"): 0.1}, base) is None


def test_the_committed_table_1_against_full(tmp_path):
    """On the committed synthetic Table 1 every method is below Full with intervals that exclude 0 (underlined)."""
    with open(RESULTS / "per_case.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    table = paired_table(rows, ["full", "dgst", "norm"], "full", [5, 10, 20], lambda m: 1 if m == "dgst" else None)
    lines = table.splitlines()
    assert lines[0] == "| Method | 5-shot | 10-shot | 20-shot |" and len(lines) == 4
    dgst = next(line for line in lines if line.startswith("| DGST"))
    assert dgst.count("<ins>-") == 3 and "n 20" in dgst
    assert paired_table(rows, ["dgst"], "bias_norm", [5], lambda m: None) is None  # no such reference cell: none
