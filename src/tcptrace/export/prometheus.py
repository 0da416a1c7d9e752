"""Prometheus exposition of the agent's state: metric families built from plain data, a
collector that serves the latest ones, and the HTTP endpoint.

The agent builds an ``ExportState`` (model/agent.py) at every interval (in its own thread, from the models
and the kernel's maps) and publishes the families made of it; a scrape (in the HTTP
server's thread) only hands out the last published list, so the two threads share one
reference swapped under a lock and nothing else.

Histograms of durations come from the kernel's log2 slots (slot k holds integer ns values
2**(k-1) <= v < 2**k, i.e. v <= 2**k - 1), so the bucket ``le = (2**k - 1) ns`` counts
exactly the values of slots 0..k: no bucket is an estimate. Slots below LOW_SLOT fold
into its bucket, slots above HIGH_SLOT into +Inf.

Labels that name processes or remote ports are bounded (model/cardinality.py): the
aggregate is ``comm="other", pid=""`` or ``remote_port="other"``. Process series carry the
owner's container, pod and Kubernetes namespace too (functions of the process: bounded
with it), and no pid with --no-pid-label.
"""

from __future__ import annotations

import ipaddress
import platform
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from tcptrace import __version__
from tcptrace.errors import UsageError
from tcptrace.model.agent import ExportState
from tcptrace.model.histogram import Log2Histogram
from tcptrace.printable import printable

NS = 1_000_000_000
PREFIX = "tcptrace"

LOW_SLOT = 10  # le = 1023 ns: everything faster than ~1 us shares this bucket
HIGH_SLOT = 35  # le = 34.36 s: slower calls are in +Inf only
DURATION_SLOTS = tuple(range(LOW_SLOT, HIGH_SLOT + 1))

# Upper bounds (seconds, inclusive) of the CLOSE_WAIT age gauge histogram.
AGE_BOUNDS_S = (0.1, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 86400.0)


def float_text(value: float) -> str:
    """A bound as Prometheus prints it.

    >>> float_text(1023e-9), float_text(5.0), float_text(float("inf"))
    ('1.023e-06', '5.0', '+Inf')
    """
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


def slot_le_seconds(slot: int) -> float:
    """The inclusive upper bound of a log2 slot, in seconds: (2**slot - 1) ns.

    >>> slot_le_seconds(10)
    1.023e-06
    """
    return ((1 << slot) - 1) / NS


def duration_buckets(hist: Log2Histogram, slots: Sequence[int] = DURATION_SLOTS) -> list[tuple[str, float]]:
    """Cumulative (le, count) buckets of a log2 histogram of ns durations, ending in +Inf.

    >>> h = Log2Histogram.of([0, 1000, 1500, 3_000_000])
    >>> b = duration_buckets(h, (10, 11, 22))
    >>> b
    [('1.023e-06', 2.0), ('2.047e-06', 3.0), ('0.004194303', 4.0), ('+Inf', 4.0)]
    """
    out = []
    counts = hist.counts
    running = 0
    nxt = 0
    for slot in slots:
        while nxt <= slot:
            running += counts[nxt]
            nxt += 1
        out.append((float_text(slot_le_seconds(slot)), float(running)))
    out.append(("+Inf", float(hist.count)))
    return out


