"""Property-based tests of the socket table and the CLOSE_WAIT tracker: whatever the event
stream (any order, duplicates, a missing CLOSE, reused skaddrs and pids), they neither fail
nor let a reused address inherit an old socket's owner, and their counts stay consistent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tcptrace.model.closewait import CloseWaitTracker
from tcptrace.model.events import Op, SocketEvent, TcpState, Touch, Transition
from tcptrace.model.lifecycle import SocketTable, birth

# Few addresses, pids and ports, so that reuse and collisions are the rule, not the exception.
skaddrs = st.sampled_from([0x1000, 0x2000, 0x3000])
pids = st.none() | st.sampled_from([100, 200, 300])
states = st.sampled_from(TcpState)


@st.composite
def event_streams(draw: st.DrawFn) -> list[SocketEvent]:
    n = draw(st.integers(0, 60))
    out: list[SocketEvent] = []
    ts = 0
    for _ in range(n):
        ts += draw(st.integers(0, 2_000_000_000))  # equal timestamps happen too
        common = dict(
            ts_ns=ts,
            skaddr=draw(skaddrs),
            saddr="127.0.0.1",
            sport=draw(st.sampled_from([8080, 40000, 40001])),
            daddr="127.0.0.1",
            dport=draw(st.sampled_from([8080, 40000, 40001])),
            pid=draw(pids),
            comm=draw(st.sampled_from([None, "srv", "cli"])),
            task_pid=draw(st.sampled_from([0, 100, 200, 300])),
        )
        if draw(st.booleans()):
            out.append(Transition(old=draw(states), new=draw(states), **common))  # type: ignore[arg-type]
        else:
            out.append(Touch(op=draw(st.sampled_from(Op)), ret=draw(st.integers(-5, 5)), **common))  # type: ignore[arg-type]
        if draw(st.integers(0, 9)) == 0:
            out.append(out[-1])  # a duplicate
    return out


@settings(max_examples=200, deadline=None)
@given(event_streams())
def test_the_table_never_lets_a_born_socket_inherit(events: list[SocketEvent]) -> None:
    table = SocketTable(capacity=2)  # tiny: evictions happen too
    for ev in events:
        record, _replaced = table.feed(ev)
        if isinstance(ev, Transition) and birth(ev) and record is not None:
            # A socket being born knows only what this event says of it.
            assert record.origin is None or record.origin.ts_ns == ev.ts_ns
            assert record.pid == ev.pid or record.pid is None
        if isinstance(ev, Transition) and ev.new == TcpState.CLOSE:
            assert table.get(ev.skaddr) is None
        assert len(table) <= 2


@settings(max_examples=200, deadline=None)
@given(event_streams())
def test_the_tracker_stays_consistent(events: list[SocketEvent]) -> None:
    tracker = CloseWaitTracker(threshold_ns=1_000_000_000)
    for ev in events:
        tracker.feed(ev)
    now = max((e.ts_ns for e in events), default=0)
    open_socks = tracker.open_sockets()
    # A socket in CLOSE_WAIT is one per address, entered no later than now.
    keys = [s.key for s in open_socks]
    assert len(keys) == len(set(keys))
    assert all(s.entered_ns <= now for s in open_socks)
    assert all(s.age_ns(now) >= 0 for s in open_socks)
    # Entries and exits are what the stream shows (an exit whose entry came before the
    # stream began still counts: the socket was in CLOSE_WAIT before tracing started).
    transitions = [e for e in events if isinstance(e, Transition)]
    assert tracker.entered == sum(1 for e in transitions if e.new == TcpState.CLOSE_WAIT)
    assert tracker.closed + tracker.reset == sum(
        1 for e in transitions if e.old == TcpState.CLOSE_WAIT and e.new != TcpState.CLOSE_WAIT
    )
    assert len(open_socks) <= tracker.entered
    # Suspects are open sockets older than the threshold, each counted once.
    suspects = tracker.suspects(now)
    assert sum(g.count for g in suspects) == sum(1 for s in open_socks if s.age_ns(now) >= 1_000_000_000)
    summary = tracker.summary_json(now)
    assert len(summary["sockets"]) == len(open_socks)
