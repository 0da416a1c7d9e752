"""User rules for library and application code: the file format, option values, their errors."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest

import tcptrace.model.framerules
from tcptrace.errors import UsageError
from tcptrace.model.framerules import FrameRulesError, load_rules, parse_rules, rules_from_options
from tcptrace.model.frames import Category, classify, parse_frame, user_category

DATA = Path(__file__).resolve().parent.parent / "data"

RULES = """\
# ours
library  function=github.com/acme/kit/*
app      module=libplugin.so
library  file=*/vendor/*
library  function=re:^acme::pool::\\w+
library  function="void acme::Pool::*"   module=svc
library  function=main.logf*
"""


def test_doctests() -> None:
    assert doctest.testmod(tcptrace.model.framerules).failed == 0


@pytest.mark.parametrize(
    ("text", "category"),
    [
        ("github.com/acme/kit/db.(*Pool).Get+0x10 [svc]", Category.LIBRARY),
        ("github.com/acme/svc/api.Serve+0x10 [svc]", Category.APP),
        ("plugin_handle+0x10 [libplugin.so]", Category.APP),  # a shared object, made the app's
        ("other+0x10 [libother.so]", Category.LIBRARY),
        ("parse+0x10 [svc] at /srv/src/vendor/yaml/parse.c:12", Category.LIBRARY),
        ("parse+0x10 [svc] at /srv/src/app/parse.c:12", Category.APP),
        ("acme::pool::checkout(int)+0x10 [svc]", Category.LIBRARY),
        ("acme::poolx(int)+0x10 [svc]", Category.APP),
        ("void acme::Pool::put<int>(int)+0x10 [svc]", Category.LIBRARY),
        ("void acme::Pool::put<int>(int)+0x10 [other]", Category.APP),  # both conditions must match
        ("accept+0x4f [libc.so.6]", Category.LIBC),  # no rule matches: the built-in ones answer
    ],
)
def test_rule_file_categories(text: str, category: Category) -> None:
    rules = parse_rules(RULES, "rules.txt")
    assert len(rules) == 6
    assert user_category(parse_frame(text), rules) is category


def test_a_library_rule_moves_the_application_frame_outwards() -> None:
    stacks = json.loads((DATA / "stacks.json").read_text())
    send = stacks["go_server_error_path"]["samples"][0]
    assert classify(send["kstack"], send["ustack"]).app_frame.function == "main.handleConn"  # type: ignore[union-attr]
    rules = rules_from_options(library=["main.handleConn"])
    app = classify(send["kstack"], send["ustack"], rules).app_frame
    assert app is not None and app.function == "main.serveRaw.func1"


def test_rules_apply_to_user_frames_only() -> None:
    rules = rules_from_options(app=["module=kernel"])
    stack = classify(["tcp_close+0x2a [kernel]"], ["close+0x14 [libc.so.6]"], rules)
    assert [f.category for f in stack.frames] == [Category.KERNEL, Category.LIBC]


def test_jit_frames_match_by_function_name_and_file() -> None:
    frame = parse_frame("JS:~query /srv/app/db/pool.js:10:3+0xdc [perf-7.map]")
    assert user_category(frame) is Category.APP
    assert user_category(frame, rules_from_options(library=["query"])) is Category.LIBRARY
    assert user_category(frame, rules_from_options(library=["file=*/db/*"])) is Category.LIBRARY


def test_option_values() -> None:
    rules = rules_from_options(library=["github.com/acme/*", "module=libacme*.so* function=acme_*"])
    assert [(c.field, c.pattern) for c in rules.rules[1].conditions] == [
        ("module", "libacme*.so*"),
        ("function", "acme_*"),
    ]
    assert rules.rules[0].conditions[0].field == "function"
    # '=' after something that is not a word: a function pattern; after a word, a field.
    assert rules_from_options(library=["*::operator==*"]).rules[0].conditions[0].pattern == "*::operator==*"
    assert (
        rules_from_options(library=["function=operator==*"]).rules[0].conditions[0].pattern == "operator==*"
    )


def test_backslashes_and_hashes_are_kept() -> None:
    rules = parse_rules(r"library function=re:^\w+::lambda\d+ module={lambda()#2}" + "\n", "r")
    (cond_f, cond_m) = rules.rules[0].conditions
    assert cond_f.pattern == r"re:^\w+::lambda\d+"
    assert cond_m.pattern == "{lambda()#2}"


def test_a_rule_file_on_disk_is_never_quoted_in_errors(tmp_path: Path) -> None:
    # tcptrace runs as root: --rules PATH must not print a line of a file the user cannot read.
    secret = tmp_path / "shadow"
    lines = {
        "root:$y$j9T$Qk3:19000:0:99999:7:::": "root",
        "library function=re:hunter2[": "hunter2",
        "hunter2": "hunter2",
        "app hunter2=token": "hunter2",
        "app hunter2": "hunter2",
    }
    for line, secret_word in lines.items():
        secret.write_text(line + "\n")
        with pytest.raises(FrameRulesError) as e:
            load_rules(str(secret))
        shown = str(e.value)
        assert shown.startswith(f"{secret}:1: ") and "\n" not in shown
        assert secret_word not in shown.removeprefix(f"{secret}:1: "), shown


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("libary function=x", "rules.txt:2: unknown category 'libary' (expected app or library)"),
        ("library func=x", "rules.txt:2: unknown field 'func' (expected function, module or file)"),
        ("library", "rules.txt:2: a rule needs at least one FIELD=PATTERN"),
        ("library function=", "rules.txt:2: empty pattern for function"),
        ("library function", "rules.txt:2: expected FIELD=PATTERN, got 'function'"),
        (
            "library function=re:acme[",
            "rules.txt:2: bad regular expression 'acme[': unterminated character set",
        ),
        ('library function="acme', "rules.txt:2: No closing quotation"),
    ],
)
def test_rule_file_errors_are_one_line(text: str, message: str) -> None:
    with pytest.raises(FrameRulesError) as e:
        parse_rules("# first line\n" + text + "\n", "rules.txt")
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, UsageError) and e.value.exit_code == 2


@pytest.mark.parametrize(
    ("library", "app", "message"),
    [
        (["func=x"], [], "--library: unknown field 'func'"),
        ([], [""], "--app: empty rule"),
        (["re:("], [], "--library: bad regular expression '('"),
    ],
)
def test_option_errors(library: list[str], app: list[str], message: str) -> None:
    with pytest.raises(FrameRulesError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        rules_from_options(library=library, app=app)


def test_load_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.txt"
    path.write_text(RULES)
    assert len(load_rules(str(path))) == 6
    with pytest.raises(FrameRulesError, match=r"^.*missing\.txt: No such file or directory$"):
        load_rules(str(tmp_path / "missing.txt"))
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(FrameRulesError, match="not UTF-8 text"):
        load_rules(str(tmp_path / "bin"))
    with pytest.raises(FrameRulesError, match="Is a directory"):
        load_rules(str(tmp_path))
