"""What is seeded into the kernel at start (kernel/seeds.plan): owners of the sockets and
listeners that existed before tracing, in every network namespace, filtered."""

from __future__ import annotations

from tcptrace.kernel.seeds import plan
from tcptrace.model.events import TcpState
from tcptrace.model.filters import EventFilter
from tcptrace.system.hostsnap import HostSockets
from tcptrace.system.process import CLK_TCK, ProcessInfo
from tcptrace.system.procfd import Holder
from tcptrace.system.sockets import SocketSnapshot
from tcptrace.system.tcpsock import TcpSocket

S = TcpState
NS_A, NS_B = 4026531840, 4026532500


def sock(netns: int, state: TcpState, sport: int, dport: int, inode: int) -> TcpSocket:
    daddr = "0.0.0.0" if state == S.LISTEN else "127.0.0.1"
    return TcpSocket(4, "127.0.0.1", sport, daddr, dport, state, 0, inode, netns)


def host() -> HostSockets:
    sockets = (
        # the same server port in two namespaces, each held by its own server
        sock(NS_A, S.LISTEN, 8080, 0, 10),
        sock(NS_B, S.LISTEN, 8080, 0, 20),
        sock(NS_A, S.ESTABLISHED, 8080, 50000, 11),
        sock(NS_A, S.CLOSE_WAIT, 8080, 50001, 12),
        sock(NS_B, S.CLOSE_WAIT, 8080, 50001, 21),
        sock(NS_A, S.ESTABLISHED, 8080, 50002, 0),  # in the accept queue: no holder yet
        sock(NS_A, S.TIME_WAIT, 8080, 50003, 0),  # no full socket: nothing to seed
        sock(NS_A, S.ESTABLISHED, 9090, 50004, 13),  # held by another process
    )
    holders = {
        10: (Holder(100, "srv_a", 3),),
        11: (Holder(100, "srv_a", 4),),
        12: (Holder(100, "srv_a", 5),),
        20: (Holder(200, "srv_b", 3),),
        21: (Holder(200, "srv_b", 4),),
        13: (Holder(300, "other", 3),),
    }
    procs = {
        100: ProcessInfo(100, 1000, b"srv_a", "/a.slice"),
        200: ProcessInfo(200, 2000, b"srv_b", None),
        300: ProcessInfo(300, 3000, b"other", None),
    }
    return HostSockets(SocketSnapshot(5, sockets, ()), holders, procs)


def test_every_namespace_is_seeded_and_a_child_not_accepted_has_its_listeners_owner() -> None:
    seeds = plan(host(), EventFilter(), at_ns=5, cgroup_id=lambda path: 77)
    listeners = {(ns, port): o.pid for ns, _fam, port, o in seeds.listeners}
    assert listeners == {(NS_A, 8080): 100, (NS_B, 8080): 200}
    by = {(s.netns, s.endpoint.dport): s for s in seeds.sockets}
    assert {k: s.owner.pid for k, s in by.items()} == {
        (NS_A, 50000): 100,
        (NS_A, 50001): 100,
        (NS_B, 50001): 200,
        (NS_A, 50002): 100,  # its listener's
        (NS_A, 50004): 300,
    }
    a = by[(NS_A, 50000)].owner
    assert a.start_ns == 1000 * (1_000_000_000 // CLK_TCK) and a.comm == b"srv_a" and a.cgroup == 77
    assert by[(NS_B, 50001)].owner.cgroup == 0  # no cgroup v2 path known
    assert [(s.netns, s.endpoint.dport) for s in seeds.close_wait] == [(NS_A, 50001), (NS_B, 50001)]


def test_filters_keep_only_what_the_kernel_would_trace() -> None:
    seeds = plan(host(), EventFilter(pids=frozenset({200})), at_ns=5)
    assert [(ns, o.pid) for ns, _f, _p, o in seeds.listeners] == [(NS_B, 200)]
    assert [(s.netns, s.endpoint.dport) for s in seeds.sockets] == [(NS_B, 50001)]
    ported = plan(host(), EventFilter(ports=frozenset({9090})), at_ns=5)
    assert ported.listeners == () and [s.owner.pid for s in ported.sockets] == [300]
