"""The agent's model: kernel map reads in, a bounded ExportState and leak-suspect log
records out. Pure (no I/O, no bcc), so it is unit-tested on generated data.

Per interval the agent hands ``tick()`` what it read from the kernel's cumulative maps
(TIME_WAIT per process and destination, close() histograms per process and call,
CLOSE_WAIT per owner); the model turns them into differences (MapDeltas), adds the
differences to bounded counters (BoundedCounters: top N keys by activity, the rest in an
``other`` series, all of them monotonic), and says which map entries have been idle long
enough to delete. CLOSE_WAIT is the closewait model (model/closewait.CloseWaitModel) fed
the kernel's aggregates (kernel/cwreader.py), or, for events (tests), their emulation.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tcptrace.model.cardinality import BoundedCounters, MapDeltas, top_n
from tcptrace.model.closewait import CloseWaitModel, SuspectGroup, code_path_key
from tcptrace.model.cwagg import CwSnapshot, Emulator, OwnerCounts, OwnerKey
from tcptrace.model.events import SocketEvent
from tcptrace.model.histogram import EMPTY, Log2Histogram
from tcptrace.model.timewait import TW_MAP_FAILURES, Dest
from tcptrace.model.workload import NOBODY, Whois, whois_json

NS = 1_000_000_000
OTHER = "other"
CALL_NAMES = ("close", "shutdown", "close_range")
Proc = tuple[int, str, str, str, str]
"""A process's series: (pid, comm, container, pod, namespace), the last three "" outside a
container (or unknown); pid 0 when the pid label is left out (--no-pid-label: one series
per name and container, whatever the restarts). (0, "other", "", "", "") stands for the
aggregate of the rest."""
AGGREGATE: Proc = (0, OTHER, "", "", "")
ProcKey = tuple[int, int]
"""(pid, process start time) of a tw_procs entry: a reused pid is another process."""
ClKey = tuple[int, int, str, int]
"""(pid, process start time, call, user stack id) of a cl_hists entry."""


@dataclass(frozen=True)
class ProcTw:
    """One process's TIME_WAIT counters as the kernel keeps them (tw_procs), cumulative."""

    comm: str
    created: int = 0
    parked: int = 0
    resets_sent: int = 0
    resets_received: int = 0

    def minus(self, old: ProcTw) -> ProcTw:
        return ProcTw(
            self.comm,
            self.created - old.created,
            self.parked - old.parked,
            self.resets_sent - old.resets_sent,
            self.resets_received - old.resets_received,
        )

    @property
    def weight(self) -> float:
        """Activity; negative when a counter went down (the entry was recreated)."""
        parts = (self.created, self.parked, self.resets_sent, self.resets_received)
        if any(p < 0 for p in parts):
            return -1.0
        return float(sum(parts))


@dataclass(frozen=True)
class AgentConfig:
    threshold_ns: int = 5 * NS
    """A socket in CLOSE_WAIT this long is a leak suspect (the default of every command)."""
    pid_label: bool = True
    """False: series per (comm, container, pod, namespace), without the pid."""
    top_processes: int = 20
    top_ports: int = 20
    max_sockets: int = 262_144
    idle_intervals: int = 12
    """A kernel map entry unchanged for this many intervals is deleted."""
    label_idle_ns: int = 600 * NS
    """A label set without activity for this long is dropped (its series ends)."""
    relog_ns: int = 600 * NS
    """A leak-suspect group still present is logged again after this long."""


def _owner_sub(a: OwnerCounts, b: OwnerCounts) -> OwnerCounts:
    if a.entered < b.entered or a.closed < b.closed or a.reset < b.reset:
        raise ValueError("a counter went down: the entry was recreated")
    return OwnerCounts(
        a.pid, a.start_ns, a.comm, a.cgroup, a.entered - b.entered, a.closed - b.closed, a.reset - b.reset
    )


def _owner_weight(o: OwnerCounts) -> float:
    return float(o.entered + o.closed + o.reset + o.forgotten)


def _hist_weight(h: Log2Histogram) -> float:
    return float(h.count)


