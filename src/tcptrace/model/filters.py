"""The filters every command shares, applied to a socket's endpoint and owner.

The kernel applies the same filters before it emits anything (kernel/loader.py turns an
EventFilter into cflags and map entries); this module applies them to recordings, so that
``--from FILE`` answers exactly what a live run would have, and to the sockets /proc shows.
"""

from __future__ import annotations

from dataclasses import dataclass

from tcptrace.model.endpoint import EndpointLike, Owner
from tcptrace.model.events import SocketEvent

COMM_LEN = 15  # TASK_COMM_LEN - 1: the kernel keeps this many characters of a name
MAX_PORTS = 64  # TT_MAX_PORT_FILTERS in bpf/tcptrace.h: entries of the kernel's port table


@dataclass(frozen=True)
class EventFilter:
    """Keep sockets owned by ``pid``/``comm``, with one of ``ports`` on either side, of ``family``.

    Owner filters need a known owner: a socket whose owner was never learned matches
    neither ``pid`` nor ``comm``.

    >>> from tcptrace.model.endpoint import Endpoint
    >>> web = Endpoint(4, "10.0.0.1", 80, "10.0.0.9", 40000)
    >>> EventFilter(ports=frozenset({80})).accepts(web, None)
    True
    >>> EventFilter(pid=7).accepts(web, None), EventFilter(pid=7).accepts(web, Owner(7, "srv"))
    (False, True)
    """

    pid: int | None = None
    comm: str | None = None
    ports: frozenset[int] = frozenset()
    family: int | None = None  # 4 or 6

    def __post_init__(self) -> None:
        if self.pid is not None and self.pid <= 0:
            raise ValueError(f"pid must be positive, not {self.pid}")
        if len(self.ports) > MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS} ports (the kernel's filter table), not {len(self.ports)}")
        for port in self.ports:
            if not 0 < port < 65536:
                raise ValueError(f"port must be 1-65535, not {port}")
        if self.family not in (None, 4, 6):
            raise ValueError(f"family must be 4 or 6, not {self.family}")
        if self.comm is not None and not self.comm:
            raise ValueError("comm must not be empty")

    @property
    def kernel_comm(self) -> str | None:
        """The comm as the kernel stores it (truncated to 15 characters)."""
        return None if self.comm is None else self.comm[:COMM_LEN]

    def accepts(self, sock: EndpointLike, owner: Owner | None) -> bool:
        """Whether a socket with this endpoint and owner (None: unknown) passes every filter."""
        return self.accepts_endpoint(sock) and self.accepts_owner(owner)

    def accepts_endpoint(self, sock: EndpointLike) -> bool:
        """Whether the family and port filters let a socket with this endpoint pass."""
        if self.family is not None and sock.family != self.family:
            return False
        return not self.ports or sock.sport in self.ports or sock.dport in self.ports

    def accepts_owner(self, owner: Owner | None) -> bool:
        """Whether the pid and comm filters let a socket of this owner (None: unknown) pass."""
        if owner is None:
            return self._owner_ok(None, None)
        return self._owner_ok(owner.pid, owner.comm)

    def matches(self, event: SocketEvent) -> bool:
        """Whether an event's socket passes: the filter the kernel applies, on a recording.
        (The event's flat fields are its endpoint and owner; nothing is built per event.)"""
        return self.accepts_endpoint(event) and self._owner_ok(event.pid, event.comm)

    def _owner_ok(self, pid: int | None, comm: str | None) -> bool:
        if self.pid is not None and pid != self.pid:
            return False
        return self.comm is None or comm == self.kernel_comm

    def to_json(self) -> dict[str, object]:
        """As recordings' headers carry it."""
        return {"pid": self.pid, "comm": self.comm, "ports": sorted(self.ports), "family": self.family}

    @property
    def empty(self) -> bool:
        return self.pid is None and self.comm is None and not self.ports and self.family is None
