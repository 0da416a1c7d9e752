"""Property-based tests: decoders and readers never fail in any way but their own error."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcptrace.errors import RecordingError
from tcptrace.model.events import (
    AF_INET,
    AF_INET6,
    DecodeError,
    Op,
    TcpState,
    Touch,
    Transition,
    canonical_addr,
    from_json,
    from_raw,
    to_json,
)
from tcptrace.recording import JsonLinesWriter, make_header, open_recording


def written(address: object) -> str:
    return canonical_addr(str(address))


u8 = st.integers(0, 255)
u16 = st.integers(0, 65535)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
s32 = st.integers(-(2**31), 2**31 - 1)

raw_events = st.builds(
    SimpleNamespace,
    ts_ns=u64,
    skaddr=u64,
    value_ns=u64,
    sk_flags=u64,
    task_tgid=u32,
    task_pid=u32,
    owner_tgid=u32,
    kstack=s32,
    ustack=s32,
    ret=s32,
    saddr=st.binary(min_size=16, max_size=16),
    daddr=st.binary(min_size=16, max_size=16),
    sport=u16,
    dport=u16,
    family=st.sampled_from([AF_INET, AF_INET6]),
    kind=u8,
    oldstate=u8,
    newstate=u8,
    op=u8,
    task_comm=st.binary(min_size=16, max_size=16),
    owner_comm=st.binary(min_size=16, max_size=16),
    aux_ns=u64,
    flags=u32,
    owner_cgroup=u64,
)


@given(raw_events)
def test_any_raw_event_decodes_or_is_a_decode_error(raw: SimpleNamespace) -> None:
    try:
        ev = from_raw(raw)
    except DecodeError:
        return
    assert ev.sport == raw.sport and ev.dport == raw.dport
    assert from_json(json.loads(json.dumps(to_json(ev)))) == ev


text = st.text(max_size=24)
common = dict(
    ts_ns=st.integers(0, 2**63 - 1),
    skaddr=u64,
    family=st.sampled_from([4, 6]),
    sport=u16,
    dport=u16,
    pid=st.none() | st.integers(1, 2**22),
    comm=st.none() | text,
    task_pid=u32,
    task_tid=u32,
    task_comm=text,
    kstack=st.lists(text, max_size=4).map(tuple),
    ustack=st.lists(text, max_size=4).map(tuple),
)
events = st.one_of(
    st.builds(
        Transition,
        old=st.sampled_from(TcpState),
        new=st.sampled_from(TcpState),
        prev_ns=st.none() | st.integers(1, 2**63 - 1),
        sk_flags=u64,
        **common,
    ),
    st.builds(Touch, op=st.sampled_from(Op), ret=s32, **common),
).flatmap(
    # Recordings hold addresses of the event's family (or "" when unknown), as tcptrace
    # writes them (format_addr: IPv4-mapped ones dotted).
    lambda ev: st.tuples(*[st.just("") | st.ip_addresses(v=ev.family).map(written)] * 2).map(
        lambda a: dataclasses.replace(ev, saddr=a[0], daddr=a[1])
    )
)


@given(st.lists(events, max_size=20).map(lambda evs: sorted(evs, key=lambda e: e.ts_ns)))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_event_stream_survives_a_recording(tmp_path_factory, evs) -> None:  # type: ignore[no-untyped-def]
    buf = io.StringIO()
    writer = JsonLinesWriter(buf)
    writer.write(make_header("prop"))
    for ev in evs:
        writer.event(ev)
    path: Path = tmp_path_factory.mktemp("rec") / "r.jsonl"
    path.write_text(buf.getvalue(), encoding="utf-8")
    assert list(open_recording(str(path)).events()) == evs


@given(st.binary(max_size=400))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_bytes_after_a_header_are_a_recording_error_or_events(tmp_path_factory, tail) -> None:  # type: ignore[no-untyped-def]
    path: Path = tmp_path_factory.mktemp("rec") / "r.jsonl"
    path.write_bytes(json.dumps(make_header("prop")).encode() + b"\n" + tail)
    try:
        list(open_recording(str(path)).events())
    except RecordingError as exc:
        assert str(exc).startswith(str(path))


@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["type", "ts_ns", "skaddr", "old", "new", "op", "kstack", "pid"]),
            st.one_of(st.none(), st.integers(), text, st.lists(st.integers(), max_size=2)),
        )
    )
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_malformed_objects_never_escape_as_other_exceptions(tmp_path_factory, objs) -> None:  # type: ignore[no-untyped-def]
    path: Path = tmp_path_factory.mktemp("rec") / "r.jsonl"
    lines = [json.dumps(make_header("prop"))] + [json.dumps(o) for o in objs]
    path.write_text("\n".join(lines) + "\n")
    try:
        list(open_recording(str(path)).events())
    except RecordingError:
        pass
