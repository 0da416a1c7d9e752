"""The raw-batch hot path writes what the dataclass path writes, byte for byte.

`states`, `states --json` and `record` turn ring-buffer records straight into text
(model/raw.py, views/states.TransitionRows). Here both paths get the same records: every
event of every recording in tests/data (rebuilt as the kernel would have sent it), and
generated records with any field values (hostile comms, unknown kinds and states, any
addresses); the text, the summary and the malformed count must be equal.
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from tcptrace.model.events import (
    AF_INET,
    AF_INET6,
    DecodeError,
    SocketEvent,
    TimeWaitEvent,
    Transition,
    TwWhat,
    from_raw,
)
from tcptrace.model.raw import HEADER, JsonLines, LayoutError, RawLayout
from tcptrace.model.states import StatesSummary
from tcptrace.model.workload import NOBODY, KnownWorkloads, Whois, Workload, identify
from tcptrace.recording import JsonLinesWriter, WhoisLines, open_recording
from tcptrace.views.common import time_units
from tcptrace.views.states import TransitionRows, print_event, print_summary
from tests import rawevents as rv

TW_OWN = (TwWhat.CREATED, TwWhat.CONVERTED, TwWhat.PARKED_ENDED, TwWhat.KILLED)

LAYOUT = RawLayout.of(rv.EVENT)
RECORDINGS = sorted((Path(__file__).resolve().parent.parent / "data").glob("*.jsonl"))
LIFECYCLE = next(p for p in RECORDINGS if p.name == "lifecycle_basic.jsonl")
OFFSET_NS = 1_795_312_136_767_828_406  # a recording's clock offset (2026)

FramesFn = Callable[[int, "int | None"], tuple[str, ...]]


def no_frames(_id: int, _pid: int | None) -> tuple[str, ...]:
    return ()


@dataclasses.dataclass
class Raw:
    """Records, and the stacks their ids stand for (what a symbolizer would say)."""

    records: list[bytes]
    stacks: dict[tuple[int, int | None], tuple[str, ...]]

    def frames(self, stack_id: int, pid: int | None) -> tuple[str, ...]:
        if stack_id < 0:
            return ()
        # A user stack is symbolized for its pid; the table knows a kernel stack by id alone.
        return self.stacks.get((stack_id, pid), self.stacks.get((stack_id, None), ()))

    @property
    def batch(self) -> bytes:
        return rv.batch(self.records)


def raw_of_recording(path: Path) -> Raw:
    events = list(open_recording(str(path)).events())
    ids: dict[tuple[tuple[str, ...], int | None], int] = {}
    records = []
    for e in events:
        kid = ids.setdefault((e.kstack, None), len(ids)) if e.kstack else -1
        uid = ids.setdefault((e.ustack, e.task_pid), len(ids)) if e.ustack else -1
        records.append(rv.record(rv.raw_of(e, kid, uid)))
    return Raw(records, {(i, pid): frames for (frames, pid), i in ids.items()})


# --- the dataclass path, as kernel/stream.py and commands/states.py run it ------------------


def dataclass_events(raw: Raw, frames: FramesFn | None) -> tuple[list[SocketEvent], int]:
    events, malformed = [], 0
    for rec in raw.records:
        try:
            event = from_raw(rv.struct_of(rec))
        except DecodeError:
            malformed += 1
            continue
        if frames is not None:
            kstack, ustack = frames(event.kstack_id, None), frames(event.ustack_id, event.task_pid)
            if kstack or ustack:
                event = dataclasses.replace(event, kstack=kstack, ustack=ustack)
        events.append(event)
    return events, malformed


def dataclass_json(
    events: Sequence[SocketEvent], stack_refs: bool = False, whois: Whois | None = None, remember: int = 8
) -> str:
    """What stream_events writes for ``events``: with a ``whois``, the lines naming each
    event's cgroup and owner first (recording.WhoisLines, remembering ``remember`` of each)."""
    buf = io.StringIO()
    writer = JsonLinesWriter(buf, stack_refs=stack_refs)
    tables = WhoisLines(whois, writer, remember) if whois is not None else None
    for event in events:
        if tables is not None:
            tables.before(event)
        writer.event(event)
    return buf.getvalue()


