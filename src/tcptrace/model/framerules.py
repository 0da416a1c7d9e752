"""User rules for what counts as the application's code and what is library code.

The built-in rules (``tcptrace.model.frames``) know libc, the Go, Node.js and CPython runtimes,
and that shared objects, ``node_modules`` and ``site-packages`` are third-party. A user's rules
come first and say the rest: an in-house framework is library code, a plugin in a shared
object is the application.

A rule file has one rule a line; the first rule that matches a frame wins::

    # category  FIELD=PATTERN ...   (every condition of a rule must match)
    library  function=github.com/acme/kit/*     Go packages of a shared kit
    library  module=libacme*.so*                a shared object of ours that is not the app
    app      module=libplugin.so                ... or one that is
    library  file=*/vendor/*                    source files under vendor/
    library  function=re:^acme::pool::          a regular expression, searched
    library  function="void acme::Pool::*"      quotes keep spaces in a pattern

The category is ``app`` or ``library``. FIELD is ``function`` (the name, without its
``+0x`` offset; a JIT frame's function name), ``module`` (the file name in brackets) or
``file`` (the source path, from DWARF or a JIT name). PATTERN is a shell glob matched against
the whole value (``*`` also matches ``/``), or ``re:`` and a regular expression searched
anywhere in it. Blank lines and lines starting with ``#`` are ignored.

On the command line, an option value is the conditions of one rule (``function=acme/*``); a
value without ``FIELD=`` is a function pattern (write ``function=operator==*`` for a pattern
that starts with a lowercase word and ``=``).

Rules apply to user frames only: the kernel's and the tracer's own frames keep theirs.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tcptrace.errors import UsageError
from tcptrace.model.frames import Category, Frame

FIELDS = ("function", "module", "file")
CATEGORIES = {"app": Category.APP, "library": Category.LIBRARY}
MAX_RULES = 10_000
MAX_PATTERN = 4096
_WORD = re.compile(r"[a-z_]+")


class FrameRulesError(UsageError):
    """A frame rule (file line or option value) that cannot be read."""


@dataclass(frozen=True)
class Condition:
    """One FIELD=PATTERN: a glob (whole value) or a regular expression (searched)."""

    field: str
    pattern: str
    regex: re.Pattern[str]
    searched: bool = False  # a re: pattern, searched anywhere; a glob matches from the start

    def matches(self, frame: Frame) -> bool:
        value = _value(frame, self.field)
        if value is None:
            return False
        # A glob anchored at the start stays linear on long (hostile) names; searched, it would not.
        found = self.regex.search(value) if self.searched else self.regex.match(value)
        return found is not None


@dataclass(frozen=True)
class Rule:
    category: Category
    conditions: tuple[Condition, ...]
    source: str = ""  # where it was written: "rules.txt:3", "--library"

    def matches(self, frame: Frame) -> bool:
        return all(c.matches(frame) for c in self.conditions)


@dataclass(frozen=True, eq=False)
class Rules:
    """User rules, tried in order before the built-in ones. Compared and hashed by identity,
    so a cache keyed by them costs nothing however many rules there are."""

    rules: tuple[Rule, ...] = ()

    def category(self, frame: Frame) -> Category | None:
        for rule in self.rules:
            if rule.matches(frame):
                return rule.category
        return None

    def __add__(self, other: Rules) -> Rules:
        return Rules(self.rules + other.rules)

    def __len__(self) -> int:
        return len(self.rules)


def _value(frame: Frame, field: str) -> str | None:
    if field == "function":
        return frame.name if frame.jit is not None else frame.function
    if field == "module":
        return frame.module
    return frame.file


def parse_condition(text: str, where: str, default_field: str | None = None, quote: bool = True) -> Condition:
    """``FIELD=PATTERN`` (or a bare pattern when ``default_field`` is given).

    >>> c = parse_condition("module=libacme*.so*", "x")
    >>> c.matches(Frame("", "f", module="libacme-db.so.2")), c.matches(Frame("", "f", module="libc.so.6"))
    (True, False)
    >>> parse_condition("function=re:^acme::", "x").matches(Frame("", "acme::Pool::get"))
    True
    >>> parse_condition("func=x", "rules.txt:2")
    Traceback (most recent call last):
    ...
    tcptrace.model.framerules.FrameRulesError: rules.txt:2: unknown field 'func' (expected function, \
module or file)
    """
    name, sep, pattern = text.partition("=")
    # A bare pattern (no FIELD=) is allowed where a default field is; a word before '=' is
    # always taken as a field, so a misspelt one is an error rather than a function pattern.
    if not sep or (default_field is not None and not _WORD.fullmatch(name)):
        if default_field is None:
            raise FrameRulesError(f"{where}: expected FIELD=PATTERN" + _got(text, quote))
        name, pattern = default_field, text
    if name not in FIELDS:
        raise FrameRulesError(
            f"{where}: unknown field{_quoted(name, quote)} (expected function, module or file)"
        )
    if not pattern:
        raise FrameRulesError(f"{where}: empty pattern for {name}")
    if len(pattern) > MAX_PATTERN:
        raise FrameRulesError(f"{where}: pattern longer than {MAX_PATTERN} characters")
    if pattern.startswith("re:"):
        try:
            return Condition(name, pattern, re.compile(pattern[3:]), searched=True)
        except re.error as e:
            raise FrameRulesError(
                f"{where}: bad regular expression{_quoted(pattern[3:], quote)}: {e}"
            ) from None
    return Condition(name, pattern, re.compile(fnmatch.translate(pattern)))


def _quoted(text: str, quote: bool) -> str:
    """The offending text for an error message, or nothing where it came from a file: the
    file is whatever path was given to a command that runs as root (``--rules /etc/shadow``),
    and its lines are not the user's to see.

    >>> _quoted("libary", True), _quoted("root:$y$j9T$...", False)
    (" 'libary'", '')
    """
    return f" {text!r}" if quote else ""


def _got(text: str, quote: bool) -> str:
    return f", got{_quoted(text, quote)}" if quote else ""


def _split(text: str, where: str) -> list[str]:
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split = True
    lex.escape = ""  # keep backslashes: regular expressions need them
    lex.commenters = ""  # '#' appears in symbols ({lambda()#2})
    try:
        return list(lex)
    except ValueError as e:
        raise FrameRulesError(f"{where}: {e}") from None


def parse_rule_line(line: str, where: str, quote: bool = True) -> Rule | None:
    """One line of a rule file; None for a blank line or a comment.

    >>> parse_rule_line("library function=github.com/acme/kit/* module=svc", "r:1").category
    <Category.LIBRARY: 'library'>
    >>> parse_rule_line("  # a comment", "r:2") is None
    True
    >>> parse_rule_line("libary function=x", "rules.txt:3")
    Traceback (most recent call last):
    ...
    tcptrace.model.framerules.FrameRulesError: rules.txt:3: unknown category 'libary' (expected app or \
library)
    """
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    words = _split(stripped, where)
    kind, conds = words[0], words[1:]
    if kind not in CATEGORIES:
        raise FrameRulesError(f"{where}: unknown category{_quoted(kind, quote)} (expected app or library)")
    if not conds:
        raise FrameRulesError(f"{where}: a rule needs at least one FIELD=PATTERN")
    return Rule(CATEGORIES[kind], tuple(parse_condition(c, where, quote=quote) for c in conds), where)


def parse_rules(text: str, source: str, quote: bool = True) -> Rules:
    """A rule file's text; ``source`` names it in errors (``rules.txt:3: ...``), which quote
    the offending text only when ``quote``.

    >>> len(parse_rules("# ours\\napp module=libplugin.so\\n\\nlibrary file=*/vendor/*\\n", "r"))
    2
    """
    rules = []
    for n, line in enumerate(text.splitlines(), 1):
        rule = parse_rule_line(line, f"{source}:{n}", quote)
        if rule is not None:
            rules.append(rule)
            if len(rules) > MAX_RULES:
                raise FrameRulesError(f"{source}: more than {MAX_RULES} rules")
    return Rules(tuple(rules))


def load_rules(path: str) -> Rules:
    """A rule file from disk; a missing or unreadable file is a one-line error, and an error
    in a line says where and what, never the line's text (see ``_quoted``)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(4 * 1024 * 1024 + 1)
    except OSError as e:
        raise FrameRulesError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise FrameRulesError(f"{path}: not UTF-8 text") from None
    if len(text) > 4 * 1024 * 1024:
        raise FrameRulesError(f"{path}: larger than 4 MiB")
    return parse_rules(text, path, quote=False)


