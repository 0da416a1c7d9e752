"""What the options several commands share mean: the filters, durations, the leak threshold,
and the rules for what counts as the application's code.

cli.py declares the options; the commands turn what was given into model values here, so
that every command checks them alike and fails with the same one-line message.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

from tcptrace.errors import UsageError
from tcptrace.model.closewait import parse_duration
from tcptrace.model.filters import MAX_PORTS, EventFilter, cgroup_path, container_cgroups
from tcptrace.model.framerules import Rules, load_rules, rules_from_options
from tcptrace.system import cgroups, netns

DEFAULT_THRESHOLD = "5s"
"""The one default of --threshold (closewait, top, diagnose, demo, agent): a socket in
CLOSE_WAIT at least this long is a leak suspect. An application that read the EOF closes
within milliseconds; 5 s is far beyond that, and short enough that a 10 s `diagnose` or a
`demo` still shows a leak."""

PID_MAX_LIMIT = 1 << 22
"""The highest pid Linux can give (PID_MAX_LIMIT on 64-bit): a larger --netns number is an
inode (network namespaces' inodes start at 0xF0000000)."""

# Frame rules read when --rules is not given, if the file exists (docs/attribution.md).
DEFAULT_RULES_FILE = "/etc/tcptrace/frames.rules"


@dataclass(frozen=True)
class FilterOptions:
    """The filter options as given on the command line (comma lists already split).

    ``netns``: each an inode, a pid (that process's namespace) or an ``ip netns`` name;
    ``cgroups``: cgroup v2 paths; ``containers``: container id prefixes.
    """

    pids: tuple[int, ...] = ()
    comm: str | None = None
    ports: tuple[int, ...] = ()
    ipv4: bool = False
    ipv6: bool = False
    local_ports: tuple[int, ...] = ()
    remote_ports: tuple[int, ...] = ()
    netns: tuple[str, ...] = ()
    cgroups: tuple[str, ...] = ()
    containers: tuple[str, ...] = ()

    def event_filter(self, *, live: bool) -> EventFilter:
        """The filter applied in the kernel (and to recordings); UsageError when the options
        contradict each other or name nothing: ``live``, a pid no process has, a cgroup that
        does not exist (in a replay they name the recording's, which need not exist here).

        >>> FilterOptions(ports=(80, 443), ipv4=True).event_filter(live=False).family
        4
        """
        if self.ipv4 and self.ipv6:
            raise UsageError("-4 and -6 exclude each other")
        if live:
            for pid in self.pids:
                if not os.path.isdir(f"/proc/{pid}"):
                    raise UsageError(f"no process with pid {pid}")
        if self.comm is not None and not self.comm:
            raise UsageError("--comm needs a name")
        every = set(self.ports) | set(self.local_ports) | set(self.remote_ports)
        if len(every) > MAX_PORTS:
            raise UsageError(
                f"--port: at most {MAX_PORTS} ports (the kernel's filter table), not {len(every)}"
                + ("" if len(set(self.ports)) == len(every) else " (--port, -L and -D together)")
            )
        family = 4 if self.ipv4 else 6 if self.ipv6 else None
        try:
            return EventFilter(
                pids=frozenset(self.pids),
                comm=self.comm,
                ports=frozenset(self.ports),
                local_ports=frozenset(self.local_ports),
                remote_ports=frozenset(self.remote_ports),
                family=family,
                netns=frozenset(netns_inode(text, live) for text in self.netns),
                cgroups=tuple(dict.fromkeys(cgroup_option(text, live) for text in self.cgroups)),
                containers=tuple(dict.fromkeys(container_option(text, live) for text in self.containers)),
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    @property
    def by_address(self) -> bool:
        """True when a filter on addresses was given (what a recorded histogram cannot be
        filtered by): --port, -L, -D, -4, -6, --netns."""
        ports = self.ports or self.local_ports or self.remote_ports
        return bool(ports or self.ipv4 or self.ipv6 or self.netns)


def netns_inode(text: str, live: bool = True) -> int:
    """--netns: a namespace inode (``4026532281`` or ``net:[4026532281]``), a pid (its
    namespace; live only), or an ``ip netns`` name.

    >>> netns_inode("net:[4026532281]"), netns_inode("4026532281", live=False)
    (4026532281, 4026532281)
    """
    raw = text.strip()
    inode = netns.parse_ns_link(raw)
    if inode is not None:
        return inode
    if raw.isdigit():
        number = int(raw)
        if number > PID_MAX_LIMIT:
            if number >= 1 << 32:
                raise UsageError(f"--netns {raw}: not a namespace inode (32 bits)")
            return number
        if number == 0:
            raise UsageError("--netns 0: neither a pid nor a namespace inode")
        if not live:
            raise UsageError(
                f"--netns {raw}: a pid names a namespace of this host now; with --from give the "
                "namespace's inode (the recording's netns field)"
            )
        found = netns.of_pid(number)
        if found is None:
            raise UsageError(f"--netns {raw}: no process with pid {raw} (or its namespace is not readable)")
        return found
    if "/" in raw or raw in ("", ".", ".."):
        raise UsageError(f"--netns {text!r}: give an inode, a pid or an ip-netns name")
    for directory in netns.RUN_NETNS:
        try:
            return os.stat(os.path.join(directory, raw)).st_ino
        except OSError:
            continue
    raise UsageError(f"--netns {raw}: no network namespace named {raw} (see `ip netns list`)")


def cgroup_option(text: str, live: bool = True) -> str:
    """--cgroup: a cgroup v2 path (``/system.slice/nginx.service``, or with the cgroup2 mount
    in front), normalized; live, it must exist."""
    root = cgroups.cgroup2_root() if live else None
    raw = text
    if root is not None and (raw == root or raw.startswith(root.rstrip("/") + "/")):
        raw = raw[len(root.rstrip("/")) :] or "/"
    try:
        path = cgroup_path(raw)
    except ValueError:
        raise UsageError(f"--cgroup {text!r}: not a cgroup path") from None
    if live:
        if root is None:
            raise UsageError("--cgroup needs cgroup v2 (no cgroup2 file system is mounted)")
        if not os.path.isdir(os.path.join(root, path.lstrip("/"))):
            raise UsageError(f"--cgroup {text}: no such cgroup (under {root})")
    return path


def container_option(text: str, live: bool = True) -> str:
    """--container: a container id or its prefix (as ``docker ps`` or ``crictl ps`` shows
    it). Live, a prefix no container has yet is kept (the container may start later), with
    a note on stderr."""
    prefix = text.strip().lower()
    if not 1 <= len(prefix) <= 64 or any(c not in "0123456789abcdef" for c in prefix):
        raise UsageError(f"--container {text!r}: a container id is hexadecimal (up to 64 digits)")
    if live:
        root = cgroups.cgroup2_root()
        if root is None:
            raise UsageError("--container needs cgroup v2 (no cgroup2 file system is mounted)")
        if not container_cgroups((path for path, _ in cgroups.walk(root)), [prefix]):
            print(
                f"tcptrace: note: no container with an id starting {prefix} yet: traced once it starts",
                file=sys.stderr,
            )
    return prefix


def threshold_ns(value: str | float) -> int:
    """--threshold in ns (text as given, or seconds).

    >>> threshold_ns("250ms"), threshold_ns(2.0)
    (250000000, 2000000000)
    """
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise UsageError(f"--threshold: {exc}") from None
    return int(value * 1e9)


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


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
DEFAULT_BUFFER = "16"
"""--buffer's default, in MiB: at 168 bytes an event, ~100,000 events, two seconds of a
50,000 transitions/s burst while the consumer is held up."""
MAX_BUFFER_MIB = 1024
_UNITS = {"": 1 << 20, "m": 1 << 20, "mib": 1 << 20, "k": 1 << 10, "kib": 1 << 10}


def buffer_pages(text: str, page_size: int = PAGE_SIZE) -> int:
    """--buffer (MiB, or with a K/KiB or M/MiB suffix) as ring buffer pages: a power of two,
    as the kernel requires. UsageError otherwise.

    >>> buffer_pages("16", 4096), buffer_pages("0.25", 4096), buffer_pages("4K", 4096)
    (4096, 64, 1)
    """
    value = text.strip().lower()
    number = value.rstrip("kmib")
    unit = value[len(number) :]
    try:
        size = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise UsageError(
            f"--buffer {text!r}: expected a size in MiB (16, 0.5) or with K or M (64K)"
        ) from None
    pages = size / page_size
    if not (math.isfinite(pages) and 1 <= pages == int(pages) and int(pages) & (int(pages) - 1) == 0):
        raise UsageError(
            f"--buffer {text!r}: the ring buffer must be a power of two pages of {page_size // 1024} KiB "
            "(4K, 8K, ... 0.5, 1, 2, 4, 8, 16 ... MiB)"
        )
    if size > MAX_BUFFER_MIB << 20:
        raise UsageError(f"--buffer {text!r}: at most {MAX_BUFFER_MIB} MiB")
    return int(pages)


def ring_buffer_pages(
    buffer: str | None, ringbuf_pages: int | None, default: str | None = DEFAULT_BUFFER
) -> int | None:
    """The pages --buffer or the deprecated --ringbuf-pages ask for; ``default`` (MiB)
    when neither is given (None: the programs' own, TT_RINGBUF_PAGES)."""
    if buffer is not None and ringbuf_pages is not None:
        raise UsageError("--buffer and --ringbuf-pages say the same: give --buffer only")
    if ringbuf_pages is not None:
        if ringbuf_pages < 1 or ringbuf_pages & (ringbuf_pages - 1):
            raise UsageError("--ringbuf-pages must be a power of two")
        return ringbuf_pages
    if buffer is None:
        return None if default is None else buffer_pages(default)
    return buffer_pages(buffer)
