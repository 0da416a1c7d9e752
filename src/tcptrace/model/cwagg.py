"""CLOSE_WAIT as the kernel aggregates it, as plain data; and the same aggregation in Python.

`closewait` and the agent send nothing across the ring buffer for a healthy connection:
the kernel keeps the counts, the time to close and the sockets in CLOSE_WAIT now in maps
(bpf/closewait.bpf.h), and kernel/cwreader.py reads them into a ``CwSnapshot`` once per
interval. ``Emulator`` is that aggregation fed a recorded event stream, producing the same
snapshots: a replay (``--from``) answers through the same model as a live run, and the
unit tests use it as the oracle of what the kernel keeps.

Pure: no I/O, no bcc.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import NamedTuple

from tcptrace.model.endpoint import Endpoint, Owner
from tcptrace.model.events import Op, SocketEvent, TcpState, Touch, Transition
from tcptrace.model.histogram import EMPTY, SLOTS, Log2Histogram, slot_of


class CodeRef(NamedTuple):
    """One process-context operation on a socket as a kernel table keeps it (struct
    tt_code): what, when, its result, who, and its user stack as an id in the kernel's
    stack map (``gen``: the map's generation then), or as frames already (a replay)."""

    op: Op
    ts_ns: int
    ret: int = 0
    pid: int = 0
    ustack_id: int = -1
    gen: int = 0
    frames: tuple[str, ...] | None = None
    """User frames, innermost first, when known without the kernel (a recording)."""


class OwnerKey(NamedTuple):
    """An owner as the kernel keys it: (pid, start time in ns since boot; 0 unknown)."""

    pid: int
    start_ns: int


class OpenSocket(NamedTuple):
    """One socket in CLOSE_WAIT now: an entry of the kernel's ``cw_open``."""

    skaddr: int
    netns: int
    endpoint: Endpoint
    owner: Owner | None
    owner_start_ns: int
    entered_ns: int
    """When it entered CLOSE_WAIT; for a pre-existing socket, the start snapshot's time."""
    born_ns: int | None = None
    preexisting: bool = False
    touches: int = 0
    eof_ns: int | None = None
    origin: CodeRef | None = None
    pre_fin: CodeRef | None = None
    """Its last send/recv before the peer's FIN (kept with --touch-stacks)."""
    post_fin: CodeRef | None = None
    """Its touch after the FIN: the EOF read, else the first touch after the FIN."""
    last: CodeRef | None = None
    """Its last touch after the FIN (no stack kept)."""


@dataclass(frozen=True)
class OwnerCounts:
    """One owner's CLOSE_WAIT counts since tracing started (the kernel's ``cw_owners``)."""

    pid: int
    start_ns: int
    comm: str | None
    cgroup: int | None = None
    entered: int = 0
    closed: int = 0
    reset: int = 0
    forgotten: int = 0
    closed_preexisting: int = 0
    reset_preexisting: int = 0
    time_to_close: Log2Histogram = EMPTY
    min_close_ns: int | None = None

    @property
    def key(self) -> OwnerKey:
        return OwnerKey(self.pid, self.start_ns)


@dataclass(frozen=True)
class CwCounters:
    """The kernel's exact counters: CLOSE_WAIT (``cw_stats``) and the socket table's."""

    entered: int = 0
    closed: int = 0
    """Closed by the app (-> LAST_ACK), pre-existing sockets included."""
    reset: int = 0
    """Left for CLOSE (a reset), pre-existing sockets included."""
    forgotten: int = 0
    """Sockets whose address was reborn while they were in the table: their exit was not seen."""
    closed_preexisting: int = 0
    reset_preexisting: int = 0
    open_failed: int = 0
    """Entries the bounded ``cw_open`` could not take (counted, not kept)."""
    owner_failed: int = 0
    """Owners the bounded ``cw_owners`` could not take (counted in the totals only)."""
    touches: int = 0
    owner_forgotten: int = 0
    """Live sockets met with no entry in the socket table and no seed: an LRU eviction
    (or a socket older than tracing that was not seeded); their owner is unknown."""
    seeds_used: int = 0
    adopted: int = 0
    sock_update_failed: int = 0
    stack_failed: int = 0

    def minus(self, earlier: CwCounters) -> CwCounters:
        return CwCounters(
            **{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(CwCounters)}
        )

    def to_json(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(CwCounters)}


PortsKey = tuple[int, int, int]
"""(network namespace, local port, remote port): how a socket is compared with /proc."""


@dataclass(frozen=True)
class CwSnapshot:
    """What the kernel keeps about CLOSE_WAIT, read at ``at_ns`` (CLOCK_MONOTONIC)."""

    at_ns: int
    counters: CwCounters = CwCounters()
    time_to_close: Log2Histogram = EMPTY
    """Of every socket closed by its app (pre-existing ones left out): exact max and sum."""
    min_close_ns: int | None = None
    owners: tuple[OwnerCounts, ...] = ()
    open: tuple[OpenSocket, ...] = ()
    untouched: frozenset[tuple[int, Endpoint]] = frozenset()
    """(netns, endpoint) of the sockets found in CLOSE_WAIT at start whose seed the
    kernel has not taken yet (``cw_seeds``): still there, untouched."""


# ---- the emulation -------------------------------------------------------------------------


@dataclass
class _Sock:
    """The emulated socket table entry (struct tt_sock)."""

    owner: Owner | None = None
    start_ns: int = 0
    state: TcpState | None = None
    born_ns: int | None = None
    origin: CodeRef | None = None


@dataclass
class _Owner:
    comm: str | None
    cgroup: int | None
    entered: int = 0
    closed: int = 0
    reset: int = 0
    forgotten: int = 0
    closed_pre: int = 0
    reset_pre: int = 0
    slots: list[int] = field(default_factory=lambda: [0] * SLOTS)
    sum_ns: int = 0
    min_ns: int | None = None
    max_ns: int = 0


def _code(event: SocketEvent, op: Op, ret: int = 0) -> CodeRef:
    # The kernel's tables keep the user stack only: a kernel stack at accept, connect,
    # send or recv is the syscall path, which attributes nothing.
    return CodeRef(op, event.ts_ns, ret, event.task_pid, frames=event.ustack)


class Emulator:
    """bpf/closewait.bpf.h in Python: fed the events a recording holds, in order, it keeps
    what the kernel's maps would hold, and ``snapshot()`` reads them as the kernel reader
    does. Events that passed a replay's filters are taken as the kernel's filters would
    have taken them, and an event's owner as the recording kernel knew it (it may have
    had it from a seed). The socket table is an LRU of ``max_socks`` like the kernel's: a
    socket met again after its entry was evicted, with no owner in its event, counts as
    ``owner_forgotten``. What recordings do not carry (the last send/recv before the FIN,
    the touches after the FIN beyond the kernel's per-socket cap) is not emulated."""

    def __init__(self, max_open: int = 65_536, max_socks: int = 262_144) -> None:
        self.max_open = max_open
        self.max_socks = max_socks
        self._socks: OrderedDict[int, _Sock] = OrderedDict()
        self._open: dict[int, OpenSocket] = {}
        self._owners: dict[OwnerKey, _Owner] = {}
        self._c: dict[str, int] = dict.fromkeys((f.name for f in fields(CwCounters)), 0)
        self._slots = [0] * SLOTS
        self._sum_ns = 0
        self._min_ns: int | None = None
        self._max_ns = 0

    def feed(self, event: SocketEvent) -> None:
        if isinstance(event, Transition):
            self._transition(event)
        elif isinstance(event, Touch):
            self._touch(event)

    def feed_all(self, events: Iterable[SocketEvent]) -> Emulator:
        for event in events:
            self.feed(event)
        return self

    # ---- the socket table (lifecycle.bpf.c) --------------------------------------------

    def _entry(self, e: SocketEvent, touch: bool) -> _Sock:
        """The socket's entry, met now when the table does not hold it (LRU)."""
        sock = self._socks.get(e.skaddr)
        if sock is not None:
            self._socks.move_to_end(e.skaddr)
            return sock
        if e.pid is None:
            self._c["adopted" if touch else "owner_forgotten"] += 1
        return self._put(e.skaddr, _Sock())

    def _put(self, sk: int, sock: _Sock) -> _Sock:
        self._socks[sk] = sock
        self._socks.move_to_end(sk)
        while len(self._socks) > self.max_socks:
            self._socks.popitem(last=False)
        return sock

    def _transition(self, e: Transition) -> None:
        sk = e.skaddr
        if e.old == TcpState.CLOSE or e.new == TcpState.SYN_RECV:
            sock = _Sock(born_ns=e.ts_ns)
            if e.new == TcpState.SYN_SENT:
                sock.origin = _code(e, Op.CONNECT)
            self._reborn(sk)
            self._put(sk, sock)
        else:
            sock = self._entry(e, touch=False)
        if e.pid is not None:
            sock.owner, sock.start_ns = e.owner, e.pid_start_ns or 0
        sock.state = e.new
        if e.old == TcpState.CLOSE_WAIT:
            self._leave(sk, e.new, e.ts_ns)
        if e.new == TcpState.CLOSE_WAIT:
            self._enter(sk, sock, e)
        if e.new == TcpState.CLOSE:
            self._socks.pop(sk, None)

    def _touch(self, e: Touch) -> None:
        sock = self._entry(e, touch=True)
        if e.pid is not None:
            sock.owner, sock.start_ns = e.owner, e.pid_start_ns or 0
        if e.op == Op.ACCEPT:
            sock.origin = _code(e, Op.ACCEPT, e.ret)
        entry = self._open.get(e.skaddr)
        if entry is None or e.op not in (Op.ACCEPT, Op.SEND, Op.RECV):
            return
        self._c["touches"] += 1
        now = _code(e, e.op, e.ret)
        changes: dict[str, object] = {"touches": entry.touches + 1}
        if sock.owner is not None:
            changes.update(owner=sock.owner, owner_start_ns=sock.start_ns)
        if e.op == Op.ACCEPT:
            changes["origin"] = sock.origin
        else:
            # The EOF read (the app learned the peer closed), else the first touch after the
            # FIN, as closewait.bpf.h keeps it.
            eof = e.op == Op.RECV and e.ret == 0 and entry.eof_ns is None
            if entry.post_fin is None or (eof and now.frames):
                changes["post_fin"] = now
            changes["last"] = now._replace(frames=None)
            if eof:
                changes["eof_ns"] = e.ts_ns
        self._open[e.skaddr] = entry._replace(**changes)  # type: ignore[arg-type]

    # ---- CLOSE_WAIT (closewait.bpf.h) ------------------------------------------------

    def _owner(self, owner: Owner | None, start_ns: int) -> _Owner:
        key = OwnerKey(owner.pid if owner else 0, start_ns if owner else 0)
        found = self._owners.get(key)
        if found is None:
            found = self._owners[key] = _Owner(owner.comm if owner else None, owner.cgroup if owner else None)
        return found

    def _enter(self, sk: int, sock: _Sock, e: Transition) -> None:
        self._c["entered"] += 1
        self._owner(sock.owner, sock.start_ns).entered += 1
        self._reborn(sk)
        if len(self._open) >= self.max_open:
            self._c["open_failed"] += 1
            return
        self._open[sk] = OpenSocket(
            skaddr=sk,
            netns=e.netns or 0,
            endpoint=e.endpoint,
            owner=sock.owner,
            owner_start_ns=sock.start_ns,
            entered_ns=e.ts_ns,
            born_ns=sock.born_ns,
            origin=sock.origin,
        )

    def _leave(self, sk: int, new: TcpState, ts_ns: int) -> None:
        entry = self._open.pop(sk, None)
        if entry is None:
            return
        closed = new == TcpState.LAST_ACK
        owner = self._owner(entry.owner, entry.owner_start_ns)
        self._c["closed" if closed else "reset"] += 1
        if closed:
            owner.closed += 1
        else:
            owner.reset += 1
        if entry.preexisting:
            self._c["closed_preexisting" if closed else "reset_preexisting"] += 1
            if closed:
                owner.closed_pre += 1
            else:
                owner.reset_pre += 1
        if not closed or entry.preexisting:
            return
        took = max(0, ts_ns - entry.entered_ns)
        slot = min(slot_of(took), SLOTS - 1)
        self._slots[slot] += 1
        self._sum_ns += took
        self._min_ns = took if self._min_ns is None else min(self._min_ns, took)
        self._max_ns = max(self._max_ns, took)
        owner.slots[slot] += 1
        owner.sum_ns += took
        owner.min_ns = took if owner.min_ns is None else min(owner.min_ns, took)
        owner.max_ns = max(owner.max_ns, took)

    def _reborn(self, sk: int) -> None:
        entry = self._open.pop(sk, None)
        if entry is not None:
            self._c["forgotten"] += 1
            self._owner(entry.owner, entry.owner_start_ns).forgotten += 1

    # ---- reading -----------------------------------------------------------------------

    def snapshot(self, at_ns: int) -> CwSnapshot:
        owners = tuple(
            OwnerCounts(
                pid=key.pid,
                start_ns=key.start_ns,
                comm=o.comm,
                cgroup=o.cgroup,
                entered=o.entered,
                closed=o.closed,
                reset=o.reset,
                forgotten=o.forgotten,
                closed_preexisting=o.closed_pre,
                reset_preexisting=o.reset_pre,
                time_to_close=Log2Histogram.from_slots(o.slots, o.sum_ns, o.max_ns),
                min_close_ns=o.min_ns,
            )
            for key, o in self._owners.items()
        )
        return CwSnapshot(
            at_ns=at_ns,
            counters=CwCounters(**self._c),
            time_to_close=Log2Histogram.from_slots(self._slots, self._sum_ns, self._max_ns),
            min_close_ns=self._min_ns,
            owners=owners,
            open=tuple(self._open.values()),
        )


__all__ = [
    "CodeRef",
    "CwCounters",
    "CwSnapshot",
    "Emulator",
    "OpenSocket",
    "OwnerCounts",
    "OwnerKey",
    "PortsKey",
]
