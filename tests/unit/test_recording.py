from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from tcptrace.errors import RecordingError
from tcptrace.model.events import to_json
from tcptrace.recording import JsonLinesWriter, make_header, open_recording

SAMPLE = "lifecycle_basic.jsonl"


def lines_of(data_dir: Path) -> list[str]:
    return (data_dir / SAMPLE).read_text().splitlines(keepends=True)


def write(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "rec.jsonl"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def test_reads_header_events_and_summary(data_dir: Path) -> None:
    rec = open_recording(str(data_dir / SAMPLE))
    assert rec.header["kernel"] and rec.clock_offset_ns > 0
    events = list(rec.events())
    assert len(events) == 44
    assert rec.summary is not None and rec.summary["events"] == 44 and rec.summary["lost"] == 0
    assert [e.ts_ns for e in events] == sorted(e.ts_ns for e in events)


def test_writer_output_reads_back(tmp_path: Path, data_dir: Path) -> None:
    events = list(open_recording(str(data_dir / SAMPLE)).events())
    buf = io.StringIO()
    writer = JsonLinesWriter(buf)
    writer.write(make_header("test"))
    for ev in events:
        writer.event(ev)
    writer.write({"type": "summary", "lost": 3})
    rec = open_recording(write(tmp_path, buf.getvalue()))
    assert list(rec.events()) == events
    assert rec.summary == {"type": "summary", "lost": 3}


def test_not_json_names_the_line(tmp_path: Path, data_dir: Path) -> None:
    lines = lines_of(data_dir)
    lines[5] = "{oops\n"
    rec = open_recording(write(tmp_path, "".join(lines)))
    with pytest.raises(RecordingError, match=r"rec.jsonl:6: not JSON"):
        list(rec.events())


def test_truncated_last_line_says_so(tmp_path: Path, data_dir: Path) -> None:
    text = "".join(lines_of(data_dir)[:10])
    rec = open_recording(write(tmp_path, text[:-40]))
    with pytest.raises(RecordingError, match=r":10: not JSON \(truncated\?\)"):
        list(rec.events())


def test_invalid_event_names_the_line(tmp_path: Path, data_dir: Path) -> None:
    lines = lines_of(data_dir)
    obj = json.loads(lines[3])
    obj["new"] = "HALF_CLOSED"
    lines[3] = json.dumps(obj) + "\n"
    with pytest.raises(RecordingError, match=r":4: new: not a TCP state, got 'HALF_CLOSED'"):
        list(open_recording(write(tmp_path, "".join(lines))).events())


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        ('{"type": "transition"}\n', "no header line"),
        ('{"type": "header", "format": "tcptrace", "version": 99}\n', "version 99"),
        ("[1, 2]\n", "expected a JSON object"),
        (b'{"type": "header", "format": "tcptrace", "version": 1}\n\xff\xfe\n', ":2: not UTF-8"),
    ],
)
def test_not_a_recording(tmp_path: Path, content: str | bytes, message: str) -> None:
    with pytest.raises(RecordingError, match=message):
        list(open_recording(write(tmp_path, content)).events())


def test_second_header_is_an_error(tmp_path: Path, data_dir: Path) -> None:
    lines = lines_of(data_dir)
    text = "".join(lines[:3] + lines[:1] + lines[3:])
    with pytest.raises(RecordingError, match=":4: a second header"):
        list(open_recording(write(tmp_path, text)).events())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="cannot read recording"):
        open_recording(str(tmp_path / "nope.jsonl"))


def test_objects_of_other_types_are_skipped(tmp_path: Path, data_dir: Path) -> None:
    lines = lines_of(data_dir)
    text = "".join(lines[:2] + ['{"type": "interval", "created": 3}\n'] + lines[2:])
    assert len(list(open_recording(write(tmp_path, text)).events())) == 44


def test_json_output_escapes_hostile_comm(tmp_path: Path, data_dir: Path) -> None:
    ev = next(open_recording(str(data_dir / SAMPLE)).events())
    import dataclasses

    hostile = dataclasses.replace(ev, comm='\x1b[31m"evil"\n[red]x\\')
    buf = io.StringIO()
    JsonLinesWriter(buf).event(hostile)
    assert buf.getvalue().count("\n") == 1
    assert json.loads(buf.getvalue())["comm"] == hostile.comm
    assert to_json(hostile)["comm"] == hostile.comm


def test_comm_bytes_round_trip_losslessly_through_a_recording(tmp_path: Path, data_dir: Path) -> None:
    """JSON stays lossless: a comm with bytes that are not UTF-8 (kept as \\xNN text by
    decode_comm), a terminal escape and a carriage return comes back exactly from a
    recording, one line each; only views escape it."""
    import dataclasses

    from tcptrace.model.events import decode_comm
    from tcptrace.views.common import safe

    comm = decode_comm(b"a\xff\xfeb\x1b[2J\r\0junk")
    assert comm == "a\\xff\\xfeb\x1b[2J\r"
    ev = dataclasses.replace(next(open_recording(str(data_dir / SAMPLE)).events()), comm=comm, task_comm=comm)
    buf = io.StringIO()
    writer = JsonLinesWriter(buf)
    writer.write(make_header("test"))
    writer.event(ev)
    assert buf.getvalue().count("\n") == 2
    back = list(open_recording(write(tmp_path, buf.getvalue())).events())
    assert back == [ev] and back[0].comm == comm
    assert safe(back[0].comm) == "a\\xff\\xfeb\\x1b[2J\\x0d"


