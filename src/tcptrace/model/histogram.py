"""Histograms of durations: log2 buckets, nearest-rank percentiles, and ages in human buckets.

The one log2 bucketing of the project: the kernel counts each duration (in ns) into the
slot of its number of significant bits (``tt_cl_slot()`` in bpf/closelat.bpf.c;
``slot_of()`` here is the same function):

    slot 0: 0 ns            slot k (1..64): [2**(k-1), 2**k) ns

so a histogram is 65 exact counts, plus the count, sum and maximum. This module is pure
(no I/O) and is meant for any command or exporter that keeps such histograms. The same
slots counted in microseconds (``log2_buckets(values, unit_ns=US)``) give CLOSE_WAIT's
coarser times to close.

Percentiles use the nearest-rank definition (the p-th percentile of n samples is the
sample of rank ceil(p/100 * n) in sorted order). From a histogram, the slot that holds
that rank is known exactly; the estimate spreads the slot's c samples evenly over it
(the i-th of them at low + (high - low) * (i - 1/2) / c) and is clamped to the known
maximum; the top rank is the maximum itself when it is exact. The exact percentile lies
in the same slot, [low, 2 * low), as the estimate, so the two are within a factor of 2 of
each other (and equal for slot 0 and for p100 when the maximum is exact).

>>> h = Log2Histogram.of([1_000, 1_100, 1_200, 900_000])
>>> h.count, h.max_ns
(4, 900000)
>>> slot_bounds(slot_of(1_000))
(512, 1024)
>>> h.percentile(50)
1280
>>> h.percentile(100)
900000
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SLOTS = 65
"""Slot 0 holds 0 ns; slot k holds [2**(k-1), 2**k) ns; 2**64 - 1 ns is in slot 64."""

MAX_VALUE = (1 << 64) - 1
NS = 1_000_000_000
US = 1_000


def slot_of(value_ns: int) -> int:
    """The slot of a duration: its number of significant bits.

    >>> [slot_of(v) for v in (0, 1, 2, 3, 4, 1023, 1024)]
    [0, 1, 2, 2, 3, 10, 11]
    """
    if value_ns < 0 or value_ns > MAX_VALUE:
        raise ValueError(f"duration out of range: {value_ns}")
    return int(value_ns).bit_length()


def slot_bounds(slot: int) -> tuple[int, int]:
    """``(low, high)``: the slot holds values with low <= v < high.

    >>> slot_bounds(0), slot_bounds(1), slot_bounds(11)
    ((0, 1), (1, 2), (1024, 2048))
    """
    if not 0 <= slot < SLOTS:
        raise ValueError(f"slot out of range: {slot}")
    if slot == 0:
        return (0, 1)
    return (1 << (slot - 1), 1 << slot)


@dataclass(frozen=True)
class Bucket:
    """One non-empty slot: ``count`` values with ``low_ns <= v < high_ns``."""

    low_ns: int
    high_ns: int
    count: int


def buckets_of(slot_counts: Iterable[tuple[int, int]], unit_ns: int = 1) -> list[Bucket]:
    """The non-empty ones of (slot, count) pairs given lowest first, for values that were
    counted in units of ``unit_ns``; bounds in ns.

    >>> buckets_of([(0, 2), (3, 0), (11, 1)], unit_ns=US)
    [Bucket(low_ns=0, high_ns=1000, count=2), Bucket(low_ns=1024000, high_ns=2048000, count=1)]
    """
    out = []
    for slot, count in slot_counts:
        if count:
            low, high = slot_bounds(slot)
            out.append(Bucket(low * unit_ns, high * unit_ns, count))
    return out


def log2_buckets(values_ns: Iterable[int], unit_ns: int = 1) -> list[Bucket]:
    """The non-empty log2 buckets of these durations counted in units of ``unit_ns``
    (negative durations count as 0).

    >>> [(b.low_ns, b.high_ns, b.count) for b in log2_buckets([500, 1_500, 3_000, 3_500], unit_ns=US)]
    [(0, 1000, 1), (1000, 2000, 1), (2000, 4000, 2)]
    """
    counts = Counter(slot_of(max(0, v) // unit_ns) for v in values_ns)
    return buckets_of(sorted(counts.items()), unit_ns)


def nearest_rank(count: int, p: float) -> int:
    """The rank (1-based) of the nearest-rank ``p``-th percentile (0 < p <= 100) of ``count``
    sorted samples: ceil(p/100 * count), at least 1.

    >>> [nearest_rank(4, p) for p in (25, 50, 99, 100)], nearest_rank(1000, 99)
    ([1, 2, 4, 4], 990)
    """
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {p}")
    return max(1, math.ceil(p / 100 * count - 1e-9))


def percentile(sorted_values: Sequence[int], p: float) -> int | None:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of sorted values; None when empty.

    >>> percentile([1, 2, 3, 4], 50), percentile([1, 2, 3, 4], 100), percentile([], 50)
    (2, 4, None)
    """
    if not sorted_values:
        return None
    return sorted_values[min(nearest_rank(len(sorted_values), p), len(sorted_values)) - 1]


