"""The cgroup ids --cgroup and --container name for the kernel's filter, found in a directory
tree shaped like a cgroup2 mount (a cgroup's id is its directory's inode), and found again
when a container starts later."""

from __future__ import annotations

import os
from pathlib import Path

from tcptrace.model.filters import EventFilter
from tcptrace.system.cgroups import CgroupIndex, CgroupScope, walk

ID_A = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"
ID_B = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"


def tree(root: Path, *paths: str) -> dict[str, int]:
    out = {}
    for rel in paths:
        (root / rel).mkdir(parents=True, exist_ok=True)
        out["/" + rel] = os.stat(root / rel).st_ino
    return out


def test_walk_and_index(tmp_path: Path) -> None:
    ids = tree(tmp_path, "system.slice/a.service", "kubepods/besteffort")
    walked = dict(walk(str(tmp_path)))
    assert walked["/"] == os.stat(tmp_path).st_ino
    assert {p: walked[p] for p in ids} == ids
    assert walked["/system.slice"] == os.stat(tmp_path / "system.slice").st_ino
    index = CgroupIndex(str(tmp_path), rewalk_s=0)
    assert index.path(ids["/kubepods/besteffort"]) == "/kubepods/besteffort"
    late = tree(tmp_path, "late.slice")
    assert index.path(late["/late.slice"]) == "/late.slice", "an unknown id walks the tree again"
    assert index.path(1) is None


def test_scope_of_cgroups_and_containers(tmp_path: Path) -> None:
    ids = tree(
        tmp_path,
        f"system.slice/docker-{ID_A}.scope",
        "system.slice/nginx.service",
        f"kubepods/pod{'1' * 8}-0000-0000-0000-{'2' * 12}/{ID_B}",
    )
    flt = EventFilter(cgroups=("/system.slice/nginx.service", "/gone"), containers=("4f797c",))
    scope = CgroupScope(flt, root=str(tmp_path), every_s=0)
    assert scope.ids == {ids["/system.slice/nginx.service"], ids[f"/system.slice/docker-{ID_A}.scope"]}
    assert scope.refresh() == [], "nothing new"


def test_a_container_started_later_joins_the_scope(tmp_path: Path) -> None:
    tree(tmp_path, "system.slice")
    flt = EventFilter(containers=("9ec39b",))
    scope = CgroupScope(flt, root=str(tmp_path), every_s=0)
    assert scope.ids == set()
    ids = tree(tmp_path, f"system.slice/cri-containerd-{ID_B}.scope")
    assert scope.refresh() == [ids[f"/system.slice/cri-containerd-{ID_B}.scope"]]
    assert scope.refresh() == []


def test_scope_refreshes_at_most_every_interval(tmp_path: Path) -> None:
    scope = CgroupScope(EventFilter(containers=("9ec39b",)), root=str(tmp_path), every_s=3600)
    tree(tmp_path, f"docker/{ID_B}")
    assert scope.refresh() == [], "not due yet"
    assert scope.refresh(force=True) != []


def test_the_tree_is_walked_again_only_when_cgroups_came_or_went(tmp_path: Path) -> None:
    stat = tmp_path / "cgroup.stat"
    stat.write_text("nr_descendants 1\nnr_dying_descendants 0\n")
    scope = CgroupScope(EventFilter(containers=("9ec39b",)), root=str(tmp_path), every_s=0, full_s=3600)
    walks = scope.walks
    ids = tree(tmp_path, f"docker/{ID_B}")  # (a real cgroupfs would have counted it)
    assert scope.refresh() == [] and scope.walks == walks, "the counts did not change: no walk"
    stat.write_text("nr_descendants 2\nnr_dying_descendants 0\n")
    assert scope.refresh() == [ids[f"/docker/{ID_B}"]] and scope.walks == walks + 1
    every = CgroupScope(EventFilter(containers=("9ec39b",)), root=str(tmp_path), every_s=0, full_s=0)
    assert [every.refresh() for _ in range(2)] == [[], []] and every.walks == 3, "and every full_s anyway"
