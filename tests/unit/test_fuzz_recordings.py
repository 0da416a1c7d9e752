"""Fuzzing the recording reader through the commands that replay recordings.

Arbitrary mutations of the real recordings of tests/data/ (bytes flipped, the file cut,
lines duplicated, dropped or swapped, a field's value swapped for one of another type,
huge numbers, deep nesting) replayed by a replaying command chosen at random must end in
one of two ways: a clean replay (exit 0), or one line ``tcptrace: error: FILE...`` with
exit 1 (``FILE:LINE:`` whenever a line is at fault). Never a traceback.

Bounds, by construction rather than by timing: memory, because the reader holds one line
of at most MAX_LINE_BYTES (test_hostile_recordings runs a 64 GiB file under RLIMIT_AS);
time, because a replay ticks at most a budget plus one per event (session.FREE_EMPTY_TICKS).
A SIGALRM guard turns a hang into a failure instead of a stuck test run.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcptrace.cli import cli

DATA = Path(__file__).resolve().parent.parent / "data"
RECORDINGS = {p.name: p.read_bytes() for p in sorted(DATA.glob("*.jsonl"))}
COMMANDS = ["states", "closewait", "timewait", "closelat", "top", "diagnose"]
RAW = "@@RAW@@"

# Values of every JSON type, hostile text, numbers out of every range (RAW: JSON text).
VALUES = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1.5, "", "x", "[/x]\x1b[2J", [], {}, [1], {"a": 1}]),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**30, "0xffffffffffffffffff", "CLOSE_WAIT", "\ud800"]),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.lists(st.text(max_size=8), max_size=3),
)
RAW_VALUES = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "9" * 5000, "-0", "1E2"]),
    st.integers(1, 100_000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 40).map(lambda n: '{"a":' * n + "1" + "}" * n),
)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(RECORDINGS)))
    lines = RECORDINGS[name].splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "cut", "dup", "drop", "swap", "value", "raw"]))
        i = draw(st.integers(0, len(lines) - 1))
        if op == "flip" and lines[i]:
            line = bytearray(lines[i])
            pos = draw(st.integers(0, len(line) - 1))
            line[pos] ^= draw(st.integers(1, 255))
            lines[i] = bytes(line)
        elif op == "cut":
            text = b"".join(lines)
            lines = [text[: draw(st.integers(0, len(text)))]]
        elif op == "dup":
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
        elif op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op in ("value", "raw"):
            try:
                obj = json.loads(lines[i])
            except (ValueError, RecursionError):
                continue
            if not isinstance(obj, dict) or not obj:
                continue
            key = draw(st.sampled_from(sorted(obj)))
            if op == "value":
                obj[key] = draw(VALUES)
                lines[i] = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"
            else:
                obj[key] = RAW
                raw = draw(RAW_VALUES)
                lines[i] = json.dumps(obj).replace(json.dumps(RAW), raw, 1).encode() + b"\n"
    return name, b"".join(lines)


class Hung(Exception):
    pass


@pytest.fixture
def hang_guard() -> Iterator[None]:
    def alarm(_signum: int, _frame: FrameType | None) -> None:
        raise Hung("a replay did not finish within 60 s")

    previous = signal.signal(signal.SIGALRM, alarm)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@given(case=mutated(), command=st.sampled_from(COMMANDS), as_json=st.booleans())
@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
def test_a_mutated_recording_replays_or_is_one_line_error(
    tmp_path: Path, hang_guard: None, case: tuple[str, bytes], command: str, as_json: bool
) -> None:
    name, data = case
    path = tmp_path / name
    path.write_bytes(data)
    args = [command, "--from", str(path)] + (["--json"] if as_json and command != "top" else [])
    signal.alarm(60)
    result = CliRunner().invoke(cli, args)
    signal.alarm(0)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    err = result.stderr
    if result.exit_code == 0:  # (states prints its summary on stderr)
        assert "tcptrace: error" not in err and "Traceback" not in err, err
        return
    errors = [line for line in err.splitlines() if not line.startswith("tcptrace: warning: ")]
    assert result.exit_code == 1, err
    assert len(errors) == 1, err
    assert errors[0].startswith(f"tcptrace: error: {path}"), err
    # A line at fault is named; messages about the whole file name none.
    whole_file = ("empty file", "holds no close() latency reports")
    assert re.match(rf"tcptrace: error: {re.escape(str(path))}:\d+: ", errors[0]) or any(
        w in errors[0] for w in whole_file
    ), err
    assert "\x1b" not in err and "Traceback" not in err


def test_the_unmutated_recordings_replay_cleanly() -> None:
    """What the fuzz starts from is valid: each recording replays in its own command."""
    own = {
        "closelat_linger_reset.jsonl": "closelat",
        "closewait_leaky.jsonl": "closewait",
        "lifecycle_basic.jsonl": "states",
        "timewait_mix.jsonl": "timewait",
    }
    assert sorted(own) == sorted(RECORDINGS)
    for name, command in own.items():
        result = CliRunner().invoke(cli, [command, "--json", "--from", str(DATA / name)])
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1])["type"] == "summary"
