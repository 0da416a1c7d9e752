"""The command line: option declarations, then one call per command into commands/NAME.py.

The only module that imports click. Options that several commands take are declared once,
below, as decorators; what a command does with them is in its module.
"""

from __future__ import annotations

import contextvars
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

import click

from tcptrace import __version__
from tcptrace.commands.options import DEFAULT_RULES_FILE, DEFAULT_THRESHOLD, FilterOptions, FrameRuleOptions
from tcptrace.errors import TcptraceError
from tcptrace.model.closewait import parse_duration
from tcptrace.model.filters import MAX_PORTS

F = TypeVar("F", bound=Callable[..., Any])


class Decorator(Protocol):
    """What click.option returns: a function's decorator that keeps its type."""

    def __call__(self, fn: F, /) -> F: ...


class OneLineUsageError(click.UsageError):
    """A usage error shown as one line on stderr (click's own shows the usage first)."""

    def __init__(self, exc: click.UsageError) -> None:
        super().__init__(exc.format_message(), exc.ctx)

    def show(self, file: Any = None) -> None:
        where = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"tcptrace: error: {self.format_message().rstrip('.')}{where}", err=True)


class TcptraceGroup(click.Group):
    """Turns TcptraceError into one line on stderr and its exit code, and a usage error into
    one line with exit code 2: never a traceback; an interruption (Ctrl-C, SIGTERM, SIGHUP)
    into one line and 128 + the signal's number."""

    def invoke(self, ctx: click.Context) -> Any:
        from tcptrace.commands.interrupts import Interrupted, interruptible

        try:
            with interruptible():
                return super().invoke(ctx)
        except OneLineUsageError:
            raise
        except click.UsageError as exc:  # a command's options did not parse
            raise OneLineUsageError(exc) from None
        except (KeyboardInterrupt, Interrupted) as exc:
            stop = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            click.echo(f"tcptrace: interrupted by {stop}", err=True)
            ctx.exit(stop.exit_code)
        except TcptraceError as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            click.echo(f"tcptrace: error: {exc}{hint}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:
            # The reader went away (`tcptrace states --json | head`): not an error of ours.
            _drop_stdout()
            ctx.exit(0)

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        """--help and --version print while the arguments are parsed: a closed pipe there
        (`tcptrace --help | head -1`) is exit 0 too, where click would exit 1."""
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # `tcptrace` alone: the help, as click shows it
        except click.UsageError as exc:
            raise OneLineUsageError(exc) from None
        except BrokenPipeError:
            _drop_stdout()
            raise click.exceptions.Exit(0) from None


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


@click.group(cls=TcptraceGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tcptrace")
def cli() -> None:
    """Trace TCP socket lifecycles from the kernel with eBPF.

    Finds the process and code path behind sockets stuck in CLOSE_WAIT, counts TIME_WAIT
    creation exactly, and times close(). Tracing needs root (or CAP_BPF, CAP_PERFMON and
    CAP_DAC_READ_SEARCH).

    \b
    Start with:
      sudo tcptrace demo            watch tcptrace find a leak (its own server and client)
      sudo tcptrace doctor          check this machine can trace
      sudo tcptrace top             sockets per state and the processes behind them, live
      sudo tcptrace diagnose        10 seconds, then what is wrong, with the evidence
      sudo tcptrace states          every TCP state transition, live
    """


def run_isolated(run: Callable[..., None], given: dict[str, Any]) -> None:
    """A command's ``run(**given)`` in a context of its own: what it sets for its output (the
    time units of its tables) ends with it."""
    contextvars.copy_context().run(functools.partial(run, **given))


# ---- shared options ----------------------------------------------------------------------


def options(*decorators: Decorator) -> Decorator:
    """Several options as one decorator; --help lists them in the order given."""

    def apply(fn: F) -> F:
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


class IntList(click.ParamType[tuple[int, ...], Any]):
    """Integers in ``[low, high]``, one or a comma list (``80,443``); a repeated option
    gathers every list."""

    name = "integer list"

    def __init__(self, low: int, high: int, metavar: str) -> None:
        self.low, self.high, self.metavar = low, high, metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return self.metavar

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        out = []
        for item in str(value).split(","):
            text = item.strip()
            if not text.isdigit():
                self.fail(f"{text!r} is not a number" if text else f"{value!r} has an empty item", param, ctx)
            number = int(text)
            if not self.low <= number <= self.high:
                self.fail(f"{number} is not in {self.low}-{self.high}", param, ctx)
            out.append(number)
        return tuple(out)


class Seconds(click.ParamType[float, Any]):
    """A time: ``30s``, ``500ms``, ``250us``, ``2m``, ``1h``, or a bare number of seconds; as
    float seconds, at least ``minimum`` (above it when ``min_open``)."""

    name = "time"

    def __init__(self, minimum: float = 0.0, min_open: bool = False) -> None:
        self.minimum, self.min_open = minimum, min_open

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str:
        return "TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            seconds = value
        else:
            try:
                seconds = parse_duration(str(value)) / 1e9
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
        if seconds < self.minimum or (self.min_open and seconds == self.minimum):
            bound = "above" if self.min_open else "at least"
            self.fail(f"{value} is not {bound} {self.minimum:g}s", param, ctx)
        return seconds


def _flat(lists: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(n for items in lists for n in items))


def filter_options(fn: F) -> F:
    """The filters (applied in the kernel, and to recordings alike), handed to the command
    as one ``filters`` value. Short forms as bcc's tools have them: -p, -c, -L, -D, -4, -6."""

    @functools.wraps(fn)
    def with_filters(
        *args: Any,
        pids: tuple[tuple[int, ...], ...],
        comm: str | None,
        ports: tuple[tuple[int, ...], ...],
        local_ports: tuple[tuple[int, ...], ...],
        remote_ports: tuple[tuple[int, ...], ...],
        ipv4: bool,
        ipv6: bool,
        netns: tuple[str, ...],
        cgroups: tuple[str, ...],
        containers: tuple[str, ...],
        **kwargs: Any,
    ) -> Any:
        given = FilterOptions(
            pids=_flat(pids),
            comm=comm,
            ports=_flat(ports),
            ipv4=ipv4,
            ipv6=ipv6,
            local_ports=_flat(local_ports),
            remote_ports=_flat(remote_ports),
            netns=netns,
            cgroups=cgroups,
            containers=containers,
        )
        return fn(*args, filters=given, **kwargs)

    ports = IntList(1, 65535, "PORT[,PORT...]")
    return options(
        click.option(
            "-p",
            "--pid",
            "pids",
            multiple=True,
            type=IntList(1, (1 << 32) - 1, "PID[,PID...]"),
            help="Sockets owned by these processes (repeatable, or a comma list: -p 12,34).",
        ),
        click.option("-c", "--comm", help="Sockets owned by a process of this name (first 15 characters)."),
        click.option(
            "--port",
            "ports",
            multiple=True,
            type=ports,
            help=f"Sockets with one of these ports, local or remote (repeatable or a comma list; "
            f"up to {MAX_PORTS} ports with -L and -D).",
        ),
        click.option(
            "-L",
            "--local-port",
            "local_ports",
            multiple=True,
            type=ports,
            help="Sockets with one of these local ports (bcc's -L).",
        ),
        click.option(
            "-D",
            "--remote-port",
            "remote_ports",
            multiple=True,
            type=ports,
            help="Sockets with one of these remote ports (bcc's -D).",
        ),
        click.option("-4", "ipv4", is_flag=True, help="IPv4 sockets only."),
        click.option("-6", "ipv6", is_flag=True, help="IPv6 sockets only."),
        click.option(
            "--netns",
            multiple=True,
            metavar="INODE|PID|NAME",
            help="Sockets of this network namespace: its inode, a process in it, or its `ip netns` name.",
        ),
        click.option(
            "--cgroup",
            "cgroups",
            multiple=True,
            metavar="PATH",
            help="Sockets owned by processes in this cgroup v2 (/system.slice/nginx.service) or under it.",
        ),
        click.option(
            "--container",
            "containers",
            multiple=True,
            metavar="ID",
            help="Sockets owned by a container whose id starts with ID (docker, containerd, CRI-O, "
            "podman; one started later too).",
        ),
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
    help: str = "Refresh every TIME (1s, 500ms; a bare number is seconds).",
    *,
    default: str = "1s",
    minimum: float = 0.1,
) -> Decorator:
    return click.option("--interval", type=Seconds(minimum), default=default, show_default=True, help=help)


def duration_option(
    help: str = "Stop after TIME (30s, 2m, 1h; a bare number is seconds).", *, default: str | None = None
) -> Decorator:
    return click.option(
        "--duration",
        type=Seconds(0, min_open=True),
        default=default,
        show_default=default is not None,
        help=help,
    )


def json_option(help: str) -> Decorator:
    return click.option("-j", "--json", "as_json", is_flag=True, help=help)


def units_option(fn: F) -> F:
    """--units: how tables print times."""
    return click.option(
        "--units",
        type=click.Choice(["auto", "ms", "us"]),
        default="auto",
        show_default=True,
        help="Times in tables: auto-scaled text (1.2ms), or plain numbers of ms or us in a column "
        "whose header names the unit (for scripts).",
    )(fn)


def timestamps_option(fn: F) -> F:
    """-T: the time of day in front of each periodic line (as bcc's tools)."""
    return click.option(
        "-T", "--timestamps", is_flag=True, help="Print the time of day (HH:MM:SS) before each periodic line."
    )(fn)


def from_option(help: str) -> Decorator:
    return click.option("--from", "from_file", type=click.Path(dir_okay=False), help=help)


def force_option(help: str) -> Decorator:
    return click.option("--force", is_flag=True, help=help)


def stacks_option(help: str) -> Decorator:
    return click.option("--stacks", is_flag=True, help=help)


def threshold_option(
    help: str = "A socket in CLOSE_WAIT at least this long is a leak suspect (5s, 500ms, 2m).",
) -> Decorator:
    return click.option(
        "--threshold", type=Seconds(0), default=DEFAULT_THRESHOLD, show_default=True, help=help
    )


def buffer_options(default: str | None, what: str = "") -> Decorator:
    """--buffer (and the deprecated --ringbuf-pages, hidden), handed to the command as
    ``buffer_pages``: ring buffer pages, or None for the programs' default."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def with_buffer(*args: Any, buffer: str | None, ringbuf_pages: int | None, **kwargs: Any) -> Any:
            from tcptrace.commands.options import ring_buffer_pages

            if ringbuf_pages is not None:
                click.echo("tcptrace: warning: --ringbuf-pages is deprecated: use --buffer MIB", err=True)
            return fn(*args, buffer_pages=ring_buffer_pages(buffer, ringbuf_pages, default), **kwargs)

        return options(
            click.option(
                "--buffer",
                metavar="MIB",
                help=f"Event ring buffer size in MiB, a power of two number of 4 KiB pages "
                f"(0.5, 1, 2 ... 1024; or 64K){what}. Default {default or 4}. A larger buffer "
                "rides out longer bursts; losses are counted exactly whatever the size.",
            ),
            click.option("--ringbuf-pages", type=int, hidden=True, help="Deprecated: --buffer."),
        )(cast(F, with_buffer))

    return decorate


# --interval, --duration, --json, --from: what the streaming and aggregating commands share.
run_options = options(
    interval_option(minimum=0.05),
    duration_option("Stop after TIME (30s, 2m; a bare number is seconds) and print the summary."),
    json_option("One JSON object per line; the last is the summary."),
    from_option("Replay a recording (from `tcptrace record`) instead of tracing the kernel."),
)


# ---- commands ----------------------------------------------------------------------------


@cli.command()
@filter_options
@run_options
@stacks_option("Show kernel and user stacks of each transition (costs ~2 us each).")
@units_option
@buffer_options("16")
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
      sudo tcptrace states -p 1234,5678 -L 8080 --units ms
      sudo tcptrace states --json --duration 10 > transitions.jsonl
      tcptrace states --from transitions.jsonl --port 443
    """
    from tcptrace.commands import states as command

    run_isolated(command.run, given)


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
@buffer_options("16")
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

    run_isolated(command.run, given)


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
@threshold_option()
@click.option(
    "--recheck",
    type=Seconds(0),
    default="10s",
    show_default=True,
    help="Compare with /proc every TIME, to repair a transition the kernel skipped (0: never).",
)
@click.option(
    "--touch-stacks/--no-touch-stacks",
    default=None,
    help="Keep the user stack of each traced socket's last send/recv before the peer's FIN "
    "(~0.8 us more BPF time per send/recv of every traced socket). Default: on with --pid or "
    "a port option (--port, -L, -D), off otherwise.",
)
@stacks_option("Show every frame of each code path (by default, those around the application's).")
@frame_rule_options
@units_option
@timestamps_option
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
      sudo tcptrace closewait --container 4f797c539e6c
      sudo tcptrace closewait --cgroup /kubepods.slice --netns 4026532281
      sudo tcptrace closewait --json --duration 60 > closewait.jsonl
      tcptrace closewait --from incident.jsonl
    """
    from tcptrace.commands import closewait as command

    run_isolated(command.run, given)


@cli.command()
@filter_options
@run_options
@click.option("--cumulative", is_flag=True, help="Show totals since start instead of each interval.")
@stacks_option("One histogram per user code path of the call (costs ~1 us a call).")
@click.option(
    "--close-wait-min",
    type=Seconds(0),
    default="1s",
    show_default=True,
    help="Flag a close() of a socket that had sat in CLOSE_WAIT at least TIME.",
)
@units_option
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

    run_isolated(command.run, given)


@cli.command()
@filter_options
@run_options
@click.option(
    "--events",
    is_flag=True,
    help="With --json: also every timewait socket's creation, conversion and end, and each "
    "reset (makes the output replayable with --from).",
)
@timestamps_option
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

    run_isolated(command.run, given)


@cli.command()
@filter_options
@click.option(
    "--listen",
    default="127.0.0.1:9464",
    show_default=True,
    help="HOST:PORT of the /metrics endpoint. Loopback unless told otherwise: metrics name "
    "processes, pids and remote ports.",
)
@threshold_option()
@interval_option("Read the kernel's maps and /proc, and refresh the metrics, every TIME.", default="5s")
@click.option(
    "--states-interval",
    type=Seconds(0),
    default="30s",
    show_default=True,
    help="Count sockets by state from /proc/net/tcp{,6} every TIME (0: never; ~3 us a socket).",
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
    help="Size of the kernel's socket table (LRU): sockets whose owner it keeps.",
)
@click.option(
    "--log",
    "log_file",
    type=click.Path(dir_okay=False),
    help="Append leak-suspect JSON lines to this file instead of stderr.",
)
@click.option("--no-stacks", is_flag=True, help="No code paths in leak-suspect logs (saves ~1 us an accept).")
@frame_rule_options
@click.option(
    "--no-pid-label",
    is_flag=True,
    help="Leave the pid label out of per-process metrics (comm, container, pod and namespace stay), "
    "so that restarts do not start new series.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    help="Serve /metrics over HTTPS with this certificate (PEM; with --tls-key).",
)
@click.option("--tls-key", type=click.Path(dir_okay=False), help="The private key of --tls-cert (PEM).")
@click.option(
    "--tls-client-ca",
    type=click.Path(dir_okay=False),
    help="Serve only clients presenting a certificate signed by this CA (PEM; mutual TLS).",
)
@buffer_options(None)
def agent(**given: Any) -> None:
    """Run headless and export Prometheus metrics; log leak suspects as JSON lines.

    Exports sockets by state, CLOSE_WAIT sockets and their ages per process (and how many
    are older than --threshold), TIME_WAIT creations per process and remote port, resets,
    close() latency histograms, lost events and the agent's own CPU and memory. Process
    series are labelled with the owner's container, pod and namespace too. Label
    sets are bounded (--top-processes, --top-ports). The filters (--port, --pid, ...)
    scope everything but sockets by state, which is host-wide. Runs until SIGTERM or
    Ctrl-C, then detaches everything. See docs/agent.md and deploy/.

    The endpoint bounds what clients can take (idle connections time out, at most 512 are
    open, two threads answer); with --tls-cert/--tls-key it speaks HTTPS only.

    \b
    Examples:
      sudo tcptrace agent
      sudo tcptrace agent --threshold 60s --log /var/log/tcptrace/leaks.jsonl
      sudo tcptrace agent --cgroup /kubepods.slice --no-pid-label
      curl -s 127.0.0.1:9464/metrics | grep tcptrace_close_wait
      sudo tcptrace agent --listen 10.0.0.5:9464 --tls-cert agent.pem --tls-key agent.key \\
          --tls-client-ca scrapers-ca.pem
    """
    from tcptrace.commands import agent as command

    run_isolated(command.run, given)


@cli.command()
@filter_options
@interval_option()
@duration_option()
@from_option("Replay a recording (from `tcptrace record`) instead of tracing the kernel.")
@threshold_option()
@click.option(
    "--sort",
    type=click.Choice(["c", "t", "l"]),
    default="c",
    show_default=True,
    help="Sort processes by CLOSE_WAIT (c), TIME_WAIT created/s (t) or close() p99 (l).",
)
@frame_rule_options
@units_option
def top(**given: Any) -> None:
    """One live screen: sockets per state, rates, the processes behind them, close() times.

    Counts per state start from a snapshot of the host's sockets and follow the transitions
    the kernel counts after it (labelled "seed + transitions"); TIME_WAIT is the kernel's
    own count (sockstat) when no filter is given. Processes: CLOSE_WAIT sockets held and the
    oldest, TIME_WAIT created per second and in total, close() calls with p99 and max.
    Everything is counted in the kernel and read once per interval: nothing is lost and the
    cost does not grow with the connection rate. Keys: c, t, l sort; p filters a pid; q quits.

    \b
    Examples:
      sudo tcptrace top
      sudo tcptrace top --port 8080 --sort t
      tcptrace top --from incident.jsonl
    """
    from tcptrace.commands import top as command

    run_isolated(command.run, given)


@cli.command()
@filter_options
@duration_option("Observe for TIME (Ctrl-C stops early and still diagnoses).", default="10s")
@interval_option("Sample every TIME.")
@json_option("The diagnosis as JSON (a header line, then the summary).")
@click.option(
    "--report",
    type=click.Path(dir_okay=False),
    help="Also write a self-contained HTML report (plots inline, no external asset) to FILE.",
)
@force_option("Overwrite the --report file if it exists.")
@from_option("Diagnose a recording (from `tcptrace record`) instead of the live kernel.")
@frame_rule_options
@threshold_option()
def diagnose(**given: Any) -> None:
    """Watch for a while, then say what is wrong, with the evidence.

    Automates the usual workflow: the state distribution at the start and the end; the
    owners of CLOSE_WAIT sockets and their remotes (one remote dominating, or many
    distinct); sockets stuck across the window; leaks attributed to a process and the
    function of its code, with file:line (where the app read EOF and did not close, where
    it accepted the socket), or to a runtime's known pattern;
    TIME_WAIT creation by process against the ephemeral port range; close() latency; the
    settings. Counted in the kernel and read once per interval, as `top`: nothing is lost
    under churn. See docs/diagnose.md.

    \b
    Examples:
      sudo tcptrace diagnose
      sudo tcptrace diagnose --port 8080 --duration 30 --report incident.html
      sudo tcptrace diagnose --json > diagnosis.json
      tcptrace diagnose --from incident.jsonl
    """
    from tcptrace.commands import diagnose as command

    run_isolated(command.run, given)


@cli.command()
@duration_option()
@interval_option()
@threshold_option()
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

    run_isolated(command.run, given)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="tcptrace")
