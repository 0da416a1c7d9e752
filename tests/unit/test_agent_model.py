"""The agent's model on generated streams and map reads: CLOSE_WAIT per process, exact
TIME_WAIT totals under the label bound, idle map entries, leak-suspect log records."""

from __future__ import annotations

import doctest
import random

import pytest
from click.testing import CliRunner

import tcptrace.model.agent
from tcptrace.cli import cli
from tcptrace.export.prometheus import AgentCollector, families, make_registry, sample_value, text_of
from tcptrace.model.agent import AgentConfig, AgentModel, ProcTw, RssSeries
from tcptrace.model.events import Op, TcpState
from tcptrace.model.histogram import Log2Histogram
from tcptrace.model.timewait import Dest
from tests.unit.test_lifecycle import touch, tr

S = TcpState
NS = 1_000_000_000


def test_docstring_examples() -> None:
    result = doctest.testmod(tcptrace.model.agent)
    assert result.attempted > 0 and result.failed == 0


def leak(m: AgentModel, sk: int, pid: int, ts: int, stack: str = "handler") -> None:
    m.feed(tr(ts, sk, S.LISTEN, S.SYN_RECV, pid=pid))
    m.feed(tr(ts + 1, sk, S.SYN_RECV, S.ESTABLISHED, pid=pid))
    m.feed(touch(ts + 2, sk, Op.ACCEPT, pid, ustack=("accept", "main")))
    m.feed(tr(ts + 3, sk, S.ESTABLISHED, S.CLOSE_WAIT, pid=pid))
    m.feed(touch(ts + 4, sk, Op.RECV, pid, ret=0, ustack=("recv", stack)))


def series(text: str, name: str) -> list[float]:
    """Values of every sample of ``name`` (with labels)."""
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]


def scrape(m: AgentModel, now: int, **kw: object) -> str:
    """The metrics at ``now``, once the model took what the events fed aggregate to."""
    if m.emulator is not None:
        m.closewait.apply(m.emulator.snapshot(now))
    c = AgentCollector()
    c.publish(families(m.export(now, **kw)))  # type: ignore[arg-type]
    return text_of(make_registry(c, process_metrics=False))


def test_close_wait_per_process_and_over_threshold() -> None:
    m = AgentModel(AgentConfig(threshold_ns=10 * NS))
    for i in range(4):
        leak(m, 100 + i, 7, i * NS)
    leak(m, 200, 8, 20 * NS)
    m.feed(tr(21 * NS, 200, S.CLOSE_WAIT, S.LAST_ACK, pid=8))
    text = scrape(m, 12 * NS + 5)
    p7 = {"pid": "7", "comm": "p7"}
    assert sample_value(text, "tcptrace_close_wait_sockets", p7) == 4
    # Entered at 3 ns, 1 s + 3, 2 s + 3, 3 s + 3: at 12 s + 5 three are >= 10 s old.
    assert sample_value(text, "tcptrace_close_wait_over_threshold_sockets", p7) == 3
    assert sample_value(text, "tcptrace_close_wait_sockets", {"pid": "8"}) is None
    assert sample_value(text, "tcptrace_close_wait_entered_total") == 5
    assert sample_value(text, "tcptrace_close_wait_closed_total") == 1


def test_close_wait_processes_beyond_the_bound_are_summed_into_other() -> None:
    m = AgentModel(AgentConfig(threshold_ns=NS, top_processes=5))
    sk = 1
    for pid in range(30):
        for _ in range(pid % 4 + 1):
            leak(m, sk, 1000 + pid, 0)
            sk += 1
    text = scrape(m, 2 * NS)
    rows = [line for line in text.splitlines() if line.startswith("tcptrace_close_wait_sockets{")]
    assert len(rows) == 6
    total = sum(float(line.rsplit(" ", 1)[1]) for line in rows)
    assert total == sk - 1
    assert sample_value(text, "tcptrace_close_wait_sockets", {"comm": "other", "pid": ""}) is not None


