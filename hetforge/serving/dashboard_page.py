"""The built-in dashboard page: what the Grafana dashboard shows, served by the ingress itself.

For the embedded default no Grafana runs, so `GET /dashboard` on the deployment's address shows
the same things from the replicas' own metrics files: end-to-end latency against the SLO, per-stage
latency, per-stage speedup of the active variant over the reference (now and over time), the
placement, recent swaps, rollout decisions and the variants waiting for a human. The page is plain
HTML with inline SVG plots drawn here (no script, nothing fetched from elsewhere), refreshed every
few seconds; `GET /v1/pipelines/{name}/dashboard` returns the same numbers as JSON.

`DashboardSampler` keeps the time series: every `every_s` it reads the multiprocess metrics files
(the same ones /metrics aggregates) and turns the counters' differences over the last `window_s`
into quantiles, as Prometheus' `rate` + `histogram_quantile` would.
"""

from __future__ import annotations

import collections
import html
import threading
import time
from dataclasses import asdict, dataclass

from hetforge.serving.replica_metrics import MetricsSnapshot, bucket_diff, bucket_quantile, read_local

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
SPEEDUP_BAR = "#2e8b57"  # the speedup bars' fill (the page test looks for it in the screenshot)
SLO_LINE = "#d62728"


@dataclass(frozen=True)
class Point:
    """One sample of the page's time series (latencies in ms over the window before `t`)."""

    t: float
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    rps: float
    stage_p50_ms: dict[str, float]
    speedup: dict[str, float]
    serving: dict[str, str]  # stage -> the variant that served most of the window's calls


def point_between(new: MetricsSnapshot, old: MetricsSnapshot, t: float, dt: float) -> Point:
    """The window's numbers from two snapshots (a replica restarted in between: the new counts alone)."""
    if new.pipeline_count < old.pipeline_count:
        old = MetricsSnapshot()
    e2e = bucket_diff(new.pipeline_buckets, old.pipeline_buckets)
    stage_p50, serving = {}, {}
    for stage, counters in new.stages.items():
        before = old.stages.get(stage)
        q = bucket_quantile(bucket_diff(counters.buckets, before.buckets if before else {}), 0.5)
        if q is not None:
            stage_p50[stage] = q
        earlier = before.variant_calls if before else {}
        calls = {v: n - earlier.get(v, 0.0) for v, n in counters.variant_calls.items()}
        if calls and max(calls.values()) > 0:
            serving[stage] = max(calls, key=calls.get)
    return Point(
        t,
        bucket_quantile(e2e, 0.5),
        bucket_quantile(e2e, 0.99),
        max(0.0, new.pipeline_count - old.pipeline_count) / max(dt, 1e-9),
        stage_p50,
        dict(new.speedup),
        serving,
    )


class DashboardSampler:
    """The page's time series, sampled on a daemon thread (keeps `keep` points: 30 minutes at 2 s)."""

    def __init__(self, pipeline: str, metrics_dir: str, every_s: float = 2.0, window_s: float = 10.0, keep: int = 900):
        self.pipeline, self.metrics_dir = pipeline, metrics_dir
        self.every_s, self.window_s = every_s, window_s
        self.points: collections.deque[Point] = collections.deque(maxlen=keep)
        self._snapshots: collections.deque[tuple[float, MetricsSnapshot]] = collections.deque()
        self._stop = threading.Event()
        self.error = ""

    def start(self) -> DashboardSampler:
        threading.Thread(target=self._loop, name="hetforge-dashboard", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sample()
                self.error = ""
            except Exception as err:  # noqa: BLE001 - a file being rewritten; the next sample will do
                self.error = f"{type(err).__name__}: {err}"[:300]

    def sample(self, now: float | None = None) -> Point | None:
        now = time.time() if now is None else now
        counters = read_local(self.metrics_dir, self.pipeline)
        self._snapshots.append((now, counters))
        while len(self._snapshots) > 2 and self._snapshots[1][0] <= now - self.window_s:
            self._snapshots.popleft()
        then, old = self._snapshots[0]
        if then == now:
            return None
        point = point_between(counters, old, now, now - then)
        self.points.append(point)
        return point


# ---------------------------------------------------------------------------------------------- SVG plots
def _fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def line_chart(
    title: str,
    series: dict[str, list[tuple[float, float]]],
    unit: str,
    hline: tuple[float, str] | None = None,
    width: int = 600,
    height: int = 240,
) -> str:
    """Lines over time (x: seconds before now), with an optional dashed horizontal target line."""
    left, right, top, bottom = 56, 12, 28, 34
    pw, ph = width - left - right, height - top - bottom
    points = [p for s in series.values() for p in s]
    out = [
        f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="18" class="ptitle">{html.escape(title)}</text>',
    ]
    if not points:
        out.append(f'<text x="{left + 10}" y="{top + ph / 2}" class="empty">no data yet</text></svg>')
        return "".join(out)
    t0, t1 = min(t for t, _ in points), max(t for t, _ in points)
    t0 = min(t0, t1 - 60)
    ymax = max([v for _, v in points] + ([hline[0]] if hline else [])) * 1.15 or 1.0
    x = lambda t: left + (t - t0) / (t1 - t0) * pw  # noqa: E731
    y = lambda v: top + ph - v / ymax * ph  # noqa: E731
    for i in range(5):  # grid and y labels
        v = ymax * i / 4
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" class="ylab">{_fmt(v)}</text>'
        )
    for i in range(4):
        t = t0 + (t1 - t0) * i / 3
        label, anchor = ("now", "end") if i == 3 else (f"-{(t1 - t) / 60:.1f} min", "middle")
        out.append(f'<text x="{x(t):.1f}" y="{top + ph + 16}" class="xlab" style="text-anchor:{anchor}">{label}</text>')
    out.append(f'<text x="8" y="{top + ph / 2}" class="unit" transform="rotate(-90 8 {top + ph / 2})">{unit}</text>')
    if hline:
        out.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y(hline[0]):.1f}" y2="{y(hline[0]):.1f}" stroke="{SLO_LINE}" '
            f'stroke-width="2" stroke-dasharray="8 6"/><text x="{left + pw - 4}" y="{y(hline[0]) - 5:.1f}" class="hlab">'
            f"{html.escape(hline[1])}</text>"
        )
    legend = []
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        if pts:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2.5" points="{path}"/>')
        legend.append(f'<span class="key"><i style="background:{colour}"></i>{html.escape(name)}</span>')
    out.append("</svg>")
    return "".join(out) + f'<div class="legend">{"".join(legend)}</div>'


