"""Where events come from: a live session on the kernel, or a recording. Commands take either.

Both give events in order and a model clock (``now_ns``, CLOCK_MONOTONIC like the kernel's
timestamps), so the same analysis code answers for a live run and for a replay.

``live_session`` is the one place that loads and attaches programs for a command: the
spinner while bcc compiles, the event stream, the owners of the sockets that existed
before (seeded into the kernel from a snapshot of every network namespace, kept as
``KernelSource.seeding``), and detaching everything when the command ends or fails. A
command that also reads the kernel's maps makes its readers from ``KernelSource.program``
inside the session's block, so they are covered too.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from tcptrace.model.events import SocketEvent
from tcptrace.model.filters import EventFilter
from tcptrace.model.workload import Whois
from tcptrace.recording import Recording, clock_offset_ns, open_recording
from tcptrace.system.cgroups import CgroupScope
from tcptrace.system.procfd import fd_access_problem
from tcptrace.system.whois import HostWhois
from tcptrace.views.common import explain_unknown_owners, make_console

if TYPE_CHECKING:  # kernel/ is imported when a live session starts, not for a replay
    from tcptrace.kernel.loader import LoadedProgram
    from tcptrace.kernel.seeds import Seeding
    from tcptrace.kernel.stream import KernelStream
    from tcptrace.system.symbols import StackLines


class Source(Protocol):
    clock_offset_ns: int
    live: bool
    whois: Whois
    """Who owners are in container terms: the host's answer live, the recording's in a replay."""

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
        self.whois: Whois = recording.whois
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
            if self._filter.matches(event, self.recording.cgroup_path):
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
        return {"decoded": self.decoded, "lost": self.recording.lost}

    def close(self) -> None:
        pass


class KernelSource:
    """Events from a live session: a loaded program and the stream of its ring buffer.

    ``scope``: the cgroups of --cgroup/--container, looked for again as the source is polled
    (a container started later joins the kernel's filter)."""

    live = True

    def __init__(
        self, program: LoadedProgram, stream: KernelStream, scope: CgroupScope | None = None
    ) -> None:
        self.program = program
        self.stream = stream
        self.scope = scope
        self.clock_offset_ns = clock_offset_ns()
        self.whois: Whois = HostWhois()
        self.seeding: Seeding | None = None

    def poll(self, timeout_s: float) -> list[SocketEvent]:
        self._refresh_scope()
        return self.stream.poll(max(0, int(timeout_s * 1000)))

    def _refresh_scope(self) -> None:
        """A container of --cgroup/--container started since joins the kernel's filter."""
        if self.scope is not None:
            found = self.scope.refresh()
            if found:
                self.program.add_cgroups(found)

    @property
    def exhausted(self) -> bool:
        return False

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def counters(self) -> dict[str, int]:
        return self.stream.counters()

    def drain(self) -> list[SocketEvent]:
        return self.stream.drain()

    def poll_raw(self, timeout_s: float) -> bytes:
        """The next batch of raw records (kernel/ringbuf.py), for a command that decodes
        them itself (model/raw.py); it reports what it decoded with ``stream.account``."""
        self._refresh_scope()
        return self.stream.poll_raw(max(0, int(timeout_s * 1000)))

    def drain_raw(self) -> bytes:
        return self.stream.drain_raw()

    def close(self) -> None:
        self.program.close()


def seed_note(failed: int) -> str:
    """The line a session prints when owners of sockets found at start did not fit the
    kernel's tables (the agent counts them in its metrics instead).

    >>> seed_note(1200).split(":")[1]
    ' note'
    >>> seed_note(1200).split(":")[2]
    " 1,200 owners of sockets found at start did not fit the kernel's tables"
    """
    return (
        f"tcptrace: note: {failed:,} owners of sockets found at start did not fit the kernel's "
        "tables: their sockets show no owner until a process touches them"
    )


@contextmanager
def live_session(
    parts: Sequence[str],
    flt: EventFilter,
    *,
    stacks: bool = False,
    symbolize: bool = False,
    defines: dict[str, int] | None = None,
    ringbuf_pages: int | None = None,
    quiet: bool = False,
    lines: StackLines | None = None,
    seed: bool = True,
) -> Iterator[KernelSource]:
    """Load ``parts`` of bpf/ (a spinner on stderr while bcc compiles), attach them,
    seed the owners of the sockets that existed before (``seed``), and stream their
    events (``symbolize``: stacks as frames; ``lines``: their source lines located as
    they are symbolized).

    Every program is detached when the block ends, however it ends: a failure while the
    caller sets up its readers, an exception, Ctrl-C. ``quiet``: no spinner.
    """
    from tcptrace.kernel.loader import PARTS, load
    from tcptrace.kernel.seeds import seed_owners
    from tcptrace.kernel.stream import KernelStream

    # Owners read from /proc of other users' processes need capabilities a non-root run
    # may lack: the views then say so, instead of a bare "-".
    explain_unknown_owners(fd_access_problem())
    console = make_console(stderr=True, quiet=quiet)
    scope = CgroupScope(flt) if flt.by_cgroup else None
    with console.status("compiling and attaching BPF programs…"):
        program = load(
            [PARTS[name] for name in parts],
            flt,
            stacks=stacks,
            defines=defines,
            ringbuf_pages=ringbuf_pages,
            cgroup_ids=scope.ids if scope is not None else (),
        )
    try:
        source = KernelSource(program, KernelStream(program, flt, symbolize=symbolize, lines=lines), scope)
        if seed:
            source.seeding = seed_owners(program, flt)
            if source.seeding.planted.failed and not quiet:
                print(seed_note(source.seeding.planted.failed), file=sys.stderr)
    except BaseException:
        program.close()
        raise
    try:
        yield source
    finally:
        source.close()


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
    on_report: Callable[[dict[str, Any]], None] | None = None,
    batch: int = 4096,
    lines: StackLines | None = None,
) -> Iterator[Source]:
    """A recording when --from is given (objects that are not events go to ``on_report``),
    else a live session running ``parts`` of bpf/ (see live_session)."""
    if from_file is None:
        with live_session(
            parts,
            flt,
            stacks=stacks,
            symbolize=stacks,
            defines=defines,
            ringbuf_pages=ringbuf_pages,
            quiet=quiet,
            lines=lines,
        ) as source:
            yield source
        return
    recording = open_recording(from_file)
    recording.on_report = on_report
    replay = RecordingSource(recording, flt, batch=batch)
    try:
        yield replay
    finally:
        replay.close()


def drain_into(source: Source, on_event: Callable[[SocketEvent], None]) -> None:
    """After a live stop, take what the kernel already sent, so the summary counts it."""
    if isinstance(source, KernelSource):
        for event in source.drain():
            on_event(event)
