from __future__ import annotations

import os
import signal

import pytest

from tcptrace.commands import session
from tcptrace.commands.session import NS, StopFlag, run, stop_on_signals
from tcptrace.model.events import SocketEvent, TcpState, Transition


def ev(t_s: float) -> Transition:
    return Transition(ts_ns=int(t_s * NS), skaddr=1, old=TcpState.CLOSE, new=TcpState.SYN_SENT)


class FakeReplay:
    """A finite source, like a recording."""

    live = False
    clock_offset_ns = 0

    def __init__(self, events: list[SocketEvent], batch: int = 2) -> None:
        self.events = list(events)
        self.batch = batch
        self.now = 0

    def poll(self, timeout_s: float) -> list[SocketEvent]:
        out, self.events = self.events[: self.batch], self.events[self.batch :]
        if out:
            self.now = out[-1].ts_ns
        return out

    @property
    def exhausted(self) -> bool:
        return not self.events

    def now_ns(self) -> int:
        return self.now

    def counters(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


class FakeLive(FakeReplay):
    """A live source whose clock advances 0.25 s per poll."""

    live = True

    def poll(self, timeout_s: float) -> list[SocketEvent]:
        self.now += NS // 4
        out = [e for e in self.events if e.ts_ns <= self.now]
        self.events = [e for e in self.events if e.ts_ns > self.now]
        return out

    @property
    def exhausted(self) -> bool:
        return False


def test_replay_ticks_follow_event_time_not_wall_time() -> None:
    seen: list[float] = []
    ticks: list[float] = []
    reason = run(
        FakeReplay([ev(10.0), ev(10.5), ev(12.2), ev(13.9)]),
        lambda e: seen.append(e.ts_ns / NS),
        interval_s=1.0,
        on_tick=lambda t: ticks.append(t / NS),
    )
    assert reason == "end"
    assert seen == [10.0, 10.5, 12.2, 13.9]
    # ticks at 11, 12 (before 12.2 is handled), 13 (before 13.9)
    assert ticks == [11.0, 12.0, 13.0]


def test_replay_duration_counts_from_the_first_event() -> None:
    seen: list[float] = []
    reason = run(
        FakeReplay([ev(5.0), ev(6.0), ev(7.5), ev(9.0)]), lambda e: seen.append(e.ts_ns / NS), duration_s=2.0
    )
    assert reason == "duration"
    assert seen == [5.0, 6.0]


def test_live_duration_and_ticks() -> None:
    src = FakeLive([ev(0.1), ev(0.6), ev(5.0)])
    seen: list[float] = []
    ticks: list[int] = []
    reason = run(
        src, lambda e: seen.append(e.ts_ns / NS), interval_s=0.5, duration_s=1.0, on_tick=ticks.append
    )
    assert reason == "duration"
    assert seen == [0.1, 0.6]
    assert [t / NS for t in ticks] == [0.5, 1.0]


def test_a_stop_flag_set_by_a_signal_ends_the_run() -> None:
    flag = StopFlag()
    src = FakeLive([])
    calls = 0

    def poll(timeout_s: float) -> list[SocketEvent]:
        nonlocal calls
        calls += 1
        if calls == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return []

    src.poll = poll  # type: ignore[method-assign]
    assert run(src, lambda e: None, flag=flag) == "SIGTERM"
    assert calls == 3


def test_signal_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(StopFlag()):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_live_run_stops_after_the_watched_pid_exits() -> None:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    src = FakeLive([ev(0.1), ev(0.9), ev(30.0)])
    seen: list[float] = []
    reason = run(src, lambda e: seen.append(e.ts_ns / NS), watch_pid=child.pid)
    assert reason == "pid exited"
    # events up to the grace period after the exit was noticed are still handled
    assert seen == [0.1, 0.9]


def test_a_live_run_handles_what_is_left_in_the_buffer_at_the_end() -> None:
    """Events the kernel already sent when the run stops are drained and handled."""
    src = FakeLive([ev(0.1)])
    left = [ev(0.95), ev(0.97)]
    src.drain = lambda: left  # type: ignore[attr-defined]
    seen: list[float] = []
    assert run(src, lambda e: seen.append(e.ts_ns / NS), duration_s=0.5) == "duration"
    assert seen == [0.1, 0.95, 0.97]


def test_keyboard_interrupt_is_a_stop() -> None:
    src = FakeLive([])

    def poll(timeout_s: float) -> list[SocketEvent]:
        raise KeyboardInterrupt

    src.poll = poll  # type: ignore[method-assign]
    assert run(src, lambda e: None) == "SIGINT"


def test_replay_ticks_are_bounded_by_events_not_by_the_span_of_time() -> None:
    """Two events 10^18 ns apart: a bounded number of ticks, not 10^9 (each empty interval
    up to a budget, then a jump to the interval of the next event, on the same grid)."""
    ticks: list[int] = []
    far = 10**18
    events = [ev(1.0), ev(1.5), ev(far / NS), ev(far / NS + 1.5)]
    run(FakeReplay(events), lambda e: None, interval_s=1.0, on_tick=ticks.append)
    assert len(ticks) <= session.FREE_EMPTY_TICKS + 2 * len(events)
    assert ticks == sorted(ticks) and all(t % NS == 0 for t in ticks)
    assert ticks[-1] - NS <= far < ticks[-1]  # the interval holding the far event was closed


def test_replay_ticks_every_empty_interval_of_a_real_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session, "FREE_EMPTY_TICKS", 3)
    ticks: list[float] = []
    run(
        FakeReplay([ev(0.0), ev(5.5), ev(100.2), ev(101.5)], batch=1),
        lambda e: None,
        interval_s=1.0,
        on_tick=lambda t: ticks.append(t / NS),
    )
    # Up to 5.5: every tick (4 empty ones: within 3 + 1 event). Up to 100.2: the tick closing
    # the interval of 5.5, one empty (the budget is 3 + 2 events), then a jump: the interval
    # [8, 101) closes at 101.
    assert ticks == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 101.0]
