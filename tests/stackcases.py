"""Leak suspects made of the real stacks of tests/data/stacks.json, for the views and JSON.

Each case of stacks.json is one runtime's leak as tcptrace saw it: samples of an operation
with its kernel and user stacks. ``tracker_of`` replays such a case as sockets that leak in
CLOSE_WAIT: born and accepted (or connected) with the origin's stacks, the pre-FIN touch
(a send, or a recv that did not return 0) as ``closewait --touch-stacks`` reads it from the
kernel, the peer's FIN, then the EOF read (a recv returning 0) after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tcptrace.model.closewait import CloseWaitTracker
from tcptrace.model.events import Op, TcpState, Touch, Transition
from tcptrace.model.lifecycle import CodePath

NS = 1_000_000_000
DATA = Path(__file__).parent / "data"
STACKS: dict[str, Any] = json.loads((DATA / "stacks.json").read_text())
CASES = sorted(k for k in STACKS if not k.startswith("_"))
PID = 4242
S = TcpState


def _stacks(sample: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    return {"kstack": tuple(sample["kstack"]), "ustack": tuple(sample["ustack"])}


def tracker_of(case: str, sockets: int = 2, pid: int = PID, threshold_ns: int = NS) -> CloseWaitTracker:
    """A tracker holding ``sockets`` leak suspects of ``case``, 10 s old at ``now_ns(tracker)``."""
    data = STACKS[case]
    comm = data["comm"]
    by_op = {s["op"]: s for s in data["samples"]}
    origin = by_op.get("ACCEPT") or by_op.get("CONNECT")
    post = next((s for s in data["samples"] if s["op"] == "RECV" and s["eof"]), None)
    pre = next((s for s in data["samples"] if s["op"] in ("SEND", "RECV") and not s["eof"]), None)
    tracker = CloseWaitTracker(threshold_ns=threshold_ns)
    for i in range(sockets):
        sk, ts = 0x1000 + i, i * NS
        ep: dict[str, Any] = dict(saddr="127.0.0.1", daddr="127.0.0.1", pid=pid, comm=comm)
        if origin is not None and origin["op"] == "CONNECT":
            ep.update(sport=50000 + i, dport=8080)
            tracker.feed(
                Transition(
                    ts_ns=ts, skaddr=sk, old=S.CLOSE, new=S.SYN_SENT, task_pid=pid, **ep, **_stacks(origin)
                )
            )
            tracker.feed(Transition(ts_ns=ts + 1, skaddr=sk, old=S.SYN_SENT, new=S.ESTABLISHED, **ep))
        else:
            ep.update(sport=8080, dport=50000 + i)
            tracker.feed(Transition(ts_ns=ts, skaddr=sk, old=S.LISTEN, new=S.SYN_RECV, **ep))
            tracker.feed(Transition(ts_ns=ts + 1, skaddr=sk, old=S.SYN_RECV, new=S.ESTABLISHED, **ep))
            if origin is not None:
                tracker.feed(
                    Touch(ts_ns=ts + 2, skaddr=sk, op=Op.ACCEPT, task_pid=pid, **ep, **_stacks(origin))
                )
        tracker.feed(Transition(ts_ns=ts + 10, skaddr=sk, old=S.ESTABLISHED, new=S.CLOSE_WAIT, **ep))
        if pre is not None:
            path = CodePath(Op[pre["op"]], ts + 5, pid, ret=7, **_stacks(pre))
            tracker.add_pre_fin_touch(sk, path)
        if post is not None:
            tracker.feed(
                Touch(ts_ns=ts + 11, skaddr=sk, op=Op.RECV, ret=0, task_pid=pid, **ep, **_stacks(post))
            )
    return tracker


def now_ns(tracker: CloseWaitTracker) -> int:
    return max(s.entered_ns for s in tracker.open.values()) + 10 * NS
