"""--pid lists, -L/-D, --netns, --cgroup and --container on recordings, and owners named in
container terms (container, pod, unit, pid in its namespace, netns) in the views and JSON
of a replay: the recording carries its cgroup paths and pids (recording.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tcptrace.cli import cli
from tcptrace.model.endpoint import Endpoint, Owner
from tcptrace.model.events import TcpState, Transition, to_json
from tcptrace.model.filters import EventFilter, container_cgroups
from tcptrace.recording import open_recording

HOST_NS = 4026531840
ID_DOCKER = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"
ID_CRI = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"
POD = "0b5c2a36-7d4e-4e8f-9f7a-2a3f1b9c8d7e"
POD_PATH = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice"

# pid -> (comm, cgroup id, cgroup path, netns, local port, nspid)
OWNERS: dict[int, tuple[str, int, str, int, int, int | None]] = {
    11: ("web", 101, f"/system.slice/docker-{ID_DOCKER}.scope", 4026532001, 80, 1),
    12: ("api", 102, f"{POD_PATH}/cri-containerd-{ID_CRI}.scope", 4026532002, 80, 7),
    13: ("db", 103, "/system.slice/postgres.service", HOST_NS, 5432, None),
    14: ("cli", 1, "/", HOST_NS, 9000, None),
}


def leak(pid: int, t: int) -> list[dict[str, Any]]:
    """A server socket of ``pid`` born from its listener and left in CLOSE_WAIT."""
    comm, cgroup, _path, netns, port, _ = OWNERS[pid]
    common = {
        "skaddr": 0x1000 + pid,
        "saddr": "127.0.0.1",
        "sport": port,
        "daddr": "127.0.0.1",
        "dport": 40000 + pid,
        "pid": pid,
        "comm": comm,
        "cgroup": cgroup,
        "netns": netns,
        "pid_start_ns": 5,
    }
    steps = [(TcpState.LISTEN, TcpState.SYN_RECV), (TcpState.SYN_RECV, TcpState.ESTABLISHED)]
    steps.append((TcpState.ESTABLISHED, TcpState.CLOSE_WAIT))
    return [to_json(Transition(ts_ns=t + i, old=o, new=n, **common)) for i, (o, n) in enumerate(steps)]  # type: ignore[arg-type]


def recording(path: Path, tables: bool = True) -> Path:
    header = {"type": "header", "format": "tcptrace", "version": 1, "clock_offset_ns": 0, "command": "record"}
    lines: list[dict[str, Any]] = [{**header, "host_netns": HOST_NS}]
    for n, pid in enumerate(OWNERS):
        comm, cgroup, cpath, _netns, _port, nspid = OWNERS[pid]
        if tables:
            names = ("web-1", "shop", "nginx") if pid == 12 else (None, None, None)
            row = dict(zip(("pod", "namespace", "container"), names, strict=True))
            lines.append({"type": "cgroup", "id": cgroup, "path": cpath, **row})
            if nspid is not None:
                lines.append({"type": "process", "pid": pid, "nspid": nspid})
        lines += leak(pid, 1_000_000_000 + n * 1000)
    lines.append({"type": "summary", "lost": 0, "end_ns": 20_000_000_000})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def owners_kept(rec: Path, *args: str) -> set[int]:
    code, out, err = invoke("states", "-j", "--from", str(rec), *args)
    assert code == 0, err
    return {o["pid"] for o in map(json.loads, out.splitlines()) if o["type"] == "transition"}


# ---- the filter, as the kernel applies it, on recorded events -------------------------------


def test_each_filter_keeps_its_owners_on_a_replay(tmp_path: Path) -> None:
    rec = recording(tmp_path / "r.jsonl")
    assert owners_kept(rec) == {11, 12, 13, 14}
    assert owners_kept(rec, "-p", "11,13") == owners_kept(rec, "-p", "11", "--pid", "13") == {11, 13}
    assert owners_kept(rec, "-c", "api") == {12}
    assert owners_kept(rec, "--port", "80,443") == {11, 12}
    assert owners_kept(rec, "-L", "5432") == {13}
    assert owners_kept(rec, "-D", "40014") == {14}
    assert owners_kept(rec, "-L", "80", "-D", "40012") == {12}, "-L and -D: both must hold"
    assert owners_kept(rec, "--netns", "4026532001") == {11}
    assert owners_kept(rec, "--netns", "net:[4026531840]") == {13, 14}
    assert owners_kept(rec, "--netns", "4026532001", "--netns", "4026532002") == {11, 12}
    assert owners_kept(rec, "--cgroup", "/system.slice") == {11, 13}
    assert owners_kept(rec, "--cgroup", "/kubepods.slice") == {12}
    assert owners_kept(rec, "--cgroup", POD_PATH + "/") == {12}
    assert owners_kept(rec, "--cgroup", "/") == {11, 12, 13, 14}
    assert owners_kept(rec, "--container", "4F797C") == {11}, "ids compare in lowercase"
    assert owners_kept(rec, "--container", ID_CRI) == {12}
    assert owners_kept(rec, "--container", "4f797c", "--container", "9ec3") == {11, 12}
    assert owners_kept(rec, "--container", "4f797c", "-p", "12") == set(), "every filter must hold"


def test_without_cgroup_lines_the_cgroup_filters_keep_nothing(tmp_path: Path) -> None:
    rec = recording(tmp_path / "r.jsonl", tables=False)
    assert owners_kept(rec, "--cgroup", "/") == set()
    assert owners_kept(rec, "--container", "4f") == set()
    assert owners_kept(rec, "-p", "12") == {12}


def test_unknown_owner_and_unknown_namespace_match_no_owner_or_netns_filter() -> None:
    ev = Transition(ts_ns=1, skaddr=1, pid=None, old=TcpState.CLOSE, new=TcpState.LISTEN)
    paths = {5: "/system.slice/a.service"}.get
    for flt in (
        EventFilter(cgroups=("/",)),
        EventFilter(containers=("ab",)),
        EventFilter(netns=frozenset({7})),
    ):
        assert not flt.matches(ev, paths)
    assert EventFilter(netns=frozenset({7})).accepts(Endpoint(4, "a", 1, "b", 2), None, netns=7)
    owned = Owner(3, "x", 5)
    assert EventFilter(cgroups=("/system.slice",)).accepts_owner(owned, paths)
    assert not EventFilter(cgroups=("/system.slice/a",)).accepts_owner(owned, paths), "a prefix, not a parent"
    assert not EventFilter(cgroups=("/system.slice",)).accepts_owner(Owner(3, "x", None), paths)


def test_container_cgroups_include_monitors_and_children() -> None:
    cid = "ab" * 32
    paths = [
        "/machine.slice",
        f"/machine.slice/libpod-{cid}.scope",
        f"/machine.slice/libpod-{cid}.scope/container",
        f"/machine.slice/libpod-conmon-{cid}.scope",
        f"/machine.slice/libpod-{'cd' * 32}.scope",
    ]
    assert container_cgroups(paths, ["abab"]) == paths[1:4]


# ---- what the replay shows: container, pod, unit, nspid, netns ------------------------------


def test_states_names_owners_in_container_terms(tmp_path: Path) -> None:
    code, out, _ = invoke("states", "--from", str(recording(tmp_path / "r.jsonl")))
    assert code == 0
    events = out.split("\n\n", 1)[0]  # the summary follows, after a blank line
    lines = {int(line.split()[1]): line for line in events.splitlines()[1:] if line.strip()}
    assert "[container docker 4f797c539e6c, pid 1 in its namespace, netns 4026532001]" in lines[11]
    assert (
        "[pod shop/web-1 (Burstable) container containerd nginx, pid 7 in its namespace, netns 4026532002]"
        in lines[12]
    )
    assert lines[13].endswith("[unit postgres.service]"), "the host's namespace is not named"
    assert "[" not in lines[14].split("->")[-1], "a process in no unit and no container"


def test_a_replay_writes_the_tables_again_before_the_events(tmp_path: Path) -> None:
    code, out, _ = invoke("states", "-j", "--from", str(recording(tmp_path / "r.jsonl")), "-p", "12")
    objs = [json.loads(line) for line in out.splitlines()]
    assert objs[0]["host_netns"] == HOST_NS
    assert [o["type"] for o in objs[1:4]] == ["cgroup", "process", "transition"]
    assert objs[1]["path"].endswith(f"cri-containerd-{ID_CRI}.scope") and objs[1]["pod"] == "web-1"
    again = tmp_path / "again.jsonl"
    again.write_text(out)
    assert owners_kept(again, "--container", "9ec3") == {12}


def test_closewait_json_says_where_each_leak_runs(tmp_path: Path) -> None:
    rec = recording(tmp_path / "r.jsonl")
    code, out, _ = invoke("closewait", "-j", "--threshold", "1s", "--from", str(rec))
    assert code == 0
    summary = json.loads(out.splitlines()[-1])
    groups = {g["pid"]: g for g in summary["groups"]}
    assert set(groups) == {11, 12, 13, 14}
    assert groups[11]["workload"]["container_id"] == ID_DOCKER and groups[11]["nspid"] == 1
    k8s = groups[12]["workload"]
    assert (k8s["runtime"], k8s["pod_uid"], k8s["pod"], k8s["namespace"], k8s["qos"], k8s["container"]) == (
        "containerd",
        POD,
        "web-1",
        "shop",
        "Burstable",
        "nginx",
    )
    assert groups[13]["workload"]["unit"] == "postgres.service" and "nspid" not in groups[13]
    socks = {s["pid"]: s for s in summary["sockets"]}
    assert socks[11]["netns"] == 4026532001 and socks[11]["host_netns"] is False
    assert socks[13]["netns"] == HOST_NS and "host_netns" not in socks[13]
    assert socks[12]["cgroup_path"] == OWNERS[12][2]


def test_closewait_view_names_the_pod(tmp_path: Path) -> None:
    rec = recording(tmp_path / "r.jsonl")
    code, out, _ = invoke("closewait", "--threshold", "1s", "--from", str(rec), "--container", "9ec3")
    assert code == 0
    flat = " ".join(out.split())  # (a pipe's 80 columns wrap the line)
    assert "12 api [pod shop/web-1 (Burstable) container containerd nginx, pid 7 in its namespace" in flat
    assert "WHERE" in out


def test_diagnose_verdicts_say_where_the_process_runs(tmp_path: Path) -> None:
    rec = recording(tmp_path / "r.jsonl")
    code, out, _ = invoke("diagnose", "--threshold", "1s", "--from", str(rec), "-p", "11")
    assert code == 0
    assert "· in container docker 4f797c539e6c, pid 1 in its namespace" in out
    code, out, _ = invoke("diagnose", "-j", "--threshold", "1s", "--from", str(rec), "-p", "11")
    leaks = [v for v in json.loads(out.splitlines()[-1])["verdicts"] if v["pid"] == 11]
    assert leaks and all(v["workload"]["container_id"] == ID_DOCKER and v["nspid"] == 1 for v in leaks)


# ---- a recording's tables are hostile input too ----------------------------------------------


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ({"type": "cgroup", "id": 5, "path": "relative"}, "path: not an absolute cgroup path"),
        ({"type": "cgroup", "id": -1, "path": "/"}, "id: out of range"),
        ({"type": "cgroup", "path": "/"}, "a cgroup line without id"),
        ({"type": "cgroup", "id": 5, "path": "/", "pod": 7}, "pod: expected text or null"),
        ({"type": "process", "pid": 0, "nspid": 1}, "pid: out of range"),
        ({"type": "process", "pid": 3, "nspid": "1"}, "nspid: expected an integer"),
    ],
)
def test_bad_table_lines_name_their_line(tmp_path: Path, line: dict[str, Any], problem: str) -> None:
    rec = recording(tmp_path / "r.jsonl")
    lines = rec.read_text().splitlines()
    lines.insert(1, json.dumps(line))
    rec.write_text("\n".join(lines) + "\n")
    code, _, err = invoke("states", "--from", str(rec))
    assert code == 1
    assert err.startswith(f"tcptrace: error: {rec}:2: {problem}"), err


def test_table_lines_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tcptrace import recording as module

    monkeypatch.setattr(module, "MAX_TABLE", 3)
    rec = tmp_path / "r.jsonl"
    header = {"type": "header", "format": "tcptrace", "version": 1, "clock_offset_ns": 0}
    rows = [{"type": "cgroup", "id": i, "path": f"/c{i}"} for i in range(5)]
    rec.write_text("".join(json.dumps(o) + "\n" for o in [header, *rows]))
    with pytest.raises(Exception, match=r"r.jsonl:5: more than 3 cgroup lines"):
        list(open_recording(str(rec)).events())
