"""Output files in shared directories: no symlink followed, nothing replaced without
--force, a full disk leaves whole lines and one error (system/safefile.py).

The tests run as root (as tcptrace does) where they plant files owned by someone else;
the ENOSPC of a real file system (a 1 MiB tmpfs) is in tests/integration/test_output_files.py.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from tcptrace.cli import cli
from tcptrace.errors import TcptraceError, UsageError
from tcptrace.recording import JsonLinesWriter, open_recording
from tcptrace.system import safefile
from tcptrace.system.safefile import LineSafeWriter, check_output, create_output, open_append, write_atomic

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="plants files of another user: needs root")
NOBODY = 65534


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file another user wants root to overwrite, and a link to it planted in a shared dir."""
    target = tmp_path / "shadow"
    target.write_text("secret\n")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "out").symlink_to(target)
    return target


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ---- whole files: write_atomic (diagnose --report) -------------------------------------


def test_write_atomic_creates_and_refuses_to_replace(tmp_path: Path) -> None:
    path = tmp_path / "r.html"
    write_atomic(str(path), "one\n", force=False)
    assert path.read_text() == "one\n"
    with pytest.raises(UsageError, match="exists; pass --force"):
        write_atomic(str(path), "two\n", force=False)
    assert path.read_text() == "one\n" and leftovers(tmp_path) == []
    write_atomic(str(path), "two\n", force=True)
    assert path.read_text() == "two\n" and leftovers(tmp_path) == []


def test_write_atomic_never_follows_a_planted_link(victim: Path) -> None:
    link = victim.parent / "shared" / "out"
    with pytest.raises(UsageError, match="exists"):
        write_atomic(str(link), "x\n", force=False)
    write_atomic(str(link), "report\n", force=True)  # the link is replaced, not followed
    assert not link.is_symlink() and link.read_text() == "report\n"
    assert victim.read_text() == "secret\n"


def test_write_atomic_failure_leaves_nothing_and_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "r.html"
    path.write_text("old\n")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safefile.os, "fsync", full)
    with pytest.raises(TcptraceError, match="cannot write .*: No space left on device"):
        write_atomic(str(path), "new\n", force=True)
    assert path.read_text() == "old\n" and leftovers(tmp_path) == []


# ---- check_output: before any tracing --------------------------------------------------


def test_check_output(tmp_path: Path) -> None:
    check_output(str(tmp_path / "new.html"), force=False)
    assert list(tmp_path.iterdir()) == []  # the probe is gone
    (tmp_path / "old.html").write_text("x")
    with pytest.raises(UsageError, match="exists; pass --force"):
        check_output(str(tmp_path / "old.html"), force=False)
    check_output(str(tmp_path / "old.html"), force=True)
    with pytest.raises(UsageError, match="no directory"):
        check_output(str(tmp_path / "nodir" / "r.html"), force=False)
    with pytest.raises(UsageError, match="is a directory"):
        check_output(str(tmp_path), force=True)
    with pytest.raises(UsageError, match="is a character device"):
        check_output("/dev/null", force=True)


@root_only
def test_check_output_unwritable_directory() -> None:
    # sysfs refuses new files even to root: what a read-only or foreign directory does.
    with pytest.raises(TcptraceError, match="cannot write /sys/kernel/r.html: Permission denied"):
        check_output("/sys/kernel/r.html", force=False)


