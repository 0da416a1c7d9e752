"""Source lines of native frames from DWARF: an address in a process -> ``file.c:LINE``.

For a user stack address of a live process: ``/proc/PID/maps`` gives the mapping and its ELF
file, the file's ``PT_LOAD`` segments turn the file offset into the ELF's virtual address,
and the line table of the compile unit holding that address gives file and line. The line
table comes from the binary itself (built with ``-g``; Go binaries carry one) or from its
separate debug file: ``/usr/lib/debug/.build-id/xx/yyyy.debug`` by build id, or the
``.gnu_debuglink`` name next to the binary, in its ``.debug/`` folder or under
``/usr/lib/debug``. A mapped file is read through ``/proc/PID/map_files`` (the file mapped,
even if deleted since), else through ``/proc/PID/root``; debug files are looked for in the
process's root first, so a container's binaries resolve with the container's files.

Addresses in a stack are return addresses: the call is the instruction before, so the line
looked up is that of ``address - 1``.

Two steps, so the costly one can wait until a stack is shown: ``locate`` reads the maps and
opens the ELF file (and finds its debug file) while the process lives; ``line`` reads the line
table later, from the open file, even once the process is gone. ``resolve`` does both.

Costs (docs/attribution.md has the measurements): identifying a file and finding its debug
file is paid once per file, reading its DWARF once per file, decoding a compile unit's line
table once per unit; all cached, bounded. The maps are read at every ``locate`` (and parsed
again only when they changed).

Host input is hostile: ELF and DWARF are parsed by pyelftools, and any file that fails to
parse is remembered as having no lines (counted in ``LineResolver.stats.errors``).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import os
import posixpath
import stat
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from elftools.dwarf.aranges import ARanges
from elftools.dwarf.dwarfinfo import DWARFInfo
from elftools.dwarf.ranges import BaseAddressEntry
from elftools.elf.elffile import ELFFile

from tcptrace.model.attribution import ProcessFacts
from tcptrace.model.framerules import Rules
from tcptrace.model.frames import Category, parse_frame, user_category, with_source
from tcptrace.model.lifecycle import CodePath
from tcptrace.system.process import parse_nspid

DEBUG_DIRS = ("/usr/lib/debug",)
MAX_FILES = 32  # open ELF files (each holds an fd and its decoded units)
MAX_UNITS_PER_FILE = 64  # decoded line tables per file
MAX_RESULTS = 65_536  # (file, address) -> line
MAX_MAPS_BYTES = 8 * 1024 * 1024
MAX_GO_BUILDINFO = 65_536  # bytes of a .go.buildinfo section read
MAX_DWARF_BYTES = 512 * 1024 * 1024  # a file's DWARF sections, decompressed; larger: no lines
# The frames whose lines annotate() looks up.
_SOURCE_WANTED = (Category.APP, Category.LIBRARY)
MAX_PIDS = 256  # processes whose parsed maps are kept (reparsed only when they change)


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    @property
    def file_backed(self) -> bool:
        return self.inode != 0 and self.path.startswith("/")

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")


def parse_maps(text: str) -> list[Mapping]:
    """The mappings of /proc/PID/maps, sorted by start; malformed lines left out.

    >>> m = parse_maps("55d4c8a00000-55d4c8a01000 r-xp 00001000 fe:01 1234   /srv/leaky_server\\n"
    ...                "7ffd1c9f0000-7ffd1ca11000 rw-p 00000000 00:00 0 [stack]\\n")
    >>> hex(m[0].start), m[0].perms, m[0].offset, m[0].path, m[1].file_backed
    ('0x55d4c8a00000', 'r-xp', 4096, '/srv/leaky_server', False)
    """
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        span, perms, offset, dev, inode = parts[:5]
        lo, sep, hi = span.partition("-")
        try:
            start, end, off, ino = int(lo, 16), int(hi, 16), int(offset, 16), int(inode)
        except ValueError:
            continue
        if not sep:
            continue
        out.append(Mapping(start, end, perms, off, dev, ino, parts[5].strip() if len(parts) > 5 else ""))
    out.sort(key=lambda m: m.start)
    return out


def read_maps_bytes(pid: int, proc: str = "/proc") -> bytes:
    """A live process's /proc/PID/maps as read; empty when it is gone (or unreadable)."""
    try:
        with open(f"{proc}/{pid}/maps", "rb") as f:
            return f.read(MAX_MAPS_BYTES)
    except OSError:
        return b""


