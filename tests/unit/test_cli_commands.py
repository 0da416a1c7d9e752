"""cli.py only declares options: each command runs commands/NAME.py's ``run``, which takes
exactly the options the command declares (the filters as one value)."""

from __future__ import annotations

import importlib
import inspect

import pytest

from tcptrace.cli import cli

FILTERS = {
    "pids",
    "comm",
    "ports",
    "local_ports",
    "remote_ports",
    "ipv4",
    "ipv6",
    "netns",
    "cgroups",
    "containers",
}
FRAME_RULES = {"library", "app", "rules_file"}
BUFFER = {"buffer", "ringbuf_pages"}  # handed over as buffer_pages
COMMANDS = (
    "states",
    "record",
    "closewait",
    "closelat",
    "timewait",
    "top",
    "diagnose",
    "demo",
    "agent",
    "doctor",
)


def test_every_command_has_its_module() -> None:
    assert sorted(cli.commands) == sorted(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_the_runner_takes_exactly_the_declared_options(name: str) -> None:
    declared = {p.name for p in cli.commands[name].params if p.name is not None}
    if FILTERS <= declared:
        declared = (declared - FILTERS) | {"filters"}
    if FRAME_RULES <= declared:
        declared = (declared - FRAME_RULES) | {"frame_rules"}
    if BUFFER <= declared:
        declared = (declared - BUFFER) | {"buffer_pages"}
    module = importlib.import_module(f"tcptrace.commands.{name}")
    runner = inspect.signature(module.run)
    assert set(runner.parameters) == declared
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in runner.parameters.values())