def test_diagnose_report_to_an_unwritable_place_fails_before_observing(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tcptrace.commands.diagnose

    def no_observing(*args: object, **kwargs: object) -> None:
        raise AssertionError("observed before checking --report")

    monkeypatch.setattr(tcptrace.commands.diagnose, "open_feeds", no_observing)
    cases = [(str(tmp_path / "nodir" / "r.html"), 2, "no directory"), ("/dev/null", 2, "a character device")]
    if os.geteuid() == 0:
        cases.append(("/sys/kernel/r.html", 1, "Permission denied"))
    for report, code, message in cases:
        args = ["diagnose", "--from", str(data_dir / "closewait_leaky.jsonl"), "--report", report, "--force"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == code and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1


def test_diagnose_report_replaces_a_planted_link_only_with_force(data_dir: Path, victim: Path) -> None:
    link = victim.parent / "shared" / "out"
    args = ["diagnose", "--from", str(data_dir / "closewait_leaky.jsonl"), "--report", str(link)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "exists" in result.stderr
    result = CliRunner().invoke(cli, [*args, "--force"])
    assert result.exit_code == 0, result.stderr
    assert link.read_text().startswith("<!DOCTYPE html>") and victim.read_text() == "secret\n"
    assert leftovers(link.parent) == []


# ---- streams: create_output (record -o) -------------------------------------------------


def test_create_output_never_follows_a_link(victim: Path) -> None:
    link = victim.parent / "shared" / "out"
    with pytest.raises(UsageError, match="exists"):
        create_output(str(link), force=False)
    dangling = victim.parent / "shared" / "dangling"
    dangling.symlink_to(victim.parent / "created-by-root")
    with pytest.raises(UsageError, match="exists"):
        create_output(str(dangling), force=False)
    assert not (victim.parent / "created-by-root").exists()
    with create_output(str(link), force=True) as out:
        out.write("line\n")
    assert not link.is_symlink() and link.read_text() == "line\n"
    assert victim.read_text() == "secret\n"


def test_record_never_writes_through_a_planted_link(victim: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tcptrace.commands.record
    from tcptrace.commands.states import Streamed

    def fake_trace(name: str, flt: object, from_file: object, *args: object, **kwargs: object) -> Streamed:
        out = args[3]  # what stream_events writes the recording to
        out.write('{"type":"header"}\n')  # type: ignore[attr-defined]
        return Streamed(events=0, lost=0, reason="duration")

    monkeypatch.setattr(tcptrace.commands.record, "stream_events", fake_trace)
    shared = victim.parent / "shared"
    (shared / "dangling").symlink_to(victim.parent / "created-by-root")
    for name in ("out", "dangling"):
        result = CliRunner().invoke(cli, ["record", "-o", str(shared / name), "--duration", "1"])
        assert result.exit_code == 2 and "exists" in result.stderr
        result = CliRunner().invoke(cli, ["record", "-o", str(shared / name), "--duration", "1", "--force"])
        assert result.exit_code == 0, result.stderr
        assert not (shared / name).is_symlink() and (shared / name).read_text() == '{"type":"header"}\n'
    assert victim.read_text() == "secret\n" and not (victim.parent / "created-by-root").exists()


class FillingDisk:
    """os.write on a disk with ``room`` bytes left: a partial write, then ENOSPC."""

    def __init__(self, room: int) -> None:
        self.room = room

    def __call__(self, fd: int, data: bytes) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, data[: self.room])
        self.room -= n
        return n


def test_a_full_disk_leaves_whole_lines_and_one_error(tmp_path: Path, data_dir: Path) -> None:
    import io

    path = tmp_path / "rec.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    raw = LineSafeWriter(fd, str(path), write=FillingDisk(5000))
    out = io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8")
    writer = JsonLinesWriter(out)
    source = open_recording(str(data_dir / "closewait_leaky.jsonl"))
    writer.write(source.header)
    with pytest.raises(TcptraceError) as failure:
        for event in source.events():
            writer.event(event)
    out.close()  # flushes what was buffered: dropped, no second error
    message = str(failure.value)
    assert message.startswith(
        f"cannot write {path}: No space left on device (kept up to its last whole line:"
    )
    data = path.read_bytes()
    assert 0 < len(data) <= 5000 and data.endswith(b"\n")
    assert f"{len(data)} bytes" in message
    rec = open_recording(str(path))  # valid up to its last line, and says it was cut short
    warnings: list[str] = []
    rec.warn = warnings.append
    assert len(list(rec.events())) > 0 and rec.cut_short and warnings


# ---- logs: open_append (agent --log) ----------------------------------------------------


def test_open_append_appends_to_our_own_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.jsonl"
    for n in range(2):
        with open_append(str(path)) as log:
            log.write(json.dumps({"n": n}) + "\n")
    assert path.read_text() == '{"n": 0}\n{"n": 1}\n'
    assert path.stat().st_mode & 0o777 == safefile.LOG_MODE & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_open_append_refuses_links_fifos_and_hard_links(victim: Path, tmp_path: Path) -> None:
    with pytest.raises(TcptraceError, match="a symbolic link, not followed"):
        open_append(str(victim.parent / "shared" / "out"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(TcptraceError, match="cannot write"):  # no reader: ENXIO, no blocking
        open_append(str(fifo))
    hard = tmp_path / "shared" / "hard"
    os.link(victim, hard)
    with pytest.raises(TcptraceError, match="2 hard links"):
        open_append(str(hard))
    assert victim.read_text() == "secret\n"


@root_only
def test_open_append_refuses_a_file_of_another_user(tmp_path: Path) -> None:
    planted = tmp_path / "agent.jsonl"
    planted.write_text("")
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(TcptraceError, match=f"owned by uid {NOBODY}, not by us"):
        open_append(str(planted))


def test_agent_log_refuses_a_planted_link(victim: Path) -> None:
    link = victim.parent / "shared" / "out"
    result = CliRunner().invoke(cli, ["agent", "--log", str(link), "--duration", "1"])
    assert result.exit_code == 1 and "a symbolic link, not followed" in result.stderr, result.stderr
    assert victim.read_text() == "secret\n"
