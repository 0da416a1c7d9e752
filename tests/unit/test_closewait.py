"""CLOSE_WAIT timing, leak suspects and their grouping, on generated and recorded streams."""

from __future__ import annotations

import dataclasses
import doctest
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

import tcptrace.model.closewait
import tcptrace.system.cgroups
import tcptrace.system.procfd
import tcptrace.system.procnet
from tcptrace.cli import cli
from tcptrace.commands.sources import RecordingSource
from tcptrace.errors import TcptraceError
from tcptrace.model.closewait import CloseWaitTracker, SkaddrKey, parse_duration
from tcptrace.model.endpoint import Endpoint, Owner
from tcptrace.model.events import Op, TcpState, from_json, to_json
from tcptrace.model.filters import EventFilter
from tcptrace.model.lifecycle import CodePath
from tcptrace.model.snapshot import HostSocket
from tcptrace.recording import JsonLinesWriter, make_header, open_recording
from tcptrace.system.procnet import parse_table
from tcptrace.views.closewait import print_summary, render
from tests.unit.test_lifecycle import touch, tr

S = TcpState
NS = 1_000_000_000
MS = 1_000_000


def leaked(t: CloseWaitTracker, sk: int, pid: int, ts: int, stack: str = "leak_fn", **kw: object) -> None:
    """A socket accepted by ``pid`` whose peer closes at ts+10; the app reads EOF, never closes."""
    t.feed(tr(ts + 1, sk, S.LISTEN, S.SYN_RECV, pid=pid, **kw))
    t.feed(tr(ts + 2, sk, S.SYN_RECV, S.ESTABLISHED, pid=pid, **kw))
    t.feed(touch(ts + 3, sk, Op.ACCEPT, pid, ustack=("accept", "main")))
    t.feed(tr(ts + 10, sk, S.ESTABLISHED, S.CLOSE_WAIT, pid=pid, **kw))
    t.feed(touch(ts + 11, sk, Op.RECV, pid, ret=0, ustack=("recv", stack)))


def test_time_to_close_and_resets() -> None:
    t = CloseWaitTracker(threshold_ns=NS)
    leaked(t, 1, 7, 0, stack="ok_fn")
    t.feed(tr(10 + 250 * MS, 1, S.CLOSE_WAIT, S.LAST_ACK, pid=7))
    leaked(t, 2, 7, 0)
    t.feed(tr(10 + 5 * MS, 2, S.CLOSE_WAIT, S.CLOSE))  # the peer reset it
    assert (t.entered, t.closed, t.reset, len(t.open)) == (2, 1, 1, 0)
    assert t.close_times_ns == [250 * MS]
    summary = t.summary_json(20 * NS)
    assert summary["time_to_close"]["count"] == 1 and summary["time_to_close"]["max_s"] == 0.25
    assert summary["groups"] == [] and summary["sockets"] == []


def test_suspects_grouped_by_owner_and_code_path() -> None:
    t = CloseWaitTracker(threshold_ns=NS)
    for sk in range(3):
        leaked(t, 100 + sk, 7, sk * 1000, daddr=f"10.0.0.{sk}")
    leaked(t, 200, 7, 0, stack="other_fn")
    leaked(t, 300, 8, 0)
    leaked(t, 400, 7, 3 * NS)  # too young at 3.5 s
    groups = t.suspects(int(3.5 * NS))
    assert [(g.pid, g.count) for g in groups] == [(7, 3), (7, 1), (8, 1)]
    top = groups[0]
    assert top.last_touch is not None and top.last_touch.ustack == ("recv", "leak_fn")
    assert top.origin is not None and top.origin.op == Op.ACCEPT
    assert top.remotes.distinct == 3 and top.remotes.dominant is None and top.eof_seen == 3
    js = top.to_json()
    assert js["last_touch_stack"] == ["recv", "leak_fn"] and js["origin_stack"] == ["accept", "main"]
    assert js["oldest_age_s"] == pytest.approx(3.5, abs=1e-3)
    assert groups[1].last_touch is not None and groups[1].last_touch.ustack[-1] == "other_fn"


