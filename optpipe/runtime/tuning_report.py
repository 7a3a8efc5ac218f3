"""What `optpipe tune` shows: the Pareto front (terminal table and hypervolume), best.toml, and
report.html with a cost-vs-quality scatter plot as inline SVG (no script, no network)."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

from ..report import html_page
from .tuning_space import QualityBudget

OBJECTIVE_UNITS = {"latency": "latency p50 (ms)", "throughput": "latency p50 (ms)", "size": "size (MB)"}


def pareto_front(records: Sequence[Mapping], objective: str = "latency") -> list[dict]:
    """The records no other record beats on both cost (`objective`) and quality loss, by cost."""
    del objective  # records carry `objective` (their cost) already
    pts = [r for r in records if r.get("objective") is not None and r.get("quality_loss") is not None]
    front = [
        r
        for r in pts
        if not any(
            o["objective"] <= r["objective"]
            and o["quality_loss"] <= r["quality_loss"]
            and (o["objective"] < r["objective"] or o["quality_loss"] < r["quality_loss"])
            for o in pts
        )
    ]
    return sorted(front, key=lambda r: (r["objective"], r["quality_loss"]))


def hypervolume(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """The area dominated by `points` (both coordinates minimised) up to `reference`: a sweep by
    the first coordinate, each point adding the strip below the best second coordinate so far."""
    area, best_y = 0.0, reference[1]
    for x, y in sorted((x, y) for x, y in points if x < reference[0] and y < reference[1]):
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return area


def quality_text(record: Mapping) -> str:
    q = record.get("quality") or {}
    parts = []
    if q.get("ppl") is not None:
        parts.append(f"ppl {q['ppl']:.4g}")
    for key in ("cosine", "top1_agreement", "mlm_accuracy"):
        if q.get(key) is not None:
            parts.append(f"{key.split('_')[0]} {q[key]:.4f}")
    return ", ".join(parts)


def front_rows(front: Sequence[Mapping], baseline: Mapping, best: Mapping) -> list[list[str]]:
    """Rows for the terminal table of the front (the baseline first)."""
    shown = [baseline, *[f for f in front if f.get("trial") != "baseline"]]
    if all(r.get("trial") != best.get("trial") for r in shown):
        shown.append(best)  # re-measured side by side, it may have left the front of the search's numbers
    rows = []
    for r in shown:
        c = r["cost"]
        mark = "*" if r.get("trial") == best.get("trial") else ""
        rows.append(
            [
                f"{r['trial']}{mark}",
                short_pipeline(r["pipeline"]) + ("" if r.get("mode") in (None, "default") else f" ({r['mode']})"),
                f"{c['latency_ms_p50']:.2f}",
                f"{c['tokens_per_s']:.0f}",
                f"{c['size_mb']:.2f}",
                quality_text(r),
                "yes" if r.get("within_budget") else "no",
                f"{r.get('vs_baseline') or 1.0:.2f}x",
            ]
        )
    return rows


def short_pipeline(pipeline: str) -> str:
    """The pipeline without the trailing dce every candidate ends with ("no pass" for the baseline)."""
    return "no pass" if pipeline == "dce" else pipeline.removesuffix(",dce")


FRONT_HEADER = ["trial", "pipeline", "p50 ms", "tok/s", "MB", "quality", "in budget", "vs base"]


# -- best.toml -----------------------------------------------------------------------------------------
def recipe_toml(best: Mapping, settings, note: str) -> str:
    """A recipe `optimize --recipe` reproduces: the pipeline, the target and its mode; what tune
    measured rides along as comments and a [tune] table that optimize ignores."""
    lines = [
        "# written by `optpipe tune`; reproduce with: optpipe optimize MODEL --recipe best.toml -o OUT",
        f"# {note}",
        f'pipeline = "{best["pipeline"]}"',
        f'target = "{settings.target}"',
    ]
    mode = best.get("mode")
    if settings.target in ("cpu", "cuda") and mode in ("eager", "compile"):
        lines.append(f'mode = "{mode}"')
    if settings.target.startswith("tvm") and str(mode).isdigit():
        lines.append(f"tune = {int(mode)}")
    cost = best.get("confirmed") or best["cost"]
    lines += [
        "",
        "[measured]",
        f"trial = {_toml(best['trial'])}",
        f"objective = {_toml(settings.objective)}",
        f"budget = {_toml(settings.budget.text())}",
        f"latency_ms_p50 = {cost['latency_ms_p50']:.4f}",
        f"size_mb = {cost['size_mb']:.4f}",
    ]
    for key, value in (best.get("quality") or {}).items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            lines.append(f"quality_{key} = {value:.6g}")
    healed = best.get("healed") or {}
    if healed.get("steps"):
        lines.append(f"heal_steps = {healed['steps']}  # best/ holds the healed program (optpipe train --distill-from)")
    return "\n".join(lines) + "\n"


def _toml(v) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v)


# -- report.html -------------------------------------------------------------------------------------------
W, H, PAD = 640, 360, 56


def _scale(values: Sequence[float], lo_px: float, hi_px: float):
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
    span = hi - lo
    lo, hi = lo - 0.05 * span, hi + 0.05 * span
    return (lambda v: lo_px + (v - lo) / (hi - lo) * (hi_px - lo_px)), lo, hi


def quality_axis(records: Sequence[Mapping]) -> tuple[str, str]:
    """(quality key, its label) the plot's y axis shows: perplexity where there is one."""
    q = next((r["quality"] for r in records if r.get("quality")), {})
    for key, label in (("ppl", "perplexity"), ("cosine", "cosine to the reference"), ("mlm_accuracy", "MLM accuracy")):
        if q.get(key) is not None:
            return key, label
    return "top1_agreement", "top-1 agreement"


