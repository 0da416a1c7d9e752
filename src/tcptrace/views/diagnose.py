"""`tcptrace diagnose`: the verdicts first, then the facts they rest on."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tcptrace.model.diagnosis import Diagnosis, Verdict
from tcptrace.model.events import STATE_ORDER, TcpState
from tcptrace.views.common import duration, endpoint, safe, unknown_owner

STYLE = {"problem": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}
LABEL = {"problem": "PROBLEM", "warning": "WARNING", "info": "info", "ok": "ok"}


def verdict_text(v: Verdict) -> Text:
    text = Text()
    text.append(f"{LABEL[v.severity]:>7}  ", style=STYLE[v.severity])
    text.append(safe(v.text))
    if v.where_text is not None:
        text.append(f"\n           · in {safe(v.where_text)}", style="dim")
    for line in v.evidence:
        text.append(f"\n           · {safe(line)}", style="dim")
    return text


def states_table(d: Diagnosis) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    table.title = "sockets by state (/proc, start and end)"
    table.add_column("STATE")
    table.add_column("START", justify="right")
    table.add_column("END", justify="right")
    for s in STATE_ORDER:
        a = (d.start or {}).get(s, 0)
        b = (d.end or {}).get(s, 0)
        if a or b:
            style = "bold red" if s == TcpState.CLOSE_WAIT and b > a else ""
            table.add_row(Text(s.name), Text(str(a)), Text(str(b), style=style))
    return table


def _print_close_wait(console: Console, d: Diagnosis) -> None:
    if d.close_wait_owners:
        console.print(Text("owners of CLOSE_WAIT sockets at the end:", style="bold"))
        for o in d.close_wait_owners[:8]:
            who = f"owner {unknown_owner()}" if o.pid is None else f"{o.pid} {safe(o.comm)}"
            console.print(Text(f"  {o.count:>6}  {who}   remotes: {safe(o.remotes.text())}"))
    if d.stuck:
        console.print(
            Text(f"stuck: {len(d.stuck)} sockets in CLOSE_WAIT at the start and at the end", style="bold")
        )
        for s in d.stuck[:5]:
            sk = s.sock
            local, remote = endpoint(sk.saddr, sk.sport, sk.family), endpoint(sk.daddr, sk.dport, sk.family)
            who = f"pid {sk.pid}" if sk.pid is not None else f"owner {unknown_owner()}"
            console.print(Text(f"  {local} <- {remote}  {who}  >= {s.at_least_s:.0f} s"))
    if d.close_wait_entered:
        times = d.time_to_close
        ttc = f", time to close p50 {duration(times.p50_ns)}" if times.p50_ns is not None else ""
        console.print(
            Text(
                f"CLOSE_WAIT during the window: {d.close_wait_entered} entered, "
                f"{d.close_wait_closed} closed by their app{ttc}"
            )
        )


def _print_time_wait(console: Console, d: Diagnosis) -> None:
    tw = f"TIME_WAIT: {d.tw_created} created ({d.tw_rate:.1f}/s)"
    if d.tw_now is not None:
        tw += f", {d.tw_now} timewait sockets now (sockstat)"
    if d.ports is not None:
        tw += f", {d.ports} ephemeral ports per destination"
    console.print(Text(tw))
    for f in d.forecasts[:3]:
        eta = (
            f"exhausted in ~{f.seconds_to_exhaustion:.0f} s"
            if f.seconds_to_exhaustion is not None
            else f"{f.utilization:.0%} of the range at steady state"
        )
        console.print(
            Text(f"  -> {safe(f.dest.remote)}: {f.rate_per_s:.1f}/s, holds ~{f.held_steady:.0f}: {eta}")
        )


def print_diagnosis(console: Console, d: Diagnosis, reason: str = "duration") -> None:
    """The verdicts, then the facts of each section, then what was lost."""
    console.print(Text(f"tcptrace diagnose: {d.window_s:.1f} s observed (stopped: {reason})", style="bold"))
    console.print()
    for v in d.verdicts:
        console.print(verdict_text(v), soft_wrap=False)
    console.print()
    if d.start or d.end:
        console.print(states_table(d))
    _print_close_wait(console, d)
    _print_time_wait(console, d)
    if d.closes:
        console.print(
            Text(
                f"close(): {d.closes} calls, p50 {duration(d.close_p50_ns)}, p99 {duration(d.close_p99_ns)}, "
                f"max {duration(d.close_max_ns)}"
            )
        )
    if d.settings:
        console.print(Text("settings:", style="bold"))
        for a in d.settings:
            console.print(
                Text(f"  {safe(a.setting)} = {safe(a.value)}: {a.meaning}", style="yellow" if a.warn else ""),
            )
    lost = Text(f"events lost: {d.lost}", style="bold red" if d.lost else "dim")
    console.print(lost)
    if d.failures:
        full = ", ".join(f"{name} {n}" for name, n in d.failures.items())
        console.print(Text(f"kernel tables full (inserts refused): {full}", style="yellow"))
