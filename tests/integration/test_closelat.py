"""`tcptrace closelat` against the real kernel.

Ground truth: the closes this test makes (it counts them), their durations measured around
each call in user space (the kernel's measure lies inside it), `ss` for unacknowledged data
and CLOSE_WAIT, and ECONNRESET at the peer for resets. Every assertion is about this test's
own process or fixture (other tests run at the same time on the same kernel).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from tcptrace.kernel.closelat import CloseLatencyReader, closelat_defines
from tcptrace.kernel.loader import LoadedProgram
from tcptrace.kernel.stream import KernelStream, Symbolizer
from tcptrace.model.closelat import CallStats, merge_rows
from tcptrace.model.events import CloseCall, CloseFlag, Op, SocketEvent, TcpState
from tcptrace.model.filters import EventFilter
from tests.integration.helpers import SS, FixtureBuilder, free_port, load_parts, wait_for

MS = 1_000_000
S = 1_000_000_000
CLOSE_RANGE_CLOEXEC = 4
_libc = ctypes.CDLL(None, use_errno=True)


def close_range(first: int, last: int, flags: int = 0) -> int:
    return int(_libc.syscall(436, ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(flags)))


@dataclass
class Tracer:
    program: LoadedProgram
    stream: KernelStream
    reader: CloseLatencyReader
    events: list[SocketEvent] = field(default_factory=list)

    def rows(self, pid: int) -> dict[Op, CallStats]:
        """This process's cumulative rows by call (code paths merged)."""
        out: dict[Op, CallStats] = {}
        for key, row in merge_rows(r for r in self.reader.rows() if r.key.pid == pid).items():
            out[key.op] = out[key.op] + row if key.op in out else row
        return out

    def flagged(self, pid: int) -> list[CloseCall]:
        self.events.extend(self.stream.poll(10))
        self.events.extend(self.stream.drain())
        return [e for e in self.events if isinstance(e, CloseCall) and e.pid == pid]


@contextmanager
def tracer(
    flt: EventFilter | None = None, stacks: bool = False, close_wait_ns: int = 500 * MS
) -> Iterator[Tracer]:
    program = load_parts(
        ("lifecycle", "closelat"), flt, stacks=stacks, defines=closelat_defines(close_wait_ns)
    )
    try:
        stream = KernelStream(program, flt, symbolize=stacks)
        reader = CloseLatencyReader(program, Symbolizer(program) if stacks else None)
        yield Tracer(program, stream, reader)
    finally:
        program.close()


def timed_close(sock: socket.socket) -> int:
    """Close and return the wall time of the call, ns (the kernel's measure is inside it)."""
    t0 = time.monotonic_ns()
    sock.close()
    return time.monotonic_ns() - t0


def pair(listener: socket.socket, rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    client = socket.socket()
    if rcvbuf is not None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    return client, server


def listener_on(port: int) -> socket.socket:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    return srv


def test_only_tcp_closes_count_and_ordinary_ones_take_microseconds(port: int) -> None:
    me = os.getpid()
    with tracer() as t:
        srv = listener_on(port)
        user_ns = []
        for _ in range(10):
            client, server = pair(srv)
            user_ns.append(timed_close(client))
            user_ns.append(timed_close(server))
        user_ns.append(timed_close(srv))
        tcp_closes = len(user_ns)
        # Not TCP: a file, a pipe, UDP and Unix sockets, an unconnected UDP shutdown.
        for _ in range(5):
            open("/proc/self/stat").close()
            r, w = os.pipe()
            os.close(r)
            os.close(w)
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
            a, b = socket.socketpair()
            a.close()
            b.close()
        rows = t.rows(me)
        flagged = t.flagged(me)
        counters = t.reader.counters()
    assert set(rows) == {Op.CLOSE}
    row = rows[Op.CLOSE]
    assert row.count == tcp_closes == 21
    # Each kernel duration lies inside the user-space measure of the same call.
    assert row.hist.sum_ns <= sum(user_ns)
    assert row.hist.max_ns <= max(user_ns)
    # Microseconds, not the hundreds of ms of a blocked close: p50 well under 1 ms.
    assert row.hist.percentile(50) < 1 * MS  # type: ignore[operator]
    assert row.resets == row.lingered == row.late_close_wait == 0
    assert flagged == []
    assert counters["call_failed"] == counters["hist_failed"] == 0


def fill_send_buffer(sock: socket.socket) -> int:
    sock.setblocking(False)
    sent = 0
    try:
        while True:
            sent += sock.send(b"x" * 65536)
    except BlockingIOError:
        pass
    sock.setblocking(True)
    return sent


def send_q(ss: SS, port: int) -> int:
    """Send-Q (bytes not acknowledged) of the established socket whose local port is ``port``."""
    for line in ss.sockets(port, "established"):
        fields = line.split()
        # Recv-Q Send-Q Local Peer (state omitted with `state established`)
        if fields[2].endswith(f":{port}"):
            return int(fields[1])
    raise AssertionError(f"no established socket on :{port}")


def test_linger_close_with_unacked_data_blocks_about_a_second_and_is_flagged(port: int, ss: SS) -> None:
    me = os.getpid()
    with tracer() as t:
        srv = listener_on(port)
        # The client stops reading: a tiny receive buffer, never read.
        client, server = pair(srv, rcvbuf=4096)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 1))
        fill_send_buffer(server)
        client_port = client.getsockname()[1]
        # Ground truth: data the peer has not acknowledged sits in the send queue.
        unacked = send_q(ss, port)
        assert unacked > 0
        took = timed_close(server)
        assert 0.9 * S <= took <= 3 * S  # SO_LINGER {1, 1 s}: close() blocked ~1 s
        wait_for(lambda: bool(t.flagged(me)), timeout=2)
        flagged = t.flagged(me)
        rows = t.rows(me)
        client.close()
        srv.close()
    (ev,) = [e for e in flagged if e.sport == port and CloseFlag.LINGERED in e.flags]
    assert 0.9 * S <= ev.duration_ns <= took
    assert ev.op is Op.CLOSE and ev.state is TcpState.ESTABLISHED
    assert ev.dport == client_port
    assert ev.comm is not None and ev.pid == me
    assert rows[Op.CLOSE].lingered == 1
    assert 0.9 * S <= rows[Op.CLOSE].hist.max_ns <= took


