"""A snapshot of the host's TCP sockets: /proc/net/tcp{,6}, each with the process holding it.

What `tcptrace diagnose` takes at the start and at the end of its window (sockets present
in both are stuck) and `tcptrace top` seeds its state counts from.
"""

from __future__ import annotations

import time

from tcptrace.model.diagnosis import HostSnapshot, HostSocket
from tcptrace.model.filters import EventFilter
from tcptrace.system.procfd import holders, matching_holder
from tcptrace.system.procnet import read_sockets


def take(flt: EventFilter | None = None, owners: bool = True) -> HostSnapshot:
    """Every TCP socket now (of this network namespace) that passes ``flt``.

    ``owners``: find the process holding each socket's fd (a walk of /proc/*/fd); sockets
    no file refers to (timewait sockets, orphans) have none, so an owner filter (--pid,
    --comm) leaves them out. ``at_ns`` is CLOCK_MONOTONIC right after /proc/net/tcp{,6}
    were read (the walk of /proc/*/fd after it changes no state).
    """
    flt = flt or EventFilter()
    socks = read_sockets()
    at_ns = time.monotonic_ns()  # the sockets' states are of now; owners do not change them
    held = holders(s.inode for s in socks if s.inode) if owners else {}
    out = []
    for s in socks:
        chosen = matching_holder(s, held.get(s.inode, []) if s.inode else [], flt)
        if chosen is None:
            continue
        out.append(HostSocket(s.family, s.saddr, s.sport, s.daddr, s.dport, s.state, s.inode, *chosen))
    return HostSnapshot(at_ns, tuple(out))
