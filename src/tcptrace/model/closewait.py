"""CLOSE_WAIT timing and leak suspects, grouped by (owner, code path).

A socket enters CLOSE_WAIT when the peer's FIN arrives and stays there until the
application closes it (``CLOSE_WAIT -> LAST_ACK``) or the peer resets it
(``CLOSE_WAIT -> CLOSE``). Sockets already in CLOSE_WAIT when tracing started come from a
host snapshot (HostSockets): their age is a lower bound ("at least since start") and they
have no stacks.

Two models answer the same reports:

- ``CloseWaitModel``, fed ``CwSnapshot``s once per interval: what the kernel aggregates
  (bpf/closewait.bpf.h, read by kernel/cwreader.py), or the same aggregation emulated on a
  recording (model/cwagg.Emulator). `closewait`, `top`, `diagnose` and the agent use it:
  their cost does not grow with the connection rate.
- ``CloseWaitTracker``, fed the event stream one event at a time: no command uses it any
  more; the unit tests compare the other with it.

Pure: fed snapshots or events (and the host snapshot) by the caller, asked for reports at
model times.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tcptrace.model.cwagg import CodeRef, CwCounters, CwSnapshot, OpenSocket, OwnerCounts, OwnerKey, PortsKey
from tcptrace.model.endpoint import Endpoint, EndpointFields, Owner, OwnerFields
from tcptrace.model.events import Op, SocketEvent, TcpState, Touch, Transition
from tcptrace.model.frames import function_key
from tcptrace.model.histogram import (
    EMPTY,
    US,
    Bucket,
    Log2Histogram,
    age_histogram,
    buckets_of,
    percentile,
    slot_of,
)
from tcptrace.model.lifecycle import CodePath, SocketRecord, SocketTable
from tcptrace.model.snapshot import HostSocket

NS = 1_000_000_000

# Closed sockets' times-to-close kept exactly (for percentiles); beyond, the histogram only.
MAX_CLOSE_SAMPLES = 100_000
# Sockets that left CLOSE_WAIT remembered (by ports) to reconcile with a /proc snapshot.
MAX_RECENTLY_LEFT = 65_536

Ports = tuple[int, int]


class SkaddrKey(NamedTuple):
    """Key of an open socket seen entering CLOSE_WAIT: the kernel's address of it."""

    skaddr: int


class FoundKey(NamedTuple):
    """Key of an open socket found in CLOSE_WAIT by /proc (at start, or by a recheck),
    which has no kernel address: its endpoint (and network namespace, when known)."""

    endpoint: Endpoint
    netns: int = 0


class LiveKey(NamedTuple):
    """Key of a socket in the kernel's table of sockets in CLOSE_WAIT: its address, and
    when it entered, so that an address reused between two reads is another socket."""

    netns: int
    skaddr: int
    entered_ns: int


OpenKey = SkaddrKey | FoundKey | LiveKey


@dataclass
class CloseWaitSocket(EndpointFields, OwnerFields):
    """One socket in CLOSE_WAIT now."""

    key: OpenKey
    endpoint: Endpoint
    owner: Owner | None
    entered_ns: int
    preexisting: bool = False
    origin: CodePath | None = None
    last_touch: CodePath | None = None
    """The most recent code path known with its stack: the first touch after the FIN,
    else the last send/recv before it, else the origin (the event-fed tracker: the last
    process-context operation seen)."""
    eof_ns: int | None = None
    born_ns: int | None = None
    pre_fin_checked: bool = False
    netns: int | None = None
    pre_fin_touch: CodePath | None = None
    """The last send/recv before the peer's FIN (kept apart by the kernel, or by
    ``--touch-stacks`` on events), even when a later touch (the EOF read) became
    ``last_touch``."""
    post_fin_touch: CodePath | None = None
    """The touch after the FIN: the EOF read, else the first; None: never touched."""
    touches: int = 0
    """Touches after the FIN (send, recv, accept)."""
    last_touch_ns: int | None = None
    """When it was last touched after the FIN."""
    entry: OpenSocket | None = field(default=None, repr=False, compare=False)
    """The kernel's entry it came from (its code paths as stack ids, resolved when shown)."""
    seeded: bool = False
    """Found at start and seeded into the kernel, which says when it is no longer there."""
    resolved: bool = False
    """Its code paths carry their frames (``entry``'s stack ids were resolved)."""
    resolved_paths: dict[CodeRef, CodePath] = field(default_factory=dict, repr=False, compare=False)
    """What each of its kernel code paths resolved to (kept across reads: a stack id may
    be reused once the stack map was emptied)."""

    def age_ns(self, now_ns: int) -> int:
        return max(0, now_ns - self.entered_ns)

    def to_json(self, now_ns: int, threshold_ns: int) -> dict[str, Any]:
        age = self.age_ns(now_ns)
        extra: dict[str, Any] = {} if self.netns is None else {"netns": self.netns}
        return {
            **extra,
            "family": self.family,
            "saddr": self.saddr,
            "sport": self.sport,
            "daddr": self.daddr,
            "dport": self.dport,
            "pid": self.pid,
            "comm": self.comm,
            "cgroup": self.cgroup,
            "age_s": round(age / NS, 6),
            "at_least": self.preexisting,
            "preexisting": self.preexisting,
            "suspect": age >= threshold_ns,
            "eof_seen": self.eof_ns is not None,
            "last_touch": self.last_touch.op.name if self.last_touch else None,
        }


