"""closelat's model: cumulative snapshots to interval/cumulative reports, replay, flags."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from tcptrace.model.closelat import CallKey, CallStats, CloseLatency, Report, merge_rows
from tcptrace.model.events import (
    CloseCall,
    CloseFlag,
    DecodeError,
    Kind,
    Op,
    TcpState,
    Transition,
    from_json,
    from_raw,
    to_json,
)
from tcptrace.model.filters import EventFilter
from tcptrace.model.histogram import Log2Histogram

S = 1_000_000_000
WEB = CallKey(100, "web", Op.CLOSE)
WEB_SHUT = CallKey(100, "web", Op.SHUTDOWN)
DB = CallKey(200, "db", Op.CLOSE)


def row(key: CallKey, values: list[int], resets: int = 0, lingered: int = 0) -> CallStats:
    return CallStats(key, Log2Histogram.of(values), resets=resets, lingered=lingered)


def close_event(flags: CloseFlag, pid: int = 100, ts: int = 5) -> CloseCall:
    return CloseCall(
        ts_ns=ts,
        skaddr=0xFFFF1,
        pid=pid,
        comm="web",
        op=Op.CLOSE,
        duration_ns=S,
        flags=flags,
        state=TcpState.ESTABLISHED,
    )


class Kernel:
    """A stand-in for the kernel's cumulative maps: calls are added, snapshots taken."""

    def __init__(self) -> None:
        self.values: dict[CallKey, list[int]] = {}
        self.resets: dict[CallKey, int] = {}

    def call(self, key: CallKey, ns: int, reset: bool = False) -> None:
        self.values.setdefault(key, []).append(ns)
        self.resets[key] = self.resets.get(key, 0) + int(reset)

    def rows(self) -> list[CallStats]:
        return [row(k, v, resets=self.resets[k]) for k, v in self.values.items()]


def test_intervals_are_differences_of_cumulative_snapshots() -> None:
    kernel, model = Kernel(), CloseLatency()
    model.start(0)
    for ns in (10_000, 12_000, 20_000):
        kernel.call(WEB, ns)
    kernel.call(DB, 5_000)
    first = model.snapshot(1 * S, kernel.rows())
    assert first.window == "interval" and first.interval_ns == S
    assert {r.key: r.count for r in first.rows} == {WEB: 3, DB: 1}

    kernel.call(WEB, S, reset=True)  # one slow call, and DB made none
    second = model.snapshot(2 * S, kernel.rows())
    assert [r.key for r in second.rows] == [WEB]
    (web,) = second.rows
    assert web.count == 1 and web.resets == 1
    assert web.hist.max_ns == S and web.hist.max_exact
    assert web.hist.percentile(50) == S

    third = model.snapshot(3 * S, kernel.rows())
    assert third.rows == ()


def test_interval_maximum_is_bounded_when_it_did_not_grow() -> None:
    kernel, model = Kernel(), CloseLatency()
    kernel.call(WEB, 900_000)
    model.snapshot(S, kernel.rows())
    kernel.call(WEB, 3_000)
    (web,) = model.snapshot(2 * S, kernel.rows()).rows
    # Not exact: the kernel keeps one maximum since start. It is an upper bound in the
    # sample's own bucket.
    assert not web.hist.max_exact
    assert 3_000 <= web.hist.max_ns < 4_096


def test_cumulative_reports_everything_so_far() -> None:
    kernel, model = Kernel(), CloseLatency(cumulative=True)
    kernel.call(WEB, 10_000)
    model.snapshot(S, kernel.rows())
    kernel.call(DB, 20_000)
    report = model.snapshot(2 * S, kernel.rows())
    assert report.window == "cumulative"
    assert {r.key: r.count for r in report.rows} == {WEB: 1, DB: 1}
    assert report.total.count == 2


def test_rows_are_sorted_busiest_first() -> None:
    model = CloseLatency(cumulative=True)
    report = model.snapshot(S, [row(DB, [1]), row(WEB, [1, 2, 3]), row(WEB_SHUT, [1, 2, 3])])
    assert [r.key for r in report.rows] == [WEB, WEB_SHUT, DB]


