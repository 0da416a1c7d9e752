"""Log2 histograms: slots, exact counts, percentile estimates against exact percentiles."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcptrace.model.histogram import SLOTS, Bucket, Log2Histogram, slot_bounds, slot_of

durations = st.integers(min_value=0, max_value=(1 << 64) - 1)
# Realistic close() durations: 0 ns .. ~1 h, with many small ones.
samples = st.lists(st.integers(min_value=0, max_value=3_600 * 10**9), min_size=1, max_size=400)
percents = st.floats(min_value=0.01, max_value=100, allow_nan=False)


def exact_percentile(values: list[int], p: float) -> int:
    """Nearest rank: the sample of rank ceil(p/100 * n)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered) - 1e-9))
    return ordered[rank - 1]


def test_slots_match_the_kernel_definition() -> None:
    # tt_cl_slot(): number of significant bits, so slot k holds [2^(k-1), 2^k).
    assert slot_of(0) == 0
    assert slot_of(1) == 1
    assert [slot_of(v) for v in (2, 3)] == [2, 2]
    assert slot_of(999) == 10
    assert slot_of(1_000_000_000) == 30
    assert slot_of((1 << 64) - 1) == 64 == SLOTS - 1
    with pytest.raises(ValueError):
        slot_of(-1)
    with pytest.raises(ValueError):
        slot_of(1 << 64)


@given(durations)
def test_a_value_lies_in_its_slot(v: int) -> None:
    low, high = slot_bounds(slot_of(v))
    assert low <= v < high


def test_slot_bounds_tile_the_range() -> None:
    prev_high = 0
    for s in range(SLOTS):
        low, high = slot_bounds(s)
        assert low == prev_high
        prev_high = high
    assert prev_high == 1 << 64
    with pytest.raises(ValueError):
        slot_bounds(SLOTS)


@given(samples)
def test_counts_sum_and_max_are_exact(values: list[int]) -> None:
    h = Log2Histogram.of(values)
    assert h.count == len(values)
    assert h.sum_ns == sum(values)
    assert h.max_ns == max(values)
    assert h.max_exact
    assert sum(b.count for b in h.buckets()) == len(values)
    for b in h.buckets():
        assert b.count == sum(1 for v in values if b.low_ns <= v < b.high_ns)


@settings(max_examples=300)
@given(samples, percents)
def test_percentile_estimate_is_within_a_factor_of_two(values: list[int], p: float) -> None:
    h = Log2Histogram.of(values)
    exact = exact_percentile(values, p)
    estimate = h.percentile(p)
    assert estimate is not None
    # Same slot as the exact value, so within a factor of 2 (and equal for 0).
    assert slot_of(estimate) == slot_of(exact)
    if exact == 0:
        assert estimate == 0
    else:
        assert exact / 2 < estimate < exact * 2
    assert estimate <= max(values)


@given(samples)
def test_p100_is_the_maximum(values: list[int]) -> None:
    assert Log2Histogram.of(values).percentile(100) == max(values)


@given(samples)
def test_percentiles_are_monotonic(values: list[int]) -> None:
    h = Log2Histogram.of(values)
    ests = [h.percentile(p) for p in (1, 10, 50, 90, 99, 99.9, 100)]
    assert ests == sorted(ests)  # type: ignore[type-var]


def test_percentiles_of_a_known_distribution() -> None:
    # 1000 closes of ~20 us and 10 of ~1 s (lingering): p50 in the us, p99 still us,
    # p99.5 and max at about a second.
    rng = random.Random(7)
    values = [rng.randint(15_000, 25_000) for _ in range(1000)] + [
        rng.randint(1_000_000_000, 1_010_000_000) for _ in range(10)
    ]
    h = Log2Histogram.of(values)
    assert 8_192 <= h.percentile(50) < 32_768  # type: ignore[operator]
    assert 8_192 <= h.percentile(99) < 32_768  # type: ignore[operator]
    assert 536_870_912 <= h.percentile(99.5) < 1_073_741_824 * 2  # type: ignore[operator]
    assert h.percentile(100) == max(values)


def test_empty_histogram() -> None:
    h = Log2Histogram()
    assert h.count == 0 and not h
    assert h.percentile(50) is None
    assert h.mean_ns is None
    assert h.buckets() == []
    assert h.to_json()["max_ns"] is None


def test_percentile_argument_is_checked() -> None:
    h = Log2Histogram.of([1])
    for bad in (0, -1, 100.5):
        with pytest.raises(ValueError):
            h.percentile(bad)


