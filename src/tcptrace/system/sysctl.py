"""TCP settings that govern TIME_WAIT and port exhaustion, read from /proc/sys.

>>> parse_port_range("32768\\t60999\\n")
(32768, 60999)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tcptrace.errors import TcptraceError

PROC_SYS = "/proc/sys"


class SysctlError(TcptraceError):
    """A setting could not be read or parsed."""


def parse_port_range(text: str) -> tuple[int, int]:
    """``ip_local_port_range`` as (low, high); SysctlError when it is not two ports."""
    fields = text.split()
    if len(fields) != 2 or not all(f.isdigit() for f in fields):
        raise SysctlError(f"ip_local_port_range: expected two ports, got {text.strip()!r}")
    low, high = int(fields[0]), int(fields[1])
    if not 0 < low <= high < 65536:
        raise SysctlError(f"ip_local_port_range: not a port range: {low} {high}")
    return low, high


def parse_int(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise SysctlError(f"{name}: expected an integer, got {text.strip()!r}") from None


@dataclass(frozen=True)
class TcpSettings:
    """The settings `tcptrace timewait` explains. None: not readable on this host."""

    port_range: tuple[int, int] | None = None
    tw_reuse: int | None = None
    max_tw_buckets: int | None = None
    fin_timeout: int | None = None
    timestamps: int | None = None
    rfc1337: int | None = None

    @property
    def ports(self) -> int | None:
        """How many ephemeral ports the range holds."""
        if self.port_range is None:
            return None
        return self.port_range[1] - self.port_range[0] + 1


def _read(root: str, name: str) -> str | None:
    try:
        with open(os.path.join(root, "net", "ipv4", name)) as fh:
            return fh.read()
    except OSError:
        return None


def read_settings(root: str = PROC_SYS) -> TcpSettings:
    """The settings of this network namespace; a missing or malformed one is None."""

    def num(name: str) -> int | None:
        text = _read(root, name)
        if text is None:
            return None
        try:
            return parse_int(name, text)
        except SysctlError:
            return None

    text = _read(root, "ip_local_port_range")
    port_range = None
    if text is not None:
        try:
            port_range = parse_port_range(text)
        except SysctlError:
            port_range = None
    return TcpSettings(
        port_range=port_range,
        tw_reuse=num("tcp_tw_reuse"),
        max_tw_buckets=num("tcp_max_tw_buckets"),
        fin_timeout=num("tcp_fin_timeout"),
        timestamps=num("tcp_timestamps"),
        rfc1337=num("tcp_rfc1337"),
    )
