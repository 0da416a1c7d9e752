"""`tcptrace agent` against the real kernel: scrape /metrics during fixture runs and check the
values against ground truth (ss, the connections we made), parsed with prometheus_client's
parser; SIGTERM stops it cleanly and detaches its programs; the label bound holds under
many short-lived processes.

Each test runs its own agent on its own loopback ports, filtered to the fixture's port
(everything but tcptrace_sockets, which is host-wide), so other tests on the host do not
disturb the counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcptrace.export.prometheus import sample_value
from tests.integration import helpers
from tests.integration.test_closewait import close_all, connect_all, leaky_server, server_side


@contextlib.contextmanager
def agent(
    cmd: list[str], metrics_port: int, *args: str, log: Path | None = None
) -> Iterator[subprocess.Popen[str]]:
    """`tcptrace agent` on 127.0.0.1:metrics_port, once it says it has started."""
    extra = ["--log", str(log)] if log is not None else []
    proc = subprocess.Popen(
        [*cmd, "agent", "--listen", f"127.0.0.1:{metrics_port}", "--interval", "0.3", *extra, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 120)
        line = proc.stderr.readline() if ready else ""
        if '"agent_started"' not in line:
            proc.kill()
            raise AssertionError(f"the agent did not start: {line}{proc.communicate()[1]}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def scrape(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def value(metrics_port: int, name: str, **labels: str) -> float | None:
    return sample_value(scrape(metrics_port), name, labels)


def eventually(
    metrics_port: int, name: str, expected: float, timeout: float = 10.0, **labels: str
) -> float | None:
    """Scrape until the sample has the expected value (the agent refreshes every 0.3 s)."""
    last: list[float | None] = [None]

    def check() -> bool:
        last[0] = value(metrics_port, name, **labels)
        return last[0] == expected

    helpers.wait_for(check, timeout=timeout, step=0.2)
    return last[0]


def our_prog_ids(pid: int) -> set[int]:
    """BPF programs whose fds the process holds (from /proc/PID/fdinfo)."""
    ids = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        with contextlib.suppress(OSError):
            for line in entry.read_text().splitlines():
                if line.startswith("prog_id:"):
                    ids.add(int(line.split()[1]))
    return ids


def loaded_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {int(p["id"]) for p in json.loads(out or "[]")}


def test_scrape_matches_ss_and_the_connections_made(
    fixture_bin: helpers.FixtureBuilder, tcptrace_cmd: list[str], ss: helpers.SS, port: int, tmp_path: Path
) -> None:
    """Leaks and closes against leaky_server: CLOSE_WAIT per process and over the threshold
    equal ss's count; TIME_WAIT creations by our process and by remote port equal the
    connections the client closed first and the server closed; close() count exact; the
    leak suspects are logged with their code path."""
    n_close, n_leak = 3, 5
    metrics = helpers.free_port()
    log = tmp_path / "suspects.jsonl"
    exe = fixture_bin("leaky_server")
    me = str(os.getpid())
    with (
        agent(
            tcptrace_cmd,
            metrics,
            "--port",
            str(port),
            "--threshold",
            "1s",
            "--states-interval",
            "0.3",
            log=log,
        ),
        leaky_server(exe, port) as server,
    ):
        sp = str(server.pid)
        conns = connect_all(port, "L" * n_leak + "C" * n_close)
        ports = close_all(port, ss, conns)
        assert helpers.wait_for(lambda: server_side(ss, port, "close-wait") == ports["L"], timeout=10)
        truth = len(server_side(ss, port, "close-wait"))
        assert truth == n_leak

        srv = {"pid": sp, "comm": "leaky_server"}
        assert eventually(metrics, "tcptrace_close_wait_sockets", truth, **srv) == truth
        # Past the 1 s threshold every leaked socket is a suspect.
        assert eventually(metrics, "tcptrace_close_wait_over_threshold_sockets", truth, **srv) == truth
        # The closed ones: the server's close() of each (its only TCP closes), and a
        # TIME_WAIT on our side for each (we closed first, then the server's FIN came).
        assert (
            eventually(metrics, "tcptrace_close_duration_seconds_count", n_close, call="close", **srv)
            == n_close
        )
        assert eventually(metrics, "tcptrace_timewait_created_by_process_total", n_close, pid=me) == n_close
        assert (
            eventually(
                metrics, "tcptrace_timewait_created_by_remote_port_total", n_close, remote_port=str(port)
            )
            == n_close
        )
        assert eventually(metrics, "tcptrace_timewait_created_total", n_close) == n_close
        assert eventually(metrics, "tcptrace_close_wait_entered_total", n_leak + n_close) == n_leak + n_close
        assert value(metrics, "tcptrace_close_wait_closed_total") == n_close

        text = scrape(metrics)
        # Sockets by state are host-wide (/proc): at least ours.
        assert (sample_value(text, "tcptrace_sockets", {"state": "CLOSE_WAIT"}) or 0) >= n_leak
        assert sample_value(text, "tcptrace_events_lost_total") == 0
        age = sample_value(text, "tcptrace_close_wait_oldest_age_seconds", srv)
        assert age is not None and age >= 1.0
        # Buckets of the age gauge histogram add up to the sockets.
        assert sample_value(text, "tcptrace_close_wait_age_seconds_bucket", {**srv, "le": "+Inf"}) == n_leak
        assert sample_value(text, "tcptrace_close_wait_age_seconds_bucket", {**srv, "le": "0.1"}) == 0
        assert (sample_value(text, "process_resident_memory_bytes") or 0) > 0
        assert helpers.wait_for(lambda: log.exists() and log.stat().st_size > 0, timeout=5)

    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    ours = [r for r in records if r["type"] == "leak_suspect" and r["pid"] == server.pid]
    assert ours and max(r["count"] for r in ours) == n_leak
    last = max(ours, key=lambda r: r["count"])
    assert last["comm"] == "leaky_server" and last["origin_op"] == "ACCEPT"
    assert any("leak_connection" in f for f in last["last_touch_stack"]), last["last_touch_stack"]
    assert sorted(last["ports"]) == [port]


def test_an_overflowing_socket_table_counts_what_it_evicted(
    fixture_bin: helpers.FixtureBuilder, tcptrace_cmd: list[str], ss: helpers.SS, port: int
) -> None:
    """More live sockets than --max-sockets holds (issue 18, item 5): the LRU table evicts
    owners, and every leak whose owner the kernel met evicted is counted in
    tcptrace_kernel_map_evictions_total{map="socks"}; none is silently without its owner."""
    n = 600  # 1,200 sockets on the port (client and server side) in a table of 1,024
    metrics = helpers.free_port()
    exe = fixture_bin("leaky_server")
    with (
        agent(tcptrace_cmd, metrics, "--port", str(port), "--max-sockets", "1024", "--threshold", "1s"),
        leaky_server(exe, port) as server,
    ):
        conns = connect_all(port, "L" * n)
        close_all(port, ss, conns)
        assert helpers.wait_for(lambda: len(server_side(ss, port, "close-wait")) == n, timeout=20)
        assert eventually(metrics, "tcptrace_close_wait_entered_total", n, timeout=20) == n
        text = scrape(metrics)
        srv = {"pid": str(server.pid), "comm": "leaky_server"}
        owned = int(sample_value(text, "tcptrace_close_wait_sockets", srv) or 0)
        evicted = int(sample_value(text, "tcptrace_kernel_map_evictions_total", {"map": "socks"}) or 0)
    assert evicted > 0, "1,200 sockets in a table of 1,024 and no eviction counted"
    # Each leak has its owner (kept, or relearned at the app's EOF read), or its loss counted.
    assert owned + evicted >= n, (owned, evicted)


def test_sigterm_stops_cleanly_and_detaches_everything(tcptrace_cmd: list[str], port: int) -> None:
    metrics = helpers.free_port()
    with agent(tcptrace_cmd, metrics, "--port", str(port)) as proc:
        ours = our_prog_ids(proc.pid)
        assert len(ours) >= 10, ours  # every tracepoint of four parts
        assert ours <= loaded_prog_ids()
        assert value(metrics, "tcptrace_events_lost_total") == 0
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    stopped = [json.loads(line) for line in err.splitlines() if '"agent_stopped"' in line]
    assert stopped == [{"type": "agent_stopped", "reason": "SIGTERM"}]
    assert "Traceback" not in err
    # The kernel frees a program after an RCU grace period once its last fd is closed:
    # gone within a few seconds of the process's exit, or still held by something.
    deadline = time.monotonic() + 5
    while ours & loaded_prog_ids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (ours & loaded_prog_ids()), "programs still loaded after SIGTERM"
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", metrics), timeout=2):
        pass


def serve_until_eof(lsock: socket.socket, stop: threading.Event) -> None:
    """Accept, read until the client's FIN, close: the client gets the TIME_WAIT."""
    lsock.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                while conn.recv(1024):
                    pass


