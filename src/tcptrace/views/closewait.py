"""`tcptrace closewait`: the live view of sockets in CLOSE_WAIT, and the final summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from tcptrace.model.attribution import Attributor, LeakAttribution, RolePath
from tcptrace.model.closewait import CloseWaitModel, CloseWaitTracker, Interval, SuspectGroup
from tcptrace.model.histogram import age_histogram
from tcptrace.model.workload import NOBODY, Whois, whois_text
from tcptrace.views.common import (
    bucket_label,
    duration,
    endpoint,
    host_text,
    safe,
    time_cell,
    time_header,
    unknown_owner,
)

CloseWaitView = CloseWaitModel | CloseWaitTracker
"""Either model: from the kernel's aggregates (closewait), or from events (top, diagnose)."""

MAX_GROUPS = 8
MAX_USER_FRAMES = 8
MAX_KERNEL_FRAMES = 3
FRAMES_BEFORE_APP = 2  # user frames shown above the application's, when it is deep in a stack
MAX_SOCKETS = 10
BAR = 30


def _bar(count: int, most: int) -> str:
    if not count or not most:
        return ""
    return "█" * max(1, round(BAR * count / most))


def _owner(pid: int | None, comm: str | None) -> str:
    return f"owner {unknown_owner()}" if pid is None else f"{pid} {safe(comm)}"


def user_window(count: int, app_index: int | None, full: bool = False) -> tuple[int, int]:
    """Which user frames a stack shows, [start, end): all of them when ``full``; else up to
    MAX_USER_FRAMES from the top, or around the application frame when it is deeper.

    >>> user_window(40, None), user_window(40, 3), user_window(40, 16), user_window(40, 16, full=True)
    ((0, 8), (0, 8), (14, 22), (0, 40))
    """
    if full:
        return 0, count
    start = 0
    if app_index is not None and app_index >= MAX_USER_FRAMES:
        start = app_index - FRAMES_BEFORE_APP
    return start, min(count, start + MAX_USER_FRAMES)


def stack_text(title: str, path: RolePath | None, full: bool = False, missing: str = "") -> Text:
    """A code path: its operation, then its user frames (innermost first, the application's
    in bold) or, without any, a few kernel ones. The tracer's own frames are never shown."""
    text = Text()
    text.append(f"    {title}: ", style="bold")
    if path is None:
        text.append(missing or "not seen (socket older than tracing, or its owner acted before)", style="dim")
        return text
    text.append(path.op_text())
    if path.eof:
        text.append(": should have closed", style="yellow")
    stack = path.stack
    user = stack.user
    if not stack.frames:
        text.append("  (no stack)", style="dim")
    app = stack.app_frame
    start, end = user_window(len(user), next((i for i, f in enumerate(user) if f.frame is app), None), full)
    if start:
        text.append(f"\n      … {start} frames", style="dim")
    for f in user[start:end]:
        text.append(f"\n      {safe(f.text)}", style="bold cyan" if f.frame is app and app else "cyan")
    if len(user) > end:
        text.append(f"\n      … {len(user) - end} more", style="dim")
    kernel = [f for f in stack.frames if f.kernel]
    for f in kernel[: len(kernel) if full else MAX_KERNEL_FRAMES] if full or not user else ():
        text.append(f"\n      {safe(f.text)}", style="dim")
    return text


def lead_text(attributed: LeakAttribution) -> Text:
    """The line a group leads with: the application frame (and the path it came from), or
    the runtime's hint; then each hint in full."""
    text = Text("    → ", style="bold")
    source = attributed.source
    if attributed.frame is not None and source is not None:
        text.append(safe(attributed.headline()), style="bold green")
        text.append(f"  ({source.title}: {source.op_text()})", style="dim")
    else:
        text.append(safe(attributed.headline()), style="bold yellow")
        text.append(f"  ({safe(attributed.scope)})", style="dim")
    for hint in attributed.hints:
        text.append("\n      hint: ", style="bold yellow")
        text.append(safe(hint.text))
    return text


