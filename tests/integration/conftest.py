"""Fixtures for tests against the real kernel (root, bcc, tracefs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import helpers


@pytest.fixture(autouse=True)
def _needs_kernel() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        import bcc  # noqa: F401
    except ImportError:
        pytest.skip("needs bcc (run scripts/install)")


@pytest.fixture
def port() -> int:
    """A loopback port nobody listens on now."""
    return helpers.free_port()


@pytest.fixture(scope="session")
def fixture_bin() -> Iterator[helpers.FixtureBuilder]:
    """Builds C programs of tests/integration/fixtures/ with frame pointers, once a session."""
    if shutil.which("cc") is None:
        pytest.skip("needs a C compiler (scripts/install --dev)")
    yield helpers.FixtureBuilder(Path(__file__).parent / "fixtures")


@pytest.fixture
def tcptrace_cmd() -> list[str]:
    """How to run the CLI as a subprocess, with this interpreter (the venv's)."""
    return [sys.executable, "-m", "tcptrace"]


@pytest.fixture
def ss() -> helpers.SS:
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    return helpers.SS()


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)  # type: ignore[call-overload]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say which runtime-dependent cases were not collected on this machine."""
    from tests.integration.test_attribution import PY312

    if PY312 is None:
        terminalreporter.write_line(
            "note: no python3.12 here (Debian 12 ships none): the -X perf attribution case was not "
            "collected; its perf-map names are unit-tested (tests/unit/test_jitnames.py)"
        )
