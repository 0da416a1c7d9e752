"""Go programs built at test time, offline, with everything under the test's own folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

needs_go = pytest.mark.skipif(
    shutil.which("go") is None, reason="needs go (scripts/install --dev installs golang-go)"
)


@contextmanager
def go_binary(directory: Path, source: str, module: str = "example.com/leaky") -> Iterator[Path]:
    """``source`` (package main) built into ``directory``/prog; the build cache goes with the
    folder (made writable again on the way out: go leaves its cache read-only)."""
    (directory / "main.go").write_text(source)
    (directory / "go.mod").write_text(f"module {module}\n\ngo 1.19\n")
    env = {
        **os.environ,
        "GOCACHE": str(directory / "cache"),
        "GOPATH": str(directory / "gopath"),
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
    }
    try:
        subprocess.run(
            ["go", "build", "-o", "prog", "."], cwd=directory, env=env, check=True, capture_output=True
        )
        yield directory / "prog"
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(directory)], check=True)
