"""Stack frames: parse the frame strings, say whose code each frame is, find the application's.

A stack is a list of frame strings, innermost first: kernel frames, then user frames.

    bpf_prog_b5d97a7df6949d13_tt_lc_process+0x788 [bpf]     the tracer's own BPF program
    tcp_v4_connect+0x269 [kernel]                           the kernel
    accept+0x4f [libc.so.6]                                 libc
    net/http.(*Transport).dialConn+0x83f [goclient]         Go's standard library
    JS:~rejectTooLarge /srv/app/server.js:5:24+0xdc [perf-4242.map]   a JIT frame (perf map)
    leak_connection+0x15 [leaky_server] at /srv/leaky_server.c:85     with its DWARF line

Each frame gets a ``Category``; the *application frame* is the first (innermost) frame of
category ``APP``: the code a developer should open. The tracer's own frames (its BPF program
and the tracepoint machinery that called it) are dropped from every stack shown.

User rules (``tcptrace.model.framerules``) are tried before the built-in ones, on user
frames only.

Pure: strings in, values out. Frame strings come from the traced process (symbol names,
paths) and are hostile: nothing here evaluates them, and a string that does not parse is
kept whole as a function name.
"""

from __future__ import annotations

import enum
import functools
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tcptrace.model.jitnames import JitName, parse_jit_name, source_text

if TYPE_CHECKING:
    from tcptrace.model.framerules import Rules


class Category(str, enum.Enum):
    """Whose code a frame is, from the most foreign to the application's own."""

    TRACER = "tracer"  # tcptrace's BPF program and the tracepoint machinery calling it
    KERNEL = "kernel"
    LIBC = "libc"  # the C/C++ runtime and the dynamic loader: libc, ld.so, libpthread, libstdc++
    RUNTIME = "runtime"  # a language runtime: Go's standard library, Node/V8/libuv, CPython
    LIBRARY = "library"  # third-party code: shared objects, node_modules, site-packages, user rules
    UNKNOWN = "unknown"  # an address no symbol names
    APP = "app"


UNKNOWN_FUNCTION = "[unknown]"
# How the kernel symbolizer names the kernel and BPF programs' modules.
KERNEL_MODULES = frozenset({"kernel", "bpf"})

_OFFSET = re.compile(r"\+0x(?P<off>[0-9a-fA-F]+)\Z")
_SOURCE_MARK = "] at "


@dataclass(frozen=True)
class Frame:
    """One frame string taken apart; ``text`` is the string as it came.

    ``file``/``line`` come from the DWARF suffix (`` at FILE:LINE``) or from a JIT name.
    """

    text: str
    function: str
    offset: int | None = None
    module: str | None = None
    file: str | None = None
    line: int | None = None
    column: int | None = None
    jit: JitName | None = None

    @property
    def unknown(self) -> bool:
        return self.function == UNKNOWN_FUNCTION or self.function == ""

    @property
    def name(self) -> str:
        """The function as a person reads it: a JIT frame's function without its source."""
        if self.jit is not None:
            return self.jit.function or "<anonymous>"
        return self.function

    @property
    def source(self) -> str | None:
        """``file:line`` (or ``file:line:column``, or the file alone) when known."""
        return source_text(self.file, self.line, self.column)

    def label(self, short_paths: bool = True) -> str:
        """What leads a verdict: function and source, no offset.

        >>> parse_frame("leak_connection+0x15 [leaky_server] at /srv/leaky_server.c:85").label()
        'leak_connection (leaky_server.c:85)'
        >>> parse_frame("JS:~rejectTooLarge /srv/app/server.js:5:24+0xdc [perf-7.map]").label()
        'rejectTooLarge (server.js:5:24)'
        >>> parse_frame("main.handleConn+0x226 [goserver]").label()
        'main.handleConn [goserver]'
        """
        src = self.source
        if src is None:
            return f"{self.name} [{self.module}]" if self.module else self.name
        if short_paths and self.file is not None:
            src = posixpath.basename(self.file) + src[len(self.file) :]
        return f"{self.name} ({src})"


