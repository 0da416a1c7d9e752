from __future__ import annotations

import io

from rich.console import Console

from tcptrace.model.events import TcpState, Transition
from tcptrace.views.common import duration, endpoint, safe
from tcptrace.views.states import print_event, transition_line


def ev(**over: object) -> Transition:
    base: dict[str, object] = dict(
        ts_ns=5 * 10**9,
        skaddr=1,
        family=4,
        saddr="127.0.0.1",
        sport=8080,
        daddr="127.0.0.1",
        dport=51000,
        pid=4242,
        comm="myserver",
        old=TcpState.ESTABLISHED,
        new=TcpState.CLOSE_WAIT,
        prev_ns=1_500_000,
    )
    base.update(over)
    return Transition(**base)  # type: ignore[arg-type]


def render(event: Transition) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=200, color_system=None, force_terminal=False)
    print_event(console, event, 0)
    return buf.getvalue()


def test_transition_line_columns() -> None:
    line = transition_line(ev(), 0).plain
    fields = line.split()
    assert fields[1:7] == ["4242", "myserver", "127.0.0.1:8080", "127.0.0.1:51000", "ESTABLISHED", "->"]
    assert fields[7:] == ["CLOSE_WAIT", "1.5ms"]


def test_unknown_owner_and_ipv6() -> None:
    line = transition_line(ev(pid=None, comm=None, family=6, saddr="::1", daddr="::1"), 0).plain
    assert " - " in line and "[::1]:8080" in line and "[::1]:51000" in line


def test_hostile_comm_is_literal_text() -> None:
    out = render(ev(comm="[red]\x1b[2J"))
    assert "[red]\\x1b[2J" in out
    assert "\x1b" not in out and out.count("\n") == 1


def test_duration_formats() -> None:
    assert [duration(x) for x in (None, 850_000, 12_345_678, 4_200_000_000, 185 * 10**9, 7300 * 10**9)] == [
        "-",
        "850us",
        "12.3ms",
        "4.20s",
        "3m05s",
        "2h01m",
    ]


def test_endpoint_and_safe() -> None:
    assert endpoint("::1", 80, 6) == "[::1]:80"
    assert endpoint("10.0.0.1", 80, 4) == "10.0.0.1:80"
    assert safe(None) == "-"
    assert safe("tab\there") == "tab\\x09here"
