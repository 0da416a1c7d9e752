"""Verdicts with evidence, on generated streams, host snapshots and a recording."""

from __future__ import annotations

import dataclasses
import doctest
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

import tcptrace.model.diagnosis
import tcptrace.views.report
from tcptrace.cli import cli
from tcptrace.model.closelat import CallKey, CallStats
from tcptrace.model.cwagg import Emulator
from tcptrace.model.diagnosis import HostSnapshot, HostSocket, Verdict, diagnose
from tcptrace.model.endpoint import Endpoint, Owner, owner_of
from tcptrace.model.events import STATE_ORDER, Op, TcpState, TimeWaitEvent, TwWhat
from tcptrace.model.histogram import Log2Histogram
from tcptrace.model.overview import Emulation, Overview, StateCounts
from tcptrace.model.timewait import TwCounts
from tcptrace.system.sysctl import TcpSettings
from tcptrace.views.report import render_report
from tests.unit.test_lifecycle import touch, tr

S = TcpState
NS = 1_000_000_000
MS = 1_000_000
DATA = Path(__file__).parent.parent / "data"

ORIGIN = ("accept+0x10 [libc.so.6]", "handle_conn+0x4f [myserver]", "main+0x20 [myserver]")
EOF_AT = ("recv+0x19 [libc.so.6]", "read_request+0x22 [myserver]", "handle_conn+0x60 [myserver]")


def test_doctests() -> None:
    assert doctest.testmod(tcptrace.model.diagnosis).failed == 0
    assert doctest.testmod(tcptrace.views.report).failed == 0


def leak(ov: Overview, sk: int, pid: int, ts: int, last: tuple[str, ...] = EOF_AT, eof: bool = True) -> None:
    """A socket accepted by ``pid``; the peer closes; the app reads (EOF or not) and never closes."""
    peer = f"10.0.{sk // 250}.{sk % 250}"
    ov.feed(tr(ts + 1, sk, S.LISTEN, S.SYN_RECV, pid=pid, daddr=peer))
    ov.feed(tr(ts + 2, sk, S.SYN_RECV, S.ESTABLISHED, pid=pid, daddr=peer))
    ov.feed(touch(ts + 3, sk, Op.ACCEPT, pid, ustack=ORIGIN))
    ov.feed(tr(ts + 10, sk, S.ESTABLISHED, S.CLOSE_WAIT, pid=pid, daddr=peer))
    ov.feed(touch(ts + 11, sk, Op.RECV if eof else Op.SEND, pid, ret=0 if eof else 5, ustack=last))


def closed_ok(ov: Overview, sk: int, pid: int, ts: int) -> None:
    leak(ov, sk, pid, ts)
    ov.feed(tr(ts + 20 * MS, sk, S.CLOSE_WAIT, S.LAST_ACK, pid=pid))
    ov.feed(tr(ts + 21 * MS, sk, S.LAST_ACK, S.CLOSE, pid=pid))


def topics(verdicts: list[Verdict]) -> list[str]:
    return [v.topic for v in verdicts]


def test_leak_named_with_pid_rate_and_functions() -> None:
    ov = Overview(threshold_ns=5 * NS)
    ov.start(0)
    for i in range(6):  # six leaks over a 120 s window: 3 a minute
        leak(ov, 100 + i, 1234, i * 10 * NS)
    for i in range(4):
        closed_ok(ov, 200 + i, 1234, i * NS)
    ov.tick(120 * NS)
    d = diagnose(ov)
    (v,) = [v for v in d.verdicts if v.topic == "close_wait_leak"]
    assert v.severity == "problem" and v.pid == 1234 and v.comm == "p1234"
    assert v.text == (
        "pid 1234 (p1234) leaks about 3 sockets a minute in CLOSE_WAIT at read_request [myserver]: "
        "the app read EOF there without closing: look for an error path that skips close()"
    )
    assert v.functions == ("read_request", "handle_conn")
    assert v.data["app"] == "read_request [myserver]" and v.data["app_from"] == "post_fin_touch"
    assert "origin (accept): handle_conn [myserver]" in v.evidence
    assert "after the FIN (recv -> 0 (EOF)) on 6 of them: read_request [myserver]" in v.evidence
    assert v.data["count"] == 6 and v.data["eof_seen"] == 6
    assert any("6 distinct remotes" in e for e in v.evidence)
    assert d.close_wait_entered == 10 and d.close_wait_closed == 4
    assert d.worst == "problem"
    assert "healthy" not in topics(d.verdicts)
    json.dumps(d.to_json())  # serializable


