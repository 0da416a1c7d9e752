"""Attribution end to end, on real runtimes and the real kernel: what `tcptrace closewait` and
`tcptrace diagnose` lead a leak with.

Each test runs a program that leaks sockets in CLOSE_WAIT on a known code path (a C server
built with -g, a Node.js server leaking on one route, a Go client that never closes response
bodies, a Go server leaking on an error path, a Python server), traces it with the CLI, and
checks the application frame (with its file:line from DWARF or the perf map) or the runtime's
hint against what the program is known to do, and that no stack shows the tracer's own frames.
"""

from __future__ import annotations

import glob
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from tests.gobuild import go_binary, needs_go
from tests.integration import helpers

FIXTURES = Path(__file__).parent / "fixtures"
TRACER_FRAME = re.compile(r"^(bpf_prog_|bpf_trace_run|__traceiter_|call_trace_|perf_trace_)")


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


class Traced:
    """`tcptrace COMMAND --json ... --port PORT`, attached once its header is out; ``stop()``
    interrupts it and returns its summary (call it while the traced program lives: its
    sockets close with it, and its lines and facts are read at the end)."""

    def __init__(self, cmd: list[str], args: list[str], port: int) -> None:
        self.argv = [*cmd, *args, "--json", "--threshold", "1s", "--interval", "0.5", "--port", str(port)]
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Traced:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        assert ready and json.loads(self.proc.stdout.readline())["type"] == "header", "tcptrace did not start"
        return self

    def stop(self) -> dict[str, Any]:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        summary: dict[str, Any] = json.loads(out.splitlines()[-1])
        assert summary["type"] == "summary"
        return summary

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def closewait(cmd: list[str], port: int, touch_stacks: bool = True) -> Traced:
    """``touch_stacks``: pass --touch-stacks; else no flag, the default (on: --port is given)."""
    return Traced(cmd, ["closewait", *(["--touch-stacks"] if touch_stacks else [])], port)


def diagnose(cmd: list[str], port: int) -> Traced:
    return Traced(cmd, ["diagnose", "--duration", "120"], port)


def close_wait_count(port: int) -> int:
    return helpers.SS().count(port, "close-wait")


def summaries_once_leaked(port: int, count: int, *tracers: Traced) -> list[dict[str, Any]]:
    """Each tracer's summary, once ``count`` sockets of ``port`` are in CLOSE_WAIT (ss) and
    older than the threshold."""
    assert helpers.wait_for(lambda: close_wait_count(port) == count, timeout=10)
    time.sleep(1.3)  # past the threshold
    return [t.stop() for t in tracers]


def groups_of(summary: dict[str, Any], pid: int, count: int) -> list[dict[str, Any]]:
    """The groups of ``pid`` in closewait's summary, which hold ``count`` sockets together."""
    mine = [g for g in summary["groups"] if g["pid"] == pid]
    assert sum(g["count"] for g in mine) == count, summary["groups"]
    return mine


def stacks_of(group: dict[str, Any]) -> list[list[str]]:
    """Every stack of a group in closewait's JSON."""
    out = [group["origin_stack"], group["last_touch_stack"]]
    out += [group[k]["stack"] for k in ("pre_fin_touch", "post_fin_touch") if group[k] is not None]
    return out


def assert_no_tracer_frames(group: dict[str, Any]) -> None:
    for stack in stacks_of(group):
        assert stack, json.dumps(group, indent=1)
        assert not [f for f in stack if TRACER_FRAME.match(f)], stack


def leak_verdicts(summary: dict[str, Any], pid: int) -> list[dict[str, Any]]:
    return [v for v in summary["verdicts"] if v["topic"] == "close_wait_leak" and v["pid"] == pid]


def line_of(source: str, text: str, after: str | None = None) -> int:
    """The number of the first line holding ``text`` (after the first holding ``after``)."""
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if after in line) if after is not None else 0
    return next(i for i, line in enumerate(lines) if i >= start and text in line) + 1


