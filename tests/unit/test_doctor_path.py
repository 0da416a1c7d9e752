"""doctor says which `tcptrace` the shell runs, and warns when another program of that name
(Debian's tcptrace, a tcpdump file analyser) comes first on PATH."""

from __future__ import annotations

import os
from pathlib import Path

from tcptrace.commands.doctor import path_check

SCRIPT = "#!/usr/bin/python3\nimport sys\nfrom tcptrace.cli import main\nsys.exit(main())\n"


def executable(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(0o755)
    return path


def test_another_program_first_on_path_is_a_warning(tmp_path: Path) -> None:
    debian = executable(tmp_path / "usr-bin" / "tcptrace", b"\x7fELF\x02\x01\x01" + b"\0" * 64)
    ours = executable(tmp_path / "local-bin" / "tcptrace", SCRIPT.encode())
    check = path_check(os.pathsep.join([str(debian.parent), str(ours.parent)]))
    assert not check.ok and not check.required
    assert str(debian) in check.detail and "Debian" in check.detail
    assert "full path" in check.fix


def test_ours_first_on_path_is_fine(tmp_path: Path) -> None:
    executable(tmp_path / "usr-bin" / "tcptrace", b"\x7fELF\x02\x01\x01" + b"\0" * 64)
    ours = executable(tmp_path / "local-bin" / "tcptrace", SCRIPT.encode())
    check = path_check(os.pathsep.join([str(ours.parent), str(tmp_path / "usr-bin")]))
    assert check.ok and check.detail == str(ours)


def test_none_on_path(tmp_path: Path) -> None:
    check = path_check(str(tmp_path))
    assert check.ok and "python -m tcptrace" in check.detail
