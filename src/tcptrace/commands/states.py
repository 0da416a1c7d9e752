"""`tcptrace states`: every TCP state transition, live or from a recording.

``stream_events`` is also what `tcptrace record` writes: the same stream, to a file.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO, Any

from tcptrace.commands import session
from tcptrace.commands.options import FilterOptions
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import open_source
from tcptrace.model.events import SocketEvent
from tcptrace.model.filters import EventFilter
from tcptrace.model.states import StatesSummary
from tcptrace.recording import JsonLinesWriter, WhoisLines, make_header, summary_flags
from tcptrace.views.common import make_console, use_units
from tcptrace.views.states import column_titles, print_event, print_lost, print_summary


def run(
    *,
    filters: FilterOptions,
    interval: float,
    duration: float | None,
    as_json: bool,
    from_file: str | None,
    stacks: bool,
    units: str,
    ringbuf_pages: int | None,
) -> None:
    flt = filters.event_filter(live=from_file is None)
    use_units(units)
    stream_events("states", flt, from_file, duration, interval, stacks, sys.stdout, as_json, ringbuf_pages)


def stream_events(
    name: str,
    flt: EventFilter,
    from_file: str | None,
    duration: float | None,
    interval: float,
    stacks: bool,
    out: IO[str],
    as_json: bool,
    ringbuf_pages: int | None = None,
    parts: Sequence[str] = ("lifecycle",),
    defines: dict[str, int] | None = None,
    header: dict[str, Any] | None = None,
) -> None:
    """What `states` and `record` share: every event out, then the summary."""
    console = make_console()
    summary = StatesSummary()
    writer = JsonLinesWriter(out) if as_json else None
    with open_source(
        from_file, flt, parts=parts, stacks=stacks, defines=defines, ringbuf_pages=ringbuf_pages
    ) as source:
        whois = source.whois
        tables = WhoisLines(whois, writer) if writer is not None else None
        if writer is not None:
            where = {"host_netns": whois.host_netns}
            writer.write(make_header(name, filter=flt.to_json(), stacks=stacks, **where, **(header or {})))
        else:
            console.print(column_titles(), style="bold", soft_wrap=True)

        def on_event(event: SocketEvent) -> None:
            summary.feed(event)
            if writer is not None and tables is not None:
                tables.before(event)  # the event's cgroup and pid named first (recording.py)
                writer.event(event)
            else:
                print_event(console, event, source.clock_offset_ns, whois)

        lost_seen = 0

        def on_tick(_now_ns: int) -> None:
            # Losses are shown as they happen, not only in the summary.
            nonlocal lost_seen
            lost = int(source.counters().get("lost", 0))
            if lost > lost_seen:
                if writer is not None:
                    writer.write({"type": "lost", "lost": lost, "new": lost - lost_seen})
                else:
                    print_lost(console, lost - lost_seen, lost)
                lost_seen = lost

        reason = session.run(
            source,
            on_event,
            interval_s=interval,
            duration_s=duration,
            on_tick=on_tick if source.live else None,
            flag=StopFlag(),
            watch_pid=flt.pid if source.live else None,
        )

        counters = source.counters()
        end_ns = source.now_ns()
    if writer is not None:
        writer.write(
            {
                "type": "summary",
                "command": name,
                "stopped": reason,
                "end_ns": end_ns,
                "lost": int(counters.get("lost", 0)),
                "kernel_transitions": counters.get("transitions"),
                "skipped_transitions": counters.get("skipped_transitions"),
                **summary.to_json(),
                **summary_flags(source),
            }
        )
    else:
        print_summary(make_console(stderr=True), summary, counters, reason)