def test_two_code_paths_two_verdicts_and_young_sockets_counted_in_the_rate() -> None:
    ov = Overview(threshold_ns=5 * NS)
    ov.start(0)
    leak(ov, 1, 7, 0)
    leak(ov, 2, 7, 1 * NS, last=("send+0x5 [libc.so.6]", "flush_reply+0x9 [myserver]"), eof=False)
    leak(ov, 3, 7, 58 * NS)  # 2 s old at the end: not a suspect yet, but the same path
    ov.tick(60 * NS)
    d = diagnose(ov)
    leaks = [v for v in d.verdicts if v.topic == "close_wait_leak"]
    assert len(leaks) == 2
    by_touch = {v.data["app"]: v for v in leaks}
    assert by_touch["read_request [myserver]"].data["new_in_window"] == 2
    assert "about 2 sockets a minute" in by_touch["read_request [myserver]"].text
    never = by_touch["flush_reply [myserver]"]
    assert "at flush_reply [myserver]: the app last touched them there (send)" in never.text
    assert "never read the EOF" in never.text
    young = [v for v in d.verdicts if v.topic == "close_wait_young"]
    assert young and young[0].data == {"count": 1, "eof_seen": 1}


def test_healthy_when_every_socket_is_closed() -> None:
    ov = Overview(threshold_ns=NS)
    ov.start(0)
    for i in range(5):
        closed_ok(ov, i + 1, 3, i * NS)
    ov.tick(10 * NS)
    d = diagnose(ov)
    assert [v.severity for v in d.verdicts] == ["ok"]
    assert d.verdicts[0].evidence == ("5 sockets entered CLOSE_WAIT, 5 were closed by their app",)
    # The kernel's histogram of the times to close: exact count and extremes.
    assert d.time_to_close.count == 5 and d.time_to_close.min_ns == d.time_to_close.max_ns == 20 * MS - 10


def cw(sport: int, dport: int, daddr: str, pid: int | None = 42, inode: int = 0) -> HostSocket:
    return HostSocket(
        Endpoint(4, "10.0.0.1", sport, daddr, dport), S.CLOSE_WAIT, inode or dport, owner_of(pid, "srv")
    )


def test_stuck_across_the_window_and_remote_grouping() -> None:
    start = HostSnapshot(
        0,
        (
            cw(80, 1000, "192.0.2.7"),
            cw(80, 1001, "192.0.2.7"),
            cw(80, 1002, "192.0.2.8"),  # gone by the end
            HostSocket(Endpoint(4, "10.0.0.1", 80, "0.0.0.0", 0), S.LISTEN, 5, Owner(42, "srv")),
        ),
    )
    end = HostSnapshot(
        30 * NS,
        (
            cw(80, 1000, "192.0.2.7"),
            cw(80, 1001, "192.0.2.7"),
            cw(80, 1003, "192.0.2.7"),  # new
            cw(80, 1001, "192.0.2.7", inode=99),  # same tuple, another socket: not stuck
            HostSocket(Endpoint(4, "10.0.0.1", 80, "0.0.0.0", 0), S.LISTEN, 5, Owner(42, "srv")),
        ),
    )
    ov = Overview()
    ov.start(0)
    ov.tick(30 * NS)
    d = diagnose(ov, start=start, end=end)
    (stuck,) = [v for v in d.verdicts if v.topic == "close_wait_stuck"]
    assert stuck.pid == 42 and stuck.severity == "problem"
    assert "holds 2 sockets in CLOSE_WAIT that were there at the start and still are after 30 s" in stuck.text
    assert {s.sock.dport for s in d.stuck} == {1000, 1001}
    (rem,) = [v for v in d.verdicts if v.topic == "close_wait_remotes"]
    assert "4 sockets in CLOSE_WAIT at the end (was 3 at start)" in rem.text
    assert "one remote dominates" in rem.text and "192.0.2.7" in rem.text
    assert d.start == {S.CLOSE_WAIT: 3, S.LISTEN: 1} and d.end == {S.CLOSE_WAIT: 4, S.LISTEN: 1}
    assert d.close_wait_owners[0].pid == 42 and d.close_wait_owners[0].count == 4


