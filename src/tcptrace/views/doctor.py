"""`tcptrace doctor` output."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.text import Text

from tcptrace.views.common import safe


@dataclass(frozen=True)
class Check:
    """One check of `tcptrace doctor` and its outcome; ``fix`` says what to do when it failed."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def check_line(check: Check, width: int = 38) -> Text:
    mark = ("ok", "green") if check.ok else (("FAIL", "bold red") if check.required else ("warn", "yellow"))
    text = Text()
    text.append(f"{mark[0]:<5}", style=mark[1])
    # Details name paths and carry error messages of bcc and the kernel: escaped.
    text.append(f"{safe(check.name):<{width}} {safe(check.detail)}")
    if not check.ok and check.fix:
        text.append(f"\n     fix: {safe(check.fix)}", style="bold")
    return text


ATTACH_NAME = "compile and attach"


def names_width(checks: list[Check]) -> int:
    """The name column's width: the longest name, the last check's (compile) included."""
    return max([len(ATTACH_NAME), *(len(safe(c.name)) for c in checks)])


def print_check_lines(console: Console, checks: list[Check], width: int) -> None:
    for check in checks:
        console.print(check_line(check, width), soft_wrap=True)


def print_verdict(console: Console, checks: list[Check]) -> None:
    failed = [c for c in checks if c.required and not c.ok]
    console.print()
    if failed:
        console.print(
            Text(
                f"{len(failed)} check(s) failed: tracing cannot work until they are fixed.", style="bold red"
            )
        )
    else:
        console.print(Text("ready to trace.", style="bold green"))