@dataclass
class RemoteSummary:
    """Where a group's sockets point: one remote dominating, or many distinct ones."""

    count: int
    distinct: int
    top: list[tuple[str, int]]

    @property
    def dominant(self) -> str | None:
        """The remote address holding more than half the sockets, when there is one."""
        if self.top and self.top[0][1] * 2 > self.count:
            return self.top[0][0]
        return None

    def text(self) -> str:
        if not self.top:
            return "-"
        if self.dominant is not None:
            addr, n = self.top[0]
            if self.distinct == 1:
                return f"all from {addr}"
            return f"{addr} dominates ({n}/{self.count}), {self.distinct} distinct"
        most = self.top[0][1]
        return f"{self.distinct} distinct remotes, at most {most} each"

    def to_json(self) -> dict[str, Any]:
        return {
            "distinct": self.distinct,
            "dominant": self.dominant,
            "top": [{"addr": a, "count": n} for a, n in self.top],
        }


def summarize_remotes(addrs: Iterable[str], top: int = 3) -> RemoteSummary:
    """
    >>> summarize_remotes(["10.0.0.1"] * 3 + ["10.0.0.2"]).text()
    '10.0.0.1 dominates (3/4), 2 distinct'
    >>> summarize_remotes(["a", "b", "c"]).text()
    '3 distinct remotes, at most 1 each'
    """
    counts = Counter(addrs)
    total = sum(counts.values())
    return RemoteSummary(count=total, distinct=len(counts), top=counts.most_common(top))


class GroupKey(NamedTuple):
    """What leak suspects of one group share: the owner, and the code paths as functions."""

    owner: Owner | None
    origin: tuple[str, ...]
    pre_fin_touch: tuple[str, ...] = ()
    post_fin_touch: tuple[str, ...] = ()


@dataclass
class SuspectGroup(OwnerFields):
    """Leak suspects sharing an owner and code path (origin and last-touch stacks)."""

    owner: Owner | None
    origin: CodePath | None
    last_touch: CodePath | None
    sockets: list[CloseWaitSocket]
    now_ns: int
    pre_fin_touch: CodePath | None = None
    post_fin_touch: CodePath | None = None

    @property
    def count(self) -> int:
        return len(self.sockets)

    @property
    def oldest_age_ns(self) -> int:
        return max(s.age_ns(self.now_ns) for s in self.sockets)

    @property
    def at_least(self) -> bool:
        """Whether the oldest age is a lower bound (a socket found at start)."""
        oldest = self.oldest_age_ns
        return any(s.preexisting and s.age_ns(self.now_ns) == oldest for s in self.sockets)

    @property
    def remotes(self) -> RemoteSummary:
        return summarize_remotes(s.daddr for s in self.sockets)

    @property
    def eof_seen(self) -> int:
        return sum(1 for s in self.sockets if s.eof_ns is not None)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            "cgroup": self.cgroup,
            "count": self.count,
            "oldest_age_s": round(self.oldest_age_ns / NS, 6),
            "at_least": self.at_least,
            "eof_seen": self.eof_seen,
            "origin_op": self.origin.op.name if self.origin else None,
            "origin_stack": list(self.origin.stack) if self.origin else [],
            "last_touch_op": self.last_touch.op.name if self.last_touch else None,
            "last_touch_stack": list(self.last_touch.stack) if self.last_touch else [],
            "remotes": self.remotes.to_json(),
            "ports": sorted({s.sport for s in self.sockets}),
        }


def code_path_key(path: CodePath | None) -> tuple[str, ...]:
    """A code path as functions, offsets and source lines left out: one function is one
    path, whichever instruction the stack was taken at (libc's fast and slow paths of one
    call differ), and whether its lines were looked up yet.

    >>> from tcptrace.model.events import Op
    >>> code_path_key(CodePath(op=Op.RECV, ts_ns=0, task_pid=1, ustack=("recv+0x19 [libc.so.6]",)))
    ('RECV', 'recv [libc.so.6]')
    """
    if path is None:
        return ()
    return (path.op.name, *(function_key(frame) for frame in path.stack))


def pre_fin_of(sock: CloseWaitSocket) -> CodePath | None:
    """The last send/recv before the peer's FIN: kept apart (the kernel's tables, or
    ``--touch-stacks`` on events), else the last touch when it came before the FIN (and
    was not the origin)."""
    if sock.pre_fin_touch is not None:
        return sock.pre_fin_touch
    touch = sock.last_touch
    if touch is not None and touch.ts_ns <= sock.entered_ns and touch.op in (Op.SEND, Op.RECV):
        return touch
    return None