STACKED = "closewait_leaky.jsonl"  # a version 1 recording with stacks inline


def with_stack_refs(data_dir: Path) -> tuple[list[str], list[object]]:
    """The stacked recording rewritten as `record` writes it now: stacks once, by id."""
    recording = open_recording(str(data_dir / STACKED))
    events = list(recording.events())
    buf = io.StringIO()
    writer = JsonLinesWriter(buf, stack_refs=True)
    writer.write({**recording.header, "version": 2})
    for event in events:
        writer.event(event)
    writer.write(recording.summary or {"type": "summary", "lost": 0})
    return buf.getvalue().splitlines(keepends=True), list(events)


def test_stacks_by_id_read_back_as_the_same_events(tmp_path: Path, data_dir: Path) -> None:
    lines, events = with_stack_refs(data_dir)
    stacks = [json.loads(line) for line in lines if '"type":"stack"' in line]
    assert stacks and [s["id"] for s in stacks] == list(range(len(stacks)))
    assert len({tuple(s["frames"]) for s in stacks}) == len(stacks)  # each stored once
    assert sum(map(len, lines)) < len((data_dir / STACKED).read_text())
    assert list(open_recording(write(tmp_path, "".join(lines))).events()) == events


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda obj: {**obj, "id": 99}, r"kstack \d+ names no stack line before it|ustack"),
        (lambda obj: {**obj, "id": -1}, "a stack id must be an integer"),
        (lambda obj: {**obj, "id": "0"}, "a stack id must be an integer"),
        (lambda obj: {**obj, "frames": "tcp_close"}, "a stack.s frames: expected a list of frames"),
        (lambda obj: {**obj, "frames": [1, 2]}, "a stack.s frames: expected a list of text frames"),
        (lambda obj: {**obj, "frames": ["f"] * 513}, "a stack.s frames: more than 512 frames"),
    ],
    ids=["undefined id", "negative id", "id as text", "frames as text", "frames as numbers", "too deep"],
)
def test_bad_stack_lines_name_the_line(tmp_path: Path, data_dir: Path, change: Any, message: str) -> None:
    lines, _ = with_stack_refs(data_dir)
    first = next(i for i, line in enumerate(lines) if '"type":"stack"' in line)
    lines[first] = json.dumps(change(json.loads(lines[first]))) + "\n"
    with pytest.raises(RecordingError, match=rf"rec.jsonl:\d+: ({message})"):
        list(open_recording(write(tmp_path, "".join(lines))).events())


def test_stacks_by_id_are_bounded_in_all(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data_dir: Path
) -> None:
    from tcptrace import recording

    monkeypatch.setattr(recording, "MAX_STACK_CHARS", 100)
    lines, _ = with_stack_refs(data_dir)
    with pytest.raises(RecordingError, match="more than 0 MiB of stacks"):
        list(open_recording(write(tmp_path, "".join(lines))).events())


def test_a_stack_defined_twice_is_an_error(tmp_path: Path, data_dir: Path) -> None:
    lines, _ = with_stack_refs(data_dir)
    first = next(i for i, line in enumerate(lines) if '"type":"stack"' in line)
    lines.insert(first + 1, lines[first])
    with pytest.raises(RecordingError, match=rf":{first + 2}: stack 0 defined twice"):
        list(open_recording(write(tmp_path, "".join(lines))).events())


def test_past_the_limit_stacks_stay_inline(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    from tcptrace import recording

    monkeypatch.setattr(recording, "MAX_STACKS", 2)
    lines, events = with_stack_refs(data_dir)
    assert sum('"type":"stack"' in line for line in lines) == 2
    stacked = [json.loads(line) for line in lines if '"kstack":[' in line and '"kstack":[]' not in line]
    assert stacked  # the third distinct stack on is written in full


def test_versions_one_and_two_are_read(tmp_path: Path, data_dir: Path) -> None:
    lines = lines_of(data_dir)
    for version in (1, 2):
        header = {**json.loads(lines[0]), "version": version}
        text = json.dumps(header) + "\n" + "".join(lines[1:])
        assert len(list(open_recording(write(tmp_path, text)).events())) == 44


@pytest.mark.parametrize(
    "command",
    [
        ["states", "--json"],
        ["closewait", "--json", "--threshold", "100ms"],
        ["timewait", "--json"],
        ["diagnose", "--json"],
    ],
    ids=lambda c: c[0],
)
def test_analyses_of_a_recording_do_not_change_with_stacks_by_id(
    command: list[str], tmp_path: Path, data_dir: Path
) -> None:
    from click.testing import CliRunner

    from tcptrace.cli import cli

    lines, _ = with_stack_refs(data_dir)
    new = tmp_path / "new.jsonl"
    new.write_text("".join(lines))
    old = tmp_path / "old.jsonl"
    old.write_text((data_dir / STACKED).read_text())
    outputs = []
    for path in (old, new):
        result = CliRunner().invoke(cli, [*command, "--from", str(path)], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
        outputs.append([json.loads(line) for line in result.stdout.splitlines()][1:])  # after the header
    assert outputs[0] == outputs[1] and outputs[0]
