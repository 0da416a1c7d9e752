"""Names that JIT runtimes write into /tmp/perf-PID.map, split into function and source.

Node.js (V8) with ``--perf-basic-prof`` writes ``KIND:TIER NAME FILE:LINE:COLUMN``, where
LINE:COLUMN is where the function is *defined* (not the line running):

    JS:~rejectTooLarge /srv/app/server.js:5:24      interpreted (Ignition)
    JS:^defineLazyProperties node:internal/util:598:30   baseline (Sparkplug); * optimized
    JS:~ /srv/app/server.js:19:21                   an anonymous function
    Builtin:RecordWriteSaveFP                       V8's own code, no source

Interpreted functions get a frame of their own only with ``--interpreted-frames-native-stack``
as well; without it they all run in ``Builtins_InterpreterEntryTrampoline [node]``.
Older V8s wrote ``LazyCompile:*name file:line`` and ``Function:~name file:line``.

CPython 3.12+ with ``-X perf`` (or ``PYTHONPERFSUPPORT=1``) writes ``py::QUALNAME:FILE``, with
no line: ``py::handle_request:/srv/app/server.py``, ``py::_find_and_load:<frozen
importlib._bootstrap>``.

Pure: strings in, values out; names come from the traced process and are never trusted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# V8's code kinds whose names carry a script position (JS functions, eval'd and top-level code).
V8_SCRIPT_KINDS = frozenset({"JS", "Eval", "Function", "LazyCompile", "Script", "InterpretedFunction"})
# V8's code kinds of its own machinery (no script position).
V8_INTERNAL_KINDS = frozenset(
    {"Builtin", "BytecodeHandler", "Stub", "RegExp", "Handler", "Callback", "KeyedLoadIC", "KeyedStoreIC"}
)
_V8 = re.compile(r"(?P<kind>[A-Za-z]+):(?P<rest>.*)\Z", re.DOTALL)
# The position V8 ends a script function's name with: :LINE or :LINE:COLUMN.
_V8_POS = re.compile(r":(?P<line>\d+)(?::(?P<col>\d+))?\Z")
# Where a script name starts: an absolute path, a node: builtin module, a URL, [eval]-like names.
_V8_FILE_START = re.compile(r" (?=/|node:|file:|https?:|\[|<|\.)")
_V8_TIERS = "~*^+'"
_PY = re.compile(r"py::(?P<name>[^:]*):(?P<file>.*)\Z", re.DOTALL)


@dataclass(frozen=True)
class JitName:
    """A perf-map name taken apart. ``runtime`` is ``node`` or ``python``."""

    runtime: str
    kind: str
    function: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    tier: str = ""

    @property
    def internal(self) -> bool:
        """The runtime's own machinery (V8 builtins and stubs), never a script's function."""
        return self.runtime == "node" and self.kind in V8_INTERNAL_KINDS

    def label(self) -> str:
        """Function and source for a person: ``rejectTooLarge (server.js:5:24)``.

        >>> parse_jit_name("JS:~rejectTooLarge /srv/app/server.js:5:24").label()
        'rejectTooLarge (/srv/app/server.js:5:24)'
        >>> parse_jit_name("JS:~ /srv/app/server.js:19:21").label()
        '<anonymous> (/srv/app/server.js:19:21)'
        >>> parse_jit_name("py::Handler.handle:/srv/app/server.py").label()
        'Handler.handle (/srv/app/server.py)'
        """
        name = self.function or "<anonymous>"
        where = source_text(self.file, self.line, self.column)
        return name if where is None else f"{name} ({where})"


def source_text(file: str | None, line: int | None, column: int | None = None) -> str | None:
    """``file:line:column``, ``file:line`` or the file alone; None without a file.

    >>> source_text("server.js", 5, 24), source_text("a.c", 7), source_text("a.py", None, 3)
    ('server.js:5:24', 'a.c:7', 'a.py')
    """
    if file is None:
        return None
    if line is None:
        return file
    return f"{file}:{line}" if column is None else f"{file}:{line}:{column}"


def parse_jit_name(name: str) -> JitName | None:
    """The parts of a Node.js or CPython perf-map name; None when it is neither.

    >>> parse_jit_name("JS:~rejectTooLarge /srv/app/server.js:5:24")
    JitName(runtime='node', kind='JS', function='rejectTooLarge', file='/srv/app/server.js', line=5, \
column=24, tier='~')
    >>> parse_jit_name("JS:^resolve node:path:1217:10").file
    'node:path'
    >>> parse_jit_name("JS:~get size /srv/my app/cache.js:40:11").function
    'get size'
    >>> parse_jit_name("LazyCompile:*emit events.js:314").line
    314
    >>> parse_jit_name("Builtin:RecordWriteSaveFP").internal
    True
    >>> parse_jit_name("py::Handler.handle:/srv/app/server.py").function
    'Handler.handle'
    >>> parse_jit_name("py::_find_and_load:<frozen importlib._bootstrap>").file
    '<frozen importlib._bootstrap>'
    >>> parse_jit_name("jitted_leak_handler") is None
    True
    """
    py = _PY.match(name)
    if py is not None:
        return JitName("python", "py", py["name"], file=py["file"] or None)
    v8 = _V8.match(name)
    if v8 is None:
        return None
    kind, rest = v8["kind"], v8["rest"]
    if kind in V8_INTERNAL_KINDS:
        return JitName("node", kind, rest)
    if kind not in V8_SCRIPT_KINDS:
        return None
    tier = rest[0] if rest[:1] and rest[0] in _V8_TIERS else ""
    rest = rest[len(tier) :]
    # Linear scans only: names come from the traced process and can be long.
    pos = _V8_POS.search(rest)
    head = rest[: pos.start()] if pos is not None else ""
    start = _V8_FILE_START.search(head)
    cut = start.start() if start is not None else head.rfind(" ")
    if pos is None or cut < 0 or cut + 1 >= len(head):
        # A name without a script position (V8 writes some for code it made up).
        return JitName("node", kind, rest.strip(), tier=tier)
    col = pos["col"]
    return JitName(
        "node",
        kind,
        head[:cut].strip(),
        file=head[cut + 1 :],
        line=int(pos["line"]),
        column=int(col) if col is not None else None,
        tier=tier,
    )


@dataclass(frozen=True)
class PerfMapEntry:
    start: int
    size: int
    name: str


def parse_perf_map(text: str) -> list[PerfMapEntry]:
    """The lines of a /tmp/perf-PID.map (``START SIZE NAME``, hexadecimal); bad lines left out.

    >>> [e] = parse_perf_map("2e90c367c8d6 1c JS:~rejectTooLarge /srv/app/server.js:5:24\\nbad line\\n")
    >>> hex(e.start), e.size, e.name
    ('0x2e90c367c8d6', 28, 'JS:~rejectTooLarge /srv/app/server.js:5:24')
    """
    out = []
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) != 3:
            continue
        try:
            out.append(PerfMapEntry(int(parts[0], 16), int(parts[1], 16), parts[2]))
        except ValueError:
            continue
    return out
