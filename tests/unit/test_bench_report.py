"""scripts/bench's pure half: parsers, ratios, verdicts and the markdown it writes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from bench.report import (
    BEGIN_MARK,
    END_MARK,
    Run,
    Scenario,
    Startup,
    baseline,
    cpu_ratio,
    decode_table,
    evaluate_targets,
    expected_transitions,
    last_summary,
    parse_help_commands,
    parse_possibly_lost,
    parse_proc_stat_state,
    parse_proc_stat_ticks,
    parse_prometheus_lost,
    parse_vm_hwm_kb,
    render_markdown,
    scenario_table,
    skipped_cell,
    splice,
    startup_table,
    throughput_ratio,
)

SC = Scenario("client-first", 0, 6.0)


def run(tracer: str, conn_per_s: float, connections: int = 60_000, **kw: Any) -> Run:
    return Run(
        scenario=SC.key,
        tracer=tracer,
        connections=connections,
        conn_per_s=conn_per_s,
        expected_transitions=expected_transitions(connections),
        **kw,
    )


def test_expected_transitions_counts_both_sides_and_the_listener() -> None:
    assert expected_transitions(0) == 2
    assert expected_transitions(2500) == 25_002


def test_proc_stat_sums_user_system_and_waited_children_after_the_comm() -> None:
    # comm with spaces and a ')' must not shift the fields
    text = "1234 (tcp (x) y) S 1 1234 1234 0 -1 4194560 5 0 0 0 250 70 3 2 20 0 3 0 100 0 0\n"
    assert parse_proc_stat_ticks(text) == 250 + 70 + 3 + 2
    assert parse_proc_stat_state(text) == "S"


def test_vm_hwm() -> None:
    status = "Name:\tpython3\nVmPeak:\t  300000 kB\nVmHWM:\t   181234 kB\nVmRSS:\t 170000 kB\n"
    assert parse_vm_hwm_kb(status) == 181_234
    assert parse_vm_hwm_kb("Name:\tkthread\n") is None


def test_possibly_lost_lines_are_summed_and_other_stderr_ignored() -> None:
    stderr = "Possibly lost 12 samples\nsome warning\nPossibly lost 3000 samples\n"
    assert parse_possibly_lost(stderr) == 3012
    assert parse_possibly_lost("") == 0


def test_help_commands_reads_only_the_command_list() -> None:
    text = (
        "Usage: tcptrace [OPTIONS] COMMAND [ARGS]...\n\n  Trace TCP.\n\n  Start with:\n"
        "    sudo tcptrace doctor   check\n\n"
        "Options:\n  --version  Show the version and exit.\n  -h, --help  Show this message and exit.\n\n"
        "Commands:\n  closewait  Time every socket in CLOSE_WAIT and find the code paths that...\n"
        "  doctor     Check that this machine can trace, and say how to fix what...\n"
        "  states     Stream every TCP state transition, live.\n"
    )
    assert parse_help_commands(text) == ["closewait", "doctor", "states"]


def test_prometheus_lost_sums_lost_metrics_only() -> None:
    text = (
        "# HELP tcptrace_events_lost_total Events lost\n"
        "# TYPE tcptrace_events_lost_total counter\n"
        'tcptrace_events_lost_total{cpu="all"} 17.0\n'
        "tcptrace_events_lost_created 1.7e9\n"
        "tcptrace_transitions_total 1000\n"
    )
    assert parse_prometheus_lost(text) == 17
    assert parse_prometheus_lost("tcptrace_transitions_total 3\n") is None


def test_last_summary_skips_a_torn_tail_and_events() -> None:
    tail = (
        b'{"type":"transition","old":"CLOSE"}\n'
        b'{"type":"summary","lost":5,"kernel_transitions":10}\n'
        b'{"type":"trans'  # torn: never a summary
    )
    assert last_summary(tail) == {"type": "summary", "lost": 5, "kernel_transitions": 10}
    assert last_summary(b'{"type":"header"}\n') is None


def test_ratios_against_the_mean_untraced_run_and_tcpstates() -> None:
    runs = [
        run("untraced", 14_000),
        run("states", 13_000, cpu_s=1.2),
        run("tcpstates", 12_000, cpu_s=2.4),
        run("untraced", 12_000),
    ]
    assert baseline(runs, SC.key) == 13_000
    assert throughput_ratio(runs, runs[1]) == pytest.approx(1.0)
    assert cpu_ratio(runs, runs[1]) == pytest.approx(0.5)
    assert runs[1].cpu_per_million == pytest.approx(1.2 / 0.600002)


def test_a_failed_untraced_run_is_left_out_of_the_baseline() -> None:
    runs = [run("untraced", 14_000), run("untraced", 1, error="loadgen exited 1"), run("states", 7_000)]
    assert baseline(runs, SC.key) == 14_000
    assert throughput_ratio(runs, runs[2]) == pytest.approx(0.5)


def test_targets_met() -> None:
    n = 60_000
    runs = [
        run("untraced", 14_000),
        run(
            "states",
            13_900,
            cpu_s=1.0,
            events_received=expected_transitions(n) - 10,
            lost_reported=10,
            kernel_transitions=expected_transitions(n),
        ),
        run("closewait", 13_800, cpu_s=0.5, lost_reported=0, summary={"entered": 60_000}),
        run("tcpstates", 13_000, cpu_s=3.0, lost_reported=100, events_received=5),
        run("untraced", 14_000),
    ]
    verdicts = {v.target: v for v in evaluate_targets(runs, ["states", "closewait"])}
    assert verdicts["closewait lose nothing"].met is True
    assert verdicts["timewait, closelat, diagnose, agent lose nothing"].met is None  # not selected
    assert verdicts["states reports every loss"].met is True
    assert verdicts["throughput with tcptrace attached >= 95% of untraced"].met is True
    assert verdicts["tracer CPU per million transitions below tcpstates'"].met is True


def test_targets_missed_say_where() -> None:
    n = 60_000
    runs = [
        run("untraced", 10_000),
        run(
            "states",
            9_000,
            cpu_s=4.0,
            events_received=1_000,
            lost_reported=2_000,
            kernel_transitions=expected_transitions(n) + 5,  # 5 the user side never saw
            recursion_misses=5,
        ),
        run("closewait", 9_600, cpu_s=1.0, lost_reported=42, summary={"entered": 59_000}),
        run("tcpstates", 9_900, cpu_s=2.0),
    ]
    by = {v.target: v for v in evaluate_targets(runs, ["states", "closewait"])}
    assert by["closewait lose nothing"].met is False
    assert "closewait lost 42" in by["closewait lose nothing"].detail
    assert "entered 59,000 < 60,000 (load)" in by["closewait lose nothing"].detail
    states = by["states reports every loss"]
    assert states.met is False and "received 1,000 + lost 2,000 < kernel" in states.detail
    throughput = by["throughput with tcptrace attached >= 95% of untraced"]
    assert (
        throughput.met is False and "states 90%" in throughput.detail and "closewait" not in throughput.detail
    )
    cpu = by["tracer CPU per million transitions below tcpstates'"]
    assert cpu.met is False and "states 2.00x" in cpu.detail and "closewait" not in cpu.detail


def test_states_loss_outside_its_counters_is_a_miss() -> None:
    n = 1_000
    total = expected_transitions(n)
    runs = [
        run(
            "states",
            1_000,
            connections=n,
            events_received=total - 7,
            lost_reported=0,
            kernel_transitions=total - 7,
            recursion_misses=7,
        )
    ]
    (verdict,) = [v for v in evaluate_targets(runs, ["states"]) if v.target == "states reports every loss"]
    assert verdict.met is False
    assert "7 of the load's transitions neither received nor counted lost" in verdict.detail
    assert "7 program runs skipped by the kernel" in verdict.detail


def test_record_is_held_to_the_same_accounting_as_states() -> None:
    n = 1_000
    total = expected_transitions(n)
    short = run("record", 1_000, connections=n, events_received=total - 14, lost_reported=0)
    short.kernel_transitions = total - 14
    short.unseen_ends = 7
    whole = run("record", 1_000, connections=n, events_received=total, lost_reported=0)
    whole.kernel_transitions = total
    by = {v.target: v for v in evaluate_targets([short], ["record"])}
    assert by["record reports every loss"].met is False
    assert (
        "14 of the load's transitions neither received nor counted lost"
        in by["record reports every loss"].detail
    )
    assert "(7 sockets reported with their last transitions unseen)" in by["record reports every loss"].detail
    assert "states reports every loss" not in by
    (ok,) = [v for v in evaluate_targets([whole], ["record"]) if v.target == "record reports every loss"]
    assert ok.met is True


def test_scenario_table_rows() -> None:
    runs = [
        run("untraced", 14_000),
        run("states", 7_000, cpu_s=3.0, events_received=100, lost_reported=599_902, peak_rss_kb=204_800),
        run("tcpstates", 13_000, cpu_s=1.5, events_received=200_002, lost_reported=400_000),
        run("closelat", 0, error="exited 1: boom"),
    ]
    table = scenario_table(runs, SC.key).splitlines()
    assert table[0].startswith("| tracer | conn/s | vs untraced |")
    untraced = [c.strip() for c in table[2].split("|")[1:-1]]
    assert untraced == ["untraced", "14,000", "(baseline)", "600,002"] + [""] * 10
    states = table[3].split(" | ")
    assert states[:7] == ["| states", "7,000", "50.0%", "600,002", "100", "599,902", "599,902"]
    assert "2.00x" in states and "200" in states  # CPU vs tcpstates; RSS in MB
    assert table[5].startswith("| closelat | failed: exited 1: boom |")
    assert all(line.count("|") == table[0].count("|") for line in table)


def test_startup_table_takes_medians_and_marks_non_streams() -> None:
    runs = [
        run("states", 1, ready_s=1.0, startup_cpu_s=0.9),
        run("states", 1, ready_s=3.0, startup_cpu_s=1.1),
        run("closewait", 1, ready_s=2.0, startup_cpu_s=1.5),
    ]
    table = startup_table(runs, [Startup("states", [1.5, 1.2, 9.0])])
    assert "| states | 2.00 | 1.00 | 1.50 (median of 3) |" in table
    assert "| closewait | 2.00 | 1.50 | (no event stream) |" in table


def test_render_and_json_round_trip() -> None:
    runs = [run("untraced", 14_000), run("states", 13_000, cpu_s=1.0)]
    md = render_markdown({"date": "d", "quick": True, "wall_s": 61.0}, [SC], runs, [], ["states"])
    assert "max churn, client closes first (6 s)" in md
    assert "`scripts/bench --quick` took 61 s" in md
    again = Run.from_json(json.loads(json.dumps(runs[1].to_json())))
    assert again == runs[1]


def test_splice_keeps_the_commentary_around_the_marks() -> None:
    doc = f"# Benchmarks\n\nintro\n\n{BEGIN_MARK}\nold table\n{END_MARK}\n\n## Commentary\nwhy\n"
    out = splice(doc, "new table\n")
    assert out == f"# Benchmarks\n\nintro\n\n{BEGIN_MARK}\nnew table\n{END_MARK}\n\n## Commentary\nwhy\n"
    assert splice(out, "newer") == out.replace("new table", "newer")
    fresh = splice("# Benchmarks\n", "t")
    assert fresh == f"# Benchmarks\n\n{BEGIN_MARK}\nt\n{END_MARK}\n"


def test_counter_read_skew_is_not_a_loss_but_a_shortfall_is() -> None:
    n = 1_000
    total = expected_transitions(n)
    skew = run("states", 1, connections=n, events_received=total, lost_reported=1, kernel_transitions=total)
    (ok,) = [v for v in evaluate_targets([skew], ["states"]) if v.target == "states reports every loss"]
    assert ok.met is True


def test_exact_commands_are_checked_against_the_load_counts() -> None:
    runs = [
        run("timewait", 1, connections=100, lost_reported=0, summary={"created_total": 100}),
        run("closelat", 1, connections=100, lost_reported=0, summary={"calls": 199}, recursion_misses=3),
    ]
    (v,) = [
        v
        for v in evaluate_targets(runs, ["timewait", "closelat"])
        if v.target == "timewait, closelat lose nothing"
    ]
    assert v.met is False
    assert "closelat @ max/client-first: calls 199 < 200 (load)" in v.detail
    assert "timewait" not in v.detail.split(";")[0]
    assert "recursion_misses): closelat @ max/client-first: 3" in v.detail


def test_decode_table() -> None:
    table = decode_table({"from_raw": 8.0, "to_json": 4.0})
    assert table.splitlines()[2:] == ["| from_raw | 8.00 | 125,000 |", "| to_json | 4.00 | 250,000 |"]


def test_the_flush_after_the_load_is_owed_by_streams_but_not_in_cpu_per_transition() -> None:
    r = run("tcpstates", 1, connections=1_000, flush_connections=20, cpu_s=1.0, events_received=10_000)
    assert r.should_deliver == 10_002 + 202
    assert r.missing == 204
    assert r.cpu_per_million == pytest.approx(1.0 / 0.010002)


def test_kernel_skipped_transitions_are_unreported_losses_even_when_totals_hide_them() -> None:
    total = expected_transitions(1_000)
    r = run(
        "states",
        1,
        connections=1_000,
        events_received=total + 50,  # other traffic on the host
        lost_reported=0,
        kernel_transitions=total + 50,
        recursion_misses=3,
    )
    # Skips tcptrace leaves out (its process-only program's) are noted, not a loss.
    (v,) = [v for v in evaluate_targets([r], ["states"]) if v.target == "states reports every loss"]
    assert v.met is True
    assert "3 program runs skipped by the kernel (recursion_misses), 0 of them able to lose" in v.detail
    reported = Run.from_json({**r.to_json(), "skipped_reported": 3})
    (ok,) = [v for v in evaluate_targets([reported], ["states"]) if v.target == "states reports every loss"]
    assert ok.met is True and "recursion_misses" not in ok.detail
    assert skipped_cell(reported) == "3 (reported)" and skipped_cell(r) == "3"
    partly = Run.from_json({**r.to_json(), "skipped_reported": 1})
    assert skipped_cell(partly) == "3 (1 could lose)"


def by_target(runs: list[Run], commands: list[str], startups: list[Startup] | None = None) -> dict[str, Any]:
    return {v.target: v for v in evaluate_targets(runs, commands, startups or [])}


def test_issue14_aggregates_cost_little_cpu_bpf_time_and_memory() -> None:
    n = 60_000
    ref = run("tcpstates", 1, connections=n, cpu_s=2.0, bpf_ns=expected_transitions(n) * 1_000)
    cheap = run(
        "closewait",
        1,
        connections=n,
        cpu_s=0.1,
        bpf_ns=expected_transitions(n) * 900,
        idle_rss_kb=100_000,
        load_peak_rss_kb=105_000,
    )
    costly = run(
        "agent",
        1,
        connections=n,
        cpu_s=0.5,
        bpf_ns=expected_transitions(n) * 1_500,
        idle_rss_kb=100_000,
        load_peak_rss_kb=150_000,
    )
    good = by_target([ref, cheap], ["closewait"])
    names = "closewait, timewait, closelat, diagnose, agent"
    assert good[f"{names}: tracer CPU per million transitions <= 0.1x tcpstates'"].met is True
    assert good["closewait, timewait, agent: BPF ns per transition <= tcpstates'"].met is True
    assert good[f"{names}: peak RSS under max churn within 10% of idle"].met is True
    bad = by_target([ref, cheap, costly], ["closewait", "agent"])
    cpu = bad[f"{names}: tracer CPU per million transitions <= 0.1x tcpstates'"]
    assert cpu.met is False and cpu.detail == "agent 0.25x @ max/client-first"
    bpf = bad["closewait, timewait, agent: BPF ns per transition <= tcpstates'"]
    assert bpf.met is False and bpf.detail == "agent 1,500 ns > 1,000 ns @ max/client-first"
    rss = bad[f"{names}: peak RSS under max churn within 10% of idle"]
    assert rss.met is False and rss.detail == "agent +50% @ max/client-first"
    # Without a tcpstates run nothing can be judged: not measured, never met.
    alone = by_target([cheap], ["closewait"])
    assert alone["closewait, timewait, agent: BPF ns per transition <= tcpstates'"].met is None


def test_issue15_streams_against_tcpstates() -> None:
    paced = Scenario("client-first", 5000, 6.0).key
    ref = run("tcpstates", 1, cpu_s=6.0, events_received=600_000, lost_reported=0)
    states = run("states", 1, cpu_s=1.2, events_received=600_000, lost_reported=0)
    record = run("record", 1, cpu_s=3.6, events_received=600_000, lost_reported=7)
    paced_ok = Run.from_json({**states.to_json(), "scenario": paced})
    paced_bad = Run.from_json({**record.to_json(), "scenario": paced})
    startups = [Startup("states", [0.4, 0.5, 0.6]), Startup("tcpstates", [1.3])]
    v = by_target([ref, states, record, paced_ok, paced_bad], ["states", "record"], startups)
    assert v["states, record: 0 lost at paced 5,000 conn/s"].met is False
    assert v["states, record: 0 lost at paced 5,000 conn/s"].detail == "record lost 7"
    fewer = v["states, record: fewer lost than tcpstates at max churn (its lost + never delivered)"]
    # tcpstates delivered 600,000 of 600,002 (the flush aside): 2 missing; record's 7 are more.
    assert fewer.met is False and "record lost 7 > tcpstates 2 @ max/client-first" in fewer.detail
    cpu = v["states, record: CPU per delivered event <= 0.5x tcpstates'"]
    assert cpu.met is False and cpu.detail == "record 0.60x @ max/client-first"
    assert v["first event <= 1 s after start"].met is True  # tcpstates' 1.3 s is not judged
    late = by_target([states], ["states"], [Startup("states", [1.5])])
    assert late["first event <= 1 s after start"].detail == "states 1.50 s"


def test_idle_and_load_rss_round_trip() -> None:
    r = run("timewait", 1, idle_rss_kb=1, load_peak_rss_kb=2)
    assert Run.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_a_recording_is_charged_per_event_of_every_kind() -> None:
    ref = run("tcpstates", 1, cpu_s=6.0, events_received=600_000, lost_reported=0)
    record = run("record", 1, cpu_s=3.6, events_received=600_000, events_delivered=900_000, lost_reported=0)
    v = by_target([ref, record], ["record"])
    assert v["states, record: CPU per delivered event <= 0.5x tcpstates'"].met is True  # 0.40x


def test_sockets_whose_end_went_unseen_are_named_with_the_shortfall() -> None:
    total = expected_transitions(1_000)
    r = run(
        "states",
        1,
        connections=1_000,
        events_received=total - 4,
        lost_reported=0,
        kernel_transitions=total - 4,
        unseen_ends=2,
    )
    (v,) = [v for v in evaluate_targets([r], ["states"]) if v.target == "states reports every loss"]
    assert v.met is False
    assert "4 of the load's transitions neither received nor counted lost" in v.detail
    assert "(2 sockets reported with their last transitions unseen)" in v.detail


def test_patterns_are_counted_across_chunk_boundaries_and_never_twice() -> None:
    from bench.runner import EVENT_KINDS, PatternCounts

    text = b'{"type":"transition"}\n{"type":"close"}\n{"type":"transition"}\n{"type":"touch"}\n' * 3
    for size in (1, 5, 15, 16, 19, 64, len(text)):
        counted = PatternCounts(EVENT_KINDS)
        for i in range(0, len(text), size):
            counted.feed(text[i : i + size])
        assert counted.counts == {
            b'{"type":"transition"': 6,
            b'{"type":"touch"': 3,
            b'{"type":"timewait"': 0,
            b'{"type":"close"': 3,
        }, size


def snapshot_of(sockets: int, every_ms: float) -> dict[str, Any]:
    case = {"median_ms": every_ms, "best_ms": every_ms - 2, "cpu_median_ms": every_ms, "count": sockets}
    held = {"median_ms": 250.0, "best_ms": 246.0, "cpu_median_ms": 250.0, "count": sockets}
    return {
        "states": {"ESTABLISHED": sockets - 100, "LISTEN": 100},
        "snapshot_every_namespace": case,
        "sock_diag_all": case,
        "collect_all_with_owners": held,
    }


def test_the_snapshot_target_is_judged_on_50k_sockets_only() -> None:
    def verdict(snapshot: dict[str, Any] | None) -> Any:
        (v,) = [
            v for v in evaluate_targets([], [], (), snapshot) if v.target.startswith("snapshot of a host")
        ]
        return v

    assert verdict(snapshot_of(50_000, 82.0)).met is True
    detail = verdict(snapshot_of(50_000, 82.0)).detail
    assert detail.startswith(
        "82 ms for 50,000 sockets (median); every namespace of the host (50,000 sockets)"
    )
    assert detail.endswith("with the holders, as seeding reads them: 250 ms")
    assert verdict(snapshot_of(50_000, 120.0)).met is False
    assert verdict(snapshot_of(5_000, 9.0)).met is None  # --quick: too few sockets to judge
    assert verdict(None).met is None
    table = render_markdown({"snapshot_cost": snapshot_of(50_000, 82.0)}, [], [], [], [])
    assert "### Host snapshot: 50,000 sockets" in table and "| every namespace on the host | 82.0 |" in table
