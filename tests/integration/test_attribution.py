"""Attribution on real runtimes: the stacks `tcptrace closewait` prints today, classified by
model/frames and model/hints, and a native frame's file:line from DWARF while the process lives.

Each test runs a program that leaks sockets in CLOSE_WAIT (a C server, a Go client that never
closes response bodies, a Node.js server that never ends half-open sockets), traces it, and
checks what a report would lead with against what the program is known to do.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from tcptrace.model.frames import classify_flat, parse_frame, without_tracer_frames
from tcptrace.model.hints import Attribution, Runtime, StackSample, attribute
from tcptrace.system.symbols import LineResolver, read_maps
from tests.gobuild import go_binary, needs_go
from tests.integration import helpers

FIXTURES = Path(__file__).parent / "fixtures"


@contextmanager
def started(cmd: list[str], cwd: Path | None = None) -> Iterator[subprocess.Popen[str]]:
    """A program that prints "ready" once it is listening (or has done its work)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=cwd)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready and "ready" in proc.stdout.readline():
                break
        else:
            raise AssertionError(f"{cmd[0]} did not start")
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        with suppress(FileNotFoundError):
            os.unlink(f"/tmp/perf-{proc.pid}.map")


class Closewait:
    """`tcptrace closewait --json --touch-stacks --port PORT`, attached once entered;
    ``stop()`` ends it and returns the summary's groups (call it while the traced program
    lives: its sockets close with it)."""

    def __init__(self, cmd: list[str], port: int) -> None:
        args = ["closewait", "--json", "--touch-stacks", "--threshold", "1s", "--interval", "0.5"]
        self.argv = [*cmd, *args, "--port", str(port)]
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Closewait:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        assert ready and json.loads(self.proc.stdout.readline())["type"] == "header", "tcptrace did not start"
        return self

    def stop(self) -> list[dict[str, Any]]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        summary = json.loads(out.splitlines()[-1])
        assert summary["type"] == "summary"
        return list(summary["groups"])

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def attribution(group: dict[str, Any], exe: str | None, perf_map: bool | None = None) -> Attribution:
    """What a report would lead with: the last touch first, then the origin."""
    samples = [
        StackSample(
            group["last_touch_op"] or "", classify_flat(group["last_touch_stack"]), eof=group["eof_seen"] > 0
        ),
        StackSample(group["origin_op"] or "", classify_flat(group["origin_stack"])),
    ]
    return attribute(group["comm"], exe, samples, perf_map=perf_map)


def close_wait_count(port: int) -> int:
    return helpers.SS().count(port, "close-wait")


def address_of(pid: int, frame: str) -> int:
    """The address of a symbolized frame (``function+0xOFF [module]``) in a live process,
    from the module's symbol table and the process's maps: what the symbolizer started from."""
    f = parse_frame(frame)
    assert f.offset is not None and f.module
    for m in read_maps(pid):
        if os.path.basename(m.path) != f.module or "x" not in m.perms:
            continue
        with open(m.path, "rb") as fh:
            elf = ELFFile(fh)
            symtab = elf.get_section_by_name(".symtab")
            assert symtab is not None
            value = next(int(s["st_value"]) for s in symtab.iter_symbols() if s.name == f.function)  # type: ignore[attr-defined]
            seg = next(
                s
                for s in elf.iter_segments()
                if s["p_type"] == "PT_LOAD" and s["p_vaddr"] <= value < s["p_vaddr"] + s["p_memsz"]
            )
        file_off = value + f.offset - seg["p_vaddr"] + seg["p_offset"]
        return m.start + file_off - m.offset
    raise AssertionError(f"{f.module} not mapped in {pid}")


def test_c_leak_leads_with_its_function_and_line(
    fixture_bin: helpers.FixtureBuilder, tcptrace_cmd: list[str], port: int
) -> None:
    exe = fixture_bin("leaky_server")
    with Closewait(tcptrace_cmd, port) as tracer, started([str(exe), str(port), "10"]) as server:
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for c in clients:
            c.sendall(b"L")
        time.sleep(0.3)  # the server's threads are reading, waiting for EOF
        for c in clients:
            c.close()
        assert helpers.wait_for(lambda: close_wait_count(port) == 3, timeout=10)
        time.sleep(1.3)  # past the threshold
        groups = tracer.stop()
        # Tracing stopped; the server still lives: its frames' lines from the binary's DWARF.
        assert groups and all(g["pid"] == server.pid and g["comm"] == "leaky_server" for g in groups)
        touch = [f for f in groups[0]["last_touch_stack"] if f.startswith("leak_connection+")]
        assert touch, groups[0]["last_touch_stack"]
        resolver = LineResolver()
        (annotated,) = resolver.annotate(server.pid, [address_of(server.pid, touch[0])], touch[:1])

    for g in groups:
        raw = g["last_touch_stack"]
        assert any(f.startswith("bpf_prog_") for f in raw), "today's stacks carry the tracer's frames"
        assert not any(f.startswith(("bpf_prog_", "bpf_trace_run")) for f in without_tracer_frames(raw))
        a = attribution(g, str(exe))
        assert a.runtime is Runtime.NATIVE and a.hints == ()
        assert a.frame is not None and a.frame.name == "leak_connection" and a.op == "RECV"
    # leak_connection's frame is the return address of its call of read_until_eof().
    source = (FIXTURES / "leaky_server.c").read_text().splitlines()
    start = next(i for i, line in enumerate(source, 1) if "void leak_connection(int fd)" in line)
    call = next(i for i, line in enumerate(source, 1) if i > start and "read_until_eof(fd);" in line)
    assert parse_frame(annotated).label() == f"leak_connection (leaky_server.c:{call})"
    assert parse_frame(annotated).file == str(FIXTURES / "leaky_server.c")


