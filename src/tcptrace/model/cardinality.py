"""Bounded label sets for exported metrics: the top N keys by activity, the rest aggregated.

Prometheus keeps one time series per label combination, so a label such as a process or a
remote port must be bounded or a fork-per-request server makes it explode. Two shapes:

- Gauges (a value now, e.g. sockets in CLOSE_WAIT per process): ``top_n`` keeps the N
  largest values and sums the rest into one aggregate. Recomputed at every export.
- Counters (cumulative, e.g. TIME_WAIT creations per process): a counter must never go
  down, so a key cannot move its past counts between its own series and the aggregate.
  ``BoundedCounters`` admits at most ``limit`` keys; counts of a key that is not admitted
  go to ``other`` (and only there, forever); a key admitted later starts a new series
  from 0 (Prometheus' rate() treats a new series correctly). Keys are promoted by recent
  activity (an exponentially decayed score per rebalance), and a key idle for
  ``idle_ns`` is dropped (its series ends). Every series is monotonic; memory is
  O(limit + candidates).

Pure: no I/O. Values are anything with ``+`` (ints, floats, Log2Histogram) and a weight
function giving their activity.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

NS = 1_000_000_000


def top_n(values: Mapping[K, float], n: int) -> tuple[list[tuple[K, float]], float, int]:
    """The ``n`` largest values (ties by key text), the sum of the others and their number.

    >>> top_n({"a": 5, "b": 1, "c": 3, "d": 1}, 2)
    ([('a', 5), ('c', 3)], 2, 2)
    >>> top_n({"a": 1}, 0)
    ([], 1, 1)
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    ranked = sorted(values.items(), key=lambda kv: (-kv[1], str(kv[0])))
    kept = ranked[:n]
    rest = ranked[n:]
    return kept, sum(v for _, v in rest), len(rest)


@dataclass
class _Slot(Generic[V]):
    total: V
    recent: float
    score: float
    last_ns: int
    since_ns: int


