"""The socket table: each socket's state, since when, owner, and code paths.

Fed the decoded event stream in order (live or replayed). Keyed by skaddr, which the kernel
reuses once a socket is freed, so a socket being born (``CLOSE -> *`` or
``LISTEN -> SYN_RECV``) always starts a fresh record: a reused address never inherits an
old socket's owner or code paths. A record is removed when its socket reaches CLOSE.

Code paths come from process-context events only:

- origin: where the socket was accepted (TOUCH ACCEPT) or connected (``CLOSE -> SYN_SENT``);
- last touch: the last process-context operation (accept, connect, send, recv, close).

Pure: no I/O, no bcc.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tcptrace.model.endpoint import NO_ENDPOINT, Endpoint, EndpointFields, Owner, OwnerFields
from tcptrace.model.events import Op, SocketEvent, TcpState, Touch, Transition

DEFAULT_CAPACITY = 262_144  # as TT_MAX_SOCKS: the kernel table's bound


@dataclass(frozen=True)
class CodePath:
    """One process-context operation on a socket and where it came from."""

    op: Op
    ts_ns: int
    task_pid: int
    ret: int = 0
    kstack: tuple[str, ...] = ()
    ustack: tuple[str, ...] = ()

    @property
    def stack(self) -> tuple[str, ...]:
        """The whole stack, innermost first: kernel frames, then the user frames."""
        return self.kstack + self.ustack

    @classmethod
    def of(cls, event: SocketEvent, op: Op, ret: int = 0) -> CodePath:
        return cls(
            op=op,
            ts_ns=event.ts_ns,
            task_pid=event.task_pid,
            ret=ret,
            kstack=event.kstack,
            ustack=event.ustack,
        )


def birth(event: Transition) -> bool:
    """Whether this transition creates a socket (so its skaddr's past is someone else's)."""
    return event.old == TcpState.CLOSE or event.new == TcpState.SYN_RECV


def process_op(event: Transition) -> Op | None:
    """The operation a process-context transition stands for, None for softirq ones."""
    o, n = event.old, event.new
    if o == TcpState.CLOSE and n == TcpState.SYN_SENT:
        return Op.CONNECT
    if o == TcpState.CLOSE and n == TcpState.LISTEN:
        return Op.LISTEN
    if (o, n) in (
        (TcpState.ESTABLISHED, TcpState.FIN_WAIT1),
        (TcpState.CLOSE_WAIT, TcpState.LAST_ACK),
        (TcpState.LISTEN, TcpState.CLOSE),
    ):
        return Op.CLOSE
    return None


_ANY_ADDR = ("0.0.0.0", "::")


@dataclass
class SocketRecord(EndpointFields, OwnerFields):
    """What the model knows about one live socket."""

    skaddr: int
    endpoint: Endpoint = NO_ENDPOINT
    state: TcpState | None = None
    since_ns: int | None = None
    """When it entered ``state``; None when tcptrace did not see it enter."""
    owner: Owner | None = None
    origin: CodePath | None = None
    last_touch: CodePath | None = None
    eof_ns: int | None = None
    """When the app first read EOF (recv returned 0) in CLOSE_WAIT."""
    born_ns: int | None = None
    """When the socket was born; None when it was born before tcptrace saw it."""

    def take_addresses(self, event: SocketEvent) -> None:
        # Touches carry ports but not addresses; never overwrite known ones with blanks.
        # Runs per event: most carry the endpoint the record has, and build nothing.
        ep = self.endpoint
        if (
            event.sport == ep.sport
            and event.dport == ep.dport
            and event.saddr == ep.saddr
            and event.daddr == ep.daddr
            and event.family == ep.family
        ):
            return
        saddr = event.saddr if event.saddr and event.saddr not in _ANY_ADDR or not ep.saddr else ep.saddr
        daddr = event.daddr if event.daddr and event.daddr not in _ANY_ADDR or not ep.daddr else ep.daddr
        sport = event.sport or ep.sport
        dport = event.dport or ep.dport
        if (
            sport != ep.sport
            or dport != ep.dport
            or saddr != ep.saddr
            or daddr != ep.daddr
            or event.family != ep.family
        ):
            self.endpoint = Endpoint(event.family, saddr, sport, daddr, dport)

    def take_owner(self, event: SocketEvent) -> None:
        pid = event.pid
        if pid is None:
            return
        owner = self.owner
        if owner is None or pid != owner.pid:
            self.owner = Owner(pid, event.comm, event.cgroup)
            return
        # Events of some kinds do not carry the cgroup: the same owner keeps the one it had.
        cgroup = owner.cgroup if event.cgroup is None else event.cgroup
        if event.comm != owner.comm or cgroup != owner.cgroup:
            self.owner = Owner(pid, event.comm, cgroup)


class SocketTable:
    """Live sockets by skaddr, bounded like the kernel's LRU table (least recently used go)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._socks: OrderedDict[int, SocketRecord] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._socks)

    def get(self, skaddr: int) -> SocketRecord | None:
        return self._socks.get(skaddr)

    def records(self) -> list[SocketRecord]:
        return list(self._socks.values())

    def _put(self, record: SocketRecord) -> None:
        self._socks[record.skaddr] = record
        self._socks.move_to_end(record.skaddr)
        while len(self._socks) > self.capacity:
            self._socks.popitem(last=False)
            self.evicted += 1

    def feed(self, event: SocketEvent) -> tuple[SocketRecord | None, SocketRecord | None]:
        """Apply one event; returns (the record as it now is, the record it replaced).

        The replaced record is a previous socket at the same skaddr whose end was not seen
        (a lost or filtered CLOSE): callers forget whatever they kept about it.
        After ``-> CLOSE`` the record is returned but no longer in the table.
        """
        if isinstance(event, Transition):
            return self._transition(event)
        if isinstance(event, Touch):
            return self._touch(event), None
        return None, None

    def _transition(self, event: Transition) -> tuple[SocketRecord | None, SocketRecord | None]:
        replaced: SocketRecord | None = None
        record = self._socks.get(event.skaddr)
        if birth(event):
            replaced = record
            record = SocketRecord(skaddr=event.skaddr, born_ns=event.ts_ns)
        elif record is None:
            record = SocketRecord(skaddr=event.skaddr)
        record.take_addresses(event)
        record.take_owner(event)
        op = process_op(event)
        if op is not None:
            path = CodePath.of(event, op)
            if op == Op.CONNECT:
                record.origin = path
            if op != Op.LISTEN:
                record.last_touch = path
        record.state = event.new
        record.since_ns = event.ts_ns
        if event.new == TcpState.CLOSE:
            self._socks.pop(event.skaddr, None)
        else:
            self._put(record)
        return record, replaced

    def _touch(self, event: Touch) -> SocketRecord:
        # The kernel emits a touch only for a socket its table holds, i.e. a live one, so
        # a touch may create a record (the model's table can miss what a filter dropped).
        record = self._socks.get(event.skaddr)
        if record is None:
            record = SocketRecord(skaddr=event.skaddr)
        record.take_addresses(event)
        record.take_owner(event)
        path = CodePath.of(event, event.op, event.ret)
        if event.op in (Op.ACCEPT, Op.CONNECT):
            record.origin = path
        record.last_touch = path
        if event.op == Op.RECV and event.ret == 0 and record.eof_ns is None:
            record.eof_ns = event.ts_ns
        self._put(record)
        return record
