"""What one event costs tcptrace's user side, stage by stage (run by scripts/bench).

A raw ``struct tt_event`` of the real layout (bcc's, from a compiled lifecycle program) is
pushed through the stages `tcptrace states --json` runs for every event: decode
(``from_raw``), the summary, ``to_json``, ``json.dumps``, and the write with its flush. The
best of several repeats, in microseconds per event, so the numbers say where the time of
a saturated consumer goes.
"""

from __future__ import annotations

import ctypes
import json
import os
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
    ctypes.memmove(raw.task_comm, b"loadgen", 7)
    ctypes.memmove(raw.owner_comm, b"loadgen", 7)
    return raw


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

        return {
            "from_raw": _best_us(lambda: from_raw(raw)),
            "summary.feed": _best_us(lambda: summary.feed(event)),
            "to_json": _best_us(lambda: to_json(event)),
            "json.dumps": _best_us(lambda: json.dumps(obj, ensure_ascii=False, separators=(",", ":"))),
            "write+flush (/dev/null)": _best_us(write_flush),
            "states --json, all stages": _best_us(pipeline),
        }
