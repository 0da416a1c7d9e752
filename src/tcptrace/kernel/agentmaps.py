"""What the agent needs of the loaded maps beyond what the commands read: raw keyed reads
(so that idle entries can be deleted), deletion, and bcc's per-pid symbol caches (the
stack map's bound is kernel/cwreader.StackResolver.recycle).

The timewait and closelat maps are cumulative and never pruned by the kernel: keyed by
process (and destination, call, user stack), they would fill with the keys of processes
long gone and then refuse new ones. The agent reads them every interval, exports the
differences, and deletes entries whose values have not moved for a while (see
model/cardinality.MapDeltas). Deleting an idle entry can lose an increment that lands
between the read and the delete: only for a key idle for several intervals.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tcptrace.kernel.batch import BatchReader
from tcptrace.kernel.loader import LoadedProgram
from tcptrace.kernel.timewait import dest_of_key, proc_key, stats_of
from tcptrace.model.agent import ProcTw
from tcptrace.model.closelat import CALLS
from tcptrace.model.events import Op, decode_comm
from tcptrace.model.histogram import SLOTS, Log2Histogram
from tcptrace.model.timewait import Dest


class AgentMaps:
    """Raw reads and deletes of tw_procs, tw_dests and cl_hists."""

    def __init__(self, program: LoadedProgram) -> None:
        self._bpf = program.bpf
        self._program = program
        names = {p.file for p in program.parts}
        self._tw = "timewait.bpf.c" in names
        self._cl = "closelat.bpf.c" in names
        self._raw: dict[tuple[str, Any], Any] = {}
        self.cl_comm: dict[tuple[int, int, str, int], str] = {}
        self._readers: dict[str, BatchReader] = {}  # one per table: buffers made once

    # ---- reads, keyed so that entries can be deleted later ------------------------------

    def tw_procs(self) -> dict[tuple[int, int], ProcTw]:
        """(pid, process start time) -> its TIME_WAIT counters: a pid reused by another
        process is another key."""
        if not self._tw:
            return {}
        out = {}
        for key, v in self._read("tw_procs"):
            proc = proc_key(key)
            self._raw[("tw_procs", proc)] = key
            out[proc] = ProcTw(
                decode_comm(bytes(v.comm)),
                int(v.created),
                int(v.parked),
                int(v.resets_sent),
                int(v.resets_received),
            )
        return out

    def tw_dests(self) -> dict[Dest, int]:
        """Destination (network namespace included) -> TIME_WAIT creations."""
        if not self._tw:
            return {}
        out = {}
        for key, v in self._read("tw_dests"):
            dest = dest_of_key(key)
            self._raw[("tw_dests", dest)] = key
            out[dest] = int(v)
        return out

    def cl_hists(self) -> dict[tuple[int, int, str, int], Log2Histogram]:
        """(pid, process start time, call, user stack id) -> cumulative close() latency
        histogram; the comm (the process's, whose pid may be reused) is kept aside
        (``cl_comm``)."""
        if not self._cl:
            return {}
        out = {}
        self.cl_comm = {}
        for key, v in self._read("cl_hists"):
            try:
                call = CALLS[Op(int(key.op))]
            except (ValueError, KeyError):
                call = "close"
            k = (int(key.tgid), int(key.start_ns), call, int(key.ustack))
            self._raw[("cl_hists", k)] = key
            counts = [int(v.slots[i]) for i in range(min(SLOTS, len(v.slots)))]
            out[k] = Log2Histogram.from_slots(counts, int(v.sum_ns), int(v.max_ns))
            self.cl_comm[k] = decode_comm(bytes(v.comm))
        return out

    def _read(self, table: str) -> list[tuple[Any, Any]]:
        """Every entry of ``table``, copied (its keys are kept to delete entries later)."""
        reader = self._readers.get(table)
        if reader is None:
            reader = self._readers[table] = BatchReader(self._bpf[table])
        return reader.copied()

    def delete(self, table: str, keys: Iterable[Any]) -> int:
        """Delete entries read earlier by their keys; returns how many went."""
        t = self._bpf[table]
        gone = 0
        for k in keys:
            raw = self._raw.pop((table, k), None)
            if raw is None:
                continue
            try:
                del t[raw]
                gone += 1
            except KeyError:
                pass
        return gone

    def forget_raw(self) -> None:
        """Drop the raw keys of this round's reads (those not deleted)."""
        self._raw.clear()

    # ---- counters ------------------------------------------------------------------------

    def tw_stats(self) -> dict[str, int]:
        if not self._tw:
            return {}
        return stats_of(self._program)

    def cl_stats(self) -> dict[str, int]:
        if not self._cl:
            return {}
        from tcptrace.kernel.closelat import STAT_NAMES

        table = self._bpf["cl_stats"]
        return {name: int(table.sum(i).value) for i, name in enumerate(STAT_NAMES)}


def symbol_cache_count(program: LoadedProgram) -> int:
    return len(getattr(type(program.bpf), "_sym_caches", {}))
