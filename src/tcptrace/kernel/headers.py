"""Which kernel headers bcc compiles with, chosen per process and never linked system-wide.

bcc needs a kernel header tree to compile (kconfig.h, generated headers, the arch
includes), although tcptrace takes no struct layout from it: fields come from tracepoints
and offsets from BTF (kernel/btf.py), so headers of another kernel version serve. In order:

1. ``BCC_KERNEL_SOURCE`` from the environment, when root may compile from it (trust.py);
2. ``/lib/modules/RELEASE/build`` (and ``source``), bcc's default, when it has headers;
3. the kernel's own headers, ``/sys/kernel/kheaders.tar.xz`` (CONFIG_IKHEADERS), which bcc
   unpacks itself;
4. the nearest headers installed under /usr/src, given to bcc with ``BCC_KERNEL_SOURCE``
   for this process only. Debian splits them into ``linux-headers-V-FLAVOUR`` (generated
   files; its Makefile includes the other's) and ``linux-headers-V-common`` (the sources):
   tcptrace overlays the two as a tree of symbolic links in a directory of its own,
   ``/var/lib/tcptrace/kernel-headers/linux-headers-V-FLAVOUR``, made by scripts/install or
   at the first run as root. Ubuntu's ``-generic`` directories are whole and used as they are.

``python -m tcptrace.kernel.headers`` prints the choice (making the tree when needed).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tcptrace.errors import EnvironmentProblem, TcptraceError
from tcptrace.kernel.trust import untrusted_reason

ENV = "BCC_KERNEL_SOURCE"
TREES = Path("/var/lib/tcptrace/kernel-headers")
MODULES = Path("/lib/modules")
USR_SRC = Path("/usr/src")
KHEADERS = Path("/sys/kernel/kheaders.tar.xz")
MARKER = ".tcptrace-layers"  # in a tree: the directories it overlays, one a line
HINT = "install the kernel headers package (scripts/install does), then run tcptrace as root once"

# uname -m -> the kernel's arch/ directory (bcc's KBuildHelper does the same).
_ARCH = (
    ("x86_64", "x86"),
    ("i686", "x86"),
    ("aarch64", "arm64"),
    ("arm", "arm"),
    ("ppc", "powerpc"),
    ("s390", "s390"),
    ("mips", "mips"),
    ("riscv", "riscv"),
    ("loongarch", "loongarch"),
)


@dataclass(frozen=True)
class KernelHeaders:
    """Headers bcc will compile with.

    ``env``: the ``BCC_KERNEL_SOURCE`` the loader sets around the compile (None: bcc finds
    them by itself). ``describe``: one line for `doctor` and error hints.
    """

    path: Path
    describe: str
    env: str | None = None


def kernel_arch(machine: str | None = None) -> str:
    """The arch/ directory of a machine name.

    >>> kernel_arch("x86_64"), kernel_arch("aarch64")
    ('x86', 'arm64')
    """
    machine = machine or os.uname().machine
    for prefix, arch in _ARCH:
        if machine.startswith(prefix):
            return arch
    return machine


def has_headers(directory: Path) -> bool:
    """Whether bcc can compile in ``directory``: sources (kconfig.h) and generated files."""
    return (directory / "include/linux/kconfig.h").is_file() and (
        directory / "include/generated/autoconf.h"
    ).is_file()


def version_key(name: str) -> tuple[tuple[int, ...], int]:
    """Sort key of a header directory's name: its version numbers, then the shorter name
    (``-amd64`` before ``-cloud-amd64``).

    >>> sorted(["linux-headers-6.1.0-9-amd64", "linux-headers-6.1.0-10-amd64"], key=version_key)[-1]
    'linux-headers-6.1.0-10-amd64'
    """
    return tuple(int(n) for n in re.findall(r"\d+", name)), -len(name)


def common_of(flavour: Path) -> Path | None:
    """The sources a Debian flavour directory builds on: its Makefile is one line,
    ``include /usr/src/linux-headers-V-common/Makefile``."""
    try:
        first = (flavour / "Makefile").read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    m = re.fullmatch(r"include\s+(/\S+)/Makefile\s*", first)
    if m is None:
        return None
    common = Path(m.group(1))
    return common if (common / "include/linux/kconfig.h").is_file() else None


def _system(release: str) -> KernelHeaders | None:
    """bcc's own choice: /lib/modules/RELEASE/source with build's generated files when both
    exist, else build."""
    kdir = MODULES / release
    build, source = kdir / "build", kdir / "source"
    kpath = source if build.is_dir() and source.is_dir() else build
    if not (kpath / "include/linux/kconfig.h").is_file():
        return None
    target = os.path.realpath(build)
    shown = f"{build} -> {target}" if target != str(build) else str(build)
    return KernelHeaders(build, f"{shown} (bcc's default)")


def _candidates(release: str, usr_src: Path = USR_SRC) -> list[Path]:
    """Configured header directories of this machine's arch under /usr/src, best first:
    the running kernel's own, then by version, newest first."""
    arch = kernel_arch()
    try:
        entries = [p for p in usr_src.iterdir() if p.name.startswith("linux-headers-")]
    except OSError:
        return []
    found = [
        p
        for p in entries
        if (p / "include/generated/autoconf.h").is_file()
        and (p / "arch" / arch / "include/generated").is_dir()
    ]
    found.sort(key=lambda p: (p.name == f"linux-headers-{release}", version_key(p.name)), reverse=True)
    return found