def test_timewait_totals_are_exact_under_the_label_bound() -> None:
    rng = random.Random(3)
    m = AgentModel(AgentConfig(top_processes=5, top_ports=3))
    cumulative: dict[tuple[int, int], ProcTw] = {}
    dests: dict[Dest, int] = {}
    created = 0
    for t in range(40):
        for pid in rng.sample(range(2000, 2030), 10):
            n = rng.randint(1, 5)
            old = cumulative.get((pid, 7), ProcTw(f"c{pid}"))
            cumulative[(pid, 7)] = ProcTw(old.comm, old.created + n, 0, old.resets_sent + 1, 0)
            key = Dest(4, "127.0.0.1", "127.0.0.1", 9000 + pid % 7)
            dests[key] = dests.get(key, 0) + n
            created += n
        m.tick(t * NS, tw_procs=dict(cumulative), tw_dests=dict(dests))
    text = scrape(m, 40 * NS)
    rows = [
        line for line in text.splitlines() if line.startswith("tcptrace_timewait_created_by_process_total{")
    ]
    assert len(rows) <= 6
    # No series ended in 40 s (a label set is held 60 s and dropped after 600 s idle), so
    # the live series plus comm="other" add up to every creation exactly once.
    assert m.tw_by_proc.dropped_total == 0
    assert sum(float(r.rsplit(" ", 1)[1]) for r in rows) == created
    resets = [line for line in text.splitlines() if line.startswith("tcptrace_resets_sent_by_process_total{")]
    assert len(resets) <= 6 and sum(float(r.rsplit(" ", 1)[1]) for r in resets) == 400
    ports = [
        line
        for line in text.splitlines()
        if line.startswith("tcptrace_timewait_created_by_remote_port_total{")
    ]
    assert len(ports) <= 4
    assert sample_value(text, "tcptrace_label_sets", {"metric": "timewait_created_by_process"}) == len(
        m.tw_by_proc
    )


def test_idle_map_entries_are_returned_for_deletion_and_counted_once() -> None:
    m = AgentModel(AgentConfig(idle_intervals=2))
    reads = {(1, 10): ProcTw("a", created=3)}
    assert m.tick(0, tw_procs=reads)["tw_procs"] == []
    assert m.tick(NS, tw_procs=reads)["tw_procs"] == []
    assert m.tick(2 * NS, tw_procs=reads)["tw_procs"] == [(1, 10)]
    m.forgot("tw_procs", [(1, 10)])
    # The kernel recreates the entry from zero for pid 1's next TIME_WAIT.
    m.tick(3 * NS, tw_procs={(1, 10): ProcTw("a", created=2)})
    assert dict(m.tw_by_proc.items())[(1, "a", "", "", "")] == 5
    assert m.pruned["tw_procs"] == 1


def test_a_reused_pid_is_another_process() -> None:
    """twA (pid 7) makes 50 TIME_WAIT and exits; twB gets pid 7 and makes 50: the kernel
    keys them (pid, start time) apart, and so does every series."""
    m = AgentModel(AgentConfig())
    m.tick(0, tw_procs={(7, 100): ProcTw("twA", created=50)})
    m.tick(NS, tw_procs={(7, 100): ProcTw("twA", created=50), (7, 900): ProcTw("twB", created=50)})
    text = scrape(m, 2 * NS)
    by = "tcptrace_timewait_created_by_process_total"
    assert sample_value(text, by, {"pid": "7", "comm": "twA"}) == 50
    assert sample_value(text, by, {"pid": "7", "comm": "twB"}) == 50


def test_equal_destinations_in_two_namespaces_add_up_per_port() -> None:
    """The same addresses in two network namespaces are two kernel keys: both count, and
    a server's TIME_WAIT (bound local port) is in no remote-port series."""
    m = AgentModel(AgentConfig())
    a = Dest(4, "10.0.0.5", "10.0.0.9", 8080, netns=4026532001)
    b = Dest(4, "10.0.0.5", "10.0.0.9", 8080, netns=4026532002)
    server = Dest(4, "10.0.0.5", "10.0.0.9", 0, lport=8080, netns=4026532001)
    m.tick(0, tw_dests={a: 0, b: 0, server: 0})
    m.tick(NS, tw_dests={a: 30, b: 20, server: 70})
    text = scrape(m, 2 * NS)
    by = "tcptrace_timewait_created_by_remote_port_total"
    assert sample_value(text, by, {"remote_port": "8080"}) == 50
    assert sample_value(text, by, {"remote_port": "0"}) is None


def test_close_histograms_merge_stacks_per_process_and_call() -> None:
    m = AgentModel(AgentConfig())
    h1, h2 = Log2Histogram.of([1000, 2000]), Log2Histogram.of([3000])
    m.tick(
        0,
        cl_hists={(5, 9, "close", 11): h1, (5, 9, "close", 12): h2, (5, 9, "shutdown", -1): h2},
        cl_comm={(5, 9, "close", 11): "srv", (5, 9, "close", 12): "srv", (5, 9, "shutdown", -1): "srv"},
    )
    text = scrape(m, NS)
    srv = {"pid": "5", "comm": "srv"}
    assert sample_value(text, "tcptrace_close_duration_seconds_count", {**srv, "call": "close"}) == 3
    assert sample_value(text, "tcptrace_close_duration_seconds_count", {**srv, "call": "shutdown"}) == 1


