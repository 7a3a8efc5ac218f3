"""optpipe's HTML pages: self-contained (inline CSS and SVG, no scripts, no external assets).

- `html_page`: the page around a body, with optpipe's stylesheet (`PAGE_CSS`).
- `diff_html_section` / `diff_html_page`: a graph diff as tables (totals, changed modules) and
  drawings of each changed region before and after (`optpipe.graph_svg`); `GraphDiff.html_section`
  / `.to_html` (`optpipe diff --html`) come here.
- `render_report_html`: OUT/report.html of an `optimize` run: the model's before → after numbers, a
  table of passes with their verification, and every pass's graph diff.

How a diff names things is shared with its terminal text (`GraphDiff.to_text`) and lives here too:
`display_path` (the root module shows as "(root)") and `op_count_text` ("matmul×2").

>>> html = render_report_html(result.report, result.diffs)   # doctest: +SKIP
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from .analysis import ROOT, format_count, format_percent, short_op_name
from .graph_svg import ROLE_COLORS, render_svg

PAGE_CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;
 max-width:1200px;padding:0 16px;color:#1f2328;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #d8dee4;
 padding-bottom:.2em} h3{font-size:1.05em;margin:1.2em 0 .4em} h4{font-size:.95em;margin:1em 0 .3em}
code,.mono,td.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.88em}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.9em}
th,td{border:1px solid #d8dee4;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600} td.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#656d76} .ok{color:#1a7f37;font-weight:600} .bad{color:#cf222e;font-weight:600}
.rm{color:#c62828} .add{color:#2e7d32} .status{font-size:.8em;padding:1px 6px;border-radius:8px;
 background:#eef1f4;white-space:nowrap}
.pair{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}
.pane{border:1px solid #d8dee4;border-radius:6px;padding:6px 8px;overflow:auto;max-width:100%;background:#fff}
.pane .cap{font-size:.8em;color:#656d76;text-transform:uppercase;letter-spacing:.05em;margin-bottom:4px}
.legend span{display:inline-block;margin-right:14px;font-size:.85em}
.legend i{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:5px;vertical-align:-1px;
 border:1.4px solid}
.kv td:first-child{color:#656d76}
pre{background:#f6f8fa;border-radius:6px;padding:8px 10px;overflow:auto;font-size:.85em}
a{color:#0969da;text-decoration:none}
"""

_LEGEND = (
    '<p class="legend">'
    + "".join(
        f'<span><i style="background:{f};border-color:{s}"></i>{name}</span>'
        for name, (f, s) in (
            ("removed", ROLE_COLORS["removed"]),
            ("added", ROLE_COLORS["added"]),
            ("unchanged neighbour", ROLE_COLORS["context"]),
            ("input / weight", ROLE_COLORS["input"]),
        )
    )
    + "</p>"
)
_SAME_REWRITE_NAMED = 6
"""Modules named in "the same rewrite in ..." before "and N more"."""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def html_page(title: str, body: str) -> str:
    """A complete self-contained page around `body` with optpipe's stylesheet."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{PAGE_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def diff_html_page(diff, title: str = "optpipe graph diff") -> str:
    """A self-contained page of `diff` alone (`optpipe diff --html`)."""
    return html_page(title, f"<h1>{_e(title)}</h1>\n{diff_html_section(diff)}")


# -- how a diff names things ------------------------------------------------------------------------
def display_path(path: str) -> str:
    """A module path as shown to a person: the root module as "(root)"."""
    return path if path != ROOT else "(root)"


def op_count_text(op: str, n: int) -> str:
    """An op and how many of it, as shown in a diff: "matmul×2", or "softmax" for one."""
    name = short_op_name(op)
    return f"{name}×{n}" if n > 1 else name


# -- a graph diff -----------------------------------------------------------------------------------
def diff_html_section(diff, id_prefix: str = "d") -> str:
    """`diff` (an `optpipe.graph_diff.GraphDiff`) as an HTML fragment: its summary, the totals and
    changed modules tables, and before/after drawings of its changed regions. `id_prefix` keeps
    the drawings' ids unique on a page that holds several diffs."""
    if diff.empty:
        return '<p class="muted">No changes to the graph.</p>'
    out = [f"<p><b>{_e(diff.summary_line())}</b></p>", _totals_table(diff.totals), _modules_table(diff.modules)]
    if diff.regions:
        out.append(_LEGEND)
    for i, region in enumerate(diff.regions):
        out.append(_region_html(region, f"{id_prefix}{i}"))
    if diff.undrawn_regions:
        out.append(f'<p class="muted">{diff.undrawn_regions} more changed region(s) not drawn.</p>')
    return "\n".join(out)


