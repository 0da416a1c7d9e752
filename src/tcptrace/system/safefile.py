"""Output files opened the way a tool running as root must, in directories others share.

Another user may plant a symbolic link (or a hard link, a FIFO) at the path root is about
to write, to have root overwrite /etc/shadow or block forever. So:

- ``check_output``: before any tracing, the path must be new (or ``--force``), not a
  directory or device, its directory must exist and take a new file (a probe file is
  created there and removed): ``--report`` to an unwritable place fails at once, not
  after ``--duration``.
- ``write_atomic``: a whole file (the HTML report) is written to a temporary file
  created with O_EXCL in the same directory, then linked into place (without ``force``:
  an existing name is never replaced, even one that appeared meanwhile) or renamed over
  it (``force``: a symbolic link is replaced, never followed). A failure leaves nothing
  behind, and with ``force`` the old file intact.
- ``create_output``: a stream (a recording) is created at its final path with
  O_CREAT|O_EXCL|O_NOFOLLOW (``force`` first removes the old name, not what a link
  points to), so that whatever the recorder's end (SIGKILL, a dropped SSH session) the
  lines written so far are there, under the name the user gave.
- ``open_append``: a log (agent --log) is opened O_APPEND|O_NOFOLLOW and kept only if it
  is a regular file owned by us with no other hard link.

Streams are written through ``LineSafeWriter``: when a write fails (ENOSPC, EIO, EFBIG,
EDQUOT), the file is truncated back to its last whole line and one TcptraceError says
so: the recording stays valid up to that line (a replay then says it was cut short).
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import stat
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

from tcptrace.errors import TcptraceError, UsageError

CREATE_MODE = 0o666  # less the umask: what open(path, "w") gave before
LOG_MODE = 0o640

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


def _cannot(path: str, exc: OSError) -> TcptraceError:
    # fs.protected_symlinks refuses (EACCES) a link of another user in a sticky directory
    # before O_NOFOLLOW would (ELOOP): either way, the link is what stopped us.
    if exc.errno == errno.ELOOP or (exc.errno == errno.EACCES and os.path.islink(path)):
        return TcptraceError(f"cannot write {path}: a symbolic link, not followed")
    return TcptraceError(f"cannot write {path}: {exc.strerror}")


def _existing(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _cannot(path, exc) from None


def check_output(path: str, force: bool) -> None:
    """Fail now (UsageError, or TcptraceError when the system refuses) if ``path`` could
    not be written later: it exists without ``force``, is not a regular file or a symbolic
    link (which is replaced, not followed), or its directory cannot take a new file."""
    st = _existing(path)
    if st is not None:
        kind = stat.S_IFMT(st.st_mode)
        if kind not in (stat.S_IFREG, stat.S_IFLNK):
            raise UsageError(f"{path} is {_KINDS.get(kind, 'not a regular file')}: give a file name")
        if not force:
            raise UsageError(f"{path} exists; pass --force to overwrite it")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"no directory {directory} for {path}")
    fd, probe = _create_temp(path)
    os.close(fd)
    os.unlink(probe)


def _create_temp(path: str) -> tuple[int, str]:
    """A new file next to ``path``, created exclusively (never an existing name or link)."""
    directory, name = os.path.split(os.path.abspath(path))
    for _ in range(16):
        temp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(temp, flags, CREATE_MODE), temp
        except FileExistsError:
            continue
        except OSError as exc:
            raise _cannot(path, exc) from None
    raise TcptraceError(f"cannot write {path}: no free temporary name in its directory")


def write_atomic(path: str, text: str, force: bool) -> None:
    """``path`` holds ``text``, all of it or nothing new (see the module's docstring)."""
    fd, temp = _create_temp(path)
    try:
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise _cannot(path, exc) from None
        if force:
            if (st := _existing(path)) is not None and stat.S_IFMT(st.st_mode) not in (
                stat.S_IFREG,
                stat.S_IFLNK,
            ):
                raise UsageError(f"{path} is {_KINDS.get(stat.S_IFMT(st.st_mode), 'not a regular file')}")
            try:
                os.rename(temp, path)  # replaces a link itself, never what it points to
            except OSError as exc:
                raise _cannot(path, exc) from None
            return
        try:
            os.link(temp, path, follow_symlinks=False)  # fails on any existing name
        except FileExistsError:
            raise UsageError(f"{path} exists; pass --force to overwrite it") from None
        except OSError as exc:
            raise _cannot(path, exc) from None
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)