def fast_json(
    frames: FramesFn | None, stack_refs: bool = False, whois: Whois | None = None, remember: int = 8
) -> JsonLines:
    """JsonLines wired as commands/states.py wires it."""
    fast = JsonLines(LAYOUT, frames, stack_refs=stack_refs)
    if whois is not None:
        fast.names = WhoisLines(whois, JsonLinesWriter(fast), remember).name
    return fast


def console(terminal: bool, color_system: str | None = "truecolor") -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    kwargs: dict[str, Any] = {"color_system": color_system} if terminal else {"color_system": None}
    return Console(file=buf, width=80, force_terminal=terminal, highlight=False, **kwargs), buf


def dataclass_table(
    events: Sequence[SocketEvent],
    terminal: bool,
    color_system: str | None = "truecolor",
    whois: Whois = NOBODY,
) -> str:
    con, buf = console(terminal, color_system)
    for event in events:
        print_event(con, event, OFFSET_NS, whois)
    return buf.getvalue()


def summary_of(events: Sequence[SocketEvent]) -> StatesSummary:
    summary = StatesSummary()
    for event in events:
        summary.feed(event)
    return summary


def summary_text(summary: StatesSummary) -> str:
    con, buf = console(False)
    print_summary(con, summary, {"lost": 0}, "end")
    return buf.getvalue()


# --- every recording -----------------------------------------------------------------------


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
@pytest.mark.parametrize("symbolize", [True, False], ids=["stacks", "no-stacks"])
@pytest.mark.parametrize("stack_refs", [False, True], ids=["inline", "refs"])
def test_json_lines_equal_the_dataclass_path(path: Path, symbolize: bool, stack_refs: bool) -> None:
    raw = raw_of_recording(path)
    frames = raw.frames if symbolize else None
    events, malformed = dataclass_events(raw, frames)
    fast = JsonLines(LAYOUT, frames, stack_refs=stack_refs)
    text, cut = fast.feed(raw.batch)
    assert not cut and (fast.events, fast.malformed) == (len(events), malformed)
    assert text == dataclass_json(events, stack_refs)
    assert fast.summary().to_json() == summary_of(events).to_json()


def test_recordings_rebuild_as_recorded() -> None:
    """The records built from a recording decode to its own events (so the tests above
    compare on what the kernel would have sent)."""
    for path in RECORDINGS:
        raw = raw_of_recording(path)
        events, _ = dataclass_events(raw, raw.frames)
        assert events == [_flags_as_rebuilt(e) for e in open_recording(str(path)).events()]


def _flags_as_rebuilt(event: SocketEvent) -> SocketEvent:
    """A tw's event recorded before ``port_bound`` existed rebuilds with its flag clear."""
    if isinstance(event, TimeWaitEvent) and event.port_bound is None and event.what in TW_OWN:
        return dataclasses.replace(event, port_bound=False)
    return event


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
@pytest.mark.parametrize("symbolize", [True, False], ids=["stacks", "no-stacks"])
def test_table_equals_print_event(path: Path, terminal: bool, symbolize: bool) -> None:
    raw = raw_of_recording(path)
    frames = raw.frames if symbolize else None
    events, _ = dataclass_events(raw, frames)
    con, buf = console(terminal)
    rows = TransitionRows(LAYOUT, con, OFFSET_NS, frames)
    text, _ = rows.feed(raw.batch)
    assert buf.getvalue() == ""  # the rows are returned, never printed
    assert text == dataclass_table(events, terminal)
    assert summary_text(rows.summary()) == summary_text(summary_of(events))


