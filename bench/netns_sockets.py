"""A network namespace of its own with many TCP sockets in it, for bench/snapshot_cost.py and
the integration tests of the host snapshots.

``namespace_with_sockets`` makes the namespace (``ip netns add``, loopback up) and runs
processes in it (``python -m bench.netns_sockets N``) that each make their share of N
sockets, IPv4, IPv6 and IPv4-mapped (a dual-stack listener that IPv4 clients reach):
listeners, established pairs, CLOSE_WAIT with their FIN_WAIT2 peers, and TIME_WAIT. It
removes the processes and the namespace however it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

LISTEN_PORTS = 8  # per family: ~28k ephemeral ports per (client address, server port)
PER_PROCESS = 15_000  # sockets per process: RLIMIT_NOFILE caps fds (20000 on the test VMs)


def _listeners(port_base: int) -> list[tuple[socket.socket, str]]:
    """(listener, address its clients connect to): LISTEN_PORTS each on 127.0.0.1 and ::1,
    and one dual-stack listener on :: whose accepted sockets have ::ffff: addresses."""
    out = []
    for i in range(LISTEN_PORTS * 2):
        family, host = (socket.AF_INET, "127.0.0.1") if i < LISTEN_PORTS else (socket.AF_INET6, "::1")
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port_base + i % LISTEN_PORTS if port_base else 0))
        s.listen(4096)
        out.append((s, host))
    dual = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dual.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    dual.bind(("::", port_base + LISTEN_PORTS if port_base else 0))
    dual.listen(4096)
    out.append((dual, "127.0.0.1"))
    return out


def hold(total: int, port_base: int = 0) -> None:
    """Make ~``total`` sockets, print one JSON line, and keep them until stdin closes.

    Per 10 sockets: 3 established pairs, a CLOSE_WAIT socket with its FIN_WAIT2 peer, and
    2 TIME_WAIT (the client closes first, then the server). ``port_base``: listen on fixed
    ports from there (0: any free ports).
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listeners = _listeners(port_base)
    kept: list[socket.socket] = []
    for r in range(max(1, (total - len(listeners)) // 10)):
        listener, host = listeners[r % len(listeners)]
        port = listener.getsockname()[1]
        clients = [socket.create_connection((host, port)) for _ in range(6)]
        servers = [listener.accept()[0] for _ in range(6)]
        kept += clients[:3] + servers[:3]
        clients[3].close()
        kept.append(servers[3])
        for c, s in zip(clients[4:], servers[4:], strict=True):
            c.close()
            s.close()
    ports = sorted({s.getsockname()[1] for s, _ in listeners})
    print(json.dumps({"pid": os.getpid(), "fds": len(kept) + len(listeners), "ports": ports}), flush=True)
    sys.stdin.read()


@dataclass(frozen=True)
class Holder:
    """One process holding sockets in the namespace, as it reported itself."""

    popen_pid: int
    """The pid of the process started (``unshare``'s when it runs in a pid namespace)."""
    pid: int
    """Its pid as it sees it (1 in a pid namespace of its own)."""
    ports: tuple[int, ...]


@contextmanager
def namespace_with_sockets(
    total: int, name: str | None = None, port_base: int = 0, pid_namespace: bool = False
) -> Iterator[tuple[str, list[Holder]]]:
    """(namespace name, the processes holding ``total`` sockets in it); all gone on exit.

    ``pid_namespace``: run each process in a pid namespace of its own as well (pid 1 there).
    """
    name = name or f"tcptrace-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    procs: list[subprocess.Popen[str]] = []
    holders: list[Holder] = []
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        left = total
        while left > 0:
            share = min(left, PER_PROCESS)
            left -= share
            cmd = [sys.executable, "-m", "bench.netns_sockets", str(share), "--port-base", str(port_base)]
            if pid_namespace:
                cmd = ["unshare", "--pid", "--fork", "--kill-child", *cmd]
            proc = subprocess.Popen(
                ["ip", "netns", "exec", name, *cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a socket holder in netns {name} did not start")
            ready = json.loads(line)
            holders.append(Holder(proc.pid, ready["pid"], tuple(ready["ports"])))
            if port_base:
                break  # fixed ports: one process only
        time.sleep(0.3)  # let the last FINs and ACKs land
        yield name, holders
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
        subprocess.run(["ip", "netns", "del", name], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description="hold N TCP sockets until stdin closes")
    parser.add_argument("sockets", type=int)
    parser.add_argument("--port-base", type=int, default=0)
    args = parser.parse_args()
    hold(args.sockets, args.port_base)


if __name__ == "__main__":
    main()