def _totals_table(totals: dict[str, tuple[int, int]]) -> str:
    rows = []
    for key, label, unit in (
        ("nodes", "compute nodes", ""),
        ("params", "parameters", ""),
        ("flops", "FLOPs", ""),
        ("activation_bytes", "activation memory", "B"),
    ):
        before, after = totals[key]
        rows.append(
            f'<tr><td>{label}</td><td class="num">{format_count(before, unit)}</td>'
            f'<td class="num">{format_count(after, unit)}</td>'
            f'<td class="num">{_e(format_percent(before, after))}</td></tr>'
        )
    return "<table><tr><th></th><th>before</th><th>after</th><th>change</th></tr>" + "".join(rows) + "</table>"


def _ops_html(ops: dict[str, int], cls: str, sign: str) -> str:
    return " ".join(f'<span class="{cls}">{sign}{_e(op_count_text(op, n))}</span>' for op, n in ops.items())


def _change_html(pair: tuple[int, int], unit: str = "") -> str:
    """A (before, after) number as "before → after (change)", or a dash when it did not move."""
    if pair[0] == pair[1]:
        return '<span class="muted">—</span>'
    return f"{format_count(pair[0], unit)} → {format_count(pair[1], unit)} ({_e(format_percent(*pair))})"


def _modules_table(modules: list) -> str:
    """One row per `ModuleDiff`: its status, the ops it lost and gained, and its numbers."""
    rows = [
        f'<tr><td class="mono">{_e(display_path(m.path))}</td>'
        f'<td><span class="status">{_e(m.status)}</span></td>'
        f'<td class="mono">{_ops_html(m.removed, "rm", "−")}</td>'
        f'<td class="mono">{_ops_html(m.added, "add", "+")}</td>'
        f'<td class="num">{_change_html(m.params)}</td><td class="num">{_change_html(m.flops)}</td>'
        f'<td class="num">{_change_html(m.activation_bytes, "B")}</td></tr>'
        for m in modules
    ]
    return (
        "<table><tr><th>module</th><th>status</th><th>removed</th><th>added</th><th>params</th>"
        "<th>FLOPs</th><th>activations</th></tr>" + "".join(rows) + "</table>"
    )


def _region_html(region, id_prefix: str) -> str:
    """A `ChangedRegion`: its module, the modules with the same rewrite, and before | after drawings."""
    note = ""
    if region.same_rewrite_in:
        shown = ", ".join(display_path(p) for p in region.same_rewrite_in[:_SAME_REWRITE_NAMED])
        hidden = len(region.same_rewrite_in) - _SAME_REWRITE_NAMED
        more = f" and {hidden} more" if hidden > 0 else ""
        note = f'<p class="muted">The same rewrite in {_e(shown)}{more}.</p>'
    if region.truncated:
        note += f'<p class="muted">Only the first {region.drawn_limit} changed nodes are drawn.</p>'
    return (
        f'<h4 class="mono">{_e(display_path(region.module))}</h4>{note}<div class="pair">'
        f'<div class="pane"><div class="cap">before</div>{render_svg(region.before, id_prefix + "b")}</div>'
        f'<div class="pane"><div class="cap">after</div>{render_svg(region.after, id_prefix + "a")}</div>'
        "</div>"
    )


# -- what each pass left alone, and why --------------------------------------------------------------
SITES_NAMED = 3
"""Sites named in a line that collapses many skipped sites with one reason, before "…"."""