def bar_chart(title: str, bars: list[tuple[str, float]], width: int = 600, row: int = 30) -> str:
    """Horizontal speedup bars, with the reference's 1x marked."""
    left, right, top = 140, 60, 30
    height = top + row * max(1, len(bars)) + 24
    vmax = max([v for _, v in bars] + [1.0]) * 1.1
    pw = width - left - right
    x = lambda v: left + v / vmax * pw  # noqa: E731
    out = [
        f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="18" class="ptitle">{html.escape(title)}</text>',
    ]
    for i, (label, value) in enumerate(bars):
        y0 = top + i * row
        out.append(
            f'<text x="{left - 8}" y="{y0 + row / 2 + 4}" class="ylab">{html.escape(label)}</text>'
            f'<rect x="{left}" y="{y0 + 4}" width="{max(0.0, x(value) - left):.1f}" height="{row - 8}" fill="{SPEEDUP_BAR}"/>'
            f'<text x="{x(value) + 6:.1f}" y="{y0 + row / 2 + 4}" class="vlab">{value:.2f}x</text>'
        )
    base = top + row * max(1, len(bars))
    out.append(
        f'<line x1="{x(1.0):.1f}" x2="{x(1.0):.1f}" y1="{top}" y2="{base}" stroke="#333" stroke-dasharray="3 3"/>'
        f'<text x="{x(1.0):.1f}" y="{base + 16}" class="xlab">1x = reference</text></svg>'
    )
    return "".join(out)


# ---------------------------------------------------------------------------------------------- page
def page_data(
    pipeline,
    sampler: DashboardSampler,
    placement: dict,
    swaps: list[dict],
    events: list[dict],
    pending: list[dict],
    reoptimize: dict | None,
) -> dict:
    """Everything the page shows, as JSON."""
    points = list(sampler.points)
    return {
        "pipeline": pipeline.name,
        "generated_at": time.time(),
        "slo_p99_ms": pipeline.slo.p99_ms if pipeline.slo else None,
        "series": [asdict(p) for p in points],
        "latest": asdict(points[-1]) if points else None,
        "placement": [
            {
                "stage": s.name,
                "kind": s.kind,
                "device_class": placement.get(s.name, {}).get("device_class", "?"),
                "device": placement.get(s.name, {}).get("device", "?"),
            }
            for s in pipeline.stages
        ],
        "swaps": swaps,
        "rollout_events": events,
        "pending_approvals": pending,
        "reoptimize": reoptimize,
        "sampler_error": sampler.error,
    }


