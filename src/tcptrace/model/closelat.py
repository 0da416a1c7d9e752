"""close() latency: per-process histograms of close()/shutdown()/close_range() on TCP sockets,
per interval or cumulative, and the calls a human must see.

The kernel keeps exact cumulative histograms (bpf/closelat.bpf.c); this model is handed
snapshots of them (live) or the reports a run wrote (``--from``), and answers with
reports: rows per (process, call, code path) with counts, percentiles and maxima.
Flagged calls (a reset sent, a block on SO_LINGER, a late close of a CLOSE_WAIT socket)
arrive as ``CloseCall`` events.

A report as JSON (one line of ``tcptrace closelat --json``)::

    {"type": "closelat", "ts_ns": ..., "window": "interval", "interval_ns": 1000000000,
     "processes": [{"pid": 42, "comm": "nginx", "call": "close", "count": 9,
                    "p50_ns": ..., "p90_ns": ..., "p99_ns": ..., "max_ns": ...,
                    "buckets": [{"ge_ns": 16384, "lt_ns": 32768, "count": 9}], ...}]}
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tcptrace.model.events import CloseCall, CloseFlag, Op, SocketEvent
from tcptrace.model.filters import EventFilter
from tcptrace.model.histogram import Log2Histogram

REPORT_TYPE = "closelat"
CALLS = {Op.CLOSE: "close", Op.SHUTDOWN: "shutdown", Op.CLOSE_RANGE: "close_range"}
CALL_OPS = {name: op for op, name in CALLS.items()}
PERCENTILES = (50, 90, 99)
MAX_KEPT_FLAGGED = 1000


@dataclass(frozen=True, order=True)
class CallKey:
    """Who made the calls: process, comm, which call, and the code path with --stacks."""

    pid: int
    comm: str
    op: Op
    stack: tuple[str, ...] = ()

    @property
    def call(self) -> str:
        return CALLS.get(self.op, self.op.name.lower())


@dataclass(frozen=True)
class CallStats:
    """The calls of one key: their duration histogram and how many were flagged."""

    key: CallKey
    hist: Log2Histogram
    resets: int = 0
    lingered: int = 0
    late_close_wait: int = 0

    @property
    def count(self) -> int:
        return self.hist.count

    def __add__(self, other: CallStats) -> CallStats:
        return CallStats(
            self.key,
            self.hist + other.hist,
            self.resets + other.resets,
            self.lingered + other.lingered,
            self.late_close_wait + other.late_close_wait,
        )

    def since(self, earlier: CallStats | None) -> CallStats:
        """What a cumulative row gained since ``earlier`` (itself when there is no earlier
        row or the earlier one is not a part of it)."""
        if earlier is None:
            return self
        try:
            hist = self.hist - earlier.hist
        except ValueError:
            return self
        return CallStats(
            self.key,
            hist,
            max(0, self.resets - earlier.resets),
            max(0, self.lingered - earlier.lingered),
            max(0, self.late_close_wait - earlier.late_close_wait),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.key.pid, "comm": self.key.comm, "call": self.key.call}
        if self.key.stack:
            out["stack"] = list(self.key.stack)
        out.update(self.hist.to_json(PERCENTILES))
        out.update(resets=self.resets, lingered=self.lingered, late_close_wait=self.late_close_wait)
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CallStats:
        """The inverse of to_json; KeyError, ValueError or TypeError when malformed."""
        pid, comm, call = obj["pid"], obj["comm"], obj["call"]
        if not isinstance(pid, int) or not isinstance(comm, str) or call not in CALL_OPS:
            raise ValueError("a row needs an integer pid, a comm and a known call")
        stack = obj.get("stack", [])
        if not isinstance(stack, list) or not all(isinstance(f, str) for f in stack):
            raise TypeError("stack must be a list of strings")
        counts = [obj.get(name, 0) for name in ("resets", "lingered", "late_close_wait")]
        if not all(isinstance(c, int) and c >= 0 for c in counts):
            raise TypeError("flag counts must be non-negative integers")
        return cls(CallKey(pid, comm, CALL_OPS[call], tuple(stack)), Log2Histogram.from_json(obj), *counts)


def merge_rows(rows: Iterable[CallStats]) -> dict[CallKey, CallStats]:
    """Rows by key, summing rows of the same key (kernel keys whose stacks symbolize alike)."""
    out: dict[CallKey, CallStats] = {}
    for row in rows:
        prev = out.get(row.key)
        out[row.key] = row if prev is None else prev + row
    return out


def by_process(rows: Iterable[CallStats]) -> dict[tuple[int, str], CallStats]:
    """Rows summed per (pid, comm) over calls and code paths (key op: the first seen)."""
    out: dict[tuple[int, str], CallStats] = {}
    for row in rows:
        k = (row.key.pid, row.key.comm)
        prev = out.get(k)
        out[k] = row if prev is None else prev + row
    return out


@dataclass(frozen=True)
class Report:
    """One interval's rows (``window`` "interval"), or everything so far ("cumulative")."""

    ts_ns: int
    window: str
    interval_ns: int
    rows: tuple[CallStats, ...]

    @property
    def total(self) -> Log2Histogram:
        hist = Log2Histogram()
        for row in self.rows:
            hist = hist + row.hist
        return hist

    def to_json(self) -> dict[str, Any]:
        return {
            "type": REPORT_TYPE,
            "ts_ns": self.ts_ns,
            "window": self.window,
            "interval_ns": self.interval_ns,
            "processes": [row.to_json() for row in self.rows],
        }


