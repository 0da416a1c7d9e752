"""`tcptrace closewait`: the kernel (or a recording) into the CLOSE_WAIT tracker and its views.

The analysis is model/closewait.py. Live, sockets already in CLOSE_WAIT are read from /proc
once the programs are attached, /proc is compared with the tracker every --recheck seconds
(to repair a transition the kernel skipped), and with --touch-stacks each socket's last
send/recv before the FIN is read from the kernel's map. Leak suspects lead with the frame of
the application's code they are attributed to (commands/attribution.py).
"""

from __future__ import annotations

import sys
from typing import Any

from tcptrace.commands import session
from tcptrace.commands.attribution import SuspectNames
from tcptrace.commands.options import FilterOptions, FrameRuleOptions, threshold_ns
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import KernelSource, Source, drain_into, open_source
from tcptrace.kernel.stream import Symbolizer
from tcptrace.kernel.touches import LastTouches
from tcptrace.model.attribution import Attributor, group_json
from tcptrace.model.closewait import CloseWaitTracker, Interval
from tcptrace.model.filters import EventFilter
from tcptrace.model.workload import Whois, whois_json
from tcptrace.recording import JsonLinesWriter, make_header, summary_flags
from tcptrace.system.procfd import closewait_ports, closewait_snapshot
from tcptrace.views import closewait as view
from tcptrace.views.common import make_console, stamped, start_live, use_units

PARTS = ("lifecycle", "owner")


def run(
    *,
    filters: FilterOptions,
    interval: float,
    duration: float | None,
    as_json: bool,
    from_file: str | None,
    threshold: float,
    recheck: float,
    touch_stacks: bool,
    stacks: bool,
    frame_rules: FrameRuleOptions,
    units: str,
    timestamps: bool,
) -> None:
    """Trace (or replay) until stopped, refreshing every --interval; then the summary."""
    flt = filters.event_filter(live=from_file is None)
    names = SuspectNames(frame_rules.rules(), live=from_file is None)
    use_units(units)
    tracker = CloseWaitTracker(threshold_ns=threshold_ns(threshold))
    out = sys.stdout
    writer = JsonLinesWriter(out) if as_json else None
    console = make_console(file=out)
    with open_source(
        from_file, flt, parts=PARTS, stacks=True, defines=program_defines(touch_stacks), lines=names.lines
    ) as source:
        last_touches = None
        if touch_stacks and isinstance(source, KernelSource):
            last_touches = LastTouches(source.program, Symbolizer(source.program, lines=names.lines))
        preexisting = 0
        if source.live:
            # After attaching, so a socket entering CLOSE_WAIT meanwhile is seen one way or
            # the other (the tracker keeps one copy).
            preexisting = tracker.add_preexisting(closewait_snapshot(flt), source.now_ns())
        tracker.begin_interval(source.now_ns())
        if writer is not None:
            writer.write(
                make_header(
                    "closewait",
                    filter=flt.to_json(),
                    threshold_s=tracker.threshold_ns / 1e9,
                    preexisting=preexisting,
                )
            )
        live_view = None
        if writer is None and console.is_terminal and source.live:
            live_view = start_live(console, view.render(tracker, source.now_ns()), transient=True)
        refresh = Refresh(source, flt, tracker, last_touches, recheck)

        def on_tick(now_ns: int) -> None:
            done = refresh.tick(now_ns)
            if writer is not None:
                writer.write(tracker.periodic_json(now_ns, done))
            elif live_view is not None:
                names.refresh(tracker, now_ns)
                shown = view.render(tracker, now_ns, done, source.whois, names.attributor, stacks)
                live_view.update(shown, refresh=True)
            elif source.live:
                line = view.headline(tracker, now_ns, done)
                console.print(stamped(line, now_ns, source.clock_offset_ns, timestamps), soft_wrap=True)

        try:
            reason = session.run(
                source,
                tracker.feed,
                interval_s=interval,
                duration_s=duration,
                on_tick=on_tick,
                flag=StopFlag(),
                watch_pid=flt.pid if source.live else None,
            )
        finally:
            if live_view is not None:
                live_view.stop()
        refresh.look_up_pre_fin()
        # (skipped_transitions: runs of the transition hooks the kernel skipped, for any
        # socket of the host: an upper bound on transitions of ours not seen)
        counters = dict(source.counters())
        now_ns = source.now_ns()
        names.refresh(tracker, now_ns)  # while the traced processes live
    if writer is not None:
        summary = summary_json(tracker, now_ns, counters, reason, source.whois, names.attributor)
        writer.write({**summary, **summary_flags(source)})
    else:
        view.print_summary(console, tracker, now_ns, counters, reason, source.whois, names.attributor, stacks)
    names.close()


