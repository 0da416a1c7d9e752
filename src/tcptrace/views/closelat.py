"""`tcptrace closelat`: per-process close() latency histograms as bars, flagged calls, summary."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rich.console import Console
from rich.text import Text

from tcptrace.model.closelat import CallStats, CloseLatency, Report
from tcptrace.model.events import CloseCall, CloseFlag
from tcptrace.views.common import bucket_label, clock, duration, endpoint, safe, time_cell, time_header

BAR_WIDTH = 40
MAX_ROWS = 10  # rows shown per report in text; --json has them all


def column_titles() -> str:
    """The column titles (the times' name their unit under --units ms/us)."""
    times = " ".join(f"{time_header(name):>8}" for name in ("P50", "P90", "P99", "MAX"))
    return f"{'PID':>7} {'COMM':<15} {'CALL':<11} {'COUNT':>7} {times}  FLAGGED"


HEADER = column_titles()


@dataclass(frozen=True)
class FlagText:
    """What a flag means, in the words of the view."""

    short: str
    meaning: str


FLAG_TEXT: dict[CloseFlag, FlagText] = {
    CloseFlag.RESET: FlagText("RESET", "sent a reset: unread data or linger 0, data in flight lost"),
    CloseFlag.LINGERED: FlagText("LINGERED", "SO_LINGER on: close() blocked until sent or timed out"),
    CloseFlag.LATE_CLOSE_WAIT: FlagText(
        "LATE_CLOSE_WAIT", "closed after a long CLOSE_WAIT: the peer had hung up long before"
    ),
}
FLAG_STYLE = {
    CloseFlag.RESET: "bold red",
    CloseFlag.LINGERED: "bold yellow",
    CloseFlag.LATE_CLOSE_WAIT: "bold magenta",
}


def flagged_text(row: CallStats) -> str:
    parts = []
    if row.resets:
        parts.append(f"{row.resets} reset")
    if row.lingered:
        parts.append(f"{row.lingered} lingered")
    if row.late_close_wait:
        parts.append(f"{row.late_close_wait} late CLOSE_WAIT")
    return ", ".join(parts) or "-"


def row_line(row: CallStats) -> Text:
    h = row.hist
    p = h.percentiles((50, 90, 99))
    top = time_cell(h.max_ns) if h.count else "-"
    if h.count and not h.max_exact:
        top = "<" + top
    text = Text(
        f"{row.key.pid:>7} {safe(row.key.comm)[:15]:<15} {safe(row.key.call):<11} {h.count:>7} "
        f"{time_cell(p[50]):>8} {time_cell(p[90]):>8} {time_cell(p[99]):>8} {top:>8}  "
    )
    flags = flagged_text(row)
    text.append(flags, style="bold red" if flags != "-" else "dim")
    return text


def bar_lines(row: CallStats, width: int = BAR_WIDTH) -> list[Text]:
    """One line per non-empty bucket: its range, count and a bar scaled to the fullest."""
    buckets = row.hist.buckets()
    if not buckets:
        return []
    most = max(b.count for b in buckets)
    lines = []
    for b in buckets:
        n = max(1, round(width * b.count / most))
        line = Text(f"{'':>7} {bucket_label(b.low_ns, b.high_ns):>22} {b.count:>8} ")
        line.append("█" * n, style="cyan")
        lines.append(line)
    return lines


def report_lines(report: Report, offset_ns: int, bars: bool = True, max_rows: int = MAX_ROWS) -> list[Text]:
    when = clock(report.ts_ns, offset_ns) if report.ts_ns else "-"
    if report.window == "cumulative":
        title = f"{when}  close() latency of TCP sockets, since start"
    else:
        title = f"{when}  close() latency of TCP sockets, last {duration(report.interval_ns)}"
    lines = [Text(title, style="bold")]
    if not report.rows:
        lines.append(Text("        no close() on a TCP socket", style="dim"))
        return lines
    lines.append(Text(column_titles(), style="bold"))
    for row in report.rows[:max_rows]:
        lines.append(row_line(row))
        for frame in row.key.stack[:8]:
            lines.append(Text(f"{'':>8}{safe(frame)}", style="dim"))
        if bars:
            lines.extend(bar_lines(row))
    hidden = report.rows[max_rows:]
    if hidden:
        calls = sum(r.count for r in hidden)
        lines.append(
            Text(f"        … {len(hidden)} more rows ({calls} calls): --pid, --comm or --json", style="dim")
        )
    return lines


def print_report(
    console: Console, report: Report, offset_ns: int, bars: bool = True, max_rows: int = MAX_ROWS
) -> None:
    for line in report_lines(report, offset_ns, bars, max_rows):
        console.print(line, soft_wrap=True)


def flag_line(event: CloseCall, offset_ns: int) -> Text:
    """A flagged call: what happened, on which socket, and what it means."""
    text = Text(f"{clock(event.ts_ns, offset_ns):<12} ")
    names = [flag for flag in FLAG_TEXT if flag in event.flags]
    for flag in names:
        text.append(FLAG_TEXT[flag].short, style=FLAG_STYLE[flag])
        text.append(" ")
    pid = str(event.pid) if event.pid is not None else "-"
    call = event.op.name.lower()
    text.append(
        f"pid {pid} {safe(event.comm)} {call}() "
        f"{endpoint(event.saddr, event.sport, event.family)} -> "
        f"{endpoint(event.daddr, event.dport, event.family)}"
    )
    state = event.state.name if event.state is not None else "?"
    text.append(f" in {state}")
    if event.in_state_ns is not None and CloseFlag.LATE_CLOSE_WAIT in event.flags:
        text.append(f" for {duration(event.in_state_ns)}")
    text.append(f", took {duration(event.duration_ns)}")
    for flag in names:
        text.append(f"; {FLAG_TEXT[flag].meaning}", style="dim")
    return text


def print_flag(console: Console, event: CloseCall, offset_ns: int) -> None:
    console.print(flag_line(event, offset_ns), soft_wrap=True)
    for frame in event.ustack[:8]:
        console.print(Text(f"    {safe(frame)}", style="dim"), soft_wrap=True)


def print_summary(
    console: Console, model: CloseLatency, counters: Mapping[str, int], reason: str, offset_ns: int
) -> None:
    totals = model.totals()
    console.print()
    console.print(Text(f"closelat stopped ({reason}): summary since start", style="bold"))
    print_report(console, totals, offset_ns, bars=True, max_rows=2 * MAX_ROWS)
    flagged = model.summary_json()["flagged"]
    console.print(
        Text(
            f"flagged calls: {flagged['reset']} reset, {flagged['lingered']} lingered, "
            f"{flagged['late_close_wait']} late CLOSE_WAIT"
        )
    )
    lost = int(counters.get("lost", 0))
    failed = int(counters.get("call_failed", 0)) + int(counters.get("hist_failed", 0))
    line = Text(f"{lost} events lost", style="bold red" if lost else "")
    if failed:
        line.append(f", {failed} calls not counted (kernel maps full)", style="bold red")
    skipped = int(counters.get("skipped_runs", 0))
    if skipped:
        line.append(f", {skipped} hook runs skipped by the kernel (nested BPF)", style="yellow")
    console.print(line)
