"""The last send/recv of a socket before it entered CLOSE_WAIT (`closewait --touch-stacks`).

owner.bpf.c keeps it in the LRU map ``last_touch`` (compiled with TT_TOUCH_STACKS); this
reads and symbolizes one entry. Whether an entry belongs to the socket now at that address
is decided by the model (model/closewait.py), which knows when that socket was born and
when it entered CLOSE_WAIT.
"""

from __future__ import annotations

from typing import Any

from tcptrace.kernel.loader import LoadedProgram
from tcptrace.kernel.stream import Symbolizer
from tcptrace.model.events import Op
from tcptrace.model.lifecycle import CodePath


class LastTouches:
    def __init__(self, program: LoadedProgram, symbolizer: Symbolizer | None = None) -> None:
        self._table: Any = program.bpf["last_touch"]
        self._symbolizer = symbolizer if symbolizer is not None else Symbolizer(program)

    def get(self, skaddr: int) -> CodePath | None:
        try:
            value = self._table[self._table.Key(skaddr)]
        except KeyError:
            return None
        try:
            op = Op(int(value.op))
        except ValueError:
            return None
        tgid = int(value.tgid)
        return CodePath(
            op=op,
            ts_ns=int(value.ts_ns),
            task_pid=tgid,
            ret=int(value.ret),
            kstack=self._symbolizer.frames(int(value.kstack), None),
            ustack=self._symbolizer.frames(int(value.ustack), tgid),
        )
