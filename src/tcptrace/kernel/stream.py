"""Poll the ring buffer, decode events into model events, symbolize stacks, count losses."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence

from tcptrace.errors import CompileError
from tcptrace.kernel.loader import LoadedProgram
from tcptrace.kernel.ringbuf import open_reader
from tcptrace.model.events import DecodeError, SocketEvent, from_raw
from tcptrace.model.filters import EventFilter
from tcptrace.model.frames import without_tracer_frames
from tcptrace.model.raw import HEADER, LayoutError, RawLayout
from tcptrace.system.symbols import StackLines

MAX_FRAMES = 64


class Symbolizer:
    """Stack ids to frame strings, innermost first, with a bounded cache.

    Kernel frames look like ``tcp_close+0x2a [kernel]``, without the tracer's own (its BPF
    program and the tracepoint machinery that ran it); user frames like
    ``handle_conn+0x4f [server]``. bcc reads /tmp/perf-PID.map for JIT runtimes (Node.js
    --perf-basic-prof, Python -X perf) when a process has one. With ``lines``, each user
    stack's frames are also located for their source lines while the process lives
    (``lines.annotate`` adds them when the stack is shown).
    """

    def __init__(
        self,
        program: LoadedProgram,
        capacity: int = 4096,
        lines: StackLines | None = None,
        addresses: int = 65536,
    ) -> None:
        self.lines = lines
        self._bpf = program.bpf
        self._stacks = program.bpf[b"stacks"] if program.stacks else None
        self._cache: OrderedDict[tuple[int, int], tuple[str, ...]] = OrderedDict()
        self._capacity = capacity
        # Frames by (address, pid; -1 kernel): distinct stacks share most of their frames
        # (a program without frame pointers yields a new stack id per call, all of them
        # the same few addresses and garbage), and bcc's lookup costs ~10 us a frame.
        self._names: dict[tuple[int, int], str] = {}
        self._addresses = addresses

    def frames(self, stack_id: int, pid: int | None) -> tuple[str, ...]:
        """Frames of a kernel stack (pid None) or of a user stack of ``pid``."""
        if self._stacks is None or stack_id < 0:
            return ()
        key = (stack_id, -1 if pid is None else pid)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            # The entry's addresses at once (bcc's walk() costs a Python call a frame).
            ips = self._stacks[self._stacks.Key(stack_id)].ip[:MAX_FRAMES]
        except KeyError:
            return ()
        addrs = ips[: ips.index(0)] if 0 in ips else ips
        frames = self._with_lines(addrs, tuple(self._frame(a, pid) for a in addrs), pid)
        self._cache[key] = frames
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return frames

    def _with_lines(self, addrs: Sequence[int], frames: tuple[str, ...], pid: int | None) -> tuple[str, ...]:
        """A kernel stack without the tracer's frames; a user stack located for its lines."""
        if pid is None:
            return without_tracer_frames(frames)
        if self.lines is not None:
            self.lines.remember(pid, addrs, frames)
        return frames

    def _frame(self, address: int, pid: int | None) -> str:
        key = (address, -1 if pid is None else pid)
        name = self._names.get(key)
        if name is None:
            if pid is None:
                name = self._name(self._bpf.ksym(address, show_module=True, show_offset=True))
            else:
                name = self._name(self._bpf.sym(address, pid, show_module=True, show_offset=True))
            if len(self._names) >= self._addresses:
                self._names.clear()
            self._names[key] = name
        return name

    def clear(self) -> None:
        """Forget every cached stack (after the stack map was emptied: its ids get reused)."""
        self._cache.clear()

    def forget(self, pids: set[int]) -> None:
        """Forget the user stacks of these processes (they exited: their pids get reused)."""
        for key in [k for k in self._cache if k[1] in pids]:
            del self._cache[key]

    @staticmethod
    def _name(raw: bytes | str) -> str:
        return raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else raw


class KernelStream:
    """Decoded events from a loaded program's ring buffer.

    ``poll()`` returns what arrived as model events; ``poll_raw()`` the same as a batch of
    raw records (kernel/ringbuf.py) for the commands that turn records straight into text
    (model/raw.py). ``counters()`` joins the kernel's exact counters with what this side
    decoded, so a loss is always visible.
    """

    def __init__(
        self,
        program: LoadedProgram,
        flt: EventFilter | None = None,
        symbolize: bool = False,
        lines: StackLines | None = None,
    ) -> None:
        self.program = program
        self._filter = flt or EventFilter()
        self._symbolizer = Symbolizer(program, lines=lines) if symbolize and program.stacks else None
        self.decoded = 0
        self._malformed = 0
        self._event_type = program.event_type
        try:
            self.layout = RawLayout.of(program.event_type)
            self.layout.record_format()
        except LayoutError as exc:
            raise CompileError(f"{exc}: bpf/tcptrace.h and this tcptrace's decoders disagree") from None
        table = program.bpf[b"events"]
        self.buffer_bytes = int(table.max_entries)
        self._reader = open_reader(program.bpf, b"events", program.event_size, self.buffer_bytes)
        program.on_close(self._reader.close)

    @property
    def malformed(self) -> int:
        return self._malformed + self._reader.malformed

    @property
    def frames(self) -> Callable[[int, int | None], tuple[str, ...]] | None:
        """The symbolizer's frames of a stack id (None when stacks are not symbolized)."""
        return None if self._symbolizer is None else self._symbolizer.frames

    def poll_raw(self, timeout_ms: int = 100) -> bytes:
        """The next batch of raw records, waiting up to ``timeout_ms`` for one."""
        return self._reader.read(timeout_ms / 1000)

    def drain_raw(self) -> bytes:
        """Whatever raw records are in the ring buffer, without waiting."""
        return self._reader.drain()

    def account(self, decoded: int, malformed: int) -> None:
        """Count what a caller of poll_raw() decoded itself."""
        self.decoded += decoded
        self._malformed += malformed

    def decode(self, batch: bytes) -> list[SocketEvent]:
        """A raw batch as model events (from_raw; symbolized when asked), counted."""
        out: list[SocketEvent] = []
        from_buffer = self._event_type.from_buffer_copy
        for offset in range(0, len(batch), self.layout.stride):
            try:
                event = from_raw(from_buffer(batch, offset + HEADER))
            except DecodeError:
                self._malformed += 1
                continue
            self.decoded += 1
            if self._symbolizer is not None:
                event = self._symbolized(event)
            out.append(event)
        return out

    def _symbolized(self, event: SocketEvent) -> SocketEvent:
        assert self._symbolizer is not None
        kstack = self._symbolizer.frames(event.kstack_id, None)
        # A user stack belongs to the task the event ran in (only taken in process context).
        ustack = self._symbolizer.frames(event.ustack_id, event.task_pid)
        if not kstack and not ustack:
            return event
        return dataclasses.replace(event, kstack=kstack, ustack=ustack)

    def poll(self, timeout_ms: int = 100) -> list[SocketEvent]:
        return self.decode(self.poll_raw(timeout_ms))

    def drain(self) -> list[SocketEvent]:
        """Whatever is still in the ring buffer, without waiting."""
        return self.decode(self.drain_raw())

    def counters(self) -> dict[str, int]:
        """The kernel's exact counters, what this side decoded, and the runs of the
        transition hooks the kernel skipped (when it says)."""
        kernel = self.program.counters()
        out = {**kernel, "decoded": self.decoded, "malformed": self.malformed}
        skipped = self.program.skipped_transitions()
        if skipped is not None:
            out["skipped_transitions"] = skipped
        return out
