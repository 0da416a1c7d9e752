"""`tcptrace timewait`: a source (kernel or recording), the TIME_WAIT model, the view.

Live, the kernel's exact counters (bpf/timewait.bpf.c) are read at every tick and the model
takes differences: every view and the JSON come from them, so the cost per interval does not
depend on the connection rate. Only ``--events`` makes the kernel send each tw socket's life
on the ring buffer (for a recording); without it nothing of a tw crosses. From a recording
(``--from``, written with ``--json --events``), the same model derives the counts from the
recorded events.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from tcptrace.commands import session
from tcptrace.commands.options import FilterOptions
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import KernelSource, RecordingSource, Source, open_source
from tcptrace.errors import UsageError
from tcptrace.kernel.loader import LoadedProgram
from tcptrace.kernel.timewait import TimewaitReader
from tcptrace.model.events import SocketEvent, TimeWaitEvent
from tcptrace.model.timewait import (
    REMEDIES,
    TW_MAP_FAILURES,
    HostSample,
    Interval,
    TimewaitModel,
    explain_settings,
    forecast_json,
    interval_json,
    totals_json,
)
from tcptrace.recording import JsonLinesWriter, make_header, summary_flags
from tcptrace.system.netstat import ProcNetError, sockstat_tw, tcpext
from tcptrace.system.sysctl import TcpSettings, read_settings, settings_from_header
from tcptrace.views import timewait as view
from tcptrace.views.common import make_console, stamped, start_live

NS = 1_000_000_000
# Owners come from the socket table: the loader adds its writer (SOCKET_OWNERS) by itself.
PARTS = ("timewait",)
TOP_N = 5  # destinations forecast
NO_EVENTS = {"TT_TW_NO_EVENTS": 1}
"""Compiles the ring-buffer events of timewait.bpf.c out: counting needs only the maps."""


def host_sample() -> HostSample:
    """sockstat tw and TCPTimeWaitOverflow now; None for what cannot be read."""
    try:
        tw: int | None = sockstat_tw()
    except ProcNetError:
        tw = None
    try:
        overflow: int | None = tcpext().get("TCPTimeWaitOverflow")
    except ProcNetError:
        overflow = None
    return HostSample(tw, overflow)


def run(
    *,
    filters: FilterOptions,
    interval: float,
    duration: float | None,
    as_json: bool,
    from_file: str | None,
    events: bool,
    timestamps: bool,
) -> None:
    """Count until stopped, one interval every --interval; then the summary.

    Live, the interval ends when the kernel's counters are read, so every creation falls
    in exactly one interval; the last, partial one is reported too.
    """
    flt = filters.event_filter(live=from_file is None)
    if events and not as_json:
        raise UsageError("--events needs --json")
    out = sys.stdout
    model = TimewaitModel()
    console = make_console(file=out)
    writer = JsonLinesWriter(out) if as_json else None
    settings = read_settings() if from_file is None else None
    with open_source(from_file, flt, parts=PARTS, defines=None if events else NO_EVENTS) as source:
        counting = Counting.of(source, model, settings)
        if writer is not None:
            writer.write(
                make_header(
                    "timewait",
                    filter=flt.to_json(),
                    interval_s=interval,
                    events=events,
                    settings=counting.settings.to_json(),
                )
            )
        live_view = None
        if writer is None and console.is_terminal and source.live:
            live_view = start_live(console, view.render(model, None, counting.context()))

        def on_event(event: SocketEvent) -> None:
            model.feed(event)
            if writer is not None and events and isinstance(event, TimeWaitEvent):
                writer.event(event)

        def on_tick(now_ns: int) -> None:
            # Live, the interval ends when the kernel's counters are read, which is later
            # than the scheduled tick when the loop was held up (a slow reader of --json).
            done = counting.tick(max(now_ns, source.now_ns()) if source.live else now_ns)
            if writer is not None:
                obj = interval_json(done)
                obj["forecast"] = [forecast_json(f) for f in counting.context().forecasts]
                writer.write(obj)
            elif live_view is not None:
                live_view.update(view.render(model, done, counting.context()), refresh=True)
            elif done.seconds >= interval / 2 or done.delta.created or done.delta.resets_sent:
                # (the last, partial interval only when something happened in it)
                line = view.headline(done, model.totals)
                console.print(stamped(line, now_ns, source.clock_offset_ns, timestamps), soft_wrap=True)

        try:
            reason = session.run(
                source, on_event, interval_s=interval, duration_s=duration, on_tick=on_tick, flag=StopFlag()
            )
        finally:
            if live_view is not None:
                live_view.stop()
        now_ns = source.now_ns()
        if model.last_ns is not None and now_ns > model.last_ns:
            on_tick(now_ns)  # the last, partial interval: totals then include everything
        counters = source.counters()
        kernel_stats, skipped = counting.kernel_stats(), counting.skipped_runs()

    seconds = (model.last_ns - model.start_ns) / NS if model.start_ns and model.last_ns else 0.0
    ctx = counting.context()
    if writer is not None:
        summary = summary_json(model, ctx, counters, reason, seconds, kernel_stats, skipped)
        writer.write({**summary, **summary_flags(source)})
    else:
        view.print_summary(console, model, ctx, counters, reason, seconds)
        for note in (skipped_runs_note(skipped), map_failures_note(kernel_stats)):
            if note:
                console.print(note, style="yellow", soft_wrap=True)


class Counting:
    """The model, the settings it is judged against and, live, the reader of the kernel's
    exact counters."""

    def __init__(
        self,
        model: TimewaitModel,
        settings: TcpSettings,
        reader: TimewaitReader | None = None,
        program: LoadedProgram | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.reader = reader
        self.program = program
        self.ports = settings.ports or 0

    @classmethod
    def of(cls, source: Source, model: TimewaitModel, settings: TcpSettings | None) -> Counting:
        """Live: the kernel's counters, read from now on, and the host's ``settings``; from a
        recording: the settings its header carries."""
        if isinstance(source, KernelSource):
            model.start(source.now_ns(), host_sample())
            return cls(model, settings or TcpSettings(), TimewaitReader(source.program), source.program)
        if isinstance(source, RecordingSource):
            return cls(model, settings_from_header(source.recording.header))
        return cls(model, settings or TcpSettings())

    def kernel_stats(self) -> dict[str, int] | None:
        return self.reader.stats() if self.reader is not None else None

    def skipped_runs(self) -> dict[str, int] | None:
        """Runs of the programs the kernel skipped, by tracepoint (live, when it can tell)."""
        return self.program.skipped_runs() if self.program is not None else None

    def tick(self, now_ns: int) -> Interval:
        """End an interval at ``now_ns`` (with the kernel's counts, live)."""
        if self.reader is not None:
            self.reader.sweep_if_due(now_ns)
            return self.model.tick(now_ns, self.reader.counts(), host_sample())
        return self.model.tick(now_ns)

    def context(self) -> view.Context:
        """The port forecasts and what the settings mean, now."""
        model, settings, ports = self.model, self.settings, self.ports
        forecasts = model.forecasts(ports, settings.tw_reuse, top=TOP_N) if ports else []
        advice = explain_settings(
            settings.port_range,
            settings.tw_reuse,
            settings.max_tw_buckets,
            settings.fin_timeout,
            model.steady_total(),
            model.host.tw_now if model.host is not None else None,
            settings.rfc1337,
            max((f.utilization for f in forecasts), default=0.0),
        )
        return view.Context(ports or None, advice, forecasts)


def summary_json(
    model: TimewaitModel,
    ctx: view.Context,
    counters: dict[str, int],
    reason: str,
    seconds: float,
    kernel_stats: dict[str, int] | None,
    skipped: dict[str, int] | None,
) -> dict[str, Any]:
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
        summary["map_failed"] = {name: kernel_stats.get(key, 0) for name, key in TW_MAP_FAILURES.items()}
        summary["closed_no_tw"] = kernel_stats.get("closed_no_tw", 0)
    if skipped is not None:
        summary["kernel_skipped_runs"] = skipped
    return summary


def map_failures_note(kernel_stats: dict[str, int] | None) -> str:
    """What the summary says when a kernel table was full ("" if none was)."""
    failed = {name: kernel_stats.get(key, 0) for name, key in TW_MAP_FAILURES.items()} if kernel_stats else {}
    failed = {name: n for name, n in failed.items() if n}
    if not failed:
        return ""
    text = ", ".join(f"{name} {n}" for name, n in failed.items())
    return (
        f"  kernel tables were full ({text} inserts failed): counts above are short by up to that "
        "many (tws, tw_pending: creations; tw_procs, tw_dests: rows of the tables)"
    )


def skipped_runs_note(skipped: dict[str, int] | None) -> str:
    """What the summary says when the kernel skipped runs of the programs ("" if none)."""
    missed = sum(skipped.values()) if skipped else 0
    if not missed:
        return ""
    return (
        f"  the kernel skipped {missed} runs of tcptrace's programs (an interrupt hit the same "
        f"tracepoint while it ran: {skipped}); most concern other timers, but a count may be "
        "short by up to that many"
    )