def post_fin_of(sock: CloseWaitSocket) -> CodePath | None:
    """The app's first touch after the peer's FIN (the EOF read), when there was one: kept
    apart (the kernel's tables), else the last touch when it came after the FIN."""
    if sock.post_fin_touch is not None:
        return sock.post_fin_touch
    touch = sock.last_touch
    if sock.preexisting or touch is None or touch.ts_ns <= sock.entered_ns:
        return None
    return touch


def group_key(sock: CloseWaitSocket) -> GroupKey:
    """The owner, the origin, the last send/recv before the FIN where it was kept apart,
    and the first touch after the FIN, as functions; never the last touch, whichever of
    them it was."""
    return GroupKey(
        sock.owner,
        code_path_key(sock.origin),
        code_path_key(sock.pre_fin_touch),
        code_path_key(post_fin_of(sock)),
    )


def group_suspects(socks: Iterable[CloseWaitSocket], threshold_ns: int, now_ns: int) -> list[SuspectGroup]:
    """Sockets older than the threshold, grouped by (owner, code path), worst first.

    Where the last send/recv before the FIN was kept, whether the app touched a socket
    after the FIN does not split a group: sockets not touched after it join the biggest
    group of the same owner, origin and pre-FIN touch that was (a Go client's transport
    reads the EOF of some connections and not yet of others). Two different touches after
    the FIN are two groups; and without the pre-FIN touch, a socket never touched after
    the FIN (replied to, then forgotten) is told apart from one read to EOF by that alone."""
    groups: dict[GroupKey, list[CloseWaitSocket]] = {}
    for sock in socks:
        if sock.age_ns(now_ns) >= threshold_ns:
            groups.setdefault(group_key(sock), []).append(sock)
    for key in [k for k in groups if not k.post_fin_touch and k.pre_fin_touch]:
        touched = [k for k in groups if k.post_fin_touch and k[:3] == key[:3]]
        if touched:
            biggest = max(touched, key=lambda k: len(groups[k]))
            groups[biggest] += groups.pop(key)
    out = []
    for members in groups.values():
        first = members[0]
        out.append(
            SuspectGroup(
                owner=first.owner,
                origin=first.origin,
                last_touch=first.last_touch,
                sockets=sorted(members, key=lambda s: s.entered_ns),
                now_ns=now_ns,
                pre_fin_touch=next((p for p in map(pre_fin_of, members) if p is not None), None),
                post_fin_touch=next((p for p in map(post_fin_of, members) if p is not None), None),
            )
        )
    out.sort(key=lambda g: (-g.count, -g.oldest_age_ns))
    return out


@dataclass
class Interval:
    """What happened in one reporting interval."""

    start_ns: int
    end_ns: int
    entered: int = 0
    closed: int = 0
    reset: int = 0


def _secs(v: int | None) -> float | None:
    return None if v is None else round(v / NS, 6)


@dataclass(frozen=True)
class CloseTimes:
    """How long apps took to close their sockets out of CLOSE_WAIT: the count, the
    extremes (exact), percentiles and log2 buckets."""

    count: int = 0
    min_ns: int | None = None
    p50_ns: int | None = None
    p90_ns: int | None = None
    p99_ns: int | None = None
    max_ns: int | None = None
    buckets: tuple[Bucket, ...] = ()

    @classmethod
    def of(cls, hist: Log2Histogram, min_ns: int | None) -> CloseTimes:
        """From a log2 histogram with its exact maximum and minimum: percentiles are
        estimates within the slot holding them (at most a factor of 2)."""
        if not hist:
            return cls()
        ps = hist.percentiles((50, 90, 99))
        return cls(hist.count, min_ns, ps[50], ps[90], ps[99], hist.max_ns, tuple(hist.buckets()))

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "min_s": _secs(self.min_ns),
            "p50_s": _secs(self.p50_ns),
            "p90_s": _secs(self.p90_ns),
            "p99_s": _secs(self.p99_ns),
            "max_s": _secs(self.max_ns),
            "histogram": [
                {"low_s": b.low_ns / NS, "high_s": b.high_ns / NS, "count": b.count} for b in self.buckets
            ],
        }