def test_c_leak_is_named_with_its_function_and_line(
    fixture_bin: helpers.FixtureBuilder, tcptrace_cmd: list[str], port: int
) -> None:
    exe = fixture_bin("leaky_server")
    with (
        closewait(tcptrace_cmd, port) as cw,
        diagnose(tcptrace_cmd, port) as dg,
        started([str(exe), str(port), "10"]) as server,
    ):
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for c in clients:
            c.sendall(b"L")
        time.sleep(0.3)  # the server's threads are reading, waiting for EOF
        for c in clients:
            c.close()
        summary, diagnosis = summaries_once_leaked(port, 3, cw, dg)
        pid = server.pid

    # leak_connection's frame is the return address of its call of read_until_eof(): the
    # line of that call, from the binary's DWARF.
    source = (FIXTURES / "leaky_server.c").read_text()
    line = line_of(source, "read_until_eof(fd);", after="void leak_connection(int fd)")
    (group,) = summary["groups"]
    assert (group["pid"], group["comm"], group["count"]) == (pid, "leaky_server", 3)
    assert group["app"] == f"leak_connection (leaky_server.c:{line})"
    assert group["app_from"] == "post_fin_touch" and group["post_fin_touch"]["eof"]
    assert group["app_frame"].endswith(f" at {FIXTURES / 'leaky_server.c'}:{line}")
    assert group["runtime"] == "native" and group["hints"] == []
    assert_no_tracer_frames(group)
    (verdict,) = leak_verdicts(diagnosis, pid)
    assert (
        f"in CLOSE_WAIT at leak_connection (leaky_server.c:{line}): the app read EOF there" in verdict["text"]
    )
    assert verdict["functions"][0] == "leak_connection"


NODE_SERVER = """\
const net = require('net');

function rejectTooLarge(socket, size) {
  socket.write(`HTTP/1.1 413 Payload Too Large\\r\\ncontent-length: ${size}\\r\\n\\r\\n`);
  // the leak: no socket.end(); with allowHalfOpen the client's FIN leaves it open
}

function upload(socket, body) {
  if (body.length > 16) {
    rejectTooLarge(socket, body.length);
    return;
  }
  socket.end('HTTP/1.1 201 Created\\r\\n\\r\\n');
}

function health(socket) {
  socket.end('HTTP/1.1 200 OK\\r\\n\\r\\n');
}

const routes = { '/upload': upload, '/health': health };

const server = net.createServer({ allowHalfOpen: true }, (socket) => {
  socket.on('data', (chunk) => {
    const [head, body] = chunk.toString().split('\\r\\n\\r\\n');
    const path = head.split(' ')[1];
    (routes[path] || health)(socket, body || '');
  });
  socket.on('end', () => {});
});
server.listen(Number(process.argv[2]), '127.0.0.1', () => console.log('ready'));
"""


def request(port: int, path: str, body: bytes = b"") -> bytes:
    """One request on its own connection; the reply read, then our side closed."""
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode() + body)
        return c.recv(1000)


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node (scripts/install --dev)")
def test_node_server_leaking_on_one_route_is_named_by_that_routes_function(
    tcptrace_cmd: list[str], port: int, tmp_path: Path
) -> None:
    script = tmp_path / "server.js"
    script.write_text(NODE_SERVER)
    node = ["node", "--perf-basic-prof", "--interpreted-frames-native-stack", str(script), str(port)]
    # In tmp_path: --perf-basic-prof also writes V8's isolate-*-v8.log into the working directory.
    # Both as a user runs them: --port alone keeps the touch before the FIN (no flag given).
    with (
        closewait(tcptrace_cmd, port, touch_stacks=False) as cw,
        diagnose(tcptrace_cmd, port) as dg,
        started(node, cwd=tmp_path) as server,
    ):
        for _ in range(3):
            assert request(port, "/health").startswith(b"HTTP/1.1 200")
            assert request(port, "/upload", b"x" * 10).startswith(b"HTTP/1.1 201")
        for _ in range(2):
            assert request(port, "/upload", b"x" * 100).startswith(b"HTTP/1.1 413")
        summary, diagnosis = summaries_once_leaked(port, 2, cw, dg)
        pid = server.pid

    mine = groups_of(summary, pid, 2)
    # V8 names a function by where it is defined: its line, and the column of its parameters.
    line = line_of(NODE_SERVER, "function rejectTooLarge(")
    for g in mine:
        assert g["runtime"] == "node"
        assert g["app"].startswith(f"rejectTooLarge (server.js:{line}:"), g["app"]
        assert g["app_from"] == "pre_fin_touch" and g["pre_fin_touch"]["op"] == "SEND"
        assert "node-end-not-called" in [h["code"] for h in g["hints"]]
        assert_no_tracer_frames(g)
    verdicts = leak_verdicts(diagnosis, pid)
    assert verdicts and all(f"rejectTooLarge (server.js:{line}:" in v["text"] for v in verdicts), verdicts


