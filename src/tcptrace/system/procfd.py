"""Socket inodes under /proc/PID/fd: which processes hold which sockets.

A socket's fd links to ``socket:[INODE]``; the inode is the one /proc/net/tcp shows. A
socket shared by several processes (fork, fd passing) has several holders.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tcptrace.model.closewait import Preexisting
from tcptrace.model.events import SocketEvent, TcpState
from tcptrace.model.filters import EventFilter
from tcptrace.system import cgroups
from tcptrace.system.procnet import ProcSocket, in_state

_SOCKET_LINK = re.compile(r"^socket:\[(\d+)\]$")


@dataclass(frozen=True)
class Holder:
    pid: int
    comm: str
    fd: int


def socket_inode(link: str) -> int | None:
    """The inode of a ``socket:[INODE]`` fd link, None for anything else.

    >>> socket_inode("socket:[34567]")
    34567
    >>> socket_inode("/dev/null") is None
    True
    """
    m = _SOCKET_LINK.match(link)
    return int(m.group(1)) if m else None


def read_comm(pid: int, proc: str = "/proc") -> str:
    try:
        with open(f"{proc}/{pid}/comm", encoding="utf-8", errors="backslashreplace") as fh:
            return fh.read().rstrip("\n")
    except OSError:
        return ""


def holders(inodes: Iterable[int], proc: str = "/proc") -> dict[int, list[Holder]]:
    """For each wanted inode, the processes (pid, comm, fd) that hold it.

    Processes that exit while being read, or whose fds we may not read, are skipped:
    their sockets then have no holder (reported as unknown owner).
    """
    wanted = set(inodes)
    found: dict[int, list[Holder]] = {}
    if not wanted:
        return found
    try:
        pids = [int(name) for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return found
    for pid in sorted(pids):
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        comm: str | None = None
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            inode = socket_inode(link)
            if inode is None or inode not in wanted:
                continue
            if comm is None:
                comm = read_comm(pid, proc)
            found.setdefault(inode, []).append(Holder(pid=pid, comm=comm, fd=int(fd)))
    return found


def closewait_ports(flt: EventFilter | None = None) -> set[tuple[int, int]]:
    """(local port, remote port) of the sockets in CLOSE_WAIT now that pass the port and
    family filters (owners are not looked up: that needs a walk of every /proc/PID/fd)."""
    flt = flt or EventFilter()
    owner_free = EventFilter(ports=flt.ports, family=flt.family)
    return {
        (s.sport, s.dport)
        for s in in_state(TcpState.CLOSE_WAIT)
        if _as_event(s, None, None, owner_free) is not None
    }


def closewait_snapshot(
    flt: EventFilter | None = None, only: set[tuple[int, int]] | None = None
) -> list[Preexisting]:
    """Sockets in CLOSE_WAIT now (/proc/net/tcp{,6}) with the process holding each one.

    A socket several processes hold (fork, fd passing) is reported with the first holder
    that passes ``flt``, else the lowest pid; one no process holds has an unknown owner.
    Filtered like the kernel filters events: by port, family, and owner; with ``only``,
    just the sockets with those (local port, remote port).
    """
    flt = flt or EventFilter()
    socks = in_state(TcpState.CLOSE_WAIT)
    if only is not None:
        socks = [s for s in socks if (s.sport, s.dport) in only]
    owners = holders(s.inode for s in socks if s.inode)
    out: list[Preexisting] = []
    for s in socks:
        chosen = matching_holder(s, owners.get(s.inode, []) if s.inode else [], flt)
        if chosen is None:
            continue
        pid, comm = chosen
        out.append(
            Preexisting(
                family=s.family,
                saddr=s.saddr,
                sport=s.sport,
                daddr=s.daddr,
                dport=s.dport,
                pid=pid,
                comm=comm,
                inode=s.inode,
                cgroup=cgroups.id_of_pid(pid) if pid is not None else None,
            )
        )
    return out


def matching_holder(
    s: ProcSocket, candidates: list[Holder], flt: EventFilter
) -> tuple[int | None, str | None] | None:
    """(pid, comm) of the first process holding ``s`` that passes ``flt`` (several hold a
    socket after fork or fd passing); (None, None) for a socket no process holds, when the
    filter lets an unknown owner pass; None when the socket is filtered out."""
    options: list[tuple[int | None, str | None]] = [(h.pid, h.comm[:15]) for h in candidates] or [
        (None, None)
    ]
    for pid, comm in options:
        if _as_event(s, pid, comm, flt) is not None:
            return pid, comm
    return None


def _as_event(s: ProcSocket, pid: int | None, comm: str | None, flt: EventFilter) -> SocketEvent | None:
    event = SocketEvent(
        ts_ns=0,
        skaddr=0,
        family=s.family,
        saddr=s.saddr,
        sport=s.sport,
        daddr=s.daddr,
        dport=s.dport,
        pid=pid,
        comm=comm,
    )
    return event if flt.matches(event) else None
