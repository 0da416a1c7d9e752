"""`tcptrace record`: the decoded event stream to a file, for replay with --from.

Every part whose events the analyses replay is traced, with stacks where a process acts,
and the header carries the host's TCP settings.
"""

from __future__ import annotations

import sys

from tcptrace.commands.options import FilterOptions
from tcptrace.commands.states import stream_events
from tcptrace.system.safefile import create_output
from tcptrace.system.sysctl import read_settings

PARTS = ("lifecycle", "owner", "timewait")


def run(
    *,
    filters: FilterOptions,
    output: str,
    duration: float | None,
    stacks: bool,
    force: bool,
    ringbuf_pages: int | None,
) -> None:
    flt = filters.event_filter(live=True)
    with create_output(output, force) as out:
        stream_events(
            "record",
            flt,
            None,
            duration,
            1.0,
            True,  # stacks where they attribute; all of them with --stacks
            out,
            True,
            ringbuf_pages,
            parts=PARTS,
            defines=None if stacks else {"TT_PROC_STACKS_ONLY": 1},
            header={"settings": read_settings().to_json()},
        )
    print(f"recorded to {output}", file=sys.stderr)
