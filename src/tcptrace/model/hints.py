"""Which code to blame for a leak: the application frame, or a runtime's known pattern.

An owner's stacks (where its sockets were accepted or connected, where it last touched them)
usually name a function of the application. Where they cannot, the runtime often explains
why, and what the leak is:

- Go's net/http client dials in a transport goroutine, so a connection's stacks end in
  ``net/http.(*Transport).dialConn`` and ``(*persistConn).readLoop``, never in the caller.
  Such a connection left in CLOSE_WAIT is a response whose body is never closed.
- Node.js reads the peer's FIN in libuv's event loop; a socket in CLOSE_WAIT after that read
  is one whose ``end`` was never answered with ``socket.end()``. Its JavaScript frames are
  named only with ``--perf-basic-prof --interpreted-frames-native-stack``.
- CPython names Python functions in stacks only from 3.12, with ``-X perf``, and only when
  the interpreter keeps frame pointers; otherwise only the interpreter is visible.
- A libc built without frame pointers ends the walk inside its syscall wrapper.

Pure: fed classified stacks (``tcptrace.model.frames``), returns values.
"""

from __future__ import annotations

import enum
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tcptrace.model.framerules import Rules
from tcptrace.model.frames import Category, ClassifiedStack, Frame, classify


class Runtime(str, enum.Enum):
    GO = "go"
    NODE = "node"
    PYTHON = "python"
    NATIVE = "native"  # C, C++, Rust...: named by the binary's own symbols
    UNKNOWN = "unknown"  # no user frame to tell


@dataclass(frozen=True)
class StackSample:
    """One operation of an owner on a socket, with its stack.

    ``op`` is the operation's name (``ACCEPT``, ``CONNECT``, ``SEND``, ``RECV``, ``CLOSE``);
    ``eof`` says a recv returned 0: the app read the peer's FIN.
    """

    op: str
    stack: ClassifiedStack
    eof: bool = False

    @classmethod
    def of(
        cls,
        op: str,
        kstack: Sequence[str],
        ustack: Sequence[str],
        eof: bool = False,
        rules: Rules | None = None,
    ) -> StackSample:
        return cls(op, classify(kstack, ustack, rules), eof)


@dataclass(frozen=True)
class Hint:
    """A runtime pattern recognised in an owner's stacks: what it means, and the frames that show it."""

    code: str
    text: str
    evidence: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        """The hint in a few words, for a line that leads a group of leak suspects."""
        return HINT_TITLES.get(self.code, self.code)

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "title": self.title, "text": self.text, "evidence": list(self.evidence)}


HINT_TITLES = {
    "go-http-body-not-closed": "Go HTTP client: a response Body never closed",
    "node-end-not-called": "Node.js: socket.end() not called after the peer's 'end'",
    "node-js-frames-hidden": "Node.js: JavaScript functions not named (run with --perf-basic-prof "
    "--interpreted-frames-native-stack)",
    "python-interpreter-only": "Python: only the interpreter is visible, not the Python functions",
    "stack-ends-in-libc": "the stack walk stopped in libc (built without frame pointers)",
}


@dataclass(frozen=True)
class Attribution:
    """What to lead a leak report with: the application frame and the runtime's hints."""

    runtime: Runtime
    frame: Frame | None  # the application frame, from the first sample that has one
    op: str | None  # the operation whose stack gave it
    hints: tuple[Hint, ...]

    def headline(self, short: bool = False) -> str | None:
        """``leak_connection (leaky_server.c:85)``, or the first hint when no frame is the app's
        (``short``: in a few words)."""
        if self.frame is not None:
            return self.frame.label()
        if self.hints:
            return self.hints[0].title if short else self.hints[0].text
        return None

    def to_json(self) -> dict[str, object]:
        return {
            "runtime": self.runtime.value,
            "app_frame": self.frame.text if self.frame is not None else None,
            "app_label": self.frame.label() if self.frame is not None else None,
            "app_op": self.op,
            "hints": [h.to_json() for h in self.hints],
        }


