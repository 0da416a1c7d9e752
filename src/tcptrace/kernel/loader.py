"""The thin layer that owns bcc: find it, compile bpf/ programs, attach, read counters, detach.

Only this package imports bcc. Programs are compiled from bpf/ with -D cflags for filters
and BTF offsets (never by pasting C into strings), and every failure becomes a
TcptraceError with a one-line message and a hint.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tcptrace.errors import CompileError, EnvironmentProblem, PrivilegeError
from tcptrace.kernel import headers
from tcptrace.kernel.btf import Btf
from tcptrace.kernel.trust import untrusted_reason
from tcptrace.model.filters import MAX_CGROUPS, EventFilter

INSTALL_HINT = "run scripts/install (as root) from the tcptrace checkout"
TRACEFS = "/sys/kernel/tracing"

# Capability numbers (include/uapi/linux/capability.h).
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 1, 2, 21, 38, 39
CAPS_NEEDED = "CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH"

# Indexes of the `stats` array: TT_STAT_* in bpf/tcptrace.h.
STAT_NAMES = (
    "transitions",
    "emitted",
    "lost",
    "sock_update_failed",
    "stack_failed",
    "owner_forgotten",
    "seeds_used",
    "adopted",
    "unseen_end",
)


BPF_DIR_ENV = "TCPTRACE_BPF_DIR"


@contextmanager
def bpf_sources() -> Iterator[Path]:
    """A real directory holding the BPF programs, for bcc's ``-I``: the package's own
    ``tcptrace/bpf`` (made a directory by importlib.resources when the package is not on a
    file system), or ``TCPTRACE_BPF_DIR`` when root may compile from it (kernel/trust.py)."""
    override = os.environ.get(BPF_DIR_ENV)
    if override:
        problem = untrusted_reason(override, caller=os.getuid())
        if problem:
            raise EnvironmentProblem(
                f"{BPF_DIR_ENV} refused: {problem}",
                hint=f"unset {BPF_DIR_ENV} (sudo -E keeps it); tcptrace compiles its own programs",
            )
        yield Path(override)
        return
    with resources.as_file(resources.files("tcptrace") / "bpf") as path:
        directory = Path(path)
        if not (directory / "tcptrace.h").is_file():
            raise EnvironmentProblem(
                "cannot find the bpf/ programs in the tcptrace package", hint="reinstall tcptrace"
            )
        yield directory


def effective_caps() -> int:
    """The CapEff mask of this process (0 when /proc cannot tell)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_tracing_privileges() -> bool:
    """Root, or the capabilities that load and attach tracepoint programs.

    Besides CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN), bcc reads tracepoint formats and
    ids in tracefs, which is root-only (mode 0700): CAP_DAC_READ_SEARCH reads past that.
    """
    if os.geteuid() == 0:
        return True
    caps = effective_caps()

    def has(*bits: int) -> bool:
        return any(caps & (1 << b) for b in bits)

    return (
        has(CAP_BPF, CAP_SYS_ADMIN)
        and has(CAP_PERFMON, CAP_SYS_ADMIN)
        and has(CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE)
    )


def require_privileges() -> None:
    if not has_tracing_privileges():
        raise PrivilegeError(
            f"tracing needs root (or {CAPS_NEEDED})",
            hint="run it with sudo, e.g. `sudo tcptrace ...`",
        )


def tracefs_mounts() -> list[str]:
    """Where tracefs is mounted, from /proc/self/mounts."""
    try:
        with open("/proc/self/mounts") as fh:
            return [line.split()[1] for line in fh if len(line.split()) > 2 and line.split()[2] == "tracefs"]
    except OSError:
        return []


