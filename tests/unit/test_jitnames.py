"""Perf-map names of Node.js 20 (--perf-basic-prof) and CPython 3.12 (-X perf), from real maps."""

from __future__ import annotations

from pathlib import Path

import pytest

from tcptrace.model.frames import Category, parse_frame, user_category
from tcptrace.model.jitnames import parse_jit_name, parse_perf_map

MAPS = Path(__file__).resolve().parent.parent / "data" / "perfmaps"


def entries(name: str) -> dict[str, str]:
    """name -> the frame string bcc would print for an address in it."""
    text = (MAPS / name).read_text()
    parsed = parse_perf_map(text)
    assert len(parsed) == len([line for line in text.splitlines() if line]), "every line of the sample parses"
    # A name can repeat (a function compiled again): any of its entries will do.
    return {e.name: f"{e.name}+0x{max(0, e.size - 1):x} [perf-4242.map]" for e in parsed}


def test_every_node_name_parses() -> None:
    for name, frame in entries("node20.map").items():
        jit = parse_jit_name(name)
        assert jit is not None and jit.runtime == "node", name
        f = parse_frame(frame)
        assert f.jit == jit
        if jit.kind in ("JS", "Eval"):
            assert f.file is not None and f.line is not None and f.column is not None, name


@pytest.mark.parametrize(
    ("name", "function", "file", "line", "column", "tier", "category"),
    [
        (
            "JS:~rejectTooLarge /srv/demo/node/server.js:5:24",
            "rejectTooLarge",
            "/srv/demo/node/server.js",
            5,
            24,
            "~",
            Category.APP,
        ),
        ("JS:~ /srv/demo/node/server.js:19:21", "", "/srv/demo/node/server.js", 19, 21, "~", Category.APP),
        ("JS:~get size /srv/demo/hot.js:2:23", "get size", "/srv/demo/hot.js", 2, 23, "~", Category.APP),
        ("JS:*hotAdd /srv/demo/hot.js:1:16", "hotAdd", "/srv/demo/hot.js", 1, 16, "*", Category.APP),
        ("JS:^hotAdd /srv/demo/hot.js:1:16", "hotAdd", "/srv/demo/hot.js", 1, 16, "^", Category.APP),
        (
            "JS:~prepareExecution node:internal/process/pre_execution:96:26",
            "prepareExecution",
            "node:internal/process/pre_execution",
            96,
            26,
            "~",
            Category.RUNTIME,
        ),
        (
            "Eval:~ node:internal/main/run_main_module:1:1",
            "",
            "node:internal/main/run_main_module",
            1,
            1,
            "~",
            Category.RUNTIME,
        ),
        ("Builtin:RecordWriteSaveFP", "RecordWriteSaveFP", None, None, None, "", Category.RUNTIME),
        ("BytecodeHandler:Wide", "Wide", None, None, None, "", Category.RUNTIME),
    ],
)
def test_node_names(
    name: str,
    function: str,
    file: str | None,
    line: int | None,
    column: int | None,
    tier: str,
    category: Category,
) -> None:
    frames = entries("node20.map")
    assert name in frames, "taken from the real map"
    jit = parse_jit_name(name)
    assert jit is not None
    assert (jit.function, jit.file, jit.line, jit.column, jit.tier) == (function, file, line, column, tier)
    assert user_category(parse_frame(frames[name])) is category


def test_python_names() -> None:
    frames = entries("python312.map")
    cats = {}
    for name, frame in frames.items():
        jit = parse_jit_name(name)
        assert jit is not None and jit.runtime == "python" and jit.line is None, name
        cats[jit.function, jit.file] = user_category(parse_frame(frame))
    assert cats["handle_request", "/srv/demo/pyserver.py"] is Category.APP
    assert cats["serve", "/srv/demo/pyserver.py"] is Category.APP
    assert cats["<module>", "/usr/local/lib/python3.12/socket.py"] is Category.RUNTIME
    assert cats["_find_and_load", "<frozen importlib._bootstrap>"] is Category.RUNTIME
    assert cats["_ModuleLockManager.__init__", "<frozen importlib._bootstrap>"] is Category.RUNTIME


@pytest.mark.parametrize(
    "name",
    [
        "",
        "JS:",
        "JS:~",
        "py::",
        "Builtin:",
        "LazyCompile:*x",
        "JS:~x y:z",
        ":::",
        "JS:~a /b:1:2:3:4",
        "py::a",
    ],
)
def test_odd_names_do_not_raise(name: str) -> None:
    parse_jit_name(name)
    parse_frame(name + "+0x1 [perf-1.map]")


def test_perf_map_lines() -> None:
    good = parse_perf_map("7f00 10 py::f:/a.py\nzz 10 x\n7f10 1\n\n7f20 zz y\n7f30 8 name with spaces\n")
    assert [(e.start, e.size, e.name) for e in good] == [
        (0x7F00, 16, "py::f:/a.py"),
        (0x7F30, 8, "name with spaces"),
    ]
