"""How leak suspects are shown: the application frame (or the runtime's hint) first, both
touches, the tracer's frames never; in closewait's text and JSON, diagnose's verdicts, top, the
report and the agent's log. Fed the real stacks of tests/data/stacks.json (tests/stackcases.py)."""

from __future__ import annotations

import dataclasses
import doctest
import io
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console, RenderableType

import tcptrace.model.attribution
from tcptrace.cli import cli
from tcptrace.commands.options import FrameRuleOptions
from tcptrace.model.agent import AgentConfig, AgentModel
from tcptrace.model.attribution import Attributor, ProcessFacts, group_json
from tcptrace.model.closewait import CloseWaitTracker, SkaddrKey
from tcptrace.model.diagnosis import leak_verdicts
from tcptrace.model.framerules import rules_from_options
from tcptrace.model.overview import Overview
from tcptrace.views.closewait import render
from tcptrace.views.report import _leaks
from tcptrace.views.top import leaks_text
from tests.stackcases import CASES, PID, STACKS, now_ns, tracker_of

DATA = Path(__file__).resolve().parent.parent / "data"
TRACER = ("bpf_prog_", "bpf_trace_run", "call_trace_", "__traceiter_")

# What each runtime's group leads with, and the code path it was taken from.
LEADS = {
    "c_leaky_server": ("leak_connection [leaky_server]", "post_fin_touch"),
    "c_leaky_server_perf_map": ("leak_connection [leaky_server]", "post_fin_touch"),
    "go_server_error_path": ("main.handleConn [goserver]", "pre_fin_touch"),
    "go_http_client_unclosed_body": ("Go HTTP client: a response Body never closed", None),
    "node_half_open_named": ("rejectTooLarge (server.js:5:24)", "pre_fin_touch"),
    "node_half_open_basic_prof": ("Node.js: socket.end() not called after the peer's 'end'", None),
    "python311": ("Python: only the interpreter is visible, not the Python functions", None),
    "python312_perf_no_frame_pointers": (
        "Python: only the interpreter is visible, not the Python functions",
        None,
    ),
}


def text_of(renderable: RenderableType, width: int = 200) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(renderable)
    return out.getvalue()


def group_of(tracker: CloseWaitTracker) -> Any:
    (group,) = tracker.suspects(now_ns(tracker))
    return group


def test_doctests() -> None:
    assert doctest.testmod(tcptrace.model.attribution).failed == 0


def test_every_case_has_its_lead() -> None:
    assert sorted(LEADS) == CASES


@pytest.mark.parametrize("case", CASES)
def test_json_leads_with_the_frame_or_the_hint_and_keeps_both_touches(case: str) -> None:
    group = group_of(tracker_of(case))
    named = Attributor()(group)
    lead, role = LEADS[case]
    assert named.headline() == lead
    data = json.loads(json.dumps(group_json(group, named)))
    assert list(data)[:5] == ["pid", "comm", "count", "app", "hints"]
    assert data["app"] == (lead if role else None) and data["app_from"] == role
    assert data["hints"] == [h.to_json() for h in named.hints]
    samples = STACKS[case]["samples"]
    if any(s["op"] == "SEND" or (s["op"] == "RECV" and not s["eof"]) for s in samples):
        assert data["pre_fin_touch"]["op"] in ("SEND", "RECV")
    assert (data["post_fin_touch"] is not None) == any(s["eof"] for s in samples)
    stacks = [data["origin_stack"], data["last_touch_stack"]]
    stacks += [data[k]["stack"] for k in ("pre_fin_touch", "post_fin_touch") if data[k]]
    assert all(stacks) and not [f for s in stacks for f in s if f.startswith(TRACER)]


def test_closewait_text_leads_with_the_frame_and_shows_both_touches() -> None:
    shown = text_of(render(tracker := tracker_of("node_half_open_named"), now_ns(tracker)))
    lines = shown.splitlines()
    head = next(i for i, line in enumerate(lines) if "2 × 4242 node" in line)
    assert lines[head + 1].strip() == "→ rejectTooLarge (server.js:5:24)  (before the FIN: send)"
    assert lines[head + 2].strip().startswith("hint: Node.js read the peer's FIN")
    assert "    before the FIN: send" in lines
    assert "    after the FIN: recv -> 0 (EOF): should have closed" in lines
    assert "    origin: accept" in lines
    # The app's frame sits deep in the write's stack: the window shows it, and says what it skips.
    assert "      JS:~rejectTooLarge /srv/demo/node/server.js:5:24+0xdc [perf-25685.map]" in lines
    assert any(line.strip().startswith("… ") and line.strip().endswith(" frames") for line in lines)
    assert not any(t in shown for t in TRACER)
    # --stacks: every frame.
    full = text_of(render(tracker, now_ns(tracker), full=True), width=1000)
    every = [f for s in STACKS["node_half_open_named"]["samples"] for f in s["ustack"]]
    assert all(f"      {f}" in full.splitlines() for f in every)


