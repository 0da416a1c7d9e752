"""Verdicts with evidence: the diagnostic workflow of docs/diagnose.md, automated.

An operator's workflow (state distribution, owners of CLOSE_WAIT sockets, grouping by
remote, sockets stuck across two snapshots, TIME_WAIT against the port range, the
settings) is computed here from what a run gathered:

- two host snapshots (/proc/net/tcp{,6} with the owner of each socket's fd), at the start
  and at the end of the window; a replay has none;
- the Overview model, read from the kernel's aggregates through the window (CLOSE_WAIT
  counts, time to close and the sockets there with their code paths, TIME_WAIT creations
  by process and destination, close() latency), or from their emulation on a recording;
- the TCP settings.

``diagnose()`` turns them into a Diagnosis: the facts, and verdicts in plain words, each
with the evidence it rests on. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tcptrace.model.attribution import Attributor, LeakAttribution, RolePath, role_paths
from tcptrace.model.closewait import (
    CloseTimes,
    CloseWaitModel,
    CloseWaitSocket,
    CloseWaitTracker,
    RemoteSummary,
    SuspectGroup,
    post_fin_of,
    pre_fin_of,
    summarize_remotes,
)
from tcptrace.model.endpoint import Owner, OwnerFields
from tcptrace.model.events import Op, TcpState
from tcptrace.model.framerules import Rules
from tcptrace.model.histogram import Log2Histogram
from tcptrace.model.overview import Overview
from tcptrace.model.snapshot import HostSnapshot, HostSocket
from tcptrace.model.timewait import TIMEWAIT_LEN_S, Advice, Dest, DestForecast, TwCounts, explain_settings

NS = 1_000_000_000

# DOMAIN.md's rules of thumb.
CLOSE_WAIT_ALARM = 100
TIME_WAIT_ALARM = 10_000
SLOW_CLOSE_NS = 100_000_000  # a p99 close() above this blocks request handling noticeably
HIGH_UTILIZATION = 0.5

SEVERITIES = ("problem", "warning", "info", "ok")
CloseWaits = CloseWaitModel | CloseWaitTracker
"""Either CLOSE_WAIT model: the kernel's aggregates (top, diagnose), or the event-fed one."""


class Settings(Protocol):
    """The TCP settings a diagnosis explains (system/sysctl.py's TcpSettings)."""

    @property
    def port_range(self) -> tuple[int, int] | None: ...
    @property
    def ports(self) -> int | None: ...
    @property
    def tw_reuse(self) -> int | None: ...
    @property
    def max_tw_buckets(self) -> int | None: ...
    @property
    def fin_timeout(self) -> int | None: ...
    @property
    def rfc1337(self) -> int | None: ...


@dataclass(frozen=True)
class Verdict:
    """One conclusion: how bad, about whom, in plain words, and what it rests on."""

    severity: str
    topic: str
    text: str
    evidence: tuple[str, ...] = ()
    pid: int | None = None
    comm: str | None = None
    functions: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)
    where: dict[str, Any] = field(default_factory=dict)
    """The process in container terms (model/workload.py whois_json: workload, nspid)."""
    where_text: str | None = None
    """The same as one phrase (whois_text), for the views."""

    def to_json(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "topic": self.topic,
            "text": self.text,
            "evidence": list(self.evidence),
            "pid": self.pid,
            "comm": self.comm,
            **self.where,
            "functions": list(self.functions),
            **({"data": self.data} if self.data else {}),
        }


@dataclass(frozen=True)
class OwnerCount(OwnerFields):
    """How many sockets in CLOSE_WAIT one owner holds, and where they point."""

    owner: Owner | None
    count: int
    remotes: RemoteSummary


@dataclass(frozen=True)
class StuckSocket:
    sock: HostSocket
    at_least_s: float


