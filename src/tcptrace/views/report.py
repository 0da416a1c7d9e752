"""`tcptrace diagnose --report FILE`: one self-contained HTML file to attach to a ticket.

No external asset, no script: inline CSS and inline SVG plots only, so the file opens the
same anywhere, offline. Every text from the kernel, a recording or /proc is escaped.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Sequence
from typing import Any

from tcptrace.model.attribution import Attributor, RolePath
from tcptrace.model.diagnosis import Diagnosis
from tcptrace.model.events import STATE_ORDER
from tcptrace.model.histogram import US, Bucket, log2_buckets
from tcptrace.model.overview import Overview
from tcptrace.printable import printable
from tcptrace.views.common import bucket_label, duration

NS = 1_000_000_000
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
.v{margin:.5em 0;padding:.4em .7em;border-left:5px solid #999;background:#fafafa}
.problem{border-color:#c00}.warning{border-color:#d90}.info{border-color:#08c}.ok{border-color:#090}
.sev{font-weight:bold;text-transform:uppercase;margin-right:.5em}
ul.ev{margin:.2em 0 0 1em;color:#555;font-size:.92em}
table{border-collapse:collapse}td,th{padding:.15em .8em;text-align:right}th{border-bottom:1px solid #ccc}
td:first-child,th:first-child{text-align:left}svg text{font:11px sans-serif}
code{font-size:.95em}.dim{color:#777}
pre.stack{font-size:.85em;margin:.2em 0 .6em 1em;white-space:pre-wrap}pre.stack b{color:#060}
"""


def esc(value: object) -> str:
    """HTML-escaped, with non-printables (a bidi override, a control) shown as escapes."""
    return html.escape(printable(str(value)), quote=True)


def bar_chart(rows: Sequence[tuple[str, float]], title: str, width: int = 560, color: str = "#4a7") -> str:
    """Horizontal bars, one per (label, value), as inline SVG."""
    if not rows:
        return f'<p class="dim">{esc(title)}: nothing to plot</p>'
    line = 18
    label_w = 150
    peak = max(v for _, v in rows) or 1
    h = line * len(rows) + 24
    out = [f'<svg width="{width}" height="{h}" role="img" aria-label="{esc(title)}">']
    out.append(f'<text x="0" y="12" font-weight="bold">{esc(title)}</text>')
    for i, (label, value) in enumerate(rows):
        y = 20 + i * line
        w = 0 if value <= 0 else max(1, (width - label_w - 70) * value / peak)
        out.append(f'<text x="0" y="{y + 12}">{esc(label)}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{line - 5}" fill="{color}"/>')
        shown = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
        out.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 12}">{esc(shown)}</text>')
    out.append("</svg>")
    return "".join(out)


def wall_clock(ts_ns: int, offset_ns: int, with_date: bool = False) -> str:
    """A kernel timestamp as local wall-clock time (``offset_ns``: wall - monotonic)."""
    fmt = "%Y-%m-%d %H:%M:%S %Z" if with_date else "%H:%M:%S"
    return time.strftime(fmt, time.localtime((ts_ns + offset_ns) / NS))


def time_ticks(first_ns: int, last_ns: int, offset_ns: int | None, count: int = 5) -> list[tuple[float, str]]:
    """(fraction of the span, label) of ``count`` ticks from ``first_ns`` to ``last_ns``:
    wall-clock times when the clock offset is known, else seconds since the first.

    >>> time_ticks(0, 10 * NS, None, 3)
    [(0.0, '+0 s'), (0.5, '+5 s'), (1.0, '+10 s')]
    """
    span = max(1, last_ns - first_ns)
    out = []
    for i in range(count):
        at = first_ns + span * i // (count - 1)
        label = wall_clock(at, offset_ns) if offset_ns is not None else f"+{(at - first_ns) / NS:.3g} s"
        out.append((i / (count - 1), label))
    return out


