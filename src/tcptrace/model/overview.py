"""One model of everything `tcptrace top` and `tcptrace diagnose` show.

Composes the other models rather than restating them: CLOSE_WAIT (model/closewait.py's
CloseWaitModel, fed what the kernel aggregates), the TIME_WAIT counts and forecasts
(model/timewait.py) and the close() latency histograms (model/closelat.py), plus what only
this model keeps:

- counts per state now: a snapshot of the host's sockets (the *seed*), then the kernel's
  counts of transitions by (old, new) state since (lifecycle.bpf.c's ``state_moves``, read
  once per interval) applied to it. They are "seed + transitions", and say so: a
  transition the kernel skipped, or a filter, makes them drift until the next seed; and
  TIME_WAIT is not a state the transition tracepoint shows (a timewait socket replaces the
  full one), so it is given by the host's count (sockstat ``tw``) when one is read, else
  by the seed and the creations the kernel counted in the last 60 s;
- transition rates per interval, by (old, new) and by state entered: differences of
  ``state_moves`` between two reads.

Nothing here is fed per connection live: every input is a cumulative count or a small
table read once per interval, so the cost does not grow with the connection rate. A
recording is fed event by event to ``Emulation``, the same aggregation in Python
(model/cwagg.py for CLOSE_WAIT), whose reads at each tick go through the same code.

Pure: fed snapshots and counters by the caller (or events, through the emulation).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tcptrace.model.closelat import CloseLatency, by_process
from tcptrace.model.closewait import CloseWaitModel
from tcptrace.model.cwagg import CwSnapshot, Emulator
from tcptrace.model.events import STATE_ORDER, SocketEvent, TcpState, Transition
from tcptrace.model.histogram import Log2Histogram
from tcptrace.model.timewait import TimewaitModel, TwCounts

NS = 1_000_000_000
TIMEWAIT_NS = 60 * NS  # TCP_TIMEWAIT_LEN
MIN_RATE_S = 0.25  # intervals shorter than this do not replace the rates shown

Move = tuple[TcpState, TcpState]
"""A transition as the kernel counts it: (old state, new state)."""


def moves_between(now: Mapping[Move, int], before: Mapping[Move, int]) -> Counter[Move]:
    """Transitions counted between two reads of the cumulative counts (never negative).

    >>> S = TcpState
    >>> moves_between({(S.ESTABLISHED, S.CLOSE_WAIT): 5}, {(S.ESTABLISHED, S.CLOSE_WAIT): 2})
    Counter({(<TcpState.ESTABLISHED: 1>, <TcpState.CLOSE_WAIT: 8>): 3})
    """
    out: Counter[Move] = Counter()
    for move, n in now.items():
        d = n - before.get(move, 0)
        if d > 0:
            out[move] = d
    return out


def apply_moves(counts: Counter[TcpState], moves: Mapping[Move, int]) -> None:
    """Apply transitions to counts per state: each leaves its old state and enters its new
    one, except that a birth (``CLOSE -> *``, ``LISTEN -> SYN_RECV``) takes nothing from its
    old state (the listener stays), and CLOSE is not counted."""
    for (old, new), n in moves.items():
        if old != TcpState.CLOSE and new != TcpState.SYN_RECV:
            counts[old] -= n
        if new != TcpState.CLOSE:
            counts[new] += n


@dataclass
class StateCounts:
    """Sockets per state: a seed (a host snapshot) plus the transitions the kernel counted
    since (``apply``: its cumulative counts by (old, new), read after the snapshot).

    The counts read right after the snapshot are the seed's *base*: transitions counted
    before it are already in the seed and are not applied again. TIME_WAIT (and the
    orphaned FIN_WAIT2 sockets the kernel parks as timewait sockets, which ss and /proc
    show as FIN_WAIT2) come from the kernel's TIME_WAIT counts (``timewait``)."""

    counts: Counter[TcpState] = field(default_factory=Counter)
    """The seed: sockets per state in the snapshot."""
    seeded: bool = False
    seeded_ns: int | None = None
    seed_total: int = 0
    seeds: int = 0
    base: Counter[Move] = field(default_factory=Counter)
    """The kernel's transition counts when the seed was taken."""
    moves: Counter[Move] = field(default_factory=Counter)
    """The kernel's transition counts at the last read (cumulative since it started)."""
    origin: Counter[Move] | None = None
    """The counts at the first seed (or read): ``applied`` counts from there."""
    tw: TwCounts | None = None
    """The kernel's TIME_WAIT counts at the last read (cumulative)."""
    tw_base: TwCounts | None = None
    """... and when the seed was taken."""
    tw_created: int = 0
    tw_recent: deque[list[int]] = field(default_factory=deque)
    """TIME_WAIT creations of the last 60 s (each lasts 60 s), as [read time, count] per
    read: bounded by the number of reads in 60 s, whatever the rate."""
    tw_seed_left: int = 0
    """TIME_WAIT sockets of the seed not known to have ended early."""
    now_ns: int = 0
    host_tw: int | None = None
    """sockstat ``tw`` (exact, host-wide) when the caller reads it."""
    _now: Counter[TcpState] = field(default_factory=Counter)

    def seed(
        self,
        states: Iterable[TcpState],
        at_ns: int,
        moves: Mapping[Move, int] | None = None,
        tw: TwCounts | None = None,
    ) -> None:
        """A snapshot of the sockets' states taken at ``at_ns``; ``moves`` and ``tw``: the
        kernel's counts read right after it (None: the last ones applied)."""
        self.counts = Counter(s for s in states if s != TcpState.CLOSE)
        self.seed_total = sum(self.counts.values())
        self.seeded = True
        self.seeded_ns = at_ns
        self.seeds += 1
        if moves is not None:
            self.moves = Counter(moves)
        self.base = Counter(self.moves)
        if self.origin is None:
            self.origin = Counter(self.moves)
        if tw is not None:
            self.tw = tw
        self.tw_base = self.tw
        self.now_ns = max(self.now_ns, at_ns)
        while self.tw_recent and self.tw_recent[0][0] <= at_ns:  # in the seed now
            self.tw_recent.popleft()
        self.tw_seed_left = self.counts[TcpState.TIME_WAIT]
        self._recount()

    def apply(self, moves: Mapping[Move, int], at_ns: int) -> None:
        """The kernel's transition counts by (old, new) read at ``at_ns`` (cumulative)."""
        self.moves = Counter(moves)
        if self.origin is None:
            self.origin = Counter()  # not seeded: every transition counted is applied
        self.advance(at_ns)
        self._recount()

    def timewait(self, totals: TwCounts, at_ns: int) -> None:
        """The kernel's TIME_WAIT counts read at ``at_ns`` (cumulative): creations count
        for 60 s, and sockets that ended early leave the count (the oldest first)."""
        before = self.tw or TwCounts()
        self.tw = totals
        self.advance(at_ns)
        created = totals.created - before.created
        if created > 0:
            self.tw_created += created
            self.tw_recent.append([at_ns, created])
        killed = totals.killed - before.killed
        if killed > 0:
            self._killed(killed)
        self._recount()

    def _killed(self, n: int) -> None:
        take = min(n, self.tw_seed_left)
        self.tw_seed_left -= take
        n -= take
        while n > 0 and self.tw_recent:
            oldest = self.tw_recent[0]
            take = min(n, oldest[1])
            oldest[1] -= take
            n -= take
            if not oldest[1]:
                self.tw_recent.popleft()

    def _recount(self) -> None:
        now = Counter(self.counts)
        apply_moves(now, moves_between(self.moves, self.base))
        if self.tw is not None:
            base = self.tw_base.pending_fin_wait2 if self.tw_base is not None else 0
            now[TcpState.FIN_WAIT2] += self.tw.pending_fin_wait2 - base
        self._now = now

    def advance(self, now_ns: int) -> None:
        """Model time moves on: TIME_WAIT sockets older than 60 s have ended."""
        self.now_ns = max(self.now_ns, now_ns)
        while self.tw_recent and self.tw_recent[0][0] <= self.now_ns - TIMEWAIT_NS:
            self.tw_recent.popleft()

    @property
    def applied(self) -> int:
        """Transitions applied since the first seed (or since the kernel started counting)."""
        return sum(moves_between(self.moves, self.origin or Counter()).values())

    def get(self, state: TcpState) -> int:
        """The count shown for ``state`` (never below 0: drift shows as 0, not as a debt)."""
        if state == TcpState.TIME_WAIT:
            if self.host_tw is not None:
                return self.host_tw
            seeded = self.tw_seed_left
            if self.seeded_ns is not None and self.now_ns >= self.seeded_ns + TIMEWAIT_NS:
                seeded = 0  # every one found at start has ended by now
            return max(0, seeded + sum(n for _, n in self.tw_recent))
        return max(0, self._now[state])

    def how(self, state: TcpState) -> str:
        """Where a count comes from, in a few words."""
        if state == TcpState.TIME_WAIT:
            if self.host_tw is not None:
                return "sockstat tw (every namespace, both substates)"
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
    transitions: Counter[Move] = field(default_factory=Counter)

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


