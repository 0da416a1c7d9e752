"""The consumer's walk over a BPF ring buffer's memory, on bytearrays laid out as the kernel
lays out the map (kernel/bpf/ringbuf.c): committed records are taken in order, a busy one
ends the batch, discarded ones are skipped, and the consumer position says what was taken."""

from __future__ import annotations

import struct

import pytest

from tcptrace.kernel import ringbuf
from tcptrace.kernel.ringbuf import BUSY_BIT, DISCARD_BIT, HEADER, RingConsumer, stride_of

PAGE = 4096
EVENT = 160
STRIDE = stride_of(EVENT)


class FakeRing:
    """A ring buffer's two pages and data area (mapped twice, as the kernel maps it)."""

    def __init__(self, size: int = 4 * PAGE) -> None:
        self.size = size
        self.consumer = bytearray(PAGE)
        self.producer = bytearray(PAGE + 2 * size)
        self.prod = 0
        self.ring = RingConsumer(self.consumer, self.producer, PAGE, size, EVENT)

    def _write(self, pos: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            phys = (pos + i) % self.size
            self.producer[PAGE + phys] = byte
            self.producer[PAGE + self.size + phys] = byte  # the second mapping of that page

    def produce(self, body: bytes, flags: int = 0) -> int:
        """Reserve and write a record (``flags``: BUSY_BIT while it is being written)."""
        pos = self.prod
        self._write(pos, struct.pack("=II", len(body) | flags, 0) + body)
        self.prod += HEADER + ((len(body) + 7) & ~7)
        struct.pack_into("=Q", self.producer, 0, self.prod)
        return pos

    def commit(self, pos: int) -> None:
        (word,) = struct.unpack_from("=I", self.producer, PAGE + pos % self.size)
        self._write(pos, struct.pack("=I", word & ~BUSY_BIT))

    @property
    def consumed(self) -> int:
        return int(struct.unpack_from("=Q", self.consumer, 0)[0])

    def set_consumed(self, pos: int) -> None:
        struct.pack_into("=Q", self.consumer, 0, pos)


def body(n: int, size: int = EVENT) -> bytes:
    return bytes([n % 251]) * size


def records(batch: bytes) -> list[bytes]:
    """The event bytes of a batch, record by record (each framed with its length)."""
    assert len(batch) % STRIDE == 0
    out = []
    for off in range(0, len(batch), STRIDE):
        assert struct.unpack_from("=I", batch, off)[0] == EVENT
        out.append(batch[off + HEADER : off + HEADER + EVENT])
    return out


def test_committed_records_are_taken_in_order_and_released() -> None:
    ring = FakeRing()
    for n in range(5):
        ring.produce(body(n))
    assert records(ring.ring.take()) == [body(n) for n in range(5)]
    assert ring.consumed == ring.prod
    assert ring.ring.take() == b""


def test_a_busy_record_ends_the_batch_until_it_is_committed() -> None:
    ring = FakeRing()
    ring.produce(body(0))
    busy = ring.produce(body(1), BUSY_BIT)
    ring.produce(body(2))  # committed by another CPU, but after the busy one
    assert records(ring.ring.take()) == [body(0)]
    assert ring.consumed == busy
    assert ring.ring.take() == b""
    ring.commit(busy)
    assert records(ring.ring.take()) == [body(1), body(2)]
    assert ring.consumed == ring.prod


def test_discarded_records_are_skipped() -> None:
    ring = FakeRing()
    ring.produce(body(0))
    ring.produce(body(1), DISCARD_BIT)
    ring.produce(body(2))
    assert records(ring.ring.take()) == [body(0), body(2)]
    assert ring.consumed == ring.prod


def test_a_record_across_the_end_is_read_whole() -> None:
    ring = FakeRing(size=PAGE)
    start = PAGE - STRIDE // 2  # the record wraps around the end of the data area
    ring.prod = start
    ring.set_consumed(start)
    ring.produce(body(7))
    ring.produce(body(8))
    assert records(ring.ring.take()) == [body(7), body(8)]
    assert ring.consumed == ring.prod


def test_records_of_another_size_are_cut_or_counted() -> None:
    ring = FakeRing()
    ring.produce(body(1, EVENT + 16))  # longer: its first EVENT bytes are the event
    ring.produce(body(2, 8))  # too short to be an event
    ring.produce(body(3))
    assert records(ring.ring.take()) == [body(1), body(3)]
    assert ring.ring.malformed == 1
    assert ring.consumed == ring.prod


def test_a_full_buffer_comes_in_batches_of_bounded_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ringbuf, "MAX_BATCH_BYTES", 3 * STRIDE)
    ring = FakeRing()
    for n in range(8):
        ring.produce(body(n))
    got = []
    while batch := ring.ring.take():
        assert len(batch) <= 3 * STRIDE
        got.extend(records(batch))
    assert got == [body(n) for n in range(8)]
    assert ring.consumed == ring.prod


def test_catching_up_is_noted_for_pacing() -> None:
    ring = FakeRing()
    ring.produce(body(0))
    ring.produce(body(1), BUSY_BIT)
    ring.ring.take()
    assert ring.ring.caught_up_at == 0.0  # a record still waits
    ring.commit(STRIDE)
    ring.ring.take()
    assert ring.ring.caught_up_at > 0.0


def test_sizes_that_are_not_a_ring_buffer_are_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        RingConsumer(bytearray(PAGE), bytearray(PAGE + 6 * PAGE), PAGE, 3 * PAGE, EVENT)
