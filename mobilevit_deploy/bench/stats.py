"""Timing statistics, pure Python (no numpy), so reports and tests need nothing heavy.

Conventions used everywhere in the benchmark:
- `percentile(xs, q)` is linear interpolation between closest ranks (numpy's default "linear").
- `summarize(samples)` gives median, p10, p90, min, max, mean, std and `spread_pct`
  = 100 * (p90 - p10) / median: how wide the middle 80 % of the runs is, relative to the median.
- `paired_ratio(rows_by_round, ref_by_round)` is the in-run ratio: for each round, the row's median
  divided by the reference's median *in that round*, then the median over rounds. Rounds are measured
  round-robin, so slow phases of a shared machine hit the row and its reference alike and cancel.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def _sorted_finite(xs: Iterable[float]) -> list[float]:
    out = sorted(float(x) for x in xs)
    if not out:
        raise ValueError("no samples")
    if not all(math.isfinite(x) for x in out):
        raise ValueError("samples must be finite numbers")
    return out


def percentile(xs: Iterable[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation between closest ranks."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    s = _sorted_finite(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(xs: Iterable[float]) -> float:
    return percentile(xs, 50.0)


def mean(xs: Iterable[float]) -> float:
    s = _sorted_finite(xs)
    return sum(s) / len(s)


def std(xs: Iterable[float]) -> float:
    """Population standard deviation (0 for a single sample)."""
    s = _sorted_finite(xs)
    m = sum(s) / len(s)
    return math.sqrt(sum((x - m) ** 2 for x in s) / len(s))


def summarize(samples_ms: Sequence[float]) -> dict:
    """Summary of per-inference times in ms: median, p10, p90, min, max, mean, std, spread_pct, n."""
    s = _sorted_finite(samples_ms)
    med = percentile(s, 50)
    p10, p90 = percentile(s, 10), percentile(s, 90)
    return {
        "median": med,
        "p10": p10,
        "p90": p90,
        "min": s[0],
        "max": s[-1],
        "mean": mean(s),
        "std": std(s),
        "spread_pct": 100.0 * (p90 - p10) / med if med > 0 else float("nan"),
        "n": len(s),
    }


def paired_ratio(row_round_medians: Sequence[float], ref_round_medians: Sequence[float]) -> float:
    """Median over rounds of (row median / reference median of the same round)."""
    if len(row_round_medians) != len(ref_round_medians):
        raise ValueError(f"{len(row_round_medians)} row rounds vs {len(ref_round_medians)} reference rounds")
    ratios = []
    for r, ref in zip(row_round_medians, ref_round_medians):
        if not ref > 0:
            raise ValueError(f"reference median must be > 0, got {ref}")
        ratios.append(r / ref)
    return median(ratios)
