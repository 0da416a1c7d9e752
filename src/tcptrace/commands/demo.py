"""`tcptrace demo`: a leaky server and a churning client on loopback, traced live.

With no workload of the user's, the demo starts two processes of its own:

- ``demo-server`` listens on a free loopback port. Each connection sends one byte: most
  are served by ``handle_ok()``, which reads to EOF and closes; one in ten goes to
  ``handle_leaky()``, which reads to EOF and "forgets" to close, the classic CLOSE_WAIT
  leak. It is a small C program built at run time with frame pointers when a C compiler
  exists, so its user stacks name those functions; else a Python equivalent runs, whose
  Python functions frame-pointer unwinding cannot see (Python < 3.12): the leak is then
  attributed to the process and its kernel stacks only.
- ``demo-client`` connects about 10 times a second and closes first, so it churns
  TIME_WAIT sockets, and one connection in ten is one the server leaks (about one a second).

Rates are bounded and everything stays on 127.0.0.1. The live view (`top`, filtered to the
demo's port) runs until --duration, q, Ctrl-C or SIGTERM; then the demo stops both
processes, destroys the sockets left on its port (its client's TIME_WAIT sockets, with
`ss -K`), checks with `ss` that none is left, and prints the diagnosis of what it saw.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from tcptrace.commands.options import threshold_ns
from tcptrace.errors import EnvironmentProblem, TcptraceError

SERVER_C = r"""
/* tcptrace demo server: leaks every connection whose first byte is 'L'. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_LEAKED 300 /* bounded: past this, the oldest leaked fd is closed */

static int leaked[MAX_LEAKED];
static int n_leaked;

/* recvfrom through syscall(3): a leaf that keeps %rbp, so frame-pointer stacks walk on
 * past libc into the handlers below. */
__attribute__((noinline)) static long read_request(int fd, char *buf, unsigned long len)
{
    return syscall(SYS_recvfrom, fd, buf, len, 0, NULL, NULL);
}

__attribute__((noinline)) void handle_ok(int fd)
{
    char buf[256];
    while (read_request(fd, buf, sizeof(buf)) > 0)
        ;
    close(fd);
}

__attribute__((noinline)) void handle_leaky(int fd)
{
    char buf[256];
    while (read_request(fd, buf, sizeof(buf)) > 0)
        ;
    /* The bug: this error path forgets close(fd). */
    if (n_leaked == MAX_LEAKED) {
        close(leaked[0]);
        for (int i = 1; i < MAX_LEAKED; i++)
            leaked[i - 1] = leaked[i];
        n_leaked--;
    }
    leaked[n_leaked++] = fd;
}

__attribute__((noinline)) void handle_conn(int fd)
{
    char kind = 0;
    if (read_request(fd, &kind, 1) != 1) {
        close(fd);
        return;
    }
    if (kind == 'L')
        handle_leaky(fd);
    else
        handle_ok(fd);
}

/* accept through syscall(3) too, so that accept_loop() shows in the stack. */
__attribute__((noinline)) static int accept_conn(int lfd)
{
    return (int)syscall(SYS_accept4, lfd, NULL, NULL, 0);
}

__attribute__((noinline)) void accept_loop(int lfd)
{
    for (;;) {
        int fd = accept_conn(lfd);
        if (fd >= 0)
            handle_conn(fd);
    }
}

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) || listen(lfd, 128)) {
        perror("demo-server: bind/listen");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    accept_loop(lfd);
    return 0;
}
"""

SERVER_PY = r"""
import ctypes, socket, sys
ctypes.CDLL(None).prctl(15, b"demo-server", 0, 0, 0)
MAX_LEAKED = 300
leaked = []

def read_request(conn, n):
    return conn.recv(n)

def handle_ok(conn):
    while read_request(conn, 256):
        pass
    conn.close()

def handle_leaky(conn):
    while read_request(conn, 256):
        pass
    # The bug: this error path forgets conn.close().
    if len(leaked) == MAX_LEAKED:
        leaked.pop(0).close()
    leaked.append(conn)

def handle_conn(conn):
    kind = read_request(conn, 1)
    if kind == b"L":
        handle_leaky(conn)
    elif kind:
        handle_ok(conn)
    else:
        conn.close()

def accept_loop(lsock):
    while True:
        conn, _ = lsock.accept()
        handle_conn(conn)

lsock = socket.socket()
lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsock.bind(("127.0.0.1", int(sys.argv[1])))
lsock.listen(128)
print("ready", flush=True)
accept_loop(lsock)
"""

CLIENT_PY = r"""
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"demo-client", 0, 0, 0)
port, rate, leak_every = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
n = 0
next_at = time.monotonic()
while True:
    n += 1
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
        c.sendall(b"L" if n % leak_every == 0 else b"G")
        c.close()  # the client closes first: its side goes to TIME_WAIT
    except OSError:
        pass
    next_at += 1.0 / rate
    time.sleep(max(0.0, next_at - time.monotonic()))
