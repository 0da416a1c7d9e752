"""file:line from DWARF: ELF files built here at test time (gcc, objcopy; go when installed)."""

from __future__ import annotations

import doctest
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

import tcptrace.system.symbols
from tcptrace.model.attribution import ProcessFacts
from tcptrace.model.events import Op
from tcptrace.model.framerules import rules_from_options
from tcptrace.model.frames import parse_frame
from tcptrace.model.lifecycle import CodePath
from tcptrace.system.symbols import (
    ElfLines,
    LineResolver,
    StackLines,
    find_mapping,
    go_dependencies,
    parse_maps,
    process_facts,
)
from tests.gobuild import go_binary, needs_go

PROGRAM = """\
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline)) void report(void)
{
    printf("%d %p\\n", (int)getpid(), __builtin_return_address(0));
    fflush(stdout);
    char c;
    if (read(0, &c, 1) < 0)
        return;
}

__attribute__((noinline)) int leaky_handler(int x)
{
    report(); /* CALL_LINE */
    return x + 1;
}

int main(int argc, char **argv)
{
    (void)argv;
    return leaky_handler(argc) == 0;
}
"""
CALL_LINE = next(i for i, line in enumerate(PROGRAM.splitlines(), 1) if "CALL_LINE" in line)
# gcc puts a function's first line-table row on its opening brace.
HANDLER_LINE = next(i for i, line in enumerate(PROGRAM.splitlines(), 1) if "int leaky_handler(" in line) + 1

needs_cc = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("objcopy") is None,
    reason="needs gcc and binutils (scripts/install --dev)",
)


def test_doctests() -> None:
    assert doctest.testmod(tcptrace.system.symbols).failed == 0