def ensure_tracefs() -> str:
    """Path of tracefs, mounting it at /sys/kernel/tracing when it is not mounted."""
    for path in (TRACEFS, "/sys/kernel/debug/tracing"):
        if os.path.isdir(os.path.join(path, "events")):
            return path
    mounted = tracefs_mounts()
    if mounted:
        raise PrivilegeError(
            f"cannot read tracefs at {mounted[0]} (it is root-only)",
            hint=f"run as root, or with {CAPS_NEEDED}",
        )
    try:
        subprocess.run(
            ["mount", "-t", "tracefs", "nodev", TRACEFS], check=True, capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise EnvironmentProblem(
            f"tracefs is not mounted and mounting it at {TRACEFS} failed ({exc})",
            hint=f"mount it: mount -t tracefs nodev {TRACEFS}",
        ) from None
    return TRACEFS


def tracepoint_exists(group: str, name: str) -> bool:
    tracefs = ensure_tracefs()
    return os.path.isdir(os.path.join(tracefs, "events", group, name))


def import_bcc() -> Any:
    try:
        import bcc
    except ImportError:
        raise EnvironmentProblem(
            "bcc (python3-bpfcc) is not importable by this Python", hint=INSTALL_HINT
        ) from None
    return bcc


@dataclass(frozen=True)
class Part:
    """One program file of bpf/ and the tracepoints it attaches to (checked before compiling).

    ``fd_walk``: the part calls tt_fd_to_tcp_sock(), which needs more offsets.
    ``defines``: the part's own -D values (BTF offsets, knobs), computed when it is loaded.
    ``raw_attach``: (tracepoint, function) pairs the loader attaches as raw tracepoints
    after compiling: a second program on a tracepoint that already has a
    RAW_TRACEPOINT_PROBE (bcc auto-attaches one per name).
    ``backups``: (program, backup) pairs of identical work on one tracepoint: an event
    is lost only when both were skipped, so at most min(their skips) were.
    ``nest_safe``: programs whose skipped runs lose nothing: they act only on what a
    process does itself (in process context, which never nests in itself), so what a
    nested run would have seen is an interrupt's, which they ignore.
    ``table``: what the part reads of the socket table (bpf/sock.bpf.h), which
    lifecycle.bpf.c writes: ``"owners"`` (lifecycle's owners-only mode, SOCKET_OWNERS,
    is added when lifecycle is not loaded) or ``"states"`` (lifecycle must be loaded).
    """

    file: str
    tracepoints: tuple[tuple[str, str], ...]
    feature: str
    fd_walk: bool = False
    defines: Callable[[Btf], dict[str, int]] | None = None
    raw_attach: tuple[tuple[str, str], ...] = ()
    backups: tuple[tuple[str, str], ...] = ()
    nest_safe: tuple[str, ...] = ()
    table: str = ""


def sock_defines(btf: Btf) -> dict[str, int]:
    """Where sock:inet_sock_set_state's fields live in a socket (its TP_fast_assign):
    family, protocol, ports and addresses, for bpf/sock.bpf.h (every program reads them)."""
    return {
        "TT_SKC_FAMILY_OFF": btf.member_offset("sock_common", "skc_family"),
        "TT_SKC_STATE_OFF": btf.member_offset("sock_common", "skc_state"),
        "TT_SK_PROTOCOL_OFF": btf.member_offset("sock", "sk_protocol"),
        "TT_INET_SPORT_OFF": btf.member_offset("inet_sock", "inet_sport"),
        "TT_SKC_NUM_OFF": btf.member_offset("sock_common", "skc_num"),
        "TT_SKC_DPORT_OFF": btf.member_offset("sock_common", "skc_dport"),
        "TT_SKC_RCV_SADDR_OFF": btf.member_offset("sock_common", "skc_rcv_saddr"),
        "TT_SKC_DADDR_OFF": btf.member_offset("sock_common", "skc_daddr"),
        "TT_SKC_V6_RCV_SADDR_OFF": btf.member_offset("sock_common", "skc_v6_rcv_saddr"),
        "TT_SKC_V6_DADDR_OFF": btf.member_offset("sock_common", "skc_v6_daddr"),
        # the socket's network namespace: skc_net.net -> ns.inum
        "TT_SKC_NET_OFF": btf.member_offset("sock_common", "skc_net"),
        "TT_NET_NS_INUM_OFF": btf.member_offset("net", "ns.inum"),
        # an owner's identity across pid reuse: current->group_leader->start_boottime
        "TT_TASK_GROUP_LEADER_OFF": btf.member_offset("task_struct", "group_leader"),
        "TT_TASK_START_BOOTTIME_OFF": btf.member_offset("task_struct", "start_boottime"),
    }


# Raw tracepoint programs (see lifecycle.bpf.c for why three: the process-context
# transitions, and the others in two copies, so that a skipped run loses nothing).
_LC_ATTACH = (
    ("inet_sock_set_state", "tt_lc_process"),
    ("inet_sock_set_state", "tt_lc_other"),
    ("inet_sock_set_state", "tt_lc_other_backup"),
)
LIFECYCLE = Part(
    "lifecycle.bpf.c",
    (("sock", "inet_sock_set_state"),),
    "TCP state transitions",
    raw_attach=_LC_ATTACH,
    backups=(("tt_lc_other", "tt_lc_other_backup"),),
    nest_safe=("tt_lc_process",),
)

# lifecycle.bpf.c keeping only the socket table's owners, for parts that read owners when
# lifecycle itself is not loaded (timewait): owners are learned by the same code either way.
SOCKET_OWNERS = Part(
    "lifecycle.bpf.c",
    (("sock", "inet_sock_set_state"),),
    "socket owners",
    defines=lambda btf: {"TT_LC_OWNERS_ONLY": 1},
    raw_attach=_LC_ATTACH,
    backups=(("tt_lc_other", "tt_lc_other_backup"),),
    nest_safe=("tt_lc_process",),
)

OWNER = Part(
    "owner.bpf.c",
    (
        ("syscalls", "sys_exit_accept4"),
        ("syscalls", "sys_exit_accept"),
        ("sock", "sock_recv_length"),
        ("sock", "sock_send_length"),
    ),
    "socket owners and code paths (closewait)",
    fd_walk=True,
    table="states",
)

CLOSELAT = Part(
    "closelat.bpf.c",
    (
        ("syscalls", "sys_enter_close"),
        ("syscalls", "sys_exit_close"),
        ("syscalls", "sys_enter_shutdown"),
        ("syscalls", "sys_exit_shutdown"),
        ("syscalls", "sys_enter_close_range"),
        ("syscalls", "sys_exit_close_range"),
        ("tcp", "tcp_send_reset"),
    ),
    "close() latency (closelat)",
    fd_walk=True,
    table="states",
)


def timewait_defines(btf: Btf) -> dict[str, int]:
    """What timewait.bpf.c reads of timewait sockets, their timer and tcp_sock (see that file).

    Its programs are raw tracepoints (the list in TIMEWAIT is checked all the same). It
    reads the owners of sockets past their CLOSE (TT_CLOSED_OWNERS, bpf/sock.bpf.h). No
    symbol address: the tw timer's handler is learned in the kernel."""
    userlocks_bits, _size = btf.member_bits("sock", "sk_userlocks")
    return {
        "TT_CLOSED_OWNERS": 1,
        "TT_TW_SND_NXT_OFF": btf.member_offset("sock_common", "skc_tw_snd_nxt"),
        "TT_TW_SUBSTATE_OFF": btf.member_offset("inet_timewait_sock", "tw_substate"),
        "TT_TW_TIMER_OFF": btf.member_offset("inet_timewait_sock", "tw_timer"),
        "TT_TIMER_FUNCTION_OFF": btf.member_offset("timer_list", "function"),
        "TT_TCP_SND_NXT_OFF": btf.member_offset("tcp_sock", "snd_nxt"),
        # a u8 (a 4-bit field in older kernels): read as 16 bits from its byte
        "TT_SK_USERLOCKS_OFF": userlocks_bits // 8,
        "TT_SK_USERLOCKS_SHIFT": userlocks_bits % 8,
    }


TIMEWAIT = Part(
    "timewait.bpf.c",
    (
        ("timer", "timer_start"),
        ("timer", "timer_cancel"),
        ("timer", "timer_expire_entry"),
        ("skb", "kfree_skb"),
        ("tcp", "tcp_send_reset"),
        ("tcp", "tcp_receive_reset"),
    ),
    "TIME_WAIT creation (timewait)",
    defines=timewait_defines,
    raw_attach=(
        ("inet_sock_set_state", "tt_tw_other_main"),
        ("inet_sock_set_state", "tt_tw_other_backup"),
    ),
    backups=(("tt_tw_other_main", "tt_tw_other_backup"),),
    table="owners",
)

# Program parts by the name commands ask for them with (see sources.open_source).
PARTS: dict[str, Part] = {
    "lifecycle": LIFECYCLE,
    "owner": OWNER,
    "closelat": CLOSELAT,
    "timewait": TIMEWAIT,
}


@dataclass
class BtfOffsets:
    """Kernel struct offsets and bits the programs may read, from BTF."""

    defines: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, btf: Btf | None = None) -> BtfOffsets:
        btf = btf or Btf.load()
        return cls(
            {
                "TT_SK_FLAGS_OFF": btf.member_offset("sock", "__sk_common.skc_flags"),
                "TT_SOCK_DONE_BIT": btf.enum_value("sock_flags", "SOCK_DONE"),
                "TT_SOCK_DEAD_BIT": btf.enum_value("sock_flags", "SOCK_DEAD"),
                "TT_SOCK_LINGER_BIT": btf.enum_value("sock_flags", "SOCK_LINGER"),
            }
        )


