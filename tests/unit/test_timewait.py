"""The timewait model, its /proc parsers, its view and the command on recordings (no root)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from tcptrace.cli import cli
from tcptrace.model.events import TcpState, TimeWaitEvent, TwWhat
from tcptrace.model.timewait import (
    Dest,
    EventCounts,
    Proc,
    ProcCounts,
    Remote,
    TimewaitModel,
    TwCounts,
    by_remote,
    diff,
    explain_settings,
    forecast_dest,
    forecast_json,
    interval_json,
    totals_json,
)
from tcptrace.system.netstat import ProcNetError, parse_netstat, parse_sockstat_tw
from tcptrace.system.sysctl import SysctlError, parse_port_range, read_settings
from tcptrace.views.common import sparkline
from tcptrace.views.timewait import headline

NS = 1_000_000_000
MIX = Path(__file__).resolve().parent.parent / "data" / "timewait_mix.jsonl"


def tw(
    what: TwWhat,
    ts: float,
    *,
    pid: int = 100,
    sub: TcpState | None = TcpState.TIME_WAIT,
    how: str | None = None,
    sport: int = 40000,
    dport: int = 80,
    daddr: str = "10.0.0.2",
    skaddr: int = 0x1000,
    comm: str | None = None,
    start_ns: int | None = None,
    netns: int | None = None,
    bound: bool | None = None,
) -> TimeWaitEvent:
    return TimeWaitEvent(
        ts_ns=int(ts * NS),
        skaddr=skaddr,
        saddr="10.0.0.1",
        sport=sport,
        daddr=daddr,
        dport=dport,
        pid=pid,
        comm=comm or f"p{pid}",
        pid_start_ns=start_ns,
        netns=netns,
        what=what,
        substate=sub,
        how=how,
        port_bound=bound,
    )


# --- /proc and sysctl parsers -------------------------------------------------------


def test_port_range_parses_and_rejects_garbage() -> None:
    assert parse_port_range("32768\t60999\n") == (32768, 60999)
    for bad in ("", "1", "a b", "60999 32768", "0 10", "1 70000"):
        with pytest.raises(SysctlError):
            parse_port_range(bad)


def test_read_settings_from_a_fake_proc_sys(tmp_path: Path) -> None:
    ipv4 = tmp_path / "net" / "ipv4"
    ipv4.mkdir(parents=True)
    (ipv4 / "ip_local_port_range").write_text("10000\t10999\n")
    (ipv4 / "tcp_tw_reuse").write_text("1\n")
    (ipv4 / "tcp_fin_timeout").write_text("junk\n")
    s = read_settings(str(tmp_path))
    assert s.port_range == (10000, 10999) and s.ports == 1000
    assert s.tw_reuse == 1
    assert s.fin_timeout is None  # malformed: unknown, not a crash
    assert s.max_tw_buckets is None  # missing


def test_sockstat_and_netstat_parsers() -> None:
    text = "sockets: used 12\nTCP: inuse 1 orphan 0 tw 7 alloc 1 mem 58\nUDP: inuse 0 mem 0\n"
    assert parse_sockstat_tw(text) == 7
    with pytest.raises(ProcNetError, match="no TCP line"):
        parse_sockstat_tw("UDP: inuse 0\n")
    netstat = "TcpExt: TW TCPTimeWaitOverflow\nTcpExt: 12 3\nIpExt: InNoRoutes\nIpExt: 0\n"
    assert parse_netstat(netstat) == {
        "TcpExt": {"TW": 12, "TCPTimeWaitOverflow": 3},
        "IpExt": {"InNoRoutes": 0},
    }
    with pytest.raises(ProcNetError, match=":2: values do not match"):
        parse_netstat("TcpExt: TW X\nTcpExt: 1\n")
    with pytest.raises(ProcNetError, match="without its values"):
        parse_netstat("TcpExt: TW\n")


# --- counting ------------------------------------------------------------------------


def test_counts_only_real_time_wait_entries() -> None:
    c = EventCounts()
    c.feed(tw(TwWhat.CREATED, 1.0))  # immediate
    c.feed(tw(TwWhat.CREATED, 1.1, sub=TcpState.FIN_WAIT2, skaddr=2))  # parked ...
    c.feed(tw(TwWhat.CONVERTED, 1.2, how="fin", skaddr=2))  # ... then its FIN
    c.feed(tw(TwWhat.CREATED, 1.3, sub=TcpState.FIN_WAIT2, skaddr=3))  # parked ...
    c.feed(tw(TwWhat.PARKED_ENDED, 2.3, sub=TcpState.FIN_WAIT2, skaddr=3))  # ... dies in FIN_WAIT2
    c.feed(tw(TwWhat.CREATED, 1.4, sub=TcpState.FIN_WAIT2, skaddr=4))  # parked, unresolved
    c.feed(tw(TwWhat.CREATED, 1.5, sub=TcpState.FIN_WAIT2, skaddr=5))
    c.feed(tw(TwWhat.CONVERTED, 9.0, how="timer", skaddr=5))  # seen TIME_WAIT only at its timer
    c.feed(tw(TwWhat.KILLED, 3.0, skaddr=2))  # the converted one ends early: still created once
    c.feed(tw(TwWhat.RESET_SENT, 1.6, pid=200, sub=TcpState.CLOSE))
    c.feed(tw(TwWhat.RESET_RECEIVED, 1.6, pid=300, sub=TcpState.ESTABLISHED))
    t = c.snapshot()
    assert t.created == 3
    assert (t.immediate, t.converted_fin, t.converted_timer) == (1, 1, 1)
    assert t.parked == 4 and t.parked_ended == 1 and t.pending_fin_wait2 == 1
    assert t.killed == 1
    assert t.by_process[Proc(100, "p100")] == ProcCounts(created=3, parked=4)
    assert t.by_process[Proc(200, "p200")] == ProcCounts(resets_sent=1)
    assert t.by_process[Proc(300, "p300")] == ProcCounts(resets_received=1)
    assert t.by_dest == {Dest(4, "10.0.0.1", "10.0.0.2", 80): 3}


def test_a_reused_pid_is_another_process() -> None:
    """twA (pid 7) closes 50 connections and exits; twB gets pid 7 and closes 50 more: the
    kernel keys processes by (pid, start time), and the replay's counts do too."""
    c = EventCounts()
    for i in range(50):
        c.feed(tw(TwWhat.CREATED, 1 + i / 100, pid=7, comm="twA", start_ns=1_000, skaddr=i))
    for i in range(50):
        c.feed(tw(TwWhat.CREATED, 2 + i / 100, pid=7, comm="twB", start_ns=9_000, skaddr=i))
    # the same comm under a reused pid is still two processes
    c.feed(tw(TwWhat.CREATED, 3, pid=8, comm="w", start_ns=1))
    c.feed(tw(TwWhat.CREATED, 4, pid=8, comm="w", start_ns=2))
    t = c.snapshot()
    assert {p: n.created for p, n in t.by_process.items()} == {
        Proc(7, "twA", 1_000): 50,
        Proc(7, "twB", 9_000): 50,
        Proc(8, "w", 1): 1,
        Proc(8, "w", 2): 1,
    }
    rows = totals_json(t)["by_process"]
    assert [(r["pid"], r["pid_start_ns"], r["comm"], r["created"]) for r in rows[:2]] == [
        (7, 1_000, "twA", 50),
        (7, 9_000, "twB", 50),
    ]


