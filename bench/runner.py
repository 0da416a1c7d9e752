"""Impure half of scripts/bench: run the load, attach each tracer, measure, write the report.

For each scenario (a loadgen mode and pace), one loadgen run untraced, one with each
tcptrace command attached, one with tcpstates-bpfcc, and a second untraced run (the two
untraced runs bracket the others, so drift shows). A tracer is spawned, waited for until
its programs are attached (bpftool perf show) and it is idle, then the load runs; after
the load the tracer is given time to drain its backlog (until its CPU goes idle), then it
is stopped with SIGINT and its summary read.

Measured per run: connections/s; the tracer's CPU (utime+stime from /proc/PID/stat, from
just before the load to the end of its catch-up) per million transitions the load made;
its peak RSS (VmHWM); events it delivered; losses it reported (tcptrace: the summary's
`lost`, an exact in-kernel counter; tcpstates: bcc's "Possibly lost N samples" lines).
Separately: time from spawn to the first event line under a trickle of connections.

Everything is bounded: every loadgen run stops by itself, every wait has a deadline, and
every process started here is stopped here, by its pid.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.report import (
    REFERENCE,
    UNTRACED,
    BpfUse,
    Run,
    Scenario,
    Startup,
    bpf_use,
    evaluate_targets,
    expected_transitions,
    last_summary,
    parse_help_commands,
    parse_possibly_lost,
    parse_proc_stat_state,
    parse_proc_stat_ticks,
    parse_prometheus_lost,
    parse_vm_hwm_kb,
    render_markdown,
    scalar_fields,
    splice,
)

ROOT = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
# Commands issue 8 asks to measure, in the order they are run; only those `tcptrace --help`
# lists are measured, so the bench keeps working as commands land.
CANDIDATES = ("states", "record", "closewait", "timewait", "closelat", "diagnose", "agent")
STREAMS = ("states", REFERENCE)  # tracers that print one line per transition
F_SETPIPE_SZ = 1031
TRANSITION = b'{"type":"transition"'
# Every kind of event line a recording holds (the others name stacks, owners, settings).
EVENT_KINDS = (TRANSITION, b'{"type":"touch"', b'{"type":"timewait"', b'{"type":"close"')


class PatternCounts:
    """Occurrences of byte patterns in a stream read in chunks, a pattern cut by a chunk
    boundary included: each pattern keeps its own length less one byte of what came before
    (no more, or a shorter pattern kept whole in it would be counted twice)."""

    def __init__(self, patterns: tuple[bytes, ...]) -> None:
        self.counts = dict.fromkeys(patterns, 0)
        self._before = b""
        self._keep = max(len(p) for p in patterns) - 1

    def feed(self, chunk: bytes) -> None:
        for pattern in self.counts:
            cut = len(pattern) - 1
            self.counts[pattern] += (
                (self._before[-cut:] + chunk).count(pattern) if cut else chunk.count(pattern)
            )
        self._before = (self._before + chunk)[-self._keep :]


FULL = [
    Scenario("client-first", 0, 6.0),
    Scenario("server-first", 0, 6.0),
    Scenario("client-first", 5000, 6.0),
    Scenario("client-first", 1000, 6.0),
]
QUICK = [Scenario("client-first", 0, 2.0)]


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def reference_headers() -> dict[str, str]:
    """BCC_KERNEL_SOURCE for tcpstates-bpfcc where bcc would find no headers by itself (no
    /lib/modules/RELEASE/build): the tree tcptrace compiles with, so that both compile alike."""
    from tcptrace.errors import TcptraceError
    from tcptrace.kernel import headers

    try:
        found = headers.find()
    except TcptraceError:
        return {}
    return {headers.ENV: found.env} if found.env else {}


class BenchError(Exception):
    """A measurement could not be made; the message says why (one line)."""


# --- processes -----------------------------------------------------------------------------------


class OutputReader(threading.Thread):
    """Drains a tracer's stdout: counts lines, keeps the tail, notes when the first event came.

    ``lazy``: sleep between reads so a fast writer fills the (1 MiB) pipe instead of waking
    this thread on every line: the bench's own reading then costs the machine little.
    """

    def __init__(self, fd: int, is_event: Callable[[bytes], bool], lazy: bool) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.is_event = is_event
        self.lazy = lazy
        self.lines = 0
        self.bytes = 0
        # JSON transition lines (states --json also writes the cgroup/process lines that name
        # owners).
        self.transitions = PatternCounts((TRANSITION,))
        self.first_line_t: float | None = None
        self.first_event_t: float | None = None
        # The last complete lines, whole however long (a summary listing thousands of
        # sockets runs to megabytes), and the line being written.
        self.last_lines: list[bytes] = []
        self._current = b""
        self._partial = b""
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass  # a smaller pipe only makes the reader wake more often

    def run(self) -> None:
        while True:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except OSError:
                break
            if not chunk:
                break
            now = time.monotonic()
            self.bytes += len(chunk)
            self.lines += chunk.count(b"\n")
            self.transitions.feed(chunk)
            if self.first_event_t is None:
                data = self._partial + chunk
                *complete, self._partial = data.split(b"\n")
                for line in complete:
                    if self.first_line_t is None:
                        self.first_line_t = now
                    if self.is_event(line):
                        self.first_event_t = now
                        self._partial = b""
                        break
            self._keep_last_lines(chunk)
            if self.lazy:
                time.sleep(0.01)

    def _keep_last_lines(self, chunk: bytes) -> None:
        end = chunk.rfind(b"\n")
        if end == -1:
            if len(self._current) < (64 << 20):  # bounded: a line longer than 64 MiB is cut
                self._current += chunk
            return
        before = chunk.rfind(b"\n", 0, end)
        if before == -1:
            self.last_lines = [*self.last_lines[-2:], self._current + chunk[:end]]
        else:
            previous = chunk.rfind(b"\n", 0, before)
            head = self._current + chunk[:before] if previous == -1 else chunk[previous + 1 : before]
            self.last_lines = [head, chunk[before + 1 : end]]
        self._current = chunk[end + 1 :]

    @property
    def tail(self) -> bytes:
        """The last complete lines (and any unfinished one), newline-separated."""
        return b"\n".join([*self.last_lines, self._current])


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return parse_proc_stat_ticks(fh.read())


def runnable(pid: int) -> bool:
    """Whether a thread of ``pid`` is running or waiting for a CPU (state R, or D).

    A tracer starved of CPU on a busy host shows flat CPU time too: only a tracer whose
    threads all sleep (in poll) has caught up."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                if parse_proc_stat_state(fh.read()) in ("R", "D"):
                    return True
        except OSError:
            continue
    return False


