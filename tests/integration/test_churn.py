"""`closewait`, the agent and `diagnose` under the highest connection churn the machine
reaches (bench/loadgen.c): they lose nothing, count every CLOSE_WAIT entry (and closewait
and the agent every close, exactly against the load, both closers first), and closewait
and the agent agree with each other on the same load.

The tracers are filtered to the load's port, so other traffic on the host cannot disturb
the counts; closewait and the agent run at once on one load.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tcptrace.export.prometheus import sample_value
from tests.integration import helpers
from tests.integration.test_agent import agent, scrape
from tests.integration.test_closewait import stop, tracing
from tests.integration.test_diagnose import finish, start_diagnose

ROOT = Path(__file__).resolve().parents[2]
DURATION_S = 3


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("loadgen") / "loadgen"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(ROOT / "bench" / "loadgen.c")], check=True)
    return exe


def churn(exe: Path, mode: str, port: int, duration_s: float = DURATION_S) -> int:
    """Connections made by loadgen at full speed for ``duration_s``; clients bound to an
    address of their own (no TIME_WAIT of an earlier run in the way)."""
    src = f"127.{random.randint(100, 250)}.{random.randint(0, 250)}.{random.randint(1, 250)}"
    argv = [str(exe), "--mode", mode, "--rate", "0", "--duration", str(duration_s), "--port", str(port)]
    done = subprocess.run([*argv, "--src", src], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(done.stdout)
    assert result["failed"] == 0 and result["server_closed"] == result["connections"], result
    return int(result["connections"])


def agent_count(metrics: int, name: str) -> int:
    return int(sample_value(scrape(metrics), f"tcptrace_close_wait_{name}_total", {}) or 0)


@pytest.mark.parametrize("mode", ["client-first", "server-first"])
def test_max_churn_is_counted_exactly_and_alike_by_closewait_and_the_agent(
    tcptrace_cmd: list[str], loadgen: Path, mode: str
) -> None:
    port, metrics = helpers.free_port(), helpers.free_port()
    args = ["--port", str(port)]
    with agent(tcptrace_cmd, metrics, *args) as agent_proc, tracing(tcptrace_cmd, *args) as closewait:
        made = churn(loadgen, mode, port)
        # Every connection went through CLOSE_WAIT on one side and was closed by its app.
        assert helpers.wait_for(lambda: agent_count(metrics, "closed") >= made, timeout=20)
        time.sleep(0.7)  # two more refreshes: nothing else arrives
        text = scrape(metrics)
        _, summary = stop(closewait)
        agent_proc.send_signal(signal.SIGTERM)
        agent_proc.communicate(timeout=60)

    assert summary["lost"] == 0 and summary["kernel"]["open_failed"] == 0
    assert summary["entered"] == summary["closed"] == made, (summary["entered"], made)
    assert summary["reset"] == summary["forgotten"] == summary["open"] == 0
    assert summary["kernel"]["owner_forgotten"] == 0
    ttc = summary["time_to_close"]
    assert ttc["count"] == made and ttc["min_s"] is not None and ttc["max_s"] >= ttc["p99_s"]
    # The loadgen's server (client-first) or clients (server-first) own them all.
    assert sum(o["entered"] for o in summary["owners"]) == made
    assert all(o["pid"] is not None for o in summary["owners"])
    got = {
        name: int(sample_value(text, f"tcptrace_close_wait_{name}_total", {}) or 0)
        for name in ("entered", "closed", "reset")
    }
    assert got == {"entered": summary["entered"], "closed": summary["closed"], "reset": summary["reset"]}
    assert sample_value(text, "tcptrace_events_lost_total", {}) == 0
    assert sample_value(text, "tcptrace_kernel_map_failures_total", {"map": "close_wait_open"}) == 0


def test_diagnose_at_max_churn_loses_nothing_and_counts_every_close_wait_entry(
    tcptrace_cmd: list[str], loadgen: Path
) -> None:
    """diagnose reads the kernel's aggregates: no transition crosses the ring buffer, so
    nothing is lost however fast the connections come, and the server's CLOSE_WAIT entries
    (client-first: one per connection) are all counted."""
    port = helpers.free_port()
    proc = start_diagnose(tcptrace_cmd, "--port", str(port), "--duration", "3s", "--interval", "0.5")
    try:
        made = churn(loadgen, "client-first", port, duration_s=2)  # inside the 3 s window
        summary = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert made > 0
    assert summary["lost"] == 0
    assert "lost_events" not in {v["topic"] for v in summary["verdicts"]}
    assert summary["close_wait"]["entered"] >= made, (summary["close_wait"], made)