def line_plot(
    points: Sequence[tuple[int, float]],
    title: str,
    unit: str,
    offset_ns: int | None = None,
    width: int = 560,
    height: int = 140,
) -> str:
    """A line of (time, value) points as inline SVG, with a time axis: wall-clock ticks
    when ``offset_ns`` is given, else seconds since the first point."""
    if len(points) < 2:
        return f'<p class="dim">{esc(title)}: not enough intervals to plot</p>'
    peak = max(v for _, v in points) or 1.0
    first, last = points[0][0], points[-1][0]
    span = max(1, last - first)
    left, top, w, h = 48, 18, width - 80, height - 48
    pts = " ".join(f"{left + w * (t - first) / span:.1f},{top + h - h * v / peak:.1f}" for t, v in points)
    axis = [
        f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#999"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#999"/>',
    ]
    for frac, label in time_ticks(first, last, offset_ns):
        x = left + w * frac
        axis.append(f'<line x1="{x:.1f}" y1="{top + h}" x2="{x:.1f}" y2="{top + h + 4}" stroke="#999"/>')
        axis.append(f'<text x="{x:.1f}" y="{top + h + 16}" text-anchor="middle">{esc(label)}</text>')
    time_unit = "local time" if offset_ns is not None else "time since the first interval"
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="{esc(title)}">'
        f'<text x="0" y="12" font-weight="bold">{esc(title)}</text>'
        + "".join(axis)
        + f'<text x="0" y="{top + 10}">{esc(f"{peak:,.1f}")}</text><text x="0" y="{top + h}">0</text>'
        f'<text x="0" y="{top + h / 2 + 4:.0f}" class="dim">{esc(unit)}</text>'
        f'<polyline fill="none" stroke="#c60" stroke-width="2" points="{pts}"/>'
        f'<text x="{left + w / 2:.0f}" y="{height - 2}" text-anchor="middle">{esc(time_unit)}</text></svg>'
    )


def filter_text(flt: Any) -> str:
    """A filter as the options that made it: ``--port 80 --pid 7``, or ``none``.

    >>> filter_text({"pid": 7, "comm": None, "ports": [80, 443], "family": 6})
    '--pid 7 --port 80 --port 443 -6'
    """
    if not isinstance(flt, dict):
        return str(flt or "none")
    parts = []
    if flt.get("pid") is not None:
        parts.append(f"--pid {flt['pid']}")
    if flt.get("comm"):
        parts.append(f"--comm {flt['comm']}")
    parts += [f"--port {p}" for p in flt.get("ports") or []]
    if flt.get("family"):
        parts.append(f"-{flt['family']}")
    return " ".join(parts) or "none"


def _verdicts(d: Diagnosis) -> str:
    out = []
    for v in d.verdicts:
        ev = "".join(f"<li>{esc(e)}</li>" for e in v.evidence)
        out.append(
            f'<div class="v {esc(v.severity)}"><span class="sev">{esc(v.severity)}</span>{esc(v.text)}'
            + (f'<ul class="ev">{ev}</ul>' if ev else "")
            + "</div>"
        )
    return "".join(out)


def _bucket_rows(buckets: Sequence[Bucket]) -> list[tuple[str, float]]:
    return [(bucket_label(b.low_ns, b.high_ns), float(b.count)) for b in buckets]


def _states(d: Diagnosis) -> str:
    start, end = d.start or {}, d.end or {}
    if not (start or end):
        return bar_chart([(s.name, float(n)) for s, n in d.live_counts.items()], "sockets by state (traced)")
    rows = "".join(
        f"<tr><td>{s.name}</td><td>{start.get(s, 0)}</td><td>{end.get(s, 0)}</td></tr>"
        for s in STATE_ORDER
        if start.get(s, 0) or end.get(s, 0)
    )
    return f"<table><tr><th>state</th><th>start</th><th>end</th></tr>{rows}</table>" + bar_chart(
        [(s.name, float(end.get(s, 0))) for s in STATE_ORDER if end.get(s, 0)],
        "sockets by state at the end",
    )


