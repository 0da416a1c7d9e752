"""`tcptrace timewait` wired together: a source (kernel or recording), the model, the view.

Live, the kernel's exact counters (bpf/timewait.bpf.c) are read at every tick and the model
takes differences; the event stream carries each tw socket's attribution for --events and
replays. From a recording (``--from``, written with ``--json --events``), the same model
derives the counts from the recorded events.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import IO, Any

from tcptrace.commands import session
from tcptrace.commands.options import FilterOptions
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import KernelSource, RecordingSource, Source
from tcptrace.errors import UsageError
from tcptrace.model.events import SocketEvent, TimeWaitEvent
from tcptrace.model.filters import EventFilter
from tcptrace.model.timewait import (
    REMEDIES,
    HostSample,
    Interval,
    TimewaitModel,
    explain_settings,
    forecast_json,
    interval_json,
    totals_json,
)
from tcptrace.recording import JsonLinesWriter, make_header, open_recording
from tcptrace.system.sysctl import TcpSettings, read_settings
from tcptrace.views.common import make_console

NS = 1_000_000_000


def host_sample() -> HostSample:
    """sockstat tw and TCPTimeWaitOverflow now; None for what cannot be read."""
    from tcptrace.system.netstat import ProcNetError, sockstat_tw, tcpext

    try:
        tw: int | None = sockstat_tw()
    except ProcNetError:
        tw = None
    try:
        overflow: int | None = tcpext().get("TCPTimeWaitOverflow")
    except ProcNetError:
        overflow = None
    return HostSample(tw, overflow)


def settings_to_json(settings: TcpSettings) -> dict[str, Any]:
    """The settings as a recording's header carries them (see settings_from_header)."""
    return {
        **dataclasses.asdict(settings),
        "port_range": list(settings.port_range) if settings.port_range else None,
    }


def settings_from_header(header: dict[str, Any]) -> TcpSettings:
    raw = header.get("settings")
    if not isinstance(raw, dict):
        return TcpSettings()
    names = {f.name for f in dataclasses.fields(TcpSettings)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            continue
        if key == "port_range":
            ok = isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)
            values[key] = (value[0], value[1]) if ok else None
        else:
            values[key] = value if isinstance(value, int) else None
    return TcpSettings(**values)


def run(
    *,
    filters: FilterOptions,
    interval: float,
    duration: float | None,
    as_json: bool,
    from_file: str | None,
    events: bool,
) -> None:
    flt = filters.event_filter(live=from_file is None)
    if events and not as_json:
        raise UsageError("--events needs --json")
    run_timewait(
        flt,
        from_file=from_file,
        interval_s=interval,
        duration_s=duration,
        as_json=as_json,
        events=events,
        out=sys.stdout,
        filter_json=flt.to_json(),
    )


