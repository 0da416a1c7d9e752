"""Every view, fed hostile host strings, shows them as literal escaped text.

Process names, stack frames, cgroup paths, host names and settings come from whoever runs
on the traced host (or wrote the recording). Each renderer below is given models replayed
from the real recordings of tests/data/ with every such string replaced by a hostile one,
and rendered into a StringIO console with rich's defaults (markup and emoji codes on, a
colour terminal): the escaped text must appear literally, and no escape sequence, link or
style of the host's making may reach the output.

``test_every_view_is_covered`` lists the views (public functions of views/ that take a
Console, and the renderers of live screens and the HTML report): a new view fails it until
it is added here.
"""

from __future__ import annotations

import html
import importlib
import inspect
import io
import json
import pkgutil
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console, RenderableType

import tcptrace.views
from tcptrace.commands.session import run
from tcptrace.commands.sources import RecordingSource
from tcptrace.model.closelat import CloseLatency
from tcptrace.model.closewait import CloseWaitTracker
from tcptrace.model.diagnosis import diagnose
from tcptrace.model.events import CloseCall, SocketEvent
from tcptrace.model.overview import Overview
from tcptrace.model.states import StatesSummary
from tcptrace.model.timewait import TimewaitModel, explain_settings
from tcptrace.model.workload import CgroupIdentity, Workload
from tcptrace.printable import printable
from tcptrace.recording import open_recording
from tcptrace.system.sysctl import TcpSettings
from tcptrace.views import closelat as v_closelat
from tcptrace.views import closewait as v_closewait
from tcptrace.views import diagnose as v_diagnose
from tcptrace.views import doctor as v_doctor
from tcptrace.views import report as v_report
from tcptrace.views import states as v_states
from tcptrace.views import timewait as v_timewait
from tcptrace.views import top as v_top
from tcptrace.views.common import endpoint, host_text, safe
from tcptrace.views.doctor import Check

NS = 1_000_000_000

# Each at most 15 characters once escaped, so that a COMM column shows it whole.
HOSTILE = [
    "[/x]",
    "[bold red]x",
    "[link=http://e]",
    "\x1b[31mred",
    "\x1b]8;;x\x07",
    "a\rb\nc",
    "e\tf",
    "\x9b31m\x85\x07",
    "ev\u202egpj.sh",
    ":smile:",
    "\\[b]x",
]

SGR = re.compile(r"\x1b\[[0-9;]*m")  # the colours rich itself writes


def test_hostile_names_fit_a_comm_column() -> None:
    assert all(len(printable(h)) <= 15 for h in HOSTILE)


def hostile_recording(src: Path, dst: Path, name: str) -> None:
    """``src`` with every host string replaced by ``name``, and IPv6 ULA addresses (which
    rich would take for a markup tag: ``[fd00::1]:80``)."""
    out = []
    for line in src.read_text().splitlines():
        obj = json.loads(line)
        if obj["type"] == "header":
            obj["host"] = obj["kernel"] = name
        for key in ("comm", "task_comm"):
            if obj.get(key) is not None:
                obj[key] = name
        for key in ("kstack", "ustack"):
            if obj.get(key):
                obj[key] = [f"{name}+0x1 [{name}]" for _ in obj[key]]
        if "saddr" in obj:
            obj["family"] = 6
            obj["saddr"] = "fd00::" + obj["saddr"].rsplit(".", 1)[-1]
            obj["daddr"] = "fd00::" + obj["daddr"].rsplit(".", 1)[-1]
            obj["cgroup"] = 4242
        for proc in obj.get("processes", ()):
            proc["comm"] = name
            if proc.get("stack"):
                proc["stack"] = [f"{name}+0x1 [{name}]" for _ in proc["stack"]]
        out.append(json.dumps(obj, ensure_ascii=False))
    dst.write_text("\n".join(out) + "\n")


def replay(path: Path, on_event: Callable[[SocketEvent], None], on_tick: Callable[[int], None]) -> int:
    source = RecordingSource(open_recording(str(path)))
    run(source, on_event, interval_s=0.1, on_tick=on_tick)
    return source.now_ns()


@dataclass
class Rendered:
    view: str
    output: str  # as a colour terminal gets it
    expect: tuple[str, ...]  # literal texts it must show


def console(buf: io.StringIO) -> Console:
    """rich's defaults: markup and emoji codes on, colours, wide enough to never wrap."""
    return Console(file=buf, width=500, force_terminal=True, color_system="truecolor")


def capture(view: str, draw: Callable[[Console], None], *expect: str) -> Rendered:
    buf = io.StringIO()
    draw(console(buf))
    return Rendered(view, buf.getvalue(), expect)


def renderable(view: str, thing: RenderableType, *expect: str) -> Rendered:
    return capture(view, lambda c: c.print(thing), *expect)


