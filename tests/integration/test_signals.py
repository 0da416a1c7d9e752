"""Signals on a terminal: whatever stops a command, the terminal is left as it was found (echo
and line mode on, the cursor shown), and the exit status says what happened.

Each command runs on a pseudo-terminal (stdin, stdout and stderr), as a user's shell runs it:
rich draws its spinner and live views, `top` puts the terminal in cbreak mode.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

HIDE, SHOW = "\x1b[?25l", "\x1b[?25h"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


@dataclass
class OnTerminal:
    proc: subprocess.Popen[bytes]
    slave: int
    output: bytearray = field(default_factory=bytearray)

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while needle not in self.text:
            if time.monotonic() > end or self.proc.poll() is not None:
                raise AssertionError(f"never printed {needle!r}: {self.text[-2000:]!r}")
            time.sleep(0.05)

    def lines(self) -> list[str]:
        """What a user reads: escapes left out, each \\r-overwritten line as it ends."""
        plain = ANSI.sub("", self.text)
        return [line.rsplit("\r", 1)[-1].strip() for line in plain.replace("\r\n", "\n").split("\n")]


@contextmanager
def on_terminal(cmd: list[str]) -> Iterator[OnTerminal]:
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "50"}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env)
    run = OnTerminal(proc, slave)

    def pump() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            run.output += chunk

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        time.sleep(0.2)  # the last of the output
        os.close(slave)
        os.close(master)
        reader.join(timeout=5)


def cursor_shown(text: str) -> bool:
    """The cursor is visible at the end: never hidden, or shown after the last hide."""
    return text.rfind(SHOW) >= text.rfind(HIDE)


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_compile(
    tcptrace_cmd: list[str], port: int, sig: signal.Signals, status: int
) -> None:
    """Before: Ctrl-C printed "Aborted!" with status 1; SIGTERM killed it silently with the
    spinner's cursor hidden. (diagnose compiles all four parts, the longest compile, and
    would print a diagnosis with status 0 had the signal come after it.)"""
    with on_terminal([*tcptrace_cmd, "diagnose", "--port", str(port), "--duration", "600"]) as run:
        run.wait_for("compiling")
        run.proc.send_signal(sig)
        assert run.proc.wait(timeout=120) == status
        time.sleep(0.2)
        assert HIDE in run.text, "no spinner was drawn"
        assert cursor_shown(run.text), repr(run.text[-300:])
    said = [line for line in run.lines() if line and "compiling" not in line]
    assert said == [f"tcptrace: interrupted by {sig.name}"], said


def test_sighup_restores_tops_terminal(tcptrace_cmd: list[str], port: int) -> None:
    """Before: SIGHUP killed `top` with the terminal in cbreak mode (no echo) and the cursor
    hidden. Now it is a stop like q: the last screen, the terminal as it was, status 0."""
    with on_terminal([*tcptrace_cmd, "top", "--port", str(port), "--interval", "0.5"]) as run:
        before = termios.tcgetattr(run.slave)
        run.wait_for("CLOSE_WAIT")
        assert not termios.tcgetattr(run.slave)[3] & termios.ECHO, "top did not enter cbreak mode"
        run.proc.send_signal(signal.SIGHUP)
        assert run.proc.wait(timeout=60) == 0, run.text[-2000:]
        after = termios.tcgetattr(run.slave)
        time.sleep(0.2)
        assert after == before
        assert after[3] & termios.ECHO and after[3] & termios.ICANON
        assert cursor_shown(run.text)
        assert "Traceback" not in run.text