def series(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = float(s.value)
    return out


def test_label_bound_holds_under_thirty_short_lived_processes(
    fixture_bin: helpers.FixtureBuilder, tcptrace_cmd: list[str], port: int
) -> None:
    """30 client processes each make 2 connections and close first; with --top-processes 5
    the per-process series stay at most 5 plus `other`, and still add up to all 60."""
    n_procs, per_proc, bound = 30, 2, 5
    exe = fixture_bin("connect_close")
    metrics = helpers.free_port()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(128)
    stop = threading.Event()
    server = threading.Thread(target=serve_until_eof, args=(lsock, stop), daemon=True)
    server.start()
    pids = []
    try:
        with agent(tcptrace_cmd, metrics, "--port", str(port), "--top-processes", str(bound)):
            for _ in range(n_procs):
                p = subprocess.Popen(
                    [str(exe), "127.0.0.1", str(port), str(per_proc)], stdin=subprocess.PIPE, text=True
                )
                p.communicate("go\nbye\n", timeout=30)
                assert p.returncode == 0
                pids.append(p.pid)
            total = n_procs * per_proc
            assert eventually(metrics, "tcptrace_timewait_created_total", total, timeout=15) == total
            time.sleep(1.0)  # a few more refreshes
            text = scrape(metrics)
    finally:
        stop.set()
        server.join(5)
        lsock.close()

    by_proc = series(text, "tcptrace_timewait_created_by_process_total")
    assert 1 <= len(by_proc) <= bound + 1, by_proc
    assert sum(by_proc.values()) == total
    other = {k: v for k, v in by_proc.items() if ("comm", "other") in k}
    assert other and next(iter(other.values())) >= total - bound * per_proc
    named = [dict(k) for k in by_proc if ("comm", "other") not in k]
    assert all(d["comm"] == "connect_close" and int(d["pid"]) in pids for d in named)
    for call in ("close",):
        rows = {
            k: v
            for k, v in series(text, "tcptrace_close_duration_seconds_count").items()
            if ("call", call) in k
        }
        assert len(rows) <= bound + 1
        assert sum(rows.values()) >= total  # every client's close(); the server thread's too
    kept = sample_value(text, "tcptrace_label_sets", {"metric": "timewait_created_by_process"})
    assert kept is not None and kept <= bound


def test_bad_listen_address_is_one_line(tcptrace_cmd: list[str]) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*tcptrace_cmd, "agent", "--listen", f"127.0.0.1:{port}", "--duration", "1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        busy.close()
    assert result.returncode == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("tcptrace: error: cannot listen on"), result.stderr
    assert "Traceback" not in result.stderr