@dataclass
class HostileWhois:
    """Owners in a pod and a container whose names (and cgroup path) are ``name``."""

    name: str
    host_netns: int | None = None

    def workload(self, cgroup: int | None) -> Workload | None:
        if cgroup is None:
            return None
        identity = CgroupIdentity(self.name, "docker", "ab" * 32, pod_uid="u", qos="Burstable")
        return Workload(identity, pod_name=self.name, namespace=self.name, container_name=self.name)

    def nspid(self, pid: int | None) -> int | None:
        return None


def render_all(tmp_path: Path, data_dir: Path, name: str) -> Iterator[Rendered]:
    shown = printable(name)
    frame = f"{shown}+0x1 [{shown}]"
    recs = {}
    for rec in ("closewait_leaky", "timewait_mix", "closelat_linger_reset"):
        recs[rec] = tmp_path / f"{rec}.jsonl"
        hostile_recording(data_dir / f"{rec}.jsonl", recs[rec], name)
    offset = open_recording(str(recs["closewait_leaky"])).clock_offset_ns

    # states
    summary = StatesSummary()
    events: list[SocketEvent] = []
    replay(recs["closewait_leaky"], lambda e: (summary.feed(e), events.append(e)), lambda _: None)

    def states_stream(c: Console) -> None:
        for e in events:
            v_states.print_event(c, e, offset)

    yield capture("states.print_event", states_stream, shown, frame, "[fd00::1]:")
    yield capture("states.print_lost", lambda c: v_states.print_lost(c, 3, 7), "3 events lost")
    yield capture(
        "states.print_summary",
        lambda c: v_states.print_summary(c, summary, {"lost": 2}, "end"),
        "2 lost",
    )

    # closewait (threshold 1 ns: every socket still in CLOSE_WAIT is a suspect), its owners
    # in a pod and container named by whoever runs them
    tracker = CloseWaitTracker(threshold_ns=1)
    cw_now = replay(recs["closewait_leaky"], tracker.feed, lambda _: None)
    whois = HostileWhois(name)
    yield capture(
        "closewait.print_summary",
        lambda c: v_closewait.print_summary(c, tracker, cw_now, {"lost": 0}, "end", whois),
        shown,
        f"pod {shown}/{shown} (Burstable) container docker {shown}",
        frame,
        "[fd00::1]:",
    )
    yield renderable(
        "closewait.render", v_closewait.render(tracker, cw_now, None, whois), shown, frame, f"pod {shown}/"
    )

    def states_in_pods(c: Console) -> None:
        for e in events:
            v_states.print_event(c, e, offset, whois)

    yield capture("states.print_event", states_in_pods, shown, f"pod {shown}/{shown}")

    # timewait
    tw = TimewaitModel()
    intervals = []
    replay(recs["timewait_mix"], tw.feed, lambda t: intervals.append(tw.tick(t)))
    settings = TcpSettings(port_range=(32768, 60999), tw_reuse=2)
    ctx = v_timewait.Context(
        settings.ports,
        explain_settings(settings.port_range, settings.tw_reuse, None, None, tw.steady_total(), None),
        tw.forecasts(settings.ports or 0, settings.tw_reuse),
    )
    yield capture(
        "timewait.print_summary",
        lambda c: v_timewait.print_summary(c, tw, ctx, {"lost": 1}, "end", 3.0),
        shown,
        "fd00::",
    )
    yield renderable("timewait.render", v_timewait.render(tw, intervals[-1], ctx), shown)

    # top and diagnose: one Overview fed both recordings of sockets
    overview = Overview(threshold_ns=1)
    for rec in ("closewait_leaky", "timewait_mix"):
        replay(recs[rec], overview.feed, lambda t: overview.tick(t))
    yield renderable("top.render", v_top.render(overview, v_top.TopState()), shown)
    result = diagnose(overview, lost=0)
    yield capture("diagnose.print_diagnosis", lambda c: v_diagnose.print_diagnosis(c, result, "end"), shown)
    report = v_report.render_report(
        result, overview, {"host": name, "kernel": name, "filter": {"comm": name}}
    )
    yield Rendered("report.render_report", report, (html.escape(shown),))

    # closelat: recorded reports and flagged calls
    model = CloseLatency()
    reports = []
    flagged: list[CloseCall] = []
    rec = open_recording(str(recs["closelat_linger_reset"]))

    def on_report(obj: dict[str, object]) -> None:
        report = model.replay(obj)
        if report is not None:
            reports.append(report)

    rec.on_report = on_report
    for event in rec.events():
        if (f := model.feed(event)) is not None:
            flagged.append(f)
    assert reports and flagged

    def closelat_reports(c: Console) -> None:
        for r in reports:
            v_closelat.print_report(c, r, offset)

    def closelat_flags(c: Console) -> None:
        for f in flagged:
            v_closelat.print_flag(c, f, offset)

    yield capture("closelat.print_report", closelat_reports, shown)
    yield capture("closelat.print_flag", closelat_flags, shown, "[fd00::1]:")
    yield capture(
        "closelat.print_summary", lambda c: v_closelat.print_summary(c, model, {}, "end", offset), shown
    )

    # doctor: details carry paths and error messages of bcc and the kernel
    checks = [Check(name, False, name, name), Check("bcc", True, name)]
    width = v_doctor.names_width(checks)
    yield capture("doctor.print_check_lines", lambda c: v_doctor.print_check_lines(c, checks, width), shown)
    yield capture("doctor.print_verdict", lambda c: v_doctor.print_verdict(c, checks))  # counts only


