"""`tcptrace diagnose`: watch for a while (or replay a recording), then the verdicts with
their evidence, and optionally a self-contained HTML report.

It runs what `top` runs (one program of four parts aggregating in the kernel, the
Overview model read from it at each interval; see commands/top.py), seeded from a snapshot
of the host's sockets at the start and compared with another at the end. A recording
replays through the emulation of the kernel's aggregation, into the same model.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from typing import IO, Any

from tcptrace import __version__
from tcptrace.commands import session
from tcptrace.commands.attribution import SuspectNames
from tcptrace.commands.options import FilterOptions, FrameRuleOptions, threshold_ns
from tcptrace.commands.session import StopFlag
from tcptrace.commands.sources import RecordingSource
from tcptrace.commands.top import open_feeds
from tcptrace.model.diagnosis import Diagnosis, diagnose
from tcptrace.model.filters import EventFilter
from tcptrace.model.overview import Overview
from tcptrace.model.workload import Whois, whois_json, whois_text
from tcptrace.recording import JsonLinesWriter, make_header, summary_flags
from tcptrace.system import hostsnap
from tcptrace.system.safefile import check_output, write_atomic
from tcptrace.system.sysctl import TcpSettings, read_settings, settings_from_header
from tcptrace.views.common import make_console
from tcptrace.views.diagnose import print_diagnosis
from tcptrace.views.report import render_report


def run(
    *,
    filters: FilterOptions,
    duration: float,
    interval: float,
    as_json: bool,
    report: str | None,
    force: bool,
    from_file: str | None,
    threshold: float,
    frame_rules: FrameRuleOptions,
) -> None:
    flt = filters.event_filter(live=from_file is None)
    rules = frame_rules.rules()
    run_diagnose(
        flt,
        from_file=from_file,
        interval_s=interval,
        duration_s=duration,
        threshold_ns=threshold_ns(threshold),
        as_json=as_json,
        report=report,
        force=force,
        out=sys.stdout,
        filter_json=flt.to_json(),
        names=SuspectNames(rules, live=from_file is None),
    )


def run_diagnose(
    flt: EventFilter,
    *,
    from_file: str | None,
    interval_s: float,
    duration_s: float,
    threshold_ns: int,
    as_json: bool,
    report: str | None,
    force: bool,
    out: IO[str],
    filter_json: dict[str, Any],
    names: SuspectNames | None = None,
) -> int:
    """Observe for ``duration_s``, then print the verdicts (and write the report); ``names``
    attributes the leaks (by default: the built-in rules, source lines live).

    Returns the exit status: 0 whatever the verdicts (a diagnosis that found a problem
    did its job); failures raise.
    """
    if report is not None:
        check_output(report, force)  # now, not after --duration
    names = names if names is not None else SuspectNames(live=from_file is None)
    console = make_console(file=out) if not as_json else make_console(stderr=True)
    start = end = None
    settings: TcpSettings | None = None
    recorded: dict[str, Any] = {}  # a recording's header: the host it was made on
    writer = JsonLinesWriter(out) if as_json else None
    with open_feeds(from_file, flt, threshold_ns, quiet=as_json, names=names) as feeds:
        source, overview = feeds.source, feeds.overview
        if source.live:
            start = feeds.seed(flt)
            settings = read_settings()
        elif isinstance(source, RecordingSource):
            settings = settings_from_header(source.recording.header)
            recorded = source.recording.header
        if writer is not None:
            # Written once attached (and seeded): a reader knows the window has begun.
            writer.write(make_header("diagnose", filter=filter_json, duration_s=duration_s))
        elif source.live:
            status = make_console(stderr=True)
            status.print(f"observing for {duration_s:g} s (Ctrl-C to stop early)…", style="dim")

        def on_tick(now_ns: int) -> None:
            feeds.tick(now_ns)

        reason = session.run(
            source,
            overview.feed,
            interval_s=interval_s,
            duration_s=duration_s if source.live else None,
            on_tick=on_tick,
            flag=StopFlag(),
        )

        now = source.now_ns()
        if now > (overview.timewait.last_ns or 0):
            feeds.tick(now)
        counters = source.counters()
        offset_ns = source.clock_offset_ns
        if source.live:
            end = hostsnap.take(flt)
            overview.now_ns = max(overview.now_ns, end.at_ns)
        names.refresh(overview.closewait, overview.now_ns)  # while the traced processes live
    lost = int(counters.get("lost", 0))
    result = diagnose(
        overview, start=start, end=end, settings=settings, lost=lost, attributor=names.attributor
    )
    name_owners(result, overview, source.whois)
    if writer is not None:
        summary = {"type": "summary", "command": "diagnose", "stopped": reason, **result.to_json()}
        writer.write({**summary, **summary_flags(source)})
    else:
        print_diagnosis(console, result, reason)
    if report is not None:
        header = make_header("diagnose")
        meta = {
            "host": recorded.get("host") or header["host"],
            "kernel": recorded.get("kernel") or header["kernel"],
            "filter": filter_json,
            "version": __version__,
            "command": shlex.join(["tcptrace", *sys.argv[1:]]),
            "clock_offset_ns": offset_ns,
            "recording": from_file,
        }
        text = render_report(result, overview, meta, names.attributor)
        write_atomic(report, text, force)
        make_console(stderr=True).print(f"report written to {report}")
    return 0


def name_owners(result: Diagnosis, overview: Overview, whois: Whois) -> None:
    """Each verdict about a process says where it runs (container, pod or unit; its pid in
    its own namespace): the cgroup of its sockets in CLOSE_WAIT, else the process's now."""
    cgroups = {s.pid: s.cgroup for s in overview.closewait.open.values() if s.pid is not None}
    named = []
    for v in result.verdicts:
        if v.pid is not None:
            cgroup = cgroups.get(v.pid)
            if cgroup is None:
                cgroup = whois.pid_cgroup(v.pid)
            text = whois_text(whois, v.pid, cgroup)
            v = dataclasses.replace(v, where=whois_json(whois, v.pid, cgroup), where_text=text)
        named.append(v)
    result.verdicts = named