def parse_frame(text: str) -> Frame:
    """Take a frame string apart: ``function+0xOFF [module]``, optionally `` at FILE:LINE``.

    >>> f = parse_frame("net/http.(*Transport).dialConn+0x83f [goclient]")
    >>> f.function, f.offset, f.module
    ('net/http.(*Transport).dialConn', 2111, 'goclient')
    >>> parse_frame("leak_connection+0x15 [leaky_server] at /srv/leaky_server.c:85").line
    85
    >>> parse_frame("[unknown] [perf-10958.map]").unknown, parse_frame("[unknown]").unknown
    (True, True)
    >>> f = parse_frame("JS:~ /srv/app/server.js:19:21+0xdc [perf-7.map]")
    >>> f.file, f.line, f.column, f.name
    ('/srv/app/server.js', 19, 21, '<anonymous>')
    """
    head, file, line = text, None, None
    # The DWARF suffix follows the module's bracket: the first "] at " whose rest is FILE:LINE.
    # (Linear scans only: frame strings come from the traced process and can be long.)
    at = text.find(_SOURCE_MARK)
    if at >= 0:
        path, colon, number = text[at + len(_SOURCE_MARK) :].rpartition(":")
        if colon and path and number.isdigit() and number.isascii():
            head, file, line = text[: at + 1], path, int(number)
    module = None
    if head.endswith("]"):
        cut = head.rfind(" [")
        if cut >= 0:
            module = head[cut + 2 : -1]
            head = head[:cut]
    offset = None
    off = _OFFSET.search(head)
    if off is not None:
        offset = int(off["off"], 16)
        head = head[: off.start()]
    jit = parse_jit_name(head)
    column = None
    if jit is not None and file is None:
        file, line, column = jit.file, jit.line, jit.column
    return Frame(text, head, offset, module, file, line, column, jit)


def with_source(frame: str, file: str, line: int) -> str:
    """A frame string with its DWARF source appended (the form ``parse_frame`` reads back).

    >>> with_source("leak_connection+0x15 [leaky_server]", "/srv/leaky_server.c", 85)
    'leak_connection+0x15 [leaky_server] at /srv/leaky_server.c:85'
    """
    return f"{frame} at {file}:{line}"


@functools.lru_cache(maxsize=65_536)
def function_key(text: str) -> str:
    """A frame as its function and module, offset and source line left out: what groups
    stacks (one function is one code path, whichever instruction or line it was at).

    >>> function_key("leak_connection+0x15 [leaky_server] at /srv/leaky_server.c:85")
    'leak_connection [leaky_server]'
    >>> function_key("recv+0x19 [libc.so.6]"), function_key("[unknown]")
    ('recv [libc.so.6]', '[unknown]')
    """
    frame = parse_frame(text)
    return f"{frame.function} [{frame.module}]" if frame.module is not None else frame.function


# --- the built-in rules --------------------------------------------------------------------------

# The tracer's own kernel frames: its BPF program, the BPF and tracepoint machinery that runs it,
# and the kernel's per-tracepoint call stubs (call_trace_sock_recv_length).
_TRACER_FUNCTIONS = re.compile(
    r"(bpf_prog_\w*|bpf_trace_run\d*|__bpf_trace_\w+|__traceiter_\w+|perf_trace_\w+|trace_call_bpf"
    r"|call_trace_\w+|trace_event_raw_event_\w+|bpf_get_stack\w*|__bpf_get_stack\w*|bpf_prog_run\w*"
    r"|__bpf_prog_run\w*|bpf_dispatcher_\w+|bpf_trampoline_\w+|__bpf_prog_enter\w*|__bpf_prog_exit\w*"
    r"|kprobe_\w+|kretprobe_\w+|__kretprobe_\w+|pre_handler_kretprobe|aggr_pre_handler|trampoline_handler"
    r"|arch_rethook_\w+|rethook_\w+|ftrace_\w+|perf_syscall_\w+|trace_sys_\w+)"
    r"(\.\w+)*\Z"  # compiler suffixes: .constprop.0, .isra.0, .cold
)