def _merge(dest: Path, layers: list[Path]) -> None:
    """Overlay ``layers`` (last wins) in ``dest`` as symbolic links: a name becomes a
    directory only where two layers both have a real directory by that name, else a link to
    the last layer's entry. The result reads as ``cp -as`` of each layer in turn would make
    it, with a few hundred links instead of one per file."""
    names = sorted({name for layer in layers for name in os.listdir(layer)})
    for name in names:
        sources = [layer / name for layer in layers if os.path.lexists(layer / name)]
        dirs = [s for s in sources if s.is_dir() and not s.is_symlink()]
        if len(dirs) > 1:
            (dest / name).mkdir()
            os.chmod(dest / name, 0o755)
            _merge(dest / name, dirs)
        else:
            os.symlink(sources[-1], dest / name)


def _layers_of(tree: Path) -> list[str]:
    try:
        return (tree / MARKER).read_text().split()
    except OSError:
        return []


def build_tree(flavour: Path, common: Path, trees: Path = TREES) -> Path:
    """Make (or reuse) the overlay of ``common`` and ``flavour`` under ``trees``; atomic,
    so two tcptrace starting at once both end with the same tree."""
    dest = trees / flavour.name
    layers = [str(common), str(flavour)]
    if has_headers(dest) and _layers_of(dest) == layers:
        return dest
    try:
        trees.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot make {trees}: {exc.strerror}", hint=HINT) from None
    problem = untrusted_reason(trees, walk=False)
    if problem:
        raise EnvironmentProblem(f"cannot keep kernel headers in {trees}: {problem}", hint=HINT)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=trees))
    try:
        os.chmod(tmp, 0o755)
        _merge(tmp, [common, flavour])
        (tmp / MARKER).write_text("\n".join(layers) + "\n")
        if os.path.lexists(dest):
            shutil.rmtree(dest)  # stale: the packages it linked to changed
        os.rename(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if has_headers(dest) and _layers_of(dest) == layers:
            return dest  # another tcptrace made it first
        raise EnvironmentProblem(f"cannot make the kernel header tree {dest}: {exc}", hint=HINT) from None
    return dest


def _from_usr_src(release: str, build: bool, trees: Path, usr_src: Path) -> KernelHeaders | None:
    for candidate in _candidates(release, usr_src):
        note = "" if candidate.name == f"linux-headers-{release}" else f" (nearest to {release})"
        if has_headers(candidate):
            return KernelHeaders(candidate, f"{candidate}{note} via {ENV}", str(candidate))
        common = common_of(candidate)
        if common is None:
            continue
        tree = trees / candidate.name
        if has_headers(tree) and _layers_of(tree) == [str(common), str(candidate)]:
            problem = untrusted_reason(tree, walk=False)
            if problem:
                raise EnvironmentProblem(f"kernel header tree refused: {problem}", hint=HINT)
        elif build:
            build_tree(candidate, common, trees)
        else:
            raise EnvironmentProblem(f"{candidate.name} needs tcptrace's header tree {tree}", hint=HINT)
        return KernelHeaders(tree, f"{candidate.name} with {common.name}{note} via {ENV}={tree}", str(tree))
    return None


def find(
    release: str | None = None, *, build: bool | None = None, trees: Path = TREES, usr_src: Path = USR_SRC
) -> KernelHeaders:
    """The headers to compile with (see the module's docstring for the order).

    ``build``: make tcptrace's tree when it is missing (default: when running as root).
    Raises EnvironmentProblem when there are none, or when ``BCC_KERNEL_SOURCE`` is set but
    not trusted.
    """
    release = release or os.uname().release
    build = os.geteuid() == 0 if build is None else build
    inherited = os.environ.get(ENV)
    if inherited:
        problem = untrusted_reason(inherited, walk=False, caller=os.getuid())
        if problem:
            raise EnvironmentProblem(f"{ENV} refused: {problem}", hint=f"unset {ENV} (sudo -E keeps it)")
        if not (Path(inherited) / "include/linux/kconfig.h").is_file():
            raise EnvironmentProblem(f"{ENV}={inherited} has no kernel headers (include/linux/kconfig.h)")
        return KernelHeaders(Path(inherited), f"{inherited} ({ENV} from the environment)")
    found = _system(release)
    if found is None and KHEADERS.exists():
        found = KernelHeaders(KHEADERS, f"{KHEADERS} (the kernel's own, unpacked by bcc)")
    if found is None:
        found = _from_usr_src(release, build, trees, usr_src)
    if found is None:
        raise EnvironmentProblem(f"no kernel headers for {release}", hint=HINT)
    return found


def main() -> int:
    try:
        print(find().describe)
    except TcptraceError as exc:
        print(f"tcptrace: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
