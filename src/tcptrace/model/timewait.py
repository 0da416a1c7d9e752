"""TIME_WAIT creations, rates by process and by remote endpoint, and the port-exhaustion forecast.

Pure: fed TimeWaitEvents (live or from a recording) and, live, snapshots of the kernel's
exact counters. Everything is cumulative since the start, and each tick takes the
difference, so an interval's numbers never depend on how events were batched.

Counting (see docs/timewait.md): a timewait socket counts as a TIME_WAIT creation once,
when it is first seen in TIME_WAIT. ``immediate``: created in TIME_WAIT (the peer's FIN had
arrived). ``converted_fin``: an orphaned FIN_WAIT2 socket parked as a timewait socket, that
became TIME_WAIT when the FIN arrived (counted then). ``converted_timer``: the same, seen
only later at its timer. ``pending_fin_wait2``: parked sockets not resolved yet.
``parked_ended``: parked sockets that died without the FIN: never TIME_WAIT.

Keys are the kernel's: a process is (pid, start time), so a reused pid is another process;
a destination carries its network namespace, so equal addresses in two namespaces (two
containers) stay apart. The same counts come from the kernel's maps (live) and from
``EventCounts`` (a replay of ``--events``), which derives them the way the kernel does.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tcptrace.model.events import SocketEvent, TcpState, TimeWaitEvent, TwWhat

NS = 1_000_000_000
TIMEWAIT_LEN_S = 60  # TCP_TIMEWAIT_LEN: fixed at 60 s in Linux
REUSE_MATTERS = 0.5  # a destination's TIME_WAIT holding more of its ports makes tcp_tw_reuse matter
TW_MAP_FAILURES = {
    "tws": "tws_failed",
    "tw_pending": "pending_failed",
    "tw_procs": "procs_failed",
    "tw_dests": "dests_failed",
}
"""timewait.bpf.c's maps (none evicts) -> the tw_stats counter of their failed inserts."""


@dataclass(frozen=True, order=True)
class Dest:
    """Where TIME_WAIT sockets hold ports, in one network namespace (``netns``, 0 unknown).

    A socket whose local port connect() chose holds one port of (local ip, remote ip,
    remote port): ``lport`` is 0. A socket with a bound local port (a server's accepted
    connection) is counted by (local ip, local port, remote ip): ``rport`` is 0, since its
    remote ports are the clients' ephemeral ones.
    """

    family: int
    laddr: str
    raddr: str
    rport: int
    lport: int = 0
    netns: int = 0

    @property
    def bound(self) -> bool:
        """The local port was bound (a server's): no port of this host is at stake."""
        return self.lport != 0

    @property
    def remote(self) -> str:
        """``ip:port`` (``[ip]:port`` for IPv6); the bare ip on the bound side."""
        if self.bound:
            return self.raddr
        return f"[{self.raddr}]:{self.rport}" if self.family == 6 else f"{self.raddr}:{self.rport}"

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.raddr).is_loopback
        except ValueError:
            return False


class Remote(NamedTuple):
    """What the by-remote tables group by: the remote endpoint (a bare ip for the bound
    side), the bound local port (0 on the connect() side) and the network namespace."""

    remote: str
    local_port: int = 0
    netns: int = 0


def remote_of(dest: Dest) -> Remote:
    return Remote(dest.remote, dest.lport, dest.netns)


@dataclass(frozen=True)
class ProcCounts:
    created: int = 0
    parked: int = 0
    resets_sent: int = 0
    resets_received: int = 0

    def __add__(self, other: ProcCounts) -> ProcCounts:
        return ProcCounts(
            self.created + other.created,
            self.parked + other.parked,
            self.resets_sent + other.resets_sent,
            self.resets_received + other.resets_received,
        )

    def __sub__(self, other: ProcCounts) -> ProcCounts:
        return ProcCounts(
            self.created - other.created,
            self.parked - other.parked,
            self.resets_sent - other.resets_sent,
            self.resets_received - other.resets_received,
        )