# The C and C++ runtime and the dynamic loader, by module (basename as the symbolizer shows it).
_LIBC_MODULES = re.compile(
    r"(libc|libpthread|libdl|librt|libm|libresolv|libnss_\w+|libgcc_s|libstdc\+\+|libc\+\+|libc\+\+abi"
    r"|libunwind|libcrypt|libutil)([-.][\w.+-]*)?\.so(\.[\d.]+)?"
    r"|ld-linux[\w.-]*\.so(\.[\d.]+)?|ld64\.so(\.[\d.]+)?|ld\.so(\.[\d.]+)?|ld-musl-[\w.-]+\.so(\.[\d.]+)?"
    r"|libc\.musl-[\w.-]+\.so(\.[\d.]+)?|linux-vdso\.so\.1|\[vdso\]|\[vsyscall\]"
)
# libc's start-up and thread entry points, also when linked statically into the executable.
_LIBC_FUNCTIONS = re.compile(
    r"(_start|__libc_start_main\w*|__libc_start_call_main|start_thread|clone3?|__clone\w*|_dl_\w+"
    r"|__GI_\w+|__libc_\w+|__pthread_\w+|_IO_\w+)(\.\w+)*\Z"
)
_CXX_STD = ("std::", "__gnu_cxx::", "__cxxabiv1::", "__cxa_")

# Go's standard library: the packages whose import path has no dot in its first element.
# Listed rather than guessed, so a C function with a compiler suffix (handle.part.0) stays C.
_GO_STD_ROOTS = frozenset(
    "archive bufio bytes cmp compress container context crypto database debug embed encoding errors "
    "expvar flag fmt go hash html image index internal io iter log maps math mime net os path plugin "
    "reflect regexp runtime slices sort strconv strings structs sync syscall testing text time unicode "
    "unique unsafe vendor weak".split()
)
# Symbols of Go's runtime that are not package-qualified.
_GO_RUNTIME_BARE = re.compile(r"(_rt0_\w+|type:\S+|type\.\.\S+|go:\S+|gogo|gosave_systemstack_switch)\Z")
_GO_FUNC = re.compile(r"(?P<pkg>(?:[\w.~%-]+/)*[\w~%-]+)\.(?P<rest>[\w(*\[].*)\Z", re.DOTALL)
_GCC_SUFFIX = re.compile(r"\w+(\.(constprop|isra|part|cold|lto_priv|localalias|clone|str)(\.\d+)?)+\Z")

# CPython: the interpreter binary or libpython, and its extension modules.
_PY_MODULES = re.compile(
    r"(python[\d.]*m?d?|libpython[\d.]*m?d?\.so(\.[\d.]+)?|[\w.-]+\.cpython-[\w.-]+\.so)"
)
_PY_FUNCTIONS = re.compile(r"(_?Py[A-Z_]\w*|_PyEval_\w+|method_vectorcall\w*|cfunction_\w+|slot_tp_\w+)\Z")
_PY_STDLIB = re.compile(r"(<frozen [^>]*>|<string>|.*/lib/python\d[\d.]*/(?!(site|dist)-packages/).*)\Z")
_PY_THIRD_PARTY = re.compile(r".*/(site|dist)-packages/.*\Z")

# Node.js: the binary (or libnode), libuv, and V8's C++ and generated code.
_NODE_MODULES = re.compile(r"(node|nodejs|libnode\.so(\.[\d.]+)?|libuv\.so(\.[\d.]+)?)")
_NODE_FUNCTIONS = re.compile(
    r"(uv_\w+|uv__\w+|Builtins_\w+|(non-virtual thunk to )?(\w[\w<>,*& ]* )?(node|v8|cppgc|icu_\d+)::.*)\Z",
    re.DOTALL,
)

_SHARED_OBJECT = re.compile(r".*\.so(\.[\d.]+)?|.*\.node")
_PERF_MAP = re.compile(r"perf-\d+\.map")


