"""`tcptrace demo`: starts its server and client, shows the leak, and leaves nothing behind
(no process, no socket on its port in `ss`, no build directory), however it is stopped."""

from __future__ import annotations

import glob
import os
import re
import select
import signal
import subprocess

from tests.integration import helpers

START = re.compile(r"demo-server pid (\d+) listens on 127\.0\.0\.1:(\d+) .*demo-client pid (\d+)")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def read_start(proc: subprocess.Popen[str]) -> tuple[int, int, int, list[str]]:
    """Lines up to the demo's start line: (server pid, port, client pid, lines)."""
    assert proc.stdout is not None
    lines: list[str] = []
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            raise AssertionError(f"the demo did not start: {''.join(lines)} {proc.communicate()[1]}")
        lines.append(line)
        m = START.search(line)
        if m:
            return int(m.group(1)), int(m.group(2)), int(m.group(3)), lines


def check_clean(ss: helpers.SS, server: int, client: int, port: int, out: str) -> None:
    assert not alive(server) and not alive(client)
    assert ss.sockets(port) == [], ss.sockets(port)
    assert f"no socket left on port {port}" in out


def test_demo_shows_the_leak_and_leaves_nothing_behind(tcptrace_cmd: list[str], ss: helpers.SS) -> None:
    dirs_before = set(glob.glob("/tmp/tcptrace-demo-*"))
    proc = subprocess.Popen(
        [*tcptrace_cmd, "demo", "--duration", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        server, port, client, _ = read_start(proc)
        # While it runs: the server really leaks (ss), and both processes are ours.
        assert helpers.wait_for(lambda: ss.count(port, "close-wait") >= 2, timeout=10)
        assert alive(server) and alive(client)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    # The verdict names the server, and (C built with frame pointers) the leaking function.
    flat = " ".join(out.split())
    assert f"pid {server} (demo-server) leaks" in flat, out
    if "C, built with frame pointers" in flat:  # (the console wraps lines: compare them joined)
        assert "in CLOSE_WAIT at handle_leaky (demo-server.c:" in flat, out
        assert "the app read EOF there without closing" in flat
        assert "origin (accept): accept_loop (demo-server.c:" in flat
    assert f"pid {client} (demo-client) creates about" in flat
    assert "CLOSE_WAIT >= 5.00s:" in out  # the live view's line, once a second (--threshold 5s)
    check_clean(ss, server, client, port, out)
    assert set(glob.glob("/tmp/tcptrace-demo-*")) == dirs_before


def test_demo_cleans_up_on_sigterm(tcptrace_cmd: list[str], ss: helpers.SS) -> None:
    proc = subprocess.Popen(
        [*tcptrace_cmd, "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        server, port, client, _ = read_start(proc)
        assert helpers.wait_for(lambda: ss.count(port, "time-wait") >= 5, timeout=10)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped: SIGTERM" in out
    check_clean(ss, server, client, port, out)


def test_demo_without_a_compiler_runs_the_python_server(
    tcptrace_cmd: list[str], ss: helpers.SS, tmp_path: object
) -> None:
    import shutil
    from pathlib import Path

    bin_dir = Path(str(tmp_path)) / "bin"
    bin_dir.mkdir()
    ss_path = shutil.which("ss")
    assert ss_path is not None
    (bin_dir / "ss").symlink_to(ss_path)  # ss only: no cc, no gcc
    env = {**os.environ, "PATH": str(bin_dir)}
    proc = subprocess.Popen(
        [*tcptrace_cmd, "demo", "--duration", "7"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        server, port, client, lines = read_start(proc)
        assert "(Python)" in lines[-1]
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    flat = " ".join(out.split())
    assert f"pid {server} (demo-server) leaks" in flat and "the app read EOF" in flat
    assert "no C compiler" in flat
    check_clean(ss, server, client, port, out)