@dataclass
class Diagnosis:
    window_s: float
    start: dict[TcpState, int] | None
    end: dict[TcpState, int] | None
    live_counts: dict[TcpState, int]
    close_wait_owners: list[OwnerCount]
    close_wait_remotes: RemoteSummary
    stuck: list[StuckSocket]
    tw_created: int
    tw_rate: float
    tw_by_process: list[tuple[int, str, int]]
    tw_now: int | None
    ports: int | None
    forecasts: list[DestForecast]
    settings: list[Advice]
    closes: int
    close_p50_ns: int | None
    close_p99_ns: int | None
    close_max_ns: int | None
    lost: int
    verdicts: list[Verdict]
    skipped: int | None = None
    close_wait_entered: int = 0
    close_wait_closed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    """Inserts the kernel's tables refused, by table (Overview.failures)."""
    time_to_close: CloseTimes = CloseTimes()
    """From the peer's FIN to the app's close(), of the sockets closed in the window (the
    kernel's log2 histogram: exact count, minimum and maximum; percentiles within a slot)."""
    tw_server: list[ServerTimeWait] = field(default_factory=list)

    @property
    def worst(self) -> str:
        for sev in SEVERITIES:
            if any(v.severity == sev for v in self.verdicts):
                return sev
        return "ok"

    def to_json(self) -> dict[str, Any]:
        def dist(d: dict[TcpState, int] | None) -> dict[str, int] | None:
            return None if d is None else {s.name: n for s, n in d.items()}

        return {
            "window_s": round(self.window_s, 3),
            "worst": self.worst,
            "verdicts": [v.to_json() for v in self.verdicts],
            "states": {
                "start": dist(self.start),
                "end": dist(self.end),
                "traced": dist(self.live_counts),
            },
            "close_wait": {
                "owners": [
                    {"pid": o.pid, "comm": o.comm, "count": o.count, "remotes": o.remotes.to_json()}
                    for o in self.close_wait_owners
                ],
                "remotes": self.close_wait_remotes.to_json(),
                "stuck": [
                    {
                        "pid": s.sock.pid,
                        "comm": s.sock.comm,
                        "local": f"{s.sock.saddr}:{s.sock.sport}",
                        "remote": f"{s.sock.daddr}:{s.sock.dport}",
                        "at_least_s": round(s.at_least_s, 3),
                    }
                    for s in self.stuck
                ],
                "entered": self.close_wait_entered,
                "closed": self.close_wait_closed,
            },
            "time_wait": {
                "created": self.tw_created,
                "rate_per_s": round(self.tw_rate, 3),
                "now": self.tw_now,
                "ports": self.ports,
                "by_process": [{"pid": p, "comm": c, "created": n} for p, c, n in self.tw_by_process],
                "server_side": [
                    {
                        "port": p.port,
                        "held": p.held,
                        "listeners": [{"pid": o.pid, "comm": o.comm} for o in p.owners],
                    }
                    for p in self.tw_server
                ],
                "forecasts": [
                    {
                        "local": f.dest.laddr,
                        "remote": f.dest.remote,
                        "rate_per_s": round(f.rate_per_s, 3),
                        "held_steady": round(f.held_steady, 1),
                        "ports": f.ports,
                        "utilization": round(f.utilization, 4),
                        "seconds_to_exhaustion": f.seconds_to_exhaustion,
                    }
                    for f in self.forecasts
                ],
            },
            "settings": [
                {"setting": a.setting, "value": a.value, "meaning": a.meaning, "warn": a.warn}
                for a in self.settings
            ],
            "close_latency": {
                "calls": self.closes,
                "p50_ns": self.close_p50_ns,
                "p99_ns": self.close_p99_ns,
                "max_ns": self.close_max_ns,
            },
            "lost": self.lost,
            "skipped": self.skipped,
            "table_failures": self.failures,
        }


def _per_minute(count: int, seconds: float) -> str:
    """How fast sockets leak, in words; a rate only from a window long enough to tell.

    >>> _per_minute(30, 600.0), _per_minute(10, 10.0), _per_minute(3, 0.5)
    ('about 3 sockets a minute', '10 sockets in 10 s (about 60 a minute)', '3 sockets in 0.5 s')
    """
    span = f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds <= 0:
        return f"{count} sockets"
    rate = count / seconds * 60
    rate_text = f"{rate:.0f}" if rate >= 10 else f"{rate:.1f}".removesuffix(".0")
    if seconds >= 60:
        return f"about {rate_text} sockets a minute"
    if seconds >= 5:
        return f"{count} sockets in {span} (about {rate_text} a minute)"
    return f"{count} sockets in {span}"


def _age(ns: int) -> str:
    s = ns / NS
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _owner_text(pid: int | None, comm: str | None) -> str:
    return "an unknown process" if pid is None else f"pid {pid} ({comm or '?'})"


# ---- CLOSE_WAIT -----------------------------------------------------------------------------


LeakKey = tuple[object, ...]


def leak_key(group: SuspectGroup, rules: Rules | None = None) -> LeakKey:
    """What one leak verdict is about: the owner, and each code path as the verdict words it
    (its role, the operation, and the function of the application's frame, else a library's).
    Stacks that differ only below or above that frame (another kernel path into recv(),
    libc's fast and slow paths) are one code path.

    >>> from tcptrace.model.lifecycle import CodePath
    >>> a = CodePath(Op.RECV, 0, 1, kstack=("tcp_recvmsg [kernel]",), ustack=("f+0x1 [app]",))
    >>> b = CodePath(Op.RECV, 0, 1, kstack=("sk_wait_data [kernel]",), ustack=("f+0x9 [app]",))
    >>> def group(path):
    ...     return SuspectGroup(None, None, path, [], 0)
    >>> leak_key(group(a)) == leak_key(group(b))
    True
    """
    words: list[object] = [group.pid, group.comm]
    for p in role_paths(group, rules):
        frame = p.stack.app_frame or p.stack.library_frame
        words.append((p.role, p.path.op.name, p.eof, frame.name if frame is not None else None))
    return tuple(words)