def test_cgroup_of_the_owner_is_kept_and_splits_groups() -> None:
    t = CloseWaitTracker(threshold_ns=NS)
    leaked(t, 1, 7, 0, cgroup=4242)
    leaked(t, 2, 7, 0, cgroup=4243)  # same pid and paths, another cgroup (pid namespaces)
    groups = t.suspects(2 * NS)
    assert sorted(g.cgroup for g in groups) == [4242, 4243]
    summary = t.summary_json(2 * NS)
    assert sorted(s["cgroup"] for s in summary["sockets"]) == [4242, 4243]
    assert json.loads(json.dumps(summary))["groups"][0]["cgroup"] in (4242, 4243)


def test_events_without_a_cgroup_serialize_as_before() -> None:
    ev = tr(1, 1, S.ESTABLISHED, S.CLOSE_WAIT, pid=7)
    assert "cgroup" not in to_json(ev)
    with_cgroup = tr(1, 1, S.ESTABLISHED, S.CLOSE_WAIT, pid=7, cgroup=99)
    assert to_json(with_cgroup)["cgroup"] == 99
    assert from_json(json.loads(json.dumps(to_json(with_cgroup)))) == with_cgroup


def test_unknown_owner_is_shown_not_dropped() -> None:
    t = CloseWaitTracker(threshold_ns=NS)
    t.feed(tr(0, 5, S.ESTABLISHED, S.CLOSE_WAIT))  # established before tracing, never touched
    (group,) = t.suspects(2 * NS)
    assert group.pid is None and group.count == 1 and group.origin is None
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(render(t, 2 * NS))
    assert "owner unknown" in out.getvalue()


def test_an_owner_unknown_for_want_of_privileges_says_which() -> None:
    """Run without CAP_SYS_PTRACE, the owners of other users' sockets found in /proc are
    unknown: the view says what it would take, never a bare '-'."""
    from tcptrace.model.endpoint import Endpoint
    from tcptrace.model.snapshot import HostSocket
    from tcptrace.views.closewait import print_summary
    from tcptrace.views.common import explain_unknown_owners

    t = CloseWaitTracker(threshold_ns=NS)
    t.add_preexisting([HostSocket(Endpoint(4, "10.0.0.1", 80, "10.0.0.9", 4000), S.CLOSE_WAIT)], 0)
    explain_unknown_owners("needs CAP_SYS_PTRACE")
    try:
        out = io.StringIO()
        print_summary(Console(file=out, width=200, color_system=None), t, 2 * NS, {}, "end")
    finally:
        explain_unknown_owners(None)
    text = out.getvalue()
    assert "unknown (needs CAP_SYS_PTRACE)" in text
    row = next(line for line in text.splitlines() if "10.0.0.9:4000" in line)
    assert not row.lstrip().startswith("-")


def test_reused_skaddr_forgets_the_old_socket_and_its_owner() -> None:
    t = CloseWaitTracker(threshold_ns=NS)
    leaked(t, 9, 7, 0)
    # The old socket's CLOSE was lost; its address is reborn as a child of pid 8's listener.
    t.feed(tr(5 * NS, 9, S.LISTEN, S.SYN_RECV, pid=8))
    assert t.open == {} and t.forgotten == 1
    t.feed(tr(5 * NS + 1, 9, S.SYN_RECV, S.ESTABLISHED, pid=8))
    t.feed(tr(5 * NS + 2, 9, S.ESTABLISHED, S.CLOSE_WAIT, pid=8))
    (sock,) = t.open.values()
    assert sock.pid == 8 and sock.origin is None and sock.last_touch is None and sock.eof_ns is None


