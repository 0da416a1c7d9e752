"""A snapshot of the host's TCP sockets, each with the processes holding it.

``take`` is what `tcptrace diagnose` takes at the start and at the end of its window
(sockets present in both are stuck) and `tcptrace top` seeds its state counts from: the
sockets of every network namespace the filter keeps, in the model's HostSnapshot, so that
they are counted where the kernel's transitions are (its programs see every namespace).

``collect`` is the same for every network namespace on the host, with who holds each
socket: pid, start time, name, cgroup (hence container and pod) and pid inside its own
pid namespace. What seeds the kernel's owner tables at start, and each command's view of
sockets that existed before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tcptrace.errors import TcptraceError
from tcptrace.model.endpoint import owner_of
from tcptrace.model.events import TcpState
from tcptrace.model.filters import EventFilter
from tcptrace.model.snapshot import HostSnapshot, HostSocket
from tcptrace.system import cgroups, netns, process, sockdiag, sockets
from tcptrace.system.containers import CgroupIdentity, identify
from tcptrace.system.netns import NetNamespace
from tcptrace.system.process import ProcessInfo
from tcptrace.system.procfd import Holder, holders, matching_holder
from tcptrace.system.tcpsock import TcpSocket


def take(
    flt: EventFilter | None = None, owners: bool = True, namespaces: Iterable[NetNamespace] | None = None
) -> HostSnapshot:
    """Every TCP socket now, of every network namespace (``namespaces``: those listed, else
    the host's now; ``--netns``: those it names), that passes ``flt``.

    ``owners``: find the process holding each socket's fd (a walk of /proc/*/fd); sockets
    no file refers to (timewait sockets, orphans) have none, so an owner filter (--pid,
    --comm) leaves them out. ``at_ns`` is CLOCK_MONOTONIC right after the sockets were
    listed (the walk of /proc/*/fd after it changes no state). A namespace that went away
    while it was listed is left out; tcptrace's own failing to list is an error.
    """
    flt = flt or EventFilter()
    families = (flt.family,) if flt.family is not None else (4, 6)
    listed = netns.namespaces() if namespaces is None else namespaces
    where = [ns for ns in listed if not flt.netns or ns.inode in flt.netns]
    snap = sockets.snapshot(namespaces=where, families=families)
    own = netns.own()
    for dump in snap.namespaces:
        if dump.source is None and dump.netns.inode == own:
            raise TcptraceError(f"cannot list the host's TCP sockets: {dump.error}")
    held = holders(s.inode for s in snap.sockets if s.inode) if owners else {}
    out = []
    for s in snap.sockets:
        chosen = matching_holder(s, held.get(s.inode, []) if s.inode else [], flt)
        if chosen is None:
            continue
        out.append(HostSocket(s.endpoint, s.state, s.inode, owner_of(*chosen), netns=s.netns))
    return HostSnapshot(snap.at_ns, tuple(out))


@dataclass(frozen=True)
class HostSockets:
    """TCP sockets of the host's network namespaces, with their holders and those processes."""

    snapshot: sockets.SocketSnapshot
    holders: Mapping[int, tuple[Holder, ...]]
    """Socket inode -> the processes holding it, lowest pid first (several after fork or
    fd passing; none for TIME_WAIT, orphans and connections not accepted yet)."""
    processes: Mapping[int, ProcessInfo]
    """pid -> every holder's process."""

    @property
    def sockets(self) -> tuple[TcpSocket, ...]:
        return self.snapshot.sockets

    def owners(self, sock: TcpSocket) -> tuple[ProcessInfo, ...]:
        """Every process holding ``sock``, lowest pid first."""
        found = (self.processes.get(h.pid) for h in self.holders.get(sock.inode, ()))
        return tuple(p for p in found if p is not None)

    def owner(self, sock: TcpSocket, flt: EventFilter | None = None) -> ProcessInfo | None:
        """The process ``sock`` is reported with: the first holder that passes ``flt`` (as
        ``procfd.matching_holder`` chooses); None for a socket no process holds, or whose
        holders all fail ``flt``."""
        chosen = matching_holder(sock, list(self.holders.get(sock.inode, ())), flt or EventFilter())
        if chosen is None or chosen[0] is None:
            return None
        return self.processes.get(chosen[0])

    def passes(self, sock: TcpSocket, flt: EventFilter) -> bool:
        """Whether ``flt`` keeps ``sock`` (a socket no process holds passes a filter without
        an owner condition), as the kernel's filters keep its events."""
        return matching_holder(sock, list(self.holders.get(sock.inode, ())), flt) is not None

    def held(
        self,
        flt: EventFilter,
        states: Iterable[TcpState] | None = None,
        only: set[tuple[int, int, int]] | None = None,
    ) -> list[HostSocket]:
        """The sockets (in ``states``; with ``only``, those whose (netns, local port, remote
        port) it holds) that pass ``flt``, each with the first holder that passes it (None:
        no process holds it), as the model keeps them."""
        wanted = None if states is None else frozenset(states)
        out = []
        for s in self.sockets:
            if wanted is not None and s.state not in wanted:
                continue
            if only is not None and (s.netns, s.sport, s.dport) not in only:
                continue
            if not self.passes(s, flt):
                continue
            info = self.owner(s, flt)
            owner = None
            if info is not None:
                cgroup = cgroups.id_of_path(info.cgroup) if info.cgroup is not None else None
                owner = owner_of(info.pid, info.comm_text, cgroup)
            out.append(HostSocket(s.endpoint, s.state, s.inode, owner, s.netns))
        return out

    def identity(self, pid: int) -> CgroupIdentity | None:
        """Container, pod and unit of a holder, from its cgroup; None without cgroup v2."""
        info = self.processes.get(pid)
        if info is None or info.cgroup is None:
            return None
        return identify(info.cgroup)


def collect(
    states: Iterable[TcpState] = sockdiag.ALL_STATES,
    namespaces: Iterable[NetNamespace] | None = None,
    families: Iterable[int] = (4, 6),
    owners: bool = True,
    proc: str = "/proc",
) -> HostSockets:
    """Sockets in ``states`` of every network namespace (or of ``namespaces``), with holders.

    One walk of /proc/*/fd finds the holders of every namespace's sockets (socket inodes
    are unique on the host); then each holder's process is read once.
    """
    snap = sockets.snapshot(states, namespaces, families, proc=proc)
    if not owners:
        return HostSockets(snap, {}, {})
    held = holders((s.inode for s in snap.sockets if s.inode), proc)
    procs = process.read_many((h.pid for hs in held.values() for h in hs), proc)
    return HostSockets(snap, {inode: tuple(hs) for inode, hs in held.items()}, procs)


__all__ = ["HostSockets", "collect", "take"]