def test_many_distinct_remotes_point_at_the_application() -> None:
    socks = tuple(cw(80, 2000 + i, f"198.51.100.{i}") for i in range(5))
    ov = Overview()
    ov.start(0)
    d = diagnose(ov, start=HostSnapshot(0, ()), end=HostSnapshot(NS, socks))
    (rem,) = [v for v in d.verdicts if v.topic == "close_wait_remotes"]
    assert "5 distinct remotes, at most 1 each" in rem.text and "own error path" in rem.text


def tw_created(ts: int, pid: int, dport: int = 443) -> TimeWaitEvent:
    return TimeWaitEvent(
        ts_ns=ts,
        skaddr=ts + 1,
        saddr="10.0.0.1",
        sport=40000,
        daddr="10.0.0.2",
        dport=dport,
        pid=pid,
        comm="client",
        what=TwWhat.CREATED,
        substate=S.TIME_WAIT,
    )


@pytest.mark.parametrize(
    ("ports", "severity", "phrase"),
    [
        ((32768, 60999), "info", "the port range holds it"),
        ((60000, 60999), "problem", "exhaustion ('Cannot assign requested address')"),
        ((50000, 60999), "warning", "reuse connections before load grows"),
    ],
)
def test_time_wait_against_the_port_range(ports: tuple[int, int], severity: str, phrase: str) -> None:
    ov = Overview()
    ov.start(0)
    for i in range(1000):  # 100 a second for 10 s: ~6000 held at steady state
        ov.feed(tw_created(i * 10 * MS, 9))
    ov.tick(10 * NS)
    settings = TcpSettings(port_range=ports, tw_reuse=0, max_tw_buckets=262144, fin_timeout=60)
    d = diagnose(ov, settings=settings)
    (v,) = [v for v in d.verdicts if v.topic == "time_wait"]
    assert v.pid == 9 and v.severity == severity
    assert "pid 9 (client) creates about 100.0 TIME_WAIT sockets a second" in v.text
    assert phrase in v.text
    assert d.tw_created == 1000 and d.ports == ports[1] - ports[0] + 1
    assert any(a.setting == "net.ipv4.tcp_tw_reuse" for a in d.settings)


def test_losses_make_a_warning() -> None:
    ov = Overview()
    ov.start(0)
    d = diagnose(ov, lost=12)
    assert "lost_events" in topics(d.verdicts)
    assert d.worst == "warning"


def test_flagged_close_calls_are_counted_from_the_kernels_rows_live() -> None:
    """Live, no close() event is sent: the calls that reset, lingered or closed late in
    CLOSE_WAIT are counted in the kernel's histogram rows."""
    ov = Overview()
    ov.start(0)
    hist = Log2Histogram.of([MS] * 4)
    rows = [CallStats(CallKey(5, "srv", Op.CLOSE), hist, resets=2, late_close_wait=1)]
    ov.tick(NS, closelat_rows=rows)
    assert ov.close_flags() == Counter({"reset": 2, "lingered": 0, "late_close_wait": 1})
    (v,) = [v for v in diagnose(ov).verdicts if v.topic == "close_reset"]
    assert v.text.startswith("2 close() calls sent a reset")
    from tcptrace.views.top import latency_text

    assert "resets 2  lingered 0  late CLOSE_WAIT 1" in latency_text(ov).plain


def test_a_full_kernel_table_makes_a_warning_and_is_reported() -> None:
    ov = Overview(threshold_ns=NS, emulation=Emulation(Emulator(max_open=1)))
    ov.start(0)
    leak(ov, 1, 7, 0)
    leak(ov, 2, 7, MS)  # the table of sockets in CLOSE_WAIT holds one: counted, not kept
    ov.tick(10 * NS, tw_failed={"tw_dests": 3})
    d = diagnose(ov)
    (v,) = [v for v in d.verdicts if v.topic == "table_full"]
    assert v.severity == "warning" and v.data == {"close_wait_open": 1, "tw_dests": 3}
    assert "4 inserts refused" in v.text
    assert d.close_wait_entered == 2 and len(ov.closewait.open) == 1
    assert d.to_json()["table_failures"] == {"close_wait_open": 1, "tw_dests": 3}
    assert "table full 4" in " ".join(text_of_top(ov).split())


