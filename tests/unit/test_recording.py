from __future__ import annotations

import io
import json
from pathlib import Path

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
