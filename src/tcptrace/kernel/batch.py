"""Whole-map reads with BPF_MAP_LOOKUP_BATCH, into buffers kept from one read to the next.

A read per interval must cost what the map holds, not what it could hold: bcc's
``items_lookup_batch()`` allocates (and zeroes) keys and values for the map's maximum
every call, and ``items()`` makes two system calls per entry. ``BatchReader`` asks the
kernel for ``chunk`` entries a call into buffers it allocated once (21,000 entries of
~100 bytes: ~8 ms, where ``items()`` takes ~77 ms).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from typing import Any

from tcptrace.errors import TcptraceError


class BatchReader:
    """Every (key, value) of one map, read in chunks.

    Pairs are yielded straight from the buffers: use (or copy) a pair before taking the
    next chunk's. A key or value of a plain integer type is a Python int (ctypes converts
    them on indexing); ``scalar()`` reads either. Works for hash maps and arrays, per-CPU
    ones included (bcc's Leaf of a per-CPU array is already the array of one value per
    CPU).
    """

    def __init__(self, table: Any, chunk: int = 4096) -> None:
        self.table = table
        self.chunk = max(1, min(chunk, int(table.max_entries)))
        self._keys = (table.Key * self.chunk)()
        self._values = (table.Leaf * self.chunk)()
        self._lib = _libbcc()

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        token_in = ctypes.c_uint32(0)
        token_out = ctypes.c_uint32(0)
        count = ctypes.c_uint32(0)
        first = True
        while True:
            count.value = self.chunk
            res = self._lib.bpf_lookup_batch(
                self.table.map_fd,
                None if first else ctypes.byref(token_in),
                ctypes.byref(token_out),
                ctypes.byref(self._keys),
                ctypes.byref(self._values),
                ctypes.byref(count),
            )
            err = ctypes.get_errno()
            if res != 0 and err != errno.ENOENT:
                name = getattr(self.table, "name", b"?")
                raise TcptraceError(f"reading the kernel map {_text(name)} failed: {os.strerror(err)}")
            for i in range(count.value):
                yield self._keys[i], self._values[i]
            if res != 0 or count.value == 0:
                return  # ENOENT: that was the last chunk
            token_in.value = token_out.value
            first = False

    def copied(self) -> list[tuple[Any, Any]]:
        """Every (key, value), copied out of the buffers: valid after the next read (keys
        kept to delete the entries later, values decoded later)."""
        return [(_copy(key), _copy(value)) for key, value in self]


def scalar(value: Any) -> int:
    """An integer key or value as batch reads yield it: an int, or a ctypes integer."""
    return int(value) if isinstance(value, int) else int(value.value)


def _text(name: Any) -> str:
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def _libbcc() -> Any:
    from bcc.libbcc import lib  # only kernel/ imports bcc

    return lib


def percpu_sums(table: Any) -> list[int]:
    """Each index of a per-CPU array of integers, summed over CPUs, in one system call."""
    out = [0] * int(table.max_entries)
    for key, per_cpu in BatchReader(table, chunk=len(out)):
        out[scalar(key)] = sum(int(v) for v in per_cpu)
    return out


def read_all(table: Any, chunk: int = 4096) -> list[tuple[Any, Any]]:
    """Every (key, value) of ``table``, copied out of the reader's buffers (so they stay
    valid after the read): for a table read once and then decoded. A table read every
    interval keeps its BatchReader and calls ``copied()``, so its buffers are made once."""
    return BatchReader(table, chunk).copied()


def _copy(value: Any) -> Any:
    return value if isinstance(value, int) else type(value).from_buffer_copy(value)
