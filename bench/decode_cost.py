"""What one event costs tcptrace's user side, stage by stage (run by scripts/bench).

A raw ``struct tt_event`` of the real layout (bcc's, from a compiled lifecycle program) is
pushed through the stages of the dataclass path, which replays and the other commands run
for every event: decode (``from_raw``), the summary, ``to_json``, ``json.dumps``, and the
write with its flush; then through the hot path `states --json`, `record` and `states` take
live (a batch of raw records straight to text, model/raw.py), with the same records and
with a new port every 5 events (cache misses, as under churn). The best of several
repeats, in microseconds per event, so the numbers say where the time of a saturated
consumer goes.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

REPEATS = 5
N = 5000


def _best_us(fn: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(N):
            fn()
        best = min(best, (time.perf_counter() - start) / N)
    return best * 1e6


def raw_event() -> Any:
    """One ESTABLISHED -> FIN_WAIT1 transition of a loopback socket, in bcc's layout."""
    from tcptrace.kernel.loader import PARTS, load

    program = load([PARTS["lifecycle"]])
    try:
        raw = program.event_type()
    finally:
        program.close()
    raw.ts_ns, raw.skaddr, raw.value_ns = 123_456_789, 0xFFFF888150E8E5C0, 80_000
    raw.task_tgid = raw.task_pid = raw.owner_tgid = 4242
    raw.kstack = raw.ustack = -1
    raw.family, raw.kind, raw.oldstate, raw.newstate = 2, 1, 1, 4
    raw.sport, raw.dport = 57208, 45200
    for field in (raw.saddr, raw.daddr):
        field[0], field[3] = 127, 1
    # Into the structure itself: ``raw.task_comm`` (a char array) reads as a new bytes
    # object (for an all-zero one, the interpreter's shared b""), not as the field's memory.
    for name in ("task_comm", "owner_comm"):
        ctypes.memmove(ctypes.addressof(raw) + getattr(type(raw), name).offset, b"loadgen", 7)
    return raw


def framed(raw: Any, n: int, churn: bool = False) -> bytes:
    """A batch of ``n`` copies of ``raw`` framed as the ring buffer frames them (model/raw.py);
    ``churn``: a new local port every 5 events, as a connection's transitions come."""
    from tcptrace.model.raw import HEADER

    size = ctypes.sizeof(raw)
    pad = bytes(((size + 7) & ~7) - size)
    head = size.to_bytes(4, sys.byteorder) + bytes(4)
    out = []
    copy = type(raw).from_buffer_copy(raw)
    for i in range(n):
        if churn:
            copy.sport = 20000 + (i // 5) % 40000
            copy.ts_ns = raw.ts_ns + i
        out.append(head + bytes(copy) + pad)
    batch = b"".join(out)
    assert len(batch) == n * (HEADER + size + len(pad))
    return batch


def _best_batch_us(fn: Callable[[], Any], n: int) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def measure() -> dict[str, float]:
    from tcptrace.model.events import from_raw, to_json
    from tcptrace.model.states import StatesSummary
    from tcptrace.recording import JsonLinesWriter

    raw = raw_event()
    event = from_raw(raw)
    obj = to_json(event)
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
    summary = StatesSummary()
    with open(os.devnull, "w") as devnull:
        writer = JsonLinesWriter(devnull)

        def pipeline() -> None:
            ev = from_raw(raw)
            summary.feed(ev)
            writer.event(ev)

        def write_flush() -> None:
            devnull.write(text)
            devnull.flush()

        costs = {
            "from_raw": _best_us(lambda: from_raw(raw)),
            "summary.feed": _best_us(lambda: summary.feed(event)),
            "to_json": _best_us(lambda: to_json(event)),
            "json.dumps": _best_us(lambda: json.dumps(obj, ensure_ascii=False, separators=(",", ":"))),
            "write+flush (/dev/null)": _best_us(write_flush),
            "states --json, all stages": _best_us(pipeline),
        }
    # The hot path `states --json`, `record` and `states` take live: a batch of raw records
    # straight to text (model/raw.py, views/states.py), reported only when its text equals
    # the stages' above byte for byte.
    from tcptrace.model.raw import JsonLines, RawLayout
    from tcptrace.views.common import make_console
    from tcptrace.views.states import TransitionRows, print_event

    layout = RawLayout.of(type(raw))
    batch, churn = framed(raw, N), framed(raw, N, churn=True)
    with open(os.devnull, "w") as devnull:
        if JsonLines(layout).feed(framed(raw, 1))[0] == text:
            costs["hot path: batch -> JSON lines, one write"] = _best_batch_us(
                lambda: devnull.write(JsonLines(layout).feed(batch)[0]), N
            )
            costs["hot path: the same, a new port every 5 events"] = _best_batch_us(
                lambda: devnull.write(JsonLines(layout).feed(churn)[0]), N
            )
        console = make_console(file=devnull)
        with console.capture() as captured:
            print_event(console, event, 0)
        if TransitionRows(layout, console, 0).feed(framed(raw, 1))[0] == captured.get():
            costs["states (table): print_event"] = _best_us(lambda: print_event(console, event, 0))
            costs["hot path: batch -> table rows, one write"] = _best_batch_us(
                lambda: devnull.write(TransitionRows(layout, console, 0).feed(batch)[0]), N
            )
    return costs
