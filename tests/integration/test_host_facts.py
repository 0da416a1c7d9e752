"""Host snapshots against the real kernel: sock_diag against /proc and ss, in network namespaces
the tests make, and owners' container identity in cgroups the tests make.

Sockets live in namespaces of their own (bench/netns_sockets.py), so other load on the
host never reaches the comparisons; every namespace, process and cgroup is removed
however a test ends.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.netns_sockets import namespace_with_sockets

from tcptrace.model.events import TcpState
from tcptrace.system import cgroups, hostsnap, netns, netstat, sockdiag, sockets
from tcptrace.system.containers import identify
from tcptrace.system.netns import NetNamespace
from tcptrace.system.tcpsock import TcpSocket
from tests import sstext
from tests.integration import helpers

S = TcpState


def find(name: str) -> NetNamespace:
    return next(ns for ns in netns.namespaces() if name in ns.names)


def key(s: TcpSocket) -> tuple[object, ...]:
    """What both sources give (the cookie, queues and cgroup are sock_diag's only)."""
    return (s.netns, s.family, s.saddr, s.sport, s.daddr, s.dport, s.state, s.uid, s.inode)


def as_ss(s: TcpSocket) -> TcpSocket:
    """What ss prints of a socket."""
    return s._replace(netns=0, cgroup_id=None)


def ss_in(name: str) -> list[TcpSocket]:
    out = subprocess.run(
        ["ip", "netns", "exec", name, "ss", "-tanHe"], capture_output=True, text=True, check=True
    )
    return sstext.parse_ss(out.stdout)


def test_sock_diag_equals_proc_with_thousands_of_sockets_in_mixed_states() -> None:
    with namespace_with_sockets(6000, name=f"tcptrace-test-{os.getpid()}") as (name, _holders):
        ns = find(name)
        diag, diag_info = sockets.dump_namespace(ns, sources=[sockets.SOCK_DIAG])
        proc, proc_info = sockets.dump_namespace(ns, sources=[sockets.PROC])
        assert (diag_info.source, proc_info.source) == (sockets.SOCK_DIAG, sockets.PROC)
        assert sorted(map(key, diag)) == sorted(map(key, proc))

        counts = Counter(s.state for s in diag)
        assert len(diag) >= 5900, counts
        assert counts[S.ESTABLISHED] >= 3000 and counts[S.TIME_WAIT] >= 1000, counts
        assert counts[S.CLOSE_WAIT] >= 500 and counts[S.FIN_WAIT2] >= 500 and counts[S.LISTEN] == 17, counts
        assert {s.family for s in diag} == {4, 6}
        mapped = [s for s in diag if s.family == 6 and ipaddress.IPv6Address(s.saddr).ipv4_mapped is not None]
        assert len(mapped) >= 100, "IPv4-mapped sockets"
        assert all(s.netns == ns.inode for s in diag + proc)
        assert len({s.cookie for s in diag}) == len(diag), "a cookie is one socket's"
        with netns.call_in(ns, sockdiag.open_socket) as sk:
            assert sockdiag.count_states_on(sk) == counts

        # the kernel's state filter: asking for some states returns exactly those
        for states in ([S.CLOSE_WAIT], [S.LISTEN], [S.TIME_WAIT, S.FIN_WAIT2], [S.SYN_SENT]):
            only, _ = sockets.dump_namespace(ns, states, sources=[sockets.SOCK_DIAG])
            assert sorted(map(key, only)) == sorted(key(s) for s in proc if s.state in states)
        v6, _ = sockets.dump_namespace(ns, [S.LISTEN], families=[6], sources=[sockets.SOCK_DIAG])
        assert sorted(map(key, v6)) == sorted(key(s) for s in proc if s.state == S.LISTEN and s.family == 6)


@contextlib.contextmanager
def two_namespaces_same_ports() -> Iterator[tuple[tuple[str, int], tuple[str, int]]]:
    """Two namespaces with listeners on the same ports and sockets on the same addresses: the
    first's holder a plain process, the second's in a pid namespace of its own (pid 1 there)."""
    base = 41000
    prefix = f"tcptrace-test-{os.getpid()}"
    with (
        namespace_with_sockets(300, name=f"{prefix}-a", port_base=base) as (a, ha),
        namespace_with_sockets(300, name=f"{prefix}-b", port_base=base, pid_namespace=True) as (b, hb),
    ):
        assert ha[0].ports == hb[0].ports
        yield (a, ha[0].popen_pid), (b, hb[0].popen_pid)


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_two_namespaces_with_the_same_addresses_each_equal_to_ss_there() -> None:
    with two_namespaces_same_ports() as ((a, pid_a), (b, unshare_b)):
        nsa, nsb = find(a), find(b)
        listed = netns.namespaces()
        assert [n.root for n in listed].count(True) == 1 and listed[0].root
        assert {nsa.inode, nsb.inode, netns.own()} <= {n.inode for n in listed}
        assert pid_a in nsa.pids

        snap = sockets.snapshot()  # every namespace on the host, the two among them
        dumps = {d.netns.inode: d for d in snap.namespaces}
        assert dumps[nsa.inode].source == dumps[nsb.inode].source == sockets.SOCK_DIAG
        in_a, in_b = snap.in_netns(nsa.inode), snap.in_netns(nsb.inode)
        assert sorted(map(as_ss, in_a)) == sorted(ss_in(a))
        assert sorted(map(as_ss, in_b)) == sorted(ss_in(b))

        def tuples(socks: list[TcpSocket], state: TcpState) -> set[tuple[object, ...]]:
            return {(s.family, s.saddr, s.sport, s.daddr, s.dport) for s in socks if s.state == state}

        assert tuples(in_a, S.LISTEN) == tuples(in_b, S.LISTEN) and len(tuples(in_a, S.LISTEN)) == 17
        assert not {s.key for s in in_a} & {s.key for s in in_b}

        for ns in (nsa, nsb):  # /proc/PID/net/tcp of a process in each says the same
            proc, info = sockets.dump_namespace(ns, sources=[sockets.PROC])
            assert info.source == sockets.PROC
            assert sorted(map(key, proc)) == sorted(map(key, snap.in_netns(ns.inode)))

        host = hostsnap.collect(namespaces=[nsa, nsb])
        [holder_b] = children(unshare_b)
        expected = {nsa.inode: pid_a, nsb.inode: holder_b}
        held = [s for s in host.sockets if s.inode]
        assert len(held) > 150
        for s in held:
            owner = host.owner(s)
            assert owner is not None, s
            assert (owner.pid, owner.netns) == (expected[s.netns], s.netns)
            assert owner.comm.startswith(b"python")
        owner_b = host.processes[holder_b]
        assert owner_b.nspid == 1 and owner_b.pid != 1, "the pid it has in its own pid namespace"
        assert host.processes[pid_a].nspid == pid_a
        assert all(s.inode == 0 and not host.owners(s) for s in host.sockets if s.state == S.TIME_WAIT)

        # sockstat's tw of another namespace, read from a thread that entered it (`top`'s
        # TIME_WAIT count sums every namespace's, as the kernel's programs count them).
        # Both timewait substates: ss shows the FIN_WAIT2 one as FIN-WAIT-2, with no inode.
        for name, ns in ((a, nsa), (b, nsb)):
            in_ss = sum(
                1 for s in ss_in(name) if s.state == S.TIME_WAIT or (s.state == S.FIN_WAIT2 and not s.inode)
            )
            assert in_ss > 0 and netstat.sockstat_tw_all([ns]) == in_ss
        assert netstat.sockstat_tw_all([nsa, nsb]) == 2 * in_ss


ID_DOCKER = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"
ID_CRI = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"
ID_FS = "34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376"
POD = "0b5c2a36-7d4e-4e8f-9f7a-2a3f1b9c8d7e"
POD_FS = "74c13223-5a00-11e9-b385-42010a80018d"

# cgroup (under the test's own directory) -> (runtime, container id, pod uid, QoS, unit)
LAYOUTS = {
    f"system.slice/docker-{ID_DOCKER}.scope": ("docker", ID_DOCKER, None, None, None),
    f"docker/{ID_DOCKER}": ("docker", ID_DOCKER, None, None, None),
    (
        "kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{POD.replace('-', '_')}.slice/cri-containerd-{ID_CRI}.scope"
    ): ("containerd", ID_CRI, POD, "Burstable", None),
    f"kubepods/besteffort/pod{POD_FS}/{ID_FS}": (None, ID_FS, POD_FS, "BestEffort", None),
    f"kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-{ID_CRI}.scope": (
        "cri-o",
        ID_CRI,
        POD,
        "Guaranteed",
        None,
    ),
    "system.slice/tcptrace-test.service": (None, None, None, None, "tcptrace-test.service"),
}

LISTENER = (
    "import socket, sys\n"
    "sys.stdin.readline()\n"  # moved into its cgroup by now: the socket is made there
    "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
    "print(s.getsockname()[1], flush=True); sys.stdin.read()\n"
)


def test_owners_are_identified_by_cgroups_named_like_container_runtimes() -> None:
    root = cgroups.cgroup2_root()
    if root is None:
        pytest.skip("no cgroup2 mount")
    top = Path(root) / f"tcptrace-test-hostfacts-{os.getpid()}"
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        ports: dict[str, int] = {}
        for layout in LAYOUTS:
            group = top / layout
            group.mkdir(parents=True)
            proc = subprocess.Popen(
                [sys.executable, "-c", LISTENER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            procs[layout] = proc
            (group / "cgroup.procs").write_text(str(proc.pid))
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            ports[layout] = int(proc.stdout.readline())

        host = hostsnap.collect([S.LISTEN], [NetNamespace(netns.own())])
        for layout, (runtime, cid, pod, qos, unit) in LAYOUTS.items():
            [sock] = [s for s in host.sockets if s.sport == ports[layout]]
            owner = host.owner(sock)
            assert owner is not None and owner.pid == procs[layout].pid
            path = f"/{top.name}/{layout}"
            assert owner.cgroup == path
            ident = host.identity(owner.pid)
            assert ident is not None
            assert (ident.runtime, ident.container_id, ident.pod_uid, ident.qos, ident.unit) == (
                runtime,
                cid,
                pod,
                qos,
                unit,
            ), layout
            # the socket itself names the cgroup it was made in, with no process to ask
            assert sock.cgroup_id == os.stat(top / layout).st_ino
            assert cgroups.path_of_id(sock.cgroup_id) == path
            assert identify(path) == ident
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(timeout=10)
        if top.exists():
            helpers.remove_cgroups(top)
    assert not top.exists()