def skipped_by_reason(details: dict | None) -> list[tuple[str, list[str]]]:
    """A pass's `details["skipped"]` (`[{"site", "reason"}, ...]`) as (reason, [sites]) in the order
    each reason first appears: many sites skipped for one reason are one entry."""
    groups: dict[str, list[str]] = {}
    for entry in (details or {}).get("skipped") or []:
        if isinstance(entry, dict):
            site, reason = entry.get("site"), entry.get("reason")
        else:
            site, reason = entry, None
        groups.setdefault(str(reason or "no reason given"), []).append("(root)" if site in (None, "") else str(site))
    return list(groups.items())


def sites_text(sites: list[str], named: int = SITES_NAMED) -> str:
    """One site as itself; many as "N sites (a, b, c, …)"."""
    if len(sites) == 1:
        return sites[0]
    shown = ", ".join(sites[:named]) + (", …" if len(sites) > named else "")
    return f"{len(sites)} sites ({shown})"


def pass_remarks(passes: list[dict]) -> list[str]:
    """The lines `optimize` prints on stderr about each pass of a report: that it changed nothing
    (and why), its notes, and the sites it skipped (one line per reason, with a count):

        note: quantize{skip=[lm_head]} changed nothing: all 3 sites were skipped
        skipped: quantize{skip=[lm_head]}: 2 sites (h.0.mlp, h.1.mlp): excluded by skip=
    """
    lines = []
    for p in passes:
        element = p.get("pipeline") or p.get("name", "?")
        details = p.get("details") or {}
        notes = [str(n) for n in details.get("notes") or []]
        groups = skipped_by_reason(details)
        if p.get("modified") is False:
            why = notes[0] if notes else "; ".join(reason for reason, _ in groups)
            lines.append(f"note: {element} changed nothing" + (f": {why}" if why else ""))
            notes = notes[1:]
        lines += [f"note: {element}: {note}" for note in notes]
        lines += [f"skipped: {element}: {sites_text(sites)}: {reason}" for reason, sites in groups]
    return lines


# -- the report of an optimize run ------------------------------------------------------------------
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
        extra = ", ".join(f"{_e(k)}={_num(v)}" for k, v in check.items() if k not in ("ok", "companions"))
        rows.append(("target check", f'{_ok(check.get("ok"))} <span class="muted">{extra}</span>'))
        for companion, c in (check.get("companions") or {}).items():  # e.g. an encoder-decoder's encoder
            extra = ", ".join(f"{_e(k)}={_num(v)}" for k, v in c.items() if k != "ok")
            rows.append((f"target check ({_e(companion)})", f'{_ok(c.get("ok"))} <span class="muted">{extra}</span>'))
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


def _pass_section(i: int, p: dict, diff) -> str:
    title = p.get("pipeline") or p.get("name", "?")
    out = [f'<h3 id="pass-{i}">{i}. <code>{_e(title)}</code></h3>']
    for note in (p.get("details") or {}).get("notes") or []:  # e.g. "slower than dense below N tokens"
        out.append(f'<p class="note">note: {_e(note)}</p>')
    out.append(_skipped_table(p.get("details")))
    if diff is not None:
        out.append(f'<pre class="mono">{_e(diff.to_text())}</pre>')
        out.append(diff_html_section(diff, id_prefix=f"p{i}-"))
    elif p.get("modified") is False:
        out.append('<p><span class="status">unchanged</span> The pass left the graph unchanged.</p>')
    else:
        out.append('<p class="muted">No diff recorded for this pass.</p>')
    return "\n".join(x for x in out if x)


def _skipped_table(details: dict | None) -> str:
    """The sites a pass left alone: one row per reason, with every site it covers."""
    groups = skipped_by_reason(details)
    if not groups:
        return ""
    rows = "".join(
        f'<tr><td>{_e(reason)}</td><td class="num">{len(sites)}</td>'
        f'<td class="mono">{", ".join(_e(site) for site in sites)}</td></tr>'
        for reason, sites in groups
    )
    total = sum(len(sites) for _, sites in groups)
    return (
        f'<h4>Skipped sites ({total})</h4><table class="skipped"><tr><th>reason</th><th>sites</th>'
        f"<th>where</th></tr>{rows}</table>"
    )


def render_report_html(report: dict, pass_diffs: list) -> str:
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