def text_of_top(ov: Overview) -> str:
    from tcptrace.views.top import headline

    return headline(ov).plain


def test_state_counts_seed_plus_transitions() -> None:
    """A snapshot plus the kernel's transition counts since: those it had counted when the
    snapshot was read are its base (already in the snapshot), and are not applied again."""
    sc = StateCounts()
    moves: Counter[tuple[TcpState, TcpState]] = Counter({(S.ESTABLISHED, S.CLOSE_WAIT): 1})
    sc.seed([S.LISTEN, S.ESTABLISHED, S.ESTABLISHED, S.TIME_WAIT], 100, moves, TwCounts())
    moves.update(
        {
            (S.LISTEN, S.SYN_RECV): 1,  # a child is born; the listener stays
            (S.SYN_RECV, S.ESTABLISHED): 1,
            (S.ESTABLISHED, S.CLOSE_WAIT): 1,
            (S.ESTABLISHED, S.FIN_WAIT1): 1,
            (S.FIN_WAIT1, S.FIN_WAIT2): 1,
            (S.FIN_WAIT2, S.CLOSE): 1,
        }
    )
    sc.apply(moves, 200)
    sc.timewait(TwCounts(immediate=1), 206)
    counts = dict(sc.rows())
    assert counts[S.LISTEN] == 1 and counts[S.ESTABLISHED] == 1 and counts[S.CLOSE_WAIT] == 1
    assert counts[S.FIN_WAIT2] == 0 and counts[S.TIME_WAIT] == 2
    assert sc.how(S.TIME_WAIT).startswith("seed + created") and sc.applied == 6
    sc.host_tw = 17
    assert sc.get(S.TIME_WAIT) == 17 and "sockstat" in sc.how(S.TIME_WAIT)
    moves[(S.CLOSE_WAIT, S.LAST_ACK)] += 2
    sc.apply(moves, 300)
    assert sc.get(S.CLOSE_WAIT) == 0  # drift (unseen sockets) shows as 0, never negative
    # A second seed (top's re-read) starts again from the counts read with it.
    sc.seed([S.LISTEN, S.CLOSE_WAIT], 400, moves)
    moves[(S.ESTABLISHED, S.CLOSE_WAIT)] += 3
    sc.apply(moves, 500)
    assert (sc.get(S.CLOSE_WAIT), sc.get(S.ESTABLISHED), sc.get(S.LISTEN)) == (4, 0, 1)
    assert sc.seeds == 2 and sc.applied == 11  # since the first seed


def test_state_counts_equal_the_truth_for_any_snapshot_time() -> None:
    """Random socket lives (accepted, connected, closed either side first, reset, listeners
    opening and closing) through the emulated kernel counts: a snapshot of the true states
    taken at any point, plus the counts since, gives the true states at every later read."""
    rng = random.Random(14)
    paths = [
        [S.SYN_RECV, S.ESTABLISHED, S.CLOSE_WAIT, S.LAST_ACK, S.CLOSE],
        [S.SYN_SENT, S.ESTABLISHED, S.FIN_WAIT1, S.FIN_WAIT2, S.CLOSE],
        [S.SYN_SENT, S.ESTABLISHED, S.CLOSE_WAIT, S.CLOSE],
        [S.SYN_RECV, S.CLOSE],
        [S.SYN_SENT, S.ESTABLISHED, S.FIN_WAIT1, S.CLOSING, S.CLOSE],
        [S.LISTEN, S.CLOSE],
    ]
    for trial in range(20):
        emulation = Emulation()
        truth: dict[int, TcpState] = {}
        socks: dict[int, list[TcpState]] = {}
        next_sk, ts = 1, 0
        sc = StateCounts()
        seed_at = rng.randrange(50, 400)
        for step in range(500):
            ts += 1
            if step == seed_at:
                sc.seed(truth.values(), ts, emulation.moves)
            if rng.random() < 0.3 or not socks:
                sk, next_sk = next_sk, next_sk + 1
                socks[sk] = list(rng.choice(paths))
                old = S.LISTEN if socks[sk][0] == S.SYN_RECV else S.CLOSE
            else:
                sk = rng.choice(list(socks))
                old = truth[sk]
            new = socks[sk].pop(0)
            emulation.feed(tr(ts, sk, old, new))
            if new == S.CLOSE:
                truth.pop(sk, None)
                del socks[sk]
            else:
                truth[sk] = new
            if step > seed_at and rng.random() < 0.1:
                sc.apply(emulation.moves, ts)
                want = Counter(truth.values())
                assert {s: sc.get(s) for s in STATE_ORDER if s != S.TIME_WAIT} == {
                    s: want[s] for s in STATE_ORDER if s != S.TIME_WAIT
                }, (trial, step)