def budget_limit(key: str, budget: Mapping, baseline: Mapping) -> float | None:
    """Where the budget puts the y axis' quality: the largest perplexity, or the smallest cosine /
    top-1 agreement, a candidate may have (None when the budget says nothing about `key`)."""
    if key == "ppl" and budget.get("ppl") is not None:
        return baseline["quality"]["ppl"] * (1 + budget["ppl"])
    by_key = {"cosine": "cosine", "top1_agreement": "top1"}
    return budget.get(by_key.get(key, ""))


def scatter_svg(
    records: Sequence[Mapping], front: Sequence[Mapping], best: Mapping, objective: str, budget: Mapping | None = None
) -> str:
    """Cost (x) against quality (y) of every measured trial: within budget filled, outside hollow,
    the front joined by a line, the baseline a black square, the recommendation ringed, the
    budget's limit a dashed red line."""
    key, label = quality_axis(records)
    pts = [r for r in records if r.get("status") == "ok" and (r.get("quality") or {}).get(key) is not None]
    if not pts:
        return "<p>No trial was measured.</p>"
    base = next((r for r in pts if r.get("trial") == "baseline"), None)
    limit = budget_limit(key, budget or {}, base) if base else None
    xs = [r["objective"] for r in pts]
    ys = [r["quality"][key] for r in pts] + ([limit] if limit is not None else [])
    fx, x0, x1 = _scale(xs, PAD, W - 16)
    fy, y0, y1 = _scale(ys, H - PAD, 16)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" aria-label="cost vs quality">']
    out.append(f'<rect x="{PAD}" y="16" width="{W - 16 - PAD}" height="{H - 16 - PAD}" fill="#fff" stroke="#d0d7de"/>')
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{fx(xv):.1f}" y="{H - PAD + 16}" font-size="11" text-anchor="middle">{xv:.3g}</text>')
        out.append(f'<text x="{PAD - 6}" y="{fy(yv) + 4:.1f}" font-size="11" text-anchor="end">{yv:.4g}</text>')
    out.append(
        f'<text x="{(W + PAD) / 2}" y="{H - 12}" font-size="12" text-anchor="middle">'
        f"{OBJECTIVE_UNITS[objective]}</text>"
    )
    out.append(
        f'<text x="14" y="{H / 2}" font-size="12" transform="rotate(-90 14 {H / 2})" text-anchor="middle">'
        f"{html.escape(label)}</text>"
    )
    if limit is not None:
        y = fy(limit)
        out.append(
            f'<line x1="{PAD}" x2="{W - 16}" y1="{y:.1f}" y2="{y:.1f}" stroke="#cf222e" stroke-dasharray="5,4"/>'
            f'<text x="{W - 20}" y="{y - 4:.1f}" font-size="11" text-anchor="end" fill="#cf222e">budget</text>'
        )
    line = [r for r in front if (r.get("quality") or {}).get(key) is not None]
    if len(line) > 1:
        path = " ".join(f"{fx(r['objective']):.1f},{fy(r['quality'][key]):.1f}" for r in line)
        out.append(f'<polyline points="{path}" fill="none" stroke="#0969da" stroke-width="1.5"/>')
    for r in pts:
        out.append(_point(r, fx(r["objective"]), fy(r["quality"][key]), best))
    out.append("</svg>")
    return "".join(out)


