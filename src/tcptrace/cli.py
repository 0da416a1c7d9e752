"""The command line: options -> source -> model -> view. The only module that imports click."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from tcptrace import __version__
from tcptrace.commands.session import StopFlag, run
from tcptrace.commands.sources import open_source
from tcptrace.errors import TcptraceError, UsageError
from tcptrace.model.events import SocketEvent
from tcptrace.model.filters import EventFilter
from tcptrace.model.states import StatesSummary
from tcptrace.recording import JsonLinesWriter, make_header
from tcptrace.views.common import make_console

F = TypeVar("F", bound=Callable[..., Any])


class TcptraceGroup(click.Group):
    """Turns TcptraceError into one line on stderr and its exit code: never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TcptraceError as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            click.echo(f"tcptrace: error: {exc}{hint}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:
            # The reader went away (`tcptrace states --json | head`): not an error of ours.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(0)


@click.group(cls=TcptraceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tcptrace")
def cli() -> None:
    """Trace TCP socket lifecycles from the kernel with eBPF.

    Finds the process and code path behind sockets stuck in CLOSE_WAIT, counts TIME_WAIT
    creation exactly, and times close(). Tracing needs root (or CAP_BPF + CAP_PERFMON).

    \b
    Start with:
      sudo tcptrace demo            watch tcptrace find a leak (its own server and client)
      sudo tcptrace doctor          check this machine can trace
      sudo tcptrace top             sockets per state and the processes behind them, live
      sudo tcptrace diagnose        10 seconds, then what is wrong, with the evidence
      sudo tcptrace states          every TCP state transition, live
    """


def filter_options(fn: F) -> F:
    """--pid, --comm, --port, -4/-6: applied in the kernel, and to recordings alike."""
    fn = click.option("-6", "ipv6", is_flag=True, help="IPv6 sockets only.")(fn)
    fn = click.option("-4", "ipv4", is_flag=True, help="IPv4 sockets only.")(fn)
    fn = click.option(
        "--port",
        "ports",
        multiple=True,
        type=click.IntRange(1, 65535),
        help="Sockets with this local or remote port (repeatable).",
    )(fn)
    fn = click.option("--comm", help="Sockets owned by a process of this name (first 15 characters).")(fn)
    fn = click.option("--pid", type=click.IntRange(min=1), help="Sockets owned by this process.")(fn)
    return fn


def run_options(fn: F) -> F:
    """--interval, --duration, --json, --from."""
    fn = click.option(
        "--from",
        "from_file",
        type=click.Path(dir_okay=False),
        help="Replay a recording (from `tcptrace record`) instead of tracing the kernel.",
    )(fn)
    fn = click.option(
        "--json", "as_json", is_flag=True, help="One JSON object per line; the last is the summary."
    )(fn)
    fn = click.option(
        "--duration",
        type=click.FloatRange(min=0, min_open=True),
        help="Stop after S seconds and print the summary.",
    )(fn)
    fn = click.option(
        "--interval",
        type=click.FloatRange(min=0.05),
        default=1.0,
        show_default=True,
        help="Refresh every S seconds.",
    )(fn)
    return fn


def _power_of_two(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and (value < 1 or value & (value - 1)):
        raise click.BadParameter("must be a power of two (pages of 4 KiB)")
    return value


def ringbuf_option(fn: F) -> F:
    """--ringbuf-pages: size of the kernel-to-user event buffer."""
    return click.option(
        "--ringbuf-pages",
        type=int,
        callback=_power_of_two,
        help="Event ring buffer size in 4 KiB pages, a power of two (default 1024 = 4 MiB). "
        "Losses are counted exactly whatever the size.",
    )(fn)


def make_filter(
    pid: int | None, comm: str | None, ports: Sequence[int], ipv4: bool, ipv6: bool, live: bool
) -> EventFilter:
    if ipv4 and ipv6:
        raise UsageError("-4 and -6 exclude each other")
    if live and pid is not None and not os.path.isdir(f"/proc/{pid}"):
        raise UsageError(f"no process with pid {pid}")
    if comm is not None and not comm:
        raise UsageError("--comm needs a name")
    return EventFilter(pid=pid, comm=comm, ports=frozenset(ports), family=4 if ipv4 else 6 if ipv6 else None)


def stream_command(
    name: str,
    flt: EventFilter,
    from_file: str | None,
    duration: float | None,
    interval: float,
    stacks: bool,
    out: Any,
    as_json: bool,
    ringbuf_pages: int | None = None,
    parts: Sequence[str] = ("lifecycle",),
    defines: dict[str, int] | None = None,
    header: dict[str, Any] | None = None,
) -> None:
    """What `states` and `record` share: every event out, then the summary."""
    console = make_console()
    summary = StatesSummary()
    writer = JsonLinesWriter(out) if as_json else None
    with open_source(
        from_file, flt, parts=parts, stacks=stacks, defines=defines, ringbuf_pages=ringbuf_pages
    ) as source:
        if writer is not None:
            writer.write(make_header(name, filter=flt.to_json(), stacks=stacks, **(header or {})))
        else:
            from tcptrace.views.states import HEADER

            console.print(HEADER, style="bold", soft_wrap=True)

        def on_event(event: SocketEvent) -> None:
            summary.feed(event)
            if writer is not None:
                writer.event(event)
            else:
                from tcptrace.views.states import print_event

                print_event(console, event, source.clock_offset_ns)

        lost_seen = 0

        def on_tick(_now_ns: int) -> None:
            # Losses are shown as they happen, not only in the summary.
            nonlocal lost_seen
            lost = int(source.counters().get("lost", 0))
            if lost > lost_seen:
                if writer is not None:
                    writer.write({"type": "lost", "lost": lost, "new": lost - lost_seen})
                else:
                    from tcptrace.views.states import print_lost

                    print_lost(console, lost - lost_seen, lost)
                lost_seen = lost

        flag = StopFlag()
        reason = run(
            source,
            on_event,
            interval_s=interval,
            duration_s=duration,
            on_tick=on_tick if source.live else None,
            flag=flag,
            watch_pid=flt.pid if source.live else None,
        )

        counters = source.counters()
        end_ns = source.now_ns()
    if writer is not None:
        writer.write(
            {
                "type": "summary",
                "command": name,
                "stopped": reason,
                "end_ns": end_ns,
                "lost": int(counters.get("lost", 0)),
                "kernel_transitions": counters.get("transitions"),
                "skipped_transitions": counters.get("skipped_transitions"),
                **summary.to_json(),
            }
        )
    else:
        from tcptrace.views.states import print_summary

        print_summary(make_console(stderr=True), summary, counters, reason)


@cli.command()
@filter_options
@run_options
@click.option(
    "--stacks", is_flag=True, help="Show kernel and user stacks of each transition (costs ~2 us each)."
)
@ringbuf_option
def states(
    pid: int | None,
    comm: str | None,
    ports: tuple[int, ...],
    ipv4: bool,
    ipv6: bool,
    interval: float,
    duration: float | None,
    as_json: bool,
    from_file: str | None,
    stacks: bool,
    ringbuf_pages: int | None,
) -> None:
    """Stream every TCP state transition, live.

    Each line: time, owning pid and comm, local and remote address:port, OLD -> NEW, and
    the time the socket spent in OLD. The owner is learned where the process itself acts
    (connect, listen, close; accepted sockets inherit the listener's), so softirq
    transitions such as the arrival of a FIN are still attributed to the right process.

    \b
    Examples:
      sudo tcptrace states --port 8080
      sudo tcptrace states --pid 1234 --stacks
      sudo tcptrace states --json --duration 10 > transitions.jsonl
      tcptrace states --from transitions.jsonl --port 443
    """
    flt = make_filter(pid, comm, ports, ipv4, ipv6, live=from_file is None)
    stream_command("states", flt, from_file, duration, interval, stacks, sys.stdout, as_json, ringbuf_pages)


# What `record` traces: every part whose events the analyses replay.
RECORD_PARTS = ("lifecycle", "owner", "timewait")


@cli.command()
@filter_options
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write (JSON lines)."
)
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after S seconds.")
@click.option(
    "--stacks",
    is_flag=True,
    help="Stacks of every transition (by default only where a process acts: connect, accept, "
    "close, touches of CLOSE_WAIT sockets).",
)
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
@ringbuf_option
def record(
    pid: int | None,
    comm: str | None,
    ports: tuple[int, ...],
    ipv4: bool,
    ipv6: bool,
    output: str,
    duration: float | None,
    stacks: bool,
    force: bool,
    ringbuf_pages: int | None,
) -> None:
    """Record the decoded event stream to a file, for replay with --from.

    Record in production, analyse anywhere: every TCP transition, the owner and code path
    of each socket (accept, connect, and the touches of sockets in CLOSE_WAIT, with their
    stacks), and every timewait socket's life, plus the TCP settings. `states`,
    `closewait`, `timewait` and `diagnose` answer from it with `--from FILE` through the
    same code as from the kernel; replaying needs no root. (closelat's histograms are
    aggregated in the kernel: record them with `closelat --json`.)

    \b
    Examples:
      sudo tcptrace record -o incident.jsonl --duration 60
      tcptrace closewait --from incident.jsonl
      tcptrace timewait --from incident.jsonl
    """
    flt = make_filter(pid, comm, ports, ipv4, ipv6, live=True)
    if os.path.exists(output) and not force:
        raise UsageError(f"{output} exists; pass --force to overwrite it")
    try:
        out = open(output, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise TcptraceError(f"cannot write {output}: {exc.strerror}") from None
    with out:
        from tcptrace.commands.timewait import settings_to_json
        from tcptrace.system.sysctl import read_settings

        stream_command(
            "record",
            flt,
            None,
            duration,
            1.0,
            True,  # stacks where they attribute; all of them with --stacks
            out,
            True,
            ringbuf_pages,
            parts=RECORD_PARTS,
            defines=None if stacks else {"TT_PROC_STACKS_ONLY": 1},
            header={"settings": settings_to_json(read_settings())},
        )
    click.echo(f"recorded to {output}", err=True)


@cli.command()
def doctor() -> None:
    """Check that this machine can trace, and say how to fix what is missing.

    Checks privileges, bcc, kernel headers, tracefs, every tracepoint tcptrace uses,
    kernel BTF, and finally compiles and attaches the lifecycle program. Exits 1 when
    tracing cannot work.
    """
    from tcptrace.commands.doctor import run_checks
    from tcptrace.views.doctor import print_checks

    checks = run_checks()
    print_checks(make_console(), checks)
    if any(c.required and not c.ok for c in checks):
        sys.exit(1)


@cli.command()
@filter_options
@run_options
@click.option(
    "--threshold",
    default="5s",
    show_default=True,
    help="A socket in CLOSE_WAIT longer than this is a leak suspect (5s, 500ms, 2m).",
)
@click.option(
    "--recheck",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Compare with /proc every S seconds, to repair a transition the kernel skipped (0: never).",
)
@click.option(
    "--touch-stacks",
    is_flag=True,
    help="Also keep the stack of each socket's last send/recv before the FIN "
    "(costs ~4 us per send/recv of every traced socket).",
)
def closewait(
    pid: int | None,
    comm: str | None,
    ports: tuple[int, ...],
    ipv4: bool,
    ipv6: bool,
    interval: float,
    duration: float | None,
    as_json: bool,
    from_file: str | None,
    threshold: str,
    recheck: float,
    touch_stacks: bool,
) -> None:
    """Time every socket in CLOSE_WAIT and find the code paths that leak them.

    A socket sits in CLOSE_WAIT from the peer's FIN until its application closes it; one
    that stays is a leak. Shows the sockets in CLOSE_WAIT now, how many entered and were
    closed, how long the app took to close them, and the leak suspects (older than
    --threshold) grouped by owning process and code path: the user and kernel stacks
    where each socket was accepted or connected, and where the app last touched it (a
    recv that returned 0 is the app seeing EOF). Sockets already in CLOSE_WAIT at start
    are read from /proc and shown with ages "at least since start".

    \b
    Examples:
      sudo tcptrace closewait --pid 1234
      sudo tcptrace closewait --port 8080 --threshold 30s
      sudo tcptrace closewait --json --duration 60 > closewait.jsonl
      tcptrace closewait --from incident.jsonl
    """
    from tcptrace.commands.closewait import run_closewait
    from tcptrace.model.closewait import parse_duration

    flt = make_filter(pid, comm, ports, ipv4, ipv6, live=from_file is None)
    try:
        threshold_ns = parse_duration(threshold)
    except ValueError as exc:
        raise UsageError(f"--threshold: {exc}") from None
    run_closewait(
        flt,
        from_file=from_file,
        interval_s=interval,
        duration_s=duration,
        as_json=as_json,
        threshold_ns=threshold_ns,
        recheck_s=recheck,
        touch_stacks=touch_stacks,
        out=sys.stdout,
    )


@cli.command()
@filter_options
@run_options
@click.option("--cumulative", is_flag=True, help="Show totals since start instead of each interval.")
@click.option(
    "--stacks", is_flag=True, help="One histogram per user code path of the call (costs ~1 us a call)."
)
@click.option(
    "--close-wait-min",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Flag a close() of a socket that had sat in CLOSE_WAIT at least S seconds.",
)
def closelat(
    pid: int | None,
    comm: str | None,
    ports: tuple[int, ...],
    ipv4: bool,
    ipv6: bool,
    interval: float,
    duration: float | None,
    as_json: bool,
    from_file: str | None,
    cumulative: bool,
    stacks: bool,
    close_wait_min: float,
) -> None:
    """Histograms of how long close() takes on TCP sockets, per process.

    Times close(), shutdown() and close_range() on TCP sockets only (files, pipes, UDP and
    Unix sockets are left out) into exact in-kernel log2 histograms: count, p50, p90, p99
    and max per process, every interval or since start. Calls that must be seen are
    printed as they happen: a close() that sent a reset (unread data or linger 0: data
    lost), one that blocked on SO_LINGER, and one of a socket that had sat in CLOSE_WAIT.
    Filters apply to the calling process and the socket closed. With --from, the reports
    of a `closelat --json` run are replayed (--port, -4 and -6 then cannot apply).

    \b
    Examples:
      sudo tcptrace closelat --interval 5
      sudo tcptrace closelat --pid 1234 --stacks --cumulative
      sudo tcptrace closelat --json --duration 60 > closelat.jsonl
      tcptrace closelat --from closelat.jsonl --cumulative
    """
    from tcptrace.commands.closelat import run_closelat

    flt = make_filter(pid, comm, ports, ipv4, ipv6, live=from_file is None)
    if from_file is not None and (ports or ipv4 or ipv6):
        raise UsageError("--port, -4 and -6 cannot filter recorded histograms; give them when recording")
    run_closelat(
        flt,
        from_file=from_file,
        interval_s=interval,
        duration_s=duration,
        cumulative=cumulative,
        stacks=stacks,
        close_wait_s=close_wait_min,
        as_json=as_json,
        out=sys.stdout,
        filter_json=flt.to_json(),
    )


@cli.command()
@filter_options
@run_options
@click.option(
    "--events",
    is_flag=True,
    help="With --json: also every timewait socket's creation, conversion and end, and each "
    "reset (makes the output replayable with --from).",
)
def timewait(
    pid: int | None,
    comm: str | None,
    ports: tuple[int, ...],
    ipv4: bool,
    ipv6: bool,
    interval: float,
    duration: float | None,
    as_json: bool,
    from_file: str | None,
    events: bool,
) -> None:
    """Count TIME_WAIT creation exactly: rates, who, to where, and when the ports run out.

    Counted in the kernel from the timewait sockets themselves, so no count is lost when
    the event stream overflows. A socket counts once it is really in TIME_WAIT: at once
    when the peer's FIN had arrived, else (an orphaned FIN_WAIT2 socket parked by the
    kernel) when the FIN reaches it; parked sockets that never get a FIN are not TIME_WAIT
    (shown as pending, then ended). Attributed to the process that closed first, per remote
    endpoint; resets (abortive closes) are counted apart. Shows TIME_WAIT held ~= rate x
    60 s per (local ip, remote ip, remote port) against ip_local_port_range, the time to
    exhaustion, the settings that matter and the remedies in order.

    \b
    Examples:
      sudo tcptrace timewait
      sudo tcptrace timewait --port 8080 --interval 5
      sudo tcptrace timewait --json --events --duration 60 > tw.jsonl
      tcptrace timewait --from tw.jsonl
    """
    from tcptrace.commands.timewait import run_timewait

    flt = make_filter(pid, comm, ports, ipv4, ipv6, live=from_file is None)
    if events and not as_json:
        raise UsageError("--events needs --json")
    run_timewait(
        flt,
        from_file=from_file,
        interval_s=interval,
        duration_s=duration,
        as_json=as_json,
        events=events,
        out=sys.stdout,
        filter_json=flt.to_json(),
    )


@cli.command()
@filter_options
@click.option(
    "--listen",
    default="127.0.0.1:9464",
    show_default=True,
    help="HOST:PORT of the /metrics endpoint. Loopback unless told otherwise: metrics name "
    "processes, pids and remote ports.",
)
@click.option(
    "--threshold",
    default="30s",
    show_default=True,
    help="A socket in CLOSE_WAIT this long is a leak suspect (30s, 500ms, 2m).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Read the kernel's maps and /proc, and refresh the metrics, every S seconds.",
)
@click.option(
    "--states-interval",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Count sockets by state from /proc/net/tcp{,6} every S seconds (0: never; ~3 us a socket).",
)
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after S seconds.")
@click.option(
    "--top-processes",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help='Label sets per metric for processes; the rest are summed into comm="other".',
)
@click.option(
    "--top-ports",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help='Remote ports kept as labels; the rest are summed into remote_port="other".',
)
@click.option(
    "--max-sockets",
    type=click.IntRange(min=1024),
    default=262144,
    show_default=True,
    help="Size of the kernel's and the agent's socket tables (LRU).",
)
@click.option(
    "--log",
    "log_file",
    type=click.Path(dir_okay=False),
    help="Append leak-suspect JSON lines to this file instead of stderr.",
)
@click.option("--no-stacks", is_flag=True, help="No code paths in leak-suspect logs (saves ~1 us an accept).")
@ringbuf_option
def agent(
    pid: int | None,
    comm: str | None,
    ports: tuple[int, ...],
    ipv4: bool,
    ipv6: bool,
    listen: str,
    threshold: str,
    interval: float,
    states_interval: float,
    duration: float | None,
    top_processes: int,
    top_ports: int,
    max_sockets: int,
    log_file: str | None,
    no_stacks: bool,
    ringbuf_pages: int | None,
) -> None:
    """Run headless and export Prometheus metrics; log leak suspects as JSON lines.

    Exports sockets by state, CLOSE_WAIT sockets and their ages per process (and how many
    are older than --threshold), TIME_WAIT creations per process and remote port, resets,
    close() latency histograms, lost events and the agent's own CPU and memory. Label
    sets are bounded (--top-processes, --top-ports). The filters (--port, --pid, ...)
    scope everything but sockets by state, which is host-wide. Runs until SIGTERM or
    Ctrl-C, then detaches everything. See docs/agent.md and deploy/.

    \b
    Examples:
      sudo tcptrace agent
      sudo tcptrace agent --listen 0.0.0.0:9464 --threshold 60s --log /var/log/tcptrace.jsonl
      curl -s 127.0.0.1:9464/metrics | grep tcptrace_close_wait
    """
    from tcptrace.commands.agent import AgentOptions, run_agent
    from tcptrace.export.prometheus import parse_listen
    from tcptrace.model.agent import AgentConfig
    from tcptrace.model.closewait import parse_duration

    flt = make_filter(pid, comm, ports, ipv4, ipv6, live=True)
    host, port = parse_listen(listen)
    try:
        threshold_ns = parse_duration(threshold)
    except ValueError as exc:
        raise UsageError(f"--threshold: {exc}") from None
    options = AgentOptions(
        host=host,
        port=port,
        interval_s=interval,
        states_interval_s=states_interval,
        duration_s=duration,
        model=AgentConfig(
            threshold_ns=threshold_ns,
            top_processes=top_processes,
            top_ports=top_ports,
            max_sockets=max_sockets,
        ),
        stacks=not no_stacks,
        ringbuf_pages=ringbuf_pages,
        filter=flt,
    )
    if log_file is None:
        run_agent(options)
        return
    try:
        log = open(log_file, "a", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise TcptraceError(f"cannot write {log_file}: {exc.strerror}") from None
    with log:
        run_agent(options, log)


def threshold_option(default: str) -> Callable[[F], F]:
    def deco(fn: F) -> F:
        return click.option(
            "--threshold",
            default=default,
            show_default=True,
            help="A socket in CLOSE_WAIT longer than this is a leak suspect (5s, 500ms, 2m).",
        )(fn)

    return deco


def _threshold_ns(text: str) -> int:
    from tcptrace.model.closewait import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--threshold: {exc}") from None


@cli.command()
@filter_options
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Refresh every S seconds.",
)
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after S seconds.")
@click.option(
    "--from",
    "from_file",
    type=click.Path(dir_okay=False),
    help="Replay a recording (from `tcptrace record --stacks`) instead of tracing the kernel.",
)
@threshold_option("5s")
@click.option(
    "--sort",
    type=click.Choice(["c", "t", "l"]),
    default="c",
    show_default=True,
    help="Sort processes by CLOSE_WAIT (c), TIME_WAIT created/s (t) or close() p99 (l).",
)
def top(
    pid: int | None,
    comm: str | None,
    ports: tuple[int, ...],
    ipv4: bool,
    ipv6: bool,
    interval: float,
    duration: float | None,
    from_file: str | None,
    threshold: str,
    sort: str,
) -> None:
    """One live screen: sockets per state, rates, the processes behind them, close() times.

    Counts per state start from /proc/net/tcp{,6} and follow every transition after
    (labelled "seed + transitions"); TIME_WAIT is the kernel's own count (sockstat) when no
    filter is given. Processes: CLOSE_WAIT sockets held and the oldest, TIME_WAIT created
    per second and in total (exact, counted in the kernel), close() calls with p99 and max.
    Lost events are shown. Keys: c, t, l sort; p filters a pid; q quits.

    \b
    Examples:
      sudo tcptrace top
      sudo tcptrace top --port 8080 --sort t
      tcptrace top --from incident.jsonl
    """
    from tcptrace.commands.top import run_top

    flt = make_filter(pid, comm, ports, ipv4, ipv6, live=from_file is None)
    run_top(
        flt,
        from_file=from_file,
        interval_s=interval,
        duration_s=duration,
        threshold_ns=_threshold_ns(threshold),
        sort=sort,
    )


@cli.command()
@filter_options
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Observe for S seconds (Ctrl-C stops early and still diagnoses).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Sample every S seconds.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="The diagnosis as JSON (a header line, then the summary)."
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False),
    help="Also write a self-contained HTML report (plots inline, no external asset) to FILE.",
)
@click.option("--force", is_flag=True, help="Overwrite the --report file if it exists.")
@click.option(
    "--from",
    "from_file",
    type=click.Path(dir_okay=False),
    help="Diagnose a recording (from `tcptrace record --stacks`) instead of the live kernel.",
)
@threshold_option("2s")
def diagnose(
    pid: int | None,
    comm: str | None,
    ports: tuple[int, ...],
    ipv4: bool,
    ipv6: bool,
    duration: float,
    interval: float,
    as_json: bool,
    report: str | None,
    force: bool,
    from_file: str | None,
    threshold: str,
) -> None:
    """Watch for a while, then say what is wrong, with the evidence.

    Automates the usual workflow: the state distribution at the start and the end; the
    owners of CLOSE_WAIT sockets and their remotes (one remote dominating, or many
    distinct); sockets stuck across the window; leaks attributed to a process and code
    path (where the socket was accepted, where the app read EOF and did not close);
    TIME_WAIT creation by process against the ephemeral port range; close() latency; the
    settings. See docs/diagnose.md.

    \b
    Examples:
      sudo tcptrace diagnose
      sudo tcptrace diagnose --port 8080 --duration 30 --report incident.html
      sudo tcptrace diagnose --json > diagnosis.json
      tcptrace diagnose --from incident.jsonl
    """
    from tcptrace.commands.top import run_diagnose

    flt = make_filter(pid, comm, ports, ipv4, ipv6, live=from_file is None)
    run_diagnose(
        flt,
        from_file=from_file,
        interval_s=interval,
        duration_s=duration,
        threshold_ns=_threshold_ns(threshold),
        as_json=as_json,
        report=report,
        force=force,
        out=sys.stdout,
        filter_json=flt.to_json(),
    )


@cli.command()
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after S seconds.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Refresh every S seconds.",
)
@threshold_option("3s")
def demo(duration: float | None, interval: float, threshold: str) -> None:
    """See tcptrace find a leak: a leaky server and a churning client on loopback.

    Starts demo-server (leaks one connection in ten in CLOSE_WAIT, in handle_leaky()) and
    demo-client (10 connections a second, closing first: TIME_WAIT), shows `top` on their
    port until q, Ctrl-C or --duration, then stops both, removes every socket they left,
    and prints the diagnosis. Only 127.0.0.1, bounded rates.

    \b
    Examples:
      sudo tcptrace demo
      sudo tcptrace demo --duration 20
    """
    from tcptrace.commands.demo import run_demo

    run_demo(duration, interval, _threshold_ns(threshold))


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="tcptrace")
