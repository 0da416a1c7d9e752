"""The command line: option declarations, then one call per command into commands/NAME.py.

The only module that imports click. Options that several commands take are declared once,
below, as decorators; what a command does with them is in its module.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

import click

from tcptrace import __version__
from tcptrace.commands.options import DEFAULT_RULES_FILE, FilterOptions, FrameRuleOptions
from tcptrace.errors import TcptraceError
from tcptrace.model.filters import MAX_PORTS

F = TypeVar("F", bound=Callable[..., Any])


class Decorator(Protocol):
    """What click.option returns: a function's decorator that keeps its type."""

    def __call__(self, fn: F, /) -> F: ...


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


# ---- shared options ----------------------------------------------------------------------


def options(*decorators: Decorator) -> Decorator:
    """Several options as one decorator; --help lists them in the order given."""

    def apply(fn: F) -> F:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


def filter_options(fn: F) -> F:
    """--pid, --comm, --port, -4/-6 (applied in the kernel, and to recordings alike), handed
    to the command as one ``filters`` value."""

    @functools.wraps(fn)
    def with_filters(
        *args: Any,
        pid: int | None,
        comm: str | None,
        ports: tuple[int, ...],
        ipv4: bool,
        ipv6: bool,
        **kwargs: Any,
    ) -> Any:
        return fn(*args, filters=FilterOptions(pid, comm, tuple(ports), ipv4, ipv6), **kwargs)

    return options(
        click.option("--pid", type=click.IntRange(min=1), help="Sockets owned by this process."),
        click.option("--comm", help="Sockets owned by a process of this name (first 15 characters)."),
        click.option(
            "--port",
            "ports",
            multiple=True,
            type=click.IntRange(1, 65535),
            help=f"Sockets with this local or remote port (repeatable, up to {MAX_PORTS}).",
        ),
        click.option("-4", "ipv4", is_flag=True, help="IPv4 sockets only."),
        click.option("-6", "ipv6", is_flag=True, help="IPv6 sockets only."),
    )(cast(F, with_filters))


def frame_rule_options(fn: F) -> F:
    """--library, --app, --rules: what counts as the application's code when a leak is
    attributed, handed to the command as one ``frame_rules`` value."""

    @functools.wraps(fn)
    def with_rules(
        *args: Any, library: tuple[str, ...], app: tuple[str, ...], rules_file: str | None, **kwargs: Any
    ) -> Any:
        return fn(*args, frame_rules=FrameRuleOptions(tuple(library), tuple(app), rules_file), **kwargs)

    return options(
        click.option(
            "--library",
            multiple=True,
            metavar="PATTERN",
            help="Frames matching PATTERN are library code, not the application's: a function glob, "
            "re:REGEX, or FIELD=PATTERN with FIELD function, module or file (repeatable).",
        ),
        click.option(
            "--app",
            multiple=True,
            metavar="PATTERN",
            help="Frames matching PATTERN are the application's own code (as --library; repeatable).",
        ),
        click.option(
            "--rules",
            "rules_file",
            type=click.Path(dir_okay=False),
            help=f"Frame rules from FILE, one a line (docs/attribution.md); by default {DEFAULT_RULES_FILE} "
            "when it exists.",
        ),
    )(cast(F, with_rules))


def interval_option(
    help: str = "Refresh every S seconds.", *, default: float = 1.0, minimum: float = 0.1
) -> Decorator:
    return click.option(
        "--interval", type=click.FloatRange(min=minimum), default=default, show_default=True, help=help
    )


def duration_option(help: str = "Stop after S seconds.", *, default: float | None = None) -> Decorator:
    return click.option(
        "--duration",
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        show_default=default is not None,
        help=help,
    )


def json_option(help: str) -> Decorator:
    return click.option("--json", "as_json", is_flag=True, help=help)


def from_option(help: str) -> Decorator:
    return click.option("--from", "from_file", type=click.Path(dir_okay=False), help=help)


def force_option(help: str) -> Decorator:
    return click.option("--force", is_flag=True, help=help)


def stacks_option(help: str) -> Decorator:
    return click.option("--stacks", is_flag=True, help=help)


def threshold_option(
    default: str, help: str = "A socket in CLOSE_WAIT longer than this is a leak suspect (5s, 500ms, 2m)."
) -> Decorator:
    return click.option("--threshold", default=default, show_default=True, help=help)


def _power_of_two(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and (value < 1 or value & (value - 1)):
        raise click.BadParameter("must be a power of two (pages of 4 KiB)")
    return value


ringbuf_option = click.option(
    "--ringbuf-pages",
    type=int,
    callback=_power_of_two,
    help="Event ring buffer size in 4 KiB pages, a power of two (default 1024 = 4 MiB). "
    "Losses are counted exactly whatever the size.",
)

# --interval, --duration, --json, --from: what the streaming and aggregating commands share.
run_options = options(
    interval_option(minimum=0.05),
    duration_option("Stop after S seconds and print the summary."),
    json_option("One JSON object per line; the last is the summary."),
    from_option("Replay a recording (from `tcptrace record`) instead of tracing the kernel."),
)


# ---- commands ----------------------------------------------------------------------------


@cli.command()
@filter_options
@run_options
@stacks_option("Show kernel and user stacks of each transition (costs ~2 us each).")
@ringbuf_option
def states(**given: Any) -> None:
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
    from tcptrace.commands import states as command

    command.run(**given)


@cli.command()
@filter_options
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write (JSON lines)."
)
@duration_option()
@stacks_option(
    "Stacks of every transition (by default only where a process acts: connect, accept, "
    "close, touches of CLOSE_WAIT sockets)."
)
@force_option("Overwrite OUTPUT if it exists.")
@ringbuf_option
def record(**given: Any) -> None:
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
    from tcptrace.commands import record as command

    command.run(**given)


