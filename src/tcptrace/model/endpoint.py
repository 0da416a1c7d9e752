"""The two values every socket record carries: where the socket is, and whose it is.

An ``Endpoint`` is one TCP socket's address family and 4-tuple as the socket sees it:
``saddr:sport`` is the local side and ``daddr:dport`` the remote one, as the kernel's
tracepoints and /proc name them. An ``Owner`` is the process the socket belongs to, as
learned in process context (connect, accept, listen, close) or from /proc/PID/fd.

Events keep both as flat fields (the shape of ``struct tt_event`` and of recordings), and
so does a host snapshot's row (system/tcpsock.py: tens of thousands are built at once);
they hand out ``.endpoint`` (events ``.owner`` too). The model's records (the socket
table, the CLOSE_WAIT tracker, a snapshot's HostSockets) store the values themselves;
``EndpointFields`` and ``OwnerFields`` give them the flat names (``sock.dport``,
``sock.pid``) too, so ``EndpointLike`` reads any of them without building anything.

>>> ep = Endpoint(4, "10.0.0.1", 80, "10.0.0.9", 40000)
>>> ep.ports
(80, 40000)
>>> owner_of(42, "nginx"), owner_of(None, None)
(Owner(pid=42, comm='nginx', cgroup=None), None)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A socket's family (4 or 6), local address and port, remote address and port."""

    family: int
    saddr: str
    sport: int
    daddr: str
    dport: int

    @property
    def ports(self) -> tuple[int, int]:
        """(local port, remote port): what a /proc recheck compares sockets by."""
        return (self.sport, self.dport)


NO_ENDPOINT = Endpoint(4, "", 0, "", 0)
"""The endpoint of a record before any event named its addresses."""


class EndpointLike(Protocol):
    """Anything that shows a socket's endpoint under the flat names: an Endpoint itself, an
    event, a record with EndpointFields, a host snapshot's row (system/tcpsock.py). What the
    filters read, so that nothing is built just to be filtered."""

    @property
    def family(self) -> int: ...
    @property
    def saddr(self) -> str: ...
    @property
    def sport(self) -> int: ...
    @property
    def daddr(self) -> str: ...
    @property
    def dport(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Owner:
    """The process a socket belongs to: its pid, its comm (as the kernel truncates it), and
    its cgroup v2 id where that was learned with it."""

    pid: int
    comm: str | None
    cgroup: int | None = None


def owner_of(pid: int | None, comm: str | None, cgroup: int | None = None) -> Owner | None:
    """The owner these flat fields describe; None when no owner was learned (no pid)."""
    return None if pid is None else Owner(pid, comm, cgroup)


class EndpointFields:
    """The fields of ``self.endpoint`` under their flat names, read-only."""

    endpoint: Endpoint

    @property
    def family(self) -> int:
        return self.endpoint.family

    @property
    def saddr(self) -> str:
        return self.endpoint.saddr

    @property
    def sport(self) -> int:
        return self.endpoint.sport

    @property
    def daddr(self) -> str:
        return self.endpoint.daddr

    @property
    def dport(self) -> int:
        return self.endpoint.dport


class OwnerFields:
    """The fields of ``self.owner`` under their flat names, read-only; None without an owner."""

    owner: Owner | None

    @property
    def pid(self) -> int | None:
        return None if self.owner is None else self.owner.pid

    @property
    def comm(self) -> str | None:
        return None if self.owner is None else self.owner.comm

    @property
    def cgroup(self) -> int | None:
        return None if self.owner is None else self.owner.cgroup
