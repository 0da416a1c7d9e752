"""Raw ring-buffer records straight to the text `states --json` and `record` write.

The dataclass path (``from_raw`` -> ``to_json`` -> ``json.dumps``, one flushed line per
event) costs 10-24 us an event (bench/decode_cost.py, docs/benchmarks.md); a stream of
50,000 transitions a second needs far less. This
module takes a *batch* (records framed as in the ring buffer, kernel/ringbuf.py), unpacks
it with one ``struct.iter_unpack`` and writes each event's JSON line from cached pieces:
the endpoint part (family, addresses, ports), the owner-and-task part, the kind-and-states
part and the stacks' text each depend on a few raw bytes, which key their cache; only the
timestamp, the socket address and a few numbers are formatted per event. No event object
is made.

The text is byte for byte what the dataclass path writes for the same records, malformed
records (an unknown kind, state or op) skipped and counted alike: tests/unit/test_raw.py
checks it on every recording of tests/data and on generated records.

The layout comes from the ctypes structure bcc derives from bpf/tcptrace.h (``RawLayout.of``),
never restated: the fields are read in groups of adjacent members, and a layout whose
groups are not adjacent is refused at start.
"""

from __future__ import annotations

import ctypes
import json
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from tcptrace.model.events import (
    AF_INET6,
    TW_FLAG_BOUND,
    TW_HOW,
    CloseFlag,
    Kind,
    Op,
    TcpState,
    TwWhat,
    decode_comm,
    format_addr,
)
from tcptrace.model.states import StatesSummary

HEADER = 8
"""Bytes of a ring buffer record's header (its length, then a page offset)."""

# What the decoders unpack of struct tt_event, in the order of the tuples they get: single
# members as numbers, and groups of adjacent members as one value each (raw bytes, or for
# the four one-byte codes one 32-bit number), so that one value keys a cache.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ts", ("ts_ns",)),
    ("skaddr", ("skaddr",)),
    ("value", ("value_ns",)),
    ("sk_flags", ("sk_flags",)),
    ("ids", ("task_tgid", "task_pid", "owner_tgid")),
    ("kstack", ("kstack",)),
    ("ustack", ("ustack",)),
    ("ret", ("ret",)),
    ("endpoint", ("saddr", "daddr", "sport", "dport", "family")),
    ("kos", ("kind", "oldstate", "newstate", "op")),
    ("comms", ("task_comm", "owner_comm")),
    ("aux", ("aux_ns",)),
    ("more", ("flags", "netns", "owner_cgroup", "owner_start_ns")),
)
_NUMBER_GROUPS = {"kos": "I"}
PADDING = frozenset({"pad"})
"""Members no decoder reads (and bcc's own ``__pad_N`` for alignment); any other member of
struct tt_event must be in GROUPS (a new field the hot path did not write would silently
differ from the dataclass path)."""

CACHE_LIMIT = 65536
"""Entries a piece cache holds before it starts afresh (bounds memory under churn)."""
MAX_STACK_REFS = 65536
"""Distinct stacks a recording names by id; more are written in full where they occur."""


K = TypeVar("K")
V = TypeVar("V")


def remember(cache: dict[K, V], key: K, value: V) -> V:
    """Keep ``value`` under ``key`` in a piece cache, which starts afresh when full (under
    churn most entries are of connections long gone); returns ``value``."""
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


class LayoutError(ValueError):
    """struct tt_event is not laid out as the decoders read it."""


