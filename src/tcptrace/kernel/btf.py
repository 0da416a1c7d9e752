"""Kernel struct offsets and enum values from BTF (/sys/kernel/btf/vmlinux).

The kernel headers installed on a machine may belong to another kernel version, so no
struct layout is ever taken from them: a program that reads a kernel struct gets the
offset from here, as a -D cflag. This module parses the BTF format itself (see the
kernel's Documentation/bpf/btf.rst) and needs neither bcc nor bpftool.

>>> btf = Btf.load()                                       # doctest: +SKIP
>>> btf.member_offset("sock_common", "skc_flags")          # doctest: +SKIP
96
>>> btf.enum_value("sock_flags", "SOCK_DONE")              # doctest: +SKIP
1
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from tcptrace.errors import EnvironmentProblem

VMLINUX = "/sys/kernel/btf/vmlinux"
MAGIC = 0xEB9F

# BTF kinds and the bytes that follow a type's 12-byte header, as a function of vlen.
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG = 8, 9, 10, 11, 18
KIND_ENUM64 = 19
_EXTRA: dict[int, Callable[[int], int]] = {
    1: lambda v: 4,
    3: lambda v: 12,
    4: lambda v: 12 * v,
    5: lambda v: 12 * v,
    6: lambda v: 8 * v,
    13: lambda v: 8 * v,
    14: lambda v: 4,
    15: lambda v: 12 * v,
    17: lambda v: 4,
    19: lambda v: 12 * v,
}
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


class BtfError(EnvironmentProblem):
    """BTF is missing, malformed, or lacks a struct member or enum value tcptrace needs."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


@dataclass(frozen=True)
class BtfType:
    kind: int
    name: str
    size_or_type: int
    members: tuple[Member, ...] = ()
    enumerators: tuple[tuple[str, int], ...] = ()