def test_preexisting_sockets_age_from_start_and_match_their_close_by_address() -> None:
    t = CloseWaitTracker(threshold_ns=NS)
    pre = HostSocket(Endpoint(4, "10.0.0.1", 80, "10.0.0.9", 40000), S.CLOSE_WAIT, owner=Owner(7, "srv"))
    dup = HostSocket(Endpoint(4, "10.0.0.1", 80, "10.0.0.9", 40001), S.CLOSE_WAIT, owner=Owner(7, "srv"))
    t.feed(tr(50, 77, S.ESTABLISHED, S.CLOSE_WAIT, pid=7, comm="srv", dport=40001))  # seen live
    assert t.add_preexisting([pre, dup], now_ns=100) == 1
    (group,) = t.suspects(100 + 2 * NS)
    # The oldest is the one seen entering (at 50): its age is exact, not a lower bound.
    assert group.count == 2 and not group.at_least and group.oldest_age_ns == 2 * NS + 50
    assert [s.preexisting for s in group.sockets] == [False, True]
    # Its close has an skaddr tcptrace never saw: matched by the 4-tuple, not timed.
    t.feed(tr(3 * NS, 0xDEAD, S.CLOSE_WAIT, S.LAST_ACK, pid=7))
    assert t.closed == 1 and t.closed_preexisting == 1 and t.close_times_ns == []
    assert len(t.open) == 1


def test_intervals_count_what_happened_in_them() -> None:
    t = CloseWaitTracker(threshold_ns=NS)
    t.begin_interval(0)
    leaked(t, 1, 7, 0)
    leaked(t, 2, 7, 0)
    first = t.begin_interval(NS)
    t.feed(tr(NS + 5, 1, S.CLOSE_WAIT, S.LAST_ACK, pid=7))
    second = t.begin_interval(2 * NS)
    assert first is not None and (first.entered, first.closed) == (2, 0)
    assert second is not None and (second.entered, second.closed) == (0, 1)
    periodic = t.periodic_json(2 * NS, second)
    assert periodic["open"] == 1 and periodic["suspects"] == 1 and periodic["closed"] == 1


def write_recording(path: Path, events: list[object]) -> None:
    with path.open("w") as fh:
        w = JsonLinesWriter(fh)
        w.write(make_header("record"))
        for e in events:
            w.event(e)  # type: ignore[arg-type]
        w.write({"type": "summary", "lost": 0})


def test_pid_filter_on_a_replay_keeps_only_that_owners_sockets(tmp_path: Path) -> None:
    t = CloseWaitTracker()
    events = []
    for sk, pid in ((1, 7), (2, 8), (3, 7)):
        events += [
            tr(sk, sk, S.LISTEN, S.SYN_RECV, pid=pid),
            tr(sk + 10, sk, S.ESTABLISHED, S.CLOSE_WAIT, pid=pid),
        ]
    events.append(tr(20, 4, S.ESTABLISHED, S.CLOSE_WAIT))  # unknown owner: matches no --pid
    path = tmp_path / "r.jsonl"
    write_recording(path, events)
    source = RecordingSource(open_recording(str(path)), EventFilter(pids=frozenset({7})))
    while not source.exhausted:
        for event in source.poll():
            t.feed(event)
    assert sorted(s.pid for s in t.open.values()) == [7, 7] and t.entered == 2


@pytest.fixture
def leaky(data_dir: Path) -> Path:
    return data_dir / "closewait_leaky.jsonl"


def test_recorded_leaky_server(leaky: Path) -> None:
    """Recorded from leaky_server: 3 connections leaked, 2 closed 300 ms after EOF."""
    rec = open_recording(str(leaky))
    header = rec.header
    t = CloseWaitTracker(threshold_ns=100 * MS)
    last = 0
    for event in rec.events():
        t.feed(event)
        last = event.ts_ns
    assert t.entered == 5 and t.closed == 2 and t.reset == 0
    assert {s.dport for s in t.open.values()} == set(header["leaked_client_ports"])
    assert all(s.pid == header["server_pid"] for s in t.open.values())
    assert all(0.300 <= x / NS <= 0.320 for x in t.close_times_ns)
    (group,) = t.suspects(last)
    assert group.count == 3 and group.comm == "leaky_server"
    assert group.last_touch is not None and any("leak_connection" in f for f in group.last_touch.ustack)


