"""A BPF ring buffer read from Python through its memory map, a batch at a time.

bcc's reader calls a ctypes callback per record (1-2 us each, more than decoding one). The
kernel lets user space map the ring buffer instead (kernel/bpf/ringbuf.c):

- offset 0, one page, read-write: ``consumer_pos``, the first byte not yet consumed;
- offset PAGE, read-only: one page holding ``producer_pos``, then the data area, mapped
  twice in a row, so a record that wraps around the end is contiguous;
- each record: an 8-byte header (``len`` with BUSY_BIT while the producer writes it and
  DISCARD_BIT when it was discarded, then a page offset the kernel uses), then the data,
  padded to 8 bytes.

``read()`` takes the committed records between the two positions (up to the first one
still BUSY), copies them out and advances ``consumer_pos``, so the kernel may reuse the
space at once. What it returns is a *batch*: records framed as in the ring buffer (header
included), all of exactly ``stride`` bytes, ready for ``struct.iter_unpack``. Wake-ups come
from epoll on the map's fd; the kernel wakes a reader only when it had caught up, so one
wake-up brings a batch.

Memory order: the header is read before the copy of its record, and the copy is made
after every header of the batch was read. On x86 (loads are not reordered with older
loads) that is enough; on other architectures ``MmapRingBuffer.supported()`` is False and
kernel/stream.py reads through bcc's callback instead (BccRingBuffer, same batches).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import select
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER = 8
MAX_BATCH_BYTES = 1 << 20
"""At most this much is taken per read, so a full buffer becomes several batches of a
bounded size (and a bounded output text) rather than one huge one."""
MIN_READ_INTERVAL_S = 0.02
"""After a read that emptied the buffer, wait this long before the next: at high rates a
wake-up then brings hundreds of events instead of a few, and a slow stream costs at most 50
wake-ups a second (at 1k conn/s `states` took 2.17 us of CPU an event with 5 ms, 2.00 with 20)."""
_U32 = struct.Struct("=I")


def _leading(values: list[int], expected: int) -> int:
    """How many of ``values`` come before the first that is not ``expected``.

    >>> _leading([8, 8, 9, 8], 8), _leading([8, 8], 8)
    (2, 2)
    """
    for i, value in enumerate(values):
        if value != expected:
            return i
    return len(values)


def stride_of(event_size: int) -> int:
    """Bytes one record of ``event_size`` bytes takes in the ring buffer (and in a batch).

    >>> stride_of(160), stride_of(157)
    (168, 168)
    """
    return HEADER + ((event_size + 7) & ~7)


class RingReader(Protocol):
    """What kernel/stream.py reads batches from."""

    @property
    def malformed(self) -> int:
        """Records too short to be an event (never, from our programs)."""

    def read(self, timeout_s: float) -> bytes:
        """The next batch, waiting up to ``timeout_s`` when none is there (b"" then)."""

    def drain(self) -> bytes:
        """Whatever is there now, without waiting."""

    def close(self) -> None: ...


class RingConsumer:
    """The consumer's walk over a ring buffer's memory: ``consumer`` holds consumer_pos
    (written here), ``producer`` holds producer_pos at offset 0 and, from ``data_offset``,
    the data area of ``size`` bytes mapped twice. Any writable/readable buffers do (tests
    pass bytearrays); MmapRingBuffer passes the map's memory."""

    def __init__(self, consumer: Any, producer: Any, data_offset: int, size: int, event_size: int) -> None:
        if size <= 0 or size & (size - 1) or size % 8:
            raise ValueError(f"ring buffer size {size} is not a power of two")
        self.size = size
        self.event_size = event_size
        self.stride = stride_of(event_size)
        self.malformed = 0
        self._mask = size - 1
        self._expected = event_size  # a committed record's header: its length, no flag bits
        # Positions and headers are read and written through native-format views: one
        # aligned load or store each, as the kernel's are (struct's "=Q" goes byte by byte,
        # and a position torn by a concurrent update reads as a wild value).
        self._cons = memoryview(consumer)[:8].cast("Q")
        self._prod = memoryview(producer)[:8].cast("Q")
        self._data = memoryview(producer)[data_offset : data_offset + 2 * size]
        self._words = self._data.cast("I")  # headers are 8-byte aligned: word index = offset / 4
        self.caught_up_at = 0.0

    def positions(self) -> tuple[int, int]:
        """(consumer_pos, producer_pos)."""
        return self._cons[0], self._prod[0]

    def take(self) -> bytes:
        """Copy out the committed records from consumer_pos on (at most MAX_BATCH_BYTES)
        and release their space: a batch of records of ``stride`` bytes each."""
        cons, prod = self.positions()
        if cons == prod:
            return b""
        limit = cons + min(prod - cons, MAX_BATCH_BYTES)
        start = cons & self._mask
        stride = self.stride
        # Fast path: the leading records of the usual size, all committed, found by one
        # strided read of their headers and copied at once.
        n = (limit - cons) // stride
        good = 0
        if n:
            step = stride // 4
            headers = self._words[start // 4 : start // 4 + n * step : step].tolist()
            good = n if headers.count(self._expected) == n else _leading(headers, self._expected)
        chunks = [bytes(self._data[start : start + good * stride])] if good else []
        pos = cons + good * stride
        # Then record by record: one still busy ends the batch; discarded ones are skipped.
        while pos < limit:
            offset = pos & self._mask
            word = self._words[offset // 4]
            if word & BUSY_BIT:
                break
            length = word & ~(BUSY_BIT | DISCARD_BIT)
            total = HEADER + ((length + 7) & ~7)
            if not word & DISCARD_BIT:
                if length == self.event_size:
                    chunks.append(bytes(self._data[offset : offset + total]))
                elif length > self.event_size:  # a longer record: its first event_size bytes
                    body = bytes(self._data[offset + HEADER : offset + HEADER + self.event_size])
                    pad = bytes(stride - HEADER - self.event_size)
                    chunks.append(_U32.pack(self.event_size) + bytes(4) + body + pad)
                else:
                    self.malformed += 1
            pos += total
        self._cons[0] = pos
        if pos == prod:
            self.caught_up_at = time.monotonic()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def release(self) -> None:
        """Let go of the buffers (a memory map cannot close while a view of it lives)."""
        for view in (self._words, self._data, self._cons, self._prod):
            view.release()


class MmapRingBuffer:
    """The consumer side of a BPF ring buffer map (``BPF_MAP_TYPE_RINGBUF``) of
    ``size`` bytes, whose records are all ``event_size`` bytes long."""

    def __init__(self, map_fd: int, size: int, event_size: int) -> None:
        page = mmap.PAGESIZE
        if size % page:
            raise ValueError(f"ring buffer size {size} is not a whole number of pages")
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._producer = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            self._consumer.close()
            raise
        self._ring = RingConsumer(self._consumer, self._producer, page, size, event_size)
        self.stride = self._ring.stride
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    @property
    def malformed(self) -> int:
        return self._ring.malformed

    @staticmethod
    def supported() -> bool:
        """Whether reads without barriers are safe here (x86: loads keep their order)."""
        return platform.machine() in ("x86_64", "AMD64", "i686", "i386")

    def read(self, timeout_s: float) -> bytes:
        cons, prod = self._ring.positions()
        if cons == prod:
            # Pace the wake-ups: after emptying the buffer, let 20 ms of events gather.
            wait = self._ring.caught_up_at + MIN_READ_INTERVAL_S - time.monotonic()
            if wait > 0 and timeout_s > 0:
                time.sleep(min(wait, timeout_s))
                timeout_s = max(0.0, timeout_s - wait)
                cons, prod = self._ring.positions()
            if cons == prod:
                self._epoll.poll(timeout_s)
        return self._ring.take()

    def drain(self) -> bytes:
        out: list[bytes] = []
        while batch := self._ring.take():
            out.append(batch)
        return b"".join(out)

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._epoll.close()
        self._ring.release()
        self._producer.close()
        self._consumer.close()


class BccRingBuffer:
    """The same batches through bcc's callback reader, where mapping is not safe (see the
    module docstring): each record copied out and framed as in the ring buffer."""

    def __init__(self, bpf: Any, table: Any, event_size: int) -> None:
        self._bpf = bpf
        self.event_size = event_size
        self.stride = stride_of(event_size)
        self.malformed = 0
        self._pending: list[bytes] = []
        self._header = _U32.pack(event_size) + bytes(4)
        self._pad = bytes(self.stride - HEADER - event_size)
        table.open_ring_buffer(self._callback())

    def _callback(self) -> Callable[[Any, Any, int], int]:
        def on_record(_ctx: Any, data: Any, size: int) -> int:
            if size < self.event_size:
                self.malformed += 1
            else:
                self._pending.append(self._header + ctypes.string_at(data, self.event_size) + self._pad)
            return 0

        return on_record

    def read(self, timeout_s: float) -> bytes:
        self._bpf.ring_buffer_poll(max(0, int(timeout_s * 1000)))
        return self._flush()

    def drain(self) -> bytes:
        self._bpf.ring_buffer_consume()
        return self._flush()

    def _flush(self) -> bytes:
        out, self._pending = self._pending, []
        return b"".join(out)

    def close(self) -> None:
        pass


def open_reader(bpf: Any, table_name: bytes, event_size: int, size: int) -> RingReader:
    """The fastest safe reader of ring buffer map ``table_name`` (``size`` bytes) here.
    ``TCPTRACE_RINGBUF_READER=bcc`` forces bcc's (tests compare the two)."""
    table = bpf[table_name]
    if MmapRingBuffer.supported() and os.environ.get("TCPTRACE_RINGBUF_READER") != "bcc":
        return MmapRingBuffer(int(table.map_fd), size, event_size)
    return BccRingBuffer(bpf, table, event_size)
