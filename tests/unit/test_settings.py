"""The recorded TCP settings: one serializer and one parser (system/sysctl.py), and both
commands that replay them (timewait and diagnose) read every setting a recording carries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from tcptrace.cli import cli
from tcptrace.model.events import to_json
from tcptrace.recording import make_header
from tcptrace.system.sysctl import TcpSettings, settings_from_header
from tests.unit.test_diagnosis import tw_created

NS = 1_000_000_000
# Every field set, none to its usual value, so a setting dropped on the way shows.
EVERY = TcpSettings(
    port_range=(40000, 40999), tw_reuse=1, max_tw_buckets=4096, fin_timeout=17, timestamps=0, rfc1337=1
)
EXPLAINED = {
    "net.ipv4.ip_local_port_range": "40000-40999",
    "net.ipv4.tcp_tw_reuse": "1",
    "net.ipv4.tcp_max_tw_buckets": "4096",
    "net.ipv4.tcp_fin_timeout": "17s",
    "net.ipv4.tcp_rfc1337": "1",
}


def test_every_setting_survives_a_header() -> None:
    header = json.loads(json.dumps(make_header("timewait", settings=EVERY.to_json())))
    assert settings_from_header(header) == EVERY
    assert {f for f, v in EVERY.to_json().items() if v is None} == set()


SETTING = st.one_of(st.none(), st.integers(0, 1 << 31))
PORT_RANGE = st.tuples(st.integers(1, 65535), st.integers(1, 65535)).map(lambda t: (min(t), max(t)))


@given(
    st.builds(
        TcpSettings,
        port_range=st.one_of(st.none(), PORT_RANGE),
        tw_reuse=SETTING,
        max_tw_buckets=SETTING,
        fin_timeout=SETTING,
        timestamps=SETTING,
        rfc1337=SETTING,
    )
)
def test_any_settings_round_trip(settings: TcpSettings) -> None:
    assert TcpSettings.from_json(json.loads(json.dumps(settings.to_json()))) == settings


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "settings",
        {"port_range": [0, 10]},
        {"port_range": [60999, 32768]},
        {"port_range": [1, 2, 3]},
        {"port_range": [True, 2]},
        {"tw_reuse": "1", "rfc1337": 1.0, "fin_timeout": True},
    ],
)
def test_malformed_settings_are_unknown_not_errors(raw: object) -> None:
    assert TcpSettings.from_json(raw) == TcpSettings()


def recording(path: Path) -> Path:
    """A `timewait --json --events` recording with every setting in its header."""
    lines = [make_header("timewait", settings=EVERY.to_json(), interval_s=1.0, events=True)]
    lines += [to_json(tw_created((10 + i) * NS // 10, pid=7)) for i in range(20)]
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    return path


def replayed_settings(*args: str) -> dict[str, str]:
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.splitlines()[-1])
    assert summary["type"] == "summary"
    return {a["setting"]: a["value"] for a in summary["settings"]}


def test_timewait_and_diagnose_replay_every_recorded_setting(tmp_path: Path) -> None:
    rec = str(recording(tmp_path / "tw.jsonl"))
    assert replayed_settings("timewait", "--from", rec) == EXPLAINED
    assert replayed_settings("diagnose", "--from", rec) == EXPLAINED