GO_PROGRAM = """\
package main

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
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

// handleConn answers one line; its error path forgets conn.Close().
func handleConn(conn net.Conn) {
	line, err := bufio.NewReader(conn).ReadString('\\n')
	if err != nil || strings.TrimSpace(line) != "hello" {
		fmt.Fprintf(conn, "ERR bad request\\n")
		return
	}
	fmt.Fprintf(conn, "OK\\n")
	conn.Close()
}

func serveRaw(addr string) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		panic(err)
	}
	fmt.Println("ready")
	for {
		conn, err := ln.Accept()
		if err != nil {
			continue
		}
		go handleConn(conn)
	}
}

func main() {
	addr := "127.0.0.1:" + os.Args[2]
	switch os.Args[1] {
	case "http":
		http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Connection", "close")
			fmt.Fprintln(w, "hello")
		})
		go func() {
			time.Sleep(200 * time.Millisecond)
			fmt.Println("ready")
		}()
		http.ListenAndServe(addr, nil)
	case "fetch":
		for i := 0; i < 3; i++ {
			fetchStatus("http://" + addr + "/")
		}
		fmt.Println("ready")
		time.Sleep(time.Hour)
	case "raw":
		serveRaw(addr)
	}
}
"""


@needs_go
def test_go_client_that_never_closes_bodies_gets_the_hint_and_its_own_pid(
    tcptrace_cmd: list[str], port: int, tmp_path: Path
) -> None:
    with (
        go_binary(tmp_path, GO_PROGRAM) as exe,
        closewait(tcptrace_cmd, port, touch_stacks=False) as cw,
        diagnose(tcptrace_cmd, port) as dg,
        started([str(exe), "http", str(port)]) as server,
        started([str(exe), "fetch", str(port)]) as client,
    ):
        # The server closed each connection; the client never closed its side.
        summary, diagnosis = summaries_once_leaked(port, 3, cw, dg)
        pids = {"client": client.pid, "server": server.pid}

    assert {g["pid"] for g in summary["groups"]} == {pids["client"]}, summary["groups"]
    assert sum(g["count"] for g in summary["groups"]) == 3
    for g in summary["groups"]:
        assert g["runtime"] == "go" and g["app"] is None  # dialled in a transport goroutine
        assert [h["code"] for h in g["hints"]] == ["go-http-body-not-closed"]
        assert any("net/http.(*Transport).dialConn" in e for e in g["hints"][0]["evidence"])
        assert_no_tracer_frames(g)
    assert leak_verdicts(diagnosis, pids["server"]) == []
    verdicts = leak_verdicts(diagnosis, pids["client"])
    assert verdicts and all("resp.Body.Close()" in v["text"] for v in verdicts)
    assert all(v["text"].startswith(f"pid {pids['client']} (prog) leaks") for v in verdicts)


@needs_go
def test_go_server_leaking_on_an_error_path_is_named_by_its_handler_and_line(
    tcptrace_cmd: list[str], port: int, tmp_path: Path
) -> None:
    with (
        go_binary(tmp_path, GO_PROGRAM) as exe,
        closewait(tcptrace_cmd, port) as cw,
        started([str(exe), "raw", str(port)]) as server,
    ):
        for line in (b"hello\n", b"bad\n", b"hello\n", b"bad\n"):
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(line)
                assert c.recv(100) in (b"OK\n", b"ERR bad request\n")
        (summary,) = summaries_once_leaked(port, 2, cw)
        pid = server.pid

    mine = groups_of(summary, pid, 2)
    # The error path's write, from the binary's DWARF (Go's line table, compressed).
    line = line_of(GO_PROGRAM, 'fmt.Fprintf(conn, "ERR bad request')
    for g in mine:
        assert g["runtime"] == "go"
        assert g["app"] == f"main.handleConn (main.go:{line})", g
        assert g["app_from"] == "pre_fin_touch" and g["pre_fin_touch"]["op"] == "SEND"
        assert_no_tracer_frames(g)


WIRE = """\
package wire

import (
	"fmt"
	"net"
)

// Reject answers a bad request; closing the connection is the caller's job.
//
//go:noinline
func Reject(conn net.Conn) {
	fmt.Fprintf(conn, "ERR bad request\\n")
}
"""

GO_SERVER_WITH_A_DEPENDENCY = """\
package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strings"

	"example.com/wire"
)

func handleConn(conn net.Conn) {
	line, _ := bufio.NewReader(conn).ReadString('\\n')
	if strings.TrimSpace(line) != "hello" {
		wire.Reject(conn)
		return // the leak: conn never closed on this path
	}
	fmt.Fprintf(conn, "OK\\n")
	conn.Close()
}

func main() {
	ln, err := net.Listen("tcp", "127.0.0.1:"+os.Args[1])
	if err != nil {
		panic(err)
	}
	fmt.Println("ready")
	for {
		conn, err := ln.Accept()
		if err == nil {
			go handleConn(conn)
		}
	}
}
"""


