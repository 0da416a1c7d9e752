"""`tcptrace record`: the decoded event stream to a file, for replay with --from.

Every part whose events the analyses replay is traced, with stacks where a process acts,
and the header carries the host's TCP settings.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from tcptrace.commands.options import FilterOptions
from tcptrace.commands.states import stream_events
from tcptrace.system.safefile import create_output
from tcptrace.system.sysctl import read_settings
from tcptrace.views.common import make_console, start_live
from tcptrace.views.states import record_done, record_progress

PARTS = ("lifecycle", "owner", "timewait")


def run(
    *,
    filters: FilterOptions,
    output: str,
    duration: float | None,
    stacks: bool,
    force: bool,
    buffer_pages: int | None,
) -> None:
    flt = filters.event_filter(live=True)
    console = make_console(stderr=True)
    with create_output(output, force) as out:
        live = start_live(console, record_progress(0, 0, 0), transient=True) if console.is_terminal else None

        def on_progress(events: int, lost: int) -> None:
            if live is not None:
                live.update(record_progress(events, lost, _size(out)), refresh=True)

        try:
            done = stream_events(
                "record",
                flt,
                None,
                duration,
                1.0,
                True,  # stacks where they attribute; all of them with --stacks
                out,
                True,
                buffer_pages,
                parts=PARTS,
                defines=None if stacks else {"TT_PROC_STACKS_ONLY": 1},
                header={"settings": read_settings().to_json()},
                stack_refs=True,
                on_progress=on_progress,
            )
        finally:
            if live is not None:
                live.stop()
        out.flush()
        size = _size(out)
    print(record_done(output, done.events, done.lost, size, done.skipped, done.unseen), file=sys.stderr)


def _size(out: IO[str]) -> int:
    try:
        return os.fstat(out.fileno()).st_size
    except (OSError, ValueError):
        return 0
