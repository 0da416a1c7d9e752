"""The live agent's /metrics endpoint under a crowd: 1,000 idle connections held to its port
while it is scraped, the agent limited to 1,024 open files as systemd limits a service.
Every scrape is answered (within the client's 10 s timeout), the agent's CPU stays far from
the core that prometheus_client's thread-per-connection server burnt, and the exposition,
with a process named with a carriage return and a terminal escape, reads back one sample a
line through prometheus_client's parser.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcptrace.export.prometheus import sample_value
from tests.integration import helpers
from tests.integration.test_agent import agent, scrape
from tests.integration.test_hostile_comm import churning

NAME = "cr\rx\x1b[2Jy"  # a carriage return and a terminal escape: 11 bytes, kept whole
SHOWN = "cr\\x0dx\\x1b[2Jy"
IDLE = 1000


@pytest.fixture
def hostile_churn(port: int) -> Iterator[subprocess.Popen[str]]:
    with churning(port, NAME) as proc:
        yield proc


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks (USER_HZ)


def test_idle_connections_do_not_blind_the_agent(
    hostile_churn: subprocess.Popen[str], tcptrace_cmd: list[str], port: int, tmp_path: Path
) -> None:
    if shutil.which("prlimit") is None:
        pytest.skip("needs prlimit (util-linux)")
    metrics = helpers.free_port()
    # The open-file limit systemd gives a service by default: with prometheus_client's server,
    # the idle connections used it up, accept() failed in a loop (a core) and no scrape got in.
    limited = ["prlimit", "--nofile=1024:1024", "--", *tcptrace_cmd]
    with agent(limited, metrics, "--port", str(port), "--threshold", "1s") as proc:
        idle = [socket.create_connection(("127.0.0.1", metrics)) for _ in range(IDLE)]
        try:
            cpu_before, t_before = cpu_seconds(proc.pid), time.monotonic()
            texts = []
            for _ in range(20):
                texts.append(scrape(metrics))  # each within urllib's 10 s, or the test fails
                time.sleep(0.25)
            cpu = cpu_seconds(proc.pid) - cpu_before
            wall = time.monotonic() - t_before
            # prometheus_client's server burnt a whole core here; the bound is loose on purpose.
            assert cpu < 0.5 * wall, f"the agent used {cpu:.2f} s of CPU in {wall:.2f} s"
            text = scrape(metrics)
            assert sample_value(text, "tcptrace_metrics_connections_dropped_total", {"reason": "evicted"})
        finally:
            for s in idle:
                s.close()

    # Read as text (universal newlines), as many tools read a scrape: no line splits.
    path = tmp_path / "scrape.txt"
    path.write_bytes(texts[-1].encode())
    read_back = path.read_text()
    assert read_back.splitlines() == texts[-1].split("\n")[:-1]
    comms = {
        s.labels["comm"]
        for fam in text_string_to_metric_families(read_back)
        for s in fam.samples
        if s.name == "tcptrace_close_wait_sockets"
    }
    assert SHOWN in comms, comms
    assert "\x1b" not in read_back and "\r" not in read_back
