"""Events as the model sees them: named, typed, frozen, and round-tripped through JSON.

The kernel sends raw numbers (``struct tt_event`` in bpf/tcptrace.h); this module names
them. Decoding takes any object with the C field names as attributes (bcc's ctypes
structure in production, a ``SimpleNamespace`` in tests), so it needs no bcc.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tcptrace.model.endpoint import Endpoint, Owner, owner_of

AF_INET = 2
AF_INET6 = 10


class TcpState(enum.IntEnum):
    """TCP states, numbered as in include/net/tcp_states.h, named without the TCP_ prefix."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12

    @classmethod
    def parse(cls, value: str | int) -> TcpState:
        """``"close-wait"``, ``"CLOSE_WAIT"``, ``"TCP_CLOSE_WAIT"`` and ``8`` all give CLOSE_WAIT."""
        if isinstance(value, int):
            return cls(value)
        name = value.strip().upper().replace("-", "_")
        if name.startswith("TCP_"):
            name = name[4:]
        try:
            return cls[name]
        except KeyError:
            raise ValueError(f"unknown TCP state {value!r}") from None


# The order states are shown in (the ones users ask about first).
STATE_ORDER = (
    TcpState.ESTABLISHED,
    TcpState.CLOSE_WAIT,
    TcpState.TIME_WAIT,
    TcpState.LISTEN,
    TcpState.SYN_SENT,
    TcpState.SYN_RECV,
    TcpState.FIN_WAIT1,
    TcpState.FIN_WAIT2,
    TcpState.CLOSING,
    TcpState.LAST_ACK,
)


class Kind(enum.IntEnum):
    """``tt_event.kind``: TT_KIND_* in bpf/tcptrace.h."""

    TRANSITION = 1
    TOUCH = 2
    TIMEWAIT = 3
    CLOSE = 4


class Op(enum.IntEnum):
    """``tt_event.op`` of TOUCH events: TT_OP_* in bpf/tcptrace.h."""

    NONE = 0
    CONNECT = 1
    ACCEPT = 2
    SEND = 3
    RECV = 4
    CLOSE = 5
    SHUTDOWN = 6
    LISTEN = 7
    CLOSE_RANGE = 8


# Cached (bounded): decoding runs per event, and a host has few distinct addresses and comms;
# ipaddress costs ~2.8 us a call, a cache hit ~0.1 (scripts/bench, per-event table).
@functools.lru_cache(maxsize=4096)
def format_addr(raw: bytes, family: int) -> str:
    """Text form of a tracepoint address field.

    >>> format_addr(bytes([127, 0, 0, 1]) + bytes(12), AF_INET)
    '127.0.0.1'
    >>> format_addr(bytes(15) + b"\\x01", AF_INET6)
    '::1'
    """
    if family == AF_INET:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    return ipv6_text(bytes(raw[:16]))


def ipv6_text(packed: bytes) -> str:
    """An IPv6 address as ``ss`` (glibc's inet_ntop) writes it: an IPv4-mapped one, what a
    dual-stack server sees of IPv4 clients, in dotted form (Python 3.11's ipaddress writes
    ``::ffff:7f00:1``). The one rule for every address tcptrace shows or records.

    >>> ipv6_text(bytes(10) + bytes([255, 255, 127, 0, 0, 1])), ipv6_text(bytes(15) + bytes([1]))
    ('::ffff:127.0.0.1', '::1')
    """
    address = ipaddress.IPv6Address(packed)
    mapped = address.ipv4_mapped
    return f"::ffff:{mapped}" if mapped is not None else str(address)


@functools.lru_cache(maxsize=4096)
def canonical_addr(text: str) -> str:
    """An address read back from a recording, written as tcptrace writes it now (recordings
    made before wrote IPv4-mapped addresses as ``::ffff:7f00:1``); anything else unchanged.

    >>> canonical_addr("::ffff:7f00:1"), canonical_addr("10.0.0.1"), canonical_addr("fe80::1")
    ('::ffff:127.0.0.1', '10.0.0.1', 'fe80::1')
    """
    if not text.startswith("::ffff:") or "." in text:
        return text
    try:
        return ipv6_text(ipaddress.IPv6Address(text).packed)
    except ValueError:
        return text


