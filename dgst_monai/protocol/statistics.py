"""Paired comparisons of two methods over the same test cases and seeds: a bootstrap interval and a Wilcoxon test.

Two cells of one shot level and seed are fine-tuned from the same foundation on the same shots and scored on the
same test cases, so their per-case scores pair up by (seed, case). :func:`paired_difference` gives the mean
difference (method minus reference) with a percentile-bootstrap 95 % interval that resamples seeds and test cases
independently (both are sources of variation in a few-shot result), and the two-sided Wilcoxon signed-rank
p-value over the pairs. A difference is called significant only when its interval excludes 0.

Example::

    diff = paired_difference({(0, "c1"): 0.61, (0, "c2"): 0.55}, {(0, "c1"): 0.58, (0, "c2"): 0.50})
    diff.mean, diff.low, diff.high, diff.p_value
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedDifference", "mean_interval", "paired_difference"]

#: bootstrap resamples per comparison
RESAMPLES = 4000


@dataclass(frozen=True)
class PairedDifference:
    """Method minus reference over the paired (seed, case) scores."""

    mean: float
    low: float
    high: float
    p_value: float
    pairs: int
    seeds: int

    @property
    def significant(self) -> bool:
        """Whether the 95 % interval excludes 0."""
        return self.low > 0 or self.high < 0


def paired_difference(
    method: Mapping[tuple[int, str], float],
    reference: Mapping[tuple[int, str], float],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> PairedDifference | None:
    """The paired difference of two methods' per-(seed, case) scores; None when no pair has both scores.

    Args:
        method: ``{(seed, case id): score}`` of the method.
        reference: the same for the reference method.
        resamples: bootstrap resamples.
        seed: the bootstrap's random seed (the interval is reproducible).
    """
    from scipy.stats import wilcoxon

    keys = sorted(k for k in method.keys() & reference.keys()
                  if math.isfinite(method[k]) and math.isfinite(reference[k]))
    if not keys:
        return None
    table = _table({k: method[k] - reference[k] for k in keys})
    low, high = _bootstrap(table, resamples, seed)
    differences = table[np.isfinite(table)]
    if np.all(differences == 0):
        p_value = 1.0
    else:
        p_value = float(wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)
    return PairedDifference(float(differences.mean()), low, high, p_value, len(keys), table.shape[0])


def mean_interval(
    scores: Mapping[tuple[int, str], float], resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float] | None:
    """Mean of per-(seed, case) scores with the same bootstrap 95 % interval (seeds and cases resampled);
    None without a finite score."""
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}
    if not finite:
        return None
    table = _table(finite)
    low, high = _bootstrap(table, resamples, seed)
    return float(np.mean(list(finite.values()))), low, high


def _table(values: Mapping[tuple[int, str], float]) -> np.ndarray:
    """Seeds x cases array of the values (NaN where a seed lacks a case)."""
    seeds = sorted({s for s, _ in values})
    cases = sorted({c for _, c in values})
    table = np.full((len(seeds), len(cases)), np.nan)
    for (s, c), value in values.items():
        table[seeds.index(s), cases.index(c)] = value
    return table


def _bootstrap(table: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile 95 % interval of the mean, resampling the rows (seeds) and the columns (cases) independently."""
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for i in range(resamples):
        rows = rng.integers(0, table.shape[0], table.shape[0])
        cols = rng.integers(0, table.shape[1], table.shape[1])
        sample = table[np.ix_(rows, cols)]
        draws[i] = np.nanmean(sample) if np.isfinite(sample).any() else np.nan
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return float(low), float(high)