def _counts_towards(sock: CloseWaitSocket, key: LeakKey, rules: Rules | None) -> bool:
    """Whether a socket is of the leak ``key`` names: the same owner and code paths in words;
    one the app has not touched since the FIN (yet) counts too."""
    post_fin = post_fin_of(sock)
    alone = SuspectGroup(
        sock.owner,
        sock.origin,
        sock.last_touch,
        [sock],
        sock.entered_ns,
        pre_fin_touch=pre_fin_of(sock),
        post_fin_touch=post_fin,
    )
    if post_fin is not None:
        return leak_key(alone, rules) == key
    without = tuple(w for w in key if not (isinstance(w, tuple) and w[0] == "post_fin_touch"))
    return leak_key(alone, rules) == without


def merge_groups(groups: Sequence[SuspectGroup], rules: Rules | None = None) -> list[SuspectGroup]:
    """The suspect groups of one (owner, code path) in words, as one group: its origin and
    last touch are those of its largest part. Worst first, as ``suspects`` orders them."""
    parts: dict[LeakKey, list[SuspectGroup]] = {}
    for group in groups:
        parts.setdefault(leak_key(group, rules), []).append(group)
    out = []
    for same in parts.values():
        if len(same) == 1:
            out.append(same[0])
            continue
        main = max(same, key=lambda g: g.count)
        sockets = sorted((s for g in same for s in g.sockets), key=lambda s: s.entered_ns)
        out.append(dataclasses.replace(main, sockets=sockets))
    out.sort(key=lambda g: (-g.count, -g.oldest_age_ns))
    return out


def _leak_head(group: SuspectGroup, new: int, window_s: float) -> str:
    who = _owner_text(group.pid, group.comm)
    if new:
        return f"{who} leaks {_per_minute(new, window_s)} in CLOSE_WAIT"
    if all(s.preexisting for s in group.sockets):
        return (
            f"{who} holds {group.count} sockets in CLOSE_WAIT since before tracing started "
            f"(at least {_age(group.oldest_age_ns)})"
        )
    return f"{who} holds {group.count} sockets in CLOSE_WAIT"


# How a verdict names its code path: the frame of the application's code it is attributed
# to (model/attribution.py), what the app did there, and the runtime's hints.

_PARKED = (
    "look for connections parked and forgotten (a pool, an idle connection never read again) "
    "or an error path that skips close()"
)


def _meaning(source: RolePath, named: LeakAttribution) -> str:
    """What the app did at the frame a verdict leads with, and where to look from there."""
    op = source.path.op.name.lower()
    if source.role == "post_fin_touch":
        if source.eof:
            return "the app read EOF there without closing: look for an error path that skips close()"
        return (
            f"the app last touched them there ({op}), after the peer's FIN, and never read the EOF: {_PARKED}"
        )
    if source.role == "pre_fin_touch":
        did = "sent on" if source.path.op == Op.SEND else "read from"
        then = "read the EOF later without closing" if named.eof else "never read the EOF"
        return (
            f"the app last {did} them there before the peer's FIN and {then}: look for a path after "
            f"this {op} that returns without close() (an error reply, a connection parked in a pool)"
        )
    verb = "connected" if source.path.op == Op.CONNECT else "accepted"
    eof = " (the app read the EOF without closing, where no stack names its code)" if named.eof else ""
    return f"they were {verb} there and no later stack names the application's code{eof}: {_PARKED}"


def _leak_paths(group: SuspectGroup, named: LeakAttribution) -> tuple[str, list[str]]:
    """What the verdict says after its head (the application frame first, or the hints), and
    the evidence its code paths show."""
    source = named.source
    hints = [h.text for h in named.hints]
    if named.frame is not None and source is not None:
        text = f" at {named.frame.label()}: {_meaning(source, named)}"
    elif not named.paths:
        text = ": no code path was seen (the sockets are older than tracing)"
    else:
        said = ["the app read EOF without closing"] if named.eof else []
        said.append(hints.pop(0) if hints else "no function of the application could be named")
        text = f" ({named.scope}): " + "; ".join(said)
    if hints:
        text += ". " + ". ".join(hints)
    evidence = []
    for p in named.paths:
        where = p.where()
        many = f" on {group.eof_seen} of them" if p.eof and group.eof_seen else ""
        evidence.append(f"{p.title} ({p.op_text()}){many}: {where}")
    for h in named.hints:
        if h.evidence:
            evidence.append(f"{h.title}: seen in {', '.join(h.evidence[:3])}")
    if named.paths and named.frame is None and not named.hints:
        evidence.append(
            "their user stacks name no function of the application (only libc, runtime or "
            "unsymbolized frames: a runtime without frame pointers, such as Python before 3.12)"
        )
    return text, evidence