def run_timewait(
    flt: EventFilter,
    *,
    from_file: str | None,
    interval_s: float,
    duration_s: float | None,
    as_json: bool,
    events: bool,
    out: IO[str],
    filter_json: dict[str, Any],
    top_n: int = 5,
) -> None:
    from tcptrace.views import timewait as view

    model = TimewaitModel()
    console = make_console(file=out)
    writer = JsonLinesWriter(out) if as_json else None
    reader: Any = None
    program: Any = None
    source: Source
    if from_file is not None:
        recording = open_recording(from_file)
        settings = settings_from_header(recording.header)
        source = RecordingSource(recording, flt)
    else:
        from tcptrace.kernel.loader import PARTS, load
        from tcptrace.kernel.stream import KernelStream
        from tcptrace.kernel.timewait import TimewaitReader

        settings = read_settings()
        status = make_console(stderr=True)
        with status.status("compiling and attaching BPF programs…"):
            # timewait.bpf.c keeps its own owner table: no lifecycle part needed.
            program = load([PARTS["timewait"]], flt)
        try:
            stream = KernelStream(program, flt)
            reader = TimewaitReader(program)
        except Exception:
            program.close()
            raise
        source = KernelSource(stream)
        model.start(source.now_ns(), host_sample())

    ports = settings.ports or 0

    def context() -> view.Context:
        forecasts = model.forecasts(ports, settings.tw_reuse, top=top_n) if ports else []
        advice = explain_settings(
            settings.port_range,
            settings.tw_reuse,
            settings.max_tw_buckets,
            settings.fin_timeout,
            model.steady_total(),
            model.host.tw_now if model.host is not None else None,
            settings.rfc1337,
        )
        return view.Context(ports or None, advice, forecasts)

    def tick(now_ns: int) -> Interval:
        if reader is not None:
            return model.tick(now_ns, reader.counts(), host_sample())
        return model.tick(now_ns)

    try:
        if writer is not None:
            writer.write(
                make_header(
                    "timewait",
                    filter=filter_json,
                    interval_s=interval_s,
                    events=events,
                    settings=settings_to_json(settings),
                )
            )
        live_view = None
        if writer is None and console.is_terminal and source.live:
            from tcptrace.views.common import start_live

            live_view = start_live(console, view.render(model, None, context()))

        def on_event(event: SocketEvent) -> None:
            model.feed(event)
            if writer is not None and events and isinstance(event, TimeWaitEvent):
                writer.event(event)

        def on_tick(now_ns: int) -> None:
            # Live, the interval ends when the kernel's counters are read, which is later
            # than the scheduled tick when the loop was held up (a slow reader of --json).
            interval = tick(max(now_ns, source.now_ns()) if source.live else now_ns)
            if writer is not None:
                obj = interval_json(interval)
                obj["forecast"] = [forecast_json(f) for f in context().forecasts]
                writer.write(obj)
            elif live_view is not None:
                live_view.update(view.render(model, interval, context()), refresh=True)
            elif interval.seconds >= interval_s / 2 or interval.delta.created or interval.delta.resets_sent:
                # (the last, partial interval only when something happened in it)
                console.print(view.headline(interval, model.totals), soft_wrap=True)

        try:
            reason = session.run(
                source,
                on_event,
                interval_s=interval_s,
                duration_s=duration_s,
                on_tick=on_tick,
                flag=StopFlag(),
            )
        finally:
            if live_view is not None:
                live_view.stop()
        now_ns = source.now_ns()
        if model.last_ns is not None and now_ns > model.last_ns:
            on_tick(now_ns)  # the last, partial interval: totals then include everything
        counters = source.counters()
        kernel_stats = reader.stats() if reader is not None else None
        skipped = None
        if program is not None:
            skipped = program.skipped_runs()
    finally:
        source.close()

    seconds = (model.last_ns - model.start_ns) / NS if model.start_ns and model.last_ns else 0.0
    ctx = context()
    if writer is not None:
        summary: dict[str, Any] = {
            "type": "summary",
            "command": "timewait",
            "stopped": reason,
            "duration_s": round(seconds, 3),
            "lost": int(counters.get("lost", 0)),
            "rate_per_s": round(model.totals.created / seconds, 3) if seconds > 0 else 0.0,
            **totals_json(model.totals),
            "events_created": model.events.snapshot().created,
            "tw_overflow": model.overflow_total,
            "forecast": [forecast_json(f) for f in ctx.forecasts],
            "settings": [dataclasses.asdict(a) for a in ctx.advice],
            "remedies": list(REMEDIES),
        }
        if kernel_stats is not None:
            summary["kernel"] = kernel_stats
        if skipped is not None:
            summary["kernel_skipped_runs"] = skipped
        writer.write(summary)
    else:
        view.print_summary(console, model, ctx, counters, reason, seconds)
        missed = sum(skipped.values()) if skipped else 0
        if missed:
            console.print(
                f"  the kernel skipped {missed} runs of tcptrace's programs (an interrupt hit the same "
                f"tracepoint while it ran: {skipped}); most concern other timers, but a count may be "
                "short by up to that many",
                style="yellow",
                soft_wrap=True,
            )
