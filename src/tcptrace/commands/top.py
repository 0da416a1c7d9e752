"""`tcptrace top`: the live dashboard; and what `diagnose` and `demo` share with it: one
program of four parts, the Overview model, and a tick.

Live, one BPF program is compiled from the lifecycle, owner, closelat and timewait parts
(kernel/loader.py inlines them into one translation unit), aggregating in the kernel:
transitions counted by (old, new) state, CLOSE_WAIT (counts, time to close, the sockets
there now with their code paths), TIME_WAIT creations and close() latency. Nothing
crosses the ring buffer, and every tick reads the maps, so the cost does not grow with the
connection rate. Counts per state are a host snapshot at start (and every 10 s) plus
the transitions counted since. From a recording (``--from``), the same Overview model is
fed the recorded events, which it aggregates as the kernel would (model/overview.Emulation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tcptrace.commands import session
from tcptrace.commands.attribution import SuspectNames
from tcptrace.commands.closewait import touch_stacks_default
from tcptrace.commands.options import FilterOptions, FrameRuleOptions, threshold_ns
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import KernelSource, Source, open_source
from tcptrace.errors import TcptraceError
from tcptrace.kernel.closelat import CLOSE_WAIT_NS, LINGER_NS, CloseLatencyReader
from tcptrace.kernel.timewait import TimewaitReader
from tcptrace.model.filters import EventFilter
from tcptrace.model.overview import Emulation, Overview
from tcptrace.model.snapshot import HostSnapshot
from tcptrace.model.timewait import TW_MAP_FAILURES
from tcptrace.system import hostsnap, netns
from tcptrace.system.netns import NetNamespace
from tcptrace.system.netstat import sockstat_tw_all
from tcptrace.views import top as view
from tcptrace.views.common import make_console, start_live, use_units

if TYPE_CHECKING:  # kernel/cwreader imports bcc: only for a live run
    from tcptrace.kernel.cwreader import LiveCloseWait

PARTS = ("lifecycle", "owner", "closelat", "timewait")
RESEED_NS = 10_000_000_000  # top re-reads the host's sockets this often, so a missed transition heals
CLOSE_WAIT_LATE_NS = 1_000_000_000


@dataclass
class Feeds:
    """A source, the model it fills and, live, the readers of the kernel's aggregates."""

    source: Source
    overview: Overview
    closewait: LiveCloseWait | None = None
    """Live: reads the kernel's CLOSE_WAIT aggregates into ``overview.closewait``, and its
    transition counts (``reader.state_moves``)."""
    timewait: TimewaitReader | None = None
    closelat: CloseLatencyReader | None = None
    host_tw: bool = False
    """Read the host's TIME_WAIT count (sockstat, every namespace): only when nothing is
    filtered out."""
    namespaces: list[NetNamespace] | None = None
    """The host's network namespaces, listed at each reseed (a walk of /proc/*/ns/net): what
    the snapshot and, at every tick, the TIME_WAIT count read."""

    def seed(self, flt: EventFilter) -> HostSnapshot | None:
        """Live: the sockets in CLOSE_WAIT before start (from the session's snapshot), counts
        per state from a snapshot of the host's sockets with the kernel's counts read right
        after it, and the model started there; returns that snapshot (None in a replay)."""
        if self.closewait is None:
            return None
        self.closewait.add_preexisting()
        snap = self.reseed(flt, owners=True)
        self.closewait.refresh(self.source.now_ns())
        self.overview.start(snap.at_ns)
        return snap

    def reseed(self, flt: EventFilter, owners: bool = False) -> HostSnapshot:
        """Counts per state from the host's sockets again: what the kernel did not count (a
        skipped run, a socket a filter could not tell then) stops counting. ``owners``: read
        the holders of every socket (else only when a filter needs them)."""
        assert self.closewait is not None
        self.namespaces = netns.namespaces()
        snap = hostsnap.take(flt, owners=owners or flt.by_owner, namespaces=self.namespaces)
        moves = self.closewait.reader.state_moves()
        tw = self.timewait.counts() if self.timewait is not None else None
        self.overview.states.seed((s.state for s in snap.sockets), snap.at_ns, moves, tw)
        return snap

    def tick(self, now_ns: int) -> None:
        """End an interval of the model at ``now_ns`` with what the kernel counted (in a
        replay: with what the emulation aggregated)."""
        moves = None
        if self.closewait is not None:
            self.closewait.refresh(now_ns)  # into overview.closewait
            moves = self.closewait.reader.state_moves()
        tw = tw_failed = None
        if self.timewait is not None:
            self.timewait.sweep_if_due(now_ns)  # as `timewait` does, for a long run
            tw = self.timewait.counts()
            stats = self.timewait.stats()
            tw_failed = {name: stats.get(key, 0) for name, key in TW_MAP_FAILURES.items()}
        rows = self.closelat.rows() if self.closelat is not None else None
        host_tw = None
        if self.host_tw:
            try:
                host_tw = sockstat_tw_all(self.namespaces)
            except TcptraceError:
                host_tw = None
        lost = int(self.source.counters().get("lost", 0))
        skipped = None
        if isinstance(self.source, KernelSource):
            skipped = self.source.program.skipped_transitions()
        self.overview.tick(
            now_ns,
            moves=moves,
            tw_counts=tw,
            closelat_rows=rows,
            host_tw=host_tw,
            lost=lost,
            skipped=skipped,
            tw_failed=tw_failed,
        )