@needs_go
def test_go_leak_inside_a_dependency_is_named_by_the_apps_caller(
    tcptrace_cmd: list[str], port: int, tmp_path: Path
) -> None:
    with (
        go_binary(tmp_path, GO_SERVER_WITH_A_DEPENDENCY, deps={"example.com/wire": WIRE}) as exe,
        closewait(tcptrace_cmd, port) as cw,
        diagnose(tcptrace_cmd, port) as dg,
        started([str(exe), str(port)]) as server,
    ):
        for line in (b"bad\n", b"hello\n", b"bad\n"):
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(line)
                assert c.recv(100) in (b"OK\n", b"ERR bad request\n")
        summary, diagnosis = summaries_once_leaked(port, 2, cw, dg)
        pid = server.pid

    # The reply was written in the dependency (its frames are in the stack), but the
    # module is library code by the binary's build info: the app's caller leads.
    line = line_of(GO_SERVER_WITH_A_DEPENDENCY, "wire.Reject(conn)")
    for g in groups_of(summary, pid, 2):
        assert g["app"] == f"main.handleConn (main.go:{line})", g
        assert g["app_from"] == "pre_fin_touch"
        assert any(f.startswith("example.com/wire.Reject") for f in g["pre_fin_touch"]["stack"])
        assert_no_tracer_frames(g)
    verdicts = leak_verdicts(diagnosis, pid)
    assert verdicts and all(f"main.handleConn (main.go:{line})" in v["text"] for v in verdicts), verdicts


PY_SERVER = """\
import socket, sys

kept = []
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    conn.recv(100)
    conn.sendall(b"hello\\n")
    kept.append(conn)  # the leak: never closed
"""


def python312() -> str | None:
    """A CPython 3.12 that runs: on PATH, or one pyenv installed (Debian 12 ships none)."""
    pyenv = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    candidates = [shutil.which("python3.12"), *pyenv]
    for path in candidates:
        if path and subprocess.run([path, "-c", "pass"], capture_output=True).returncode == 0:
            return path
    return None


PY312 = python312()


def pythons() -> list[Any]:
    """CPython 3.11 as Debian ships it, and 3.12 with -X perf where one exists. Debian 12 has
    no 3.12 package: without one the case is not collected (a skip would fail CI, and the
    perf-map names of 3.12 are unit-tested on real maps in tests/data/perfmaps/); the run's
    summary says so (tests/integration/conftest.py)."""
    out = [pytest.param([sys.executable], id="python-running-the-tests")]
    if PY312 is not None:
        out.append(pytest.param([PY312, "-X", "perf"], id="python3.12-X-perf"))
    return out


@pytest.mark.parametrize("python", pythons())
def test_python_leak_names_its_functions_or_says_only_the_interpreter_is_visible(
    python: list[str], tcptrace_cmd: list[str], port: int, tmp_path: Path
) -> None:
    script = tmp_path / "server.py"
    script.write_text(PY_SERVER)
    with (
        closewait(tcptrace_cmd, port) as cw,
        diagnose(tcptrace_cmd, port) as dg,
        started([*python, str(script), str(port)]) as server,
    ):
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(b"hi")
                assert c.recv(100) == b"hello\n"
        summary, diagnosis = summaries_once_leaked(port, 2, cw, dg)
        pid = server.pid
        perf_map = os.path.exists(f"/tmp/perf-{pid}.map")

    mine = groups_of(summary, pid, 2)
    assert perf_map == ("perf" in python)
    for g in mine:
        assert g["runtime"] == "python"
        assert_no_tracer_frames(g)
        if g["app"] is not None:  # an interpreter with frame pointers: the script's frames
            assert g["app_frame"].startswith("py::") and f":{script}+0x" in g["app_frame"]
            continue
        (hint,) = [h for h in g["hints"] if h["code"] == "python-interpreter-only"]
        assert ("its perf map names them" in hint["text"]) == perf_map
        assert g["scope"] == f"accepted from its listener on port {port}"
    (verdict,) = leak_verdicts(diagnosis, pid)
    if mine[0]["app"] is None:
        assert (
            f"(accepted from its listener on port {port}): Only the CPython interpreter is visible"
            in verdict["text"]
        )
