"""`tcptrace states` against the real kernel: exact transition sequences, owners, filters, losses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tcptrace.errors import CompileError
from tcptrace.kernel.stream import KernelStream
from tcptrace.model.events import SocketEvent, Transition
from tcptrace.model.filters import EventFilter
from tests.integration import workloads as w
from tests.integration.helpers import (
    SS,
    FixtureBuilder,
    collect,
    load_parts,
    states_json_of_one_connection,
    wait_for,
)


def pairs(events: list[SocketEvent], local_port: int) -> list[tuple[str, str]]:
    """The transitions of the sockets whose local port is ``local_port``, in order."""
    return [
        (e.old.name, e.new.name)
        for e in events
        if isinstance(e, Transition)
        and e.sport == local_port
        and (e.dport != 0 or e.new.name != "LISTEN")
        and not (e.old.name in ("CLOSE", "LISTEN") and e.dport == 0)
    ]


def client_pairs(events: list[SocketEvent], conn: w.Conn) -> list[tuple[str, str]]:
    # The client is bound to its port only after SYN_SENT: its CLOSE->SYN_SENT has sport 0.
    out = []
    for e in events:
        if not isinstance(e, Transition) or e.dport != conn.server_port:
            continue
        if e.sport in (0, conn.client_port):
            out.append((e.old.name, e.new.name))
    return out


def server_pairs(events: list[SocketEvent], conn: w.Conn) -> list[tuple[str, str]]:
    return [
        (e.old.name, e.new.name)
        for e in events
        if isinstance(e, Transition) and e.sport == conn.server_port and e.dport == conn.client_port
    ]


def trace(port: int, scenario, family: int = socket.AF_INET) -> tuple[w.Conn, list[SocketEvent]]:  # type: ignore[no-untyped-def]
    with load_parts(flt=EventFilter(ports=frozenset({port}))) as program:
        stream = KernelStream(program)
        conn = scenario(port, family)
        events = collect(stream, lambda evs: sum(1 for e in evs if e.new.name == "CLOSE") >= 3, timeout=3)
        assert program.counters()["lost"] == 0
    return conn, events


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_client_closes_first(port: int, family: int, ss: SS) -> None:
    conn, events = trace(port, w.client_closes_first, family)
    assert client_pairs(events, conn) == w.CLIENT_CLOSES_FIRST_CLIENT
    assert server_pairs(events, conn) == w.CLIENT_CLOSES_FIRST_SERVER
    listener = [(e.old.name, e.new.name) for e in events if e.sport == port and e.dport == 0]
    assert listener == w.LISTENER
    # Every event carries this process as owner, softirq ones included.
    assert {e.pid for e in events} == {os.getpid()}
    assert all(e.family == (6 if family == socket.AF_INET6 else 4) for e in events)
    # Ground truth: the client's side is in TIME_WAIT now, the server's is gone.
    tw = ss.sockets(port, "time-wait")
    assert any(f":{conn.client_port}" in line.split()[-2] for line in tw), tw


def test_events_name_the_network_namespace_and_the_owners_start(port: int) -> None:
    """A socket is (netns, 4-tuple) and an owner (pid, start time): both as /proc says."""
    _conn, events = trace(port, w.client_closes_first)
    netns = os.stat("/proc/self/ns/net").st_ino
    assert {e.netns for e in events} == {netns}
    with open("/proc/self/stat") as fh:
        start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
    hz = os.sysconf("SC_CLK_TCK")
    starts = {e.pid_start_ns for e in events if e.pid is not None}
    assert len(starts) == 1, starts
    assert starts.pop() * hz // 1_000_000_000 == start_ticks


def test_server_closes_first(port: int, ss: SS) -> None:
    conn, events = trace(port, w.server_closes_first)
    assert client_pairs(events, conn) == w.SERVER_CLOSES_FIRST_CLIENT
    assert server_pairs(events, conn) == w.SERVER_CLOSES_FIRST_SERVER
    tw = ss.sockets(port, "time-wait")
    assert any(f":{port}" in line.split()[-2] for line in tw), tw


def test_reset_goes_straight_to_close(port: int, ss: SS) -> None:
    conn, events = trace(port, w.client_resets)
    assert client_pairs(events, conn) == w.RESET_CLIENT
    assert server_pairs(events, conn) == w.RESET_SERVER
    assert ss.count(port, "time-wait") == 0


def test_time_in_previous_state_is_measured(port: int) -> None:
    conn, events = trace(port, w.client_closes_first)
    cw = next(e for e in events if isinstance(e, Transition) and e.old.name == "CLOSE_WAIT")
    # the server closed PAUSE (50 ms) after it saw the FIN
    assert cw.prev_ns is not None and 0.045e9 < cw.prev_ns < 1e9
    born = [e for e in events if isinstance(e, Transition) and e.old.name in ("CLOSE", "LISTEN")]
    assert all(e.prev_ns is None for e in born if e.new.name != "CLOSE")


def test_pid_filter_follows_the_owner_into_softirq(port: int, fixture_bin: FixtureBuilder) -> None:
    exe = fixture_bin("connect_close")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    child = subprocess.Popen([str(exe), "127.0.0.1", str(port), "1"], stdin=subprocess.PIPE, text=True)
    try:
        with load_parts(flt=EventFilter(pids=frozenset({child.pid})), stacks=True) as program:
            stream = KernelStream(program, symbolize=True)
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
            server, _ = listener.accept()
            wait_for(lambda: server.recv(1) == b"", timeout=3)
            time.sleep(0.05)
            server.close()
            events = collect(stream, lambda evs: any(e.new.name == "CLOSE" for e in evs), timeout=3)
        child.stdin.close()
        assert child.wait(timeout=5) == 0
    finally:
        child.kill()
        listener.close()
    names = [(e.old.name, e.new.name) for e in events]
    assert names == w.CLIENT_CLOSES_FIRST_CLIENT
    assert {e.pid for e in events} == {child.pid}
    assert any(e.task_pid != child.pid for e in events), "some transitions ran outside the owner"
    connect = events[0]
    assert any("open_client_connection" in f for f in connect.ustack), connect.ustack
    assert any("connect" in f for f in connect.kstack), connect.kstack
    close = next(e for e in events if e.new.name == "FIN_WAIT1")
    assert any("close_client_connection" in f for f in close.ustack), close.ustack
    # softirq transitions carry no user stack (it would be whoever was interrupted)
    assert all(not e.ustack for e in events if e.task_pid != child.pid)


def test_no_loss_and_exact_counts_at_a_modest_rate(port: int) -> None:
    n = 300
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(512)

    def serve() -> None:
        for _ in range(n):
            conn, _ = listener.accept()
            conn.recv(1)
            conn.close()

    with load_parts(flt=EventFilter(ports=frozenset({port}))) as program:
        stream = KernelStream(program)
        server = threading.Thread(target=serve)
        server.start()
        for _ in range(n):
            socket.create_connection(("127.0.0.1", port)).close()
        server.join(timeout=60)
        assert not server.is_alive()
        listener.close()
        expected = n * 10 + 1
        events = collect(stream, lambda evs: len(evs) >= expected, timeout=10)
        counters = stream.counters()
        # Each program run takes a scratch depth of its CPU and gives it back: one left
        # taken would show in every read, a run under way (other traffic) in one only.
        depth = program.bpf[b"scratch_depth"]
        reads = []
        for _ in range(3):
            reads.append([int(v) for v in depth.getvalue(depth.Key(0))])
            time.sleep(0.01)
        in_use = [min(per_cpu) for per_cpu in zip(*reads, strict=True)]
    assert counters["lost"] == 0
    assert in_use == [0] * len(in_use), reads
    assert counters["sock_update_failed"] == 0, counters
    assert (len(events), counters["decoded"], counters["transitions"]) == (expected,) * 3, counters
    # 600 sockets born and freed, their addresses reused at once: every end was seen, and
    # an entry left behind by a healthy socket is never taken for an unseen end.
    assert counters["unseen_end"] == 0, counters


def test_compile_errors_name_the_bpf_file_and_line(tmp_path: Path) -> None:
    from tcptrace.kernel import loader

    broken = tmp_path / "bpf"
    with loader.bpf_sources() as sources:
        shutil.copytree(sources, broken)
    src = broken / "lifecycle.bpf.c"
    lines = src.read_text().splitlines()
    idx = next(i for i, line in enumerate(lines) if "prev_ns = 0;" in line)
    lines[idx] = "    __u64 prev_ns = 0 +;"
    src.write_text("\n".join(lines) + "\n")
    os.environ["TCPTRACE_BPF_DIR"] = str(broken)
    try:
        with pytest.raises(CompileError, match=rf"bpf/lifecycle.bpf.c:{idx + 1}:\d+: error"):
            load_parts()
    finally:
        del os.environ["TCPTRACE_BPF_DIR"]


def test_cli_states_json_smoke(port: int, tcptrace_cmd: list[str]) -> None:
    done, objs, conn = states_json_of_one_connection(tcptrace_cmd, port)
    assert done.returncode == 0, done.stderr
    assert objs[-1]["type"] == "summary" and objs[-1]["lost"] == 0 and objs[-1]["stopped"] == "duration"
    events = [o for o in objs if o["type"] == "transition"]
    assert len(events) == objs[-1]["events"] == 12
    assert {o["pid"] for o in events} == {os.getpid()}
    assert any(o["sport"] == conn.client_port and o["new"] == "FIN_WAIT1" for o in events)


def test_sigterm_detaches_and_prints_the_summary(port: int, tcptrace_cmd: list[str]) -> None:
    from tests.integration.helpers import bpf_prog_ids

    if shutil.which("bpftool") is None:
        pytest.skip("needs bpftool (scripts/install --dev)")
    before = bpf_prog_ids()
    proc = subprocess.Popen(
        [*tcptrace_cmd, "states", "--json", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())
    ours = bpf_prog_ids() - before
    assert ours, "the program is attached once the header is out"
    w.client_resets(port)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    last = json.loads(out.splitlines()[-1])
    assert last["type"] == "summary" and last["stopped"] == "SIGTERM" and last["events"] == 8
    assert wait_for(lambda: not (bpf_prog_ids() & ours), timeout=5)


def test_record_then_replay(port: int, tcptrace_cmd: list[str], tmp_path: Path) -> None:
    out = tmp_path / "rec.jsonl"
    proc = subprocess.Popen(
        [*tcptrace_cmd, "record", "-o", str(out), "--port", str(port), "--duration", "3"],
        stderr=subprocess.PIPE,
        text=True,
    )
    # The header is written once the programs are attached; compiling may be slow on a busy host.
    assert wait_for(lambda: out.exists() and out.stat().st_size > 0, timeout=120), "record never attached"
    w.server_closes_first(port)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    replay = subprocess.run(
        [*tcptrace_cmd, "states", "--json", "--from", str(out)], capture_output=True, text=True
    )
    assert replay.returncode == 0, replay.stderr
    objs = [json.loads(line) for line in replay.stdout.splitlines()]
    # record also keeps the accept and the owner's touches (for closewait): 12 transitions
    assert sum(1 for o in objs if o["type"] == "transition") == 12
    assert objs[-1]["type"] == "summary"


def test_doctor_passes_here(tcptrace_cmd: list[str]) -> None:
    result = subprocess.run([*tcptrace_cmd, "doctor"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ready to trace" in result.stdout


@pytest.mark.parametrize("record", [False, True], ids=["states", "record"])
def test_hot_path_writes_what_the_dataclass_path_writes(port: int, record: bool) -> None:
    """Live records, with bcc's layout and the kernel's values (namespaces, start times,
    stacks symbolized while the processes live): the batch decoders' text equals the
    dataclass path's, for `states --json` and for `record` (stacks by id)."""
    import io

    from tcptrace.model.raw import JsonLines
    from tcptrace.recording import JsonLinesWriter, WhoisLines
    from tcptrace.system.whois import HostWhois

    parts = ("lifecycle", "owner", "timewait") if record else ("lifecycle",)
    defines = {"TT_PROC_STACKS_ONLY": 1} if record else None
    flt = EventFilter(ports=frozenset({port}))
    with load_parts(parts, flt, stacks=record, defines=defines) as program:
        stream = KernelStream(program, symbolize=record)
        for scenario in (w.client_closes_first, w.server_closes_first, w.client_resets):
            scenario(port, socket.AF_INET)
        w.client_closes_first(port, socket.AF_INET6)
        time.sleep(0.3)
        batch = stream.drain_raw()
        events = stream.decode(batch)
    assert len(events) >= 4 * 10
    assert all(e.netns for e in events) and any(e.pid_start_ns for e in events)
    whois = HostWhois()
    expected = io.StringIO()
    writer = JsonLinesWriter(expected, stack_refs=record)
    tables = WhoisLines(whois, writer)
    for event in events:
        tables.before(event)
        writer.event(event)
    fast = JsonLines(stream.layout, stream.frames, stack_refs=record)
    fast.names = WhoisLines(whois, JsonLinesWriter(fast)).name
    text, cut = fast.feed(batch)
    assert not cut and text == expected.getvalue()
    if record:
        assert '"type":"stack"' in text and any(e.ustack for e in events)


SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
held = []
while True:
    held.append(s.accept()[0])  # accepted, never closed: CLOSE_WAIT once the peer closes
"""


def test_a_server_started_before_tracing_owns_its_new_connections(port: int, tcptrace_cmd: list[str]) -> None:
    """Its listener's owner is seeded at start: the connections it accepts afterwards are
    its own from their birth in softirq, so --pid keeps them, CLOSE_WAIT included."""
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    tracer = None
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        tracer = subprocess.Popen(
            [*tcptrace_cmd, "states", "--json", "--pid", str(server.pid)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert tracer.stdout is not None
        assert json.loads(tracer.stdout.readline())["type"] == "header"
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        client_ports = {c.getsockname()[1] for c in clients}
        for c in clients:
            c.close()
        assert wait_for(lambda: SS().count(port, "close-wait") == 3, timeout=10)
        time.sleep(0.3)
        tracer.send_signal(signal.SIGINT)
        out, err = tracer.communicate(timeout=30)
        assert tracer.returncode == 0, err
    finally:
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        server.kill()
        server.wait()
    objs = [json.loads(line) for line in out.splitlines()]
    moves = {
        (o["dport"], o["old"], o["new"]): o["pid"]
        for o in objs
        if o["type"] == "transition" and o["sport"] == port and o["dport"] in client_ports
    }
    for client in client_ports:
        assert moves.get((client, "LISTEN", "SYN_RECV")) == server.pid, moves  # the child's birth
        assert moves.get((client, "SYN_RECV", "ESTABLISHED")) == server.pid, moves
        assert moves.get((client, "ESTABLISHED", "CLOSE_WAIT")) == server.pid, moves
    assert objs[-1]["type"] == "summary" and objs[-1]["lost"] == 0
