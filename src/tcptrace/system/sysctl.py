"""TCP settings that govern TIME_WAIT and port exhaustion: read from /proc/sys, and written
to and read back from a recording's header (the one serializer and parser of them).

>>> parse_port_range("32768\\t60999\\n")
(32768, 60999)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

    def to_json(self) -> dict[str, Any]:
        """As a recording's header carries them (``"settings"``); ``from_json`` reads them back.

        >>> TcpSettings(port_range=(32768, 60999), rfc1337=0).to_json()["port_range"]
        [32768, 60999]
        """
        return {
            **dataclasses.asdict(self),
            "port_range": list(self.port_range) if self.port_range else None,
        }

    @classmethod
    def from_json(cls, raw: object) -> TcpSettings:
        """The settings a recording carries. A recording is hostile input: a setting that
        is missing or malformed is None (not readable), an unknown one is ignored, and
        anything but an object gives no settings at all.

        >>> s = TcpSettings.from_json({"port_range": [32768, 60999], "tw_reuse": 2, "rfc1337": 1})
        >>> s.port_range, s.tw_reuse, s.rfc1337, s.fin_timeout
        ((32768, 60999), 2, 1, None)
        >>> TcpSettings.from_json({"port_range": "wide", "fin_timeout": "60"}) == TcpSettings()
        True
        """
        if not isinstance(raw, Mapping):
            return cls()
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = raw.get(f.name)
            if f.name == "port_range":
                values[f.name] = _port_range_of(value)
            else:
                values[f.name] = value if isinstance(value, int) and not isinstance(value, bool) else None
        return cls(**values)


def _port_range_of(value: object) -> tuple[int, int] | None:
    """A recorded ``[low, high]``, when it is a range the kernel would accept."""
    if not isinstance(value, list) or len(value) != 2:
        return None
    low, high = value
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
        return None
    return (low, high) if 0 < low <= high < 65536 else None


def settings_from_header(header: Mapping[str, Any]) -> TcpSettings:
    """The settings of a recording's header (``timewait --json`` writes them); all None
    when it carries none."""
    return TcpSettings.from_json(header.get("settings"))


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