def test_parked_fin_wait2_and_time_wait_ageing() -> None:
    sc = StateCounts()
    sc.seed([S.TIME_WAIT, S.TIME_WAIT, S.ESTABLISHED, S.ESTABLISHED], 0, Counter(), TwCounts())
    # An orphaned FIN_WAIT2 socket is parked as a tw: still FIN_WAIT2, as ss shows it.
    closing = Counter(
        {(S.ESTABLISHED, S.FIN_WAIT1): 1, (S.FIN_WAIT1, S.FIN_WAIT2): 1, (S.FIN_WAIT2, S.CLOSE): 1}
    )
    sc.apply(closing, 3)
    sc.timewait(TwCounts(parked=1), 3)
    assert (sc.get(S.FIN_WAIT2), sc.get(S.TIME_WAIT)) == (1, 2)
    sc.timewait(TwCounts(parked=1, converted_fin=1), 10 * NS)  # its FIN came
    assert (sc.get(S.FIN_WAIT2), sc.get(S.TIME_WAIT)) == (0, 3)
    sc.apply(closing + closing, 11 * NS)
    sc.timewait(TwCounts(parked=2, converted_fin=1), 11 * NS)
    assert sc.get(S.FIN_WAIT2) == 1
    sc.timewait(TwCounts(parked=2, converted_fin=1, parked_ended=1), 20 * NS)  # never TIME_WAIT
    assert (sc.get(S.FIN_WAIT2), sc.get(S.TIME_WAIT)) == (0, 3)
    sc.advance(60 * NS)  # the seeded ones have ended; the one made at 10 s has not
    assert sc.get(S.TIME_WAIT) == 1
    sc.advance(70 * NS)
    assert sc.get(S.TIME_WAIT) == 0 and sc.tw_created == 1


def test_time_wait_ended_early_leaves_the_count() -> None:
    """TIME_WAIT sockets that ended early (the kernel counts them, without their age) leave
    the count, the oldest first: the seed's, then the earliest creations."""
    sc = StateCounts()
    sc.seed([S.TIME_WAIT, S.TIME_WAIT], 0, Counter(), TwCounts())
    sc.timewait(TwCounts(immediate=3), NS)
    assert sc.get(S.TIME_WAIT) == 5
    sc.timewait(TwCounts(immediate=3, killed=2), 5 * NS)
    assert sc.get(S.TIME_WAIT) == 3 and sc.tw_seed_left == 0
    sc.timewait(TwCounts(immediate=3, killed=3), 6 * NS)
    assert sc.get(S.TIME_WAIT) == 2
    sc.timewait(TwCounts(immediate=3, killed=9), 7 * NS)  # more than it knew of: none left
    assert sc.get(S.TIME_WAIT) == 0 and not sc.tw_recent
    sc.timewait(TwCounts(immediate=4, killed=9), 8 * NS)
    assert sc.get(S.TIME_WAIT) == 1
    sc.advance(68 * NS + 1)  # its 60 s are over
    assert sc.get(S.TIME_WAIT) == 0


def test_report_is_self_contained_and_escapes_hostile_text() -> None:
    ov = Overview(threshold_ns=NS)
    ov.start(0)
    hostile = "<script>alert(1)</script>"
    ov.feed(tr(1, 1, S.LISTEN, S.SYN_RECV, pid=66, comm=hostile))
    ov.feed(tr(2, 1, S.SYN_RECV, S.ESTABLISHED, pid=66, comm=hostile))
    ov.feed(tr(10, 1, S.ESTABLISHED, S.CLOSE_WAIT, pid=66, comm=hostile))
    for i in range(50):
        ov.feed(tw_created(i * 100 * MS, 9))
    ov.tick(3 * NS)
    ov.tick(5 * NS)
    d = diagnose(ov, settings=TcpSettings(port_range=(32768, 60999), tw_reuse=2))
    html = render_report(d, ov, {"host": "h<1>", "kernel": "6.18", "filter": "none"})
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<script" not in html and hostile not in html
    assert "&lt;script&gt;" in html and "h&lt;1&gt;" in html
    assert "<svg" in html and "src=" not in html and "href=" not in html and "@import" not in html
    assert "leaks" in html and "TIME_WAIT created per second" in html