def _hist_sub(a: Log2Histogram, b: Log2Histogram) -> Log2Histogram:
    return a - b  # ValueError when b is not a part of a: MapDeltas takes the whole value


def proc_of(pid: int | None, comm: str | None, where: tuple[str, str, str] = ("", "", "")) -> Proc:
    """A series key: ``where`` is (container, pod, namespace)."""
    return (pid or 0, comm or "unknown", *where)


@dataclass
class ExportState:
    """Everything one export shows, already bounded (top N plus an aggregate)."""

    threshold_s: float
    pid_label: bool = True
    """Whether per-process series carry the pid label (--no-pid-label: they do not)."""
    states: Mapping[str, int] | None = None
    """Sockets by state from /proc/net/tcp{,6} (host network namespace); None: unread."""
    close_wait_ages: Mapping[Proc, list[int]] = field(default_factory=dict)
    """Ages (ns) of the sockets in CLOSE_WAIT now, per owning process (bounded)."""
    close_wait_entered: int = 0
    close_wait_closed: int = 0
    close_wait_reset: int = 0
    close_wait_forgotten: int = 0
    close_wait_preexisting: int = 0
    suspect_groups: int = 0
    timewait_created: int = 0
    timewait_by_proc: Sequence[tuple[Proc, int]] = ()
    timewait_by_remote_port: Sequence[tuple[str, int]] = ()
    resets_sent: int = 0
    resets_received: int = 0
    resets_sent_by_proc: Sequence[tuple[Proc, int]] = ()
    resets_received_by_proc: Sequence[tuple[Proc, int]] = ()
    close_durations: Sequence[tuple[Proc, str, Log2Histogram]] = ()
    """(process, call, cumulative histogram) rows."""
    close_calls: Mapping[str, int] = field(default_factory=dict)
    """Calls by call name, all processes: exact, while per-process series come and go."""
    events_decoded: int = 0
    events_lost: int = 0
    events_malformed: int = 0
    map_failures: Mapping[str, int] = field(default_factory=dict)
    map_evictions: Mapping[str, int] = field(default_factory=dict)
    """Entries that mattered which a bounded kernel table lost, per table (the socket
    table's: live sockets met again with no owner)."""
    label_keys: Mapping[str, int] = field(default_factory=dict)
    """Label sets kept per bounded family (for watching the bound itself)."""
    pruned: Mapping[str, int] = field(default_factory=dict)
    """Kernel map entries deleted as idle, per map."""
    symbol_caches: int = 0
    tick_errors: int = 0
    """Refreshes that failed (each logged as an agent_error line)."""
    recursion_misses: Mapping[str, int] = field(default_factory=dict)
    """Program runs the kernel skipped (another BPF program was running on that CPU)."""
    user_sockets: int = 0
    """Sockets in CLOSE_WAIT the agent holds (bounded by the kernel's table)."""


