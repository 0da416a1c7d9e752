"""Frame strings: parsing, categories, the application frame, on real stacks of each runtime."""

from __future__ import annotations

import doctest
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tcptrace.model.frames
import tcptrace.model.jitnames
from tcptrace.model.framerules import library_prefixes
from tcptrace.model.frames import (
    Category,
    classify,
    classify_flat,
    parse_frame,
    user_category,
    with_source,
    without_tracer_frames,
)

DATA = Path(__file__).resolve().parent.parent / "data"
STACKS: dict[str, Any] = json.loads((DATA / "stacks.json").read_text())


def sample(case: str, op: str) -> dict[str, Any]:
    return next(s for s in STACKS[case]["samples"] if s["op"] == op)


def test_doctests() -> None:
    assert doctest.testmod(tcptrace.model.frames).failed == 0
    assert doctest.testmod(tcptrace.model.jitnames).failed == 0


@pytest.mark.parametrize(
    ("text", "function", "offset", "module", "file", "line"),
    [
        ("tcp_v4_connect+0x269 [kernel]", "tcp_v4_connect", 0x269, "kernel", None, None),
        (
            "bpf_prog_b5d97a7df6949d13_tt_lc_process+0x788 [bpf]",
            "bpf_prog_b5d97a7df6949d13_tt_lc_process",
            0x788,
            "bpf",
            None,
            None,
        ),
        (
            "net/http.(*Transport).dialConn.func5+0x26 [goclient]",
            "net/http.(*Transport).dialConn.func5",
            0x26,
            "goclient",
            None,
            None,
        ),
        ("node::Start(int, char**)+0x58f [node]", "node::Start(int, char**)", 0x58F, "node", None, None),
        (
            "leak_connection+0x15 [leaky_server] at /srv/demo/leaky_server.c:80",
            "leak_connection",
            0x15,
            "leaky_server",
            "/srv/demo/leaky_server.c",
            80,
        ),
        (
            "JS:~get size /srv/my app/cache.js:2:23+0xdc [perf-7.map]",
            "JS:~get size /srv/my app/cache.js:2:23",
            0xDC,
            "perf-7.map",
            "/srv/my app/cache.js",
            2,
        ),
        ("[unknown] [perf-10958.map]", "[unknown]", None, "perf-10958.map", None, None),
        ("[unknown]", "[unknown]", None, None, None, None),
        ("no module at all", "no module at all", None, None, None, None),
        ("operator[](int)+0x1 [libfoo.so]", "operator[](int)", 1, "libfoo.so", None, None),
    ],
)
def test_parse_frame(
    text: str, function: str, offset: int | None, module: str | None, file: str | None, line: int | None
) -> None:
    f = parse_frame(text)
    assert (f.function, f.offset, f.module, f.file, f.line) == (function, offset, module, file, line)
    assert f.text == text


def test_with_source_reads_back() -> None:
    text = with_source("main.handleConn+0x226 [goserver]", "/srv/demo/go/server/main.go", 22)
    f = parse_frame(text)
    assert (f.function, f.module, f.file, f.line) == (
        "main.handleConn",
        "goserver",
        "/srv/demo/go/server/main.go",
        22,
    )
    assert f.label() == "main.handleConn (main.go:22)"


@given(st.text())
def test_any_frame_string_parses_and_classifies(text: str) -> None:
    f = parse_frame(text)
    assert f.text == text
    classify([text], [text])
    classify_flat([text, text])


@given(
    st.lists(
        st.sampled_from(
            ["[kernel]", "[bpf]", "[libc.so.6]", "[app]", " at x.c:1", "+0x1", "JS:~", "py::", " "]
        ),
        max_size=8,
    )
)
def test_frame_string_pieces_never_raise(pieces: list[str]) -> None:
    text = "".join(pieces)
    stack = classify_flat([text, "main+0x1 [app]"])
    assert stack.frames[-1].category is Category.APP


