"""sock_diag dumps parsed from recorded kernel answers, checked against ss; addresses as
tcptrace writes them; the dump loop's retries and errors, with a fake netlink socket.

tests/data/sockdiag_v4.bin and sockdiag_v6.bin are the raw answers (every batch, up to and
with NLMSG_DONE) of a Linux 6.18 kernel to an all-states dump of a namespace made by
bench/netns_sockets.py (200 sockets, listeners from port 40000); sockdiag_ss.txt is
``ss -tanHe`` in that namespace right after.
"""

from __future__ import annotations

import doctest
import ipaddress
import socket
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tcptrace.system.containers
import tcptrace.system.netns
import tcptrace.system.process
import tcptrace.system.procfd
import tcptrace.system.sockdiag
import tcptrace.system.tcpsock
from tcptrace.errors import TcptraceError
from tcptrace.model.events import AF_INET, AF_INET6, TcpState, format_addr
from tcptrace.system import sockdiag
from tcptrace.system.procnet import parse_addr
from tcptrace.system.tcpsock import TcpSocket, format_ip
from tests import sstext

little_endian = pytest.mark.skipif(sys.byteorder != "little", reason="recorded on a little-endian host")


@pytest.mark.parametrize(
    "module",
    [
        tcptrace.system.sockdiag,
        tcptrace.system.tcpsock,
        tcptrace.system.netns,
        tcptrace.system.process,
        tcptrace.system.procfd,
        tcptrace.system.containers,
        sstext,
    ],
)
def test_docstring_examples(module: object) -> None:
    if module is tcptrace.system.sockdiag and sys.byteorder != "little":
        pytest.skip("the example message is little-endian")
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


def recorded(data_dir: Path) -> list[TcpSocket]:
    out: list[TcpSocket] = []
    for name in ("sockdiag_v4.bin", "sockdiag_v6.bin"):
        assert sockdiag.parse_batch((data_dir / name).read_bytes(), out, netns=77) == sockdiag.BatchEnd.DONE
    return out


@little_endian
def test_recorded_dump_equals_ss(data_dir: Path) -> None:
    socks = recorded(data_dir)
    truth = sstext.parse_ss((data_dir / "sockdiag_ss.txt").read_text())
    assert sorted(s._replace(netns=0, cgroup_id=None) for s in socks) == sorted(truth)
    assert {s.netns for s in socks} == {77}
    states = {s.state for s in socks}
    assert {TcpState.LISTEN, TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.FIN_WAIT2} <= states
    assert TcpState.TIME_WAIT in states
    assert any(s.saddr.startswith("::ffff:") for s in socks), "an IPv4-mapped socket"
    assert any(s.family == 6 and s.saddr == "::1" for s in socks)


@little_endian
def test_recorded_dump_fields_that_ss_does_not_print_in_its_columns(data_dir: Path) -> None:
    socks = recorded(data_dir)
    listeners = [s for s in socks if s.state == TcpState.LISTEN]
    assert listeners and all(s.wqueue == 4096 and s.rqueue == 0 for s in listeners)  # listen(4096)
    # full sockets carry their cgroup; timewait sockets (TIME_WAIT, orphaned FIN_WAIT2) none
    assert all(s.cgroup_id == 1 for s in socks if s.inode)
    assert all(s.cgroup_id is None and s.uid == 0 for s in socks if s.state == TcpState.TIME_WAIT)
    # the peer's FIN is the one unread "byte" of a CLOSE_WAIT socket that read nothing
    assert all(s.rqueue == 1 for s in socks if s.state == TcpState.CLOSE_WAIT)