def test_report_plot_has_a_time_axis_and_the_footer_says_what_made_it(tmp_path: Path) -> None:
    """Replayed through the CLI: ticks in wall-clock time (the recording's clock offset), and
    a footer with the version, the recording's host, the command line and the window."""
    from tcptrace import __version__

    rec = DATA / "timewait_mix.jsonl"
    header = json.loads(rec.read_text().splitlines()[0])
    out = tmp_path / "r.html"
    result = subprocess.run(
        [sys.executable, "-m", "tcptrace", "diagnose", "--from", str(rec), "--report", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    html = out.read_text()
    plot = html[html.index('aria-label="TIME_WAIT created per second') :]
    plot = plot[: plot.index("</svg>")]
    ticks = re.findall(r'text-anchor="middle">(\d\d:\d\d:\d\d)</text>', plot)
    assert len(ticks) == 5 and ticks == sorted(ticks) and "local time" in plot
    # The first interval ends 1 s after the first event: its wall-clock time is the first tick.
    first_ts = json.loads(rec.read_text().splitlines()[1])["ts_ns"]
    first_end = (first_ts + NS + header["clock_offset_ns"]) / NS
    assert ticks[0] == time.strftime("%H:%M:%S", time.localtime(first_end))
    foot = html[html.index("<footer") :]
    assert f"tcptrace {__version__}" in foot and f"host {header['host']}" in foot
    assert f"command line: tcptrace diagnose --from {rec} --report {out}" in foot
    assert f"replayed from {rec}" in foot
    assert re.search(r"window \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+ to \d\d:\d\d:\d\d \(\d+\.\d s\)", foot)


def test_cli_diagnose_a_recording_names_the_leaking_pid_and_function() -> None:
    rec = DATA / "closewait_leaky.jsonl"
    header = json.loads(rec.read_text().splitlines()[0])
    result = CliRunner().invoke(cli, ["diagnose", "--from", str(rec), "--json", "--threshold", "100ms"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.splitlines()[-1])
    assert summary["type"] == "summary" and summary["command"] == "diagnose"
    (leak_v,) = [v for v in summary["verdicts"] if v["topic"] == "close_wait_leak"]
    assert leak_v["pid"] == header["server_pid"] and leak_v["comm"] == "leaky_server"
    assert "leak_connection" in leak_v["functions"]
    assert leak_v["data"]["count"] == len(header["leaked_client_ports"])
    assert summary["close_wait"]["entered"] == len(header["leaked_client_ports"]) + len(
        header["closed_client_ports"]
    )


def test_cli_report_never_overwrites_without_force(tmp_path: Path) -> None:
    rec = str(DATA / "closewait_leaky.jsonl")
    out = tmp_path / "r.html"
    out.write_text("precious")
    runner = CliRunner()
    result = runner.invoke(cli, ["diagnose", "--from", rec, "--report", str(out)])
    assert result.exit_code == 2 and "exists" in result.output and "Traceback" not in result.output
    assert out.read_text() == "precious"
    result = runner.invoke(cli, ["diagnose", "--from", rec, "--report", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert out.read_text().startswith("<!DOCTYPE html>")
    missing = tmp_path / "nope" / "r.html"
    result = runner.invoke(cli, ["diagnose", "--from", rec, "--report", str(missing)])
    assert result.exit_code == 2 and "no directory" in result.output


def test_cli_bad_threshold_is_one_line() -> None:
    result = CliRunner().invoke(cli, ["diagnose", "--from", "x.jsonl", "--threshold", "soon"])
    assert result.exit_code == 2 and "--threshold" in result.output and "Traceback" not in result.output


def test_a_socket_both_in_the_snapshot_and_seen_entering_is_counted_once() -> None:
    ov = Overview(threshold_ns=NS)
    ov.start(0)
    # It entered CLOSE_WAIT after the programs were attached, before the snapshot was read:
    # the kernel counted it (before the counts were read with the snapshot) and holds it.
    ov.feed(tr(1, 5, S.LISTEN, S.SYN_RECV, pid=7, daddr="10.0.0.5"))
    ov.feed(tr(2, 5, S.SYN_RECV, S.ESTABLISHED, pid=7, daddr="10.0.0.5"))
    ov.feed(tr(50, 5, S.ESTABLISHED, S.CLOSE_WAIT, pid=7, daddr="10.0.0.5"))
    assert ov.emulation is not None
    ov.states.seed([S.CLOSE_WAIT], 100, ov.emulation.moves)
    ov.closewait.add_preexisting(
        [HostSocket(Endpoint(4, "10.0.0.1", 80, "10.0.0.5", 40000), S.CLOSE_WAIT, owner=Owner(7, "p7"))], 100
    )
    ov.tick(200)
    assert len(ov.closewait.open) == 1 and not next(iter(ov.closewait.open.values())).preexisting
    assert ov.states.get(S.CLOSE_WAIT) == 1


def test_stacks_without_an_application_frame_still_say_what_happened() -> None:
    ov = Overview(threshold_ns=NS)
    ov.start(0)
    libc_only = ("recv+0x19 [libc.so.6]", "[unknown] [python3.11]")
    for i in range(3):
        leak(ov, 10 + i, 5, i * NS, last=libc_only)
    ov.tick(20 * NS)
    (v,) = [v for v in diagnose(ov).verdicts if v.topic == "close_wait_leak"]
    assert "at handle_conn [myserver]: they were accepted there" in v.text
    assert "the app read the EOF without closing" in v.text
    ov2 = Overview(threshold_ns=NS)
    ov2.start(0)
    # No origin seen either: born before tracing, its accept unseen.
    ov2.feed(tr(10, 1, S.ESTABLISHED, S.CLOSE_WAIT, pid=5, daddr="10.0.0.1"))
    ov2.feed(touch(11, 1, Op.RECV, 5, ret=0, ustack=libc_only))
    ov2.tick(20 * NS)
    (v2,) = [v for v in diagnose(ov2).verdicts if v.topic == "close_wait_leak"]
    assert (
        "in CLOSE_WAIT (local port 80, remote all from 10.0.0.1): the app read EOF without closing" in v2.text
    )
    assert "The stack walk stopped inside libc (recv)" in v2.text
    assert any("frame pointers" in e for e in v2.evidence) and v2.functions == ()


def test_cli_diagnose_a_timewait_recording_counts_creators_and_uses_its_settings() -> None:
    import tcptrace.commands.diagnose

    assert doctest.testmod(tcptrace.commands.diagnose).failed == 0
    rec = DATA / "timewait_mix.jsonl"
    # Ground truth from the recording itself: TIME_WAIT creations per owner.
    truth: dict[int, int] = {}
    by_comm: dict[str, set[int]] = {}
    for line in rec.read_text().splitlines():
        obj = json.loads(line)
        if obj.get("type") == "timewait" and obj["substate"] == "TIME_WAIT":
            if obj["what"] in ("CREATED", "CONVERTED") and obj["pid"] is not None:
                truth[obj["pid"]] = truth.get(obj["pid"], 0) + 1
                by_comm.setdefault(obj["comm"], set()).add(obj["pid"])
    result = CliRunner().invoke(cli, ["diagnose", "--from", str(rec), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.splitlines()[-1])
    tw = summary["time_wait"]
    assert {p["pid"]: p["created"] for p in tw["by_process"]} == truth
    assert tw["created"] == sum(truth.values())
    assert tw["ports"] == 60999 - 32768 + 1  # from the recording's header
    # One verdict per process name (the recording's two clients share theirs).
    verdicts = [v for v in summary["verdicts"] if v["topic"] == "time_wait"]
    assert len(by_comm) == 1 and len(next(iter(by_comm.values()))) == 2
    assert {v["comm"]: sorted(v["data"]["pids"]) for v in verdicts} == {
        c: sorted(p) for c, p in by_comm.items()
    }
    assert {v["comm"]: v["data"]["created"] for v in verdicts} == {
        c: sum(truth[p] for p in pids) for c, pids in by_comm.items()
    }
    assert all(v["pid"] is None for v in verdicts)


def test_one_leak_is_one_verdict_whatever_the_kernel_path() -> None:
    """Sockets of one owner and one application path whose stacks differ only outside the
    application (the kernel's way into recv(), libc's offsets) were two PROBLEM verdicts
    ("leaks 16 sockets", "leaks 1 sockets"): one now, counting all of them."""
    import dataclasses

    ov = Overview(threshold_ns=NS)
    ov.start(0)
    libc_slow = ("__libc_recv+0x80 [libc.so.6]", *EOF_AT[1:])
    for i in range(17):
        sk, ts = 500 + i, i * 10 * MS
        leak(ov, sk, 77, ts, last=EOF_AT if i else libc_slow)
        if i % 2:  # this one's EOF read came by another kernel path
            ov.feed(dataclasses.replace(touch(ts + 12, sk, Op.RECV, 77, ret=0, ustack=EOF_AT), kstack=("x",)))
    ov.tick(5 * NS)
    assert len(ov.closewait.suspects(ov.now_ns)) > 1  # the tracker's groups are by whole stack
    (v,) = [v for v in diagnose(ov).verdicts if v.topic == "close_wait_leak"]
    assert v.data["count"] == 17 and v.data["new_in_window"] == 17
    assert v.text.startswith("pid 77 (p77) leaks 17 sockets in 5.0 s")


def tw_of(ts: int, pid: int, comm: str, sport: int, dport: int, daddr: str = "10.0.0.2") -> TimeWaitEvent:
    return dataclasses.replace(tw_created(ts, pid, dport), comm=comm, sport=sport, daddr=daddr)


def test_servers_by_listening_port_and_clients_by_name() -> None:
    """nginx closes first on port 8080 (its TIME_WAIT sockets point at its clients' ephemeral
    ports); five short-lived curls close first towards 10.0.0.2:443: one verdict each."""
    ov = Overview()
    ov.start(0)
    for i in range(50):
        ov.feed(tw_of(i * MS, 5, "nginx", 8080, 50000 + i, daddr="10.0.0.9"))
    for i in range(40):
        ov.feed(tw_of(100 * MS + i * MS, 100 + i // 8, "curl", 41000 + i, 443))
    ov.tick(10 * NS)
    listener = HostSocket(Endpoint(4, "0.0.0.0", 8080, "0.0.0.0", 0), S.LISTEN, 1, Owner(5, "nginx"))
    held = [
        HostSocket(Endpoint(4, "10.0.0.1", 8080, "10.0.0.9", 50000 + i), S.TIME_WAIT, 0, None)
        for i in range(50)
    ]
    end = HostSnapshot(10 * NS, (listener, *held))
    settings = TcpSettings(port_range=(32768, 60999), tw_reuse=2, max_tw_buckets=262144, fin_timeout=60)
    d = diagnose(ov, end=end, settings=settings)
    verdicts = {v.comm: v for v in d.verdicts if v.topic == "time_wait"}
    assert set(verdicts) == {"nginx", "curl"}
    nginx, curl = verdicts["nginx"], verdicts["curl"]
    assert nginx.severity == "info" and nginx.pid == 5
    assert "as a server, on its listening port 8080" in nginx.text
    assert "50 in TIME_WAIT there now" in nginx.text
    assert "busiest destination" not in nginx.text
    assert curl.pid is None and curl.data["pids"] == [100, 101, 102, 103, 104]
    assert curl.text.startswith("5 processes named curl (pids 100, 101, 102, 103, …) creates about 4.0")
    assert "busiest destination 10.0.0.2:443" in curl.text  # not one of nginx's clients
    assert [f.dest.remote for f in d.forecasts] == ["10.0.0.2:443"]
    assert d.to_json()["time_wait"]["server_side"] == [
        {"port": 8080, "held": 50, "listeners": [{"pid": 5, "comm": "nginx"}]}
    ]
    # The default tcp_tw_reuse (2) with ports to spare is no warning.
    assert not any("tcp_tw_reuse" in e for v in d.verdicts for e in v.evidence)
    assert not any(a.warn for a in d.settings)
