"""The loop every command runs: feed events to a handler, tick at intervals, stop cleanly.

Stops on --duration (model time, so a replay of 60 s of events stops where a live run
would have), at the end of a recording, on Ctrl-C or SIGTERM, and when the traced
process (``watch_pid``) has exited: a grace period later, so that the kernel's last
transitions of its sockets (closed at exit) are still seen. The caller's ``finally``
then detaches programs and prints the summary: SIGTERM is turned into a normal stop,
since Python's default would skip all cleanup.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from tcptrace.commands.sources import Source
from tcptrace.model.events import SocketEvent

NS = 1_000_000_000
PID_EXIT_GRACE_S = 1.0


@dataclass
class StopFlag:
    reason: str | None = None

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Turn SIGINT and SIGTERM into ``flag`` being set, for the duration of the block."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        flag.set(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
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
) -> str:
    """Run until stopped; returns why ("duration", "end", "SIGINT", "SIGTERM", "pid exited").

    A live source is drained at the end: what the kernel had already sent is handled too,
    so a summary counts it. Ctrl-C arriving before the handlers are in place is a stop
    like any other.
    """
    flag = flag or StopFlag()
    pid_gone_at: int | None = None
    interval_ns = max(1, int(interval_s * NS))
    start_ns: int | None = source.now_ns() if source.live else None
    next_tick: int | None = start_ns + interval_ns if start_ns is not None else None
    deadline: int | None = None
    if duration_s is not None and start_ns is not None:
        deadline = start_ns + int(duration_s * NS)

    def tick_until(now: int) -> None:
        nonlocal next_tick
        while next_tick is not None and now >= next_tick:
            if on_tick is not None:
                on_tick(next_tick)
            next_tick += interval_ns

    def loop() -> None:
        nonlocal start_ns, next_tick, deadline, pid_gone_at
        while flag.reason is None:
            timeout = 0.1
            if source.live and deadline is not None:
                timeout = max(0.0, min(timeout, (deadline - source.now_ns()) / NS))
            events = source.poll(timeout)
            for event in events:
                if start_ns is None:  # replay: the clock starts at the first event
                    start_ns = event.ts_ns
                    next_tick = start_ns + interval_ns
                    if duration_s is not None:
                        deadline = start_ns + int(duration_s * NS)
                if deadline is not None and event.ts_ns > deadline:
                    flag.set("duration")
                    break
                if not source.live:
                    tick_until(event.ts_ns)
                on_event(event)
            now = source.now_ns()
            if source.live:
                tick_until(now)
                if deadline is not None and now >= deadline:
                    flag.set("duration")
                if watch_pid is not None and pid_gone_at is None and not os.path.exists(f"/proc/{watch_pid}"):
                    pid_gone_at = now
                if pid_gone_at is not None and now - pid_gone_at >= PID_EXIT_GRACE_S * NS:
                    flag.set("pid exited")
            if source.exhausted:
                flag.set("end")

    with stop_on_signals(flag):
        try:
            loop()
        except KeyboardInterrupt:
            flag.set("SIGINT")
        drain = getattr(source, "drain", None)
        if drain is not None:
            for event in drain():
                on_event(event)
    return flag.reason or "end"