@dataclass(frozen=True)
class Log2Histogram:
    """Counts per slot, their number, sum and maximum. Immutable; ``+`` merges, ``-`` takes
    the part of a later cumulative histogram that is not in an earlier one.

    ``max_exact`` is False when the maximum is an upper bound rather than a seen value
    (the difference of two cumulative histograms whose maximum did not grow).
    """

    counts: tuple[int, ...] = (0,) * SLOTS
    sum_ns: int = 0
    max_ns: int = 0
    max_exact: bool = True

    def __post_init__(self) -> None:
        if len(self.counts) != SLOTS:
            raise ValueError(f"a log2 histogram has {SLOTS} slots, not {len(self.counts)}")
        if any(c < 0 for c in self.counts):
            raise ValueError("negative count in a histogram")
        if self.sum_ns < 0 or self.max_ns < 0:
            raise ValueError("negative sum or maximum in a histogram")

    # Construction ---------------------------------------------------------------------

    @classmethod
    def of(cls, values_ns: Iterable[int]) -> Log2Histogram:
        """The histogram of these durations (exact count, sum and maximum)."""
        counts = [0] * SLOTS
        total = 0
        top = 0
        for v in values_ns:
            counts[slot_of(v)] += 1
            total += v
            top = max(top, v)
        return cls(tuple(counts), total, top)

    @classmethod
    def from_slots(
        cls,
        slots: Mapping[int, int] | Sequence[int],
        sum_ns: int = 0,
        max_ns: int = 0,
        max_exact: bool = True,
    ) -> Log2Histogram:
        """From counts by slot (a mapping, or a sequence of up to SLOTS counts).

        Without a maximum (0), the maximum becomes the top of the highest non-empty slot,
        an upper bound (``max_exact`` False).
        """
        counts = [0] * SLOTS
        items = slots.items() if isinstance(slots, Mapping) else enumerate(slots)
        for slot, count in items:
            if not 0 <= int(slot) < SLOTS:
                raise ValueError(f"slot out of range: {slot}")
            counts[int(slot)] += int(count)
        hist = cls(tuple(counts), int(sum_ns), int(max_ns), max_exact)
        if hist.count and not max_ns:
            top = hist.highest_slot()
            assert top is not None
            hist = cls(hist.counts, hist.sum_ns, slot_bounds(top)[1] - 1 if top else 0, top == 0)
        return hist

    # Facts ----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        return sum(self.counts)

    def __bool__(self) -> bool:
        return self.count > 0

    @property
    def mean_ns(self) -> float | None:
        n = self.count
        return self.sum_ns / n if n else None

    def highest_slot(self) -> int | None:
        for slot in range(SLOTS - 1, -1, -1):
            if self.counts[slot]:
                return slot
        return None

    def buckets(self) -> list[Bucket]:
        """The non-empty slots, lowest first."""
        return buckets_of(enumerate(self.counts))

    def cumulative(self) -> list[tuple[int, int]]:
        """``(le_ns, count of values <= le_ns)`` for every slot: the inclusive top of the slot
        and the running count, as Prometheus histograms want their buckets (fixed bounds,
        cumulative counts; the last is the total).

        >>> Log2Histogram.of([0, 3, 3, 5]).cumulative()[:5]
        [(0, 1), (1, 1), (3, 3), (7, 4), (15, 4)]
        """
        out = []
        running = 0
        for slot, c in enumerate(self.counts):
            running += c
            out.append((slot_bounds(slot)[1] - 1, running))
        return out

    def percentile(self, p: float) -> int | None:
        """Estimate of the nearest-rank ``p``-th percentile (0 < p <= 100); None when empty.

        Within a factor of 2 of the exact one (see the module docstring).
        """
        n = self.count
        rank = nearest_rank(n, p)
        if n == 0:
            return None
        below = 0
        for slot, c in enumerate(self.counts):
            if c and below + c >= rank:
                low, high = slot_bounds(slot)
                if slot == 0:
                    return 0
                if rank == n and self.max_ns and self.max_exact:
                    return self.max_ns
                estimate = low + (high - low) * (2 * (rank - below) - 1) // (2 * c)
                if self.max_ns:
                    estimate = min(estimate, self.max_ns)
                return max(low, estimate)
            below += c
        raise AssertionError("unreachable: rank within count")

    def percentiles(self, ps: Iterable[float] = (50, 90, 99)) -> dict[float, int | None]:
        return {p: self.percentile(p) for p in ps}

    # Arithmetic -----------------------------------------------------------------------

    def __add__(self, other: Log2Histogram) -> Log2Histogram:
        if not isinstance(other, Log2Histogram):
            return NotImplemented
        if not other:
            return self
        if not self:
            return other
        if self.max_ns >= other.max_ns:
            top, exact = self.max_ns, self.max_exact
        else:
            top, exact = other.max_ns, other.max_exact
        return Log2Histogram(
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            self.sum_ns + other.sum_ns,
            top,
            exact,
        )

    def __sub__(self, earlier: Log2Histogram) -> Log2Histogram:
        """What was added to a cumulative histogram since ``earlier``.

        ValueError when ``earlier`` is not a part of this one (a counter went down: the
        histograms are of different things, or the kernel's map was reset).
        The maximum is exact when it grew since ``earlier``; otherwise the samples of the
        difference are at most the old maximum and below the top of their highest slot,
        and the smaller of the two is kept as an upper bound (``max_exact`` False).
        """
        if not isinstance(earlier, Log2Histogram):
            return NotImplemented
        counts = tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True))
        if any(c < 0 for c in counts) or self.sum_ns < earlier.sum_ns:
            raise ValueError("the earlier histogram is not a part of the later one")
        diff_sum = self.sum_ns - earlier.sum_ns
        if not any(counts):
            return Log2Histogram(counts, diff_sum, 0, True)
        if self.max_ns > earlier.max_ns:
            return Log2Histogram(counts, diff_sum, self.max_ns, self.max_exact)
        top = max(s for s, c in enumerate(counts) if c)
        bound = slot_bounds(top)[1] - 1
        if top == 0:
            return Log2Histogram(counts, diff_sum, 0, True)
        return Log2Histogram(counts, diff_sum, min(bound, self.max_ns), False)

    # JSON -----------------------------------------------------------------------------

    def to_json(self, ps: Sequence[float] = (50, 90, 99)) -> dict[str, Any]:
        """Counts, sum, mean, maximum, percentile estimates and the non-empty buckets.

        Each bucket is ``{"ge_ns": low, "lt_ns": high, "count": n}``.
        """
        out: dict[str, Any] = {
            "count": self.count,
            "sum_ns": self.sum_ns,
            "mean_ns": None if self.mean_ns is None else round(self.mean_ns),
            "max_ns": self.max_ns if self.count else None,
            "max_exact": self.max_exact,
        }
        for p in ps:
            out[f"p{p:g}_ns"] = self.percentile(p)
        out["buckets"] = [{"ge_ns": b.low_ns, "lt_ns": b.high_ns, "count": b.count} for b in self.buckets()]
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Log2Histogram:
        """The inverse of to_json (derived fields are ignored). ValueError, KeyError or
        TypeError when malformed."""
        slots: dict[int, int] = {}
        buckets = obj["buckets"]
        if not isinstance(buckets, list):
            raise TypeError("buckets must be a list")
        for b in buckets:
            low, count = b["ge_ns"], b["count"]
            if not isinstance(low, int) or not isinstance(count, int) or count < 0:
                raise TypeError("bucket bounds and counts must be non-negative integers")
            slot = slot_of(low)
            if slot_bounds(slot)[0] != low:
                raise ValueError(f"{low} is not the low bound of a log2 bucket")
            slots[slot] = slots.get(slot, 0) + count
        sum_ns = obj.get("sum_ns") or 0
        max_ns = obj.get("max_ns") or 0
        if not isinstance(sum_ns, int) or not isinstance(max_ns, int):
            raise TypeError("sum_ns and max_ns must be integers")
        exact = obj.get("max_exact", True)
        hist = cls.from_slots(slots, sum_ns, max_ns, bool(exact))
        if hist.count != obj.get("count", hist.count):
            raise ValueError("count does not match the buckets")
        return hist


