"""What `closewait` and the agent cost, and whether they count exactly, under churn.

    sudo .venv/bin/python -m bench.aggregates_cost [--duration 4] [--tracers closewait,agent,tcpstates]

The method of bench/runner.py (one tracer at a time, attached and idle before the load,
CPU from /proc/PID/stat until it drained, BPF run time with BPF_ENABLE_STATS, VmHWM), on
the loads of scripts/bench (bench/loadgen.c at max churn both ways, paced 5k and 1k
conn/s), plus what issue 14's targets need that the bench does not print: the CLOSE_WAIT
entries and closes each tracer counted against the load's connections, the agent's own
counters (scraped), and the RSS once attached and idle (the peak reset there) against the
peak under the load.
It builds bench/loadgen.c into a temporary directory and prints one JSON object per run.
It needs root and a quiet machine (it is not scripts/bench: that one writes the docs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.report import REFERENCE, Scenario, expected_transitions, last_summary
from bench.runner import (
    TICK,
    Bench,
    BenchError,
    Tracer,
    cpu_ticks,
    enable_bpf_stats,
    peak_rss_kb,
    process_bpf,
    reset_peak_rss,
)
from tcptrace.export.prometheus import sample_value

LOADS = (
    Scenario("client-first", 0, 4.0),
    Scenario("server-first", 0, 4.0),
    Scenario("client-first", 5000, 4.0),
    Scenario("client-first", 1000, 4.0),
)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode("utf-8", "replace"))


def measure(bench: Bench, sc: Scenario, name: str) -> dict[str, Any]:
    tracer: Tracer = bench.tracer(name)
    out: dict[str, Any] = {"load": sc.key, "tracer": name}
    try:
        tracer.start()
        tracer.wait_attached()
        # The peak from here on, not bcc's compile (as bench/runner.py measures it).
        out["peak_from_idle"] = reset_peak_rss(tracer.pid)
        out["rss_idle_kb"] = peak_rss_kb(tracer.pid)
        metrics0 = scrape(tracer.metrics_url) if tracer.metrics_url else ""
        bpf0, c0 = process_bpf(tracer.pid), cpu_ticks(tracer.pid)
        load = bench.run_load(sc)
        out["connections"] = int(load["connections"])
        out["conn_per_s"] = float(load["conn_per_s"])
        transitions = expected_transitions(out["connections"])
        out["catchup_s"] = tracer.wait_idle(30.0)
        cpu_s = (cpu_ticks(tracer.pid) - c0) / TICK
        bpf1 = process_bpf(tracer.pid)
        out["rss_peak_kb"] = peak_rss_kb(tracer.pid)
        out["cpu_s"] = cpu_s
        out["cpu_s_per_m_transitions"] = round(cpu_s / transitions * 1e6, 3)
        if bench.bpf_stats:
            out["bpf_ns_per_transition"] = round((bpf1.run_time_ns - bpf0.run_time_ns) / transitions)
        out["recursion_misses"] = bpf1.recursion_misses - bpf0.recursion_misses
        if tracer.metrics_url:
            time.sleep(2.5)  # two refreshes of the agent (--interval 1)
            text = scrape(tracer.metrics_url)
            for key, metric in (
                ("entered", "tcptrace_close_wait_entered_total"),
                ("closed", "tcptrace_close_wait_closed_total"),
                ("reset", "tcptrace_close_wait_reset_total"),
                ("lost", "tcptrace_events_lost_total"),
            ):
                now = sample_value(text, metric, {}) or 0
                out[key] = int(now - (sample_value(metrics0, metric, {}) or 0))
    except BenchError as exc:
        out["error"] = str(exc)
    finally:
        tracer.stop()
    if name != REFERENCE and not tracer.metrics_url and "error" not in out:
        assert tracer.reader is not None
        summary = last_summary(tracer.reader.tail) or {}
        for key in ("lost", "entered", "closed", "reset", "forgotten", "skipped_transitions", "open"):
            out[key] = summary.get(key)
        out["kernel"] = summary.get("kernel")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--tracers", default="closewait,agent,tcpstates")
    p.add_argument("--loads", default="all", help="all, or max (the two max-churn loads)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 1
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="tcptrace-aggcost-") as tmp:
        loadgen = Path(tmp) / "loadgen"
        subprocess.run(["cc", "-O2", "-o", str(loadgen), str(root / "bench" / "loadgen.c")], check=True)
        bench = Bench(loadgen, "/usr/sbin/tcpstates-bpfcc", [])
        stats_fd = enable_bpf_stats()
        bench.bpf_stats = stats_fd is not None
        loads = [Scenario(s.mode, s.rate, args.duration) for s in LOADS]
        if args.loads == "max":
            loads = [s for s in loads if s.rate == 0]
        try:
            for sc in loads:
                for name in args.tracers.split(","):
                    print(json.dumps(measure(bench, sc, name)), flush=True)
        finally:
            if stats_fd is not None:
                os.close(stats_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
