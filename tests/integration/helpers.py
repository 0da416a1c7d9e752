"""Helpers for integration tests: loopback ports, C fixtures, ground truth from ss and /proc,
and collecting events from a loaded program."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tcptrace.kernel.loader import PARTS, LoadedProgram, load
from tcptrace.kernel.stream import KernelStream
from tcptrace.model.events import SocketEvent
from tcptrace.model.filters import EventFilter
from tests.integration import workloads as w


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return int(s.getsockname()[1])


class FixtureBuilder:
    """Compiles fixtures/NAME.c into fixtures/bin/NAME (frame pointers on, so user stacks walk)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.out = directory / "bin"
        self.out.mkdir(exist_ok=True)

    def __call__(self, name: str) -> Path:
        src = self.directory / f"{name}.c"
        exe = self.out / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            subprocess.run(
                [
                    "cc",
                    "-O0",
                    "-g",
                    "-fno-omit-frame-pointer",
                    "-fno-inline",
                    "-o",
                    str(exe),
                    str(src),
                    "-lpthread",
                ],
                check=True,
            )
        return exe


class SS:
    """Ground truth from `ss`: sockets of a port by state."""

    def sockets(self, port: int, state: str = "all") -> list[str]:
        out = subprocess.run(
            ["ss", "-tanH", "state", state, f"( sport = :{port} or dport = :{port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line for line in out.splitlines() if line.strip()]

    def count(self, port: int, state: str) -> int:
        return len(self.sockets(port, state))


def sockstat_tw() -> int:
    """The `tw` count of /proc/net/sockstat: TIME_WAIT sockets now (all namespaces' share)."""
    with open("/proc/net/sockstat") as fh:
        for line in fh:
            if line.startswith("TCP:"):
                m = re.search(r"\btw (\d+)", line)
                if m:
                    return int(m.group(1))
    raise AssertionError("no TCP line in /proc/net/sockstat")


def load_parts(
    names: Sequence[str] = ("lifecycle",), flt: EventFilter | None = None, **kw: object
) -> LoadedProgram:
    return load([PARTS[n] for n in names], flt, **kw)  # type: ignore[arg-type]


def collect(
    stream: KernelStream,
    done: Callable[[list[SocketEvent]], bool],
    timeout: float = 5.0,
) -> list[SocketEvent]:
    """Poll until ``done(events)`` or the timeout; returns every event seen."""
    events: list[SocketEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events.extend(stream.poll(50))
        if done(events):
            break
    events.extend(stream.drain())
    return events


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def bpf_prog_ids(name_prefix: str = "tt_lc_") -> set[int]:
    """Ids of loaded BPF programs whose name starts with ``name_prefix`` (bpftool -j).

    Tests compare sets taken before, during and after a run, so other tracers on the host
    (concurrent tests, other tools) do not disturb them.
    """
    import json as _json

    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {
        int(p["id"]) for p in _json.loads(out or "[]") if str(p.get("name", "")).startswith(name_prefix[:15])
    }


def states_json_of_one_connection(
    cmd: Sequence[str], port: int, duration: str = "3", **popen: Any
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]], w.Conn]:
    """Run ``CMD states --json --port PORT --duration DURATION``, make one client-closed
    connection on the port once it is attached (its header is written then), and return the
    finished run, its JSON objects and the connection."""
    proc = subprocess.Popen(
        [*cmd, "states", "--json", "--port", str(port), "--duration", duration],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    assert proc.stdout is not None
    header = json.loads(proc.stdout.readline())
    assert header["type"] == "header"
    conn = w.client_closes_first(port)
    out, err = proc.communicate(timeout=60)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done, [header, *(json.loads(line) for line in out.splitlines())], conn


def remove_cgroups(top: Path) -> None:
    """Remove a tree of cgroups a test made, deepest first; a cgroup is removable only once
    its last process has exited, so each is retried for a while."""
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda entry: -entry[0].count("/")):
        wait_for(lambda d=dirpath: _rmdir(Path(d)), timeout=5)  # type: ignore[misc]


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