def _leak_verdict(
    group: SuspectGroup,
    window_s: float,
    start_ns: int | None,
    open_now: Iterable[CloseWaitSocket],
    attributor: Attributor,
) -> Verdict:
    # The rate counts every socket of this owner and code path that entered CLOSE_WAIT in
    # the window and is still there, the young ones (below the threshold) too.
    key = leak_key(group, attributor.rules)
    new = [
        s
        for s in open_now
        if not s.preexisting
        and (start_ns is None or s.entered_ns >= start_ns)
        and _counts_towards(s, key, attributor.rules)
    ]
    named = attributor(group)
    remotes = group.remotes
    text, path_evidence = _leak_paths(group, named)
    evidence = [
        f"{group.count} sockets in CLOSE_WAIT longer than the threshold, oldest {_age(group.oldest_age_ns)}",
        f"remotes: {remotes.text()}",
        *path_evidence,
    ]
    if remotes.dominant is not None and remotes.count > 1:
        evidence.append(
            f"one remote dominates ({remotes.dominant}): if it is one client or peer, it may be what "
            "triggers this path"
        )
    lead = named.frame
    functions = [lead.name] if lead is not None else []
    for p in named.paths:
        app = p.stack.app_frame
        if app is not None and app.name not in functions:
            functions.append(app.name)
    origin = named.path("origin")
    return Verdict(
        "problem",
        "close_wait_leak",
        _leak_head(group, len(new), window_s) + text,
        tuple(evidence),
        group.pid,
        group.comm,
        tuple(functions),
        {
            "count": group.count,
            "new_in_window": len(new),
            "per_minute": round(len(new) / window_s * 60, 2) if window_s > 0 else None,
            "eof_seen": group.eof_seen,
            **named.to_json(),
            "origin": origin.to_json() if origin is not None else None,
        },
    )


def leak_verdicts(
    groups: Sequence[SuspectGroup],
    tracker: CloseWaits,
    window_s: float,
    start_ns: int | None,
    attributor: Attributor | None = None,
) -> list[Verdict]:
    """Leaks attributed to an owner and code path (entered CLOSE_WAIT while traced, or found
    at start): one verdict per owner and code path in words (``merge_groups``), each led by
    its application frame."""
    attribute = attributor or Attributor()
    return [_leak_verdict(g, window_s, start_ns, tracker.open.values(), attribute) for g in groups]


def young_verdicts(tracker: CloseWaits, now_ns: int) -> list[Verdict]:
    """Sockets open at the end but younger than the threshold: too early to call."""
    young = [
        s for s in tracker.open.values() if not s.preexisting and s.age_ns(now_ns) < tracker.threshold_ns
    ]
    if not young:
        return []
    eof = sum(1 for s in young if s.eof_ns is not None)
    owners_young = Counter((s.pid, s.comm) for s in young)
    return [
        Verdict(
            "warning" if eof else "info",
            "close_wait_young",
            f"{len(young)} sockets entered CLOSE_WAIT and were still there at the end, for less "
            f"than the threshold ({_age(tracker.threshold_ns)})"
            + (f"; the app had already read EOF on {eof} of them" if eof else "")
            + ": observe longer (--duration) to tell a leak from slow processing",
            tuple(f"{_owner_text(p, c)}: {n}" for (p, c), n in owners_young.most_common(5)),
            data={"count": len(young), "eof_seen": eof},
        )
    ]


def _stuck(start: HostSnapshot, end: HostSnapshot) -> list[StuckSocket]:
    before = {s.key: s for s in start.in_state(TcpState.CLOSE_WAIT)}
    secs = max(0.0, (end.at_ns - start.at_ns) / NS)
    return [StuckSocket(s, secs) for s in end.in_state(TcpState.CLOSE_WAIT) if s.key in before]


def _owners(socks: Iterable[HostSocket]) -> list[OwnerCount]:
    by: dict[Owner | None, list[HostSocket]] = {}
    for s in socks:
        by.setdefault(s.owner, []).append(s)
    out = [OwnerCount(o, len(v), summarize_remotes(x.daddr for x in v)) for o, v in by.items()]
    out.sort(key=lambda o: (-o.count, o.pid or 0))
    return out