EMPTY = Log2Histogram()


# ---- ages -----------------------------------------------------------------------------

AGE_EDGES_S = (0.1, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0)
"""Upper edges (seconds) of the age histogram of open CLOSE_WAIT sockets."""


def age_histogram(ages_ns: Iterable[int], edges_s: Sequence[float] = AGE_EDGES_S) -> list[tuple[str, int]]:
    """Counts of ages per human bucket (``<100ms``, ``1s-5s``, ``>30m``), all buckets kept;
    an age equal to an edge counts in the bucket above it.

    >>> age_histogram([int(0.5e9), int(2e9), int(3e9)], (1.0, 5.0))
    [('<1s', 1), ('1s-5s', 2), ('>5s', 0)]
    """
    edges = list(edges_s)
    counts = [0] * (len(edges) + 1)
    for age in ages_ns:
        secs = age / NS
        i = 0
        while i < len(edges) and secs >= edges[i]:
            i += 1
        counts[i] += 1
    labels = []
    for i in range(len(edges) + 1):
        if i == 0:
            labels.append(f"<{_fmt_s(edges[0])}")
        elif i == len(edges):
            labels.append(f">{_fmt_s(edges[-1])}")
        else:
            labels.append(f"{_fmt_s(edges[i - 1])}-{_fmt_s(edges[i])}")
    return list(zip(labels, counts, strict=True))


def _fmt_s(secs: float) -> str:
    if secs < 1:
        return f"{secs * 1000:g}ms"
    if secs < 60:
        return f"{secs:g}s"
    return f"{secs / 60:g}m"
