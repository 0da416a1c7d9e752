"""Output into a pipe or a file: no escape sequences, no wrapping (a sentence cut at column
80 broke grep), and the summary on stdout with the rest of the answer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = [
    ("states", "lifecycle_basic", "44 events, 0 lost (stopped: end)"),
    ("closewait --threshold 100ms", "closewait_leaky", "closewait summary (stopped: end)"),
    ("timewait", "timewait_mix", "created"),
    ("closelat", "closelat_linger_reset", "closelat stopped (end)"),
    ("top", "closewait_leaky", "CLOSE_WAIT"),
    ("diagnose --threshold 100ms", "closewait_leaky", "tcptrace diagnose:"),
]


def run_piped(args: list[str]) -> subprocess.CompletedProcess[str]:
    # A terminal type with colours and a narrow COLUMNS: neither may matter for a pipe.
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "40"}
    env.pop("NO_COLOR", None)
    env.pop("FORCE_COLOR", None)
    return subprocess.run(
        [sys.executable, "-m", "tcptrace", *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize("command, recording, summary", CASES)
def test_piped_output_is_plain_and_whole(data_dir: Path, command: str, recording: str, summary: str) -> None:
    result = run_piped([*command.split(), "--from", str(data_dir / f"{recording}.jsonl")])
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout + result.stderr
    assert summary in result.stdout
    assert result.stderr == ""


def test_a_verdict_is_one_line_however_long(data_dir: Path) -> None:
    recording = str(data_dir / "closewait_leaky.jsonl")
    result = run_piped(["diagnose", "--threshold", "100ms", "--from", recording])
    verdict = next(line for line in result.stdout.splitlines() if line.startswith("PROBLEM"))
    assert len(verdict) > 80
    assert verdict.endswith("look for an error path that skips close()")