def stuck_verdicts(
    stuck: Sequence[StuckSocket], groups: Sequence[SuspectGroup], window_s: float
) -> list[Verdict]:
    """Sockets in CLOSE_WAIT in both snapshots that no leak verdict explains, per owner."""
    attributed = {s.endpoint for g in groups for s in g.sockets}
    unexplained = [st for st in stuck if st.sock.endpoint not in attributed]
    return [
        Verdict(
            "problem",
            "close_wait_stuck",
            f"{_owner_text(owner.pid, owner.comm)} holds {owner.count} sockets in CLOSE_WAIT that were "
            f"there at the start and still are after {window_s:.0f} s: they are stuck, not being "
            "processed; the process never closes them",
            (
                f"present in both /proc snapshots, {window_s:.1f} s apart",
                f"remotes: {owner.remotes.text()}",
            ),
            owner.pid,
            owner.comm,
        )
        for owner in _owners(st.sock for st in unexplained)
    ]


@dataclass(frozen=True)
class CloseWaitAtEnd:
    """The sockets in CLOSE_WAIT of the last snapshot: who holds them, where they point."""

    sockets: list[HostSocket]
    owners: list[OwnerCount]
    remotes: RemoteSummary
    at_start: int | None

    @classmethod
    def of(cls, start: HostSnapshot | None, end: HostSnapshot | None) -> CloseWaitAtEnd:
        socks = end.in_state(TcpState.CLOSE_WAIT) if end is not None else []
        at_start = len(start.in_state(TcpState.CLOSE_WAIT)) if start is not None else None
        return cls(socks, _owners(socks), summarize_remotes(s.daddr for s in socks), at_start)


def close_wait_remote_verdicts(cw: CloseWaitAtEnd) -> list[Verdict]:
    """CLOSE_WAIT as a whole at the end: how many, the rules of thumb, and what the
    remotes say (one peer's doing, or the application's)."""
    if not cw.sockets:
        return []
    remotes = cw.remotes
    grow = f" (was {cw.at_start} at start)" if cw.at_start is not None else ""
    if remotes.dominant is not None and remotes.count > 1:
        meaning = (
            f"one remote dominates ({remotes.text()}): a misbehaving client or peer (or a proxy in "
            "front) sends FINs the app does not follow up"
        )
    elif remotes.distinct > 1:
        meaning = f"{remotes.text()}: not one peer's doing; the application's own error path leaves them open"
    else:
        meaning = remotes.text()
    return [
        Verdict(
            "warning" if len(cw.sockets) > CLOSE_WAIT_ALARM else "info",
            "close_wait_remotes",
            f"{len(cw.sockets)} sockets in CLOSE_WAIT at the end{grow}; {meaning}",
            tuple(f"{_owner_text(o.pid, o.comm)}: {o.count}" for o in cw.owners[:5]),
            data={"count": len(cw.sockets), "start": cw.at_start},
        )
    ]


# ---- TIME_WAIT ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerTimeWait:
    """TIME_WAIT sockets at the end on a port something listens on: a server closed first on
    connections it accepted. Each keeps its client's port, so none takes a port of the
    ephemeral range (nothing to exhaust), however many there are."""

    port: int
    held: int
    """TIME_WAIT sockets on the port in the last snapshot (those of the last 60 s)."""
    owners: tuple[Owner, ...]
    """Who listens on the port."""


def server_time_wait(end: HostSnapshot | None) -> tuple[list[ServerTimeWait], set[Dest]]:
    """Server-side TIME_WAIT by listening port, and those sockets as the model's TIME_WAIT
    destinations (local ip, remote ip, remote port), which are clients' ports, not
    destinations (empty without a snapshot: a replay).

    >>> from tcptrace.model.endpoint import Endpoint
    >>> lst = HostSocket(Endpoint(4, "0.0.0.0", 80, "0.0.0.0", 0), TcpState.LISTEN, 1, Owner(5, "nginx"))
    >>> tw = [HostSocket(Endpoint(4, "10.0.0.1", 80, "10.0.0.9", p), TcpState.TIME_WAIT) for p in (40, 41)]
    >>> out = HostSocket(Endpoint(4, "10.0.0.1", 5000, "10.0.0.2", 443), TcpState.TIME_WAIT)
    >>> ports, dests = server_time_wait(HostSnapshot(0, (lst, *tw, out)))
    >>> [(s.port, s.held, s.owners[0].comm) for s in ports], len(dests)
    ([(80, 2, 'nginx')], 2)
    """
    if end is None:
        return [], set()
    listening: dict[int, list[Owner]] = {}
    for sock in end.in_state(TcpState.LISTEN):
        owners = listening.setdefault(sock.sport, [])
        if sock.owner is not None and sock.owner not in owners:
            owners.append(sock.owner)
    held: Counter[int] = Counter()
    dests: set[Dest] = set()
    for sock in end.in_state(TcpState.TIME_WAIT):
        if sock.sport in listening:
            held[sock.sport] += 1
            dests.add(Dest(sock.family, sock.saddr, sock.daddr, sock.dport))
    ports = [ServerTimeWait(port, n, tuple(listening[port])) for port, n in held.items()]
    ports.sort(key=lambda p: (-p.held, p.port))
    return ports, dests


