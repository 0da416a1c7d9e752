"""The one exception family. The CLI turns these into a one-line message and an exit code."""

from __future__ import annotations


class TcptraceError(Exception):
    """A failure the user can act on; ``hint`` says how."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(TcptraceError):
    """Bad options or arguments (exit code 2)."""

    exit_code = 2


class PrivilegeError(TcptraceError):
    """Tracing needs root, or CAP_BPF with CAP_PERFMON."""


class EnvironmentProblem(TcptraceError):
    """bcc, kernel headers, tracefs or a tracepoint is missing or unusable."""


class CompileError(TcptraceError):
    """A BPF program did not compile or was refused by the verifier."""


class RecordingError(TcptraceError):
    """A recording given to --from is missing, malformed or truncated."""
