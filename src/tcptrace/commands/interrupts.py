"""Signals that end a command, and how it ends on each.

Python's defaults leave a terminal broken: SIGTERM and SIGHUP kill the process at once, so
no ``finally`` runs (the cursor a spinner hid stays hidden, `top`'s terminal stays without
echo, programs are detached only by the kernel closing their fds), and Ctrl-C during the
compile reaches click as "Aborted!" with exit status 1. So, for the whole command:

- SIGTERM and SIGHUP raise ``Interrupted`` (a BaseException, like KeyboardInterrupt, that
  no ``except Exception`` swallows), so every ``finally`` and context manager unwinds:
  terminal modes, the cursor, BPF programs, files;
- the CLI turns an interruption into one line and the shell's status for that signal:
  130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP;
- while a command runs its loop, the same signals are a normal stop instead
  (commands/session.py, ``stop_on_signals``): the summary is printed, exit status 0.

A signal the process was started with ignored (``nohup``, a background job's SIGINT) stays
ignored.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """The command was stopped by a signal before it could stop by itself."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        """The status a shell reports for a process the signal ended: 128 + its number.

        >>> Interrupted(signal.SIGTERM).exit_code, Interrupted(signal.SIGINT).exit_code
        (143, 130)
        """
        return 128 + self.signum


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def ignored(signum: int) -> bool:
    """Whether the process was started with ``signum`` ignored (nohup, a background job)."""
    return signal.getsignal(signum) == signal.SIG_IGN


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Interrupted within the block (SIGINT raises KeyboardInterrupt,
    as always); the previous handlers come back after it."""
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if not ignored(sig):
            previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