def fd_walk_defines(btf: Btf) -> dict[str, int]:
    """What tt_fd_to_tcp_sock() reads: current->files->fdt->fd[fd]->{f_inode->i_mode, private_data->sk}."""
    return {
        "TT_TASK_FILES_OFF": btf.member_offset("task_struct", "files"),
        "TT_FILES_FDT_OFF": btf.member_offset("files_struct", "fdt"),
        "TT_FDTABLE_FD_OFF": btf.member_offset("fdtable", "fd"),
        "TT_FDTABLE_MAX_FDS_OFF": btf.member_offset("fdtable", "max_fds"),
        "TT_FILE_F_INODE_OFF": btf.member_offset("file", "f_inode"),
        "TT_INODE_I_MODE_OFF": btf.member_offset("inode", "i_mode"),
        "TT_FILE_PRIVATE_DATA_OFF": btf.member_offset("file", "private_data"),
        "TT_SOCKET_SK_OFF": btf.member_offset("socket", "sk"),
        "TT_SK_TYPE_OFF": btf.member_offset("sock", "sk_type"),
    }


# Bits of a port_filter entry (TT_PORT_* in bpf/tcptrace.h): which option named the port.
PORT_EITHER, PORT_LOCAL, PORT_REMOTE = 1, 2, 4