def read_maps(pid: int, proc: str = "/proc") -> list[Mapping]:
    """A live process's mappings; empty when it is gone (or unreadable)."""
    return parse_maps(read_maps_bytes(pid, proc).decode("utf-8", "surrogateescape"))


def find_mapping(maps: Sequence[Mapping], addr: int) -> Mapping | None:
    """The mapping holding ``addr`` (maps sorted by start, as ``parse_maps`` returns them)."""
    i = bisect.bisect_right([m.start for m in maps], addr) - 1
    if i >= 0 and maps[i].start <= addr < maps[i].end:
        return maps[i]
    return None


@dataclass(frozen=True)
class SourceLine:
    """A line of source: ``file`` as the line table names it (joined with its directory)."""

    file: str
    line: int

    def short(self) -> str:
        """``leaky_server.c:85``"""
        return f"{posixpath.basename(self.file)}:{self.line}"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Location:
    """An address as a place in an ELF file: the file's cache key (build id) and its vaddr."""

    key: str
    vaddr: int


@dataclass(frozen=True)
class GoBuildInfo:
    """What a Go binary says about its build: Go version, main module, dependency modules."""

    go_version: str
    path: str  # the main package's import path
    main_module: str
    deps: tuple[str, ...]


def parse_go_buildinfo(data: bytes) -> GoBuildInfo | None:
    """The ``.go.buildinfo`` section of a Go 1.18+ binary (inline strings); None otherwise.

    >>> mod = b"path\\tacme/svc\\nmod\\tacme\\t(devel)\\t\\ndep\\tgithub.com/lib/pq\\tv1.10.9\\th1:x\\n"
    >>> mod = b"\\0" * 16 + mod
    >>> blob = b"\\xff Go buildinf:\\x08\\x02" + b"\\0" * 16 + bytes([8]) + b"go1.22.1"
    >>> info = parse_go_buildinfo(blob + bytes([len(mod) + 16]) + mod + b"\\0" * 16)
    >>> info.go_version, info.main_module, info.deps
    ('go1.22.1', 'acme', ('github.com/lib/pq',))
    """
    if not data.startswith(b"\xff Go buildinf:") or len(data) < 32 or not data[15] & 2:
        return None
    pos = 32
    strings = []
    for _ in range(2):
        n, pos = _uvarint(data, pos)
        if n < 0 or pos + n > len(data):
            return None
        strings.append(data[pos : pos + n].decode("utf-8", "replace"))
        pos += n
    version, mod = strings
    if len(mod) >= 33 and mod[-17] == "\n":
        mod = mod[16:-16]
    path = main = ""
    deps = []
    for line in mod.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0] == "path":
            path = parts[1]
        elif len(parts) >= 2 and parts[0] == "mod":
            main = parts[1]
        elif len(parts) >= 2 and parts[0] == "dep":
            # A replacement ("=>", a fork or a local directory) follows its "dep" line: the
            # code keeps the import path it is compiled under, the one "dep" names.
            deps.append(parts[1])
    return GoBuildInfo(version, path, main, tuple(dict.fromkeys(deps)))


def _go_info(elf: ELFFile) -> GoBuildInfo | None:
    """An ELF file's Go build info, its head read only (a section's size is the file's word)."""
    section = elf.get_section_by_name(".go.buildinfo")
    if section is None or section["sh_type"] == "SHT_NOBITS":
        return None
    elf.stream.seek(int(section["sh_offset"]))
    return parse_go_buildinfo(elf.stream.read(min(int(section["sh_size"]), MAX_GO_BUILDINFO)))


