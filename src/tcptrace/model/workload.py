"""Who an owner is in container terms: the identity a cgroup v2 path gives (container runtime
and id, Kubernetes pod uid and QoS class, or systemd unit), and the names the node knows.

Pure: the path and the names are read by system/ (system/cgroups.py, system/containers.py);
a ``Whois`` hands them to the views and to the JSON of every command, live or from a
recording (which carries its cgroup paths and pids: recording.py).

Every runtime names the cgroup it makes for a container after the container's id. With the
systemd cgroup driver that cgroup is a transient scope unit, ``<prefix>-<64 hex>.scope``,
in a slice; with the cgroupfs driver it is a plain directory::

    docker     /system.slice/docker-<id>.scope                 /docker/<id>
    containerd .../cri-containerd-<id>.scope (CRI)             .../<id> (under a pod)
               /system.slice/nerdctl-<id>.scope
    CRI-O      .../crio-<id>.scope, crio-conmon-<id>.scope     .../crio-<id>
    podman     /machine.slice/libpod-<id>.scope,               /libpod_parent/libpod-<id>
               libpod-conmon-<id>.scope

The kubelet puts every pod in a cgroup named after its uid, under one per QoS class
(Guaranteed pods sit directly under kubepods); the systemd driver writes the uid's dashes
as underscores, because a dash separates the levels of a slice name::

    systemd  /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/<container>
             /kubepods.slice/kubepods-pod<uid_>.slice/<container>
    cgroupfs /kubepods/besteffort/pod<uid>/<container>      /kubepods/pod<uid>/<container>

These may sit under a prefix (a kind or k3d node is itself a container; the kubelet's
``--cgroup-root``), which the parser skips. ``conmon`` (CRI-O's and podman's monitor)
is reported with its container's id and ``monitor`` set: it is not the container.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

CONTAINER_ID = re.compile(r"[0-9a-f]{64}")
"""A full container id (what every runtime names its cgroup after)."""
_SCOPE = re.compile(
    r"^(docker|cri-containerd|crio-conmon|crio|libpod-conmon|libpod|nerdctl)-([0-9a-f]{64})\.scope$"
)
_PLAIN = re.compile(r"^(crio-conmon|crio|libpod-conmon|libpod)-([0-9a-f]{64})$")
_RUNTIMES = {
    "docker": ("docker", False),
    "cri-containerd": ("containerd", False),
    "nerdctl": ("containerd", False),
    "crio": ("cri-o", False),
    "crio-conmon": ("cri-o", True),
    "libpod": ("podman", False),
    "libpod-conmon": ("podman", True),
}
# kubepods-pod<uid>.slice, kubepods-besteffort-pod<uid>.slice, kubelet-kubepods-burstable-pod<uid>.slice
_POD_SLICE = re.compile(r"^(?:.+-)?kubepods(?:-(besteffort|burstable))?-pod([0-9a-f_]{32,36})\.slice$")
_POD_DIR = re.compile(r"^pod([0-9a-f-]{32,36})$")
_QOS = {None: "Guaranteed", "besteffort": "BestEffort", "burstable": "Burstable"}
_UNIT_SUFFIXES = (".service", ".scope")


@dataclass(frozen=True)
class CgroupIdentity:
    """What a cgroup v2 path says about the processes in it. Fields the path does not say are None."""

    path: str
    runtime: str | None = None
    """``docker``, ``containerd``, ``cri-o`` or ``podman``; None for a container id found
    under a Kubernetes pod with the cgroupfs driver (the path does not name the runtime)."""
    container_id: str | None = None
    """The container's full id (64 hex digits), as ``docker ps --no-trunc``/``crictl ps`` show it."""
    monitor: bool = False
    """The runtime's monitor process of that container (conmon), not the container itself."""
    pod_uid: str | None = None
    """The Kubernetes pod's uid, with dashes (``kubectl get pod -o jsonpath='{.metadata.uid}'``)."""
    qos: str | None = None
    """The pod's QoS class: ``Guaranteed``, ``Burstable`` or ``BestEffort``."""
    unit: str | None = None
    """The innermost systemd unit that is not a container's scope (``nginx.service``,
    ``session-3.scope``; inside a container that runs systemd, that container's unit)."""
    slice: str | None = None
    """The innermost systemd slice (``system.slice``, ``user-1000.slice``)."""

    @property
    def short_id(self) -> str | None:
        """The container id as ``docker ps`` shows it (12 digits)."""
        return self.container_id[:12] if self.container_id else None

    @property
    def in_container(self) -> bool:
        return self.container_id is not None or self.pod_uid is not None


