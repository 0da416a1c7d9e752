"""Who a process is in container terms, from its cgroup v2 path: runtime and container id,
Kubernetes pod uid and QoS class, or systemd unit; and pod names where the node knows them.

How a path names a container, a pod or a unit is model/workload.py's (``identify``, pure);
this module reads what only the node knows.

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

from tcptrace.model.workload import CONTAINER_ID, CgroupIdentity, identify


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
    if not (pod and namespace and container) or not CONTAINER_ID.fullmatch(cid):
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
