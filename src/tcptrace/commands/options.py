"""What the options several commands share mean: the filters, the leak threshold, and the
rules for what counts as the application's code.

cli.py declares the options; the commands turn what was given into model values here, so
that every command checks them alike and fails with the same one-line message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tcptrace.errors import UsageError
from tcptrace.model.closewait import parse_duration
from tcptrace.model.filters import MAX_PORTS, EventFilter
from tcptrace.model.framerules import Rules, load_rules, rules_from_options

# Frame rules read when --rules is not given, if the file exists (docs/attribution.md).
DEFAULT_RULES_FILE = "/etc/tcptrace/frames.rules"


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


@dataclass(frozen=True)
class FrameRuleOptions:
    """--library and --app (repeatable) and --rules FILE: what counts as library code and
    what as the application's, before the built-in rules."""

    library: tuple[str, ...] = ()
    app: tuple[str, ...] = ()
    rules_file: str | None = None

    def rules(self, default_file: str = DEFAULT_RULES_FILE) -> Rules:
        """The options' rules, then the file's (--rules, else ``default_file`` when it
        exists); a bad rule or an unreadable file is a UsageError naming it.

        >>> len(FrameRuleOptions(library=("acme/*",), app=("module=libplugin.so",)).rules("/nonexistent"))
        2
        """
        rules = rules_from_options(self.library, self.app)
        path = self.rules_file
        if path is None and os.path.exists(default_file):
            path = default_file
        return rules if path is None else rules + load_rules(path)