def go_dependencies(path: str) -> tuple[str, ...]:
    """The modules the Go executable at ``path`` was built with, from its build info; () for
    anything else, and for a file that cannot be read or parsed (a host's file: hostile)."""
    try:
        with _open_regular(path) as f:
            info = _go_info(ELFFile(f))
    except Exception:  # not an ELF, unreadable, malformed
        return ()
    return info.deps if info is not None else ()


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    return -1, pos


@dataclass
class _Unit:
    """One compile unit's line table, compact: sorted row addresses, each row's file (an index
    in ``names``, -1 for the gap after a sequence's end) and line."""

    addrs: array[int]
    files: array[int]
    lines: array[int]
    names: list[str]

    def at(self, vaddr: int) -> SourceLine | None:
        i = bisect.bisect_right(self.addrs, vaddr) - 1
        if i < 0 or self.files[i] < 0:
            return None
        return SourceLine(self.names[self.files[i]], self.lines[i])


class ElfLines:
    """One ELF file: its identity (build id), load segments, and line tables.

    ``path`` is the file to open (``/proc/PID/map_files/…``, ``/proc/PID/root/usr/bin/x``);
    ``root`` is the filesystem its debug files are looked for in (``/proc/PID/root``), before
    the host's; ``name`` is the file's path in that root (for its debuglink), when ``path`` is
    not ``root`` + name.
    """

    def __init__(
        self, path: str, root: str = "", debug_dirs: Sequence[str] = DEBUG_DIRS, name: str | None = None
    ) -> None:
        self.path = path
        self._files: list[IO[bytes]] = []
        self._units: OrderedDict[int, _Unit] = OrderedDict()
        self._cu_index: list[tuple[int, int, int]] | None = None
        self.debug_file: str | None = None
        elf = self._open(path)
        self.build_id = _build_id(elf)
        self.go_build_id = _go_build_id(elf)
        self.loads = [
            (int(s["p_offset"]), int(s["p_vaddr"]), int(s["p_filesz"]))
            for s in elf.iter_segments()
            if s["p_type"] == "PT_LOAD"
        ]
        self.go_info = _go_info(elf)
        # The debug file is found now (in the process's root, while it lives); its DWARF, the
        # costly part, is read at the first line asked for.
        if name is None:
            name = path[len(root) :] if root and path.startswith(root) else path
        self._dwarf_elf = elf if _has_lines(elf) else self._debug_file(elf, name, root, debug_dirs)
        self._dwarf: DWARFInfo | None = None
        self._aranges: ARanges | None = None
        # What identifies the file across processes and containers.
        if self.build_id:
            self.key = "gnu:" + self.build_id
        elif self.go_build_id:
            self.key = "go:" + self.go_build_id
        else:
            st = os.fstat(self._files[0].fileno())
            self.key = f"file:{path}:{st.st_size}:{st.st_mtime_ns}"

    @property
    def has_lines(self) -> bool:
        """Whether the file or its debug file has a line table."""
        return self._dwarf_elf is not None

    def vaddr(self, file_offset: int) -> int | None:
        """The virtual address (as the ELF and its debug file number them) of a file offset."""
        for p_offset, p_vaddr, p_filesz in self.loads:
            if p_offset <= file_offset < p_offset + p_filesz:
                return p_vaddr + file_offset - p_offset
        return None

    def line_at(self, vaddr: int) -> SourceLine | None:
        """The source line of the instruction at ``vaddr``; None without a line table entry."""
        if self._dwarf_elf is None:
            return None
        if self._dwarf is None:
            self._dwarf = self._dwarf_elf.get_dwarf_info()
            self._aranges = self._dwarf.get_aranges()
        cu = self._cu_offset(vaddr)
        if cu is None:
            return None
        unit = self._units.get(cu)
        if unit is None:
            unit = self._decode(cu)
            self._units[cu] = unit
            if len(self._units) > MAX_UNITS_PER_FILE:
                self._units.popitem(last=False)
        else:
            self._units.move_to_end(cu)
        return unit.at(vaddr)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()
        self._units.clear()
        self._dwarf_elf = self._dwarf = self._aranges = None

    # --- internals -------------------------------------------------------------------------------

    def _open(self, path: str) -> ELFFile:
        f = _open_regular(path)  # kept open: pyelftools reads lazily
        self._files.append(f)
        return ELFFile(f)

    def _debug_file(self, elf: ELFFile, name: str, root: str, debug_dirs: Sequence[str]) -> ELFFile | None:
        for candidate, check in _debug_candidates(elf, name, root, debug_dirs, self.build_id):
            try:
                debug = self._open(candidate)
            except OSError:
                continue
            if check is not None and not check(debug, candidate):
                continue
            if _has_lines(debug):
                self.debug_file = candidate
                return debug
        return None

    def _cu_offset(self, vaddr: int) -> int | None:
        if self._aranges is not None:
            return self._aranges.cu_offset_at_addr(vaddr)
        if self._cu_index is None:
            self._cu_index = sorted(self._unit_ranges())
        # Units' ranges do not overlap: the last one starting at or below vaddr is the only candidate.
        i = bisect.bisect_right(self._cu_index, (vaddr, 1 << 64, 0)) - 1
        if i >= 0:
            lo, hi, off = self._cu_index[i]
            if lo <= vaddr < hi:
                return off
        return None

    def _unit_ranges(self) -> Iterator[tuple[int, int, int]]:
        """(low, high, unit offset) of every compile unit, from its top DIE: for files
        without .debug_aranges (Go binaries)."""
        assert self._dwarf is not None
        ranges = self._dwarf.range_lists()
        for cu in self._dwarf.iter_CUs():
            top = cu.get_top_DIE()
            attrs = top.attributes
            low = int(attrs["DW_AT_low_pc"].value) if "DW_AT_low_pc" in attrs else 0
            if "DW_AT_ranges" in attrs and ranges is not None:
                base = low
                for entry in ranges.get_range_list_at_offset(int(attrs["DW_AT_ranges"].value), cu=cu):
                    if isinstance(entry, BaseAddressEntry):
                        base = int(entry.base_address)
                        continue
                    lo, hi = int(entry.begin_offset), int(entry.end_offset)
                    if not entry.is_absolute:
                        lo, hi = lo + base, hi + base
                    if lo < hi:
                        yield lo, hi, cu.cu_offset
            elif "DW_AT_low_pc" in attrs and "DW_AT_high_pc" in attrs:
                high_attr = attrs["DW_AT_high_pc"]
                high = int(high_attr.value)
                if high_attr.form != "DW_FORM_addr":
                    high += low
                if low < high:
                    yield low, high, cu.cu_offset

    def _decode(self, cu_offset: int) -> _Unit:
        assert self._dwarf is not None
        cu = self._dwarf.get_CU_at(cu_offset)
        program = self._dwarf.line_program_for_CU(cu)
        if program is None:
            return _Unit(array("Q"), array("i"), array("I"), [])
        header = program.header
        version = int(header["version"])
        comp_dir = _text(cu.get_top_DIE().attributes.get("DW_AT_comp_dir"))
        dirs = [_decode_name(d) for d in (header.get("include_directory") or [])]
        names: dict[int, str] = {}

        def file_name(index: int) -> str:
            hit = names.get(index)
            if hit is not None:
                return hit
            entries = header["file_entry"]
            # DWARF 5 numbers files (and directories) from 0; earlier versions from 1, with
            # directory 0 the compilation directory.
            i = index if version >= 5 else index - 1
            if not 0 <= i < len(entries):
                name = f"<file {index}>"
            else:
                entry = entries[i]
                name = _decode_name(entry.name)
                d = int(entry.dir_index)
                if version >= 5:
                    directory = dirs[d] if 0 <= d < len(dirs) else ""
                else:
                    directory = comp_dir if d == 0 else (dirs[d - 1] if 0 < d <= len(dirs) else "")
                if not name.startswith("/") and directory:
                    if not directory.startswith("/") and comp_dir:
                        directory = posixpath.join(comp_dir, directory)
                    name = posixpath.join(directory, name)
                name = posixpath.normpath(name)
            names[index] = name
            return name

        index: dict[str, int] = {}
        rows: list[tuple[int, int, int]] = []
        for entry in program.get_entries():
            state = entry.state
            if state is None:
                continue
            if state.end_sequence:
                rows.append((state.address, -1, 0))
            elif state.line > 0:
                name = file_name(state.file)
                rows.append((state.address, index.setdefault(name, len(index)), state.line))
        # At one address a sequence's end (-1) sorts before the next sequence's first row.
        rows.sort(key=lambda r: (r[0], r[1] >= 0))
        return _Unit(
            array("Q", (r[0] for r in rows)),
            array("i", (r[1] for r in rows)),
            array("I", (r[2] for r in rows)),
            list(index),
        )


