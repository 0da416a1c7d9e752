"""Recordings: the decoded event stream as JSON lines.

A recording is what ``tcptrace record`` and ``tcptrace states --json`` write::

    {"type": "header", "format": "tcptrace", "version": 2, "clock_offset_ns": ..., ...}
    {"type": "cgroup", "id": ..., "path": "/kubepods.slice/...", "pod": ..., ...}
    {"type": "process", "pid": ..., "nspid": ...}
    {"type": "stack", "id": 0, "frames": ["tcp_v4_connect+0x1f [kernel]", ...]}
    {"type": "transition", "ts_ns": ..., "old": "CLOSE", "new": "SYN_SENT", "kstack": 0, ...}
    {"type": "lost", "lost": ..., "new": ...}
    ...
    {"type": "summary", "events": ..., "lost": ..., ...}

``cgroup`` and ``process`` lines come before the first event that names the cgroup id or
the pid: the cgroup's path (and the pod and container names the node knew), the pid the
process has in its own pid namespace where it differs. With the header's ``host_netns``
they let a replay, on any host, name owners in container terms and filter by --cgroup and
--container as the live run did (model/workload.py ``KnownWorkloads``).

``ts_ns`` is the kernel's CLOCK_MONOTONIC; ``clock_offset_ns`` turns it into wall time.
Every analysis command replays a recording through the same model code as a live run.

A recording is hostile input (anyone may hand one over). It is read as a stream, one line
of at most MAX_LINE_BYTES at a time, and every field of every event is checked for its type
and range before the model sees it: numbers are integers of at most 64 bits (not floats,
NaN or 4,300 digits), states, ops and addresses are what they claim, and timestamps do not
go back by more than TS_BACK_TOLERANCE_NS. Objects that are not events (a command's
reports) are checked generically: nesting depth, numbers in range, text encodable.
Anything wrong is a RecordingError naming ``FILE:LINE``. Only regular files are read, or
``-`` (stdin), or a FIFO named explicitly, which must get a writer within FIFO_WAIT_S.

Stacks: an event's ``kstack``/``ustack`` is a list of frames, or (version 2, what
`record` writes) the id of a ``stack`` line earlier in the file, so that a stack taken on
every connection is stored once. Version 1 recordings (frames always inline) are read alike.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import os
import re
import select
import stat
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from tcptrace.errors import RecordingError
from tcptrace.model.events import (
    EVENT_TYPES,
    CloseFlag,
    Op,
    SocketEvent,
    TcpState,
    TwWhat,
    from_json,
    to_json,
)
from tcptrace.model.raw import MAX_STACK_REFS
from tcptrace.model.workload import KnownWorkloads, Whois, Workload, identify
from tcptrace.printable import printable

FORMAT = "tcptrace"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_STACKS = MAX_STACK_REFS
"""Distinct stacks a recording may name by id (what a writer names; more are inline)."""
MAX_STACK_CHARS = 64 << 20
"""Characters of frames a reader keeps for the stacks named by id."""


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


MAX_LINE_BYTES = 4 << 20
"""Longest line read (a closelat report of thousands of processes fits; an event is ~1 KiB)."""
MAX_DEPTH = 16
"""Deepest nesting of arrays and objects (a report needs 4)."""
TS_BACK_TOLERANCE_NS = 1_000_000_000
"""How far an event's ts_ns may be behind the latest one (events of several CPUs share one
ring buffer, in the order they were reserved: microseconds apart, never a second)."""
FIFO_WAIT_S = 10.0
"""How long a FIFO given to --from may go without a writer."""
MAX_FRAMES = 512
MAX_TABLE = 1 << 16
"""Most distinct cgroups, and pids, a recording's ``cgroup`` and ``process`` lines name."""
MAX_PATH = 4096
MAX_NAME = 253  # a Kubernetes name (DNS subdomain)
MAX_COMM = 64  # TASK_COMM_LEN bytes, each possibly shown as \\xNN

