"""Go programs built at test time, offline, with everything under the test's own folder."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

needs_go = pytest.mark.skipif(
    shutil.which("go") is None, reason="needs go (scripts/install --dev installs golang-go)"
)


@contextmanager
def go_binary(
    directory: Path, source: str, module: str = "example.com/leaky", deps: Mapping[str, str] | None = None
) -> Iterator[Path]:
    """``source`` (package main) built into ``directory``/prog; the build cache goes with the
    folder (made writable again on the way out: go leaves its cache read-only). ``deps``:
    dependency modules (import path -> the Go source of its one package), required by the
    main module and replaced by local directories, as a vendored or forked module is."""
    (directory / "main.go").write_text(source)
    mod = f"module {module}\n\ngo 1.19\n"
    for i, (path, dep_source) in enumerate((deps or {}).items()):
        where = directory / "deps" / str(i)
        where.mkdir(parents=True)
        (where / "go.mod").write_text(f"module {path}\n\ngo 1.19\n")
        (where / "dep.go").write_text(dep_source)
        mod += f"\nrequire {path} v0.0.0\nreplace {path} => ./deps/{i}\n"
    (directory / "go.mod").write_text(mod)
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