def peak_rss_kb(pid: int) -> int | None:
    with open(f"/proc/{pid}/status") as fh:
        return parse_vm_hwm_kb(fh.read())


def rss_kb(pid: int) -> int | None:
    with open(f"/proc/{pid}/status") as fh:
        return parse_vm_hwm_kb(fh.read(), "VmRSS")


def reset_peak_rss(pid: int) -> bool:
    """Start VmHWM again from the current RSS (clear_refs "5", Linux 4.0+), so that the peak
    read after the load is the load's, not the compile's (bcc compiles in the process)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def bpftool_json(*args: str) -> list[dict[str, Any]]:
    try:
        out = subprocess.run(
            ["bpftool", "-j", *args], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        entries = json.loads(out or "[]")
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    return entries if isinstance(entries, list) else []


def perf_attached(pid: int) -> int:
    """How many classic tracepoints process ``pid`` has programs attached to (bpftool perf show)."""
    return sum(1 for e in bpftool_json("perf", "show") if e.get("pid") == pid)


def process_bpf(pid: int) -> BpfUse:
    """The BPF programs and links process ``pid`` holds, from /proc/PID/fdinfo (run time, runs,
    runs the kernel skipped). Run time and count need kernel.bpf_stats_enabled."""
    texts = []
    try:
        names = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return BpfUse()
    for name in names:
        try:
            with open(f"/proc/{pid}/fdinfo/{name}") as fh:
                texts.append(fh.read())
        except OSError:
            continue  # closed meanwhile
    return bpf_use(texts)


SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0


def enable_bpf_stats() -> int | None:
    """Turn on BPF run-time statistics for as long as the returned fd stays open.

    bpf(BPF_ENABLE_STATS) rather than writing kernel.bpf_stats_enabled: the kernel counts
    every holder, so nothing global is changed behind other users' backs and stats stay on
    whatever they do with the sysctl. Costs every BPF program two clock reads a run, for
    every tracer alike. None when the kernel refuses (then no BPF time is reported).
    """
    import ctypes

    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)()  # union bpf_attr, zeroed; enable_stats.type first
    attr[0] = BPF_STATS_RUN_TIME
    fd = int(libc.syscall(nr, BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr)))
    return fd if fd >= 0 else None


class Tracer:
    """One tracer process: spawned, waited for, measured, stopped (by its pid, never by name)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        metrics_url: str | None = None,
        output_path: Path | None = None,
        lazy: bool = True,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.metrics_url = metrics_url
        self.output_path = output_path  # record writes its events there, not to stdout
        self.lazy = lazy
        self.proc: subprocess.Popen[bytes] | None = None
        self.reader: OutputReader | None = None
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (read after the tracer stops; freed with this object)
        self.t0 = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def is_event(self, line: bytes) -> bool:
        if self.name == REFERENCE:
            return bool(line.strip()) and not line.startswith(b"SKADDR")
        return line.startswith(b"{") and b'"type":"header"' not in line.replace(b" ", b"")

    def start(self) -> None:
        env = dict(os.environ)
        env.update(self.env or {})
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr, env=env
        )
        assert self.proc.stdout is not None
        self.reader = OutputReader(self.proc.stdout.fileno(), self.is_event, self.lazy)
        self.reader.start()

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode("utf-8", "replace")

    def _died(self) -> BenchError:
        lines = [ln for ln in self.stderr_text().splitlines() if ln.strip()]
        return BenchError(
            f"exited {self.proc.returncode if self.proc else '?'}: {lines[-1] if lines else 'no message'}"
        )

    def wait_attached(self, timeout_s: float = 90.0) -> float:
        """Seconds from spawn until its programs are attached and it has gone idle."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise self._died()
            if process_bpf(self.pid).links or perf_attached(self.pid):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"no program attached after {timeout_s:.0f} s")
            time.sleep(0.05)
        ready = time.monotonic() - self.t0
        if self.metrics_url is not None:
            self._wait_metrics(deadline)
        self.wait_idle(10.0)
        return ready

    def _wait_metrics(self, deadline: float) -> None:
        assert self.metrics_url is not None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.metrics_url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise BenchError(f"{self.metrics_url} did not answer")

    def wait_idle(self, max_s: float, window_s: float = 0.4) -> float:
        """Wait until the tracer's CPU is flat (at most 1 tick in ``window_s``); seconds waited."""
        start = time.monotonic()
        history: list[tuple[float, int]] = []
        while time.monotonic() - start < max_s:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise self._died()
            now = time.monotonic()
            history.append((now, cpu_ticks(self.pid)))
            old = [h for h in history if now - h[0] >= window_s]
            if old and history[-1][1] - old[-1][1] <= 1 and not runnable(self.pid):
                return max(0.0, old[-1][0] - start)
            time.sleep(0.1)
        return max_s

    def scrape_lost(self) -> int | None:
        if self.metrics_url is None:
            return None
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
                return parse_prometheus_lost(resp.read().decode("utf-8", "replace"))
        except OSError:
            return None

    def stop(self) -> None:
        """SIGINT (a clean stop that prints the summary), then SIGTERM, then SIGKILL."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        if self.reader is not None:
            self.reader.join(10)


# --- the bench -----------------------------------------------------------------------------------


class Bench:
    def __init__(self, loadgen: Path, tcpstates: str | None, commands: list[str]) -> None:
        self.loadgen = loadgen
        self.tcpstates = tcpstates
        self.commands = commands
        self.bpf_stats = False  # kernel.bpf_stats_enabled was set for the runs
        self._src = 0
        # Each loadgen run binds its clients to a loopback address of its own, so it never
        # meets the TIME_WAIT sockets of an earlier run (which live 60 s).
        self._src_base = (os.getpid() % 200) + 20

    def next_src(self) -> str:
        self._src += 1
        return f"127.{self._src_base}.{self._src // 250}.{self._src % 250 + 1}"

    def tracer(self, name: str, lazy: bool = True, env: dict[str, str] | None = None) -> Tracer:
        if name == REFERENCE:
            assert self.tcpstates is not None
            return Tracer(name, [self.tcpstates], env={**reference_headers(), **(env or {})}, lazy=lazy)
        base = [sys.executable, "-m", "tcptrace", name]
        if name == "agent":
            port = free_port()
            return Tracer(
                name,
                [*base, "--listen", f"127.0.0.1:{port}", "--interval", "1"],
                env=env,
                lazy=lazy,
                metrics_url=f"http://127.0.0.1:{port}/metrics",
            )
        if name == "record":
            out = Path(tempfile.mkdtemp(prefix="tcptrace-bench-")) / "run.jsonl"
            return Tracer(name, [*base, "-o", str(out)], env=env, lazy=lazy, output_path=out)
        return Tracer(name, [*base, "--json"], env=env, lazy=lazy)

    def run_load(self, sc: Scenario) -> dict[str, Any]:
        argv = [
            str(self.loadgen),
            "--mode",
            sc.mode,
            "--rate",
            str(sc.rate),
            "--duration",
            str(sc.duration_s),
            "--src",
            self.next_src(),
        ]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=sc.duration_s + 60)
        except subprocess.TimeoutExpired:
            raise BenchError("loadgen did not finish") from None
        if done.returncode != 0:
            raise BenchError(f"loadgen exited {done.returncode}: {done.stderr.strip()[-200:]}")
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def run_flush(self) -> int:
        argv = [
            str(self.loadgen),
            "--mode",
            "client-first",
            "--rate",
            "200",
            "--max-conns",
            "20",
            "--duration",
            "2",
            "--src",
            self.next_src(),
        ]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
            return int(json.loads(done.stdout)["connections"])
        except (subprocess.SubprocessError, ValueError, KeyError) as exc:
            raise BenchError(f"flush loadgen failed: {exc}") from None

    def measure(self, sc: Scenario, name: str) -> Run:
        run = Run(scenario=sc.key, tracer=name)
        tracer = None if name == UNTRACED else self.tracer(name)
        try:
            if tracer is not None:
                tracer.start()
                run.ready_s = tracer.wait_attached()
                run.startup_cpu_s = cpu_ticks(tracer.pid) / TICK
                run.idle_rss_kb = rss_kb(tracer.pid)
                peak_from_idle = reset_peak_rss(tracer.pid)
                bpf0 = process_bpf(tracer.pid)
                c0 = cpu_ticks(tracer.pid)
            load = self.run_load(sc)
            run.connections = int(load["connections"])
            run.failed = int(load["failed"])
            run.elapsed_s = float(load["elapsed_s"])
            run.conn_per_s = float(load["conn_per_s"])
            run.expected_transitions = expected_transitions(run.connections)
            if tracer is not None:
                run.catchup_s = tracer.wait_idle(30.0)
                run.cpu_s = (cpu_ticks(tracer.pid) - c0) / TICK
                run.peak_rss_kb = peak_rss_kb(tracer.pid)
                run.load_peak_rss_kb = run.peak_rss_kb if peak_from_idle else None
                bpf1 = process_bpf(tracer.pid)
                if self.bpf_stats:
                    run.bpf_ns = bpf1.run_time_ns - bpf0.run_time_ns
                    run.bpf_runs = bpf1.run_cnt - bpf0.run_cnt
                run.recursion_misses = bpf1.recursion_misses - bpf0.recursion_misses
                # A few connections more, so that a perf buffer's pending loss record (written
                # only with its next sample) reaches tcpstates; counted in what every stream
                # should have delivered, not in CPU per transition.
                run.flush_connections = self.run_flush()
                tracer.wait_idle(5.0)
                if tracer.metrics_url is not None:
                    time.sleep(1.5)  # the agent refreshes its metrics every --interval (1 s)
                    run.lost_reported = tracer.scrape_lost()
        except BenchError as exc:
            run.error = str(exc)
        finally:
            if tracer is not None:
                tracer.stop()
        try:
            if tracer is not None and run.error is None:
                self._read_outcome(tracer, run)
        finally:
            if tracer is not None and tracer.output_path is not None:
                shutil.rmtree(tracer.output_path.parent, ignore_errors=True)
        return run

    def _read_outcome(self, tracer: Tracer, run: Run) -> None:
        assert tracer.reader is not None
        if tracer.name == REFERENCE:
            run.lost_reported = parse_possibly_lost(tracer.stderr_text())
            run.events_received = max(0, tracer.reader.lines - 1)  # minus the header
            return
        if tracer.metrics_url is not None:
            return
        if tracer.output_path is not None:
            self._read_recording(tracer.output_path, run)
            return
        summary = last_summary(tracer.reader.tail)
        if summary is None:
            run.error = f"no summary line ({tracer._died()})"
            return
        run.summary = scalar_fields(summary)
        if "lost" in summary:
            run.lost_reported = int(summary["lost"])
        if summary.get("skipped_transitions") is not None:
            run.skipped_reported = int(summary["skipped_transitions"])
        elif isinstance(summary.get("kernel_skipped_runs"), dict):  # timewait: by tracepoint
            run.skipped_reported = sum(int(v) for v in summary["kernel_skipped_runs"].values())
        if summary.get("kernel_transitions") is not None:
            run.kernel_transitions = int(summary["kernel_transitions"])
        if summary.get("unseen_ends") is not None:
            run.unseen_ends = int(summary["unseen_ends"])
        if tracer.name == "states":
            run.events_received = tracer.reader.transitions.counts[TRANSITION]

    @staticmethod
    def _read_recording(path: Path, run: Run) -> None:
        """record's outcome: the summary line it ends its file with, and the transitions in it."""
        events, tail = PatternCounts(EVENT_KINDS), b""
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    events.feed(chunk)
                    tail = (tail + chunk)[-(1 << 20) :]
        except OSError as exc:
            run.error = f"cannot read the recording: {exc.strerror}"
            return
        summary = last_summary(tail)
        if summary is None:
            run.error = "the recording has no summary line"
            return
        run.summary = scalar_fields(summary)
        run.events_received = events.counts[TRANSITION]
        run.events_delivered = sum(events.counts.values())
        if "lost" in summary:
            run.lost_reported = int(summary["lost"])
        if summary.get("kernel_transitions") is not None:
            run.kernel_transitions = int(summary["kernel_transitions"])
        if summary.get("skipped_transitions") is not None:
            run.skipped_reported = int(summary["skipped_transitions"])
        if summary.get("unseen_ends") is not None:
            run.unseen_ends = int(summary["unseen_ends"])

    def first_event(self, name: str, reps: int) -> Startup:
        """Spawn the tracer with a trickle of connections running; time its first event line.

        PYTHONUNBUFFERED=1 so that tcpstates' print() is not held in a pipe buffer: this
        times the tracer, not its stdio buffering (tcptrace flushes every line anyway).
        """
        result = Startup(tracer=name)
        for _ in range(reps):
            tracer = self.tracer(name, lazy=False, env={"PYTHONUNBUFFERED": "1"})
            trickle: subprocess.Popen[bytes] | None = None
            try:
                tracer.start()
                trickle = subprocess.Popen(
                    [
                        str(self.loadgen),
                        "--mode",
                        "client-first",
                        "--rate",
                        "100",
                        "--duration",
                        "60",
                        "--src",
                        self.next_src(),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                deadline = time.monotonic() + 60
                assert tracer.reader is not None and tracer.proc is not None
                while tracer.reader.first_event_t is None and time.monotonic() < deadline:
                    if tracer.proc.poll() is not None:
                        raise tracer._died()
                    time.sleep(0.01)
                if tracer.reader.first_event_t is None:
                    raise BenchError("no event within 60 s")
                result.first_event_s.append(tracer.reader.first_event_t - tracer.t0)
            except BenchError as exc:
                result.error = str(exc)
            finally:
                if trickle is not None:
                    # loadgen forks a server and a client: stop the session we started.
                    try:
                        os.killpg(trickle.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
                    trickle.wait(10)
                tracer.stop()
        return result


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def available_commands() -> list[str]:
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tcptrace", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"tcptrace --help failed: {exc}") from None
    listed = set(parse_help_commands(out))
    return [c for c in CANDIDATES if c in listed]


def read_text(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def host_meta(quick: bool) -> dict[str, Any]:
    try:
        import bcc

        bcc_version = getattr(bcc, "__version__", "?")
    except ImportError:
        bcc_version = "not importable"

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "?"
    if git("status", "--porcelain", "--", "src", "bpf"):
        commit += " (with uncommitted changes in src/ or bpf/)"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "bcc": bcc_version,
        "python": platform.python_version(),
        "loadavg": read_text("/proc/loadavg").split(" ")[0],
        "quick": quick,
        "sysctl": {
            name: read_text(f"/proc/sys/net/ipv4/{name}")
            for name in ("tcp_tw_reuse", "tcp_max_tw_buckets", "ip_local_port_range")
        },
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="tcptrace's overhead and event loss under loopback connection churn, next to "
        "tcpstates-bpfcc: connections/s, events lost, tracer CPU per million transitions, BPF "
        "time, peak RSS, time to the first event.",
    )
    p.add_argument("--quick", action="store_true", help="one scenario, 2 s loads: about a minute")
    p.add_argument(
        "--out",
        help="directory for benchmarks.md and benchmarks.json "
        "(default: docs/ for a full run, /tmp/tcptrace-bench for --quick)",
    )
    p.add_argument(
        "--tracers", help="comma-separated subset of: untraced, tcpstates, " + ", ".join(CANDIDATES)
    )
    p.add_argument("--duration", type=float, help="seconds of load per run (overrides the default)")
    p.add_argument("--no-bpf-stats", action="store_true", help="do not turn on BPF run-time statistics")
    p.add_argument("--loadgen", default=str(ROOT / "bench" / "bin" / "loadgen"))
    p.add_argument("--tcpstates", default=shutil.which("tcpstates-bpfcc") or "/usr/sbin/tcpstates-bpfcc")
    return p.parse_args(argv)


def setup_problem(loadgen: Path) -> str | None:
    """Why the bench cannot run here, or None."""
    if os.geteuid() != 0:
        return "run as root (sudo scripts/bench): tracers need it"
    if shutil.which("bpftool") is None:
        return "bpftool not found (scripts/install --dev installs it)"
    if not os.access(loadgen, os.X_OK):
        return f"no load generator at {loadgen} (scripts/bench builds it)"
    return None


SNAPSHOT_SOCKETS = 50_000  # the host of issue 15's snapshot target
SNAPSHOT_SOCKETS_QUICK = 5_000


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    loadgen = Path(args.loadgen)
    problem = setup_problem(loadgen)
    if problem is not None:
        say(f"error: {problem}")
        return 1
    scenarios = QUICK if args.quick else FULL
    if args.duration is not None:
        if not 0 < args.duration <= 600:
            say("error: --duration must be in (0, 600]")
            return 2
        scenarios = [Scenario(s.mode, s.rate, args.duration) for s in scenarios]
    try:
        commands = available_commands()
    except BenchError as exc:
        say(f"error: {exc}")
        return 1
    tcpstates = args.tcpstates if os.access(args.tcpstates, os.X_OK) else None
    tracers = [*commands, *([REFERENCE] if tcpstates else [])]
    if args.tracers:
        wanted = [t.strip() for t in args.tracers.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in (UNTRACED, REFERENCE, *CANDIDATES)]
        if unknown:
            say(f"error: unknown tracer {', '.join(unknown)}")
            return 2
        tracers = [t for t in tracers if t in wanted]
    measured_commands = [t for t in tracers if t in commands]
    meta = host_meta(args.quick)
    if float(meta["loadavg"] if meta["loadavg"] != "?" else 0) > 0.7:
        say(f"warning: load average {meta['loadavg']}: other work is running, numbers will be noisy")
    if tcpstates is None:
        say(f"warning: {args.tcpstates} not found: no reference (install bpfcc-tools)")
    say(f"commands: {', '.join(measured_commands) or 'none'}; reference: {tcpstates or 'none'}")

    bench = Bench(loadgen, tcpstates, commands)
    runs: list[Run] = []
    startups = []
    stats_fd = None if args.no_bpf_stats else enable_bpf_stats()
    meta["bpf_stats"] = bench.bpf_stats = stats_fd is not None
    try:
        for sc in scenarios:
            for name in [UNTRACED, *tracers, UNTRACED]:
                run = bench.measure(sc, name)
                runs.append(run)
                say(progress_line(run))
        for name in [t for t in tracers if t in STREAMS]:
            s = bench.first_event(name, reps=1 if args.quick else 3)
            startups.append(s)
            say(f"first event {name}: {s.first_event_s} {s.error or ''}".rstrip())
    finally:
        if stats_fd is not None:
            os.close(stats_fd)
    side_measurements(args, tracers, meta)
    meta["wall_s"] = round(time.monotonic() - started, 1)
    write_outputs(args, meta, scenarios, runs, startups, measured_commands)
    return 0


def side_measurements(args: argparse.Namespace, tracers: list[str], meta: dict[str, Any]) -> None:
    """Measurements beside the loads, into ``meta``: the user side's cost per event, and a
    snapshot of a host with many sockets. Each failure is said and leaves the report whole."""
    if "states" in tracers:
        from bench.decode_cost import measure as decode_cost

        try:
            meta["decode_cost_us"] = {k: round(v, 3) for k, v in decode_cost().items()}
        except Exception as exc:  # a side measurement: say why, keep the report
            say(f"decode cost not measured: {exc}")

    if not args.tracers:
        from bench.snapshot_cost import measure as snapshot_cost

        sockets = SNAPSHOT_SOCKETS_QUICK if args.quick else SNAPSHOT_SOCKETS
        try:
            meta["snapshot_cost"] = snapshot_cost(sockets, 3 if args.quick else 5)
        except Exception as exc:  # a side measurement: say why, keep the report
            say(f"snapshot cost not measured: {exc}")


def progress_line(run: Run) -> str:
    if run.error is not None:
        return f"{run.scenario:<20} {run.tracer:<10} failed: {run.error}"
    line = f"{run.scenario:<20} {run.tracer:<10} {run.conn_per_s:>9,.0f} conn/s"
    if run.tracer != UNTRACED:
        line += (
            f"  cpu {run.cpu_s or 0:.2f} s  bpf {run.bpf_ns_per_transition or 0:.0f} ns/tr"
            f"  lost {run.lost_reported}  skipped {run.recursion_misses}  received {run.events_received}"
            f"  kernel {run.kernel_transitions}  expected {run.expected_transitions}"
            f"  catch-up {run.catchup_s or 0:.1f} s"
        )
    return line


def write_outputs(
    args: argparse.Namespace,
    meta: dict[str, Any],
    scenarios: list[Scenario],
    runs: list[Run],
    startups: list[Startup],
    commands: list[str],
) -> None:
    out_dir = Path(
        args.out or (ROOT / "docs" if not args.quick else Path(tempfile.gettempdir()) / "tcptrace-bench")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    generated = render_markdown(meta, scenarios, runs, startups, commands)
    doc = {
        "meta": meta,
        "commands": commands,
        "scenarios": [{**asdict(s), "key": s.key} for s in scenarios],
        "runs": [r.to_json() for r in runs],
        "startup": [{**asdict(s), "first_event_median_s": s.first_event_median} for s in startups],
        "verdicts": [
            asdict(v) for v in evaluate_targets(runs, commands, startups, meta.get("snapshot_cost"))
        ],
    }
    (out_dir / "benchmarks.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = out_dir / "benchmarks.md"
    existing = md.read_text() if md.exists() else "# Benchmarks\n\n"
    md.write_text(splice(existing, generated))
    print(generated)
    say(f"wrote {md} and {out_dir / 'benchmarks.json'}")


if __name__ == "__main__":
    sys.exit(main())