I64 = (-(1 << 63), (1 << 63) - 1)
U64 = (0, (1 << 64) - 1)
U32 = (0, (1 << 32) - 1)
TS = (0, (1 << 63) - 1)


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
    lost_lines: int = 0
    """The highest count of the ``lost`` lines read so far (each carries the total)."""
    ended: bool = False
    """True once every line was read."""
    warn: Callable[[str], None] | None = field(default=None, repr=False)
    """Where the warning of a recording cut short goes (default: a line on stderr)."""
    whois: KnownWorkloads = field(default_factory=KnownWorkloads)
    """What the recording's ``cgroup`` and ``process`` lines said so far, and its host's
    network namespace."""

    def cgroup_path(self, cgroup: int) -> str | None:
        """A cgroup id's path as the recording names it (what --cgroup is compared with)."""
        found = self.whois.cgroups.get(cgroup)
        return None if found is None else found.identity.path

    @property
    def clock_offset_ns(self) -> int:
        return int(self.header.get("clock_offset_ns", 0))

    @property
    def lost(self) -> int:
        """Events the recording lost: the summary's count, or more when its ``lost`` lines
        say so (a recording cut short has no summary; they are all it has)."""
        return max(int((self.summary or {}).get("lost", 0)), self.lost_lines)

    @property
    def cut_short(self) -> bool:
        """Read to its end without a summary line: the recorder was killed (SIGKILL, a
        dropped SSH session, a full disk), so what it saw last, losses included, is missing."""
        return self.ended and self.summary is None

    def events(self) -> Iterator[SocketEvent]:
        """The events in file order. RecordingError names the line of anything malformed."""
        latest = -1
        stacks = _Stacks()
        for lineno, line in self._lines:
            obj = _parse_line(self.path, lineno, line)
            kind = obj.get("type")
            if not isinstance(kind, str):
                raise RecordingError(f'{self.path}:{lineno}: object without a string "type"')
            if kind in EVENT_TYPES:
                _resolve_stacks(self.path, lineno, obj, stacks)
                _check_event(self.path, lineno, kind, obj, line)
                ts = obj["ts_ns"]
                if ts < latest - TS_BACK_TOLERANCE_NS:
                    raise RecordingError(
                        f"{self.path}:{lineno}: ts_ns {ts} is {(latest - ts) / 1e9:.3g} s before an "
                        "earlier event's: events out of order"
                    )
                latest = max(latest, ts)
                try:
                    yield from_json(obj)
                except (LookupError, ValueError, TypeError, ArithmeticError) as exc:
                    raise RecordingError(
                        f"{self.path}:{lineno}: not a valid {kind} event: {printable(str(exc))}"
                    ) from None
                continue
            _check_plain(self.path, lineno, obj, line)
            if kind == "header":
                raise RecordingError(f"{self.path}:{lineno}: a second header line")
            if kind == "stack":
                _add_stack(self.path, lineno, obj, stacks)
                continue
            if kind == "summary":
                _check_fields(self.path, lineno, obj, _SUMMARY)
                self.summary = obj
                continue
            if kind == "lost":
                _check_fields(self.path, lineno, obj, _LOST, ("lost",))
                self.lost_lines = max(self.lost_lines, obj["lost"])
                continue
            if kind in ("cgroup", "process"):
                self._table_line(lineno, kind, obj)
                continue
            # Objects of other kinds (periodic reports of analysis commands) are not
            # events; a recording may carry them and replay skips them.
            if self.on_report is not None:
                self._report(lineno, obj)
        self.ended = True
        if self.summary is None:
            (self.warn or _warn_stderr)(
                f"{self.path}: no summary line: the recording was cut short (its recorder was "
                f"stopped before the end); losses known: {self.lost}"
            )

    def _table_line(self, lineno: int, kind: str, obj: dict[str, Any]) -> None:
        table: dict[int, Any]
        if kind == "cgroup":
            _check_fields(self.path, lineno, obj, _CGROUP, ("id", "path"))
            table, key = self.whois.cgroups, obj["id"]
            value: Any = Workload(
                identify(obj["path"]), obj.get("pod"), obj.get("namespace"), obj.get("container")
            )
        else:
            _check_fields(self.path, lineno, obj, _PROCESS, ("pid", "nspid"))
            table, key, value = self.whois.nspids, obj["pid"], obj["nspid"]
        if key not in table and len(table) >= MAX_TABLE:
            raise RecordingError(f"{self.path}:{lineno}: more than {MAX_TABLE} {kind} lines")
        table[key] = value

    def _report(self, lineno: int, obj: dict[str, Any]) -> None:
        assert self.on_report is not None
        try:
            self.on_report(obj)
        except RecordingError as exc:
            # The consumer names the file; the line is known here.
            message = str(exc).removeprefix(f"{self.path}: ")
            raise RecordingError(f"{self.path}:{lineno}: {printable(message)}", exc.hint) from None
        except (LookupError, ValueError, TypeError, ArithmeticError) as exc:
            kind = printable(obj["type"])[:40]
            raise RecordingError(
                f"{self.path}:{lineno}: not a valid {kind} report: {printable(str(exc))}"
            ) from None