@cli.command()
def doctor() -> None:
    """Check that this machine can trace, and say how to fix what is missing.

    Checks privileges, bcc, kernel headers, tracefs, every tracepoint tcptrace uses,
    kernel BTF, and finally compiles and attaches the lifecycle program. Exits 1 when
    tracing cannot work.
    """
    from tcptrace.commands import doctor as command

    command.run()


@cli.command()
@filter_options
@run_options
@threshold_option("5s")
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
@stacks_option("Show every frame of each code path (by default, those around the application's).")
@frame_rule_options
def closewait(**given: Any) -> None:
    """Time every socket in CLOSE_WAIT and find the code paths that leak them.

    A socket sits in CLOSE_WAIT from the peer's FIN until its application closes it; one
    that stays is a leak. Shows the sockets in CLOSE_WAIT now, how many entered and were
    closed, how long the app took to close them, and the leak suspects (older than
    --threshold) grouped by owning process and code path. Each group leads with the
    function of the application it is attributed to, with its file:line (DWARF, or a JIT's
    perf map), or with the runtime's hint when no frame is the application's; then the
    stacks where each socket was accepted or connected and where the app touched it before
    and after the peer's FIN (a recv that returned 0 is the app seeing EOF). Sockets already
    in CLOSE_WAIT at start are read from /proc and shown with ages "at least since start".

    \b
    Examples:
      sudo tcptrace closewait --pid 1234
      sudo tcptrace closewait --port 8080 --threshold 30s --touch-stacks
      sudo tcptrace closewait --pid 1234 --library 'github.com/acme/kit/*' --stacks
      sudo tcptrace closewait --json --duration 60 > closewait.jsonl
      tcptrace closewait --from incident.jsonl
    """
    from tcptrace.commands import closewait as command

    command.run(**given)


@cli.command()
@filter_options
@run_options
@click.option("--cumulative", is_flag=True, help="Show totals since start instead of each interval.")
@stacks_option("One histogram per user code path of the call (costs ~1 us a call).")
@click.option(
    "--close-wait-min",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Flag a close() of a socket that had sat in CLOSE_WAIT at least S seconds.",
)
def closelat(**given: Any) -> None:
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
    from tcptrace.commands import closelat as command

    command.run(**given)


@cli.command()
@filter_options
@run_options
@click.option(
    "--events",
    is_flag=True,
    help="With --json: also every timewait socket's creation, conversion and end, and each "
    "reset (makes the output replayable with --from).",
)
def timewait(**given: Any) -> None:
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
    from tcptrace.commands import timewait as command

    command.run(**given)


@cli.command()
@filter_options
@click.option(
    "--listen",
    default="127.0.0.1:9464",
    show_default=True,
    help="HOST:PORT of the /metrics endpoint. Loopback unless told otherwise: metrics name "
    "processes, pids and remote ports.",
)
@threshold_option("30s", "A socket in CLOSE_WAIT this long is a leak suspect (30s, 500ms, 2m).")
@interval_option("Read the kernel's maps and /proc, and refresh the metrics, every S seconds.", default=5.0)
@click.option(
    "--states-interval",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Count sockets by state from /proc/net/tcp{,6} every S seconds (0: never; ~3 us a socket).",
)
@duration_option()
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
@frame_rule_options
@ringbuf_option
def agent(**given: Any) -> None:
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
    from tcptrace.commands import agent as command

    command.run(**given)


@cli.command()
@filter_options
@interval_option()
@duration_option()
@from_option("Replay a recording (from `tcptrace record --stacks`) instead of tracing the kernel.")
@threshold_option("5s")
@click.option(
    "--sort",
    type=click.Choice(["c", "t", "l"]),
    default="c",
    show_default=True,
    help="Sort processes by CLOSE_WAIT (c), TIME_WAIT created/s (t) or close() p99 (l).",
)
@frame_rule_options
def top(**given: Any) -> None:
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
    from tcptrace.commands import top as command

    command.run(**given)


@cli.command()
@filter_options
@duration_option("Observe for S seconds (Ctrl-C stops early and still diagnoses).", default=10.0)
@interval_option("Sample every S seconds.")
@json_option("The diagnosis as JSON (a header line, then the summary).")
@click.option(
    "--report",
    type=click.Path(dir_okay=False),
    help="Also write a self-contained HTML report (plots inline, no external asset) to FILE.",
)
@force_option("Overwrite the --report file if it exists.")
@from_option("Diagnose a recording (from `tcptrace record --stacks`) instead of the live kernel.")
@threshold_option("2s")
@frame_rule_options
def diagnose(**given: Any) -> None:
    """Watch for a while, then say what is wrong, with the evidence.

    Automates the usual workflow: the state distribution at the start and the end; the
    owners of CLOSE_WAIT sockets and their remotes (one remote dominating, or many
    distinct); sockets stuck across the window; leaks attributed to a process and the
    function of its code, with file:line (where the app read EOF and did not close, where
    it accepted the socket), or to a runtime's known pattern;
    TIME_WAIT creation by process against the ephemeral port range; close() latency; the
    settings. See docs/diagnose.md.

    \b
    Examples:
      sudo tcptrace diagnose
      sudo tcptrace diagnose --port 8080 --duration 30 --report incident.html
      sudo tcptrace diagnose --json > diagnosis.json
      tcptrace diagnose --from incident.jsonl
    """
    from tcptrace.commands import diagnose as command

    command.run(**given)


@cli.command()
@duration_option()
@interval_option()
@threshold_option("3s")
def demo(**given: Any) -> None:
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
    from tcptrace.commands import demo as command

    command.run(**given)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="tcptrace")