_PY_EXE = re.compile(r"python[\d.]*\Z")
_NODE_EXE = re.compile(r"(node|nodejs)\Z")
_GO_HTTP_CLIENT = re.compile(
    r"net/http\.\(\*(persistConn\)\.(readLoop|writeLoop)|Transport\)\.(dialConn|dialConnFor))(\.func\d+)*\Z"
)
_LIBUV_READ = re.compile(r"uv__(read|stream_io)\Z")
# Where a stack walk that reached the bottom ends: libc's start-up and thread entry points.
_WALK_BOTTOM = re.compile(
    r"(_start|__libc_start_call_main|__libc_start_main\w*|start_thread|clone3?|__clone\w*)\Z"
)


def detect_runtime(comm: str | None, exe: str | None, samples: Sequence[StackSample]) -> Runtime:
    """Which runtime the owner runs, from its executable and its frames.

    >>> detect_runtime("python3.11", None, [])
    <Runtime.PYTHON: 'python'>
    >>> detect_runtime("svc", None, [StackSample.of("SEND", [], ["runtime.goexit.abi0+0x1 [svc]"])])
    <Runtime.GO: 'go'>
    """
    base = posixpath.basename(exe) if exe else ""
    frames = [f.frame for s in samples for f in s.stack.user]
    if _NODE_EXE.match(base) or any(f.jit is not None and f.jit.runtime == "node" for f in frames):
        return Runtime.NODE
    if any(f.function in ("uv_run", "node::Start(int, char**)") for f in frames):
        return Runtime.NODE
    if _PY_EXE.match(base) or any(f.jit is not None and f.jit.runtime == "python" for f in frames):
        return Runtime.PYTHON
    if any(f.function.startswith("_PyEval_") or (f.module or "").startswith("libpython") for f in frames):
        return Runtime.PYTHON
    if any(f.function.startswith(("runtime.", "runtime/")) for f in frames):
        return Runtime.GO
    if comm is not None and not base:
        if _NODE_EXE.match(comm):
            return Runtime.NODE
        if _PY_EXE.match(comm):
            return Runtime.PYTHON
    if frames:
        return Runtime.NATIVE
    return Runtime.UNKNOWN


def runtime_hints(
    runtime: Runtime, samples: Sequence[StackSample], perf_map: bool | None = None
) -> list[Hint]:
    """The patterns recognised in an owner's stacks, most specific first.

    ``perf_map`` says whether the process writes /tmp/perf-PID.map (None: not known).
    """
    hints: list[Hint] = []
    has_app = any(s.stack.app_frame is not None for s in samples)
    if runtime is Runtime.GO:
        hints += _go_http_client(samples)
    if runtime is Runtime.NODE:
        hints += _node_end_not_called(samples)
        if not has_app:
            hints += _node_js_hidden(samples, perf_map)
    if runtime is Runtime.PYTHON and not any(_is_py_frame(f.frame) for s in samples for f in s.stack.user):
        hints += _python_interpreter_only(samples, perf_map)
    if not has_app and runtime in (Runtime.NATIVE, Runtime.PYTHON, Runtime.UNKNOWN):
        hints += _walk_ended_in_libc(samples)
    return hints


def attribute(
    comm: str | None, exe: str | None, samples: Sequence[StackSample], perf_map: bool | None = None
) -> Attribution:
    """The application frame to lead with, and the hints; samples in order of preference.

    Give the samples in the order their frames should lead: the last touch before the peer's
    FIN (what the app was doing with the connection), the first one after it, then the
    origin (accept or connect). A read of the EOF whose stack reaches the app's code leads
    before all of them: the app saw the peer close there and did not close.
    ``perf_map``: whether the process writes /tmp/perf-PID.map, when the caller looked
    (while the process lived).
    """
    runtime = detect_runtime(comm, exe, samples)
    frame, op = None, None
    eof_first = sorted(samples, key=lambda s: not (s.eof and s.stack.app_frame is not None))
    for s in eof_first:
        if s.stack.app_frame is not None:
            frame, op = s.stack.app_frame, s.op
            break
    return Attribution(runtime, frame, op, tuple(runtime_hints(runtime, samples, perf_map)))


