"""CLOSE_WAIT from the kernel's aggregates: the model fed map snapshots (generated, and the
emulation of the kernel on event streams), reused addresses, LRU evictions, sockets found at
start, and the /proc recheck."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from tcptrace.cli import cli
from tcptrace.model.closewait import (
    CloseWaitModel,
    CloseWaitSocket,
    CloseWaitTracker,
    FoundKey,
    LiveKey,
    code_path_key,
    group_suspects,
)
from tcptrace.model.cwagg import CodeRef, CwCounters, CwSnapshot, Emulator, OpenSocket
from tcptrace.model.endpoint import Endpoint, Owner
from tcptrace.model.events import Op, TcpState
from tcptrace.model.histogram import Log2Histogram
from tcptrace.model.lifecycle import CodePath
from tcptrace.model.snapshot import HostSocket
from tcptrace.recording import open_recording
from tests.unit.test_lifecycle import touch, tr

S = TcpState
NS = 1_000_000_000
MS = 1_000_000
DATA = Path(__file__).resolve().parents[1] / "data"
NETNS = 4026531840


def ep(dport: int, sport: int = 80) -> Endpoint:
    return Endpoint(4, "10.0.0.1", sport, "10.0.0.9", dport)


def entry(sk: int, entered: int, dport: int = 40000, pid: int | None = 7, **kw: object) -> OpenSocket:
    fields: dict[str, object] = dict(
        skaddr=sk,
        netns=NETNS,
        endpoint=ep(dport),
        owner=None if pid is None else Owner(pid, f"p{pid}", 1),
        owner_start_ns=0 if pid is None else 5 * NS,
        entered_ns=entered,
        origin=CodeRef(Op.ACCEPT, entered - 10, 4, pid or 0, ustack_id=11),
        post_fin=CodeRef(Op.RECV, entered + 10, 0, pid or 0, ustack_id=12),
    )
    fields.update(kw)
    return OpenSocket(**fields)  # type: ignore[arg-type]


def snapshot(at: int, *open_: OpenSocket, **counters: int) -> CwSnapshot:
    return CwSnapshot(at_ns=at, counters=CwCounters(**counters), open=open_)


def stacks(ref: CodeRef) -> tuple[str, ...]:
    return (f"fn{ref.ustack_id}+0x1 [app]",)


def model(threshold_ns: int = NS) -> CloseWaitModel:
    from tcptrace.model.lifecycle import CodePath

    def resolve(ref: CodeRef) -> CodePath:
        resolved.append(ref.ustack_id)
        return CodePath(op=ref.op, ts_ns=ref.ts_ns, task_pid=ref.pid, ret=ref.ret, ustack=stacks(ref))

    resolved: list[int] = []
    m = CloseWaitModel(threshold_ns=threshold_ns, resolve=resolve)
    m.resolved_ids = resolved  # type: ignore[attr-defined]
    return m


def leak(emu: Emulator, sk: int, pid: int, ts: int, stack: str = "leak_fn", dport: int = 40000) -> None:
    """Accepted by ``pid``; the peer closes at ts+10; the app reads EOF and never closes."""
    emu.feed(tr(ts + 1, sk, S.LISTEN, S.SYN_RECV, pid=pid, dport=dport))
    emu.feed(tr(ts + 2, sk, S.SYN_RECV, S.ESTABLISHED, pid=pid, dport=dport))
    emu.feed(touch(ts + 3, sk, Op.ACCEPT, pid, ustack=("accept", "main")))
    emu.feed(tr(ts + 10, sk, S.ESTABLISHED, S.CLOSE_WAIT, pid=pid, dport=dport))
    emu.feed(touch(ts + 11, sk, Op.RECV, pid, ret=0, ustack=("recv", stack)))


# ---- snapshots generated as the kernel's maps would read -------------------------------------


def test_an_address_reused_between_two_reads_is_a_new_socket() -> None:
    m = model()
    m.apply(snapshot(NS, entry(0xA, 100), entered=1))
    first = m.open[LiveKey(NETNS, 0xA, 100)]
    # Between the reads the socket was closed and another one, at the same address,
    # entered CLOSE_WAIT: the kernel's entry has another entry time.
    m.apply(snapshot(3 * NS, entry(0xA, 2 * NS, dport=41000), entered=2, closed=1))
    assert list(m.open) == [LiveKey(NETNS, 0xA, 2 * NS)]
    second = m.open[LiveKey(NETNS, 0xA, 2 * NS)]
    assert second is not first and second.dport == 41000
    assert second.age_ns(3 * NS) == NS  # not the first one's 3 s
    assert (m.entered, m.closed) == (2, 1)


def test_the_same_entry_read_again_keeps_its_socket_and_resolved_stacks() -> None:
    m = model()
    m.apply(snapshot(NS, entry(0xA, 100)))
    (group,) = m.suspects(2 * NS)
    assert group.origin is not None and group.origin.ustack == ("fn11+0x1 [app]",)
    assert sorted(m.resolved_ids) == [11, 12]  # type: ignore[attr-defined]
    # A later touch changes the entry (touches, last): the stacks are not resolved again,
    # which matters once the stack map was emptied and the ids reused.
    m.apply(snapshot(3 * NS, entry(0xA, 100, touches=2, last=CodeRef(Op.RECV, 2 * NS, 0, 7))))
    (group,) = m.suspects(4 * NS)
    assert group.post_fin_touch is not None and group.post_fin_touch.ustack == ("fn12+0x1 [app]",)
    assert sorted(m.resolved_ids) == [11, 12]  # type: ignore[attr-defined]


def test_stacks_are_resolved_only_for_leak_suspects() -> None:
    m = model(threshold_ns=10 * NS)
    m.apply(snapshot(NS, entry(0xA, 100), entry(0xB, 900 * MS, dport=41000)))
    assert m.suspects(5 * NS) == []
    assert m.resolved_ids == []  # type: ignore[attr-defined]
    summary = m.summary_json(5 * NS)
    assert [s["last_touch"] for s in summary["sockets"]] == ["RECV", "RECV"]  # known without stacks
    assert m.resolved_ids == []  # type: ignore[attr-defined]


def test_an_lru_eviction_is_counted_and_the_socket_kept_with_no_owner() -> None:
    # The socket table lost the entry (LRU) before the FIN: the kernel met the socket again
    # with no owner (owner_forgotten), and cw_open keeps it, owner unknown.
    m = model()
    m.apply(snapshot(NS, entry(0xA, 100, pid=None, origin=None), entered=1, owner_forgotten=1))
    summary = m.summary_json(3 * NS)
    assert summary["kernel"]["owner_forgotten"] == 1
    (sock,) = summary["sockets"]
    assert sock["pid"] is None and sock["suspect"]
    (group,) = summary["groups"]
    assert group["pid"] is None and group["origin_op"] is None and group["last_touch_op"] == "RECV"


def test_the_emulated_lru_evicts_as_the_kernel_and_counts_the_socket_met_again() -> None:
    emu = Emulator(max_socks=2)
    emu.feed(tr(1, 0xA, S.LISTEN, S.SYN_RECV, pid=7))
    emu.feed(tr(2, 0xA, S.SYN_RECV, S.ESTABLISHED, pid=7))
    for i, sk in enumerate((0xB, 0xC)):  # two newer sockets push 0xA out
        emu.feed(tr(3 + i, sk, S.CLOSE, S.SYN_SENT, pid=8, dport=41000 + i))
    # Its FIN: the recording kernel had lost its owner too (no pid in the event).
    emu.feed(tr(10, 0xA, S.ESTABLISHED, S.CLOSE_WAIT))
    snap = emu.snapshot(3 * NS)
    assert snap.counters.owner_forgotten == 1 and snap.counters.entered == 1
    (e,) = snap.open
    assert e.owner is None and e.born_ns is None  # a socket met, not born, as far as the table knows


def test_interval_counts_are_the_kernel_counters_differences() -> None:
    m = model()
    m.apply(snapshot(NS, entered=10, closed=7, reset=1))
    m.begin_interval(NS)
    m.apply(snapshot(2 * NS, entered=25, closed=20, reset=1))
    done = m.begin_interval(2 * NS)
    assert done is not None and (done.entered, done.closed, done.reset) == (15, 13, 0)
    assert m.periodic_json(2 * NS, done)["entered"] == 15


def test_time_to_close_from_the_kernel_histogram_with_exact_extremes() -> None:
    m = model()
    hist = Log2Histogram.of([300 * MS, 301 * MS, 302 * MS, 450 * MS])
    m.apply(CwSnapshot(at_ns=NS, time_to_close=hist, min_close_ns=300 * MS))
    ttc = m.summary_json(NS)["time_to_close"]
    assert ttc["count"] == 4 and ttc["min_s"] == 0.3 and ttc["max_s"] == 0.45
    assert 0.268 <= ttc["p50_s"] <= 0.537  # within its log2 slot [2^28, 2^29) ns
    assert m.close_times().max_ns == 450 * MS


# ---- sockets found at start, and the recheck ------------------------------------------------


def found(dport: int, pid: int = 9) -> HostSocket:
    return HostSocket(ep(dport), S.CLOSE_WAIT, 1234, Owner(pid, "srv", 1), NETNS)


def test_found_sockets_follow_the_kernel_once_seeded() -> None:
    m = model()
    assert m.add_preexisting([found(1), found(2), found(3)], 100, seeded=True) == 3
    untouched = frozenset((NETNS, ep(p)) for p in (1, 2, 3))
    m.apply(CwSnapshot(at_ns=NS, untouched=untouched))
    assert m.summary_json(NS)["preexisting_open"] == 3
    # 1 was touched (its seed taken, kept as pre-existing), 2 closed, 3 untouched still.
    touched = entry(0xA, 100, dport=1, pid=9, preexisting=True, origin=None)
    m.apply(CwSnapshot(at_ns=2 * NS, open=(touched,), untouched=frozenset({(NETNS, ep(3))})))
    assert set(m.open) == {LiveKey(NETNS, 0xA, 100), FoundKey(ep(3), NETNS)}
    assert all(s.preexisting and s.entered_ns == 100 for s in m.open.values())
    # Not seeded (the kernel cannot say): kept until the recheck.
    m2 = model()
    m2.add_preexisting([found(4)], 100)
    m2.apply(CwSnapshot(at_ns=NS))
    assert list(m2.open) == [FoundKey(ep(4), NETNS)]


def test_recheck_drops_what_left_unseen_and_reports_what_entered_unseen() -> None:
    m = model()
    m.apply(snapshot(NS, entry(0xA, 100, dport=1), entry(0xB, 200, dport=2)))
    before = set(m.open)
    first = {(NETNS, 80, 2), (NETNS, 80, 5), (NETNS, 80, 6)}  # 1 is gone; 5, 6 unknown to the kernel
    # The kernel read in between: 1 still held (its exit was not seen), 7 entered since.
    m.apply(snapshot(2 * NS, entry(0xA, 100, dport=1), entry(0xB, 200, dport=2), entry(0xC, 300, dport=7)))
    second = {(NETNS, 80, 2), (NETNS, 80, 5), (NETNS, 80, 7)}  # 6 left after the first read
    missing = m.heal(before, first, second)
    assert missing == {(NETNS, 80, 5)}
    assert set(m.open) == {LiveKey(NETNS, 0xB, 200), LiveKey(NETNS, 0xC, 300)}
    assert m.missed_exits == 1
    # The dropped entry stays ignored while the kernel holds it.
    m.apply(snapshot(3 * NS, entry(0xA, 100, dport=1), entry(0xB, 200, dport=2)))
    assert LiveKey(NETNS, 0xA, 100) not in m.open
    m.add_found([found(5)], 2 * NS)
    assert m.missed_entries == 1 and m.open[FoundKey(ep(5), NETNS)].preexisting


# ---- the emulation of the kernel against event streams --------------------------------------


def test_emulator_counts_entries_closes_resets_and_time_to_close() -> None:
    emu = Emulator()
    leak(emu, 1, 7, 0, stack="ok_fn")
    emu.feed(tr(10 + 250 * MS, 1, S.CLOSE_WAIT, S.LAST_ACK, pid=7))
    leak(emu, 2, 7, 0)
    emu.feed(tr(10 + 5 * MS, 2, S.CLOSE_WAIT, S.CLOSE))
    leak(emu, 3, 8, NS, stack="leak_fn")
    m = model()
    m.apply(emu.snapshot(5 * NS))
    assert (m.entered, m.closed, m.reset, len(m.open)) == (3, 1, 1, 1)
    ttc = m.close_times()
    assert ttc.count == 1 and ttc.min_ns == ttc.max_ns == 250 * MS
    (group,) = m.suspects(5 * NS)
    assert group.pid == 8 and group.origin is not None and group.origin.op == Op.ACCEPT
    assert group.post_fin_touch is not None and group.post_fin_touch.ustack == ("recv", "leak_fn")
    owners = {o.pid: o for o in m.owners}
    assert (owners[7].entered, owners[7].closed, owners[7].reset) == (2, 1, 1)
    assert owners[7].time_to_close.max_ns == 250 * MS


def test_the_touch_after_the_fin_is_the_eof_read_when_one_follows_the_first() -> None:
    """The peer's FIN came before the app read its request: that read is the first touch
    after the FIN, but the EOF read after it is where the app learned the peer had closed."""
    emu = Emulator()
    emu.feed(tr(1, 1, S.LISTEN, S.SYN_RECV, pid=7))
    emu.feed(tr(2, 1, S.SYN_RECV, S.ESTABLISHED, pid=7))
    emu.feed(touch(3, 1, Op.ACCEPT, 7, ustack=("accept", "main")))
    emu.feed(tr(10, 1, S.ESTABLISHED, S.CLOSE_WAIT, pid=7))
    emu.feed(touch(11, 1, Op.RECV, 7, ret=1, ustack=("recv", "main")))
    emu.feed(touch(12, 1, Op.RECV, 7, ret=0, ustack=("recv", "leak_fn")))
    emu.feed(touch(13, 1, Op.RECV, 7, ret=0, ustack=("recv", "poll_again")))  # EOF again
    m = model()
    m.apply(emu.snapshot(5 * NS))
    (group,) = m.suspects(5 * NS)
    assert group.post_fin_touch is not None and group.post_fin_touch.ustack == ("recv", "leak_fn")
    # Without an EOF read, the first touch after the FIN stays.
    emu = Emulator()
    leak(emu, 2, 7, 0)
    emu.feed(touch(20, 2, Op.SEND, 7, ret=5, ustack=("send", "later")))
    m = model()
    m.apply(emu.snapshot(5 * NS))
    (group,) = m.suspects(5 * NS)
    assert group.post_fin_touch is not None and group.post_fin_touch.ustack == ("recv", "leak_fn")


def test_emulator_forgets_a_socket_whose_address_is_reborn() -> None:
    emu = Emulator()
    leak(emu, 1, 7, 0)
    emu.feed(tr(NS, 1, S.CLOSE, S.SYN_SENT, pid=8))  # its exit was never seen
    snap = emu.snapshot(2 * NS)
    assert snap.open == () and snap.counters.forgotten == 1 and snap.counters.entered == 1


def test_emulation_answers_as_the_event_fed_tracker_on_a_recording() -> None:
    recording = open_recording(str(DATA / "closewait_leaky.jsonl"))
    events = list(recording.events())
    tracker = CloseWaitTracker(threshold_ns=NS)
    for event in events:
        tracker.feed(event)
    end = max(e.ts_ns for e in events) + 5 * NS
    m = CloseWaitModel(threshold_ns=NS)
    m.apply(Emulator().feed_all(events).snapshot(end))
    assert (m.entered, m.closed, m.reset) == (tracker.entered, tracker.closed, tracker.reset)
    mine = sorted((s.dport, s.endpoint, s.owner, s.entered_ns, s.eof_ns) for s in m.open.values())
    theirs = sorted((s.dport, s.endpoint, s.owner, s.entered_ns, s.eof_ns) for s in tracker.open.values())
    assert mine == theirs and mine
    assert m.close_times().max_ns == tracker.close_times().max_ns
    assert m.close_times().count == tracker.close_times().count
    key = [(g.pid, g.count, g.last_touch.op if g.last_touch else None) for g in m.suspects(end)]
    assert key == [(g.pid, g.count, g.last_touch.op if g.last_touch else None) for g in tracker.suspects(end)]
    header = recording.header
    assert {s.dport for s in m.open.values()} == set(header["leaked_client_ports"])


def test_replay_through_the_cli_uses_the_same_model() -> None:
    result = CliRunner().invoke(cli, ["closewait", "--from", str(DATA / "closewait_leaky.jsonl"), "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["open"] == 3
    leaked = open_recording(str(DATA / "closewait_leaky.jsonl")).header["leaked_client_ports"]
    assert {s["dport"] for s in summary["sockets"]} == set(leaked)
    assert summary["kernel"]["open_failed"] == 0
    assert sum(o["entered"] for o in summary["owners"]) == summary["entered"]


def test_a_touch_after_the_fin_or_none_is_one_group_when_the_pre_fin_touch_was_kept() -> None:
    """A Go client: every connection read in the transport's loop before the FIN, some read
    to EOF since, others not yet: one leak. A different touch after the FIN is another;
    without the pre-FIN touch, no touch after the FIN is all that tells a leak apart."""
    owner = Owner(7, "client")
    loop = CodePath(op=Op.RECV, ts_ns=5, task_pid=7, ret=100, ustack=("read", "readLoop"))

    def sock(n: int, pre: CodePath | None, post: tuple[str, ...] | None) -> CloseWaitSocket:
        after = None if post is None else CodePath(op=Op.RECV, ts_ns=20, task_pid=7, ustack=post)
        return CloseWaitSocket(
            key=LiveKey(1, n, 10),
            endpoint=Endpoint(4, "127.0.0.1", 40000 + n, "127.0.0.1", 80),
            owner=owner,
            entered_ns=10,
            pre_fin_touch=pre,
            post_fin_touch=after,
        )

    socks = [sock(1, loop, ("read", "readLoop")), sock(2, loop, None), sock(3, loop, None)]
    socks += [sock(4, loop, ("read", "other")), sock(5, None, ("read", "readLoop")), sock(6, None, None)]
    groups = group_suspects(socks, NS, 2 * NS)
    got = sorted((g.count, g.pre_fin_touch is not None, code_path_key(g.post_fin_touch)) for g in groups)
    assert got == [
        (1, False, ()),
        (1, False, ("RECV", "read", "readLoop")),
        (1, True, ("RECV", "read", "other")),
        (3, True, ("RECV", "read", "readLoop")),
    ]
