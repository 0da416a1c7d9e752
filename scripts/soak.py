"""Soak test of `tcptrace agent`: churn and leaks under the agent for N minutes; its RSS must
stay flat and its counts must be exact at the end. Run through scripts/soak (as root).

Workload, all on two loopback ports the agent is filtered to (so the host's other traffic
does not blur the counts):

- churn: short-lived `connect_close` processes (fixtures/connect_close.c, a new pid every
  few dozen connections, so per-process tables, label bounds and symbol caches churn)
  connect to a server in this process, which reads to EOF and closes: each connection is
  one CLOSE_WAIT on the server side (closed quickly) and one TIME_WAIT on the client side;
- leaks: every cycle a `leaky_server` (fixtures/leaky_server.c) gets connections that it
  closes ('C') and connections that it leaks ('L'); the cycle ends by killing it, which
  closes the leaked sockets, so every client socket ends in TIME_WAIT (the cycle is
  shorter than tcp_fin_timeout, so no parked FIN_WAIT2 socket dies first).

At the end, with the churn stopped: TIME_WAIT creations, CLOSE_WAIT entries and closes,
and close() calls exported by the agent must equal what the workload did; the agent's RSS
(sampled from /proc) must be flat: the maximum of the last quarter within a small margin of
the maximum of the first quarter after a warm-up; SIGTERM must stop it with exit code 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "src"))
sys.path.insert(0, str(HERE))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tests.integration.helpers import FixtureBuilder, free_port  # noqa: E402

from tcptrace.export.prometheus import sample_value  # noqa: E402
from tcptrace.model.agent import RssSeries  # noqa: E402


def log(msg: str) -> None:
    print(f"soak {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.churn = 0
        self.churn_failed = 0
        self.leak_l = 0
        self.leak_c = 0
        self.server_closes = 0

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def churn_server(lsock: socket.socket, stop: threading.Event, counts: Counts) -> None:
    lsock.settimeout(0.2)

    def handle(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(10)
            while conn.recv(4096):
                pass
        conn.close()
        counts.add(server_closes=1)

    while not stop.is_set():
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def churn_client(exe: Path, port: int, per_proc: int, stop: threading.Event, counts: Counts) -> None:
    while not stop.is_set():
        p = subprocess.Popen(
            [str(exe), "127.0.0.1", str(port), str(per_proc)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        p.communicate("go\nbye\n", timeout=120)
        if p.returncode == 0:
            counts.add(churn=per_proc)
        else:
            counts.add(churn_failed=1)


def start_leaky(exe: Path, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([str(exe), str(port), "50"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    if not ready or proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise SystemExit("soak: leaky_server did not start")
    return proc


def server_holds(port: int, n: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["ss", "-tanH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True
        ).stdout
        if len([ln for ln in out.splitlines() if ln.strip()]) >= n:
            return True
        time.sleep(0.05)
    return False


def leak_cycles(exe: Path, port: int, cycle_s: float, stop: threading.Event, counts: Counts) -> None:
    """Each cycle: 5 leaked and 5 closed connections, then the server is killed."""
    while not stop.is_set():
        server = start_leaky(exe, port)
        try:
            conns = []
            for kind in "LCLCLCLCLC":
                c = socket.create_connection(("127.0.0.1", port), timeout=5)
                c.sendall(kind.encode())
                conns.append((kind, c))
            server_holds(port, len(conns))
            time.sleep(0.2)
            for kind, c in conns:
                c.close()
                counts.add(leak_l=kind == "L", leak_c=kind == "C")
            stop.wait(cycle_s)
            time.sleep(0.3)  # the 'C' ones are closed 50 ms after their EOF
        finally:
            server.kill()
            server.wait()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/tmp/perf-{server.pid}.map")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def total(text: str, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    out = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out += float(s.value)
    return out


def compare_counts(
    expected: dict[str, int], got: dict[str, float], tw_tolerance: float, failures: list[str]
) -> list[str]:
    """Each count the agent said against the workload's: a mismatch is a failure, except a
    TIME_WAIT count short by at most ``tw_tolerance`` (a fraction), which is returned as a
    warning. Seen here after the fixes in docs/timewait.md: in about half the 1-minute runs,
    up to 4 creations in ~17,000 are not counted (the kernel did not run the timer_start
    program for those tw timer armings, ftrace saw them, and counted no skipped run).
    Reported, not hidden; beyond --tw-tolerance it fails."""
    warnings: list[str] = []
    for key, want in expected.items():
        have = got.get(key)
        if have == want:
            continue
        short = want - (have or 0)
        if key == "tcptrace_timewait_created_total" and 0 < short <= tw_tolerance * want:
            warnings.append(f"{key}: agent says {have}, the workload made {want} ({short} short)")
        else:
            failures.append(f"{key}: agent says {have}, the workload made {want}")
    return warnings


def await_counts(
    agent: subprocess.Popen[str], metrics: int, expected: dict[str, int]
) -> tuple[dict[str, float], str]:
    """The agent's counts (and its last scrape) once they equal ``expected``, or after 75 s."""
    got: dict[str, float] = {}
    deadline = time.monotonic() + 75
    text = ""
    while time.monotonic() < deadline and agent.poll() is None:
        text = scrape(metrics)
        got = {k: sample_value(text, k) or 0.0 for k in expected if k != "close_calls"}
        got["close_calls"] = sample_value(text, "tcptrace_close_calls_total", {"call": "close"}) or 0.0
        if got == expected:
            break
        time.sleep(1)
    return got, text