def test_close_with_unread_data_is_flagged_as_reset(port: int) -> None:
    me = os.getpid()
    with tracer() as t:
        srv = listener_on(port)
        client, server = pair(srv)
        client.sendall(b"request the server never reads")
        assert wait_for(lambda: len(server.recv(64, socket.MSG_PEEK)) > 0, timeout=2)
        server.close()
        # Ground truth: the peer got a reset.
        with pytest.raises(ConnectionResetError):
            client.settimeout(2)
            client.recv(10)
        wait_for(lambda: bool(t.flagged(me)), timeout=2)
        flagged = [e for e in t.flagged(me) if e.sport == port]
        rows = t.rows(me)
        client.close()
        srv.close()
    (ev,) = flagged
    assert ev.flags == CloseFlag.RESET
    assert ev.state is TcpState.ESTABLISHED and ev.op is Op.CLOSE
    assert rows[Op.CLOSE].resets >= 1


def test_linger_zero_close_is_flagged_as_reset(port: int) -> None:
    me = os.getpid()
    with tracer() as t:
        srv = listener_on(port)
        client, server = pair(srv)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.close()
        with pytest.raises(ConnectionResetError):
            client.settimeout(2)
            client.recv(10)
        wait_for(lambda: bool(t.flagged(me)), timeout=2)
        flagged = [e for e in t.flagged(me) if e.sport == port]
        client.close()
        srv.close()
    (ev,) = flagged
    assert CloseFlag.RESET in ev.flags and CloseFlag.LINGERED not in ev.flags


def test_late_close_of_a_close_wait_socket_is_flagged(port: int, ss: SS) -> None:
    me = os.getpid()
    with tracer(close_wait_ns=500 * MS) as t:
        srv = listener_on(port)
        # One socket closed at once after the peer's FIN, one after 0.8 s in CLOSE_WAIT.
        quick_client, quick = pair(srv)
        late_client, late = pair(srv)
        quick_client.close()
        late_client.close()
        assert wait_for(lambda: ss.count(port, "close-wait") == 2, timeout=2)
        quick.close()
        entered = time.monotonic_ns()
        time.sleep(0.8)
        assert ss.count(port, "close-wait") == 1  # ground truth: still in CLOSE_WAIT
        late_port = late.getpeername()[1]
        late.close()
        waited = time.monotonic_ns() - entered
        wait_for(lambda: bool(t.flagged(me)), timeout=2)
        flagged = [e for e in t.flagged(me) if e.sport == port]
        srv.close()
    (ev,) = flagged
    assert ev.flags == CloseFlag.LATE_CLOSE_WAIT
    assert ev.dport == late_port
    assert ev.state is TcpState.CLOSE_WAIT
    assert ev.in_state_ns is not None and 0.8 * S <= ev.in_state_ns <= waited + 100 * MS


def test_shutdown_and_close_range_count_only_on_tcp(port: int) -> None:
    me = os.getpid()
    with tracer() as t:
        srv = listener_on(port)
        client, server = pair(srv)
        client.shutdown(socket.SHUT_WR)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with pytest.raises(OSError):
            udp.shutdown(socket.SHUT_RDWR)  # not connected: and not TCP, not counted
        udp.close()
        # close_range over a TCP socket counts; over pipes, or with CLOEXEC, it does not.
        fd = server.detach()
        assert close_range(fd, fd) == 0
        r, w = os.pipe()
        assert close_range(min(r, w), max(r, w)) == 0
        other_client, other = pair(srv)
        ofd = other.detach()
        assert close_range(ofd, ofd, CLOSE_RANGE_CLOEXEC) == 0  # marks, does not close
        os.close(ofd)
        client.close()
        other_client.close()
        srv.close()
        rows = t.rows(me)
    assert rows[Op.SHUTDOWN].count == 1
    assert rows[Op.CLOSE_RANGE].count == 1
    # client, other (via os.close), other_client, srv
    assert rows[Op.CLOSE].count == 4


