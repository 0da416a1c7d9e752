"""Runtime hints and the frame a leak report leads with, on real stacks of each runtime."""

from __future__ import annotations

import doctest
import json
from pathlib import Path
from typing import Any

import pytest

import tcptrace.model.hints
from tcptrace.model.hints import Runtime, StackSample, attribute, detect_runtime

DATA = Path(__file__).resolve().parent.parent / "data"
STACKS: dict[str, Any] = json.loads((DATA / "stacks.json").read_text())


def samples(case: str) -> list[StackSample]:
    return [StackSample.of(s["op"], s["kstack"], s["ustack"], eof=s["eof"]) for s in STACKS[case]["samples"]]


def test_doctests() -> None:
    assert doctest.testmod(tcptrace.model.hints).failed == 0


@pytest.mark.parametrize(
    ("case", "runtime", "label", "op", "hints"),
    [
        ("c_leaky_server", Runtime.NATIVE, "leak_connection [leaky_server]", "RECV", []),
        ("c_leaky_server_perf_map", Runtime.NATIVE, "leak_connection [leaky_server]", "RECV", []),
        ("go_server_error_path", Runtime.GO, "main.handleConn [goserver]", "SEND", []),
        ("go_http_client_unclosed_body", Runtime.GO, None, None, ["go-http-body-not-closed"]),
        (
            "node_half_open_named",
            Runtime.NODE,
            "rejectTooLarge (server.js:5:24)",
            "SEND",
            ["node-end-not-called"],
        ),
        (
            "node_half_open_basic_prof",
            Runtime.NODE,
            None,
            None,
            ["node-end-not-called", "node-js-frames-hidden"],
        ),
        (
            "python312_perf_no_frame_pointers",
            Runtime.PYTHON,
            None,
            None,
            ["python-interpreter-only", "stack-ends-in-libc"],
        ),
        ("python311", Runtime.PYTHON, None, None, ["python-interpreter-only", "stack-ends-in-libc"]),
    ],
)
def test_attribution_of_real_stacks(
    case: str, runtime: Runtime, label: str | None, op: str | None, hints: list[str]
) -> None:
    data = STACKS[case]
    a = attribute(data["comm"], data["exe"], samples(case))
    assert a.runtime is runtime
    assert (a.frame.label() if a.frame else None) == label
    assert a.op == op
    assert [h.code for h in a.hints] == hints
    assert a.headline() == (label if label is not None else a.hints[0].text)
    json.dumps(a.to_json())


def test_go_client_hint_names_the_transport_frames() -> None:
    a = attribute("goclient", None, samples("go_http_client_unclosed_body"))
    (hint,) = a.hints
    assert "resp.Body.Close()" in hint.text
    assert "net/http.(*persistConn).readLoop+0x1ac [goclient]" in hint.evidence
    assert "net/http.(*Transport).dialConn+0x83f [goclient]" in hint.evidence
    assert "net/http.(*Transport).dialConn.func5+0x26 [goclient]" in hint.evidence


def test_node_hint_needs_the_eof_read() -> None:
    # The same stacks without the EOF read: nothing says the app saw the FIN.
    quiet = [StackSample(s.op, s.stack, eof=False) for s in samples("node_half_open_named")]
    a = attribute("node", "/usr/bin/node", quiet)
    assert [h.code for h in a.hints] == []
    assert a.frame is not None and a.frame.name == "rejectTooLarge"


def test_go_server_on_the_client_hint_is_not_given() -> None:
    # A Go server's stacks name its handler and have no transport goroutine.
    a = attribute("goserver", None, samples("go_server_error_path"))
    assert a.hints == ()


def test_preference_order_of_samples() -> None:
    s = samples("c_leaky_server")
    assert attribute("leaky_server", None, s).frame.name == "leak_connection"  # type: ignore[union-attr]
    # An EOF read in the app's code leads, in whatever order it comes ...
    assert any(x.eof for x in s)
    assert attribute("leaky_server", None, s[::-1]).frame.name == "leak_connection"  # type: ignore[union-attr]
    # ... otherwise the order given does.
    others = [x for x in s if not x.eof][::-1]
    assert attribute("leaky_server", None, others).frame.name == "main"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("comm", "exe", "runtime"),
    [
        ("python3.11", "/usr/bin/python3.11", Runtime.PYTHON),
        ("gunicorn", "/usr/bin/python3.12", Runtime.PYTHON),  # comm renamed, exe says
        ("node", None, Runtime.NODE),
        ("MainThread", "/usr/bin/nodejs", Runtime.NODE),
        ("nodeapp", "/srv/nodeapp", Runtime.UNKNOWN),  # no frames, no known executable
        ("python", "/srv/bin/python-wrapper", Runtime.UNKNOWN),  # an exe name wins over comm
    ],
)
def test_runtime_from_process(comm: str, exe: str | None, runtime: Runtime) -> None:
    assert detect_runtime(comm, exe, []) is runtime


def test_no_stacks_no_hints() -> None:
    a = attribute("svc", None, [])
    assert (a.runtime, a.frame, a.hints, a.headline()) == (Runtime.UNKNOWN, None, (), None)


def test_libc_walk_end_is_not_claimed_for_complete_stacks() -> None:
    full = StackSample.of(
        "ACCEPT", [], ["accept+0x4f [libc.so.6]", "__libc_start_call_main+0x7a [libc.so.6]"]
    )
    assert attribute("x", None, [full]).hints == ()
    cut = StackSample.of("SEND", [], ["__send+0x64 [libc.so.6]"])
    (hint,) = attribute("x", None, [cut]).hints
    assert hint.code == "stack-ends-in-libc" and hint.evidence == ("__send+0x64 [libc.so.6]",)


def test_node_event_loop_stacks_alone_say_nothing_about_flags() -> None:
    # The EOF read and the accept run in libuv, not JavaScript: no sign the flags are missing...
    loop_only = samples("node_half_open_named")[1:]
    a = attribute("node", "/usr/bin/node", loop_only)
    assert [h.code for h in a.hints] == ["node-end-not-called"]
    # ... unless the caller saw the process writes no perf map.
    a = attribute("node", "/usr/bin/node", loop_only, perf_map=False)
    assert [h.code for h in a.hints] == ["node-end-not-called", "node-js-frames-hidden"]
    assert "--perf-basic-prof --interpreted-frames-native-stack" in a.hints[1].text


def test_node_with_a_perf_map_but_no_native_interpreted_frames() -> None:
    a = attribute("node", "/usr/bin/node", samples("node_half_open_basic_prof"), perf_map=True)
    hidden = next(h for h in a.hints if h.code == "node-js-frames-hidden")
    assert "add --interpreted-frames-native-stack" in hidden.text
    assert hidden.evidence == ("Builtins_InterpreterEntryTrampoline+0xdc [node]",)


def test_python_with_a_perf_map_needs_frame_pointers() -> None:
    data = STACKS["python312_perf_no_frame_pointers"]
    case = "python312_perf_no_frame_pointers"
    with_map = attribute(data["comm"], data["exe"], samples(case), perf_map=True)
    assert "frame pointers" in with_map.hints[0].text and "-X perf" not in with_map.hints[0].text
    old = attribute("python3.11", "/usr/bin/python3.11", samples("python311"), perf_map=False)
    assert "-X perf" in old.hints[0].text