@lru_cache(maxsize=4096)
def identify(path: str) -> CgroupIdentity:
    """The identity a cgroup v2 path (/proc/PID/cgroup's ``0::`` line) gives.

    >>> i = identify("/system.slice/docker-4f797c539e6c745de61a93ca3ff8923"
    ...              "58ecbcaccd8414d5db545c38428142970.scope")
    >>> i.runtime, i.short_id, i.unit, i.slice
    ('docker', '4f797c539e6c', None, 'system.slice')
    >>> i = identify("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b5c2a36_7d4e_4e8f_"
    ...              "9f7a_2a3f1b9c8d7e.slice/cri-containerd-" + "ab" * 32 + ".scope")
    >>> i.runtime, i.pod_uid, i.qos
    ('containerd', '0b5c2a36-7d4e-4e8f-9f7a-2a3f1b9c8d7e', 'Burstable')
    >>> i = identify("/kubepods/pod74c13223-5a00-11e9-b385-42010a80018d/" + "34" * 32)
    >>> i.runtime, i.container_id == "34" * 32, i.pod_uid, i.qos
    (None, True, '74c13223-5a00-11e9-b385-42010a80018d', 'Guaranteed')
    >>> identify("/system.slice/nginx.service")
    CgroupIdentity(path='/system.slice/nginx.service', runtime=None, container_id=None, monitor=False, \
pod_uid=None, qos=None, unit='nginx.service', slice='system.slice')
    """
    parts = [p for p in path.split("/") if p]
    runtime: str | None = None
    container_id: str | None = None
    monitor = False
    pod_uid: str | None = None
    qos: str | None = None
    unit: str | None = None
    slice_: str | None = None
    under_kubepods = False
    for i, part in enumerate(parts):
        m = _SCOPE.match(part) or _PLAIN.match(part)
        if m is not None:
            runtime, monitor = _RUNTIMES[m.group(1)]
            container_id = m.group(2)
            continue
        if CONTAINER_ID.fullmatch(part) and i > 0 and (parts[i - 1] == "docker" or pod_uid is not None):
            # cgroupfs: /docker/<id>, or <id> under a pod's directory (runtime unknown)
            runtime = "docker" if parts[i - 1] == "docker" else None
            container_id, monitor = part, False
            continue
        m = _POD_SLICE.match(part)
        if m is not None:
            pod_uid = m.group(2).replace("_", "-")
            qos = _QOS[m.group(1)]
            slice_ = part
            continue
        if part in ("kubepods", "kubepods.slice") or part.endswith("-kubepods.slice"):
            under_kubepods = True
        elif under_kubepods and (m := _POD_DIR.match(part)) is not None:
            pod_uid = m.group(1)
            parent = parts[i - 1]
            qos = _QOS[parent] if parent in ("besteffort", "burstable") else "Guaranteed"
            continue
        if part.endswith(".slice"):
            slice_ = part
        elif part.endswith(_UNIT_SUFFIXES):
            unit = part
    return CgroupIdentity(path, runtime, container_id, monitor, pod_uid, qos, unit, slice_)


@dataclass(frozen=True)
class Workload:
    """Who an owner is in container terms: its cgroup's identity, and the names the node knows
    (from the kubelet's directories: system/containers.py). Every text here came from the
    host (cgroup names, pod and container names): escape it before it reaches a terminal."""

    identity: CgroupIdentity
    pod_name: str | None = None
    namespace: str | None = None
    """The pod's Kubernetes namespace."""
    container_name: str | None = None

    @property
    def container(self) -> str | None:
        """The container as a label value: its name where the node knows it, else its short id."""
        return self.container_name or self.identity.short_id

    @property
    def pod(self) -> str | None:
        """The pod as a label value: its name where the node knows it, else its uid."""
        return self.pod_name or self.identity.pod_uid

    def text(self) -> str | None:
        """One phrase for the views; None for a process in no container and no unit.

        >>> cid = "ab" * 32
        >>> Workload(identify(f"/system.slice/docker-{cid}.scope")).text()
        'container docker abababababab'
        >>> pod = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod" + "1" * 32 + ".slice"
        >>> Workload(identify(f"{pod}/cri-containerd-{cid}.scope"), "web-1", "shop", "nginx").text()
        'pod shop/web-1 (BestEffort) container containerd nginx'
        >>> Workload(identify("/system.slice/nginx.service")).text()
        'unit nginx.service'
        """
        i = self.identity
        parts = []
        if i.pod_uid:
            pod = f"{self.namespace}/{self.pod_name}" if self.namespace and self.pod_name else self.pod
            parts.append(f"pod {pod}" + (f" ({i.qos})" if i.qos else ""))
        if i.container_id:
            runtime = f"{i.runtime} " if i.runtime else ""
            monitor = "monitor of " if i.monitor else ""
            parts.append(f"{monitor}container {runtime}{self.container}")
        if not parts and i.unit:
            parts.append(f"unit {i.unit}")
        return " ".join(parts) or None

    def to_json(self) -> dict[str, Any]:
        i = self.identity
        return {
            "cgroup_path": i.path,
            "runtime": i.runtime,
            "container_id": i.container_id,
            "container": self.container_name,
            "pod_uid": i.pod_uid,
            "pod": self.pod_name,
            "namespace": self.namespace,
            "qos": i.qos,
            "unit": i.unit,
        }