@dataclass(frozen=True)
class CommGroup:
    """The processes of one name that created TIME_WAIT: a short-lived client run many
    times (each curl a new pid), or a server's workers, is one group."""

    comm: str
    pids: tuple[int, ...]
    """Most creations first."""
    created: int

    def who(self) -> str:
        """
        >>> CommGroup("curl", (11, 12, 13, 14, 15), 9).who()
        '5 processes named curl (pids 11, 12, 13, 14, …)'
        >>> CommGroup("nginx", (7,), 9).who()
        'pid 7 (nginx)'
        """
        if len(self.pids) == 1:
            return _owner_text(self.pids[0], self.comm)
        shown = ", ".join(str(p) for p in self.pids[:4]) + (", …" if len(self.pids) > 4 else "")
        return f"{len(self.pids)} processes named {self.comm or '?'} (pids {shown})"


def by_comm(by_process: Iterable[tuple[int, str, int]]) -> list[CommGroup]:
    """(pid, comm, created) rows as groups by comm, most creations first.

    >>> [(g.comm, g.pids, g.created) for g in by_comm([(1, "curl", 2), (9, "nginx", 5), (2, "curl", 4)])]
    [('curl', (2, 1), 6), ('nginx', (9,), 5)]
    """
    rows: dict[str, list[tuple[int, int]]] = {}
    for pid, comm, n in by_process:
        rows.setdefault(comm, []).append((pid, n))
    out = []
    for comm, procs in rows.items():
        procs.sort(key=lambda pn: (-pn[1], pn[0]))
        out.append(CommGroup(comm, tuple(p for p, _ in procs), sum(n for _, n in procs)))
    out.sort(key=lambda g: (-g.created, g.comm))
    return out


@dataclass(frozen=True)
class TimeWaitFacts:
    """TIME_WAIT over the window: creations, their rate, who made them, the port range."""

    totals: TwCounts
    span_s: float
    """The span the kernel counted over (attach to the last read), as the forecasts."""
    ports: int | None
    forecasts: list[DestForecast]
    """Of client-side destinations only (a server's TIME_WAIT, when known, left out)."""
    by_process: list[tuple[int, str, int]]
    """(pid, comm, created), most first."""
    host_now: int | None
    advice: list[Advice]
    server: list[ServerTimeWait] = field(default_factory=list)
    server_dests: frozenset[Dest] = frozenset()

    @property
    def rate(self) -> float:
        return self.totals.created / self.span_s if self.span_s > 0 else 0.0

    @classmethod
    def of(
        cls, overview: Overview, window_s: float, settings: Settings | None, end: HostSnapshot | None = None
    ) -> TimeWaitFacts:
        tw = overview.timewait
        totals = tw.totals
        span_s = window_s
        if tw.start_ns is not None and tw.last_ns is not None and tw.last_ns > tw.start_ns:
            span_s = (tw.last_ns - tw.start_ns) / NS
        ports = settings.ports if settings is not None else None
        tw_reuse = settings.tw_reuse if settings is not None else None
        by_process = sorted(
            ((proc.pid, proc.comm, n.created) for proc, n in totals.by_process.items() if n.created),
            key=lambda x: (-x[2], x[0]),
        )
        host_now = overview.states.host_tw
        server, server_dests = server_time_wait(end)
        forecasts = tw.forecasts(ports or 0, tw_reuse, top=5 + len(server_dests)) if ports else []
        forecasts = [f for f in forecasts if f.dest not in server_dests][:5]
        advice: list[Advice] = []
        if settings is not None:
            advice = explain_settings(
                settings.port_range,
                settings.tw_reuse,
                settings.max_tw_buckets,
                settings.fin_timeout,
                tw.steady_total(),
                host_now,
                settings.rfc1337,
                max((f.utilization for f in forecasts), default=0.0),
            )
        return cls(
            totals, span_s, ports, forecasts, by_process, host_now, advice, server, frozenset(server_dests)
        )

    def busiest_destination(self) -> str | None:
        """The client-side destination with the most creations (None when there is none)."""
        dests = [(d, n) for d, n in self.totals.by_dest.items() if d not in self.server_dests]
        if not dests:
            return None
        return min(dests, key=lambda dc: (-dc[1], dc[0]))[0].remote