@dataclass(frozen=True)
class RawLayout:
    """Where the members of struct tt_event lie: name -> (offset, size, struct code)."""

    members: dict[str, tuple[int, int, str]]
    size: int

    @classmethod
    def of(cls, struct_type: type[ctypes.Structure]) -> RawLayout:
        """The layout of a ctypes structure (bcc's ``Leaf`` of the ``event_layout`` map)."""
        members: dict[str, tuple[int, int, str]] = {}
        for name, ctype, *_ in struct_type._fields_:
            descr = getattr(struct_type, name)
            code = getattr(ctype, "_type_", None)
            if isinstance(code, str) and ctypes.sizeof(ctype) in (1, 2, 4, 8):
                letter = {1: "b", 2: "h", 4: "i", 8: "q"}[ctypes.sizeof(ctype)]
                code = letter if code.islower() else letter.upper()
            else:
                code = "s"
            members[name] = (descr.offset, descr.size, code)
        return cls(members, ctypes.sizeof(struct_type))

    @property
    def stride(self) -> int:
        """Bytes of one record in a batch: the header, the event, padding to 8."""
        return HEADER + ((self.size + 7) & ~7)

    def group(self, names: tuple[str, ...]) -> tuple[int, int]:
        """(offset, length) of adjacent members ``names``; LayoutError when they are not."""
        try:
            spans = [self.members[name][:2] for name in names]
        except KeyError as exc:
            raise LayoutError(f"struct tt_event has no member {exc.args[0]}") from None
        for (offset, size), (following, _), name in zip(spans, spans[1:], names[1:], strict=False):
            if offset + size != following:
                raise LayoutError(f"{name} does not follow {names[0]}.. without a gap in struct tt_event")
        return spans[0][0], spans[-1][0] + spans[-1][1] - spans[0][0]

    def record_format(self) -> str:
        """The ``struct`` format of one framed record, yielding the header's length, then
        one value per entry of GROUPS. LayoutError when the layout does not allow it."""
        parts = ["=I4x"]
        pos, before = 0, ""
        for name, names in GROUPS:
            start, length = self.group(names)
            if start < pos:
                raise LayoutError(
                    f"{names[0]} lies before {before} in struct tt_event: the decoders read them in turn"
                )
            if start > pos:
                parts.append(f"{start - pos}x")
            if len(names) == 1:
                parts.append(self.members[names[0]][2])
            elif name in _NUMBER_GROUPS:
                if length != struct.calcsize("=" + _NUMBER_GROUPS[name]):
                    raise LayoutError(f"{'..'.join(names[:: len(names) - 1])} are not one 32-bit number")
                parts.append(_NUMBER_GROUPS[name])
            else:
                parts.append(f"{length}s")
            pos, before = start + length, names[-1]
        tail = self.stride - HEADER - pos
        if tail:
            parts.append(f"{tail}x")
        read = {n for _, names in GROUPS for n in names}
        unread = {m for m in self.members if m not in read and m not in PADDING and not m.startswith("__pad")}
        if unread:
            raise LayoutError(
                f"struct tt_event has members the decoders do not read: {', '.join(sorted(unread))}"
            )
        fmt = "".join(parts)
        if struct.calcsize(fmt) != self.stride:
            raise LayoutError("struct tt_event's members overlap")
        return fmt

    def sub_format(self, group: str) -> str:
        """The ``struct`` format of a group's raw bytes, one value per member."""
        names = dict(GROUPS)[group]
        return "=" + "".join(
            f"{self.members[n][1]}s" if self.members[n][2] == "s" else self.members[n][2] for n in names
        )


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


Frames = Callable[[int, "int | None"], tuple[str, ...]]
"""A stack id (and for a user stack the pid whose it is) to its frames, as
kernel/stream.py's Symbolizer.frames."""
Who = tuple["int | None", "int | None", "int | None"]
"""Who an event names: (cgroup, pid, pid_start_ns) for the JSON's names, (pid, cgroup,
netns) for the table's; None where not known."""
Names = Callable[["int | None", "int | None", "int | None"], None]
"""Called before each event with its (cgroup, pid, pid_start_ns), as
recording.WhoisLines.name: writes the lines naming them the first time (through
``JsonLines.write``)."""


# The kind-and-states part of an event, keyed by the 32-bit (kind, old, new, op) value.
# [kind, count, old, new, *texts]: old/new are TcpStates for transitions (for the
# summary); the texts are what a subclass writes for the kind, op and states.
_Entry = list[Any]
_INVALID: _Entry = []


