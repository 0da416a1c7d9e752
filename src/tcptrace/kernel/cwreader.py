"""Read closewait.bpf.h's maps into CwSnapshots (model/cwagg.py), and resolve their stacks.

Once per interval: the counters (per-CPU arrays), the time-to-close histogram, the
per-owner counts and the sockets in CLOSE_WAIT now, each map in one or a few batch
lookups. What this costs depends on how many sockets are in CLOSE_WAIT and how many
owners there are, never on the connection rate.

Stacks stay ids in the kernel's stack map until a socket is shown (model/closewait.py
resolves a leak suspect's code paths through ``StackResolver``), each (stack, process)
symbolized once and cached while the process lives. The stack map is emptied only when
it refuses stacks, after every socket still in CLOSE_WAIT had its stacks resolved
(``StackResolver.recycle``); ids keep the map's generation, so an id taken before is never
read as the stack that reuses it.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterable
from typing import Any

from tcptrace.kernel.batch import BatchReader, percpu_sums, scalar
from tcptrace.kernel.loader import STAT_NAMES, LoadedProgram
from tcptrace.kernel.seeds import Seeding
from tcptrace.kernel.stream import Symbolizer
from tcptrace.model.closewait import CloseWaitModel
from tcptrace.model.cwagg import CodeRef, CwCounters, CwSnapshot, OpenSocket, OwnerCounts, OwnerKey, PortsKey
from tcptrace.model.endpoint import Endpoint, Owner
from tcptrace.model.events import Op, TcpState, decode_comm, family_version, format_addr
from tcptrace.model.filters import EventFilter
from tcptrace.model.histogram import SLOTS, Log2Histogram
from tcptrace.model.lifecycle import CodePath
from tcptrace.system import hostsnap, sockets
from tcptrace.system.symbols import StackLines

# Indexes of `cw_stats`: TT_CW_STAT_* in bpf/tcptrace.h.
CW_STAT_NAMES = (
    "entered",
    "closed",
    "reset",
    "forgotten",
    "closed_preexisting",
    "reset_preexisting",
    "open_failed",
    "owner_failed",
    "touches",
)
PREEXISTING = 1  # TT_CW_PREEXISTING (tt_cw.flags)
STACK_EXPIRED = "[stack expired]"
RECYCLE_EVERY_NS = 10_000_000_000
"""At most one emptying of the stack map this often: each one costs two syscalls a stack
(~30 ms for a full map), and under churn whose stacks all differ (code without frame
pointers) the map refuses stacks again within a second, so emptying it at every refusal
made user-space CPU grow with the connection rate. Meanwhile refusals are counted."""


class CloseWaitReader:
    """Snapshots of a program loaded with TT_CW_AGG."""

    def __init__(self, program: LoadedProgram) -> None:
        bpf = program.bpf
        self._program = program
        self._cw_stats = bpf["cw_stats"]
        self._stats = bpf["stats"]
        self._hist = bpf["cw_hist"]
        self._owners = BatchReader(bpf["cw_owners"])
        self._open = BatchReader(bpf["cw_open"])
        self._seeds = BatchReader(bpf["cw_seeds"])
        self._moves = bpf["state_moves"]

    def counters(self) -> CwCounters:
        cw = percpu_sums(self._cw_stats)
        table = dict(zip(STAT_NAMES, percpu_sums(self._stats), strict=False))
        return CwCounters(
            **dict(zip(CW_STAT_NAMES, cw, strict=False)),
            owner_forgotten=table["owner_forgotten"],
            seeds_used=table["seeds_used"],
            adopted=table["adopted"],
            sock_update_failed=table["sock_update_failed"],
            stack_failed=table["stack_failed"],
        )

    def state_moves(self) -> dict[tuple[TcpState, TcpState], int]:
        """Transitions that passed the filters since load, by (old, new) state."""
        out = {}
        for index, n in enumerate(percpu_sums(self._moves)):
            if n:
                try:
                    out[(TcpState(index >> 4), TcpState(index & 15))] = n
                except ValueError:
                    continue
        return out

    def snapshot(self, at_ns: int) -> CwSnapshot:
        counters = self.counters()
        hist, min_ns = self._time_to_close()
        owners = tuple(_owner(k, v) for k, v in self._owners)
        opened = tuple(_open(k, v) for k, v in self._open)
        untouched = frozenset((int(k.netns), _endpoint(k)) for k, _ in self._seeds)
        return CwSnapshot(
            at_ns=at_ns,
            counters=counters,
            time_to_close=hist,
            min_close_ns=min_ns,
            owners=owners,
            open=opened,
            untouched=untouched,
        )

    def delete_owners(self, keys: Iterable[OwnerKey]) -> int:
        """Delete idle entries of ``cw_owners`` (the agent, which runs for weeks; their
        counts stay in the global ones); returns how many went."""
        table = self._owners.table
        gone = 0
        for k in keys:
            key = table.Key()
            key.tgid, key.start_ns = k.pid, k.start_ns
            try:
                del table[key]
                gone += 1
            except KeyError:
                pass
        return gone

    def _time_to_close(self) -> tuple[Log2Histogram, int | None]:
        slots = [0] * SLOTS
        total = top = 0
        low: int | None = None
        for cpu in self._hist.getvalue(self._hist.Key(0)):
            for i in range(SLOTS):
                slots[i] += int(cpu.slots[i])
            total += int(cpu.sum_ns)
            top = max(top, int(cpu.max_ns))
            if cpu.min_ns_plus1:
                m = int(cpu.min_ns_plus1) - 1
                low = m if low is None else min(low, m)
        return Log2Histogram.from_slots(slots, total, top), low


def _endpoint(t: Any) -> Endpoint:
    family = int(t.family)
    return Endpoint(
        family_version(family),
        format_addr(bytes(t.saddr), family),
        int(t.sport),
        format_addr(bytes(t.daddr), family),
        int(t.dport),
    )


def _owner_of(o: Any) -> Owner | None:
    tgid = int(o.tgid)
    if not tgid:
        return None
    return Owner(tgid, decode_comm(bytes(o.comm)), int(o.cgroup) or None)


def _code(c: Any) -> CodeRef | None:
    ts = int(c.ts_ns)
    if not ts:
        return None
    try:
        op = Op(int(c.op))
    except ValueError:
        return None
    return CodeRef(op, ts, int(c.ret), int(c.tgid), int(c.ustack), int(c.gen))


def _open(key: Any, v: Any) -> OpenSocket:
    return OpenSocket(
        skaddr=scalar(key),
        netns=int(v.t.netns),
        endpoint=_endpoint(v.t),
        owner=_owner_of(v.owner),
        owner_start_ns=int(v.owner.start_ns),
        entered_ns=int(v.entered_ns),
        born_ns=int(v.born_ns) or None,
        preexisting=bool(int(v.flags) & PREEXISTING),
        touches=int(v.touches),
        eof_ns=int(v.eof_ns) or None,
        origin=_code(v.origin),
        pre_fin=_code(v.pre_fin),
        post_fin=_code(v.post_fin),
        last=_code(v.last),
    )


def _owner(key: Any, v: Any) -> OwnerCounts:
    counts = [int(v.slots[i]) for i in range(SLOTS)]
    pid = int(key.tgid)
    return OwnerCounts(
        pid=pid,
        start_ns=int(key.start_ns),
        comm=decode_comm(bytes(v.comm)) if pid else None,
        cgroup=int(v.cgroup) or None,
        entered=int(v.entered),
        closed=int(v.closed),
        reset=int(v.reset),
        forgotten=int(v.forgotten),
        closed_preexisting=int(v.closed_pre),
        reset_preexisting=int(v.reset_pre),
        time_to_close=Log2Histogram.from_slots(counts, int(v.sum_ns), int(v.max_ns)),
        min_close_ns=int(v.min_ns_plus1) - 1 if int(v.min_ns_plus1) else None,
    )


class StackResolver:
    """A table's code path (stack ids) as frames: each user stack symbolized once per
    process, while it lives (``forget_gone``), and expired once the stack map was
    emptied since it was taken."""

    def __init__(self, program: LoadedProgram, lines: StackLines | None = None) -> None:
        self._program = program
        self._symbolizer = Symbolizer(program, lines=lines) if program.stacks else None
        self._gen_table = program.bpf["stack_gen"] if program.stacks else None
        self.generation = 0
        self.recycled = 0
        self._pids: set[int] = set()

    def __call__(self, ref: CodeRef) -> CodePath:
        return CodePath(op=ref.op, ts_ns=ref.ts_ns, task_pid=ref.pid, ret=ref.ret, ustack=self.frames(ref))

    def frames(self, ref: CodeRef) -> tuple[str, ...]:
        if ref.frames is not None:
            return ref.frames
        if ref.ustack_id < 0 or self._symbolizer is None:
            return ()
        if ref.gen != self.generation & 0xFF:
            return (STACK_EXPIRED,)
        self._pids.add(ref.pid)
        return self._symbolizer.frames(ref.ustack_id, ref.pid)

    def symbolized(self, pid: int) -> bool:
        """Whether a user stack of ``pid`` was symbolized (bcc holds a cache for it)."""
        return pid in self._pids

    def forget_gone(self) -> None:
        """Drop what was symbolized for processes that have exited (their pid may be reused)."""
        if self._symbolizer is None:
            return
        gone = {pid for pid in self._pids if not os.path.exists(f"/proc/{pid}")}
        if gone:
            self._symbolizer.forget(gone)
            self._pids -= gone

    def recycle(self) -> int:
        """Empty the stack map (call when it refused stacks, once every code path still
        needed was resolved): bump the generation first, so a stack taken meanwhile is
        either in the new generation or reads as expired, never as another stack.
        Returns how many stacks it held."""
        if self._gen_table is None or self._symbolizer is None:
            return 0
        self.generation += 1
        self._gen_table[self._gen_table.Key(0)] = ctypes.c_uint32(self.generation & 0xFF)
        table = self._program.bpf["stacks"]
        keys = list(table.keys())
        for k in keys:
            try:
                del table[k]
            except KeyError:
                pass
        self._symbolizer.clear()
        self.recycled += 1
        return len(keys)


class LiveCloseWait:
    """A CloseWaitModel fed from the kernel: ``refresh`` reads a snapshot into it, and
    every ``recheck_ns`` compares it with /proc (model.heal); the sockets found in
    CLOSE_WAIT at start come from the session's seeding snapshot (every network
    namespace). Stacks resolve through ``stacks``; when the stack map refuses stacks,
    every open socket's are resolved and the map is emptied (at most every
    ``RECYCLE_EVERY_NS``)."""

    def __init__(
        self,
        program: LoadedProgram,
        model: CloseWaitModel,
        flt: EventFilter,
        recheck_s: float = 0.0,
        seeding: Seeding | None = None,
        lines: StackLines | None = None,
    ) -> None:
        self.reader = CloseWaitReader(program)
        self.stacks = StackResolver(program, lines)
        self.model = model
        self.flt = flt
        self.seeding = seeding
        model.resolve = self.stacks
        self.recheck_ns = int(recheck_s * 1e9)
        self.next_recheck_ns: int | None = None
        self._stack_failed = 0
        self._recycled_ns: int | None = None

    def add_preexisting(self) -> int:
        """The sockets in CLOSE_WAIT when the session's snapshot was taken; how many."""
        if self.seeding is None:
            return 0
        found = self.seeding.host.held(self.flt, [TcpState.CLOSE_WAIT])
        seeded = self.seeding.planted.close_wait
        tracked = [s for s in found if (s.netns, s.endpoint) in seeded]
        others = [s for s in found if (s.netns, s.endpoint) not in seeded]
        at = self.seeding.at_ns
        return self.model.add_preexisting(tracked, at, seeded=True) + self.model.add_preexisting(others, at)

    def refresh(self, now_ns: int) -> None:
        """Read the kernel into the model (and compare with /proc when a recheck is due)."""
        if self.recheck_ns and self.next_recheck_ns is None:
            self.next_recheck_ns = now_ns + self.recheck_ns
        if self.next_recheck_ns is not None and now_ns >= self.next_recheck_ns:
            self.heal()
            self.next_recheck_ns = now_ns + self.recheck_ns
        else:
            self.model.apply(self.reader.snapshot(now_ns))
        self.stacks.forget_gone()
        failed = self.model.counters.stack_failed
        due = self._recycled_ns is None or now_ns - self._recycled_ns >= RECYCLE_EVERY_NS
        if failed > self._stack_failed and due:
            self._stack_failed = failed
            self._recycled_ns = now_ns
            self.model.resolve_all()
            self.stacks.recycle()

    def heal(self) -> None:
        """/proc, the kernel, /proc again; then what the model says is missing is looked up
        with its holders (see CloseWaitModel.heal)."""
        held_before = set(self.model.open)
        first = self._proc_ports()
        at_ns = time.monotonic_ns()
        self.model.apply(self.reader.snapshot(at_ns))
        second = self._proc_ports()
        missing = self.model.heal(held_before, first, second)
        if missing:
            families = (self.flt.family,) if self.flt.family is not None else (4, 6)
            host = hostsnap.collect([TcpState.CLOSE_WAIT], families=families)
            self.model.add_found(host.held(self.flt, only=missing), at_ns)

    def _proc_ports(self) -> set[PortsKey]:
        families = (self.flt.family,) if self.flt.family is not None else (4, 6)
        snap = sockets.snapshot([TcpState.CLOSE_WAIT], families=families)
        return {(s.netns, s.sport, s.dport) for s in snap.sockets if self.flt.accepts_endpoint(s)}