"""

RATE_PER_S = 10.0
LEAK_EVERY = 10


@dataclass
class Workload:
    """The demo's processes and port; ``stop()`` ends them and cleans up after them."""

    port: int
    server: subprocess.Popen[bytes]
    client: subprocess.Popen[bytes]
    native: bool
    workdir: str
    notes: list[str] = field(default_factory=list)

    @property
    def pids(self) -> tuple[int, int]:
        return (self.server.pid, self.client.pid)

    def stop(self) -> list[str]:
        """Stop both processes, destroy sockets left on the port, report what was left."""
        for proc in (self.client, self.server):
            _terminate(proc)
        shutil.rmtree(self.workdir, ignore_errors=True)
        left = sockets_on(self.port)
        if left:
            destroy_sockets(self.port)
            deadline = time.monotonic() + 2
            while left and time.monotonic() < deadline:
                time.sleep(0.05)
                left = sockets_on(self.port)
        report = [f"stopped demo-server (pid {self.server.pid}) and demo-client (pid {self.client.pid})"]
        if left is None:
            report.append("could not check for sockets left behind: `ss` is not installed")
        elif left:
            report.append(
                f"{len(left)} sockets are left on port {self.port} (the kernel could not destroy them): "
                "TIME_WAIT ones end by themselves within 60 s"
            )
        else:
            report.append(f"no socket left on port {self.port}")
        return report


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=3)
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            stream.close()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if tcptrace dies (even by SIGKILL)."""
    import ctypes

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def sockets_on(port: int) -> list[str] | None:
    """Lines of `ss` for TCP sockets with ``port`` as local or remote port (None: no ss)."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(
        ["ss", "-tanH", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def destroy_sockets(port: int) -> None:
    """Destroy the sockets on ``port`` (sock_diag SOCK_DESTROY, via `ss -K`)."""
    if shutil.which("ss") is None:
        return
    subprocess.run(
        ["ss", "-K", "-tanH", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_server(workdir: str) -> str | None:
    """Compile the C server with frame pointers; None when there is no compiler or it fails."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = os.path.join(workdir, "demo-server.c")
    exe = os.path.join(workdir, "demo-server")
    with open(src, "w") as fh:
        fh.write(SERVER_C)
    result = subprocess.run(
        [cc, "-O0", "-g", "-fno-omit-frame-pointer", "-fno-inline", "-o", exe, src],
        capture_output=True,
        check=False,
    )
    return exe if result.returncode == 0 else None


@contextmanager
def workload(port: int | None = None) -> Iterator[Workload]:
    """Start the server and the client; stop them, whatever happens, when the block ends."""
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="tcptrace-demo-")
    os.chmod(workdir, 0o755)
    exe = build_server(workdir)
    if exe is not None:
        server_cmd = [exe, str(port)]
    else:
        server_cmd = [sys.executable, "-c", SERVER_PY, str(port)]
    server = subprocess.Popen(
        server_cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    client: subprocess.Popen[bytes] | None = None
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if line.strip() != b"ready":
            err = server.stderr.read().decode(errors="replace").strip() if server.stderr else ""
            raise EnvironmentProblem(f"the demo server did not start: {err or 'no output'}")
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT_PY, str(port), str(RATE_PER_S), str(LEAK_EVERY)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    except BaseException:
        _terminate(server)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    w = Workload(port, server, client, exe is not None, workdir)
    if exe is None:
        w.notes.append(
            "no C compiler: the server is Python, whose functions frame-pointer stacks cannot "
            "name (Python < 3.12); the leak is attributed to the process and kernel stacks"
        )
    try:
        yield w
    finally:
        w.notes.extend(w.stop())


def run(*, duration: float | None, interval: float, threshold: float) -> None:
    run_demo(duration, interval, threshold_ns(threshold))


def run_demo(duration_s: float | None, interval_s: float, threshold_ns: int) -> None:
    """Start the workload, show `top` on its port, then clean up and print the diagnosis."""
    from tcptrace.commands.session import StopFlag, stop_on_signals
    from tcptrace.commands.top import run_top
    from tcptrace.model.diagnosis import diagnose
    from tcptrace.model.filters import EventFilter
    from tcptrace.views.common import make_console
    from tcptrace.views.diagnose import verdict_text

    console = make_console()
    port = free_port()
    flt = EventFilter(ports=frozenset({port}))
    holder: list[Workload] = []
    flag = StopFlag()
    # SIGINT and SIGTERM stop the demo cleanly from here on, even before the view runs.
    with stop_on_signals(flag), ExitStack() as stack:

        def start() -> None:
            w = stack.enter_context(workload(port))
            holder.append(w)
            console.print(
                f"demo: demo-server pid {w.server.pid} listens on 127.0.0.1:{port} "
                f"({'C, built with frame pointers' if w.native else 'Python'}); demo-client pid "
                f"{w.client.pid} makes {RATE_PER_S:g} connections/s, the server leaks one in {LEAK_EVERY}",
                soft_wrap=True,
            )

        result = run_top(
            flt,
            from_file=None,
            interval_s=interval_s,
            duration_s=duration_s,
            threshold_ns=threshold_ns,
            before_start=start,
            flag=flag,
        )
    # Here the program is detached and the workload stopped (ExitStack), in that order.
    if not holder:
        raise TcptraceError("the demo did not start")
    w = holder[0]
    attributor = result.names.attributor if result.names is not None else None
    diagnosis = diagnose(result.overview, lost=result.overview.lost, attributor=attributor)
    console.print()
    console.print(
        f"what tcptrace saw in {diagnosis.window_s:.0f} s (stopped: {result.reason}):", style="bold"
    )
    for v in diagnosis.verdicts:
        if v.topic in ("close_wait_leak", "time_wait", "lost_events", "healthy"):
            console.print(verdict_text(v))
    for note in w.notes:
        console.print(f"demo: {note}", style="dim", soft_wrap=True)
    console.print(
        "next: `sudo tcptrace top` on this host, `sudo tcptrace diagnose --report report.html`, "
        "`sudo tcptrace closewait --pid PID`",
        style="dim",
    )
