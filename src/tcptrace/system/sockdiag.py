"""TCP sockets of a network namespace from the kernel's sock_diag netlink interface (what ``ss`` uses).

One ``SOCK_DIAG_BY_FAMILY`` dump request per address family (``struct inet_diag_req_v2``
with the kernel's state bitmask, so asking for CLOSE_WAIT returns only those), answered
with one ``struct inet_diag_msg`` per socket. This is ~10x cheaper than formatting and
parsing /proc/net/tcp{,6}, and the state filter is applied in the kernel.

Hand-rolled with ``socket`` and ``struct``: the protocol is two fixed structs and one
attribute, and a generic netlink library builds an object per message and attribute,
which at 50k sockets is most of the time budget.

A netlink socket lists the sockets of the network namespace it was made in; to dump
another namespace, make the netlink socket there (``netns.call_in``) and dump from here.

Layouts (include/uapi/linux/inet_diag.h; ``=`` native, ``>`` network byte order)::

    nlmsghdr          =IHHII   len, type, flags, seq, pid                          16 B
    inet_diag_req_v2  =BBBBI   family, protocol, ext, pad, states; then a sockid   56 B
    inet_diag_sockid  >HH16s16s sport, dport, src, dst; =III if, cookie[2]         48 B
    inet_diag_msg     =BBBB    family, state, timer, retrans; sockid;
                      =IIIII   expires, rqueue, wqueue, uid, inode                 72 B
    rtattr            =HH      len, type; then the value, padded to 4 bytes
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from tcptrace.errors import TcptraceError
from tcptrace.model.events import TcpState
from tcptrace.system.tcpsock import TcpSocket, format_ip

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_DUMP_INTR = 0x10
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_CGROUP_ID = 21
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

ALL_STATES = frozenset(TcpState)
"""Every state /proc/net/tcp lists (request sockets come as SYN_RECV, as there)."""

_NLMSGHDR = struct.Struct("=IHHII")
_REQ_V2 = struct.Struct("=BBBBI48x")  # the sockid stays zero: no single-socket lookup
# nlmsghdr + inet_diag_msg in one call: family, state; ports (network order, swapped below);
# src, dst; cookie; rqueue, wqueue, uid, inode (timer, retrans, ifindex, expires skipped)
_NLMSG_DIAG = struct.Struct("=IHHIIBB2xHH16s16s4xII4xIIII")
_SWAP_PORTS = sys.byteorder == "little"
_RTATTR = struct.Struct("=HH")
_U64 = struct.Struct("=Q")
_CGROUP_RTA = struct.Struct("=HHQ")
_CGROUP_ATTR = (12, INET_DIAG_CGROUP_ID)
_HDR_LEN = _NLMSGHDR.size
_DIAG_LEN = _NLMSG_DIAG.size  # 16 + 72
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_BY_VALUE = {int(s): s for s in TcpState}
_STATES: tuple[TcpState | None, ...] = tuple(_BY_VALUE.get(i) for i in range(256))
_RECV_SIZE = 1 << 16  # the kernel fills at most ~32 KiB per dump message batch


P = TypeVar("P")


class SockDiagError(TcptraceError):
    """sock_diag is not usable here (no netlink, no inet_diag module, refused) or answered
    something that is not a dump of TCP sockets."""


@dataclass(frozen=True)
class DumpStats:
    """What one dump cost the kernel and us: messages, bytes read, dumps retried."""

    sockets: int
    bytes: int
    retries: int


def state_mask(states: Iterable[TcpState]) -> int:
    """The kernel's state bitmask (``1 << state``) for ``states``.

    Asking for SYN_RECV also asks for NEW_SYN_RECV: request sockets, which the kernel
    (like /proc/net/tcp) reports as SYN_RECV.

    >>> hex(state_mask([TcpState.CLOSE_WAIT]))
    '0x100'
    >>> hex(state_mask([TcpState.LISTEN]))
    '0x400'
    >>> hex(state_mask([TcpState.SYN_RECV]))
    '0x1008'
    >>> hex(state_mask(ALL_STATES))
    '0x1ffe'
    """
    mask = 0
    for state in states:
        mask |= 1 << int(state)
        if state == TcpState.SYN_RECV:
            mask |= 1 << int(TcpState.NEW_SYN_RECV)
    return mask


def build_request(family: int, states: Iterable[TcpState], seq: int = 1) -> bytes:
    """A dump request for TCP sockets of ``family`` (AF_INET or AF_INET6) in ``states``.

    >>> req = build_request(socket.AF_INET, [TcpState.CLOSE_WAIT])
    >>> len(req), req[:8].hex(), req[16:24].hex()
    (72, '4800000014000103', '0206000000010000')
    """
    body = _REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 0, state_mask(states))
    return (
        _NLMSGHDR.pack(_HDR_LEN + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body
    )


class BatchEnd(enum.IntEnum):
    """How a batch of dump messages ends."""

    MORE = 0
    """The dump goes on in the next batch."""
    DONE = 1
    """NLMSG_DONE: the dump is complete."""
    INTERRUPTED = 2
    """NLMSG_DONE with NLM_F_DUMP_INTR: the kernel's tables changed while it ran, so the
    dump may miss or repeat sockets."""


def parse_batch(buf: bytes | bytearray | memoryview, out: list[TcpSocket], netns: int = 0) -> BatchEnd:
    """Append the sockets of one batch of dump messages (what one recv() returns) to ``out``.

    Says whether the dump goes on; raises SockDiagError for an error message. ``netns`` is
    stamped on every socket (the kernel does not say: it is the namespace the netlink
    socket was made in). On a little-endian host:

    >>> msg = bytes.fromhex(
    ...     "64000000140002000100000000000000"          # nlmsghdr: 100 bytes, a socket
    ...     "020a00001f900000" "7f000001" + "00" * 12 +  # AF_INET, LISTEN; 8080; 127.0.0.1
    ...     "00" * 16 + "00000000" "2a000000" "00000000"  # no peer; ifindex; cookie 42
    ...     "00000000" "00000000" "80000000" "e8030000" "39300000"  # wqueue 128, uid 1000, inode 12345
    ...     "0c001500" "0200000000000000")              # INET_DIAG_CGROUP_ID 2
    >>> out = []
    >>> parse_batch(msg, out, netns=4026531840).name
    'MORE'
    >>> [s] = out
    >>> (s.family, s.saddr, s.sport, s.daddr, s.dport, s.state.name, s.uid, s.inode, s.cookie)
    (4, '127.0.0.1', 8080, '0.0.0.0', 0, 'LISTEN', 1000, 12345, 42)
    >>> (s.netns, s.rqueue, s.wqueue, s.cgroup_id)
    (4026531840, 0, 128, 2)
    """
    view = memoryview(buf)
    end = len(view)
    off = 0
    full_unpack = _NLMSG_DIAG.unpack_from
    cg_unpack = _CGROUP_RTA.unpack_from
    v4, v6 = _V4, _V6
    states = _STATES
    swap = _SWAP_PORTS
    new = tuple.__new__
    cls = TcpSocket
    if len(_V4) + len(_V6) > _ADDRESSES_MAX:
        _V4.clear()
        _V6.clear()
    append = out.append
    while off + _HDR_LEN <= end:
        if off + _DIAG_LEN > end:
            return _control(view, off, end)
        length, kind, _fl, _sq, _pd, fam, st, sp, dp, src, dst, c0, c1, rq, wq, uid, inode = full_unpack(
            view, off
        )
        if kind != SOCK_DIAG_BY_FAMILY or length < _DIAG_LEN or off + length > end:
            return _control(view, off, end)
        state = states[st]
        if fam == _AF_INET:
            version, cache = 4, v4
        elif fam == _AF_INET6:
            version, cache = 6, v6
        else:
            raise SockDiagError(f"sock_diag: a socket of address family {fam}")
        if state is None:
            raise SockDiagError(f"sock_diag: a socket in state {st}")
        saddr = cache.get(src) or _remember(cache, src, version)
        daddr = cache.get(dst) or _remember(cache, dst, version)
        if swap:
            sp = ((sp & 0xFF) << 8) | (sp >> 8)
            dp = ((dp & 0xFF) << 8) | (dp >> 8)
        # A full socket's attributes come as SHUTDOWN, MARK (with CAP_NET_ADMIN), CGROUP_ID,
        # SOCKOPT: look where CGROUP_ID usually is, then walk; a timewait socket has none.
        cgroup_id = None
        if length >= _DIAG_LEN + 12:
            a = off + _DIAG_LEN + 16
            if a + 12 <= off + length and (at := cg_unpack(view, a))[:2] == _CGROUP_ATTR:
                cgroup_id = at[2]
            else:
                cgroup_id = _find_cgroup(view, off + _DIAG_LEN, off + length)
        cookie = None if c0 == INET_DIAG_NOCOOKIE and c1 == INET_DIAG_NOCOOKIE else c0 | (c1 << 32)
        # tuple.__new__ skips the NamedTuple's Python-level __new__: a third of the cost
        append(new(cls, (version, saddr, sp, daddr, dp, state, uid, inode, netns, cookie, rq, wq, cgroup_id)))
        off += (length + 3) & ~3
    return BatchEnd.MORE


def _remember(cache: dict[bytes, str], raw: bytes, version: int) -> str:
    text = cache[raw] = format_ip(raw, version)
    return text


def _find_cgroup(view: memoryview, a: int, stop: int) -> int | None:
    """The INET_DIAG_CGROUP_ID value among the attributes from ``a`` to ``stop``."""
    while a + 4 <= stop:
        alen, atype = _RTATTR.unpack_from(view, a)
        if atype == INET_DIAG_CGROUP_ID:
            return int(_U64.unpack_from(view, a + 4)[0]) if alen >= 12 and a + 12 <= stop else None
        if alen < 4:
            return None
        a += (alen + 3) & ~3
    return None


def _control(view: memoryview, off: int, end: int) -> BatchEnd:
    """The message at ``off`` that is not a socket: the end of the dump, or an error."""
    length, kind, flags, _seq, _pid = _NLMSGHDR.unpack_from(view, off)
    if length < _HDR_LEN or off + length > end:
        raise SockDiagError(f"sock_diag: truncated message ({length} bytes at offset {off} of {end})")
    if kind == NLMSG_DONE:
        return BatchEnd.INTERRUPTED if flags & NLM_F_DUMP_INTR else BatchEnd.DONE
    if kind == NLMSG_ERROR:
        code = -struct.unpack_from("=i", view, off + _HDR_LEN)[0] if length >= _HDR_LEN + 4 else 0
        if code == 0:
            raise SockDiagError("sock_diag: the kernel acknowledged the request instead of dumping")
        raise SockDiagError(f"sock_diag: the kernel refused the dump: {os.strerror(code)}", _hint(code))
    raise SockDiagError(f"sock_diag: unexpected message type {kind} ({length} bytes)")


# Addresses formatted once each: local addresses repeat on every socket. One cache per
# family: the 16 raw bytes of 128.0.0.1 (zero-padded) are also those of 8000:1::.
_V4: dict[bytes, str] = {}
_V6: dict[bytes, str] = {}
_ADDRESSES_MAX = 1 << 16


def _hint(code: int) -> str:
    if code in (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT):
        return "the kernel has no inet_diag/tcp_diag (modprobe tcp_diag); /proc/net/tcp is read instead"
    if code in (errno.EPERM, errno.EACCES):
        return "sock_diag was refused (a security policy?); /proc/net/tcp is read instead"
    return ""


def open_socket() -> socket.socket:
    """A NETLINK_SOCK_DIAG socket, in the network namespace of the calling thread."""
    try:
        sk = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    except OSError as exc:
        raise SockDiagError(
            f"sock_diag: cannot open a netlink socket: {exc.strerror}", _hint(exc.errno or 0)
        ) from None
    try:
        sk.bind((0, 0))
    except OSError as exc:
        sk.close()
        raise SockDiagError(f"sock_diag: cannot bind a netlink socket: {exc.strerror}") from None
    return sk


def dump_on(
    sk: socket.socket,
    states: Iterable[TcpState] = ALL_STATES,
    families: Iterable[int] = (4, 6),
    netns: int = 0,
    stats: list[DumpStats] | None = None,
) -> list[TcpSocket]:
    """Every TCP socket of ``sk``'s network namespace in ``states``, of ``families`` (4, 6).

    A dump the kernel marks as interrupted (its tables changed under it) is retried, at most
    twice; ``stats``, when given, receives one DumpStats.
    """
    parts: list[list[TcpSocket]]
    parts, total_bytes, retries = _dump(
        sk, frozenset(states), families, list, lambda batch, part: parse_batch(batch, part, netns)
    )
    out = [s for part in parts for s in part] if len(parts) != 1 else parts[0]
    if stats is not None:
        stats.append(DumpStats(len(out), total_bytes, retries))
    return out


def count_states_on(
    sk: socket.socket, states: Iterable[TcpState] = ALL_STATES, families: Iterable[int] = (4, 6)
) -> dict[TcpState, int]:
    """How many sockets of ``sk``'s namespace are in each of ``states`` (those with none left
    out): the same dump as ``dump_on`` with nothing read but each socket's state, for a
    per-state gauge at a fraction of the cost."""
    parts, _, _ = _dump(sk, frozenset(states), families, lambda: [0] * 256, count_batch)
    return {s: n for s in TcpState if (n := sum(part[int(s)] for part in parts))}


def count_batch(buf: bytes | bytearray | memoryview, counts: list[int]) -> BatchEnd:
    """Add the states of one batch of dump messages to ``counts`` (indexed by state number).

    >>> counts = [0] * 256
    >>> count_batch(bytes.fromhex("64000000140002000100000000000000" "020a") + bytes(82), counts).name
    'MORE'
    >>> counts[10]
    1
    """
    view = memoryview(buf)
    end = len(view)
    off = 0
    hdr_unpack = _NLMSGHDR.unpack_from
    while off + _HDR_LEN <= end:
        length, kind = hdr_unpack(view, off)[:2]
        if kind != SOCK_DIAG_BY_FAMILY or length < _DIAG_LEN or off + length > end:
            return _control(view, off, end)
        counts[view[off + _HDR_LEN + 1]] += 1
        off += (length + 3) & ~3
    return BatchEnd.MORE


def _dump(
    sk: socket.socket,
    states: frozenset[TcpState],
    families: Iterable[int],
    new_part: Callable[[], P],
    consume: Callable[[memoryview, P], BatchEnd],
) -> tuple[list[P], int, int]:
    """One dump per family, each batch handed to ``consume`` with the family's part (a fresh
    one when an interrupted dump is retried): (parts, bytes read, retries)."""
    parts: list[P] = []
    total_bytes = 0
    retries = 0
    for seq, version in enumerate(families, 1):
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        for attempt in range(3):
            part = new_part()
            try:
                sk.send(build_request(family, states, seq))
            except OSError as exc:
                raise SockDiagError(f"sock_diag: cannot send the dump request: {exc.strerror}") from None
            end = BatchEnd.MORE
            for batch in _batches(sk):
                total_bytes += len(batch)
                end = consume(batch, part)
                if end != BatchEnd.MORE:
                    break
            if end == BatchEnd.MORE:
                raise SockDiagError("sock_diag: the dump ended without NLMSG_DONE")
            if end == BatchEnd.DONE or attempt == 2:
                parts.append(part)
                break
            retries += 1
    return parts, total_bytes, retries


def _batches(sk: socket.socket) -> Iterator[memoryview]:
    buf = bytearray(_RECV_SIZE)
    view = memoryview(buf)
    while True:
        try:
            n = sk.recv_into(buf)
        except InterruptedError:
            continue
        except OSError as exc:
            raise SockDiagError(
                f"sock_diag: cannot read the dump: {exc.strerror}", _hint(exc.errno or 0)
            ) from None
        if n == 0:
            return
        yield view[:n]


def dump(
    states: Iterable[TcpState] = ALL_STATES, families: Iterable[int] = (4, 6), netns: int = 0
) -> list[TcpSocket]:
    """Every TCP socket of the calling thread's network namespace in ``states``.

    ``netns`` is stamped on the sockets (``netns.own()`` is the calling thread's namespace).
    Raises SockDiagError when sock_diag cannot be used; the caller falls back to /proc.
    """
    with open_socket() as sk:
        return dump_on(sk, states, families, netns)


__all__ = [
    "ALL_STATES",
    "BatchEnd",
    "DumpStats",
    "SockDiagError",
    "build_request",
    "count_batch",
    "count_states_on",
    "dump",
    "dump_on",
    "open_socket",
    "parse_batch",
    "state_mask",
]