def test_close_histograms_of_a_reused_pid_go_to_the_new_process() -> None:
    m = AgentModel(AgentConfig())
    old = {(5, 9, "close", -1): Log2Histogram.of([1000] * 4)}
    m.tick(0, cl_hists=old, cl_comm={k: "nginx" for k in old})
    # pid 5 exited and was reused by another program: the kernel keys its calls apart.
    both = {**old, (5, 77, "close", -1): Log2Histogram.of([1000] * 2)}
    comms = {(5, 9, "close", -1): "nginx", (5, 77, "close", -1): "cron"}
    m.tick(NS, cl_hists=both, cl_comm=comms)
    text = scrape(m, 2 * NS)
    count = "tcptrace_close_duration_seconds_count"
    assert sample_value(text, count, {"pid": "5", "comm": "nginx", "call": "close"}) == 4
    assert sample_value(text, count, {"pid": "5", "comm": "cron", "call": "close"}) == 2


def test_suspects_are_logged_when_new_or_grown_only() -> None:
    m = AgentModel(AgentConfig(threshold_ns=NS, relog_ns=3600 * NS))

    def records(now: int) -> list[dict[str, object]]:
        m.tick(now)  # as the agent does: the interval's reads, then the log
        return m.suspect_records(now)

    leak(m, 1, 7, 0)
    assert records(NS // 2) == []
    first = records(2 * NS)
    assert len(first) == 1 and first[0]["type"] == "leak_suspect" and first[0]["count"] == 1
    assert first[0]["origin_stack"] == ["accept", "main"] and first[0]["last_touch_stack"] == [
        "recv",
        "handler",
    ]
    assert records(3 * NS) == []
    leak(m, 2, 7, 3 * NS)
    grown = records(5 * NS)
    assert len(grown) == 1 and grown[0]["count"] == 2


def test_rss_verdict() -> None:
    flat = RssSeries([(float(i), (200 << 20) + (i % 3) * 4096) for i in range(40)])
    assert flat.verdict()[0]
    growing = RssSeries([(float(i), (200 << 20) + i * (1 << 20)) for i in range(40)])
    assert not growing.verdict()[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--listen", "9464"], "expected HOST:PORT"),
        (["--threshold", "soon"], "not a duration"),
        (["--top-processes", "-1"], "-1"),
    ],
)
def test_agent_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["agent", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_close_calls_stay_exact_while_per_process_series_come_and_go() -> None:
    m = AgentModel(AgentConfig(top_processes=2, label_idle_ns=3 * NS))
    hists: dict[tuple[int, int, str, int], Log2Histogram] = {}
    made = 0
    for t in range(30):
        pid = 100 + t  # a new process every interval, each closing t + 1 sockets
        hists[(pid, t, "close", -1)] = Log2Histogram.of([1000] * (t + 1))
        made += t + 1
        m.tick(t * NS, cl_hists=dict(hists), cl_comm={k: "worker" for k in hists})
    text = scrape(m, 30 * NS)
    assert sample_value(text, "tcptrace_close_calls_total", {"call": "close"}) == made
    assert len(series(text, "tcptrace_close_duration_seconds_count")) <= 3
    assert m.close_by_proc["close"].dropped_total > 0  # series did end on the way


def test_a_failing_refresh_is_logged_counted_and_survived() -> None:
    import io

    from tcptrace.commands.agent import MAX_CONSECUTIVE_ERRORS, Agent, AgentOptions
    from tcptrace.errors import TcptraceError

    log = io.StringIO()
    a = Agent(AgentOptions(), log)

    def broken(now_ns: int) -> None:
        raise KeyError("tw_procs")

    from tcptrace.export.prometheus import sample_value, text_of

    a.collector.publish([], at_s=1234.5)  # a refresh that succeeded, earlier
    a._tick = broken  # type: ignore[method-assign]
    a.tick(0)
    line = log.getvalue().splitlines()[-1]
    assert '"type":"agent_error"' in line and "KeyError" in line
    assert a.tick_errors == 1
    # A scrape sees the failure at once, and how old the values it gets are.
    text = text_of(a.registry)
    assert sample_value(text, "tcptrace_agent_tick_errors_total") == 1
    assert sample_value(text, "tcptrace_last_successful_refresh_timestamp_seconds") == 1234.5
    # Failing from the start every time: it gives up with one line, not a traceback.
    with pytest.raises(TcptraceError, match="every refresh"):
        for _ in range(MAX_CONSECUTIVE_ERRORS):
            a.tick(0)
