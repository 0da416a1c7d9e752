"""Host-wide TCP counters: /proc/net/sockstat (``tw``) and /proc/net/netstat (TcpExt).

Both are of the reader's network namespace.

>>> parse_sockstat_tw("TCP: inuse 5 orphan 0 tw 7 alloc 6 mem 1\\n")
7
>>> parse_netstat("TcpExt: TW TCPTimeWaitOverflow\\nTcpExt: 12 3\\n")["TcpExt"]["TCPTimeWaitOverflow"]
3
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tcptrace.errors import TcptraceError
from tcptrace.system import netns
from tcptrace.system.netns import NetNamespace

SOCKSTAT = "/proc/net/sockstat"
NETSTAT = "/proc/net/netstat"


class ProcNetError(TcptraceError):
    """A /proc/net file could not be read or parsed."""


def parse_sockstat_tw(text: str, path: str = SOCKSTAT) -> int:
    """The ``tw`` count of the TCP line: timewait sockets now (both substates)."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("TCP:"):
            m = re.search(r"\btw (\d+)", line)
            if m is None:
                raise ProcNetError(f"{path}:{lineno}: no tw count in {line!r}")
            return int(m.group(1))
    raise ProcNetError(f"{path}: no TCP line")


def parse_netstat(text: str, path: str = NETSTAT) -> dict[str, dict[str, int]]:
    """Pairs of header/value lines as {"TcpExt": {"TW": 12, ...}, "IpExt": {...}}."""
    out: dict[str, dict[str, int]] = {}
    lines = text.splitlines()
    if len(lines) % 2:
        raise ProcNetError(f"{path}:{len(lines)}: a header line without its values")
    for i in range(0, len(lines), 2):
        names, values = lines[i].split(), lines[i + 1].split()
        if not names or names[0] != values[0] or len(names) != len(values):
            raise ProcNetError(f"{path}:{i + 2}: values do not match the header on line {i + 1}")
        try:
            out[names[0].rstrip(":")] = {n: int(v) for n, v in zip(names[1:], values[1:], strict=True)}
        except ValueError:
            raise ProcNetError(f"{path}:{i + 2}: a value is not an integer") from None
    return out


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError as exc:
        raise ProcNetError(f"cannot read {path}: {exc.strerror}") from None


def sockstat_tw(path: str = SOCKSTAT) -> int:
    return parse_sockstat_tw(_read(path), path)


def sockstat_tw_all(namespaces: Iterable[NetNamespace] | None = None) -> int:
    """TIME_WAIT sockets of every network namespace (each one's sockstat ``tw``, summed): the
    scope tcptrace's programs count in, since they see every namespace. Another namespace is
    read from a thread that entered it (``/proc/thread-self/net``); one gone meanwhile, or
    that cannot be entered, counts 0. Only tcptrace's own failing to read is an error."""
    own = netns.own()
    total = 0
    for ns in netns.namespaces() if namespaces is None else namespaces:
        if ns.inode == own:
            total += sockstat_tw()
            continue
        try:
            total += netns.call_in(ns, lambda: sockstat_tw("/proc/thread-self/net/sockstat"))
        except TcptraceError:
            continue
    return total


def tcpext(path: str = NETSTAT) -> dict[str, int]:
    return parse_netstat(_read(path), path).get("TcpExt", {})
