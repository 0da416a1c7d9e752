"""CPU per delivered event and losses of the stream commands under one paced load.

A smaller cousin of scripts/bench for working on `states --json` and `record`: one loadgen
mode and pace, a few tracers, several repetitions interleaved (so that a busy neighbour
slows every tracer alike), and the medians. Each run spawns the tracer, waits until it is
attached and idle, runs the load, waits until the tracer has drained (CPU flat, no thread
runnable), stops it with SIGINT and reads its summary. CPU is utime+stime of the tracer
(/proc/PID/stat) from just before the load until it had drained.

    sudo .venv/bin/python -m bench.stream_cost --rate 5000 --repeat 3
    sudo .venv/bin/python -m bench.stream_cost --rate 0 --tracers states,tcpstates
    # an older tree side by side: a tracer NAME@DIR runs DIR/src's tcptrace
    sudo .venv/bin/python -m bench.stream_cost --tracers states@/path/to/old,states

Needs root, bpftool, bench/bin/loadgen (`cc -O2 -o bench/bin/loadgen bench/loadgen.c`) and,
for the reference, tcpstates-bpfcc (given the kernel headers tcptrace compiles with, when
bcc would find none). Not run by scripts/bench; nothing is written but a temporary
recording (removed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import (
    REFERENCE,
    UNTRACED,
    Scenario,
    expected_transitions,
    last_summary,
    parse_possibly_lost,
)
from bench.runner import TICK, Bench, BenchError, Tracer, cpu_ticks, peak_rss_kb, reference_headers

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sample:
    tracer: str
    transitions: int = 0
    delivered: int = 0
    lost: int | None = None
    cpu_s: float = 0.0
    catchup_s: float = 0.0
    rss_mb: float = 0.0
    size_mb: float | None = None
    conn_per_s: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def us_per_event(self) -> float | None:
        return self.cpu_s / self.delivered * 1e6 if self.delivered else None


def parse_spec(name: str) -> tuple[str, str, list[str], dict[str, str]]:
    """A tracer spec ``[KEY=VALUE ...] NAME[@DIR] [ARGS ...]`` as (NAME, DIR, ARGS, env):
    NAME is states, record or tcpstates; ``@DIR`` runs that tree's src/; ARGS are added to
    tcptrace's command line (``states --buffer 4``)."""
    words = name.split()
    settings = [w for w in words if "=" in w and not w.startswith("-")]
    rest = [w for w in words if w not in settings]
    base, _, tree = rest[0].partition("@")
    return base, tree, rest[1:], dict(w.split("=", 1) for w in settings)


