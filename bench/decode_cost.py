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


def prototype(keys: list[str]) -> Callable[[Any], str]:
    """What `states --json` could cost: raw event -> JSON text with no dataclass in between,
    addresses and comms cached. Only a yardstick for a proposal: the bench reports it only
    when its text equals the real pipeline's byte for byte."""
    import socket

    from tcptrace.model.events import TcpState

    names = {s.value: s.name for s in TcpState}
    addrs: dict[tuple[bytes, int], str] = {}
    comms: dict[bytes, str] = {}

    def addr(raw: Any, family: int) -> str:
        key = (bytes(raw), family)
        text = addrs.get(key)
        if text is None:
            if family == socket.AF_INET:
                text = socket.inet_ntop(socket.AF_INET, key[0][:4])
            else:
                import ipaddress

                text = str(ipaddress.IPv6Address(key[0][:16]))
            if len(addrs) < 4096:
                addrs[key] = text
        return text

    def comm(raw: Any) -> str:
        key = bytes(raw)
        text = comms.get(key)
        if text is None:
            text = key.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
            if len(comms) < 4096:
                comms[key] = text
        return text

    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    def fast(raw: Any) -> str:
        family, owner = raw.family, raw.owner_tgid
        d = {
            "type": "transition",
            "ts_ns": raw.ts_ns,
            "skaddr": f"0x{raw.skaddr:x}",
            "family": 6 if family == socket.AF_INET6 else 4,
            "saddr": addr(raw.saddr, family),
            "sport": raw.sport,
            "daddr": addr(raw.daddr, family),
            "dport": raw.dport,
            "pid": owner or None,
            "comm": comm(raw.owner_comm) if owner else None,
            "task_pid": raw.task_tgid,
            "task_tid": raw.task_pid,
            "task_comm": comm(raw.task_comm),
            "cgroup": None,
            "kstack": [],
            "ustack": [],
            "old": names[raw.oldstate],
            "new": names[raw.newstate],
            "prev_ns": raw.value_ns or None,
            "sk_flags": raw.sk_flags,
        }
        return dumps({k: d[k] for k in keys}) + "\n"

    return fast


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
    try:
        fast = prototype(list(obj))
        same = fast(raw) == text
    except (KeyError, ValueError):
        same = False
    if same:
        costs["prototype: raw -> JSON, no dataclass (same text)"] = _best_us(lambda: fast(raw))
    return costs