@little_endian
def test_a_dump_split_anywhere_between_messages_parses_the_same(data_dir: Path) -> None:
    data = (data_dir / "sockdiag_v4.bin").read_bytes()
    whole: list[TcpSocket] = []
    sockdiag.parse_batch(data, whole)
    offsets = []
    off = 0
    while off < len(data):
        offsets.append(off)
        off += (struct.unpack_from("=I", data, off)[0] + 3) & ~3
    cut = offsets[len(offsets) // 2]
    parts: list[TcpSocket] = []
    assert sockdiag.parse_batch(data[:cut], parts) == sockdiag.BatchEnd.MORE
    assert sockdiag.parse_batch(data[cut:], parts) == sockdiag.BatchEnd.DONE
    assert parts == whole


V6 = st.binary(min_size=16, max_size=16)
STRUCTURED_V6 = st.builds(
    lambda prefix, tail: prefix + tail,
    st.sampled_from(
        [bytes(10) + b"\xff\xff", bytes(12), bytes(8) + b"\x00\x00\xff\xff", bytes(10) + b"\x00\x01"]
    ),
    st.binary(min_size=4, max_size=4),
)


@given(st.binary(min_size=4, max_size=4))
def test_ipv4_text_is_format_addr_s(raw: bytes) -> None:
    assert format_ip(raw, 4) == format_addr(raw + bytes(12), AF_INET)


@given(st.one_of(V6, STRUCTURED_V6))
def test_ipv6_text_is_format_addr_s(raw: bytes) -> None:
    """Mapped (::ffff:a.b.c.d), compatible (::a.b.c.d) and zero runs of every length included."""
    assert format_ip(raw, 6) == format_addr(raw, AF_INET6)


def test_ipv4_mapped_prints_as_proc_net_tcp6_and_events_do() -> None:
    raw = ipaddress.IPv6Address("::ffff:127.0.0.1").packed
    assert format_ip(raw, 6) == parse_addr("0000000000000000FFFF00000100007F:01BB")[0]
    assert format_ip(raw, 6) == format_addr(raw, AF_INET6)


def message(kind: int, payload: bytes, flags: int = 2) -> bytes:
    body = struct.pack("=IHHII", 16 + len(payload), kind, flags, 1, 0) + payload
    return body + bytes(-len(body) % 4)


def diag_message(state: int, family: int = socket.AF_INET, attrs: bytes = b"") -> bytes:
    src = socket.inet_pton(socket.AF_INET6, "fe80::1") if family == socket.AF_INET6 else bytes([10, 0, 0, 5])
    payload = struct.pack("=BBBB", family, state, 0, 0) + struct.pack(">HH", 22, 40000)
    payload += src.ljust(16, b"\0") + bytes(16) + struct.pack("=III", 0, 7, 0)
    payload += struct.pack("=IIIII", 0, 0, 0, 1000, 4242) + attrs
    return message(sockdiag.SOCK_DIAG_BY_FAMILY, payload)


DONE = message(sockdiag.NLMSG_DONE, struct.pack("=i", 0))


def test_a_cgroup_attribute_anywhere_is_found() -> None:
    shutdown = struct.pack("=HHB3x", 5, 8, 0)
    cgroup = struct.pack("=HHQ", 12, sockdiag.INET_DIAG_CGROUP_ID, 99)
    for attrs in (cgroup, shutdown + cgroup, shutdown + shutdown + shutdown + cgroup, shutdown):
        out: list[TcpSocket] = []
        sockdiag.parse_batch(diag_message(1, attrs=attrs), out)
        assert out[0].cgroup_id == (99 if attrs.endswith(cgroup) else None)
        assert (out[0].saddr, out[0].sport, out[0].dport, out[0].cookie, out[0].inode) == (
            "10.0.0.5",
            22,
            40000,
            7,
            4242,
        )


def test_errors_and_nonsense_are_one_line_errors() -> None:
    refused = message(sockdiag.NLMSG_ERROR, struct.pack("=i", -13) + bytes(16))
    with pytest.raises(sockdiag.SockDiagError, match="refused the dump: Permission denied"):
        sockdiag.parse_batch(refused, [])
    with pytest.raises(sockdiag.SockDiagError, match="state 99"):
        sockdiag.parse_batch(diag_message(99), [])
    with pytest.raises(sockdiag.SockDiagError, match="address family 1"):
        sockdiag.parse_batch(diag_message(1, family=socket.AF_UNIX), [])
    with pytest.raises(sockdiag.SockDiagError, match="truncated"):
        sockdiag.parse_batch(diag_message(1)[:-8], [])
    with pytest.raises(sockdiag.SockDiagError, match="unexpected message type 16"):
        sockdiag.parse_batch(message(16, bytes(80)), [])
    assert issubclass(sockdiag.SockDiagError, TcptraceError)


class FakeNetlink:
    """Answers each dump request with the next list of batches."""

    def __init__(self, answers: list[list[bytes]]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.requests.append(data)
        self.pending = list(self.answers.pop(0))
        return len(data)

    def recv_into(self, buf: bytearray) -> int:
        data = self.pending.pop(0) if self.pending else b""
        buf[: len(data)] = data
        return len(data)


def test_an_interrupted_dump_is_retried_and_a_family_filter_respected() -> None:
    interrupted = message(sockdiag.NLMSG_DONE, struct.pack("=i", 0), flags=2 | sockdiag.NLM_F_DUMP_INTR)
    fake = FakeNetlink([[diag_message(1) + diag_message(8), interrupted], [diag_message(8), DONE]])
    stats: list[sockdiag.DumpStats] = []
    out = sockdiag.dump_on(fake, [TcpState.CLOSE_WAIT], families=(4,), netns=5, stats=stats)  # type: ignore[arg-type]
    assert [(s.state, s.netns) for s in out] == [(TcpState.CLOSE_WAIT, 5)]
    assert stats[0].retries == 1 and stats[0].sockets == 1
    assert len(fake.requests) == 2
    family, protocol, _, _, states = struct.unpack_from("=BBBBI", fake.requests[0], 16)
    assert (family, protocol, states) == (socket.AF_INET, socket.IPPROTO_TCP, 1 << 8)


def test_a_dump_that_stops_without_done_is_an_error() -> None:
    fake = FakeNetlink([[diag_message(1)]])
    with pytest.raises(sockdiag.SockDiagError, match="without NLMSG_DONE"):
        sockdiag.dump_on(fake, families=(4,))  # type: ignore[arg-type]


def test_a_dump_asks_each_family_in_turn() -> None:
    fake = FakeNetlink([[diag_message(1), DONE], [diag_message(10, socket.AF_INET6), DONE]])
    out = sockdiag.dump_on(fake)  # type: ignore[arg-type]
    assert [(s.family, s.saddr, s.state) for s in out] == [
        (4, "10.0.0.5", TcpState.ESTABLISHED),
        (6, "fe80::1", TcpState.LISTEN),
    ]
    assert [struct.unpack_from("=B", r, 16)[0] for r in fake.requests] == [socket.AF_INET, socket.AF_INET6]


def test_state_mask_covers_every_state_proc_lists() -> None:
    mask = sockdiag.state_mask(sockdiag.ALL_STATES)
    assert all(mask & (1 << s) for s in TcpState)
    assert sockdiag.state_mask([TcpState.SYN_RECV]) & (1 << TcpState.NEW_SYN_RECV)


@little_endian
def test_state_counts_of_a_recorded_dump_equal_the_parsed_sockets(data_dir: Path) -> None:
    counts = [0] * 256
    for name in ("sockdiag_v4.bin", "sockdiag_v6.bin"):
        assert sockdiag.count_batch((data_dir / name).read_bytes(), counts) == sockdiag.BatchEnd.DONE
    parsed: dict[int, int] = {}
    for s in recorded(data_dir):
        parsed[s.state] = parsed.get(s.state, 0) + 1
    assert {i: n for i, n in enumerate(counts) if n} == parsed


def test_state_counts_drop_an_interrupted_attempt() -> None:
    interrupted = message(sockdiag.NLMSG_DONE, struct.pack("=i", 0), flags=2 | sockdiag.NLM_F_DUMP_INTR)
    fake = FakeNetlink(
        [
            [diag_message(1) * 3, interrupted],
            [diag_message(1) + diag_message(8), DONE],
            [diag_message(8), DONE],
        ]
    )
    counts = sockdiag.count_states_on(fake)  # type: ignore[arg-type]
    assert counts == {TcpState.ESTABLISHED: 1, TcpState.CLOSE_WAIT: 2}