def test_cli_replay_json_summary(leaky: Path) -> None:
    res = CliRunner().invoke(
        cli, ["closewait", "--from", str(leaky), "--json", "--threshold", "100ms", "--interval", "0.1"]
    )
    assert res.exit_code == 0, res.output
    objs = [json.loads(line) for line in res.output.splitlines()]
    assert objs[0]["type"] == "header" and objs[-1]["type"] == "summary"
    assert any(o["type"] == "closewait" for o in objs[1:-1])
    summary = objs[-1]
    assert summary["open"] == 3 and summary["closed"] == 2
    (group,) = summary["groups"]
    assert group["count"] == 3 and any("leak_connection" in f for f in group["last_touch_stack"])
    assert all(isinstance(f, str) for f in group["origin_stack"])
    assert {s["dport"] for s in summary["sockets"]} == set(
        open_recording(str(leaky)).header["leaked_client_ports"]
    )


def test_cli_replay_text_and_filters(leaky: Path) -> None:
    res = CliRunner().invoke(cli, ["closewait", "--from", str(leaky), "--threshold", "100ms"])
    assert res.exit_code == 0 and "leak_connection" in res.output and "3 × " in res.output
    res = CliRunner().invoke(cli, ["closewait", "--from", str(leaky), "--json", "--pid", "1"])
    assert res.exit_code == 0 and json.loads(res.output.splitlines()[-1])["open"] == 0


@pytest.mark.parametrize("bad", ["soon", "-1s", "5 parsecs", ""])
def test_bad_threshold_is_a_usage_error(bad: str, leaky: Path) -> None:
    res = CliRunner().invoke(cli, ["closewait", "--from", str(leaky), "--threshold", bad])
    assert res.exit_code == 2 and "--threshold" in res.output and res.output.count("\n") == 1
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_summary_view_renders_hostile_names_literally() -> None:
    t = CloseWaitTracker(threshold_ns=NS)
    t.add_preexisting(
        [HostSocket(Endpoint(6, "::1", 80, "::1", 5), S.CLOSE_WAIT, owner=Owner(3, "\x1b[2J[red]x"))], 0
    )
    out = io.StringIO()
    print_summary(Console(file=out, width=120, color_system=None), t, 2 * NS, {"lost": 4}, "SIGINT")
    text = out.getvalue()
    assert "\x1b" not in text and "\\x1b[2J[red]x" in text
    assert "4 events lost" in text and "[::1]:80" in text and ">= 2.00s" in text
    assert "before tracing started" in text


def test_proc_net_tcp_parse_error_names_file_and_line() -> None:
    lines = ["  sl  local_address ...", "   0: 0100007F:0016 0100007F:D2F0 08 0 0 0 0 0 42 1", "garbage"]
    with pytest.raises(TcptraceError, match=r"/proc/net/tcp:3: cannot parse 'garbage'"):
        list(parse_table(lines, 4))


@pytest.mark.parametrize(
    "module",
    [tcptrace.model.closewait, tcptrace.system.procnet, tcptrace.system.procfd, tcptrace.system.cgroups],
)
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


def path(op: Op, ts: int, frame: str) -> CodePath:
    return CodePath(op=op, ts_ns=ts, task_pid=7, ustack=(frame,))


