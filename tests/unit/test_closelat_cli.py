"""`tcptrace closelat` on a recording, and its rendering: text, JSON, errors."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from click.testing import CliRunner
from rich.console import Console

from tcptrace.cli import cli
from tcptrace.model.closelat import CallKey, CallStats, Report
from tcptrace.model.events import CloseCall, CloseFlag, Op, TcpState
from tcptrace.model.histogram import Log2Histogram
from tcptrace.views.closelat import BAR_WIDTH, flag_line, print_report

SAMPLE = "closelat_linger_reset.jsonl"
# What the sample holds (recorded with --pid from a script that made exactly these closes):
# 20 ordinary connection pairs (40 closes); a close with unread data (RESET) and its peer's;
# a 1 s SO_LINGER close with unacknowledged data (LINGERED), its peer's close with that
# data unread (RESET) and the listener's; a close of a socket that had sat 1.3 s in
# CLOSE_WAIT (LATE_CLOSE_WAIT), its peer's and the listener's.
CALLS = 48


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def sample_objects(data_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (data_dir / SAMPLE).read_text().splitlines()]


def test_text_replay_shows_flags_bars_and_summary(data_dir: Path) -> None:
    code, out, err = invoke("closelat", "--from", str(data_dir / SAMPLE))
    assert code == 0, err
    assert out.count("LINGERED ") == 1
    assert out.count("RESET ") == 2
    assert out.count("LATE_CLOSE_WAIT ") == 1
    linger = next(line for line in out.splitlines() if "LINGERED " in line)
    assert re.search(r"took 1\.0\ds;", linger)
    assert "close() latency of TCP sockets, last 1.00s" in out
    assert "█" in out
    assert "closelat stopped (end)" in out and err == ""
    assert "2 reset, 1 lingered, 1 late CLOSE_WAIT" in out
    assert "0 events lost" in out


def test_json_replay_reproduces_the_recorded_reports(data_dir: Path, tmp_path: Path) -> None:
    recorded = sample_objects(data_dir)
    code, out, _ = invoke("closelat", "--json", "--from", str(data_dir / SAMPLE))
    assert code == 0
    objs = [json.loads(line) for line in out.splitlines()]
    assert objs[0]["type"] == "header"
    summary = objs[-1]
    assert summary["type"] == "summary" and summary["command"] == "closelat"
    assert summary["calls"] == CALLS
    assert summary["flagged"] == {"events": 4, "reset": 2, "lingered": 1, "late_close_wait": 1}
    (proc,) = summary["processes"]
    assert proc["count"] == CALLS and proc["resets"] == 2 and proc["lingered"] == 1
    assert 1_000_000_000 <= proc["max_ns"] < 1_100_000_000
    # Same reports and flagged calls, in the same order, as the live run wrote.
    assert objs[1:-1] == recorded[1:-1]
    # The output is itself a recording.
    again = tmp_path / "again.jsonl"
    again.write_text(out)
    code, out2, _ = invoke("closelat", "--json", "--from", str(again))
    assert [json.loads(x) for x in out2.splitlines()][1:] == objs[1:]


def test_cumulative_replay_of_interval_recording(data_dir: Path) -> None:
    code, out, _ = invoke("closelat", "--json", "--cumulative", "--from", str(data_dir / SAMPLE))
    assert code == 0
    reports = [json.loads(x) for x in out.splitlines() if '"type":"closelat"' in x]
    counts = [sum(p["count"] for p in r["processes"]) for r in reports]
    assert counts == sorted(counts) and counts[-1] == CALLS
    assert all(r["window"] == "cumulative" for r in reports)


def test_pid_filter_on_replay(data_dir: Path) -> None:
    code, out, _ = invoke("closelat", "--json", "--pid", "1", "--from", str(data_dir / SAMPLE))
    assert code == 0
    objs = [json.loads(x) for x in out.splitlines()]
    assert objs[-1]["calls"] == 0 and objs[-1]["flagged"]["events"] == 0


def test_port_filter_cannot_apply_to_recorded_histograms(data_dir: Path) -> None:
    code, _, err = invoke("closelat", "--port", "80", "--from", str(data_dir / SAMPLE))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("tcptrace: error: --port")


def test_recording_without_reports_is_an_error(tmp_path: Path) -> None:
    rec = tmp_path / "states.jsonl"
    rec.write_text(
        '{"type":"header","format":"tcptrace","version":1}\n'
        '{"type":"transition","ts_ns":1,"skaddr":"0x1","old":"CLOSE","new":"LISTEN"}\n'
        '{"type":"summary","lost":0}\n'
    )
    code, _, err = invoke("closelat", "--from", str(rec))
    assert code == 1
    assert err.count("\n") == 1 and "holds no close() latency reports" in err


def test_malformed_report_is_a_one_line_error(tmp_path: Path) -> None:
    rec = tmp_path / "bad.jsonl"
    rec.write_text(
        '{"type":"header","format":"tcptrace","version":1}\n'
        '{"type":"closelat","ts_ns":1,"window":"interval","processes":[{"pid":"x"}]}\n'
    )
    code, _, err = invoke("closelat", "--from", str(rec))
    assert code == 1
    assert err.count("\n") == 1 and "not a valid closelat report" in err


def test_missing_recording_is_a_one_line_error(tmp_path: Path) -> None:
    code, _, err = invoke("closelat", "--from", str(tmp_path / "nope.jsonl"))
    assert code == 1 and err.count("\n") == 1


def render(report: Report) -> str:
    buf = io.StringIO()
    print_report(Console(file=buf, width=200, color_system=None), report, 0)
    return buf.getvalue()


def test_bars_scale_to_the_fullest_bucket() -> None:
    hist = Log2Histogram.of([5_000] * 40 + [20_000] * 10 + [S_ := 1_000_000_000])
    text = render(Report(10**9, "interval", 10**9, (CallStats(CallKey(9, "srv", Op.CLOSE), hist),)))
    bars = [line for line in text.splitlines() if "█" in line]
    assert [line.count("█") for line in bars] == [BAR_WIDTH, BAR_WIDTH // 4, 1]
    assert S_ == hist.max_ns
    head = next(line for line in text.splitlines() if line.lstrip().startswith("9 "))
    assert head.split()[:4] == ["9", "srv", "close", "51"]
    assert head.split()[7] == "1.00s"  # max


def test_hostile_comm_and_frames_are_escaped() -> None:
    key = CallKey(9, "evil\x1b[2J", Op.CLOSE, ("f\nx+0x1 [m]",))
    text = render(Report(10**9, "cumulative", 0, (CallStats(key, Log2Histogram.of([1])),)))
    assert "\x1b" not in text and "evil\\x1b[2J" in text
    assert "f\\x0ax+0x1 [m]" in text


def test_text_shows_the_busiest_rows_and_counts_the_rest() -> None:
    rows = tuple(
        CallStats(CallKey(pid, f"p{pid}", Op.CLOSE), Log2Histogram.of([1_000] * (100 - pid)))
        for pid in range(1, 13)
    )
    text = render(Report(1, "interval", 10**9, rows))
    assert "p10 " in text and "p11 " not in text
    assert "… 2 more rows (177 calls)" in text


def test_empty_report_says_so() -> None:
    assert "no close() on a TCP socket" in render(Report(1, "interval", 10**9, ()))


def test_flag_line_names_the_socket_and_the_risk() -> None:
    event = CloseCall(
        ts_ns=1,
        skaddr=1,
        saddr="10.0.0.1",
        sport=80,
        daddr="10.0.0.2",
        dport=5555,
        pid=7,
        comm="srv",
        op=Op.CLOSE,
        duration_ns=3_000_000_000,
        flags=CloseFlag.LATE_CLOSE_WAIT,
        state=TcpState.CLOSE_WAIT,
        in_state_ns=300_000_000_000,
    )
    line = flag_line(event, 0).plain
    assert "LATE_CLOSE_WAIT pid 7 srv close() 10.0.0.1:80 -> 10.0.0.2:5555 in CLOSE_WAIT for 5m00s" in line
    assert "took 3.00s" in line