class RawBatches:
    """What every raw-batch decoder shares: the layout, the counts of the summary, and the
    cache of the kind-and-states part."""

    def __init__(self, layout: RawLayout) -> None:
        self.layout = layout
        self._format = struct.Struct(layout.record_format())
        self._ids = struct.Struct(layout.sub_format("ids"))
        self._endpoint = struct.Struct(layout.sub_format("endpoint"))
        self._kos_bytes = struct.Struct("=I")
        self._kos: dict[int, _Entry] = {}
        self._spent: Counter[tuple[TcpState, TcpState]] = Counter()  # counts of dropped entries
        self.events = 0
        self.malformed = 0
        self.first_ts_ns: int | None = None
        self.last_ts_ns: int | None = None

    def _entry(self, kos: int) -> _Entry:
        """The cache entry of a (kind, old, new, op) value, or _INVALID when the dataclass
        path (from_raw) would refuse it."""
        if len(self._kos) >= CACHE_LIMIT:
            self._spent.update(self._transitions(self._kos.values()))
            self._kos.clear()
        kind, old, new, op = self._kos_bytes.pack(kos)
        try:
            entry = [kind, 0, *self._describe(kind, old, new, op)]
        except ValueError:
            entry = _INVALID
        self._kos[kos] = entry
        return entry

    def _describe(self, kind: int, old: int, new: int, op: int) -> tuple[Any, ...]:
        """[old, new, texts...] of a valid value (what a subclass keeps for it); ValueError
        when from_raw would refuse it."""
        if kind == Kind.TRANSITION:
            return TcpState(old), TcpState(new)
        if kind == Kind.TOUCH:
            Op(op)
        elif kind == Kind.CLOSE:
            Op(op)
            if old:
                TcpState(old)
        elif kind == Kind.TIMEWAIT:
            what = TwWhat(op)
            if new:
                TcpState(new)
            if old and what in _TW_STATES:
                TcpState(old)
        else:
            raise ValueError(kind)
        return None, None

    def feed(self, batch: bytes, deadline: int | None = None) -> tuple[str, bool]:
        """The text of a batch's events, and whether one was past ``deadline`` (that event
        and the later ones are then left out, as session.run stops at it)."""
        raise NotImplementedError

    def summary(self) -> StatesSummary:
        """What the events decoded so far add up to, as `states` sums them up."""
        out = StatesSummary(events=self.events, first_ts_ns=self.first_ts_ns, last_ts_ns=self.last_ts_ns)
        # In the order the dataclass path inserts them, each pair's first event's: entries
        # are made at a value's first event, and dropped ones came before the others.
        transitions = self._spent + self._transitions(self._kos.values())
        for pair, count in transitions.items():
            out.transitions[pair] += count
            out.entered[pair[1]] += count
        return out

    @staticmethod
    def _transitions(entries: Iterable[_Entry]) -> Counter[tuple[TcpState, TcpState]]:
        out: Counter[tuple[TcpState, TcpState]] = Counter()
        for entry in entries:
            if entry and entry[0] == Kind.TRANSITION and entry[1]:
                out[(entry[2], entry[3])] += entry[1]
        return out


_TW_STATES = (TwWhat.CREATED, TwWhat.CONVERTED, TwWhat.PARKED_ENDED, TwWhat.KILLED)
_FLAGS_JSON = tuple(_dumps([m.name for m in CloseFlag if m in CloseFlag(v)]) for v in range(8))
_HOW_JSON = {value: _dumps(name) for value, name in TW_HOW.items()}
_BOUND_JSON = (',"port_bound":false', ',"port_bound":true')
_NO_STACKS = '"kstack":[],"ustack":[],'


