"""`tcptrace closewait` against real sockets, with `ss` and the fixture's own choices as truth.

leaky_server (fixtures/leaky_server.c) accepts connections whose clients close first;
a connection that starts with 'C' is closed DELAY ms after EOF by close_after_delay(),
one that starts with 'L' is leaked by leak_connection().
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tcptrace.system import cgroups
from tests.integration import helpers

DELAY_MS = 300
THRESHOLD = "1s"


@contextmanager
def leaky_server(exe: Path, port: int, own_cgroup: bool = False) -> Iterator[subprocess.Popen[str]]:
    """The fixture, listening; with ``own_cgroup`` moved into a new cgroup v2 of its own."""
    proc = subprocess.Popen(
        [str(exe), str(port), str(DELAY_MS)],
        stdout=subprocess.PIPE,
        text=True,
        # A perf map (removed below) and a "closed US" line per close (read by one test).
        env={**os.environ, "LEAKY_SERVER_PERF_MAP": "1", "LEAKY_SERVER_REPORT_CLOSES": "1"},
    )
    group: Path | None = None
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready and proc.stdout.readline().strip() == "ready", "leaky_server did not start"
        if own_cgroup:
            root = cgroups.cgroup2_root()
            assert root is not None, "no cgroup2 mount"
            group = Path(root) / f"tcptrace-test-{proc.pid}"
            group.mkdir()
            (group / "cgroup.procs").write_text(str(proc.pid))
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/tmp/perf-{proc.pid}.map")
        if group is not None:
            helpers.remove_cgroups(group)


def connect_all(port: int, kinds: str) -> list[tuple[str, socket.socket]]:
    """One connection per character of ``kinds``, each sending that character."""
    out = []
    for kind in kinds:
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(kind.encode())
        out.append((kind, c))
    return out


def close_all(port: int, ss: helpers.SS, conns: list[tuple[str, socket.socket]]) -> dict[str, set[int]]:
    """Wait until the server holds every connection, close the clients; their ports by kind."""
    assert helpers.wait_for(lambda: len(server_side(ss, port, "established")) == len(conns), timeout=10)
    time.sleep(0.2)  # the server's threads are now blocked reading, waiting for EOF
    ports: dict[str, set[int]] = {"C": set(), "L": set(), "J": set(), "W": set()}
    for kind, c in conns:
        ports[kind].add(c.getsockname()[1])
        c.close()
    return ports


def server_side(ss: helpers.SS, port: int, state: str) -> set[int]:
    """Remote ports of the server's sockets on ``port`` in ``state`` (ss filtered by sport)."""
    out = subprocess.run(
        ["ss", "-tanH", "state", state, f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    ports = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            ports.add(int(fields[-1].rsplit(":", 1)[1]))
    return ports


@contextmanager
def tracing(cmd: list[str], *args: str) -> Iterator[subprocess.Popen[str]]:
    """`tcptrace closewait --json ARGS`, once its header line says it is attached."""
    proc = subprocess.Popen(
        [*cmd, "closewait", "--json", "--threshold", THRESHOLD, "--interval", "0.5", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            raise AssertionError(f"tcptrace did not start: {proc.communicate()[1]}")
        assert json.loads(line)["type"] == "header"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop(proc: subprocess.Popen[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    objs = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert objs and objs[-1]["type"] == "summary", out[-500:]
    return objs[:-1], objs[-1]


def frames(stack: list[str]) -> str:
    return "\n".join(stack)


def test_leaks_are_timed_and_attributed_to_the_leaking_code_path(
    fixture_bin: helpers.FixtureBuilder, tcptrace_cmd: list[str], ss: helpers.SS, port: int
) -> None:
    n_close, n_leak = 5, 4
    exe = fixture_bin("leaky_server")
    with (
        tracing(tcptrace_cmd, "--port", str(port), "--recheck", "0.3") as tracer,
        leaky_server(exe, port, own_cgroup=True) as server,
    ):
        conns = connect_all(port, "CL" * n_leak + "C" * (n_close - n_leak))
        ports = close_all(port, ss, conns)
        # Ground truth: the leaked ones stay in CLOSE_WAIT, the others leave after DELAY.
        assert helpers.wait_for(lambda: server_side(ss, port, "close-wait") == ports["L"], timeout=10)
        time.sleep(1.3)  # past the threshold
        truth = server_side(ss, port, "close-wait")
        periodic, summary = stop(tracer)
        server_pid = server.pid
        assert server.stdout is not None
        took_us = [int(server.stdout.readline().split()[1]) for _ in range(n_close)]
        server_cgroup = cgroups.id_of_pid(server_pid)

    assert truth == ports["L"]
    assert summary["lost"] == 0
    # Rechecked against /proc every 0.3 s: nothing was missed, so nothing is repaired.
    assert summary["missed_exits"] == summary["missed_entries"] == 0
    assert isinstance(summary["skipped_transitions"], int)  # read from the kernel (5.12+)
    assert summary["entered"] == n_close + n_leak
    assert summary["closed"] == n_close
    assert summary["open"] == n_leak == len(truth)

    # Every leaked socket, and only those, by its remote port; owned by the server.
    sockets = summary["sockets"]
    assert {s["dport"] for s in sockets} == truth
    assert all(s["sport"] == port and s["pid"] == server_pid for s in sockets)
    assert all(s["suspect"] and s["eof_seen"] and not s["preexisting"] for s in sockets)

    groups = summary["groups"]
    assert sum(g["count"] for g in groups) == n_leak
    assert all(g["pid"] == server_pid and g["comm"] == "leaky_server" for g in groups)
    # The server's own cgroup, learned at accept (the FIN arrived in this test's context).
    assert server_cgroup is not None and server_cgroup != cgroups.id_of_pid(os.getpid())
    assert all(g["cgroup"] == server_cgroup for g in groups)
    assert all(g["cgroup_path"] == f"/tcptrace-test-{server_pid}" for g in groups)
    for g in groups:
        assert g["origin_op"] == "ACCEPT"
        assert g["last_touch_op"] == "RECV"
        assert "leak_connection" in frames(g["last_touch_stack"]), frames(g["last_touch_stack"])
        assert "close_after_delay" not in frames(g["last_touch_stack"])
        assert "accept" in frames(g["origin_stack"])
        assert g["remotes"]["dominant"] == "127.0.0.1"

    # The closed ones: timed from the FIN's arrival to close(). The fixture closed DELAY
    # after reading EOF and measured it; the FIN arrived just before the EOF read.
    ttc = summary["time_to_close"]
    assert ttc["count"] == n_close
    assert min(took_us) >= DELAY_MS * 1000
    assert ttc["min_s"] >= DELAY_MS / 1000
    assert ttc["min_s"] >= min(took_us) / 1e6 - 0.001, (ttc, took_us)
    assert ttc["max_s"] <= max(took_us) / 1e6 + 0.005, (ttc, took_us)

    # Periodic objects add up to the totals.
    ticks = [p for p in periodic if p["type"] == "closewait"]
    assert ticks
    assert sum(p["entered"] for p in ticks) <= summary["entered"]
    assert ticks[-1]["open"] == n_leak  # the last tick is > 1 s after the closes
    assert max(p["open"] for p in ticks) <= n_close + n_leak


def test_sockets_leaking_before_start_are_reported_with_their_owner(
    fixture_bin: helpers.FixtureBuilder, tcptrace_cmd: list[str], ss: helpers.SS, port: int
) -> None:
    exe = fixture_bin("leaky_server")
    with leaky_server(exe, port) as server:
        ports = close_all(port, ss, connect_all(port, "LLLC"))
        assert helpers.wait_for(lambda: server_side(ss, port, "close-wait") == ports["L"], timeout=10)
        with tracing(tcptrace_cmd, "--port", str(port)) as tracer:
            time.sleep(1.2)
            truth = server_side(ss, port, "close-wait")
            _, summary = stop(tracer)
        server_pid = server.pid
        server_cgroup = cgroups.id_of_pid(server_pid)

    assert truth == ports["L"]
    assert summary["open"] == summary["preexisting_open"] == 3
    assert server_cgroup is not None
    assert all(s["cgroup"] == server_cgroup for s in summary["sockets"])
    assert {s["dport"] for s in summary["sockets"]} == truth
    for s in summary["sockets"]:
        assert s["preexisting"] and s["at_least"]
        assert s["pid"] == server_pid and s["comm"] == "leaky_server"
        assert s["age_s"] >= 1.0
    (group,) = summary["groups"]
    assert group["count"] == 3 and group["pid"] == server_pid and group["at_least"]
    assert group["origin_stack"] == [] and group["last_touch_stack"] == []


def test_pid_filter_keeps_the_owners_sockets_whichever_task_ran_the_transition(
    fixture_bin: helpers.FixtureBuilder, tcptrace_cmd: list[str], ss: helpers.SS
) -> None:
    exe = fixture_bin("leaky_server")
    port_a, port_b = helpers.free_port(), helpers.free_port()
    with leaky_server(exe, port_a) as a, leaky_server(exe, port_b):
        # One of a's leaks exists before tracing starts, one comes later; b leaks too.
        early = close_all(port_a, ss, connect_all(port_a, "L"))
        assert helpers.wait_for(lambda: server_side(ss, port_a, "close-wait") == early["L"], timeout=10)
        args = ["--pid", str(a.pid), "--port", str(port_a), "--port", str(port_b), "--recheck", "0.3"]
        with tracing(tcptrace_cmd, *args) as tracer:
            late_a = close_all(port_a, ss, connect_all(port_a, "LC"))
            late_b = close_all(port_b, ss, connect_all(port_b, "LL"))
            want_a = early["L"] | late_a["L"]
            assert helpers.wait_for(lambda: server_side(ss, port_a, "close-wait") == want_a, timeout=10)
            assert helpers.wait_for(lambda: server_side(ss, port_b, "close-wait") == late_b["L"], timeout=10)
            time.sleep(1.2)
            _, summary = stop(tracer)
        pid_a = a.pid

    assert {s["dport"] for s in summary["sockets"]} == want_a
    assert all(s["pid"] == pid_a and s["sport"] == port_a for s in summary["sockets"])
    assert [s["preexisting"] for s in summary["sockets"]].count(True) == 1
    assert summary["entered"] == 2  # a's live ones; none of b's
    assert summary["missed_exits"] == summary["missed_entries"] == 0
    assert summary["closed"] == 1
    assert sum(g["count"] for g in summary["groups"]) == 2


def test_jit_frames_are_named_through_the_perf_map(
    fixture_bin: helpers.FixtureBuilder, tcptrace_cmd: list[str], ss: helpers.SS, port: int
) -> None:
    """A leak through code only /tmp/perf-PID.map names (as JIT runtimes write it)."""
    exe = fixture_bin("leaky_server")
    with tracing(tcptrace_cmd, "--port", str(port)) as tracer, leaky_server(exe, port) as server:
        assert os.path.exists(f"/tmp/perf-{server.pid}.map")
        ports = close_all(port, ss, connect_all(port, "JJL"))
        want = ports["J"] | ports["L"]
        assert helpers.wait_for(lambda: server_side(ss, port, "close-wait") == want, timeout=10)
        time.sleep(1.2)
        _, summary = stop(tracer)

    by_path = {g["count"]: frames(g["last_touch_stack"]) for g in summary["groups"]}
    assert sorted(by_path) == [1, 2], summary["groups"]
    jit, direct = by_path[2], by_path[1]
    # syscall, leak_connection, the trampoline (named by the perf map only), conn_thread.
    assert "jitted_leak_handler" in jit and "conn_thread" in jit, jit
    assert jit.index("leak_connection") < jit.index("jitted_leak_handler") < jit.index("conn_thread")
    assert "jitted_leak_handler" not in direct and "leak_connection" in direct


def test_bad_threshold_is_a_one_line_usage_error(tcptrace_cmd: list[str]) -> None:
    res = subprocess.run(
        [*tcptrace_cmd, "closewait", "--threshold", "soon"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "threshold" in res.stderr
    assert "Traceback" not in res.stderr


def test_ipv6_sockets_found_at_start_and_live(tcptrace_cmd: list[str]) -> None:
    """This test process is the server: it accepts, its peers close, it never closes."""
    port = helpers.free_port(socket.AF_INET6)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as srv:
        srv.bind(("::1", port))
        srv.listen()
        held: list[socket.socket] = []

        def leak_one() -> int:
            c = socket.create_connection(("::1", port), timeout=5)
            s, _ = srv.accept()
            held.append(s)
            peer = int(c.getsockname()[1])
            c.close()
            return peer

        early = leak_one()
        assert helpers.wait_for(lambda: server_side(helpers.SS(), port, "close-wait") == {early})
        with tracing(tcptrace_cmd, "--port", str(port), "-6", "--pid", str(os.getpid())) as tracer:
            late = leak_one()
            assert helpers.wait_for(lambda: server_side(helpers.SS(), port, "close-wait") == {early, late})
            time.sleep(1.2)
            _, summary = stop(tracer)
        for s in held:
            s.close()

    by_port = {s["dport"]: s for s in summary["sockets"]}
    assert set(by_port) == {early, late}
    assert by_port[early]["preexisting"] and not by_port[late]["preexisting"]
    for s in by_port.values():
        assert s["family"] == 6 and s["saddr"] == "::1" and s["daddr"] == "::1" and s["sport"] == port
        assert s["pid"] == os.getpid()
    assert summary["entered"] == 1


def test_client_side_leak_has_a_connect_origin(tcptrace_cmd: list[str], port: int) -> None:
    """The server closes first; this process's client socket is the one left in CLOSE_WAIT."""
    with socket.socket() as srv, tracing(tcptrace_cmd, "--port", str(port)) as tracer:
        srv.bind(("127.0.0.1", port))
        srv.listen()
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        s, _ = srv.accept()
        s.close()
        mine = c.getsockname()[1]

        def client_in_close_wait() -> bool:
            out = subprocess.run(
                ["ss", "-tanH", "state", "close-wait", f"( sport = :{mine} )"], capture_output=True, text=True
            ).stdout
            return len(out.splitlines()) == 1

        assert helpers.wait_for(client_in_close_wait, timeout=10)
        time.sleep(1.2)
        _, summary = stop(tracer)
        c.close()

    (sock,) = summary["sockets"]
    assert (sock["sport"], sock["dport"], sock["pid"]) == (mine, port, os.getpid())
    (group,) = summary["groups"]
    assert group["origin_op"] == "CONNECT" and group["pid"] == os.getpid()
    assert any("connect" in f for f in group["origin_stack"]), group["origin_stack"]


FORKING_SERVER = """
import os, signal, socket, sys, time
srv = socket.socket()
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen()
print("ready", flush=True)
conn, _ = srv.accept()
child = os.fork()
if child == 0:  # the child handles the connection: reads EOF, forgets to close
    while conn.recv(100):
        pass
    print("eof", flush=True)
    time.sleep(600)
    os._exit(0)
conn.close()  # the parent's copy: no state change, the child's fd keeps it open
print(child, flush=True)
time.sleep(600)
"""


def test_owner_follows_the_socket_into_a_forked_handler(
    tcptrace_cmd: list[str], ss: helpers.SS, port: int
) -> None:
    """accept() in the parent, then fork: the child that reads EOF and leaks is the owner."""
    server = subprocess.Popen(
        [sys.executable, "-c", FORKING_SERVER, str(port)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        with tracing(tcptrace_cmd, "--port", str(port)) as tracer:
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            child = int(server.stdout.readline())  # the parent prints it right after fork()
            mine = c.getsockname()[1]
            c.close()
            assert server.stdout.readline().strip() == "eof"
            assert helpers.wait_for(lambda: server_side(ss, port, "close-wait") == {mine})
            time.sleep(1.2)
            _, summary = stop(tracer)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()

    (sock,) = summary["sockets"]
    assert sock["dport"] == mine and sock["pid"] == child != server.pid
    (group,) = summary["groups"]
    assert group["pid"] == child and group["origin_op"] == "ACCEPT" and group["last_touch_op"] == "RECV"


@pytest.mark.parametrize("touch_stacks", [True, False])
def test_both_touches_and_the_pre_fin_one_on_by_default_with_a_port(
    fixture_bin: helpers.FixtureBuilder,
    tcptrace_cmd: list[str],
    ss: helpers.SS,
    port: int,
    touch_stacks: bool,
) -> None:
    """'W' connections get a reply and are then forgotten: no touch after the FIN. The last
    send/recv before the FIN is kept by default when --port narrows the run."""
    exe = fixture_bin("leaky_server")
    args = ["--port", str(port), *([] if touch_stacks else ["--no-touch-stacks"])]
    with tracing(tcptrace_cmd, *args) as tracer, leaky_server(exe, port):
        conns = connect_all(port, "WWL")
        for kind, c in conns:
            if kind == "W":
                assert c.recv(3) == b"ok\n"
        ports = close_all(port, ss, conns)
        want = ports["W"] | ports["L"]
        assert helpers.wait_for(lambda: server_side(ss, port, "close-wait") == want, timeout=10)
        time.sleep(1.2)
        _, summary = stop(tracer)

    groups = {g["count"]: g for g in summary["groups"]}
    assert sorted(groups) == [1, 2], summary["groups"]
    forgot, leaked = groups[2], groups[1]
    assert leaked["last_touch_op"] == "RECV" and "leak_connection" in frames(leaked["last_touch_stack"])
    assert leaked["post_fin_touch"]["op"] == "RECV" and leaked["post_fin_touch"]["ret"] == 0
    assert "leak_connection" in frames(leaked["post_fin_touch"]["stack"])
    assert forgot["post_fin_touch"] is None  # never touched after the FIN
    if touch_stacks:
        assert forgot["last_touch_op"] == "SEND", forgot
        assert "respond_and_forget" in frames(forgot["last_touch_stack"])
        assert forgot["pre_fin_touch"]["op"] == "SEND"
        assert "respond_and_forget" in frames(forgot["pre_fin_touch"]["stack"])
        # The leaked one's last touch before the FIN: the read of its request.
        assert leaked["pre_fin_touch"]["op"] == "RECV" and leaked["pre_fin_touch"]["ret"] > 0
    else:
        assert forgot["last_touch_op"] == "ACCEPT"
        assert "respond_and_forget" not in frames(forgot["last_touch_stack"])
        assert forgot["pre_fin_touch"] is None and leaked["pre_fin_touch"] is None
    assert {s["dport"] for s in summary["sockets"]} == want


@pytest.mark.parametrize("recheck", ["0.3", "0"])
def test_a_connection_older_than_tracing_is_attributed_from_its_seed(
    tcptrace_cmd: list[str], port: int, recheck: str
) -> None:
    """Established before tracing, then the peer closes: the owner seeded at start (from
    /proc/PID/fd) is the kernel's at the FIN, so `--pid` keeps it live, recheck or not.
    (Before seeding, only the /proc recheck could find it, as an "at least" age.)"""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", port))
        srv.listen()
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        s, _ = srv.accept()
        args = ["--pid", str(os.getpid()), "--port", str(port), "--recheck", recheck]
        with tracing(tcptrace_cmd, *args) as tracer:
            peer = c.getsockname()[1]
            c.close()
            assert helpers.wait_for(lambda: server_side(helpers.SS(), port, "close-wait") == {peer})
            time.sleep(1.5)
            _, summary = stop(tracer)
        s.close()

    (sock,) = summary["sockets"]
    assert (sock["dport"], sock["pid"], sock["at_least"]) == (peer, os.getpid(), False)
    assert summary["entered"] == 1 and summary["kernel"]["seeds_used"] >= 1
    assert summary["missed_entries"] == 0 and summary["missed_exits"] == 0