def stop_agent(agent: subprocess.Popen[str], failures: list[str]) -> None:
    """SIGTERM, then its exit must be clean and say so within 60 s."""
    agent.send_signal(signal.SIGTERM)
    try:
        _, err = agent.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        agent.kill()
        _, err = agent.communicate()
        failures.append("the agent did not stop within 60 s of SIGTERM")
    if agent.returncode != 0 or '"reason":"SIGTERM"' not in err:
        failures.append(f"the agent did not stop cleanly on SIGTERM (exit {agent.returncode}): {err[-300:]}")


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=2.0, help="how long the churn runs (default 2)")
    ap.add_argument("--clients", type=int, default=6, help="concurrent connect_close processes (default 6)")
    ap.add_argument("--per-process", type=int, default=25, help="connections per client process (default 25)")
    ap.add_argument("--cycle", type=float, default=15.0, help="seconds per leaky_server cycle (default 15)")
    ap.add_argument("--sample", type=float, default=2.0, help="RSS sampling period in seconds (default 2)")
    ap.add_argument("--margin", type=float, default=0.05, help="allowed RSS growth, fraction (default 0.05)")
    ap.add_argument("--out", type=Path, help="write the report (JSON) here too")
    ap.add_argument(
        "--tw-tolerance",
        type=float,
        default=0.001,
        help="TIME_WAIT creations the kernel count may trail the workload by, as a fraction, "
        "reported as a warning (default 0.001; 0 for exact)",
    )
    args = ap.parse_args()
    if args.cycle >= 55:
        ap.error("--cycle must stay below tcp_fin_timeout (60 s)")

    build = FixtureBuilder(HERE / "tests" / "integration" / "fixtures")
    connect_close, leaky = build("connect_close"), build("leaky_server")
    churn_port, leak_port, metrics = free_port(), free_port(), free_port()
    agent_log = Path(f"/tmp/tcptrace-soak-{os.getpid()}.jsonl")
    cmd = [
        str(HERE / ".venv" / "bin" / "python"),
        "-m",
        "tcptrace",
        "agent",
        "--listen",
        f"127.0.0.1:{metrics}",
        "--interval",
        "1",
        "--states-interval",
        "5",
        "--threshold",
        "2s",
        "--top-processes",
        "5",
        "--port",
        str(churn_port),
        "--port",
        str(leak_port),
        "--log",
        str(agent_log),
    ]
    agent = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=HERE)
    assert agent.stderr is not None
    ready, _, _ = select.select([agent.stderr], [], [], 120)
    line = agent.stderr.readline() if ready else ""
    if '"agent_started"' not in line:
        agent.kill()
        print(f"soak: error: the agent did not start: {line}{agent.communicate()[1]}", file=sys.stderr)
        return 1
    log(f"agent pid {agent.pid} on :{metrics}; churn :{churn_port}, leaks :{leak_port}, {args.minutes} min")

    counts = Counts()
    stop = threading.Event()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", churn_port))
    lsock.listen(1024)
    server_stop = threading.Event()  # after the clients: nothing may be left unaccepted
    threads = [threading.Thread(target=churn_server, args=(lsock, server_stop, counts), daemon=True)]
    threads += [
        threading.Thread(
            target=churn_client, args=(connect_close, churn_port, args.per_process, stop, counts)
        )
        for _ in range(args.clients)
    ]
    threads.append(threading.Thread(target=leak_cycles, args=(leaky, leak_port, args.cycle, stop, counts)))
    rss = RssSeries()
    start = time.monotonic()
    failures: list[str] = []
    try:
        for t in threads:
            t.start()
        end = start + args.minutes * 60
        next_report = start + 30
        while time.monotonic() < end:
            if agent.poll() is not None:
                failures.append(f"the agent exited early ({agent.returncode})")
                break
            rss.add(time.monotonic() - start, rss_bytes(agent.pid))
            if time.monotonic() >= next_report:
                next_report += 30
                log(f"rss {rss.samples[-1][1] / 2**20:.1f} MiB, {counts.churn} churn connections")
            time.sleep(args.sample)
    finally:
        stop.set()
        for t in threads[1:]:
            t.join(120)
        # Every client connection is accepted and closed by the server before it stops.
        deadline = time.monotonic() + 30
        while counts.server_closes < counts.churn and time.monotonic() < deadline:
            time.sleep(0.1)
        server_stop.set()
        threads[0].join(5)
        lsock.close()

    # Let the last closes and TIME_WAIT conversions reach the agent (it refreshes every 1 s).
    expected = {
        "tcptrace_timewait_created_total": counts.churn + counts.leak_l + counts.leak_c,
        "tcptrace_close_wait_entered_total": counts.churn + counts.leak_l + counts.leak_c,
        "tcptrace_close_wait_closed_total": counts.churn + counts.leak_l + counts.leak_c,
        # close(): the churn server's and client's, ours of leaky clients, leaky_server's 'C'.
        # and the churn server's listening socket.
        "close_calls": 2 * counts.churn + counts.leak_l + 2 * counts.leak_c + 1,
    }
    got, text = await_counts(agent, metrics, expected)
    warnings = compare_counts(expected, got, args.tw_tolerance, failures)
    lost = sample_value(text, "tcptrace_events_lost_total") if text else None
    series = sum(
        1 for ln in text.splitlines() if ln.startswith("tcptrace_timewait_created_by_process_total{")
    )
    if series > 6:
        failures.append(f"{series} per-process TIME_WAIT series with --top-processes 5")
    flat, rss_text = rss.verdict(margin=args.margin)
    if not flat:
        failures.append(f"memory not flat: {rss_text}")

    cpu_s = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{agent.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    stop_agent(agent, failures)

    suspects = 0
    with contextlib.suppress(OSError):
        suspects = sum(1 for ln in agent_log.read_text().splitlines() if '"leak_suspect"' in ln)
    if counts.leak_l and not suspects:
        failures.append("no leak suspect was logged")
    report: dict[str, Any] = {
        "minutes": args.minutes,
        "workload": {
            "churn_connections": counts.churn,
            "churn_process_failures": counts.churn_failed,
            "leaked": counts.leak_l,
            "closed_by_leaky_server": counts.leak_c,
        },
        "expected": expected,
        "agent": got,
        "events_lost": lost,
        "kernel_map_failures": {
            k: v
            for k, v in (
                (m, sample_value(text, "tcptrace_kernel_map_failures_total", {"map": m}))
                for m in ("socks", "stacks", "timewait", "closelat_hists", "closelat_calls")
            )
            if v
        },
        "map_entries_pruned": total(text, "tcptrace_map_entries_pruned_total"),
        "bpf_recursion_misses": {
            s.labels["program"]: s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == "tcptrace_bpf_recursion_misses_total" and s.value
        }
        if text
        else {},
        "label_sets": total(text, "tcptrace_label_sets"),
        "suspect_log_lines": suspects,
        "rss_mib": {
            "first": round(rss.samples[0][1] / 2**20, 1) if rss.samples else None,
            "max": round(max(r for _, r in rss.samples) / 2**20, 1) if rss.samples else None,
            "last": round(rss.samples[-1][1] / 2**20, 1) if rss.samples else None,
            "verdict": rss_text,
        },
        "agent_cpu_seconds": cpu_s,
        "warnings": warnings,
        "failures": failures,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    with contextlib.suppress(OSError):
        agent_log.unlink()
    if failures:
        for f in failures:
            print(f"soak: FAIL: {f}", file=sys.stderr)
        return 1
    for w in warnings:
        print(f"soak: WARNING: {w}", file=sys.stderr)
    log("ok: counts exact" + (" (but see the warnings)" if warnings else "") + ", memory flat, clean stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
