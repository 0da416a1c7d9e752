"""commands/sources.live_session: whatever fails once the programs are loaded, they are
detached (closed) before the error goes on, and nothing else is left behind."""

from __future__ import annotations

from typing import Any

import pytest

from tcptrace.commands import sources
from tcptrace.model.filters import EventFilter


class FakeProgram:
    stacks = False

    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def loaded(monkeypatch: pytest.MonkeyPatch) -> FakeProgram:
    program = FakeProgram()
    monkeypatch.setattr("tcptrace.kernel.loader.load", lambda *a, **k: program)
    monkeypatch.setattr("tcptrace.kernel.stream.KernelStream", lambda *a, **k: object())
    return program


@pytest.mark.parametrize("error", [OSError("sock_diag broke"), KeyboardInterrupt()])
def test_a_failure_while_seeding_detaches_the_programs(
    monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    program = loaded(monkeypatch)

    def seed(*_a: Any) -> Any:
        raise error

    monkeypatch.setattr("tcptrace.kernel.seeds.seed_owners", seed)
    with pytest.raises(type(error)), sources.live_session(["lifecycle"], EventFilter(), quiet=True):
        pytest.fail("the session must not start")
    assert program.closed == 1


def test_a_failure_in_the_block_detaches_the_programs_once(monkeypatch: pytest.MonkeyPatch) -> None:
    program = loaded(monkeypatch)
    closed: list[str] = []
    monkeypatch.setattr(
        sources.KernelSource, "close", lambda self: closed.append("source") or program.close()
    )
    with (
        pytest.raises(RuntimeError),
        sources.live_session(["lifecycle"], EventFilter(), quiet=True, seed=False),
    ):
        raise RuntimeError("the reader failed")
    assert closed == ["source"] and program.closed == 1
