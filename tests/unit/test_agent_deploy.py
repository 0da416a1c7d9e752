"""deploy/: the dashboard asks only for metrics the agent exports, the DaemonSet has what
tracing needs, and every agent option the packaging passes exists."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from tcptrace.cli import cli
from tcptrace.export.prometheus import AgentCollector, families, make_registry, text_of
from tcptrace.model.agent import ExportState
from tcptrace.model.histogram import Log2Histogram

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def exported_names() -> set[str]:
    """Every sample name a scrape can hold (families with at least one sample each)."""
    state = ExportState(
        threshold_s=30,
        states={"ESTABLISHED": 1},
        close_wait_ages={(1, "a"): [1]},
        timewait_by_proc=[((1, "a"), 1)],
        timewait_by_remote_port=[("80", 1)],
        resets_sent_by_proc=[((1, "a"), 1)],
        resets_received_by_proc=[((1, "a"), 1)],
        close_durations=[((1, "a"), "close", Log2Histogram.of([5]))],
        close_calls={"close": 1},
        map_failures={"socks": 0},
        label_keys={"x": 1},
        pruned={"tw_procs": 1},
    )
    collector = AgentCollector()
    collector.publish(families(state))
    text = text_of(make_registry(collector))
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "tcptrace-dashboard.json").read_text())
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return exprs


def test_the_dashboard_queries_only_exported_metrics() -> None:
    names = exported_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used = {m for e in exprs for m in re.findall(r"\b((?:tcptrace|process)_[a-z0-9_]+)\b", e)}
    assert used, exprs
    missing = sorted(used - names)
    assert not missing, f"the dashboard asks for metrics the agent does not export: {missing}"


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_daemonset_can_trace() -> None:
    ds = next(d for d in yaml_docs(DEPLOY / "kubernetes" / "daemonset.yaml") if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    (container,) = spec["containers"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/sys/kernel/tracing", "/sys/kernel/btf", "/lib/modules", "/usr/src"} <= mounts
    hosts = {v["hostPath"]["path"] for v in spec["volumes"]}
    assert {"/sys/kernel/tracing", "/sys/kernel/btf", "/lib/modules", "/usr/src"} <= hosts
    # Pod and container names (system/containers.KubeletPods reads them at these paths, root /),
    # and never the kubelet's pod directories, which hold every pod's secrets.
    by_name = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    for path in ("/var/log/pods", "/var/log/containers"):
        assert path in hosts and any(
            m["mountPath"] == path and by_name[m["name"]] == path for m in container["volumeMounts"]
        )
    assert not any(h.startswith("/var/lib/kubelet") for h in hosts)
    args = container["args"]
    listen = next(a for a in args if a.startswith("--listen="))
    assert "0.0.0.0" not in listen
    check_agent_options([a.split("=", 1)[0] for a in args])


# What tests/integration/test_hardening.py runs the agent with as nobody (AGENT there).
NON_ROOT_CAPS = {"BPF", "PERFMON", "DAC_READ_SEARCH", "SYS_PTRACE"}


def test_the_daemonset_has_explicit_capabilities_a_pinned_image_and_no_host_tmp() -> None:
    from tcptrace import __version__

    ds = next(d for d in yaml_docs(DEPLOY / "kubernetes" / "daemonset.yaml") if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and set(sc["capabilities"]["add"]) == NON_ROOT_CAPS
    image, _, tag = container["image"].rpartition(":")
    assert image and tag == __version__
    assert "/tmp" not in {v.get("hostPath", {}).get("path") for v in spec["volumes"]}
    assert all(m.get("readOnly") for m in container["volumeMounts"]), "host paths are mounted read-only"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "tcptrace-agent.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_systemd_unit_is_unprivileged_and_bounded() -> None:
    unit = unit_settings()
    assert unit["DynamicUser"] == ["yes"] and "User" not in unit
    caps = {c.removeprefix("CAP_") for c in unit["CapabilityBoundingSet"][0].split()}
    assert caps == NON_ROOT_CAPS
    assert unit["AmbientCapabilities"] == unit["CapabilityBoundingSet"]
    assert int(unit["LimitNOFILE"][0]) >= 4096
    # Documentation= names a file scripts/install puts there.
    doc = unit["Documentation"][0].removeprefix("file://")
    install = (DEPLOY.parent / "scripts" / "install").read_text()
    assert doc.startswith("/usr/local/share/doc/tcptrace/") and "/usr/local/share/doc/tcptrace" in install
    assert (DEPLOY.parent / "docs" / Path(doc).name).exists()


def test_the_systemd_unit_exposure_is_at_most_4() -> None:
    import shutil
    import subprocess

    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze")
    unit = DEPLOY / "systemd" / "tcptrace-agent.service"
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot score a unit file offline: {result.stderr.strip()}")
    assert float(match.group(1)) <= 4.0, result.stdout


def test_the_systemd_unit_verifies_as_installed(tmp_path: Path) -> None:
    """systemd-analyze verify on the unit where the install puts it: a root with the
    system's units, /usr/local/bin/tcptrace and the page Documentation= names."""
    import shutil
    import subprocess

    units = Path("/lib/systemd/system")
    if shutil.which("systemd-analyze") is None or not (units / "sysinit.target").exists():
        pytest.skip("needs systemd-analyze and the system's units")
    shutil.copytree(units, tmp_path / "usr/lib/systemd/system", symlinks=True)
    exe = tmp_path / "usr/local/bin/tcptrace"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    doc = unit_settings()["Documentation"][0].removeprefix("file://")
    (tmp_path / doc.lstrip("/")).parent.mkdir(parents=True)
    shutil.copy(DEPLOY.parent / "docs" / Path(doc).name, tmp_path / doc.lstrip("/"))
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(DEPLOY / "systemd" / "tcptrace-agent.service", tmp_path / "etc/systemd/system")
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={tmp_path}", "tcptrace-agent.service"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_the_systemd_unit_binds_loopback() -> None:
    unit = (DEPLOY / "systemd" / "tcptrace-agent.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv[1] == "agent"
    assert argv[argv.index("--listen") + 1].startswith("127.0.0.1:")
    assert "KillSignal=SIGTERM" in unit
    check_agent_options([a for a in argv if a.startswith("--")])


def check_agent_options(options: list[str]) -> None:
    help_text = CliRunner().invoke(cli, ["agent", "--help"]).output
    for opt in options:
        assert re.search(rf"(^|\s){re.escape(opt)}\b", help_text), f"`tcptrace agent` has no {opt}"
