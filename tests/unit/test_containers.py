"""Container, pod and unit identity from cgroup v2 paths, against the shapes each runtime and
the kubelet write (collected from public bug reports, docs and the runtimes' own tests), and
pod names from the kubelet's directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tcptrace.system.containers import (
    CgroupIdentity,
    KubeletPods,
    container_hostname,
    identify,
    parse_container_log,
    parse_etc_hosts,
    parse_pod_log_dir,
)

ID = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"
ID2 = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"
UID = "74c13223-5a00-11e9-b385-42010a80018d"
UID_ = UID.replace("-", "_")
STATIC_UID = "6a8a2d4cfd5ecf8e58e4e0d8e7f0a6b1"  # static pods: a hash of the manifest, no dashes

# (path, runtime, container id, monitor, pod uid, qos, unit, slice)
SAMPLES = [
    # docker, systemd driver and cgroupfs driver; docker in docker; rootless docker
    (f"/system.slice/docker-{ID}.scope", "docker", ID, False, None, None, None, "system.slice"),
    (f"/docker/{ID}", "docker", ID, False, None, None, None, None),
    (f"/docker/{ID}/docker/{ID2}", "docker", ID2, False, None, None, None, None),
    (
        f"/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{ID}.scope",
        "docker", ID, False, None, None, "user@1000.service", "user.slice",
    ),
    # a container running systemd: its units are below its scope
    (
        f"/system.slice/docker-{ID}.scope/system.slice/nginx.service",
        "docker", ID, False, None, None, "nginx.service", "system.slice",
    ),
    # containerd: CRI with the systemd driver, each QoS class; nerdctl
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope",
        "containerd", ID, False, UID, "Burstable", None, f"kubepods-burstable-pod{UID_}.slice",
    ),
    (
        f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope",
        "containerd", ID, False, UID, "BestEffort", None, f"kubepods-besteffort-pod{UID_}.slice",
    ),
    (
        f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope",
        "containerd", ID, False, UID, "Guaranteed", None, f"kubepods-pod{UID_}.slice",
    ),
    (f"/system.slice/nerdctl-{ID}.scope", "containerd", ID, False, None, None, None, "system.slice"),
    # kind/k3d: the node is a container, the kubelet's tree is inside its cgroup
    (
        f"/system.slice/docker-{ID2}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope",
        "containerd", ID, False, UID, "BestEffort", None, f"kubelet-kubepods-besteffort-pod{UID_}.slice",
    ),
    # cgroupfs driver: the runtime is not in the path
    (f"/kubepods/besteffort/pod{UID}/{ID}", None, ID, False, UID, "BestEffort", None, None),
    (f"/kubepods/burstable/pod{UID}/{ID}", None, ID, False, UID, "Burstable", None, None),
    (f"/kubepods/pod{UID}/{ID}", None, ID, False, UID, "Guaranteed", None, None),
    (f"/kubepods/pod{UID}", None, None, False, UID, "Guaranteed", None, None),
    # static pod uid
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{ID}.scope",
        "containerd", ID, False, STATIC_UID, "Burstable", None, f"kubepods-burstable-pod{STATIC_UID}.slice",
    ),
    # CRI-O, its conmon, and cgroupfs
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope",
        "cri-o", ID, False, UID, "Burstable", None, f"kubepods-burstable-pod{UID_}.slice",
    ),
    (
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope",
        "cri-o", ID, True, UID, "Burstable", None, f"kubepods-burstable-pod{UID_}.slice",
    ),
    (f"/kubepods/besteffort/pod{UID}/crio-{ID}", "cri-o", ID, False, UID, "BestEffort", None, None),
    # docker as the kubelet's runtime (cri-dockerd), systemd driver
    (
        f"/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope",
        "docker", ID, False, UID, "Guaranteed", None, f"kubepods-pod{UID_}.slice",
    ),
    # podman: rootful, rootless, conmon, in a pod, cgroupfs
    (f"/machine.slice/libpod-{ID}.scope", "podman", ID, False, None, None, None, "machine.slice"),
    (f"/machine.slice/libpod-conmon-{ID}.scope", "podman", ID, True, None, None, None, "machine.slice"),
    (
        f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container",
        "podman", ID, False, None, None, "user@1000.service", "user.slice",
    ),
    (
        f"/machine.slice/machine-libpod_pod_{ID2}.slice/libpod-{ID}.scope",
        "podman", ID, False, None, None, None, f"machine-libpod_pod_{ID2}.slice",
    ),
    (f"/libpod_parent/libpod-{ID}", "podman", ID, False, None, None, None, None),
    # systemd units and user sessions
    ("/system.slice/nginx.service", None, None, False, None, None, "nginx.service", "system.slice"),
    (
        "/system.slice/system-getty.slice/getty@tty1.service",
        None, None, False, None, None, "getty@tty1.service", "system-getty.slice",
    ),
    (
        "/user.slice/user-1000.slice/session-3.scope",
        None, None, False, None, None, "session-3.scope", "user-1000.slice",
    ),
    (
        "/user.slice/user-1000.slice/user@1000.service/app.slice/app-org.gnome.Terminal.slice/vte-spawn-1.scope",
        None, None, False, None, None, "vte-spawn-1.scope", "app-org.gnome.Terminal.slice",
    ),
    ("/init.scope", None, None, False, None, None, "init.scope", None),
    ("/", None, None, False, None, None, None, None),
    # look-alikes that are not containers or pods
    (f"/tcptrace-test-1/{ID}", None, None, False, None, None, None, None),
    (f"/system.slice/pod{UID}.service", None, None, False, None, None, f"pod{UID}.service", "system.slice"),
    (
        f"/system.slice/docker-{ID[:12]}.scope",
        None, None, False, None, None, f"docker-{ID[:12]}.scope", "system.slice",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("path", "runtime", "cid", "monitor", "uid", "qos", "unit", "slice_"), SAMPLES)
def test_identity_of_real_world_paths(
    path: str,
    runtime: str | None,
    cid: str | None,
    monitor: bool,
    uid: str | None,
    qos: str | None,
    unit: str | None,
    slice_: str | None,
) -> None:
    assert identify(path) == CgroupIdentity(path, runtime, cid, monitor, uid, qos, unit, slice_)


def test_identity_helpers() -> None:
    i = identify(f"/system.slice/docker-{ID}.scope")
    assert i.short_id == ID[:12] and i.in_container
    assert not identify("/system.slice/nginx.service").in_container
    assert identify(f"/kubepods/pod{UID}").in_container
    assert identify("/system.slice/nginx.service").short_id is None


def test_a_path_that_is_not_utf8_is_kept_as_the_kernel_wrote_it() -> None:
    path = os.fsdecode(b"/system.slice/caf\xe9.service")
    assert identify(path).unit is not None and os.fsencode(identify(path).unit or "") == b"caf\xe9.service"


def test_pod_log_directories_and_container_logs() -> None:
    assert parse_pod_log_dir(f"default_web-7d9f8-abcde_{UID}") == ("default", "web-7d9f8-abcde", UID)
    assert parse_pod_log_dir(f"kube-system_etcd-node1_{STATIC_UID}") == (
        "kube-system",
        "etcd-node1",
        STATIC_UID,
    )
    assert parse_pod_log_dir("default_web_notauid") is None
    assert parse_pod_log_dir("a_b_c_" + UID) is None
    c = parse_container_log(f"web-7d9f8-abcde_default_nginx-sidecar-{ID}.log")
    assert c is not None and (c.pod, c.namespace, c.name, c.container_id) == (
        "web-7d9f8-abcde",
        "default",
        "nginx-sidecar",
        ID,
    )
    assert parse_container_log(f"web_default_nginx-{ID[:12]}.log") is None
    assert parse_container_log("syslog") is None


HOSTS = """# Kubernetes-managed hosts file.
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
fe00::0\tip6-mcastprefix
fe00::1\tip6-allnodes
fe00::2\tip6-allrouters
10.244.1.5\tweb-7d9f8-abcde
fd00:10:244:1::5\tweb-7d9f8-abcde

