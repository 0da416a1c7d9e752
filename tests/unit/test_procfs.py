"""Processes, their sockets and namespaces as /proc shows them: parsers on recorded text, the
readers on this test's own processes and sockets (no root needed), and fake /proc trees."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcptrace.errors import TcptraceError
from tcptrace.model.events import TcpState
from tcptrace.model.filters import EventFilter
from tcptrace.system import hostsnap, netns, process, procfd, sockdiag, sockets
from tcptrace.system.procfd import Holder
from tcptrace.system.sockets import NamespaceDump, SocketSnapshot
from tcptrace.system.tcpsock import TcpSocket

STAT = (
    b"4242 (web (v2)) x) S 1 4242 4242 0 -1 4194368 90 0 0 0 1 2 0 0 20 0 1 0 "
    b"987654 3133440 417 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
)


def test_stat_name_may_hold_parentheses_spaces_and_any_byte() -> None:
    assert process.parse_stat(STAT) == (b"web (v2)) x", 987654)
    assert process.parse_stat(b"9 (\xff\n) R" + b" 0" * 19 + b" 55 0")[0] == b"\xff\n"
    with pytest.raises(ValueError):
        process.parse_stat(b"garbage")


def test_nspid_is_the_innermost_pid() -> None:
    status = b"Name:\tx\nPid:\t4242\nNStgid:\t4242\t7\nNSpid:\t4242\t7\nNSpgid:\t4242\t7\n"
    assert process.parse_nspid(status) == 7
    assert process.parse_nspid(b"NSpid:\t5\n") is None  # not after a newline: not a field start
    assert process.parse_nspid(b"x\nNSpid:\t5") == 5


@pytest.fixture
def named_child() -> Iterator[subprocess.Popen[bytes]]:
    """A process that named itself with bytes that are not UTF-8, holding a listening socket."""
    code = (
        "import ctypes, socket, sys\n"
        "ctypes.CDLL(None).prctl(15, b'caf\\xe9 (x)', 0, 0, 0)\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "print(s.getsockname()[1], flush=True); sys.stdin.read()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_process_read_from_proc(named_child: subprocess.Popen[bytes]) -> None:
    assert named_child.stdout is not None
    named_child.stdout.readline()
    info = process.read(named_child.pid)
    assert info is not None
    assert info.comm == b"caf\xe9 (x)" and info.comm_text == "caf\\xe9 (x)"
    fields = Path(f"/proc/{named_child.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    assert info.start_ticks == int(fields[19]) and info.identity == (named_child.pid, info.start_ticks)
    assert info.netns == netns.of_pid(os.getpid())
    own = process.read(os.getpid())
    assert own is not None and info.cgroup == own.cgroup  # a child starts in its parent's cgroup
    status = Path(f"/proc/{named_child.pid}/status").read_text(errors="replace")
    assert info.nspid == int(
        next(line for line in status.splitlines() if line.startswith("NSpid")).split()[-1]
    )
    assert process.read(2**22 + 1) is None  # beyond pid_max: never a process
    assert procfd.read_comm(named_child.pid) == "caf\\xe9 (x)"


def test_holders_of_this_tests_sockets() -> None:
    with socket.socket() as a, socket.socket(socket.AF_INET6) as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("::1", 0))
        inodes = {os.fstat(a.fileno()).st_ino: a.fileno(), os.fstat(b.fileno()).st_ino: b.fileno()}
        found = procfd.holders(inodes)
        assert {i: [(h.pid, h.fd) for h in hs] for i, hs in found.items()} == {
            i: [(os.getpid(), fd)] for i, fd in inodes.items()
        }
        mine = dict((inode, fd) for fd, inode in procfd.socket_fds(os.getpid()))
        assert all(mine[i] == fd for i, fd in inodes.items())
        assert set(inodes) <= set(procfd.holders(None))
    assert procfd.holders([]) == {}
    assert procfd.socket_fds(2**22 + 1) == []


def test_a_socket_shared_after_fork_has_every_holder_lowest_pid_first(
    named_child: subprocess.Popen[bytes],
) -> None:
    assert named_child.stdout is not None
    port = int(named_child.stdout.readline())
    listener = next(s for s in sockdiag.dump([TcpState.LISTEN], (4,)) if s.sport == port)
    found = procfd.holders([listener.inode])
    assert [h.pid for h in found[listener.inode]] == [named_child.pid]


def fake_proc(tmp_path: Path, namespaces: dict[int, int]) -> str:
    """A /proc with ns/net links only: pid -> namespace inode."""
    for pid, inode in namespaces.items():
        (tmp_path / str(pid) / "ns").mkdir(parents=True)
        (tmp_path / str(pid) / "ns" / "net").symlink_to(f"net:[{inode}]")
    (tmp_path / "self").mkdir()
    return str(tmp_path)


def test_namespaces_of_a_proc_tree(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {1: 100, 2: 100, 30: 200, 31: 200, 40: 300, 7: 300})
    (tmp_path / "99").mkdir()  # a process whose namespace cannot be read
    found = netns.namespaces(proc, run_dirs=[])
    assert [(n.inode, n.pids, n.root) for n in found] == [
        (100, (1, 2), True),
        (300, (7, 40), False),
        (200, (30, 31), False),
    ]
    assert found[0].paths(proc) == [f"{proc}/1/ns/net", f"{proc}/2/ns/net"]
    assert netns.of_pid(99, proc) is None


def test_entering_a_namespace_that_is_gone_is_a_one_line_error(tmp_path: Path) -> None:
    gone = netns.NetNamespace(12345, pids=(2**22 + 1,))
    with pytest.raises(netns.NetnsError, match="cannot open network namespace 12345"):
        netns.call_in(gone, lambda: 1)
    with pytest.raises(netns.NetnsError, match="no process and no ip-netns name"):
        netns.open_namespace(netns.NetNamespace(12345))


def test_a_function_run_in_our_own_namespace_returns_and_raises_in_the_caller() -> None:
    own = netns.NetNamespace(netns.own(), pids=(os.getpid(),))
    if os.geteuid() != 0:
        pytest.skip("setns needs CAP_SYS_ADMIN")
    assert netns.call_in(own, netns.own) == own.inode
    with pytest.raises(ZeroDivisionError):
        netns.call_in(own, lambda: 1 // 0)


def test_our_namespace_from_proc_and_sock_diag_agree_on_our_own_listener() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        inode = os.fstat(s.fileno()).st_ino
        for source in sockets.SOURCES:
            snap = sockets.own_namespace([TcpState.LISTEN], (4,), sources=[source])
            assert snap.complete and snap.namespaces[0].source == source
            [mine] = [t for t in snap.sockets if t.sport == port]
            assert (mine.saddr, mine.inode, mine.netns, mine.uid) == (
                "127.0.0.1",
                inode,
                netns.own(),
                os.getuid(),
            )
            assert all(t.state == TcpState.LISTEN and t.family == 4 for t in snap.sockets)


def test_proc_is_the_fallback_when_sock_diag_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> socket.socket:
        raise sockdiag.SockDiagError("sock_diag: cannot open a netlink socket: Permission denied")

    monkeypatch.setattr(sockdiag, "open_socket", refuse)
    snap = sockets.own_namespace([TcpState.LISTEN])
    assert snap.complete
    assert snap.namespaces[0].source == sockets.PROC and "Permission denied" in (
        snap.namespaces[0].error or ""
    )
    none = sockets.own_namespace(sources=[sockets.SOCK_DIAG])
    assert not none.complete and none.sockets == () and none.namespaces[0].source is None

    def unreadable(paths: object) -> list[object]:
        raise TcptraceError("cannot read /proc/net/tcp: Permission denied")

    monkeypatch.setattr(sockets.procnet, "read_sockets", unreadable)
    with pytest.raises(TcptraceError, match="cannot list the host's TCP sockets: .*Permission denied"):
        hostsnap.take()


def test_a_namespace_without_a_process_cannot_be_read_from_proc() -> None:
    lonely = netns.NetNamespace(4242, pids=(2**22 + 1,))
    socks, info = sockets.dump_namespace(lonely, sources=[sockets.PROC])
    assert socks == [] and info.source is None and "no process left" in (info.error or "")


def sock(inode: int, sport: int = 80, netns_inode: int = 1) -> TcpSocket:
    return TcpSocket(4, "10.0.0.5", sport, "10.0.0.9", 5000, TcpState.CLOSE_WAIT, 0, inode, netns_inode)


def test_owner_of_a_socket_follows_matching_holder() -> None:
    a, b, orphan = sock(11), sock(12, sport=81), sock(0, sport=82)
    snap = SocketSnapshot(1, (a, b, orphan), (NamespaceDump(netns.NetNamespace(1), "sock_diag", 3, 1),))
    procs = {
        7: process.ProcessInfo(7, 100, b"nginx", "/system.slice/nginx.service", 7, 1),
        9: process.ProcessInfo(9, 200, b"worker", None, 1, 1),
    }
    held = {11: (Holder(7, "nginx", 3), Holder(9, "worker", 4)), 12: (Holder(9, "worker", 5),)}
    h = hostsnap.HostSockets(snap, held, procs)
    assert [p.pid for p in h.owners(a)] == [7, 9]
    assert h.owner(a) is procs[7]
    assert h.owner(a, EventFilter(pids=frozenset({9}))) is procs[9]
    assert h.owner(b, EventFilter(comm="nginx")) is None and not h.passes(b, EventFilter(comm="nginx"))
    assert h.owner(orphan) is None and h.passes(orphan, EventFilter(ports=frozenset({82})))
    assert not h.passes(orphan, EventFilter(pids=frozenset({7})))
    assert h.identity(7) is not None and h.identity(7).unit == "nginx.service"  # type: ignore[union-attr]
    assert h.identity(9) is None and h.identity(1) is None
    assert a.key != sock(11, netns_inode=2).key  # equal 4-tuples in two namespaces are two sockets
