"""`tcptrace timewait` against the real kernel, with `ss` and the peers' own clocks as ground truth.

Each test runs the CLI (`--json --events`) filtered by a fresh port, and a server and a
client in separate processes on a loopback address of its own (127.201.x.y), so that other
engineers' traffic on the same host (even on the same port number) is told apart by remote
endpoint and pid. /proc/net/sockstat is host-wide and busy here, so the TIME_WAIT ground
truth is `ss` filtered by our endpoint (TIME_WAIT lasts 60 s: every socket a test created
is still listed when it checks).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tcptrace.system.netstat import parse_netstat, parse_sockstat_tw
from tests.integration.helpers import free_port

PEER = Path(__file__).parent / "fixtures" / "tw_peer.py"


def loopback_host() -> str:
    return f"127.201.{random.randint(1, 254)}.{random.randint(1, 254)}"


@dataclass
class Run:
    header: dict[str, Any]
    intervals: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def process(self, pid: int) -> dict[str, Any]:
        for row in self.summary["by_process"]:
            if row["pid"] == pid:
                return dict(row)
        return {"pid": pid, "created": 0, "parked_fin_wait2": 0, "resets_sent": 0, "resets_received": 0}

    def remote(self, endpoint: str) -> int:
        return sum(r["created"] for r in self.summary["by_remote"] if r["remote"] == endpoint)

    def our_events(self, host: str, port: int, what: str) -> list[dict[str, Any]]:
        def ours(e: dict[str, Any]) -> bool:
            return (e["daddr"] == host and e["dport"] == port) or (e["saddr"] == host and e["sport"] == port)

        return [e for e in self.events if e["what"] == what and ours(e)]


class Tracer:
    """`tcptrace timewait --json --events` as a subprocess, stopped with SIGINT."""

    def __init__(self, cmd: list[str], port: int, interval: float = 1.0) -> None:
        self.proc = subprocess.Popen(
            [*cmd, "timewait", "--port", str(port), "--json", "--events", "--interval", str(interval)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()  # written once the programs are attached
        if not first:
            self.proc.wait(timeout=10)
            raise AssertionError(f"tcptrace timewait failed: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.header = json.loads(first)
        # Read as it is written: a full pipe would hold the tracer up.
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> Run:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        assert self.proc.returncode == 0, err
        run = Run(self.header)
        for line in self.lines:
            obj = json.loads(line)
            if obj["type"] == "interval":
                run.intervals.append(obj)
            elif obj["type"] == "timewait":
                run.events.append(obj)
            elif obj["type"] == "summary":
                run.summary = obj
        assert run.summary, "no summary line"
        return run


@dataclass
class Peers:
    server_pid: int
    client_pid: int
    closes_ns: list[int]
    local_ports: list[int]


def breakdown(run: Run) -> str:
    """What to look at when a count is off: the summary's counts and the events by kind and pid."""
    keys = (
        "created_total",
        "immediate",
        "converted_at_fin",
        "converted_at_timer",
        "parked_fin_wait2",
        "pending_fin_wait2",
        "lost",
    )
    kinds = Counter((e["what"], e["substate"], e["pid"]) for e in run.events)
    return (
        f"{ {k: run.summary.get(k) for k in keys} } kernel={run.summary.get('kernel')} events={dict(kinds)}"
    )


