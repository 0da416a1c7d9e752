"""Read timewait.bpf.c's exact in-kernel counters into a model snapshot (TwCounts).

The maps are cumulative from load and never cleared: every read is a "since start"
snapshot and the model takes differences, so no creation is lost to a clear racing the
kernel, nor to an overflowing event stream.
"""

from __future__ import annotations

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
)


class TimewaitReader:
    """Snapshots of a loaded timewait program's maps."""

    def __init__(self, program: LoadedProgram) -> None:
        self._stats = program.bpf["tw_stats"]
        self._procs = program.bpf["tw_procs"]
        self._dests = program.bpf["tw_dests"]

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
            killed=s["killed"],
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


# bpf(2) command and the kernel's own count of skipped runs of a program.
