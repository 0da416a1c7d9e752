"""Sockets by state as the agent reads them from /proc/net/tcp{,6} (the state column only)."""

from __future__ import annotations

from pathlib import Path

from tcptrace.commands.agent import read_states

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 0100007F:1F90 0100007F:C351 08 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
   3: 0100007F:C352 0100007F:1F90 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000
   1: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:D000 08 00000000:00000000
"""


def test_states_are_counted_from_both_files(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(TCP)
    (tmp_path / "tcp6").write_text(TCP6)
    states = read_states((str(tmp_path / "tcp"), str(tmp_path / "tcp6")))
    assert states is not None
    assert states["LISTEN"] == 2 and states["CLOSE_WAIT"] == 2
    assert states["ESTABLISHED"] == 1 and states["TIME_WAIT"] == 1
    assert states["SYN_SENT"] == 0  # every state present: a stable set of series
    assert sum(states.values()) == 6


def test_a_missing_ipv6_table_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(TCP)
    states = read_states((str(tmp_path / "tcp"), str(tmp_path / "absent6")))
    assert states is not None and sum(states.values()) == 4


def test_the_live_tables_are_read() -> None:
    states = read_states()
    assert states is not None and all(v >= 0 for v in states.values())


def test_docstring_examples() -> None:
    import doctest

    import tcptrace.commands.agent

    result = doctest.testmod(tcptrace.commands.agent)
    assert result.attempted > 0 and result.failed == 0