def _point(r: Mapping, x: float, y: float, best: Mapping) -> str:
    tip = html.escape(f"trial {r['trial']}: {r['pipeline']} ({r.get('mode')}) — {quality_text(r)}")
    if r.get("trial") == "baseline":
        shape = (
            f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="#1f2328"><title>{tip}</title></rect>'
        )
    else:
        fill = "#2da44e" if r.get("within_budget") else "#fff"
        stroke = "#2da44e" if r.get("within_budget") else "#8c959f"
        shape = (
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{fill}" stroke="{stroke}" stroke-width="1.5">'
            f"<title>{tip}</title></circle>"
        )
    if r.get("trial") == best.get("trial"):
        shape += f'<circle cx="{x:.1f}" cy="{y:.1f}" r="10" fill="none" stroke="#cf222e" stroke-width="2"/>'
    return shape


def render_tune_html(summary: Mapping, records: Sequence[Mapping]) -> str:
    """The self-contained report page of a tune run."""
    e = html.escape
    settings, best = summary["settings"], summary["best"]
    objective = settings["objective"]
    legend = (
        '<p class="legend"><span><i style="background:#1f2328;border-color:#1f2328"></i>baseline (no pass)</span>'
        '<span><i style="background:#2da44e;border-color:#2da44e;border-radius:50%"></i>within budget</span>'
        '<span><i style="background:#fff;border-color:#8c959f;border-radius:50%"></i>outside the budget</span>'
        '<span><i style="background:#fff;border-color:#cf222e;border-radius:50%"></i>recommended</span>'
        '<span><i style="background:#0969da;border-color:#0969da;height:3px"></i>Pareto front</span>'
        '<span><i style="background:#cf222e;border-color:#cf222e;height:2px"></i>budget</span></p>'
    )
    body = [
        "<h1>optpipe tune</h1>",
        f"<p><b>{e(summary['recommendation'])}</b></p>",
        f"<p>recommended pipeline: <code>{e(best['pipeline'])}</code> on {e(settings['target'])}"
        f" ({e(str(best.get('mode')))}); budget {e(_budget_text(settings['budget']))}; objective {e(objective)};"
        f" batch {settings['batch']}, seq-len {settings['seq_len']}.</p>",
        legend,
        scatter_svg(records, summary["front"], best, objective, settings["budget"]),
        "<h2>Trials</h2>",
        _trials_table(records, best),
    ]
    if summary.get("ruled_out"):
        body += ["<h2>Ruled out before measuring</h2><ul>"]
        body += [f"<li>{e(n['dimension'])}={e(str(n['value']))}: {e(n['reason'])}</li>" for n in summary["ruled_out"]]
        body.append("</ul>")
    return html_page("optpipe tune", "\n".join(body))


def _budget_text(budget: Mapping) -> str:
    """The budget of tune.json's settings (None for the keys not given) as `--budget` reads it."""
    return QualityBudget(**{k: v for k, v in budget.items() if v is not None}).text()


def _trials_table(records: Sequence[Mapping], best: Mapping) -> str:
    e = html.escape
    rows = [
        "<table><tr><th>trial</th><th>pipeline</th><th>mode</th><th>p50 ms</th><th>tok/s</th><th>MB</th>"
        "<th>quality</th><th>in budget</th><th>status</th></tr>"
    ]
    for r in records:
        c = r.get("cost") or {}
        mark = " ★" if r.get("trial") == best.get("trial") else ""
        cells = [
            f"{r['trial']}{mark}",
            f"<code>{e(r['pipeline'])}</code>",
            e(str(r.get("mode"))),
            f"{c['latency_ms_p50']:.2f}" if c else "",
            f"{c['tokens_per_s']:.0f}" if c else "",
            f"{c['size_mb']:.2f}" if c else "",
            e(quality_text(r)),
            ("yes" if r.get("within_budget") else "no") if r["status"] == "ok" else "",
            e(r["status"] + (f": {r['reason']}" if r.get("reason") else "")),
        ]
        rows.append("<tr>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    return "".join(rows) + "</table>"
