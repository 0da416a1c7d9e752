"""A snapshot of the host's TCP sockets (sock_diag or /proc/net/tcp{,6}), each with the
process holding it.

What `tcptrace diagnose` compares at the start and the end of its window (sockets present
in both are stuck) and `tcptrace top` seeds its counts per state from. system/hostsnap.py
takes one; this module is the data, pure.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tcptrace.model.endpoint import Endpoint, EndpointFields, Owner, OwnerFields
from tcptrace.model.events import STATE_ORDER, TcpState


@dataclass(frozen=True)
class HostSocket(EndpointFields, OwnerFields):
    """One socket of a host snapshot, with the process holding its fd (None: no process
    holds it, or it was not looked up)."""

    endpoint: Endpoint
    state: TcpState
    inode: int = 0
    owner: Owner | None = None
    netns: int = 0
    """Inode of its network namespace; 0 when unknown."""

    @property
    def key(self) -> tuple[Endpoint, int, int]:
        """What identifies the same socket in two snapshots (the inode tells a reuse apart,
        the namespace two sockets of one address in two namespaces)."""
        return (self.endpoint, self.inode, self.netns)


@dataclass(frozen=True)
class HostSnapshot:
    at_ns: int
    sockets: tuple[HostSocket, ...]

    def distribution(self) -> dict[TcpState, int]:
        counts = Counter(s.state for s in self.sockets)
        return {s: counts[s] for s in STATE_ORDER if counts[s]}

    def in_state(self, state: TcpState) -> list[HostSocket]:
        return [s for s in self.sockets if s.state == state]
