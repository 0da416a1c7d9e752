"""Owners of the sockets that existed before tracing started, planted in the kernel's tables.

The kernel learns a socket's owner where the process acts (connect, listen, accept,
close), so a socket older than tracing has none: a server started before would have its
new connections' children born ownerless, and `--pid SERVER` would drop them. Once the
programs are attached, a snapshot of every network namespace with the holders of each
socket's fd (system/hostsnap.collect) says who owns what, and ``plant`` writes it into the
socket table's side maps (bpf/sock.bpf.h):

- ``listeners``, by (network namespace, family, port): children of a listener inherit its
  owner when they are born (LISTEN -> SYN_RECV);
- ``seeds``, by the socket's tuple (network namespace, family, addresses, ports): taken into
  the socket table the first time the kernel meets the socket (a transition, a send or
  recv, an accept), then deleted;
- ``cw_seeds`` (closewait.bpf.h, when loaded): the sockets in CLOSE_WAIT, which the kernel
  keeps as pre-existing once their seed is taken, and whose entry says they are still
  there, untouched.

``plan`` chooses what to plant, from the snapshot alone (testable without a kernel).
A socket no process holds (in a listener's accept queue, or orphaned) is planted with
its listener's owner, as the kernel would have given it.
"""

from __future__ import annotations

import ctypes
import socket
from dataclasses import dataclass
from typing import Any

from tcptrace.model.endpoint import Endpoint
from tcptrace.model.events import TcpState
from tcptrace.model.filters import EventFilter
from tcptrace.system import cgroups, hostsnap
from tcptrace.system.hostsnap import HostSockets
from tcptrace.system.process import CLK_TCK, ProcessInfo

NS = 1_000_000_000
AF = {4: socket.AF_INET, 6: socket.AF_INET6}
# Full sockets the kernel may still meet: not TIME_WAIT (timewait sockets are not in the
# socket table), not request sockets; listeners go to their own map.
SEEDED_STATES = frozenset(TcpState) - {
    TcpState.TIME_WAIT,
    TcpState.NEW_SYN_RECV,
    TcpState.LISTEN,
    TcpState.CLOSE,
}


@dataclass(frozen=True)
class OwnerSeed:
    """A process as the kernel's tables keep an owner."""

    pid: int
    start_ns: int
    """Its start, in ns since boot, from /proc's ticks (the kernel has ns: the same process
    compares equal in ticks, see process.ticks_from_ns)."""
    comm: bytes
    cgroup: int
    flags: int = 0
    """TT_OWNER_* (sock.bpf.h): in a cgroup a --cgroup or --container names, as the kernel
    says of an owner it learns itself."""


@dataclass(frozen=True)
class SocketSeed:
    netns: int
    endpoint: Endpoint
    state: TcpState
    owner: OwnerSeed


@dataclass(frozen=True)
class SeedPlan:
    at_ns: int
    listeners: tuple[tuple[int, int, int, OwnerSeed], ...]
    """(netns, family 4/6, port, owner) of every listener with an owner."""
    sockets: tuple[SocketSeed, ...]

    @property
    def close_wait(self) -> list[SocketSeed]:
        return [s for s in self.sockets if s.state == TcpState.CLOSE_WAIT]


OWNER_IN_CGROUP = 1  # tcptrace.h TT_OWNER_IN_CGROUP


