"""What `tcptrace states` sums up: transitions counted by kind, and the events seen."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tcptrace.model.events import SocketEvent, TcpState, Transition


@dataclass
class StatesSummary:
    """Counts of transitions by (old, new) and of arrivals in each state."""

    transitions: Counter[tuple[TcpState, TcpState]] = field(default_factory=Counter)
    entered: Counter[TcpState] = field(default_factory=Counter)
    events: int = 0
    first_ts_ns: int | None = None
    last_ts_ns: int | None = None

    def feed(self, event: SocketEvent) -> None:
        self.events += 1
        if self.first_ts_ns is None:
            self.first_ts_ns = event.ts_ns
        self.last_ts_ns = event.ts_ns
        if isinstance(event, Transition):
            self.transitions[(event.old, event.new)] += 1
            self.entered[event.new] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "by_transition": {f"{o.name}->{n.name}": c for (o, n), c in sorted(self.transitions.items())},
            "entered": {s.name: c for s, c in sorted(self.entered.items())},
        }
