"""`tcptrace states | head -1`: the reader going away is not a failure (exit 0, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CASES = [
    ("states", "timewait_mix"),
    ("states --json", "timewait_mix"),
    ("closewait", "closewait_leaky"),
    ("timewait", "timewait_mix"),
    ("top", "closewait_leaky"),
    ("diagnose", "closewait_leaky"),
    ("closelat", "closelat_linger_reset"),
]


@pytest.mark.parametrize("command, recording", CASES)
def test_reader_closing_the_pipe_is_exit_0(data_dir: Path, command: str, recording: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcptrace", *command.split(), "--from", str(data_dir / f"{recording}.jsonl")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the first line: every write of tcptrace meets EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "Error" not in err


@pytest.mark.parametrize("args", ["--help", "--version", "states --help", "agent --help"])
def test_help_and_version_into_a_closed_pipe_are_exit_0(args: str) -> None:
    """Printed while click parses the arguments, where click itself would exit 1."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcptrace", *args.split()], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""
