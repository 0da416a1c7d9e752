"""Every command runs against the real kernel under --duration, exits 0, and (with --json)
ends with a summary object. Commands are found by introspection, so a new command is
covered the day it is added, and must support --duration like the others."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tcptrace.cli import cli
from tests.integration.helpers import free_port

# Commands that need more than --duration, and those that take none.
NO_DURATION = {"doctor"}


def command_args(name: str, tmp_path: Path) -> list[str]:
    params = {p.name for p in cli.commands[name].params}
    if name in NO_DURATION:
        return [name]
    args = [name, "--duration", "2"]
    if name == "record":
        args += ["-o", str(tmp_path / "smoke.jsonl")]
    if "listen" in params:
        args += ["--listen", f"127.0.0.1:{free_port()}"]
    if "as_json" in params:
        args.append("--json")
    return args


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_command_runs_under_duration(name: str, tcptrace_cmd: list[str], tmp_path: Path) -> None:
    args = command_args(name, tmp_path)
    result = subprocess.run(
        [*tcptrace_cmd, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, f"{args}: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr
    if "--json" in args:
        last = json.loads(result.stdout.strip().splitlines()[-1])
        assert last["type"] == "summary", last