def _table(headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _ago(at: float | None, now: float) -> str:
    if not at:
        return ""
    s = max(0.0, now - at)
    return (
        f"{s:.0f} s ago"
        if s < 120
        else f"{s / 60:.0f} min ago"
        if s < 7200
        else time.strftime("%Y-%m-%d %H:%M", time.localtime(at))
    )


def render(data: dict, refresh_s: int = 5) -> str:
    """The page's HTML from `page_data`'s dict."""
    now = data["generated_at"]
    series = data["series"]
    stages = sorted({s for p in series for s in p["stage_p50_ms"]})
    e2e = {
        "p50": [(p["t"], p["e2e_p50_ms"]) for p in series if p["e2e_p50_ms"] is not None],
        "p99": [(p["t"], p["e2e_p99_ms"]) for p in series if p["e2e_p99_ms"] is not None],
    }
    slo = data["slo_p99_ms"]
    latest = data["latest"] or {"speedup": {}, "serving": {}, "rps": 0.0, "e2e_p50_ms": None, "e2e_p99_ms": None}
    speedups = sorted(latest["speedup"].items())
    headline = (
        f"{latest['rps']:.1f} requests/s; end to end p50 {_fmt(latest['e2e_p50_ms'])} ms, p99 {_fmt(latest['e2e_p99_ms'])} ms"
        if latest["e2e_p50_ms"] is not None
        else "no requests in the last window"
    )
    if slo:
        headline += f" (p99 target {_fmt(slo)} ms)"
    plots = [
        line_chart("End-to-end latency (ms)", e2e, "ms", (slo, f"SLO p99 {_fmt(slo)} ms") if slo else None),
        line_chart(
            "Stage latency p50 (ms)",
            {s: [(p["t"], p["stage_p50_ms"][s]) for p in series if s in p["stage_p50_ms"]] for s in stages},
            "ms",
        ),
        bar_chart("Speedup of the active variant over the reference", speedups),
        line_chart(
            "Speedup over time (x)",
            {s: [(p["t"], p["speedup"][s]) for p in series if s in p["speedup"]] for s, _ in speedups},
            "x",
        ),
    ]
    placement = _table(
        ["stage", "kind", "device class", "device", "serving now", "speedup"],
        [
            [
                p["stage"],
                p["kind"],
                p["device_class"],
                p["device"],
                latest["serving"].get(p["stage"], "-"),
                f"{latest['speedup'][p['stage']]:.2f}x" if p["stage"] in latest["speedup"] else "-",
            ]
            for p in data["placement"]
        ],
        "no stages",
    )
    swaps = _table(
        ["when", "stage", "to", "by", "replicas"],
        [
            [
                _ago(s["at"], now),
                s["stage"],
                s["variant"],
                s["requested_by"],
                ", ".join(f"{r['outcome']}" for r in s["reports"]) or "waiting",
            ]
            for s in data["swaps"]
        ],
        "no swaps yet",
    )
    events = _table(
        ["when", "stage", "decision", "variant", "why"],
        [
            [_ago(e["at"], now), e["stage"], e["decision"], e["variant"] or "", (e["reason"] or "")[:120]]
            for e in reversed(data["rollout_events"][-15:])
        ],
        "no rollout decisions yet",
    )
    pending = _table(
        ["variant", "stage", "name", "agent", "speedup", "flags", "found by"],
        [
            [
                p["variant_id"],
                p["stage"],
                p["name"],
                p["agent"],
                f"{p['speedup']:.2f}x" if p.get("speedup") else "-",
                ", ".join(p["flags"]) or "-",
                f"job {p['job_id']} ({p['trigger']})",
            ]
            for p in data["pending_approvals"]
        ],
        "nothing waits for approval (hetforge approvals list|show|approve|reject)",
    )
    name = html.escape(data["pipeline"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{refresh_s}">
<title>hetforge: {name}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 16px 24px; color: #222; background: #fff; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }} h2 {{ font-size: 16px; margin: 20px 0 6px; }}
.grid2 {{ display: grid; grid-template-columns: repeat(2, 620px); gap: 8px 24px; }}
.plot .ptitle {{ font-weight: 600; font-size: 13px; }} .plot .grid {{ stroke: #e4e4e4; }}
.plot .ylab {{ text-anchor: end; font-size: 11px; fill: #555; }} .plot .xlab {{ text-anchor: middle; font-size: 11px; fill: #555; }}
.plot .vlab {{ font-size: 12px; }} .plot .hlab {{ text-anchor: end; font-size: 11px; fill: {SLO_LINE}; }}
.plot .unit {{ font-size: 11px; fill: #555; }} .empty {{ color: #888; }}
.legend {{ margin: -4px 0 8px 56px; }} .key {{ margin-right: 14px; font-size: 12px; }}
.key i {{ display: inline-block; width: 12px; height: 3px; margin: 0 4px 3px 0; }}
table {{ border-collapse: collapse; }} td, th {{ border-bottom: 1px solid #ddd; padding: 3px 10px 3px 0; text-align: left; }}
</style></head><body>
<h1>hetforge: {name}</h1>
<p id="headline">{html.escape(headline)}. Updated {time.strftime("%H:%M:%S", time.localtime(now))}, every {refresh_s} s.
JSON: <code>/v1/pipelines/{name}/dashboard</code>; Prometheus: <code>/metrics</code>.</p>
<div class="grid2">{"".join(f"<div>{p}</div>" for p in plots)}</div>
<h2>Placement and speedups</h2>{placement}
<h2>Recent swaps</h2>{swaps}
<h2>Rollout decisions</h2>{events}
<h2>Waiting for approval</h2>{pending}
</body></html>
"""