@pytest.mark.parametrize("color_system", ["standard", "256", "truecolor", "windows"])
def test_table_styles_as_the_console_renders_them(color_system: str) -> None:
    raw = raw_of_recording(LIFECYCLE)
    events, _ = dataclass_events(raw, None)
    con, _ = console(True, color_system)
    text, _ = TransitionRows(LAYOUT, con, OFFSET_NS).feed(raw.batch)
    assert "\x1b[" in text
    assert text == dataclass_table(events, True, color_system)


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
def test_caches_that_start_afresh_change_nothing(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tcptrace.model import raw as raw_module

    monkeypatch.setattr(raw_module, "CACHE_LIMIT", 2)
    raw = raw_of_recording(path)
    events, _ = dataclass_events(raw, raw.frames)
    fast = JsonLines(LAYOUT, raw.frames, stack_refs=True)
    assert fast.feed(raw.batch)[0] == dataclass_json(events, stack_refs=True)
    assert summary_text(fast.summary()) == summary_text(summary_of(events))
    rows = TransitionRows(LAYOUT, console(True)[0], OFFSET_NS, raw.frames)
    assert rows.feed(raw.batch)[0] == dataclass_table(events, True)


def test_batches_of_any_split_give_the_same_text() -> None:
    raw = raw_of_recording(LIFECYCLE)
    whole, _ = JsonLines(LAYOUT, raw.frames, stack_refs=True).feed(raw.batch)
    fast = JsonLines(LAYOUT, raw.frames, stack_refs=True)
    parts = [fast.feed(rv.batch(raw.records[i : i + 7]))[0] for i in range(0, len(raw.records), 7)]
    assert "".join(parts) == whole


def test_deadline_cuts_where_the_run_would_stop() -> None:
    raw = raw_of_recording(LIFECYCLE)
    events, _ = dataclass_events(raw, None)
    deadline = events[10].ts_ns
    fast = JsonLines(LAYOUT)
    text, cut = fast.feed(raw.batch, deadline)
    kept = events[: next(i for i, e in enumerate(events) if e.ts_ns > deadline)]
    assert cut and text == dataclass_json(kept)
    assert fast.summary().to_json() == summary_of(kept).to_json()
    assert JsonLines(LAYOUT).feed(raw.batch, events[-1].ts_ns) == (dataclass_json(events), False)


def test_stack_refs_read_back_as_inline_stacks(tmp_path: Path) -> None:
    """A recording with stacks by id replays to the same events as one with them inline."""
    path = next(p for p in RECORDINGS if p.name.startswith("closewait"))
    recording = open_recording(str(path))
    events = list(recording.events())
    header = json.dumps(recording.header, separators=(",", ":")) + "\n"
    refs = dataclass_json(events, stack_refs=True)
    assert '"type":"stack"' in refs and len(refs) < len(dataclass_json(events))
    out = tmp_path / "refs.jsonl"
    out.write_text(header + refs)
    assert list(open_recording(str(out)).events()) == events


CID = "ab" * 32
# Who the owners of the recordings' events are: the cgroups and pids they carry.
WHOIS = KnownWorkloads(
    host_netns=4026531840,
    cgroups={
        7: Workload(identify(f"/system.slice/docker-{CID}.scope")),
        8: Workload(identify("/system.slice/nginx.service")),
        9: Workload(
            identify(f"/kubepods.slice/kubepods-pod{'1' * 32}.slice/cri-containerd-{CID}.scope"),
            "web-[1]",
            "shop\x1b",
            "nginx",
        ),
    },
    nspids={},
)


def with_owners(raw: Raw) -> Raw:
    """The recording's records with owners in cgroups 7-10, in network namespaces (one the
    host's), and owners' start times: what whois names."""
    records = []
    for i, rec in enumerate(raw.records):
        values = {"owner_cgroup": 7 + i % 4, "netns": 4026531840 + i % 2, "owner_start_ns": 10**9 + i % 3}
        event = rv.EVENT.from_buffer_copy(rec, HEADER)
        for name, value in values.items():
            setattr(event, name, value)
        records.append(rec[:HEADER] + bytes(event) + rec[HEADER + rv.SIZE :])
    return Raw(records, raw.stacks)


def whois_of(events: Sequence[SocketEvent]) -> KnownWorkloads:
    pids = sorted({e.pid for e in events if e.pid})
    return dataclasses.replace(WHOIS, nspids={pid: i + 1 for i, pid in enumerate(pids) if i % 2 == 0})


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
@pytest.mark.parametrize("remember", [1, 2, 8], ids=lambda n: f"remember{n}")
def test_json_names_owners_as_the_dataclass_path(path: Path, remember: int) -> None:
    raw = with_owners(raw_of_recording(path))
    events, _ = dataclass_events(raw, raw.frames)
    whois = whois_of(events)
    text, _ = fast_json(raw.frames, True, whois, remember).feed(raw.batch)
    assert '"type":"cgroup"' in text and '"type":"process"' in text
    assert text == dataclass_json(events, True, whois, remember)


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_table_names_owners_as_print_event(path: Path, terminal: bool) -> None:
    raw = with_owners(raw_of_recording(path))
    events, _ = dataclass_events(raw, None)
    whois = whois_of(events)
    con, _ = console(terminal)
    text, _ = TransitionRows(LAYOUT, con, OFFSET_NS, None, whois).feed(raw.batch)
    if any(isinstance(e, Transition) for e in events):
        assert "container docker" in text and "netns 4026531841" in text and "in its namespace" in text
    assert text == dataclass_table(events, terminal, whois=whois)


@pytest.mark.parametrize("units", ["ms", "us"])
def test_table_times_in_the_units_asked(units: str) -> None:
    raw = raw_of_recording(LIFECYCLE)
    events, _ = dataclass_events(raw, None)
    with time_units(units):
        text, _ = TransitionRows(LAYOUT, console(False)[0], OFFSET_NS).feed(raw.batch)
        assert text == dataclass_table(events, False)


# --- generated records ---------------------------------------------------------------------

u8 = st.integers(0, 255)
u16 = st.integers(0, 65535)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
s32 = st.integers(-(2**31), 2**31 - 1)
# Mostly valid numbers, sometimes anything: kinds 1-4 and the states and ops they name.
kinds = st.one_of(st.sampled_from([1, 1, 2, 3, 4]), u8)
states = st.one_of(st.integers(0, 13), u8)
ops = st.one_of(st.integers(0, 9), u8)
comms = st.one_of(
    st.binary(max_size=16),
    st.text(max_size=8).map(lambda t: t.encode()[:16]),
    st.sampled_from([b"[red]x[/]\x1b[2J", b'a"b\\c\n\t', b"\xff\xfe\x00zz", "caf\u00e9\u200b".encode()]),
)
addrs = st.one_of(st.binary(min_size=16, max_size=16), st.just(bytes([127, 0, 0, 1]) + bytes(12)))
# Timestamps a clock can show (the table's time column needs a date time.localtime takes).
ts = st.integers(0, 2**52)

MEMBERS: dict[str, st.SearchStrategy[Any]] = {
    "ts_ns": ts,
    "skaddr": u64,
    "value_ns": st.one_of(st.just(0), u64),
    "sk_flags": u64,
    "task_tgid": u32,
    "task_pid": u32,
    "owner_tgid": st.one_of(st.just(0), u32),
    "kstack": st.one_of(st.just(-1), st.integers(-3, 5)),
    "ustack": st.one_of(st.just(-1), st.integers(-3, 5)),
    "ret": s32,
    "saddr": addrs,
    "daddr": addrs,
    "sport": u16,
    "dport": u16,
    "family": st.one_of(st.sampled_from([AF_INET, AF_INET6]), u16),
    "kind": kinds,
    "oldstate": states,
    "newstate": states,
    "op": ops,
    "task_comm": comms,
    "owner_comm": comms,
    "aux_ns": st.one_of(st.just(0), u64),
    "flags": u32,
    "owner_cgroup": st.one_of(st.just(0), u64),
    "netns": st.one_of(st.just(0), u32),
    "owner_start_ns": st.one_of(st.just(0), u64),
}
members = st.fixed_dictionaries(MEMBERS)
frame_text = st.text(max_size=30)
stack_sets = st.dictionaries(
    st.tuples(st.integers(0, 5), st.one_of(st.none(), u32)),
    st.lists(frame_text, max_size=4).map(tuple),
    max_size=6,
)


def generated(values: list[dict[str, Any]], stacks: dict[tuple[int, int | None], tuple[str, ...]]) -> Raw:
    # Every ustack id shows frames for the pid the record ran in, when one is given for it.
    resolved = dict(stacks)
    for v in values:
        for (i, pid), frames in stacks.items():
            if pid is None and v["ustack"] == i:
                resolved.setdefault((i, v["task_tgid"]), frames)
    return Raw([rv.record(v) for v in values], resolved)


Stacks = dict[tuple[int, int | None], tuple[str, ...]]


def both_paths(values: list[dict[str, Any]], stacks: Stacks, symbolize: bool) -> tuple[Raw, FramesFn | None]:
    raw = generated(values, stacks)
    return raw, (raw.frames if symbolize else None)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(members, max_size=12), stack_sets, st.booleans(), st.booleans())
