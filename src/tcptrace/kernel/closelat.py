"""Read closelat's in-kernel histograms (bpf/closelat.bpf.c) into model rows.

The maps are cumulative from load and never cleared, so every read is a consistent
"since start" snapshot: the model takes differences for per-interval reports, and no
count is lost to a clear racing a close().
"""

from __future__ import annotations

from typing import Any

from tcptrace.kernel.batch import BatchReader
from tcptrace.kernel.loader import LoadedProgram
from tcptrace.kernel.stream import Symbolizer
from tcptrace.model.closelat import CallKey, CallStats
from tcptrace.model.events import Op, decode_comm
from tcptrace.model.histogram import SLOTS, Log2Histogram

# Indexes of `cl_stats`: TT_CL_STAT_* in bpf/closelat.bpf.c.
STAT_NAMES = ("calls", "call_failed", "hist_failed", "flagged")

# Knobs of bpf/closelat.bpf.c, as -D defines.
LINGER_NS = "TT_CL_LINGER_NS"
CLOSE_WAIT_NS = "TT_CL_CLOSE_WAIT_NS"


def closelat_defines(close_wait_ns: int, linger_ns: int = 1_000_000) -> dict[str, int]:
    """What the closelat command compiles with: no transition events (lifecycle only keeps
    the socket table), and its thresholds."""
    return {"TT_NO_TRANSITION_EVENTS": 1, CLOSE_WAIT_NS: int(close_wait_ns), LINGER_NS: int(linger_ns)}


class CloseLatencyReader:
    """Cumulative rows and counters of a loaded closelat program."""

    def __init__(self, program: LoadedProgram, symbolizer: Symbolizer | None = None) -> None:
        self._program = program
        self._hists = program.bpf["cl_hists"]
        self._stats = program.bpf["cl_stats"]
        self._symbolizer = symbolizer
        self._reader: BatchReader | None = None

    def rows(self) -> list[CallStats]:
        """One row per kernel key (process, call, user stack), cumulative since load; read
        with batch lookups (kernel/batch.py)."""
        if self._reader is None:
            self._reader = BatchReader(self._hists)
        return [self._row(key, value) for key, value in self._reader]

    def _row(self, key: Any, value: Any) -> CallStats:
        pid = int(key.tgid)
        stack: tuple[str, ...] = ()
        if self._symbolizer is not None and int(key.ustack) >= 0:
            stack = self._symbolizer.frames(int(key.ustack), pid)
        counts = [int(value.slots[i]) for i in range(SLOTS)]
        hist = Log2Histogram.from_slots(counts, int(value.sum_ns), int(value.max_ns))
        try:
            op = Op(int(key.op))
        except ValueError:
            op = Op.CLOSE
        return CallStats(
            CallKey(pid, decode_comm(bytes(value.comm)), op, stack),
            hist,
            resets=int(value.resets),
            lingered=int(value.lingered),
            late_close_wait=int(value.late_close_wait),
        )

    def counters(self) -> dict[str, int]:
        """Exact counters of the closelat program, summed over CPUs, and ``skipped_runs``."""
        out = {name: int(self._stats.sum(i).value) for i, name in enumerate(STAT_NAMES)}
        out["skipped_runs"] = self.skipped_runs()
        return out

    def skipped_runs(self) -> int:
        """Runs of the program's hooks the kernel skipped (LoadedProgram.skipped_runs): a
        skipped lifecycle or reset hook can leave a socket's state age or a reset unseen."""
        return sum((self._program.skipped_runs() or {}).values())