class BoundedCounters(Generic[K, V]):
    """Cumulative values for at most ``limit`` keys, the rest in ``other``.

    >>> c: BoundedCounters[str, int] = BoundedCounters(2, zero=0)
    >>> for key in ("a", "b", "c", "c"):
    ...     c.add(key, 1, now_ns=0)
    >>> sorted(c.items()), c.other
    ([('a', 1), ('b', 1)], 2)
    """

    def __init__(
        self,
        limit: int,
        *,
        zero: V,
        weight: Callable[[V], float] | None = None,
        candidates: int | None = None,
        decay: float = 0.5,
        idle_ns: int = 600 * NS,
        min_hold_ns: int = 60 * NS,
        promote_factor: float = 2.0,
    ) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        if not 0 <= decay < 1:
            raise ValueError("decay must be in [0, 1)")
        self.limit = limit
        self._zero = zero
        self._weight: Callable[[V], float] = weight or _as_float
        self._max_candidates = 4 * limit + 16 if candidates is None else candidates
        self._decay = decay
        self.idle_ns = idle_ns
        self.min_hold_ns = min_hold_ns
        self.promote_factor = promote_factor
        self._slots: dict[K, _Slot[V]] = {}
        self._candidates: dict[K, float] = {}
        self.other: V = zero
        self.admitted_total = 0
        self.dropped_total = 0

    # ---- input -------------------------------------------------------------------------

    def add(self, key: K, delta: V, now_ns: int) -> None:
        w = self._weight(delta)
        if w <= 0:
            return
        slot = self._slots.get(key)
        if slot is not None:
            slot.total = slot.total + delta  # type: ignore[operator]
            slot.recent += w
            slot.last_ns = now_ns
            return
        if len(self._slots) < self.limit:
            self._admit(key, delta, w, now_ns)
            return
        self.other = self.other + delta  # type: ignore[operator]
        self._candidates[key] = self._candidates.get(key, 0.0) + w
        if len(self._candidates) > self._max_candidates:
            # Space-saving: forget the least active candidate.
            weakest = min(self._candidates, key=lambda k: (self._candidates[k], str(k)))
            del self._candidates[weakest]

    def _admit(self, key: K, delta: V, w: float, now_ns: int) -> None:
        self._slots[key] = _Slot(delta, w, 0.0, now_ns, now_ns)
        self._candidates.pop(key, None)
        self.admitted_total += 1

    def rebalance(self, now_ns: int) -> None:
        """Once per export interval: age scores, drop idle keys, promote active candidates."""
        for slot in self._slots.values():
            slot.score = slot.score * self._decay + slot.recent
            slot.recent = 0.0
        for key in [k for k, s in self._slots.items() if now_ns - s.last_ns >= self.idle_ns]:
            del self._slots[key]
            self.dropped_total += 1
        for key, score in sorted(self._candidates.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            if len(self._slots) < self.limit:
                self._promote(key, score, now_ns)
                continue
            held = [
                (s.score, str(k), k)
                for k, s in self._slots.items()
                if now_ns - s.since_ns >= self.min_hold_ns
            ]
            if not held:
                break
            weakest_score, _, weakest = min(held)
            if score <= weakest_score * self.promote_factor or score <= 0:
                break
            del self._slots[weakest]
            self.dropped_total += 1
            self._promote(key, score, now_ns)
        for key in list(self._candidates):
            self._candidates[key] *= self._decay
            if self._candidates[key] < 0.01:
                del self._candidates[key]

    def _promote(self, key: K, score: float, now_ns: int) -> None:
        # Its counts so far stay in `other`: the new series starts from zero.
        self._slots[key] = _Slot(self._zero, 0.0, score, now_ns, now_ns)
        self._candidates.pop(key, None)
        self.admitted_total += 1

    # ---- output ------------------------------------------------------------------------

    def items(self) -> list[tuple[K, V]]:
        return [(k, s.total) for k, s in self._slots.items()]

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def candidates(self) -> int:
        return len(self._candidates)

    def stats(self) -> dict[str, Any]:
        return {
            "keys": len(self._slots),
            "candidates": len(self._candidates),
            "admitted_total": self.admitted_total,
            "dropped_total": self.dropped_total,
        }


def _as_float(value: Any) -> float:
    return float(value)


class MapDeltas(Generic[K, V]):
    """Differences between successive reads of a cumulative kernel map, and the keys that
    have been idle long enough to delete from the map (so that it stays small for weeks).

    A key read with a smaller value than before (its entry was deleted and recreated)
    counts its whole value as the delta.

    >>> d: MapDeltas[str, int] = MapDeltas(idle_reads=2, subtract=lambda a, b: a - b, weight=float)
    >>> d.update({"a": 3})
    ({'a': 3}, [])
    >>> d.update({"a": 5})
    ({'a': 2}, [])
    >>> d.update({"a": 5})
    ({}, [])
    >>> d.update({"a": 5})
    ({}, ['a'])
    >>> d.forget(["a"]); d.update({"a": 1})
    ({'a': 1}, [])
    """

    def __init__(
        self,
        *,
        idle_reads: int,
        subtract: Callable[[V, V], V],
        weight: Callable[[V], float],
    ) -> None:
        self.idle_reads = idle_reads
        self._subtract = subtract
        self._weight = weight
        self._last: dict[K, V] = {}
        self._idle: dict[K, int] = {}

    def update(self, current: Mapping[K, V]) -> tuple[dict[K, V], list[K]]:
        deltas: dict[K, V] = {}
        idle: list[K] = []
        for key, value in current.items():
            old = self._last.get(key)
            delta = value
            if old is not None:
                try:
                    delta = self._subtract(value, old)
                except ValueError:  # not a part of the old value: a recreated entry
                    delta = value
                if self._weight(delta) < 0:
                    delta = value
            self._last[key] = value
            if self._weight(delta) > 0:
                deltas[key] = delta
                self._idle[key] = 0
            else:
                self._idle[key] = self._idle.get(key, 0) + 1
                if self._idle[key] >= self.idle_reads:
                    idle.append(key)
        for key in [k for k in self._last if k not in current]:  # deleted by someone else
            self.forget([key])
        return deltas, idle

    def forget(self, keys: list[K]) -> None:
        for key in keys:
            self._last.pop(key, None)
            self._idle.pop(key, None)

    def __len__(self) -> int:
        return len(self._last)