def _port_sets(flt: EventFilter) -> tuple[tuple[frozenset[int], int], ...]:
    return ((flt.ports, PORT_EITHER), (flt.local_ports, PORT_LOCAL), (flt.remote_ports, PORT_REMOTE))


def port_bits(flt: EventFilter) -> dict[int, int]:
    """port_filter's entries: each port with the TT_PORT_* bits of the options naming it.

    >>> port_bits(EventFilter(ports=frozenset({80}), local_ports=frozenset({80, 8080})))
    {80: 3, 8080: 2}
    """
    out: dict[int, int] = {}
    for ports, bit in _port_sets(flt):
        for port in ports:
            out[port] = out.get(port, 0) | bit
    return dict(sorted(out.items()))


def filter_cflags(flt: EventFilter) -> list[str]:
    """The filters' knobs (bpf/common.bpf.h); their values go in maps (_fill_filter_maps).

    >>> filter_cflags(EventFilter(pids=frozenset({7}), remote_ports=frozenset({53}), family=6))
    ['-DTT_FILTER_PIDS', '-DTT_FILTER_FAMILY=10', '-DTT_FILTER_PORTS=4']
    """
    flags = []
    if flt.pids:
        flags.append("-DTT_FILTER_PIDS")
    if flt.family is not None:
        flags.append(f"-DTT_FILTER_FAMILY={2 if flt.family == 4 else 10}")
    bits = sum(bit for ports, bit in _port_sets(flt) if ports)
    if bits:
        flags.append(f"-DTT_FILTER_PORTS={bits}")
    if flt.comm is not None:
        flags.append("-DTT_FILTER_COMM")
    if flt.netns:
        flags.append("-DTT_FILTER_NETNS")
    if flt.by_cgroup:
        flags.append("-DTT_FILTER_CGROUP")
    return flags


