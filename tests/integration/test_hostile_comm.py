"""A process that names itself like rich markup and a terminal escape, traced live by every
command that shows process names: each ends cleanly and shows the name escaped.

Before, a comm of ``[/x]`` made timewait, top, closewait and diagnose exit with rich's
MarkupError (diagnose --report then wrote nothing).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

NAME = "[/x]\x1b[31m[b]"  # 13 bytes: the kernel keeps it whole
SHOWN = "[/x]\\x1b[31m[b]"

# Connects to itself 10 times a second, closing first (TIME_WAIT on its side); one accepted
# socket in five is never closed (CLOSE_WAIT, a leak suspect).
CHURN = r"""
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, sys.argv[2].encode(), 0, 0, 0)  # PR_SET_NAME
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
leaked = []
for i in range(100000):
    client = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    server, _ = listener.accept()
    client.close()
    if i % 5 == 0:
        leaked.append(server)
    else:
        server.recv(1)
        server.close()
    time.sleep(0.1)
"""


@contextmanager
def churning(port: int, name: str) -> Iterator[subprocess.Popen[str]]:
    """CHURN on ``port`` in a process that named itself ``name``, for the block."""
    proc = subprocess.Popen([sys.executable, "-c", CHURN, str(port), name], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert Path(f"/proc/{proc.pid}/comm").read_bytes() == name.encode() + b"\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def hostile_process(port: int) -> Iterator[subprocess.Popen[str]]:
    with churning(port, NAME) as proc:
        yield proc


@pytest.mark.parametrize(
    "command, extra",
    [
        ("states", []),
        ("timewait", []),
        ("closewait", ["--threshold", "1s"]),
        ("top", ["--threshold", "1s"]),
        ("diagnose", ["--threshold", "1s", "--report", "{tmp}/report.html"]),
    ],
)
def test_a_hostile_comm_is_shown_escaped_live(
    hostile_process: subprocess.Popen[str],
    port: int,
    tcptrace_cmd: list[str],
    tmp_path: Path,
    command: str,
    extra: list[str],
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    result = subprocess.run(
        [*tcptrace_cmd, command, "--port", str(port), "--duration", "4", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in output and "\x1b" not in output
    assert SHOWN in output, output
    if command == "diagnose":
        assert "[/x]\\x1b[31m[b]" in (tmp_path / "report.html").read_text()