# --- categories ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("accept+0x4f [libc.so.6]", Category.LIBC),
        ("__GI_write+0x4f [libc.so.6]", Category.LIBC),
        ("_dl_start_user+0x0 [ld-linux-x86-64.so.2]", Category.LIBC),
        ("pthread_cond_wait+0x10 [libpthread.so.0]", Category.LIBC),
        ("__libc_start_call_main+0x7a [static_app]", Category.LIBC),
        (
            "std::thread::_State_impl<std::thread::_Invoker<std::tuple<void (*)()> > >::_M_run()+0x10 [app]",
            Category.LIBC,
        ),
        (
            "void std::__invoke_impl<void, void (*)()>(std::__invoke_other, void (*&&)())+0x9 [app]",
            Category.LIBC,
        ),
        ("MyServer::handle(std::string const&)+0x20 [app]", Category.APP),
        ("handle.part.0+0x20 [app]", Category.APP),
        ("handle.cold+0x3 [app]", Category.APP),
        ("runtime/internal/syscall.Syscall6+0xe [svc]", Category.RUNTIME),
        ("internal/poll.(*FD).Write+0x36e [svc]", Category.RUNTIME),
        ("fmt.Fprintf+0x9b [svc]", Category.RUNTIME),
        ("runtime.goexit.abi0+0x1 [svc]", Category.RUNTIME),
        ("main.(*Server).handle+0x40 [svc]", Category.APP),
        ("main.main.func2+0x2a [svc]", Category.APP),
        ("github.com/acme/svc/api.(*Handler).ServeHTTP+0x10 [svc]", Category.APP),
        ("uv__stream_io+0xa0 [node]", Category.RUNTIME),
        ("Builtins_InterpreterEntryTrampoline+0xdc [node]", Category.RUNTIME),
        ("uv_run+0x187 [libuv.so.1]", Category.RUNTIME),
        ("napi_call_function+0x10 [libnode.so.108]", Category.RUNTIME),
        ("JS:~handleWriteReq node:internal/stream_base_commons:46:24+0xdc [perf-7.map]", Category.RUNTIME),
        ("JS:~rejectTooLarge /srv/demo/node/server.js:5:24+0xdc [perf-7.map]", Category.APP),
        ("JS:*query /srv/demo/node/node_modules/pg/lib/client.js:9:3+0x10 [perf-7.map]", Category.LIBRARY),
        ("Builtin:RecordWriteSaveFP+0x10 [perf-7.map]", Category.RUNTIME),
        ("jitted_leak_handler+0x10 [perf-7.map]", Category.APP),
        ("[unknown] [perf-7.map]", Category.UNKNOWN),
        ("_PyEval_EvalFrameDefault+0x1234 [libpython3.12.so.1.0]", Category.RUNTIME),
        ("_PyEval_EvalFrameDefault+0x1234 [python3.11]", Category.RUNTIME),
        ("sock_accept+0x10 [_socket.cpython-312-x86_64-linux-gnu.so]", Category.RUNTIME),
        ("py::handle_request:/srv/demo/pyserver.py+0x3 [perf-7.map]", Category.APP),
        ("py::_find_and_load:<frozen importlib._bootstrap>+0x3 [perf-7.map]", Category.RUNTIME),
        ("py::create_connection:/usr/lib/python3.12/socket.py+0x3 [perf-7.map]", Category.RUNTIME),
        ("py::request:/usr/lib/python3/dist-packages/requests/api.py+0x3 [perf-7.map]", Category.LIBRARY),
        ("py::get:/srv/venv/lib/python3.12/site-packages/httpx/_api.py+0x3 [perf-7.map]", Category.LIBRARY),
        ("curl_easy_perform+0x10 [libcurl.so.4]", Category.LIBRARY),
        ("Napi::Function::Call+0x10 [addon.node]", Category.LIBRARY),
        ("leak_connection+0x15 [leaky_server]", Category.APP),
    ],
)
def test_user_categories(text: str, category: Category) -> None:
    assert user_category(parse_frame(text)) is category


def test_go_dependencies_are_library_with_build_info() -> None:
    frame = parse_frame("github.com/lib/pq.(*conn).send+0x10 [svc]")
    assert user_category(frame) is Category.APP
    assert user_category(frame, library_prefixes("svc", ["github.com/lib/pq"])) is Category.LIBRARY
    # A binary of another name keeps its own copy of the package as its code.
    assert user_category(frame, library_prefixes("other", ["github.com/lib/pq"])) is Category.APP