class Btf:
    """Parsed BTF: named structs, unions and enums, and every type by id for resolution."""

    def __init__(self, data: bytes, source: str = "<bytes>") -> None:
        self.source = source
        self._by_name: dict[tuple[int, str], int] = {}
        self._cache: dict[int, BtfType] = {}
        self._parse(data)

    @classmethod
    def load(cls, path: str = VMLINUX) -> Btf:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise BtfError(
                f"cannot read kernel BTF at {path}: {exc.strerror}",
                hint="tcptrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y",
            ) from None
        return cls(data, path)

    def _parse(self, data: bytes) -> None:
        if len(data) < 24:
            raise BtfError(f"{self.source}: too short to be BTF")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BtfError(f"{self.source}: not BTF (magic 0x{magic:04x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        types = data[hdr_len + type_off : hdr_len + type_off + type_len]
        strings = data[hdr_len + str_off : hdr_len + str_off + str_len]

        def name_at(off: int) -> str:
            end = strings.find(b"\0", off)
            return strings[off:end].decode("utf-8", "replace")

        self._types_blob = types
        self._strings = strings
        # One pass records where each type starts; members, enumerators and names are
        # decoded only for the few types a caller asks about (vmlinux has ~150k types).
        self._raw: list[tuple[int, int, int, int]] = [(0, 0, 0, 0)]  # (kind, vlen|flag, size, pos)
        unpack = struct.Struct("<III").unpack_from
        extra_of = _EXTRA
        pos = 0
        end = len(types)
        by_name = self._by_name
        named = (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64)
        while pos < end:
            name_off, info, size_or_type = unpack(types, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            self._raw.append((kind, info, size_or_type, pos + 12))
            if name_off and kind in named:
                by_name.setdefault((kind, self._name_at(name_off)), len(self._raw) - 1)
            extra = extra_of.get(kind)
            pos += 12 + (extra(vlen) if extra else 0)

    def _name_at(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode("utf-8", "replace")

    def type(self, type_id: int) -> BtfType | None:
        """The type with this id, decoded (and cached) on first use; None for void."""
        if type_id <= 0 or type_id >= len(self._raw):
            return None
        cached = self._cache.get(type_id)
        if cached is not None:
            return cached
        kind, info, size_or_type, pos = self._raw[type_id]
        types = self._types_blob
        vlen = info & 0xFFFF
        kind_flag = info >> 31
        members: tuple[Member, ...] = ()
        enumerators: tuple[tuple[str, int], ...] = ()
        if kind in (KIND_STRUCT, KIND_UNION):
            members = tuple(self._member(types, pos + 12 * i, kind_flag) for i in range(vlen))
        elif kind == KIND_ENUM:
            fmt = "<Ii" if kind_flag else "<II"
            enumerators = tuple(
                (self._name_at(n), v)
                for n, v in (struct.unpack_from(fmt, types, pos + 8 * i) for i in range(vlen))
            )
        elif kind == KIND_ENUM64:
            enumerators = tuple(
                (self._name_at(n), lo | (hi << 32))
                for n, lo, hi in (struct.unpack_from("<III", types, pos + 12 * i) for i in range(vlen))
            )
        name_off = struct.unpack_from("<I", types, pos - 12)[0]
        t = BtfType(kind, self._name_at(name_off) if name_off else "", size_or_type, members, enumerators)
        self._cache[type_id] = t
        return t

    def _member(self, types: bytes, pos: int, kind_flag: int) -> Member:
        name_off, type_id, offset = struct.unpack_from("<III", types, pos)
        bit_offset, bitfield_size = (offset & 0xFFFFFF, offset >> 24) if kind_flag else (offset, 0)
        return Member(self._name_at(name_off) if name_off else "", type_id, bit_offset, bitfield_size)

    def _resolve(self, type_id: int) -> BtfType | None:
        seen = 0
        t = self.type(type_id)
        while t is not None and t.kind in _MODIFIERS and seen < 32:
            t = self.type(t.size_or_type)
            seen += 1
        return t

    def struct(self, name: str) -> BtfType:
        for kind in (KIND_STRUCT, KIND_UNION):
            type_id = self._by_name.get((kind, name))
            if type_id is not None:
                t = self.type(type_id)
                assert t is not None
                return t
        raise BtfError(f"kernel BTF has no struct {name}")

    def _find(self, t: BtfType, name: str, base_bits: int) -> tuple[int, Member] | None:
        """Bit offset and member ``name`` of ``t``, looking inside anonymous members too."""
        for m in t.members:
            if m.name == name:
                return base_bits + m.bit_offset, m
        for m in t.members:
            if not m.name:
                inner = self._resolve(m.type_id)
                if inner is not None and inner.kind in (KIND_STRUCT, KIND_UNION):
                    found = self._find(inner, name, base_bits + m.bit_offset)
                    if found is not None:
                        return found
        return None

    def member_offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``path`` (``a.b.c``, anonymous members crossed) in ``struct struct_name``."""
        bits, size = self.member_bits(struct_name, path)
        if size or bits % 8:
            raise BtfError(f"kernel BTF: {struct_name}.{path} is a bitfield")
        return bits // 8

    def member_bits(self, struct_name: str, path: str) -> tuple[int, int]:
        """Bit offset of ``path`` in ``struct struct_name`` and its bitfield size (0: not a
        bitfield), for a member that is a bitfield in some kernels and not in others."""
        t: BtfType | None = self.struct(struct_name)
        bits = 0
        size = 0
        parts = path.split(".")
        for i, part in enumerate(parts):
            found = self._find(t, part, 0) if t is not None else None
            if found is None:
                raise BtfError(f"kernel BTF: struct {struct_name} has no member {'.'.join(parts[: i + 1])}")
            offset, member = found
            bits += offset
            size = member.bitfield_size
            t = self._resolve(member.type_id)
        return bits, size

    def enum_value(self, enum_name: str, enumerator: str) -> int:
        for kind in (KIND_ENUM, KIND_ENUM64):
            type_id = self._by_name.get((kind, enum_name))
            if type_id is not None:
                t = self.type(type_id)
                assert t is not None
                for name, value in t.enumerators:
                    if name == enumerator:
                        return value
                raise BtfError(f"kernel BTF: enum {enum_name} has no {enumerator}")
        raise BtfError(f"kernel BTF has no enum {enum_name}")
