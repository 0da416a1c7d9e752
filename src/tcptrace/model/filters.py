"""The filters every command shares, applied to decoded events.

The kernel applies the same filters before it emits anything (kernel/loader.py turns an
EventFilter into cflags and map entries); this module applies them to recordings, so that
``--from FILE`` answers exactly what a live run would have.
"""

from __future__ import annotations

from dataclasses import dataclass

from tcptrace.model.events import SocketEvent

COMM_LEN = 15  # TASK_COMM_LEN - 1: the kernel keeps this many characters of a name
MAX_PORTS = 64  # TT_MAX_PORT_FILTERS in bpf/tcptrace.h: entries of the kernel's port table


@dataclass(frozen=True)
class EventFilter:
    """Keep events of sockets owned by ``pid``/``comm``, on one of ``ports``, of ``family``.

    Owner filters need a known owner: a socket whose owner was never learned matches
    neither ``pid`` nor ``comm``.
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

    def matches(self, event: SocketEvent) -> bool:
        if self.family is not None and event.family != self.family:
            return False
        if self.pid is not None and event.pid != self.pid:
            return False
        if self.comm is not None and event.comm != self.kernel_comm:
            return False
        if self.ports and event.sport not in self.ports and event.dport not in self.ports:
            return False
        return True

    def to_json(self) -> dict[str, object]:
        """As recordings' headers carry it."""
        return {"pid": self.pid, "comm": self.comm, "ports": sorted(self.ports), "family": self.family}

    @property
    def empty(self) -> bool:
        return self.pid is None and self.comm is None and not self.ports and self.family is None
