"""The option conventions every command shares (bcc's short forms, comma lists, times with
units, one default threshold, --units, -T), and every bad value as one line with exit 2."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tcptrace.cli import cli
from tcptrace.commands.options import DEFAULT_THRESHOLD, FilterOptions

FILTERED = ("states", "record", "closewait", "closelat", "timewait", "top", "diagnose", "agent")
WITH_JSON = ("states", "closewait", "closelat", "timewait", "diagnose")
WITH_UNITS = ("states", "closewait", "closelat", "top")
WITH_TIMESTAMPS = ("closewait", "timewait")
WITH_THRESHOLD = ("closewait", "top", "diagnose", "demo", "agent")
WITH_DURATION = ("states", "record", "closewait", "closelat", "timewait", "top", "diagnose", "demo", "agent")


def given(monkeypatch: pytest.MonkeyPatch, command: str, *args: str) -> dict[str, Any]:
    """What ``tcptrace COMMAND ARGS`` hands its module's run() (which is not run)."""
    seen: dict[str, Any] = {}
    module = importlib.import_module(f"tcptrace.commands.{command}")
    monkeypatch.setattr(module, "run", lambda **kw: seen.update(kw))
    extra = ["-o", "/nonexistent/x"] if command == "record" else []
    result = CliRunner().invoke(cli, [command, *args, *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return seen


@pytest.mark.parametrize("command", FILTERED)
def test_bcc_short_forms_and_comma_lists(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    args = ["-p", "3,4", "--pid", "5", "-c", "nginx", "--port", "80,443", "-L", "8080", "-D", "53,5353"]
    args += ["-4", "--netns", "4026532281", "--cgroup", "/system.slice", "--container", "4f797c"]
    filters = given(monkeypatch, command, *args)["filters"]
    assert filters == FilterOptions(
        pids=(3, 4, 5),
        comm="nginx",
        ports=(80, 443),
        ipv4=True,
        local_ports=(8080,),
        remote_ports=(53, 5353),
        netns=("4026532281",),
        cgroups=("/system.slice",),
        containers=("4f797c",),
    )
    flt = filters.event_filter(live=False)
    assert flt.pids == {3, 4, 5} and flt.remote_ports == {53, 5353} and flt.netns == {4026532281}


@pytest.mark.parametrize("command", FILTERED)
def test_6_keeps_ipv6_only(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    filters = given(monkeypatch, command, "-6")["filters"]
    assert filters.ipv6 and not filters.ipv4
    assert filters.event_filter(live=False).family == 6
    assert given(monkeypatch, command)["filters"].event_filter(live=False).family is None


@pytest.mark.parametrize("command", WITH_JSON)
def test_j_is_json(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    assert given(monkeypatch, command, "-j")["as_json"] is True
    assert given(monkeypatch, command)["as_json"] is False


@pytest.mark.parametrize("command", WITH_UNITS)
@pytest.mark.parametrize("units", ["auto", "ms", "us"])
def test_units(monkeypatch: pytest.MonkeyPatch, command: str, units: str) -> None:
    assert given(monkeypatch, command, "--units", units)["units"] == units


@pytest.mark.parametrize("command", WITH_TIMESTAMPS)
def test_t_is_timestamps(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    assert given(monkeypatch, command, "-T")["timestamps"] is True
    assert given(monkeypatch, command, "--timestamps")["timestamps"] is True


@pytest.mark.parametrize("command", WITH_THRESHOLD)
def test_one_default_threshold(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    assert DEFAULT_THRESHOLD == "5s"
    assert given(monkeypatch, command)["threshold"] == 5.0
    assert given(monkeypatch, command, "--threshold", "2m")["threshold"] == 120.0
    assert given(monkeypatch, command, "--threshold", "250ms")["threshold"] == 0.25
    assert given(monkeypatch, command, "--threshold", "7")["threshold"] == 7.0


@pytest.mark.parametrize("command", WITH_DURATION)
@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), ("1.5", 1.5)]
)
def test_duration_takes_units_and_a_bare_number_is_seconds(
    monkeypatch: pytest.MonkeyPatch, command: str, text: str, seconds: float
) -> None:
    assert given(monkeypatch, command, "--duration", text)["duration"] == seconds


@pytest.mark.parametrize(
    ("command", "option", "text", "seconds"),
    [
        ("states", "--interval", "500ms", 0.5),
        ("agent", "--interval", "1m", 60.0),
        ("closewait", "--recheck", "0", 0.0),
        ("closewait", "--recheck", "30s", 30.0),
        ("closelat", "--close-wait-min", "250ms", 0.25),
        ("agent", "--states-interval", "2m", 120.0),
        ("diagnose", "--duration", "90s", 90.0),
    ],
)
def test_every_time_option_takes_units(
    monkeypatch: pytest.MonkeyPatch, command: str, option: str, text: str, seconds: float
) -> None:
    key = option.lstrip("-").replace("-", "_")
    assert given(monkeypatch, command, option, text)[key] == seconds


def test_defaults_of_times_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    assert given(monkeypatch, "diagnose")["duration"] == 10.0
    assert given(monkeypatch, "agent")["interval"] == 5.0
    assert given(monkeypatch, "states")["interval"] == 1.0
    assert given(monkeypatch, "closewait")["recheck"] == 10.0


def test_no_pid_label(monkeypatch: pytest.MonkeyPatch) -> None:
    assert given(monkeypatch, "agent", "--no-pid-label")["no_pid_label"] is True
    assert given(monkeypatch, "agent")["no_pid_label"] is False


BAD = [
    (["states", "-p", "x"], "Invalid value for '-p' / '--pid': 'x' is not a number"),
    (["states", "-p", "0"], "Invalid value for '-p' / '--pid': 0 is not in 1-4294967295"),
    (["states", "-p", "1,,2"], "Invalid value for '-p' / '--pid': '1,,2' has an empty item"),
    (["states", "--port", "80,http"], "Invalid value for '--port': 'http' is not a number"),
    (["states", "--port", "70000"], "Invalid value for '--port': 70000 is not in 1-65535"),
    (["states", "-L", "0"], "Invalid value for '-L' / '--local-port': 0 is not in 1-65535"),
    (["states", "-D", ""], "Invalid value for '-D' / '--remote-port': '' has an empty item"),
    (["states", "-c", ""], "--comm needs a name"),
    (["states", "-4", "-6"], "-4 and -6 exclude each other"),
    (["states", "--duration", "30y"], "Invalid value for '--duration': not a duration: '30y'"),
    (["states", "--duration", "0"], "Invalid value for '--duration': 0 is not above 0s"),
    (["states", "--duration", "-1s"], "Invalid value for '--duration': not a duration: '-1s'"),
    (["states", "--duration", "nan"], "Invalid value for '--duration': not a duration: 'nan'"),
    (["states", "--interval", "10ms"], "Invalid value for '--interval': 10ms is not at least 0.05s"),
    (["closewait", "--threshold", "soon"], "Invalid value for '--threshold': not a duration: 'soon'"),
    (["closewait", "--recheck", "x"], "Invalid value for '--recheck': not a duration: 'x'"),
    (["states", "--units", "s"], "Invalid value for '--units': 's' is not one of 'auto', 'ms', 'us'"),
    (["states", "-T"], "No such option '-T'"),
    (["states", "--netns", "0"], "--netns 0: neither a pid nor a namespace inode"),
    (["states", "--netns", "99999999999"], "--netns 99999999999: not a namespace inode (32 bits)"),
    (["states", "--netns", "4194303"], "--netns 4194303: no process with pid 4194303"),
    (["states", "--netns", "no-such-ns-here"], "--netns no-such-ns-here: no network namespace named"),
    (["states", "--netns", "../x"], "--netns '../x': give an inode, a pid or an ip-netns name"),
    (["states", "--cgroup", "/no/such/cgroup/here"], "--cgroup /no/such/cgroup/here: no such cgroup"),
    (["states", "--cgroup", "/a/../b"], "--cgroup '/a/../b': not a cgroup path"),
    (["states", "--container", "xyz"], "--container 'xyz': a container id is hexadecimal"),
    (["states", "--container", "a" * 65], "a container id is hexadecimal (up to 64 digits)"),
    (["states", "-p", "4194303"], "no process with pid 4194303"),
    (["states", *[f"-L{p}" for p in range(1, 40)], *[f"-D{p}" for p in range(40, 70)]], "at most 64 ports"),
    (["agent", "--no-pid-label=x"], "Option '--no-pid-label' does not take a value"),
    (["bogus"], "No such command 'bogus'"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a)[:50] for a, _ in BAD])
def test_bad_values_are_one_line_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tcptrace: error: "), result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_netns_pid_and_inode_and_name(tmp_path: Path) -> None:
    import os

    from tcptrace.commands.options import netns_inode
    from tcptrace.errors import UsageError
    from tcptrace.system import netns

    own = netns.of_pid(os.getpid())
    if own is None:
        pytest.skip("cannot read /proc/self/ns/net")
    assert netns_inode(str(os.getpid())) == own
    assert netns_inode(str(own)) == own == netns_inode(f"net:[{own}]")
    with pytest.raises(UsageError, match="with --from give the namespace's inode"):
        netns_inode(str(os.getpid()), live=False)


def test_units_ms_makes_plain_numbers_under_a_named_header(data_dir: Path) -> None:
    result = CliRunner().invoke(
        cli, ["states", "--units", "ms", "--from", str(data_dir / "lifecycle_basic.jsonl")]
    )
    lines = result.stdout.split("\n\n", 1)[0].splitlines()  # the summary follows a blank line
    assert lines[0].split()[-1] == "PREV(ms)"
    prevs = [line.split()[-1] for line in lines[1:] if line.strip()]
    assert prevs and all(p == "-" or re.fullmatch(r"\d+\.\d{3}", p) for p in prevs)
    auto = CliRunner().invoke(cli, ["states", "--from", str(data_dir / "lifecycle_basic.jsonl")]).stdout
    assert auto.splitlines()[0].split()[-1] == "PREV" and re.search(r"\d+us\n", auto)


def test_units_us_in_closelat(data_dir: Path) -> None:
    rec = str(data_dir / "closelat_linger_reset.jsonl")
    out = CliRunner().invoke(cli, ["closelat", "--units", "us", "--from", rec]).stdout
    header = next(line for line in out.splitlines() if line.lstrip().startswith("PID"))
    assert header.split()[4:8] == ["P50(us)", "P90(us)", "P99(us)", "MAX(us)"]


def test_timestamps_in_front_of_periodic_lines(data_dir: Path) -> None:
    rec = str(data_dir / "timewait_mix.jsonl")
    plain = CliRunner().invoke(cli, ["timewait", "--from", rec]).stdout
    stamped = CliRunner().invoke(cli, ["timewait", "-T", "--from", rec]).stdout
    heads = [line for line in plain.splitlines() if line.startswith("TIME_WAIT created")]
    stamped_heads = [line for line in stamped.splitlines() if "TIME_WAIT created" in line and "/s" in line]
    assert heads and len(stamped_heads) >= len(heads)
    assert all(re.match(r"\d\d:\d\d:\d\d TIME_WAIT created", line) for line in stamped_heads[: len(heads)])


def test_tcptrace_alone_shows_the_help() -> None:
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 2
    assert result.stderr.startswith("Usage: ") and "Start with:" in result.stderr
