"""Formatting shared by every view. Text from the kernel or a recording is never markup."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.text import Text

NS = 1_000_000_000


def safe(text: str | None) -> str:
    """Control characters (terminal escapes, newlines) shown as \\xNN, never interpreted."""
    if text is None:
        return "-"
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def endpoint(addr: str, port: int, family: int) -> str:
    """``127.0.0.1:80`` or ``[::1]:80``."""
    return f"[{addr}]:{port}" if family == 6 else f"{addr}:{port}"


def clock(ts_ns: int, offset_ns: int) -> str:
    """Wall-clock time of day of a kernel timestamp, to the millisecond."""
    wall = (ts_ns + offset_ns) / NS
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall * 1000) % 1000:03d}"


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


def plain(text: Text | str) -> str:
    return text.plain if isinstance(text, Text) else text


def start_live(console: Console, renderable: object, *, transient: bool = False) -> Live:
    """A started in-place display; the caller refreshes it with ``update(..., refresh=True)``
    and stops it (restoring the terminal) in a ``finally``."""
    live = Live(renderable, console=console, auto_refresh=False, transient=transient)  # type: ignore[arg-type]
    live.start()
    return live


def make_console(stderr: bool = False, **kwargs: object) -> Console:
    return Console(stderr=stderr, highlight=False, **kwargs)  # type: ignore[arg-type]
