"""The BTF reader against a small BTF blob built here, shaped like the kernel's struct sock."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tcptrace.kernel.btf import Btf, BtfError


class BtfBuilder:
    def __init__(self) -> None:
        self.strings = b"\0"
        self.types = b""
        self.count = 0

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(
        self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", kflag: int = 0
    ) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.s(name), info, size_or_type) + extra
        self.count += 1
        return self.count

    def int_(self, name: str, size: int) -> int:
        return self.add(name, 1, 0, size, struct.pack("<I", size * 8))

    def composite(
        self, name: str, kind: int, size: int, members: list[tuple[str, int, int]], kflag: int = 0
    ) -> int:
        extra = b"".join(struct.pack("<III", self.s(n), t, off) for n, t, off in members)
        return self.add(name, kind, len(members), size, extra, kflag)

    def enum(self, name: str, values: list[tuple[str, int]]) -> int:
        extra = b"".join(struct.pack("<Ii", self.s(n), v) for n, v in values)
        return self.add(name, 6, len(values), 4, extra)

    def blob(self, magic: int = 0xEB9F) -> bytes:
        hdr = struct.pack(
            "<HBBIIIII", magic, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings)
        )
        return hdr + self.types + self.strings


def sock_like() -> bytes:
    b = BtfBuilder()
    u16 = b.int_("unsigned short", 2)
    u64 = b.int_("unsigned long", 8)
    flags_union = b.composite("", 5, 8, [("skc_flags", u64, 0), ("skc_listener", u64, 0)])
    common = b.composite(
        "sock_common", 4, 136, [("skc_family", u16, 128), ("skc_state", u16, 144), ("", flags_union, 768)]
    )
    typedef = b.add("sock_common_t", 8, 0, common)
    bitfields = b.composite(
        "", 4, 4, [("flag_a", u16, (1 << 24) | 0), ("flag_b", u16, (3 << 24) | 1)], kflag=1
    )
    b.composite(
        "sock", 4, 784, [("__sk_common", typedef, 0), ("", bitfields, 4000), ("sk_protocol", u16, 4256)]
    )
    b.enum("sock_flags", [("SOCK_DEAD", 0), ("SOCK_DONE", 1), ("SOCK_LINGER", 4)])
    return b.blob()


def test_offsets_through_anonymous_unions_and_typedefs() -> None:
    btf = Btf(sock_like())
    assert btf.member_offset("sock_common", "skc_flags") == 96
    assert btf.member_offset("sock", "__sk_common.skc_flags") == 96
    assert btf.member_offset("sock", "__sk_common.skc_state") == 18
    assert btf.member_offset("sock", "sk_protocol") == 532


def test_enum_values() -> None:
    btf = Btf(sock_like())
    assert btf.enum_value("sock_flags", "SOCK_DONE") == 1
    assert btf.enum_value("sock_flags", "SOCK_LINGER") == 4


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda b: b.member_offset("sock", "sk_nope"), "no member sk_nope"),
        (lambda b: b.member_offset("sock", "__sk_common.nope"), r"no member __sk_common.nope"),
        (lambda b: b.member_offset("tcp_sock", "x"), "no struct tcp_sock"),
        (lambda b: b.member_offset("sock", "flag_b"), "bitfield"),
        (lambda b: b.enum_value("sock_flags", "SOCK_NOPE"), "has no SOCK_NOPE"),
        (lambda b: b.enum_value("tcp_states", "X"), "no enum tcp_states"),
    ],
)
def test_missing_things_are_clear_errors(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BtfError, match=message):
        call(Btf(sock_like()))


def test_not_btf() -> None:
    with pytest.raises(BtfError, match="not BTF"):
        Btf(BtfBuilder().blob(magic=0x1234))
    with pytest.raises(BtfError, match="too short"):
        Btf(b"\x9f\xeb")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BtfError, match="cannot read kernel BTF"):
        Btf.load(str(tmp_path / "vmlinux"))


@pytest.mark.skipif(not Path("/sys/kernel/btf/vmlinux").exists(), reason="no kernel BTF on this machine")
def test_this_kernel_has_what_tcptrace_reads() -> None:
    btf = Btf.load()
    assert btf.member_offset("sock", "__sk_common.skc_flags") == btf.member_offset("sock_common", "skc_flags")
    assert btf.enum_value("sock_flags", "SOCK_DEAD") == 0