def sorted_rows(rows: Iterable[CallStats]) -> tuple[CallStats, ...]:
    """Busiest first, then by pid and call, so output is stable."""
    return tuple(sorted(rows, key=lambda r: (-r.count, r.key)))


def _comm_matches(flt: EventFilter, comm: str) -> bool:
    return flt.comm is None or comm == flt.kernel_comm


class CloseLatency:
    """Cumulative rows in, reports out; flagged calls counted and kept (bounded).

    ``snapshot()`` takes the kernel's cumulative rows; ``replay()`` takes a recorded
    report of either window. Either way the model holds the cumulative rows, so it can
    answer per interval (the difference from the previous snapshot) or cumulatively.
    """

    def __init__(
        self, cumulative: bool = False, flt: EventFilter | None = None, start_ns: int | None = None
    ) -> None:
        self.cumulative = cumulative
        self.filter = flt or EventFilter()
        self.rows: dict[CallKey, CallStats] = {}
        self.last_ts_ns: int | None = start_ns
        """When the rows were last taken (at first: when counting started, if known)."""
        self.first_ts_ns: int | None = start_ns
        self.flag_counts: Counter[str] = Counter()
        self.flagged: list[CloseCall] = []
        self.flagged_total = 0
        self.reports = 0

    # Input ----------------------------------------------------------------------------

    def start(self, ts_ns: int) -> None:
        """Counting started at ``ts_ns`` (the program was attached): the first interval's start."""
        self.last_ts_ns = self.first_ts_ns = ts_ns

    def _keep(self, row: CallStats) -> bool:
        if self.filter.pids and row.key.pid not in self.filter.pids:
            return False
        return _comm_matches(self.filter, row.key.comm)

    def snapshot(self, ts_ns: int, cumulative_rows: Iterable[CallStats]) -> Report:
        """The kernel's cumulative rows at ``ts_ns``: the report of the window asked for."""
        new = merge_rows(r for r in cumulative_rows if self._keep(r))
        return self._advance(ts_ns, new)

    def replay(self, obj: Mapping[str, Any]) -> Report | None:
        """A recorded report (from ``--json``); None for objects of other commands.

        ValueError, KeyError or TypeError when it is malformed.
        """
        if obj.get("type") != REPORT_TYPE:
            return None
        ts_ns, window = obj["ts_ns"], obj["window"]
        if not isinstance(ts_ns, int) or window not in ("interval", "cumulative"):
            raise ValueError("a closelat report needs an integer ts_ns and a window")
        processes = obj["processes"]
        if not isinstance(processes, list):
            raise TypeError("processes must be a list")
        rows = merge_rows(r for r in (CallStats.from_json(p) for p in processes) if self._keep(r))
        if window == "interval":
            # Add the interval to what came before; rows absent from it did not change.
            rows = merge_rows([*self.rows.values(), *rows.values()])
        else:
            rows = {**self.rows, **rows}
        recorded = obj.get("interval_ns")
        if self.last_ts_ns is None and isinstance(recorded, int) and 0 <= recorded <= ts_ns:
            # The recording started counting one interval before its first report.
            self.last_ts_ns = self.first_ts_ns = ts_ns - recorded
        return self._advance(ts_ns, rows)

    def _advance(self, ts_ns: int, new: dict[CallKey, CallStats]) -> Report:
        previous = self.rows
        interval_ns = ts_ns - self.last_ts_ns if self.last_ts_ns is not None else 0
        if self.first_ts_ns is None:
            self.first_ts_ns = ts_ns
        self.rows = new
        self.last_ts_ns = ts_ns
        self.reports += 1
        if self.cumulative:
            rows = sorted_rows(r for r in new.values() if r.count)
            return Report(ts_ns, "cumulative", interval_ns, rows)
        diffs = (row.since(previous.get(key)) for key, row in new.items())
        return Report(ts_ns, "interval", interval_ns, sorted_rows(r for r in diffs if r.count))

    def feed(self, event: SocketEvent) -> CloseCall | None:
        """An event of the stream: a flagged call is counted, kept and returned."""
        if not isinstance(event, CloseCall):
            return None
        self.flagged_total += 1
        for flag in CloseFlag:
            if flag in event.flags and flag.name:
                self.flag_counts[flag.name.lower()] += 1
        if len(self.flagged) < MAX_KEPT_FLAGGED:
            self.flagged.append(event)
        return event

    # Output ---------------------------------------------------------------------------

    def totals(self) -> Report:
        """Everything so far, as a cumulative report."""
        rows = sorted_rows(r for r in self.rows.values() if r.count)
        span = (self.last_ts_ns - self.first_ts_ns) if self.last_ts_ns and self.first_ts_ns else 0
        return Report(self.last_ts_ns or 0, "cumulative", span, rows)

    def summary_json(self) -> dict[str, Any]:
        totals = self.totals()
        return {
            "window": "cumulative",
            "calls": totals.total.count,
            "all": totals.total.to_json(PERCENTILES),
            "processes": [row.to_json() for row in totals.rows],
            "flagged": {
                "events": self.flagged_total,
                "reset": self.flag_counts.get("reset", 0),
                "lingered": self.flag_counts.get("lingered", 0),
                "late_close_wait": self.flag_counts.get("late_close_wait", 0),
            },
        }
