"""The loop every command runs: feed events to a handler, tick at intervals, stop cleanly.

Stops on --duration (model time, so a replay of 60 s of events stops where a live run
would have), at the end of a recording, on Ctrl-C, SIGTERM or SIGHUP, and when the traced
process (``watch_pid``) has exited: a grace period later, so that the kernel's last
transitions of its sockets (closed at exit) are still seen. The caller's ``finally``
then detaches programs and prints the summary: a signal during the loop is a normal stop
(exit status 0); before or after it, commands/interrupts.py makes it an interruption.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from tcptrace.commands.interrupts import STOP_SIGNALS, ignored
from tcptrace.commands.sources import KernelSource, Source
from tcptrace.model.events import SocketEvent

NS = 1_000_000_000
PID_EXIT_GRACE_S = 1.0
FREE_EMPTY_TICKS = 10_000
"""A replay ticks every empty interval up to this many, plus one per event; past that it
jumps over empty intervals (the next tick closes one long interval). Replay time is so
bounded by the number of events, not by the span of their timestamps: two events 10^18 ns
apart would otherwise be 10^9 ticks of 1 s. (10,000 s of quiet at 1 s intervals: a real
recording is never jumped over.)"""


@dataclass
class StopFlag:
    reason: str | None = None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Turn SIGINT, SIGTERM and SIGHUP into ``flag`` being set, for the duration of the
    block (a signal the process was started with ignored stays ignored)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        flag.set(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS if not ignored(sig)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(
    source: Source,
    on_event: Callable[[SocketEvent], None],
    *,
    interval_s: float = 1.0,
    duration_s: float | None = None,
    on_tick: Callable[[int], None] | None = None,
    flag: StopFlag | None = None,
    watch_pid: int | None = None,
    on_batch: BatchHandler | None = None,
) -> str:
    """Run until stopped; returns why ("duration", "end", "SIGINT", "SIGTERM", "SIGHUP",
    "pid exited").

    A live source is drained at the end: what the kernel had already sent is handled too,
    so a summary counts it. Ctrl-C arriving before the handlers are in place is a stop
    like any other.

    ``on_batch``: a live kernel source hands its raw batches to it instead of events to
    ``on_event`` (see BatchHandler); a replay still goes to ``on_event``.
    """
    flag = flag or StopFlag()
    clock = Clock(max(1, int(interval_s * NS)), duration_s, on_tick, replay=not source.live)
    if source.live:
        clock.start(source.now_ns())
    pid = PidWatch(watch_pid)
    batches = (source, on_batch) if on_batch is not None and isinstance(source, KernelSource) else None
    with stop_on_signals(flag):
        try:
            while flag.reason is None:
                if batches is not None:
                    _handle_batch(*batches, clock, flag)
                else:
                    _handle_poll(source, on_event, clock, flag)
                _check_stop(source, clock, flag, pid)
        except KeyboardInterrupt:
            flag.set("SIGINT")
        if batches is not None:
            batches[1](batches[0].drain_raw(), None)
        else:
            drain = getattr(source, "drain", None)
            if drain is not None:
                for event in drain():
                    on_event(event)
    return flag.reason or "end"


BatchHandler = Callable[[bytes, "int | None"], bool]
"""Handles a batch of raw records (kernel/ringbuf.py) given the --duration deadline (None:
none, or the final drain); returns True when an event was past the deadline, which, as in
``run``, stops the run (that event and the batch's later ones are left out)."""


def _handle_batch(source: KernelSource, on_batch: BatchHandler, clock: Clock, flag: StopFlag) -> None:
    timeout = 0.1
    if clock.deadline is not None:
        timeout = max(0.0, min(timeout, (clock.deadline - source.now_ns()) / NS))
    batch = source.poll_raw(timeout)
    if batch and on_batch(batch, clock.deadline):
        flag.set("duration")


@dataclass
class Clock:
    """When the next tick is due and when --duration ends, in the source's clock (model
    time). Live it starts with the run; in a replay at the first event, and empty
    intervals beyond a budget are jumped over (FREE_EMPTY_TICKS)."""

    interval_ns: int
    duration_s: float | None
    on_tick: Callable[[int], None] | None
    next_tick: int | None = None
    deadline: int | None = None
    replay: bool = False
    events: int = 0  # replay: events handled, and whether one came since the last tick
    fresh: bool = False
    empty_ticks: int = 0

    @property
    def started(self) -> bool:
        return self.next_tick is not None

    def start(self, start_ns: int) -> None:
        self.next_tick = start_ns + self.interval_ns
        if self.duration_s is not None:
            self.deadline = start_ns + int(self.duration_s * NS)

    def tick_until(self, now: int) -> None:
        """Every tick due at ``now``, in order (in a replay, within the budget of empty ones)."""
        while self.next_tick is not None and now >= self.next_tick:
            if self.replay and not self.fresh:
                if self.empty_ticks >= FREE_EMPTY_TICKS + self.events:
                    # To the first tick after ``now``, on the same grid.
                    self.next_tick += ((now - self.next_tick) // self.interval_ns + 1) * self.interval_ns
                    return
                self.empty_ticks += 1
            self.fresh = False
            if self.on_tick is not None:
                self.on_tick(self.next_tick)
            self.next_tick += self.interval_ns

    def event(self) -> None:
        """A replayed event, in the interval after the ticks due before it."""
        self.events += 1
        self.fresh = True


@dataclass
class PidWatch:
    """Whether the traced process has exited, a grace period ago."""

    pid: int | None
    gone_at: int | None = None

    def exited(self, now: int) -> bool:
        if self.pid is not None and self.gone_at is None and not os.path.exists(f"/proc/{self.pid}"):
            self.gone_at = now
        return self.gone_at is not None and now - self.gone_at >= PID_EXIT_GRACE_S * NS


def _handle_poll(
    source: Source, on_event: Callable[[SocketEvent], None], clock: Clock, flag: StopFlag
) -> None:
    """One poll of ``source``: each event handled, in a replay after the ticks due before it;
    the first event past --duration stops the run."""
    timeout = 0.1
    if source.live and clock.deadline is not None:
        timeout = max(0.0, min(timeout, (clock.deadline - source.now_ns()) / NS))
    for event in source.poll(timeout):
        if not clock.started:  # replay: the clock starts at the first event
            clock.start(event.ts_ns)
        if clock.deadline is not None and event.ts_ns > clock.deadline:
            flag.set("duration")
            break
        if not source.live:
            clock.tick_until(event.ts_ns)
            clock.event()
        on_event(event)


def _check_stop(source: Source, clock: Clock, flag: StopFlag, pid: PidWatch) -> None:
    """Live: the ticks due now, --duration, the traced process' exit; any source: its end."""
    now = source.now_ns()
    if source.live:
        clock.tick_until(now)
        if clock.deadline is not None and now >= clock.deadline:
            flag.set("duration")
        if pid.exited(now):
            flag.set("pid exited")
    if source.exhausted:
        flag.set("end")
