"""Formatting shared by every view.

Text from the kernel, /proc or a recording (process names, paths, cgroup names, symbols,
addresses) is hostile: it reaches rich only as ``Text`` (``host_text``, or ``safe`` appended
to a ``Text``), never as a ``str`` that rich would read as markup or emoji codes, and its
non-printable characters are shown escaped (tcptrace.printable). A ``str`` handed to
``Console.print``, a table cell or a ``Group`` is markup to rich: views build ``Text``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from rich.console import Console
from rich.live import Live
from rich.style import StyleType
from rich.text import Text

from tcptrace.printable import printable

NS = 1_000_000_000
SPARK = "▁▂▃▄▅▆▇█"


def safe(text: str | None) -> str:
    """Non-printable characters (terminal escapes, newlines, bidi overrides) shown escaped;
    ``-`` for None. Append the result to a ``Text``; never hand it to rich as a ``str``."""
    if text is None:
        return "-"
    return printable(text)


_unknown_owner_why: str | None = None


def explain_unknown_owners(why: str | None) -> None:
    """Say, for the rest of the run, why an owner read from /proc may be unknown ("needs
    CAP_SYS_PTRACE"): set by a live session, None for a replay or a privileged run."""
    global _unknown_owner_why
    _unknown_owner_why = why


def unknown_owner() -> str:
    """The text of an owner that is not known: never a bare ``-``, and with what it would
    take to know it when that is the reason (another user's process, without the
    capabilities that read its /proc/PID/fd)."""
    return f"unknown ({_unknown_owner_why})" if _unknown_owner_why else "unknown"


def host_text(text: str | None, style: StyleType = "", width: int | None = None) -> Text:
    """Host-supplied text as a rich ``Text``: never markup, non-printables escaped, cut to
    ``width`` characters (of the escaped form) when given.

    >>> host_text("[bold red]x\\x1b").plain
    '[bold red]x\\\\x1b'
    """
    shown = safe(text)
    return Text(shown if width is None else shown[:width], style=style)


def endpoint(addr: str, port: int, family: int) -> str:
    """``127.0.0.1:80`` or ``[::1]:80`` (the address escaped: a recording's is any string).
    A ``str``: append it to a ``Text`` (``[fd00::1]:80`` read as markup would vanish)."""
    return f"[{safe(addr)}]:{port}" if family == 6 else f"{safe(addr)}:{port}"


def clock(ts_ns: int, offset_ns: int) -> str:
    """Wall-clock time of day of a kernel timestamp, to the millisecond."""
    wall = (ts_ns + offset_ns) / NS
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 1000) % 1000:03d}"


def stamped(line: Text, ts_ns: int, offset_ns: int, on: bool = True) -> Text:
    """``line`` with the time of day in front (``-T``): ``12:04:05 ...``; as it is when not ``on``."""
    if not on:
        return line
    wall = (ts_ns + offset_ns) / NS
    out = Text(time.strftime("%H:%M:%S ", time.localtime(wall)))
    out.append_text(line)
    return out


def duration(ns: int | None) -> str:
    """Compact human duration: ``-``, ``850us``, ``12.3ms``, ``4.20s``, ``3m05s``."""
    if ns is None:
        return "-"
    if ns < 1_000_000:
        return f"{ns / 1000:.0f}us"
    if ns < NS:
        return f"{ns / 1e6:.1f}ms"
    if ns < 60 * NS:
        return f"{ns / NS:.2f}s"
    minutes, seconds = divmod(int(ns / NS), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


UNITS = ("auto", "ms", "us")
_units: ContextVar[str] = ContextVar("tcptrace_time_units", default="auto")


def use_units(mode: str) -> None:
    """From now on (in this context: cli.py runs each command in a context of its own), table
    cells of times are ``mode`` (see ``time_units``)."""
    if mode not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)}, not {mode!r}")
    _units.set(mode)


@contextmanager
def time_units(mode: str) -> Iterator[None]:
    """Within the block, table cells of times (``time_cell``) are ``mode``: ``auto`` (as
    ``duration``), or plain numbers of ``ms`` or ``us`` under a header naming the unit
    (``--units``, for scripts)."""
    if mode not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)}, not {mode!r}")
    token = _units.set(mode)
    try:
        yield
    finally:
        _units.reset(token)