def rules_from_options(library: Sequence[str] = (), app: Sequence[str] = ()) -> Rules:
    """Rules from option values (``--library VALUE``, ``--app VALUE``), app rules first.

    >>> r = rules_from_options(library=["github.com/acme/*"], app=["module=libplugin.so"])
    >>> [(x.category.value, x.conditions[0].field, x.source) for x in r.rules]
    [('app', 'module', '--app'), ('library', 'function', '--library')]
    """
    rules: list[Rule] = []
    for option, values, category in (("--app", app, Category.APP), ("--library", library, Category.LIBRARY)):
        for value in values:
            words = _split(value, option)
            if not words:
                raise FrameRulesError(f"{option}: empty rule")
            conds = tuple(parse_condition(w, option, default_field="function") for w in words)
            rules.append(Rule(category, conds, option))
    return Rules(tuple(rules))


def library_prefixes(module: str, packages: Iterable[str]) -> Rules:
    """Rules making a Go binary's dependencies library code (from its build info).

    >>> r = library_prefixes("svc", ["github.com/lib/pq"])
    >>> r.category(Frame("", "github.com/lib/pq.(*conn).send", module="svc")).value
    'library'
    >>> r.category(Frame("", "github.com/lib/pqx.Open", module="svc")) is None
    True
    """
    out = []
    for pkg in packages:
        # The linker writes the dots of an import path's last element as %2e.
        esc = re.escape(pkg) + "|" + re.escape(_go_escape(pkg))
        cond = Condition("function", f"re:{pkg}", re.compile(rf"\A(?:{esc})[./]"), searched=True)
        mod = Condition("module", module, re.compile(re.escape(module) + r"\Z"))
        out.append(Rule(Category.LIBRARY, (mod, cond), f"go build info of {module}"))
    return Rules(tuple(out))


def _go_escape(path: str) -> str:
    head, sep, last = path.rpartition("/")
    return head + sep + last.replace(".", "%2e")
