"""`tcptrace top`: the live dashboard; and what `diagnose` and `demo` share with it: one
program of four parts, the Overview model, and a tick.

Live, one BPF program is compiled from the lifecycle, owner, closelat and timewait parts
(kernel/loader.py inlines them into one translation unit): transitions and CLOSE_WAIT
touches arrive on the event stream; TIME_WAIT creations and close() latency are counted
exactly in the kernel and read at each tick. From a recording (``--from``), the same
Overview model is fed the recorded events (TIME_WAIT counts then come from timewait
events, when the recording has them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tcptrace.commands import session
from tcptrace.commands.attribution import SuspectNames
from tcptrace.commands.options import FilterOptions, FrameRuleOptions, threshold_ns
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import KernelSource, Source, open_source
from tcptrace.errors import TcptraceError
from tcptrace.kernel.closelat import CloseLatencyReader, closelat_defines
from tcptrace.kernel.timewait import TimewaitReader
from tcptrace.model.events import TcpState
from tcptrace.model.filters import EventFilter
from tcptrace.model.overview import Overview
from tcptrace.model.snapshot import HostSnapshot
from tcptrace.system import hostsnap
from tcptrace.system.netstat import sockstat_tw
from tcptrace.views import top as view
from tcptrace.views.common import make_console, start_live, use_units

PARTS = ("lifecycle", "owner", "closelat", "timewait")
RESEED_NS = 10_000_000_000  # top re-reads /proc this often, so a missed transition heals
CLOSE_WAIT_LATE_NS = 1_000_000_000


@dataclass
class Feeds:
    """A source and, live, the readers of the kernel's exact aggregates."""

    source: Source
    timewait: TimewaitReader | None = None
    closelat: CloseLatencyReader | None = None
    host_tw: bool = False
    """Read the host's TIME_WAIT count (sockstat): only when nothing is filtered out."""

    def tick(self, overview: Overview, now_ns: int) -> None:
        """End an interval of ``overview`` at ``now_ns`` with what the kernel counted."""
        tw = self.timewait.counts() if self.timewait is not None else None
        rows = self.closelat.rows() if self.closelat is not None else None
        host_tw = None
        if self.host_tw:
            try:
                host_tw = sockstat_tw()
            except TcptraceError:
                host_tw = None
        lost = int(self.source.counters().get("lost", 0))
        skipped = None
        if isinstance(self.source, KernelSource):
            skipped = self.source.program.skipped_transitions()
        overview.tick(now_ns, tw_counts=tw, closelat_rows=rows, host_tw=host_tw, lost=lost, skipped=skipped)


def program_defines() -> dict[str, int]:
    defines = closelat_defines(CLOSE_WAIT_LATE_NS)
    # Unlike `closelat` and `timewait`, these commands want the transition events.
    defines.pop("TT_NO_TRANSITION_EVENTS", None)
    defines["TT_PROC_STACKS_ONLY"] = 1
    return defines


@contextmanager
def open_feeds(
    from_file: str | None, flt: EventFilter, quiet: bool = False, names: SuspectNames | None = None
) -> Iterator[Feeds]:
    """The live kernel (all four parts, stacks where they attribute) or a recording; with
    ``names``, the stacks' source lines are located as they are symbolized."""
    lines = names.lines if names is not None else None
    with open_source(
        from_file, flt, parts=PARTS, stacks=True, defines=program_defines(), quiet=quiet, lines=lines
    ) as source:
        feeds = Feeds(source)
        if isinstance(source, KernelSource):
            feeds = Feeds(
                source,
                timewait=TimewaitReader(source.program),
                closelat=CloseLatencyReader(source.program),
                host_tw=flt.empty,
            )
        yield feeds


def seed_from_host(overview: Overview, flt: EventFilter) -> HostSnapshot:
    """Seed the model from a /proc snapshot taken after attaching; returns the snapshot."""
    snap = hostsnap.take(flt)
    overview.states.seed((s.state for s in snap.sockets), snap.at_ns)
    overview.start(snap.at_ns)
    overview.closewait.add_preexisting(
        snap.in_state(TcpState.CLOSE_WAIT),
        snap.at_ns,
    )
    return snap


@dataclass
class TopResult:
    reason: str
    overview: Overview
    start: HostSnapshot | None = None
    names: SuspectNames | None = None
    """How the leak suspects were attributed (refreshed at the end, while their owners lived)."""


def _reseed(overview: Overview, flt: EventFilter) -> None:
    """Counts per state from /proc again: what the transitions missed (a skipped run, a
    lost event) stops counting. Owners are read only when a filter needs them."""
    snap = hostsnap.take(flt, owners=flt.by_owner)
    overview.states.seed((s.state for s in snap.sockets), snap.at_ns)


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
    overview = Overview(threshold_ns=threshold_ns)
    overview.closelat.filter = flt
    state = view.TopState(sort=sort, pid=flt.pid)
    flag = flag if flag is not None else StopFlag()
    with open_feeds(from_file, flt, names=names) as feeds:
        source = feeds.source
        live = source.live
        start_snap = None
        if before_start is not None:
            before_start()
        if live:
            start_snap = seed_from_host(overview, flt)
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
                    _reseed(overview, flt)
                if not live or now_ns - last_tick >= interval_s * 1e9:
                    feeds.tick(overview, now_ns)
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
        feeds.tick(overview, source.now_ns())
        names.refresh(overview.closewait, overview.now_ns)  # while the traced processes live
    if not show_live:
        console.print(
            view.render(overview, state, keys=False, attributor=names.attributor, whois=source.whois)
        )
    return TopResult(reason, overview, start_snap, names)
