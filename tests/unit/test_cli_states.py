"""The CLI on recordings: output, filters, JSON, and one-line errors with exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tcptrace.cli import cli

SAMPLE = "lifecycle_basic.jsonl"


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_states_from_recording_prints_every_transition(data_dir: Path) -> None:
    code, out, err = invoke("states", "--from", str(data_dir / SAMPLE))
    assert code == 0
    events, summary = out.split("\n\n", 1)  # the summary follows the events on stdout
    lines = events.splitlines()
    assert lines[0].split()[:3] == ["TIME", "PID", "COMM"]
    assert len(lines) == 1 + 44
    assert any("ESTABLISHED -> CLOSE_WAIT" in line for line in lines)
    assert summary.startswith("44 events, 0 lost (stopped: end)")
    assert err == ""


def test_states_json_is_a_recording_with_a_summary(data_dir: Path, tmp_path: Path) -> None:
    code, out, _ = invoke("states", "--json", "--from", str(data_dir / SAMPLE), "--port", "47312")
    assert code == 0
    objs = [json.loads(line) for line in out.splitlines()]
    assert objs[0]["type"] == "header"
    assert objs[-1]["type"] == "summary" and objs[-1]["events"] == len(objs) - 2 == 12
    assert objs[-1]["lost"] == 0
    assert all(47312 in (o["sport"], o["dport"]) for o in objs[1:-1])
    # and it replays
    again = tmp_path / "again.jsonl"
    again.write_text(out)
    code, out2, _ = invoke("states", "--json", "--from", str(again))
    assert [json.loads(x) for x in out2.splitlines()][1:-1] == objs[1:-1]


def test_family_filter_on_replay(data_dir: Path) -> None:
    code, out, _ = invoke("states", "-6", "--from", str(data_dir / SAMPLE))
    assert code == 0
    body = out.split("\n\n", 1)[0].splitlines()[1:]
    assert body and all("[::1]" in line for line in body)


@pytest.mark.parametrize(
    "args, message",
    [
        (["states", "--port", "0"], "Invalid value for '--port'"),
        (["states", "--port", "http"], "Invalid value for '--port'"),
        (["states", "--pid", "-5"], "Invalid value for '-p' / '--pid'"),
        (["states", "-4", "-6"], "-4 and -6 exclude each other"),
        (["states", "--pid", "999999999"], "no process with pid 999999999"),
        (["states", "--duration", "0"], "Invalid value for '--duration'"),
    ],
)
def test_usage_errors_exit_2_in_one_line(args: list[str], message: str) -> None:
    code, out, err = invoke(*args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out


def test_malformed_recording_is_one_line_exit_1(tmp_path: Path, data_dir: Path) -> None:
    lines = (data_dir / SAMPLE).read_text().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(lines[:7]) + '{"type": "transition", "ts_ns": 1,\n' + "".join(lines[8:]))
    code, _, err = invoke("states", "--from", str(bad))
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(f"tcptrace: error: {bad}:8: not JSON")
    assert "Traceback" not in err


def test_missing_recording(tmp_path: Path) -> None:
    code, _, err = invoke("states", "--from", str(tmp_path / "none.jsonl"))
    assert code == 1 and "cannot read recording" in err and len(err.strip().splitlines()) == 1


def test_record_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "keep.jsonl"
    target.write_text("precious\n")
    code, _, err = invoke("record", "-o", str(target), "--duration", "1")
    assert code == 2 and "exists" in err
    assert target.read_text() == "precious\n"


def test_not_root_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from tcptrace.kernel import loader

    monkeypatch.setattr(loader, "has_tracing_privileges", lambda: False)
    code, _, err = invoke("states", "--duration", "1")
    assert code == 1
    assert err.strip() == (
        "tcptrace: error: tracing needs root (or CAP_BPF, CAP_PERFMON and CAP_DAC_READ_SEARCH) "
        "(run it with sudo, e.g. `sudo tcptrace ...`)"
    )


def test_every_command_has_help_with_an_example() -> None:
    for name, command in cli.commands.items():
        code, out, _ = invoke(name, "--help")
        assert code == 0, name
        assert command.help and len(command.help) > 40, name
        if name not in ("doctor",):
            assert "Example" in out, name


@pytest.mark.parametrize("pages", ["3", "0", "-8"])
def test_ringbuf_pages_must_be_a_power_of_two(pages: str) -> None:
    code, _, err = invoke("states", "--ringbuf-pages", pages)
    assert code == 2 and "power of two" in err
    assert "deprecated: use --buffer" in err


@pytest.mark.parametrize("command", ["states", "record", "agent"])
@pytest.mark.parametrize(
    "size, message",
    [
        ("3", "power of two pages"),
        ("0", "power of two pages"),
        ("1K", "power of two pages"),
        ("-8", "power of two pages"),
        ("inf", "power of two pages"),
        ("nan", "power of two pages"),
        ("2048", "at most 1024 MiB"),
        ("lots", "expected a size in MiB"),
        ("4G", "expected a size in MiB"),
    ],
)
def test_buffer_is_a_power_of_two_pages_in_one_line(command: str, size: str, message: str) -> None:
    args = ["-o", "/nonexistent/x.jsonl"] if command == "record" else []
    code, out, err = invoke(command, *args, "--buffer", size)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err + out


def test_buffer_and_its_old_name_exclude_each_other() -> None:
    code, _, err = invoke("states", "--buffer", "4", "--ringbuf-pages", "1024")
    assert code == 2 and "give --buffer only" in err


def test_buffer_sizes_in_pages() -> None:
    from tcptrace.commands.options import buffer_pages, ring_buffer_pages

    assert [buffer_pages(s, 4096) for s in ("16", "0.5", "4K", "64kib", "1M", "2mib", "1024")] == [
        4096,
        128,
        1,
        16,
        256,
        512,
        262144,
    ]
    assert ring_buffer_pages(None, None) == 4096  # the default: 16 MiB
    assert ring_buffer_pages(None, None, default=None) is None  # the programs' own
    assert ring_buffer_pages(None, 8) == 8


def test_missing_tracepoint_names_the_feature_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    from tcptrace.kernel import loader

    monkeypatch.setattr(loader, "require_privileges", lambda: None)
    monkeypatch.setattr(loader, "ensure_tracefs", lambda: "/sys/kernel/tracing")
    monkeypatch.setattr(loader, "tracepoint_exists", lambda group, name: False)
    code, _, err = invoke("states", "--duration", "1")
    assert code == 1
    assert err.strip() == (
        "tcptrace: error: this kernel has no tracepoint sock:inet_sock_set_state: "
        "TCP state transitions cannot be traced"
    )
