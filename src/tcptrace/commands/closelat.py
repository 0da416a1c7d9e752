"""`tcptrace closelat` wired together: a source (kernel or recording), the model, the view.

Live, the kernel's cumulative histograms are read at every tick and the model turns them
into per-interval (or cumulative) reports; flagged calls arrive on the event stream.
From a recording (``--from``), the reports a ``--json`` run wrote are replayed in file
order, interleaved with the flagged calls, through the same model.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tcptrace.commands import session
from tcptrace.commands.options import FilterOptions
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import KernelSource, RecordingSource, Source
from tcptrace.errors import RecordingError, UsageError
from tcptrace.model.closelat import REPORT_TYPE, CloseLatency, Report
from tcptrace.model.events import SocketEvent
from tcptrace.model.filters import EventFilter
from tcptrace.recording import JsonLinesWriter, make_header, open_recording
from tcptrace.views.common import make_console

NS = 1_000_000_000


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
) -> None:
    flt = filters.event_filter(live=from_file is None)
    if from_file is not None and filters.by_address:
        raise UsageError("--port, -4 and -6 cannot filter recorded histograms; give them when recording")
    run_closelat(
        flt,
        from_file=from_file,
        interval_s=interval,
        duration_s=duration,
        cumulative=cumulative,
        stacks=stacks,
        close_wait_s=close_wait_min,
        as_json=as_json,
        out=sys.stdout,
        filter_json=flt.to_json(),
    )


def run_closelat(
    flt: EventFilter,
    *,
    from_file: str | None,
    interval_s: float,
    duration_s: float | None,
    cumulative: bool,
    stacks: bool,
    close_wait_s: float,
    as_json: bool,
    out: IO[str],
    filter_json: dict[str, Any],
) -> None:
    model = CloseLatency(cumulative=cumulative, flt=flt)
    console = make_console(file=out) if not as_json else make_console()
    writer = JsonLinesWriter(out) if as_json else None
    reader: Any = None
    source: Source

    def emit(report: Report) -> None:
        if writer is not None:
            writer.write(report.to_json())
        else:
            from tcptrace.views.closelat import print_report

            print_report(console, report, source.clock_offset_ns)

    if from_file is not None:
        recording = open_recording(from_file)

        def on_report(obj: dict[str, Any]) -> None:
            try:
                report = model.replay(obj)
            except (KeyError, ValueError, TypeError) as exc:
                raise RecordingError(f"{from_file}: not a valid {REPORT_TYPE} report: {exc}") from None
            if report is not None:
                emit(report)

        recording.on_report = on_report
        source = RecordingSource(recording, flt, batch=1)
    else:
        from tcptrace.kernel.closelat import CloseLatencyReader, closelat_defines
        from tcptrace.kernel.loader import PARTS, load
        from tcptrace.kernel.stream import KernelStream, Symbolizer

        status = make_console(stderr=True)
        with status.status("compiling and attaching BPF programs…"):
            program = load(
                [PARTS["lifecycle"], PARTS["closelat"]],
                flt,
                stacks=stacks,
                defines=closelat_defines(int(close_wait_s * NS)),
            )
        try:
            stream = KernelStream(program, flt, symbolize=stacks)
            reader = CloseLatencyReader(program, Symbolizer(program) if stacks else None)
        except Exception:
            program.close()
            raise
        source = KernelSource(stream)
        model.start(source.now_ns())

    try:
        if writer is not None:
            writer.write(
                make_header(
                    "closelat",
                    filter=filter_json,
                    stacks=stacks,
                    window="cumulative" if cumulative else "interval",
                    interval_s=interval_s,
                    close_wait_s=close_wait_s,
                )
            )

        def on_event(event: SocketEvent) -> None:
            flagged = model.feed(event)
            if flagged is None:
                return
            if writer is not None:
                writer.event(flagged)
            else:
                from tcptrace.views.closelat import print_flag

                print_flag(console, flagged, source.clock_offset_ns)

        def on_tick(ts_ns: int) -> None:
            if reader is not None:
                emit(model.snapshot(ts_ns, reader.rows()))

        flag = StopFlag()
        reason = session.run(
            source,
            on_event,
            interval_s=interval_s,
            duration_s=duration_s,
            on_tick=on_tick if reader is not None else None,
            flag=flag,
        )

        counters = dict(source.counters())
        if reader is not None:
            # The last, partial interval, so that nothing counted goes unreported.
            now = time.monotonic_ns()
            if model.last_ts_ns is None or now > model.last_ts_ns:
                emit(model.snapshot(now, reader.rows()))
            counters.update(reader.counters())
    finally:
        source.close()

    if from_file is not None and model.reports == 0 and model.flagged_total == 0:
        raise RecordingError(
            f"{from_file} holds no close() latency reports",
            hint="record them with `tcptrace closelat --json > FILE`",
        )
    if writer is not None:
        writer.write(
            {
                "type": "summary",
                "command": "closelat",
                "stopped": reason,
                "lost": int(counters.get("lost", 0)),
                "kernel": {k: v for k, v in counters.items() if k not in ("decoded", "malformed")},
                **model.summary_json(),
            }
        )
    else:
        from tcptrace.views.closelat import print_summary

        print_summary(make_console(stderr=True), model, counters, reason, source.clock_offset_ns)
