"""The port filter's limit: 64 ports (the kernel's table, TT_MAX_PORT_FILTERS), checked
before anything is loaded; 65 was a traceback from bcc filling the map."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tcptrace.cli import cli
from tcptrace.model.filters import MAX_PORTS, EventFilter


def test_event_filter_holds_at_most_the_kernel_table() -> None:
    assert len(EventFilter(ports=frozenset(range(1, MAX_PORTS + 1))).ports) == MAX_PORTS
    with pytest.raises(ValueError, match=f"at most {MAX_PORTS} ports"):
        EventFilter(ports=frozenset(range(1, MAX_PORTS + 2)))


@pytest.mark.parametrize("command", ["states", "closewait", "timewait", "top", "diagnose", "record", "agent"])
def test_65_ports_is_a_usage_error(command: str) -> None:
    args = [command, *[f"--port={p}" for p in range(1, MAX_PORTS + 2)]]
    args += ["-o", "/nonexistent/x"] if command == "record" else []
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert (
        result.stderr
        == f"tcptrace: error: --port: at most {MAX_PORTS} ports (the kernel's filter table), not 65\n"
    )
