"""CLOSE_WAIT timing and leak suspects, grouped by (owner, code path).

A socket enters CLOSE_WAIT when the peer's FIN arrives and stays there until the
application closes it (``CLOSE_WAIT -> LAST_ACK``) or the peer resets it
(``CLOSE_WAIT -> CLOSE``). Sockets already in CLOSE_WAIT when tracing started come from a
/proc snapshot (HostSockets): their age is a lower bound ("at least since start") and they
have no stacks.

Pure: fed events (and the snapshot) by the caller, asked for reports at model times.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tcptrace.model.endpoint import Endpoint, EndpointFields, Owner, OwnerFields
from tcptrace.model.events import Op, SocketEvent, TcpState, Touch, Transition
from tcptrace.model.frames import function_key
from tcptrace.model.histogram import US, Bucket, age_histogram, buckets_of, percentile, slot_of
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
    which has no kernel address: its endpoint."""

    endpoint: Endpoint


OpenKey = SkaddrKey | FoundKey


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
    eof_ns: int | None = None
    born_ns: int | None = None
    pre_fin_checked: bool = False
    pre_fin_touch: CodePath | None = None
    """The last send/recv before the peer's FIN (``--touch-stacks``), kept even when a
    later touch (the EOF read) became ``last_touch``."""
    netns: int | None = None
    """Its network namespace (inode), where an event named it."""

    def age_ns(self, now_ns: int) -> int:
        return max(0, now_ns - self.entered_ns)

    def to_json(self, now_ns: int, threshold_ns: int) -> dict[str, Any]:
        age = self.age_ns(now_ns)
        return {
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
    last_touch: tuple[str, ...]
    pre_fin_touch: tuple[str, ...] = ()


@dataclass
class SuspectGroup(OwnerFields):
    """Leak suspects sharing an owner and code path (origin and last-touch stacks)."""

    owner: Owner | None
    origin: CodePath | None
    last_touch: CodePath | None
    sockets: list[CloseWaitSocket]
    now_ns: int

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

    @property
    def pre_fin_touch(self) -> CodePath | None:
        """The last send/recv before the peer's FIN: kept apart with ``--touch-stacks``,
        else the last touch when it came before the FIN (and was not the origin)."""
        first = self.sockets[0] if self.sockets else None
        if first is None:
            return None
        if first.pre_fin_touch is not None:
            return first.pre_fin_touch
        touch = self.last_touch
        if touch is not None and touch.ts_ns <= first.entered_ns and touch.op in (Op.SEND, Op.RECV):
            return touch
        return None

    @property
    def post_fin_touch(self) -> CodePath | None:
        """The app's touch after the peer's FIN (the EOF read), when there was one."""
        first = self.sockets[0] if self.sockets else None
        touch = self.last_touch
        if first is None or first.preexisting or touch is None or touch.ts_ns <= first.entered_ns:
            return None
        return touch

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


def group_key(sock: CloseWaitSocket) -> GroupKey:
    return GroupKey(
        sock.owner,
        code_path_key(sock.origin),
        code_path_key(sock.last_touch),
        code_path_key(sock.pre_fin_touch),
    )


@dataclass
class Interval:
    """What happened in one reporting interval."""

    start_ns: int
    end_ns: int
    entered: int = 0
    closed: int = 0
    reset: int = 0


@dataclass
class CloseWaitTracker:
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

    def suspects(self, now_ns: int) -> list[SuspectGroup]:
        """Open sockets older than the threshold, grouped by (owner, code path), worst first."""
        groups: dict[GroupKey, list[CloseWaitSocket]] = {}
        for sock in self.open.values():
            if sock.age_ns(now_ns) >= self.threshold_ns:
                groups.setdefault(group_key(sock), []).append(sock)
        out = [
            SuspectGroup(
                owner=socks[0].owner,
                origin=socks[0].origin,
                last_touch=socks[0].last_touch,
                sockets=sorted(socks, key=lambda s: s.entered_ns),
                now_ns=now_ns,
            )
            for socks in groups.values()
        ]
        out.sort(key=lambda g: (-g.count, -g.oldest_age_ns))
        return out

    def open_sockets(self) -> list[CloseWaitSocket]:
        return sorted(self.open.values(), key=lambda s: s.entered_ns)

    def close_times_sorted(self) -> list[int]:
        return sorted(self.close_times_ns)

    def close_histogram(self) -> list[Bucket]:
        return buckets_of(sorted(self.close_hist.items()), US)

    def close_time_json(self) -> dict[str, Any]:
        times = self.close_times_sorted()

        def secs(v: int | None) -> float | None:
            return None if v is None else round(v / NS, 6)

        return {
            "count": sum(self.close_hist.values()),
            "min_s": secs(times[0] if times else None),
            "p50_s": secs(percentile(times, 50)),
            "p90_s": secs(percentile(times, 90)),
            "p99_s": secs(percentile(times, 99)),
            "max_s": secs(times[-1] if times else None),
            "histogram": [
                {"low_s": b.low_ns / NS, "high_s": b.high_ns / NS, "count": b.count}
                for b in self.close_histogram()
            ],
        }

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
