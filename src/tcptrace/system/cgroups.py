"""cgroup v2 ids (what bpf_get_current_cgroup_id() returns) and their paths.

A cgroup v2 id is the inode number of the cgroup's directory in the cgroup2 filesystem, so
an id is named by finding the directory with that inode, and a process's id is the inode
of the directory /proc/PID/cgroup names. Containers and systemd services are cgroups:
the path says which one owns a socket when pids alone do not (pid namespaces).
"""

from __future__ import annotations

import os
from functools import lru_cache


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
        return os.stat(os.path.join(root, path.lstrip("/"))).st_ino
    except OSError:
        return None


@lru_cache(maxsize=1024)
def path_of_id(cgroup_id: int) -> str | None:
    """The path (``/system.slice/x.service``) of a cgroup v2 id; None when not found."""
    root = cgroup2_root()
    if root is None:
        return None
    for dirpath, _dirs, _files in os.walk(root):
        try:
            if os.stat(dirpath).st_ino == cgroup_id:
                rel = os.path.relpath(dirpath, root)
                return "/" if rel == "." else "/" + rel
        except OSError:
            continue
    return None