def build(tmp: Path, name: str = "leaky", *flags: str) -> Path:
    src = tmp / "leaky_server.c"
    src.write_text(PROGRAM)
    out = tmp / name
    subprocess.run(
        ["gcc", "-g", "-O0", "-fno-omit-frame-pointer", *flags, "-o", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    return out


def objcopy(*args: str) -> None:
    subprocess.run(["objcopy", *args], check=True, capture_output=True)


def build_id(path: Path) -> str:
    with path.open("rb") as f:
        for note in ELFFile(f).get_section_by_name(".note.gnu.build-id").iter_notes():  # type: ignore[union-attr]
            return str(note["n_desc"])
    raise AssertionError("no build id")


def symbol(path: Path, name: str) -> int:
    with path.open("rb") as f:
        for sym in ELFFile(f).get_section_by_name(".symtab").iter_symbols():  # type: ignore[union-attr]
            if sym.name == name:
                return int(sym["st_value"])
    raise AssertionError(name)


@dataclass
class Running:
    pid: int
    return_address: int  # in leaky_handler, after its call of report()


@pytest.fixture
def run() -> Iterator[type[Running]]:
    procs: list[subprocess.Popen[str]] = []

    class Runner(Running):
        @classmethod
        def of(cls, binary: Path) -> Running:
            p = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None
            pid, addr = p.stdout.readline().split()
            assert int(pid) == p.pid
            return Running(p.pid, int(addr, 16))

    yield Runner
    for p in procs:
        p.kill()
        p.wait()


# --- /proc/PID/maps -------------------------------------------------------------------------------


def test_parse_maps_skips_bad_lines() -> None:
    text = (
        "00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/dbus-daemon\n"
        "garbage\n"
        "zz-00452000 r-xp 00000000 08:02 1 /x\n"
        "7f2c00000000-7f3c00000000 rw-p 00000000 00:00 0\n"
        "7f5000000000-7f6000000000 r-xp 00001000 fe:01 99 /srv/my app/lib x.so (deleted)\n"
    )
    maps = parse_maps(text)
    assert [m.path for m in maps] == ["/usr/bin/dbus-daemon", "", "/srv/my app/lib x.so (deleted)"]
    assert maps[2].deleted and maps[2].file_backed and not maps[1].file_backed
    assert find_mapping(maps, 0x400000) is maps[0] and find_mapping(maps, 0x452000) is None
    assert find_mapping(maps, 0x7F5FFFFFFFFF) is maps[2] and find_mapping(maps, 0x10) is None


# --- a live process -------------------------------------------------------------------------------


@needs_cc
def test_line_of_a_return_address_in_a_live_process(tmp_path: Path, run: type[Running]) -> None:
    binary = build(tmp_path)
    proc = run.of(binary)  # type: ignore[attr-defined]
    r = LineResolver()
    (line,) = r.resolve(proc.pid, [proc.return_address])
    assert line is not None
    assert (line.file, line.line) == (str(tmp_path / "leaky_server.c"), CALL_LINE)
    assert line.short() == f"leaky_server.c:{CALL_LINE}"
    assert r.stats.files_opened == 1 and r.stats.resolved == 1 and r.stats.hits == 0

    # Again, and from a second process of the same binary: the file and the line are cached.
    again = run.of(binary)  # type: ignore[attr-defined]
    assert r.resolve(again.pid, [again.return_address]) == [line]
    assert r.resolve(proc.pid, [proc.return_address, 0, 1 << 47]) == [line, None, None]
    assert r.stats.files_opened == 1 and r.stats.hits == 2

    # What the symbolizer will show: its frame strings, with the line where there is one.
    shown = r.annotate(proc.pid, [proc.return_address, 1 << 47], ["leaky_handler+0x9 [leaky]", "[unknown]"])
    assert shown == (f"leaky_handler+0x9 [leaky] at {tmp_path / 'leaky_server.c'}:{CALL_LINE}", "[unknown]")
    assert parse_frame(shown[0]).label() == f"leaky_handler (leaky_server.c:{CALL_LINE})"
    # Lines are looked up for the application's frames (and libraries'), not libc's or a runtime's.
    foreign = ("send+0x9 [libc.so.6]", "fmt.Println+0x9 [x]")
    assert r.annotate(proc.pid, [proc.return_address] * 2, foreign) == foreign
    # ... unless a user rule makes them the application's.
    rules = rules_from_options(app=["module=libc.so.6"])
    (ruled,) = r.annotate(proc.pid, [proc.return_address], ["send+0x9 [libc.so.6]"], rules)
    assert ruled.endswith(f"leaky_server.c:{CALL_LINE}")


@needs_cc
def test_a_process_that_is_gone_resolves_nothing(tmp_path: Path) -> None:
    binary = build(tmp_path)
    p = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    addr = int(p.stdout.readline().split()[1], 16)
    r = LineResolver()
    (loc,) = r.locate(p.pid, [addr])  # while it lives: its maps and its file
    assert loc is not None and r.stats.resolved == 0  # no line table read yet
    p.kill()
    p.wait()
    # Its maps went with it: nothing to resolve against, even with the file cached.
    assert LineResolver().resolve(p.pid, [addr]) == [None]
    assert r.resolve(p.pid, [addr]) == [None]
    # But what was located while it lived still resolves: the file stays open in the cache.
    line = r.line(loc)
    assert line is not None and line.line == CALL_LINE
    assert r.annotate_located(["leaky_handler+0x9 [leaky]"], [loc]) == (
        f"leaky_handler+0x9 [leaky] at {line.file}:{CALL_LINE}",
    )


@needs_cc
def test_function_start_line(tmp_path: Path) -> None:
    binary = build(tmp_path)
    elf = ElfLines(str(binary))
    try:
        line = elf.line_at(symbol(binary, "leaky_handler"))
        assert line is not None and line.line == HANDLER_LINE
        assert elf.line_at(0) is None
        assert elf.key == "gnu:" + build_id(binary)
    finally:
        elf.close()


# --- separate debug files ---------------------------------------------------------------------------


@needs_cc
def test_debug_file_by_debuglink(tmp_path: Path, run: type[Running]) -> None:
    binary = build(tmp_path)
    objcopy("--only-keep-debug", str(binary), str(tmp_path / "leaky.debug"))
    objcopy("--strip-debug", f"--add-gnu-debuglink={tmp_path / 'leaky.debug'}", str(binary))
    proc = run.of(binary)  # type: ignore[attr-defined]
    r = LineResolver(debug_dirs=[])
    (line,) = r.resolve(proc.pid, [proc.return_address])
    assert line is not None and line.line == CALL_LINE
    (elf,) = r._files.values()
    assert elf.debug_file is not None and elf.debug_file.endswith("/leaky.debug")


@needs_cc
def test_debug_file_by_build_id(tmp_path: Path, run: type[Running]) -> None:
    binary = build(tmp_path)
    bid = build_id(binary)
    debug_dir = tmp_path / "debug"
    target = debug_dir / ".build-id" / bid[:2] / f"{bid[2:]}.debug"
    target.parent.mkdir(parents=True)
    objcopy("--only-keep-debug", str(binary), str(target))
    objcopy("--strip-debug", str(binary))
    proc = run.of(binary)  # type: ignore[attr-defined]
    assert LineResolver(debug_dirs=[]).resolve(proc.pid, [proc.return_address]) == [None]
    (line,) = LineResolver(debug_dirs=[str(debug_dir)]).resolve(proc.pid, [proc.return_address])
    assert line is not None and line.line == CALL_LINE


@needs_cc
def test_debuglink_without_build_id_is_checked_by_crc(tmp_path: Path, run: type[Running]) -> None:
    binary = build(tmp_path, "leaky", "-Wl,--build-id=none")
    debug = tmp_path / "leaky.debug"
    objcopy("--only-keep-debug", str(binary), str(debug))
    objcopy("--strip-debug", f"--add-gnu-debuglink={debug}", str(binary))
    proc = run.of(binary)  # type: ignore[attr-defined]
    (line,) = LineResolver(debug_dirs=[]).resolve(proc.pid, [proc.return_address])
    assert line is not None and line.line == CALL_LINE
    # Another build's debug info under the linked name: its CRC is not the one linked.
    other = build(tmp_path, "other", "-Wl,--build-id=none", "-O1")
    objcopy("--only-keep-debug", str(other), str(debug))
    assert LineResolver(debug_dirs=[]).resolve(proc.pid, [proc.return_address]) == [None]


# --- hostile files ----------------------------------------------------------------------------------


def fake_proc(tmp: Path, pid: int, path: str, content: bytes, start: int = 0x400000) -> Path:
    proc = tmp / "proc"
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "maps").write_text(f"{start:x}-{start + 0x10000:x} r-xp 00000000 fe:01 77 {path}\n")
    target = proc / str(pid) / "root" / path.lstrip("/")
    target.parent.mkdir(parents=True)
    target.write_bytes(content)
    return proc


@pytest.mark.parametrize(
    "content",
    [b"", b"not an elf at all", b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\xff" * 200],
)
def test_a_file_that_is_no_elf_gives_no_line(tmp_path: Path, content: bytes) -> None:
    proc = fake_proc(tmp_path, 4242, "/srv/app", content)
    r = LineResolver(proc=str(proc))
    assert r.resolve(4242, [0x401000, 0x401004]) == [None, None]
    assert r.stats.errors == 1 and r.stats.files_opened == 0  # tried once, remembered


@needs_cc
def test_corrupt_debug_info_never_raises(tmp_path: Path) -> None:
    binary = build(tmp_path)
    data = binary.read_bytes()
    with binary.open("rb") as f:
        elf = ELFFile(f)
        sections = [elf.get_section_by_name(n) for n in (".debug_line", ".debug_info")]
        spans = [(int(s["sh_offset"]), int(s["sh_size"])) for s in sections if s is not None]
    assert len(spans) == 2
    handler = symbol(binary, "leaky_handler")
    rnd = random.Random(16)
    errors = resolved = 0
    for n in range(40):
        bad = bytearray(data)
        lo, size = spans[n % 2]
        for _ in range(8):
            bad[lo + rnd.randrange(size)] = rnd.randrange(256)
        # Mapped at 0x10000 from offset 0, as a PIE's first segment: vaddr = address - 0x10000.
        proc = fake_proc(tmp_path / str(n), 7, "/srv/leaky", bytes(bad), start=0x10000)
        r = LineResolver(proc=str(proc))
        lines = r.resolve(7, [0x10000 + handler + 1, 0x10000 + handler + 8])
        assert len(lines) == 2
        errors += r.stats.errors
        resolved += r.stats.resolved
    assert errors > 0 and resolved > 0  # both paths ran: parse failures counted, the rest resolved
    # The same mapping of the intact file resolves: the corruption, not the mapping, lost the lines.
    proc = fake_proc(tmp_path / "intact", 7, "/srv/leaky", data, start=0x10000)
    (line,) = LineResolver(proc=str(proc)).resolve(7, [0x10000 + handler + 1])
    assert line is not None and line.line == HANDLER_LINE


# --- Go: compressed DWARF, no .debug_aranges, build info -------------------------------------------

GO_PROGRAM = """\
package main

import "os"

//go:noinline
func square(n int) int {
	return n * n
}

//go:noinline
func leakyHandler(n int) int {
	return square(n) + 1
}

func main() {
	os.Exit(leakyHandler(len(os.Args)) - 2)
}
"""


@needs_go
def test_go_binary_lines_and_build_info(tmp_path: Path) -> None:
    with go_binary(tmp_path, GO_PROGRAM) as binary:
        elf = ElfLines(str(binary))
        try:
            assert elf.go_info is not None
            assert (elf.go_info.main_module, elf.go_info.path) == ("example.com/leaky", "example.com/leaky")
            assert elf.go_info.go_version.startswith("go1.")
            assert elf.key.startswith("go:") or elf.key.startswith("gnu:")
            # Its entry is the stack-growth check, on the line of the func keyword.
            line = elf.line_at(symbol(binary, "main.leakyHandler"))
            func_line = GO_PROGRAM.splitlines().index("func leakyHandler(n int) int {") + 1
            assert line is not None and line.file == str(tmp_path / "main.go") and line.line == func_line
            # A function of the runtime, in another compile unit, from the same file.
            rt = elf.line_at(symbol(binary, "runtime.main") + 4)
            assert rt is not None and rt.file.endswith("/runtime/proc.go")
        finally:
            elf.close()


@needs_cc
def test_dwarf_over_the_bound_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = build(tmp_path)
    monkeypatch.setattr(tcptrace.system.symbols, "MAX_DWARF_BYTES", 1024)
    elf = ElfLines(str(binary))
    try:
        assert not elf.has_lines and elf.line_at(symbol(binary, "leaky_handler")) is None
    finally:
        elf.close()


@needs_cc
def test_a_binary_deleted_since_it_started_resolves(tmp_path: Path, run: type[Running]) -> None:
    binary = build(tmp_path)
    proc = run.of(binary)  # type: ignore[attr-defined]
    binary.unlink()  # as a deploy replacing it does; the process maps "leaky (deleted)"
    (line,) = LineResolver().resolve(proc.pid, [proc.return_address])
    assert line is not None and line.line == CALL_LINE


@needs_cc
def test_a_fifo_where_the_debug_file_should_be_is_refused(tmp_path: Path, run: type[Running]) -> None:
    binary = build(tmp_path)
    bid = build_id(binary)
    fifo = tmp_path / "debug" / ".build-id" / bid[:2] / f"{bid[2:]}.debug"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    objcopy("--strip-debug", str(binary))
    proc = run.of(binary)  # type: ignore[attr-defined]
    r = LineResolver(debug_dirs=[str(tmp_path / "debug")])
    assert r.resolve(proc.pid, [proc.return_address]) == [None]
    assert r.stats.files_opened == 1  # the binary was read; the FIFO was not taken for its debug file


# --- StackLines: located as a stack is symbolized, annotated when shown ---------------------------


@needs_cc
def test_stack_lines_locate_while_the_process_lives_and_annotate_after(tmp_path: Path) -> None:
    binary = build(tmp_path)
    p = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    addr = int(p.stdout.readline().split()[1], 16)
    lines = StackLines()
    frames = ("send+0x9 [libc.so.6]", "leaky_handler+0x9 [leaky]", "[unknown]")
    lines.remember(p.pid, [addr, addr, 1 << 47], frames)
    # Only the application's frame was located (libc's and unknown ones never are), and no
    # line table has been read yet: that waits until a stack is shown.
    assert lines.resolver.stats.lookups == 1 and lines.resolver.stats.resolved == 0
    p.kill()
    p.wait()
    at = f"leaky_handler+0x9 [leaky] at {tmp_path / 'leaky_server.c'}:{CALL_LINE}"
    assert lines.annotate(p.pid, frames) == (frames[0], at, frames[2])
    path = CodePath(Op.RECV, 0, p.pid, ustack=frames)
    shown = lines.annotate_path(path)
    assert shown.ustack == (frames[0], at, frames[2]) and shown.op is Op.RECV
    # A stack with nothing located is handed back as it was.
    other = CodePath(Op.RECV, 0, p.pid + 1, ustack=frames)
    assert lines.annotate_path(other) is other
    assert lines.annotate(p.pid, ["leaky_handler+0x9 [leaky]"]) == (at,)


WIRE = """\
package wire

import "time"

//go:noinline
func Wait(d time.Duration) {
	time.Sleep(d)
}
"""

GO_USING_A_DEPENDENCY = """\
package main

import (
	"fmt"
	"time"

	"example.com/wire"
)

func main() {
	fmt.Println("ready")
	wire.Wait(time.Minute)
}
"""


@needs_go
def test_process_facts_of_a_go_program_name_its_dependency_modules(tmp_path: Path) -> None:
    deps = {"example.com/wire": WIRE}
    with go_binary(tmp_path, GO_USING_A_DEPENDENCY, deps=deps) as binary:
        assert go_dependencies(str(binary)) == ("example.com/wire",)
        proc = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            facts = process_facts(proc.pid)
        finally:
            proc.kill()
            proc.wait()
    assert facts.exe == str(binary) and facts.go_deps == ("example.com/wire",)


def test_go_dependencies_of_anything_else_are_none(tmp_path: Path) -> None:
    assert go_dependencies("/proc/self/exe") == ()  # python: an ELF without Go build info
    fake = tmp_path / "fake"
    fake.write_bytes(b"\x7fELF" + b"\xff" * 200)  # an ELF header that lies
    assert go_dependencies(str(fake)) == ()
    os.mkfifo(tmp_path / "fifo")  # never blocks on a FIFO planted where a binary should be
    assert go_dependencies(str(tmp_path / "fifo")) == ()
    assert go_dependencies(str(tmp_path / "missing")) == ()


def test_process_facts(tmp_path: Path) -> None:
    me = process_facts(os.getpid())
    assert me.exe == os.path.realpath("/proc/self/exe") and me.perf_map is False
    assert process_facts(1 << 30) == ProcessFacts(None, None)
    # A process whose root holds /tmp/perf-NSPID.map (its pid in its own namespace).
    proc = tmp_path / "proc"
    (proc / "77" / "root" / "tmp").mkdir(parents=True)
    (proc / "77" / "status").write_text("Name:\tnode\nNSpid:\t77\t12\n")
    (proc / "77" / "exe").symlink_to("/usr/bin/node")
    assert process_facts(77, str(proc)) == ProcessFacts("/usr/bin/node", False)
    (proc / "77" / "root" / "tmp" / "perf-12.map").write_text("")
    assert process_facts(77, str(proc)) == ProcessFacts("/usr/bin/node", True)
