"""`tcptrace closewait`: the kernel's CLOSE_WAIT aggregates (or a recording) into the model
and its views.

The kernel counts entries, closes, resets and the time to close, per owner too, and keeps
the sockets in CLOSE_WAIT now with their code paths (bpf/closewait.bpf.h): nothing crosses
the ring buffer for a healthy connection, and every --interval the maps are read
(kernel/cwreader.py) into the model (model/closewait.CloseWaitModel), so the cost does not
grow with the connection rate. Sockets already in CLOSE_WAIT at start come from the
session's snapshot of every network namespace (their owners were seeded into the kernel),
and the kernel is compared with /proc every --recheck seconds. A recording replays through
the same model: model/cwagg.Emulator aggregates its events as the kernel would.
Leak suspects lead with the frame of the application's code they are attributed to
(commands/attribution.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

from tcptrace.commands import session
from tcptrace.commands.attribution import SuspectNames
from tcptrace.commands.options import FilterOptions, FrameRuleOptions, threshold_ns
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import KernelSource, open_source
from tcptrace.model.attribution import Attributor, group_json
from tcptrace.model.closewait import CloseWaitModel, Interval
from tcptrace.model.cwagg import Emulator
from tcptrace.model.events import SocketEvent
from tcptrace.model.filters import EventFilter
from tcptrace.model.workload import Whois, whois_json
from tcptrace.recording import JsonLinesWriter, make_header, summary_flags
from tcptrace.views import closewait as view
from tcptrace.views.common import make_console, stamped, start_live, use_units

PARTS = ("lifecycle", "owner")


def touch_stacks_default(flt: EventFilter) -> bool:
    """The last send/recv before the FIN is kept by default when --pid or --port narrows
    what is traced (a user stack per send/recv of the sockets traced; docs/closewait.md).

    >>> touch_stacks_default(EventFilter()), touch_stacks_default(EventFilter(ports=frozenset({80})))
    (False, True)
    """
    return bool(flt.pids) or bool(flt.all_ports)


def program_defines(touch_stacks: bool) -> dict[str, int]:
    """CLOSE_WAIT aggregated in the kernel, with the last send/recv before the FIN kept in
    each socket's entry when ``touch_stacks``."""
    defines = {"TT_CW_AGG": 1}
    if touch_stacks:
        defines["TT_TOUCH_STACKS"] = 1
    return defines


class Feed(Protocol):
    def refresh(self, now_ns: int) -> None:
        """Read what the kernel (or the emulation) holds now into the model."""


class Replay:
    """A recording into the model: its events through the emulated kernel aggregation."""

    def __init__(self, model: CloseWaitModel) -> None:
        self.model = model
        self.emulator = Emulator()

    def feed(self, event: SocketEvent) -> None:
        self.emulator.feed(event)

    def refresh(self, now_ns: int) -> None:
        self.model.apply(self.emulator.snapshot(now_ns))