def test_generated_json_equals_the_dataclass_path(
    values: list[dict[str, Any]], stacks: Stacks, symbolize: bool, refs: bool
) -> None:
    raw, frames = both_paths(values, stacks, symbolize)
    events, malformed = dataclass_events(raw, frames)
    whois = dataclasses.replace(WHOIS, nspids={1: 10, 2: 20})
    fast = fast_json(frames, refs, whois, remember=2)
    assert fast.feed(raw.batch)[0] == dataclass_json(events, refs, whois, remember=2)
    assert (fast.events, fast.malformed) == (len(events), malformed)
    assert fast.summary().to_json() == summary_of(events).to_json()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(members, max_size=12), stack_sets, st.booleans(), st.booleans())
def test_generated_table_equals_print_event(
    values: list[dict[str, Any]], stacks: Stacks, symbolize: bool, terminal: bool
) -> None:
    raw, frames = both_paths(values, stacks, symbolize)
    events, _ = dataclass_events(raw, frames)
    whois = dataclasses.replace(WHOIS, nspids={1: 10, 2: 20})
    rows = TransitionRows(LAYOUT, console(terminal)[0], OFFSET_NS, frames, whois)
    assert rows.feed(raw.batch)[0] == dataclass_table(events, terminal, whois=whois)
    assert summary_text(rows.summary()) == summary_text(summary_of(events))