GO_CLIENT = """\
package main

import (
	"fmt"
	"net/http"
	"os"
	"time"
)

var kept []*http.Response

// fetchStatus forgets resp.Body.Close().
func fetchStatus(url string) int {
	resp, err := http.Get(url)
	if err != nil {
		panic(err)
	}
	kept = append(kept, resp)
	return resp.StatusCode
}

func main() {
	addr := "127.0.0.1:" + os.Args[1]
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		fmt.Fprintln(w, "hello")
	})
	go http.ListenAndServe(addr, nil)
	time.Sleep(200 * time.Millisecond)
	for i := 0; i < 3; i++ {
		fetchStatus("http://" + addr + "/")
	}
	fmt.Println("ready")
	time.Sleep(time.Hour)
}
"""


@needs_go
def test_go_client_that_never_closes_bodies_gets_the_hint(
    tcptrace_cmd: list[str], port: int, tmp_path: Path
) -> None:
    with (
        go_binary(tmp_path, GO_CLIENT) as exe,
        Closewait(tcptrace_cmd, port) as tracer,
        started([str(exe), str(port)]) as client,
    ):
        # The server closed each connection; the client never closed its side.
        assert helpers.wait_for(lambda: close_wait_count(port) == 3, timeout=10)
        time.sleep(1.3)  # past the threshold
        groups = tracer.stop()
        pid = client.pid

    mine = [g for g in groups if g["pid"] == pid]
    assert sum(g["count"] for g in mine) == 3, groups
    for g in mine:
        assert g["origin_op"] == "CONNECT"
        a = attribution(g, str(exe))
        assert a.runtime is Runtime.GO
        assert a.frame is None  # dialled in a transport goroutine: no stack reaches fetchStatus
        assert [h.code for h in a.hints] == ["go-http-body-not-closed"]
        assert any("net/http.(*Transport).dialConn" in e for e in a.hints[0].evidence)


NODE_SERVER = """\
const net = require('net');

function rejectTooLarge(socket, size) {
  socket.write(`ERR ${size} bytes is too large\\n`);
  // the leak: no socket.end(); with allowHalfOpen the client's FIN leaves it open
}

function onData(socket, chunk) {
  if (chunk.length > 16) {
    rejectTooLarge(socket, chunk.length);
    return;
  }
  socket.end('OK\\n');
}

const server = net.createServer({ allowHalfOpen: true }, (socket) => {
  socket.on('data', (chunk) => onData(socket, chunk));
});
server.listen(Number(process.argv[2]), '127.0.0.1', () => console.log('ready'));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node")
def test_node_server_that_never_ends_half_open_sockets_gets_the_hint(
    tcptrace_cmd: list[str], port: int, tmp_path: Path
) -> None:
    script = tmp_path / "server.js"
    script.write_text(NODE_SERVER)
    node = ["node", "--perf-basic-prof", "--interpreted-frames-native-stack", str(script), str(port)]
    # In tmp_path: --perf-basic-prof also writes V8's isolate-*-v8.log into the working directory.
    with Closewait(tcptrace_cmd, port) as tracer, started(node, cwd=tmp_path) as server:
        for _ in range(2):
            c = socket.create_connection(("127.0.0.1", port))
            c.sendall(b"x" * 100)
            assert c.recv(100).startswith(b"ERR 100 bytes")
            c.close()
        assert helpers.wait_for(lambda: close_wait_count(port) == 2, timeout=10)
        time.sleep(1.3)  # past the threshold
        groups = tracer.stop()
        pid = server.pid
        perf_map = os.path.exists(f"/tmp/perf-{pid}.map")

    assert perf_map
    mine = [g for g in groups if g["pid"] == pid]
    assert sum(g["count"] for g in mine) == 2, groups
    for g in mine:
        a = attribution(g, shutil.which("node"), perf_map=perf_map)
        assert a.runtime is Runtime.NODE
        assert "node-end-not-called" in [h.code for h in a.hints]
        assert any("uv__" in e for e in a.hints[0].evidence)