def run(
    *,
    filters: FilterOptions,
    interval: float,
    duration: float | None,
    as_json: bool,
    from_file: str | None,
    threshold: float,
    recheck: float,
    touch_stacks: bool | None,
    stacks: bool,
    frame_rules: FrameRuleOptions,
    units: str,
    timestamps: bool,
) -> None:
    """Trace (or replay) until stopped, refreshing every --interval; then the summary."""
    flt = filters.event_filter(live=from_file is None)
    names = SuspectNames(frame_rules.rules(), live=from_file is None)
    use_units(units)
    touch = touch_stacks_default(flt) if touch_stacks is None else touch_stacks
    model = CloseWaitModel(threshold_ns=threshold_ns(threshold))
    out = sys.stdout
    writer = JsonLinesWriter(out) if as_json else None
    console = make_console(file=out)
    with open_source(
        from_file, flt, parts=PARTS, stacks=True, defines=program_defines(touch), lines=names.lines
    ) as source:
        preexisting = 0
        feed: Feed
        on_event: Callable[[SocketEvent], None]
        if isinstance(source, KernelSource):
            from tcptrace.kernel.cwreader import LiveCloseWait

            live = LiveCloseWait(source.program, model, flt, recheck, source.seeding, names.lines)
            preexisting = live.add_preexisting()
            feed, on_event = live, _nothing
        else:
            replay = Replay(model)
            feed, on_event = replay, replay.feed
        feed.refresh(source.now_ns())
        model.begin_interval(source.now_ns())
        if writer is not None:
            writer.write(
                make_header(
                    "closewait",
                    filter=flt.to_json(),
                    threshold_s=model.threshold_ns / 1e9,
                    preexisting=preexisting,
                    touch_stacks=touch,
                )
            )
        live_view = None
        if writer is None and console.is_terminal and source.live:
            live_view = start_live(console, view.render(model, source.now_ns()), transient=True)

        def on_tick(now_ns: int) -> None:
            feed.refresh(now_ns)
            done: Interval | None = model.begin_interval(now_ns)
            if writer is not None:
                writer.write(model.periodic_json(now_ns, done))
            elif live_view is not None:
                names.refresh(model, now_ns)
                shown = view.render(model, now_ns, done, source.whois, names.attributor, stacks)
                live_view.update(shown, refresh=True)
            elif source.live:
                line = view.headline(model, now_ns, done)
                console.print(stamped(line, now_ns, source.clock_offset_ns, timestamps), soft_wrap=True)

        try:
            reason = session.run(
                source,
                on_event,
                interval_s=interval,
                duration_s=duration,
                on_tick=on_tick,
                flag=StopFlag(),
                watch_pid=flt.pid if source.live else None,
            )
        finally:
            if live_view is not None:
                live_view.stop()
        now_ns = source.now_ns()
        feed.refresh(now_ns)
        model.suspects(now_ns)  # resolves their stacks while the stack map is there
        names.refresh(model, now_ns)  # while the traced processes live
        # (skipped_transitions: runs of the transition hooks the kernel skipped, for any
        # socket of the host: an upper bound on transitions of ours not seen by either copy)
        counters = dict(source.counters())
    if writer is not None:
        summary = summary_json(model, now_ns, counters, reason, source.whois, names.attributor)
        writer.write({**summary, **summary_flags(source)})
    else:
        view.print_summary(console, model, now_ns, counters, reason, source.whois, names.attributor, stacks)
    names.close()


def _nothing(_event: SocketEvent) -> None:
    """Live, nothing crosses the ring buffer for closewait."""


def summary_json(
    model: CloseWaitModel,
    now_ns: int,
    counters: dict[str, int],
    reason: str,
    whois: Whois,
    attributor: Attributor | None = None,
) -> dict[str, Any]:
    """The final summary; each group of leak suspects leads with what it is attributed to."""
    summary = model.summary_json(now_ns)
    attribute = attributor or Attributor()
    groups = model.suspects(now_ns)
    summary["groups"] = [group_json(g, attribute(g)) for g in groups]
    # Who owners are in container terms: live from the host, in a replay from the recording.
    for item, group in zip(summary["groups"], groups, strict=True):
        _add_whois(item, whois_json(whois, group.pid, group.cgroup))
    for item, sock in zip(summary["sockets"], model.open_sockets(), strict=True):
        _add_whois(item, whois_json(whois, sock.pid, sock.cgroup, sock.netns))
    return {
        "type": "summary",
        "command": "closewait",
        "stopped": reason,
        "lost": int(counters.get("lost", 0)),
        "stack_failed": int(counters.get("stack_failed", 0)),
        "events": int(counters.get("decoded", 0)),
        "skipped_transitions": counters.get("skipped_transitions"),
        **summary,
    }


def _add_whois(item: dict[str, Any], extra: dict[str, Any]) -> None:
    item.update(extra)
    if "workload" in extra:
        item["cgroup_path"] = extra["workload"]["cgroup_path"]
