"""Every Python copy of a number in bpf/tcptrace.h matches its #define.

The kernel sends raw numbers (kinds, ops, states, flags) and fills counter arrays by index;
the Python side names them. The two are written apart, so this test reads the header and
checks each enum and each counter-name tuple against it, and that every #define is either
checked here or known to have no Python copy.
"""

from __future__ import annotations

import enum
import re
from importlib import resources

import pytest

from tcptrace.kernel import closelat as kernel_closelat
from tcptrace.kernel import cwreader, loader, seeds
from tcptrace.kernel import timewait as kernel_timewait
from tcptrace.model import events, filters, histogram, lifecycle


def read_defines() -> dict[str, int]:
    text = (resources.files("tcptrace") / "bpf" / "tcptrace.h").read_text()
    pattern = r"^#define\s+(TT_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b"
    return {m[1]: int(m[2], 0) for m in re.finditer(pattern, text, re.M)}


DEFINES = read_defines()

# (prefix, Python enum, sub-prefixes that belong to other groups)
ENUMS: list[tuple[str, type[enum.Enum], tuple[str, ...]]] = [
    ("TT_KIND_", events.Kind, ()),
    ("TT_OP_", events.Op, ()),
    ("TT_CLOSE_", events.CloseFlag, ()),
    ("TT_TCP_", events.TcpState, ()),
    ("TT_TW_", events.TwWhat, ("TT_TW_HOW_", "TT_TW_STAT_")),
]
# counter arrays: (prefix of their indexes, the names the user side gives them)
COUNTERS = [
    ("TT_STAT_", loader.STAT_NAMES),
    ("TT_TW_STAT_", kernel_timewait.STAT_NAMES),
    ("TT_CL_STAT_", kernel_closelat.STAT_NAMES),
    ("TT_CW_STAT_", cwreader.CW_STAT_NAMES),
]
SCALARS = {
    "TT_AF_INET": events.AF_INET,
    "TT_AF_INET6": events.AF_INET6,
    "TT_COMM_LEN": filters.COMM_LEN + 1,  # TASK_COMM_LEN: 15 characters and a NUL
    "TT_CL_SLOTS": histogram.SLOTS,
    "TT_HIST_SLOTS": histogram.SLOTS,
    "TT_MAX_SOCKS": lifecycle.DEFAULT_CAPACITY,
    "TT_MAX_PORT_FILTERS": filters.MAX_PORTS,  # --port, -L and -D are checked against it
    "TT_MAX_PID_FILTERS": filters.MAX_PIDS,
    "TT_MAX_NETNS_FILTERS": filters.MAX_NETNS,
    "TT_MAX_CGROUP_FILTERS": filters.MAX_CGROUPS,
    "TT_PORT_EITHER": loader.PORT_EITHER,
    "TT_PORT_LOCAL": loader.PORT_LOCAL,
    "TT_PORT_REMOTE": loader.PORT_REMOTE,
    "TT_OWNER_IN_CGROUP": seeds.OWNER_IN_CGROUP,  # seeded owners carry the filter's answer
    "TT_TWF_BOUND": events.TW_FLAG_BOUND,
}
# #defines with no Python copy: values only the kernel side uses.
KERNEL_ONLY = {
    "TT_IPPROTO_TCP",
    "TT_MAX_CGROUP_DEPTH",
    "TT_MAX_LISTENERS",
    "TT_MAX_SEEDS",
    "TT_MAX_CW_OPEN",
    "TT_MAX_CW_OWNERS",
    "TT_RINGBUF_PAGES",
    "TT_STACK_ENTRIES",
}


def group(prefix: str, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """The #defines named PREFIX<NAME>, by NAME."""
    return {
        name[len(prefix) :]: value
        for name, value in DEFINES.items()
        if name.startswith(prefix) and not name.startswith(exclude)
    }


@pytest.mark.parametrize(("prefix", "python", "exclude"), ENUMS, ids=[e[0] for e in ENUMS])
def test_enums_match_the_header(prefix: str, python: type[enum.Enum], exclude: tuple[str, ...]) -> None:
    assert group(prefix, exclude) == {m.name: m.value for m in python}


def test_timewait_ends_are_named_as_the_header_numbers_them() -> None:
    header = {name.lower(): value for name, value in group("TT_TW_HOW_").items()}
    assert header == {name: value for value, name in events.TW_HOW.items()}


def test_scalars_match_the_header() -> None:
    assert {name: DEFINES.get(name) for name in SCALARS} == SCALARS


def counter_name(define: str) -> str:
    """The user side's name of a counter: TT_TW_STAT_MAP_FAIL's is "map_failed".

    >>> counter_name("LOST"), counter_name("MAP_FAIL")
    ('lost', 'map_failed')
    """
    name = define.lower()
    return name[: -len("_fail")] + "_failed" if name.endswith("_fail") else name


@pytest.mark.parametrize(("prefix", "names"), COUNTERS, ids=[c[0] for c in COUNTERS])
def test_counter_names_match_the_indexes(prefix: str, names: tuple[str, ...]) -> None:
    header = group(prefix)
    size = header.pop("MAX")
    assert sorted(header.values()) == list(range(len(header))), "indexes are 0..n-1, each once"
    by_index = {value: counter_name(name) for name, value in header.items()}
    assert tuple(by_index[i] for i in range(len(header))) == names
    assert len(names) <= size


def test_every_define_is_checked_or_kernel_only() -> None:
    checked = set(SCALARS) | {"TT_TW_HOW_" + n for n in group("TT_TW_HOW_")}
    for prefix, _, exclude in ENUMS:
        checked |= {prefix + n for n in group(prefix, exclude)}
    for prefix, _ in COUNTERS:
        checked |= {prefix + n for n in group(prefix)}
    assert set(DEFINES) - checked - KERNEL_ONLY == set(), "a new #define: check its Python copy here"
    assert KERNEL_ONLY <= set(DEFINES)
