"""kernel/headers.py: which headers bcc compiles with; tcptrace's overlay of Debian's split packages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tcptrace.errors import EnvironmentProblem
from tcptrace.kernel import headers

ARCH = headers.kernel_arch()
# tcptrace makes its tree only where root alone can write (kernel/trust.py)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="makes a tree only root may use: run as root")


def debian_split(usr_src: Path, version: str, flavour: str = "amd64") -> tuple[Path, Path]:
    """A miniature of Debian's linux-headers-V-common and linux-headers-V-FLAVOUR."""
    common = usr_src / f"linux-headers-{version}-common"
    flav = usr_src / f"linux-headers-{version}-{flavour}"
    for d in (
        "include/linux",
        "include/net",
        f"arch/{ARCH}/include/asm",
        f"arch/{ARCH}/include/uapi",
        "scripts",
    ):
        (common / d).mkdir(parents=True, exist_ok=True)
    (common / "include/linux/kconfig.h").write_text("/* common */\n")
    (common / "Makefile").write_text("# the kernel's\n")
    for d in ("include/generated", "include/config", f"arch/{ARCH}/include/generated/asm"):
        (flav / d).mkdir(parents=True)
    (flav / "include/generated/autoconf.h").write_text("#define CONFIG_X 1\n")
    (flav / "Makefile").write_text(f"include {common}/Makefile\n")
    (flav / "scripts").symlink_to(usr_src / "kbuild-scripts")
    return flav, common


@needs_root
def test_a_debian_split_becomes_one_tree_of_links(tmp_path: Path) -> None:
    usr_src, trees = tmp_path / "src", tmp_path / "trees"
    flav, common = debian_split(usr_src, "6.1.0-57")
    found = headers._from_usr_src("6.18.1-test", True, trees, usr_src)
    assert found is not None
    tree = trees / flav.name
    assert found.path == tree and found.env == str(tree)
    assert "nearest to 6.18.1-test" in found.describe and f"{flav.name} with {common.name}" in found.describe
    assert headers.has_headers(tree)
    # directories both layers have are merged; everything else is one link to the layer's entry
    assert (tree / "include").is_dir() and not (tree / "include").is_symlink()
    assert os.readlink(tree / "include/linux") == str(common / "include/linux")
    assert os.readlink(tree / "include/generated") == str(flav / "include/generated")
    assert os.readlink(tree / f"arch/{ARCH}/include/generated") == str(
        flav / f"arch/{ARCH}/include/generated"
    )
    assert os.readlink(tree / f"arch/{ARCH}/include/asm") == str(common / f"arch/{ARCH}/include/asm")
    # on a name both have, the flavour wins (its Makefile, its scripts link)
    assert os.readlink(tree / "Makefile") == str(flav / "Makefile")
    assert os.readlink(tree / "scripts") == str(flav / "scripts")
    assert (tree / headers.MARKER).read_text().split() == [str(common), str(flav)]


@needs_root
def test_the_tree_is_reused_then_remade_when_its_layers_change(tmp_path: Path) -> None:
    usr_src, trees = tmp_path / "src", tmp_path / "trees"
    flav, _ = debian_split(usr_src, "6.1.0-57")
    tree = headers.build_tree(flav, headers.common_of(flav) or Path(), trees)
    inode = tree.stat().st_ino
    assert headers.build_tree(flav, headers.common_of(flav) or Path(), trees).stat().st_ino == inode
    other = usr_src / "linux-headers-6.1.0-57-common-moved"
    (usr_src / "linux-headers-6.1.0-57-common").rename(other)
    (flav / "Makefile").write_text(f"include {other}/Makefile\n")
    remade = headers.build_tree(flav, other, trees)
    assert os.readlink(remade / "include/linux") == str(other / "include/linux")
    assert sorted(p.name for p in trees.iterdir()) == [flav.name]  # no temporary left behind


def test_the_running_kernels_own_headers_come_first_then_the_newest(tmp_path: Path) -> None:
    usr_src = tmp_path / "src"
    debian_split(usr_src, "6.1.0-9")
    debian_split(usr_src, "6.1.0-10")
    debian_split(usr_src, "6.1.0-10", flavour="cloud-amd64")
    (usr_src / "linux-headers-6.1.0-10-common-only").mkdir()  # unconfigured: never a candidate
    names = [p.name for p in headers._candidates("6.18.1-test", usr_src)]
    assert names == [
        "linux-headers-6.1.0-10-amd64",
        "linux-headers-6.1.0-10-cloud-amd64",
        "linux-headers-6.1.0-9-amd64",
    ]
    names = [p.name for p in headers._candidates("6.1.0-9-amd64", usr_src)]
    assert names[0] == "linux-headers-6.1.0-9-amd64"


def test_a_whole_directory_is_used_as_it_is(tmp_path: Path) -> None:
    usr_src, trees = tmp_path / "src", tmp_path / "trees"
    whole = usr_src / "linux-headers-5.15.0-91-generic"
    for d in ("include/linux", "include/generated", f"arch/{ARCH}/include/generated"):
        (whole / d).mkdir(parents=True)
    (whole / "include/linux/kconfig.h").write_text("")
    (whole / "include/generated/autoconf.h").write_text("")
    found = headers._from_usr_src("6.18.1-test", True, trees, usr_src)
    assert found is not None and found.path == whole and found.env == str(whole)
    assert not trees.exists()


def test_without_root_a_missing_tree_is_a_one_line_error(tmp_path: Path) -> None:
    usr_src, trees = tmp_path / "src", tmp_path / "trees"
    debian_split(usr_src, "6.1.0-57")
    with pytest.raises(EnvironmentProblem, match="needs tcptrace's header tree"):
        headers._from_usr_src("6.18.1-test", False, trees, usr_src)


def test_common_of_reads_the_flavour_makefile(tmp_path: Path) -> None:
    flav, common = debian_split(tmp_path, "6.1.0-57")
    assert headers.common_of(flav) == common
    (flav / "Makefile").write_text("obj-m += x.o\n")
    assert headers.common_of(flav) is None


def test_a_tree_that_cannot_be_made_is_a_one_line_error(tmp_path: Path) -> None:
    usr_src = tmp_path / "src"
    flav, common = debian_split(usr_src, "6.1.0-57")
    (tmp_path / "file").write_text("")
    with pytest.raises(EnvironmentProblem, match=r"^cannot make .*/file/trees: "):
        headers.build_tree(flav, common, tmp_path / "file" / "trees")
