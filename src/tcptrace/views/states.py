"""`tcptrace states`: one line per transition, and the final summary."""

from __future__ import annotations

import math
import struct
import time
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tcptrace.model.events import AF_INET6, Kind, SocketEvent, TcpState, Transition, decode_comm, format_addr
from tcptrace.model.raw import Frames, RawBatches, RawLayout, Who, remember
from tcptrace.model.states import StatesSummary
from tcptrace.model.workload import NOBODY, Whois, whois_text
from tcptrace.views.common import NS, clock, endpoint, safe, time_cell, time_header

STATE_STYLE = {
    TcpState.CLOSE_WAIT: "bold red",
    TcpState.TIME_WAIT: "yellow",
    TcpState.FIN_WAIT2: "yellow",
    TcpState.ESTABLISHED: "green",
    TcpState.CLOSE: "dim",
}


def column_titles() -> str:
    """The column titles (PREV names its unit under --units ms/us)."""
    return (
        f"{'TIME':<12} {'PID':>7} {'COMM':<15} {'LOCAL':<22} {'REMOTE':<22} {'TRANSITION':<25} "
        f"{time_header('PREV'):>8}"
    )


HEADER = column_titles()


def transition_line(event: Transition, offset_ns: int, whois: Whois = NOBODY) -> Text:
    """One row: time, owner pid and comm, local and remote endpoints, OLD -> NEW, time in OLD,
    then, where known, the owner's container, pod or unit, its pid in its own pid namespace,
    and the socket's network namespace when it is not the host's."""
    pid = str(event.pid) if event.pid is not None else "-"
    text = Text()
    text.append(f"{clock(event.ts_ns, offset_ns):<12} {pid:>7} {safe(event.comm)[:15]:<15} ")
    text.append(f"{endpoint(event.saddr, event.sport, event.family):<22} ")
    text.append(f"{endpoint(event.daddr, event.dport, event.family):<22} ")
    text.append(event.old.name, style=STATE_STYLE.get(event.old, ""))
    text.append(" -> ")
    text.append(event.new.name, style=STATE_STYLE.get(event.new, ""))
    text.append(" " * max(1, 25 - len(event.old.name) - len(event.new.name) - 4))
    text.append(f"{time_cell(event.prev_ns):>8}")
    where = whois_text(whois, event.pid, event.cgroup, event.netns)
    if where is not None:
        text.append(f"  [{safe(where)}]", style="dim")
    return text


def stack_lines(event: SocketEvent) -> list[Text]:
    return frame_lines(event.kstack, event.ustack)


def frame_lines(kstack: tuple[str, ...], ustack: tuple[str, ...]) -> list[Text]:
    """The lines under a transition with --stacks: kernel frames, then ``--`` and user frames."""
    lines = [Text(f"    {safe(frame)}", style="dim") for frame in kstack]
    if ustack:
        lines.append(Text("    --", style="dim"))
        lines.extend(Text(f"    {safe(frame)}", style="cyan") for frame in ustack)
    return lines


def print_event(console: Console, event: SocketEvent, offset_ns: int, whois: Whois = NOBODY) -> None:
    if isinstance(event, Transition):
        console.print(transition_line(event, offset_ns, whois), soft_wrap=True)
        for line in stack_lines(event):
            console.print(line, soft_wrap=True)


def print_lost(console: Console, new: int, total: int) -> None:
    """A warning line in the stream: the kernel could not hand over ``new`` more events."""
    console.print(
        Text(
            f"!! {new} events lost (ring buffer full; {total} in all): narrow the filters or raise --buffer",
            style="bold red",
        ),
        soft_wrap=True,
    )


def _size(n: int) -> str:
    """``812 B``, ``3.4 MB``: a file's size, in powers of 1000 as `ls -h --si` shows it."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def record_progress(events: int, lost: int, size: int) -> Text:
    """`record`'s live line on a terminal: events written, lost so far, file size."""
    text = Text(f"recording: {events:,} events, ")
    text.append(f"{lost:,} lost", style="bold red" if lost else "")
    text.append(f", {_size(size)} (Ctrl-C stops)")
    return text