def test_zero_durations_estimate_zero() -> None:
    h = Log2Histogram.of([0, 0, 0, 5])
    assert h.percentile(50) == 0
    assert h.percentile(75) == 0
    assert h.percentile(100) == 5


@given(samples, samples)
def test_add_is_the_histogram_of_both(a: list[int], b: list[int]) -> None:
    assert Log2Histogram.of(a) + Log2Histogram.of(b) == Log2Histogram.of(a + b)


@given(samples, samples)
def test_sub_recovers_the_interval(a: list[int], b: list[int]) -> None:
    earlier = Log2Histogram.of(a)
    later = Log2Histogram.of(a + b)
    diff = later - earlier
    assert diff.counts == Log2Histogram.of(b).counts
    assert diff.sum_ns == sum(b)
    if max(b) > max(a):
        assert diff.max_exact and diff.max_ns == max(b)
    else:
        # An upper bound of the interval's samples, never below its true maximum.
        assert diff.max_ns >= max(b)
        assert diff.max_ns <= max(a)
        assert slot_of(diff.max_ns) == slot_of(max(b)) or diff.max_ns == max(a)
    # Percentiles of the difference stay within a factor of 2 of the exact ones.
    for p in (50, 90, 99):
        exact = exact_percentile(b, p)
        est = diff.percentile(p)
        assert est is not None
        assert slot_of(est) == slot_of(exact)


def test_sub_rejects_a_histogram_that_is_not_earlier() -> None:
    with pytest.raises(ValueError):
        Log2Histogram.of([5]) - Log2Histogram.of([5, 6])
    with pytest.raises(ValueError):
        Log2Histogram.of([1000]) - Log2Histogram.of([2])


def test_sub_of_equal_histograms_is_empty() -> None:
    h = Log2Histogram.of([1, 2, 3])
    d = h - h
    assert d.count == 0 and d.sum_ns == 0 and d.max_ns == 0


def test_from_slots_without_maximum_bounds_it() -> None:
    h = Log2Histogram.from_slots({11: 3})
    assert h.count == 3
    assert h.max_ns == 2047 and not h.max_exact
    top = h.percentile(100)
    assert top is not None and 1024 <= top <= 2047
    assert Log2Histogram.from_slots([0, 2]).counts[:3] == (0, 2, 0)
    with pytest.raises(ValueError):
        Log2Histogram.from_slots({SLOTS: 1})


def test_invalid_histograms_are_refused() -> None:
    with pytest.raises(ValueError):
        Log2Histogram(counts=(0,) * 3)
    with pytest.raises(ValueError):
        Log2Histogram(counts=(-1,) + (0,) * (SLOTS - 1))


@given(samples)
def test_json_round_trip(values: list[int]) -> None:
    h = Log2Histogram.of(values)
    obj = json.loads(json.dumps(h.to_json()))
    assert obj["count"] == len(values)
    assert obj["p50_ns"] == h.percentile(50)
    assert Log2Histogram.from_json(obj) == h


def test_json_shape() -> None:
    obj = Log2Histogram.of([1_000, 3_000]).to_json()
    assert obj["buckets"] == [
        {"ge_ns": 512, "lt_ns": 1024, "count": 1},
        {"ge_ns": 2048, "lt_ns": 4096, "count": 1},
    ]
    assert obj["max_ns"] == 3000 and obj["mean_ns"] == 2000
    assert set(obj) >= {"p50_ns", "p90_ns", "p99_ns", "count", "sum_ns"}


@pytest.mark.parametrize(
    "obj",
    [
        {"buckets": "x"},
        {"buckets": [{"ge_ns": 3, "lt_ns": 4, "count": 1}]},  # 3 is not a bucket bound
        {"buckets": [{"ge_ns": 4, "lt_ns": 8, "count": -1}]},
        {"buckets": [{"ge_ns": 4, "lt_ns": 8, "count": 1}], "count": 2},
        {"buckets": [{"ge_ns": "4", "count": 1}]},
        {},
    ],
)
def test_json_malformed(obj: dict[str, object]) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        Log2Histogram.from_json(obj)


def test_buckets_are_dataclasses() -> None:
    assert Log2Histogram.of([4, 5]).buckets() == [Bucket(4, 8, 2)]


@given(samples)
def test_cumulative_buckets_count_values_up_to_each_bound(values: list[int]) -> None:
    cum = Log2Histogram.of(values).cumulative()
    assert len(cum) == SLOTS
    assert cum[-1] == ((1 << 64) - 1, len(values))
    for le, count in cum[:40]:
        assert count == sum(1 for v in values if v <= le)