def test_filters_apply_to_rows() -> None:
    rows = [row(WEB, [1]), row(DB, [2])]
    assert [r.key for r in CloseLatency(flt=EventFilter(pids=frozenset({200}))).snapshot(S, rows).rows] == [
        DB
    ]
    assert [r.key for r in CloseLatency(flt=EventFilter(comm="web")).snapshot(S, rows).rows] == [WEB]
    long_name = CallKey(7, "a-very-long-pro", Op.CLOSE)  # the kernel keeps 15 characters
    flt = EventFilter(comm="a-very-long-process-name")
    assert CloseLatency(flt=flt).snapshot(S, [row(long_name, [1])]).rows[0].key == long_name


def test_rows_of_one_key_merge() -> None:
    a = CallKey(1, "x", Op.CLOSE, ("f+0x1 [x]",))
    merged = merge_rows([row(a, [1, 2]), row(a, [3], resets=1)])
    assert merged[a].count == 3 and merged[a].resets == 1


def test_flagged_calls_are_counted_and_kept() -> None:
    model = CloseLatency()
    assert model.feed(Transition(ts_ns=1, skaddr=1, old=TcpState.CLOSE, new=TcpState.LISTEN)) is None
    model.feed(close_event(CloseFlag.RESET))
    model.feed(close_event(CloseFlag.RESET | CloseFlag.LINGERED))
    model.feed(close_event(CloseFlag.LATE_CLOSE_WAIT))
    flagged = model.summary_json()["flagged"]
    assert flagged == {"events": 3, "reset": 2, "lingered": 1, "late_close_wait": 1}
    assert len(model.flagged) == 3


def random_kernel_run(seed: int, reports: int = 6) -> tuple[list[list[CallStats]], list[int]]:
    rng = random.Random(seed)
    kernel = Kernel()
    snapshots, times = [], []
    for i in range(reports):
        for _ in range(rng.randint(0, 30)):
            kernel.call(rng.choice([WEB, DB, WEB_SHUT]), rng.choice([0, 900, 12_000, 40_000, S]))
        snapshots.append(kernel.rows())
        times.append((i + 1) * S)
    return snapshots, times


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("recorded_window", ["interval", "cumulative"])
def test_replay_of_either_window_gives_the_same_answers(seed: int, recorded_window: str) -> None:
    snapshots, times = random_kernel_run(seed)
    live = CloseLatency(cumulative=recorded_window == "cumulative")
    live.start(0)
    lines = [
        json.loads(json.dumps(live.snapshot(t, s).to_json())) for t, s in zip(times, snapshots, strict=True)
    ]

    for cumulative in (False, True):
        direct = CloseLatency(cumulative=cumulative)
        direct.start(0)
        replayed = CloseLatency(cumulative=cumulative)
        for t, s, line in zip(times, snapshots, lines, strict=True):
            want = direct.snapshot(t, s)
            got = replayed.replay(line)
            assert got is not None
            assert got.interval_ns == want.interval_ns
            assert [(r.key, r.hist.counts, r.hist.sum_ns, r.resets) for r in got.rows] == [
                (r.key, r.hist.counts, r.hist.sum_ns, r.resets) for r in want.rows
            ]
        assert replayed.totals().total.counts == direct.totals().total.counts


def test_replay_ignores_reports_of_other_commands() -> None:
    assert CloseLatency().replay({"type": "closewait", "ts_ns": 1}) is None


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "closelat", "ts_ns": "1", "window": "interval", "processes": []},
        {"type": "closelat", "ts_ns": 1, "window": "weekly", "processes": []},
        {"type": "closelat", "ts_ns": 1, "window": "interval", "processes": {}},
        {"type": "closelat", "ts_ns": 1, "window": "interval"},
        {"type": "closelat", "ts_ns": 1, "window": "interval", "processes": [{"pid": 1}]},
        {
            "type": "closelat",
            "ts_ns": 1,
            "window": "interval",
            "processes": [{"pid": 1, "comm": "x", "call": "open", "buckets": []}],
        },
        {
            "type": "closelat",
            "ts_ns": 1,
            "window": "interval",
            "processes": [{"pid": 1, "comm": "x", "call": "close", "buckets": [], "resets": -1}],
        },
        {
            "type": "closelat",
            "ts_ns": 1,
            "window": "interval",
            "processes": [{"pid": 1, "comm": "x", "call": "close", "buckets": [], "stack": "f"}],
        },
    ],
)
def test_malformed_reports_are_refused(obj: dict[str, object]) -> None:
    with pytest.raises((KeyError, ValueError, TypeError)):
        CloseLatency().replay(obj)