def record_done(path: str, events: int, lost: int, size: int, skipped: int = 0, unseen: int = 0) -> str:
    """`record`'s last line: what the file holds and what the kernel could not hand over,
    or did not see (the counters states' summary names too).

    >>> record_done("x.jsonl", 1200, 0, 5000)
    'recorded 1,200 events to x.jsonl (5.0 kB), 0 lost'
    >>> record_done("x.jsonl", 1200, 3, 5000, skipped=2, unseen=1)  # doctest: +NORMALIZE_WHITESPACE
    'recorded 1,200 events to x.jsonl (5.0 kB), 3 lost (the ring buffer was full: raise --buffer
    or narrow the filters), 2 transition hook runs skipped by the kernel, 1 socket whose last
    transitions went unseen'
    """
    line = f"recorded {events:,} events to {safe(path)} ({_size(size)}), {lost:,} lost"
    if lost:
        line += " (the ring buffer was full: raise --buffer or narrow the filters)"
    return "".join([line, *(f", {note}" for note in unseen_notes(skipped, unseen))])


def unseen_notes(skipped: int, unseen: int) -> list[str]:
    """What the kernel did not see, as `states`' summary and `record`'s last line say it:
    runs of the transition programs it skipped, and sockets whose last transitions went
    unseen (``unseen_end``).

    >>> unseen_notes(0, 0), unseen_notes(1200, 1)
    ([], ['1,200 transition hook runs skipped by the kernel', '1 socket whose last transitions went unseen'])
    """
    notes = []
    if skipped:
        notes.append(f"{skipped:,} transition hook runs skipped by the kernel")
    if unseen:
        notes.append(f"{unseen:,} socket{'s' if unseen != 1 else ''} whose last transitions went unseen")
    return notes


def print_summary(console: Console, summary: StatesSummary, counters: dict[str, Any], reason: str) -> None:
    lost = int(counters.get("lost", 0))
    console.print()
    head = Text(f"{summary.events} events")
    head.append(f", {lost} lost", style="bold red" if lost else "")
    skipped = int(counters.get("skipped_transitions") or 0)
    for note in unseen_notes(skipped, int(counters.get("unseen_end") or 0)):
        head.append(f", {note}", style="bold yellow")
    head.append(f" (stopped: {reason})")
    console.print(head)
    if not summary.transitions:
        return
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    table.add_column("transition")
    table.add_column("count", justify="right")
    for (old, new), count in summary.transitions.most_common():
        table.add_row(Text(f"{old.name} -> {new.name}"), Text(str(count)))
    console.print(table)