class CloseWaitReports:
    """The reports both models give from their open sockets and their counts."""

    threshold_ns: int
    open: dict[OpenKey, CloseWaitSocket]

    def close_times(self) -> CloseTimes:
        raise NotImplementedError

    def suspects(self, now_ns: int) -> list[SuspectGroup]:
        """Open sockets older than the threshold, grouped by (owner, code path), worst first."""
        return group_suspects(self.open.values(), self.threshold_ns, now_ns)

    def open_sockets(self) -> list[CloseWaitSocket]:
        return sorted(self.open.values(), key=lambda s: s.entered_ns)

    def close_histogram(self) -> list[Bucket]:
        return list(self.close_times().buckets)

    def close_time_json(self) -> dict[str, Any]:
        return self.close_times().to_json()

    def periodic_json(self, now_ns: int, interval: Interval | None) -> dict[str, Any]:
        ages = [s.age_ns(now_ns) for s in self.open.values()]
        return {
            "type": "closewait",
            "ts_ns": now_ns,
            "open": len(self.open),
            "suspects": sum(1 for a in ages if a >= self.threshold_ns),
            "entered": interval.entered if interval else 0,
            "closed": interval.closed if interval else 0,
            "reset": interval.reset if interval else 0,
            "age_histogram": [{"bucket": b, "count": n} for b, n in age_histogram(ages)],
        }


