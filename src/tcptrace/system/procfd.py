"""Socket inodes under /proc/PID/fd: which processes hold which sockets.

A socket's fd links to ``socket:[INODE]``; the inode is the one /proc/net/tcp shows. A
socket shared by several processes (fork, fd passing) has several holders.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tcptrace.errors import TcptraceError
from tcptrace.model.endpoint import EndpointLike, owner_of
from tcptrace.model.events import TcpState, decode_comm
from tcptrace.model.filters import EventFilter
from tcptrace.model.snapshot import HostSocket
from tcptrace.system import cgroups, sockets
from tcptrace.system.tcpsock import TcpSocket

_SOCKET_LINK = re.compile(r"^socket:\[(\d+)\]$")


@dataclass(frozen=True)
class Holder:
    pid: int
    comm: str
    fd: int


# Reading another user's /proc/PID/fd: listing the directory (mode 0500) needs
# CAP_DAC_READ_SEARCH, reading its links (ptrace_may_access) CAP_SYS_PTRACE; both, measured
# with setpriv (tests/integration/test_hardening.py).
FD_CAPS = ((2, "CAP_DAC_READ_SEARCH"), (19, "CAP_SYS_PTRACE"))


def fd_access_problem(status: str = "/proc/self/status") -> str | None:
    """What this process lacks to find the owners of other users' sockets ("needs
    CAP_SYS_PTRACE"); None when it has it all (root, or both capabilities).

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".status") as f:
    ...     _ = f.write("Name: x" + chr(10) + "CapEff: 0000000000000004" + chr(10))
    ...     f.flush()
    ...     fd_access_problem(f.name)
    'needs CAP_SYS_PTRACE'
    """
    caps = 0
    try:
        with open(status) as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    break
    except (OSError, ValueError):
        pass
    missing = [name for bit, name in FD_CAPS if not caps >> bit & 1]
    return f"needs {' and '.join(missing)}" if missing else None


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
    """The name of process ``pid`` as text, decoded as kernel events' names are (so the two
    compare equal); "" when it has exited."""
    try:
        with open(f"{proc}/{pid}/comm", "rb", buffering=0) as fh:
            raw = fh.read()
    except OSError:
        return ""
    return decode_comm(raw[:-1] if raw.endswith(b"\n") else raw)


def socket_fds(pid: int, proc: str = "/proc") -> list[tuple[int, int]]:
    """(fd, socket inode) of every socket process ``pid`` holds, by fd; [] when it is gone.

    Reads the links relative to an fd on the process's fd directory: one path lookup per
    process instead of one per fd.
    """
    try:
        dir_fd = os.open(f"{proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return []
    out: list[tuple[int, int]] = []
    readlink = os.readlink
    try:
        names = os.listdir(dir_fd)
        for name in names:
            try:
                link = readlink(name, dir_fd=dir_fd)
            except OSError:  # closed since the listing
                continue
            if link.startswith("socket:[") and link.endswith("]"):
                out.append((int(name), int(link[8:-1])))
    except OSError:
        return []
    finally:
        os.close(dir_fd)
    out.sort()
    return out


def holders(inodes: Iterable[int] | None, proc: str = "/proc") -> dict[int, list[Holder]]:
    """For each wanted socket inode, the processes (pid, comm, fd) that hold it, lowest pid
    first; with ``inodes`` None, every socket any process holds.

    Socket inodes are unique on the host, whatever network namespace the socket is in, so one
    walk of /proc/*/fd answers for every namespace (a process may also hold sockets of a
    namespace it is not in). Processes that exit while being read, or whose fds we may
    not read, are skipped: their sockets then have no holder (reported as unknown owner).
    """
    wanted = None if inodes is None else set(inodes)
    found: dict[int, list[Holder]] = {}
    if wanted is not None and not wanted:
        return found
    try:
        pids = sorted(int(name) for name in os.listdir(proc) if name.isdigit())
    except OSError:
        return found
    for pid in pids:
        comm: str | None = None
        for fd, inode in socket_fds(pid, proc):
            if wanted is not None and inode not in wanted:
                continue
            if comm is None:
                comm = read_comm(pid, proc)
            found.setdefault(inode, []).append(Holder(pid=pid, comm=comm, fd=fd))
    return found


def _closewait_now(flt: EventFilter) -> list[TcpSocket]:
    """Sockets in CLOSE_WAIT now in this network namespace (sock_diag, else /proc)."""
    families = (flt.family,) if flt.family is not None else (4, 6)
    snap = sockets.own_namespace([TcpState.CLOSE_WAIT], families)
    if not snap.complete:
        raise TcptraceError(f"cannot list the host's TCP sockets: {snap.namespaces[0].error}")
    return list(snap.sockets)


def closewait_ports(flt: EventFilter | None = None) -> set[tuple[int, int]]:
    """(local port, remote port) of the sockets in CLOSE_WAIT now that pass the port and
    family filters (owners are not looked up: that needs a walk of every /proc/PID/fd)."""
    flt = flt or EventFilter()
    return {(s.sport, s.dport) for s in _closewait_now(flt) if flt.accepts_endpoint(s)}


def closewait_snapshot(
    flt: EventFilter | None = None, only: set[tuple[int, int]] | None = None
) -> list[HostSocket]:
    """Sockets in CLOSE_WAIT now (of this network namespace) with the process holding each one.

    A socket several processes hold (fork, fd passing) is reported with the first holder
    that passes ``flt``, else the lowest pid; one no process holds has an unknown owner.
    Filtered like the kernel filters events: by port, family, and owner; with ``only``,
    just the sockets with those (local port, remote port).
    """
    flt = flt or EventFilter()
    socks = _closewait_now(flt)
    if only is not None:
        socks = [s for s in socks if (s.sport, s.dport) in only]
    owners = holders(s.inode for s in socks if s.inode)
    out: list[HostSocket] = []
    for s in socks:
        chosen = matching_holder(s, owners.get(s.inode, []) if s.inode else [], flt)
        if chosen is None:
            continue
        pid, comm = chosen
        cgroup = cgroups.id_of_pid(pid) if pid is not None else None
        out.append(HostSocket(s.endpoint, s.state, s.inode, owner_of(pid, comm, cgroup)))
    return out


def matching_holder(
    s: EndpointLike, candidates: list[Holder], flt: EventFilter
) -> tuple[int | None, str | None] | None:
    """(pid, comm) of the first process holding ``s`` that passes ``flt`` (several hold a
    socket after fork or fd passing); (None, None) for a socket no process holds, when the
    filter lets an unknown owner pass; None when the socket is filtered out. The socket's
    ``netns`` (a host snapshot's TcpSocket has it) and, for --cgroup and --container, each
    holder's cgroup (/proc/PID/cgroup) are compared too."""
    options: list[tuple[int | None, str | None]] = [(h.pid, h.comm[:15]) for h in candidates] or [
        (None, None)
    ]
    netns = getattr(s, "netns", None) or None
    for pid, comm in options:
        cgroup: int | None = None
        paths: Callable[[int], str | None] = _no_path
        if flt.by_cgroup and pid is not None:
            cgroup, paths = 0, _named(_cgroup_path(pid))
        if flt.accepts(s, owner_of(pid, comm, cgroup), paths, netns):
            return pid, comm
    return None


def _no_path(_cgroup: int) -> str | None:
    return None


def _named(path: str | None) -> Callable[[int], str | None]:
    """The cgroup path of a holder read from /proc, as the filter asks for it (by id)."""

    def paths(_cgroup: int) -> str | None:
        return path

    return paths


def _cgroup_path(pid: int, proc: str = "/proc") -> str | None:
    try:
        with open(f"{proc}/{pid}/cgroup", "rb") as fh:
            return cgroups.host_path(cgroups.parse_proc_cgroup(os.fsdecode(fh.read())))
    except OSError:
        return None
