"""--cgroup, --container, --netns and several --pid against the real kernel, in cgroups and
network namespaces the tests make, with the fixture processes' own pids and `ss` in each
namespace as the truth; and the container id, pod uid, QoS and unit in the output.

Every server accepts and holds its connections; a client closes, so each connection leaves
one server socket in CLOSE_WAIT (a leak) owned by the server. The filters apply in the
kernel: what a run reports is what passed them. Every process, cgroup and namespace made
here is removed however a test ends.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tcptrace.system import cgroups, netns
from tcptrace.system.netns import NetNamespace
from tests.integration import helpers
from tests.integration.test_closewait import stop
from tests.integration.test_closewait import tracing as closewait_tracing

ID_DOCKER = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"
ID_CRI = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"
ID_FS = "34dc0b5e626f2c5c4c5170e34b10e7654ce36f0fcd532739f4445baabea03376"
ID_LATE = "5d1e0fc0ffee5d1e0fc0ffee5d1e0fc0ffee5d1e0fc0ffee5d1e0fc0ffee5d1e"
POD = "0b5c2a36-7d4e-4e8f-9f7a-2a3f1b9c8d7e"
POD_FS = "74c13223-5a00-11e9-b385-42010a80018d"
POD_SLICE = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice"

# cgroup under the test's own directory -> (runtime, container id, pod uid, QoS, unit)
LAYOUTS = {
    f"system.slice/docker-{ID_DOCKER}.scope": ("docker", ID_DOCKER, None, None, None),
    f"{POD_SLICE}/cri-containerd-{ID_CRI}.scope": ("containerd", ID_CRI, POD, "Burstable", None),
    f"kubepods/besteffort/pod{POD_FS}/{ID_FS}": (None, ID_FS, POD_FS, "BestEffort", None),
    "system.slice/tcptrace-opts-test.service": (None, None, None, None, "tcptrace-opts-test.service"),
}

SERVER = (
    "import socket, sys\n"
    "port = int(sys.argv[1])\n"
    "sys.stdin.readline()\n"  # in its cgroup by now: the listener is made there
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', port)); s.listen(64)\n"
    "print(s.getsockname()[1], flush=True)\n"
    "held = []\n"
    "while True:\n"
    "    held.append(s.accept()[0])\n"  # never closed: each becomes a CLOSE_WAIT leak
)


class Server:
    """A leaking server (SERVER), started in ``prefix`` (``ip netns exec NS``), moved into
    ``cgroup`` (a directory of the cgroup2 mount) before it listens."""

    def __init__(self, cgroup: Path | None = None, port: int = 0, prefix: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-c", SERVER, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(self.proc.pid))
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        assert ready, "the server did not start"
        self.port = int(self.proc.stdout.readline())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def leak(port: int, n: int = 1) -> None:
    """``n`` connections to 127.0.0.1:``port`` (of the calling thread's namespace), closed by
    the client once the server holds them."""
    conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
    time.sleep(0.2)  # accepted
    for c in conns:
        c.close()


@contextmanager
def tracing(cmd: list[str], *args: str) -> Iterator[subprocess.Popen[str]]:
    """`tcptrace closewait --json ARGS` once attached, every socket in CLOSE_WAIT a suspect."""
    with closewait_tracing(cmd, "--threshold", "0", "--recheck", "0", *args) as proc:
        yield proc


def summary_of(proc: subprocess.Popen[str]) -> dict[str, Any]:
    time.sleep(0.5)  # the FINs' transitions are in the ring buffer
    _periodic, summary = stop(proc)
    assert summary["lost"] == 0
    return summary


def leakers(summary: dict[str, Any], preexisting: bool = False) -> dict[int, int]:
    """Sockets that entered CLOSE_WAIT while traced (``preexisting``: those found in
    CLOSE_WAIT at start, through the same filters), per owning pid."""
    out: dict[int, int] = {}
    for s in summary["sockets"]:
        if s["preexisting"] == preexisting:
            out[s["pid"]] = out.get(s["pid"], 0) + 1
    return out


@pytest.fixture
def cgroup_top() -> Iterator[Path]:
    root = cgroups.cgroup2_root()
    if root is None:
        pytest.skip("no cgroup2 mount")
    top = Path(root) / f"tcptrace-test-opts-{os.getpid()}"
    top.mkdir()
    try:
        yield top
    finally:
        helpers.remove_cgroups(top)
    assert not top.exists()


IN_A_PRIVATE_CGROUP_NAMESPACE = """
import json, os, sys
from tcptrace.system import cgroups, process
target = int(sys.argv[1])
seen = cgroups.parse_proc_cgroup(open(f"/proc/{target}/cgroup").read())
own = cgroups.id_of_pid(os.getpid())
path = process.read(target).cgroup
print(json.dumps({"seen": seen, "id": cgroups.id_of_pid(target), "own": own, "path": path}))
"""


def test_a_process_outside_a_private_cgroup_namespace_is_found_by_its_cgroup(cgroup_top: Path) -> None:
    """From a pod's private cgroup namespace, another pod's process reads /../../x in
    /proc/PID/cgroup: resolved in the cgroup tree, not lost (a DaemonSet's view)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    pod = cgroup_top / "kubepods.slice" / "pod-a"
    other = cgroup_top / "kubepods.slice" / "pod-b"
    pod.mkdir(parents=True)
    other.mkdir()
    target = Server(other)  # a process of another pod
    try:
        run = subprocess.run(
            [
                "sh",
                "-c",
                f'echo $$ > {pod}/cgroup.procs && exec unshare --cgroup "$0" -c "$1" "$2"',
                sys.executable,
                IN_A_PRIVATE_CGROUP_NAMESPACE,
                str(target.pid),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert run.returncode == 0, run.stderr
        inside = json.loads(run.stdout)
        assert inside["seen"] == "/../pod-b", inside  # as the namespace shows it
        assert inside["id"] == other.stat().st_ino == cgroups.id_of_pid(target.pid)
        assert inside["own"] == pod.stat().st_ino
        # Named by its whole path (its pod and QoS are in the upper components).
        assert inside["path"] == f"/{cgroup_top.name}/kubepods.slice/pod-b"
    finally:
        target.stop()


@contextmanager
def servers_in(top: Path) -> Iterator[dict[str, Server]]:
    """A server in each of LAYOUTS under ``top``, and one left in this test's cgroup."""
    made: dict[str, Server] = {}
    try:
        for layout in LAYOUTS:
            (top / layout).mkdir(parents=True)
            made[layout] = Server(top / layout)
        made["outside"] = Server()
        yield made
    finally:
        for server in made.values():
            server.stop()


def check_identity(summary: dict[str, Any], servers: dict[str, Server], top: Path) -> None:
    by_pid = {g["pid"]: g for g in summary["groups"]}
    for layout, (runtime, cid, pod, qos, unit) in LAYOUTS.items():
        group = by_pid.get(servers[layout].pid)
        if group is None:
            continue
        w = group["workload"]
        assert w["cgroup_path"] == f"/{top.name}/{layout}"
        assert (w["runtime"], w["container_id"], w["pod_uid"], w["qos"], w["unit"]) == (
            runtime,
            cid,
            pod,
            qos,
            unit,
        )


def test_cgroup_keeps_a_subtree_and_names_containers_pods_and_units(
    tcptrace_cmd: list[str], cgroup_top: Path
) -> None:
    with servers_in(cgroup_top) as servers:
        ports = [s.port for s in servers.values()]
        pods = f"/{cgroup_top.name}/kubepods.slice"
        for args, kept in (
            (["--cgroup", pods], [f"{POD_SLICE}/cri-containerd-{ID_CRI}.scope"]),
            (["--cgroup", str(cgroup_top)], list(LAYOUTS)),  # with the mount point in front
        ):
            with tracing(tcptrace_cmd, *args) as tracer:
                for port in ports:
                    leak(port, 2)
                summary = summary_of(tracer)
            assert leakers(summary) == {servers[layout].pid: 2 for layout in kept}, args
            check_identity(summary, servers, cgroup_top)


def test_container_keeps_exactly_its_processes_and_one_started_later(
    tcptrace_cmd: list[str], cgroup_top: Path
) -> None:
    with servers_in(cgroup_top) as servers:
        ports = [s.port for s in servers.values()]
        late_group = cgroup_top / f"system.slice/docker-{ID_LATE}.scope"
        args = ["--container", ID_DOCKER[:8], "--container", ID_FS[:5].upper(), "--container", ID_LATE[:12]]
        with tracing(tcptrace_cmd, *args) as tracer:
            for port in ports:
                leak(port, 1)
            late_group.mkdir(parents=True)  # a container that starts after tcptrace
            late = Server(late_group)
            try:
                time.sleep(2.5)  # tcptrace looks for new containers every 2 s
                leak(late.port, 3)
                summary = summary_of(tracer)
            finally:
                late.stop()
        docker, cgroupfs = (
            f"system.slice/docker-{ID_DOCKER}.scope",
            f"kubepods/besteffort/pod{POD_FS}/{ID_FS}",
        )
        assert leakers(summary) == {servers[docker].pid: 1, servers[cgroupfs].pid: 1, late.pid: 3}
        check_identity(summary, servers, cgroup_top)
        [late_group_json] = [g for g in summary["groups"] if g["pid"] == late.pid]
        assert late_group_json["workload"]["container_id"] == ID_LATE


def test_several_pids(tcptrace_cmd: list[str]) -> None:
    servers = [Server() for _ in range(3)]
    try:
        a, b, c = servers
        with tracing(tcptrace_cmd, "-p", f"{a.pid},{b.pid}", "--pid", str(a.pid)) as tracer:
            for s in servers:
                leak(s.port, 2)
            summary = summary_of(tracer)
        assert leakers(summary) == {a.pid: 2, b.pid: 2}
    finally:
        for s in servers:
            s.stop()


# ---- network namespaces ------------------------------------------------------------------


@contextmanager
def namespace(name: str) -> Iterator[NetNamespace]:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield next(ns for ns in netns.namespaces() if name in ns.names)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def close_wait_in(name: str, port: int) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", name, "ss", "-tanH", "state", "close-wait", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len([line for line in out.splitlines() if line.strip()])


def test_netns_keeps_one_of_two_namespaces_with_the_same_address_and_port(tcptrace_cmd: list[str]) -> None:
    port = helpers.free_port()
    a_name, b_name = f"tcptrace-opts-a-{os.getpid()}", f"tcptrace-opts-b-{os.getpid()}"
    with namespace(a_name) as ns_a, namespace(b_name) as ns_b:
        a = Server(port=port, prefix=("ip", "netns", "exec", a_name))
        b = Server(port=port, prefix=("ip", "netns", "exec", b_name))
        try:
            assert a.port == b.port == port
            runs = {}
            for key, args in (
                ("by name", ["--netns", a_name]),
                ("by inode", ["--netns", str(ns_b.inode)]),
                ("by pid", ["--netns", str(a.pid)]),
                ("both", ["--port", str(port)]),
            ):
                with tracing(tcptrace_cmd, *args) as tracer:
                    netns.call_in(ns_a, lambda: leak(port, 2))
                    netns.call_in(ns_b, lambda: leak(port, 3))
                    runs[key] = summary_of(tracer)
            truth = {a_name: close_wait_in(a_name, port), b_name: close_wait_in(b_name, port)}
        finally:
            a.stop()
            b.stop()
    assert truth == {a_name: 8, b_name: 12}  # 2 and 3 per run, four runs

    def socks(summary: dict[str, Any]) -> set[tuple[int, int, int, bool]]:
        return {(s["pid"], s["sport"], s["netns"], s.get("host_netns", True)) for s in summary["sockets"]}

    assert leakers(runs["by name"]) == leakers(runs["by pid"]) == {a.pid: 2}
    assert socks(runs["by name"]) == {(a.pid, port, ns_a.inode, False)}
    assert leakers(runs["by inode"]) == {b.pid: 3}
    assert socks(runs["by inode"]) == {(b.pid, port, ns_b.inode, False)}
    # Without --netns both are there, on the same address and port, told apart by namespace.
    both = runs["both"]["sockets"]
    assert {(s["saddr"], s["sport"]) for s in both} == {("127.0.0.1", port)}
    assert {
        s["netns"]: leakers({"sockets": [x for x in both if x["netns"] == s["netns"]]}) for s in both
    } == {
        ns_a.inode: {a.pid: 2},
        ns_b.inode: {b.pid: 3},
    }
    # What the three runs before left in CLOSE_WAIT is there from start, in both namespaces,
    # with its owner (#17: sockets of another namespace were not read at start).
    assert runs["both"]["preexisting_open"] == 3 * (2 + 3)
    old = [x for x in both if x["preexisting"]]
    assert sorted((x["netns"], x["pid"]) for x in old) == sorted(
        [(ns_a.inode, a.pid)] * 6 + [(ns_b.inode, b.pid)] * 9
    )


def test_netns_in_the_states_view(tcptrace_cmd: list[str]) -> None:
    port = helpers.free_port()
    name = f"tcptrace-opts-v-{os.getpid()}"
    with namespace(name) as ns:
        proc = subprocess.Popen(
            [*tcptrace_cmd, "states", "--netns", name, "--duration", "4"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().split()[:3] == ["TIME", "PID", "COMM"]  # attached
        # Started now, so that their listen() is seen and names the owner of what they accept.
        server = Server(port=port, prefix=("ip", "netns", "exec", name))
        host = Server(port=port)  # the same address and port on the host: filtered out
        try:
            leak(port, 1)
            netns.call_in(ns, lambda: leak(port, 1))
            out, err = proc.communicate(timeout=60)
        finally:
            server.stop()
            host.stop()
    assert proc.returncode == 0, err
    events = out.partition("\n\n")[0]  # the summary follows on stdout, after a blank line
    lines = [line for line in events.splitlines() if "->" in line]
    assert lines and all(f"netns {ns.inode}" in line for line in lines), out
    assert not any(f"{host.pid} python" in line for line in lines), out
    closed = [line for line in lines if "ESTABLISHED -> CLOSE_WAIT" in line]
    assert len(closed) == 1 and f"{server.pid} python" in closed[0], out
