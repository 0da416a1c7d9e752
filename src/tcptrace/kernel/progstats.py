"""Runs of our BPF programs the kernel skipped (bpf_prog_info.recursion_misses, 5.12+).

A classic tracepoint program is not run when another classic tracepoint or kprobe program
is already running on that CPU (the kernel's bpf_prog_active guard): a softirq that
delivers an ACK or fires a delayed-ACK timer while one of our programs runs in process
context changes TCP states unseen. Measured here: the delayed ACKs of five loopback
connections, handled in one timer softirq, were all missed at once. The kernel counts
such skips per program; `top` and `diagnose` report them, so a drifted count is never
silent. (kernel/timewait.py reads the same field for its raw tracepoint programs.)
"""

from __future__ import annotations

import ctypes
import platform

from tcptrace.errors import TcptraceError
from tcptrace.kernel.btf import Btf
from tcptrace.kernel.loader import LoadedProgram

_SYS_BPF = 321  # x86_64
_BPF_OBJ_GET_INFO_BY_FD = 15


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class MissedRuns:
    """Reads the skipped-run counts of every program of a loaded program."""

    def __init__(self, program: LoadedProgram, btf: Btf | None = None) -> None:
        self._funcs = dict(getattr(program.bpf, "funcs", {}))
        self._offset: int | None = None
        if platform.machine() == "x86_64":
            try:
                self._offset = (btf or Btf.load()).member_offset("bpf_prog_info", "recursion_misses")
            except TcptraceError:
                self._offset = None
        self._libc = ctypes.CDLL(None, use_errno=True)

    def read(self) -> dict[str, int] | None:
        """Skipped runs since load, by program name; None when the kernel cannot tell."""
        if self._offset is None:
            return None
        out: dict[str, int] = {}
        for name, fn in self._funcs.items():
            label = name.decode() if isinstance(name, bytes) else str(name)
            buf = ctypes.create_string_buffer(512)
            attr = _InfoAttr(int(fn.fd), ctypes.sizeof(buf), ctypes.addressof(buf))
            size = ctypes.sizeof(attr)
            rc = self._libc.syscall(_SYS_BPF, _BPF_OBJ_GET_INFO_BY_FD, ctypes.byref(attr), size)
            if rc != 0 or attr.info_len < self._offset + 8:
                return None
            out[label] = int.from_bytes(buf.raw[self._offset : self._offset + 8], "little")
        return out

    def transitions(self) -> int | None:
        """Skipped runs of the state-transition hook (any socket of the host, not only ours)."""
        runs = self.read()
        if runs is None:
            return None
        return sum(n for name, n in runs.items() if name.endswith("inet_sock_set_state"))
