"""Who a process is: pid, start time, name, cgroup, its pid in its own pid namespace, its network.

An owner is (pid, start time): pids are reused, and the pair is not. The name is kept as
the bytes the kernel holds (any bytes but NUL, chosen by whoever runs the process); it is
decoded, or escaped, only where it is shown.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from tcptrace.model.events import decode_comm
from tcptrace.system import cgroups, netns

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcessInfo:
    """One process (a thread group) as /proc shows it."""

    pid: int
    """The pid on the host (in the pid namespace of the /proc that was read)."""
    start_ticks: int
    """When it started, in clock ticks after boot (/proc/PID/stat field 22, from the
    kernel's ``task->start_boottime``); with ``pid``, what identifies the process."""
    comm: bytes
    """Its name as the kernel keeps it: at most 15 bytes, not necessarily UTF-8."""
    cgroup: str | None = None
    """Its cgroup v2 path (``/system.slice/nginx.service``); None without cgroup v2. Bytes
    that are not UTF-8 are kept as surrogates (``os.fsencode`` gives them back)."""
    nspid: int | None = None
    """Its pid inside its own pid namespace (the last ``NSpid`` of /proc/PID/status): what
    the process itself, ``ps`` in its container, and its logs call it. None when unknown."""
    netns: int | None = None
    """Inode of its network namespace."""

    @property
    def identity(self) -> tuple[int, int]:
        """(pid, start time): the same pair is the same process."""
        return (self.pid, self.start_ticks)

    @property
    def comm_text(self) -> str:
        """The name as text, decoded as kernel events' names are (``\\xNN`` for bytes that
        are not UTF-8), so both compare equal; escape it before it reaches a terminal."""
        return decode_comm(self.comm)


def parse_stat(data: bytes) -> tuple[bytes, int]:
    """(comm, start time in ticks) of a /proc/PID/stat text.

    The name sits between the first ``(`` and the last ``)``: it may hold spaces and
    parentheses itself.

    >>> parse_stat(b"4242 (nginx: worker) S 1 4242 4242 0 -1 4194368 90 0 0 0 1 2 0 0 20 0 1 0 "
    ...            b"75659 3133440 417 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0")
    (b'nginx: worker', 75659)
    >>> parse_stat(b"7 (a) b) (c) R 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 123 0 0")[0]
    b'a) b) (c'
    """
    left = data.index(b"(")
    right = data.rindex(b")")
    fields = data[right + 2 :].split()
    return data[left + 1 : right], int(fields[19])


def parse_nspid(status: bytes) -> int | None:
    """The pid of a /proc/PID/status text in the innermost pid namespace (its last NSpid).

    >>> parse_nspid(b"Name:\\tnginx\\nTgid:\\t4242\\nNSpid:\\t4242\\t17\\t1\\n")
    1
    >>> parse_nspid(b"Name:\\tinit\\nNSpid:\\t1\\n")
    1
    >>> parse_nspid(b"Name:\\told kernel\\n") is None
    True
    """
    start = status.find(b"\nNSpid:")
    if start < 0:
        return None
    end = status.find(b"\n", start + 1)
    fields = status[start + 7 : end if end >= 0 else len(status)].split()
    return int(fields[-1]) if fields else None


def parse_cgroup(data: bytes) -> str | None:
    """The cgroup v2 path of a /proc/PID/cgroup text (its ``0::`` line), as a filesystem string.

    >>> parse_cgroup(b"12:memory:/x\\n0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-ab.scope\\n")
    '/kubepods.slice/kubepods-pod1.slice/cri-containerd-ab.scope'
    >>> parse_cgroup(b"0::/caf\\xe9.scope\\n") == os.fsdecode(b"/caf\\xe9.scope")
    True
    """
    return cgroups.parse_proc_cgroup(os.fsdecode(data))


def _read(path: str) -> bytes:
    with open(path, "rb", buffering=0) as fh:
        return fh.read()


def read(pid: int, proc: str = "/proc") -> ProcessInfo | None:
    """What /proc says about process ``pid``; None when it has exited (or cannot be read)."""
    try:
        comm, start = parse_stat(_read(f"{proc}/{pid}/stat"))
    except (OSError, ValueError, IndexError):
        return None
    try:
        cgroup = cgroups.host_path(parse_cgroup(_read(f"{proc}/{pid}/cgroup")))
    except OSError:
        cgroup = None
    try:
        nspid = parse_nspid(_read(f"{proc}/{pid}/status"))
    except (OSError, ValueError):
        nspid = None
    return ProcessInfo(pid, start, comm, cgroup, nspid, netns.of_pid(pid, proc))


def read_many(pids: Iterable[int], proc: str = "/proc") -> dict[int, ProcessInfo]:
    """``read`` of each pid; those that exited are left out."""
    out: dict[int, ProcessInfo] = {}
    for pid in pids:
        if pid not in out:
            info = read(pid, proc)
            if info is not None:
                out[pid] = info
    return out


def ticks_from_ns(boottime_ns: int) -> int:
    """A kernel ``start_boottime`` (ns) in the ticks of /proc/PID/stat, to compare a start time
    read in BPF with ``ProcessInfo.start_ticks`` (the kernel divides the same way).

    >>> ticks_from_ns(756_591_234_567) if CLK_TCK == 100 else 75659
    75659
    """
    return boottime_ns // (1_000_000_000 // CLK_TCK)


__all__ = [
    "CLK_TCK",
    "ProcessInfo",
    "parse_cgroup",
    "parse_nspid",
    "parse_stat",
    "read",
    "read_many",
    "ticks_from_ns",
]
