"""`tcptrace closelat`: a source (kernel or recording), the close() latency model, the view.

Live, the kernel's cumulative histograms are read at every tick and the model turns them
into per-interval (or cumulative) reports; flagged calls arrive on the event stream.
From a recording (``--from``), the reports a ``--json`` run wrote are replayed in file
order, interleaved with the flagged calls, through the same model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from tcptrace.commands import session
from tcptrace.commands.options import FilterOptions
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import KernelSource, Source, open_source
from tcptrace.errors import RecordingError, UsageError
from tcptrace.kernel.closelat import CloseLatencyReader, closelat_defines
from tcptrace.kernel.stream import Symbolizer
from tcptrace.model.closelat import REPORT_TYPE, CloseLatency, Report
from tcptrace.model.events import SocketEvent
from tcptrace.recording import JsonLinesWriter, make_header, summary_flags
from tcptrace.views.closelat import print_flag, print_report, print_summary
from tcptrace.views.common import make_console, use_units

NS = 1_000_000_000
PARTS = ("lifecycle", "closelat")


def run(
    *,
    filters: FilterOptions,
    interval: float,
    duration: float | None,
    as_json: bool,
    from_file: str | None,
    cumulative: bool,
    stacks: bool,
    close_wait_min: float,
    units: str,
) -> None:
    """Report every --interval (live) or every recorded report (--from) until stopped, the
    flagged calls as they happen, then the summary."""
    flt = filters.event_filter(live=from_file is None)
    if from_file is not None and (filters.by_address or flt.by_cgroup):
        raise UsageError(
            "--port, -L, -D, -4, -6, --netns, --cgroup and --container cannot filter recorded "
            "histograms; give them when recording"
        )
    use_units(units)
    model = CloseLatency(cumulative=cumulative, flt=flt)
    out = sys.stdout
    console = make_console(file=out) if not as_json else make_console()
    writer = JsonLinesWriter(out) if as_json else None

    def emit(report: Report) -> None:
        if writer is not None:
            writer.write(report.to_json())
        else:
            print_report(console, report, source.clock_offset_ns)

    defines = closelat_defines(int(close_wait_min * NS))
    with open_source(
        from_file,
        flt,
        parts=PARTS,
        stacks=stacks,
        defines=defines,
        on_report=replay_reports(model, emit, from_file or ""),
        batch=1,  # a recorded report is replayed between the events around it
    ) as source:
        reader = kernel_reader(source, model, stacks)
        if writer is not None:
            writer.write(
                make_header(
                    "closelat",
                    filter=flt.to_json(),
                    stacks=stacks,
                    window="cumulative" if cumulative else "interval",
                    interval_s=interval,
                    close_wait_s=close_wait_min,
                )
            )

        def on_event(event: SocketEvent) -> None:
            flagged = model.feed(event)
            if flagged is None:
                return
            if writer is not None:
                writer.event(flagged)
            else:
                print_flag(console, flagged, source.clock_offset_ns)

        def on_tick(ts_ns: int) -> None:
            if reader is not None:
                emit(model.snapshot(ts_ns, reader.rows()))

        reason = session.run(
            source,
            on_event,
            interval_s=interval,
            duration_s=duration,
            on_tick=on_tick if reader is not None else None,
            flag=StopFlag(),
        )

        counters = dict(source.counters())
        if reader is not None:
            # The last, partial interval, so that nothing counted goes unreported.
            now = time.monotonic_ns()
            if model.last_ts_ns is None or now > model.last_ts_ns:
                emit(model.snapshot(now, reader.rows()))
            counters.update(reader.counters())

    if from_file is not None:
        require_reports(model, from_file)
    if writer is not None:
        writer.write({**summary_json(model, counters, reason), **summary_flags(source)})
    else:
        print_summary(console, model, counters, reason, source.clock_offset_ns)


def kernel_reader(source: Source, model: CloseLatency, stacks: bool) -> CloseLatencyReader | None:
    """Live: the reader of the kernel's histograms (per code path with --stacks), and the
    model's clock started; from a recording: None (its reports are replayed)."""
    if not isinstance(source, KernelSource):
        return None
    model.start(source.now_ns())
    return CloseLatencyReader(source.program, Symbolizer(source.program) if stacks else None)


def require_reports(model: CloseLatency, path: str) -> None:
    """A recording without a report or a flagged call is not one of `closelat --json`."""
    if model.reports == 0 and model.flagged_total == 0:
        raise RecordingError(
            f"{path} holds no close() latency reports",
            hint="record them with `tcptrace closelat --json > FILE`",
        )


def replay_reports(
    model: CloseLatency, emit: Callable[[Report], None], path: str
) -> Callable[[dict[str, Any]], None]:
    """What a replay does with each report a `closelat --json` run recorded: through the
    model (per interval or cumulative, filtered), then shown."""

    def on_report(obj: dict[str, Any]) -> None:
        try:
            report = model.replay(obj)
        except (KeyError, ValueError, TypeError) as exc:
            raise RecordingError(f"{path}: not a valid {REPORT_TYPE} report: {exc}") from None
        if report is not None:
            emit(report)

    return on_report


def summary_json(model: CloseLatency, counters: dict[str, int], reason: str) -> dict[str, Any]:
    return {
        "type": "summary",
        "command": "closelat",
        "stopped": reason,
        "lost": int(counters.get("lost", 0)),
        "kernel": {k: v for k, v in counters.items() if k not in ("decoded", "malformed")},
        **model.summary_json(),
    }
