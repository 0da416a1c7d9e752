"""What the options several commands share mean: the filters and the leak threshold.

cli.py declares the options; the commands turn what was given into model values here, so
that every command checks them alike and fails with the same one-line message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tcptrace.errors import UsageError
from tcptrace.model.closewait import parse_duration
from tcptrace.model.filters import MAX_PORTS, EventFilter


@dataclass(frozen=True)
class FilterOptions:
    """--pid, --comm, --port (repeatable), -4 and -6, as given on the command line."""

    pid: int | None = None
    comm: str | None = None
    ports: tuple[int, ...] = ()
    ipv4: bool = False
    ipv6: bool = False

    def event_filter(self, *, live: bool) -> EventFilter:
        """The filter applied in the kernel (and to recordings); UsageError when the options
        contradict each other, or, ``live``, when no process has the pid.

        >>> FilterOptions(ports=(80, 443), ipv4=True).event_filter(live=False).family
        4
        """
        if self.ipv4 and self.ipv6:
            raise UsageError("-4 and -6 exclude each other")
        if live and self.pid is not None and not os.path.isdir(f"/proc/{self.pid}"):
            raise UsageError(f"no process with pid {self.pid}")
        if self.comm is not None and not self.comm:
            raise UsageError("--comm needs a name")
        if len(set(self.ports)) > MAX_PORTS:
            n = len(set(self.ports))
            raise UsageError(f"--port: at most {MAX_PORTS} ports (the kernel's filter table), not {n}")
        family = 4 if self.ipv4 else 6 if self.ipv6 else None
        return EventFilter(pid=self.pid, comm=self.comm, ports=frozenset(self.ports), family=family)

    @property
    def by_address(self) -> bool:
        """True when --port, -4 or -6 was given (what a recorded histogram cannot be filtered by)."""
        return bool(self.ports or self.ipv4 or self.ipv6)


def threshold_ns(text: str) -> int:
    """--threshold in ns.

    >>> threshold_ns("250ms")
    250000000
    """
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--threshold: {exc}") from None
