"""Which directories tcptrace may compile C from, as root.

What bcc compiles runs in the kernel, so a directory is used only when nobody but root
could have put or changed what is in it: the directory, everything in it, and every
directory above it is owned by root and not writable by group or others (a sticky directory
such as /tmp is accepted above it: others cannot rename or replace root's entries there).
A directory named by an environment variable (``TCPTRACE_BPF_DIR``, ``BCC_KERNEL_SOURCE``)
must also be the caller's own, so the caller must be root: ``sudo -E`` keeps the invoking
user's environment, and that user must not be able to hand root a program.

>>> untrusted_reason("/nonexistent/tcptrace")
'/nonexistent/tcptrace does not exist'
>>> untrusted_reason("/", caller=1000)
'the caller (uid 1000) is not root, the owner required'
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _mode_problem(path: str, st: os.stat_result, *, above: bool) -> str | None:
    """Why ``path`` (lstat ``st``) could be changed by someone other than root, or None."""
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (above and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"{path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'}"
    return None


def untrusted_reason(directory: str | Path, *, walk: bool = True, caller: int | None = None) -> str | None:
    """Why root must not compile from ``directory``, or None when it may.

    ``walk``: check every entry below the directory too (a small directory of programs);
    without it only the directory and the ones above it are checked (a tree of kernel
    headers, tens of thousands of files, which only root could have put in a root-owned,
    non-writable directory). ``caller``: the uid of who named the directory (an
    environment variable's: ``os.getuid()``), which must be root; None when tcptrace
    chose the directory itself.
    """
    if caller is not None and caller != 0:
        return f"the caller (uid {caller}) is not root, the owner required"
    raw = os.path.abspath(directory)
    if not os.path.lexists(raw):
        return f"{raw} does not exist"
    real = os.path.realpath(raw)
    if not os.path.isdir(real):
        return f"{raw} is not a directory"
    # Above: every ancestor of the resolved path (a symlink on the way is resolved, and the
    # directories it resolves through are checked by their real names).
    parent = os.path.dirname(real)
    while True:
        problem = _mode_problem(parent, os.lstat(parent), above=True)
        if problem:
            return problem
        if parent == os.path.dirname(parent):
            break
        parent = os.path.dirname(parent)
    problem = _mode_problem(real, os.lstat(real), above=False)
    if problem or not walk:
        return problem
    for root, dirs, files in os.walk(real):
        for name in sorted(dirs + files):
            entry = os.path.join(root, name)
            problem = _mode_problem(entry, os.lstat(entry), above=False)
            if problem:
                return problem
    return None