def owner_seed(info: ProcessInfo, cgroup_id: int | None, in_cgroup: bool = False) -> OwnerSeed:
    flags = OWNER_IN_CGROUP if in_cgroup else 0
    return OwnerSeed(info.pid, info.start_ticks * (NS // CLK_TCK), info.comm[:15], cgroup_id or 0, flags)


def plan(
    host: HostSockets,
    flt: EventFilter,
    at_ns: int,
    cgroup_id: Any = None,
) -> SeedPlan:
    """What to plant: every listener and every other full socket that passes ``flt``, with
    its owner (the first holder that passes, else its listener's). ``cgroup_id(path)``: a
    cgroup v2 path's id (None: unknown)."""
    owners: dict[int, OwnerSeed] = {}

    def seed_of(info: ProcessInfo | None) -> OwnerSeed | None:
        if info is None:
            return None
        found = owners.get(info.pid)
        if found is None:
            cg = cgroup_id(info.cgroup) if cgroup_id is not None and info.cgroup is not None else None
            inside = flt.by_cgroup and flt.accepts_cgroup_path(info.cgroup)
            found = owners[info.pid] = owner_seed(info, cg, inside)
        return found

    listening: dict[tuple[int, int, int], OwnerSeed] = {}
    for s in host.sockets:
        if s.state == TcpState.LISTEN:
            owner = seed_of(host.owner(s, flt))
            if owner is not None and host.passes(s, flt):
                listening[(s.netns, s.family, s.sport)] = owner
    socks: list[SocketSeed] = []
    for s in host.sockets:
        if s.state not in SEEDED_STATES:
            continue
        if host.owners(s):
            owner = seed_of(host.owner(s, flt))  # None: no holder passes the filter
        else:
            owner = listening.get((s.netns, s.family, s.sport))  # not accepted yet, or orphaned
        if owner is not None:
            socks.append(SocketSeed(s.netns, s.endpoint, s.state, owner))
    return SeedPlan(
        at_ns,
        tuple((ns, fam, port, o) for (ns, fam, port), o in listening.items()),
        tuple(socks),
    )


@dataclass(frozen=True)
class Planted:
    """What ``plant`` wrote."""

    listeners: int = 0
    sockets: int = 0
    close_wait: frozenset[tuple[int, Endpoint]] = frozenset()
    """(netns, endpoint) of the CLOSE_WAIT sockets planted in ``cw_seeds``."""
    failed: int = 0


def _addr(text: str, version: int) -> bytes:
    raw = socket.inet_pton(AF[version], text)
    return raw + bytes(16 - len(raw))


def _fill_tuple(key: Any, netns: int, ep: Endpoint) -> None:
    ctypes.memset(ctypes.addressof(key), 0, ctypes.sizeof(key))
    ctypes.memmove(ctypes.addressof(key.saddr), _addr(ep.saddr, ep.family), 16)
    ctypes.memmove(ctypes.addressof(key.daddr), _addr(ep.daddr, ep.family), 16)
    key.sport = ep.sport
    key.dport = ep.dport
    key.family = AF[ep.family]
    key.netns = netns


def _fill_owner(o: Any, seed: OwnerSeed) -> None:
    o.tgid = seed.pid
    o.cgroup = seed.cgroup
    o.flags = seed.flags
    o.start_ns = seed.start_ns
    o.comm = seed.comm  # a char array: ctypes takes the bytes (NUL-padded)


def _write(table: Any, rows: list[tuple[Any, Any]]) -> int:
    """Insert ``rows`` (one batch, else one by one); returns how many failed."""
    if not rows:
        return 0
    keys = (table.Key * len(rows))(*(k for k, _ in rows))
    values = (table.Leaf * len(rows))(*(v for _, v in rows))
    try:
        table.items_update_batch(keys, values)
        return 0
    except Exception:  # bcc raises bare Exception; a full map fails the batch: one by one
        failed = 0
        for k, v in rows:
            try:
                table[k] = v
            except Exception:
                failed += 1
        return failed


def plant(program: Any, seeds: SeedPlan) -> Planted:
    """Write ``seeds`` into the loaded program's maps (those it has)."""
    bpf = program.bpf
    failed = 0
    listeners = bpf["listeners"]
    rows = []
    for netns, family, port, owner in seeds.listeners:
        k = listeners.Key()
        k.netns, k.family, k.port = netns, AF[family], port
        v = listeners.Leaf()
        _fill_owner(v, owner)
        rows.append((k, v))
    failed += _write(listeners, rows)
    table = bpf["seeds"]
    rows = []
    for s in seeds.sockets:
        k = table.Key()
        _fill_tuple(k, s.netns, s.endpoint)
        v = table.Leaf()
        _fill_owner(v.owner, s.owner)
        v.at_ns = seeds.at_ns
        v.state = int(s.state)
        rows.append((k, v))
    failed += _write(table, rows)
    close_wait: set[tuple[int, Endpoint]] = set()
    try:
        cw = bpf["cw_seeds"]
    except KeyError:  # not compiled with TT_CW_AGG
        cw = None
    if cw is not None:
        rows = []
        for s in seeds.close_wait:
            k = cw.Key()
            _fill_tuple(k, s.netns, s.endpoint)
            rows.append((k, cw.Leaf(seeds.at_ns)))
            close_wait.add((s.netns, s.endpoint))
        bad = _write(cw, rows)
        failed += bad
        if bad:
            close_wait = set()  # which ones failed is unknown: the model will not rely on it
    return Planted(len(seeds.listeners), len(seeds.sockets), frozenset(close_wait), failed)


@dataclass(frozen=True)
class Seeding:
    """The host's sockets when the programs had been attached, and the owners planted."""

    host: HostSockets
    at_ns: int
    planted: Planted


def seed_owners(program: Any, flt: EventFilter) -> Seeding:
    """Snapshot every network namespace's sockets with their holders (after attaching, so
    that a socket changing meanwhile is met by the kernel one way or the other) and plant
    their owners in the kernel."""
    host = hostsnap.collect()
    at_ns = host.snapshot.at_ns
    return Seeding(host, at_ns, plant(program, plan(host, flt, at_ns, cgroup_id=cgroups.id_of_path)))