def _histogram_table(rows: list[tuple[str, int]], title: str) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False, title=title, title_justify="left")
    table.add_column(justify="right")
    table.add_column(justify="right")
    table.add_column()
    most = max((n for _, n in rows), default=0)
    for label, n in rows:
        table.add_row(Text(label), Text(str(n)), Text(_bar(n, most), style="red"))
    return table


def headline(tracker: CloseWaitView, now_ns: int, interval: Interval | None) -> Text:
    open_now = len(tracker.open)
    pre = sum(1 for s in tracker.open.values() if s.preexisting)
    suspects = sum(1 for s in tracker.open.values() if s.age_ns(now_ns) >= tracker.threshold_ns)
    text = Text()
    text.append("CLOSE_WAIT now: ", style="bold")
    text.append(str(open_now), style="bold red" if suspects else "bold")
    if pre:
        text.append(f" ({pre} already there at start)")
    text.append(f"   leak suspects (>= {duration(tracker.threshold_ns)}): ")
    text.append(str(suspects), style="bold red" if suspects else "")
    text.append("\n")
    if interval is not None:
        text.append(
            f"last {duration(interval.end_ns - interval.start_ns)}: "
            f"+{interval.entered} entered, {interval.closed} closed, {interval.reset} reset   "
        )
    text.append(f"total: {tracker.entered} entered, {tracker.closed} closed, {tracker.reset} reset")
    return text


def close_time_text(tracker: CloseWaitView) -> Text:
    times = tracker.close_times()
    if not times.count:
        return Text("time to close: no socket closed by its app yet", style="dim")
    return Text(
        f"time to close ({times.count} closed by the app):\n  "
        f"p50 {duration(times.p50_ns)}  p90 {duration(times.p90_ns)}  "
        f"p99 {duration(times.p99_ns)}  max {duration(times.max_ns)}"
    )


def group_lines(
    group: SuspectGroup,
    whois: Whois = NOBODY,
    attributor: Attributor | None = None,
    full: bool = False,
) -> list[RenderableType]:
    """A group of leak suspects: owner and counts (and where it runs, in container terms), the
    frame it is attributed to (or the runtime's hint), then its code paths: before the FIN,
    after it, and the origin."""
    head = Text()
    head.append(f"  {group.count} × ", style="bold red")
    head.append(_owner(group.pid, group.comm), style="bold")
    netns = {s.netns for s in group.sockets}
    where = whois_text(whois, group.pid, group.cgroup, netns.pop() if len(netns) == 1 else None)
    if where is not None:
        head.append(f" [{safe(where)}]")
    oldest = duration(group.oldest_age_ns)
    head.append(f"  oldest {'>= ' if group.at_least else ''}{oldest}")
    head.append(f"  remotes: {safe(group.remotes.text())}")
    if group.eof_seen:
        head.append(f"  EOF read by the app on {group.eof_seen}", style="yellow")
    out: list[RenderableType] = [head]
    if group.origin is None and group.last_touch is None and all(s.preexisting for s in group.sockets):
        out.append(Text("    in CLOSE_WAIT before tracing started: no code path known", style="dim"))
        return out
    attributed = (attributor or Attributor())(group)
    out.append(lead_text(attributed))
    pre = attributed.path("pre_fin_touch")
    if pre is not None:
        out.append(stack_text(pre.title, pre, full))
    post = "post_fin_touch"
    out.append(
        stack_text("after the FIN", attributed.path(post), full, "no touch: the app never read the EOF")
    )
    out.append(stack_text("origin", attributed.path("origin"), full))
    return out


