from __future__ import annotations

from pathlib import Path

import pytest

from tcptrace.model.events import SocketEvent, Transition
from tcptrace.model.filters import EventFilter
from tcptrace.recording import open_recording

# tests/data/lifecycle_basic.jsonl was recorded from the kernel with one connection per port:
# 47311 client closes first, 47312 server closes first, 47313 reset, 47314 IPv6 client first.


def events(data_dir: Path) -> list[SocketEvent]:
    return list(open_recording(str(data_dir / "lifecycle_basic.jsonl")).events())


def test_port_filter_keeps_either_side(data_dir: Path) -> None:
    kept = [e for e in events(data_dir) if EventFilter(ports=frozenset({47313})).matches(e)]
    assert kept and all(47313 in e.ports for e in kept)
    # listener 2, client 3, server child 3 (see tests/integration/workloads.py)
    assert len(kept) == 8


def test_family_filter(data_dir: Path) -> None:
    v6 = [e for e in events(data_dir) if EventFilter(family=6).matches(e)]
    assert v6 and all(e.family == 6 and ":" in e.saddr for e in v6)
    assert {e.dport for e in v6 if isinstance(e, Transition) and e.old.name == "CLOSE"} >= {47314}


def test_pid_filter_matches_owner_not_running_task(data_dir: Path) -> None:
    evs = events(data_dir)
    owner = next(e.pid for e in evs if e.pid is not None)
    softirq = [e for e in evs if e.pid == owner and e.task_pid != owner]
    assert softirq, "the recording has owner-attributed transitions run in softirq"
    assert all(EventFilter(pids=frozenset({owner})).matches(e) for e in softirq)
    assert not any(EventFilter(pids=frozenset({owner + 1})).matches(e) for e in evs)


def test_comm_filter_uses_kernel_truncation() -> None:
    ev = Transition(ts_ns=1, skaddr=1, comm="averyveryverylo", old=1, new=2)  # type: ignore[arg-type]
    assert EventFilter(comm="averyveryverylongname").matches(ev)
    assert not EventFilter(comm="other").matches(ev)


def test_unknown_owner_never_matches_owner_filters() -> None:
    ev = Transition(ts_ns=1, skaddr=1, pid=None, old=1, new=2)  # type: ignore[arg-type]
    assert not EventFilter(pids=frozenset({1})).matches(ev)
    assert not EventFilter(comm="x").matches(ev)
    assert EventFilter().matches(ev)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pids": frozenset({0})},
        {"pids": frozenset({-3})},
        {"ports": frozenset({0})},
        {"ports": frozenset({70000})},
        {"local_ports": frozenset({0})},
        {"family": 5},
        {"netns": frozenset({0})},
        {"cgroups": ("system.slice",)},
        {"containers": ("XYZ",)},
    ],
)
def test_invalid_filters(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        EventFilter(**kwargs)  # type: ignore[arg-type]
