"""Where events come from: the live kernel, or a recording. Commands take either.

Both give events in order and a model clock (``now_ns``, CLOCK_MONOTONIC like the kernel's
timestamps), so the same analysis code answers for a live run and for a replay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

from tcptrace.model.events import SocketEvent
from tcptrace.model.filters import EventFilter
from tcptrace.recording import Recording, clock_offset_ns, open_recording
from tcptrace.views.common import make_console


class Source(Protocol):
    clock_offset_ns: int
    live: bool

    def poll(self, timeout_s: float) -> list[SocketEvent]:
        """Events that arrived, waiting up to ``timeout_s`` when there are none."""

    @property
    def exhausted(self) -> bool:
        """True once a finite source has given its last event."""

    def now_ns(self) -> int:
        """The model's clock: the kernel clock live, the last event's time in a replay."""

    def counters(self) -> dict[str, int]:
        """Events decoded and lost so far."""

    def close(self) -> None: ...


class RecordingSource:
    """A recording replayed through the same filters the kernel would have applied."""

    live = False

    def __init__(self, recording: Recording, flt: EventFilter | None = None, batch: int = 4096) -> None:
        self.recording = recording
        self.clock_offset_ns = recording.clock_offset_ns
        self._filter = flt or EventFilter()
        self._events: Iterator[SocketEvent] = recording.events()
        self._batch = batch
        self._done = False
        self._now = 0
        self.decoded = 0

    def poll(self, timeout_s: float = 0.0) -> list[SocketEvent]:
        out: list[SocketEvent] = []
        for event in self._events:
            self.decoded += 1
            self._now = max(self._now, event.ts_ns)
            if self._filter.matches(event):
                out.append(event)
            if len(out) >= self._batch:
                return out
        self._done = True
        # The recording ran until its summary says (end_ns): ages are measured there.
        end_ns = (self.recording.summary or {}).get("end_ns")
        if isinstance(end_ns, int):
            self._now = max(self._now, end_ns)
        return out

    @property
    def exhausted(self) -> bool:
        return self._done

    def now_ns(self) -> int:
        return self._now

    def counters(self) -> dict[str, int]:
        recorded = self.recording.summary or {}
        return {"decoded": self.decoded, "lost": int(recorded.get("lost", 0))}

    def close(self) -> None:
        pass


class KernelSource:
    """Events from a loaded program (kernel/ is imported only when one is made)."""

    live = True

    def __init__(self, stream: object) -> None:
        from tcptrace.kernel.stream import KernelStream

        assert isinstance(stream, KernelStream)
        self._stream = stream
        self.clock_offset_ns = clock_offset_ns()

    @property
    def stream(self) -> object:
        """The KernelStream (kernel/ types stay out of this module's signatures)."""
        return self._stream

    def poll(self, timeout_s: float) -> list[SocketEvent]:
        return self._stream.poll(max(0, int(timeout_s * 1000)))

    @property
    def exhausted(self) -> bool:
        return False

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def counters(self) -> dict[str, int]:
        return self._stream.counters()

    def drain(self) -> list[SocketEvent]:
        return self._stream.drain()

    def close(self) -> None:
        self._stream.program.close()


@contextmanager
def open_source(
    from_file: str | None,
    flt: EventFilter,
    *,
    parts: Sequence[str] = ("lifecycle",),
    stacks: bool = False,
    defines: dict[str, int] | None = None,
    ringbuf_pages: int | None = None,
    quiet: bool = False,
) -> Iterator[Source]:
    """A recording when --from is given, else the live kernel running ``parts`` of bpf/.

    Closed (every program detached) on exit, however the block ends.
    """
    source: Source
    if from_file is not None:
        source = RecordingSource(open_recording(from_file), flt)
    else:
        from tcptrace.kernel.loader import PARTS, load
        from tcptrace.kernel.stream import KernelStream

        console = make_console(stderr=True, quiet=quiet)
        with console.status("compiling and attaching BPF programs…"):
            program = load(
                [PARTS[name] for name in parts],
                flt,
                stacks=stacks,
                defines=defines,
                ringbuf_pages=ringbuf_pages,
            )
        source = KernelSource(KernelStream(program, flt, symbolize=stacks))
    try:
        yield source
    finally:
        source.close()


def drain_into(source: Source, on_event: Callable[[SocketEvent], None]) -> None:
    """After a live stop, take what the kernel already sent, so the summary counts it."""
    drain = getattr(source, "drain", None)
    if drain is not None:
        for event in drain():
            on_event(event)