def render(
    tracker: CloseWaitView,
    now_ns: int,
    interval: Interval | None = None,
    whois: Whois = NOBODY,
    attributor: Attributor | None = None,
    full: bool = False,
) -> Group:
    """The whole view at ``now_ns`` (``full``: every frame of each stack)."""
    parts: list[RenderableType] = [headline(tracker, now_ns, interval)]
    ages = [s.age_ns(now_ns) for s in tracker.open.values()]
    if ages:
        rows = age_histogram(ages)
        used = [i for i, (_, n) in enumerate(rows) if n]
        parts.append(_histogram_table(rows[used[0] : used[-1] + 1], "age of sockets in CLOSE_WAIT"))
    parts.append(close_time_text(tracker))
    hist = tracker.close_histogram()
    if hist:
        parts.append(
            _histogram_table([(bucket_label(b.low_ns, b.high_ns), b.count) for b in hist], "time to close")
        )
    groups = tracker.suspects(now_ns)
    if groups:
        parts.append(Text("leak suspects by owner and code path:", style="bold"))
        for group in groups[:MAX_GROUPS]:
            parts.extend(group_lines(group, whois, attributor, full))
        if len(groups) > MAX_GROUPS:
            parts.append(Text(f"  … {len(groups) - MAX_GROUPS} more groups (--json has all)", style="dim"))
    return Group(*parts)


def sockets_table(tracker: CloseWaitView, now_ns: int, whois: Whois = NOBODY) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    for name, justify in (("PID", "right"), ("COMM", "left"), ("LOCAL", "left"), ("REMOTE", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column(time_header("AGE"), justify="right")
    table.add_column("EOF", justify="left")
    socks = sorted(tracker.open.values(), key=lambda s: s.entered_ns)
    shown = socks[:MAX_SOCKETS]
    wheres = [whois_text(whois, s.pid, s.cgroup, s.netns) for s in shown]
    if any(wheres):
        table.add_column("WHERE", justify="left")
    for s, where in zip(shown, wheres, strict=True):
        age = time_cell(s.age_ns(now_ns))
        extra = [host_text(where or "")] if any(wheres) else []
        table.add_row(
            Text(unknown_owner() if s.pid is None else str(s.pid)),
            host_text(s.comm, width=15),
            Text(endpoint(s.saddr, s.sport, s.family)),
            Text(endpoint(s.daddr, s.dport, s.family)),
            Text((">= " if s.preexisting else "") + age),
            Text("yes" if s.eof_ns is not None else ""),
            *extra,
        )
    if len(socks) > MAX_SOCKETS:
        more = [Text("")] * (5 if any(wheres) else 4)
        table.add_row(Text(""), Text(f"… {len(socks) - MAX_SOCKETS} more"), *more)
    return table


def print_summary(
    console: Console,
    tracker: CloseWaitView,
    now_ns: int,
    counters: dict[str, Any],
    reason: str,
    whois: Whois = NOBODY,
    attributor: Attributor | None = None,
    full: bool = False,
) -> None:
    lost = int(counters.get("lost", 0))
    head = Text("\nclosewait summary")
    head.append(f" (stopped: {reason})")
    head.append(f", {lost} events lost", style="bold red" if lost else "")
    skipped = int(counters.get("skipped_transitions") or 0)
    if skipped:
        head.append(f", {skipped} transitions of the host skipped by the kernel", style="yellow")
    if isinstance(tracker, CloseWaitModel):
        # The kernel's tables refusing entries, or evicting owners: what the counts above miss.
        c = tracker.counters
        for n, what in (
            (c.open_failed, "sockets in CLOSE_WAIT the kernel's table had no room for"),
            (c.owner_failed, "owners the kernel's owner table had no room for"),
            (c.owner_forgotten, "sockets whose owner was evicted from the kernel's socket table"),
        ):
            if n:
                head.append(f", {n:,} {what}", style="yellow")
    console.print(head)
    console.print(render(tracker, now_ns, whois=whois, attributor=attributor, full=full))
    if tracker.open:
        console.print(Text("oldest sockets in CLOSE_WAIT:", style="bold"))
        console.print(sockets_table(tracker, now_ns, whois))