class Proc(NamedTuple):
    """A process as TIME_WAIT is counted by: its pid and its start time (``start_ns``, 0
    unknown), so that a new process that reuses a pid is another key, and its comm."""

    pid: int
    comm: str
    start_ns: int = 0


@dataclass(frozen=True)
class TwCounts:
    """Cumulative counts since the start: from the kernel's maps, or derived from events."""

    immediate: int = 0
    parked: int = 0
    converted_fin: int = 0
    converted_timer: int = 0
    parked_ended: int = 0
    resets_sent: int = 0
    resets_received: int = 0
    killed: int = 0
    """Counted TIME_WAIT sockets that ended before their 60 s (port reuse, SYN, RST)."""
    by_process: Mapping[Proc, ProcCounts] = field(default_factory=dict)
    by_dest: Mapping[Dest, int] = field(default_factory=dict)

    @property
    def created(self) -> int:
        """TIME_WAIT creations: immediate + parked sockets that became TIME_WAIT."""
        return self.immediate + self.converted_fin + self.converted_timer

    @property
    def pending_fin_wait2(self) -> int:
        """Parked FIN_WAIT2 sockets not resolved yet (TIME_WAIT later, or never)."""
        return max(0, self.parked - self.converted_fin - self.converted_timer - self.parked_ended)


def dest_of(event: TimeWaitEvent) -> Dest:
    """The destination a tw's creation counts for, as the kernel keys it (tw_dests)."""
    netns = event.netns or 0
    if event.port_bound:
        return Dest(event.family, event.saddr, event.daddr, 0, event.sport, netns)
    return Dest(event.family, event.saddr, event.daddr, event.dport, 0, netns)


