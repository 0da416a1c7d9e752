"""Text that came from the traced host, made safe to show: the one escaping rule.

Process names, paths, cgroup names, symbols and every string of a recording are chosen by
whoever runs on the host. Shown raw, a terminal escape (``\\x1b[2J``) clears root's screen,
a carriage return or newline forges a line (of a view, a log, a Prometheus scrape read as
text), and a bidi override (U+202E) reverses what follows. So every character that is not
printable is shown as a backslash escape, and nothing else changes: printable text, the
space and the backslash itself stay as they are (``decode_comm`` already writes bytes
that are not UTF-8 as ``\\xNN``).

Pure: views/ wraps this into rich ``Text`` (never markup), export/ uses it for label
values. JSON output does not use it: JSON escapes what it must and stays lossless.
"""

from __future__ import annotations


def escape_char(ch: str) -> str:
    r"""One non-printable character as an escape.

    >>> escape_char("\x1b"), escape_char("\u202e"), escape_char("\U000e0001")
    ('\\x1b', '\\u202e', '\\U000e0001')
    """
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    r"""``text`` with every non-printable character escaped (``str.isprintable``: controls,
    C1 controls, line and paragraph separators, format characters such as bidi overrides,
    lone surrogates, unassigned code points).

    >>> printable("nginx")
    'nginx'
    >>> printable("a\tb\r\n\x1b[31m\x9b")
    'a\\x09b\\x0d\\x0a\\x1b[31m\\x9b'
    >>> printable("evil\u202egpj.exe")
    'evil\\u202egpj.exe'
    >>> printable("[bold red]x é 漢")
    '[bold red]x é 漢'
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else escape_char(ch) for ch in text)
