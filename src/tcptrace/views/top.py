"""`tcptrace top`: one live screen of states, rates, the processes behind them, and losses.

Keys (when stdin is a terminal), like top:

    c  sort processes by CLOSE_WAIT held      t  by TIME_WAIT created per second
    l  by close() p99 latency                 p  show one pid (type it, Enter; empty: all)
    q  quit (Ctrl-C and SIGTERM too)

``render()`` is pure (a model in, a renderable out), so tests render it into a StringIO
console; ``KeyReader`` puts the terminal in cbreak mode and always restores it.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from tcptrace.model.attribution import Attributor
from tcptrace.model.events import TcpState
from tcptrace.model.overview import SORT_KEYS, Overview, ProcessRow, sort_rows
from tcptrace.model.workload import NOBODY, Whois, whois_text
from tcptrace.views.common import duration, host_text, safe, time_cell, time_header

SORT_TITLES = {"c": "CLOSE_WAIT", "t": "TIME_WAIT/s", "l": "close() p99"}
MAX_PROCESSES = 15
MAX_LEAKS = 3


@dataclass
class TopState:
    """What the keys changed: sort order, pid filter, a pid being typed, quit."""

    sort: str = "c"
    pid: int | None = None
    typing: str | None = None
    quit: bool = False
    message: str = ""

    def press(self, key: str) -> None:
        """Apply one key (a character read in cbreak mode)."""
        if self.typing is not None:
            if key in ("\n", "\r"):
                text, self.typing = self.typing.strip(), None
                if not text:
                    self.pid, self.message = None, "showing every process"
                elif text.isdigit() and int(text) > 0:
                    self.pid, self.message = int(text), f"showing pid {text}"
                else:
                    self.message = f"not a pid: {safe(text)}"
            elif key in ("\x1b",):
                self.typing, self.message = None, ""
            elif key in ("\x7f", "\b"):
                self.typing = self.typing[:-1]
            elif key.isdigit():
                self.typing += key
            return
        low = key.lower()
        if low == "q":
            self.quit = True
        elif low in SORT_KEYS:
            self.sort, self.message = low, f"sorted by {SORT_TITLES[low]}"
        elif low == "p":
            self.typing, self.message = "", ""

    def prompt(self) -> str:
        if self.typing is not None:
            return f"pid to show (Enter: all): {self.typing}"
        return self.message


def _rate(x: float) -> str:
    return f"{x:,.1f}" if x else "0"


def _cells(*values: str) -> list[Text]:
    return [Text(v) for v in values]


def states_table(overview: Overview) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    table.title = "sockets by state"
    table.add_column("STATE")
    table.add_column("NOW", justify="right")
    table.add_column("IN/s", justify="right")
    table.add_column("SOURCE", style="dim")
    last = overview.last
    for state, count in overview.states.rows():
        if state == TcpState.TIME_WAIT:
            rate = overview.tw_rate()
        else:
            rate = last.rate(state) if last is not None else 0.0
        style = "bold red" if state == TcpState.CLOSE_WAIT and count else ""
        table.add_row(
            Text(state.name, style=style),
            Text(f"{count:,}", style=style),
            Text(_rate(rate)),
            Text(overview.states.how(state)),
        )
    return table


def headline(overview: Overview) -> Text:
    """One line: uptime, transition rate, leak suspects, losses (and skipped kernel runs)."""
    text = Text()
    text.append("tcptrace top", style="bold")
    text.append(f"  up {duration(int(overview.elapsed_s * 1e9))}")
    last = overview.last
    text.append(f"  {_rate(last.total_rate if last else 0.0)} transitions/s")
    cw = overview.closewait
    suspects = sum(1 for s in cw.open.values() if s.age_ns(overview.now_ns) >= cw.threshold_ns)
    text.append(f"  CLOSE_WAIT >= {duration(cw.threshold_ns)}: ")
    text.append(str(suspects), style="bold red" if suspects else "")
    text.append("  lost ")
    text.append(str(overview.lost), style="bold red" if overview.lost else "")
    if overview.skipped:
        text.append("  skipped ")
        text.append(str(overview.skipped), style="yellow")
    failed = sum(overview.failures().values())
    if failed:
        text.append("  table full ")
        text.append(str(failed), style="yellow")
    if overview.states.seeds > 1:
        text.append(f"  /proc re-read {overview.states.seeds - 1}x", style="dim")
    return text


def latency_text(overview: Overview) -> Text:
    hist = overview.close_latency()
    if not hist.count:
        return Text("close(): no call on a TCP socket yet", style="dim")
    flags = +overview.close_flags()
    text = Text(
        f"close(): {hist.count:,} calls  p50 {duration(hist.percentile(50))}  "
        f"p90 {duration(hist.percentile(90))}  p99 {duration(hist.percentile(99))}  "
        f"max {duration(hist.max_ns)}"
    )
    if flags:
        text.append(
            f"   resets {flags.get('reset', 0)}  lingered {flags.get('lingered', 0)}  "
            f"late CLOSE_WAIT {flags.get('late_close_wait', 0)}",
            style="magenta",
        )
    return text


def processes_table(overview: Overview, state: TopState, whois: Whois = NOBODY) -> Table:
    """The processes, worst first; WHERE (container, pod or unit, pid in its own namespace)
    when one of them is known."""
    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    title = f"processes, by {SORT_TITLES[state.sort]}"
    if state.pid is not None:
        title += f" (pid {state.pid} only)"
    table.title = title
    # Fits 80 columns with a whole 15-character comm.
    for name in (
        "PID",
        "COMM",
        "CLOSE_WAIT",
        time_header("OLDEST"),
        "TW/s",
        "TW",
        "CLOSES",
        time_header("p99"),
        time_header("MAX"),
    ):
        if name == "COMM":
            table.add_column(name, min_width=15, no_wrap=True)
        else:
            table.add_column(name, justify="right", no_wrap=True)
    rows = sort_rows(overview.processes(state.pid), state.sort)
    wheres = [where_text(whois, r) for r in rows[:MAX_PROCESSES]]
    extra = 1 if any(wheres) else 0
    if extra:
        table.add_column("WHERE", no_wrap=True)
    for r, where in zip(rows[:MAX_PROCESSES], wheres, strict=True):
        table.add_row(
            Text(str(r.pid)),
            host_text(r.comm, width=15),
            Text(str(r.close_wait), style="bold red" if r.close_wait else ""),
            *_cells(
                time_cell(r.close_wait_oldest_ns) if r.close_wait else "-",
                _rate(r.tw_rate),
                str(r.tw_total),
                str(r.closes),
                time_cell(r.close_p99_ns),
                time_cell(r.close_max_ns),
            ),
            *([host_text(where)] if extra else []),
        )
    if len(rows) > MAX_PROCESSES:
        table.add_row(*_cells("", f"… {len(rows) - MAX_PROCESSES} more", *[""] * (7 + extra)))
    if not rows:
        table.add_row(*_cells("", "(none yet)", *[""] * 7))
    return table


def leaks_text(
    overview: Overview, attributor: Attributor | None = None, pid: int | None = None
) -> Text | None:
    """The worst groups of leak suspects, each with the frame of the application's code (or
    the runtime's hint) it is attributed to; None when there is none."""
    groups = [g for g in overview.closewait.suspects(overview.now_ns) if pid is None or g.pid == pid]
    if not groups:
        return None
    attribute = attributor or Attributor()
    text = Text("leaking in CLOSE_WAIT:", style="bold")
    for group in groups[:MAX_LEAKS]:
        who = "unknown owner" if group.pid is None else f"{group.pid} {safe(group.comm)}"
        text.append(f"\n  {group.count} × {who}  → ")
        named = attribute(group)
        text.append(safe(named.headline()), style="green" if named.frame is not None else "yellow")
    if len(groups) > MAX_LEAKS:
        text.append(
            f"\n  … {len(groups) - MAX_LEAKS} more groups (tcptrace closewait shows them)", style="dim"
        )
    return text


