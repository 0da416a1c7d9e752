"""A group of leak suspects as a developer reads it: the application's frame first, then the
runtime's hints, then the code paths they rest on.

A group (model/closewait.py) has up to three code paths: the last send/recv before the
peer's FIN (``pre_fin_touch``: what the app was doing with the connection), the app's first
touch after it (``post_fin_touch``: usually the read that returned EOF), and where its
sockets were accepted or connected (``origin``). Each is classified (model/frames.py: the
tracer's own frames dropped, the user's rules first) and handed to ``hints.attribute`` in
that order, the order it documents: the first path whose stack names the application's code
gives the frame a report leads with (``leak_connection (leaky_server.c:80)``), and the
runtime's hints say what to look for when none does.

``Attributor`` holds what attribution needs beyond the stacks: the user's frame rules and,
per owner, what the host said while the process lived (its executable, whether it writes a
perf map). Pure: the facts are read by the caller (system/symbols.py ``process_facts``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tcptrace.model.closewait import SuspectGroup
from tcptrace.model.events import Op
from tcptrace.model.framerules import Rules, library_prefixes
from tcptrace.model.frames import ClassifiedStack, Frame, classify, without_tracer_frames
from tcptrace.model.hints import Attribution, Hint, StackSample, attribute
from tcptrace.model.lifecycle import CodePath

# The code paths of a group, in the order their frames lead a report.
ROLES = ("pre_fin_touch", "post_fin_touch", "origin")
ROLE_TITLES = {
    "pre_fin_touch": "before the FIN",
    "post_fin_touch": "after the FIN",
    "origin": "origin",
}
NO_APP_FRAME = "no frame of the application's code"
MAX_GO_EXECUTABLES = 256  # Go executables whose dependency rules are kept


@dataclass(frozen=True)
class ProcessFacts:
    """What the host said about an owner while it lived (None: not known)."""

    exe: str | None = None
    perf_map: bool | None = None
    """Whether the process writes /tmp/perf-PID.map (Node.js --perf-basic-prof, Python -X perf)."""
    go_deps: tuple[str, ...] = ()
    """The modules a Go executable was built with (its build info): their frames are library
    code, so a leak inside a driver or framework is named by the caller in the app's code."""


@dataclass(frozen=True)
class RolePath:
    """One code path of a group, its stack classified."""

    role: str
    path: CodePath
    stack: ClassifiedStack

    @property
    def eof(self) -> bool:
        """A recv that returned 0: the app read the peer's FIN."""
        return self.path.op == Op.RECV and self.path.ret == 0

    @property
    def title(self) -> str:
        return ROLE_TITLES[self.role]

    def op_text(self) -> str:
        """``send``, ``recv -> 0 (EOF)``, ``recv -> 12``, ``accept``."""
        op = self.path.op.name.lower()
        if self.path.op == Op.RECV:
            return f"{op} -> {self.path.ret}" + (" (EOF)" if self.eof else "")
        return op

    def where(self) -> str:
        """The application frame's label, else a library's, else what the stack ends in.

        >>> def where(*user):
        ...     return RolePath("origin", CodePath(Op.SEND, 0, 1), classify([], user)).where()
        >>> where("send+0x4 [libc.so.6]", "flush+0x9 [srv] at /src/srv.c:12")
        'flush (srv.c:12)'
        >>> where("__send+0x64 [libc.so.6]")
        "no frame of the application's code (innermost: __send [libc.so.6])"
        """
        frame = self.stack.app_frame or self.stack.library_frame
        if frame is not None:
            return frame.label()
        user = self.stack.user
        innermost = f" (innermost: {user[0].frame.label()})" if user else " (no user stack)"
        return NO_APP_FRAME + innermost

    def to_json(self) -> dict[str, Any]:
        app = self.stack.app_frame
        return {
            "op": self.path.op.name,
            "ret": self.path.ret,
            "ts_ns": self.path.ts_ns,
            "eof": self.eof,
            "app_frame": app.text if app is not None else None,
            "app_label": app.label() if app is not None else None,
            "stack": list(self.stack.texts),
        }


def role_paths(group: SuspectGroup, rules: Rules | None = None) -> tuple[RolePath, ...]:
    """The group's code paths that were seen, classified, in ``ROLES`` order."""
    out = []
    for role in ROLES:
        path: CodePath | None = getattr(group, role)
        if path is not None:
            out.append(RolePath(role, path, classify(path.kstack, path.ustack, rules)))
    return tuple(out)