class AgentModel:
    """Everything the agent exports, bounded, from events and map reads."""

    def __init__(self, config: AgentConfig, whois: Whois = NOBODY) -> None:
        """``whois`` names owners in container terms (labels, leak logs)."""
        self.config = config
        self.whois = whois
        c = config
        self.closewait = CloseWaitModel(threshold_ns=c.threshold_ns)
        self.emulator: Emulator | None = None

        def counters(limit: int) -> BoundedCounters[Any, int]:
            return BoundedCounters(limit, zero=0, idle_ns=c.label_idle_ns)

        self.tw_by_proc: BoundedCounters[Proc, int] = counters(c.top_processes)
        self.tw_by_port: BoundedCounters[int, int] = counters(c.top_ports)
        self.rs_by_proc: BoundedCounters[Proc, int] = counters(c.top_processes)
        self.rr_by_proc: BoundedCounters[Proc, int] = counters(c.top_processes)
        self.close_by_proc: dict[str, BoundedCounters[Proc, Log2Histogram]] = {
            call: BoundedCounters(c.top_processes, zero=EMPTY, weight=_hist_weight, idle_ns=c.label_idle_ns)
            for call in CALL_NAMES
        }
        self.tw_procs: MapDeltas[ProcKey, ProcTw] = MapDeltas(
            idle_reads=c.idle_intervals, subtract=ProcTw.minus, weight=lambda p: p.weight
        )
        self.tw_dests: MapDeltas[Dest, int] = MapDeltas(
            idle_reads=c.idle_intervals, subtract=lambda a, b: a - b, weight=float
        )
        self.cl_hists: MapDeltas[ClKey, Log2Histogram] = MapDeltas(
            idle_reads=c.idle_intervals, subtract=_hist_sub, weight=_hist_weight
        )
        self.cw_owners: MapDeltas[OwnerKey, OwnerCounts] = MapDeltas(
            idle_reads=c.idle_intervals, subtract=_owner_sub, weight=_owner_weight
        )
        self.preexisting = 0
        self.close_calls: Counter[str] = Counter({call: 0 for call in CALL_NAMES})
        """Every call counted, whatever series it went to (series end; this never does)."""
        self.pruned: Counter[str] = Counter()
        self._logged: dict[tuple[Any, ...], tuple[int, int]] = {}

    # ---- input -------------------------------------------------------------------------

    def feed(self, event: SocketEvent) -> None:
        """An event (a test, a replay): aggregated as the kernel would, read at ``tick``."""
        if self.emulator is None:
            self.emulator = Emulator()
        self.emulator.feed(event)

    def tick(
        self,
        now_ns: int,
        *,
        tw_procs: Mapping[ProcKey, ProcTw] | None = None,
        tw_dests: Mapping[Dest, int] | None = None,
        cl_hists: Mapping[ClKey, Log2Histogram] | None = None,
        cl_comm: Mapping[ClKey, str] | None = None,
        closewait: CwSnapshot | None = None,
    ) -> dict[str, list[Any]]:
        """Take one interval's map reads (``closewait``: the kernel's CLOSE_WAIT
        aggregates; without it, what the events fed aggregate to, unless the caller applied
        them to ``self.closewait`` itself); returns the keys to delete from each map."""
        prune: dict[str, list[Any]] = {}
        if closewait is None and self.emulator is not None:
            closewait = self.emulator.snapshot(now_ns)
        if closewait is not None:
            self.closewait.apply(closewait)
        _idle, cw_idle = self.cw_owners.update({o.key: o for o in self.closewait.owners})
        prune["cw_owners"] = cw_idle
        if tw_procs is not None:
            deltas, idle = self.tw_procs.update(tw_procs)
            for (pid, _start_ns), d in deltas.items():
                proc = self.proc(pid, d.comm)
                self.tw_by_proc.add(proc, d.created, now_ns)
                self.rs_by_proc.add(proc, d.resets_sent, now_ns)
                self.rr_by_proc.add(proc, d.resets_received, now_ns)
            prune["tw_procs"] = idle
        if tw_dests is not None:
            ddeltas, didle = self.tw_dests.update(tw_dests)
            for dest, n in ddeltas.items():
                if not dest.bound:  # a server's TIME_WAIT has no one remote port
                    self.tw_by_port.add(dest.rport, n, now_ns)
            prune["tw_dests"] = didle
        if cl_hists is not None:
            hdeltas, hidle = self.cl_hists.update(cl_hists)
            comms = cl_comm or {}
            for key, h in hdeltas.items():
                pid, _start_ns, call, _stack = key
                limiter = self.close_by_proc.get(call)
                if limiter is not None:
                    limiter.add(self.proc(pid, comms.get(key, "?")), h, now_ns)
                    self.close_calls[call] += h.count
            prune["cl_hists"] = hidle
        for limiter in self._limiters():
            limiter.rebalance(now_ns)
        self.closewait.begin_interval(now_ns)
        return prune

    def forgot(self, table: str, keys: list[Any]) -> None:
        """The agent deleted these entries from a kernel map."""
        if table == "tw_procs":
            self.tw_procs.forget(keys)
        elif table == "tw_dests":
            self.tw_dests.forget(keys)
        elif table == "cl_hists":
            self.cl_hists.forget(keys)
        elif table == "cw_owners":
            self.cw_owners.forget(keys)
        self.pruned[table] += len(keys)

    def _limiters(self) -> list[BoundedCounters[Any, Any]]:
        return [
            self.tw_by_proc,
            self.tw_by_port,
            self.rs_by_proc,
            self.rr_by_proc,
            *self.close_by_proc.values(),
        ]

    def proc(self, pid: int | None, comm: str | None, cgroup: int | None = None) -> Proc:
        """The series key of a process: its container, pod and namespace from its cgroup
        (``cgroup``, or the process's now), and its pid unless the pid label is left out."""
        if cgroup is None:
            cgroup = self.whois.pid_cgroup(pid)
        found = self.whois.workload(cgroup)
        where = ("", "", "")
        if found is not None:
            where = (found.container or "", found.pod or "", found.namespace or "")
        return proc_of(pid if self.config.pid_label else 0, comm, where)

    # ---- output ------------------------------------------------------------------------

    def close_wait_by_proc(self, now_ns: int) -> dict[Proc, list[int]]:
        """Ages of open CLOSE_WAIT sockets per process, top N by count plus the aggregate."""
        ages: dict[Proc, list[int]] = {}
        for sock in self.closewait.open.values():
            ages.setdefault(self.proc(sock.pid, sock.comm, sock.cgroup), []).append(sock.age_ns(now_ns))
        kept, _rest, n_rest = top_n({p: len(a) for p, a in ages.items()}, self.config.top_processes)
        out = {p: ages[p] for p, _ in kept}
        if n_rest:
            keep = set(out)
            out[AGGREGATE] = [a for p, lst in ages.items() if p not in keep for a in lst]
        return out

    def export(
        self,
        now_ns: int,
        *,
        states: Mapping[str, int] | None = None,
        counters: Mapping[str, int] | None = None,
        tw_stats: Mapping[str, int] | None = None,
        cl_stats: Mapping[str, int] | None = None,
        symbol_caches: int = 0,
        tick_errors: int = 0,
        seed_failures: int = 0,
    ) -> ExportState:
        counters = counters or {}
        tw_stats = tw_stats or {}
        cl_stats = cl_stats or {}
        t = self.closewait
        cw = t.counters

        def with_other(limiter: BoundedCounters[Any, int], other_key: Any) -> list[tuple[Any, int]]:
            rows = sorted(limiter.items(), key=lambda kv: str(kv[0]))
            return [*rows, (other_key, limiter.other)]

        ports = [(str(p), n) for p, n in with_other(self.tw_by_port, OTHER)]
        close_rows: list[tuple[Proc, str, Log2Histogram]] = []
        for call, limiter in self.close_by_proc.items():
            for proc, hist in sorted(limiter.items()):
                close_rows.append((proc, call, hist))
            if limiter.other or len(limiter):
                close_rows.append((AGGREGATE, call, limiter.other))
        failures = {
            "socks": counters.get("sock_update_failed", 0),
            "stacks": counters.get("stack_failed", 0),
            "close_wait_open": cw.open_failed,
            "close_wait_owners": cw.owner_failed,
            "seeds": seed_failures,
            **{name: tw_stats.get(key, 0) for name, key in TW_MAP_FAILURES.items()},
            "closelat_hists": cl_stats.get("hist_failed", 0),
            "closelat_calls": cl_stats.get("call_failed", 0),
        }
        return ExportState(
            threshold_s=self.config.threshold_ns / NS,
            pid_label=self.config.pid_label,
            states=states,
            close_wait_ages=self.close_wait_by_proc(now_ns),
            close_wait_entered=cw.entered,
            close_wait_closed=cw.closed,
            close_wait_reset=cw.reset,
            close_wait_forgotten=cw.forgotten,
            close_wait_preexisting=self.preexisting,
            suspect_groups=len(t.suspects(now_ns)),
            timewait_created=tw_stats.get("created", 0),
            timewait_by_proc=with_other(self.tw_by_proc, AGGREGATE),
            timewait_by_remote_port=ports,
            resets_sent=tw_stats.get("resets_sent", 0),
            resets_received=tw_stats.get("resets_received", 0),
            resets_sent_by_proc=with_other(self.rs_by_proc, AGGREGATE),
            resets_received_by_proc=with_other(self.rr_by_proc, AGGREGATE),
            close_durations=close_rows,
            close_calls=dict(self.close_calls),
            events_decoded=counters.get("decoded", 0),
            events_lost=counters.get("lost", 0),
            events_malformed=counters.get("malformed", 0),
            map_failures=failures,
            map_evictions={"socks": cw.owner_forgotten},
            label_keys={
                "timewait_created_by_process": len(self.tw_by_proc),
                "timewait_created_by_remote_port": len(self.tw_by_port),
                "resets_sent_by_process": len(self.rs_by_proc),
                "resets_received_by_process": len(self.rr_by_proc),
                **{f"close_duration_{c}": len(lim) for c, lim in self.close_by_proc.items()},
            },
            pruned=dict(self.pruned),
            symbol_caches=symbol_caches,
            tick_errors=tick_errors,
            user_sockets=len(t.open),
        )

    def suspect_records(
        self,
        now_ns: int,
        wall_s: float | None = None,
        describe: Callable[[SuspectGroup], dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Leak-suspect groups to log now: new ones, grown ones, and ones not logged for
        ``relog_ns``. One JSON object each: ``describe(group)`` (the agent's leads with the
        application frame, model/attribution.py), else the group's own fields (owner,
        count, origin and last-touch stacks)."""
        wall = time.time() if wall_s is None else wall_s
        out = []
        seen = set()
        for group in self.closewait.suspects(now_ns):
            key = _suspect_key(group)
            seen.add(key)
            last = self._logged.get(key)
            if last is not None:
                count, at = last
                if group.count <= count and now_ns - at < self.config.relog_ns:
                    continue
            self._logged[key] = (group.count, now_ns)
            fields = describe(group) if describe is not None else group.to_json()
            extra = whois_json(self.whois, group.pid, group.cgroup)
            out.append({"type": "leak_suspect", "time": round(wall, 3), **fields, **extra})
        for key in [k for k in self._logged if k not in seen]:
            del self._logged[key]
        return out


def _suspect_key(group: SuspectGroup) -> tuple[Any, ...]:
    return (group.pid, group.comm, code_path_key(group.origin), code_path_key(group.pre_fin_touch))


def states_count(states: list[str]) -> dict[str, int]:
    """Sockets by state name, every state present (zeros included), for a stable series set.

    >>> states_count(["LISTEN", "ESTABLISHED", "ESTABLISHED"])["ESTABLISHED"]
    2
    """
    from tcptrace.model.events import TcpState

    out = {s.name: 0 for s in TcpState if s.name not in ("NEW_SYN_RECV",)}
    for name in states:
        out[name] = out.get(name, 0) + 1
    return out


@dataclass
class RssSeries:
    """(t, rss) samples and the flatness check scripts/soak applies."""

    samples: list[tuple[float, int]] = field(default_factory=list)

    def add(self, t: float, rss: int) -> None:
        self.samples.append((t, rss))

    def verdict(
        self, warmup_fraction: float = 0.25, margin: float = 0.05, slack_bytes: int = 2 << 20
    ) -> tuple[bool, str]:
        """Flat when the max of the last quarter is within ``margin`` (plus a small absolute
        slack for allocator noise) of the max of the first quarter after warm-up.

        >>> r = RssSeries([(float(i), 100 << 20) for i in range(20)]); r.verdict()[0]
        True
        >>> r = RssSeries([(float(i), (100 + 5 * i) << 20) for i in range(20)]); r.verdict()[0]
        False
        """
        n = len(self.samples)
        if n < 8:
            return False, f"too few samples ({n})"
        start = int(n * warmup_fraction)
        rest = self.samples[start:]
        q = max(1, len(rest) // 4)
        first = max(r for _, r in rest[:q])
        last = max(r for _, r in rest[-q:])
        limit = first * (1 + margin) + slack_bytes
        ok = last <= limit
        return ok, (
            f"rss first-quarter max {first / 2**20:.1f} MiB, last-quarter max {last / 2**20:.1f} MiB "
            f"(limit {limit / 2**20:.1f} MiB)"
        )