def program_defines(flt: EventFilter) -> dict[str, int]:
    """Everything aggregated in the kernel, no event sent: CLOSE_WAIT (with the last
    send/recv before the FIN when a filter narrows what is traced, as closewait keeps it),
    TIME_WAIT from its counters only, close() latency per (process, call) with the counts of
    the calls flagged (late, lingering, resetting) and no stack per call."""
    defines = {
        "TT_CW_AGG": 1,
        "TT_TW_NO_EVENTS": 1,
        "TT_CL_NO_EVENTS": 1,
        CLOSE_WAIT_NS: CLOSE_WAIT_LATE_NS,
        LINGER_NS: 1_000_000,
    }
    if touch_stacks_default(flt):
        defines["TT_TOUCH_STACKS"] = 1
    return defines


@contextmanager
def open_feeds(
    from_file: str | None,
    flt: EventFilter,
    threshold_ns: int,
    quiet: bool = False,
    names: SuspectNames | None = None,
) -> Iterator[Feeds]:
    """The live kernel (all four parts, stacks where they attribute) or a recording, and
    the model they fill (leak suspects from ``threshold_ns``); with ``names``, the stacks'
    source lines are located as they are symbolized."""
    lines = names.lines if names is not None else None
    with open_source(
        from_file, flt, parts=PARTS, stacks=True, defines=program_defines(flt), quiet=quiet, lines=lines
    ) as source:
        overview = Overview(threshold_ns=threshold_ns, emulation=None if source.live else Emulation())
        overview.closelat.filter = flt
        feeds = Feeds(source, overview)
        if isinstance(source, KernelSource):
            from tcptrace.kernel.cwreader import LiveCloseWait

            feeds.closewait = LiveCloseWait(source.program, overview.closewait, flt, 0, source.seeding, lines)
            feeds.timewait = TimewaitReader(source.program)
            feeds.closelat = CloseLatencyReader(source.program)
            feeds.host_tw = flt.empty
        yield feeds


@dataclass
class TopResult:
    reason: str
    overview: Overview
    start: HostSnapshot | None = None
    names: SuspectNames | None = None
    """How the leak suspects were attributed (refreshed at the end, while their owners lived)."""


def run(
    *,
    filters: FilterOptions,
    interval: float,
    duration: float | None,
    from_file: str | None,
    threshold: float,
    sort: str,
    frame_rules: FrameRuleOptions,
    units: str,
) -> None:
    flt = filters.event_filter(live=from_file is None)
    use_units(units)
    run_top(
        flt,
        from_file=from_file,
        interval_s=interval,
        duration_s=duration,
        threshold_ns=threshold_ns(threshold),
        sort=sort,
        names=SuspectNames(frame_rules.rules(), live=from_file is None),
    )


def run_top(
    flt: EventFilter,
    *,
    from_file: str | None,
    interval_s: float,
    duration_s: float | None,
    threshold_ns: int,
    sort: str = "c",
    before_start: Callable[[], None] | None = None,
    flag: StopFlag | None = None,
    names: SuspectNames | None = None,
) -> TopResult:
    """The live dashboard until q, Ctrl-C, SIGTERM or --duration; then the last screen.

    ``before_start`` runs once the program is attached, before the /proc seed (the demo
    starts its workload there, so that every one of its sockets is seen born). ``names``
    attributes the leak suspects shown (by default: the built-in rules, source lines live).
    """
    names = names if names is not None else SuspectNames(live=from_file is None)
    console = make_console()
    state = view.TopState(sort=sort, pid=flt.pid)
    flag = flag if flag is not None else StopFlag()
    with open_feeds(from_file, flt, threshold_ns, names=names) as feeds:
        source, overview = feeds.source, feeds.overview
        live = source.live
        if before_start is not None:
            before_start()
        start_snap = feeds.seed(flt)
        show_live = live and console.is_terminal
        with view.key_reader() as keys:
            live_view = None
            if show_live:
                live_view = start_live(
                    console,
                    view.render(
                        overview,
                        state,
                        keys=keys is not None,
                        attributor=names.attributor,
                        whois=source.whois,
                    ),
                )
            last_tick = overview.start_ns or 0

            def on_tick(now_ns: int) -> None:
                nonlocal last_tick
                changed = False
                if keys is not None:
                    for key in keys.keys():
                        state.press(key)
                        changed = True
                    if state.quit:
                        flag.set("quit")
                if live and now_ns - (overview.states.seeded_ns or now_ns) >= RESEED_NS:
                    feeds.reseed(flt)
                if not live or now_ns - last_tick >= interval_s * 1e9:
                    feeds.tick(now_ns)
                    last_tick = now_ns
                    changed = True
                    if not show_live and live:
                        console.print(view.headline(overview), soft_wrap=True)
                if changed and live_view is not None:
                    names.refresh(overview.closewait, now_ns)
                    shown = view.render(
                        overview,
                        state,
                        keys=keys is not None,
                        attributor=names.attributor,
                        whois=source.whois,
                    )
                    live_view.update(shown, refresh=True)

            try:
                reason = session.run(
                    source,
                    overview.feed,
                    interval_s=min(interval_s, 0.1) if live else interval_s,
                    duration_s=duration_s,
                    on_tick=on_tick,
                    flag=flag,
                )
            finally:
                if live_view is not None:
                    live_view.stop()
        feeds.tick(source.now_ns())
        names.refresh(overview.closewait, overview.now_ns)  # while the traced processes live
    if not show_live:
        console.print(
            view.render(overview, state, keys=False, attributor=names.attributor, whois=source.whois)
        )
    return TopResult(reason, overview, start_snap, names)
