"""`tcptrace agent`: headless, exports Prometheus metrics, logs leak suspects, runs for weeks.

One program is loaded (lifecycle + owner + closelat + timewait). CLOSE_WAIT is aggregated
in the kernel (bpf/closewait.bpf.h: counts, time to close, the sockets in CLOSE_WAIT now
with their code paths), as are TIME_WAIT, reset and close() counts: no event crosses the
ring buffer for a healthy connection, so the agent's CPU does not depend on the
connection rate. Every --interval the agent reads the maps, updates its bounded model,
reads /proc/net/tcp{,6} for sockets by state, publishes the metric families (a scrape
hands out the last ones), and logs new or grown leak-suspect groups as JSON lines.

Bounded memory: the kernel tables are bounded (LRU, or pruned of idle entries by the
agent), label sets are capped (top N), the stack map is emptied when it fills (after the
stacks of every socket in CLOSE_WAIT were resolved), and user stacks are symbolized for
leak suspects only, for at most --max-symbol-pids processes (bcc keeps a symbol cache per
process and cannot free one safely).
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from typing import IO, Any

from tcptrace.commands import session
from tcptrace.commands.attribution import SuspectNames
from tcptrace.commands.closewait import touch_stacks_default
from tcptrace.commands.options import FilterOptions, FrameRuleOptions, threshold_ns
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import KernelSource, live_session
from tcptrace.errors import TcptraceError, UsageError
from tcptrace.export.httpserver import MetricsHttpServer, ServerCollector, TlsOptions
from tcptrace.export.prometheus import AgentCollector, families, make_registry, parse_listen
from tcptrace.kernel.agentmaps import AgentMaps, symbol_cache_count
from tcptrace.kernel.closelat import CLOSE_WAIT_NS, LINGER_NS
from tcptrace.kernel.cwreader import LiveCloseWait
from tcptrace.kernel.timewait import SWEEP_EVERY_NS, sweep_tws
from tcptrace.model.agent import AgentConfig, AgentModel, states_count
from tcptrace.model.attribution import group_json
from tcptrace.model.closewait import SuspectGroup
from tcptrace.model.cwagg import CodeRef
from tcptrace.model.events import SocketEvent, TcpState
from tcptrace.model.filters import EventFilter
from tcptrace.model.framerules import Rules
from tcptrace.model.lifecycle import CodePath
from tcptrace.system.procfd import fd_access_problem
from tcptrace.system.safefile import open_append
from tcptrace.system.whois import HostWhois

NS = 1_000_000_000
PARTS = ("lifecycle", "owner", "closelat", "timewait")
MAX_CONSECUTIVE_ERRORS = 10  # failing from the start this often: give up, it will not recover
SYMBOLS_FULL = "[not symbolized: --max-symbol-pids reached]"


@dataclass(frozen=True)
class AgentOptions:
    host: str = "127.0.0.1"
    port: int = 9464
    interval_s: float = 5.0
    duration_s: float | None = None
    model: AgentConfig = AgentConfig()
    stacks: bool = True
    max_stacks: int = 16384
    max_symbol_pids: int = 64
    """User stacks are symbolized only for leak suspects, and only for this many processes
    over the agent's life: bcc keeps a symbol cache per process and cannot free one safely
    (docs/agent.md, "Bounded for weeks")."""
    ringbuf_pages: int | None = None
    filter: EventFilter = EventFilter()
    states_interval_s: float = 30.0
    """How often sockets by state are read from /proc (0: never)."""
    rules: Rules | None = None
    """The user's frame rules (--library, --app, --rules) for naming leaks' application code."""
    tls: TlsOptions | None = None


PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")


def read_states(paths: tuple[str, ...] = PROC_NET_TCP) -> dict[str, int] | None:
    """Sockets by state from /proc/net/tcp{,6}; None when they cannot be read.

    Only the state column is parsed: the files can hold tens of thousands of sockets, and
    what reading them costs is the kernel's (docs/agent.md).
    """
    states: list[str] = []
    names = {s.value: s.name for s in TcpState}
    counts: dict[bytes, int] = {}
    try:
        for path in paths:
            try:
                with open(path, "rb") as fh:
                    next(fh, None)
                    for line in fh:
                        fields = line.split(None, 4)
                        if len(fields) > 3:
                            counts[fields[3]] = counts.get(fields[3], 0) + 1
            except FileNotFoundError:
                continue
    except OSError:
        return None
    out = states_count(states)
    for raw, n in counts.items():
        try:
            name = names[int(raw, 16)]
        except (ValueError, KeyError):
            continue
        out[name] = out.get(name, 0) + n
    return out


class Agent:
    """The live agent: program, stream, model, HTTP endpoint. ``run()`` until stopped."""

    def __init__(self, options: AgentOptions, log: IO[str], status: IO[str] | None = None) -> None:
        self.options = options
        self.log = log
        self.status = status
        self.model = AgentModel(options.model, HostWhois())
        self.names = SuspectNames(options.rules, live=True)
        self.collector = AgentCollector()
        self.registry = make_registry(self.collector)
        self.server: MetricsHttpServer | None = None
        self.source: KernelSource | None = None
        self.closewait: LiveCloseWait | None = None
        self._session = ExitStack()
        self.tick_errors = 0
        self._ok_ticks = 0
        self._states: dict[str, int] | None = None
        self._states_ns: int | None = None
        self._swept_ns: int | None = None

    # ---- life --------------------------------------------------------------------------

    def start(self) -> None:
        """Load and attach (no spinner: stderr carries JSON lines), read the sockets already
        in CLOSE_WAIT, refresh once, then serve. On failure everything is detached again."""
        o = self.options
        self._session = ExitStack()
        try:
            # Stacks stay ids until a leak suspect is logged (see _symbolize()).
            source = self._session.enter_context(
                live_session(
                    PARTS,
                    o.filter,
                    stacks=o.stacks,
                    symbolize=False,
                    defines=self.program_defines(),
                    ringbuf_pages=o.ringbuf_pages,
                    quiet=True,
                )
            )
            self.source = source
            self.program = source.program
            self.maps = AgentMaps(source.program)
            self.closewait = LiveCloseWait(
                source.program, self.model.closewait, o.filter, 0, source.seeding, self.names.lines
            )
            self.model.closewait.resolve = self._symbolize
            # From the session's snapshot, taken after attaching: a socket entering
            # CLOSE_WAIT meanwhile is seen one way or the other (the model keeps one copy).
            self.model.preexisting = self.closewait.add_preexisting()
            self.tick(source.now_ns())
            self.server = MetricsHttpServer(o.host, o.port, self.registry, tls=o.tls)
            self.registry.register(ServerCollector(self.server))
        except BaseException:
            self._session.close()
            raise

    def program_defines(self) -> dict[str, int]:
        o = self.options
        defines = {
            # CLOSE_WAIT aggregated in the kernel (states come from /proc, TIME_WAIT and
            # close() from the kernel's maps): no transition is sent.
            "TT_CW_AGG": 1,
            # TIME_WAIT from the kernel's counters only: no event per timewait socket.
            "TT_TW_NO_EVENTS": 1,
            # close() times per (process, call): no stack per call and no event (the agent
            # exports neither), so the histograms grow with the processes, not their code.
            "TT_CL_NO_EVENTS": 1,
            "TT_MAX_SOCKS": o.model.max_sockets,
            "TT_STACK_ENTRIES": o.max_stacks,
            CLOSE_WAIT_NS: o.model.threshold_ns,
            LINGER_NS: 1_000_000,
        }
        if o.stacks and touch_stacks_default(o.filter):
            defines["TT_TOUCH_STACKS"] = 1
        return defines

    def run(self) -> str:
        assert self.source is not None
        return session.run(
            self.source,
            self.feed,
            interval_s=self.options.interval_s,
            duration_s=self.options.duration_s,
            on_tick=self.tick,
            flag=StopFlag(),
        )

    def stop(self) -> None:
        """Stop serving, detach every program. Safe to call twice."""
        if self.server is not None:
            self.server.stop()
            self.server = None
        self._session.close()
        self.source = None

    # ---- work --------------------------------------------------------------------------

    def feed(self, event: SocketEvent) -> None:
        """The ring buffer carries no CLOSE_WAIT event (the kernel aggregates them); what
        closelat and timewait still send is drained so that it never fills, and dropped."""

    def _symbolize(self, ref: CodeRef) -> CodePath:
        """A leak suspect's code path with its frames; once bcc holds a symbol cache for
        --max-symbol-pids processes, the user stacks of new ones are not symbolized."""
        assert self.closewait is not None
        stacks = self.closewait.stacks
        if ref.ustack_id >= 0 and not stacks.symbolized(ref.pid):
            if symbol_cache_count(self.program) >= self.options.max_symbol_pids:
                full = (SYMBOLS_FULL,)
                return CodePath(op=ref.op, ts_ns=ref.ts_ns, task_pid=ref.pid, ret=ref.ret, ustack=full)
        return stacks(ref)

    def tick(self, now_ns: int) -> None:
        """One refresh. A failure is logged as one JSON line and counted
        (tcptrace_agent_tick_errors_total); the agent goes on with the next interval, since
        a process meant to run for weeks must not die of one unreadable /proc file."""
        try:
            self._tick(now_ns)
        except Exception as exc:  # logged and counted, never silent
            self.tick_errors += 1
            self.collector.refresh_failed()
            self.log.write(
                json.dumps(
                    {
                        "type": "agent_error",
                        "error": f"{type(exc).__name__}: {exc}",
                        "count": self.tick_errors,
                    },
                    separators=(",", ":"),
                )
                + "\n"
            )
            self.log.flush()
            if self.tick_errors >= MAX_CONSECUTIVE_ERRORS and self._ok_ticks == 0:
                raise TcptraceError(
                    f"every refresh of the agent fails: {type(exc).__name__}: {exc}"
                ) from None
            return
        self._ok_ticks += 1

    def _tick(self, now_ns: int) -> None:
        maps = self.maps
        assert self.closewait is not None
        # The kernel's CLOSE_WAIT aggregates into the model (and, when the stack map
        # refused stacks, every open socket's resolved and the map emptied).
        self.closewait.refresh(now_ns)
        prune = self.model.tick(
            now_ns,
            tw_procs=maps.tw_procs(),
            tw_dests=maps.tw_dests(),
            cl_hists=maps.cl_hists(),
            cl_comm=maps.cl_comm,
        )
        for table, keys in prune.items():
            if not keys:
                continue
            if table == "cw_owners":
                self.closewait.reader.delete_owners(keys)
            else:
                maps.delete(table, keys)
            self.model.forgot(table, keys)
        maps.forget_raw()
        if self._swept_ns is None:
            self._swept_ns = now_ns
        elif now_ns - self._swept_ns >= SWEEP_EVERY_NS:
            self.model.pruned["tws"] += sweep_tws(self.program, now_ns)
            self._swept_ns = now_ns
        counters = self.source.counters() if self.source is not None else {}
        every = int(self.options.states_interval_s * NS)
        if every > 0 and (self._states_ns is None or now_ns - self._states_ns >= every):
            self._states, self._states_ns = read_states(), now_ns
        seeding = self.closewait.seeding
        state = self.model.export(
            now_ns,
            states=self._states,
            counters=counters,
            tw_stats=maps.tw_stats(),
            cl_stats=maps.cl_stats(),
            symbol_caches=symbol_cache_count(self.program),
            tick_errors=self.tick_errors,
            seed_failures=seeding.planted.failed if seeding is not None else 0,
        )
        state.recursion_misses = self.program.skipped_runs_by_program() or {}
        self.collector.publish(families(state))
        self.model.closewait.suspects(now_ns)  # their stacks resolved (and located)
        self.names.refresh(self.model.closewait, now_ns)
        for record in self.model.suspect_records(now_ns, describe=self._describe):
            self.log.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.log.flush()

    def _describe(self, group: SuspectGroup) -> dict[str, Any]:
        """A leak-suspect log line's fields: the application frame and hints first."""
        return group_json(group, self.names.attributor(group))