def tracer_argv(name: str, out: str) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of a tracer spec (see parse_spec)."""
    base, tree, extra, env = parse_spec(name)
    extra += os.environ.get("STREAM_COST_ARGS", "").split()
    if tree:
        env["PYTHONPATH"] = str(Path(tree) / "src")
    if base == REFERENCE:
        return ["/usr/sbin/tcpstates-bpfcc"], {**reference_headers(), **env}
    cmd = [sys.executable, "-m", "tcptrace"]
    if base == "states":
        return [*cmd, "states", "--json", *extra], env
    if base == "record":
        return [*cmd, "record", "-o", out, "--force", *extra], env
    raise SystemExit(f"unknown tracer {name}")


def untraced(bench: Bench, sc: Scenario) -> Sample:
    """The load alone: its pace with no tracer (what the others' conn/s compare with)."""
    load = bench.run_load(sc)
    return Sample(
        tracer=UNTRACED,
        transitions=expected_transitions(int(load["connections"])),
        conn_per_s=float(load["conn_per_s"]),
    )


def measure(bench: Bench, sc: Scenario, name: str) -> Sample:
    if name == UNTRACED:
        return untraced(bench, sc)
    sample = Sample(tracer=name)
    with tempfile.TemporaryDirectory(prefix="stream-cost-") as tmp:
        out = os.path.join(tmp, "rec.jsonl")
        argv, env = tracer_argv(name, out)
        tracer = Tracer(REFERENCE if name == REFERENCE else "states", argv, env=env)
        try:
            tracer.start()
            tracer.wait_attached()
            c0 = cpu_ticks(tracer.pid)
            load = bench.run_load(sc)
            sample.transitions = expected_transitions(int(load["connections"]))
            sample.conn_per_s = float(load["conn_per_s"])
            sample.catchup_s = tracer.wait_idle(30.0)
            sample.cpu_s = (cpu_ticks(tracer.pid) - c0) / TICK
            sample.rss_mb = (peak_rss_kb(tracer.pid) or 0) / 1024
        except BenchError as exc:
            sample.error = str(exc)
        finally:
            tracer.stop()
        assert tracer.reader is not None
        if name == REFERENCE:
            sample.delivered = max(0, tracer.reader.lines - 1)
            sample.lost = parse_possibly_lost(tracer.stderr_text())
            return sample
        if parse_spec(name)[0] == "record":
            try:
                with open(out, "rb") as fh:
                    data = fh.read()
                sample.size_mb = len(data) / 1e6
                summary = last_summary(data[-(1 << 20) :])
            except OSError as exc:
                sample.error = f"no recording: {exc}"
                return sample
            lines = [ln for ln in tracer.stderr_text().splitlines() if ln.strip()]
            sample.extra["last_line"] = lines[-1] if lines else ""
        else:
            summary = last_summary(tracer.reader.tail)
        if summary is None:
            sample.error = sample.error or "no summary"
            return sample
        sample.delivered = int(summary.get("events", 0))
        sample.lost = int(summary.get("lost", 0))
        sample.extra["kernel"] = summary.get("kernel_transitions")
    return sample


class StreamBench(Bench):
    """The bench's runs, with this script's tracers (NAME@DIR included)."""

    def tracer(self, name: str, lazy: bool = True, env: dict[str, str] | None = None) -> Tracer:
        argv, extra = tracer_argv(name, os.devnull)
        kind = REFERENCE if name == REFERENCE else "states"
        return Tracer(kind, argv, env={**(env or {}), **extra}, lazy=lazy)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.stream_cost", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tracers",
        default="states,record,tcpstates",
        help="comma-separated: untraced, tcpstates, or [KEY=VALUE ...] states|record[@DIR] [ARGS ...]",
    )
    p.add_argument("--rate", type=int, default=5000, help="connections/s, 0: as fast as it goes")
    p.add_argument("--mode", default="client-first", choices=["client-first", "server-first"])
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--loadgen", default=str(ROOT / "bench" / "bin" / "loadgen"))
    p.add_argument("--json", dest="json_out", help="also write every sample to this file")
    p.add_argument(
        "--first-event",
        type=int,
        default=0,
        metavar="N",
        help="instead: time from spawn to the first event, N times each (as scripts/bench)",
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("stream_cost: run as root", file=sys.stderr)
        return 1
    names = [t.strip() for t in args.tracers.split(",") if t.strip()]
    sc = Scenario(args.mode, args.rate, args.duration)
    bench = StreamBench(Path(args.loadgen), "/usr/sbin/tcpstates-bpfcc", [])
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    if args.first_event:
        for name in names:
            if parse_spec(name)[0] not in ("states", REFERENCE):
                continue
            startup = bench.first_event(name, args.first_event)
            times = ", ".join(f"{t:.2f}" for t in startup.first_event_s)
            print(f"{name:<24} first event after {times} s; median {startup.first_event_median or 0:.2f}")
        print(f"load average before {' '.join(load_before)}")
        return 0
    samples: list[Sample] = []
    for rep in range(args.repeat):
        for name in names:
            s = measure(bench, sc, name)
            samples.append(s)
            us = f"{s.us_per_event:.2f}" if s.us_per_event else "-"
            print(
                f"#{rep + 1} {name:<22} {s.conn_per_s:>8,.0f} conn/s  delivered {s.delivered:>9,}"
                f"  lost {s.lost}  of {s.transitions:,}  cpu {s.cpu_s:.2f} s  {us} us/event"
                f"  catch-up {s.catchup_s:.1f} s  rss {s.rss_mb:.0f} MB"
                + (f"  file {s.size_mb:.1f} MB" if s.size_mb is not None else "")
                + (f"  ERROR {s.error}" if s.error else "")
                + (f"  [{s.extra['last_line']}]" if s.extra.get("last_line") else ""),
                file=sys.stderr,
                flush=True,
            )
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(
        f"\n{sc.title}, {args.repeat} runs each; load average "
        f"before {' '.join(load_before)}, after {' '.join(load_after)}"
    )
    print(
        f"{'tracer':<24} {'conn/s':>8} {'us/event':>9} {'lost':>9} {'delivered':>10} {'cpu s':>6}"
        f" {'catch-up':>8} {'MB':>6}"
    )
    for name in names:
        ok = [s for s in samples if s.tracer == name and s.error is None]
        pace = median([s.conn_per_s for s in ok]) or 0
        if name == UNTRACED:
            print(f"{name:<24} {pace:>8,.0f}")
            continue
        per_event = median([s.us_per_event for s in ok if s.us_per_event])
        lost = median([float(s.lost or 0) for s in ok])
        size = median([s.size_mb for s in ok if s.size_mb is not None])
        delivered = median([s.delivered for s in ok])
        print(
            f"{name:<24} {pace:>8,.0f} {per_event or 0:>9.2f} {lost or 0:>9,.0f} {delivered or 0:>10,.0f}"
            f" {median([s.cpu_s for s in ok]) or 0:>6.2f} {median([s.catchup_s for s in ok]) or 0:>8.1f}"
            f" {size if size is not None else 0:>6.1f}"
        )
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {
                    "scenario": sc.key,
                    "load_before": load_before,
                    "load_after": load_after,
                    "samples": [{**s.__dict__, "us_per_event": s.us_per_event} for s in samples],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
