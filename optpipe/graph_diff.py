"""Semantic diff of two Programs, keyed by module path.

For each module path (the innermost module of a node's `nn_module_stack`) the diff gives the ops
added and removed (multiset difference of op names), and the parameter, FLOP and activation-memory
deltas from `optpipe.analysis`. A module is "rewritten" when it both gained and lost ops, "added" /
"removed" when it only gained / lost, "rewired" when its ops are the same but connected differently,
and "changed" when only its numbers moved (a pruned or re-typed weight).

To draw what changed, nodes of the two graphs are matched structurally: forward from the inputs (a
node matches when its op, module and constants match and all its inputs are matched pairs), then
backward from the output (an input of a matched pair matches the input at the same position when
their op agrees). What stays unmatched is the changed region; the HTML shows it before and after
with its immediate neighbours, drawn by graphviz `dot` when installed, else by a small layered
layout of our own.

>>> d = diff_programs(before, after)         # doctest: +SKIP
>>> print(d.to_text())                       # doctest: +SKIP
graph diff: 2 modules changed (2 rewritten)
  nodes 68 → 52 (-23.5%)   params 30.6K → 30.6K (±0%)   flops 442K → 442K (±0%)   activations ...

  h.0.attn  rewritten   -masked_fill -matmul×2 -mul -softmax ... +scaled_dot_product_attention   act -67.3%
  h.1.attn  rewritten   -masked_fill -matmul×2 -mul -softmax ... +scaled_dot_product_attention   act -67.3%
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx

from .analysis import (
    ROOT,
    ProgramCosts,
    analyze,
    counted_op_name,
    format_count,
    format_percent,
    get_attribute,
    is_bookkeeping,
    module_sort_key,
    node_module,
    short_op_name,
)
from .program import Program
import itertools

MAX_DRAWINGS = 4
"""Regions drawn per diff; regions repeating an already drawn rewrite (same ops, another layer) are
listed under it instead of drawn again."""
MAX_DRAWN_CHANGES = 40
"""Changed nodes drawn per region (a whole-graph rewrite would not be readable anyway)."""


# -- result -----------------------------------------------------------------------------------------
@dataclass
class ModuleDiff:
    path: str
    type: str
    status: str
    """"rewritten" | "added" | "removed" | "rewired" | "changed"."""
    added: dict[str, int]
    removed: dict[str, int]
    params: tuple[int, int]
    flops: tuple[int, int]
    activation_bytes: tuple[int, int]
    """(before, after), counting this module's own nodes and parameters (not its sub-modules')."""
    changed_nodes: dict[str, list[str]] = field(default_factory=dict)
    """{"removed": node names in A, "added": node names in B} that have no structural match."""

    def to_dict(self) -> dict:
        return {
            "module": self.path,
            "type": self.type,
            "status": self.status,
            "removed": dict(self.removed),
            "added": dict(self.added),
            "params": _delta(self.params),
            "flops": _delta(self.flops),
            "activation_bytes": _delta(self.activation_bytes),
            "changed_nodes": {k: list(v) for k, v in self.changed_nodes.items()},
        }

    def op_changes_text(self) -> str:
        parts = [f"-{_times(short_op_name(op), n)}" for op, n in self.removed.items()]
        parts += [f"+{_times(short_op_name(op), n)}" for op, n in self.added.items()]
        if not parts and self.status == "rewired":
            parts = ["(same ops, rewired)"]
        return " ".join(parts)

    def deltas_text(self) -> str:
        parts = []
        for name, (before, after) in (("params", self.params), ("flops", self.flops), ("act", self.activation_bytes)):
            if before != after:
                parts.append(f"{name} {format_percent(before, after)}")
        return "  ".join(parts)


def _times(name: str, n: int) -> str:
    return f"{name}×{n}" if n > 1 else name


def _delta(pair: tuple[int, int]) -> dict:
    return {"before": pair[0], "after": pair[1], "delta": pair[1] - pair[0]}


@dataclass
class GraphPicture:
    """A small graph to draw: nodes (id, label, sublabel, role) and edges (src id, dst id).
    Roles: "removed", "added", "context" (an unchanged neighbour), "input" (placeholder/weight)."""

    nodes: list[tuple[str, str, str, str]] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ChangedRegion:
    module: str
    before: GraphPicture
    after: GraphPicture
    same_rewrite_in: list[str] = field(default_factory=list)
    """Other modules whose rewrite has the same shape (not drawn again)."""
    truncated: bool = False


@dataclass
class GraphDiff:
    modules: list[ModuleDiff]
    totals: dict[str, tuple[int, int]]
    """"nodes", "params", "flops", "activation_bytes" -> (before, after) for the whole program."""
    regions: list[ChangedRegion] = field(default_factory=list)
    undrawn_regions: int = 0

    @property
    def empty(self) -> bool:
        return not self.modules and all(a == b for a, b in self.totals.values())

    def to_dict(self) -> dict:
        return {
            "empty": self.empty,
            "totals": {k: _delta(v) for k, v in self.totals.items()},
            "modules": [m.to_dict() for m in self.modules],
        }

    def summary_line(self) -> str:
        if self.empty:
            return "no changes"
        statuses = Counter(m.status for m in self.modules)
        detail = ", ".join(f"{n} {s}" for s, n in statuses.most_common())
        s = "s" if len(self.modules) != 1 else ""
        return f"{len(self.modules)} module{s} changed ({detail})" if self.modules else "totals changed"

    def totals_text(self) -> str:
        parts = []
        for key, label, unit in (
            ("nodes", "nodes", ""),
            ("params", "params", ""),
            ("flops", "flops", ""),
            ("activation_bytes", "activations", "B"),
        ):
            before, after = self.totals[key]
            parts.append(
                f"{label} {format_count(before, unit)} → {format_count(after, unit)} ({format_percent(before, after)})"
            )
        return "   ".join(parts)

    def to_text(self) -> str:
        """Terminal summary: one line per changed module."""
        if self.empty:
            return "graph diff: no changes"
        lines = [f"graph diff: {self.summary_line()}", f"  {self.totals_text()}", ""]
        width = max((len(_display_path(m.path)) for m in self.modules), default=0)
        status_width = max((len(m.status) for m in self.modules), default=0)
        for m in self.modules:
            parts = [
                f"  {_display_path(m.path):<{width}}  {m.status:<{status_width}}",
                m.op_changes_text(),
                m.deltas_text(),
            ]
            lines.append("   ".join(p for p in parts if p).rstrip())
        return "\n".join(lines)

    def html_section(self, id_prefix: str = "d") -> str:
        """The diff as an HTML fragment (tables and drawings), for embedding in a page."""
        if self.empty:
            return '<p class="muted">No changes to the graph.</p>'
        out = [f"<p><b>{_e(self.summary_line())}</b></p>", _totals_table(self.totals), _modules_table(self.modules)]
        if self.regions:
            out.append(_LEGEND)
        for i, region in enumerate(self.regions):
            out.append(_region_html(region, f"{id_prefix}{i}"))
        if self.undrawn_regions:
            out.append(f'<p class="muted">{self.undrawn_regions} more changed region(s) not drawn.</p>')
        return "\n".join(out)

    def to_html(self, title: str = "optpipe graph diff") -> str:
        """A self-contained HTML page (inline CSS and SVG, no external assets)."""
        return html_page(title, f"<h1>{_e(title)}</h1>\n{self.html_section()}")


# -- diffing ----------------------------------------------------------------------------------------
def diff_programs(
    a: Program, b: Program, *, costs_a: ProgramCosts | None = None, costs_b: ProgramCosts | None = None
) -> GraphDiff:
    """Semantic diff of `a` (before) and `b` (after), keyed by module path.

    Programs may have different parameter sets (a dropped buffer, a quantized weight); modules
    present in only one of them count as zero in the other. Precomputed costs may be passed in.
    """
    costs_a = costs_a or analyze(a)
    costs_b = costs_b or analyze(b)
    removed_nodes, added_nodes = changed_nodes(a.gm, b.gm)
    changed_by_module: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"removed": [], "added": []})
    for n in removed_nodes:
        changed_by_module[node_module(n)[0]]["removed"].append(n.name)
    for n in added_nodes:
        changed_by_module[node_module(n)[0]]["added"].append(n.name)

    rows = []
    for path in sorted(set(costs_a.modules) | set(costs_b.modules), key=module_sort_key):
        ma, mb = costs_a.modules.get(path), costs_b.modules.get(path)
        ops_a = ma.ops if ma else Counter()
        ops_b = mb.ops if mb else Counter()
        added, removed = ops_b - ops_a, ops_a - ops_b
        numbers = {
            k: (getattr(ma, k, 0) if ma else 0, getattr(mb, k, 0) if mb else 0)
            for k in ("params", "flops", "activation_bytes")
        }
        structural = path in changed_by_module
        if added and removed:
            status = "rewritten"
        elif added:
            status = "added"
        elif removed:
            status = "removed"
        elif structural:
            status = "rewired"
        elif any(x != y for x, y in numbers.values()):
            status = "changed"
        else:
            continue
        rows.append(
            ModuleDiff(
                path,
                (mb.type if mb else "") or (ma.type if ma else ""),
                status,
                dict(sorted(added.items())),
                dict(sorted(removed.items())),
                numbers["params"],
                numbers["flops"],
                numbers["activation_bytes"],
                changed_by_module.get(path, {"removed": [], "added": []}),
            )
        )

    totals = {
        "nodes": (sum(costs_a.ops.values()), sum(costs_b.ops.values())),
        "params": (costs_a.params, costs_b.params),
        "flops": (costs_a.flops, costs_b.flops),
        "activation_bytes": (costs_a.activation_bytes, costs_b.activation_bytes),
    }
    regions, undrawn = _changed_regions(removed_nodes, added_nodes)
    return GraphDiff(rows, totals, regions, undrawn)


def _node_signature(node: torch.fx.Node) -> tuple:
    """What must agree for two nodes to be "the same": op, module path and constant arguments."""
    if node.op in ("placeholder", "get_attr"):
        return (node.op, node.target)
    if node.op == "output":
        return ("output",)
    target = str(node.target) if isinstance(node.target, torch._ops.OpOverload) else counted_op_name(node)
    consts = torch.fx.node.map_arg((node.args, node.kwargs), lambda _: "%")
    return (node.op, target, node_module(node)[0], repr(consts))


def changed_nodes(
    gm_a: torch.fx.GraphModule, gm_b: torch.fx.GraphModule
) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """(compute nodes of A with no match in B, compute nodes of B with no match in A)."""
    nodes_a, nodes_b = list(gm_a.graph.nodes), list(gm_b.graph.nodes)
    sig = {n: _node_signature(n) for n in nodes_a + nodes_b}
    b_to_a: dict[torch.fx.Node, torch.fx.Node] = {}
    a_matched: set[torch.fx.Node] = set()

    def pair(nb, na):
        b_to_a[nb] = na
        a_matched.add(na)

    # forward: same signature over inputs that are already matched pairs (value numbering)
    def forward():
        index = defaultdict(list)
        for na in nodes_a:
            if na not in a_matched:
                index[(sig[na], tuple(na.all_input_nodes))].append(na)
        grew = False
        for nb in nodes_b:
            if nb in b_to_a or not all(i in b_to_a for i in nb.all_input_nodes):
                continue
            candidates = index.get((sig[nb], tuple(b_to_a[i] for i in nb.all_input_nodes)))
            while candidates:
                na = candidates.pop(0)
                if na not in a_matched:
                    pair(nb, na)
                    grew = True
                    break
        return grew

    # backward: inputs at the same position of a matched pair match when their signatures agree
    def backward():
        grew = False
        for nb in reversed(nodes_b):
            na = b_to_a.get(nb)
            if na is None:
                continue
            ins_b, ins_a = nb.all_input_nodes, na.all_input_nodes
            if len(ins_b) != len(ins_a):
                continue
            for ib, ia in zip(ins_b, ins_a):
                if ib not in b_to_a and ia not in a_matched and sig[ib] == sig[ia]:
                    pair(ib, ia)
                    grew = True
        return grew

    outputs_a = [n for n in nodes_a if n.op == "output"]
    outputs_b = [n for n in nodes_b if n.op == "output"]
    if outputs_a and outputs_b:
        pair(outputs_b[0], outputs_a[0])
    for _ in range(8):  # each sweep can unlock the other; real diffs settle in two or three
        if not (forward() | backward()):
            break

    def compute(n):
        return n.op in ("call_function", "call_module") and not is_bookkeeping(n)

    removed = [n for n in nodes_a if compute(n) and n not in a_matched]
    added = [n for n in nodes_b if compute(n) and n not in b_to_a]
    return removed, added


# -- regions to draw --------------------------------------------------------------------------------
def _changed_regions(removed: list[torch.fx.Node], added: list[torch.fx.Node]) -> tuple[list[ChangedRegion], int]:
    by_module: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for n in removed:
        by_module[node_module(n)[0]][0].append(n)
    for n in added:
        by_module[node_module(n)[0]][1].append(n)
    regions: list[ChangedRegion] = []
    seen_shapes: dict[tuple, ChangedRegion] = {}
    undrawn = 0
    for path in sorted(by_module, key=module_sort_key):
        rem, add = by_module[path]
        # the same rewrite in another layer: same ops removed/added, path equal up to indices
        shape = (
            re.sub(r"(?<=\.)\d+(?=\.|$)", "#", path),
            tuple(sorted(counted_op_name(n) for n in rem)),
            tuple(sorted(counted_op_name(n) for n in add)),
        )
        if shape in seen_shapes:
            seen_shapes[shape].same_rewrite_in.append(path)
            continue
        if len(regions) >= MAX_DRAWINGS:
            undrawn += 1
            continue
        truncated = len(rem) > MAX_DRAWN_CHANGES or len(add) > MAX_DRAWN_CHANGES
        region = ChangedRegion(
            path,
            _picture(rem[:MAX_DRAWN_CHANGES], "removed"),
            _picture(add[:MAX_DRAWN_CHANGES], "added"),
            truncated=truncated,
        )
        seen_shapes[shape] = region
        regions.append(region)
    return regions, undrawn


def _picture(changed: list[torch.fx.Node], role: str) -> GraphPicture:
    """The changed nodes plus their immediate (non-bookkeeping) inputs and users."""
    if not changed:
        return GraphPicture()
    members = set(changed)
    for n in changed:
        members.update(i for i in n.all_input_nodes if not is_bookkeeping(i) or i.op in ("placeholder", "get_attr"))
        members.update(u for u in n.users if not is_bookkeeping(u) or u.op == "output")
    graph_order = list(changed[0].graph.nodes)
    ordered = [n for n in graph_order if n in members]
    pic = GraphPicture()
    for n in ordered:
        node_role = role if n in changed else ("input" if n.op in ("placeholder", "get_attr") else "context")
        pic.nodes.append((n.name, *_node_labels(n), node_role))
    for n in ordered:
        for i in n.all_input_nodes:
            if i in members:
                pic.edges.append((i.name, n.name))
    return pic


def _node_labels(n: torch.fx.Node) -> tuple[str, str]:
    """(label, sublabel): the op and the node's name (when it says more than the op)."""
    if n.op == "placeholder":
        return str(n.target), "input"
    if n.op == "get_attr":
        target = str(n.target)
        owner = n.graph.owning_module
        kind = (
            "parameter"
            if owner is not None and isinstance(get_attribute(owner, target), torch.nn.Parameter)
            else "buffer"
        )
        return (target if len(target) <= 30 else "…" + target[-29:]), kind
    if n.op == "output":
        return "output", ""
    label = short_op_name(counted_op_name(n))
    return label, ("" if n.name == label else n.name)