def where_text(whois: Whois, row: ProcessRow) -> str:
    """A process row's container, pod or unit (its sockets' cgroup, else the process's now)."""
    cgroup = row.cgroup if row.cgroup is not None else whois.pid_cgroup(row.pid)
    return whois_text(whois, row.pid, cgroup) or ""


KEYS_HELP = "keys: c CLOSE_WAIT  t TIME_WAIT/s  l close() p99  p pid  q quit"


def render(
    overview: Overview,
    state: TopState | None = None,
    keys: bool = True,
    attributor: Attributor | None = None,
    whois: Whois = NOBODY,
) -> Group:
    """The whole screen."""
    state = state or TopState()
    parts: list[RenderableType] = [
        headline(overview),
        states_table(overview),
        latency_text(overview),
        processes_table(overview, state, whois),
    ]
    leaks = leaks_text(overview, attributor, state.pid)
    if leaks is not None:
        parts.append(leaks)
    if keys:
        parts.append(Text(KEYS_HELP, style="dim"))
    prompt = state.prompt()
    if prompt:
        parts.append(Text(prompt, style="bold"))
    return Group(*parts)


class KeyReader:
    """Keys from a terminal without blocking; nothing when stdin is not a terminal."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def keys(self) -> Iterator[str]:
        while True:
            ready, _, _ = select.select([self.fd], [], [], 0)
            if not ready:
                return
            try:
                data = os.read(self.fd, 64)
            except OSError:
                return
            if not data:
                return
            yield from data.decode("utf-8", "replace")


@contextmanager
def key_reader(stream: Any = None) -> Iterator[KeyReader | None]:
    """cbreak mode on a terminal stdin for the block, restored however it ends."""
    stream = stream if stream is not None else sys.stdin
    try:
        fd = int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        yield None
        return
    if not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield KeyReader(fd)
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except termios.error:  # the terminal hung up: nothing left to restore
            pass
