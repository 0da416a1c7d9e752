"""`tcptrace record` captures what the analyses replay: a recording of a leaking server and
of client-closed churn, replayed by closewait, timewait and states without the kernel."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from tests.integration import workloads as w
from tests.integration.helpers import FixtureBuilder, wait_for
from tests.integration.test_hardening import overflow


def run_json(cmd: list[str]) -> list[dict[str, object]]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_record_then_replay_every_analysis(
    port: int, fixture_bin: FixtureBuilder, tcptrace_cmd: list[str], tmp_path: Path
) -> None:
    server_exe = fixture_bin("leaky_server")
    server = subprocess.Popen([str(server_exe), str(port), "50"], stdout=subprocess.PIPE, text=True)
    out = tmp_path / "incident.jsonl"
    rec = subprocess.Popen(
        [*tcptrace_cmd, "record", "-o", str(out), "--port", str(port), "--duration", "6"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        assert wait_for(lambda: out.exists() and out.stat().st_size > 0, timeout=120), "record never attached"
        kinds = "LLLCCCCC"  # 3 leaked, 5 closed after 50 ms; the clients close first
        for kind in kinds:
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(kind.encode())
        _, err = rec.communicate(timeout=60)
        assert rec.returncode == 0, err
    finally:
        rec.kill()
        server.kill()
        server.wait()

    header = json.loads(out.read_text().splitlines()[0])
    assert header["command"] == "record" and header["settings"]["port_range"]

    cw = run_json([*tcptrace_cmd, "closewait", "--json", "--threshold", "1s", "--from", str(out)])
    summary = cw[-1]
    assert summary["type"] == "summary"
    groups = summary["groups"]
    assert sum(g["count"] for g in groups) == 3
    assert {g["pid"] for g in groups} == {server.pid}
    frames = [f for g in groups for f in g["origin_stack"] + g["last_touch_stack"]]
    assert any("leak_connection" in f for f in frames), frames

    tw = run_json([*tcptrace_cmd, "timewait", "--json", "--from", str(out)])
    # Every client closed first. The 5 the server closed end in TIME_WAIT; the 3 it leaked
    # never get the server's FIN, so their clients stay parked in FIN_WAIT2.
    assert tw[-1]["type"] == "summary"
    assert (tw[-1]["created_total"], tw[-1]["pending_fin_wait2"]) == (kinds.count("C"), kinds.count("L"))
    assert tw[-1]["parked_fin_wait2"] == len(kinds)  # all parked first; 5 converted at the FIN

    st = run_json([*tcptrace_cmd, "states", "--json", "--from", str(out)])
    transitions = [o for o in st if o["type"] == "transition"]
    assert sum(1 for o in transitions if o["new"] == "CLOSE_WAIT") == len(kinds)


def start_record(cmd: list[str], out: Path, *args: str, **popen: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([*cmd, "record", "-o", str(out), *args], **popen)
    # The header is written once the programs are attached; compiling may be slow on a busy host.
    assert wait_for(lambda: out.exists() and out.stat().st_size > 0, timeout=120), "record never attached"
    return proc


def test_record_counts_every_loss_and_says_so_last(
    port: int, tcptrace_cmd: list[str], tmp_path: Path
) -> None:
    """A one-page buffer and a stopped recorder: what the file holds and what was lost add
    up to what the kernel counted, and the last line on stderr says both (and nothing else
    is written there when stderr is not a terminal)."""
    n = 200
    out = tmp_path / "rec.jsonl"
    rec = start_record(tcptrace_cmd, out, "--port", str(port), "--buffer", "4K", stderr=subprocess.PIPE)
    overflow(rec, port, n)
    rec.send_signal(signal.SIGINT)
    _, err = rec.communicate(timeout=60)
    assert rec.returncode == 0, err
    objs = [json.loads(line) for line in out.read_text().splitlines()]
    summary = objs[-1]
    events = [o for o in objs if o["type"] in ("transition", "touch", "timewait")]
    assert summary["type"] == "summary" and summary["lost"] > 0
    assert len(events) == summary["events"] == summary["kernel_events"]
    assert summary["kernel_transitions"] == n * 10 + 2
    assert sum(1 for o in events if o["type"] == "transition") < n * 10 + 2
    size = out.stat().st_size
    assert size < 1e6
    assert err.decode().splitlines() == [
        f"recorded {summary['events']:,} events to {out} ({size / 1e3:.1f} kB), {summary['lost']:,} lost "
        "(the ring buffer was full: raise --buffer or narrow the filters)"
    ]


def test_record_shows_its_progress_on_a_terminal(port: int, tcptrace_cmd: list[str], tmp_path: Path) -> None:
    out = tmp_path / "rec.jsonl"
    main, sub = pty.openpty()
    try:
        rec = start_record(tcptrace_cmd, out, "--port", str(port), "--duration", "3", stderr=sub)
        for _ in range(3):
            w.client_closes_first(port)
        assert rec.wait(timeout=60) == 0
        os.close(sub)
        sub = -1
        shown = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main)
        if sub >= 0:
            os.close(sub)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode())
    summary = json.loads(out.read_text().splitlines()[-1])
    assert summary["events"] >= 3 * 12 and summary["lost"] == 0
    shown_line = r"recording: ([\d,]+) events, ([\d,]+) lost, ([\d.]+ (?:B|kB|MB)) \(Ctrl-C stops\)"
    progress = re.findall(shown_line, text)
    assert progress, text
    assert all(lost == "0" for _, lost, _ in progress)
    last = [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-1]
    path = re.escape(str(out))
    assert re.fullmatch(rf"recorded {summary['events']:,} events to {path} \([\d.]+ kB\), 0 lost", last)
