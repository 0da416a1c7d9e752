"""Read timewait.bpf.c's exact in-kernel counters into a model snapshot (TwCounts).

The maps are cumulative from load and never cleared: every read is a "since start"
snapshot and the model takes differences, so no creation is lost to a clear racing the
kernel, nor to an overflowing event stream.
"""

from __future__ import annotations

import time
from typing import Any

from tcptrace.kernel.loader import LoadedProgram
from tcptrace.model.events import decode_comm, family_version, format_addr
from tcptrace.model.timewait import Dest, ProcCounts, TwCounts

# Indexes of `tw_stats`: TT_TW_STAT_* in bpf/tcptrace.h.
STAT_NAMES = (
    "created",
    "immediate",
    "parked",
    "converted_fin",
    "converted_timer",
    "parked_ended",
    "expired",
    "resets_sent",
    "resets_received",
    "announced",
    "confirmed",
    "map_failed",
    "no_owner",
    "killed",
    "timer_starts",
)


# A cancel pending longer than this is a kill (see TimewaitReader.unsettled_kills).
STALE_CANCEL_NS = 1_000_000


class TimewaitReader:
    """Snapshots of a loaded timewait program's maps."""

    def __init__(self, program: LoadedProgram) -> None:
        self._stats = program.bpf["tw_stats"]
        self._procs = program.bpf["tw_procs"]
        self._dests = program.bpf["tw_dests"]
        self._cancelled = program.bpf["tw_cancelled"]

    def unsettled_kills(self, now_ns: int | None = None) -> int:
        """Kills the kernel side has not settled yet.

        A TIME_WAIT tw's timer cancel is settled (kill, re-arm or expiry) at the next tw
        timer event on its CPU, so up to one kill per CPU waits for one. A re-arm or an
        expiry follows its cancel within the same timer-base critical section, so a cancel
        still pending after a millisecond can only be a kill: it is counted here, and the
        kernel's own count takes it over once it settles (the slot is cleared). Stats are
        read before this, so a settling in between undercounts one snapshot, never doubles.
        """
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        return sum(
            1
            for slot in self._cancelled[self._cancelled.Key(0)]
            if slot.valid and now_ns - int(slot.ts_ns) >= STALE_CANCEL_NS
        )

    def stats(self) -> dict[str, int]:
        return {name: int(self._stats.sum(i).value) for i, name in enumerate(STAT_NAMES)}

    def counts(self) -> TwCounts:
        s = self.stats()
        procs: dict[tuple[int, str], ProcCounts] = {}
        for key, value in self._procs.items():
            pk = (int(key.value), decode_comm(bytes(value.comm)))
            procs[pk] = procs.get(pk, ProcCounts()) + ProcCounts(
                int(value.created), int(value.parked), int(value.resets_sent), int(value.resets_received)
            )
        dests = {self._dest(k): int(v.value) for k, v in self._dests.items()}
        return TwCounts(
            immediate=s["immediate"],
            parked=s["parked"],
            converted_fin=s["converted_fin"],
            converted_timer=s["converted_timer"],
            parked_ended=s["parked_ended"],
            resets_sent=s["resets_sent"],
            resets_received=s["resets_received"],
            killed=s["killed"] + self.unsettled_kills(),
            by_process=procs,
            by_dest=dests,
        )

    @staticmethod
    def _dest(key: Any) -> Dest:
        family = int(key.family)
        return Dest(
            family_version(family),
            format_addr(bytes(key.laddr), family),
            format_addr(bytes(key.raddr), family),
            int(key.rport),
        )
