"""OUT/report.html: one self-contained page (inline CSS and SVG, no scripts, no external assets) for
an `optimize` run: the model's before → after numbers, a table of passes with their verification,
and every pass's graph diff with drawings of the changed region.

>>> html = render_report_html(result.report, result.diffs)   # doctest: +SKIP
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from .analysis import format_count, format_percent
from .graph_diff import GraphDiff, html_page


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(x: Any, fmt: str = "{:.4g}") -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, (int, float)):
        if isinstance(x, float) and math.isinf(x):
            return "∞" if x > 0 else "−∞"
        if isinstance(x, float) and math.isnan(x):
            return "nan"
        return fmt.format(x)
    return _e(x)


def _ok(x: Any) -> str:
    if x is None:
        return '<span class="muted">—</span>'
    return '<span class="ok">✓ ok</span>' if x else '<span class="bad">✗ failed</span>'


def _inline(d: Any) -> str:
    """A config or stats dict as `k=v, k=v` (escaped); other values as text."""
    if not d:
        return '<span class="muted">—</span>'
    if isinstance(d, dict):
        return ", ".join(f"{_e(k)}={_e(_scalar(v))}" for k, v in d.items())
    return _e(d)


def _scalar(v: Any) -> str:
    return json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)


def _before_after(before: Any, after: Any, unit: str = "") -> str:
    if before is None and after is None:
        return "—"
    text = f"{format_count(before, unit)} → {format_count(after, unit)}"
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        text += f' <span class="muted">({_e(format_percent(before, after))})</span>'
    return text


def _header(report: dict) -> str:
    model = report.get("model") or {}
    name = model.get("class") or model.get("source") or "model"
    rows = [
        ("model", _e(name)),
        ("source", _e(model["source"])) if model.get("source") else None,
        ("output", _e(model["output"])) if model.get("output") else None,
        ("pipeline", f"<code>{_e(report.get('pipeline') or '')}</code>"),
        ("target", _e(report.get("target") or "—")),
        ("parameters", _before_after(model.get("params_before"), model.get("params_after"))),
        ("FLOPs", _before_after(model.get("flops_before"), model.get("flops_after"))),
    ]
    check = report.get("target_check")
    if isinstance(check, dict):
        extra = ", ".join(f"{_e(k)}={_num(v)}" for k, v in check.items() if k != "ok")
        rows.append(("target check", f'{_ok(check.get("ok"))} <span class="muted">{extra}</span>'))
    version = report.get("optpipe_version")
    table = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in (r for r in rows if r))
    return (
        f"<h1>optpipe report: {_e(name.rsplit('.', 1)[-1])}</h1>"
        + (f'<p class="muted">optpipe {_e(version)}</p>' if version else "")
        + f'<table class="kv">{table}</table>'
    )


def _passes_table(passes: list[dict]) -> str:
    if not passes:
        return '<p class="muted">No passes ran.</p>'
    head = (
        "<tr><th>#</th><th>pass</th><th>config</th><th>kind</th><th>modified</th><th>stats</th>"
        "<th>seconds</th><th>max abs</th><th>SQNR dB</th><th>cosine</th><th>top-1</th><th>verify</th></tr>"
    )
    rows = []
    for i, p in enumerate(passes, 1):
        v = p.get("verify") or {}
        exact = p.get("exact")
        kind = "—" if exact is None else ("exact" if exact else "lossy")
        top1 = v.get("top1_agreement")
        rows.append(
            f'<tr><td class="num">{i}</td><td class="mono"><a href="#pass-{i}">{_e(p.get("name", "?"))}</a></td>'
            f'<td class="mono">{_inline(p.get("config"))}</td><td>{kind}</td>'
            f'<td>{_num(p.get("modified"))}</td><td class="mono">{_inline(p.get("stats"))}</td>'
            f'<td class="num">{_num(p.get("seconds"), "{:.3f}")}</td>'
            f'<td class="num">{_num(v.get("max_abs"), "{:.3g}")}</td>'
            f'<td class="num">{_num(v.get("sqnr_db"), "{:.1f}")}</td>'
            f'<td class="num">{_num(v.get("cosine"), "{:.6f}")}</td>'
            f'<td class="num">{_num(top1, "{:.1%}") if isinstance(top1, float) and 0 <= top1 <= 1 else _num(top1)}</td>'
            f"<td>{_ok(v.get('ok')) if v else _ok(None)}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _pass_section(i: int, p: dict, diff: GraphDiff | None) -> str:
    title = p.get("pipeline") or p.get("name", "?")
    out = [f'<h3 id="pass-{i}">{i}. <code>{_e(title)}</code></h3>']
    for note in (p.get("details") or {}).get("notes") or []:  # e.g. "slower than dense below N tokens"
        out.append(f'<p class="note">note: {_e(note)}</p>')
    if diff is not None:
        out.append(f'<pre class="mono">{_e(diff.to_text())}</pre>')
        out.append(diff.html_section(id_prefix=f"p{i}-"))
    elif p.get("modified") is False:
        out.append('<p class="muted">The pass left the graph unchanged.</p>')
    else:
        out.append('<p class="muted">No diff recorded for this pass.</p>')
    return "\n".join(out)


def render_report_html(report: dict, pass_diffs: list[GraphDiff | None]) -> str:
    """The self-contained report page of an `optimize` run. `pass_diffs[i]` is the GraphDiff of
    `report["passes"][i]` (None when the pass did not modify the graph or diffs were off)."""
    passes = list(report.get("passes") or [])
    diffs = list(pass_diffs or [])
    sections = [_pass_section(i, p, diffs[i - 1] if i - 1 < len(diffs) else None) for i, p in enumerate(passes, 1)]
    body = "\n".join(
        [_header(report), "<h2>Passes</h2>", _passes_table(passes), "<h2>Graph diffs</h2>" if passes else "", *sections]
    )
    model = (report.get("model") or {}).get("class") or "model"
    return html_page(f"optpipe report: {model.rsplit('.', 1)[-1]}", body)