@dataclass
class CloseWaitTracker(CloseWaitReports):
    """Every socket in CLOSE_WAIT: since when, owned by whom, and how each one left."""

    threshold_ns: int = 5 * NS
    table: SocketTable = field(default_factory=SocketTable)
    open: dict[OpenKey, CloseWaitSocket] = field(default_factory=dict)
    entered: int = 0
    closed: int = 0
    closed_preexisting: int = 0
    reset: int = 0
    forgotten: int = 0
    """Open sockets dropped because their skaddr was reborn (their end was not seen)."""
    close_times_ns: list[int] = field(default_factory=list)
    close_hist: Counter[int] = field(default_factory=Counter)
    """Times to close counted by log2 slot of microseconds (model/histogram.py)."""
    start_ns: int | None = None
    interval: Interval | None = None
    missed_exits: int = 0
    """Open sockets /proc no longer showed in CLOSE_WAIT: their exit was not seen."""
    missed_entries: int = 0
    """Sockets /proc showed in CLOSE_WAIT whose entry was not seen (added, age a lower bound)."""
    recently_left: OrderedDict[Ports, int] = field(default_factory=OrderedDict)

    # ---- input -------------------------------------------------------------------------

    def add_preexisting(self, sockets: Iterable[HostSocket], now_ns: int) -> int:
        """Sockets of a /proc snapshot in CLOSE_WAIT at ``now_ns`` (tracing start), with the
        holders of their fds; returns how many were added."""
        added = 0
        seen = {s.endpoint for s in self.open.values()}
        for p in sockets:
            if p.endpoint in seen:  # already seen entering CLOSE_WAIT live
                continue
            seen.add(p.endpoint)
            key = FoundKey(p.endpoint)
            self.open[key] = CloseWaitSocket(
                key=key, endpoint=p.endpoint, owner=p.owner, entered_ns=now_ns, preexisting=True
            )
            added += 1
        return added

    def feed(self, event: SocketEvent) -> None:
        if self.start_ns is None:
            self.start_ns = event.ts_ns
        record, replaced = self.table.feed(event)
        if replaced is not None and replaced.state == TcpState.CLOSE_WAIT:
            if self.open.pop(SkaddrKey(replaced.skaddr), None) is not None:
                self.forgotten += 1
        if record is None:
            return
        if isinstance(event, Transition):
            if event.new == TcpState.CLOSE_WAIT:
                self._entered(event, record)
            elif event.old == TcpState.CLOSE_WAIT:
                self._left(event, record)
        elif isinstance(event, Touch):
            sock = self.open.get(SkaddrKey(event.skaddr))
            if sock is not None:
                self._refresh(sock, record)

    def _entered(self, event: Transition, record: SocketRecord) -> None:
        found = self.open.get(FoundKey(record.endpoint))
        if found is not None and found.entered_ns >= event.ts_ns:
            # It entered before the /proc snapshot that found it was read (its event
            # was still in the ring buffer): one socket, and the live copy knows more.
            del self.open[found.key]
        key = SkaddrKey(event.skaddr)
        self.open[key] = CloseWaitSocket(
            key=key,
            endpoint=record.endpoint,
            owner=record.owner,
            entered_ns=event.ts_ns,
            origin=record.origin,
            last_touch=record.last_touch,
            born_ns=record.born_ns,
            netns=event.netns,
        )
        self.entered += 1
        if self.interval is not None:
            self.interval.entered += 1

    def _left(self, event: Transition, record: SocketRecord) -> None:
        sock = self.open.pop(SkaddrKey(event.skaddr), None)
        if sock is None:  # found by /proc: known by its endpoint only
            sock = self.open.pop(FoundKey(record.endpoint), None)
        self.recently_left[record.endpoint.ports] = event.ts_ns
        self.recently_left.move_to_end(record.endpoint.ports)
        if len(self.recently_left) > MAX_RECENTLY_LEFT:
            self.recently_left.popitem(last=False)
        if event.new != TcpState.LAST_ACK:
            self.reset += 1
            if self.interval is not None:
                self.interval.reset += 1
            return
        self.closed += 1
        if self.interval is not None:
            self.interval.closed += 1
        if sock is not None and not sock.preexisting:
            took = event.ts_ns - sock.entered_ns
            if len(self.close_times_ns) < MAX_CLOSE_SAMPLES:
                self.close_times_ns.append(took)
            self.close_hist[slot_of(max(0, took // US))] += 1
        elif sock is not None:
            self.closed_preexisting += 1

    def _refresh(self, sock: CloseWaitSocket, record: SocketRecord) -> None:
        if record.owner is not None:
            sock.owner = record.owner
        if record.origin is not None:
            sock.origin = record.origin
        sock.last_touch = record.last_touch
        sock.eof_ns = record.eof_ns

    def pending_pre_fin(self) -> list[int]:
        """skaddrs of sockets seen entering CLOSE_WAIT whose last touch before the FIN was
        not looked up yet (``closewait --touch-stacks``)."""
        return [
            s.key.skaddr for s in self.open.values() if isinstance(s.key, SkaddrKey) and not s.pre_fin_checked
        ]

    def add_pre_fin_touch(self, skaddr: int, path: CodePath | None) -> bool:
        """The last touch of ``skaddr`` before the FIN, as the kernel kept it; True if used.

        Kept only when it happened before the socket entered CLOSE_WAIT and after it was
        born: the kernel's entry may be a freed socket's at the same address.
        """
        sock = self.open.get(SkaddrKey(skaddr))
        if sock is None:
            return False
        sock.pre_fin_checked = True
        if path is None or path.ts_ns > sock.entered_ns:
            return False
        if sock.born_ns is not None and path.ts_ns < sock.born_ns:
            return False
        sock.pre_fin_touch = path
        if sock.last_touch is None or path.ts_ns > sock.last_touch.ts_ns:
            sock.last_touch = path
            return True
        return False

    def rewrite_code_paths(
        self, rewrite: Callable[[CodePath], CodePath], now_ns: int = 0, min_age_ns: int | None = None
    ) -> None:
        """Replace the origin, last-touch and pre-FIN code paths of the sockets in CLOSE_WAIT (those
        at least ``min_age_ns`` old at ``now_ns``, when given) with ``rewrite(path)``. The
        agent keeps stacks as ids until they are shown, and symbolizes them this way."""
        for sock in self.open.values():
            if min_age_ns is not None and sock.age_ns(now_ns) < min_age_ns:
                continue
            if sock.origin is not None:
                sock.origin = rewrite(sock.origin)
            if sock.last_touch is not None:
                sock.last_touch = rewrite(sock.last_touch)
            if sock.pre_fin_touch is not None:
                sock.pre_fin_touch = rewrite(sock.pre_fin_touch)

    # ---- healing from /proc -------------------------------------------------------------
    # The kernel may skip a run of the transition hook (bpf_prog_active recursion guard,
    # ring buffer full), so the open set is compared with /proc now and then. Sockets are
    # compared by (local port, remote port): a false match only delays a repair, while a
    # difference in how addresses are written could never remove a live socket.

    def drop_gone(self, in_close_wait: Iterable[Ports], snapshot_ns: int) -> int:
        """Forget open sockets that entered before ``snapshot_ns`` but were not in CLOSE_WAIT
        then (call after every event up to the snapshot was fed). Returns how many."""
        present = set(in_close_wait)
        gone = [
            key
            for key, s in self.open.items()
            if s.entered_ns < snapshot_ns and (s.sport, s.dport) not in present
        ]
        for key in gone:
            del self.open[key]
        self.missed_exits += len(gone)
        return len(gone)

    def unexplained(self, in_close_wait: Iterable[Ports], snapshot_ns: int) -> set[Ports]:
        """Sockets in CLOSE_WAIT at ``snapshot_ns`` that are not open here and did not leave
        after the snapshot: their entry was not seen (or a filter left them out)."""
        open_ports = {(s.sport, s.dport) for s in self.open.values()}
        return {
            p for p in in_close_wait if p not in open_ports and self.recently_left.get(p, -1) < snapshot_ns
        }

    def add_found(self, sockets: Iterable[HostSocket], snapshot_ns: int) -> int:
        """Sockets whose entry was missed, in CLOSE_WAIT at least since ``snapshot_ns``."""
        added = self.add_preexisting(sockets, snapshot_ns)
        self.missed_entries += added
        return added

    # ---- reports -----------------------------------------------------------------------

    def begin_interval(self, now_ns: int) -> Interval | None:
        """Close the current interval (returned) and start the next one at ``now_ns``."""
        done = self.interval
        if done is not None:
            done.end_ns = now_ns
        self.interval = Interval(start_ns=now_ns, end_ns=now_ns)
        return done

    def close_times(self) -> CloseTimes:
        """Times to close, exact: the samples kept (up to MAX_CLOSE_SAMPLES), and the
        histogram of them all in log2 slots of microseconds."""
        times = sorted(self.close_times_ns)
        return CloseTimes(
            count=sum(self.close_hist.values()),
            min_ns=times[0] if times else None,
            p50_ns=percentile(times, 50),
            p90_ns=percentile(times, 90),
            p99_ns=percentile(times, 99),
            max_ns=times[-1] if times else None,
            buckets=tuple(buckets_of(sorted(self.close_hist.items()), US)),
        )

    def close_times_sorted(self) -> list[int]:
        return sorted(self.close_times_ns)

    def summary_json(self, now_ns: int) -> dict[str, Any]:
        return {
            "threshold_s": self.threshold_ns / NS,
            "open": len(self.open),
            "preexisting_open": sum(1 for s in self.open.values() if s.preexisting),
            "entered": self.entered,
            "closed": self.closed,
            "closed_preexisting": self.closed_preexisting,
            "reset": self.reset,
            "forgotten": self.forgotten,
            "missed_exits": self.missed_exits,
            "missed_entries": self.missed_entries,
            "time_to_close": self.close_time_json(),
            "groups": [g.to_json() for g in self.suspects(now_ns)],
            "sockets": [s.to_json(now_ns, self.threshold_ns) for s in self.open_sockets()],
        }


Resolver = Callable[[CodeRef], CodePath]
"""Turns a kernel table's code path (stack ids) into one with frames."""


def frames_path(ref: CodeRef) -> CodePath:
    """A code path with the frames it came with (a replay), or none."""
    return CodePath(op=ref.op, ts_ns=ref.ts_ns, task_pid=ref.pid, ret=ref.ret, ustack=ref.frames or ())


def ports_key(sock: CloseWaitSocket) -> PortsKey:
    """How a socket is compared with /proc: (network namespace, local port, remote port)."""
    return (sock.netns or 0, sock.sport, sock.dport)


@dataclass
class CloseWaitModel(CloseWaitReports):
    """Every socket in CLOSE_WAIT, from what the kernel aggregates (``apply`` a CwSnapshot
    once per interval): the model's cost is the number of sockets in CLOSE_WAIT and of
    owners, whatever the connection rate.

    Open sockets are keyed by (network namespace, kernel address, entry time): an address
    reused between two reads is a new socket. Counts, the time to close (percentiles from
    the kernel's log2 histogram, exact minimum and maximum) and per-owner counts are the
    kernel's, exact. Code paths are stack ids until a socket is shown as a leak suspect:
    then ``resolve`` turns them into frames.
    """

    threshold_ns: int = 5 * NS
    resolve: Resolver = frames_path
    open: dict[OpenKey, CloseWaitSocket] = field(default_factory=dict)
    counters: CwCounters = field(default_factory=CwCounters)
    time_to_close: Log2Histogram = EMPTY
    min_close_ns: int | None = None
    owners: tuple[OwnerCounts, ...] = ()
    at_ns: int | None = None
    """When the last snapshot was read."""
    interval: Interval | None = None
    missed_exits: int = 0
    """Sockets the kernel held in CLOSE_WAIT that /proc no longer showed there (their exit
    was not seen): dropped, and ignored in later snapshots."""
    missed_entries: int = 0
    """Sockets /proc showed in CLOSE_WAIT that the kernel did not hold (their entry was not
    seen, or a filter could not match them then): added, age a lower bound."""
    dismissed: set[LiveKey] = field(default_factory=set)
    _interval_base: CwCounters = field(default_factory=CwCounters)

    # ---- counts ------------------------------------------------------------------------

    @property
    def entered(self) -> int:
        return self.counters.entered

    @property
    def closed(self) -> int:
        return self.counters.closed

    @property
    def reset(self) -> int:
        return self.counters.reset

    @property
    def forgotten(self) -> int:
        return self.counters.forgotten

    @property
    def closed_preexisting(self) -> int:
        return self.counters.closed_preexisting

    # ---- input -------------------------------------------------------------------------

    def apply(self, snap: CwSnapshot) -> None:
        """What the kernel held at ``snap.at_ns``: its counts, and the sockets in CLOSE_WAIT
        now (those found at start stay until the kernel says they are gone)."""
        self.at_ns = snap.at_ns
        self.counters = snap.counters
        self.time_to_close = snap.time_to_close
        self.min_close_ns = snap.min_close_ns
        self.owners = snap.owners
        live: dict[OpenKey, CloseWaitSocket] = {}
        present: set[LiveKey] = set()
        live_pre: dict[tuple[int, Endpoint], CloseWaitSocket] = {}
        for entry in snap.open:
            key = LiveKey(entry.netns, entry.skaddr, entry.entered_ns)
            present.add(key)
            if key in self.dismissed:
                continue
            sock = self.open.get(key)
            if sock is None or sock.entry != entry:
                sock = self._socket(key, entry, sock)
            live[key] = sock
            if entry.preexisting:
                live_pre[(entry.netns, entry.endpoint)] = sock
        self.dismissed &= present
        live_at = {(e.netns, e.endpoint) for e in snap.open}
        found: dict[OpenKey, CloseWaitSocket] = {}
        for old, sock in self.open.items():
            if not isinstance(old, FoundKey):
                continue
            where = (old.netns, old.endpoint)
            if where in live_pre or where in live_at:
                # The kernel took its seed, or saw it enter CLOSE_WAIT after attaching but
                # before the snapshot was read: the live entry is the same socket.
                continue
            if sock.seeded and where not in snap.untouched:
                continue  # its seed was taken and it left CLOSE_WAIT (counted by the kernel)
            found[old] = sock
        self.open = {**found, **live}

    def _socket(self, key: LiveKey, e: OpenSocket, was: CloseWaitSocket | None) -> CloseWaitSocket:
        sock = CloseWaitSocket(
            key=key,
            endpoint=e.endpoint,
            owner=e.owner,
            entered_ns=e.entered_ns,
            preexisting=e.preexisting,
            eof_ns=e.eof_ns,
            born_ns=e.born_ns,
            netns=e.netns,
            touches=e.touches,
            last_touch_ns=e.last.ts_ns if e.last is not None else None,
            entry=e,
        )
        if was is not None:
            sock.resolved_paths = was.resolved_paths
        self._paths(sock, e, resolved=was is not None and was.resolved)
        return sock

    def _paths(self, sock: CloseWaitSocket, e: OpenSocket, resolved: bool) -> None:
        """The socket's code paths: with frames when ``resolved`` (a leak suspect), else
        only what the kernel's entry says without its stacks."""

        def path(ref: CodeRef | None) -> CodePath | None:
            if ref is None or not ref.ts_ns:
                return None
            if ref.frames is not None:
                return frames_path(ref)  # a replay: its frames came with it
            if not resolved:
                return CodePath(op=ref.op, ts_ns=ref.ts_ns, task_pid=ref.pid, ret=ref.ret)
            known = sock.resolved_paths.get(ref)
            if known is None:
                known = sock.resolved_paths[ref] = self.resolve(ref)
            return known

        sock.origin = path(e.origin)
        sock.pre_fin_touch = path(e.pre_fin)
        sock.post_fin_touch = path(e.post_fin)
        sock.last_touch = sock.post_fin_touch or sock.pre_fin_touch or sock.origin
        sock.resolved = resolved

    def add_preexisting(self, sockets: Iterable[HostSocket], now_ns: int, seeded: bool = False) -> int:
        """Sockets of a host snapshot in CLOSE_WAIT at ``now_ns`` (tracing start), with the
        holders of their fds (``seeded``: planted in the kernel, which then says when each
        one is gone); returns how many were added."""
        added = 0
        seen = {(s.netns or 0, s.endpoint) for s in self.open.values()}
        for p in sockets:
            where = (p.netns, p.endpoint)
            if where in seen:
                continue
            seen.add(where)
            key = FoundKey(p.endpoint, p.netns)
            self.open[key] = CloseWaitSocket(
                key=key,
                endpoint=p.endpoint,
                owner=p.owner,
                entered_ns=now_ns,
                preexisting=True,
                netns=p.netns,
                seeded=seeded,
            )
            added += 1
        return added

    # ---- healing from /proc ------------------------------------------------------------
    # The kernel may still skip both copies of a transition program's run, or a filter may
    # not have matched a socket when it entered (its owner was learned later), so the open
    # set is compared with /proc now and then: read /proc, then the kernel, then /proc
    # again. A socket leaves CLOSE_WAIT once and never comes back, so one the kernel held
    # before the first read and still holds after it, which /proc did not show, has left;
    # and one /proc showed in both reads, which the kernel does not hold, entered unseen.

    def heal(
        self, held_before: Iterable[OpenKey], first: set[PortsKey], second: set[PortsKey]
    ) -> set[PortsKey]:
        """Drop the open sockets that were open before the first /proc read (``held_before``)
        and are still, but were not in CLOSE_WAIT in it; returns the sockets in CLOSE_WAIT
        in both reads that are not open here (call ``add_found`` with them, or a filter
        left them out). Call it after applying the snapshot read between the two."""
        before = set(held_before)
        gone = [k for k, s in self.open.items() if k in before and ports_key(s) not in first]
        for key in gone:
            if isinstance(key, LiveKey):
                self.dismissed.add(key)
            del self.open[key]
        self.missed_exits += len(gone)
        have = {ports_key(s) for s in self.open.values()}
        return {p for p in first & second if p not in have}

    def add_found(self, sockets: Iterable[HostSocket], now_ns: int) -> int:
        """Sockets whose entry was missed, in CLOSE_WAIT at least since ``now_ns``."""
        added = self.add_preexisting(sockets, now_ns)
        self.missed_entries += added
        return added

    # ---- reports -----------------------------------------------------------------------

    def begin_interval(self, now_ns: int) -> Interval | None:
        """Close the current interval (returned, with what the kernel counted in it) and
        start the next one at ``now_ns``."""
        done = self.interval
        if done is not None:
            d = self.counters.minus(self._interval_base)
            done.end_ns, done.entered, done.closed, done.reset = now_ns, d.entered, d.closed, d.reset
        self._interval_base = self.counters
        self.interval = Interval(start_ns=now_ns, end_ns=now_ns)
        return done

    def suspects(self, now_ns: int) -> list[SuspectGroup]:
        """Open sockets older than the threshold, grouped by (owner, code path), worst first:
        their stacks are resolved now (and kept), only theirs."""
        for sock in self.open.values():
            if (
                sock.entry is not None
                and not sock.pre_fin_checked
                and sock.age_ns(now_ns) >= self.threshold_ns
            ):
                self._paths(sock, sock.entry, resolved=True)
        return super().suspects(now_ns)

    def rewrite_code_paths(
        self, rewrite: Callable[[CodePath], CodePath], now_ns: int = 0, min_age_ns: int | None = None
    ) -> None:
        """Replace the resolved code paths of the open sockets (those at least ``min_age_ns``
        old at ``now_ns``, when given) with ``rewrite(path)``, and keep them so (their
        source lines are added this way when they are shown)."""
        for sock in self.open.values():
            if sock.entry is None or (min_age_ns is not None and sock.age_ns(now_ns) < min_age_ns):
                continue
            if not sock.resolved:
                self._paths(sock, sock.entry, resolved=True)
            for ref, path in sock.resolved_paths.items():
                sock.resolved_paths[ref] = rewrite(path)
            self._paths(sock, sock.entry, resolved=True)

    def resolve_all(self) -> None:
        """Resolve the code paths of every open socket now (the stack ids they hold are
        about to be reused)."""
        for sock in self.open.values():
            if sock.entry is not None and not sock.resolved:
                self._paths(sock, sock.entry, resolved=True)

    def close_times(self) -> CloseTimes:
        return CloseTimes.of(self.time_to_close, self.min_close_ns)

    def owners_json(self) -> list[dict[str, Any]]:
        """Per owner counts since tracing started, busiest first."""
        out = []
        for o in sorted(self.owners, key=lambda o: (-o.entered, -o.closed, o.pid)):
            out.append(
                {
                    "pid": o.pid or None,
                    "comm": o.comm,
                    "cgroup": o.cgroup,
                    "start_ns": o.start_ns or None,
                    "entered": o.entered,
                    "closed": o.closed,
                    "reset": o.reset,
                    "forgotten": o.forgotten,
                    "closed_preexisting": o.closed_preexisting,
                    "open": sum(
                        1 for s in self.open.values() if s.entry is not None and _owner_key(s.entry) == o.key
                    ),
                    "time_to_close": CloseTimes.of(o.time_to_close, o.min_close_ns).to_json(),
                }
            )
        return out

    def summary_json(self, now_ns: int) -> dict[str, Any]:
        c = self.counters
        return {
            "threshold_s": self.threshold_ns / NS,
            "open": len(self.open),
            "preexisting_open": sum(1 for s in self.open.values() if s.preexisting),
            "entered": c.entered,
            "closed": c.closed,
            "closed_preexisting": c.closed_preexisting,
            "reset": c.reset,
            "forgotten": c.forgotten,
            "missed_exits": self.missed_exits,
            "missed_entries": self.missed_entries,
            "kernel": {
                "open_failed": c.open_failed,
                "owner_failed": c.owner_failed,
                "owner_forgotten": c.owner_forgotten,
                "seeds_used": c.seeds_used,
                "sock_update_failed": c.sock_update_failed,
                "touches": c.touches,
            },
            "time_to_close": self.close_time_json(),
            "owners": self.owners_json(),
            "groups": [g.to_json() for g in self.suspects(now_ns)],
            "sockets": [s.to_json(now_ns, self.threshold_ns) for s in self.open_sockets()],
        }


def _owner_key(e: OpenSocket) -> OwnerKey:
    return OwnerKey(e.owner.pid, e.owner_start_ns) if e.owner is not None else OwnerKey(0, 0)


_UNITS = {"us": 1_000, "ms": 1_000_000, "s": NS, "m": 60 * NS, "h": 3600 * NS}


def parse_duration(text: str) -> int:
    """A duration given on the command line, in ns; a bare number is seconds.

    >>> parse_duration("5s"), parse_duration("250ms"), parse_duration("2m"), parse_duration("1.5")
    (5000000000, 250000000, 120000000000, 1500000000)
    """
    raw = text.strip().lower()
    for unit in ("us", "ms", "s", "m", "h"):
        if raw.endswith(unit) and raw[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(raw[: -len(unit)]) * _UNITS[unit])
    if raw.replace(".", "", 1).isdigit():
        return int(float(raw) * NS)
    raise ValueError(f"not a duration: {text!r} (examples: 5s, 250ms, 2m)")
