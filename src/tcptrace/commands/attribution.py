"""What the commands that show leak suspects (closewait, diagnose, top, agent) share to name
the application's code: the user's frame rules, source lines located while a process lives,
and the facts of each suspect's owner (its executable, its perf map).

Live, each stack the session symbolizes is located for its source lines (``lines``, handed to
the session's symbolizer); ``refresh`` then, before suspects are shown, adds the lines to
their stacks (reading DWARF once per file: at a refresh, never per event) and reads their
owners' facts while they live. A replay has neither: its stacks are attributed as recorded.
"""

from __future__ import annotations

from tcptrace.model.attribution import Attributor
from tcptrace.model.closewait import CloseWaitModel, CloseWaitTracker
from tcptrace.model.framerules import Rules
from tcptrace.system.symbols import StackLines, process_facts

MAX_FACTS = 4096  # owners whose facts are kept (pids of leak suspects)


class SuspectNames:
    """The attributor of a command, and, live, the lines and owner facts it is fed."""

    def __init__(self, rules: Rules | None = None, live: bool = False) -> None:
        self.attributor = Attributor(rules)
        self.live = live
        self.lines = StackLines(rules=self.attributor.rules) if live else None

    def refresh(self, tracker: CloseWaitTracker | CloseWaitModel, now_ns: int) -> None:
        """Before the leak suspects are shown: their stacks' source lines, and (live) what
        their owners' executables are and whether they write perf maps."""
        if self.lines is not None:
            tracker.rewrite_code_paths(self.lines.annotate_path, now_ns, tracker.threshold_ns)
        if not self.live:
            return
        facts = self.attributor.facts
        owners = {
            s.pid
            for s in tracker.open.values()
            if s.pid is not None and s.age_ns(now_ns) >= tracker.threshold_ns
        }
        for pid in owners:
            known = facts.get(pid)
            if known is not None and known.exe is not None:
                continue
            seen = process_facts(pid)
            if known is None or seen.exe is not None:  # a process gone keeps what was seen of it
                facts[pid] = seen
        while len(facts) > MAX_FACTS:
            del facts[next(iter(facts))]

    def close(self) -> None:
        if self.lines is not None:
            self.lines.close()
