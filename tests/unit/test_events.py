from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from tcptrace.model.events import (
    AF_INET,
    AF_INET6,
    DecodeError,
    Kind,
    Op,
    TcpState,
    Touch,
    Transition,
    decode_comm,
    format_addr,
    from_json,
    from_raw,
    to_json,
)
from tcptrace.recording import open_recording


def raw_event(**over: object) -> SimpleNamespace:
    """A raw struct tt_event as bcc would hand it over (byte arrays for addresses and comms)."""
    base = dict(
        ts_ns=1_000,
        skaddr=0xFFFF888108158940,
        value_ns=2_500_000,
        sk_flags=0x302,
        task_tgid=0,
        task_pid=0,
        owner_tgid=4242,
        kstack=-1,
        ustack=-1,
        ret=0,
        saddr=bytes([127, 0, 0, 1]) + bytes(12),
        daddr=bytes([10, 1, 2, 3]) + bytes(12),
        sport=8080,
        dport=51000,
        family=AF_INET,
        kind=Kind.TRANSITION,
        oldstate=1,
        newstate=8,
        op=0,
        task_comm=b"swapper/0\0\0\0\0\0\0\0",
        owner_comm=b"myserver\0\0\0\0\0\0\0\0",
    )
    base.update(over)
    return SimpleNamespace(**base)


def test_transition_from_raw_names_everything() -> None:
    ev = from_raw(raw_event())
    assert isinstance(ev, Transition)
    assert (ev.old, ev.new) == (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)
    assert (ev.saddr, ev.sport, ev.daddr, ev.dport, ev.family) == ("127.0.0.1", 8080, "10.1.2.3", 51000, 4)
    assert (ev.pid, ev.comm) == (4242, "myserver")
    assert (ev.task_pid, ev.task_comm) == (0, "swapper/0")
    assert ev.prev_ns == 2_500_000
    assert ev.sk_flags == 0x302


def test_ipv6_addresses() -> None:
    v6 = bytes(15) + b"\x01"
    ev = from_raw(raw_event(family=AF_INET6, saddr=v6, daddr=bytes.fromhex("20010db8" + "00" * 11 + "05")))
    assert (ev.saddr, ev.daddr, ev.family) == ("::1", "2001:db8::5", 6)


def test_unknown_owner_is_none_not_zero() -> None:
    ev = from_raw(raw_event(owner_tgid=0, owner_comm=b"garbage\0"))
    assert ev.pid is None and ev.comm is None


def test_unknown_prev_state_time_is_none() -> None:
    assert from_raw(raw_event(value_ns=0)).prev_ns is None  # type: ignore[attr-defined]


def test_touch_from_raw() -> None:
    ev = from_raw(raw_event(kind=Kind.TOUCH, op=Op.RECV, ret=0))
    assert isinstance(ev, Touch) and ev.op is Op.RECV and ev.ret == 0


@pytest.mark.parametrize(
    "over, message",
    [({"kind": 99}, "kind 99"), ({"newstate": 42}, "42"), ({"kind": Kind.TOUCH, "op": 77}, "77")],
)
def test_out_of_range_numbers_are_decode_errors(over: dict[str, object], message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        from_raw(raw_event(**over))


def test_comm_bytes_that_are_not_utf8_stay_visible() -> None:
    assert decode_comm(b"bad\xff\xfename\0junk") == "bad\\xff\\xfename"


def test_format_addr() -> None:
    assert format_addr(bytes([192, 168, 0, 1]) + bytes(12), AF_INET) == "192.168.0.1"
    assert format_addr(bytes(16), AF_INET6) == "::"


@pytest.mark.parametrize("text", ["CLOSE_WAIT", "close-wait", "TCP_CLOSE_WAIT", " close_wait "])
def test_state_parse(text: str) -> None:
    assert TcpState.parse(text) is TcpState.CLOSE_WAIT
    assert TcpState.parse(8) is TcpState.CLOSE_WAIT


def test_state_parse_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown TCP state"):
        TcpState.parse("HALF_OPEN")


def test_json_round_trip_of_a_recorded_stream(data_dir) -> None:  # type: ignore[no-untyped-def]
    events = list(open_recording(str(data_dir / "lifecycle_basic.jsonl")).events())
    assert len(events) == 44
    for ev in events:
        text = json.dumps(to_json(ev))
        assert from_json(json.loads(text)) == ev


def test_json_names_states_without_prefix_and_skaddr_in_hex() -> None:
    obj = to_json(from_raw(raw_event()))
    assert obj["type"] == "transition"
    assert (obj["old"], obj["new"]) == ("ESTABLISHED", "CLOSE_WAIT")
    assert obj["skaddr"] == "0xffff888108158940"
    assert obj["kstack"] == [] and "kstack_id" not in obj


@pytest.mark.parametrize(
    "patch",
    [{"old": "NOPE"}, {"ts_ns": "soon"}, {"kstack": "tcp_close"}, {"kstack": [1, 2]}, {"pid": "me"}],
)
def test_from_json_rejects_malformed(patch: dict[str, object]) -> None:
    obj = to_json(from_raw(raw_event()))
    obj.update(patch)
    with pytest.raises((ValueError, TypeError, KeyError)):
        from_json(obj)


def test_ipv4_mapped_addresses_are_dotted_everywhere(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """As ss prints them: kernel events, sock_diag and /proc rows agree, and a recording
    made before (``::ffff:7f00:1``) reads back in the same form."""
    from tcptrace.model.events import AF_INET6, format_addr, from_json
    from tcptrace.system.procnet import parse_addr
    from tcptrace.system.tcpsock import format_ip

    mapped = bytes(10) + bytes([255, 255, 127, 0, 0, 1])
    assert format_addr(mapped, AF_INET6) == format_ip(mapped, 6) == "::ffff:127.0.0.1"
    assert parse_addr("0000000000000000FFFF00000100007F:01BB") == ("::ffff:127.0.0.1", 443)
    old = {"type": "transition", "ts_ns": 1, "skaddr": 1, "family": 6, "saddr": "::ffff:7f00:1"}
    old |= {"daddr": "::ffff:a00:5", "sport": 80, "dport": 1234, "old": "LISTEN", "new": "SYN_RECV"}
    event = from_json(old)
    assert (event.saddr, event.daddr) == ("::ffff:127.0.0.1", "::ffff:10.0.0.5")
