"""The host's network namespaces, and running code inside one of them.

A namespace is named by the inode of its nsfs file: ``/proc/PID/ns/net`` links to
``net:[4026531840]``. The namespaces worth a snapshot are those some process is in (every
Kubernetes pod has one, held by its pause process), plus those ``ip netns add`` keeps
alive with a bind mount under /run/netns even when no process is in them.

``setns(CLONE_NEWNET)`` moves only the calling thread, so ``call_in`` runs its function in
a short-lived thread of its own: the rest of the process never changes namespace. A socket
made in that thread stays in that namespace for its whole life, whichever thread uses it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from tcptrace.errors import TcptraceError

CLONE_NEWNET = 0x40000000
RUN_NETNS = ("/run/netns", "/var/run/netns")

T = TypeVar("T")


class NetnsError(TcptraceError):
    """A network namespace could not be entered (gone, or not allowed)."""


@dataclass(frozen=True)
class NetNamespace:
    """One network namespace of the host."""

    inode: int
    """The namespace's id: the inode of /proc/PID/ns/net, as ``ip netns identify`` and
    ``lsns -t net`` show it (``readlink /proc/PID/ns/net`` prints ``net:[INODE]``)."""
    pids: tuple[int, ...] = ()
    """Processes in it when it was listed, lowest first (any of them may have exited since)."""
    names: tuple[str, ...] = ()
    """Its ``ip netns`` names (bind mounts under /run/netns)."""
    root: bool = False
    """The namespace of pid 1 (and kernel threads): the host's own network (a pod's is not)."""

    def paths(self, proc: str = "/proc") -> list[str]:
        """Files that open this namespace, most durable first (a bind mount outlives every process)."""
        found = [os.path.join(d, name) for name in self.names for d in RUN_NETNS]
        return found + [f"{proc}/{pid}/ns/net" for pid in self.pids]


def parse_ns_link(link: str) -> int | None:
    """The namespace inode of a /proc/PID/ns/net link; None for anything else.

    >>> parse_ns_link("net:[4026531840]")
    4026531840
    >>> parse_ns_link("mnt:[4026531841]") is None
    True
    """
    if link.startswith("net:[") and link.endswith("]") and link[5:-1].isdigit():
        return int(link[5:-1])
    return None


def of_pid(pid: int | str, proc: str = "/proc") -> int | None:
    """The network namespace inode of a process; None when it is gone or not readable."""
    try:
        return parse_ns_link(os.readlink(f"{proc}/{pid}/ns/net"))
    except OSError:
        return None


def own() -> int:
    """The calling thread's network namespace (a thread in ``call_in`` sees the one it entered)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


def namespaces(proc: str = "/proc", run_dirs: Iterable[str] = RUN_NETNS) -> list[NetNamespace]:
    """Every network namespace a process is in, plus those ``ip netns`` names; the host's first.

    Processes whose namespace cannot be read (gone, or not ours to read without root) are
    left out; so is a namespace only they are in.
    """
    by_inode: dict[int, list[int]] = {}
    try:
        pids = sorted(int(name) for name in os.listdir(proc) if name.isdigit())
    except OSError as exc:
        raise NetnsError(f"cannot list {proc}: {exc.strerror}") from None
    readlink = os.readlink
    for pid in pids:
        try:
            inode = parse_ns_link(readlink(f"{proc}/{pid}/ns/net"))
        except OSError:
            continue
        if inode is not None:
            by_inode.setdefault(inode, []).append(pid)
    names: dict[int, list[str]] = {}
    try:
        nsfs = os.stat(f"{proc}/self/ns/net").st_dev
    except OSError:
        nsfs = None
    for directory in run_dirs:
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in entries:
            try:
                st = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            if st.st_dev != nsfs:  # a file whose namespace mount is gone
                continue
            inode = st.st_ino
            # /var/run is a link to /run on most hosts: one name, listed once.
            if name not in names.get(inode, []):
                names.setdefault(inode, []).append(name)
    # init's namespace; kthreadd (pid 2) is always in it, for when init's cannot be read
    root = of_pid(1, proc) or of_pid(2, proc)
    out = [
        NetNamespace(inode, tuple(by_inode.get(inode, ())), tuple(names.get(inode, ())), inode == root)
        for inode in by_inode.keys() | names.keys()
    ]
    out.sort(key=lambda ns: (not ns.root, ns.pids[:1] or (1 << 62,), ns.inode))
    return out


def open_namespace(ns: NetNamespace, proc: str = "/proc") -> int:
    """An fd on ``ns`` (close it), from the first of its files that still names this namespace.

    Checks the inode of what was opened: a pid reused since the listing opens another
    namespace, which must not be taken for this one.
    """
    last = "it has no process and no ip-netns name left"
    for path in ns.paths(proc):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            last = f"{path}: {exc.strerror}"
            continue
        if os.fstat(fd).st_ino == ns.inode:
            return fd
        os.close(fd)
        last = f"{path} is another namespace now"
    raise NetnsError(f"cannot open network namespace {ns.inode}: {last}")


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def call_in(ns: NetNamespace, fn: Callable[[], T], proc: str = "/proc") -> T:
    """``fn()`` run in network namespace ``ns``, in a thread of its own that then ends.

    Returns what ``fn`` returns and raises what it raises; NetnsError when the namespace
    cannot be entered (needs CAP_SYS_ADMIN).
    """
    fd = open_namespace(ns, proc)
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            _setns(fd)
        except OSError as exc:
            error.append(NetnsError(f"cannot enter network namespace {ns.inode}: {exc.strerror}"))
            return
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    try:
        thread = threading.Thread(target=run, name=f"netns-{ns.inode}", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if error:
        raise error[0]
    return result[0]


__all__ = [
    "NetNamespace",
    "NetnsError",
    "call_in",
    "namespaces",
    "of_pid",
    "open_namespace",
    "own",
    "parse_ns_link",
]