def _warn_stderr(message: str) -> None:
    print(f"tcptrace: warning: {message}", file=sys.stderr, flush=True)


class _BadNumber(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _BadNumber(f"{name} is not a number")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


@dataclass
class _Stacks:
    """The stacks a recording named so far, by id."""

    frames: dict[int, list[str]] = field(default_factory=dict)
    chars: int = 0


def _add_stack(path: str, lineno: int, obj: dict[str, Any], stacks: _Stacks) -> None:
    """Keep a ``stack`` line's frames under its id (at most MAX_STACKS of them, and
    MAX_STACK_CHARS of frames in all)."""
    ref = obj.get("id")
    if type(ref) is not int or not 0 <= ref < MAX_STACKS:
        raise RecordingError(f"{path}:{lineno}: a stack id must be an integer from 0 to {MAX_STACKS - 1}")
    problem = _frames(obj.get("frames"))
    if problem is not None:
        raise RecordingError(f"{path}:{lineno}: a stack's frames: {problem}")
    frames: list[str] = obj["frames"]
    if ref in stacks.frames:
        raise RecordingError(f"{path}:{lineno}: stack {ref} defined twice")
    stacks.chars += sum(map(len, frames))
    if stacks.chars > MAX_STACK_CHARS:
        raise RecordingError(f"{path}:{lineno}: more than {MAX_STACK_CHARS >> 20} MiB of stacks")
    stacks.frames[ref] = frames


def _resolve_stacks(path: str, lineno: int, obj: dict[str, Any], stacks: _Stacks) -> None:
    """An event's stacks given by id replaced with their frames."""
    for key in ("kstack", "ustack"):
        ref = obj.get(key)
        if type(ref) is int:
            frames = stacks.frames.get(ref)
            if frames is None:
                raise RecordingError(f"{path}:{lineno}: {key} {ref} names no stack line before it")
            obj[key] = frames


def _parse_line(path: str, lineno: int, line: str) -> dict[str, Any]:
    try:
        obj = _DECODER.decode(line)
    except json.JSONDecodeError as exc:
        hint = " (truncated?)" if not line.endswith("\n") else ""
        raise RecordingError(f"{path}:{lineno}: not JSON{hint}: {exc.msg}") from None
    except _BadNumber as exc:
        raise RecordingError(f"{path}:{lineno}: {exc}") from None
    except ValueError:  # an integer of more than 4,300 digits
        raise RecordingError(f"{path}:{lineno}: a number out of range") from None
    except RecursionError:
        raise RecordingError(f"{path}:{lineno}: nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(obj, dict):
        raise RecordingError(f"{path}:{lineno}: expected a JSON object")
    return obj


def _shown(value: Any) -> str:
    """A value in an error message: short, and escaped (it may be anything)."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    text = repr(value)
    return printable(text if len(text) <= 40 else text[:37] + "...")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_plain(path: str, lineno: int, obj: Any, line: str) -> None:
    """Any JSON value: nesting at most MAX_DEPTH, integers of 64 bits, finite floats, text
    that can be written back out (no lone surrogate, which only a \\u escape can make)."""
    escapes = "\\u" in line
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise RecordingError(f"{path}:{lineno}: nested deeper than {MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if escapes and isinstance(key, str) and _SURROGATE.search(key):
                    raise RecordingError(f"{path}:{lineno}: text with a lone surrogate")
                stack.append((item, depth + 1))
        elif type(value) is int:
            if not I64[0] <= value <= U64[1]:
                raise RecordingError(f"{path}:{lineno}: {_shown(value)}: a number out of range")
        elif type(value) is float:
            if not math.isfinite(value):
                raise RecordingError(f"{path}:{lineno}: a number out of range")
        elif escapes and isinstance(value, str) and _SURROGATE.search(value):
            raise RecordingError(f"{path}:{lineno}: text with a lone surrogate")


# Field checks: each returns what is wrong with a value, or None when it is fine.
Check = Callable[[Any], "str | None"]


def _int(lo: int, hi: int, null: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if value is None and null:
            return None
        if type(value) is not int:
            return "expected an integer" + (" or null" if null else "")
        if not lo <= value <= hi:
            return f"out of range ({lo}..{hi})"
        return None

    return check


def _text(limit: int, null: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if value is None and null:
            return None
        if not isinstance(value, str):
            return "expected text" + (" or null" if null else "")
        if len(value) > limit:
            return f"longer than {limit} characters"
        if _SURROGATE.search(value):
            return "text with a lone surrogate"
        return None

    return check


def _named(names: frozenset[str], numbers: frozenset[int], what: str, null: bool = False) -> Check:
    """A name (as recordings write it) or, as older recordings may, its number."""

    def check(value: Any) -> str | None:
        if value is None and null:
            return None
        if isinstance(value, str) and value in names:
            return None
        if type(value) is int and value in numbers:
            return None
        return f"not a {what}"

    return check


# TcpState.parse also takes "close-wait" and "TCP_CLOSE_WAIT"; recordings write names.
_STATE_NAMES = frozenset(
    spelling
    for s in TcpState
    for spelling in (s.name, s.name.lower(), s.name.replace("_", "-").lower(), f"TCP_{s.name}")
)


def _state(null: bool = False) -> Check:
    return _named(_STATE_NAMES, frozenset(s.value for s in TcpState), "TCP state", null)


@functools.lru_cache(maxsize=4096)
def _address_problem(value: str, family: int | None) -> str | None:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return "not an IP address"
    if family is not None and address.version != family:
        return f"not an IPv{family} address"
    return None


def _address(value: Any) -> str | None:
    if not isinstance(value, str):
        return "expected an IP address as text"
    if value == "":  # not known (the default)
        return None
    return _address_problem(value, None) if len(value) <= 45 else "not an IP address"


_HEX = re.compile(r"0[xX][0-9a-fA-F]{1,16}")


def _skaddr(value: Any) -> str | None:
    if type(value) is int:
        return None if U64[0] <= value <= U64[1] else "out of range (64 bits)"
    if type(value) is str and _HEX.fullmatch(value):
        return None
    return "expected a socket address as hex text (0x...)"


def _frames(value: Any) -> str | None:
    if type(value) is not list:
        return "expected a list of frames"
    if len(value) > MAX_FRAMES:
        return f"more than {MAX_FRAMES} frames"
    if not all(type(f) is str for f in value) or any(_SURROGATE.search(f) for f in value):
        return "expected a list of text frames"
    return None


_FLAG_NAMES = frozenset(f.name for f in CloseFlag if f.name)


def _flags(value: Any) -> str | None:
    if type(value) is not list or not all(type(x) is str and x in _FLAG_NAMES for x in value):
        return f"expected a list of flags ({', '.join(sorted(_FLAG_NAMES))})"
    return None


def _one_of(*allowed: int | str | None) -> Check:
    def check(value: Any) -> str | None:
        if (value is None or type(value) is str or type(value) is int) and value in allowed:
            return None
        return "expected one of " + ", ".join(json.dumps(a) for a in allowed)

    return check


def _bool_or_null(value: Any) -> str | None:
    return None if value is None or type(value) is bool else "expected true, false or null"


def _enum(cls: type[Op] | type[TwWhat], what: str) -> Check:
    return _named(frozenset(m.name for m in cls), frozenset(m.value for m in cls), what)


_NS = _int(*TS)
_NS_OR_NULL = _int(*TS, null=True)

_COMMON: dict[str, Check] = {
    "ts_ns": _NS,
    "skaddr": _skaddr,
    "family": _one_of(4, 6),
    "saddr": _address,
    "sport": _int(0, 65535),
    "daddr": _address,
    "dport": _int(0, 65535),
    "pid": _int(*U32, null=True),
    "comm": _text(MAX_COMM, null=True),
    "task_pid": _int(*U32),
    "task_tid": _int(*U32),
    "task_comm": _text(MAX_COMM),
    "cgroup": _int(*U64, null=True),
    "netns": _int(*U32, null=True),
    "pid_start_ns": _int(*U64, null=True),
    "kstack": _frames,
    "ustack": _frames,
    "kstack_id": _int(-(1 << 31), (1 << 31) - 1),
    "ustack_id": _int(-(1 << 31), (1 << 31) - 1),
}
_FIELDS: dict[str, dict[str, Check]] = {
    "transition": {
        **_COMMON,
        "old": _state(),
        "new": _state(),
        "prev_ns": _NS_OR_NULL,
        "sk_flags": _int(*U64),
    },
    "touch": {**_COMMON, "op": _enum(Op, "socket operation"), "ret": _int(*I64)},
    "close": {
        **_COMMON,
        "op": _enum(Op, "socket operation"),
        "duration_ns": _NS,
        "flags": _flags,
        "state": _state(null=True),
        "in_state_ns": _NS_OR_NULL,
        "sk_flags": _int(*U64),
        "ret": _int(*I64),
    },
    "timewait": {
        **_COMMON,
        "what": _enum(TwWhat, "timewait event"),
        "substate": _state(null=True),
        "created_as": _state(null=True),
        "age_ns": _NS_OR_NULL,
        "how": _one_of(None, "fin", "timer"),
        "port_bound": _bool_or_null,
    },
}
_REQUIRED = {
    "transition": ("ts_ns", "skaddr", "old", "new"),
    "touch": ("ts_ns", "skaddr", "op"),
    "close": ("ts_ns", "skaddr", "op", "duration_ns"),
    "timewait": ("ts_ns", "skaddr", "what"),
}
_SUMMARY: dict[str, Check] = {"lost": _int(*U64), "end_ns": _NS_OR_NULL, "events": _int(*U64, null=True)}
_LOST: dict[str, Check] = {"lost": _int(*U64), "new": _int(*U64)}
_HEADER: dict[str, Check] = {"clock_offset_ns": _int(*TS), "host_netns": _int(*U32, null=True)}


def _cgroup_path(value: Any) -> str | None:
    problem = _text(MAX_PATH)(value)
    if problem is None and not value.startswith("/"):
        return "not an absolute cgroup path"
    return problem


_CGROUP: dict[str, Check] = {
    "id": _int(*U64),
    "path": _cgroup_path,
    "pod": _text(MAX_NAME, null=True),
    "namespace": _text(MAX_NAME, null=True),
    "container": _text(MAX_NAME, null=True),
}
_PROCESS: dict[str, Check] = {"pid": _int(1, U32[1]), "nspid": _int(1, U32[1])}


def _check_fields(
    path: str, lineno: int, obj: dict[str, Any], checks: dict[str, Check], required: tuple[str, ...] = ()
) -> None:
    for key in required:
        if key not in obj:
            raise RecordingError(f"{path}:{lineno}: a {printable(obj['type'])[:40]} line without {key}")
    for key, check in checks.items():
        if key in obj:
            problem = check(obj[key])
            if problem is not None:
                raise RecordingError(f"{path}:{lineno}: {key}: {problem}, got {_shown(obj[key])}")


def _check_event(path: str, lineno: int, kind: str, obj: dict[str, Any], line: str) -> None:
    checks = _FIELDS[kind]
    _check_fields(path, lineno, obj, checks, _REQUIRED[kind])
    family = obj.get("family", 4)
    for key in ("saddr", "daddr"):
        value = obj.get(key)
        if value:
            problem = _address_problem(value, family)
            if problem is not None:
                raise RecordingError(f"{path}:{lineno}: {key}: {problem}, got {_shown(value)}")
    unknown = obj.keys() - checks.keys() - {"type"}
    if unknown:  # ignored by from_json, but bounded like everything else
        _check_plain(path, lineno, [obj[k] for k in unknown], line)


def open_recording(path: str) -> Recording:
    """Open a recording and read its header; RecordingError when it is not one."""
    handle = _open(path)
    lines = _numbered(path, handle)
    try:
        first = next(lines, None)
        if first is None:
            raise RecordingError(f"{path}: empty file, not a tcptrace recording")
        header = _parse_line(path, *first)
        if header.get("type") != "header" or header.get("format") != FORMAT:
            raise RecordingError(f"{path}:1: not a tcptrace recording (no header line)")
        version = header.get("version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            expected = " or ".join(map(str, READABLE_VERSIONS))
            raise RecordingError(f"{path}:1: recording version {_shown(version)}, expected {expected}")
        _check_plain(path, first[0], header, first[1])
        _check_fields(path, first[0], header, _HEADER)
    except BaseException:
        handle.close()
        raise
    recording = Recording(path=path, header=header, _lines=lines)
    recording.whois.host_netns = header.get("host_netns")
    return recording


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _open(path: str) -> IO[bytes]:
    """The recording's bytes: a regular file, stdin for ``-``, or a FIFO that gets a writer
    within FIFO_WAIT_S. Devices (``/dev/zero``), directories and sockets are refused, and
    not even opened (opening a device may act on it)."""
    if path == "-":
        try:
            return os.fdopen(os.dup(sys.stdin.fileno()), "rb")
        except (OSError, ValueError):  # a stdin without a descriptor (io.UnsupportedOperation)
            return sys.stdin.buffer
    try:
        kind = stat.S_IFMT(os.stat(path).st_mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO):
            raise RecordingError(
                f"{path}: {_KINDS.get(kind, 'not a regular file')}, not a recording",
                hint="give a file, a FIFO, or - for stdin",
            )
        # Non-blocking: opening a FIFO without a writer would block until one comes.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise RecordingError(f"cannot read recording {path}: {exc.strerror}") from None
    try:
        if stat.S_IFMT(os.fstat(fd).st_mode) != kind:  # replaced since the stat above
            raise RecordingError(f"{path}: changed while being opened")
        if kind == stat.S_IFIFO:
            _wait_for_writer(fd, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    # The file object owns the fd from here: closed here too after an exception that came
    # once fdopen had it (a KeyboardInterrupt), it would be closed twice, the second time
    # under whatever then held that number (a BPF program's fd in a live command).
    return os.fdopen(fd, "rb")


def _wait_for_writer(fd: int, path: str) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    # A FIFO that never had a writer reports nothing (no POLLHUP) until one opens it.
    if not poller.poll(int(FIFO_WAIT_S * 1000)):
        raise RecordingError(
            f"{path}: a FIFO that no writer opened within {FIFO_WAIT_S:g} s",
            hint="start the writer first, or give a file",
        )


def _numbered(path: str, handle: IO[bytes]) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their numbers, read one by one (at most MAX_LINE_BYTES each,
    so memory stays bounded whatever the file) and decoded so an error names its line."""
    with handle:
        lineno = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise RecordingError(f"{path}:{lineno}: a line longer than {MAX_LINE_BYTES >> 20} MiB")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RecordingError(f"{path}:{lineno}: not UTF-8 text") from None
            if line.strip():
                yield lineno, line


def summary_flags(source: object) -> dict[str, Any]:
    """What the JSON summary of a replay adds: ``"cut_short": true`` when the recording
    ended without its summary line. Nothing for a live run or a whole recording, whose
    summaries stay as they were."""
    recording = getattr(source, "recording", None)
    return {"cut_short": True} if isinstance(recording, Recording) and recording.cut_short else {}


class TextOut(Protocol):
    """Where a JsonLinesWriter writes: a text file, or a batch being made (model/raw.py)."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


class JsonLinesWriter:
    """Writes one JSON object a line and flushes each, so a reader or a pipe sees it at once.

    ``stack_refs``: each distinct non-empty stack is written once, as a ``stack`` line
    before the first event that has it, and events name it by id (up to MAX_STACKS; later
    new stacks stay inline). model/raw.JsonLines writes the same bytes from raw records.
    """

    def __init__(self, out: TextOut, stack_refs: bool = False) -> None:
        self._out = out
        self._refs: dict[tuple[str, ...], int] | None = {} if stack_refs else None

    def write(self, obj: dict[str, Any]) -> None:
        self._out.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._out.flush()

    def event(self, event: SocketEvent) -> None:
        obj = to_json(event)
        if self._refs is not None:
            for key in ("kstack", "ustack"):
                frames = tuple(obj[key])
                if not frames:
                    continue
                ref = self._refs.get(frames)
                if ref is None and len(self._refs) < MAX_STACKS:
                    ref = self._refs[frames] = len(self._refs)
                    self.write({"type": "stack", "id": ref, "frames": obj[key]})
                if ref is not None:
                    obj[key] = ref
        self.write(obj)


class WhoisLines:
    """Writes the ``cgroup`` and ``process`` lines a recording carries (see the module's
    docstring), each before the first event naming its cgroup id or pid: what ``whois`` says
    of them then. Ids already written are remembered in a bounded LRU (one forgotten is
    written again: a replay takes the last line)."""

    def __init__(self, whois: Whois, writer: JsonLinesWriter, remember: int = MAX_TABLE) -> None:
        self.whois = whois
        self.writer = writer
        self.remember = remember
        self._cgroups: OrderedDict[int, None] = OrderedDict()
        self._pids: OrderedDict[tuple[int, int | None], None] = OrderedDict()

    def before(self, event: SocketEvent) -> None:
        self.name(event.cgroup, event.pid, event.pid_start_ns)

    def name(self, cgroup: int | None, pid: int | None, pid_start_ns: int | None) -> None:
        """The lines for an event's cgroup id and owner (model/raw.py calls this with raw
        values, as ``before`` does with an event's)."""
        if cgroup is not None and self._first(self._cgroups, cgroup):
            found = self.whois.workload(cgroup)
            if found is not None:
                self.writer.write(
                    {
                        "type": "cgroup",
                        "id": cgroup,
                        "path": found.identity.path,
                        "pod": found.pod_name,
                        "namespace": found.namespace,
                        "container": found.container_name,
                    }
                )
        if pid is not None and self._first(self._pids, (pid, pid_start_ns)):
            nspid = self.whois.nspid(pid)
            if nspid is not None:
                self.writer.write({"type": "process", "pid": pid, "nspid": nspid})

    def _first(self, seen: OrderedDict[Any, None], key: Any) -> bool:
        if key in seen:
            seen.move_to_end(key)
            return False
        seen[key] = None
        if len(seen) > self.remember:
            seen.popitem(last=False)
        return True
