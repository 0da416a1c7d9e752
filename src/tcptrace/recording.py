"""Recordings: the decoded event stream as JSON lines.

A recording is what ``tcptrace record`` and ``tcptrace states --json`` write::

    {"type": "header", "format": "tcptrace", "version": 1, "clock_offset_ns": ..., ...}
    {"type": "transition", "ts_ns": ..., "old": "ESTABLISHED", "new": "FIN_WAIT1", ...}
    ...
    {"type": "summary", "events": ..., "lost": ..., ...}

``ts_ns`` is the kernel's CLOCK_MONOTONIC; ``clock_offset_ns`` turns it into wall time.
Every analysis command replays a recording through the same model code as a live run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from tcptrace.errors import RecordingError
from tcptrace.model.events import EVENT_TYPES, SocketEvent, from_json, to_json

FORMAT = "tcptrace"
VERSION = 1


def clock_offset_ns() -> int:
    """Wall clock minus CLOCK_MONOTONIC (the clock of bpf_ktime_get_ns), in ns."""
    return time.time_ns() - time.monotonic_ns()


def make_header(command: str, **extra: Any) -> dict[str, Any]:
    uname = os.uname()
    return {
        "type": "header",
        "format": FORMAT,
        "version": VERSION,
        "clock_offset_ns": clock_offset_ns(),
        "host": uname.nodename,
        "kernel": uname.release,
        "command": command,
        **extra,
    }


@dataclass
class Recording:
    """A recording being read: its header, then its events, lazily."""

    path: str
    header: dict[str, Any]
    summary: dict[str, Any] | None = None
    _lines: Iterator[tuple[int, str]] = field(default_factory=lambda: iter(()), repr=False)
    on_report: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False)
    """Called, in file order, with each object that is not an event (a command's periodic
    report, such as closelat's histograms), for commands that replay from reports."""

    @property
    def clock_offset_ns(self) -> int:
        return int(self.header.get("clock_offset_ns", 0))

    def events(self) -> Iterator[SocketEvent]:
        """The events in file order. RecordingError names the line of anything malformed."""
        for lineno, line in self._lines:
            obj = _parse_line(self.path, lineno, line)
            kind = obj.get("type")
            if not isinstance(kind, str):
                raise RecordingError(f'{self.path}:{lineno}: object without a string "type"')
            if kind == "summary":
                self.summary = obj
                continue
            if kind == "header":
                raise RecordingError(f"{self.path}:{lineno}: a second header line")
            if kind not in EVENT_TYPES:
                # Objects of other kinds (periodic reports of analysis commands) are not
                # events; a recording may carry them and replay skips them.
                if self.on_report is not None:
                    self.on_report(obj)
                continue
            try:
                yield from_json(obj)
            except (KeyError, ValueError, TypeError) as exc:
                raise RecordingError(f"{self.path}:{lineno}: not a valid {kind} event: {exc}") from None


def _parse_line(path: str, lineno: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        hint = " (truncated?)" if not line.endswith("\n") else ""
        raise RecordingError(f"{path}:{lineno}: not JSON{hint}: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise RecordingError(f"{path}:{lineno}: expected a JSON object")
    return obj


def open_recording(path: str) -> Recording:
    """Open a recording and read its header; RecordingError when it is not one."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by _numbered
    except OSError as exc:
        raise RecordingError(f"cannot read recording {path}: {exc.strerror}") from None
    lines = _numbered(path, handle)
    first = next(lines, None)
    if first is None:
        raise RecordingError(f"{path}: empty file, not a tcptrace recording")
    header = _parse_line(path, *first)
    if header.get("type") != "header" or header.get("format") != FORMAT:
        raise RecordingError(f"{path}:1: not a tcptrace recording (no header line)")
    if header.get("version") != VERSION:
        raise RecordingError(f"{path}:1: recording version {header.get('version')!r}, expected {VERSION}")
    return Recording(path=path, header=header, _lines=lines)


def _numbered(path: str, handle: IO[bytes]) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their numbers, decoded one by one so an error names its line."""
    with handle:
        for lineno, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RecordingError(f"{path}:{lineno}: not UTF-8 text") from None
            if line.strip():
                yield lineno, line


class JsonLinesWriter:
    """Writes one JSON object a line and flushes each, so a reader or a pipe sees it at once."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def write(self, obj: dict[str, Any]) -> None:
        self._out.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._out.flush()

    def event(self, event: SocketEvent) -> None:
        self.write(to_json(event))