@dataclass(frozen=True)
class LeakAttribution:
    """What one group of leak suspects is attributed to, and the code paths it rests on."""

    attribution: Attribution
    paths: tuple[RolePath, ...]
    scope: str
    """Which sockets of the owner leak: ``accepted on port 8080``, ``connected to 10.0.0.5:5432``."""

    @property
    def frame(self) -> Frame | None:
        return self.attribution.frame

    @property
    def hints(self) -> tuple[Hint, ...]:
        return self.attribution.hints

    @property
    def source(self) -> RolePath | None:
        """The code path whose stack gave the application frame (the first that has one)."""
        return next((p for p in self.paths if p.stack.app_frame is not None), None)

    def path(self, role: str) -> RolePath | None:
        return next((p for p in self.paths if p.role == role), None)

    @property
    def eof(self) -> bool:
        post = self.path("post_fin_touch")
        return post is not None and post.eof

    def headline(self) -> str:
        """What leads the group: the application frame, else the first hint in a few words."""
        return self.attribution.headline(short=True) or NO_APP_FRAME

    def to_json(self) -> dict[str, Any]:
        """The group's attribution for ``--json`` and the agent's log: the application frame
        and the hints first, then both touches with their stacks."""
        frame = self.frame
        source = self.source
        paths = {role: None for role in ROLES[:2]} | {p.role: p.to_json() for p in self.paths}
        return {
            "app": frame.label() if frame is not None else None,
            "hints": [h.to_json() for h in self.hints],
            "runtime": self.attribution.runtime.value,
            "app_frame": frame.text if frame is not None else None,
            "app_op": self.attribution.op,
            "app_from": source.role if source is not None else None,
            "scope": self.scope,
            "pre_fin_touch": paths["pre_fin_touch"],
            "post_fin_touch": paths["post_fin_touch"],
        }


def leak_scope(group: SuspectGroup) -> str:
    """Which of the owner's sockets leak, from where they came: the listener's port for
    accepted ones, the remote for connected ones.

    >>> local_ports_text([8080, 8080]), local_ports_text([4, 3, 2, 1])
    ('port 8080', 'ports 1, 2, 3, …')
    """
    origin = group.origin
    if origin is not None and origin.op == Op.CONNECT:
        remotes = sorted({f"{s.daddr}:{s.dport}" for s in group.sockets})
        return "connected to " + _some(remotes)
    if origin is not None and origin.op == Op.ACCEPT:
        return "accepted from its listener on " + local_ports_text(s.sport for s in group.sockets)
    return f"local {local_ports_text(s.sport for s in group.sockets)}, remote {group.remotes.text()}"


def local_ports_text(ports: Iterable[int]) -> str:
    unique = sorted(set(ports))
    return ("port " if len(unique) == 1 else "ports ") + _some([str(p) for p in unique])


def _some(items: list[str], most: int = 3) -> str:
    shown = ", ".join(items[:most])
    return shown + (", …" if len(items) > most else "")


class Attributor:
    """Attributes groups of leak suspects with the user's rules and what the host said about
    their owners (``facts``, by pid, read while they lived)."""

    def __init__(self, rules: Rules | None = None, facts: Mapping[int, ProcessFacts] | None = None) -> None:
        self.rules = rules if rules is not None and len(rules) else None
        self.facts: dict[int, ProcessFacts] = dict(facts or {})
        self._with_deps: dict[tuple[str, tuple[str, ...]], Rules] = {}

    def __call__(self, group: SuspectGroup) -> LeakAttribution:
        facts = self.facts.get(group.pid, ProcessFacts()) if group.pid is not None else ProcessFacts()
        paths = role_paths(group, self.rules_for(facts))
        samples = [StackSample(p.path.op.name, p.stack, eof=p.eof) for p in paths]
        result = attribute(group.comm, facts.exe, samples, perf_map=facts.perf_map)
        return LeakAttribution(result, paths, leak_scope(group))

    def rules_for(self, facts: ProcessFacts) -> Rules | None:
        """The user's rules, then (for a Go executable) its dependencies as library code: one
        Rules per executable, kept, so that caches keyed by rules keep working.

        >>> a = Attributor()
        >>> a.rules_for(ProcessFacts("/srv/svc")) is None
        True
        >>> r = a.rules_for(ProcessFacts("/srv/svc", go_deps=("github.com/lib/pq",)))
        >>> r is a.rules_for(ProcessFacts("/srv/svc", go_deps=("github.com/lib/pq",))), len(r)
        (True, 1)
        """
        if not facts.go_deps or facts.exe is None:
            return self.rules
        key = (facts.exe, facts.go_deps)
        rules = self._with_deps.get(key)
        if rules is None:
            if len(self._with_deps) >= MAX_GO_EXECUTABLES:
                self._with_deps.clear()
            deps = library_prefixes(facts.exe.rsplit("/", 1)[-1], facts.go_deps)
            rules = self._with_deps[key] = self.rules + deps if self.rules is not None else deps
        return rules


def group_json(group: SuspectGroup, attributed: LeakAttribution) -> dict[str, Any]:
    """A group for ``--json`` and the agent's log: owner, the application frame and hints,
    then the group's own fields, with the tracer's frames left out of its stacks."""
    base = group.to_json()
    for key in ("origin_stack", "last_touch_stack"):
        base[key] = list(without_tracer_frames(base[key]))
    lead = attributed.to_json()
    return {"pid": base["pid"], "comm": base["comm"], "count": base["count"], **lead, **base}