def _text(attr: Any) -> str:
    if attr is None:
        return ""
    value = attr.value
    return _decode_name(value) if isinstance(value, (bytes, str)) else ""


def _decode_name(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


@functools.lru_cache(maxsize=MAX_RESULTS)
def _wants_source(frame: str, rules: Rules | None) -> bool:
    """Whether annotate() looks up a frame's line: the application's and libraries' frames."""
    return user_category(parse_frame(frame), rules) in _SOURCE_WANTED


def _open_regular(path: str) -> IO[bytes]:
    """Open a regular file for reading; anything else (a FIFO a container planted where a debug
    file should be, a device) is refused without blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise OSError(f"{path}: not a regular file")
    # From here the file object owns the fd: closing it here too, after an exception that
    # came once fdopen had taken it (a KeyboardInterrupt), would close it twice, the second
    # time under whatever then held that number (a BPF program's fd).
    return os.fdopen(fd, "rb")


def _has_lines(elf: ELFFile) -> bool:
    """Whether the file has a line table, and DWARF small enough to read (pyelftools reads
    every DWARF section whole, decompressed, into memory)."""
    if elf.get_section_by_name(".debug_line") is None or elf.get_section_by_name(".debug_info") is None:
        return False
    size = sum(
        int(sec.data_size) for sec in elf.iter_sections() if sec.name.startswith((".debug_", ".zdebug_"))
    )
    return size <= MAX_DWARF_BYTES


def _note_desc(elf: ELFFile, section: str, note_type: str) -> Any:
    sec = elf.get_section_by_name(section)
    if sec is None or not hasattr(sec, "iter_notes"):
        return None
    for note in sec.iter_notes():
        if note["n_type"] == note_type:
            return note["n_desc"]
    return None


def _build_id(elf: ELFFile) -> str | None:
    desc = _note_desc(elf, ".note.gnu.build-id", "NT_GNU_BUILD_ID")
    return str(desc) if desc else None


def _go_build_id(elf: ELFFile) -> str | None:
    sec = elf.get_section_by_name(".note.go.buildid")
    if sec is None:
        return None
    data = sec.data()
    # Elf note: namesz, descsz, type, "Go\0\0", then the build id string.
    if len(data) < 16:
        return None
    descsz = int.from_bytes(data[4:8], "little")
    desc = data[16 : 16 + descsz]
    return desc.decode("ascii", "replace") if desc else None


def _debuglink(elf: ELFFile) -> tuple[str, int] | None:
    sec = elf.get_section_by_name(".gnu_debuglink")
    if sec is None:
        return None
    data = sec.data()
    end = data.find(b"\0")
    if end <= 0:
        return None
    name = data[:end].decode("utf-8", "surrogateescape")
    crc_at = (end + 4) & ~3
    if crc_at + 4 > len(data) or "/" in name:
        return None
    return name, int.from_bytes(data[crc_at : crc_at + 4], "little")


def _crc32(path: str) -> int:
    crc = 0
    with _open_regular(path) as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _debug_candidates(
    elf: ELFFile, name: str, root: str, debug_dirs: Sequence[str], build_id: str | None
) -> Iterator[tuple[str, Any]]:
    """(path, check) pairs of where a separate debug file may be, in gdb's order."""
    roots = [root, ""] if root else [""]
    if build_id and len(build_id) > 2:
        for r in roots:
            for d in debug_dirs:
                yield f"{r}{d}/.build-id/{build_id[:2]}/{build_id[2:]}.debug", _same_build_id(build_id)
    link = _debuglink(elf)
    if link is None:
        return
    linked, crc = link
    directory = posixpath.dirname(name)
    check = _same_build_id(build_id) if build_id else _same_crc(crc)
    for r in roots:
        yield f"{r}{directory}/{linked}", check
        yield f"{r}{directory}/.debug/{linked}", check
        for d in debug_dirs:
            yield f"{r}{d}{directory}/{linked}", check


def _same_build_id(build_id: str | None) -> Any:
    def check(debug: ELFFile, _path: str) -> bool:
        return _build_id(debug) == build_id

    return check


def _same_crc(crc: int) -> Any:
    def check(_debug: ELFFile, path: str) -> bool:
        return _crc32(path) == crc

    return check


@dataclass
class ResolverStats:
    """What the resolver did: lookups, cache hits, files opened, and files that failed."""

    lookups: int = 0
    hits: int = 0
    resolved: int = 0
    files_opened: int = 0
    errors: int = 0
    maps_read: int = 0
    last_error: str = ""

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class LineResolver:
    """Addresses of live processes -> source lines, cached per ELF file (build id), bounded.

    ``locate(pid, addrs)`` reads the process's maps once for every address; call it while the
    process lives (its maps go with it). ``line(location)`` and ``annotate_located`` answer
    later. ``proc`` is the procfs to read (a test gives a directory of its own).
    """

    proc: str = "/proc"
    debug_dirs: Sequence[str] = DEBUG_DIRS
    max_files: int = MAX_FILES
    max_results: int = MAX_RESULTS
    stats: ResolverStats = field(default_factory=ResolverStats)
    _files: OrderedDict[str, ElfLines] = field(default_factory=OrderedDict)
    _by_inode: OrderedDict[tuple[int, int, int, int], str | None] = field(default_factory=OrderedDict)
    _results: OrderedDict[Location, SourceLine | None] = field(default_factory=OrderedDict)
    _maps_cache: OrderedDict[int, tuple[bytes, list[Mapping], list[int]]] = field(default_factory=OrderedDict)

    def resolve(self, pid: int, addrs: Sequence[int]) -> list[SourceLine | None]:
        """The source line of each return address of ``pid``'s user stack (None: unknown)."""
        return [None if loc is None else self.line(loc) for loc in self.locate(pid, addrs)]

    def locate(self, pid: int, addrs: Sequence[int]) -> list[Location | None]:
        """Where each return address of ``pid``'s user stack is, in which ELF file: the part
        that needs the process alive (its maps, its files). ``line()`` answers later, from the
        cache, as long as the file is still in it."""
        if not addrs:
            return []
        maps, starts = self._maps(pid)
        elves: dict[int, ElfLines | None] = {}  # by index in maps
        out: list[Location | None] = []
        for addr in addrs:
            self.stats.lookups += 1
            # A return address: the call is the instruction before it.
            i = bisect.bisect_right(starts, addr - 1) - 1
            if i < 0 or addr - 1 >= maps[i].end:
                out.append(None)
                continue
            m = maps[i]
            if i not in elves:
                elves[i] = self.elf_for(pid, m) if m.file_backed else None
            elf = elves[i]
            vaddr = None if elf is None else elf.vaddr(addr - 1 - m.start + m.offset)
            out.append(None if elf is None or vaddr is None else Location(elf.key, vaddr))
        return out

    def line(self, loc: Location) -> SourceLine | None:
        """The source line of a located address; None when unknown (or its file left the cache)."""
        if loc in self._results:
            self.stats.hits += 1
            self._results.move_to_end(loc)
            return self._results[loc]
        elf = self._files.get(loc.key)
        if elf is None:
            return None
        try:
            line = elf.line_at(loc.vaddr)
        except Exception as e:  # pyelftools' errors on bad DWARF are no closed set
            self._fail(elf.path, e)
            line = None
        self._results[loc] = line
        if len(self._results) > self.max_results:
            self._results.popitem(last=False)
        if line is not None:
            self.stats.resolved += 1
        return line

    def annotate(
        self, pid: int, addrs: Sequence[int], frames: Sequence[str], rules: Rules | None = None
    ) -> tuple[str, ...]:
        """Frame strings (as the symbolizer names ``addrs``) with `` at FILE:LINE`` appended to
        the application's and libraries' frames where the line table has the address.

        Runtime, libc and JIT frames are left alone: a runtime's line tables can be large (Go's
        ``runtime`` unit takes ~0.1-0.3 s to decode) and no report leads with them; JIT names
        carry their own source.
        """
        return self.annotate_located(frames, self.locate(pid, addrs), rules)

    def annotate_located(
        self, frames: Sequence[str], locations: Sequence[Location | None], rules: Rules | None = None
    ) -> tuple[str, ...]:
        """``annotate`` in two steps: ``locate`` when the event arrives, this when it is shown."""
        out = list(frames)
        for i, loc in enumerate(locations[: len(out)]):
            if loc is None or not _wants_source(out[i], rules):
                continue
            line = self.line(loc)
            if line is not None:
                out[i] = with_source(out[i], line.file, line.line)
        return tuple(out)

    def _maps(self, pid: int) -> tuple[list[Mapping], list[int]]:
        """The process's maps, read now; parsed again only when they changed since last time."""
        raw = read_maps_bytes(pid, self.proc)
        self.stats.maps_read += 1
        hit = self._maps_cache.get(pid)
        if hit is not None and hit[0] == raw:
            self._maps_cache.move_to_end(pid)
            return hit[1], hit[2]
        maps = parse_maps(raw.decode("utf-8", "surrogateescape"))
        starts = [m.start for m in maps]
        self._maps_cache[pid] = (raw, maps, starts)
        if len(self._maps_cache) > MAX_PIDS:
            self._maps_cache.popitem(last=False)
        return maps, starts

    def elf_for(self, pid: int, mapping: Mapping) -> ElfLines | None:
        """The (cached) ELF file behind a mapping of ``pid``; None when it cannot be read."""
        for path in self._paths(pid, mapping):
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                break
        else:
            return None
        # A file rewritten in place keeps its inode: its size and mtime tell the versions apart.
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if ident in self._by_inode:
            self._by_inode.move_to_end(ident)
            key = self._by_inode[ident]
            return self._files.get(key) if key is not None else None
        key = self._open(path, f"{self.proc}/{pid}/root", mapping.path.removesuffix(" (deleted)"))
        self._by_inode[ident] = key
        if len(self._by_inode) > self.max_files * 8:
            self._by_inode.popitem(last=False)
        return self._files.get(key) if key is not None else None

    def close(self) -> None:
        for elf in self._files.values():
            elf.close()
        self._files.clear()
        self._by_inode.clear()
        self._results.clear()
        self._maps_cache.clear()

    def _paths(self, pid: int, mapping: Mapping) -> list[str]:
        """Where to read a mapping's file: through map_files (the very file mapped, even when
        deleted or renamed since; needs CAP_SYS_ADMIN), else by its path in the process's root
        (its container's files)."""
        by_map = f"{self.proc}/{pid}/map_files/{mapping.start:x}-{mapping.end:x}"
        if mapping.deleted:
            return [by_map]
        return [by_map, f"{self.proc}/{pid}/root{mapping.path}"]

    def _open(self, path: str, root: str, name: str) -> str | None:
        try:
            elf = ElfLines(path, root=root, debug_dirs=self.debug_dirs, name=name)
        except Exception as e:  # not an ELF, unreadable, malformed: no lines
            self._fail(path, e)
            return None
        self.stats.files_opened += 1
        key = elf.key
        if key in self._files:  # the same build in another container or at another path
            elf.close()
            self._files.move_to_end(key)
            return key
        self._files[key] = elf
        if len(self._files) > self.max_files:
            _, old = self._files.popitem(last=False)
            old.close()
        return key

    def _fail(self, path: str, e: Exception) -> None:
        self.stats.errors += 1
        self.stats.last_error = f"{path}: {type(e).__name__}: {e}"[:300]


class StackLines:
    """Source lines for the user stacks a symbolizer names, in the two steps of ``LineResolver``.

    ``remember(pid, addrs, frames)`` runs as a stack is symbolized, while the process lives:
    it locates the addresses of the frames a report would show a line for (the
    application's and libraries' native frames, by ``rules`` too), which reads the process's
    maps and, once per file, opens it and finds its debug file. ``annotate`` runs when a stack
    is shown: it reads the DWARF (once per file, the costly part) and appends `` at FILE:LINE``
    to each located frame, even once the process has gone. Frames are told apart by (pid,
    frame string): one string is one address of one module in a process. Bounded.
    """

    def __init__(
        self, resolver: LineResolver | None = None, rules: Rules | None = None, capacity: int = MAX_RESULTS
    ) -> None:
        self.resolver = resolver if resolver is not None else LineResolver()
        self.rules = rules
        self.capacity = capacity
        self._where: OrderedDict[tuple[int, str], Location] = OrderedDict()
        self._shown: OrderedDict[tuple[int, tuple[str, ...]], tuple[str, ...]] = OrderedDict()

    def remember(self, pid: int, addrs: Sequence[int], frames: Sequence[str]) -> None:
        """Locate the frames of one user stack of ``pid`` (``frames[i]`` names ``addrs[i]``)."""
        wanted = [
            i
            for i, frame in enumerate(frames[: len(addrs)])
            if (pid, frame) not in self._where and _wants_source(frame, self.rules) and not _is_jit(frame)
        ]
        if not wanted:
            return
        for i, loc in zip(wanted, self.resolver.locate(pid, [addrs[i] for i in wanted]), strict=True):
            if loc is not None:
                self._where[(pid, frames[i])] = loc
                if len(self._where) > self.capacity:
                    self._where.popitem(last=False)

    def annotate(self, pid: int, frames: Sequence[str]) -> tuple[str, ...]:
        """``frames`` with `` at FILE:LINE`` appended where a located frame's line is known."""
        key = (pid, tuple(frames))
        hit = self._shown.get(key)
        if hit is not None:
            self._shown.move_to_end(key)
            return hit
        out = []
        for frame in frames:
            loc = self._where.get((pid, frame))
            line = self.resolver.line(loc) if loc is not None else None
            out.append(frame if line is None else with_source(frame, line.file, line.line))
        shown = tuple(out)
        self._shown[key] = shown
        if len(self._shown) > self.capacity:
            self._shown.popitem(last=False)
        return shown

    def annotate_path(self, path: CodePath) -> CodePath:
        """A code path with its user frames' lines (the same object when none is known)."""
        if not path.ustack:
            return path
        ustack = self.annotate(path.task_pid, path.ustack)
        return path if ustack == path.ustack else dataclasses.replace(path, ustack=ustack)

    def close(self) -> None:
        self.resolver.close()
        self._where.clear()
        self._shown.clear()


@functools.lru_cache(maxsize=MAX_RESULTS)
def _is_jit(frame: str) -> bool:
    """A JIT frame carries its own source (perf-map name): no DWARF line to look up."""
    return parse_frame(frame).jit is not None


def process_facts(pid: int, proc: str = "/proc") -> ProcessFacts:
    """What attribution wants to know of a live process: its executable (with the modules it
    was built with, for Go), and whether it writes a perf map (``/tmp/perf-PID.map`` in its
    own root, PID as its namespace numbers it)."""
    try:
        exe: str | None = os.readlink(f"{proc}/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        exe = None
    # Read through the link: the process's own file, in its own root, even deleted.
    deps = go_dependencies(f"{proc}/{pid}/exe") if exe is not None else ()
    try:
        with open(f"{proc}/{pid}/status", "rb") as f:
            nspid = parse_nspid(f.read(64 * 1024))
    except (OSError, ValueError):
        return ProcessFacts(exe, None, deps)
    try:
        perf_map = stat.S_ISREG(os.stat(f"{proc}/{pid}/root/tmp/perf-{nspid or pid}.map").st_mode)
    except FileNotFoundError:
        perf_map = False
    except OSError:
        return ProcessFacts(exe, None, deps)
    return ProcessFacts(exe, perf_map, deps)