def test_equal_addresses_in_two_network_namespaces_stay_apart() -> None:
    c = EventCounts()
    for i in range(30):
        c.feed(tw(TwWhat.CREATED, 1 + i / 100, netns=4026532001, skaddr=i))
    for i in range(20):
        c.feed(tw(TwWhat.CREATED, 2 + i / 100, netns=4026532002, skaddr=i))
    t = c.snapshot()
    assert t.by_dest == {
        Dest(4, "10.0.0.1", "10.0.0.2", 80, netns=4026532001): 30,
        Dest(4, "10.0.0.1", "10.0.0.2", 80, netns=4026532002): 20,
    }
    assert totals_json(t)["by_remote"] == [
        {"remote": "10.0.0.2:80", "netns": 4026532001, "created": 30},
        {"remote": "10.0.0.2:80", "netns": 4026532002, "created": 20},
    ]
    m = TimewaitModel()
    m.start(0)
    m.tick(10 * NS, kernel=t)
    forecasts = m.forecasts(ports=28232, tw_reuse=0)
    assert sorted((f.dest.netns, f.held_now) for f in forecasts) == [(4026532001, 30), (4026532002, 20)]
    assert {r["netns"] for r in map(forecast_json, forecasts)} == {4026532001, 4026532002}


def test_a_servers_time_wait_counts_by_its_port_and_the_clients_ip() -> None:
    """A tw whose local port was bound (a server's) is keyed (local ip, local port, remote
    ip): one key per client host, not per client port; it holds no port of this host."""
    c = EventCounts()
    for i in range(40):
        c.feed(tw(TwWhat.CREATED, 1 + i / 100, sport=8080, dport=30000 + i, bound=True, skaddr=i))
    t = c.snapshot()
    (dest,) = t.by_dest
    assert dest == Dest(4, "10.0.0.1", "10.0.0.2", 0, lport=8080) and dest.bound
    assert totals_json(t)["by_remote"] == [
        {"remote": "10.0.0.2", "netns": None, "local_port": 8080, "created": 40}
    ]
    m = TimewaitModel()
    m.start(0)
    m.tick(10 * NS, kernel=t)
    assert m.forecasts(ports=28232, tw_reuse=0) == []


