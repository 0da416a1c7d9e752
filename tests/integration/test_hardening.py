"""Faults and limits against the real kernel: overflow, concurrency, capabilities, teardown."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration import helpers
from tests.integration import workloads as w
from tests.integration.helpers import wait_for
from tests.integration.test_agent import agent, eventually, scrape


def churn(port: int, n: int) -> None:
    """n connections, client closes first: 10 transitions each (plus the listener's 2)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)

    def serve() -> None:
        for _ in range(n):
            conn, _ = listener.accept()
            conn.recv(1)
            conn.close()

    server = threading.Thread(target=serve)
    server.start()
    for _ in range(n):
        socket.create_connection(("127.0.0.1", port)).close()
    server.join(timeout=60)
    listener.close()


def start_states(cmd: list[str], *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*cmd, "states", "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    header = json.loads(proc.stdout.readline())  # printed once the programs are attached
    assert header["type"] == "header"
    return proc


def finish(proc: subprocess.Popen[str]) -> list[dict[str, object]]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


def overflow(proc: subprocess.Popen[Any], port: int, n: int) -> None:
    """Stop the consumer, churn ``n`` connections (the kernel keeps writing), resume it."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        churn(port, n)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    time.sleep(0.5)


@pytest.mark.parametrize("reader", ["mmap", "bcc"])
def test_ring_buffer_overflow_is_counted_exactly(port: int, tcptrace_cmd: list[str], reader: str) -> None:
    """A one-page buffer and a stopped consumer: events are lost, and every one is counted,
    whichever way the ring buffer is read (kernel/ringbuf.py)."""
    n = 200
    env = {"TCPTRACE_RINGBUF_READER": reader}
    proc = start_states(tcptrace_cmd, "--port", str(port), "--buffer", "4K", "--interval", "0.1", env=env)
    overflow(proc, port, n)
    objs = finish(proc)
    summary = objs[-1]
    events = [o for o in objs if o["type"] == "transition"]
    assert summary["type"] == "summary"
    assert summary["lost"] > 0
    assert len(events) == summary["events"] == summary["kernel_events"]
    assert summary["events"] + summary["lost"] == summary["kernel_transitions"] == n * 10 + 2
    # the loss was announced in the stream as it happened, not only in the summary
    announced = [o for o in objs if o["type"] == "lost"]
    assert announced and announced[-1]["lost"] == summary["lost"]


def test_table_overflow_is_counted_exactly(port: int, tcptrace_cmd: list[str]) -> None:
    """The same for the table: one line per event, the losses announced, the summary exact."""
    n = 200
    proc = subprocess.Popen(
        [*tcptrace_cmd, "states", "--port", str(port), "--buffer", "4K", "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().split()[:3] == ["TIME", "PID", "COMM"]  # once attached
    overflow(proc, port, n)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # The events, then after a blank line the summary, both on stdout (its table has arrows too).
    stream, _, summary = out.partition("\n\n")
    rows = [line for line in stream.splitlines() if " -> " in line and not line.startswith("!!")]
    announced = [line for line in stream.splitlines() if line.startswith("!! ")]
    match = re.search(r"^(\d+) events, (\d+) lost", summary, re.M)
    assert match is not None, (summary, err)
    events, lost = int(match[1]), int(match[2])
    assert lost > 0 and announced and f"{lost} in all" in announced[-1]
    assert len(rows) == events
    assert events + lost == n * 10 + 2


def test_two_instances_at_once_see_the_same_events(port: int, tcptrace_cmd: list[str]) -> None:
    a = start_states(tcptrace_cmd, "--port", str(port))
    b = start_states(tcptrace_cmd, "--port", str(port))
    w.client_closes_first(port)
    time.sleep(0.3)
    ea = [o for o in finish(a) if o["type"] == "transition"]
    eb = [o for o in finish(b) if o["type"] == "transition"]
    assert len(ea) == len(eb) == 12
    assert [(o["old"], o["new"], o["sport"]) for o in ea] == [(o["old"], o["new"], o["sport"]) for o in eb]


def test_pid_filter_run_ends_when_the_process_exits(port: int, tcptrace_cmd: list[str]) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE
    )
    proc = start_states(tcptrace_cmd, "--pid", str(child.pid))
    assert child.stdin is not None
    child.stdin.close()
    child.wait(timeout=10)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["stopped"] == "pid exited"


def _setpriv(*caps: str) -> list[str]:
    """Run as nobody, keeping only ``caps`` (ambient, so they survive exec)."""
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if caps:
        spec = ",".join(f"+{c}" for c in caps)
        cmd += [f"--inh-caps={spec}", f"--ambient-caps={spec}"]
    return [*cmd, "--"]


@pytest.mark.parametrize(
    "caps, ok",
    [
        (("bpf", "perfmon", "dac_read_search"), True),
        (("bpf", "perfmon"), False),
        ((), False),
    ],
    ids=["bpf+perfmon+dac_read_search", "bpf+perfmon", "none"],
)
def test_capabilities_instead_of_root(port: int, caps: tuple[str, ...], ok: bool) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    exe = os.path.join(os.path.dirname(sys.executable), "tcptrace")
    cmd = [*_setpriv(*caps), exe, "states", "--json", "--port", str(port), "--duration", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    if ok:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        w.client_closes_first(port)
    out, err = proc.communicate(timeout=60)
    if ok:
        assert proc.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["events"] == 12
    else:
        assert proc.returncode == 1
        assert err.strip() == (
            "tcptrace: error: tracing needs root (or CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH) "
            "(run it with sudo, e.g. `sudo tcptrace ...`)"
        )


NON_ROOT = ("bpf", "perfmon", "dac_read_search", "sys_ptrace", "syslog")
"""The set README documents: every command works with it (CAP_SYSLOG only names kernel
stack frames, which `--stacks` shows)."""

AGENT = tuple(c for c in NON_ROOT if c != "syslog")
"""The set the systemd unit and the DaemonSet give the agent (tests/unit/test_agent_deploy.py)."""


def test_the_documented_set_runs_the_timewait_part(port: int) -> None:
    """timewait (and top, diagnose, record, agent, which load its part) reads no kernel
    address: it runs with the documented set, and without CAP_SYSLOG too (its timer
    handler's address is learned in the kernel, not read from /proc/kallsyms)."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    exe = os.path.join(os.path.dirname(sys.executable), "tcptrace")
    base = [exe, "timewait", "--json", "--port", str(port), "--duration", "2"]
    for caps in (NON_ROOT, tuple(c for c in NON_ROOT if c != "syslog")):
        done = subprocess.run([*_setpriv(*caps), *base], capture_output=True, text=True, cwd="/")
        assert done.returncode == 0, (caps, done.stderr)
        assert json.loads(done.stdout.splitlines()[-1])["type"] == "summary"


def test_the_agent_runs_with_its_deployments_capabilities(port: int) -> None:
    """As nobody with the unit's and the DaemonSet's four capabilities: it loads, counts a
    leak and names its owner (another user's process, found at start), and serves it."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    metrics = helpers.free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "tcptrace")
    # The holder's socket is in CLOSE_WAIT before the agent starts.
    with another_users_close_wait(port) as holder:
        with agent([*_setpriv(*AGENT), exe], metrics, "--port", str(port), "--threshold", "1s"):
            labels = {"pid": str(holder.pid)}
            assert eventually(metrics, "tcptrace_close_wait_sockets", 1, **labels) == 1
            assert "tcptrace_build_info" in scrape(metrics)


# Holds one accepted connection for ever: its socket goes to CLOSE_WAIT when the peer closes.
HOLDER = """
import socket, sys, time
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
conn, _ = listener.accept()
print("accepted", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def another_users_close_wait(port: int) -> Iterator[subprocess.Popen[str]]:
    """HOLDER run as uid 1234, its one accepted connection in CLOSE_WAIT (the peer closed);
    killed on the way out."""
    holder = subprocess.Popen(
        [
            "setpriv",
            "--reuid=1234",
            "--regid=1234",
            "--clear-groups",
            "--",
            sys.executable,
            "-c",
            HOLDER,
            str(port),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        client = socket.create_connection(("127.0.0.1", port))
        assert holder.stdout.readline().strip() == "accepted"
        client.close()
        time.sleep(0.3)  # the FIN: the holder's socket is in CLOSE_WAIT
        yield holder
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("ptrace", [True, False], ids=["with_sys_ptrace", "without_sys_ptrace"])
def test_owners_of_other_users_sockets(port: int, ptrace: bool) -> None:
    """A socket in CLOSE_WAIT held by another user's process, found at start (/proc/PID/fd):
    its owner is found with CAP_SYS_PTRACE (and CAP_DAC_READ_SEARCH, which lists the fd
    directory), and without it the view says so rather than showing '-'."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    with another_users_close_wait(port) as holder:
        caps = NON_ROOT if ptrace else tuple(c for c in NON_ROOT if c != "sys_ptrace")
        exe = os.path.join(os.path.dirname(sys.executable), "tcptrace")
        cmd = [*_setpriv(*caps), exe, "closewait", "--port", str(port), "--duration", "2", "--recheck", "0"]
        text = subprocess.run(cmd, capture_output=True, text=True, cwd="/", timeout=120)
        as_json = subprocess.run([*cmd, "--json"], capture_output=True, text=True, cwd="/", timeout=120)
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    (sock,) = json.loads(as_json.stdout.splitlines()[-1])["sockets"]
    row = next(line for line in text.stdout.splitlines() if f":{port}" in line and "127.0.0.1" in line)
    if ptrace:
        assert sock["pid"] == holder.pid
        assert row.split()[0] == str(holder.pid)
    else:
        assert sock["pid"] is None
        assert "unknown (needs CAP_SYS_PTRACE)" in row


def test_exception_in_the_consumer_still_detaches(port: int) -> None:
    """The context manager detaches on any exception, in a process that lives on."""
    from tests.integration.helpers import bpf_prog_ids, load_parts

    if shutil.which("bpftool") is None:
        pytest.skip("needs bpftool (scripts/install --dev)")
    before = bpf_prog_ids()
    ours: set[int] = set()
    with pytest.raises(RuntimeError, match="boom"):
        with load_parts():
            ours = bpf_prog_ids() - before
            assert ours
            raise RuntimeError("boom")
    assert wait_for(lambda: not (bpf_prog_ids() & ours), timeout=5)


def test_different_commands_at_once(port: int, tcptrace_cmd: list[str]) -> None:
    """states and closewait (both on the lifecycle part, with maps of their own) side by side."""
    states = start_states(tcptrace_cmd, "--port", str(port))
    closewait = subprocess.Popen(
        [*tcptrace_cmd, "closewait", "--json", "--port", str(port), "--threshold", "100ms", "--recheck", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert closewait.stdout is not None
    assert json.loads(closewait.stdout.readline())["type"] == "header"
    # a connection whose server never closes: one socket left in CLOSE_WAIT
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4)
    client = socket.create_connection(("127.0.0.1", port))
    server, _ = listener.accept()
    client.close()
    time.sleep(0.5)
    closewait.send_signal(signal.SIGTERM)
    out, err = closewait.communicate(timeout=60)
    assert closewait.returncode == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert [s["sport"] for s in summary["sockets"]] == [port]
    assert summary["groups"][0]["pid"] == os.getpid()
    events = [o for o in finish(states) if o["type"] == "transition"]
    assert ("ESTABLISHED", "CLOSE_WAIT") in {(o["old"], o["new"]) for o in events if o["sport"] == port}
    server.close()
    listener.close()