def test_row_json_round_trip_with_stack() -> None:
    key = CallKey(3, "srv", Op.CLOSE_RANGE, ("close_range+0x4 [libc.so.6]", "main+0x20 [srv]"))
    r = CallStats(key, Log2Histogram.of([5, 500, 50_000]), resets=1, lingered=2, late_close_wait=3)
    obj = json.loads(json.dumps(r.to_json()))
    assert obj["call"] == "close_range" and obj["stack"][0].startswith("close_range")
    assert obj["count"] == 3 and obj["late_close_wait"] == 3
    assert CallStats.from_json(obj) == r


def test_report_json_shape() -> None:
    report = Report(7, "interval", S, (row(WEB, [1_000, 2_000]),))
    obj = report.to_json()
    assert obj["type"] == "closelat" and obj["window"] == "interval" and obj["interval_ns"] == S
    (p,) = obj["processes"]
    assert {"pid", "comm", "call", "count", "p50_ns", "p90_ns", "p99_ns", "max_ns", "buckets"} <= set(p)


def raw_close(**over: object) -> SimpleNamespace:
    fields: dict[str, object] = dict(
        kind=Kind.CLOSE,
        ts_ns=10,
        skaddr=0xFFFF8881,
        value_ns=1_020_000_000,
        aux_ns=0,
        flags=CloseFlag.LINGERED | CloseFlag.RESET,
        sk_flags=1 << 8,
        task_tgid=42,
        task_pid=43,
        owner_tgid=42,
        kstack=-1,
        ustack=-1,
        ret=0,
        saddr=bytes([127, 0, 0, 1]) + bytes(12),
        daddr=bytes([127, 0, 0, 2]) + bytes(12),
        sport=8080,
        dport=50000,
        family=2,
        oldstate=TcpState.ESTABLISHED,
        newstate=0,
        op=Op.CLOSE,
        task_comm=b"srv\0",
        owner_comm=b"srv\0",
    )
    fields.update(over)
    return SimpleNamespace(**fields)


def test_close_events_decode_from_the_kernel_layout() -> None:
    ev = from_raw(raw_close())
    assert isinstance(ev, CloseCall)
    assert ev.pid == 42 and ev.comm == "srv" and ev.task_tid == 43
    assert ev.flags == CloseFlag.LINGERED | CloseFlag.RESET
    assert ev.duration_ns == 1_020_000_000 and ev.in_state_ns is None
    assert ev.state is TcpState.ESTABLISHED
    assert (ev.saddr, ev.sport, ev.daddr, ev.dport) == ("127.0.0.1", 8080, "127.0.0.2", 50000)
    assert from_json(json.loads(json.dumps(to_json(ev)))) == ev
    late = from_raw(raw_close(oldstate=TcpState.CLOSE_WAIT, aux_ns=5 * S, flags=4, op=Op.CLOSE_RANGE))
    assert isinstance(late, CloseCall)
    assert late.flags == CloseFlag.LATE_CLOSE_WAIT and late.in_state_ns == 5 * S
    assert late.op is Op.CLOSE_RANGE
    with pytest.raises(DecodeError):
        from_raw(raw_close(op=99))


def test_close_event_json_refuses_bad_flags() -> None:
    obj = to_json(from_raw(raw_close()))
    for bad in ("RESET", ["NOPE"], [1]):
        with pytest.raises((KeyError, TypeError, ValueError)):
            from_json({**obj, "flags": bad})
