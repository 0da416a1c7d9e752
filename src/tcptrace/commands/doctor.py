"""`tcptrace doctor`: can this machine trace, and if not, what fixes it."""

from __future__ import annotations

import os
import shutil
import sys
import time

from tcptrace.errors import TcptraceError
from tcptrace.kernel import headers, loader
from tcptrace.kernel.btf import Btf
from tcptrace.views.common import make_console
from tcptrace.views.doctor import ATTACH_NAME, Check, names_width, print_check_lines, print_verdict

INSTALL = "run scripts/install as root"


def run() -> None:
    """Print every check, the quick ones before the compile (seconds); exit 1 when one that
    tracing needs failed."""
    console = make_console()
    checks, btf, can_attach = quick_checks()
    width = names_width(checks)
    print_check_lines(console, checks, width)
    console.file.flush()  # seen now, also through a pipe
    if can_attach:
        attach = _attach_check(btf)
        print_check_lines(console, [attach], width)
        checks.append(attach)
    print_verdict(console, checks)
    if any(c.required and not c.ok for c in checks):
        sys.exit(1)


def quick_checks() -> tuple[list[Check], Btf | None, bool]:
    """The checks that take no compile; the BTF read; whether the compile can be tried."""
    checks: list[Check] = []
    privileged = loader.has_tracing_privileges()
    checks.append(
        Check(
            "privileges",
            privileged,
            "root" if os.geteuid() == 0 else (loader.CAPS_NEEDED if privileged else f"uid {os.geteuid()}"),
            f"run as root (sudo tcptrace ...) or grant {loader.CAPS_NEEDED}",
        )
    )
    try:
        bcc = loader.import_bcc()
        checks.append(
            Check("bcc", True, f"{getattr(bcc, '__version__', '?')} at {os.path.dirname(bcc.__file__)}")
        )
    except TcptraceError as exc:
        bcc = None
        checks.append(Check("bcc", False, str(exc), INSTALL))
    try:
        checks.append(Check("kernel headers", True, headers.find().describe))
    except TcptraceError as exc:
        checks.append(Check("kernel headers", False, str(exc), exc.hint or INSTALL))
    try:
        tracefs = loader.ensure_tracefs() if privileged else _tracefs_if_mounted()
        checks.append(
            Check(
                "tracefs",
                tracefs is not None,
                tracefs or "not mounted",
                "mount -t tracefs nodev /sys/kernel/tracing",
            )
        )
    except TcptraceError as exc:
        tracefs = None
        checks.append(Check("tracefs", False, str(exc), exc.hint))
    if tracefs is not None:
        tracepoints = {(g, n): p.feature for p in loader.PARTS.values() for g, n in p.tracepoints}
        for (group, name), feature in sorted(tracepoints.items()):
            present = os.path.isdir(os.path.join(tracefs, "events", group, name))
            checks.append(
                Check(
                    f"tracepoint {group}:{name}",
                    present,
                    "present" if present else f"missing: {feature}",
                    "a newer kernel (4.16+) is needed",
                )
            )
    btf: Btf | None
    try:
        btf = Btf.load()
        offset = btf.member_offset("sock", "__sk_common.skc_flags")
        checks.append(Check("kernel BTF", True, f"sk_flags at byte {offset}"))
    except TcptraceError as exc:
        btf = None
        checks.append(Check("kernel BTF", False, str(exc), "a kernel built with CONFIG_DEBUG_INFO_BTF=y"))
    checks.append(path_check())
    release = os.uname().release
    major, minor = (int(x) for x in release.split(".")[:2]) if release[0].isdigit() else (0, 0)
    checks.append(
        Check("ring buffer", (major, minor) >= (5, 8), f"kernel {release} (needs 5.8+)", "a 5.8+ kernel")
    )
    return checks, btf, all(c.ok for c in checks if c.required) and bcc is not None


def _tracefs_if_mounted() -> str | None:
    for path in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


def is_tcptrace_script(path: str) -> bool:
    """Whether ``path`` is a console script of this package (what pip, pipx and
    scripts/install write: ``from tcptrace.cli import main``), not another program of the
    same name such as Debian's tcptrace (a tcpdump file analyser, an ELF binary)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return not head.startswith(b"\x7fELF") and b"tcptrace.cli" in head


def path_check(path: str | None = None) -> Check:
    """Which ``tcptrace`` the shell runs: a warning when another program of that name
    comes first on PATH."""
    found = shutil.which("tcptrace", path=path)
    if found is None:
        return Check("tcptrace on PATH", True, "none (run it as `python -m tcptrace`)", required=False)
    if is_tcptrace_script(found):
        return Check("tcptrace on PATH", True, found, required=False)
    return Check(
        "tcptrace on PATH",
        False,
        f"{found} comes first and is another program (Debian's tcptrace package is a tcpdump file analyser)",
        "run this one by its full path (scripts/install links /usr/local/bin/tcptrace) or put "
        "its directory first on PATH",
        required=False,
    )


def _attach_check(btf: Btf | None) -> Check:
    started = time.monotonic()
    try:
        with make_console(stderr=True).status("compiling and attaching every BPF program…"):
            program = loader.load(list(loader.PARTS.values()), btf=btf)
    except TcptraceError as exc:
        return Check(ATTACH_NAME, False, str(exc), exc.hint or INSTALL)
    program.close()
    return Check(ATTACH_NAME, True, f"all programs in {time.monotonic() - started:.1f}s")
