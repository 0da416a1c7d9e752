"""`tcptrace states`: every TCP state transition, live or from a recording.

``stream_events`` is also what `tcptrace record` writes: the same stream, to a file.

Live, the ring buffer's records go straight to text a batch at a time (model/raw.py for
--json and record, views/states.TransitionRows for the table) and each batch is one write:
the same bytes as the dataclass path (from_raw, the summary, to_json or print_event), which
a replay (--from) still takes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from tcptrace.commands import session
from tcptrace.commands.options import FilterOptions
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import KernelSource, Source, open_source
from tcptrace.model.events import SocketEvent
from tcptrace.model.filters import EventFilter
from tcptrace.model.raw import JsonLines, RawBatches
from tcptrace.model.states import StatesSummary
from tcptrace.recording import JsonLinesWriter, WhoisLines, make_header, summary_flags
from tcptrace.views.common import make_console, use_units
from tcptrace.views.states import TransitionRows, column_titles, print_event, print_lost, print_summary

if TYPE_CHECKING:
    from tcptrace.kernel.stream import KernelStream


def run(
    *,
    filters: FilterOptions,
    interval: float,
    duration: float | None,
    as_json: bool,
    from_file: str | None,
    stacks: bool,
    units: str,
    buffer_pages: int | None,
) -> None:
    flt = filters.event_filter(live=from_file is None)
    use_units(units)
    stream_events("states", flt, from_file, duration, interval, stacks, sys.stdout, as_json, buffer_pages)


@dataclass
class Streamed:
    """What a stream_events run wrote: events and the losses the kernel counted."""

    events: int
    lost: int
    reason: str
    skipped: int = 0
    """Runs of the transition programs the kernel skipped (each may have lost one)."""
    unseen: int = 0
    """Sockets whose last transitions the programs never saw (kernel counter unseen_end)."""


Progress = Callable[[int, int], None]
"""Called at each interval of a live run with the events written and lost so far."""


def stream_events(
    name: str,
    flt: EventFilter,
    from_file: str | None,
    duration: float | None,
    interval: float,
    stacks: bool,
    out: IO[str],
    as_json: bool,
    buffer_pages: int | None = None,
    parts: Sequence[str] = ("lifecycle",),
    defines: dict[str, int] | None = None,
    header: dict[str, Any] | None = None,
    stack_refs: bool = False,
    on_progress: Progress | None = None,
) -> Streamed:
    """What `states` and `record` share: every event out, then the summary.

    ``stack_refs``: each distinct stack written once (a ``stack`` line) and named by its id
    in the events (what `record` writes; recording.py reads both forms).
    """
    console = make_console()
    summary = StatesSummary()
    writer = JsonLinesWriter(out, stack_refs=stack_refs) if as_json else None
    with open_source(
        from_file, flt, parts=parts, stacks=stacks, defines=defines, ringbuf_pages=buffer_pages
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

        fast = _fast_path(source)
        on_batch = None
        if fast is not None:
            stream = fast
            decoder: RawBatches
            if as_json:
                lines = JsonLines(stream.layout, stream.frames, stack_refs=stack_refs)
                # Its own names of cgroups and owners, written into the batches' text.
                lines.names = WhoisLines(whois, JsonLinesWriter(lines)).name
                decoder = lines
            else:
                decoder = TransitionRows(stream.layout, console, source.clock_offset_ns, stream.frames, whois)
            target = out if as_json else console.file

            def on_batch(batch: bytes, deadline: int | None) -> bool:
                events, malformed = decoder.events, decoder.malformed
                text, cut = decoder.feed(batch, deadline)
                if text:
                    target.write(text)
                    target.flush()
                stream.account(decoder.events - events, decoder.malformed - malformed)
                return cut

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
            if on_progress is not None:
                on_progress(decoder.events if fast is not None else summary.events, lost)

        reason = session.run(
            source,
            on_event,
            interval_s=interval,
            duration_s=duration,
            on_tick=on_tick if source.live else None,
            flag=StopFlag(),
            watch_pid=flt.pid if source.live else None,
            on_batch=on_batch,
        )
        if fast is not None:
            summary = decoder.summary()
        counters = source.counters()
        end_ns = source.now_ns()
    lost = int(counters.get("lost", 0))
    if writer is not None:
        writer.write(
            {
                "type": "summary",
                "command": name,
                "stopped": reason,
                "end_ns": end_ns,
                "lost": lost,
                "kernel_transitions": counters.get("transitions"),
                "kernel_events": counters.get("emitted"),
                "skipped_transitions": counters.get("skipped_transitions"),
                "unseen_ends": counters.get("unseen_end"),
                **summary.to_json(),
                **summary_flags(source),
            }
        )
    else:
        print_summary(console, summary, counters, reason)
    skipped = int(counters.get("skipped_transitions") or 0)
    return Streamed(summary.events, lost, reason, skipped, int(counters.get("unseen_end") or 0))


def _fast_path(source: Source) -> KernelStream | None:
    """The stream of a live source, whose raw batches are decoded here (None: a replay)."""
    return source.stream if isinstance(source, KernelSource) else None
