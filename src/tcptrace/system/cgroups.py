"""cgroup v2 ids (what bpf_get_current_cgroup_id() returns) and their paths.

A cgroup v2 id is the inode number of the cgroup's directory in the cgroup2 filesystem, so
an id is named by finding the directory with that inode, and a process's id is the inode
of the directory /proc/PID/cgroup names. Containers and systemd services are cgroups:
the path says which one owns a socket when pids alone do not (pid namespaces).
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Iterator
from functools import lru_cache

from tcptrace.model.filters import EventFilter, container_cgroups


def parse_mounts(text: str) -> str | None:
    """The first cgroup2 mount point of a /proc/mounts text.

    >>> parse_mounts("tmpfs /sys/fs/cgroup tmpfs rw 0 0\\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\\n")
    '/sys/fs/cgroup/unified'
    >>> parse_mounts("proc /proc proc rw 0 0\\n") is None
    True
    """
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return fields[1].replace("\\040", " ")
    return None


def parse_proc_cgroup(text: str) -> str | None:
    """The cgroup v2 path of a /proc/PID/cgroup text (its ``0::PATH`` line).

    >>> parse_proc_cgroup("4:memory:/x\\n0::/system.slice/nginx.service\\n")
    '/system.slice/nginx.service'
    """
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


@lru_cache(maxsize=1)
def cgroup2_root() -> str | None:
    try:
        with open("/proc/mounts") as fh:
            return parse_mounts(fh.read())
    except OSError:
        return None


def id_of_pid(pid: int) -> int | None:
    """The cgroup v2 id of a process, None when it cannot be read."""
    root = cgroup2_root()
    if root is None:
        return None
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            path = parse_proc_cgroup(fh.read())
        if path is None:
            return None
        mounted = mounted_path(path, root)
        if mounted is None:
            return None
        return os.stat(os.path.join(root, mounted.lstrip("/"))).st_ino
    except OSError:
        return None


def mounted_path(path: str, root: str) -> str | None:
    """A cgroup path as /proc shows it, relative to this process's cgroup namespace (from a
    pod's private namespace another pod's process reads ``/../../x``), as a path in the tree
    mounted at ``root`` (which may be the host's whole tree); None when that tree does not
    reach it or the namespace's root cannot be found in it. Outside a private namespace the
    path is the same."""
    if not _private_namespace():
        return path
    base = _namespace_root(root)
    if base is None:
        return None
    resolved = posixpath.normpath(posixpath.join(base, path.lstrip("/")))
    return None if resolved.startswith("/..") else resolved


def host_path(path: str | None) -> str | None:
    """A process's cgroup path as /proc shows it, as a path of the mounted tree
    (``mounted_path``: from a private cgroup namespace, another pod's ``/../../x`` made whole,
    so that its upper components, pod and QoS, name it too); else as it is.

    >>> host_path("/system.slice/x.service"), host_path(None)
    ('/system.slice/x.service', None)
    """
    if path is None:
        return None
    root = cgroup2_root()
    whole = mounted_path(path, root) if root is not None else None
    return whole if whole is not None else path


@lru_cache(maxsize=1)
def _private_namespace() -> bool:
    """Whether this process has a cgroup namespace of its own (not init's)."""
    try:
        return os.stat("/proc/self/ns/cgroup").st_ino != os.stat("/proc/1/ns/cgroup").st_ino
    except OSError:
        return True  # init's is not readable: find the namespace's root in the tree


@lru_cache(maxsize=4)
def _namespace_root(root: str) -> str | None:
    """Where this process's cgroup namespace root is in the tree mounted at ``root``: the
    cgroup that lists this process (it reads its own cgroup as ``/SUB`` in its namespace),
    less ``SUB``. Looked for once; None when the tree does not hold it."""
    try:
        with open("/proc/self/cgroup") as fh:
            own = parse_proc_cgroup(fh.read())
    except OSError:
        return None
    if own is None or own.startswith("/.."):
        return None
    me = str(os.getpid())
    for path, _ in walk(root):
        try:
            with open(os.path.join(root, path.lstrip("/"), "cgroup.procs")) as fh:
                if me not in fh.read().split():
                    continue
        except OSError:
            continue
        if own == "/":
            return path
        if path == own or path.endswith(own):
            return path[: len(path) - len(own)] or "/"
        return None
    return None


def id_of_path(path: str) -> int | None:
    """The cgroup v2 id of a cgroup path (``/system.slice/x.service``): its directory's
    inode, what bpf_get_current_cgroup_id() returns; None when it cannot be read."""
    root = cgroup2_root()
    if root is None:
        return None
    try:
        return os.stat(os.path.join(root, path.lstrip("/"))).st_ino
    except OSError:
        return None


def path_of_id(cgroup_id: int) -> str | None:
    """The path (``/system.slice/x.service``) of a cgroup v2 id; None when not found (the
    tree is walked again for an unknown id at most every 2 s: ``CgroupIndex``)."""
    global _INDEX
    if _INDEX is None:
        _INDEX = CgroupIndex()
    return _INDEX.path(cgroup_id)


_INDEX: CgroupIndex | None = None


def walk(root: str) -> Iterator[tuple[str, int]]:
    """(path, id) of every cgroup under ``root`` (the cgroup2 mount), the root itself first.
    A cgroup removed during the walk is left out."""
    try:
        yield "/", os.stat(root).st_ino
    except OSError:
        return
    stack = [(root, "")]
    while stack:
        directory, rel = stack.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    try:
                        if not entry.is_dir(follow_symlinks=False):
                            continue
                        # the directory entry's inode: on cgroupfs (kernfs) the cgroup id, as
                        # stat() gives it, without a stat() per cgroup
                        ino = entry.inode()
                    except OSError:
                        continue
                    path = f"{rel}/{entry.name}"
                    yield path, ino
                    stack.append((entry.path, path))
        except OSError:
            continue


class CgroupIndex:
    """Paths of cgroup v2 ids, from one walk of the tree, walked again when an id is not found
    (at most every ``rewalk_s``: a cgroup made since, or an id of a cgroup already gone)."""

    def __init__(self, root: str | None = None, rewalk_s: float = 2.0) -> None:
        self.root = root if root is not None else cgroup2_root()
        self.rewalk_ns = int(rewalk_s * 1e9)
        self._paths: dict[int, str] = {}
        self._walked_ns: int | None = None

    def path(self, cgroup_id: int) -> str | None:
        found = self._paths.get(cgroup_id)
        if found is None and self.root is not None:
            now = time.monotonic_ns()
            if self._walked_ns is None or now - self._walked_ns >= self.rewalk_ns:
                self.rewalk(now)
                found = self._paths.get(cgroup_id)
        return found

    def rewalk(self, now_ns: int | None = None) -> dict[int, str]:
        """Walk the tree now; returns every id's path (kept for lookups)."""
        self._walked_ns = time.monotonic_ns() if now_ns is None else now_ns
        if self.root is not None:
            self._paths = {ino: path for path, ino in walk(self.root)}
        return self._paths


class CgroupScope:
    """The cgroup v2 ids a filter's --cgroup and --container name, for the kernel's
    cgroup_filter: each --cgroup directory (the kernel keeps what is under it), and the
    cgroups of the containers whose id starts with a --container prefix, looked for again
    (``refresh``) so that a container started later is traced too.

    A walk of the tree costs ~10 us a cgroup (~50 ms for 5,000), so it is walked again only
    when the root's ``cgroup.stat`` counts changed (a cgroup was made or removed), checked
    at most every ``every_s``, and every ``full_s`` whatever they say."""

    def __init__(
        self, flt: EventFilter, root: str | None = None, every_s: float = 2.0, full_s: float = 30.0
    ) -> None:
        self.filter = flt
        self.index = CgroupIndex(root, rewalk_s=every_s)
        self.every_ns = int(every_s * 1e9)
        self.full_ns = int(full_s * 1e9)
        self.ids: set[int] = set()
        self.walks = 0
        self._next_ns = 0
        self._walked_ns = 0
        self._counts: str | None = None
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> list[int]:
        """Ids named now that were not before."""
        now = time.monotonic_ns()
        if not force and (not self.filter.containers or now < self._next_ns):
            return []
        self._next_ns = now + self.every_ns
        root = self.index.root
        if root is None:
            return []
        counts = _read_stat(root)
        if (
            not force
            and counts is not None
            and counts == self._counts
            and now - self._walked_ns < self.full_ns
        ):
            return []
        self._counts, self._walked_ns = counts, now
        found: set[int] = set()
        for path in self.filter.cgroups:
            try:
                found.add(os.stat(os.path.join(root, path.lstrip("/"))).st_ino)
            except OSError:
                continue
        if self.filter.containers:
            self.walks += 1
            paths = self.index.rewalk(now)
            by_path = {path: ino for ino, path in paths.items()}
            found.update(by_path[p] for p in container_cgroups(by_path, self.filter.containers))
        new = sorted(found - self.ids)
        self.ids.update(new)
        return new


def _read_stat(root: str) -> str | None:
    """The root cgroup's ``cgroup.stat`` (descendants, dying descendants): what changes when a
    cgroup is made or removed anywhere. None where there is none (not a cgroup2 mount)."""
    try:
        with open(os.path.join(root, "cgroup.stat"), "rb") as fh:
            return fh.read(4096).decode("ascii", "replace")
    except OSError:
        return None