def age_buckets(
    ages_ns: Iterable[int], bounds_s: Sequence[float] = AGE_BOUNDS_S
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) buckets of ages and their sum in seconds.

    >>> age_buckets([int(0.5e9), int(2e9), int(2e9)], (1.0, 5.0))
    ([('1.0', 1.0), ('5.0', 3.0), ('+Inf', 3.0)], 4.5)
    """
    ages = sorted(a / NS for a in ages_ns)
    out = []
    i = 0
    for bound in bounds_s:
        while i < len(ages) and ages[i] <= bound:
            i += 1
        out.append((float_text(bound), float(i)))
    out.append(("+Inf", float(len(ages))))
    return out, sum(ages)


PROC_LABELS = ("pid", "comm", "container", "pod", "namespace")


def proc_label_names(state: ExportState) -> list[str]:
    """The labels of per-process series: pid (unless --no-pid-label), comm, and the owner's
    container, pod and Kubernetes namespace (empty outside a container)."""
    return list(PROC_LABELS if state.pid_label else PROC_LABELS[1:])


def proc_labels(proc: tuple[Any, ...], with_pid: bool = True) -> list[str]:
    r"""Label values of a series key (model/agent.py Proc), in proc_label_names' order; the
    aggregate (and an unknown owner) has an empty pid.

    Names are whatever the process, the container runtime or the pod's owner chose: their
    non-printable characters are escaped (prometheus_client escapes only backslash, quote
    and newline, so a carriage return would reach the exposition raw and split the line for
    a reader in text mode).

    >>> proc_labels((42, "a\rb\x1b"))
    ['42', 'a\\x0db\\x1b', '', '', '']
    >>> proc_labels((0, "nginx", "web", "web-1", "shop"), with_pid=False)
    ['nginx', 'web', 'web-1', 'shop']
    """
    pid, comm, *where = proc
    where = [*where, "", "", ""][:3]
    values = [printable(comm), *(printable(w) for w in where)]
    return ["" if pid == 0 else str(pid), *values] if with_pid else values


def families(state: ExportState) -> list[Metric]:
    """The metric families of one export."""
    return [
        *_socket_states(state),
        *_close_wait(state),
        *_timewait(state),
        *_resets(state),
        *_close_latency(state),
        *_health(state),
    ]


def _socket_states(state: ExportState) -> list[Metric]:
    """Sockets by state (when /proc was read)."""
    if state.states is None:
        return []
    return [
        _by_label(
            GaugeMetricFamily,
            "sockets",
            "TCP sockets by state in the host network namespace (from /proc/net/tcp and tcp6).",
            "state",
            state.states,
        )
    ]


def _close_wait(state: ExportState) -> list[Metric]:
    """CLOSE_WAIT now, per process, and since the agent started."""
    out: list[Metric] = []
    open_g = GaugeMetricFamily(
        f"{PREFIX}_close_wait_sockets",
        "Sockets in CLOSE_WAIT now, by owning process.",
        labels=proc_label_names(state),
    )
    over_g = GaugeMetricFamily(
        f"{PREFIX}_close_wait_over_threshold_sockets",
        f"Sockets in CLOSE_WAIT for at least the threshold ({state.threshold_s:g} s): leak suspects.",
        labels=proc_label_names(state),
    )
    oldest_g = GaugeMetricFamily(
        f"{PREFIX}_close_wait_oldest_age_seconds",
        "Age of the oldest socket in CLOSE_WAIT, by owning process (at least, for sockets found at start).",
        labels=proc_label_names(state),
    )
    ages_h = GaugeHistogramMetricFamily(
        f"{PREFIX}_close_wait_age_seconds",
        "Ages of the sockets in CLOSE_WAIT now, by owning process.",
        labels=proc_label_names(state),
    )
    threshold_ns = int(state.threshold_s * NS)
    for proc, ages in sorted(state.close_wait_ages.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        labels = proc_labels(proc, state.pid_label)
        open_g.add_metric(labels, len(ages))
        over_g.add_metric(labels, sum(1 for a in ages if a >= threshold_ns))
        oldest_g.add_metric(labels, max(ages, default=0) / NS)
        buckets, total = age_buckets(ages)
        ages_h.add_metric(labels, buckets, total)
    out += [open_g, over_g, oldest_g, ages_h]

    out.append(
        _gauge("close_wait_threshold_seconds", "The leak-suspect threshold (--threshold).", state.threshold_s)
    )
    out.append(
        _counter(
            "close_wait_entered",
            "Sockets that entered CLOSE_WAIT since the agent started.",
            state.close_wait_entered,
        )
    )
    out.append(
        _counter(
            "close_wait_closed",
            "Sockets the application closed out of CLOSE_WAIT (-> LAST_ACK) since the agent started.",
            state.close_wait_closed,
        )
    )
    out.append(
        _counter(
            "close_wait_reset",
            "Sockets reset out of CLOSE_WAIT since the agent started.",
            state.close_wait_reset,
        )
    )
    out.append(
        _counter(
            "close_wait_forgotten",
            "Sockets whose address was reused while the kernel held them in CLOSE_WAIT "
            "(their exit was not seen).",
            state.close_wait_forgotten,
        )
    )
    out.append(
        _gauge(
            "close_wait_preexisting_sockets",
            "Sockets found in CLOSE_WAIT when the agent started.",
            state.close_wait_preexisting,
        )
    )
    out.append(
        _gauge(
            "leak_suspect_groups", "Groups of leak suspects by (owner, code path) now.", state.suspect_groups
        )
    )
    return out


def _timewait(state: ExportState) -> list[Metric]:
    """TIME_WAIT created, in all and by process and remote port (bounded)."""
    out: list[Metric] = []
    out.append(
        _counter(
            "timewait_created",
            "TIME_WAIT sockets created since the agent started (exact, in-kernel).",
            state.timewait_created,
        )
    )
    tw_p = CounterMetricFamily(
        f"{PREFIX}_timewait_created_by_process",
        "TIME_WAIT sockets created, by the process that owned the full socket (bounded).",
        labels=proc_label_names(state),
    )
    for proc, n in state.timewait_by_proc:
        tw_p.add_metric(proc_labels(proc, state.pid_label), n)
    out.append(tw_p)
    tw_r = CounterMetricFamily(
        f"{PREFIX}_timewait_created_by_remote_port",
        "TIME_WAIT sockets created, by remote port (bounded).",
        labels=["remote_port"],
    )
    for port, n in state.timewait_by_remote_port:
        tw_r.add_metric([port], n)
    out.append(tw_r)
    return out


def _resets(state: ExportState) -> list[Metric]:
    """Resets sent and received, in all and by process (bounded)."""
    out: list[Metric] = []
    out.append(_counter("resets_sent", "TCP resets sent since the agent started.", state.resets_sent))
    out.append(
        _counter("resets_received", "TCP resets received since the agent started.", state.resets_received)
    )
    for name, rows, what in (
        ("resets_sent_by_process", state.resets_sent_by_proc, "sent"),
        ("resets_received_by_process", state.resets_received_by_proc, "received"),
    ):
        c = CounterMetricFamily(
            f"{PREFIX}_{name}",
            f"TCP resets {what}, by socket owner (bounded).",
            labels=proc_label_names(state),
        )
        for proc, n in rows:
            c.add_metric(proc_labels(proc, state.pid_label), n)
        out.append(c)
    return out


def _close_latency(state: ExportState) -> list[Metric]:
    """close(), shutdown() and close_range(): durations by process, calls in all."""
    out: list[Metric] = []
    h = HistogramMetricFamily(
        f"{PREFIX}_close_duration_seconds",
        "Duration of close(), shutdown() and close_range() on TCP sockets (exact log2 buckets).",
        labels=[*proc_label_names(state), "call"],
    )
    for proc, call, hist in state.close_durations:
        h.add_metric([*proc_labels(proc, state.pid_label), call], duration_buckets(hist), hist.sum_ns / NS)
    out.append(h)
    out.append(
        _by_label(
            CounterMetricFamily,
            "close_calls",
            "close(), shutdown() and close_range() calls on TCP sockets, all processes.",
            "call",
            state.close_calls,
        )
    )
    return out


def _health(state: ExportState) -> list[Metric]:
    """What the agent itself saw, lost, pruned and holds."""
    out: list[Metric] = []
    out.append(_counter("events", "Events decoded from the kernel's ring buffer.", state.events_decoded))
    out.append(
        _counter(
            "events_lost", "Events the kernel could not queue (ring buffer full): exact.", state.events_lost
        )
    )
    out.append(_counter("events_malformed", "Events that could not be decoded.", state.events_malformed))
    out.append(
        _by_label(
            CounterMetricFamily,
            "kernel_map_failures",
            "Kernel map updates or stack captures that failed, by map.",
            "map",
            state.map_failures,
        )
    )
    out.append(
        _by_label(
            CounterMetricFamily,
            "kernel_map_evictions",
            "Entries that mattered which a bounded kernel table lost (the socket table: live sockets "
            "met again with their owner evicted), by map.",
            "map",
            state.map_evictions,
        )
    )
    out.append(
        _by_label(
            GaugeMetricFamily,
            "label_sets",
            "Label sets kept per bounded metric (at most --top-processes or --top-ports).",
            "metric",
            state.label_keys,
        )
    )
    out.append(
        _by_label(
            CounterMetricFamily,
            "map_entries_pruned",
            "Idle kernel map entries the agent deleted.",
            "map",
            state.pruned,
        )
    )
    out.append(
        _by_label(
            CounterMetricFamily,
            "bpf_recursion_misses",
            "Runs of a BPF program the kernel skipped because another one was running on that CPU: "
            "what they would have counted or sent is missing without a trace (not in events_lost).",
            "program",
            state.recursion_misses,
        )
    )
    out.append(_gauge("symbol_caches", "bcc per-process symbol caches held (bounded).", state.symbol_caches))
    out.append(
        _gauge(
            "tracked_sockets",
            "Sockets in the agent's own table (bounded by --max-sockets).",
            state.user_sockets,
        )
    )
    return out


def refresh_families(tick_errors: int, last_success_s: float | None) -> list[Metric]:
    """How the agent's refreshes go: failures, and when one last succeeded (absent before
    the first: ``time() - tcptrace_last_successful_refresh_timestamp_seconds`` is the age of
    what a scrape shows)."""
    out: list[Metric] = [
        _counter(
            "agent_tick_errors",
            "Refreshes that failed (each logged as an agent_error line); the values served are "
            "then those of the last refresh that succeeded.",
            tick_errors,
        )
    ]
    if last_success_s is not None:
        out.append(
            _gauge(
                "last_successful_refresh_timestamp_seconds",
                "When the values served were refreshed (Unix time): alert when it falls behind.",
                last_success_s,
            )
        )
    return out


def build_info() -> GaugeMetricFamily:
    """``tcptrace_build_info{version, python} 1``, as exporters name their build."""
    info = GaugeMetricFamily(
        f"{PREFIX}_build_info",
        "The tcptrace version and Python running the agent.",
        labels=["version", "python"],
    )
    info.add_metric([__version__, platform.python_version()], 1)
    return info


BUILD_INFO = build_info()


def _by_label(
    family: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    doc: str,
    label: str,
    values: Mapping[str, int],
) -> Metric:
    """One family with one label, a sample per key, in key order."""
    out = family(f"{PREFIX}_{name}", doc, labels=[label])
    for key, n in sorted(values.items()):
        out.add_metric([key], n)
    return out


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class AgentCollector(Collector):
    """Serves the last published families to every scrape, and the refreshes' own health,
    which changes when a refresh fails too (so a failing agent is seen failing, not only
    serving stale values): ``tcptrace_agent_tick_errors_total`` and the time of the last
    refresh that succeeded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: list[Metric] = []
        self.tick_errors = 0
        self.last_success_s: float | None = None

    def publish(self, fams: list[Metric], at_s: float | None = None) -> None:
        """The families of a refresh that succeeded (at ``at_s``, wall-clock seconds)."""
        with self._lock:
            self._families = fams
            self.last_success_s = time.time() if at_s is None else at_s

    def refresh_failed(self) -> None:
        with self._lock:
            self.tick_errors += 1

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            return [*self._families, *refresh_families(self.tick_errors, self.last_success_s), BUILD_INFO]

    def describe(self) -> Iterable[Metric]:
        return []


def make_registry(collector: AgentCollector, process_metrics: bool = True) -> CollectorRegistry:
    """A registry of the agent's collector plus the process_* metrics of the agent itself
    (CPU seconds, resident and virtual memory, open fds)."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if process_metrics:
        ProcessCollector(registry=registry)
    return registry


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) -> (host, port). An address must be given: binding
    every interface is a decision, not a default.

    >>> parse_listen("127.0.0.1:9464"), parse_listen("[::1]:9464"), parse_listen("0.0.0.0:80")
    (('127.0.0.1', 9464), ('::1', 9464), ('0.0.0.0', 80))
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--listen {text!r}: the port is not a number") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"--listen {text!r}: port out of range")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise UsageError(f"--listen {text!r}: give an IP address (or localhost)") from None
    return host, port


def text_of(registry: CollectorRegistry) -> str:
    """The exposition text a scrape would get (for tests and --once)."""
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


def sample_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """One sample's value from exposition text, parsed with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    want = dict(labels or {})
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                return float(s.value)
    return None