def go_package(function: str) -> str | None:
    """The import path of a Go function's package, or None when it does not look like Go.

    >>> go_package("net/http.(*Transport).dialConn.func5")
    'net/http'
    >>> go_package("github.com/lib/pq.(*conn).send")
    'github.com/lib/pq'
    >>> go_package("gopkg.in/yaml%2ev3.(*decoder).unmarshal")
    'gopkg.in/yaml.v3'
    >>> go_package("main.main.func2"), go_package("leak_connection"), go_package("handle.part.0")
    ('main', None, None)
    """
    if _GCC_SUFFIX.match(function):
        return None
    m = _GO_FUNC.match(function)
    if m is None:
        return None
    # The linker escapes dots in the last element of an import path: yaml.v3 -> yaml%2ev3.
    return m["pkg"].replace("%2e", ".")


def is_go_std(package: str) -> bool:
    """
    >>> is_go_std("net/http"), is_go_std("internal/poll"), is_go_std("github.com/x/y"), is_go_std("main")
    (True, True, False, False)
    """
    root = package.split("/", 1)[0]
    return root in _GO_STD_ROOTS


def _is_cxx_std(function: str) -> bool:
    name = function.removeprefix("non-virtual thunk to ").removeprefix("virtual thunk to ")
    # Template instances carry their return type first: "void std::__invoke_impl<...>(...)".
    head = name.split("(", 1)[0]
    if any(head.startswith(p) for p in _CXX_STD):
        return True
    first, sep, rest = head.partition(" ")
    return bool(sep) and "<" not in first and any(rest.startswith(p) for p in _CXX_STD)


def kernel_category(frame: Frame) -> Category:
    """A kernel frame's category: the tracer's own machinery, or the kernel."""
    if frame.module == "bpf" or _TRACER_FUNCTIONS.match(frame.function):
        return Category.TRACER
    if frame.unknown:
        return Category.UNKNOWN
    return Category.KERNEL


def user_category(frame: Frame, rules: Rules | None = None) -> Category:
    """A user frame's category: the user's rules first, then the built-in ones."""
    if rules is not None:
        ruled = rules.category(frame)
        if ruled is not None:
            return ruled
    if frame.unknown:
        return Category.UNKNOWN
    module = frame.module or ""
    function = frame.function
    if frame.jit is not None:
        return _jit_category(frame.jit)
    if _LIBC_MODULES.fullmatch(module) or _LIBC_FUNCTIONS.match(function) or _is_cxx_std(function):
        return Category.LIBC
    if _NODE_MODULES.fullmatch(module) or _NODE_FUNCTIONS.match(function):
        return Category.RUNTIME
    if _PY_MODULES.fullmatch(module) or _PY_FUNCTIONS.match(function):
        return Category.RUNTIME
    if _GO_RUNTIME_BARE.match(function):
        return Category.RUNTIME
    pkg = go_package(function)
    if pkg is not None and is_go_std(pkg):
        return Category.RUNTIME
    if _PERF_MAP.fullmatch(module):
        return Category.APP  # a name the process's own perf map gives: its generated code
    if _SHARED_OBJECT.fullmatch(module):
        return Category.LIBRARY
    return Category.APP


def _jit_category(jit: JitName) -> Category:
    if jit.internal:
        return Category.RUNTIME
    file = jit.file or ""
    if jit.runtime == "python":
        if _PY_STDLIB.match(file):
            return Category.RUNTIME
        if _PY_THIRD_PARTY.match(file):
            return Category.LIBRARY
        return Category.APP
    if not file or file.startswith("node:") or file.startswith("internal/"):
        return Category.RUNTIME
    if "/node_modules/" in file or file.startswith("node_modules/"):
        return Category.LIBRARY
    return Category.APP


# --- stacks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifiedFrame:
    frame: Frame
    category: Category
    kernel: bool

    @property
    def text(self) -> str:
        return self.frame.text