def _frames(samples: Sequence[StackSample]) -> list[Frame]:
    return [f.frame for s in samples for f in s.stack.user]


def _dedup(texts: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(texts))


def _go_http_client(samples: Sequence[StackSample]) -> list[Hint]:
    seen = _dedup([f.text for f in _frames(samples) if _GO_HTTP_CLIENT.match(f.function)])
    if not seen:
        return []
    return [
        Hint(
            "go-http-body-not-closed",
            "Go net/http client connections held open: a response whose Body is never closed "
            "(call resp.Body.Close() on every response, after reading it to EOF to reuse the connection). "
            "The transport dials and reads in its own goroutines, so no stack reaches the caller: "
            "look for http.Get/Post/Do calls whose resp.Body is not closed",
            seen,
        )
    ]


def _node_end_not_called(samples: Sequence[StackSample]) -> list[Hint]:
    for s in samples:
        if not s.eof:
            continue
        reads = [f.frame.text for f in s.stack.user if _LIBUV_READ.match(f.frame.function)]
        if reads:
            return [
                Hint(
                    "node-end-not-called",
                    "Node.js read the peer's FIN (the socket's 'end' event) and kept its own side open: "
                    "with allowHalfOpen (net.createServer({allowHalfOpen: true})) the code must call "
                    "socket.end() or socket.destroy() itself, on every path",
                    _dedup(reads),
                )
            ]
    return []


def _node_js_hidden(samples: Sequence[StackSample], perf_map: bool | None) -> list[Hint]:
    frames = _frames(samples)
    if any(f.jit is not None and not f.jit.internal for f in frames):
        return []
    # JavaScript ran here, unnamed: V8's interpreter trampolines stand in for its functions.
    trampolines = [f.text for f in frames if f.function.startswith("Builtins_InterpreterEntryTrampoline")]
    if trampolines and perf_map:
        text = (
            "JavaScript functions run in V8's interpreter trampoline, unnamed: add "
            "--interpreted-frames-native-stack to --perf-basic-prof so each gets a frame of its own"
        )
    elif trampolines or perf_map is False:
        text = (
            "JavaScript functions are not named in these stacks: run node with --perf-basic-prof "
            "--interpreted-frames-native-stack (it writes /tmp/perf-PID.map, which names each function "
            "with its file:line)"
        )
    else:
        return []  # the stacks did not pass through JavaScript (the event loop's own reads)
    return [Hint("node-js-frames-hidden", text, _dedup(trampolines[:1]))]


def _is_py_frame(frame: Frame) -> bool:
    return frame.jit is not None and frame.jit.runtime == "python"


def _python_interpreter_only(samples: Sequence[StackSample], perf_map: bool | None) -> list[Hint]:
    frames = _frames(samples)
    interp = [
        f.text for f in frames if f.function.startswith("_PyEval_") or f.module and "python" in f.module
    ]
    if perf_map:
        how = (
            "its perf map names them, but the stack walk does not reach them: the interpreter "
            "needs frame pointers (a CPython built with -fno-omit-frame-pointer)"
        )
    else:
        how = (
            "they are named from Python 3.12 on, run with -X perf (or PYTHONPERFSUPPORT=1) by an "
            "interpreter built with frame pointers"
        )
    return [
        Hint(
            "python-interpreter-only",
            f"Only the CPython interpreter is visible, not the Python functions: {how}",
            _dedup(interp[:3]),
        )
    ]


def _walk_ended_in_libc(samples: Sequence[StackSample]) -> list[Hint]:
    for s in samples:
        user = [f for f in s.stack.user if f.category is not Category.UNKNOWN]
        if not user or user[-1].category is not Category.LIBC:
            continue
        last = user[-1].frame
        if _WALK_BOTTOM.match(last.function):
            continue
        return [
            Hint(
                "stack-ends-in-libc",
                f"The stack walk stopped inside libc ({last.function}): a libc built without frame "
                "pointers hides the caller of its wrappers",
                (last.text,),
            )
        ]
    return []