def with_socket_table(parts: Sequence[Part]) -> tuple[Part, ...]:
    """``parts`` and the writer of the socket table they read (Part.table): lifecycle when
    it is one of them, else its owners-only mode (SOCKET_OWNERS) in front."""
    parts = tuple(parts)
    if any(p.file == LIFECYCLE.file for p in parts):
        return parts
    needs = {p.table for p in parts}
    if "states" in needs:
        raise ValueError("parts that read socket states need the lifecycle part")
    return (SOCKET_OWNERS, *parts) if "owners" in needs else parts


HEADERS = ("common.bpf.h", "sock.bpf.h", "closewait.bpf.h")


def program_text(parts: Sequence[Part], directory: Path) -> str:
    """One translation unit: the headers, then each part, with #line so errors name bpf/ files.

    bcc rewrites map calls and generates tracepoint argument structs only in the main
    file, so the headers and parts are inlined rather than #included.
    """
    chunks = []
    for name in [*HEADERS, *(p.file for p in parts)]:
        lines = (directory / name).read_text().splitlines()
        out = [f'#line 1 "bpf/{name}"']
        for number, line in enumerate(lines, 1):
            out.append(line)
            if line.lstrip().startswith("TRACEPOINT_PROBE("):
                # bcc inserts the generated argument struct here, shifting every later
                # line: say again where we are.
                out.append(f'#line {number + 1} "bpf/{name}"')
        chunks.append("\n".join(out) + "\n")
    return "".join(chunks)


_DIAG = re.compile(r"^(bpf/[^:]+:\d+:\d+: (?:fatal )?error: .*)$", re.M)


# What in a caller's environment would add or swap C in what root compiles: clang's include
# paths, and bcc's choice of the /lib/modules subdirectory. Cleared for the compile; bcc's
# BCC_KERNEL_SOURCE is honoured only when trusted (kernel/headers.py).
UNTRUSTED_ENV = (
    "CPATH",
    "C_INCLUDE_PATH",
    "CPLUS_INCLUDE_PATH",
    "OBJC_INCLUDE_PATH",
    "BCC_KERNEL_MODULES_SUFFIX",
)


@contextmanager
def _compile_environment(kernel_headers: headers.KernelHeaders) -> Iterator[None]:
    """The environment bcc compiles in: the untrusted variables unset, and
    BCC_KERNEL_SOURCE pointing at ``kernel_headers`` when bcc would not find them itself.
    Restored afterwards, so child processes never inherit it."""
    names = (*UNTRUSTED_ENV, headers.ENV)
    saved = {name: os.environ.get(name) for name in names}
    for name in UNTRUSTED_ENV:
        os.environ.pop(name, None)
    if kernel_headers.env is not None:
        os.environ[headers.ENV] = kernel_headers.env
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Capture what C code (clang, the verifier via libbcc) writes to fd 2."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


