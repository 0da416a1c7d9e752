"""The filters every command shares, applied to a socket's endpoint and owner.

The kernel applies the same filters before it emits anything (kernel/loader.py turns an
EventFilter into cflags and map entries); this module applies them to recordings, so that
``--from FILE`` answers exactly what a live run would have, and to the sockets /proc shows.

Every condition given must hold (several values of one condition: any of them):

- ``pids``, ``comm``: the socket's owner (as learned in process context);
- ``cgroups``: the owner's cgroup v2 path is one of them or under one;
- ``containers``: the owner's cgroup names a container whose id starts with one of them;
- ``ports``: the local or the remote port is one of them; ``local_ports``: the local
  port; ``remote_ports``: the remote port;
- ``family``: 4 or 6; ``netns``: the socket's network namespace (inode).

Owner filters need a known owner: a socket whose owner was never learned matches none of
``pids``, ``comm``, ``cgroups`` or ``containers``; the cgroup filters need the owner's
cgroup path too (live, from the host; in a replay, from the recording's ``cgroup`` lines).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tcptrace.model.endpoint import EndpointLike, Owner
from tcptrace.model.events import SocketEvent
from tcptrace.model.workload import identify

COMM_LEN = 15  # TASK_COMM_LEN - 1: the kernel keeps this many characters of a name
MAX_PORTS = 64  # TT_MAX_PORT_FILTERS in bpf/tcptrace.h: entries of the kernel's port table
MAX_PIDS = 1024  # TT_MAX_PID_FILTERS
MAX_NETNS = 64  # TT_MAX_NETNS_FILTERS
MAX_CGROUPS = 4096  # TT_MAX_CGROUP_FILTERS: cgroups a --cgroup or --container names at once
CONTAINER_PREFIX = re.compile(r"[0-9a-f]{1,64}")

CgroupPaths = Callable[[int], str | None]
"""A cgroup v2 id's path (``/system.slice/x.service``); None when unknown."""


def _no_paths(_cgroup: int) -> str | None:
    return None


def cgroup_path(text: str) -> str:
    """A --cgroup path as compared: absolute, no trailing or doubled ``/``, no ``.``/``..``.

    >>> cgroup_path("system.slice//nginx.service/"), cgroup_path("/")
    ('/system.slice/nginx.service', '/')
    """
    parts = [p for p in text.split("/") if p]
    if any(p in (".", "..") for p in parts) or "\0" in text:
        raise ValueError(f"not a cgroup path: {text!r}")
    return "/" + "/".join(parts)


def under(path: str, top: str) -> bool:
    """Whether cgroup ``path`` is ``top`` or below it.

    >>> under("/kubepods.slice/a.slice", "/kubepods.slice"), under("/kubepods.slicex", "/kubepods.slice")
    (True, False)
    >>> under("/anything", "/")
    True
    """
    return top == "/" or path == top or path.startswith(top + "/")


