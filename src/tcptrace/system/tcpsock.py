"""One TCP socket of a host snapshot, whichever source listed it (sock_diag or /proc/net/tcp).

Addresses are written exactly as the rest of tcptrace writes them (``model.events.format_addr``),
so a socket from a snapshot and the same socket from a kernel event compare equal.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from tcptrace.model.endpoint import Endpoint
from tcptrace.model.events import TcpState, ipv6_text

_ntop = socket.inet_ntop
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6


class TcpSocket(NamedTuple):
    """One TCP socket as the kernel lists it, in the network namespace ``netns``.

    A NamedTuple rather than a frozen dataclass: a snapshot builds tens of thousands of
    them, and a frozen dataclass of this many fields costs ~1.3 µs to build against ~0.2 µs
    for a tuple (CPython 3.11), which alone would be 65 ms of a 50k-socket snapshot.

    Fields a source does not give are None: /proc/net/tcp has no cookie, no cgroup and
    (as parsed here) no queue lengths.
    """

    family: int
    """4 or 6 (an IPv6 socket talking to an IPv4 peer is 6, with a ``::ffff:`` address)."""
    saddr: str
    sport: int
    daddr: str
    dport: int
    state: TcpState
    uid: int
    inode: int
    """The socket's inode (what ``/proc/PID/fd/N -> socket:[INODE]`` names); 0 when no file
    refers to it: TIME_WAIT, orphans, connections not accepted yet."""
    netns: int = 0
    """Inode of the socket's network namespace (``/proc/PID/ns/net``); 0 when unknown."""
    cookie: int | None = None
    """The kernel's socket cookie (``ss -e`` prints it as ``sk:``; bpf_get_socket_cookie())."""
    rqueue: int | None = None
    """Bytes not read yet; for a listener, connections waiting for accept()."""
    wqueue: int | None = None
    """Bytes not acknowledged yet; for a listener, its backlog."""
    cgroup_id: int | None = None
    """cgroup v2 id of the socket: the cgroup of the process that made it (an accepted
    socket inherits its listener's). From sock_diag on kernels >= 5.7."""

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint as the model's records keep it (the fields stay flat here: a tuple
        is built per socket of a snapshot, an Endpoint only for the sockets kept)."""
        return Endpoint(self.family, self.saddr, self.sport, self.daddr, self.dport)

    @property
    def key(self) -> tuple[int, int, str, int, str, int, int]:
        """What tells one socket from every other on the host: equal 4-tuples in two
        namespaces are two sockets, and SO_REUSEPORT listeners share a 4-tuple (the inode
        tells them apart)."""
        return (self.netns, self.family, self.saddr, self.sport, self.daddr, self.dport, self.inode)


def format_ip(raw: bytes, family: int) -> str:
    """An address in network byte order as text, the same text as ``model.events.format_addr``.

    >>> format_ip(bytes([10, 0, 0, 5]), 4)
    '10.0.0.5'
    >>> format_ip(bytes(15) + b"\\x01", 6)
    '::1'
    >>> format_ip(bytes(10) + b"\\xff\\xff" + bytes([127, 0, 0, 1]), 6)
    '::ffff:127.0.0.1'

    ``inet_ntop`` is ~5x faster than ``ipaddress`` and writes the same text, but for the
    addresses it writes dotted (IPv4-mapped, and the deprecated IPv4-compatible ones):
    those go through ``ipv6_text``, so that both agree on every address.
    """
    if family == 4:
        return _ntop(_AF_INET, raw[:4])
    text = _ntop(_AF_INET6, raw[:16])
    if "." in text:
        return ipv6_text(bytes(raw[:16]))
    return text


__all__ = ["TcpSocket", "format_ip"]