class LoadedProgram:
    """A compiled, attached program. close() (or the context manager) detaches everything."""

    def __init__(self, bpf: Any, parts: Sequence[Part], stacks: bool) -> None:
        self.bpf = bpf
        self.parts = tuple(parts)
        self.stacks = stacks
        self.event_type = bpf[b"event_layout"].Leaf
        self.event_size = ctypes.sizeof(self.event_type)
        self._closed = False
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, release: Callable[[], None]) -> None:
        """Call ``release`` when the program is closed, before bcc lets go of its maps
        (a ring buffer's memory map, kernel/ringbuf.py)."""
        self._on_close.append(release)

    def skipped_runs(self) -> dict[str, int] | None:
        """Runs of our programs the kernel skipped, by tracepoint; None when it cannot tell.

        A BPF program is not run when it would nest in itself on a CPU (raw tracepoints),
        or in any other classic tracepoint or kprobe program (classic tracepoints): an
        interrupt arriving while it runs. The kernel counts each skip per program
        (recursion_misses, in /proc/self/fdinfo since 5.12); a skip of a transition hook
        may be a transition of ours that was not seen, so commands report these.
        """
        by_program = self.skipped_runs_by_program()
        if by_program is None:
            return None
        attached = {fn: tp for part in self.parts for tp, fn in part.raw_attach}
        harmless = {fn for part in self.parts for fn in part.nest_safe}
        backed: dict[str, int] = {}
        for part in self.parts:
            for main, backup in part.backups:
                backed[main] = min(by_program.get(main, 0), by_program.get(backup, 0))
                backed[backup] = 0
        out: dict[str, int] = {}
        for name, n in by_program.items():
            if name in harmless:
                continue
            tp = attached.get(name) or _tracepoint_of(name)
            out[tp] = out.get(tp, 0) + backed.get(name, n)
        return out

    def skipped_runs_by_program(self) -> dict[str, int] | None:
        """The same, by program (function) name; None when the kernel cannot tell."""
        out: dict[str, int] = {}
        found = False
        for name, func in getattr(self.bpf, "funcs", {}).items():
            key = bytes(name).decode(errors="replace")
            try:
                with open(f"/proc/self/fdinfo/{func.fd}") as fh:
                    for line in fh:
                        if line.startswith("recursion_misses:"):
                            out[key] = out.get(key, 0) + int(line.split()[1])
                            found = True
            except (OSError, ValueError, IndexError):
                continue
        return out if found else None

    def skipped_transitions(self) -> int | None:
        """Skipped runs of the hooks on sock:inet_sock_set_state (any socket of the host:
        an upper bound on our transitions that went unseen)."""
        runs = self.skipped_runs()
        return None if runs is None else runs.get("inet_sock_set_state", 0)

    def add_cgroups(self, ids: Iterable[int]) -> None:
        """More cgroup v2 ids for --cgroup/--container (a container that started later)."""
        add_cgroups(self.bpf, ids)

    def counters(self) -> dict[str, int]:
        """The kernel's exact counters (TT_STAT_*), summed over CPUs."""
        table = self.bpf[b"stats"]
        return {name: int(table.sum(i).value) for i, name in enumerate(STAT_NAMES)}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                for release in reversed(self._on_close):
                    release()
            finally:
                self.bpf.cleanup()

    def __enter__(self) -> LoadedProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(
    parts: Sequence[Part],
    flt: EventFilter | None = None,
    *,
    stacks: bool = False,
    defines: dict[str, int] | None = None,
    ringbuf_pages: int | None = None,
    btf: Btf | None = None,
    cgroup_ids: Iterable[int] = (),
) -> LoadedProgram:
    """Check the environment, compile ``parts`` with filters and BTF offsets, attach them."""
    flt = flt or EventFilter()
    parts = with_socket_table(parts)
    require_privileges()
    ensure_tracefs()
    for part in parts:
        for group, name in part.tracepoints:
            if not tracepoint_exists(group, name):
                raise EnvironmentProblem(
                    f"this kernel has no tracepoint {group}:{name}: {part.feature} cannot be traced"
                )
    bcc = import_bcc()
    kernel_headers = headers.find()
    cflags = [*filter_cflags(flt), "-Wno-macro-redefined"]
    btf = btf or Btf.load()
    all_defines = {**BtfOffsets.read(btf).defines, **sock_defines(btf)}
    if any(p.fd_walk for p in parts):
        all_defines.update(fd_walk_defines(btf))
        cflags.append("-DTT_FD_WALK")
    for part in parts:
        if part.defines is not None:
            all_defines.update(part.defines(btf))
    all_defines.update(defines or {})
    if ringbuf_pages is not None:
        if ringbuf_pages <= 0 or ringbuf_pages & (ringbuf_pages - 1):
            raise ValueError("ring buffer pages must be a power of two")
        all_defines["TT_RINGBUF_PAGES"] = ringbuf_pages
    cflags += [f"-D{k}={v}" if v < (1 << 63) else f"-D{k}={v}ULL" for k, v in sorted(all_defines.items())]
    if stacks:
        cflags.append("-DTT_WITH_STACKS")
    with bpf_sources() as directory, _compile_environment(kernel_headers), _stderr_captured() as captured:
        text = program_text(parts, directory)
        try:
            bpf = bcc.BPF(text=text, cflags=[f"-I{directory}", *cflags])
        except Exception as exc:  # bcc raises bare Exception for compile and load failures
            failure: Exception | None = exc
        else:
            failure = None
    if failure is not None:
        stderr = captured[0] if captured else ""
        raise _compile_error(str(failure), stderr, kernel_headers) from None
    try:
        _fill_filter_maps(bpf, flt, cgroup_ids)
        for part in parts:
            for tp, fn_name in part.raw_attach:
                _attach_raw(bcc, bpf, tp, fn_name)
    except Exception:
        bpf.cleanup()
        raise
    return LoadedProgram(bpf, parts, stacks)


