"""``ss -tanHe`` output as data: the ground truth the socket snapshots are compared with."""

from __future__ import annotations

import ipaddress

from tcptrace.model.events import TcpState, ipv6_text
from tcptrace.system.tcpsock import TcpSocket

SS_STATES = {
    "ESTAB": TcpState.ESTABLISHED,
    "SYN-SENT": TcpState.SYN_SENT,
    "SYN-RECV": TcpState.SYN_RECV,
    "FIN-WAIT-1": TcpState.FIN_WAIT1,
    "FIN-WAIT-2": TcpState.FIN_WAIT2,
    "TIME-WAIT": TcpState.TIME_WAIT,
    "UNCONN": TcpState.CLOSE,
    "CLOSE-WAIT": TcpState.CLOSE_WAIT,
    "LAST-ACK": TcpState.LAST_ACK,
    "LISTEN": TcpState.LISTEN,
    "CLOSING": TcpState.CLOSING,
}


def parse_endpoint(text: str) -> tuple[int, str, int]:
    """(family, address as tcptrace writes it, port) of an ss column.

    >>> parse_endpoint("[::ffff:127.0.0.1]:40008")
    (6, '::ffff:127.0.0.1', 40008)
    >>> parse_endpoint("127.0.0.1:40006"), parse_endpoint("0.0.0.0:*"), parse_endpoint("*:40008")
    ((4, '127.0.0.1', 40006), (4, '0.0.0.0', 0), (6, '::', 40008))
    """
    host, _, port = text.rpartition(":")
    host = host.split("%", 1)[0]  # an interface suffix (addr%lo)
    number = 0 if port == "*" else int(port)
    if host == "*":  # a dual-stack socket bound to ::
        return 6, "::", number
    if host.startswith("["):
        return 6, ipv6_text(ipaddress.IPv6Address(host[1:-1]).packed), number
    return 4, str(ipaddress.IPv4Address(host)), number


def parse_ss(text: str) -> list[TcpSocket]:
    """The sockets of ``ss -tanHe`` output (state, queues, local, peer, then key:value fields),
    with what ss does not print as a TcpSocket's defaults (``netns`` 0, no cgroup id)."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        family, saddr, sport = parse_endpoint(fields[3])
        _, daddr, dport = parse_endpoint(fields[4])
        extra = dict(f.split(":", 1) for f in fields[5:] if ":" in f and not f.startswith("timer:"))
        state, inode, cookie = SS_STATES[fields[0]], int(extra["ino"]), int(extra["sk"], 16)
        uid = int(extra.get("uid", 0))  # printed only when not root's
        rqueue, wqueue = int(fields[1]), int(fields[2])
        out.append(
            TcpSocket(family, saddr, sport, daddr, dport, state, uid, inode, 0, cookie, rqueue, wqueue)
        )
    return out
