"""LoadedProgram.skipped_runs: how the kernel's per-program skip counts become a bound on lost events."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from tcptrace.kernel.loader import LIFECYCLE, TIMEWAIT, LoadedProgram


class FakeTable:
    Leaf = ctypes.c_uint64


class FakeBpf:
    def __getitem__(self, name: Any) -> FakeTable:
        return FakeTable()


def program_with_skips(skips: dict[str, int]) -> LoadedProgram:
    program = LoadedProgram(FakeBpf(), (LIFECYCLE, TIMEWAIT), stacks=False)
    program.skipped_runs_by_program = lambda: dict(skips)  # type: ignore[method-assign]
    return program


def test_skips_of_process_only_programs_lose_nothing() -> None:
    runs = program_with_skips(
        {"tt_lc_process": 140, "raw_tracepoint__inet_sock_set_state": 10, "tt_lc_other": 3}
    ).skipped_runs()
    assert runs == {"inet_sock_set_state": 3}


@pytest.mark.parametrize(("main", "backup", "bound"), [(104, 0, 0), (0, 7, 0), (5, 9, 5), (9, 5, 5)])
def test_a_backed_up_program_loses_at_most_the_smaller_count(main: int, backup: int, bound: int) -> None:
    runs = program_with_skips(
        {"tt_tw_other_main": main, "tt_tw_other_backup": backup, "raw_tracepoint__timer_cancel": 2}
    ).skipped_runs()
    assert runs == {"inet_sock_set_state": bound, "timer_cancel": 2}


def test_skipped_transitions_adds_every_part_on_the_tracepoint() -> None:
    program = program_with_skips({"tt_lc_other": 3, "tt_tw_other_main": 4, "tt_tw_other_backup": 2})
    assert program.skipped_transitions() == 5


def test_unknown_when_the_kernel_cannot_tell() -> None:
    program = LoadedProgram(FakeBpf(), (LIFECYCLE,), stacks=False)
    program.skipped_runs_by_program = lambda: None  # type: ignore[method-assign]
    assert program.skipped_runs() is None
    assert program.skipped_transitions() is None
