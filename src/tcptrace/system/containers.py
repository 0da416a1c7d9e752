"""Who a process is in container terms, from its cgroup v2 path: runtime and container id,
Kubernetes pod uid and QoS class, or systemd unit; and pod names where the node knows them.

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

Pod names are not in any path. Without asking the API server, the node knows them from
the kubelet's log directories (``/var/log/pods/<namespace>_<name>_<uid>/``, and
``/var/log/containers/<pod>_<namespace>_<container>-<id>.log`` for container names),
or, less surely, from the hosts file the kubelet writes for the pod
(``/var/lib/kubelet/pods/<uid>/etc-hosts``, whose last entry is the pod's hostname: its
name, unless the pod sets ``hostname``). A pod on the host network has no such entry.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

_HEX64 = re.compile(r"[0-9a-f]{64}")
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
        if _HEX64.fullmatch(part) and i > 0 and (parts[i - 1] == "docker" or pod_uid is not None):
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
class PodName:
    """A Kubernetes pod's name, as far as the node knows it."""

    uid: str
    name: str
    namespace: str | None
    """None when only the pod's hostname was found (the hosts file does not say)."""
    source: str
    """Where it was read: ``/var/log/pods`` (exact), or ``etc-hosts`` (the pod's hostname:
    its name unless the pod sets ``spec.hostname``; cut to 63 characters)."""


@dataclass(frozen=True)
class ContainerName:
    """A container of a Kubernetes pod, by its id (from /var/log/containers)."""

    container_id: str
    name: str
    pod: str
    namespace: str


def parse_pod_log_dir(name: str) -> tuple[str, str, str] | None:
    """(namespace, pod name, uid) of a /var/log/pods entry; None for anything else.

    Namespaces and pod names are DNS names (no ``_``), so the split is unambiguous.

    >>> parse_pod_log_dir("kube-system_coredns-5d78c9869d-x2x7q_0b5c2a36-7d4e-4e8f-9f7a-2a3f1b9c8d7e")
    ('kube-system', 'coredns-5d78c9869d-x2x7q', '0b5c2a36-7d4e-4e8f-9f7a-2a3f1b9c8d7e')
    >>> parse_pod_log_dir("lost+found") is None
    True
    """
    fields = name.split("_")
    if len(fields) != 3 or not all(fields):
        return None
    namespace, pod, uid = fields
    if not re.fullmatch(r"[0-9a-f-]{32,36}", uid):
        return None
    return namespace, pod, uid


def parse_container_log(name: str) -> ContainerName | None:
    """A /var/log/containers entry (``<pod>_<namespace>_<container>-<id>.log``); None for anything else.

    >>> c = parse_container_log("web-7d9f8-abcde_shop_nginx-" + "ab" * 32 + ".log")
    >>> c.pod, c.namespace, c.name, c.container_id == "ab" * 32
    ('web-7d9f8-abcde', 'shop', 'nginx', True)
    """
    if not name.endswith(".log"):
        return None
    fields = name[:-4].split("_")
    if len(fields) != 3:
        return None
    pod, namespace, rest = fields
    container, _, cid = rest.rpartition("-")
    if not (pod and namespace and container) or not _HEX64.fullmatch(cid):
        return None
    return ContainerName(cid, container, pod, namespace)


_HOSTS_STANDARD = {"127.0.0.1", "::1", "fe00::0", "fe00::", "fe00::1", "ff00::0", "ff02::1", "ff02::2"}


def parse_etc_hosts(text: str) -> str | None:
    """The pod's hostname in the hosts file the kubelet writes for a pod; None when it has none
    (a pod on the host network gets a copy of the node's file).

    >>> parse_etc_hosts("# Kubernetes-managed hosts file.\\n127.0.0.1\\tlocalhost\\n::1\\tlocalhost "
    ...                 "ip6-localhost ip6-loopback\\nfe00::0\\tip6-localnet\\nfe00::1\\tip6-allnodes\\n"
    ...                 "10.244.1.5\\tweb-7d9f8-abcde\\n\\n# Entries added by HostAliases.\\n"
    ...                 "1.2.3.4\\tfoo\\n")
    'web-7d9f8-abcde'
    >>> parse_etc_hosts("# Kubernetes-managed hosts file.\\n127.0.0.1\\tlocalhost\\n"
    ...                 "10.244.1.6\\tdb-0.db.shop.svc.cluster.local\\tdb-0\\n")
    'db-0'
    >>> parse_etc_hosts("# Kubernetes-managed hosts file (host network).\\n127.0.0.1 localhost\\n") is None
    True
    """
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# Kubernetes-managed hosts file") or "host network" in lines[0]:
        return None
    name: str | None = None
    for line in lines[1:]:
        if line.startswith("# Entries added by HostAliases"):
            break
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[0] not in _HOSTS_STANDARD:
            name = fields[-1]
    return name


@dataclass
class KubeletPods:
    """Pod and container names the node knows, read once (``load``); look up by uid and id."""

    pods: dict[str, PodName] = field(default_factory=dict)
    containers: dict[str, ContainerName] = field(default_factory=dict)
    root: str = "/"

    @classmethod
    def load(cls, root: str = "/") -> KubeletPods:
        """Names under ``root`` (``/host`` when the node's filesystem is mounted there).

        A node that is not a Kubernetes node just has none.
        """
        out = cls(root=root)
        for entry in _listdir(os.path.join(root, "var/log/pods")):
            parsed = parse_pod_log_dir(entry)
            if parsed is not None:
                namespace, name, uid = parsed
                out.pods[uid] = PodName(uid, name, namespace, "/var/log/pods")
        for entry in _listdir(os.path.join(root, "var/log/containers")):
            c = parse_container_log(entry)
            if c is not None:
                out.containers[c.container_id] = c
        return out

    def pod(self, uid: str) -> PodName | None:
        """The pod of ``uid``: from the log directories, else from its hosts file; None when
        the node does not say (no logs yet, and a pod on the host network)."""
        found = self.pods.get(uid)
        if found is not None:
            return found
        hostname = _read_small(os.path.join(self.root, "var/lib/kubelet/pods", uid, "etc-hosts"), 1 << 16)
        if hostname is None:
            return None
        name = parse_etc_hosts(hostname)
        if name is None:
            return None
        found = self.pods[uid] = PodName(uid, name, None, "etc-hosts")
        return found

    def container(self, container_id: str) -> ContainerName | None:
        return self.containers.get(container_id)


def container_hostname(pid: int, proc: str = "/proc") -> str | None:
    """The hostname a containerised process sees (its root's /etc/hostname): a Kubernetes
    container's is its pod's hostname, a docker container's its short id unless set.
    None when unreadable or empty. Whoever runs the container wrote it: escape it."""
    text = _read_small(f"{proc}/{pid}/root/etc/hostname", 256)
    if text is None:
        return None
    name = text.strip()
    return name or None


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _read_small(path: str, limit: int) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8", "backslashreplace")
    except OSError:
        return None


__all__ = [
    "CgroupIdentity",
    "ContainerName",
    "KubeletPods",
    "PodName",
    "container_hostname",
    "identify",
    "parse_container_log",
    "parse_etc_hosts",
    "parse_pod_log_dir",
]
