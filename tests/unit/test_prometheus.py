"""Prometheus exposition: exact log2 -> `le` buckets, age buckets, families parsed back with
prometheus_client's own parser, --listen parsing."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import tcptrace.export.prometheus
from tcptrace.errors import UsageError
from tcptrace.export.prometheus import (
    DURATION_SLOTS,
    AgentCollector,
    age_buckets,
    duration_buckets,
    families,
    make_registry,
    parse_listen,
    sample_value,
    text_of,
)
from tcptrace.model.agent import ExportState
from tcptrace.model.histogram import Log2Histogram

NS = 1_000_000_000


def test_docstring_examples() -> None:
    result = doctest.testmod(tcptrace.export.prometheus)
    assert result.attempted > 0 and result.failed == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 5000), st.integers(0, 100 * NS)), max_size=200))
def test_le_buckets_count_exactly_the_values_at_or_below_them(values: list[int]) -> None:
    hist = Log2Histogram.of(values)
    buckets = duration_buckets(hist)
    assert len(buckets) == len(DURATION_SLOTS) + 1
    for (le_text, count), slot in zip(buckets, DURATION_SLOTS, strict=False):
        le_ns = (1 << slot) - 1
        assert float(le_text) == pytest.approx(le_ns / NS, rel=1e-12)
        assert count == sum(1 for v in values if v <= le_ns), le_text
    assert buckets[-1] == ("+Inf", float(len(values)))
    counts = [c for _, c in buckets]
    assert counts == sorted(counts)


def test_age_buckets_are_cumulative_and_inclusive() -> None:
    buckets, total = age_buckets([int(0.1 * NS), int(0.2 * NS), 40 * NS], (0.1, 30.0, 60.0))
    assert buckets == [("0.1", 1.0), ("30.0", 2.0), ("60.0", 3.0), ("+Inf", 3.0)]
    assert total == pytest.approx(40.3)


def sample_state() -> ExportState:
    return ExportState(
        threshold_s=30.0,
        states={"ESTABLISHED": 4, "CLOSE_WAIT": 3, "TIME_WAIT": 100},
        close_wait_ages={(42, "leaky"): [int(45 * NS), int(31 * NS), int(2 * NS)], (0, "other"): [NS]},
        close_wait_entered=10,
        close_wait_closed=6,
        close_wait_reset=1,
        timewait_created=100,
        timewait_by_proc=[((7, "client"), 90), ((0, "other"), 10)],
        timewait_by_remote_port=[("8080", 95), ("other", 5)],
        resets_sent=2,
        resets_sent_by_proc=[((7, "client"), 2)],
        close_durations=[((7, 'cli"ent\n'), "close", Log2Histogram.of([1500, 3_000_000]))],
        events_decoded=1234,
        events_lost=5,
        map_failures={"socks": 0},
        label_keys={"timewait_created_by_process": 1},
    )


def parsed(state: ExportState) -> str:
    collector = AgentCollector()
    collector.publish(families(state))
    return text_of(make_registry(collector, process_metrics=False))


def test_families_parse_back_with_the_values_given() -> None:
    text = parsed(sample_state())
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["tcptrace_sockets"].type == "gauge"
    assert sample_value(text, "tcptrace_sockets", {"state": "TIME_WAIT"}) == 100
    leaky = {"pid": "42", "comm": "leaky"}
    assert sample_value(text, "tcptrace_close_wait_sockets", leaky) == 3
    assert sample_value(text, "tcptrace_close_wait_over_threshold_sockets", leaky) == 2
    assert sample_value(text, "tcptrace_close_wait_oldest_age_seconds", leaky) == 45
    assert sample_value(text, "tcptrace_close_wait_sockets", {"pid": "", "comm": "other"}) == 1
    assert sample_value(text, "tcptrace_close_wait_age_seconds_bucket", {**leaky, "le": "30.0"}) == 1
    assert sample_value(text, "tcptrace_close_wait_age_seconds_bucket", {**leaky, "le": "60.0"}) == 3
    assert fams["tcptrace_timewait_created"].type == "counter"
    assert sample_value(text, "tcptrace_timewait_created_total") == 100
    assert sample_value(text, "tcptrace_timewait_created_by_process_total", {"comm": "client"}) == 90
    assert sample_value(text, "tcptrace_timewait_created_by_remote_port_total", {"remote_port": "8080"}) == 95
    assert sample_value(text, "tcptrace_events_lost_total") == 5
    assert sample_value(text, "tcptrace_close_wait_closed_total") == 6
    # A hostile comm survives escaping (its newline shown as \x0a: label values are
    # escaped), and the histogram is a real histogram.
    fam = fams["tcptrace_close_duration_seconds"]
    assert fam.type == "histogram"
    hostile = {"comm": 'cli"ent\\x0a', "call": "close"}
    assert sample_value(text, "tcptrace_close_duration_seconds_count", hostile) == 2
    assert sample_value(text, "tcptrace_close_duration_seconds_bucket", {**hostile, "le": "1.023e-06"}) == 0
    assert sample_value(text, "tcptrace_close_duration_seconds_bucket", {**hostile, "le": "2.047e-06"}) == 1
    assert sample_value(text, "tcptrace_close_duration_seconds_bucket", {**hostile, "le": "+Inf"}) == 2
    assert sample_value(text, "tcptrace_close_duration_seconds_sum", hostile) == pytest.approx(0.0030015)


def test_a_scrape_gets_the_last_published_families() -> None:
    collector = AgentCollector()
    registry = make_registry(collector, process_metrics=False)
    assert sample_value(text_of(registry), "tcptrace_events_total") is None
    collector.publish(families(ExportState(threshold_s=5, events_decoded=1)))
    collector.publish(families(ExportState(threshold_s=5, events_decoded=2)))
    assert sample_value(text_of(registry), "tcptrace_events_total") == 2


def test_process_metrics_of_the_agent_itself() -> None:
    registry = make_registry(AgentCollector())
    text = text_of(registry)
    assert (sample_value(text, "process_resident_memory_bytes") or 0) > 0
    assert sample_value(text, "process_cpu_seconds_total") is not None


@pytest.mark.parametrize(
    "text, expected",
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:1", ("::1", 1)), ("localhost:0", ("localhost", 0))],
)
def test_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["9464", ":9464", "127.0.0.1:", "127.0.0.1:x", "1.2.3.4:70000", "host.example:80"]
)
def test_bad_listen_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        parse_listen(text)


def test_kernel_skipped_runs_are_exported_per_program() -> None:
    text = parsed(ExportState(threshold_s=1, recursion_misses={"timer_start": 3, "tt_lc_process": 0}))
    assert sample_value(text, "tcptrace_bpf_recursion_misses_total", {"program": "timer_start"}) == 3
    assert sample_value(text, "tcptrace_bpf_recursion_misses_total", {"program": "tt_lc_process"}) == 0


HOSTILE_COMMS = ["a\rb", "c\nd", 'q"uo\\te', "\x1b[2Jx", "e\x85f", "g\u2028h", "i\u202ej", "[/x]{}"]


def test_hostile_comms_keep_the_exposition_one_sample_a_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A carriage return (or any line break) in a process name must not split a sample's
    line, whoever reads the scrape: read back in text mode (universal newlines, as Python
    and many line-based tools read it) and parsed by prometheus_client's own parser."""
    from tcptrace.printable import printable

    procs = {(100 + i, comm): [NS] for i, comm in enumerate(HOSTILE_COMMS)}
    collector = AgentCollector()
    collector.publish(families(ExportState(threshold_s=1.0, close_wait_ages=procs)))
    text = text_of(make_registry(collector, process_metrics=False))
    path = tmp_path / "scrape.txt"
    path.write_bytes(text.encode())
    read_back = path.read_text()  # universal newlines
    assert read_back.splitlines() == text.split("\n")[:-1]  # no line split anywhere
    comms = {
        s.labels["pid"]: s.labels["comm"]
        for fam in text_string_to_metric_families(read_back)
        for s in fam.samples
        if s.name == "tcptrace_close_wait_sockets"
    }
    assert comms == {str(pid): printable(comm) for pid, comm in procs}


def test_refresh_health_and_build_info() -> None:
    from tcptrace import __version__

    collector = AgentCollector()
    text = text_of(make_registry(collector, process_metrics=False))
    assert sample_value(text, "tcptrace_agent_tick_errors_total") == 0
    assert sample_value(text, "tcptrace_last_successful_refresh_timestamp_seconds") is None  # none yet
    assert sample_value(text, "tcptrace_build_info", {"version": __version__}) == 1
    collector.publish(families(ExportState(threshold_s=1)), at_s=100.0)
    collector.refresh_failed()
    collector.refresh_failed()
    text = text_of(make_registry(collector, process_metrics=False))
    assert sample_value(text, "tcptrace_agent_tick_errors_total") == 2
    assert sample_value(text, "tcptrace_last_successful_refresh_timestamp_seconds") == 100.0
