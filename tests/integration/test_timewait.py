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
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tcptrace.export.prometheus import sample_value
from tcptrace.system.netstat import parse_netstat, parse_sockstat_tw
from tests.integration import helpers
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
    """`tcptrace timewait --json --events` as a subprocess, stopped with SIGINT. Without
    ``events`` it counts from the kernel's maps alone (no event crosses)."""

    def __init__(
        self, cmd: list[str], port: int, interval: float = 1.0, events: bool = True, cwd: str | None = None
    ) -> None:
        args = [*cmd, "timewait", "--port", str(port), "--json", "--interval", str(interval)]
        self.proc = subprocess.Popen(
            [*args, "--events"] if events else args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
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


def expected(run: Run, n: int) -> int:
    """``n`` creations, less those the kernel side says it may have missed: `closed_no_tw`
    counts the FIN_WAIT2/CLOSING -> CLOSE of the filter's sockets for which timer_start
    announced no tw. These workloads make none without a tw (no reset, no overflow), so
    each is a tw whose timer_start the program did not see (docs/timewait.md, "Still open":
    about 1 in 10,000 once, never explained). A test may come short by those only, and
    says so; any other shortfall fails."""
    missed = int(run.summary.get("kernel", {}).get("closed_no_tw", 0))
    if missed:
        warnings.warn(f"{missed} of {n} sockets closed with no TIME_WAIT creation seen", stacklevel=2)
    return n - missed


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
    no_tw = run.summary.get("kernel", {}).get("closed_no_tw")
    kinds = Counter((e["what"], e["substate"], e["pid"]) for e in run.events)
    return (
        f"{ {k: run.summary.get(k) for k in keys} } closed_no_tw={no_tw} kernel={run.summary.get('kernel')} "
        f"events={dict(kinds)}"
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
    want = expected(run, N)
    assert run.remote(f"{host}:{port}") == want, breakdown(run)
    client = run.process(peers.client_pid)
    assert client["created"] == want, breakdown(run)
    assert run.process(peers.server_pid)["created"] == 0
    # Each one counted once, by an event carrying the client as owner.
    counted = [
        e
        for e in run.our_events(host, port, "CREATED") + run.our_events(host, port, "CONVERTED")
        if e["substate"] == "TIME_WAIT"
    ]
    assert len(counted) == want
    assert {e["pid"] for e in counted} == {peers.client_pid}
    assert len({e["sport"] for e in counted}) == want
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
    want = expected(run, N)
    assert server["created"] == want, breakdown(run)
    assert run.process(peers.client_pid)["created"] == 0
    counted = [
        e
        for e in run.our_events(host, port, "CREATED") + run.our_events(host, port, "CONVERTED")
        if e["substate"] == "TIME_WAIT"
    ]
    assert len(counted) == want
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
    assert run.remote(f"{host}:{port}") == expected(run, rate * seconds), breakdown(run)
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
    assert run.process(peers.client_pid)["created"] == expected(run, N), breakdown(run)
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
    # The closes past the limit made no tw: each is counted as a close with no tw.
    assert run.summary["kernel"]["closed_no_tw"] == n - limit, breakdown(run)


def test_ipv6_client_closed_connections(tcptrace_cmd: list[str], ss: object) -> None:
    port = free_port(socket.AF_INET6)
    n = 50
    tracer = Tracer(tcptrace_cmd, port)
    peers = run_peers("::1", port, n, "eof", "first")
    time.sleep(0.5)
    run = tracer.stop()

    assert_alive_matches_ss(run, "::1", port, n, peers, ss_host="[::1]")
    want = expected(run, n)
    assert run.remote(f"[::1]:{port}") == want, breakdown(run)
    assert run.process(peers.client_pid)["created"] == want
    counted = [
        e
        for e in run.our_events("::1", port, "CREATED") + run.our_events("::1", port, "CONVERTED")
        if e["substate"] == "TIME_WAIT"
    ]
    assert len(counted) == want and all(e["family"] == 6 for e in counted)


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


def test_a_full_tw_table_is_counted_never_silent(port: int, ss: object) -> None:
    """`tws` with 16 entries and 50 TIME_WAIT sockets alive at once: inserts fail, each
    counted (`tws_failed`, the summary's `map_failed`), and the creations short are no more
    than those failures (a tw created in TIME_WAIT is counted before its insert)."""
    from tcptrace.kernel.timewait import TimewaitReader
    from tcptrace.model.filters import EventFilter
    from tests.integration.helpers import load_parts

    host, n, size = loopback_host(), 50, 16
    program = load_parts(("timewait",), EventFilter(ports=frozenset([port])), defines={"TT_MAX_TW": size})
    try:
        reader = TimewaitReader(program)
        run_peers(host, port, n, "eof", "first")
        time.sleep(0.5)
        stats = reader.stats()
    finally:
        program.close()
    # 50 alive at once in 16 entries: inserts fail (how many depends on when tws die and
    # free their entries), and each creation not counted is one of those failures.
    assert stats["tws_failed"] > 0, stats
    assert stats["map_failed"] >= stats["tws_failed"]
    assert n - stats["created"] <= stats["tws_failed"], stats


# --- pid reuse, network namespaces, no symbol address, capabilities -------------------------


def test_a_reused_pid_is_counted_as_another_process(
    tcptrace_cmd: list[str], port: int, fixture_bin: helpers.FixtureBuilder
) -> None:
    """Process twA makes 50 TIME_WAIT sockets and exits; twB gets its pid and makes 50
    more: `timewait` (from its maps, no events) and the agent report twA 50 and twB 50.

    The pid reused is the kernel's (what BPF sees), so it is taken with clone3's set_tid
    (fixtures/pid_exec.c): a pid namespace's ns_last_pid only picks the pid inside that
    namespace, while the process gets a new one in the host's."""
    from tests.integration.test_agent import agent, scrape

    pid_exec = fixture_bin("pid_exec")
    host = loopback_host()
    metrics = helpers.free_port()
    client = [sys.executable, str(PEER), "client", host, str(port), "50", "first"]
    with agent(tcptrace_cmd, metrics, "--port", str(port)):
        tracer = Tracer(tcptrace_cmd, port, events=False)
        server = subprocess.Popen(
            [sys.executable, str(PEER), "server", host, str(port), "100", "eof"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        tw_a = subprocess.Popen(client, env={**os.environ, "TW_PEER_COMM": "twA"}, stdout=subprocess.PIPE)
        tw_a.communicate(timeout=60)
        assert tw_a.returncode == 0
        reuse = subprocess.run(
            [str(pid_exec), str(tw_a.pid), *client],
            env={**os.environ, "TW_PEER_COMM": "twB"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert reuse.returncode == 0, reuse.stderr
        server.communicate(timeout=60)
        time.sleep(1.0)  # the last FINs; the agent's next refresh
        metrics_text = scrape(metrics)
        run = tracer.stop()

    rows = [r for r in run.summary["by_process"] if r["pid"] == tw_a.pid]
    assert sorted((r["comm"], r["created"]) for r in rows) == [("twA", 50), ("twB", 50)], breakdown(run)
    starts = {r["pid_start_ns"] for r in rows}
    assert len(starts) == 2 and None not in starts
    assert run.summary["events_created"] == 0  # counted from the maps: no event crossed
    created = "tcptrace_timewait_created_by_process_total"
    assert sample_value(metrics_text, created, {"pid": str(tw_a.pid), "comm": "twA"}) == 50
    assert sample_value(metrics_text, created, {"pid": str(tw_a.pid), "comm": "twB"}) == 50
    # close() latency is keyed by the process's start too: each program's 50 calls its own.
    closes = "tcptrace_close_duration_seconds_count"
    for comm in ("twA", "twB"):
        labels = {"pid": str(tw_a.pid), "comm": comm, "call": "close"}
        assert sample_value(metrics_text, closes, labels) == 50, (comm, metrics_text)


@pytest.fixture
def two_netns() -> Iterator[tuple[str, str]]:
    """Two network namespaces with lo up: the same addresses (127.0.0.1) in both."""
    if shutil.which("ip") is None:
        pytest.skip("needs ip (iproute2)")
    base = f"tcptrace-tw-{random.randint(0, 1 << 30)}"
    names = (f"{base}-a", f"{base}-b")
    made: list[str] = []
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield names
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


def test_equal_addresses_in_two_network_namespaces_stay_apart(
    tcptrace_cmd: list[str], port: int, two_netns: tuple[str, str]
) -> None:
    """Issue 17: a client and a server on 127.0.0.1:PORT in each of two namespaces (two
    pods with the same addresses): timewait's remotes carry each namespace's inode with its
    own count, and the agent's per-port series holds both (not one written over the other)."""
    from tests.integration.test_agent import agent, scrape

    a, b = two_netns
    inode = {name: os.stat(f"/run/netns/{name}").st_ino for name in two_netns}
    metrics = helpers.free_port()
    with agent(tcptrace_cmd, metrics, "--port", str(port)):
        tracer = Tracer(tcptrace_cmd, port, events=False)
        peers_a = run_peers("127.0.0.1", port, 30, "eof", "first", prefix=("ip", "netns", "exec", a))
        peers_b = run_peers("127.0.0.1", port, 20, "eof", "first", prefix=("ip", "netns", "exec", b))
        time.sleep(1.0)
        metrics_text = scrape(metrics)
        run = tracer.stop()

    ours = sorted(
        (r["netns"], r["created"]) for r in run.summary["by_remote"] if r["remote"] == f"127.0.0.1:{port}"
    )
    assert ours == sorted([(inode[a], 30), (inode[b], 20)]), breakdown(run)
    assert run.process(peers_a.client_pid)["created"] == 30
    assert run.process(peers_b.client_pid)["created"] == 20
    forecasts = {f["netns"] for f in run.summary["forecast"] if f["remote"] == f"127.0.0.1:{port}"}
    assert forecasts <= {inode[a], inode[b]}
    by_port = "tcptrace_timewait_created_by_remote_port_total"
    assert sample_value(metrics_text, by_port, {"remote_port": str(port)}) == 50


def kallsyms_address(name: str) -> int:
    with open("/proc/kallsyms") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 3 and fields[2] == name and int(fields[0], 16):
                return int(fields[0], 16)
    raise AssertionError(f"{name} not in /proc/kallsyms")


def test_the_tw_timer_handler_is_learned_in_the_kernel(port: int) -> None:
    """No symbol address is read: the first tw's confirmation teaches the program
    tw_timer_handler's address, the one /proc/kallsyms gives root."""
    from tcptrace.kernel.timewait import stats_of
    from tcptrace.model.filters import EventFilter
    from tests.integration.helpers import load_parts

    program = load_parts(("timewait",), EventFilter(ports=frozenset([port])))
    try:
        run_peers(loopback_host(), port, 5, "eof", "first")
        time.sleep(0.3)
        table = program.bpf["tw_fn"]
        learned = int(table[table.Key(0)].value)
        stats = stats_of(program)
    finally:
        program.close()
    assert learned == kallsyms_address("tw_timer_handler")
    assert stats["handler_learned"] == 1
    assert stats["created"] >= 5


def test_runs_with_the_documented_capabilities(tcptrace_cmd: list[str], port: int, ss: object) -> None:
    """As nobody with CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH only (no CAP_SYSLOG,
    so /proc/kallsyms shows zeros), timewait counts every creation."""
    from tests.integration.test_hardening import _setpriv

    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    exe = os.path.join(os.path.dirname(sys.executable), "tcptrace")
    host = loopback_host()
    tracer = Tracer([*_setpriv("bpf", "perfmon", "dac_read_search"), exe], port, events=False, cwd="/")
    peers = run_peers(host, port, 40, "eof", "first")
    time.sleep(0.5)
    run = tracer.stop()
    assert run.process(peers.client_pid)["created"] == 40, breakdown(run)
    assert run.remote(f"{host}:{port}") == 40
    assert run.summary["kernel"]["handler_learned"] == 1
