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

__all__ = ["PairedDifference", "paired_difference"]

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
    seeds = sorted({s for s, _ in keys})
    cases = sorted({c for _, c in keys})
    table = np.full((len(seeds), len(cases)), np.nan)
    for s, c in keys:
        table[seeds.index(s), cases.index(c)] = method[(s, c)] - reference[(s, c)]
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for i in range(resamples):
        rows = rng.integers(0, len(seeds), len(seeds))
        cols = rng.integers(0, len(cases), len(cases))
        sample = table[np.ix_(rows, cols)]
        draws[i] = np.nanmean(sample) if np.isfinite(sample).any() else np.nan
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    differences = table[np.isfinite(table)]
    if np.all(differences == 0):
        p_value = 1.0
    else:
        p_value = float(wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)
    return PairedDifference(float(differences.mean()), float(low), float(high), p_value, len(keys), len(seeds))
