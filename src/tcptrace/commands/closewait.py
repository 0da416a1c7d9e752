"""`tcptrace closewait`: wiring of the kernel (or a recording), the CLOSE_WAIT tracker and
its views. The analysis is model/closewait.py; the command line is cli.py."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO

from tcptrace.commands import session
from tcptrace.commands.options import FilterOptions, threshold_ns
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import KernelSource, drain_into, open_source
from tcptrace.model.closewait import CloseWaitTracker, Interval
from tcptrace.model.filters import EventFilter
from tcptrace.recording import JsonLinesWriter, make_header
from tcptrace.views import closewait as view
from tcptrace.views.common import make_console


def run(
    *,
    filters: FilterOptions,
    interval: float,
    duration: float | None,
    as_json: bool,
    from_file: str | None,
    threshold: str,
    recheck: float,
    touch_stacks: bool,
) -> None:
    flt = filters.event_filter(live=from_file is None)
    run_closewait(
        flt,
        from_file=from_file,
        interval_s=interval,
        duration_s=duration,
        as_json=as_json,
        threshold_ns=threshold_ns(threshold),
        recheck_s=recheck,
        touch_stacks=touch_stacks,
        out=sys.stdout,
    )


def run_closewait(
    flt: EventFilter,
    *,
    from_file: str | None,
    interval_s: float,
    duration_s: float | None,
    as_json: bool,
    threshold_ns: int,
    recheck_s: float,
    touch_stacks: bool,
    out: IO[str],
) -> None:
    """Trace (or replay) until stopped, refreshing every ``interval_s``; then the summary."""

    tracker = CloseWaitTracker(threshold_ns=threshold_ns)
    writer = JsonLinesWriter(out) if as_json else None
    cgroup_name: Callable[[int], str | None] | None = None
    if from_file is None:  # a recording's cgroup ids belong to its host
        from tcptrace.system.cgroups import path_of_id

        cgroup_name = path_of_id
    console = make_console(file=out)
    defines = {"TT_PROC_STACKS_ONLY": 1, "TT_CLOSEWAIT_EVENTS": 1}
    if touch_stacks:
        defines["TT_TOUCH_STACKS"] = 1
    with open_source(from_file, flt, parts=("lifecycle", "owner"), stacks=True, defines=defines) as source:
        preexisting = 0
        last_touches = None
        if touch_stacks and isinstance(source, KernelSource):
            from tcptrace.kernel.touches import LastTouches

            last_touches = LastTouches(source.stream.program)  # type: ignore[attr-defined]

        def look_up_pre_fin() -> None:
            # The kernel keeps each socket's last send/recv; read it once the socket is
            # in CLOSE_WAIT (the model rejects what belonged to an earlier socket).
            if last_touches is not None:
                for skaddr in tracker.pending_pre_fin():
                    tracker.add_pre_fin_touch(skaddr, last_touches.get(skaddr))

        if source.live:
            from tcptrace.system.procfd import closewait_snapshot

            # After attaching, so a socket entering CLOSE_WAIT meanwhile is seen one way or
            # the other (the tracker keeps one copy).
            preexisting = tracker.add_preexisting(closewait_snapshot(flt), source.now_ns())
        tracker.begin_interval(source.now_ns())
        if writer is not None:
            writer.write(
                make_header(
                    "closewait",
                    filter=flt.to_json(),
                    threshold_s=threshold_ns / 1e9,
                    preexisting=preexisting,
                )
            )
        live_view = None
        if writer is None and console.is_terminal and source.live:
            from tcptrace.views.common import start_live

            live_view = start_live(console, view.render(tracker, source.now_ns()), transient=True)

        recheck_ns = int(recheck_s * 1e9)
        next_recheck = [source.now_ns() + recheck_ns]

        def heal() -> None:
            # /proc first, then every event up to it, then compare (see CloseWaitTracker).
            from tcptrace.system.procfd import closewait_ports, closewait_snapshot

            snapshot_ns = source.now_ns()
            in_close_wait = closewait_ports(flt)
            drain_into(source, tracker.feed)
            tracker.drop_gone(in_close_wait, snapshot_ns)
            missing = tracker.unexplained(in_close_wait, snapshot_ns)
            if missing:
                tracker.add_found(closewait_snapshot(flt, only=missing), snapshot_ns)

        def on_tick(now_ns: int) -> None:
            if source.live and recheck_ns and now_ns >= next_recheck[0]:
                heal()
                next_recheck[0] = now_ns + recheck_ns
            look_up_pre_fin()
            done: Interval | None = tracker.begin_interval(now_ns)
            if writer is not None:
                writer.write(tracker.periodic_json(now_ns, done))
            elif live_view is not None:
                live_view.update(view.render(tracker, now_ns, done, cgroup_name), refresh=True)
            elif source.live:
                console.print(view.headline(tracker, now_ns, done), soft_wrap=True)

        try:
            reason = session.run(
                source,
                tracker.feed,
                interval_s=interval_s,
                duration_s=duration_s,
                on_tick=on_tick,
                flag=StopFlag(),
                watch_pid=flt.pid if source.live else None,
            )
        finally:
            if live_view is not None:
                live_view.stop()
        look_up_pre_fin()
        # (skipped_transitions: runs of the transition hooks the kernel skipped, for any
        # socket of the host: an upper bound on transitions of ours not seen)
        counters = dict(source.counters())
        now_ns = source.now_ns()
    if writer is not None:
        summary = tracker.summary_json(now_ns)
        if cgroup_name is not None:
            for item in (*summary["groups"], *summary["sockets"]):
                if item["cgroup"] is not None:
                    item["cgroup_path"] = cgroup_name(item["cgroup"])
        writer.write(
            {
                "type": "summary",
                "command": "closewait",
                "stopped": reason,
                "lost": int(counters.get("lost", 0)),
                "stack_failed": int(counters.get("stack_failed", 0)),
                "events": int(counters.get("decoded", 0)),
                "skipped_transitions": counters.get("skipped_transitions"),
                **summary,
            }
        )
    else:
        view.print_summary(console, tracker, now_ns, counters, reason, cgroup_name)