def _close_wait(d: Diagnosis, overview: Overview) -> str:
    parts = [
        "<h2>CLOSE_WAIT</h2>",
        f"<p>{d.close_wait_entered} entered during the window, {d.close_wait_closed} closed by their "
        f"application; {len(d.stuck)} present at the start and still at the end (stuck).</p>",
    ]
    if d.close_wait_owners:
        rows = "".join(
            f"<tr><td>{esc(o.pid if o.pid is not None else '-')} {esc(o.comm or '')}</td><td>{o.count}</td>"
            f"<td>{esc(o.remotes.text())}</td></tr>"
            for o in d.close_wait_owners[:20]
        )
        parts.append(f"<table><tr><th>owner</th><th>sockets</th><th>remotes</th></tr>{rows}</table>")
    ages = [s.age_ns(overview.now_ns) for s in overview.closewait.open.values()]
    if ages:
        parts.append(
            bar_chart(
                _bucket_rows(log2_buckets(ages, unit_ns=US)),
                "age of the sockets in CLOSE_WAIT at the end",
                color="#c33",
            )
        )
    if d.time_to_close.count:
        parts.append(
            bar_chart(
                _bucket_rows(d.time_to_close.buckets),
                "time from the peer's FIN to the app's close()",
            )
        )
    return "".join(parts)


def _stack(path: RolePath) -> str:
    """A code path's frames, innermost first, the application's in bold (the tracer's left out)."""
    app = path.stack.app_frame
    lines = [
        f"<b>{esc(f.text)}</b>" if app is not None and f.frame is app else esc(f.text)
        for f in path.stack.frames
    ]
    return (
        f"<p><b>{esc(path.title)}</b>: {esc(path.op_text())}</p><pre class='stack'>"
        + ("\n".join(lines) or "<span class='dim'>(no stack)</span>")
        + "</pre>"
    )


def _leaks(overview: Overview, attributor: Attributor | None) -> str:
    """Each group of leak suspects: what it is attributed to, the hints, and its full stacks."""
    groups = overview.closewait.suspects(overview.now_ns)
    if not groups:
        return ""
    attribute = attributor or Attributor()
    parts = ["<h2>Leak suspects</h2>"]
    for group in groups[:20]:
        named = attribute(group)
        who = "unknown owner" if group.pid is None else f"{group.pid} {group.comm or ''}"
        parts.append(
            f"<h3>{group.count} × {esc(who)} → <code>{esc(named.headline())}</code></h3>"
            f"<p class='dim'>{esc(named.scope)}; remotes: {esc(group.remotes.text())}</p>"
        )
        parts.extend(f"<p>hint: {esc(h.text)}</p>" for h in named.hints)
        parts.extend(_stack(p) for p in named.paths)
    if len(groups) > 20:
        parts.append(f"<p class='dim'>… {len(groups) - 20} more groups</p>")
    return "".join(parts)


def _time_wait(d: Diagnosis, overview: Overview, offset_ns: int | None) -> str:
    parts = [
        "<h2>TIME_WAIT</h2>",
        f"<p>{d.tw_created} created ({d.tw_rate:.1f}/s)"
        + (f"; {d.tw_now} timewait sockets on the host now" if d.tw_now is not None else "")
        + (f"; {d.ports} ephemeral ports per destination" if d.ports else "")
        + ".</p>",
        line_plot(
            [(i.end_ns, i.rate_per_s) for i in overview.timewait.intervals],
            "TIME_WAIT created per second, each interval",
            "per s",
            offset_ns,
        ),
    ]
    if d.tw_by_process:
        parts.append(
            bar_chart(
                [(f"{p} {c}", float(n)) for p, c, n in d.tw_by_process[:10]],
                "TIME_WAIT created, by process",
                color="#c60",
            )
        )
    if d.forecasts:
        rows = "".join(
            f"<tr><td>{esc(f.dest.remote)}</td><td>{f.rate_per_s:.1f}</td><td>{f.held_steady:.0f}</td>"
            f"<td>{f.ports}</td><td>{f.utilization:.0%}</td>"
            f"<td>{'-' if f.seconds_to_exhaustion is None else f'{f.seconds_to_exhaustion:.0f} s'}</td></tr>"
            for f in d.forecasts
        )
        parts.append(
            "<table><tr><th>destination</th><th>per s</th><th>held (rate × 60 s)</th><th>ports</th>"
            f"<th>use</th><th>exhausted in</th></tr>{rows}</table>"
        )
    return "".join(parts)