@functools.lru_cache(maxsize=4096)
def decode_comm(raw: bytes) -> str:
    """A task comm as text: up to the first NUL; bytes that are not UTF-8 kept as ``\\xNN``."""
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def family_version(family: int) -> int:
    """4 or 6 for AF_INET or AF_INET6."""
    return 6 if family == AF_INET6 else 4


@dataclass(frozen=True, kw_only=True)
class SocketEvent:
    """What every event about one socket carries.

    ``family``, the addresses and the ports are the socket's ``endpoint``, flat as the kernel
    sends them. ``pid``/``comm``/``cgroup`` are its ``owner`` as learned in process context
    (None when not learned); ``task_pid``/``task_comm`` are whatever task the kernel was
    running, which in softirq is unrelated to the socket.
    """

    ts_ns: int
    skaddr: int
    family: int = 4
    saddr: str = ""
    sport: int = 0
    daddr: str = ""
    dport: int = 0
    pid: int | None = None
    comm: str | None = None
    task_pid: int = 0
    task_tid: int = 0
    task_comm: str = ""
    cgroup: int | None = None
    """The owner's cgroup v2 id where it was learned (None when not learned with it)."""
    netns: int | None = None
    """The socket's network namespace: the inode /proc/PID/ns/net names (None: unknown)."""
    pid_start_ns: int | None = None
    """When the owner process started (ns since boot, as /proc/PID/stat's starttime in
    ticks): with ``pid``, who the owner is even after the pid is reused."""
    kstack: tuple[str, ...] = ()
    ustack: tuple[str, ...] = ()
    kstack_id: int = field(default=-1, compare=False, repr=False)
    ustack_id: int = field(default=-1, compare=False, repr=False)

    @property
    def ports(self) -> tuple[int, int]:
        return (self.sport, self.dport)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.family, self.saddr, self.sport, self.daddr, self.dport)

    @property
    def owner(self) -> Owner | None:
        return owner_of(self.pid, self.comm, self.cgroup)


@dataclass(frozen=True, kw_only=True)
class Transition(SocketEvent):
    """One TCP state change (sock:inet_sock_set_state)."""

    old: TcpState
    new: TcpState
    prev_ns: int | None = None
    """Time spent in ``old``; None when tcptrace did not see the socket enter it."""
    sk_flags: int = 0


@dataclass(frozen=True, kw_only=True)
class Touch(SocketEvent):
    """A process-context operation on a TCP socket (connect, accept, send, recv, close, ...)."""

    op: Op
    ret: int = 0


Event = SocketEvent


class CloseFlag(enum.IntFlag):
    """``tt_event.flags`` of CLOSE events: TT_CLOSE_* in bpf/tcptrace.h."""

    RESET = 1
    LINGERED = 2
    LATE_CLOSE_WAIT = 4


@dataclass(frozen=True, kw_only=True)
class CloseCall(SocketEvent):
    """A close()/shutdown()/close_range() on a TCP socket that a human must see (closelat).

    ``pid``/``comm`` is the calling process. ``state`` is the socket's state when the
    call began and ``in_state_ns`` how long it had been in it (None when unknown).
    """

    op: Op
    duration_ns: int
    flags: CloseFlag = CloseFlag(0)
    state: TcpState | None = None
    in_state_ns: int | None = None
    sk_flags: int = 0
    ret: int = 0


class TwWhat(enum.IntEnum):
    """``tt_event.op`` of TIMEWAIT events: TT_TW_* in bpf/tcptrace.h."""

    CREATED = 1
    CONVERTED = 2
    PARKED_ENDED = 3
    RESET_SENT = 4
    RESET_RECEIVED = 5
    KILLED = 6


TW_HOW = {1: "fin", 2: "timer"}
TW_FLAG_BOUND = 1
"""Bit of ``tt_event.flags`` of TIMEWAIT events: the local port was bound (TT_TWF_BOUND)."""


