"""LoadedProgram.skipped_runs: how the kernel's per-program skip counts become a bound on lost events."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from tcptrace.kernel.loader import LIFECYCLE, SOCKET_OWNERS, TIMEWAIT, LoadedProgram, Part


class FakeTable:
    Leaf = ctypes.c_uint64


class FakeBpf:
    def __getitem__(self, name: Any) -> FakeTable:
        return FakeTable()


def program_with_skips(
    skips: dict[str, int], parts: tuple[Part, ...] = (LIFECYCLE, TIMEWAIT)
) -> LoadedProgram:
    program = LoadedProgram(FakeBpf(), parts, stacks=False)
    program.skipped_runs_by_program = lambda: dict(skips)  # type: ignore[method-assign]
    return program


def test_skips_of_process_only_programs_lose_nothing() -> None:
    skips = {"tt_lc_process": 140, "tt_lc_other": 3, "tt_lc_other_backup": 2}
    runs = program_with_skips(skips).skipped_runs()
    assert runs == {"inet_sock_set_state": 2}  # lifecycle's softirq side is a pair too: min(3, 2)


def test_timewait_alone_gets_the_socket_owners_pair_and_its_bound() -> None:
    # what load() makes of [TIMEWAIT]: lifecycle's owners-only mode in front (with_socket_table)
    runs = program_with_skips(
        {"tt_lc_process": 9, "tt_lc_other": 4, "tt_lc_other_backup": 1, "tt_tw_other_main": 2},
        parts=(SOCKET_OWNERS, TIMEWAIT),
    ).skipped_runs()
    assert runs == {"inet_sock_set_state": 1}  # min(4, 1) + min(2, 0)


@pytest.mark.parametrize(("main", "backup", "bound"), [(104, 0, 0), (0, 7, 0), (5, 9, 5), (9, 5, 5)])
def test_a_backed_up_program_loses_at_most_the_smaller_count(main: int, backup: int, bound: int) -> None:
    runs = program_with_skips(
        {"tt_tw_other_main": main, "tt_tw_other_backup": backup, "raw_tracepoint__timer_cancel": 2}
    ).skipped_runs()
    assert runs == {"inet_sock_set_state": bound, "timer_cancel": 2}


def test_skipped_transitions_adds_every_part_on_the_tracepoint() -> None:
    program = program_with_skips(
        {"tt_lc_other": 3, "tt_lc_other_backup": 1, "tt_tw_other_main": 4, "tt_tw_other_backup": 2}
    )
    assert program.skipped_transitions() == 3


def test_unknown_when_the_kernel_cannot_tell() -> None:
    program = LoadedProgram(FakeBpf(), (LIFECYCLE,), stacks=False)
    program.skipped_runs_by_program = lambda: None  # type: ignore[method-assign]
    assert program.skipped_runs() is None
    assert program.skipped_transitions() is None


def test_the_socket_table_writer_is_added_once_and_only_when_needed() -> None:
    from tcptrace.kernel.loader import CLOSELAT, OWNER, with_socket_table

    assert with_socket_table([TIMEWAIT]) == (SOCKET_OWNERS, TIMEWAIT)
    assert with_socket_table([LIFECYCLE, OWNER, CLOSELAT, TIMEWAIT]) == (LIFECYCLE, OWNER, CLOSELAT, TIMEWAIT)
    assert with_socket_table([LIFECYCLE]) == (LIFECYCLE,)
    with pytest.raises(ValueError, match="need the lifecycle part"):
        with_socket_table([OWNER])
