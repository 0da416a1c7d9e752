"""`tcptrace states`: one line per transition, and the final summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tcptrace.model.events import SocketEvent, TcpState, Transition
from tcptrace.model.states import StatesSummary
from tcptrace.model.workload import NOBODY, Whois, whois_text
from tcptrace.views.common import clock, endpoint, safe, time_cell, time_header

STATE_STYLE = {
    TcpState.CLOSE_WAIT: "bold red",
    TcpState.TIME_WAIT: "yellow",
    TcpState.FIN_WAIT2: "yellow",
    TcpState.ESTABLISHED: "green",
    TcpState.CLOSE: "dim",
}


def column_titles() -> str:
    """The column titles (PREV names its unit under --units ms/us)."""
    return (
        f"{'TIME':<12} {'PID':>7} {'COMM':<15} {'LOCAL':<22} {'REMOTE':<22} {'TRANSITION':<25} "
        f"{time_header('PREV'):>8}"
    )


HEADER = column_titles()


def transition_line(event: Transition, offset_ns: int, whois: Whois = NOBODY) -> Text:
    """One row: time, owner pid and comm, local and remote endpoints, OLD -> NEW, time in OLD,
    then, where known, the owner's container, pod or unit, its pid in its own pid namespace,
    and the socket's network namespace when it is not the host's."""
    pid = str(event.pid) if event.pid is not None else "-"
    text = Text()
    text.append(f"{clock(event.ts_ns, offset_ns):<12} {pid:>7} {safe(event.comm)[:15]:<15} ")
    text.append(f"{endpoint(event.saddr, event.sport, event.family):<22} ")
    text.append(f"{endpoint(event.daddr, event.dport, event.family):<22} ")
    text.append(event.old.name, style=STATE_STYLE.get(event.old, ""))
    text.append(" -> ")
    text.append(event.new.name, style=STATE_STYLE.get(event.new, ""))
    text.append(" " * max(1, 25 - len(event.old.name) - len(event.new.name) - 4))
    text.append(f"{time_cell(event.prev_ns):>8}")
    where = whois_text(whois, event.pid, event.cgroup, event.netns)
    if where is not None:
        text.append(f"  [{safe(where)}]", style="dim")
    return text


def stack_lines(event: SocketEvent) -> list[Text]:
    lines = [Text(f"    {safe(frame)}", style="dim") for frame in event.kstack]
    if event.ustack:
        lines.append(Text("    --", style="dim"))
        lines.extend(Text(f"    {safe(frame)}", style="cyan") for frame in event.ustack)
    return lines


def print_event(console: Console, event: SocketEvent, offset_ns: int, whois: Whois = NOBODY) -> None:
    if isinstance(event, Transition):
        console.print(transition_line(event, offset_ns, whois), soft_wrap=True)
        for line in stack_lines(event):
            console.print(line, soft_wrap=True)


def print_lost(console: Console, new: int, total: int) -> None:
    """A warning line in the stream: the kernel could not hand over ``new`` more events."""
    console.print(
        Text(
            f"!! {new} events lost (ring buffer full; {total} in all): "
            "narrow the filters or raise --ringbuf-pages",
            style="bold red",
        ),
        soft_wrap=True,
    )


def print_summary(console: Console, summary: StatesSummary, counters: dict[str, Any], reason: str) -> None:
    lost = int(counters.get("lost", 0))
    console.print()
    head = Text(f"{summary.events} events")
    head.append(f", {lost} lost", style="bold red" if lost else "")
    skipped = int(counters.get("skipped_transitions") or 0)
    if skipped:
        head.append(f", {skipped} transition hook runs skipped by the kernel", style="bold yellow")
    head.append(f" (stopped: {reason})")
    console.print(head)
    if not summary.transitions:
        return
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    table.add_column("transition")
    table.add_column("count", justify="right")
    for (old, new), count in summary.transitions.most_common():
        table.add_row(Text(f"{old.name} -> {new.name}"), Text(str(count)))
    console.print(table)
