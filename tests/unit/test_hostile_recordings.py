"""Hostile recordings through every replaying command: one line `FILE:LINE: what`, exit 1.

A recording may come from anyone (a ticket attachment, a shared directory). Each mutation
below of a valid recording holding every kind of line (transitions, touches, timewait
events, close() calls, closelat reports, interval reports, a summary) is replayed by
states, closewait, timewait, closelat, top and diagnose through the CLI: each must fail
with exit 1 and exactly one line naming the file and the line, never a traceback, a hang
or unbounded memory. The first 19 are the attack run's of issue #18, the rest our own.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from click.testing import CliRunner

from tcptrace import recording
from tcptrace.cli import cli
from tcptrace.errors import RecordingError
from tcptrace.recording import open_recording

COMMANDS = ["states", "closewait", "timewait", "closelat", "top", "diagnose"]
RAW = "@@RAW@@"
NS = 1_000_000_000


class Hung(Exception):
    pass


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    """Not a timing assertion: a replay that spins forever fails here instead of hanging."""

    def alarm(_signum: int, _frame: FrameType | None) -> None:
        raise Hung("a replay did not finish within 60 s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def mixed_lines(data_dir: Path) -> list[dict[str, Any]]:
    """One valid recording of every kind of line: the three recordings of tests/data,
    their timestamps shifted so that each starts a second after the one before."""
    header = json.loads((data_dir / "timewait_mix.jsonl").read_text().splitlines()[0])
    header["command"] = "record"
    out: list[dict[str, Any]] = [header]
    shift_to = 1_000 * NS
    for name in ("closewait_leaky", "closelat_linger_reset", "timewait_mix"):
        objs = [json.loads(x) for x in (data_dir / f"{name}.jsonl").read_text().splitlines()]
        body = [o for o in objs if o["type"] not in ("header", "summary")]
        first = min(o["ts_ns"] for o in body)
        for o in body:
            o["ts_ns"] += shift_to - first
        out += body
        shift_to = max(o["ts_ns"] for o in body) + NS
    out.append({"type": "summary", "command": "record", "stopped": "duration", "end_ns": shift_to, "lost": 0})
    return out


def write(path: Path, objs: list[Any], raw: str | None = None) -> Path:
    text = "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)
    if raw is not None:
        text = text.replace(json.dumps(RAW), raw, 1)
    path.write_text(text)
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a failure of its own
    return result.exit_code, result.stdout, result.stderr


def first(objs: list[dict[str, Any]], pred: Callable[[dict[str, Any]], bool]) -> int:
    return next(i for i, o in enumerate(objs) if pred(o))


def kind(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda o: o["type"] == name


def has(key: str) -> Callable[[dict[str, Any]], bool]:
    return lambda o: key in o and o["type"] != "header"


# (id, which line, what to set (RAW: the raw text given last), raw JSON text)
Mutation = tuple[str, Callable[[dict[str, Any]], bool], Callable[[dict[str, Any]], None], str | None]


def setting(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda o: o.__setitem__(key, value)


DEEP = "[" * 200_000 + "]" * 200_000
MUTATIONS: list[Mutation] = [
    # The attack run's (issue #18).
    ("clock_offset_ns abc", kind("header"), setting("clock_offset_ns", "abc"), None),
    ("clock_offset_ns NaN", kind("header"), setting("clock_offset_ns", RAW), "NaN"),
    ("clock_offset_ns 1e400", kind("header"), setting("clock_offset_ns", RAW), "1e400"),
    ("summary lost x", kind("summary"), setting("lost", "x"), None),
    ("summary lost []", kind("summary"), setting("lost", []), None),
    ("lost line lost x", kind("lost"), setting("lost", "x"), None),
    ("lost line lost []", kind("lost"), setting("lost", []), None),
    ("old []", kind("transition"), setting("old", []), None),
    ("skaddr 1e400", kind("transition"), setting("skaddr", RAW), "1e400"),
    ("integer of 4400 digits", kind("transition"), setting("ts_ns", RAW), "9" * 4400),
    ("200000-deep nesting", kind("touch"), setting("extra", RAW), DEEP),
    ("comm 5", kind("transition"), setting("comm", 5), None),
    ("prev_ns x", has("prev_ns"), setting("prev_ns", "x"), None),
    ("negative ts_ns", kind("timewait"), setting("ts_ns", -5), None),
    ("task_comm []", kind("close"), setting("task_comm", []), None),
    ("sport NaN", kind("touch"), setting("sport", RAW), "NaN"),
    ("what []", kind("timewait"), setting("what", []), None),
    ("flags 7", kind("close"), setting("flags", 7), None),
    ("duration_ns -Infinity", kind("close"), setting("duration_ns", RAW), "-Infinity"),
    # Our own.
    ("clock_offset_ns negative", kind("header"), setting("clock_offset_ns", -1), None),
    ("old true", kind("transition"), setting("old", True), None),
    ("new 99", kind("transition"), setting("new", 99), None),
    ("skaddr not hex", kind("touch"), setting("skaddr", "0xnope"), None),
    ("skaddr 2**64", kind("touch"), setting("skaddr", 2**64), None),
    ("ts_ns float", kind("transition"), setting("ts_ns", 1.5), None),
    ("ts_ns text", kind("timewait"), setting("ts_ns", "5"), None),
    ("ts_ns 2**63", kind("transition"), setting("ts_ns", 2**63), None),
    ("family 5", kind("transition"), setting("family", 5), None),
    ("saddr markup", kind("transition"), setting("saddr", "[/x]"), None),
    ("daddr of the other family", kind("touch"), setting("daddr", "::1"), None),
    ("pid 2**40", kind("touch"), setting("pid", 2**40), None),
    ("comm of 1000 characters", kind("timewait"), setting("comm", "x" * 1000), None),
    ("comm lone surrogate", kind("transition"), setting("comm", RAW), '"\\ud800x"'),
    ("kstack text", kind("transition"), setting("kstack", "abc"), None),
    ("ustack of numbers", kind("touch"), setting("ustack", [1, 2]), None),
    ("how other", kind("timewait"), setting("how", "other"), None),
    ("op unknown", kind("close"), setting("op", "EXPLODE"), None),
    ("state object", kind("close"), setting("state", {}), None),
    ("sk_flags negative", kind("transition"), setting("sk_flags", -1), None),
    ("cgroup text", kind("transition"), setting("cgroup", "x"), None),
    ("report 17-deep", kind("closelat"), setting("extra", RAW), "[" * 17 + "]" * 17),
    ("report number 1e400", kind("interval"), setting("extra", RAW), "1e400"),
    ("report 2**70", kind("closelat"), setting("extra", 2**70), None),
    ("lost line without its count", kind("lost"), lambda o: o.pop("lost"), None),
    ("event without skaddr", kind("timewait"), lambda o: o.pop("skaddr"), None),
    ("summary end_ns text", kind("summary"), setting("end_ns", "later"), None),
]


@pytest.fixture
def mixed(data_dir: Path) -> list[dict[str, Any]]:
    objs = mixed_lines(data_dir)
    # A `lost` line, as `record` writes one when the ring buffer overflowed.
    i = first(objs, kind("touch"))
    objs.insert(i, {"type": "lost", "lost": 4, "new": 4})
    return objs


@pytest.mark.parametrize("command", COMMANDS)
def test_the_mixed_recording_replays_cleanly(
    tmp_path: Path, mixed: list[dict[str, Any]], command: str
) -> None:
    path = write(tmp_path / "ok.jsonl", mixed)
    code, out, err = invoke(command, "--from", str(path))
    assert code == 0, err
    assert err.count("warning") == 0


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_mutation_is_one_line_naming_file_and_line(
    tmp_path: Path, mixed: list[dict[str, Any]], mutation: Mutation
) -> None:
    _name, which, change, raw = mutation
    index = first(mixed, which)
    change(mixed[index])
    path = write(tmp_path / "bad.jsonl", mixed, raw)
    for command in COMMANDS:
        code, out, err = (
            invoke(command, "--json", "--from", str(path))
            if command != "top"
            else invoke(command, "--from", str(path))
        )
        assert code == 1, f"{command}: exit {code}: {err}"
        assert err.count("\n") == 1, f"{command}: {err}"
        assert err.startswith(f"tcptrace: error: {path}:{index + 1}: "), f"{command}: {err}"
        assert len(err) < 300 and "\x1b" not in err


@pytest.mark.parametrize("command", COMMANDS)
def test_events_1e18_ns_apart_replay_in_bounded_time(
    tmp_path: Path, mixed: list[dict[str, Any]], command: str
) -> None:
    i = first(mixed, kind("timewait"))
    for o in mixed[i:]:
        if "ts_ns" in o:
            o["ts_ns"] += 10**18
    mixed[-1]["end_ns"] += 10**18
    code, _, err = invoke(command, "--from", str(write(tmp_path / "far.jsonl", mixed)))
    assert code == 0, err


def test_events_going_back_beyond_the_tolerance(tmp_path: Path, mixed: list[dict[str, Any]]) -> None:
    i = first(mixed, kind("timewait"))
    mixed[i + 1]["ts_ns"] = mixed[i]["ts_ns"] - 2 * NS
    path = write(tmp_path / "back.jsonl", mixed)
    code, _, err = invoke("states", "--from", str(path))
    assert code == 1 and err.startswith(f"tcptrace: error: {path}:{i + 2}: ts_ns ")
    mixed[i + 1]["ts_ns"] = mixed[i]["ts_ns"] - NS // 2  # within the tolerance
    assert invoke("states", "--from", str(write(path, mixed)))[0] == 0


@pytest.mark.parametrize("command", ["states", "closewait", "timewait", "closelat", "diagnose"])
def test_a_recording_cut_short_says_so_and_keeps_its_losses(
    tmp_path: Path, mixed: list[dict[str, Any]], command: str
) -> None:
    mixed.pop()  # no summary: the recorder was killed
    mixed.insert(-3, {"type": "lost", "lost": 9, "new": 5})
    path = write(tmp_path / "cut.jsonl", mixed)
    code, out, err = invoke(command, "--json", "--from", str(path))
    assert code == 0, err
    assert err == (
        f"tcptrace: warning: {path}: no summary line: the recording was cut short (its "
        "recorder was stopped before the end); losses known: 9\n"
    )
    summary = json.loads(out.splitlines()[-1])
    assert summary["type"] == "summary" and summary["cut_short"] is True and summary["lost"] == 9


@pytest.mark.parametrize("command", ["states", "closewait", "top", "diagnose"])
def test_text_summaries_count_the_losses_of_lost_lines(
    tmp_path: Path, mixed: list[dict[str, Any]], command: str
) -> None:
    mixed[-1]["lost"] = 2  # the summary says less than a `lost` line (4): the maximum wins
    code, out, err = invoke(command, "--from", str(write(tmp_path / "l.jsonl", mixed)))
    assert code == 0
    assert any(s in out + err for s in ("4 lost", "4 events lost", "lost 4", "events lost: 4")), out + err


def test_whole_recordings_keep_their_summaries(tmp_path: Path, mixed: list[dict[str, Any]]) -> None:
    code, out, _ = invoke("states", "--json", "--from", str(write(tmp_path / "ok.jsonl", mixed)))
    assert code == 0 and "cut_short" not in out.splitlines()[-1]


# ---- files that are not recordings ----------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_dev_zero_is_refused_at_once(command: str) -> None:
    code, _, err = invoke(command, "--from", "/dev/zero")
    assert code == 1 and err.startswith("tcptrace: error: /dev/zero: a character device, not a recording"), (
        err
    )
    assert err.count("\n") == 1


def test_a_directory_or_a_socket_is_not_a_recording(tmp_path: Path) -> None:
    import socket

    with pytest.raises(RecordingError, match="a directory, not a recording"):
        open_recording(str(tmp_path))
    sock_path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(RecordingError, match="a socket, not a recording"):
            open_recording(str(sock_path))


def test_a_fifo_without_writer_is_an_error_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recording, "FIFO_WAIT_S", 0.2)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = invoke("states", "--from", str(fifo))
    assert code == 1 and "a FIFO that no writer opened within 0.2 s" in err


def test_a_fifo_with_a_writer_is_read(tmp_path: Path, data_dir: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = (data_dir / "lifecycle_basic.jsonl").read_bytes()

    def writer() -> None:
        with open(fifo, "wb") as fh:
            fh.write(data)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert len(list(open_recording(str(fifo)).events())) == 44
    finally:
        thread.join()


def test_stdin_is_read_when_named_dash(data_dir: Path) -> None:
    data = (data_dir / "lifecycle_basic.jsonl").read_text()
    result = CliRunner().invoke(cli, ["states", "--json", "--from", "-"], input=data)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count('"type":"transition"') == 44


def test_a_line_too_long_is_refused_before_it_is_read_whole(tmp_path: Path, data_dir: Path) -> None:
    """A file of zeros without a newline (what /dev/zero would give): memory stays bounded
    by MAX_LINE_BYTES. The file is sparse: 64 GiB on no disk."""
    path = tmp_path / "zeros.jsonl"
    with open(path, "wb") as fh:
        fh.write((data_dir / "lifecycle_basic.jsonl").read_bytes()[:1000].split(b"\n")[0] + b"\n")
        fh.truncate(64 << 30)
    assert stat.S_ISREG(path.stat().st_mode)
    rec = open_recording(str(path))
    with pytest.raises(RecordingError, match=rf"{path}:2: a line longer than 4 MiB"):
        list(rec.events())


def test_error_messages_escape_what_the_recording_holds(tmp_path: Path, mixed: list[dict[str, Any]]) -> None:
    i = first(mixed, kind("transition"))
    mixed[i]["new"] = "\x1b[2J\x1b]8;;http://e\x07"
    code, _, err = invoke("states", "--from", str(write(tmp_path / "esc.jsonl", mixed)))
    assert code == 1 and "\x1b" not in err and "\\x1b[2J" in err


def test_memory_stays_bounded_under_a_resource_limit(tmp_path: Path, data_dir: Path) -> None:
    """64 GiB of zeros after a header (a sparse file), replayed with 1 GiB of address space:
    a clean error, where reading a whole line would need 64 GiB."""
    import resource
    import subprocess
    import sys

    path = tmp_path / "zeros.jsonl"
    with open(path, "wb") as fh:
        fh.write((data_dir / "lifecycle_basic.jsonl").read_bytes().split(b"\n")[0] + b"\n")
        fh.truncate(64 << 30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    proc = subprocess.run(
        [sys.executable, "-m", "tcptrace", "states", "--from", str(path)],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"tcptrace: error: {path}:2: a line longer than 4 MiB\n"
