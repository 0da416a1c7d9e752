"""The label bound: top N by activity, the rest aggregated, every counter series monotonic,
nothing counted twice or lost; kernel map differences and idle entries."""

from __future__ import annotations

import doctest
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tcptrace.model.cardinality
from tcptrace.model.cardinality import BoundedCounters, MapDeltas, top_n
from tcptrace.model.histogram import EMPTY, Log2Histogram

NS = 1_000_000_000


def test_docstring_examples() -> None:
    result = doctest.testmod(tcptrace.model.cardinality)
    assert result.attempted > 0 and result.failed == 0


def test_top_n_keeps_the_largest_and_sums_the_rest() -> None:
    values = {f"p{i}": i for i in range(30)}
    kept, rest, n_rest = top_n(values, 5)
    assert [k for k, _ in kept] == ["p29", "p28", "p27", "p26", "p25"]
    assert rest == sum(range(25)) and n_rest == 25
    with pytest.raises(ValueError):
        top_n(values, -1)


# One step of a generated workload: (key, increment) pairs, then a rebalance.
steps = st.lists(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 50)), max_size=30),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps=steps, limit=st.integers(0, 8))
def test_bounded_counters_bound_conserve_and_never_go_down(
    steps: list[list[tuple[int, int]]], limit: int
) -> None:
    c: BoundedCounters[int, int] = BoundedCounters(
        limit, zero=0, idle_ns=5 * NS, min_hold_ns=2 * NS, candidates=10
    )
    seen: dict[int, int] = {}
    other_before = 0
    added = 0
    ended = 0  # totals of series that ended (their key was dropped)
    for i, step in enumerate(steps):
        now = i * NS
        for key, n in step:
            c.add(key, n, now)
            added += n
        before = dict(c.items())
        c.rebalance(now)
        after = dict(c.items())
        ended += sum(v for k, v in before.items() if k not in after)
        assert len(c) <= limit
        assert c.other >= other_before
        other_before = c.other
        for key, value in after.items():
            if key in seen and key in before:
                assert value >= seen[key], "a counter series went down"
            seen[key] = value
        for key in list(seen):
            if key not in after:
                del seen[key]
        # Every increment is in exactly one place: a live series, an ended one, or other.
        assert sum(after.values()) + ended + c.other == added


def test_the_busiest_newcomer_is_promoted_and_starts_from_zero() -> None:
    c: BoundedCounters[str, int] = BoundedCounters(2, zero=0, idle_ns=3600 * NS, min_hold_ns=NS)
    c.add("a", 1, 0)
    c.add("b", 1, 0)
    c.rebalance(0)
    for t in range(1, 6):
        c.add("a", 1, t * NS)
        c.add("hot", 100, t * NS)
        c.rebalance(t * NS)
    items = dict(c.items())
    assert "hot" in items and "a" in items and "b" not in items
    # Its counts before admission stayed in `other`: the series began at zero.
    assert items["hot"] < 500
    assert c.other >= 100
    assert items["hot"] + c.other + 1 == 500 + 1  # b's 1 ended with its series


def test_idle_keys_are_dropped_and_their_slot_reused() -> None:
    c: BoundedCounters[str, int] = BoundedCounters(1, zero=0, idle_ns=10 * NS, min_hold_ns=0)
    c.add("old", 5, 0)
    c.rebalance(0)
    c.rebalance(11 * NS)
    assert len(c) == 0
    c.add("new", 2, 12 * NS)
    assert dict(c.items()) == {"new": 2}


def test_thirty_processes_with_a_bound_of_five() -> None:
    rng = random.Random(7)
    c: BoundedCounters[tuple[int, str], int] = BoundedCounters(5, zero=0)
    total = 0
    for t in range(50):
        for pid in range(1000, 1030):
            n = rng.randint(0, 3)
            c.add((pid, f"client{pid}"), n, t * NS)
            total += n
        c.rebalance(t * NS)
        assert len(c) <= 5
    assert sum(v for _, v in c.items()) + c.other == total


def test_histograms_are_bounded_like_counters() -> None:
    c: BoundedCounters[int, Log2Histogram] = BoundedCounters(1, zero=EMPTY, weight=lambda h: float(h.count))
    c.add(1, Log2Histogram.of([1000, 2000]), 0)
    c.add(2, Log2Histogram.of([5]), 0)
    assert dict(c.items())[1].count == 2
    assert c.other.count == 1 and c.other.max_ns == 5


def test_map_deltas_recreated_entries_and_idle_keys() -> None:
    d: MapDeltas[int, int] = MapDeltas(idle_reads=3, subtract=lambda a, b: a - b, weight=float)
    assert d.update({1: 10, 2: 5}) == ({1: 10, 2: 5}, [])
    assert d.update({1: 12, 2: 5}) == ({1: 2}, [])
    # Entry 1 was deleted and recreated by the kernel: its new value is all new.
    assert d.update({1: 3, 2: 5}) == ({1: 3}, [])
    assert d.update({1: 3, 2: 5}) == ({}, [2])
    d.forget([2])
    assert len(d) == 1
    # A key that vanished from the map (deleted elsewhere) is forgotten too.
    d.update({})
    assert len(d) == 0


def test_map_deltas_of_histograms() -> None:
    def sub(a: Log2Histogram, b: Log2Histogram) -> Log2Histogram:
        return a - b

    d: MapDeltas[str, Log2Histogram] = MapDeltas(idle_reads=2, subtract=sub, weight=lambda h: float(h.count))
    h1 = Log2Histogram.of([1000])
    h2 = h1 + Log2Histogram.of([4000, 4000])
    assert d.update({"k": h1})[0]["k"].count == 1
    delta = d.update({"k": h2})[0]["k"]
    assert delta.count == 2 and delta.counts == Log2Histogram.of([4000, 4000]).counts
    # Smaller than before (recreated): the whole value counts.
    assert d.update({"k": Log2Histogram.of([7])})[0]["k"].count == 1