def test_pid_filter_and_stacks_name_the_code_path(port: int, fixture_bin: FixtureBuilder) -> None:
    exe = fixture_bin("closelat_closer")
    srv = listener_on(port)
    srv.setblocking(False)
    child = subprocess.Popen(
        [str(exe), str(port), "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        with tracer(EventFilter(pids=frozenset({child.pid})), stacks=True) as t:
            child.stdin.write("g")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "done"
            accepted = []
            while True:
                try:
                    accepted.append(srv.accept()[0])
                except BlockingIOError:
                    break
            for s in accepted:
                s.close()  # this process: filtered out by --pid
            rows = [r for r in t.reader.rows()]
        assert {r.key.pid for r in rows} == {child.pid}
        assert sum(r.count for r in rows) == 5  # 5 TCP closes; file, pipe, UDP not counted
        frames = [f for r in rows for f in r.key.stack]
        assert any(f.startswith("close_tcp_socket+") for f in frames), frames
    finally:
        child.kill()
        child.wait()
        srv.close()


@pytest.mark.parametrize("window", ["interval", "cumulative"])
def test_cli_json_counts_exactly_the_fixture_closes(
    port: int, fixture_bin: FixtureBuilder, tcptrace_cmd: list[str], window: str
) -> None:
    exe = fixture_bin("closelat_closer")
    srv = listener_on(port)
    child = subprocess.Popen(
        [str(exe), str(port), "7"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    tool = None
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "ready"
        tool = subprocess.Popen(
            [
                *tcptrace_cmd,
                "closelat",
                "--pid",
                str(child.pid),
                "--json",
                "--interval",
                "0.2",
                "--duration",
                "4",
                *(["--cumulative"] if window == "cumulative" else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert tool.stdout is not None
        header = json.loads(tool.stdout.readline())  # written once attached
        assert header["type"] == "header" and header["command"] == "closelat"
        child.stdin.write("g")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        out, err = tool.communicate(timeout=30)
        assert tool.returncode == 0, err
    finally:
        child.kill()
        child.wait()
        srv.close()
        if tool is not None and tool.poll() is None:
            tool.kill()
    objs = [json.loads(line) for line in out.splitlines()]
    summary = objs[-1]
    assert summary["type"] == "summary" and summary["lost"] == 0
    assert summary["calls"] == 7
    (proc,) = summary["processes"]
    assert proc["pid"] == child.pid and proc["call"] == "close" and proc["count"] == 7
    reports = [o for o in objs if o["type"] == "closelat"]
    assert reports and all(r["window"] == window for r in reports)
    counts = [sum(p["count"] for p in r["processes"]) for r in reports]
    if window == "interval":
        assert sum(counts) == 7  # the intervals add up to the total
    else:
        assert counts == sorted(counts) and counts[-1] == 7


def test_port_and_family_filters_apply_to_the_socket_closed(port: int) -> None:
    me = os.getpid()
    other_port = free_port()
    with tracer(EventFilter(ports=frozenset({port}))) as t:
        srv, other = listener_on(port), listener_on(other_port)
        for listener in (srv, other, other):
            client, server = pair(listener)
            client.close()
            server.close()
        other.close()
        srv.close()
        rows = t.rows(me)
    # client and server of the one pair on `port`, and its listener; nothing of other_port.
    assert rows[Op.CLOSE].count == 3


def test_ipv6_closes_are_counted_and_flagged_with_their_addresses() -> None:
    me = os.getpid()
    v6_port = free_port(socket.AF_INET6)
    with tracer(EventFilter(family=6)) as t:
        srv = socket.socket(socket.AF_INET6)
        srv.bind(("::1", v6_port))
        srv.listen()
        client = socket.create_connection(("::1", v6_port))
        server, _ = srv.accept()
        client.sendall(b"unread")
        assert wait_for(lambda: len(server.recv(8, socket.MSG_PEEK)) > 0, timeout=2)
        server.close()  # unread data: reset
        with pytest.raises(ConnectionResetError):
            client.settimeout(2)
            client.recv(10)
        client.close()
        # IPv4 closes are filtered out by -6.
        v4 = listener_on(free_port())
        c4, s4 = pair(v4)
        c4.close()
        s4.close()
        v4.close()
        srv.close()
        wait_for(lambda: bool(t.flagged(me)), timeout=2)
        flagged = t.flagged(me)
        rows = t.rows(me)
    assert rows[Op.CLOSE].count == 3
    (ev,) = flagged
    assert ev.family == 6 and ev.saddr == "::1" and ev.daddr == "::1"
    assert ev.sport == v6_port and CloseFlag.RESET in ev.flags
