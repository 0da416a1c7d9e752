"""Output files as root: `tcptrace record` on a full disk gives one line of error and a
recording valid up to its last whole line (a 1 MiB tmpfs, mounted in a private mount
namespace so nothing outlives the test); names planted by another user in a shared
directory (symbolic links to root's files, a FIFO) are never followed or blocked on; an
unwritable report fails before anything is observed."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

RESET = struct.pack("ii", 1, 0)  # close() sends a reset: no TIME_WAIT left for the next test


def test_record_on_a_full_disk(port: int, tcptrace_cmd: list[str], tmp_path: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o size=1m tcptrace-test {mnt} || exit 99\n"
        f"{' '.join(tcptrace_cmd)} record -o {mnt}/rec.jsonl --port {port} --duration 90 2>{tmp_path}/err\n"
        f"echo $? >{tmp_path}/rc\n"
        f"cp {mnt}/rec.jsonl {tmp_path}/rec.jsonl\n"
    )
    listener = socket.create_server(("127.0.0.1", port))
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
            conn.close()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    rec = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    try:
        # Churn on the traced port until the recording fills the 1 MiB (~1 KiB a line).
        while rec.poll() is None:
            for _ in range(20):
                # A reset-closed client may reuse a 4-tuple whose server side the acceptor
                # has not closed yet: that connect is refused with a reset. Churn on.
                try:
                    with socket.create_connection(("127.0.0.1", port)) as client:
                        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                except ConnectionError:
                    continue
        assert rec.wait(timeout=120) == 0
    finally:
        stop.set()
        rec.kill()
        rec.wait()
        listener.close()
        acceptor.join()

    assert (tmp_path / "rc").read_text().strip() == "1"
    err = (tmp_path / "err").read_text()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(
        f"tcptrace: error: cannot write {mnt}/rec.jsonl: No space left on device "
        "(kept up to its last whole line: "
    ), err
    data = (tmp_path / "rec.jsonl").read_bytes()
    assert 500_000 < len(data) <= 1 << 20 and data.endswith(b"\n")
    assert f"{len(data)} bytes" in err
    # Valid to its last line, and a replay says it was cut short.
    replay = subprocess.run(
        [*tcptrace_cmd, "states", "--json", "--from", str(tmp_path / "rec.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replay.returncode == 0, replay.stderr
    assert "the recording was cut short" in replay.stderr
    assert '"cut_short":true' in replay.stdout.splitlines()[-1]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A sticky, world-writable directory like /tmp, where another user can plant names."""
    path = Path(tempfile.mkdtemp(prefix="tcptrace-shared-", dir="/tmp"))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def plant(*cmd: str) -> None:
    """Run ``cmd`` as nobody: what another local user can do in a shared directory."""
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", *cmd], check=True)


@pytest.mark.parametrize("force", [False, True], ids=["no_force", "force"])
def test_planted_links_are_never_followed(
    shared_dir: Path, tmp_path: Path, tcptrace_cmd: list[str], port: int, data_dir: Path, force: bool
) -> None:
    """record -o, diagnose --report and agent --log at names another user planted as symbolic
    links to a file of root's: the file is never written; without --force the name is
    refused, with it the link itself is replaced by our file."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    victim = tmp_path / "shadow"  # root's file, in a directory nobody else can enter
    victim.write_text("root:secret\n")
    names = {name: shared_dir / name for name in ("rec.jsonl", "report.html", "agent.log")}
    for link in names.values():
        plant("ln", "-s", str(victim), str(link))
    extra = ["--force"] if force else []
    runs = {
        "rec.jsonl": [*tcptrace_cmd, "record", "-o", str(names["rec.jsonl"]), "--port", str(port)]
        + ["--duration", "1", *extra],
        "report.html": [*tcptrace_cmd, "diagnose", "--from", str(data_dir / "closewait_leaky.jsonl")]
        + ["--report", str(names["report.html"]), *extra],
    }
    for name, cmd in runs.items():
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        link = names[name]
        if force:
            assert result.returncode == 0, result.stderr
            assert not link.is_symlink() and link.stat().st_uid == 0 and link.stat().st_size > 0
        else:
            assert result.returncode == 2, result.stderr
            assert result.stderr.strip().endswith("exists; pass --force to overwrite it"), result.stderr
            assert link.is_symlink()
    # agent --log appends to its own file only: a link there is refused before anything loads.
    agent = subprocess.run(
        [*tcptrace_cmd, "agent", "--log", str(names["agent.log"]), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert agent.returncode == 1
    refused = f"cannot write {names['agent.log']}: a symbolic link, not followed"
    assert agent.stderr == f"tcptrace: error: {refused}\n"
    assert victim.read_text() == "root:secret\n"


def test_a_planted_fifo_does_not_block_the_agent(shared_dir: Path, tcptrace_cmd: list[str]) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    fifo = shared_dir / "agent.log"
    plant("mkfifo", str(fifo))
    agent = subprocess.run(
        [*tcptrace_cmd, "agent", "--log", str(fifo), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert agent.returncode == 1 and agent.stderr.startswith(f"tcptrace: error: cannot write {fifo}: "), (
        agent.stderr
    )


def test_an_unwritable_report_fails_before_observing(tcptrace_cmd: list[str]) -> None:
    """Before: the whole --duration, then the error. Now at once, before anything is loaded
    (a 600 s observation would time out the run). /proc/sys takes no new file, even root's."""
    report = "/proc/sys/tcptrace-report.html"
    result = subprocess.run(
        [*tcptrace_cmd, "diagnose", "--duration", "600", "--report", report],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert (
        result.stderr.startswith(f"tcptrace: error: cannot write {report}: ")
        and result.stderr.count("\n") == 1
    )