def program_defines(touch_stacks: bool) -> dict[str, int]:
    """Stacks where a process acts, transition events only for CLOSE_WAIT, and with
    --touch-stacks the last send/recv of every socket kept in the kernel."""
    defines = {"TT_PROC_STACKS_ONLY": 1, "TT_CLOSEWAIT_EVENTS": 1}
    if touch_stacks:
        defines["TT_TOUCH_STACKS"] = 1
    return defines


class Refresh:
    """What each interval does to the tracker before it is shown: compare with /proc every
    --recheck seconds (live), and look up the last touches before the FIN."""

    def __init__(
        self,
        source: Source,
        flt: EventFilter,
        tracker: CloseWaitTracker,
        last_touches: LastTouches | None,
        recheck_s: float,
    ) -> None:
        self.source = source
        self.flt = flt
        self.tracker = tracker
        self.last_touches = last_touches
        self.recheck_ns = int(recheck_s * 1e9)
        self.next_recheck_ns = source.now_ns() + self.recheck_ns

    def tick(self, now_ns: int) -> Interval | None:
        """Ends the interval at ``now_ns``; returns it."""
        if self.source.live and self.recheck_ns and now_ns >= self.next_recheck_ns:
            self.heal()
            self.next_recheck_ns = now_ns + self.recheck_ns
        self.look_up_pre_fin()
        return self.tracker.begin_interval(now_ns)

    def look_up_pre_fin(self) -> None:
        """The kernel keeps each socket's last send/recv; read it once the socket is in
        CLOSE_WAIT (the model rejects what belonged to an earlier socket)."""
        if self.last_touches is not None:
            for skaddr in self.tracker.pending_pre_fin():
                self.tracker.add_pre_fin_touch(skaddr, self.last_touches.get(skaddr))

    def heal(self) -> None:
        """/proc first, then every event up to it, then compare (see CloseWaitTracker)."""
        tracker, flt = self.tracker, self.flt
        snapshot_ns = self.source.now_ns()
        in_close_wait = closewait_ports(flt)
        drain_into(self.source, tracker.feed)
        tracker.drop_gone(in_close_wait, snapshot_ns)
        missing = tracker.unexplained(in_close_wait, snapshot_ns)
        if missing:
            tracker.add_found(closewait_snapshot(flt, only=missing), snapshot_ns)


def summary_json(
    tracker: CloseWaitTracker,
    now_ns: int,
    counters: dict[str, int],
    reason: str,
    whois: Whois,
    attributor: Attributor | None = None,
) -> dict[str, Any]:
    """The final summary; each group of leak suspects leads with what it is attributed to."""
    summary = tracker.summary_json(now_ns)
    attribute = attributor or Attributor()
    groups = tracker.suspects(now_ns)
    summary["groups"] = [group_json(g, attribute(g)) for g in groups]
    # Who owners are in container terms: live from the host, in a replay from the recording.
    for item, group in zip(summary["groups"], groups, strict=True):
        _add_whois(item, whois_json(whois, group.pid, group.cgroup))
    for item, sock in zip(summary["sockets"], tracker.open_sockets(), strict=True):
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
