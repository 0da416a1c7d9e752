"""kernel/trust.py: which directories root may compile C from (TCPTRACE_BPF_DIR, BCC_KERNEL_SOURCE)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tcptrace.kernel.trust import _mode_problem, untrusted_reason

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="makes root-owned directories: run as root")


def st(mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "above", "problem"),
    [
        (stat.S_IFDIR | 0o755, 0, False, None),
        (stat.S_IFREG | 0o644, 0, False, None),
        (stat.S_IFREG | 0o644, 1000, False, "x is owned by uid 1000, not root"),
        (stat.S_IFREG | 0o664, 0, False, "x is writable by its group"),
        (stat.S_IFREG | 0o646, 0, False, "x is writable by others"),
        (stat.S_IFLNK | 0o777, 0, False, "x is a symbolic link"),
        # a sticky directory (/tmp) is fine above the directory, never as it
        (stat.S_IFDIR | 0o1777, 0, True, None),
        (stat.S_IFDIR | 0o1777, 0, False, "x is writable by others"),
        (stat.S_IFDIR | 0o777, 0, True, "x is writable by others"),
    ],
)
def test_mode_rules(mode: int, uid: int, above: bool, problem: str | None) -> None:
    assert _mode_problem("x", st(mode, uid), above=above) == problem


def test_only_root_may_compile_from_an_override(tmp_path: Path) -> None:
    assert untrusted_reason(tmp_path, caller=1000) == "the caller (uid 1000) is not root, the owner required"


def test_missing_and_non_directories_are_refused(tmp_path: Path) -> None:
    assert untrusted_reason(tmp_path / "nope", caller=0) == f"{tmp_path / 'nope'} does not exist"
    (tmp_path / "f").write_text("")
    assert untrusted_reason(tmp_path / "f", caller=0) == f"{tmp_path / 'f'} is not a directory"


@needs_root
def test_a_root_owned_tree_is_trusted_and_any_loose_entry_refuses_it(tmp_path: Path) -> None:
    tree = tmp_path / "bpf"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.c").write_text("")
    (tree / "sub" / "b.h").write_text("")
    for p in (tmp_path, tree, tree / "sub"):
        os.chmod(p, 0o755)
    assert untrusted_reason(tree) is None
    assert untrusted_reason(tree, caller=0) is None

    os.chmod(tree / "sub" / "b.h", 0o666)
    assert untrusted_reason(tree) == f"{tree / 'sub' / 'b.h'} is writable by others"
    assert untrusted_reason(tree, walk=False) is None  # only the directory and those above
    os.chmod(tree / "sub" / "b.h", 0o644)

    os.chown(tree / "a.c", 65534, 65534)
    assert untrusted_reason(tree) == f"{tree / 'a.c'} is owned by uid 65534, not root"
    os.chown(tree / "a.c", 0, 0)

    os.symlink("/etc/passwd", tree / "link.h")
    assert untrusted_reason(tree) == f"{tree / 'link.h'} is a symbolic link"
    os.unlink(tree / "link.h")

    os.chmod(tmp_path, 0o777)  # a directory above that others may write: they could swap it
    assert untrusted_reason(tree) == f"{tmp_path} is writable by others"
    os.chmod(tmp_path, 0o755)


@needs_root
def test_a_symlink_to_the_directory_is_judged_by_where_it_leads(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(real, 0o755)
    (tmp_path / "alias").symlink_to(real)
    assert untrusted_reason(tmp_path / "alias") is None
    os.chmod(real, 0o775)
    assert untrusted_reason(tmp_path / "alias") == f"{real} is writable by its group"


def compile_with_bpf_dir() -> None:
    from tcptrace.kernel.loader import bpf_sources

    with bpf_sources():
        pass


def find_headers() -> None:
    from tcptrace.kernel import headers

    headers.find("6.18.1-test", build=False)


@pytest.mark.parametrize(
    ("variable", "use"), [("TCPTRACE_BPF_DIR", compile_with_bpf_dir), ("BCC_KERNEL_SOURCE", find_headers)]
)
def test_a_variable_naming_an_untrusted_directory_is_refused_in_one_line(
    variable: str, use: Callable[[], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tcptrace.errors import EnvironmentProblem

    planted = tmp_path / "planted"
    planted.mkdir()
    os.chmod(planted, 0o777)
    monkeypatch.setenv(variable, str(planted))
    with pytest.raises(EnvironmentProblem, match=rf"^{variable} refused: ") as info:
        use()
    assert "\n" not in str(info.value)


def test_without_an_override_the_programs_come_from_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import tcptrace
    from tcptrace.kernel.loader import bpf_sources

    monkeypatch.delenv("TCPTRACE_BPF_DIR", raising=False)
    with bpf_sources() as directory:
        assert directory == Path(tcptrace.__file__).parent / "bpf"
        assert (directory / "tcptrace.h").is_file()
