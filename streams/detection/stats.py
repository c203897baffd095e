"""Small statistics the engine decides with: Wilson interval and a Bernoulli log-likelihood CUSUM.

Both work on the blocked share k/n of one series, never on a median: a median is a step function that hides
blocking of under half the measurements and chatters at half (OONI's own critique of its 2025 detector).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache


@lru_cache(maxsize=65536)  # k and n are small counts, asked for every measurement
def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials: honest at small n, unlike k/n ± normal error."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@lru_cache(maxsize=64)  # the same two settings for every measurement
def llr_weights(p0: float, p1: float) -> tuple[float, float]:
    """Log-likelihood ratio of one anomalous and one ok measurement, blocked (p1) against unblocked (p0)."""
    return math.log(p1 / p0), math.log((1 - p1) / (1 - p0))


def cusum_up(flags: Iterable[bool], p0: float, p1: float) -> tuple[float, int]:
    """One-sided Bernoulli CUSUM over anomaly flags in time order.

    Returns the final statistic and the index where the current run began (after the last reset to 0), so the
    caller can ask how many distinct probes the evidence of this run came from. Partial or intermittent blocking
    (an exam-hours schedule, one ISP in three) drifts the statistic up; scattered single anomalies decay back.
    """
    up, down = llr_weights(p0, p1)
    s = 0.0
    start = 0
    for i, bad in enumerate(flags):
        s = s + (up if bad else down)
        if s <= 0:
            s = 0.0
            start = i + 1
    return s, start
