"""`tcptrace top`: the screen rendered into a test console, keys, and the terminal restored."""

from __future__ import annotations

import io
import os
import pty
import termios
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from tcptrace.cli import cli
from tcptrace.model.closelat import CallKey, CallStats
from tcptrace.model.events import Op, TcpState
from tcptrace.model.histogram import Log2Histogram
from tcptrace.model.overview import Overview, sort_rows
from tcptrace.views.top import TopState, key_reader, render
from tests.unit.test_diagnosis import DATA, closed_ok, leak, tw_created

S = TcpState
NS = 1_000_000_000
MS = 1_000_000


def screen(ov: Overview, state: TopState | None = None, width: int = 120) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(render(ov, state))
    return out.getvalue()


def busy_overview() -> Overview:
    ov = Overview(threshold_ns=NS)
    ov.start(0)
    ov.states.seed([S.LISTEN, S.ESTABLISHED, S.ESTABLISHED], at_ns=0)
    for i in range(3):
        leak(ov, 10 + i, 111, i * MS)  # pid 111 holds 3 in CLOSE_WAIT
    closed_ok(ov, 50, 222, 0)
    for i in range(40):  # pid 333 creates 40 TIME_WAIT in 2 s
        ov.feed(tw_created(int(i * 50 * MS) + 1, 333))
    rows = [
        CallStats(CallKey(222, "p222", Op.CLOSE), Log2Histogram.of([5 * MS] * 10)),
        CallStats(CallKey(333, "client", Op.CLOSE), Log2Histogram.of([20_000] * 40)),
    ]
    ov.tick(2 * NS, closelat_rows=rows, lost=3)
    return ov


def test_renders_states_processes_latency_and_losses() -> None:
    text = screen(busy_overview())
    assert "tcptrace top" in text and "lost 3" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip()}
    assert lines["CLOSE_WAIT"].split()[1] == "3"
    assert lines["ESTABLISHED"].split()[1] == "2"  # 2 seeded + 4 born - 4 to CLOSE_WAIT
    assert lines["LISTEN"].split()[1] == "1"
    assert "seed + transitions" in lines["CLOSE_WAIT"]
    assert lines["TIME_WAIT"].split()[1] == "40" and "20.0" in lines["TIME_WAIT"]  # 40 in 2 s
    assert "close(): 50 calls" in text
    # Sorted by CLOSE_WAIT (the default): pid 111 first.
    pids = [
        line.split()[0]
        for line in text.splitlines()
        if line.split() and line.split()[0] in ("111", "222", "333")
    ]
    assert pids == ["111", "333", "222"]
    assert "keys: c CLOSE_WAIT" in text


@pytest.mark.parametrize(("key", "first"), [("c", 111), ("t", 333), ("l", 222)])
def test_sort_keys(key: str, first: int) -> None:
    ov = busy_overview()
    state = TopState()
    state.press(key)
    assert sort_rows(ov.processes(), state.sort)[0].pid == first
    assert screen(ov, state).count(f"{first} ") >= 1


def test_pid_filter_typed_and_cleared() -> None:
    ov = busy_overview()
    state = TopState()
    for k in "p33x3\n":
        state.press(k)
    assert state.pid == 333 and state.prompt() == "showing pid 333"
    text = screen(ov, state)
    assert "(pid 333 only)" in text and "\n111 " not in text and "client" in text
    for k in "p\r":
        state.press(k)
    assert state.pid is None
    for k in "p\x1b":
        state.press(k)
    assert state.typing is None
    state.press("Q")
    assert state.quit


def test_hostile_comm_is_not_interpreted() -> None:
    ov = Overview()
    ov.start(0)
    ov.feed(tr_hostile())
    ov.tick(NS)
    text = screen(ov)
    assert "\x1b[2J" not in text and "\\x1b[2J" in text


def tr_hostile() -> object:
    from tests.unit.test_lifecycle import tr

    return tr(1, 1, S.ESTABLISHED, S.CLOSE_WAIT, pid=9, comm="evil\x1b[2J")


def test_no_keys_without_a_terminal() -> None:
    with key_reader(io.StringIO()) as keys:
        assert keys is None
    r, w = os.pipe()
    try:
        with key_reader(os.fdopen(r, closefd=False)) as keys:
            assert keys is None
    finally:
        os.close(r)
        os.close(w)


def test_terminal_restored_on_every_exit_path() -> None:
    master, slave = pty.openpty()
    try:
        tty_file = os.fdopen(slave, "rb", buffering=0, closefd=False)
        before = termios.tcgetattr(slave)
        with key_reader(tty_file) as keys:
            assert keys is not None
            assert termios.tcgetattr(slave)[3] & termios.ICANON == 0  # cbreak
            os.write(master, b"tq")
            assert "".join(keys.keys()) == "tq"
            assert list(keys.keys()) == []  # nothing more, and no blocking
        assert termios.tcgetattr(slave) == before
        with pytest.raises(RuntimeError), key_reader(tty_file):
            raise RuntimeError("boom")
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_cli_top_replays_a_recording(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["top", "--from", str(DATA / "closewait_leaky.jsonl"), "--threshold", "100ms"]
    )
    assert result.exit_code == 0, result.output
    assert "leaky_server" in result.output
    row = next(line for line in result.output.splitlines() if "leaky_server" in line)
    assert row.split()[2] == "3"  # three sockets leaked in the recording
    assert "transitions since start" in result.output  # no /proc seed in a replay


def test_cli_top_usage_errors_are_one_line() -> None:
    result = CliRunner().invoke(cli, ["top", "--from", "/nonexistent.jsonl"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_host_snapshot_finds_this_process_socket_and_applies_filters() -> None:
    import socket

    from tcptrace.model.filters import EventFilter
    from tcptrace.system import hostsnap

    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        port = lsock.getsockname()[1]
        snap = hostsnap.take(EventFilter(ports=frozenset({port})))
        (s,) = snap.sockets
        assert (s.state, s.sport, s.pid) == (S.LISTEN, port, os.getpid())
        assert snap.distribution() == {S.LISTEN: 1}
        assert hostsnap.take(EventFilter(ports=frozenset({port}), pids=frozenset({os.getpid()}))).sockets == (
            s,
        )
        other = hostsnap.take(EventFilter(ports=frozenset({port}), comm="no-such-comm"))
        assert other.sockets == ()