def test_closewait_text_says_the_hint_and_which_sockets_leak_when_no_frame_is_the_apps() -> None:
    tracker = tracker_of("python311")
    shown = text_of(render(tracker, now_ns(tracker)))
    assert (
        "→ Python: only the interpreter is visible, not the Python functions  "
        "(accepted from its listener on port 8080)" in shown
    )
    assert "after the FIN: no touch: the app never read the EOF" in shown
    go = tracker_of("go_http_client_unclosed_body")
    shown = text_of(render(go, now_ns(go)))
    assert "→ Go HTTP client: a response Body never closed  (connected to 127.0.0.1:8080)" in shown
    assert "hint: Go net/http client connections held open" in shown


def test_verdicts_lead_with_the_frame_or_the_hint() -> None:
    def verdict(case: str, attributor: Attributor | None = None) -> Any:
        tracker = tracker_of(case)
        (v,) = leak_verdicts(tracker.suspects(now_ns(tracker)), tracker, 20.0, 0, attributor)
        return v

    v = verdict("node_half_open_named")
    assert "in CLOSE_WAIT at rejectTooLarge (server.js:5:24): the app last sent on them there" in v.text
    assert "Node.js read the peer's FIN" in v.text and v.functions == ("rejectTooLarge",)
    assert v.data["app_from"] == "pre_fin_touch" and v.data["origin"]["op"] == "ACCEPT"
    assert "before the FIN (send): rejectTooLarge (server.js:5:24)" in v.evidence
    v = verdict("go_http_client_unclosed_body")
    assert v.text.startswith(f"pid {PID} (goclient) leaks 2 sockets in 20 s (about 6 a minute) in CLOSE_WAIT")
    assert "(connected to 127.0.0.1:8080): Go net/http client connections held open" in v.text
    assert v.functions == () and v.data["app"] is None
    v = verdict("python311")
    assert "(accepted from its listener on port 8080): Only the CPython interpreter is visible" in v.text
    # A perf map the owner writes (seen while it lived) changes what the hint says.
    v = verdict(
        "python312_perf_no_frame_pointers", Attributor(facts={PID: ProcessFacts("/x/python3.12", True)})
    )
    assert "its perf map names them, but the stack walk does not reach them" in v.text


def test_a_source_line_does_not_split_a_group() -> None:
    tracker = tracker_of("c_leaky_server", sockets=3)
    sock = tracker.open[SkaddrKey(0x1001)]
    assert sock.last_touch is not None
    annotated = tuple(
        f"{f} at /srv/demo/leaky_server.c:80" if f.startswith("leak_connection") else f
        for f in sock.last_touch.ustack
    )
    sock.last_touch = dataclasses.replace(sock.last_touch, ustack=annotated)
    (group,) = tracker.suspects(now_ns(tracker))
    assert group.count == 3


def test_user_rules_move_the_application_frame() -> None:
    group = group_of(tracker_of("go_server_error_path"))
    rules = rules_from_options(library=["main.handleConn"])
    assert Attributor(rules)(group).headline() == "main.serveRaw.func1 [goserver]"
    # Every frame of the binary made library code: no frame is the application's any more.
    named = Attributor(rules_from_options(library=["module=goserver"]))(group)
    assert named.frame is None and named.source is None
    assert named.headline() == "no frame of the application's code"