class JsonLines(RawBatches):
    """Raw batches to JSON lines, as ``to_json`` and ``JsonLinesWriter`` write them.

    ``frames``: symbolize stacks (else ``[]``, as an unsymbolized stream has them).
    ``stack_refs``: write each distinct non-empty stack once, as a ``{"type":"stack",
    "id":N,"frames":[...]}`` line before the first event that uses it, and the event's
    ``kstack``/``ustack`` as the id N (recording.JsonLinesWriter(stack_refs=True)).
    ``names``: what names an event's cgroup and owner first (recording.WhoisLines); its lines
    go through ``write`` into the batch's text, in the order the dataclass path writes them.
    """

    def __init__(
        self,
        layout: RawLayout,
        frames: Frames | None = None,
        stack_refs: bool = False,
        names: Names | None = None,
    ) -> None:
        super().__init__(layout)
        self._frames = frames
        self.names = names
        self._out: list[str] = []
        self._stack_refs = stack_refs
        self._refs: dict[tuple[str, ...], int] = {}
        self._stack_text: dict[tuple[int, int], str] = {}
        self._endpoints: dict[bytes, str] = {}
        self._who: dict[
            tuple[bytes, bytes, bytes], tuple[str, tuple[int | None, int | None, int | None]]
        ] = {}
        self._comms: dict[bytes, str] = {}
        self._more = struct.Struct(layout.sub_format("more"))

    def _describe(self, kind: int, old: int, new: int, op: int) -> tuple[Any, ...]:
        head = super()._describe(kind, old, new, op)
        state = ""
        if kind == Kind.TRANSITION:
            text = f'"old":"{TcpState(old).name}","new":"{TcpState(new).name}","prev_ns":'
        elif kind == Kind.TOUCH:
            text = f'"op":"{Op(op).name}","ret":'
        elif kind == Kind.CLOSE:
            text = f'"op":"{Op(op).name}","duration_ns":'
            state = f'"state":"{TcpState(old).name}",' if old else '"state":null,'
        else:
            what = TwWhat(op)
            sub = f'"{TcpState(new).name}"' if new else "null"
            created = f'"{TcpState(old).name}"' if old and what in _TW_STATES else "null"
            text = f'"what":"{what.name}","substate":{sub},"created_as":{created},"age_ns":'
            state = "tw" if what in _TW_STATES else ""  # a tw's event says whether its port was bound
        return (*head, text, state)

    def _endpoint_text(self, raw: bytes) -> str:
        # Once a connection side (its ports are new): an address's text is digits, hex,
        # dots and colons, which JSON writes as they are (json.dumps would cost ~1.5 us).
        saddr, daddr, sport, dport, family = self._endpoint.unpack(raw)
        text = (
            f'"family":{6 if family == AF_INET6 else 4},'
            f'"saddr":"{format_addr(saddr, family)}","sport":{sport},'
            f'"daddr":"{format_addr(daddr, family)}","dport":{dport}'
        )
        return remember(self._endpoints, raw, text)

    def _who_text(self, key: tuple[bytes, bytes, bytes]) -> tuple[str, Who]:
        """The owner, task, cgroup, namespace and owner's start part, and the (cgroup, pid,
        start) the names are written for (the CLOSE flags are in the key: they share the raw
        bytes; 0 for every other kind)."""
        ids, comms, more = key
        task_tgid, task_pid, owner = self._ids.unpack(ids)
        _flags, netns, cgroup, start = self._more.unpack(more)
        half = len(comms) // 2
        comm = self._comm(comms[half:]) if owner else "null"
        text = (
            f'"pid":{owner or "null"},"comm":{comm},"task_pid":{task_tgid},"task_tid":{task_pid},'
            f'"task_comm":{self._comm(comms[:half])}'
        )
        if cgroup:
            text += f',"cgroup":{cgroup}'
        if netns:
            text += f',"netns":{netns}'
        if owner and start:
            text += f',"pid_start_ns":{start}'
        named = (cgroup or None, owner or None, (start or None) if owner else None)
        return remember(self._who, key, (text, named))

    def write(self, text: str) -> None:
        """A line into the text of the batch being fed (the ``names`` lines)."""
        self._out.append(text)

    def flush(self) -> None:
        pass

    def _comm(self, raw: bytes) -> str:
        """A comm's JSON text (the owner part misses whenever softirq ran in a new task;
        its comm is one of few)."""
        text = self._comms.get(raw)
        if text is None:
            text = remember(self._comms, raw, _dumps(decode_comm(raw)))
        return text

    def _stacks(self, kstack: int, ustack: int, ids: bytes, out: list[str]) -> str:
        """The ``"kstack":...,"ustack":...,`` part of an event; a stack line first into
        ``out`` for each stack a recording names for the first time."""
        return f'"kstack":{self._stack(kstack, None, out)},"ustack":{self._stack(ustack, ids, out)},'

    def _stack(self, stack_id: int, ids: bytes | None, out: list[str]) -> str:
        """One stack's text: a kernel stack (``ids`` None), or a user stack of the task in
        ``ids``; ``[]`` for a negative id (not taken, or the stack map was full)."""
        if stack_id < 0:
            return "[]"
        pid = -1 if ids is None else self._ids.unpack(ids)[0]
        text = self._stack_text.get((stack_id, pid))
        if text is None:
            assert self._frames is not None
            frames = self._frames(stack_id, None if ids is None else pid)
            text = self._one_stack((stack_id, pid), frames, out)
        return text

    def _one_stack(self, key: tuple[int, int], frames: tuple[str, ...], out: list[str]) -> str:
        if not frames:
            text = "[]"
        elif not self._stack_refs:
            text = _dumps(list(frames))
        else:
            ref = self._refs.get(frames)
            if ref is None and len(self._refs) < MAX_STACK_REFS:
                ref = self._refs[frames] = len(self._refs)
                out.append(f'{{"type":"stack","id":{ref},"frames":{_dumps(list(frames))}}}\n')
            text = _dumps(list(frames)) if ref is None else str(ref)
        return remember(self._stack_text, key, text)

    def clear_stacks(self) -> None:
        """Forget the stack texts (the stack map was emptied: its ids will be reused)."""
        self._stack_text.clear()

    def feed(self, batch: bytes, deadline: int | None = None) -> tuple[str, bool]:
        """The JSON lines of a batch's events (see RawBatches.feed)."""
        out = self._out = []
        append = out.append
        kos_cache, endpoints, who = self._kos, self._endpoints, self._who
        symbolize = self._frames is not None
        names = self.names
        named: Who | None = None
        events = malformed = 0
        first = self.first_ts_ns
        last = self.last_ts_ns
        cut = False
        # The loop's head (unpack, kind and states, malformed, deadline) is views/states.TransitionRows.feed's
        # too, written out in each: shared through a generator it would cost ~0.1 us an event.
        for (
            _length,
            ts,
            skaddr,
            value,
            sk_flags,
            ids,
            kstack,
            ustack,
            ret,
            endpoint,
            kos,
            comms,
            aux,
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
            ep = endpoints.get(endpoint)
            if ep is None:
                ep = self._endpoint_text(endpoint)
            key = (ids, comms, more)
            found = who.get(key)
            if found is None:
                found = self._who_text(key)
            owner = found[0]
            # Touching the names of the owner the last event had again changes nothing.
            if names is not None and found[1] != named:
                named = found[1]
                names(*named)
            if symbolize and (kstack >= 0 or ustack >= 0):
                stacks = self._stacks(kstack, ustack, ids, out)
            else:
                stacks = _NO_STACKS
            kind = entry[0]
            entry[1] += 1
            if kind == 1:  # Kind.TRANSITION
                append(
                    f'{{"type":"transition","ts_ns":{ts},"skaddr":"0x{skaddr:x}",{ep},{owner},{stacks}'
                    f'{entry[4]}{value or "null"},"sk_flags":{sk_flags}}}\n'
                )
            elif kind == 2:  # Kind.TOUCH
                append(
                    f'{{"type":"touch","ts_ns":{ts},"skaddr":"0x{skaddr:x}",{ep},{owner},{stacks}'
                    f"{entry[4]}{ret}}}\n"
                )
            elif kind == 3:  # Kind.TIMEWAIT
                bound = ""
                if entry[5]:
                    bound = _BOUND_JSON[self._more.unpack(more)[0] & TW_FLAG_BOUND]
                append(
                    f'{{"type":"timewait","ts_ns":{ts},"skaddr":"0x{skaddr:x}",{ep},{owner},{stacks}'
                    f'{entry[4]}{value or "null"},"how":{_HOW_JSON.get(ret, "null")}{bound}}}\n'
                )
            else:  # Kind.CLOSE
                append(
                    f'{{"type":"close","ts_ns":{ts},"skaddr":"0x{skaddr:x}",{ep},{owner},{stacks}'
                    f'{entry[4]}{value},"flags":{_FLAGS_JSON[self._more.unpack(more)[0] & 7]},{entry[5]}'
                    f'"in_state_ns":{aux or "null"},"sk_flags":{sk_flags},"ret":{ret}}}\n'
                )
            if first is None:
                first = ts
            last = ts
            events += 1
        self.events += events
        self.malformed += malformed
        self.first_ts_ns = first
        self.last_ts_ns = last
        return "".join(out), cut
