"""`tcptrace agent`: headless, exports Prometheus metrics, logs leak suspects, runs for weeks.

One program is loaded (lifecycle + owner + closelat + timewait); the ring buffer feeds the
CLOSE_WAIT tracker (owners, code paths) and the in-kernel maps give exact TIME_WAIT,
reset and close() counts. Every --interval the agent reads the maps, updates its bounded
model, reads /proc/net/tcp{,6} for sockets by state, publishes the metric families (a
scrape hands out the last ones), and logs new or grown leak-suspect groups as JSON lines.

Bounded memory: the kernel tables are LRU or pruned of idle entries by the agent, the
user-side socket table is an LRU of --max-sockets, label sets are capped (top N), the
stack map is emptied when it fills, and bcc's per-pid symbol caches are freed for pids
that are gone.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from typing import IO, Any

from tcptrace.commands import session
from tcptrace.commands.attribution import SuspectNames
from tcptrace.commands.options import FilterOptions, FrameRuleOptions, threshold_ns
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import KernelSource, live_session
from tcptrace.errors import TcptraceError
from tcptrace.export.prometheus import AgentCollector, MetricsServer, families, make_registry, parse_listen
from tcptrace.kernel.agentmaps import AgentMaps, symbol_cache_count
from tcptrace.kernel.closelat import CLOSE_WAIT_NS, LINGER_NS
from tcptrace.kernel.stream import Symbolizer
from tcptrace.model.agent import (
    AgentConfig,
    AgentModel,
    resolve_frames,
    stack_placeholder,
    states_count,
)
from tcptrace.model.attribution import group_json
from tcptrace.model.closewait import SuspectGroup
from tcptrace.model.events import SocketEvent, TcpState
from tcptrace.model.filters import EventFilter
from tcptrace.model.framerules import Rules
from tcptrace.model.lifecycle import CodePath
from tcptrace.system.procfd import closewait_snapshot
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
        self.server: MetricsServer | None = None
        self.source: KernelSource | None = None
        self._session = ExitStack()
        self.stacks_cleared = 0
        self._generation = 0
        self.tick_errors = 0
        self._ok_ticks = 0
        self._last_stack_failed = 0
        self._states: dict[str, int] | None = None
        self._states_ns: int | None = None

    # ---- life --------------------------------------------------------------------------

    def start(self) -> None:
        """Load and attach (no spinner: stderr carries JSON lines), read the sockets already
        in CLOSE_WAIT, refresh once, then serve. On failure everything is detached again."""
        o = self.options
        self._session = ExitStack()
        try:
            # Stacks stay ids until a leak suspect is logged (see feed()).
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
            self._symbolizer = Symbolizer(source.program, lines=self.names.lines)
            self.maps = AgentMaps(source.program)
            # After attaching, so that a socket entering CLOSE_WAIT meanwhile is seen one
            # way or the other (the tracker keeps one copy).
            self.model.preexisting = self.model.tracker.add_preexisting(
                closewait_snapshot(o.filter), source.now_ns()
            )
            self.tick(source.now_ns())
            self.server = MetricsServer(o.host, o.port, self.registry)
        except BaseException:
            self._session.close()
            raise

    def program_defines(self) -> dict[str, int]:
        o = self.options
        return {
            "TT_PROC_STACKS_ONLY": 1,
            # The model takes transitions only for CLOSE_WAIT (states come from /proc,
            # TIME_WAIT and close() from the kernel's maps): no other transition is sent.
            "TT_CLOSEWAIT_EVENTS": 1,
            "TT_MAX_SOCKS": o.model.max_sockets,
            "TT_STACK_ENTRIES": o.max_stacks,
            CLOSE_WAIT_NS: o.model.threshold_ns,
            LINGER_NS: 1_000_000,
        }

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
        if event.kstack_id >= 0 or event.ustack_id >= 0:
            event = dataclasses.replace(
                event,
                kstack=(stack_placeholder("k", self._generation, event.kstack_id),)
                if event.kstack_id >= 0
                else (),
                ustack=(stack_placeholder("u", self._generation, event.ustack_id, event.task_pid),)
                if event.ustack_id >= 0
                else (),
            )
        self.model.feed(event)

    def _symbolize(self, kind: str, stack_id: int, pid: int) -> tuple[str, ...]:
        if kind == "k":
            return self._symbolizer.frames(stack_id, None)
        if symbol_cache_count(self.program) >= self.options.max_symbol_pids:
            return (SYMBOLS_FULL,)
        return self._symbolizer.frames(stack_id, pid)

    def resolve(self, frames: list[str] | tuple[str, ...]) -> list[str]:
        return resolve_frames(frames, self._generation, self._symbolize)

    def _resolve_open_sockets(self, older_than_ns: int | None = None, now_ns: int = 0) -> None:
        """Symbolize the code paths of the sockets in CLOSE_WAIT now (those older than
        ``older_than_ns``: the leak suspects, so that they group by function names), or of
        all of them before the stack map is emptied."""
        self.model.tracker.rewrite_code_paths(self._resolve_path, now_ns, older_than_ns)

    def _resolve_path(self, path: CodePath) -> CodePath:
        if not any(f.startswith("@") for f in path.kstack + path.ustack):
            return path
        return dataclasses.replace(
            path, kstack=tuple(self.resolve(path.kstack)), ustack=tuple(self.resolve(path.ustack))
        )

    def tick(self, now_ns: int) -> None:
        """One refresh. A failure is logged as one JSON line and counted
        (tcptrace_agent_tick_errors_total); the agent goes on with the next interval, since
        a process meant to run for weeks must not die of one unreadable /proc file."""
        try:
            self._tick(now_ns)
        except Exception as exc:  # logged and counted, never silent
            self.tick_errors += 1
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
        prune = self.model.tick(
            now_ns,
            tw_procs=maps.tw_procs(),
            tw_dests=maps.tw_dests(),
            cl_hists=maps.cl_hists(),
            cl_comm=maps.cl_comm,
        )
        for table, keys in prune.items():
            if keys:
                maps.delete(table, keys)
                self.model.forgot(table, keys)
        maps.forget_raw()
        counters = self.source.counters() if self.source is not None else {}
        # The stack map keeps every distinct stack until it is full, then refuses new ones.
        # Its stacks were symbolized as their events arrived: empty it when it refused one.
        failed = int(counters.get("stack_failed", 0))
        if failed > self._last_stack_failed:
            if self.source is not None:
                for event in self.source.drain():  # events still naming the old ids
                    self.feed(event)
            self._resolve_open_sockets()
            maps.clear_stacks()
            self._symbolizer.clear()
            self._generation += 1
            self.stacks_cleared += 1
        self._last_stack_failed = failed
        every = int(self.options.states_interval_s * NS)
        if every > 0 and (self._states_ns is None or now_ns - self._states_ns >= every):
            self._states, self._states_ns = read_states(), now_ns
        state = self.model.export(
            now_ns,
            states=self._states,
            counters=counters,
            tw_stats=maps.tw_stats(),
            cl_stats=maps.cl_stats(),
            symbol_caches=symbol_cache_count(self.program),
            tick_errors=self.tick_errors,
        )
        state.recursion_misses = self.program.skipped_runs_by_program() or {}
        self.collector.publish(families(state))
        self._resolve_open_sockets(self.options.model.threshold_ns, now_ns)
        self.names.refresh(self.model.tracker, now_ns)
        for record in self.model.suspect_records(now_ns, describe=self._describe):
            for key in ("origin_stack", "last_touch_stack"):
                record[key] = self.resolve(record.get(key) or [])
            for key in ("pre_fin_touch", "post_fin_touch"):
                if record.get(key):
                    record[key]["stack"] = self.resolve(record[key]["stack"])
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
) -> None:
    flt = filters.event_filter(live=True)
    host, port = parse_listen(listen)
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
    )
    if log_file is None:
        run_agent(options)
        return
    with open_append(log_file) as log:
        run_agent(options, log)


def run_agent(options: AgentOptions, log: IO[str] | None = None, status: IO[str] | None = None) -> str:
    """Start, run until stopped (SIGTERM, SIGINT, --duration), stop; returns why it stopped."""
    out = log or sys.stderr
    status = status or sys.stderr
    agent = Agent(options, out, status)
    try:
        agent.start()
        assert agent.server is not None
        status.write(
            json.dumps(
                {"type": "agent_started", "listen": endpoint(agent.server.host, agent.server.port)},
                separators=(",", ":"),
            )
            + "\n"
        )
        status.flush()
        reason = agent.run()
    finally:
        agent.stop()
    status.write(json.dumps({"type": "agent_stopped", "reason": reason}, separators=(",", ":")) + "\n")
    status.flush()
    return reason