class Emulation:
    """What the kernel aggregates for top and diagnose, done in Python on a recording's
    events: transitions counted by (old, new) as ``state_moves`` counts them, and
    CLOSE_WAIT as bpf/closewait.bpf.h keeps it (model/cwagg.Emulator). A replay reads it
    at each tick as a live run reads the kernel's maps."""

    def __init__(self, closewait: Emulator | None = None) -> None:
        self.moves: Counter[Move] = Counter()
        self.closewait = closewait if closewait is not None else Emulator()

    def feed(self, event: SocketEvent) -> None:
        if isinstance(event, Transition):
            self.moves[(event.old, event.new)] += 1
        self.closewait.feed(event)

    def snapshot(self, at_ns: int) -> tuple[Counter[Move], CwSnapshot]:
        return Counter(self.moves), self.closewait.snapshot(at_ns)


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
    """Everything top and diagnose show, read from the kernel's aggregates at each tick;
    or, when ``emulation`` is set (a replay, the tests), fed events that the emulation
    aggregates as the kernel would, and read from it at each tick."""

    threshold_ns: int = 5 * NS
    states: StateCounts = field(default_factory=StateCounts)
    closewait: CloseWaitModel = field(init=False)
    timewait: TimewaitModel = field(default_factory=TimewaitModel)
    closelat: CloseLatency = field(default_factory=lambda: CloseLatency(cumulative=True))
    emulation: Emulation | None = field(default_factory=Emulation)
    """The kernel's aggregation done in Python on the events fed; None live (the kernel
    does it, and ``tick`` is given what it counted)."""
    current: RateInterval | None = None
    last: RateInterval | None = None
    events: int = 0
    start_ns: int | None = None
    now_ns: int = 0
    lost: int = 0
    skipped: int | None = None
    """Runs of the transition hook the kernel skipped (any socket of the host); None: unknown."""
    tw_failed: dict[str, int] = field(default_factory=dict)
    """Inserts timewait's kernel tables refused, by table (live)."""
    _moves_mark: Counter[Move] | None = None

    def __post_init__(self) -> None:
        self.closewait = CloseWaitModel(threshold_ns=self.threshold_ns)

    def start(self, now_ns: int) -> None:
        self.start_ns = self.now_ns = now_ns
        self.current = RateInterval(now_ns, now_ns)
        self.closewait.begin_interval(now_ns)
        self.closelat.start(now_ns)
        if self._moves_mark is None:
            self._moves_mark = Counter(self.states.moves)

    def feed(self, event: SocketEvent) -> None:
        """An event of a recording (or, live, one of the few still sent: flagged close()
        calls): into the emulation, the TIME_WAIT and close() models."""
        if self.start_ns is None:
            self.start(event.ts_ns)
        self.events += 1
        self.now_ns = max(self.now_ns, event.ts_ns)
        if self.emulation is not None:
            self.emulation.feed(event)
        self.timewait.feed(event)
        self.closelat.feed(event)

    def tick(
        self,
        now_ns: int,
        *,
        moves: Mapping[Move, int] | None = None,
        closewait: CwSnapshot | None = None,
        tw_counts: TwCounts | None = None,
        closelat_rows: Iterable[Any] | None = None,
        host_tw: int | None = None,
        lost: int | None = None,
        skipped: int | None = None,
        tw_failed: dict[str, int] | None = None,
    ) -> RateInterval | None:
        """End the interval at ``now_ns`` with the kernel's aggregates read now: its
        transition counts (``moves``), CLOSE_WAIT (``closewait``; live, the caller may
        have applied it to ``self.closewait`` already), TIME_WAIT and close() counts, and
        what the kernel lost (``lost``, ``skipped``, ``tw_failed``).
        With an emulation, what it aggregated stands in for ``moves`` and ``closewait``."""
        if self.start_ns is None:
            self.start(now_ns)
        self.now_ns = max(self.now_ns, now_ns)
        if self.emulation is not None and moves is None and closewait is None:
            moves, closewait = self.emulation.snapshot(now_ns)
        if closewait is not None:
            self.closewait.apply(closewait)
        if moves is not None:
            self.states.apply(moves, now_ns)
        done = self.current
        if done is not None:
            done.end_ns = now_ns
            if moves is not None:
                done.transitions = moves_between(moves, self._moves_mark or Counter())
            # A sliver (the final tick right after the last one) keeps the previous rates.
            if self.last is None or done.seconds >= MIN_RATE_S:
                self.last = done
        if moves is not None:
            self._moves_mark = Counter(moves)
        self.current = RateInterval(now_ns, now_ns)
        self.closewait.begin_interval(now_ns)
        interval = self.timewait.tick(now_ns, tw_counts)
        self.states.timewait(interval.totals, now_ns)
        if closelat_rows is not None:
            self.closelat.snapshot(now_ns, closelat_rows)
        if host_tw is not None:
            self.states.host_tw = host_tw
        if lost is not None:
            self.lost = lost
        if skipped is not None:
            self.skipped = skipped
        if tw_failed is not None:
            self.tw_failed = tw_failed
        return done

    # ---- reports -------------------------------------------------------------------------

    @property
    def elapsed_s(self) -> float:
        if self.start_ns is None:
            return 0.0
        return max(0.0, (self.now_ns - self.start_ns) / NS)

    def failures(self) -> dict[str, int]:
        """Inserts the kernel's bounded tables refused, by table (non-zero ones): what
        they count is short by up to that many (a socket table entry refused leaves a
        socket's owner and code paths unknown)."""
        c = self.closewait.counters
        found = {
            "close_wait_open": c.open_failed,
            "close_wait_owners": c.owner_failed,
            "socket_table": c.sock_update_failed,
            **self.tw_failed,
        }
        return {name: n for name, n in found.items() if n}

    def tw_rate(self) -> float:
        """TIME_WAIT creations per second in the last interval long enough to tell."""
        for interval in reversed(self.timewait.intervals):
            if interval.seconds >= MIN_RATE_S:
                return interval.rate_per_s
        return 0.0

    def close_latency(self) -> Log2Histogram:
        return self.closelat.totals().total

    def close_flags(self) -> Counter[str]:
        """close() calls flagged ``reset``, ``lingered``, ``late_close_wait``: counted in
        the kernel's histogram rows (live, where no event is sent), else (a replay) from the
        recorded flagged calls."""
        if not self.closelat.reports:
            return Counter(self.closelat.flag_counts)
        rows = self.closelat.totals().rows
        return Counter(
            {
                "reset": sum(r.resets for r in rows),
                "lingered": sum(r.lingered for r in rows),
                "late_close_wait": sum(r.late_close_wait for r in rows),
            }
        )

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