COVERED = {
    "states.print_event",
    "states.print_lost",
    "states.print_summary",
    "closewait.print_summary",
    "closewait.render",
    "timewait.print_summary",
    "timewait.render",
    "top.render",
    "diagnose.print_diagnosis",
    "report.render_report",
    "closelat.print_report",
    "closelat.print_flag",
    "closelat.print_summary",
    "doctor.print_check_lines",
    "doctor.print_verdict",
}
# Live screens: rendered without a Console (then shown by rich's Live).
LIVE = {"closewait.render", "timewait.render", "top.render", "report.render_report"}
NOT_VIEWS = {"common.start_live"}  # shows what it is given: the renderables above


def test_every_view_is_covered() -> None:
    """Every public function of views/ that takes a Console is rendered by this test."""
    found = set()
    for info in pkgutil.iter_modules(tcptrace.views.__path__):
        module = importlib.import_module(f"tcptrace.views.{info.name}")
        for fname, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ != module.__name__ or fname.startswith("_"):
                continue
            if any("Console" in str(p.annotation) for p in inspect.signature(fn).parameters.values()):
                found.add(f"{info.name}.{fname}")
    found -= NOT_VIEWS
    assert found, "no view found: the scan is broken"
    assert found <= COVERED, f"views not rendered with hostile names: {sorted(found - COVERED)}"
    assert COVERED - LIVE == found


@pytest.mark.parametrize("name", HOSTILE, ids=[repr(h) for h in HOSTILE])
def test_every_view_shows_hostile_names_literally(tmp_path: Path, data_dir: Path, name: str) -> None:
    seen = set()
    for r in render_all(tmp_path, data_dir, name):
        seen.add(r.view)
        for text in r.expect:
            # Literal: a name read as markup would have lost its tags, an emoji code its colons.
            assert text in SGR.sub("", r.output), f"{r.view}: {text!r} not shown literally"
        rest = SGR.sub("", r.output)
        # Nothing of the host's making reaches the terminal: no escape sequence (rich's own
        # colours removed above), no carriage return, no C1 control, no bidi override, no link.
        for bad in ("\x1b", "\r", "\x9b", "\x85", "\x07", "\u202e", "]8;"):
            if r.view == "report.render_report" and bad == "]8;":
                continue  # the HTML has no terminal links; "]8;" is the name's escaped text
            assert bad not in rest.replace(printable(name), ""), f"{r.view}: {bad!r} leaked"
        if r.view != "report.render_report":
            assert "\x1b]8;" not in r.output, f"{r.view}: a hyperlink was made"
    assert seen == COVERED


def test_host_text_and_endpoint() -> None:
    text = host_text("[bold red]x\x1b[2J", style="cyan", width=12)
    assert text.plain == "[bold red]x\\" and not text.spans and str(text.style) == "cyan"
    assert host_text(None).plain == "-"
    assert safe("tab\there") == "tab\\x09here"
    assert endpoint("fd00::1", 80, 6) == "[fd00::1]:80"
    assert endpoint("[/x]\x1b", 80, 4) == "[/x]\\x1b:80"


@pytest.mark.parametrize("name", HOSTILE, ids=[repr(h) for h in HOSTILE])
def test_every_replaying_command_survives_hostile_names(tmp_path: Path, data_dir: Path, name: str) -> None:
    """Through the CLI: what crashed with rich's MarkupError (`[/x]`) exits 0, shows the
    name escaped, and `diagnose --report` writes its report."""
    from click.testing import CliRunner

    from tcptrace.cli import cli

    recs = {}
    for rec in ("closewait_leaky", "timewait_mix", "closelat_linger_reset"):
        recs[rec] = tmp_path / f"{rec}.jsonl"
        hostile_recording(data_dir / f"{rec}.jsonl", recs[rec], name)
    report = tmp_path / "report.html"
    runs = [
        ("states", "closewait_leaky", []),
        ("closewait", "closewait_leaky", ["--threshold", "1ms"]),
        ("timewait", "timewait_mix", []),
        ("top", "closewait_leaky", ["--threshold", "1ms"]),
        ("diagnose", "closewait_leaky", ["--report", str(report)]),
        ("closelat", "closelat_linger_reset", []),
    ]
    for command, rec, extra in runs:
        result = CliRunner().invoke(cli, [command, "--from", str(recs[rec]), *extra])
        assert result.exit_code == 0, f"{command}: {result.stderr}"
        assert printable(name) in result.stdout + result.stderr, command
        assert "\x1b" not in result.stdout + result.stderr, command
    assert html.escape(printable(name)) in report.read_text()
