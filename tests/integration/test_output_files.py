"""`tcptrace record` on a full disk: one line of error, and a recording valid up to its last
whole line (a 1 MiB tmpfs, mounted in a private mount namespace so nothing outlives the test)."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
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
