"""`tcptrace record` captures what the analyses replay: a recording of a leaking server and
of client-closed churn, replayed by closewait, timewait and states without the kernel."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

from tests.integration.helpers import FixtureBuilder, wait_for


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