def test_last_touch_before_the_fin_is_kept_only_when_it_is_this_sockets() -> None:
    t = CloseWaitTracker(threshold_ns=NS)
    # Born at 1000, accepted at 1003, FIN at 1010; no touch after the FIN.
    t.feed(tr(1000, 5, S.LISTEN, S.SYN_RECV, pid=7))
    t.feed(touch(1003, 5, Op.ACCEPT, 7, ustack=("accept",)))
    t.feed(tr(1010, 5, S.ESTABLISHED, S.CLOSE_WAIT, pid=7))
    assert t.pending_pre_fin() == [5]
    assert not t.add_pre_fin_touch(5, path(Op.SEND, 900, "older_socket"))  # before its birth
    assert t.pending_pre_fin() == []
    sock = t.open[SkaddrKey(5)]
    assert sock.last_touch is not None and sock.last_touch.op == Op.ACCEPT
    sock.pre_fin_checked = False
    assert not t.add_pre_fin_touch(5, path(Op.SEND, 1020, "after_fin"))  # a later socket's
    sock.pre_fin_checked = False
    assert t.add_pre_fin_touch(5, path(Op.SEND, 1005, "reply"))
    assert sock.last_touch is not None and sock.last_touch.ustack == ("reply",)
    (group,) = t.suspects(2 * NS)
    assert group.to_json()["last_touch_op"] == "SEND"
    assert not t.add_pre_fin_touch(99, path(Op.SEND, 1005, "x"))  # not in CLOSE_WAIT


def test_a_touch_after_the_fin_beats_the_one_before() -> None:
    t = CloseWaitTracker(threshold_ns=NS)
    leaked(t, 6, 7, 1000)  # EOF read at 1011
    assert not t.add_pre_fin_touch(6, path(Op.SEND, 1005, "reply"))
    sock = t.open[SkaddrKey(6)]
    assert sock.last_touch is not None and sock.last_touch.op == Op.RECV


def test_recheck_drops_sockets_whose_exit_was_missed_and_adds_missed_entries() -> None:
    t = CloseWaitTracker(threshold_ns=NS)
    leaked(t, 1, 7, 0, sport=80, dport=1001)  # open; /proc will not show it: exit missed
    leaked(t, 2, 7, 0, sport=80, dport=1002)  # open and still there
    leaked(t, 3, 7, 0, sport=80, dport=1003)
    t.feed(tr(5 * NS, 3, S.CLOSE_WAIT, S.LAST_ACK, pid=7, sport=80, dport=1003))  # left after the snapshot
    snapshot = {(80, 1002), (80, 1003), (80, 1004)}
    late = tr(5 * NS, 9, S.ESTABLISHED, S.CLOSE_WAIT, pid=7, sport=80, dport=1005)
    t.feed(late)  # entered after the snapshot (at 4 s): not in it, must stay
    assert t.drop_gone(snapshot, 4 * NS) == 1
    assert {s.dport for s in t.open.values()} == {1002, 1005} and t.missed_exits == 1
    # 1004 was never seen entering; 1003 left after the snapshot, so it is explained.
    assert t.unexplained(snapshot, 4 * NS) == {(80, 1004)}
    found = HostSocket(Endpoint(4, "10.0.0.1", 80, "10.0.0.9", 1004), S.CLOSE_WAIT, owner=Owner(7, "p7"))
    assert t.add_found([found], 4 * NS) == 1 and t.missed_entries == 1
    sock = next(s for s in t.open.values() if s.dport == 1004)
    assert sock.preexisting and sock.age_ns(6 * NS) == 2 * NS
    summary = t.summary_json(6 * NS)
    assert (summary["missed_exits"], summary["missed_entries"]) == (1, 1)