# -- drawing ----------------------------------------------------------------------------------------
_ROLE_COLORS = {  # role -> (fill, stroke)
    "removed": ("#fdecea", "#c62828"),
    "added": ("#e8f5e9", "#2e7d32"),
    "context": ("#f7f7f7", "#9e9e9e"),
    "input": ("#e8f0fe", "#3b6bc4"),
}


def render_svg(pic: GraphPicture, id_prefix: str = "g") -> str:
    """Inline SVG of `pic`: graphviz when `dot` is installed, else our own layered layout."""
    if not pic.nodes:
        return '<p class="muted">(nothing)</p>'
    if shutil.which("dot"):
        svg = _graphviz_svg(pic)
        if svg:
            return svg
    return _layered_svg(pic, id_prefix)


def _graphviz_svg(pic: GraphPicture) -> str | None:
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace('"', '\\"')

    lines = [
        "digraph G {",
        "rankdir=TB; bgcolor=transparent; nodesep=0.25; ranksep=0.35;",
        'node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11, penwidth=1.4];',
        'edge [color="#777777", arrowsize=0.7];',
    ]
    for node_id, label, sub, role in pic.nodes:
        fill, stroke = _ROLE_COLORS[role]
        text = esc(label) + (f"\\n{esc(sub)}" if sub else "")
        lines.append(f'"{esc(node_id)}" [label="{text}", fillcolor="{fill}", color="{stroke}"];')
    lines += [f'"{esc(a)}" -> "{esc(b)}";' for a, b in pic.edges]
    lines.append("}")
    try:
        res = subprocess.run(["dot", "-Tsvg"], input="\n".join(lines), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    start = res.stdout.find("<svg")
    if res.returncode != 0 or start < 0:
        return None
    svg = res.stdout[start:]
    # inline SVG in HTML needs no namespaces, and the page must not mention external URLs
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    return re.sub(r"<!--.*?-->", "", svg, flags=re.S)


_CHAR_W, _BOX_H, _GAP_X, _GAP_Y, _MARGIN = 7.0, 36, 22, 44, 12


def _layered_svg(pic: GraphPicture, id_prefix: str) -> str:
    """Layered (Sugiyama-style) layout: topological generations as rows, long edges routed through
    placeholder points on the rows they cross (so they take a lane instead of crossing boxes),
    barycentric ordering against crossings, each node placed under the mean of its parents."""
    import networkx as nx

    g = nx.DiGraph()
    index = {node_id: i for i, (node_id, *_rest) in enumerate(pic.nodes)}
    g.add_nodes_from(index)
    g.add_edges_from(pic.edges)
    layer = {n: i for i, gen in enumerate(nx.topological_generations(g)) for n in gen}
    # weights and inputs sit right above their first consumer, not all in the top row
    for n in g.nodes:
        if g.in_degree(n) == 0 and g.out_degree(n) > 0:
            layer[n] = max(0, min(layer[s] for s in g.successors(n)) - 1)

    # the layout graph: every edge spanning k rows becomes a chain through k-1 route points
    lay = nx.DiGraph()
    lay.add_nodes_from(g.nodes)
    routes: dict[tuple[str, str], list[str]] = {}
    for s, d in pic.edges:
        chain = [("route", s, d, r) for r in range(layer[s] + 1, layer[d])]
        for r, point in zip(range(layer[s] + 1, layer[d]), chain):
            layer[point] = r
        nx.add_path(lay, [s, *chain, d])
        routes[(s, d)] = chain
    rows: list[list] = [[] for _ in range(max(layer.values()) + 1)]
    order = {n: i for i, n in enumerate(sorted(g.nodes, key=index.get))}
    for n in sorted(lay.nodes, key=lambda n: order.get(n, order.get(n[1], 0) if isinstance(n, tuple) else 0)):
        rows[layer[n]].append(n)

    # barycentric ordering sweeps (down, then up) to reduce crossings
    for sweep in range(6):
        down = sweep % 2 == 0
        for r in range(1, len(rows)) if down else range(len(rows) - 2, -1, -1):
            ref = {n: i for i, n in enumerate(rows[r - 1 if down else r + 1])}
            here = {n: i for i, n in enumerate(rows[r])}

            def bary(n, ref=ref, here=here, down=down):
                near = [ref[m] for m in (lay.predecessors(n) if down else lay.successors(n)) if m in ref]
                return sum(near) / len(near) if near else here[n]

            rows[r].sort(key=bary)

    info = {node_id: (label, sub, role) for node_id, label, sub, role in pic.nodes}
    width = {
        n: (max(64.0, min(300.0, _CHAR_W * max(len(info[n][0]), len(info[n][1])) + 20)) if n in info else 6.0)
        for n in lay.nodes
    }
    x: dict = {}
    # place each row under the mean of its parents, then push apart to remove overlaps
    for row in rows:
        cursor = 0.0
        for n in row:
            parents = [p for p in lay.predecessors(n) if p in x]
            want = (sum(x[p] for p in parents) / len(parents)) if parents else cursor + width[n] / 2
            centre = max(want, cursor + width[n] / 2)
            x[n] = centre
            cursor = centre + width[n] / 2 + _GAP_X
    shift = _MARGIN - min(x[n] - width[n] / 2 for n in lay.nodes)
    for n in x:
        x[n] += shift
    y = {n: _MARGIN + layer[n] * (_BOX_H + _GAP_Y) for n in lay.nodes}
    total_w = max(x[n] + width[n] / 2 for n in lay.nodes) + _MARGIN
    total_h = _MARGIN * 2 + len(rows) * _BOX_H + (len(rows) - 1) * _GAP_Y

    marker = f"{id_prefix}-arrow"
    parts = [
        f'<svg class="graph" width="{total_w:.0f}" height="{total_h:.0f}" '
        f'viewBox="0 0 {total_w:.0f} {total_h:.0f}" role="img" text-anchor="middle" '
        f'font-family="ui-monospace,SFMono-Regular,Menlo,Consolas,monospace">',
        f'<defs><marker id="{marker}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker></defs>',
    ]
    for (s, d), chain in routes.items():
        # down through each route point's row as a straight lane, S-curves between rows
        points = [(x[s], y[s] + _BOX_H)]
        for point in chain:
            points += [(x[point], y[point]), (x[point], y[point] + _BOX_H)]
        points.append((x[d], y[d] - 1))
        path = f"M{points[0][0]:.1f},{points[0][1]:.1f}"
        for (x1, y1), (x2, y2) in itertools.pairwise(points):
            if x1 == x2:
                path += f" L{x2:.1f},{y2:.1f}"
            else:
                bend = max((y2 - y1) / 2, 12)
                path += f" C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} {x2:.1f},{y2:.1f}"
        parts.append(f'<path d="{path}" fill="none" stroke="#777" stroke-width="1.2" marker-end="url(#{marker})"/>')
    for n in sorted(g.nodes, key=index.get):
        label, sub, role = info[n]
        fill, stroke = _ROLE_COLORS[role]
        left, top, w = x[n] - width[n] / 2, y[n], width[n]
        dash = ' stroke-dasharray="4 2"' if role == "context" else ""
        parts.append(
            f"<g><title>{_e(n)}</title>"
            f'<rect x="{left:.1f}" y="{top:.1f}" width="{w:.1f}" height="{_BOX_H}" rx="7" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="1.4"{dash}/>'
            f'<text x="{x[n]:.1f}" y="{top + (15 if sub else 22):.1f}" font-size="12" font-weight="600" '
            f'fill="#1f2328">{_e(label)}</text>'
            + (f'<text x="{x[n]:.1f}" y="{top + 29:.1f}" font-size="10" fill="#656d76">{_e(sub)}</text>' if sub else "")
            + "</g>"
        )
    parts.append("</svg>")
    return "".join(parts)


# -- HTML -------------------------------------------------------------------------------------------
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
            ("removed", _ROLE_COLORS["removed"]),
            ("added", _ROLE_COLORS["added"]),
            ("unchanged neighbour", _ROLE_COLORS["context"]),
            ("input / weight", _ROLE_COLORS["input"]),
        )
    )
    + "</p>"
)


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _display_path(path: str) -> str:
    return path if path != ROOT else "(root)"