class Whois(Protocol):
    """What the views and JSON say about an owner and a socket beyond pid and comm: live, read
    from the host (system/whois.py); in a replay, from the recording's tables."""

    @property
    def host_netns(self) -> int | None:
        """The host's network namespace (pid 1's): a socket in another is shown with its own."""

    def workload(self, cgroup: int | None) -> Workload | None:
        """The container, pod or unit of a cgroup v2 id; None when unknown."""

    def nspid(self, pid: int | None) -> int | None:
        """The pid the process has in its own pid namespace, where it differs from ``pid``."""

    def pid_cgroup(self, pid: int | None) -> int | None:
        """The cgroup a process is in now, for what the kernel names by pid only (TIME_WAIT
        and close() counts per process); None when unknown (always, in a replay)."""


@dataclass
class KnownWorkloads:
    """A Whois from tables: what a recording carries (``cgroup`` and ``process`` lines), or
    nothing at all (the default: a replay of a recording made before they existed)."""

    host_netns: int | None = None
    cgroups: dict[int, Workload] = field(default_factory=dict)
    nspids: dict[int, int] = field(default_factory=dict)

    def workload(self, cgroup: int | None) -> Workload | None:
        return None if cgroup is None else self.cgroups.get(cgroup)

    def nspid(self, pid: int | None) -> int | None:
        return None if pid is None else self.nspids.get(pid)

    def pid_cgroup(self, pid: int | None) -> int | None:
        return None


NOBODY = KnownWorkloads()
"""A Whois that knows nothing."""


def whois_json(whois: Whois, pid: int | None, cgroup: int | None, netns: int | None = None) -> dict[str, Any]:
    """The fields an owner and a socket add to a JSON object: ``workload`` (container, pod,
    unit, with the cgroup path) where the cgroup is known, ``nspid`` where it differs from
    the pid, ``netns`` where known, and ``host_netns`` false when that is not the host's.

    >>> w = KnownWorkloads(host_netns=1, cgroups={5: Workload(identify("/system.slice/a.service"))})
    >>> whois_json(w, 7, 5)["workload"]["unit"], whois_json(w, 7, None, 2), whois_json(w, 7, 6, 1)
    ('a.service', {'netns': 2, 'host_netns': False}, {'netns': 1})
    """
    out: dict[str, Any] = {}
    found = whois.workload(cgroup)
    if found is not None:
        out["workload"] = found.to_json()
    nspid = whois.nspid(pid)
    if nspid is not None:
        out["nspid"] = nspid
    if netns is not None:
        out["netns"] = netns
        if whois.host_netns is not None and netns != whois.host_netns:
            out["host_netns"] = False
    return out


def whois_text(whois: Whois, pid: int | None, cgroup: int | None, netns: int | None = None) -> str | None:
    """The same as one phrase for the views (host text: escape it); None when nothing is known.

    >>> w = KnownWorkloads(host_netns=1, nspids={7: 1})
    >>> whois_text(w, 7, None, 4026532000), whois_text(w, 8, None, 1)
    ('pid 1 in its namespace, netns 4026532000', None)
    """
    parts = []
    found = whois.workload(cgroup)
    if found is not None and found.text() is not None:
        parts.append(str(found.text()))
    nspid = whois.nspid(pid)
    if nspid is not None:
        parts.append(f"pid {nspid} in its namespace")
    if netns is not None and whois.host_netns is not None and netns != whois.host_netns:
        parts.append(f"netns {netns}")
    return ", ".join(parts) or None