def test_a_socket_found_at_start_and_then_seen_entering_is_counted_once() -> None:
    """The /proc snapshot is read after attaching, but events from before it may still sit in
    the ring buffer: the socket is then both "found at start" and seen entering live."""
    from tcptrace.model.closewait import CloseWaitTracker
    from tcptrace.model.endpoint import Endpoint, Owner
    from tcptrace.model.events import TcpState, Transition
    from tcptrace.model.snapshot import HostSocket

    tracker = CloseWaitTracker()
    common = dict(family=4, saddr="127.0.0.1", sport=8080, daddr="127.0.0.1", dport=50000)
    snapshot_ns = 5_000
    tracker.add_preexisting(
        [HostSocket(Endpoint(**common), TcpState.CLOSE_WAIT, owner=Owner(7, "srv"))], snapshot_ns
    )  # type: ignore[arg-type]
    born = Transition(
        ts_ns=1_000, skaddr=0xA, pid=7, comm="srv", old=TcpState.LISTEN, new=TcpState.SYN_RECV, **common
    )
    up = Transition(
        ts_ns=2_000, skaddr=0xA, pid=7, comm="srv", old=TcpState.SYN_RECV, new=TcpState.ESTABLISHED, **common
    )
    fin = Transition(
        ts_ns=4_000,
        skaddr=0xA,
        pid=7,
        comm="srv",
        old=TcpState.ESTABLISHED,
        new=TcpState.CLOSE_WAIT,
        **common,
    )
    for ev in (born, up, fin):
        tracker.feed(ev)
    assert len(tracker.open_sockets()) == 1
    assert not tracker.open_sockets()[0].preexisting
    # A socket entering after the snapshot is another socket with the same ports (reuse):
    # both are kept.
    tracker2 = CloseWaitTracker()
    tracker2.add_preexisting(
        [HostSocket(Endpoint(**common), TcpState.CLOSE_WAIT, owner=Owner(7, "srv"))], snapshot_ns
    )  # type: ignore[arg-type]
    later = [Transition(**{**e.__dict__, "ts_ns": e.ts_ns + 10_000}) for e in (born, up, fin)]  # type: ignore[arg-type]
    for ev in later:
        tracker2.feed(ev)
    assert len(tracker2.open_sockets()) == 2


def test_rewrite_code_paths_touches_only_sockets_old_enough() -> None:
    t = CloseWaitTracker(threshold_ns=NS)
    leaked(t, 1, 7, 0)
    leaked(t, 2, 7, 3 * NS)  # entered CLOSE_WAIT at 3 s

    def upper(path: CodePath) -> CodePath:
        return dataclasses.replace(path, ustack=tuple(f.upper() for f in path.ustack))

    t.rewrite_code_paths(upper, now_ns=int(3.5 * NS), min_age_ns=NS)
    old, young = t.open[SkaddrKey(1)], t.open[SkaddrKey(2)]
    assert old.origin is not None and old.origin.ustack == ("ACCEPT", "MAIN")
    assert old.last_touch is not None and old.last_touch.ustack == ("RECV", "LEAK_FN")
    assert young.origin is not None and young.origin.ustack == ("accept", "main")
    t.rewrite_code_paths(upper)  # no age given: every socket
    assert young.last_touch is not None and young.last_touch.ustack == ("RECV", "LEAK_FN")


def test_the_summary_says_what_the_kernels_tables_had_no_room_for() -> None:
    from tcptrace.model.closewait import CloseWaitModel
    from tcptrace.model.cwagg import CwCounters
    from tcptrace.views.closewait import print_summary

    def shown(counters: CwCounters) -> str:
        m = CloseWaitModel(threshold_ns=NS)
        m.counters = counters
        out = io.StringIO()
        print_summary(Console(file=out, width=400, color_system=None), m, 2 * NS, {}, "end")
        return out.getvalue().splitlines()[1]

    assert "room" not in shown(CwCounters()) and "evicted" not in shown(CwCounters())
    head = shown(CwCounters(open_failed=3, owner_failed=2, owner_forgotten=1_500))
    assert "3 sockets in CLOSE_WAIT the kernel's table had no room for" in head
    assert "2 owners the kernel's owner table had no room for" in head
    assert "1,500 sockets whose owner was evicted from the kernel's socket table" in head