def test_tracer_frames_are_dropped_everywhere() -> None:
    for case, data in STACKS.items():
        if case.startswith("_"):
            continue
        for s in data["samples"]:
            shown = classify(s["kstack"], s["ustack"])
            texts = " ".join(shown.texts)
            for own in ("bpf_prog_", "bpf_trace_run", "__traceiter_", "call_trace_sock"):
                assert own not in texts, (case, s["op"], texts)
            assert shown.dropped == len(s["kstack"]) - sum(1 for f in shown.frames if f.kernel)
            assert without_tracer_frames(s["kstack"] + s["ustack"]) == shown.texts


def test_tracer_names_in_user_code_are_kept() -> None:
    # Only kernel frames can be the tracer's: a user function of the same name is the app's.
    assert without_tracer_frames(["perf_trace_flush+0x1 [app]"]) == ("perf_trace_flush+0x1 [app]",)
    stack = classify([], ["bpf_prog_load+0x1 [app]"])
    assert stack.app_frame is not None and stack.app_frame.function == "bpf_prog_load"


# --- the application frame of real stacks --------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "op", "app"),
    [
        ("c_leaky_server", "RECV", "leak_connection"),
        ("c_leaky_server", "ACCEPT", "main"),
        ("c_leaky_server_perf_map", "RECV", "leak_connection"),
        ("go_server_error_path", "SEND", "main.handleConn"),
        ("go_server_error_path", "ACCEPT", "main.serveRaw"),
        ("go_http_client_unclosed_body", "RECV", None),
        ("go_http_client_unclosed_body", "CONNECT", None),
        ("node_half_open_named", "SEND", "rejectTooLarge"),
        ("node_half_open_named", "RECV", None),
        ("node_half_open_named", "ACCEPT", None),
        ("node_half_open_basic_prof", "SEND", None),
        ("python312_perf_no_frame_pointers", "SEND", None),
        ("python312_perf_no_frame_pointers", "ACCEPT", None),
        ("python311", "SEND", None),
    ],
)
def test_application_frame_of_real_stacks(case: str, op: str, app: str | None) -> None:
    s = sample(case, op)
    stack = classify(s["kstack"], s["ustack"])
    frame = stack.app_frame
    assert (frame.name if frame is not None else None) == app
    if frame is not None:
        # Every user frame inside the application frame is libc, runtime or unknown.
        inner = [f for f in stack.user[: stack.user.index(stack.frames[stack.app_index or 0])]]
        assert all(f.category in (Category.LIBC, Category.RUNTIME, Category.UNKNOWN) for f in inner)


def test_node_frames_of_a_real_write() -> None:
    s = sample("node_half_open_named", "SEND")
    stack = classify(s["kstack"], s["ustack"])
    app = stack.app_frame
    assert app is not None and app.label() == "rejectTooLarge (server.js:5:24)"
    assert app.file == "/srv/demo/node/server.js" and (app.line, app.column) == (5, 24)
    cats = {f.frame.name: f.category for f in stack.user}
    assert cats["handleWriteReq"] is Category.RUNTIME  # node:internal/stream_base_commons
    assert cats["Writable.write"] is Category.RUNTIME
    assert cats["onData"] is Category.APP
    assert cats["__GI_write"] is Category.LIBC
    assert all(f.category is Category.KERNEL for f in stack.frames if f.kernel)


def test_go_client_stack_is_all_runtime() -> None:
    s = sample("go_http_client_unclosed_body", "CONNECT")
    stack = classify(s["kstack"], s["ustack"])
    assert {f.category for f in stack.user} == {Category.RUNTIME}
    assert stack.library_frame is None


def test_json_of_a_classified_stack() -> None:
    s = sample("go_server_error_path", "SEND")
    out = classify(s["kstack"], s["ustack"]).to_json()
    assert out["app_frame"] == "main.handleConn+0x226 [goserver]"
    assert out["tracer_frames_dropped"] == 3  # bpf_prog_..., bpf_trace_run3, call_trace_sock_send_length
    assert len(out["frames"]) == len(out["categories"])  # type: ignore[arg-type]
    json.dumps(out)


def test_split_of_flat_stacks_matches_the_halves() -> None:
    for case, data in STACKS.items():
        if case.startswith("_"):
            continue
        for s in data["samples"]:
            flat = classify_flat(s["kstack"] + s["ustack"])
            assert flat == classify(s["kstack"], s["ustack"]), (case, s["op"])