def test_map_keys_decode_as_the_model_keys_them() -> None:
    """kernel/timewait.py's decoding of tw_dests and tw_procs keys (struct layouts from
    bpf/timewait.bpf.c), on hand-made ctypes keys."""
    import ctypes
    import socket

    from tcptrace.kernel.timewait import dest_of_key, proc_key

    class DestKey(ctypes.Structure):
        _fields_ = [
            ("laddr", ctypes.c_ubyte * 16),
            ("raddr", ctypes.c_ubyte * 16),
            ("lport", ctypes.c_uint16),
            ("rport", ctypes.c_uint16),
            ("family", ctypes.c_uint16),
            ("pad", ctypes.c_uint16),
            ("netns", ctypes.c_uint32),
            ("pad2", ctypes.c_uint32),
        ]

    class ProcKey(ctypes.Structure):
        _fields_ = [("tgid", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("start_ns", ctypes.c_uint64)]

    key = DestKey()
    ctypes.memmove(key.laddr, socket.inet_aton("10.0.0.1"), 4)
    ctypes.memmove(key.raddr, socket.inet_aton("10.0.0.2"), 4)
    key.rport, key.family, key.netns = 443, socket.AF_INET, 4026532001
    assert dest_of_key(key) == Dest(4, "10.0.0.1", "10.0.0.2", 443, netns=4026532001)
    key6 = DestKey()
    ctypes.memmove(key6.laddr, socket.inet_pton(socket.AF_INET6, "::1"), 16)
    ctypes.memmove(key6.raddr, socket.inet_pton(socket.AF_INET6, "::1"), 16)
    key6.lport, key6.family = 8080, socket.AF_INET6
    assert dest_of_key(key6) == Dest(6, "::1", "::1", 0, lport=8080)
    assert proc_key(ProcKey(7, 0, 123)) == (7, 123)


@st.composite
def tw_lives(draw: Any) -> list[tuple[str, int]]:
    """Each tw: 'immediate', or parked then one of fin / timer / ended / pending."""
    return draw(st.lists(st.sampled_from(["immediate", "fin", "timer", "ended", "pending"]), max_size=60))


@given(tw_lives())
def test_created_equals_the_tws_that_reached_time_wait(lives: list[str]) -> None:
    c = EventCounts()
    for i, life in enumerate(lives):
        if life == "immediate":
            c.feed(tw(TwWhat.CREATED, i, skaddr=i))
            continue
        c.feed(tw(TwWhat.CREATED, i, sub=TcpState.FIN_WAIT2, skaddr=i))
        if life in ("fin", "timer"):
            c.feed(tw(TwWhat.CONVERTED, i + 0.5, how=life, skaddr=i))
        elif life == "ended":
            c.feed(tw(TwWhat.PARKED_ENDED, i + 0.5, sub=TcpState.FIN_WAIT2, skaddr=i))
    t = c.snapshot()
    assert t.created == sum(1 for x in lives if x in ("immediate", "fin", "timer"))
    assert t.pending_fin_wait2 == lives.count("pending")
    assert sum(t.by_dest.values()) == t.created


def test_diff_keeps_what_changed() -> None:
    d1, d2 = Dest(4, "a", "b", 1), Dest(4, "a", "c", 2)
    x, y = Proc(1, "x"), Proc(2, "y")
    old = TwCounts(immediate=5, by_process={x: ProcCounts(created=5)}, by_dest={d1: 5})
    new = TwCounts(
        immediate=8,
        resets_sent=1,
        by_process={x: ProcCounts(created=5), y: ProcCounts(created=3, resets_sent=1)},
        by_dest={d1: 5, d2: 3},
    )
    d = diff(new, old)
    assert d.created == 3 and d.resets_sent == 1
    assert d.by_process == {y: ProcCounts(created=3, resets_sent=1)}
    assert d.by_dest == {d2: 3}
    assert by_remote({d1: 2, Dest(4, "z", "b", 1): 3}) == {Remote("b:1"): 5}
    # ... per network namespace, and the bound side by the client's ip and the local port
    assert by_remote({d1: 2, Dest(4, "a", "b", 1, netns=9): 3, Dest(4, "a", "b", 0, lport=80): 4}) == {
        Remote("b:1"): 2,
        Remote("b:1", netns=9): 3,
        Remote("b", local_port=80): 4,
    }


def test_ticks_give_rates_per_interval_and_per_process() -> None:
    m = TimewaitModel()
    m.start(0)
    for i in range(100):  # 100 in the first second, by two processes
        m.feed(tw(TwWhat.CREATED, 0.001 + i * 0.0099, pid=1 + i % 2, sport=30000 + i))
    first = m.tick(1 * NS)
    for i in range(50):  # 50 in the next two seconds
        m.feed(tw(TwWhat.CREATED, 1.01 + i * 0.039, pid=1, sport=31000 + i))
    second = m.tick(3 * NS)
    assert first.delta.created == 100 and first.rate_per_s == pytest.approx(100)
    assert second.delta.created == 50 and second.rate_per_s == pytest.approx(25)
    assert second.delta.by_process == {Proc(1, "p1"): ProcCounts(created=50)}
    assert m.rates() == pytest.approx([100, 25])
    obj = interval_json(second)
    assert obj["created"] == 50 and obj["rate_per_s"] == 25.0
    assert obj["by_process"] == [
        {
            "pid": 1,
            "pid_start_ns": None,
            "comm": "p1",
            "created": 50,
            "rate_per_s": 25.0,
            "resets_sent": 0,
            "resets_received": 0,
        }
    ]
    assert obj["by_remote"] == [{"remote": "10.0.0.2:80", "netns": None, "created": 50, "rate_per_s": 25.0}]
    assert obj["created_total"] == 150


def test_kernel_counts_win_over_events_when_given() -> None:
    """Live, the kernel's exact counts are the truth even when events were lost."""
    m = TimewaitModel()
    m.start(0)
    m.feed(tw(TwWhat.CREATED, 0.5))
    iv = m.tick(NS, kernel=TwCounts(immediate=40))
    assert iv.delta.created == 40
    assert m.events.snapshot().created == 1


# --- the arithmetic --------------------------------------------------------------------


def test_forecast_arithmetic() -> None:
    dest = Dest(4, "10.0.0.1", "10.0.0.2", 80)
    f = forecast_dest(dest, 1000.0, 0, 28232, 0)  # DOMAIN.md's load balancer
    assert f.held_steady == 60000
    assert f.seconds_to_exhaustion == pytest.approx(28.232)
    assert not f.reuse
    half = forecast_dest(dest, 1000.0, 14116, 28232, 0)
    assert half.seconds_to_exhaustion == pytest.approx(14.116)
    assert forecast_dest(dest, 100.0, 6000, 28232, 0).seconds_to_exhaustion is None
    assert forecast_dest(dest, 100.0, 0, 28232, 0).utilization == pytest.approx(6000 / 28232)
    assert forecast_dest(dest, 1.0, 0, 28232, 1).reuse
    assert not forecast_dest(dest, 1.0, 0, 28232, 2).reuse  # 2: loopback only
    assert forecast_dest(Dest(4, "127.0.0.1", "127.0.0.2", 80), 1.0, 0, 100, 2).reuse


def test_model_forecasts_per_destination_from_the_last_minute() -> None:
    m = TimewaitModel()
    m.start(0)
    busy, quiet = Dest(4, "10.0.0.1", "10.0.0.2", 80), Dest(4, "10.0.0.1", "10.0.0.3", 443)
    for second in range(1, 11):
        m.tick(
            second * NS,
            kernel=TwCounts(immediate=600 * second, by_dest={busy: 500 * second, quiet: 100 * second}),
        )
    rows = m.forecasts(ports=28232, tw_reuse=0)
    assert [r.dest for r in rows] == [busy, quiet]
    assert rows[0].rate_per_s == pytest.approx(500)
    assert rows[0].held_steady == pytest.approx(30000)
    assert rows[0].held_now == 5000
    assert rows[0].seconds_to_exhaustion == pytest.approx((28232 - 5000) / 500)
    assert rows[1].seconds_to_exhaustion is None
    assert m.steady_total() == pytest.approx(36000)


def test_settings_are_explained_with_warnings() -> None:
    advice = explain_settings((32768, 60999), 2, 131072, 60, steady_total=200000.0, tw_now=5, utilization=0.9)
    by_name = {a.setting: a for a in advice}
    assert "28232 ephemeral ports" in by_name["net.ipv4.ip_local_port_range"].meaning
    assert by_name["net.ipv4.tcp_tw_reuse"].warn  # a destination's ports run short
    assert by_name["net.ipv4.tcp_max_tw_buckets"].warn
    assert "200000" in by_name["net.ipv4.tcp_max_tw_buckets"].meaning
    assert "not TIME_WAIT" in by_name["net.ipv4.tcp_fin_timeout"].meaning or "does not" in (
        by_name["net.ipv4.tcp_fin_timeout"].meaning
    )
    quiet = explain_settings(None, 1, 131072, None, steady_total=10.0, tw_now=5)
    assert [a.warn for a in quiet] == [False, False]


def test_the_default_tw_reuse_is_no_warning_when_ports_are_plenty() -> None:
    for reuse in (0, 2):
        advice = explain_settings((32768, 60999), reuse, None, None, 600.0, None, utilization=0.02)
        assert not any(a.warn for a in advice)


def test_rfc1337_says_whether_an_rst_can_end_time_wait() -> None:
    (off,) = [a for a in explain_settings(None, None, None, None, 0.0, None, rfc1337=0)]
    assert off.setting == "net.ipv4.tcp_rfc1337" and "ends a TIME_WAIT socket" in off.meaning
    (on,) = explain_settings(None, None, None, None, 0.0, None, rfc1337=1)
    assert "ignore RSTs" in on.meaning
    assert explain_settings(None, None, None, None, 0.0, None) == []


def test_sparkline_and_headline_render() -> None:
    assert sparkline([]) == ""
    assert sparkline([0, 0]) == "  "
    assert sparkline([1, 8])[-1] == "█"
    m = TimewaitModel()
    m.start(0)
    m.feed(tw(TwWhat.CREATED, 0.5, pid=7))
    iv = m.tick(2 * NS)
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(headline(iv, m.totals))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "TIME_WAIT created 0.5/s" in text and "(1 in 2.0s, 1 total)" in text


# --- the command, on a recording made with `tcptrace timewait --json --events` -------------


def lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def recorded_summary() -> dict[str, Any]:
    return lines(MIX.read_text())[-1]


def test_replay_reproduces_the_live_totals() -> None:
    live = recorded_summary()
    result = CliRunner().invoke(cli, ["timewait", "--from", str(MIX), "--json"])
    assert result.exit_code == 0, result.output
    objs = lines(result.output)
    assert objs[0]["type"] == "header"
    summary = objs[-1]
    assert summary["type"] == "summary"
    for key in ("created_total", "immediate", "converted_at_fin", "parked_fin_wait2", "parked_ended"):
        assert summary[key] == live[key], key
    assert summary["resets_sent"] == live["resets_sent"] == 3
    assert summary["created_total"] == 9  # 5 client-closed + 4 server-closed in that run
    assert {p["pid"]: p["created"] for p in summary["by_process"]} == {
        p["pid"]: p["created"] for p in live["by_process"]
    }
    assert sum(o["created"] for o in objs if o["type"] == "interval") == 9


def test_replay_filters_by_pid_and_prints_text() -> None:
    live = recorded_summary()
    top = max(live["by_process"], key=lambda p: p["created"])
    result = CliRunner().invoke(cli, ["timewait", "--from", str(MIX), "--pid", str(top["pid"])])
    assert result.exit_code == 0, result.output
    assert f"{top['created']} TIME_WAIT created" in result.output
    assert "remedies, in order:" in result.output


def test_bad_input_is_one_line_and_an_exit_code(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["timewait", "--events", "--from", str(MIX)])
    assert result.exit_code == 2 and "--events needs --json" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(MIX.read_text().splitlines()[0] + "\n{not json\n")
    result = runner.invoke(cli, ["timewait", "--from", str(bad)])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "bad.jsonl:2" in result.output
