"""Shared pytest wiring.

Tests under tests/integration/ are marked `integration`: they need root, bcc and the real
kernel. Elsewhere they skip with the reason; with TCPTRACE_REQUIRE_INTEGRATION=1 (set by
scripts/test, hence CI) a skipped integration test is a failure, so a run that did not
trace the kernel can never pass.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and item.get_closest_marker("integration") is not None
        and os.environ.get("TCPTRACE_REQUIRE_INTEGRATION") == "1"
    ):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"integration test skipped but TCPTRACE_REQUIRE_INTEGRATION=1: {reason}"


@pytest.fixture
def data_dir() -> Path:
    return DATA