def run_peers(
    host: str,
    port: int,
    n: int,
    server_mode: str,
    client_mode: str,
    rate: float | None = None,
    prefix: tuple[str, ...] = (),
) -> Peers:
    server = subprocess.Popen(
        [*prefix, sys.executable, str(PEER), "server", host, str(port), str(n), server_mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready"
    args = [*prefix, sys.executable, str(PEER), "client", host, str(port), str(n), client_mode]
    if rate:
        args.append(str(rate))
    client = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    out, _ = client.communicate(timeout=120)
    assert client.returncode == 0
    server.communicate(timeout=120)
    assert server.returncode == 0
    rows = [line.split() for line in out.splitlines()]
    return Peers(server.pid, client.pid, [int(r[0]) for r in rows], [int(r[1]) for r in rows])


def ss_count(host: str, port: int, state: str, reads: int = 3) -> int:
    """Sockets of our endpoint in ``state``, the most of a few reads: a netlink dump of the
    socket hash is not atomic, and on this shared host other tests' churn can make one
    dump skip a few sockets (TIME_WAIT lasts 60 s, so a socket seen once is there)."""
    best = 0
    for _ in range(reads):
        out = subprocess.run(
            ["ss", "-tanH", "state", state, f"( dst {host}:{port} or src {host}:{port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        best = max(best, sum(1 for line in out.splitlines() if line.strip()))
    return best


def assert_alive_matches_ss(
    run: Run, host: str, port: int, created: int, peers: Peers, ss_host: str | None = None
) -> None:
    """ss lists the TIME_WAIT sockets alive now: exactly those created minus those that ended early.

    tcp_tw_reuse (2: loopback) lets connect() take a port whose TIME_WAIT socket dates
    from an earlier second, and a SYN or RST on the same 4-tuple ends one too; tcptrace
    reports each such end (KILLED events, plus kills the kernel side had not settled when
    it stopped). Every reused local port of the client is one such end at least. Under
    heavy reuse a killed socket's memory holds the next one of the same port within a
    millisecond: the paced test checks that such kills are still counted.
    """
    killed = run.summary["ended_early"]
    assert killed >= len(run.our_events(host, port, "KILLED"))
    reused = len(peers.local_ports) - len(set(peers.local_ports))
    assert killed >= reused, breakdown(run)
    alive = ss_count(ss_host or host, port, "time-wait")
    assert alive == created - killed, breakdown(run)


N = 200


def test_client_closed_connections_counted_exactly_and_attributed_to_client(
    tcptrace_cmd: list[str], port: int, ss: object
) -> None:
    host = loopback_host()
    tracer = Tracer(tcptrace_cmd, port)
    peers = run_peers(host, port, N, "eof", "first")
    time.sleep(0.5)  # the last FINs reach their sockets
    run = tracer.stop()

    assert_alive_matches_ss(run, host, port, N, peers)
    assert ss_count(host, port, "fin-wait-2") == 0
    assert run.remote(f"{host}:{port}") == N, breakdown(run)
    client = run.process(peers.client_pid)
    assert client["created"] == N, breakdown(run)
    assert run.process(peers.server_pid)["created"] == 0
    # Each one counted once, by an event carrying the client as owner.
    counted = [
        e
        for e in run.our_events(host, port, "CREATED") + run.our_events(host, port, "CONVERTED")
        if e["substate"] == "TIME_WAIT"
    ]
    assert len(counted) == N
    assert {e["pid"] for e in counted} == {peers.client_pid}
    assert len({e["sport"] for e in counted}) == N
    assert run.summary["lost"] == 0
    assert run.summary["created_total"] >= N


def test_server_closed_connections_counted_on_the_server_side(
    tcptrace_cmd: list[str], port: int, ss: object
) -> None:
    host = loopback_host()
    tracer = Tracer(tcptrace_cmd, port)
    peers = run_peers(host, port, N, "first", "eof")
    time.sleep(0.5)
    run = tracer.stop()

    # A client SYN may reuse the 4-tuple of a server-side TIME_WAIT socket and end it.
    assert_alive_matches_ss(run, host, port, N, peers)
    server = run.process(peers.server_pid)
    assert server["created"] == N, breakdown(run)
    assert run.process(peers.client_pid)["created"] == 0
    counted = [
        e
        for e in run.our_events(host, port, "CREATED") + run.our_events(host, port, "CONVERTED")
        if e["substate"] == "TIME_WAIT"
    ]
    assert len(counted) == N
    assert all(e["saddr"] == host and e["sport"] == port for e in counted)
    assert {e["pid"] for e in counted} == {peers.server_pid}


def test_resets_are_not_time_wait_and_are_counted_with_their_sender(
    tcptrace_cmd: list[str], port: int, ss: object
) -> None:
    host = loopback_host()
    n = 50
    tracer = Tracer(tcptrace_cmd, port)
    peers = run_peers(host, port, n, "eof", "linger0")
    time.sleep(0.3)
    run = tracer.stop()

    assert ss_count(host, port, "time-wait") == 0
    assert run.remote(f"{host}:{port}") == 0
    client = run.process(peers.client_pid)
    assert client["created"] == 0
    assert client["resets_sent"] == n
    assert run.process(peers.server_pid)["resets_received"] == n
    sent = run.our_events(host, port, "RESET_SENT")
    assert len(sent) == n
    assert {e["pid"] for e in sent} == {peers.client_pid}


def test_orphaned_fin_wait2_timeout_is_not_time_wait(tcptrace_cmd: list[str], port: int, ss: object) -> None:
    host = loopback_host()
    n = 20
    tracer = Tracer(tcptrace_cmd, port)
    # The client closes with TCP_LINGER2 1 s; the server keeps every connection open
    # for 2.5 s, so each client socket is parked in FIN_WAIT2 and dies there.
    peers = run_peers(host, port, n, "hold:2500", "linger2:1")
    time.sleep(0.3)
    run = tracer.stop()

    assert ss_count(host, port, "time-wait") == 0
    assert ss_count(host, port, "fin-wait-2") == 0
    client = run.process(peers.client_pid)
    assert client["created"] == 0
    assert client["parked_fin_wait2"] == n
    ended = run.our_events(host, port, "PARKED_ENDED")
    assert len(ended) == n
    assert {e["pid"] for e in ended} == {peers.client_pid}
    assert all(e["age_ns"] >= 900_000_000 for e in ended)  # lived ~TCP_LINGER2, not 60 s
    assert run.our_events(host, port, "CONVERTED") == []
    assert run.remote(f"{host}:{port}") == 0


def test_paced_run_rate_matches_the_pace(tcptrace_cmd: list[str], port: int, ss: object) -> None:
    host = loopback_host()
    rate, seconds = 500, 5
    tracer = Tracer(tcptrace_cmd, port, interval=1.0)
    peers = run_peers(host, port, rate * seconds, "eof", "first", rate=rate)
    time.sleep(1.5)
    run = tracer.stop()

    closes = sorted(peers.closes_ns)
    assert len(closes) == rate * seconds
    # Port reuse is heavy here (hundreds of reused ports, each an early end).
    assert_alive_matches_ss(run, host, port, rate * seconds, peers)
    assert run.remote(f"{host}:{port}") == rate * seconds, breakdown(run)
    # Intervals entirely inside the run, against the client's own close() times.
    inside = [
        iv
        for iv in run.intervals
        if iv["ts_ns"] - iv["interval_s"] * 1e9 >= closes[0] and iv["ts_ns"] <= closes[-1]
    ]
    assert len(inside) >= seconds - 2
    for iv in inside:
        start = iv["ts_ns"] - int(iv["interval_s"] * 1e9)
        truth = sum(1 for t in closes if start <= t < iv["ts_ns"])
        ours = next((r["created"] for r in iv["by_remote"] if r["remote"] == f"{host}:{port}"), 0)
        assert abs(ours - truth) <= max(3, 0.02 * truth), (iv, truth)
    pace = (len(closes) - 1) / ((closes[-1] - closes[0]) / 1e9)
    reported = sum(
        next((r["created"] for r in iv["by_remote"] if r["remote"] == f"{host}:{port}"), 0) for iv in inside
    ) / sum(iv["interval_s"] for iv in inside)
    assert reported == pytest.approx(pace, rel=0.03)


@pytest.fixture
def netns() -> Iterator[str]:
    """A private network namespace with lo up: its /proc/net/sockstat and netstat are
    quiet (only this test's sockets), unlike the host's."""
    if shutil.which("ip") is None:
        pytest.skip("needs ip (iproute2)")
    name = f"tcptrace-tw-{random.randint(0, 1 << 30)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(name: str, *cmd: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", name, *cmd], capture_output=True, text=True, check=True
    ).stdout


def test_creations_equal_the_sockstat_tw_delta_of_a_quiet_namespace(
    tcptrace_cmd: list[str], port: int, netns: str
) -> None:
    # No port reuse here, so every TIME_WAIT socket created is still there at the end.
    in_netns(netns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=0")
    before = parse_sockstat_tw(in_netns(netns, "cat", "/proc/net/sockstat"))
    tracer = Tracer(tcptrace_cmd, port)
    peers = run_peers("127.0.0.1", port, N, "eof", "first", prefix=("ip", "netns", "exec", netns))
    time.sleep(0.5)
    run = tracer.stop()

    after = parse_sockstat_tw(in_netns(netns, "cat", "/proc/net/sockstat"))
    assert run.process(peers.client_pid)["created"] == N, breakdown(run)
    # sockstat counts every tw alive (both substates; all are TIME_WAIT here, see ss);
    # with no port reuse, one ends early only on an RST or a SYN, reported as KILLED.
    alive = N - run.summary["ended_early"]  # (KILLED events and kills not settled at stop)
    assert after - before == alive
    tw = in_netns(netns, "ss", "-tanH", "state", "time-wait")
    assert sum(1 for line in tw.splitlines() if line.strip()) == after - before
    assert run.process(peers.server_pid)["created"] == 0


def test_tw_bucket_overflow_is_not_counted_as_time_wait(
    tcptrace_cmd: list[str], port: int, netns: str
) -> None:
    """Past tcp_max_tw_buckets the kernel skips TIME_WAIT (TCPTimeWaitOverflow): no tw, no count."""
    limit, n = 5, 30
    in_netns(netns, "sysctl", "-qw", f"net.ipv4.tcp_max_tw_buckets={limit}")
    in_netns(netns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=0")
    overflow_before = parse_netstat(in_netns(netns, "cat", "/proc/net/netstat"))["TcpExt"][
        "TCPTimeWaitOverflow"
    ]
    tracer = Tracer(tcptrace_cmd, port)
    peers = run_peers("127.0.0.1", port, n, "eof", "first", prefix=("ip", "netns", "exec", netns))
    time.sleep(0.5)
    run = tracer.stop()

    tws = parse_sockstat_tw(in_netns(netns, "cat", "/proc/net/sockstat"))
    overflow = parse_netstat(in_netns(netns, "cat", "/proc/net/netstat"))["TcpExt"]["TCPTimeWaitOverflow"]
    assert tws == limit
    assert overflow - overflow_before == n - limit
    assert run.process(peers.client_pid)["created"] == limit, breakdown(run)


def test_ipv6_client_closed_connections(tcptrace_cmd: list[str], ss: object) -> None:
    port = free_port(socket.AF_INET6)
    n = 50
    tracer = Tracer(tcptrace_cmd, port)
    peers = run_peers("::1", port, n, "eof", "first")
    time.sleep(0.5)
    run = tracer.stop()

    assert_alive_matches_ss(run, "::1", port, n, peers, ss_host="[::1]")
    assert run.remote(f"[::1]:{port}") == n, breakdown(run)
    assert run.process(peers.client_pid)["created"] == n
    counted = [
        e
        for e in run.our_events("::1", port, "CREATED") + run.our_events("::1", port, "CONVERTED")
        if e["substate"] == "TIME_WAIT"
    ]
    assert len(counted) == n and all(e["family"] == 6 for e in counted)


def test_counts_stay_exact_when_the_event_stream_overflows(port: int, ss: object) -> None:
    """A one-page ring buffer nobody reads: events are lost, the kernel's counters are not."""
    from tcptrace.kernel.timewait import TimewaitReader
    from tcptrace.model.filters import EventFilter
    from tests.integration.helpers import load_parts

    host, n = loopback_host(), 500
    program = load_parts(("timewait",), EventFilter(ports=frozenset([port])), ringbuf_pages=1)
    try:
        reader = TimewaitReader(program)
        peers = run_peers(host, port, n, "eof", "first")
        time.sleep(0.5)
        counts = reader.counts()
        lost = program.counters()["lost"]
    finally:
        program.close()
    assert lost > 0  # the stream did overflow
    client = next(c for proc, c in counts.by_process.items() if proc.pid == peers.client_pid)
    assert client.created == n
    assert sum(c for d, c in counts.by_dest.items() if (d.raddr, d.rport) == (host, port)) == n
