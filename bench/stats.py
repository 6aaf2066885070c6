"""Statistics of repeated measurements and the ratios the report prints.

Pure functions, no I/O: unit-tested in ``tests/unit/test_bench.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default "linear" method). Raises ValueError for no values or q outside 0..100."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(ordered[lo])
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


@dataclass(frozen=True)
class Summary:
    """Repeated runs of one metric: the machine's noise is max - min."""

    n: int
    median: float
    min: float
    max: float
    p99: float
    mean: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative noise of the runs (0 for one run)."""
        return (self.max - self.min) / self.median if self.median else 0.0


def summarize(values: Sequence[float]) -> Summary | None:
    """Summary of ``values``, ignoring NaN; None when nothing is left."""
    clean = [float(v) for v in values if not math.isnan(float(v))]
    if not clean:
        return None
    return Summary(
        n=len(clean),
        median=percentile(clean, 50),
        min=min(clean),
        max=max(clean),
        p99=percentile(clean, 99),
        mean=sum(clean) / len(clean),
    )


def ratio(ours: float | None, reference: float | None) -> float | None:
    """ours / reference, or None when either is missing or the reference is not positive."""
    if ours is None or reference is None or reference <= 0 or math.isnan(reference):
        return None
    if math.isnan(ours):
        return None
    return ours / reference


GiB = 1 << 30
QUIET_LOAD = (
    0.5  # a 1-minute load average above this at the start: the figures are not a quiet machine's
)


def per_gib(cpu_seconds: float | None, memory_bytes: float | None) -> float | None:
    """CPU-seconds per GiB of memory moved, or None when either is missing or no memory."""
    if cpu_seconds is None or not memory_bytes or memory_bytes <= 0:
        return None
    return cpu_seconds * GiB / memory_bytes


def load_warning(load_start: float) -> str | None:
    """The warning a bench prints when the machine was not quiet at the start, else None."""
    if load_start <= QUIET_LOAD:
        return None
    return (
        f"WARNING: load average {load_start:.2f} at the start (> {QUIET_LOAD}): the machine "
        "is not quiet; throughput and CPU figures are a busy machine's (compare ratios to the "
        "peers of the same run, not absolute figures)"
    )


def median_of(summary: Summary | None) -> float | None:
    return summary.median if summary is not None else None


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_summary(summary: Summary | None, unit: str, scale: float = 1.0, digits: int = 1) -> str:
    """'median [min..max] unit' for the table ('-' when there is no value)."""
    if summary is None:
        return "-"
    m, lo, hi = summary.median / scale, summary.min / scale, summary.max / scale
    if summary.n == 1:
        return f"{m:.{digits}f} {unit}"
    return f"{m:.{digits}f} [{lo:.{digits}f}..{hi:.{digits}f}] {unit}"


def summaries(records: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Summary | None]:
    """Summaries of several numeric fields over a list of per-run records (missing or None
    values are skipped)."""
    out: dict[str, Summary | None] = {}
    for key in keys:
        values = [float(r[key]) for r in records if r.get(key) is not None]
        out[key] = summarize(values)
    return out