@dataclass(frozen=True, kw_only=True)
class TimeWaitEvent(SocketEvent):
    """A timewait socket's life, or an RST (timewait.bpf.c). ``skaddr`` is the tw socket.

    CREATED: a tw replaced a full socket, ``substate`` TIME_WAIT (a TIME_WAIT creation) or
    FIN_WAIT2 (an orphaned FIN_WAIT2 socket parked, not TIME_WAIT yet). CONVERTED: a parked
    tw got the peer's FIN and is TIME_WAIT now, seen when the FIN arrived (``how`` "fin") or
    only later at its timer ("timer"). PARKED_ENDED: a parked tw died in FIN_WAIT2.
    KILLED: a counted TIME_WAIT tw ended before its 60 s (port reuse, a SYN, an RST).
    RESET_SENT/RESET_RECEIVED: an RST on a socket in state ``substate``. ``age_ns``: time
    since the tw was created. ``pid``/``comm``: the socket's owner, for a tw the process
    that closed first. ``port_bound``: the tw's local port was bound by its application (a
    server's), not chosen by connect(); None for resets (and in older recordings).
    """

    what: TwWhat
    substate: TcpState | None = None
    created_as: TcpState | None = None
    age_ns: int | None = None
    how: str | None = None
    port_bound: bool | None = None


_TYPES: dict[str, type[SocketEvent]] = {
    "transition": Transition,
    "touch": Touch,
    "close": CloseCall,
    "timewait": TimeWaitEvent,
}
_TYPE_NAMES = {cls: name for name, cls in _TYPES.items()}
EVENT_TYPES = frozenset(_TYPES)
"""The JSON ``type`` names of events (other objects of a recording are reports)."""


def _common_from_raw(raw: Any) -> dict[str, Any]:
    family = int(raw.family)
    owner = int(raw.owner_tgid)
    return {
        "ts_ns": int(raw.ts_ns),
        "skaddr": int(raw.skaddr),
        "family": family_version(family),
        "saddr": format_addr(bytes(raw.saddr), family),
        "sport": int(raw.sport),
        "daddr": format_addr(bytes(raw.daddr), family),
        "dport": int(raw.dport),
        "pid": owner or None,
        "comm": decode_comm(bytes(raw.owner_comm)) if owner else None,
        "task_pid": int(raw.task_tgid),
        "task_tid": int(raw.task_pid),
        "task_comm": decode_comm(bytes(raw.task_comm)),
        "cgroup": int(getattr(raw, "owner_cgroup", 0)) or None,
        "netns": int(getattr(raw, "netns", 0)) or None,
        "pid_start_ns": (int(getattr(raw, "owner_start_ns", 0)) or None) if owner else None,
        "kstack_id": int(raw.kstack),
        "ustack_id": int(raw.ustack),
    }


def _transition_from_raw(raw: Any) -> Transition:
    return Transition(
        **_common_from_raw(raw),
        old=TcpState(raw.oldstate),
        new=TcpState(raw.newstate),
        prev_ns=int(raw.value_ns) or None,
        sk_flags=int(raw.sk_flags),
    )


def _touch_from_raw(raw: Any) -> Touch:
    return Touch(**_common_from_raw(raw), op=Op(raw.op), ret=int(raw.ret))


def _close_from_raw(raw: Any) -> CloseCall:
    state = int(raw.oldstate)
    return CloseCall(
        **_common_from_raw(raw),
        op=Op(raw.op),
        duration_ns=int(raw.value_ns),
        flags=CloseFlag(int(raw.flags) & 7),
        state=TcpState(state) if state else None,
        in_state_ns=int(raw.aux_ns) or None,
        sk_flags=int(raw.sk_flags),
        ret=int(raw.ret),
    )


def _timewait_from_raw(raw: Any) -> TimeWaitEvent:
    what = TwWhat(raw.op)
    new, old = int(raw.newstate), int(raw.oldstate)
    is_tw = what in (TwWhat.CREATED, TwWhat.CONVERTED, TwWhat.PARKED_ENDED, TwWhat.KILLED)
    return TimeWaitEvent(
        **_common_from_raw(raw),
        what=what,
        substate=TcpState(new) if new else None,
        created_as=TcpState(old) if old and is_tw else None,
        age_ns=int(raw.value_ns) or None,
        how=TW_HOW.get(int(raw.ret)),
        port_bound=bool(int(raw.flags) & TW_FLAG_BOUND) if is_tw else None,
    )