def create_output(path: str, force: bool) -> IO[str]:
    """A new file at ``path`` for a stream of lines (see the module's docstring)."""
    if force:
        st = _existing(path)
        if st is not None:
            kind = stat.S_IFMT(st.st_mode)
            if kind not in (stat.S_IFREG, stat.S_IFLNK):
                raise UsageError(f"{path} is {_KINDS.get(kind, 'not a regular file')}: give a file name")
            try:
                os.unlink(path)  # the name: a link goes, what it points to stays
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _cannot(path, exc) from None
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, CREATE_MODE)
    except FileExistsError:
        # Without --force; with it, someone created the name again since the unlink.
        raise UsageError(f"{path} exists; pass --force to overwrite it") from None
    except OSError as exc:
        raise _cannot(path, exc) from None
    return _text(fd, path)


def open_append(path: str) -> IO[str]:
    """``path`` opened to append lines: created if missing; an existing one must be a
    regular file owned by this user with a single link (else TcptraceError)."""
    # O_NONBLOCK: opening a planted FIFO without a reader fails (ENXIO) instead of blocking.
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, LOG_MODE)
    except OSError as exc:
        raise _cannot(path, exc) from None
    try:
        st = os.fstat(fd)
        kind = stat.S_IFMT(st.st_mode)
        if kind != stat.S_IFREG:
            raise TcptraceError(f"cannot write {path}: {_KINDS.get(kind, 'not a regular file')}")
        if st.st_uid != os.geteuid():
            raise TcptraceError(f"cannot write {path}: owned by uid {st.st_uid}, not by us")
        if st.st_nlink != 1:
            raise TcptraceError(f"cannot write {path}: it has {st.st_nlink} hard links")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return _text(fd, path)


def _text(fd: int, path: str) -> IO[str]:
    raw = LineSafeWriter(fd, path)
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", errors="strict")


class LineSafeWriter(io.RawIOBase):
    """A file descriptor written so that a failure leaves whole lines only.

    It knows where the last newline written ends (``good``). When a write fails, the file
    is truncated there and TcptraceError is raised, once: later writes (the buffer flushed
    again at close) are dropped, so a full disk is one line of error, not three tracebacks.
    """

    def __init__(self, fd: int, path: str, write: Callable[[int, bytes], int] = os.write) -> None:
        super().__init__()
        self.fd = fd
        self.path = path
        self._write = write
        self.good = os.lseek(fd, 0, os.SEEK_END)
        self.failed = False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data: ReadableBuffer, /) -> int:
        chunk = bytes(data)
        if self.failed:
            return len(chunk)
        try:
            n = self._write(self.fd, chunk)
        except OSError as exc:
            self.failed = True
            kept = self._truncate()
            raise TcptraceError(
                f"cannot write {self.path}: {exc.strerror}"
                + (f" (kept up to its last whole line: {kept} bytes)" if kept is not None else "")
            ) from None
        end = os.lseek(self.fd, 0, os.SEEK_CUR)
        newline = chunk.rfind(b"\n", 0, n)
        if newline >= 0:
            self.good = end - n + newline + 1
        return n

    def _truncate(self) -> int | None:
        try:
            os.ftruncate(self.fd, self.good)
        except OSError:
            return None
        return self.good

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self.fd)
            finally:
                super().close()