def test_go_dependencies_are_library_code_so_the_caller_leads(monkeypatch: pytest.MonkeyPatch) -> None:
    # The error path's reply written by a dependency module's function, not fmt.Fprintf.
    case = json.loads(json.dumps(STACKS["go_server_error_path"]))
    for sample in case["samples"]:
        sample["ustack"] = [f.replace("fmt.Fprintf", "github.com/acme/wire.Reply") for f in sample["ustack"]]
    monkeypatch.setitem(STACKS, "go_server_error_path", case)
    group = group_of(tracker_of("go_server_error_path"))
    exe = "/srv/demo/go/goserver"
    # Without the executable's build info the dependency's frame is taken for the app's.
    assert (
        Attributor(facts={PID: ProcessFacts(exe)})(group).headline()
        == "github.com/acme/wire.Reply [goserver]"
    )
    built_with = ProcessFacts(exe, go_deps=("github.com/acme/wire", "golang.org/x/net"))
    attributor = Attributor(facts={PID: built_with})
    assert attributor(group).headline() == "main.handleConn [goserver]"
    # The user's rules come first: an --app rule makes the dependency the app's again.
    mine = Attributor(rules_from_options(app=["github.com/acme/*"]), facts={PID: built_with})
    assert mine(group).headline() == "github.com/acme/wire.Reply [goserver]"
    # Another executable's build info says nothing of this one's frames.
    other = Attributor(facts={PID: ProcessFacts("/srv/other", go_deps=("github.com/acme/wire",))})
    assert other(group).headline() == "github.com/acme/wire.Reply [goserver]"


def test_top_and_the_report_name_the_frame() -> None:
    overview = Overview(threshold_ns=tracker_of("c_leaky_server").threshold_ns)
    overview.closewait = tracker_of("node_half_open_named")
    overview.now_ns = now_ns(overview.closewait)
    assert "2 × 4242 node  → rejectTooLarge (server.js:5:24)" in text_of(leaks_text(overview) or "")
    html = _leaks(overview, None)
    assert "→ <code>rejectTooLarge (server.js:5:24)</code>" in html
    assert "<b>JS:~rejectTooLarge /srv/demo/node/server.js:5:24+0xdc [perf-25685.map]</b>" in html
    assert "bpf_prog_" not in html and "before the FIN" in html


def test_agent_log_lines_lead_with_the_frame() -> None:
    model = AgentModel(AgentConfig(threshold_ns=10**9))
    tracker = tracker_of("c_leaky_server")
    model.closewait = tracker  # type: ignore[assignment]  # the same reports, from recorded stacks
    attributor = Attributor()
    (record,) = model.suspect_records(now_ns(tracker), 0.0, lambda g: group_json(g, attributor(g)))
    assert list(record)[:7] == ["type", "time", "pid", "comm", "count", "app", "hints"]
    assert record["app"] == "leak_connection [leaky_server]"


# --- the options ----------------------------------------------------------------------------------

LEAKY = str(DATA / "closewait_leaky.jsonl")


def summary(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["closewait", "--from", LEAKY, "--threshold", "100ms", "--json", *args])
    assert result.exit_code == 0, result.output
    out: dict[str, Any] = json.loads(result.output.splitlines()[-1])
    return out


def test_closewait_json_of_a_recording_and_the_rule_options(tmp_path: Path) -> None:
    (group,) = summary()["groups"]
    assert group["app"] == "leak_connection [leaky_server]" and group["app_from"] == "post_fin_touch"
    (group,) = summary("--library", "leak_connection")["groups"]
    assert group["app"] == "conn_thread [leaky_server]"
    rules = tmp_path / "frames.rules"
    rules.write_text("# ours\nlibrary function=leak_* module=leaky_server\n")
    (group,) = summary("--rules", str(rules))["groups"]
    assert group["app"] == "conn_thread [leaky_server]"
    # --app comes first: it wins over the file's rule.
    (group,) = summary("--rules", str(rules), "--app", "leak_connection")["groups"]
    assert group["app"] == "leak_connection [leaky_server]"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--library", "func=x"], "--library: unknown field 'func'"),
        (["--app", "re:("], "--app: bad regular expression"),
        (["--rules", "/nonexistent/frames.rules"], "/nonexistent/frames.rules: No such file"),
    ],
)
def test_bad_rules_are_a_one_line_usage_error(args: list[str], message: str) -> None:
    for command in (["closewait", "--from", LEAKY], ["diagnose", "--from", LEAKY], ["top", "--from", LEAKY]):
        result = CliRunner().invoke(cli, [*command, *args])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_the_default_rules_file_is_read_when_it_exists(tmp_path: Path) -> None:
    default = tmp_path / "frames.rules"
    assert len(FrameRuleOptions().rules(str(default))) == 0
    default.write_text("library module=libacme*.so*\n")
    assert len(FrameRuleOptions(app=("x",)).rules(str(default))) == 2
    given = tmp_path / "other.rules"
    given.write_text("")
    assert len(FrameRuleOptions(rules_file=str(given)).rules(str(default))) == 0  # --rules replaces it