RAW_DECODERS: dict[int, Callable[[Any], SocketEvent]] = {
    Kind.TRANSITION: _transition_from_raw,
    Kind.TOUCH: _touch_from_raw,
    Kind.CLOSE: _close_from_raw,
    Kind.TIMEWAIT: _timewait_from_raw,
}


class DecodeError(ValueError):
    """A raw event that names no known kind, state or op."""


def from_raw(raw: Any) -> SocketEvent:
    """Name a raw ``struct tt_event``; DecodeError when a number is out of range."""
    decoder = RAW_DECODERS.get(int(raw.kind))
    if decoder is None:
        raise DecodeError(f"unknown event kind {int(raw.kind)}")
    try:
        return decoder(raw)
    except ValueError as exc:
        raise DecodeError(str(exc)) from exc


_JSON_FIELDS: dict[type, tuple[str, ...]] = {}
_OPTIONAL = frozenset({"cgroup", "netns", "pid_start_ns", "port_bound"})  # left out of JSON when unknown
_PLAIN = (int, str, type(None))  # exact types: enums (int subclasses) are named below


def to_json(event: SocketEvent) -> dict[str, Any]:
    """A JSON-ready dict: states and ops by name, skaddr in hex, stacks as lists.

    Runs once per event of `states --json` and `record`: field names are looked up once
    per class, and plain values skip the enum checks (8.5 -> 4 us an event, scripts/bench).
    """
    cls = type(event)
    names = _JSON_FIELDS.get(cls)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(event) if f.name not in ("kstack_id", "ustack_id"))
        _JSON_FIELDS[cls] = names
    out: dict[str, Any] = {"type": _TYPE_NAMES[cls]}
    for name in names:
        value = getattr(event, name)
        if value is None and name in _OPTIONAL:
            continue  # recordings made before these fields existed stay byte-identical
        if name == "skaddr":
            value = f"0x{value:x}"
        elif type(value) in _PLAIN:
            pass
        elif isinstance(value, enum.Flag):  # a list of names, [] when none
            value = [m.name for m in type(value) if m in value]
        elif isinstance(value, enum.Enum):
            value = value.name
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def from_json(obj: Mapping[str, Any]) -> SocketEvent:
    """The inverse of to_json. KeyError, ValueError or TypeError on a malformed object."""
    cls = _TYPES[obj["type"]]
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in obj.items():
        if key == "type" or key not in names:
            continue
        if key == "skaddr":
            value = int(value, 16) if isinstance(value, str) else int(value)
        elif key in ("saddr", "daddr") and isinstance(value, str):
            value = canonical_addr(value)
        elif key in ("old", "new") or (key == "state" and value is not None):
            value = TcpState.parse(value)
        elif key in ("substate", "created_as") and value is not None:
            value = TcpState.parse(value)
        elif key == "what":
            value = TwWhat[value] if isinstance(value, str) else TwWhat(value)
        elif key == "flags":
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise TypeError("flags must be a list of names")
            value = CloseFlag(sum(CloseFlag[x] for x in value))
        elif key == "op":
            value = Op[value] if isinstance(value, str) else Op(value)
        elif key in ("kstack", "ustack"):
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise TypeError(f"{key} must be a list of strings")
            value = tuple(value)
        kwargs[key] = value
    event = cls(**kwargs)
    _check_types(event)
    return event


def _check_types(event: SocketEvent) -> None:
    for name in ("ts_ns", "skaddr", "sport", "dport", "family", "task_pid"):
        if not isinstance(getattr(event, name), int):
            raise TypeError(f"{name} must be an integer")
    for name in ("pid", "cgroup", "netns", "pid_start_ns"):
        value = getattr(event, name)
        if value is not None and not isinstance(value, int):
            raise TypeError(f"{name} must be an integer or null")
    bound = getattr(event, "port_bound", None)
    if bound is not None and not isinstance(bound, bool):
        raise TypeError("port_bound must be true, false or null")
