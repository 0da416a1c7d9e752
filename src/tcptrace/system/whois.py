"""Who an owner is beyond its pid and comm, read from the host: the container, pod or unit of
its cgroup, the pid it has in its own pid namespace, and which network namespace is the
host's. The live ``Whois`` (model/workload.py) of every command.

Every answer is cached with a bound: a cgroup id names one cgroup for the cgroup's life (an
id is an inode number, not reused while the cgroup exists); a pid's namespace pid and cgroup
are read again after a few seconds (pids are reused, processes move); the kubelet's pod
names are read again at most every 30 s, when a pod uid is not known.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from tcptrace.model.workload import Workload, identify
from tcptrace.system import cgroups, netns, process
from tcptrace.system.cgroups import CgroupIndex
from tcptrace.system.containers import KubeletPods

MAX_CACHED = 4096
NSPID_TTL_NS = 5_000_000_000
PODS_TTL_NS = 30_000_000_000


class HostWhois:
    """A Whois reading this host (``root``: where the node's filesystem is, ``/`` unless
    tcptrace runs in a container with the host's mounted elsewhere)."""

    def __init__(self, proc: str = "/proc", root: str = "/", index: CgroupIndex | None = None) -> None:
        self.proc = proc
        self.root = root
        self.index = index or CgroupIndex()
        self.host_netns: int | None = netns.of_pid(1, proc) or netns.of_pid(2, proc)
        self._workloads: OrderedDict[int, Workload | None] = OrderedDict()
        self._nspids: OrderedDict[int, tuple[int | None, int]] = OrderedDict()
        self._cgroups: OrderedDict[int, tuple[int | None, int]] = OrderedDict()
        self._pods: KubeletPods | None = None
        self._pods_ns = 0

    def workload(self, cgroup: int | None) -> Workload | None:
        if cgroup is None:
            return None
        if cgroup in self._workloads:
            self._workloads.move_to_end(cgroup)
            return self._workloads[cgroup]
        path = self.index.path(cgroup)
        found = None if path is None else self._named(path)
        self._workloads[cgroup] = found
        if len(self._workloads) > MAX_CACHED:
            self._workloads.popitem(last=False)
        return found

    def _named(self, path: str) -> Workload:
        identity = identify(path)
        if identity.pod_uid is None and identity.container_id is None:
            return Workload(identity)
        pods = self._kubelet(identity.pod_uid)
        pod = pods.pod(identity.pod_uid) if identity.pod_uid else None
        container = pods.container(identity.container_id) if identity.container_id else None
        return Workload(
            identity,
            pod_name=pod.name if pod else container.pod if container else None,
            namespace=pod.namespace if pod and pod.namespace else container.namespace if container else None,
            container_name=container.name if container else None,
        )

    def _kubelet(self, uid: str | None) -> KubeletPods:
        now = time.monotonic_ns()
        stale = self._pods is None or (uid is not None and uid not in self._pods.pods)
        if self._pods is None or (stale and now - self._pods_ns >= PODS_TTL_NS):
            self._pods = KubeletPods.load(self.root)
            self._pods_ns = now
        return self._pods

    def nspid(self, pid: int | None) -> int | None:
        if pid is None:
            return None
        now = time.monotonic_ns()
        cached = self._nspids.get(pid)
        if cached is not None and now - cached[1] < NSPID_TTL_NS:
            return cached[0]
        try:
            with open(f"{self.proc}/{pid}/status", "rb", buffering=0) as fh:
                found = process.parse_nspid(fh.read())
        except (OSError, ValueError):
            found = None
        inner = found if found is not None and found != pid else None
        self._nspids[pid] = (inner, now)
        self._nspids.move_to_end(pid)
        if len(self._nspids) > MAX_CACHED:
            self._nspids.popitem(last=False)
        return inner

    def pid_cgroup(self, pid: int | None) -> int | None:
        if not pid:
            return None
        now = time.monotonic_ns()
        cached = self._cgroups.get(pid)
        if cached is not None and now - cached[1] < NSPID_TTL_NS:
            return cached[0]
        found = cgroups.id_of_pid(pid)
        self._cgroups[pid] = (found, now)
        self._cgroups.move_to_end(pid)
        if len(self._cgroups) > MAX_CACHED:
            self._cgroups.popitem(last=False)
        return found


__all__ = ["HostWhois"]
