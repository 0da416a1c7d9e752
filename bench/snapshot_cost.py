"""What a snapshot of a host with many TCP sockets costs: sock_diag against /proc/net/tcp and ss.

Makes a network namespace of its own with ``--sockets`` TCP sockets in it, IPv4 and IPv6,
in mixed states (bench/netns_sockets.py). Then times, in that namespace (other sockets on
the host do not count, except where said): a sock_diag dump of every state, of
CLOSE_WAIT only and of LISTEN only, and one that only counts sockets by state; parsing
/proc/PID/net/tcp{,6}; ``ss -tan`` (a process of its own, started with nsenter); listing
the host's namespaces, and a snapshot of every one of them (the host's sockets too); the
walk of every process's /proc/PID/fd that finds holders; and the whole
``hostsnap.collect`` of this namespace (sockets, holders, their processes). Prints the
median and best wall time of ``--repeats`` runs and their median CPU time (the kernel's
work for us included) in milliseconds, and removes the namespace and its processes
however it ends.

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
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

from bench.netns_sockets import namespace_with_sockets


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

    with namespace_with_sockets(total) as (name, holders):
        ns = next(n for n in netns.namespaces() if name in n.names)
        out: dict[str, Any] = {"sockets_asked": total, "netns": ns.inode, "loadavg": os.getloadavg()[0]}

        def diag(states: frozenset[TcpState]) -> Callable[[], int]:
            def run() -> int:
                with netns.call_in(ns, sockdiag.open_socket) as sk:
                    return len(sockdiag.dump_on(sk, states, (4, 6), ns.inode))

            return run

        pid = holders[0].popen_pid

        def count_states() -> int:
            with netns.call_in(ns, sockdiag.open_socket) as sk:
                return sum(sockdiag.count_states_on(sk).values())

        paths = [f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"]
        cases: dict[str, Callable[[], int]] = {
            "sock_diag_all": diag(sockdiag.ALL_STATES),
            "sock_diag_close_wait": diag(frozenset({TcpState.CLOSE_WAIT})),
            "sock_diag_listen": diag(frozenset({TcpState.LISTEN})),
            "sock_diag_count_states": count_states,
            "proc_net_tcp_parse": lambda: len(procnet.read_sockets(paths)),
            "proc_close_wait": lambda: len(
                sockets.dump_namespace(ns, [TcpState.CLOSE_WAIT], sources=[sockets.PROC])[0]
            ),
            "namespaces_list": lambda: len(netns.namespaces()),
            "snapshot_every_namespace": lambda: len(sockets.snapshot().sockets),
            "holders_walk": lambda: sum(len(h) for h in procfd.holders(None).values()),
            "collect_all_with_owners": lambda: len(hostsnap.collect(namespaces=[ns]).sockets),
        }
        if shutil.which("ss"):
            cases["ss_tan_subprocess"] = lambda: len(
                subprocess.run(
                    ["nsenter", f"--net=/run/netns/{name}", "ss", "-tanH"],
                    capture_output=True,
                    text=True,
                    check=True,
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
    args = parser.parse_args()
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
