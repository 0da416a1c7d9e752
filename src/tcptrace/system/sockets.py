"""Snapshots of the host's TCP sockets, in one or every network namespace.

Each namespace is dumped with sock_diag (a netlink socket made inside it, see
``netns.call_in``), and read from ``/proc/PID/net/tcp{,6}`` of a process in it when
sock_diag cannot be used. Every socket carries the inode of its namespace, so equal
4-tuples in two pods stay two sockets.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from tcptrace.errors import TcptraceError
from tcptrace.model.events import TcpState
from tcptrace.system import netns, procnet, sockdiag
from tcptrace.system.netns import NetNamespace
from tcptrace.system.tcpsock import TcpSocket

SOCK_DIAG = "sock_diag"
PROC = "proc"
SOURCES = (SOCK_DIAG, PROC)


@dataclass(frozen=True)
class NamespaceDump:
    """How one namespace was read."""

    netns: NetNamespace
    source: str | None
    """``sock_diag`` or ``proc``; None when neither could read it (``error`` says why)."""
    sockets: int
    at_ns: int
    """CLOCK_MONOTONIC when its sockets had been read."""
    error: str | None = None
    """Why sock_diag was not used (the /proc fallback was), or why nothing was read."""


@dataclass(frozen=True)
class SocketSnapshot:
    """TCP sockets of the namespaces in ``namespaces``, as they were at about ``at_ns``."""

    at_ns: int
    """CLOCK_MONOTONIC once the last namespace had been read."""
    sockets: tuple[TcpSocket, ...]
    namespaces: tuple[NamespaceDump, ...]

    @property
    def complete(self) -> bool:
        """Every namespace asked for was read."""
        return all(d.source is not None for d in self.namespaces)

    def in_state(self, *states: TcpState) -> list[TcpSocket]:
        return [s for s in self.sockets if s.state in states]

    def in_netns(self, inode: int) -> list[TcpSocket]:
        return [s for s in self.sockets if s.netns == inode]


def _proc_paths(where: str, families: Iterable[int]) -> list[str]:
    return [f"{where}/tcp6" if version == 6 else f"{where}/tcp" for version in families]


def _filter(socks: Iterable[TcpSocket], wanted: frozenset[TcpState]) -> list[TcpSocket]:
    if wanted >= sockdiag.ALL_STATES:
        return list(socks)
    return [s for s in socks if s.state in wanted]


def _from_proc(
    ns: NetNamespace, wanted: frozenset[TcpState], families: tuple[int, ...], proc: str
) -> list[TcpSocket]:
    """The namespace's sockets from /proc/PID/net/tcp{,6} of a process still in it."""
    own = netns.own()
    candidates = ["thread-self"] if ns.inode == own else []
    candidates += [str(pid) for pid in ns.pids]
    for who in candidates:
        if netns.of_pid(who, proc) != ns.inode:
            continue
        socks = procnet.read_sockets(_proc_paths(f"{proc}/{who}/net", families))
        # A process that exited meanwhile reads as no sockets: believe only one still there.
        if netns.of_pid(who, proc) == ns.inode:
            return _filter((s._replace(netns=ns.inode) for s in socks), wanted)
    raise TcptraceError(f"no process left in network namespace {ns.inode} to read /proc/PID/net/tcp from")


def _from_sock_diag(
    ns: NetNamespace, wanted: frozenset[TcpState], families: tuple[int, ...]
) -> list[TcpSocket]:
    if ns.inode == netns.own():
        sk = sockdiag.open_socket()
    else:
        sk = netns.call_in(ns, sockdiag.open_socket)
    with sk:
        return sockdiag.dump_on(sk, wanted, families, ns.inode)


def dump_namespace(
    ns: NetNamespace,
    states: Iterable[TcpState] = sockdiag.ALL_STATES,
    families: Iterable[int] = (4, 6),
    sources: Iterable[str] = SOURCES,
    proc: str = "/proc",
) -> tuple[list[TcpSocket], NamespaceDump]:
    """The sockets of one namespace in ``states``, from the first of ``sources`` that works."""
    wanted = frozenset(states)
    fams = tuple(families)
    errors: list[str] = []
    for source in sources:
        try:
            if source == SOCK_DIAG:
                socks = _from_sock_diag(ns, wanted, fams)
            elif source == PROC:
                socks = _from_proc(ns, wanted, fams, proc)
            else:
                raise ValueError(f"unknown source {source!r}")
        except TcptraceError as exc:
            errors.append(str(exc))
            continue
        return socks, NamespaceDump(ns, source, len(socks), time.monotonic_ns(), "; ".join(errors) or None)
    return [], NamespaceDump(ns, None, 0, time.monotonic_ns(), "; ".join(errors) or "no source given")


def snapshot(
    states: Iterable[TcpState] = sockdiag.ALL_STATES,
    namespaces: Iterable[NetNamespace] | None = None,
    families: Iterable[int] = (4, 6),
    sources: Iterable[str] = SOURCES,
    proc: str = "/proc",
) -> SocketSnapshot:
    """TCP sockets in ``states`` of every network namespace on the host (``namespaces`` None),
    or of the given ones.

    A namespace that cannot be read by any source is reported in ``namespaces`` with its
    error, and the snapshot goes on with the others.
    """
    where = netns.namespaces(proc) if namespaces is None else list(namespaces)
    wanted = frozenset(states)
    fams = tuple(families)
    srcs = tuple(sources)
    socks: list[TcpSocket] = []
    dumps: list[NamespaceDump] = []
    for ns in where:
        found, info = dump_namespace(ns, wanted, fams, srcs, proc)
        socks.extend(found)
        dumps.append(info)
    return SocketSnapshot(time.monotonic_ns(), tuple(socks), tuple(dumps))


def own_namespace(
    states: Iterable[TcpState] = sockdiag.ALL_STATES,
    families: Iterable[int] = (4, 6),
    sources: Iterable[str] = SOURCES,
) -> SocketSnapshot:
    """TCP sockets in ``states`` of the calling thread's network namespace."""
    own = netns.own()
    return snapshot(states, [NetNamespace(own)], families, sources)


__all__ = [
    "PROC",
    "SOCK_DIAG",
    "SOURCES",
    "NamespaceDump",
    "SocketSnapshot",
    "dump_namespace",
    "own_namespace",
    "snapshot",
]
