"""What a snapshot of a host with many TCP sockets costs: sock_diag against /proc/net/tcp and ss.

Makes a network namespace of its own (``ip netns add``) and a process in it that holds
``--sockets`` TCP sockets, IPv4 and IPv6: listeners, established pairs, CLOSE_WAIT
(with their FIN_WAIT2 peers) and TIME_WAIT. Then times, in that namespace only (so other
load on the host does not count): a sock_diag dump of every state, of CLOSE_WAIT only and
of LISTEN only; parsing /proc/PID/net/tcp{,6}; ``ss -tan``; the walk of /proc/*/fd that
finds holders; and the whole ``hostsnap.collect`` (sockets, holders, their processes).
Prints the median and best of ``--repeats`` runs in milliseconds, and removes the
namespace and the process however it ends.

Needs root. Run it on a quiet machine::

    sudo .venv/bin/python -m bench.snapshot_cost --sockets 50000
    sudo .venv/bin/python -m bench.snapshot_cost --sockets 50000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

LISTEN_PORTS = 8  # per family: ~28k ephemeral ports per (client address, server port)
PER_PROCESS = 15_000  # sockets per holding process: fds are capped (RLIMIT_NOFILE, 20000 here)


def _accept_all(listener: socket.socket, n: int) -> list[socket.socket]:
    return [listener.accept()[0] for _ in range(n)]


def hold(total: int) -> None:
    """A process in the namespace: make ~``total`` sockets, say so, wait for stdin to close."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    kept: list[socket.socket] = []
    listeners: list[tuple[socket.socket, str]] = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        for _ in range(LISTEN_PORTS):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            s.listen(4096)
            listeners.append((s, host))
    # per 10 sockets: 3 established pairs (6), 1 CLOSE_WAIT + FIN_WAIT2 pair (2), 2 TIME_WAIT
    rounds = max(1, (total - len(listeners)) // 10)
    batch = 64
    for start in range(0, rounds, batch):
        for r in range(start, min(rounds, start + batch)):
            listener, host = listeners[r % len(listeners)]
            port = listener.getsockname()[1]
            clients = [socket.create_connection((host, port)) for _ in range(6)]
            servers = _accept_all(listener, 6)
            kept += clients[:3] + servers[:3]  # established
            clients[3].close()  # CLOSE_WAIT on the server side, FIN_WAIT2 on the client's
            kept.append(servers[3])
            for c, s in zip(clients[4:], servers[4:], strict=True):
                c.close()  # the client closes first and ends in TIME_WAIT
                s.close()
    print(json.dumps({"ready": True, "fds": len(kept) + len(listeners)}), flush=True)
    sys.stdin.read()


@contextmanager
def namespace_with_sockets(total: int) -> Iterator[tuple[str, list[int]]]:
    """(namespace name, pids of the processes holding the sockets); all removed on exit."""
    name = f"tcptrace-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    procs: list[subprocess.Popen[str]] = []
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        left = total
        while left > 0:
            share = min(left, PER_PROCESS)
            left -= share
            proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    name,
                    sys.executable,
                    "-m",
                    "bench.snapshot_cost",
                    "--hold",
                    str(share),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line or not json.loads(line).get("ready"):
                raise SystemExit("snapshot_cost: a socket holder did not start")
        time.sleep(0.5)  # let the last FINs settle
        yield name, [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
        subprocess.run(["ip", "netns", "del", name], check=False)


def _cpu_s() -> float:
    """CPU time (user + system, the kernel's dump work included) of this process and its
    waited-for children (ss)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, float], Any]:
    """Median and best wall time of ``fn`` in ms, its median CPU time, and its last result.

    CPU time says what the snapshot costs when other load on the machine stretches the
    wall time."""
    times = []
    cpu = []
    result = None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), _cpu_s()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
        cpu.append((_cpu_s() - start_cpu) * 1e3)
    stats = {
        "median_ms": round(statistics.median(times), 2),
        "best_ms": round(min(times), 2),
        "cpu_median_ms": round(statistics.median(cpu), 2),
    }
    return stats, result


def measure(total: int, repeats: int) -> dict[str, Any]:
    from tcptrace.model.events import TcpState
    from tcptrace.system import hostsnap, netns, procfd, procnet, sockdiag, sockets

    with namespace_with_sockets(total) as (name, pids):
        ns = next(n for n in netns.namespaces() if name in n.names)
        out: dict[str, Any] = {"sockets_asked": total, "netns": ns.inode, "loadavg": os.getloadavg()[0]}

        def diag(states: frozenset[TcpState]) -> Callable[[], int]:
            def run() -> int:
                with netns.call_in(ns, sockdiag.open_socket) as sk:
                    return len(sockdiag.dump_on(sk, states, (4, 6), ns.inode))

            return run

        paths = [f"/proc/{pids[0]}/net/tcp", f"/proc/{pids[0]}/net/tcp6"]
        cases: dict[str, Callable[[], int]] = {
            "sock_diag_all": diag(sockdiag.ALL_STATES),
            "sock_diag_close_wait": diag(frozenset({TcpState.CLOSE_WAIT})),
            "sock_diag_listen": diag(frozenset({TcpState.LISTEN})),
            "proc_net_tcp_parse": lambda: len(procnet.read_sockets(paths)),
            "proc_close_wait": lambda: len(
                sockets.dump_namespace(ns, [TcpState.CLOSE_WAIT], sources=[sockets.PROC])[0]
            ),
            "holders_walk": lambda: sum(len(h) for h in procfd.holders(None).values()),
            "collect_all_with_owners": lambda: len(hostsnap.collect(namespaces=[ns]).sockets),
        }
        if shutil.which("ss"):
            cases["ss_tan_subprocess"] = lambda: len(
                subprocess.run(
                    ["ip", "netns", "exec", name, "ss", "-tanH"], capture_output=True, text=True, check=True
                ).stdout.splitlines()
            )
        for case, fn in cases.items():
            stats, count = timed(fn, repeats)
            out[case] = {**stats, "count": count}
        by_state: dict[str, int] = {}
        with netns.call_in(ns, sockdiag.open_socket) as sk:
            for s in sockdiag.dump_on(sk, netns=ns.inode):
                by_state[s.state.name] = by_state.get(s.state.name, 0) + 1
        out["states"] = by_state
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=50_000, help="sockets to make (default 50000)")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each case (default 7)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--hold", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold is not None:
        hold(args.hold)
        return
    if os.geteuid() != 0:
        raise SystemExit("snapshot_cost: run as root (it makes a network namespace)")
    result = measure(args.sockets, args.repeats)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{sum(result['states'].values())} sockets in netns {result['netns']}: {result['states']}")
    print(f"{'case':<26}{'median ms':>11}{'best ms':>10}{'cpu ms':>9}{'count':>8}")
    for case, v in result.items():
        if isinstance(v, dict) and "median_ms" in v:
            print(
                f"{case:<26}{v['median_ms']:>11.2f}{v['best_ms']:>10.2f}{v['cpu_median_ms']:>9.2f}{v['count']:>8}"
            )
    print(f"load average before the run: {result['loadavg']}")


if __name__ == "__main__":
    main()