def _attach_raw(bcc: Any, bpf: Any, tp: str, fn_name: str) -> None:
    """Attach ``fn_name`` to raw tracepoint ``tp`` even when another function already is:
    bcc's attach_raw_tracepoint() keeps one per name. The fd is filed under its own key,
    so bcc's cleanup() closes it like the others."""
    try:
        fn = bpf.load_func(fn_name.encode(), bcc.BPF.RAW_TRACEPOINT)
    except Exception as exc:  # bcc raises bare Exception
        raise CompileError(f"cannot load {fn_name}: {exc}") from None
    fd = bcc.lib.bpf_attach_raw_tracepoint(fn.fd, tp.encode())
    if fd < 0:
        raise CompileError(f"cannot attach {fn_name} to raw tracepoint {tp}")
    bpf.raw_tracepoint_fds[f"{tp}/{fn_name}".encode()] = fd


def _tracepoint_of(function: str) -> str:
    """The tracepoint of an auto-attached bcc function: ``raw_tracepoint__NAME`` and
    ``tracepoint__GROUP__NAME`` give NAME; anything else is named as it is."""
    if function.startswith("raw_tracepoint__"):
        return function[len("raw_tracepoint__") :]
    if function.startswith("tracepoint__"):
        return function.split("__", 2)[-1]
    return function


def _fill_filter_maps(bpf: Any, flt: EventFilter, cgroup_ids: Iterable[int] = ()) -> None:
    """The filters' values into their maps (bpf/common.bpf.h), right after compiling: until
    then an empty table keeps nothing. ``cgroup_ids``: what --cgroup and --container name now."""
    if flt.all_ports:
        table = bpf[b"port_filter"]
        for port, bits in port_bits(flt).items():
            table[table.Key(port)] = table.Leaf(bits)
    if flt.pids:
        table = bpf[b"pid_filter"]
        for pid in flt.pids:
            table[table.Key(pid)] = table.Leaf(1)
    if flt.netns:
        table = bpf[b"netns_filter"]
        for inode in flt.netns:
            table[table.Key(inode)] = table.Leaf(1)
    if flt.by_cgroup:
        add_cgroups(bpf, cgroup_ids)
    if flt.comm is not None:
        table = bpf[b"comm_filter"]
        leaf = table.Leaf()
        raw = flt.comm.encode()[:15]
        ctypes.memmove(ctypes.addressof(leaf), raw, len(raw))
        table[table.Key(0)] = leaf


def add_cgroups(bpf: Any, ids: Iterable[int]) -> None:
    """cgroup v2 ids into cgroup_filter (a --container that started later, while tracing).
    EnvironmentProblem when the table is full."""
    table = bpf[b"cgroup_filter"]
    for cgroup_id in ids:
        try:
            table[table.Key(cgroup_id)] = table.Leaf(1)
        except Exception:  # bcc raises bare Exception when the map is full
            raise EnvironmentProblem(
                f"--cgroup/--container: more cgroups than the kernel's filter table holds ({MAX_CGROUPS})"
            ) from None


def _compile_error(message: str, stderr: str, kernel_headers: headers.KernelHeaders) -> CompileError:
    diags = _DIAG.findall(stderr)
    if diags:
        more = f" (+{len(diags) - 1} more)" if len(diags) > 1 else ""
        return CompileError(f"BPF compile error: {diags[0]}{more}")
    if "Failed to load BPF program" in message:
        tail = [ln for ln in stderr.strip().splitlines() if ln.strip()][-3:]
        detail = " | ".join(tail)
        return CompileError(f"the kernel refused a BPF program: {message}: {detail}")
    first = next((ln for ln in stderr.splitlines() if "error" in ln), message)
    return CompileError(f"BPF compile error: {first}", hint=f"kernel headers: {kernel_headers.describe}")
