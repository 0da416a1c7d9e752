"""One model of everything `tcptrace top` and `tcptrace diagnose` show.

Composes the other models rather than restating them: the CLOSE_WAIT tracker
(model/closewait.py), the TIME_WAIT counts and forecasts (model/timewait.py) and the close()
latency histograms (model/closelat.py), plus what only this model keeps:

- counts per state now: a snapshot of /proc/net/tcp{,6} at start (the *seed*), then every
  transition applied to it. They are "seed + deltas", and say so: a socket the kernel did
  not report (a lost event, a filter) makes them drift, and TIME_WAIT is not a state the
  transition tracepoint shows (a timewait socket replaces the full one), so it is given by
  the host's count (sockstat ``tw``) when one is read, else by the seed and the creations
  seen;
- transition rates per interval, by (old, new) and by state entered.

Pure: fed events, snapshots and counters by the caller.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tcptrace.model.closelat import CloseLatency, by_process
from tcptrace.model.closewait import CloseWaitTracker
from tcptrace.model.events import STATE_ORDER, SocketEvent, TcpState, TimeWaitEvent, Transition, TwWhat
from tcptrace.model.histogram import Log2Histogram
from tcptrace.model.timewait import TimewaitModel, TwCounts

NS = 1_000_000_000
TIMEWAIT_NS = 60 * NS  # TCP_TIMEWAIT_LEN
TW_BUCKET_NS = 10_000_000
MIN_RATE_S = 0.25  # intervals shorter than this do not replace the rates shown


@dataclass
class StateCounts:
    """Sockets per state: a seed (a /proc snapshot) plus the transitions since.

    Transitions at or before ``seeded_ns`` (the end of the snapshot's read) are already in
    the seed and are not applied again. A birth (``CLOSE -> *``, ``LISTEN -> SYN_RECV``)
    takes nothing from its old state: the listener stays.
    """

    counts: Counter[TcpState] = field(default_factory=Counter)
    seeded: bool = False
    seeded_ns: int | None = None
    seed_total: int = 0
    seeds: int = 0
    applied: int = 0
    tw_created: int = 0
    tw_recent: deque[list[int]] = field(default_factory=deque)
    """TIME_WAIT creations of the last 60 s (each lasts 60 s), as [time, count] per
    10 ms: bounded whatever the rate."""
    tw_killed: list[int] = field(default_factory=list)
    """A heap of the times TIME_WAIT sockets ended early (port reuse, a SYN, an RST) would
    have expired: each counts against ``tw_recent`` until then."""
    now_ns: int = 0
    host_tw: int | None = None
    """sockstat ``tw`` (exact, host-wide) when the caller reads it."""

    def seed(self, states: Iterable[TcpState], at_ns: int) -> None:
        self.counts = Counter(s for s in states if s != TcpState.CLOSE)
        self.seed_total = sum(self.counts.values())
        self.seeded = True
        self.seeded_ns = at_ns
        self.seeds += 1
        self.now_ns = max(self.now_ns, at_ns)
        while self.tw_recent and self.tw_recent[0][0] <= at_ns:  # in the seed now
            self.tw_recent.popleft()
        self.tw_killed.clear()  # their ends are in the seed too

    def feed(self, event: SocketEvent) -> None:
        if self.seeded_ns is not None and event.ts_ns <= self.seeded_ns:
            return
        self.advance(event.ts_ns)
        if isinstance(event, Transition):  # (inline: every transition of the host passes here)
            self.applied += 1
            old, new = event.old, event.new
            # A birth (CLOSE -> *, LISTEN -> SYN_RECV) takes nothing from the old state.
            if old != TcpState.CLOSE and new != TcpState.SYN_RECV:
                self.counts[old] -= 1
            if new != TcpState.CLOSE:
                self.counts[new] += 1
        elif isinstance(event, TimeWaitEvent):
            self._timewait(event)

    def _timewait(self, event: TimeWaitEvent) -> None:
        # A parked tw (an orphaned FIN_WAIT2 socket, the full one gone) is FIN_WAIT2
        # still, as ss and /proc show it, until it gets the FIN or dies.
        if event.what == TwWhat.CREATED and event.substate == TcpState.FIN_WAIT2:
            self.counts[TcpState.FIN_WAIT2] += 1
        elif event.what in (TwWhat.CONVERTED, TwWhat.PARKED_ENDED):
            self.counts[TcpState.FIN_WAIT2] -= 1
        if event.substate == TcpState.TIME_WAIT and event.what in (TwWhat.CREATED, TwWhat.CONVERTED):
            self.tw_created += 1
            if self.tw_recent and event.ts_ns - self.tw_recent[-1][0] < TW_BUCKET_NS:
                self.tw_recent[-1][1] += 1
            else:
                self.tw_recent.append([event.ts_ns, 1])
        elif event.what == TwWhat.KILLED:
            created = event.ts_ns - (event.age_ns or 0)
            if self.seeded_ns is not None and created <= self.seeded_ns:
                self.counts[TcpState.TIME_WAIT] -= 1  # one of the seed
            elif created + TIMEWAIT_NS > self.now_ns:
                heapq.heappush(self.tw_killed, created + TIMEWAIT_NS)

    def advance(self, now_ns: int) -> None:
        """Model time moves on: TIME_WAIT sockets older than 60 s have ended."""
        self.now_ns = max(self.now_ns, now_ns)
        while self.tw_recent and self.tw_recent[0][0] <= self.now_ns - TIMEWAIT_NS:
            self.tw_recent.popleft()
        while self.tw_killed and self.tw_killed[0] <= self.now_ns:
            heapq.heappop(self.tw_killed)

    def get(self, state: TcpState) -> int:
        """The count shown for ``state`` (never below 0: drift shows as 0, not as a debt)."""
        if state == TcpState.TIME_WAIT:
            if self.host_tw is not None:
                return self.host_tw
            seeded = self.counts[TcpState.TIME_WAIT]
            if self.seeded_ns is not None and self.now_ns >= self.seeded_ns + TIMEWAIT_NS:
                seeded = 0  # every one found at start has ended by now
            return max(0, seeded + sum(n for _, n in self.tw_recent) - len(self.tw_killed))
        return max(0, self.counts[state])

    def how(self, state: TcpState) -> str:
        """Where a count comes from, in a few words."""
        if state == TcpState.TIME_WAIT:
            if self.host_tw is not None:
                return "sockstat tw (host, both substates)"
            if self.seeded:
                return "seed + created in the last 60 s"
            return "created in the last 60 s"
        return "seed + transitions" if self.seeded else "transitions since start"

    def rows(self) -> list[tuple[TcpState, int]]:
        return [(s, self.get(s)) for s in STATE_ORDER]

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": {s.name: n for s, n in self.rows()},
            "seeded": self.seeded,
            "seed_total": self.seed_total,
            "transitions_applied": self.applied,
            "time_wait_from": self.how(TcpState.TIME_WAIT),
        }


@dataclass
class RateInterval:
    """Transitions of one interval."""

    start_ns: int
    end_ns: int
    transitions: Counter[tuple[TcpState, TcpState]] = field(default_factory=Counter)

    @property
    def seconds(self) -> float:
        return max(1e-9, (self.end_ns - self.start_ns) / NS)

    def entered(self, state: TcpState) -> int:
        return sum(n for (_, new), n in self.transitions.items() if new == state)

    def rate(self, state: TcpState) -> float:
        return self.entered(state) / self.seconds

    @property
    def total_rate(self) -> float:
        return sum(self.transitions.values()) / self.seconds


@dataclass(frozen=True)
class ProcessRow:
    """One process in the top table: CLOSE_WAIT held, TIME_WAIT created, close() times."""

    pid: int
    comm: str
    close_wait: int = 0
    close_wait_oldest_ns: int = 0
    tw_rate: float = 0.0
    tw_total: int = 0
    closes: int = 0
    close_p99_ns: int | None = None
    close_max_ns: int | None = None
    cgroup: int | None = None
    """The owner's cgroup where a socket of it named one (CLOSE_WAIT, TIME_WAIT)."""


SORT_KEYS = {
    "c": "close_wait",
    "t": "tw_rate",
    "l": "close_p99_ns",
}


@dataclass
class Overview:
    """Everything top and diagnose show, fed the stream and ticked at intervals."""

    threshold_ns: int = 5 * NS
    states: StateCounts = field(default_factory=StateCounts)
    closewait: CloseWaitTracker = field(init=False)
    timewait: TimewaitModel = field(default_factory=TimewaitModel)
    closelat: CloseLatency = field(default_factory=lambda: CloseLatency(cumulative=True))
    current: RateInterval | None = None
    last: RateInterval | None = None
    events: int = 0
    start_ns: int | None = None
    now_ns: int = 0
    lost: int = 0
    skipped: int | None = None
    """Runs of the transition hook the kernel skipped (any socket of the host); None: unknown."""

    def __post_init__(self) -> None:
        self.closewait = CloseWaitTracker(threshold_ns=self.threshold_ns)

    def start(self, now_ns: int) -> None:
        self.start_ns = self.now_ns = now_ns
        self.current = RateInterval(now_ns, now_ns)
        self.closewait.begin_interval(now_ns)
        self.closelat.start(now_ns)

    def feed(self, event: SocketEvent) -> None:
        if self.start_ns is None:
            self.start(event.ts_ns)
        self.events += 1
        self.now_ns = max(self.now_ns, event.ts_ns)
        self.states.feed(event)
        self.closewait.feed(event)  # (it keeps one copy of a socket /proc also found at start)
        self.timewait.feed(event)
        self.closelat.feed(event)
        if self.current is not None and isinstance(event, Transition):
            self.current.transitions[(event.old, event.new)] += 1

    def tick(
        self,
        now_ns: int,
        *,
        tw_counts: TwCounts | None = None,
        closelat_rows: Iterable[Any] | None = None,
        host_tw: int | None = None,
        lost: int | None = None,
        skipped: int | None = None,
    ) -> RateInterval | None:
        """End the interval at ``now_ns``; live, with the kernel's exact aggregates."""
        if self.start_ns is None:
            self.start(now_ns)
        self.now_ns = max(self.now_ns, now_ns)
        done = self.current
        if done is not None:
            done.end_ns = now_ns
            # A sliver (the final tick right after the last one) keeps the previous rates.
            if self.last is None or done.seconds >= MIN_RATE_S:
                self.last = done
        self.current = RateInterval(now_ns, now_ns)
        self.closewait.begin_interval(now_ns)
        self.timewait.tick(now_ns, tw_counts)
        if closelat_rows is not None:
            self.closelat.snapshot(now_ns, closelat_rows)
        self.states.advance(now_ns)
        if host_tw is not None:
            self.states.host_tw = host_tw
        if lost is not None:
            self.lost = lost
        if skipped is not None:
            self.skipped = skipped
        return done

    # ---- reports -------------------------------------------------------------------------

    @property
    def elapsed_s(self) -> float:
        if self.start_ns is None:
            return 0.0
        return max(0.0, (self.now_ns - self.start_ns) / NS)

    def tw_rate(self) -> float:
        """TIME_WAIT creations per second in the last interval long enough to tell."""
        for interval in reversed(self.timewait.intervals):
            if interval.seconds >= MIN_RATE_S:
                return interval.rate_per_s
        return 0.0

    def close_latency(self) -> Log2Histogram:
        return self.closelat.totals().total

    def processes(self, pid: int | None = None) -> list[ProcessRow]:
        """One row per process seen holding CLOSE_WAIT, creating TIME_WAIT, or closing."""
        cw: dict[int, list[int]] = {}
        comms: dict[int, str] = {}
        cgroups: dict[int, int] = {}
        for sock in self.closewait.open.values():
            if sock.pid is None:
                continue
            cw.setdefault(sock.pid, []).append(sock.age_ns(self.now_ns))
            comms.setdefault(sock.pid, sock.comm or "")
            if sock.cgroup is not None:
                cgroups.setdefault(sock.pid, sock.cgroup)
        totals = self.timewait.totals
        tw_total: dict[int, int] = {}
        for proc, c in totals.by_process.items():
            if c.created:
                tw_total[proc.pid] = tw_total.get(proc.pid, 0) + c.created
                comms.setdefault(proc.pid, proc.comm)
        tw_rate: dict[int, float] = {}
        last = next((i for i in reversed(self.timewait.intervals) if i.seconds >= MIN_RATE_S), None)
        if last is not None:
            for proc, c in last.delta.by_process.items():
                tw_rate[proc.pid] = tw_rate.get(proc.pid, 0.0) + c.created / last.seconds
        lat: dict[int, Log2Histogram] = {}
        for (p, comm), row in by_process(self.closelat.totals().rows).items():
            lat[p] = row.hist
            comms.setdefault(p, comm)
        rows = []
        for p in sorted(set(cw) | set(tw_total) | set(lat)):
            if pid is not None and p != pid:
                continue
            hist = lat.get(p)
            rows.append(
                ProcessRow(
                    pid=p,
                    comm=comms.get(p, ""),
                    close_wait=len(cw.get(p, [])),
                    close_wait_oldest_ns=max(cw.get(p, [0])),
                    tw_rate=tw_rate.get(p, 0.0),
                    tw_total=tw_total.get(p, 0),
                    closes=hist.count if hist else 0,
                    close_p99_ns=hist.percentile(99) if hist else None,
                    close_max_ns=hist.max_ns if hist else None,
                    cgroup=cgroups.get(p),
                )
            )
        return rows


def sort_rows(rows: Iterable[ProcessRow], key: str) -> list[ProcessRow]:
    """Rows worst first by ``key`` (a SORT_KEYS letter), then by the other columns and pid."""
    attr = SORT_KEYS.get(key, "close_wait")

    def value(r: ProcessRow) -> tuple[float, float, float, int]:
        main = getattr(r, attr) or 0
        return (-float(main), -float(r.close_wait), -float(r.tw_rate), r.pid)

    return sorted(rows, key=value)