def _time_wait_outlook(worst: DestForecast | None) -> tuple[str, str]:
    """(severity, what it means) of the busiest destination's port forecast."""
    if worst is not None and worst.seconds_to_exhaustion is not None:
        return "problem", (
            f"at this rate {worst.dest.remote} needs ~{worst.held_steady:.0f} ports of {worst.ports}: "
            f"exhaustion ('Cannot assign requested address') in ~{worst.seconds_to_exhaustion:.0f} s; "
            "reuse connections (keep-alive, a pool)"
        )
    if worst is not None and worst.utilization > HIGH_UTILIZATION:
        return "warning", (
            f"at this rate {worst.dest.remote} holds ~{worst.held_steady:.0f} of {worst.ports} ports "
            f"({worst.utilization:.0%}); reuse connections before load grows"
        )
    return "info", "that is protocol behaviour (it closes first), and the port range holds it"


def _server_verdict(group: CommGroup, ports: list[ServerTimeWait], rate: float, tw: TimeWaitFacts) -> Verdict:
    listed = ", ".join(str(p.port) for p in ports[:5])
    held = sum(p.held for p in ports)
    return Verdict(
        "info",
        "time_wait",
        f"{group.who()} creates about {rate:.1f} TIME_WAIT sockets a second ({group.created} in "
        f"{tw.span_s:.0f} s) as a server, on its listening port{'s' if len(ports) > 1 else ''} {listed}: "
        f"it closes first on connections it accepted ({held} in TIME_WAIT there now); a server's "
        "TIME_WAIT sockets keep their clients' ports and take none of the ephemeral range, so "
        "that is protocol behaviour, not port exhaustion",
        tuple(f"port {p.port}: {p.held} in TIME_WAIT at the end, by client port" for p in ports[:5]),
        group.pids[0] if len(group.pids) == 1 else None,
        group.comm,
        data={
            "created": group.created,
            "rate_per_s": round(rate, 3),
            "pids": list(group.pids[:20]),
            "server_ports": [p.port for p in ports],
        },
    )


def time_wait_verdicts(tw: TimeWaitFacts) -> list[Verdict]:
    """Who creates TIME_WAIT, at what rate, against the port range: the three busiest
    process names (a client run as many short-lived processes is one verdict), a server
    closing first apart from clients (grouped by its listening ports; live only, from the
    last snapshot); and the host's count when it alone is alarming."""
    sev, tail = _time_wait_outlook(max(tw.forecasts, key=lambda f: f.utilization, default=None))
    busiest = tw.busiest_destination()
    towards = f", busiest destination {busiest}" if busiest is not None else ""
    warnings = tuple(f"{a.setting} = {a.value}: {a.meaning}" for a in tw.advice if a.warn)
    out = []
    for group in by_comm(tw.by_process)[:3]:
        rate = group.created / tw.span_s if tw.span_s > 0 else 0.0
        ports = [p for p in tw.server if any(o.pid in group.pids for o in p.owners)]
        if ports:
            out.append(_server_verdict(group, ports, rate, tw))
            continue
        out.append(
            Verdict(
                sev,
                "time_wait",
                f"{group.who()} creates about {rate:.1f} TIME_WAIT sockets a second "
                f"({group.created} in {tw.span_s:.0f} s{towards}): {tail}",
                (f"TIME_WAIT held ≈ rate × {TIMEWAIT_LEN_S} s = {rate * TIMEWAIT_LEN_S:.0f}", *warnings),
                group.pids[0] if len(group.pids) == 1 else None,
                group.comm,
                data={"created": group.created, "rate_per_s": round(rate, 3), "pids": list(group.pids[:20])},
            )
        )
    if (
        tw.host_now is not None
        and tw.host_now > TIME_WAIT_ALARM
        and not any(v.severity == "problem" for v in out)
    ):
        out.append(
            Verdict(
                "warning",
                "time_wait_host",
                f"{tw.host_now} timewait sockets on the host: tens of thousands risk port exhaustion",
                ("sockstat tw",),
            )
        )
    return out


# ---- close() latency, losses, health ---------------------------------------------------------


def close_verdicts(hist: Log2Histogram, flags: Counter[str]) -> list[Verdict]:
    """Slow close() calls, and closes that sent a reset."""
    out = []
    p99 = hist.percentile(99) if hist.count else None
    if hist.count and p99 is not None and p99 > SLOW_CLOSE_NS:
        p50 = hist.percentile(50)
        out.append(
            Verdict(
                "warning",
                "close_latency",
                f"close() is slow: p99 {p99 / 1e6:.0f} ms over {hist.count} calls "
                "(SO_LINGER, or a blocking flush of unsent data)",
                (f"p50 {p50 and p50 / 1e6:.2f} ms, max {hist.max_ns / 1e6:.0f} ms",),
            )
        )
    if flags.get("reset"):
        out.append(
            Verdict(
                "warning",
                "close_reset",
                f"{flags['reset']} close() calls sent a reset (unread data, or linger 0): the peer "
                "saw 'connection reset' and data in flight was lost",
                (),
            )
        )
    return out