def endpoint(host: str, port: int) -> str:
    """
    >>> endpoint("::1", 9464), endpoint("127.0.0.1", 9464)
    ('[::1]:9464', '127.0.0.1:9464')
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(
    *,
    filters: FilterOptions,
    listen: str,
    threshold: float,
    interval: float,
    states_interval: float,
    duration: float | None,
    top_processes: int,
    top_ports: int,
    max_sockets: int,
    log_file: str | None,
    no_stacks: bool,
    no_pid_label: bool,
    buffer_pages: int | None,
    frame_rules: FrameRuleOptions,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
) -> None:
    flt = filters.event_filter(live=True)
    host, port = parse_listen(listen)
    tls = tls_options(tls_cert, tls_key, tls_client_ca)
    options = AgentOptions(
        host=host,
        port=port,
        interval_s=interval,
        states_interval_s=states_interval,
        duration_s=duration,
        model=AgentConfig(
            threshold_ns=threshold_ns(threshold),
            top_processes=top_processes,
            top_ports=top_ports,
            max_sockets=max_sockets,
            pid_label=not no_pid_label,
        ),
        stacks=not no_stacks,
        ringbuf_pages=buffer_pages,
        filter=flt,
        rules=frame_rules.rules(),
        tls=tls,
    )
    if log_file is None:
        run_agent(options)
        return
    with open_append(log_file) as log:
        run_agent(options, log)


def tls_options(cert: str | None, key: str | None, client_ca: str | None) -> TlsOptions | None:
    """--tls-cert, --tls-key and --tls-client-ca, checked (and the files loaded once) before
    anything is compiled: a typo fails at once, not after the compile."""
    if cert is None and key is None:
        if client_ca is not None:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise UsageError("--tls-cert and --tls-key go together")
    tls = TlsOptions(cert, key, client_ca)
    tls.context()
    return tls


def run_agent(options: AgentOptions, log: IO[str] | None = None, status: IO[str] | None = None) -> str:
    """Start, run until stopped (SIGTERM, SIGINT, --duration), stop; returns why it stopped."""
    out = log or sys.stderr
    status = status or sys.stderr
    agent = Agent(options, out, status)
    try:
        agent.start()
        assert agent.server is not None
        started = {"type": "agent_started", "listen": endpoint(agent.server.host, agent.server.port)}
        if options.tls is not None:
            started["scheme"] = "https"
        problem = fd_access_problem()
        if problem is not None:  # said once, not a silent empty pid label
            started["owners"] = f"unknown for other users' sockets found at start ({problem})"
        status.write(json.dumps(started, separators=(",", ":")) + "\n")
        status.flush()
        reason = agent.run()
    finally:
        agent.stop()
    status.write(json.dumps({"type": "agent_stopped", "reason": reason}, separators=(",", ":")) + "\n")
    status.flush()
    return reason