# --- the layout ------------------------------------------------------------------------------


def test_every_member_is_read_but_padding() -> None:
    """A member added to struct tt_event without a decoder reading it is refused, here and
    at start, rather than written differently by the two paths."""
    fields = [*rv.EVENT._fields_, ("new_member", ctypes.c_uint64)]
    grown = type("tt_event", (ctypes.Structure,), {"_fields_": fields})
    with pytest.raises(LayoutError, match="do not read: new_member"):
        RawLayout.of(grown).record_format()


def test_generated_members_are_every_member() -> None:
    assert set(MEMBERS) | {"pad"} == {name for name, _ in rv.EVENT._fields_}


def test_layout_is_read_from_the_structure() -> None:
    assert LAYOUT.size == rv.SIZE and LAYOUT.stride == rv.STRIDE
    endpoint = ("saddr", "daddr", "sport", "dport", "family")
    assert LAYOUT.group(endpoint) == (rv.EVENT.saddr.offset, 38)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda fields: [f for f in fields if f[0] != "family"] + [("family", ctypes.c_uint16)], "family"),
        (lambda fields: [f for f in fields if f[0] != "ts_ns"] + [("ts_ns", ctypes.c_uint64)], "ts_ns"),
        (lambda fields: [f for f in fields if f[0] != "op"], "no member op"),
    ],
    ids=["gap in a group", "out of order", "missing"],
)
def test_a_layout_the_decoders_cannot_read_is_refused(
    change: Callable[[list[tuple[str, Any]]], list[tuple[str, Any]]], message: str
) -> None:
    fields = [(name, ctype) for name, ctype in rv.EVENT._fields_]
    changed = type("tt_event", (ctypes.Structure,), {"_fields_": change(fields)})
    with pytest.raises(LayoutError, match=message):
        RawLayout.of(changed).record_format()


def test_bcc_padding_members_are_padding() -> None:
    """bcc's Leaf names its alignment padding __pad_N: a member nobody reads, by design."""
    fields: list[tuple[str, Any]] = []
    for name, ctype in rv.EVENT._fields_:
        fields.append((name, ctype))
        if name == "owner_comm":
            fields.append(("__pad_22", ctypes.c_uint8 * 4))
    padded = type("tt_event", (ctypes.Structure,), {"_fields_": fields, "_pack_": 1})
    assert RawLayout.of(padded).record_format() == LAYOUT.record_format()


def test_the_summary_says_how_many_sockets_ended_unseen() -> None:
    con, buf = console(False)
    print_summary(con, StatesSummary(), {"lost": 0, "unseen_end": 3}, "end")
    assert "3 sockets whose last transitions went unseen" in buf.getvalue()
    con, buf = console(False)
    print_summary(con, StatesSummary(), {"lost": 0, "unseen_end": 0}, "end")
    assert "unseen" not in buf.getvalue()