def html_page(title: str, body: str) -> str:
    """A complete self-contained page around `body` with optpipe's stylesheet."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{PAGE_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


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
    return " ".join(f'<span class="{cls}">{sign}{_e(_times(short_op_name(op), n))}</span>' for op, n in ops.items())


def _modules_table(modules: list[ModuleDiff]) -> str:
    rows = []
    for m in modules:

        def pct(pair, unit=""):
            return (
                '<span class="muted">—</span>'
                if pair[0] == pair[1]
                else f"{format_count(pair[0], unit)} → {format_count(pair[1], unit)} ({_e(format_percent(*pair))})"
            )

        rows.append(
            f'<tr><td class="mono">{_e(_display_path(m.path))}</td>'
            f'<td><span class="status">{_e(m.status)}</span></td>'
            f'<td class="mono">{_ops_html(m.removed, "rm", "−")}</td>'
            f'<td class="mono">{_ops_html(m.added, "add", "+")}</td>'
            f'<td class="num">{pct(m.params)}</td><td class="num">{pct(m.flops)}</td>'
            f'<td class="num">{pct(m.activation_bytes, "B")}</td></tr>'
        )
    return (
        "<table><tr><th>module</th><th>status</th><th>removed</th><th>added</th><th>params</th>"
        "<th>FLOPs</th><th>activations</th></tr>" + "".join(rows) + "</table>"
    )


def _region_html(region: ChangedRegion, id_prefix: str) -> str:
    note = ""
    if region.same_rewrite_in:
        shown = ", ".join(_display_path(p) for p in region.same_rewrite_in[:6])
        more = f" and {len(region.same_rewrite_in) - 6} more" if len(region.same_rewrite_in) > 6 else ""
        note = f'<p class="muted">The same rewrite in {_e(shown)}{more}.</p>'
    if region.truncated:
        note += f'<p class="muted">Only the first {MAX_DRAWN_CHANGES} changed nodes are drawn.</p>'
    return (
        f'<h4 class="mono">{_e(_display_path(region.module))}</h4>{note}<div class="pair">'
        f'<div class="pane"><div class="cap">before</div>{render_svg(region.before, id_prefix + "b")}</div>'
        f'<div class="pane"><div class="cap">after</div>{render_svg(region.after, id_prefix + "a")}</div>'
        "</div>"
    )
