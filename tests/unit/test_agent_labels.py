"""The agent's container, pod and namespace labels, and --no-pid-label: series per container
that survive restarts, bounded like every per-process label set."""

from __future__ import annotations

from dataclasses import dataclass, field

from tcptrace.export.prometheus import AgentCollector, families, make_registry, sample_value, text_of
from tcptrace.model.agent import AgentConfig, AgentModel, ProcTw
from tcptrace.model.events import Op, TcpState
from tcptrace.model.workload import Workload, identify
from tests.unit.test_lifecycle import touch, tr

S = TcpState
NS = 1_000_000_000
POD = "0b5c2a36-7d4e-4e8f-9f7a-2a3f1b9c8d7e"
CID = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"
PATH = f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/cri-containerd-{CID}.scope"


@dataclass
class Node:
    """A Whois of a node: pids 1-3 run nginx in one pod's container (cgroup 50), pid 9 on the host."""

    host_netns: int | None = 1
    pids: dict[int, int] = field(default_factory=lambda: {1: 50, 2: 50, 3: 50, 9: 1})

    def workload(self, cgroup: int | None) -> Workload | None:
        if cgroup == 50:
            return Workload(identify(PATH), pod_name="web-1", namespace="shop", container_name="nginx")
        return None if cgroup is None else Workload(identify("/"))

    def nspid(self, pid: int | None) -> int | None:
        return 1 if pid in (1, 2, 3) else None

    def pid_cgroup(self, pid: int | None) -> int | None:
        return None if pid is None else self.pids.get(pid)


def scrape(m: AgentModel, now: int) -> str:
    """The metrics at ``now``, once the model took what the events fed aggregate to."""
    if m.emulator is not None:
        m.closewait.apply(m.emulator.snapshot(now))
    c = AgentCollector()
    c.publish(families(m.export(now)))
    return text_of(make_registry(c, process_metrics=False))


def lines_of(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_process_series_carry_container_pod_and_namespace() -> None:
    m = AgentModel(AgentConfig(), Node())
    m.tick(0, tw_procs={(1, 1): ProcTw("nginx", created=4), (9, 1): ProcTw("curl", created=2)})
    text = scrape(m, NS)
    web = {"pid": "1", "comm": "nginx", "container": "nginx", "pod": "web-1", "namespace": "shop"}
    assert sample_value(text, "tcptrace_timewait_created_by_process_total", web) == 4
    host = {"pid": "9", "comm": "curl", "container": "", "pod": "", "namespace": ""}
    assert sample_value(text, "tcptrace_timewait_created_by_process_total", host) == 2


def test_without_the_pid_label_a_restart_continues_the_series() -> None:
    m = AgentModel(AgentConfig(pid_label=False), Node())
    m.tick(0, tw_procs={(1, 1): ProcTw("nginx", created=4), (2, 1): ProcTw("nginx", created=1)})
    # pid 1 exits; its replacement (pid 3) creates more in the same container
    m.tick(NS, tw_procs={(2, 1): ProcTw("nginx", created=1), (3, 1): ProcTw("nginx", created=5)})
    text = scrape(m, 2 * NS)
    rows = [line.split("{", 1)[1] for line in lines_of(text, "tcptrace_timewait_created_by_process_total")]
    assert rows == [
        'comm="nginx",container="nginx",namespace="shop",pod="web-1"} 10.0',
        'comm="other",container="",namespace="",pod=""} 0.0',
    ]
    assert "pid=" not in text.split("tcptrace_close_duration_seconds")[0]


def test_close_wait_series_take_the_sockets_cgroup_and_leak_logs_name_the_pod() -> None:
    m = AgentModel(AgentConfig(threshold_ns=NS, pid_label=False), Node())
    for sk, pid in ((100, 1), (101, 3)):
        m.feed(tr(0, sk, S.LISTEN, S.SYN_RECV, pid=pid, cgroup=50))
        m.feed(tr(1, sk, S.SYN_RECV, S.ESTABLISHED, pid=pid, cgroup=50))
        m.feed(touch(2, sk, Op.ACCEPT, pid, ustack=("accept", "main")))
        m.feed(tr(3, sk, S.ESTABLISHED, S.CLOSE_WAIT, pid=pid, cgroup=50))
    text = scrape(m, 5 * NS)
    labels = {"comm": f"p{1}", "container": "nginx", "pod": "web-1", "namespace": "shop"}
    assert sample_value(text, "tcptrace_close_wait_sockets", labels) == 1
    assert sample_value(text, "tcptrace_close_wait_sockets", {**labels, "comm": "p3"}) == 1
    records = m.suspect_records(5 * NS, wall_s=0.0)
    assert records and all(r["workload"]["pod"] == "web-1" and r["nspid"] == 1 for r in records)


def test_container_labels_stay_within_the_process_bound() -> None:
    node = Node(pids={pid: 50 + pid % 7 for pid in range(1, 200)})
    m = AgentModel(AgentConfig(top_processes=5), node)
    m.tick(0, tw_procs={(pid, 1): ProcTw(f"c{pid}", created=pid) for pid in range(1, 200)})
    text = scrape(m, NS)
    assert len(lines_of(text, "tcptrace_timewait_created_by_process_total")) == 5 + 1