class EventCounts:
    """TwCounts accumulated from TimeWaitEvents (what a replay has instead of kernel maps)."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = dict.fromkeys(
            (
                "immediate",
                "parked",
                "converted_fin",
                "converted_timer",
                "parked_ended",
                "resets_sent",
                "resets_received",
                "killed",
            ),
            0,
        )
        self.by_process: dict[Proc, ProcCounts] = {}
        self.by_dest: dict[Dest, int] = {}

    def _proc(self, event: SocketEvent, delta: ProcCounts) -> None:
        if event.pid is None:
            return
        key = Proc(event.pid, event.comm or "", event.pid_start_ns or 0)
        self.by_process[key] = self.by_process.get(key, ProcCounts()) + delta

    def _created(self, event: TimeWaitEvent) -> None:
        dest = dest_of(event)
        self.by_dest[dest] = self.by_dest.get(dest, 0) + 1
        self._proc(event, ProcCounts(created=1))

    def feed(self, event: SocketEvent) -> None:
        if not isinstance(event, TimeWaitEvent):
            return
        if event.what == TwWhat.CREATED:
            if event.substate == TcpState.TIME_WAIT:
                self.totals["immediate"] += 1
                self._created(event)
            else:
                self.totals["parked"] += 1
                self._proc(event, ProcCounts(parked=1))
        elif event.what == TwWhat.CONVERTED:
            self.totals["converted_timer" if event.how == "timer" else "converted_fin"] += 1
            self._created(event)
        elif event.what == TwWhat.PARKED_ENDED:
            self.totals["parked_ended"] += 1
        elif event.what == TwWhat.RESET_SENT:
            self.totals["resets_sent"] += 1
            self._proc(event, ProcCounts(resets_sent=1))
        elif event.what == TwWhat.RESET_RECEIVED:
            self.totals["resets_received"] += 1
            self._proc(event, ProcCounts(resets_received=1))
        elif event.what == TwWhat.KILLED:
            self.totals["killed"] += 1

    def snapshot(self) -> TwCounts:
        return TwCounts(**self.totals, by_process=dict(self.by_process), by_dest=dict(self.by_dest))


@dataclass(frozen=True)
class HostSample:
    """Host-wide facts read at a tick (live only): /proc/net/sockstat and /proc/net/netstat."""

    tw_now: int | None = None
    """sockstat ``tw``: timewait sockets now, both substates, this network namespace."""
    overflow_total: int | None = None
    """TcpExt TCPTimeWaitOverflow: TIME_WAIT entries skipped because of tcp_max_tw_buckets."""


@dataclass(frozen=True)
class Interval:
    """What one tick reports: the differences over the interval and the totals at its end."""

    start_ns: int
    end_ns: int
    delta: TwCounts
    totals: TwCounts
    host: HostSample | None = None
    overflow: int | None = None
    """TCPTimeWaitOverflow increase over the interval (None when not read)."""

    @property
    def seconds(self) -> float:
        return max(1e-9, (self.end_ns - self.start_ns) / NS)

    @property
    def rate_per_s(self) -> float:
        return self.delta.created / self.seconds


def diff(new: TwCounts, old: TwCounts) -> TwCounts:
    """new - old, keeping only the processes and destinations that changed."""
    procs: dict[Proc, ProcCounts] = {}
    for proc, value in new.by_process.items():
        delta = value - old.by_process.get(proc, ProcCounts())
        if delta != ProcCounts():
            procs[proc] = delta
    dests: dict[Dest, int] = {}
    for dest, count in new.by_dest.items():
        d = count - old.by_dest.get(dest, 0)
        if d:
            dests[dest] = d
    return TwCounts(
        immediate=new.immediate - old.immediate,
        parked=new.parked - old.parked,
        converted_fin=new.converted_fin - old.converted_fin,
        converted_timer=new.converted_timer - old.converted_timer,
        parked_ended=new.parked_ended - old.parked_ended,
        resets_sent=new.resets_sent - old.resets_sent,
        resets_received=new.resets_received - old.resets_received,
        killed=new.killed - old.killed,
        by_process=procs,
        by_dest=dests,
    )


def by_remote(by_dest: Mapping[Dest, int]) -> dict[Remote, int]:
    """Counts by remote endpoint (ip:port; the ip and the local port on the bound side) and
    network namespace, summed over local addresses."""
    out: dict[Remote, int] = {}
    for dest, count in by_dest.items():
        key = remote_of(dest)
        out[key] = out.get(key, 0) + count
    return out


def remote_json(remote: Remote, created: int) -> dict[str, Any]:
    """One by_remote row: ``remote``, ``netns`` (null when unknown), ``local_port`` on the
    bound side (a server's port: ``remote`` is then the client's ip), ``created``."""
    row: dict[str, Any] = {"remote": remote.remote, "netns": remote.netns or None}
    if remote.local_port:
        row["local_port"] = remote.local_port
    row["created"] = created
    return row


@dataclass(frozen=True)
class DestForecast:
    """Port exhaustion arithmetic for one (local ip, remote ip, remote port)."""

    dest: Dest
    rate_per_s: float
    held_now: int
    """TIME_WAIT creations of the last 60 s seen (a lower bound while the run is shorter)."""
    held_steady: float
    """rate x 60 s: what the current rate holds once it lasts 60 s."""
    ports: int
    seconds_to_exhaustion: float | None
    """At the current rate; None when the steady state fits in the range."""
    reuse: bool
    """tcp_tw_reuse lets connect() take ports of TIME_WAIT sockets older than 1 s here."""

    @property
    def utilization(self) -> float:
        return self.held_steady / self.ports if self.ports else 0.0


def forecast_dest(
    dest: Dest, rate_per_s: float, held_now: int, ports: int, tw_reuse: int | None
) -> DestForecast:
    """TIME_WAIT held ~= rate x 60 s, against the ephemeral range, and when it runs out.

    >>> f = forecast_dest(Dest(4, "10.0.0.1", "10.0.0.2", 80), 1000.0, 0, 28232, 0)
    >>> round(f.held_steady), round(f.seconds_to_exhaustion, 1), f.reuse
    (60000, 28.2, False)
    >>> forecast_dest(Dest(4, "10.0.0.1", "10.0.0.2", 80), 100.0, 6000, 28232, 0).seconds_to_exhaustion
    """
    held_steady = rate_per_s * TIMEWAIT_LEN_S
    seconds = None
    if ports > 0 and rate_per_s > 0 and held_steady >= ports:
        seconds = max(0.0, (ports - held_now) / rate_per_s)
    reuse = tw_reuse == 1 or (tw_reuse == 2 and dest.loopback)
    return DestForecast(dest, rate_per_s, held_now, held_steady, ports, seconds, reuse)


@dataclass(frozen=True)
class Advice:
    setting: str
    value: str
    meaning: str
    warn: bool = False


REMEDIES = (
    "Reuse connections: HTTP keep-alive and connection pools make one connection carry many "
    "requests, so TIME_WAIT falls by that factor. The only permanent fix.",
    "On clients: net.ipv4.tcp_tw_reuse=1 (connect() may reuse a port in TIME_WAIT for more than "
    "1 s, needs tcp_timestamps) and a wider net.ipv4.ip_local_port_range.",
    "Never tcp_tw_recycle: it broke clients behind NAT and was removed in Linux 4.12.",
    "SO_LINGER with a 0 timeout skips TIME_WAIT by sending RST: in-flight data is lost and the "
    "peer sees 'connection reset'. SO_REUSEADDR only lets a server re-bind its port; "
    "tcp_fin_timeout governs orphaned FIN_WAIT2, not TIME_WAIT (fixed at 60 s).",
)


def explain_settings(
    port_range: tuple[int, int] | None,
    tw_reuse: int | None,
    max_tw_buckets: int | None,
    fin_timeout: int | None,
    steady_total: float,
    tw_now: int | None,
    rfc1337: int | None = None,
    utilization: float = 0.0,
) -> list[Advice]:
    """Each setting that governs TIME_WAIT, its value here, and what it means at this rate.

    A setting is flagged (``warn``) only when it matters at this rate: tcp_tw_reuse other
    than 1 when a destination's TIME_WAIT would hold more than half its ports
    (``utilization``, the busiest forecast's), never for its default alone.
    """
    out = []
    if port_range is not None:
        ports = port_range[1] - port_range[0] + 1
        out.append(
            Advice(
                "net.ipv4.ip_local_port_range",
                f"{port_range[0]}-{port_range[1]}",
                f"{ports} ephemeral ports per (local ip, remote ip, remote port); "
                "each TIME_WAIT socket of a client holds one for 60 s",
            )
        )
    if tw_reuse is not None:
        meaning = {
            0: "off: connect() never takes a port still in TIME_WAIT",
            1: "on: connect() may reuse a port in TIME_WAIT for more than 1 s (with timestamps)",
            2: "loopback only (the default): connections to other hosts cannot reuse TIME_WAIT ports",
        }.get(tw_reuse, "unknown value")
        pressed = tw_reuse != 1 and utilization > REUSE_MATTERS
        out.append(Advice("net.ipv4.tcp_tw_reuse", str(tw_reuse), meaning, warn=pressed))
    if max_tw_buckets is not None:
        over = steady_total > max_tw_buckets
        meaning = (
            f"at most {max_tw_buckets} timewait sockets; beyond, the kernel skips TIME_WAIT "
            "(TCPTimeWaitOverflow)"
        )
        if over:
            meaning += f": the current rate holds ~{steady_total:.0f}, more than that"
        elif tw_now is not None:
            meaning += f" ({tw_now} now)"
        out.append(Advice("net.ipv4.tcp_max_tw_buckets", str(max_tw_buckets), meaning, warn=over))
    if fin_timeout is not None:
        out.append(
            Advice(
                "net.ipv4.tcp_fin_timeout",
                f"{fin_timeout}s",
                "how long an orphaned FIN_WAIT2 socket waits for the peer's FIN; "
                "it does not shorten TIME_WAIT (always 60 s)",
            )
        )
    if rfc1337 is not None:
        meaning = (
            "TIME_WAIT sockets ignore RSTs and live their 60 s"
            if rfc1337
            else "an RST on its 4-tuple ends a TIME_WAIT socket at once (RFC 1337 "
            "'TIME-WAIT assassination'; counted as ended before its 60 s, JSON ended_early), "
            "e.g. a listener's RST answering a stale ACK"
        )
        out.append(Advice("net.ipv4.tcp_rfc1337", str(rfc1337), meaning))
    return out


class TimewaitModel:
    """Feeds on events, ticks on intervals, keeps the recent history for rates and forecasts."""

    def __init__(self, history: int = 60) -> None:
        self.events = EventCounts()
        self.start_ns: int | None = None
        self.last: TwCounts = TwCounts()
        self.last_ns: int | None = None
        self.intervals: deque[Interval] = deque(maxlen=history)
        # Cumulative by_dest snapshots of the last 60 s, for windowed rates and held counts.
        self._dest_window: deque[tuple[int, Mapping[Dest, int]]] = deque()
        self.overflow_start: int | None = None
        self.host: HostSample | None = None
        self.events_seen = 0

    def start(self, now_ns: int, host: HostSample | None = None) -> None:
        self.start_ns = self.last_ns = now_ns
        self._dest_window.append((now_ns, {}))
        if host is not None:
            self.host = host
            self.overflow_start = host.overflow_total

    def feed(self, event: SocketEvent) -> None:
        if not isinstance(event, TimeWaitEvent):
            return
        self.events_seen += 1
        if self.start_ns is None:  # a replay starts at its first event
            self.start(event.ts_ns)
        self.events.feed(event)

    def tick(self, now_ns: int, kernel: TwCounts | None = None, host: HostSample | None = None) -> Interval:
        """Close the interval ending at ``now_ns``. ``kernel``: exact counts (live), else
        the counts derived from events."""
        if self.start_ns is None:
            self.start(now_ns, host)
        assert self.last_ns is not None
        totals = kernel if kernel is not None else self.events.snapshot()
        overflow = None
        if host is not None:
            if self.overflow_start is None:
                self.overflow_start = host.overflow_total
            prev = self.host.overflow_total if self.host is not None else None
            if host.overflow_total is not None and prev is not None:
                overflow = host.overflow_total - prev
            self.host = host
        interval = Interval(self.last_ns, now_ns, diff(totals, self.last), totals, host, overflow)
        self.intervals.append(interval)
        self.last, self.last_ns = totals, now_ns
        self._dest_window.append((now_ns, dict(totals.by_dest)))
        while len(self._dest_window) > 2 and self._dest_window[1][0] <= now_ns - TIMEWAIT_LEN_S * NS:
            self._dest_window.popleft()
        return interval

    @property
    def totals(self) -> TwCounts:
        return self.last

    @property
    def overflow_total(self) -> int | None:
        if self.host is None or self.host.overflow_total is None or self.overflow_start is None:
            return None
        return self.host.overflow_total - self.overflow_start

    def rates(self) -> list[float]:
        """Creations per second of each recent interval, oldest first."""
        return [i.rate_per_s for i in self.intervals]

    def window(self) -> tuple[float, Mapping[Dest, int], Mapping[Dest, int]]:
        """(seconds, counts at the window start, counts now) of the last <= 60 s."""
        if not self._dest_window:
            return 0.0, {}, {}
        (t0, old), (t1, new) = self._dest_window[0], self._dest_window[-1]
        return (t1 - t0) / NS, old, new

    def forecasts(self, ports: int, tw_reuse: int | None, top: int = 5) -> list[DestForecast]:
        """The destinations with the highest creation rate over the last <= 60 s."""
        seconds, old, new = self.window()
        if seconds <= 0:
            return []
        rows = []
        for dest, count in new.items():
            held = count - old.get(dest, 0)
            if held > 0 and not dest.bound:  # the bound side holds no port of this host
                rows.append(forecast_dest(dest, held / seconds, held, ports, tw_reuse))
        rows.sort(key=lambda f: (-f.rate_per_s, f.dest))
        return rows[:top]

    def steady_total(self) -> float:
        """rate x 60 s over every destination (timewait sockets the current rate holds)."""
        seconds, old, new = self.window()
        if seconds <= 0:
            return 0.0
        created = sum(new.values()) - sum(old.values())
        return created / seconds * TIMEWAIT_LEN_S


def top(mapping: Mapping[Any, int], n: int) -> list[tuple[Any, int]]:
    return sorted(mapping.items(), key=lambda kv: (-kv[1], str(kv[0])))[:n]


def process_json(proc: Proc) -> dict[str, Any]:
    """The identity fields of a by_process row: pid, its start time (null when unknown:
    a pid reused by another process is another row), comm."""
    return {"pid": proc.pid, "pid_start_ns": proc.start_ns or None, "comm": proc.comm}


def interval_json(interval: Interval, top_n: int = 20) -> dict[str, Any]:
    """One JSON object per interval: created, rate_per_s, by_process, by_remote, and the rest."""
    d = interval.delta
    procs = sorted(d.by_process.items(), key=lambda kv: (-kv[1].created, kv[0]))[:top_n]
    out: dict[str, Any] = {
        "type": "interval",
        "command": "timewait",
        "ts_ns": interval.end_ns,
        "interval_s": round(interval.seconds, 6),
        "created": d.created,
        "rate_per_s": round(interval.rate_per_s, 3),
        "immediate": d.immediate,
        "converted_at_fin": d.converted_fin,
        "converted_at_timer": d.converted_timer,
        "parked_fin_wait2": d.parked,
        "parked_ended": d.parked_ended,
        "pending_fin_wait2": interval.totals.pending_fin_wait2,
        "resets_sent": d.resets_sent,
        "resets_received": d.resets_received,
        "ended_early": d.killed,
        "by_process": [
            {
                **process_json(proc),
                "created": c.created,
                "rate_per_s": round(c.created / interval.seconds, 3),
                "resets_sent": c.resets_sent,
                "resets_received": c.resets_received,
            }
            for proc, c in procs
        ],
        "by_remote": [
            {**remote_json(remote, count), "rate_per_s": round(count / interval.seconds, 3)}
            for remote, count in top(by_remote(d.by_dest), top_n)
        ],
        "created_total": interval.totals.created,
    }
    if interval.host is not None:
        out["sockstat_tw"] = interval.host.tw_now
        out["tw_overflow"] = interval.overflow
    return out


def totals_json(totals: TwCounts, top_n: int = 50) -> dict[str, Any]:
    """The run's totals, for the summary."""
    procs = sorted(totals.by_process.items(), key=lambda kv: (-kv[1].created, kv[0]))[:top_n]
    return {
        "created_total": totals.created,
        "immediate": totals.immediate,
        "converted_at_fin": totals.converted_fin,
        "converted_at_timer": totals.converted_timer,
        "parked_fin_wait2": totals.parked,
        "parked_ended": totals.parked_ended,
        "pending_fin_wait2": totals.pending_fin_wait2,
        "resets_sent": totals.resets_sent,
        "resets_received": totals.resets_received,
        "ended_early": totals.killed,
        "by_process": [
            {
                **process_json(proc),
                "created": c.created,
                "parked_fin_wait2": c.parked,
                "resets_sent": c.resets_sent,
                "resets_received": c.resets_received,
            }
            for proc, c in procs
        ],
        "by_remote": [remote_json(r, c) for r, c in top(by_remote(totals.by_dest), top_n)],
    }


def forecast_json(f: DestForecast) -> dict[str, Any]:
    return {
        "local": f.dest.laddr,
        "remote": f.dest.remote,
        "netns": f.dest.netns or None,
        "rate_per_s": round(f.rate_per_s, 3),
        "held_last_60s": f.held_now,
        "held_steady": round(f.held_steady, 1),
        "ports": f.ports,
        "utilization": round(f.utilization, 4),
        "seconds_to_exhaustion": None
        if f.seconds_to_exhaustion is None
        else round(f.seconds_to_exhaustion, 1),
        "tw_reuse_applies": f.reuse,
    }