@dataclass(frozen=True)
class EventFilter:
    """Keep sockets that pass every condition given (see the module's docstring).

    >>> from tcptrace.model.endpoint import Endpoint
    >>> web = Endpoint(4, "10.0.0.1", 80, "10.0.0.9", 40000)
    >>> EventFilter(ports=frozenset({80})).accepts(web, None)
    True
    >>> EventFilter(local_ports=frozenset({40000})).accepts(web, None)
    False
    >>> f = EventFilter(pids=frozenset({7, 8}))
    >>> f.accepts(web, None), f.accepts(web, Owner(8, "srv")), f.accepts(web, Owner(9, "srv"))
    (False, True, False)
    """

    pids: frozenset[int] = frozenset()
    comm: str | None = None
    ports: frozenset[int] = frozenset()
    local_ports: frozenset[int] = frozenset()
    remote_ports: frozenset[int] = frozenset()
    family: int | None = None  # 4 or 6
    netns: frozenset[int] = frozenset()
    cgroups: tuple[str, ...] = ()
    containers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(pid <= 0 or pid >= 1 << 32 for pid in self.pids):
            raise ValueError(f"pid must be positive, not {min(self.pids)}")
        if len(self.pids) > MAX_PIDS:
            raise ValueError(f"at most {MAX_PIDS} pids (the kernel's filter table), not {len(self.pids)}")
        n = len(self.all_ports)
        if n > MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS} ports (the kernel's filter table), not {n}")
        for port in self.all_ports:
            if not 0 < port < 65536:
                raise ValueError(f"port must be 1-65535, not {port}")
        if self.family not in (None, 4, 6):
            raise ValueError(f"family must be 4 or 6, not {self.family}")
        if self.comm is not None and not self.comm:
            raise ValueError("comm must not be empty")
        if any(not 0 < ns < 1 << 32 for ns in self.netns):
            raise ValueError("a network namespace is a positive 32-bit inode number")
        if len(self.netns) > MAX_NETNS:
            raise ValueError(f"at most {MAX_NETNS} network namespaces, not {len(self.netns)}")
        for path in self.cgroups:
            if path != cgroup_path(path):
                raise ValueError(f"not a normalized cgroup path: {path!r}")
        for prefix in self.containers:
            if not CONTAINER_PREFIX.fullmatch(prefix):
                raise ValueError(f"a container id prefix is 1-64 lowercase hex digits, not {prefix!r}")

    @property
    def all_ports(self) -> frozenset[int]:
        """Every port named by --port, --local-port and --remote-port (the kernel's table)."""
        return self.ports | self.local_ports | self.remote_ports

    @property
    def pid(self) -> int | None:
        """The pid, when exactly one is given."""
        return next(iter(self.pids)) if len(self.pids) == 1 else None

    @property
    def kernel_comm(self) -> str | None:
        """The comm as the kernel stores it (truncated to 15 characters)."""
        return None if self.comm is None else self.comm[:COMM_LEN]

    @property
    def by_owner(self) -> bool:
        """Whether a condition is on the owner (what a socket no process holds cannot pass)."""
        return bool(self.pids or self.comm is not None or self.by_cgroup)

    @property
    def by_cgroup(self) -> bool:
        return bool(self.cgroups or self.containers)

    @property
    def by_address(self) -> bool:
        """Whether a condition is on the socket's addresses, ports, family or namespace."""
        return bool(self.all_ports or self.family is not None or self.netns)

    @property
    def empty(self) -> bool:
        return not (self.by_owner or self.by_address)

    def accepts(
        self,
        sock: EndpointLike,
        owner: Owner | None,
        paths: CgroupPaths = _no_paths,
        netns: int | None = None,
    ) -> bool:
        """Whether a socket with this endpoint (and network namespace) and owner (None:
        unknown) passes every filter; ``paths`` names the owner's cgroup."""
        return self.accepts_endpoint(sock, netns) and self.accepts_owner(owner, paths)

    def accepts_endpoint(self, sock: EndpointLike, netns: int | None = None) -> bool:
        """Whether the family, port and namespace filters let a socket pass (``netns``: its
        namespace, None unknown: then no --netns passes)."""
        if self.family is not None and sock.family != self.family:
            return False
        if self.netns and netns not in self.netns:
            return False
        if self.ports and sock.sport not in self.ports and sock.dport not in self.ports:
            return False
        if self.local_ports and sock.sport not in self.local_ports:
            return False
        return not self.remote_ports or sock.dport in self.remote_ports

    def accepts_owner(self, owner: Owner | None, paths: CgroupPaths = _no_paths) -> bool:
        """Whether the owner filters let a socket of this owner (None: unknown) pass."""
        if owner is None:
            return not self.by_owner
        return self._owner_ok(owner.pid, owner.comm, owner.cgroup, paths)

    def accepts_cgroup_path(self, path: str | None) -> bool:
        """Whether an owner in cgroup ``path`` (None: unknown) passes --cgroup and --container.

        >>> f = EventFilter(cgroups=("/system.slice",), containers=("ab12",))
        >>> f.accepts_cgroup_path("/system.slice/x.service"), f.accepts_cgroup_path("/user.slice")
        (True, False)
        >>> f.accepts_cgroup_path("/docker/ab12" + "0" * 60)
        True
        """
        if not self.by_cgroup:
            return True
        if path is None:
            return False
        if any(under(path, top) for top in self.cgroups):
            return True
        if self.containers:
            cid = identify(path).container_id
            return cid is not None and any(cid.startswith(p) for p in self.containers)
        return False

    def matches(self, event: SocketEvent, paths: CgroupPaths = _no_paths) -> bool:
        """Whether an event's socket passes: the filter the kernel applies, on a recording.
        (The event's flat fields are its endpoint and owner; nothing is built per event.)"""
        return self.accepts_endpoint(event, event.netns) and self._owner_ok(
            event.pid, event.comm, event.cgroup, paths
        )

    def _owner_ok(self, pid: int | None, comm: str | None, cgroup: int | None, paths: CgroupPaths) -> bool:
        if self.pids and pid not in self.pids:
            return False
        if self.comm is not None and comm != self.kernel_comm:
            return False
        if self.by_cgroup:
            if pid is None or cgroup is None:
                return False
            return self.accepts_cgroup_path(paths(cgroup))
        return True

    def to_json(self) -> dict[str, object]:
        """As recordings' headers carry it (``pid`` kept for readers of older headers)."""
        return {
            "pid": self.pid,
            "pids": sorted(self.pids),
            "comm": self.comm,
            "ports": sorted(self.ports),
            "local_ports": sorted(self.local_ports),
            "remote_ports": sorted(self.remote_ports),
            "family": self.family,
            "netns": sorted(self.netns),
            "cgroups": list(self.cgroups),
            "containers": list(self.containers),
        }


def container_cgroups(paths: Iterable[str], prefixes: Iterable[str]) -> list[str]:
    """The paths of ``paths`` that name a container whose id starts with one of ``prefixes``
    (conmon, a runtime's monitor, included: it holds the container's stdio, no socket).

    >>> cid = "ab" * 32
    >>> container_cgroups(["/system.slice", f"/system.slice/docker-{cid}.scope"], ["aba"])
    ['/system.slice/docker-abababababababababababababababababababababababababababababababab.scope']
    """
    wanted = tuple(prefixes)
    out = []
    for path in paths:
        cid = identify(path).container_id
        if cid is not None and cid.startswith(wanted):
            out.append(path)
    return out