# Entries added by HostAliases.
10.1.2.3\tfoo.local\tbar.local
"""


def test_etc_hosts_gives_the_pods_hostname() -> None:
    assert parse_etc_hosts(HOSTS) == "web-7d9f8-abcde"
    assert parse_etc_hosts("127.0.0.1 localhost\n10.0.0.1 node1\n") is None  # not the kubelet's
    assert parse_etc_hosts("") is None


def test_kubelet_pods_from_a_node_tree(tmp_path: Path) -> None:
    logs = tmp_path / "var/log/pods"
    logs.mkdir(parents=True)
    (logs / f"shop_web-7d9f8-abcde_{UID}").mkdir()
    (logs / "junk").mkdir()
    containers = tmp_path / "var/log/containers"
    containers.mkdir(parents=True)
    (containers / f"web-7d9f8-abcde_shop_nginx-{ID}.log").symlink_to(logs / "nope")
    other = "0b5c2a36-7d4e-4e8f-9f7a-2a3f1b9c8d7e"
    (tmp_path / "var/lib/kubelet/pods" / other).mkdir(parents=True)
    (tmp_path / "var/lib/kubelet/pods" / other / "etc-hosts").write_text(
        HOSTS.replace("web-7d9f8-abcde", "db-0")
    )
    pods = KubeletPods.load(str(tmp_path))
    web = pods.pod(UID)
    assert web is not None and (web.name, web.namespace, web.source) == (
        "web-7d9f8-abcde",
        "shop",
        "/var/log/pods",
    )
    db = pods.pod(other)
    assert db is not None and (db.name, db.namespace, db.source) == ("db-0", None, "etc-hosts")
    assert pods.pod("0b5c2a36-0000-4e8f-9f7a-2a3f1b9c8d7e") is None
    nginx = pods.container(ID)
    assert nginx is not None and (nginx.name, nginx.pod, nginx.namespace) == (
        "nginx",
        "web-7d9f8-abcde",
        "shop",
    )
    assert KubeletPods.load(str(tmp_path / "nowhere")).pods == {}


def test_container_hostname_from_a_proc_tree(tmp_path: Path) -> None:
    etc = tmp_path / "42/root/etc"
    etc.mkdir(parents=True)
    (etc / "hostname").write_bytes(b"web-7d9f8-abcde\n")
    assert container_hostname(42, str(tmp_path)) == "web-7d9f8-abcde"
    (etc / "hostname").write_bytes(b"\n")
    assert container_hostname(42, str(tmp_path)) is None
    (etc / "hostname").write_bytes(b"caf\xe9")
    assert container_hostname(42, str(tmp_path)) == "caf\\xe9"
    assert container_hostname(43, str(tmp_path)) is None