def _close_latency(d: Diagnosis, overview: Overview) -> str:
    hist = overview.close_latency()
    if not hist.count:
        return "<h2>close() latency</h2><p class='dim'>no close() of a TCP socket seen</p>"
    return (
        "<h2>close() latency</h2>"
        f"<p>{hist.count} calls; p50 {esc(duration(d.close_p50_ns))}, "
        f"p99 {esc(duration(d.close_p99_ns))}, max {esc(duration(d.close_max_ns))}</p>"
        + bar_chart(_bucket_rows(hist.buckets()), "close() duration", color="#57c")
    )


def _settings(d: Diagnosis) -> str:
    if not d.settings:
        return ""
    parts = ["<h2>Settings</h2><table><tr><th>setting</th><th>value</th><th>meaning</th></tr>"]
    for a in d.settings:
        style = " style='color:#b60'" if a.warn else ""
        parts.append(
            f"<tr{style}><td><code>{esc(a.setting)}</code></td><td>{esc(a.value)}</td>"
            f"<td style='text-align:left'>{esc(a.meaning)}</td></tr>"
        )
    parts.append("</table>")
    return "".join(parts)


def render_report(
    d: Diagnosis, overview: Overview, meta: dict[str, Any], attributor: Attributor | None = None
) -> str:
    """The whole report as one HTML document: the verdicts, then each section's facts
    (``attributor``: how leak suspects are attributed, as the verdicts were), and a footer
    saying what made it (see ``footer``)."""
    host = meta.get("host") or os.uname().nodename
    offset = meta.get("clock_offset_ns")
    return "".join(
        [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>tcptrace diagnose: {esc(host)}</title><style>{CSS}</style></head><body>",
            f"<h1>tcptrace diagnose — {esc(host)}</h1>",
            f"<p class='dim'>{esc(_window(d, overview, offset))}; kernel {esc(meta.get('kernel', ''))}; "
            f"filter {esc(filter_text(meta.get('filter')))}; events lost {d.lost}</p>",
            "<h2>Verdicts</h2>",
            _verdicts(d),
            "<h2>Sockets by state</h2>",
            _states(d),
            _close_wait(d, overview),
            _leaks(overview, attributor),
            _time_wait(d, overview, offset if isinstance(offset, int) else None),
            _close_latency(d, overview),
            _settings(d),
            footer(d, overview, meta, host),
            "</body></html>\n",
        ]
    )


def _window(d: Diagnosis, overview: Overview, offset: object) -> str:
    """The observed window: from when to when (wall clock, when known) and how long."""
    if isinstance(offset, int) and overview.start_ns is not None:
        start = wall_clock(overview.start_ns, offset, with_date=True)
        end = wall_clock(overview.now_ns, offset)
        return f"window {start} to {end} ({d.window_s:.1f} s)"
    return f"window {d.window_s:.1f} s"


def footer(d: Diagnosis, overview: Overview, meta: dict[str, Any], host: str) -> str:
    """Which tcptrace made the report, on which host, with which command line, over which
    window, and when: what a reader of a ticket needs to redo or trust it."""
    items = [
        f"tcptrace {meta.get('version', '?')}",
        f"host {host}",
        f"kernel {meta.get('kernel', '?')}",
        f"command line: {meta.get('command', 'tcptrace diagnose')}",
        _window(d, overview, meta.get("clock_offset_ns")),
        f"written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]
    if meta.get("recording"):
        items.insert(4, f"replayed from {meta['recording']}")
    shown = "".join(f"<li>{esc(item)}</li>" for item in items)
    return (
        f"<footer class='dim'><h2>About this report</h2><ul>{shown}</ul>"
        "<p>Self-contained: no script, no external asset.</p></footer>"
    )
