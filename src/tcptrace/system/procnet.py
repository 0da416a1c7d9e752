"""/proc/net/tcp and /proc/net/tcp6: the kernel's table of TCP sockets, as text, read into
the same TcpSockets (system/tcpsock.py) as a sock_diag dump.

Parsers are small functions with worked examples; a line that does not parse names the
file, its line number and the line.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Iterator

from tcptrace.errors import TcptraceError
from tcptrace.model.events import TcpState, ipv6_text
from tcptrace.system.tcpsock import TcpSocket

PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")


class ProcParseError(TcptraceError):
    """A line of a /proc file that does not have the expected shape."""


def parse_addr(text: str) -> tuple[str, int]:
    """An ``ADDR:PORT`` field: the address in the kernel's native-endian words, the port in hex.

    >>> parse_addr("0100007F:0016")
    ('127.0.0.1', 22)
    >>> parse_addr("0500000A:1F90")
    ('10.0.0.5', 8080)
    >>> parse_addr("00000000000000000000000001000000:0050")
    ('::1', 80)
    >>> parse_addr("0000000000000000FFFF00000100007F:01BB")
    ('::ffff:127.0.0.1', 443)
    """
    addr_hex, _, port_hex = text.partition(":")
    raw = bytes.fromhex(addr_hex)
    if len(raw) not in (4, 16) or not port_hex:
        raise ValueError(f"not an ADDR:PORT field: {text!r}")
    # Each 32-bit word is printed as a native (little-endian here) integer.
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    packed = struct.pack(f">{len(words)}I", *words)
    if len(packed) == 4:
        return str(ipaddress.IPv4Address(packed)), int(port_hex, 16)
    return ipv6_text(packed), int(port_hex, 16)


def parse_line(line: str, family: int) -> TcpSocket:
    """One socket line (not the header). The text does not say the network namespace
    (``netns`` 0), and has no cookie, queues or cgroup (None).

    >>> s = parse_line("   1: 0100007F:1F90 0100007F:D2F0 08 00000000:00000000 00:00000000 "
    ...                "00000000  1000        0 34567 1 0000000000000000 20 4 30 10 -1", 4)
    >>> (s.saddr, s.sport, s.daddr, s.dport, s.state.name, s.uid, s.inode, s.netns, s.cookie)
    ('127.0.0.1', 8080, '127.0.0.1', 54000, 'CLOSE_WAIT', 1000, 34567, 0, None)
    """
    fields = line.split()
    if len(fields) < 10 or not fields[0].endswith(":"):
        raise ValueError("expected at least 10 fields")
    saddr, sport = parse_addr(fields[1])
    daddr, dport = parse_addr(fields[2])
    state, uid, inode = TcpState(int(fields[3], 16)), int(fields[7]), int(fields[9])
    return TcpSocket(family, saddr, sport, daddr, dport, state, uid, inode)


def parse_table(lines: Iterable[str], family: int, path: str = "/proc/net/tcp") -> Iterator[TcpSocket]:
    """Every socket of a /proc/net/tcp{,6} text (its first line is the header)."""
    for lineno, line in enumerate(lines, 1):
        if lineno == 1 or not line.strip():
            continue
        try:
            yield parse_line(line, family)
        except (ValueError, IndexError) as exc:
            raise ProcParseError(f"{path}:{lineno}: cannot parse {line.strip()!r}: {exc}") from None


def read_sockets(paths: Iterable[str] = PROC_NET_TCP) -> list[TcpSocket]:
    """Every TCP socket of the files' network namespace; a missing file (no IPv6) is skipped."""
    out: list[TcpSocket] = []
    for path in paths:
        family = 6 if path.endswith("6") else 4
        try:
            with open(path) as fh:
                out.extend(parse_table(fh, family, path))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise TcptraceError(f"cannot read {path}: {exc.strerror}") from None
    return out


def in_state(state: TcpState, paths: Iterable[str] = PROC_NET_TCP) -> list[TcpSocket]:
    return [s for s in read_sockets(paths) if s.state == state]


__all__ = ["ProcParseError", "in_state", "parse_addr", "parse_line", "parse_table", "read_sockets"]