def loss_verdicts(lost: int, skipped: int | None, failures: dict[str, int] | None = None) -> list[Verdict]:
    """Events the ring buffer lost, hook runs the kernel skipped and inserts its tables
    refused: counts are lower bounds."""
    out = []
    if failures:
        out.append(
            Verdict(
                "warning",
                "table_full",
                f"kernel tables were full ({sum(failures.values())} inserts refused): the counts above "
                "are short by up to that many",
                tuple(f"{name}: {n}" for name, n in failures.items()),
                data=dict(failures),
            )
        )
    if lost:
        out.append(
            Verdict(
                "warning",
                "lost_events",
                f"{lost} events were lost (the ring buffer was full): the counts above are lower bounds",
                (),
            )
        )
    if skipped:
        out.append(
            Verdict(
                "warning",
                "skipped_runs",
                f"the kernel skipped {skipped} runs of the state-transition hook (a softirq "
                "changed a socket's state while another BPF program ran on that CPU): counts of "
                "transitions may be short by up to that many",
                ("bpf_prog_info.recursion_misses, counted for every socket of the host",),
            )
        )
    return out


def healthy_verdicts(verdicts: Sequence[Verdict], tracker: CloseWaits) -> list[Verdict]:
    """ "Healthy", when no other verdict is a problem or a warning."""
    if any(v.severity in ("problem", "warning") for v in verdicts):
        return []
    return [
        Verdict(
            "ok",
            "healthy",
            "no socket leak in CLOSE_WAIT, and TIME_WAIT fits the port range",
            (f"{tracker.entered} sockets entered CLOSE_WAIT, {tracker.closed} were closed by their app",),
        )
    ]


# ---- the diagnosis ---------------------------------------------------------------------------


def diagnose(
    overview: Overview,
    *,
    start: HostSnapshot | None = None,
    end: HostSnapshot | None = None,
    settings: Settings | None = None,
    lost: int = 0,
    attributor: Attributor | None = None,
) -> Diagnosis:
    """The facts of the window and the verdicts they support, worst first (``attributor``:
    the frame rules and owner facts leak verdicts are attributed with)."""
    window_s = overview.elapsed_s
    if start is not None and end is not None:
        window_s = max(window_s, (end.at_ns - start.at_ns) / NS)
    tracker = overview.closewait
    groups = merge_groups(tracker.suspects(overview.now_ns), attributor.rules if attributor else None)
    stuck = _stuck(start, end) if start is not None and end is not None else []
    cw = CloseWaitAtEnd.of(start, end)
    tw = TimeWaitFacts.of(overview, window_s, settings, end)
    hist = overview.close_latency()
    failures = overview.failures()
    verdicts = [
        *leak_verdicts(groups, tracker, window_s, overview.start_ns, attributor),
        *young_verdicts(tracker, overview.now_ns),
        *stuck_verdicts(stuck, groups, window_s),
        *close_wait_remote_verdicts(cw),
        *time_wait_verdicts(tw),
        *close_verdicts(hist, overview.close_flags()),
        *loss_verdicts(lost, overview.skipped, failures),
    ]
    verdicts += healthy_verdicts(verdicts, tracker)
    verdicts.sort(key=lambda v: SEVERITIES.index(v.severity))
    return Diagnosis(
        window_s=window_s,
        start=start.distribution() if start is not None else None,
        end=end.distribution() if end is not None else None,
        live_counts={s: n for s, n in overview.states.rows() if n},
        close_wait_owners=cw.owners,
        close_wait_remotes=cw.remotes,
        stuck=stuck,
        tw_created=tw.totals.created,
        tw_rate=tw.rate,
        tw_by_process=tw.by_process,
        tw_now=tw.host_now,
        ports=tw.ports,
        forecasts=tw.forecasts,
        settings=tw.advice,
        closes=hist.count,
        close_p50_ns=hist.percentile(50) if hist.count else None,
        close_p99_ns=hist.percentile(99) if hist.count else None,
        close_max_ns=hist.max_ns if hist.count else None,
        lost=lost,
        verdicts=verdicts,
        skipped=overview.skipped,
        failures=failures,
        close_wait_entered=tracker.entered,
        close_wait_closed=tracker.closed,
        time_to_close=tracker.close_times(),
        tw_server=tw.server,
    )


__all__ = [
    "Diagnosis",
    "HostSnapshot",
    "HostSocket",
    "OwnerCount",
    "Settings",
    "Verdict",
    "diagnose",
]
