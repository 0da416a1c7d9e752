"""Read timewait.bpf.c's exact in-kernel counters into a model snapshot (TwCounts).

The maps are cumulative from load and never cleared: every read is a "since start"
snapshot and the model takes differences, so no creation is lost to a clear racing the
kernel, nor to an overflowing event stream. Tables are read whole with batch lookups
(kernel/batch.py): what a read costs depends on how many processes and destinations made
TIME_WAIT, never on how many connections they made.
"""

from __future__ import annotations

import time
from typing import Any

from tcptrace.kernel.batch import read_all
from tcptrace.kernel.loader import LoadedProgram
from tcptrace.model.events import decode_comm, family_version, format_addr
from tcptrace.model.timewait import TW_MAP_FAILURES, Dest, Proc, ProcCounts, TwCounts

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
    "tws_failed",
    "no_owner",
    "killed",
    "timer_starts",
    "pending_failed",
    "procs_failed",
    "dests_failed",
    "pending_stale",
    "handler_learned",
    "closed_no_tw",
)


# A cancel pending longer than this is a kill (see TimewaitReader.unsettled_kills).
STALE_CANCEL_NS = 1_000_000
SWEEP_EVERY_NS = 180 * 1_000_000_000
"""How often a long run sweeps `tws` (sweep_tws)."""
# No tw lives longer than this after its timer's last start: a parked one at most
# tcp_fin_timeout's share (<= 60 s), a TIME_WAIT one 60 s, the timer wheel's rounding on
# top. An entry of `tws` older than that is one whose end the kernel side missed.
TW_MAX_ARMED_NS = 180 * 1_000_000_000


def stats_of(program: LoadedProgram) -> dict[str, int]:
    """The `tw_stats` counters summed over CPUs, and ``map_failed``: every failed insert."""
    table = program.bpf["tw_stats"]
    out = {name: int(table.sum(i).value) for i, name in enumerate(STAT_NAMES)}
    out["map_failed"] = sum(out[name] for name in TW_MAP_FAILURES.values())
    return out


def proc_key(key: Any) -> tuple[int, int]:
    """(tgid, start time) of a `tw_procs` key."""
    return int(key.tgid), int(key.start_ns)


def dest_of_key(key: Any) -> Dest:
    """The model's Dest of a `tw_dests` key."""
    family = int(key.family)
    return Dest(
        family_version(family),
        format_addr(bytes(key.laddr), family),
        format_addr(bytes(key.raddr), family),
        int(key.rport),
        int(key.lport),
        int(key.netns),
    )


class TimewaitReader:
    """Snapshots of a loaded timewait program's maps."""

    def __init__(self, program: LoadedProgram) -> None:
        self._program = program
        self._procs = program.bpf["tw_procs"]
        self._dests = program.bpf["tw_dests"]
        self._cancelled = program.bpf["tw_cancelled"]
        # Keys decoded once: a read then costs a dict lookup per row (tw_dests holds one
        # row per destination for the whole run, and is never pruned by the command).
        self._dest_keys: dict[bytes, Dest] = {}
        self.swept = 0
        """`tws` entries the sweep removed (their end went unseen)."""
        self._swept_ns: int | None = None

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
            if slot.valid and slot.w.kept and now_ns - int(slot.ts_ns) >= STALE_CANCEL_NS
        )

    def stats(self) -> dict[str, int]:
        out = stats_of(self._program)
        out["tws_swept"] = self.swept
        return out

    def counts(self) -> TwCounts:
        s = stats_of(self._program)
        procs: dict[Proc, ProcCounts] = {}
        for key, value in read_all(self._procs):
            tgid, start_ns = proc_key(key)
            procs[Proc(tgid, decode_comm(bytes(value.comm)), start_ns)] = ProcCounts(
                int(value.created), int(value.parked), int(value.resets_sent), int(value.resets_received)
            )
        dests: dict[Dest, int] = {}
        known = self._dest_keys
        for key, value in read_all(self._dests):
            raw = bytes(key)
            dest = known.get(raw)
            if dest is None:
                dest = known[raw] = dest_of_key(key)
            dests[dest] = int(value)
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

    def sweep_if_due(self, now_ns: int) -> int:
        """sweep() when SWEEP_EVERY_NS have passed since the last one (or since the first
        call): for a command that runs long, at each tick; returns how many went."""
        if self._swept_ns is None:
            self._swept_ns = now_ns
        elif now_ns - self._swept_ns >= SWEEP_EVERY_NS:
            self._swept_ns = now_ns
            return self.sweep()
        return 0

    def sweep(self, now_ns: int | None = None) -> int:
        """sweep_tws() on this program; the count is kept (``tws_swept`` in stats())."""
        gone = sweep_tws(self._program, now_ns)
        self.swept += gone
        return gone


def sweep_tws(program: LoadedProgram, now_ns: int | None = None) -> int:
    """Delete the `tws` entries whose tw cannot be alive any more (the kernel side missed
    its end: without this they would fill the table over weeks); returns how many. Costs a
    read of the table (one entry per live tw): run it every few minutes."""
    tws = program.bpf["tws"]
    now_ns = time.monotonic_ns() if now_ns is None else now_ns
    gone = 0
    for key, value in read_all(tws):
        if now_ns - int(value.armed_ns) <= TW_MAX_ARMED_NS:
            continue
        # Read again just before deleting: a new tw at that address replaces the entry
        # (its timer start is recent), and must stay.
        current = tws.get(key)
        if current is None or now_ns - int(current.armed_ns) <= TW_MAX_ARMED_NS:
            continue
        try:
            del tws[key]
            gone += 1
        except KeyError:
            pass  # its end came meanwhile
    return gone
