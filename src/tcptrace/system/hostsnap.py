"""A snapshot of the host's TCP sockets: /proc/net/tcp{,6}, each with the process holding it.

What `tcptrace diagnose` takes at the start and at the end of its window (sockets present
in both are stuck) and `tcptrace top` seeds its state counts from.
"""

from __future__ import annotations

import time

from tcptrace.model.diagnosis import HostSnapshot, HostSocket
from tcptrace.model.events import SocketEvent
from tcptrace.model.filters import EventFilter
from tcptrace.system.procfd import holders
from tcptrace.system.procnet import read_sockets


def take(flt: EventFilter | None = None, owners: bool = True) -> HostSnapshot:
    """Every TCP socket now (of this network namespace) that passes ``flt``.

    ``owners``: find the process holding each socket's fd (a walk of /proc/*/fd); sockets
    no file refers to (timewait sockets, orphans) have none, so an owner filter (--pid,
    --comm) leaves them out. ``at_ns`` is CLOCK_MONOTONIC at the end of the read.
    """
    flt = flt or EventFilter()
    socks = read_sockets()
    held = holders(s.inode for s in socks if s.inode) if owners else {}
    out = []
    for s in socks:
        hs = held.get(s.inode, []) if s.inode else []
        h = hs[0] if hs else None
        if flt.pid is not None:
            h = next((x for x in hs if x.pid == flt.pid), None)
        pid, comm = (h.pid, h.comm[:15]) if h else (None, None)
        probe = SocketEvent(
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
        if not flt.matches(probe):
            continue
        out.append(HostSocket(s.family, s.saddr, s.sport, s.daddr, s.dport, s.state, s.inode, pid, comm))
    return HostSnapshot(time.monotonic_ns(), tuple(out))