@dataclass(frozen=True)
class ClassifiedStack:
    """A stack with the tracer's frames dropped, every frame categorised."""

    frames: tuple[ClassifiedFrame, ...]
    dropped: int = 0  # the tracer's own frames left out

    @property
    def texts(self) -> tuple[str, ...]:
        """The frame strings to show (the tracer's own left out)."""
        return tuple(f.text for f in self.frames)

    @property
    def app_index(self) -> int | None:
        """Index in ``frames`` of the application frame, or None."""
        for i, f in enumerate(self.frames):
            if f.category is Category.APP:
                return i
        return None

    @property
    def app_frame(self) -> Frame | None:
        """The first (innermost) frame of the application's own code."""
        i = self.app_index
        return None if i is None else self.frames[i].frame

    @property
    def library_frame(self) -> Frame | None:
        """The first third-party frame: the nearest thing to the app when no app frame shows."""
        for f in self.frames:
            if f.category is Category.LIBRARY:
                return f.frame
        return None

    def categories(self) -> set[Category]:
        return {f.category for f in self.frames}

    @property
    def user(self) -> tuple[ClassifiedFrame, ...]:
        return tuple(f for f in self.frames if not f.kernel)

    def to_json(self) -> dict[str, object]:
        """For ``--json``: the frames shown, their categories, and the application frame."""
        app = self.app_frame
        return {
            "frames": list(self.texts),
            "categories": [f.category.value for f in self.frames],
            "app_frame": app.text if app is not None else None,
            "app_label": app.label() if app is not None else None,
            "tracer_frames_dropped": self.dropped,
        }


def classify(kstack: Sequence[str], ustack: Sequence[str], rules: Rules | None = None) -> ClassifiedStack:
    """Categorise a kernel stack and a user stack (innermost first), dropping the tracer's frames.

    >>> s = classify(["bpf_prog_1_tt+0x7 [bpf]", "tcp_v4_connect+0x269 [kernel]"],
    ...              ["connect+0x14 [libc.so.6]", "dial_backend+0x2e [proxy]", "main+0x40 [proxy]"])
    >>> s.texts[0], s.dropped, s.app_frame.function
    ('tcp_v4_connect+0x269 [kernel]', 1, 'dial_backend')
    """
    out: list[ClassifiedFrame] = []
    dropped = 0
    for text in kstack:
        frame = parse_frame(text)
        cat = kernel_category(frame)
        if cat is Category.TRACER:
            dropped += 1
            continue
        out.append(ClassifiedFrame(frame, cat, kernel=True))
    for text in ustack:
        frame = parse_frame(text)
        out.append(ClassifiedFrame(frame, user_category(frame, rules), kernel=False))
    return ClassifiedStack(tuple(out), dropped)


def split_stack(stack: Sequence[str]) -> tuple[Sequence[str], Sequence[str]]:
    """A flat stack (kernel frames, then user frames) cut where the kernel's frames end.

    For stacks read back from JSON or a recording, where the two halves were joined: the
    kernel part runs to the last frame of module ``kernel`` or ``bpf`` (a kernel module's
    frames in between stay with it).

    >>> split_stack(["tcp_close+0x2a [kernel]", "close+0x14 [libc.so.6]", "main+0x9 [app]"])
    (['tcp_close+0x2a [kernel]'], ['close+0x14 [libc.so.6]', 'main+0x9 [app]'])
    """
    cut = 0
    for i, text in enumerate(stack):
        if parse_frame(text).module in KERNEL_MODULES:
            cut = i + 1
    return list(stack[:cut]), list(stack[cut:])


def classify_flat(stack: Sequence[str], rules: Rules | None = None) -> ClassifiedStack:
    """``classify`` for a stack whose kernel and user halves were joined."""
    kstack, ustack = split_stack(stack)
    return classify(kstack, ustack, rules)


def without_tracer_frames(stack: Iterable[str]) -> tuple[str, ...]:
    """A stack without the tracer's own kernel frames (its BPF program, bpf_trace_run, ...).

    >>> without_tracer_frames(["bpf_prog_9_x+0x1 [bpf]", "bpf_trace_run3+0xf7 [kernel]",
    ...                        "__traceiter_inet_sock_set_state+0x37 [kernel]", "tcp_close+0x2a [kernel]"])
    ('tcp_close+0x2a [kernel]',)
    """
    out = []
    for text in stack:
        frame = parse_frame(text)
        if frame.module in KERNEL_MODULES and kernel_category(frame) is Category.TRACER:
            continue
        out.append(text)
    return tuple(out)
