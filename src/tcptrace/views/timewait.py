"""`tcptrace timewait`: the live view, one line per interval when not a terminal, the summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from tcptrace.model.timewait import (
    REMEDIES,
    Advice,
    DestForecast,
    Interval,
    Remote,
    TimewaitModel,
    TwCounts,
    by_remote,
    top,
)
from tcptrace.views.common import host_text, sparkline


@dataclass(frozen=True)
class Context:
    """What the view shows besides the model: the ephemeral range and the settings read."""

    ports: int | None
    advice: Sequence[Advice]
    forecasts: Sequence[DestForecast]


def headline(interval: Interval, totals: TwCounts) -> Text:
    """One line: rate, count in the interval, total, pending parked sockets, resets, host facts."""
    d = interval.delta
    text = Text()
    text.append(f"TIME_WAIT created {interval.rate_per_s:,.1f}/s", style="bold")
    text.append(f"  ({d.created} in {interval.seconds:.1f}s, {totals.created} total)")
    text.append(f"  pending FIN_WAIT2 {totals.pending_fin_wait2}")
    resets = f"  resets sent {d.resets_sent} received {d.resets_received}"
    text.append(resets, style="magenta" if d.resets_sent or d.resets_received else "")
    if interval.host is not None:
        if interval.host.tw_now is not None:
            text.append(f"  tw now {interval.host.tw_now:,} (sockstat)")
        if interval.overflow:
            text.append(f"  TCPTimeWaitOverflow +{interval.overflow}", style="bold red")
    return text


def process_table(interval: Interval | None, totals: TwCounts, n: int = 8) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    table.title = "by process (the one that closed first)"
    columns = [("PID", "right"), ("COMM", "left"), ("NOW/s", "right"), ("TOTAL", "right")]
    columns += [("RST SENT", "right"), ("RST RECV", "right")]
    if interval is None:  # the summary: totals only
        columns.remove(("NOW/s", "right"))
    for name, justify in columns:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    rows = sorted(totals.by_process.items(), key=lambda kv: (-kv[1].created, -kv[1].resets_sent, kv[0]))
    for proc, c in rows[:n]:
        now = 0.0
        if interval is not None:
            d = interval.delta.by_process.get(proc)
            now = d.created / interval.seconds if d is not None else 0.0
        now_cell = [Text(f"{now:,.1f}")] if interval is not None else []
        table.add_row(
            Text(str(proc.pid)),
            host_text(proc.comm, width=15),
            *now_cell,
            Text(str(c.created)),
            Text(str(c.resets_sent)),
            Text(str(c.resets_received)),
        )
    return table


def remote_text(remote: Remote) -> Text:
    """The remote endpoint; on the bound side (a server's port), the client's ip and the
    server's port it came to."""
    text = host_text(remote.remote)
    if remote.local_port:
        text.append(f" (to local port {remote.local_port})", style="dim")
    return text


def remote_table(interval: Interval | None, totals: TwCounts, n: int = 8) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    table.title = "by remote endpoint"
    rows = top(by_remote(totals.by_dest), n)
    # Two network namespaces (two containers) may use the same addresses: say which.
    with_netns = len({remote.netns for remote, _ in rows}) > 1
    if with_netns:
        table.add_column("NETNS", justify="right")
    table.add_column("REMOTE")
    if interval is not None:
        table.add_column("NOW/s", justify="right")
    table.add_column("TOTAL", justify="right")
    now = by_remote(interval.delta.by_dest) if interval is not None else {}
    for remote, count in rows:
        cells = [Text(str(remote.netns or "?"))] if with_netns else []
        cells.append(remote_text(remote))
        if interval is not None:
            cells.append(Text(f"{now.get(remote, 0) / interval.seconds:,.1f}"))
        cells.append(Text(str(count)))
        table.add_row(*cells)
    return table


def exhaustion_text(f: DestForecast) -> Text:
    if f.seconds_to_exhaustion is None:
        return Text(f"fits ({f.utilization:.0%} of the range at steady state)")
    text = Text(f"EXHAUSTED in ~{f.seconds_to_exhaustion:,.0f}s at this rate", style="bold red")
    if f.reuse:
        text.append(" (unless tcp_tw_reuse recycles them)", style="yellow")
    return text


def forecast_table(forecasts: Sequence[DestForecast]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    table.title = "ports: TIME_WAIT held ~= rate x 60 s, per (local ip, remote ip, remote port)"
    for name, justify in (
        ("LOCAL", "left"),
        ("REMOTE", "left"),
        ("RATE/s (60s)", "right"),
        ("HELD ~", "right"),
        ("OF PORTS", "right"),
        ("VERDICT", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for f in forecasts:
        table.add_row(
            host_text(f.dest.laddr),
            host_text(f.dest.remote),
            Text(f"{f.rate_per_s:,.1f}"),
            Text(f"{f.held_steady:,.0f}"),
            Text(f"{f.ports:,}"),
            exhaustion_text(f),
        )
    return table


def settings_table(advice: Sequence[Advice]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left", show_header=False)
    table.title = "settings"
    table.add_column("setting")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    for a in advice:
        table.add_row(
            host_text(a.setting), host_text(a.value), Text(a.meaning, style="yellow" if a.warn else "")
        )
    return table


def render(model: TimewaitModel, interval: Interval | None, ctx: Context) -> RenderableType:
    """The live screen: headline, the recent seconds, by process, by remote, ports, settings."""
    parts: list[RenderableType] = []
    totals = model.totals
    if interval is not None:
        parts.append(headline(interval, totals))
        rates = model.rates()
        peak = max(rates, default=0.0)
        parts.append(Text(f"|{sparkline(rates)}| last {len(rates)} intervals, peak {peak:,.1f}/s"))
    else:
        parts.append(Text("waiting for the first interval…", style="dim"))
    parts.append(process_table(interval, totals))
    parts.append(remote_table(interval, totals))
    if ctx.forecasts:
        parts.append(forecast_table(ctx.forecasts))
    if ctx.advice:
        parts.append(settings_table(ctx.advice))
    return Group(*parts)


def print_summary(
    console: Console,
    model: TimewaitModel,
    ctx: Context,
    counters: dict[str, Any],
    reason: str,
    seconds: float,
) -> None:
    t = model.totals
    console.print()
    head = Text(f"{t.created} TIME_WAIT created in {seconds:.1f}s", style="bold")
    head.append(f" ({t.created / seconds if seconds > 0 else 0:,.1f}/s)")
    head.append(f", stopped: {reason}")
    console.print(head)
    console.print(
        Text(
            f"  {t.immediate} entered TIME_WAIT directly; {t.parked} orphaned FIN_WAIT2 sockets were parked: "
            f"{t.converted_fin} got the peer's FIN (TIME_WAIT, counted then), {t.converted_timer} seen "
            f"TIME_WAIT only at their timer, {t.parked_ended} died in FIN_WAIT2 (not TIME_WAIT), "
            f"{t.pending_fin_wait2} still pending"
        ),
        soft_wrap=True,
    )
    console.print(Text(f"  resets: {t.resets_sent} sent, {t.resets_received} received (abortive closes)"))
    if t.killed:
        console.print(
            Text(
                f"  {t.killed} TIME_WAIT sockets ended before their 60 s "
                "(a port reused by tcp_tw_reuse, a SYN or an RST on the same 4-tuple)"
            )
        )
    if model.overflow_total:
        console.print(
            Text(
                f"  TCPTimeWaitOverflow +{model.overflow_total}: TIME_WAIT skipped (tcp_max_tw_buckets)",
                style="bold red",
            )
        )
    lost = int(counters.get("lost", 0))
    if lost:
        console.print(Text(f"  {lost} events lost (counts above are the kernel's, exact)", style="bold red"))
    if t.by_process:
        console.print(process_table(None, t, n=20))
    if t.by_dest:
        console.print(remote_table(None, t, n=20))
    if ctx.forecasts:
        console.print(forecast_table(ctx.forecasts))
    if ctx.advice:
        console.print(settings_table(ctx.advice))
    console.print(Text("remedies, in order:", style="bold"))
    for i, remedy in enumerate(REMEDIES, 1):
        console.print(Text(f"  {i}. {remedy}"), soft_wrap=True)