class TransitionRows(RawBatches):
    """Raw batches (kernel/ringbuf.py) to the text `states` prints, byte for byte what
    print_event prints through ``console`` (styles included on a terminal), without an
    event object or a rich render per line: the styled pieces are rendered by ``console``
    once and cached (model/raw.py does the same for --json). ``frames``: --stacks.

    ``whois`` names owners in container terms after the row, as print_event does; its
    answers are asked once per batch for each (pid, cgroup, netns) (a batch is a few ms
    of events: a live Whois would answer the same for all of them).
    """

    def __init__(
        self,
        layout: RawLayout,
        console: Console,
        offset_ns: int,
        frames: Frames | None = None,
        whois: Whois = NOBODY,
    ) -> None:
        super().__init__(layout)
        self._console = console
        self._offset_ns = offset_ns
        self._frames = frames
        self._whois = whois
        self._more = struct.Struct(layout.sub_format("more"))
        self._owners: dict[
            tuple[bytes, bytes, bytes], tuple[str, tuple[int | None, int | None, int | None]]
        ] = {}
        self._where: dict[tuple[int | None, int | None, int | None], str] = {}
        self._where_text: dict[str, str] = {}
        self._endpoints: dict[bytes, str] = {}
        self._seconds: dict[int, str] = {}
        self._stacks: dict[tuple[int, int, int], str] = {}

    def _render(self, *texts: Text) -> str:
        with self._console.capture() as captured:
            for text in texts:
                self._console.print(text, soft_wrap=True)
        return captured.get()

    def _describe(self, kind: int, old: int, new: int, op: int) -> tuple[Any, ...]:
        head = super()._describe(kind, old, new, op)
        if kind != Kind.TRANSITION:
            return (*head, None)  # counted, not shown
        o, n = TcpState(old), TcpState(new)
        text = Text()
        text.append(o.name, style=STATE_STYLE.get(o, ""))
        text.append(" -> ")
        text.append(n.name, style=STATE_STYLE.get(n, ""))
        text.append(" " * max(1, 25 - len(o.name) - len(n.name) - 4))
        return (*head, self._render(text)[:-1])  # without the newline print adds

    def _owner_text(self, key: tuple[bytes, bytes, bytes]) -> tuple[str, Who]:
        """The pid and comm columns, and the (pid, cgroup, netns) whois is asked about."""
        ids, comms, more = key
        owner = self._ids.unpack(ids)[2]
        _flags, netns, cgroup, _start = self._more.unpack(more)
        comm = decode_comm(comms[len(comms) // 2 :]) if owner else None
        pid = str(owner) if owner else "-"
        return remember(
            self._owners,
            key,
            (f"{pid:>7} {safe(comm)[:15]:<15} ", (owner or None, cgroup or None, netns or None)),
        )

    def _where_of(self, who: Who) -> str:
        """What follows the row for an owner: ``  [container ...]``, dim, or nothing."""
        where = whois_text(self._whois, *who)
        if where is None:
            text = ""
        else:
            text = self._where_text.get(where) or remember(
                self._where_text, where, self._render(Text(f"  [{safe(where)}]", style="dim"))[:-1]
            )
        self._where[who] = text
        return text

    def _endpoint_text(self, raw: bytes) -> str:
        saddr, daddr, sport, dport, family = self._endpoint.unpack(raw)
        version = 6 if family == AF_INET6 else 4
        local = endpoint(format_addr(saddr, family), sport, version)
        remote = endpoint(format_addr(daddr, family), dport, version)
        return remember(self._endpoints, raw, f"{local:<22} {remote:<22} ")

    def _clock(self, ts: int) -> str:
        wall = (ts + self._offset_ns) / NS
        second = math.floor(wall)
        hms = self._seconds.get(second)
        if hms is None:
            hms = remember(self._seconds, second, time.strftime("%H:%M:%S", time.localtime(wall)))
        return f"{hms}.{int(wall * 1000) % 1000:03d}"

    def _stack_text(self, kstack: int, ustack: int, ids: bytes) -> str:
        assert self._frames is not None
        pid = self._ids.unpack(ids)[0] if ustack >= 0 else -1
        key = (kstack, ustack, pid)
        text = self._stacks.get(key)
        if text is None:
            lines = frame_lines(self._frames(kstack, None), self._frames(ustack, pid))
            text = remember(self._stacks, key, self._render(*lines) if lines else "")
        return text

    def clear_stacks(self) -> None:
        """Forget the rendered stacks (the stack map was emptied: its ids will be reused)."""
        self._stacks.clear()

    def feed(self, batch: bytes, deadline: int | None = None) -> tuple[str, bool]:
        """The lines of a batch's transitions (see RawBatches.feed); other kinds are
        counted, not shown, as print_event shows them."""
        out: list[str] = []
        append = out.append
        kos_cache, endpoints, owners = self._kos, self._endpoints, self._owners
        symbolize = self._frames is not None
        wheres = self._where
        wheres.clear()  # whois asked again each batch
        events = malformed = 0
        first, last = self.first_ts_ns, self.last_ts_ns
        cut = False
        # The loop's head (unpack, kind and states, malformed, deadline) is model/raw.JsonLines.feed's
        # too, written out in each: shared through a generator it would cost ~0.1 us an event.
        for (
            _length,
            ts,
            _skaddr,
            value,
            _sk_flags,
            ids,
            kstack,
            ustack,
            _ret,
            raw_endpoint,
            kos,
            comms,
            _aux,
            more,
        ) in self._format.iter_unpack(batch):
            entry = kos_cache.get(kos)
            if entry is None:
                entry = self._entry(kos)
            if not entry:
                malformed += 1
                continue
            if deadline is not None and ts > deadline:
                cut = True
                break
            entry[1] += 1
            if first is None:
                first = ts
            last = ts
            events += 1
            states = entry[4]
            if states is None:
                continue
            key = (ids, comms, more)
            found = owners.get(key)
            if found is None:
                found = self._owner_text(key)
            where = wheres.get(found[1])
            if where is None:
                where = self._where_of(found[1])
            ep = endpoints.get(raw_endpoint)
            if ep is None:
                ep = self._endpoint_text(raw_endpoint)
            append(f"{self._clock(ts):<12} {found[0]}{ep}{states}{time_cell(value or None):>8}{where}\n")
            if symbolize and (kstack >= 0 or ustack >= 0):
                append(self._stack_text(kstack, ustack, ids))
        self.events += events
        self.malformed += malformed
        self.first_ts_ns, self.last_ts_ns = first, last
        return "".join(out), cut