def time_cell(ns: int | None) -> str:
    """A time in a table's column, as --units asks: ``1.2ms``, or ``1.234`` (ms), ``1234`` (us).

    >>> with time_units("ms"):
    ...     time_cell(1_234_567), time_cell(None)
    ('1.235', '-')
    >>> time_cell(1_234_567)
    '1.2ms'
    """
    mode = _units.get()
    if ns is None or mode == "auto":
        return duration(ns)
    if mode == "ms":
        return f"{ns / 1e6:.3f}"
    return f"{ns / 1e3:.0f}"


def time_header(name: str) -> str:
    """A column header of times: the unit named when the cells are plain numbers.

    >>> with time_units("us"):
    ...     time_header("P99")
    'P99(us)'
    """
    mode = _units.get()
    return name if mode == "auto" else f"{name}({mode})"


def bound(ns: int) -> str:
    """A histogram bucket's bound, to three significant digits (a log2 bound such as
    2**16 ns is 65.5us, not a rounded 66us or a made-up 64us).

    >>> [bound(v) for v in (0, 512, 1024, 65536, 131072, 1 << 30, 1 << 35, 3600 * NS)]
    ['0', '512ns', '1.02us', '65.5us', '131us', '1.07s', '34.4s', '1h']
    """
    if ns == 0:
        return "0"
    for unit, size in (("ns", 1), ("us", 1000), ("ms", 1_000_000), ("s", NS)):
        if ns < size * 1000:
            return f"{ns / size:.3g}{unit}"
    if ns < 3600 * NS:
        return f"{ns / 60 / NS:.3g}m"
    return f"{ns / 3600 / NS:.3g}h"


def bucket_label(low_ns: int, high_ns: int) -> str:
    """The one label of a histogram bucket holding low <= v < high, in every view:
    ``65.5us-131us``.

    >>> bucket_label(65536, 131072), bucket_label(0, 1000)
    ('65.5us-131us', '0-1us')
    """
    return f"{bound(low_ns)}-{bound(high_ns)}"


def sparkline(values: Iterable[float], width: int = 60) -> str:
    """Recent values as block characters, scaled to the largest.

    >>> sparkline([0, 1, 2, 4])
    ' ▃▅█'
    """
    vals = list(values)[-width:]
    peak = max(vals, default=0.0)
    if peak <= 0:
        return " " * len(vals)
    out = []
    for v in vals:
        if v <= 0:
            out.append(" ")
        else:
            out.append(SPARK[min(len(SPARK) - 1, max(0, round(v / peak * (len(SPARK) - 1))))])
    return "".join(out)


def plain(text: Text | str) -> str:
    return text.plain if isinstance(text, Text) else text


def start_live(console: Console, renderable: object, *, transient: bool = False) -> Live:
    """A started in-place display; the caller refreshes it with ``update(..., refresh=True)``
    and stops it (restoring the terminal) in a ``finally``."""
    live = Live(renderable, console=console, auto_refresh=False, transient=transient)  # type: ignore[arg-type]
    live.start()
    return live


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's default exits with status 1; the reader going away (`tcptrace states |
        # head -1`) is not a failure: the CLI turns BrokenPipeError into exit 0.
        self.quiet = True
        raise BrokenPipeError


UNWRAPPED = 100_000
"""The width of a console that is not a terminal: lines are never wrapped for a file or a
pipe (a sentence cut at column 80 breaks grep and diff)."""


def make_console(stderr: bool = False, **kwargs: object) -> Console:
    """A console for tcptrace's output: no highlighting (numbers in names stay plain), no
    markup or emoji codes in strings (views build ``Text`` anyway; this is a second lock).

    On a terminal, rich's usual rendering. Anywhere else (a file, a pipe): no colour (rich
    decides that by the same test), and no wrapping: each line as long as it is. Live
    views check ``is_terminal`` and print lines instead of redrawing.
    """
    console = _Console(stderr=stderr, highlight=False, markup=False, emoji=False, **kwargs)  # type: ignore[arg-type]
    if not console.is_terminal and "width" not in kwargs:
        console.width = UNWRAPPED
    return console
