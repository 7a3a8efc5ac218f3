"""A small graph drawn as inline SVG: the pictures of a graph diff's changed regions.

A `GraphPicture` is what to draw: nodes with a label, a sublabel and a role (removed, added, an
unchanged neighbour, an input or weight) and the edges between them. `render_svg` draws it with
graphviz `dot` when installed, else with `layered_svg`, a small layered layout of our own:

    rows        topological generations; an input or weight sits right above its first consumer
    lanes       an edge spanning several rows runs through a route point on every row it crosses,
                so it takes a lane instead of crossing boxes
    order       barycentric sweeps (down, then up) against crossings
    placement   each node under the mean of its parents, pushed apart where boxes would overlap

The SVG is made for inlining in a self-contained HTML page: no namespaces, no external URLs.

>>> pic = GraphPicture(nodes=[("x", "x", "input", "input"), ("y", "relu", "", "added")], edges=[("x", "y")])
>>> svg = render_svg(pic)   # '<svg class="graph" ...' (or graphviz's drawing)
"""

from __future__ import annotations

import functools
import html
import itertools
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import networkx as nx

ROLE_COLORS = {  # role -> (fill, stroke)
    "removed": ("#fdecea", "#c62828"),
    "added": ("#e8f5e9", "#2e7d32"),
    "context": ("#f7f7f7", "#9e9e9e"),
    "input": ("#e8f0fe", "#3b6bc4"),
}

_CHAR_W, _BOX_H, _GAP_X, _GAP_Y, _MARGIN = 7.0, 36, 22, 44, 12
_ORDERING_SWEEPS = 6


@dataclass
class GraphPicture:
    """A small graph to draw: nodes (id, label, sublabel, role) and edges (src id, dst id).
    Roles: "removed", "added", "context" (an unchanged neighbour), "input" (placeholder/weight)."""

    nodes: list[tuple[str, str, str, str]] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)


def render_svg(pic: GraphPicture, id_prefix: str = "g") -> str:
    """Inline SVG of `pic`: graphviz when `dot` is installed, else our own layered layout."""
    if not pic.nodes:
        return '<p class="muted">(nothing)</p>'
    if shutil.which("dot"):
        svg = _graphviz_svg(pic)
        if svg:
            return svg
    return layered_svg(pic, id_prefix)


def _e(text) -> str:
    return html.escape(str(text), quote=True)


# -- graphviz ---------------------------------------------------------------------------------------
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
        fill, stroke = ROLE_COLORS[role]
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


# -- our own layered layout -------------------------------------------------------------------------
@dataclass
class _Layout:
    """Where everything goes. Layout points are the picture's node ids plus one route point
    `("route", src, dst, row)` per row a long edge crosses."""

    graph: nx.DiGraph
    """The picture's nodes and edges."""
    points: nx.DiGraph
    """The layout points, each long edge a chain through its route points."""
    row_of: dict
    rows: list[list]
    routes: dict[tuple[str, str], list]
    """(src, dst) -> the route points of that edge, top to bottom."""
    x: dict = field(default_factory=dict)
    """Centre of each layout point."""
    y: dict = field(default_factory=dict)
    """Top of each layout point."""
    width: dict = field(default_factory=dict)
    size: tuple[float, float] = (0.0, 0.0)


def layered_svg(pic: GraphPicture, id_prefix: str) -> str:
    """Layered (Sugiyama-style) layout: topological generations as rows, long edges routed through
    placeholder points on the rows they cross (so they take a lane instead of crossing boxes),
    barycentric ordering against crossings, each node placed under the mean of its parents.
    `id_prefix` keeps the arrow marker's id unique on a page with several drawings."""
    index = {node_id: i for i, (node_id, *_rest) in enumerate(pic.nodes)}
    info = {node_id: (label, sub, role) for node_id, label, sub, role in pic.nodes}
    layout = _route_long_edges(pic, *_rows_of(pic))
    _order_rows(layout, index)
    _place(layout, info)
    marker = f"{id_prefix}-arrow"
    total_w, total_h = layout.size
    parts = [
        f'<svg class="graph" width="{total_w:.0f}" height="{total_h:.0f}" '
        f'viewBox="0 0 {total_w:.0f} {total_h:.0f}" role="img" text-anchor="middle" '
        f'font-family="ui-monospace,SFMono-Regular,Menlo,Consolas,monospace">',
        f'<defs><marker id="{marker}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker></defs>',
    ]
    parts += [_edge_svg(layout, s, d, chain, marker) for (s, d), chain in layout.routes.items()]
    parts += [_node_svg(layout, n, *info[n]) for n in sorted(layout.graph.nodes, key=index.get)]
    parts.append("</svg>")
    return "".join(parts)


def _rows_of(pic: GraphPicture):
    """(the picture as a networkx graph, row of each node): topological generations, with weights
    and inputs right above their first consumer rather than all in the top row."""
    import networkx as nx

    graph = nx.DiGraph()
    graph.add_nodes_from(node_id for node_id, *_rest in pic.nodes)
    graph.add_edges_from(pic.edges)
    row_of = {n: i for i, gen in enumerate(nx.topological_generations(graph)) for n in gen}
    for n in graph.nodes:
        if graph.in_degree(n) == 0 and graph.out_degree(n) > 0:
            row_of[n] = max(0, min(row_of[s] for s in graph.successors(n)) - 1)
    return graph, row_of


def _route_long_edges(pic: GraphPicture, graph, row_of: dict) -> _Layout:
    """The layout graph: every edge spanning k rows becomes a chain through k-1 route points."""
    import networkx as nx

    points = nx.DiGraph()
    points.add_nodes_from(graph.nodes)
    routes: dict[tuple[str, str], list] = {}
    for s, d in pic.edges:
        chain = [("route", s, d, r) for r in range(row_of[s] + 1, row_of[d])]
        for r, point in zip(range(row_of[s] + 1, row_of[d]), chain):
            row_of[point] = r
        nx.add_path(points, [s, *chain, d])
        routes[(s, d)] = chain
    return _Layout(graph, points, row_of, [], routes)


def _order_rows(layout: _Layout, index: dict[str, int]) -> None:
    """Fill `layout.rows`: picture order first (a route point goes with its edge's source), then
    barycentric sweeps, down then up, to reduce crossings."""
    rows: list[list] = [[] for _ in range(max(layout.row_of.values()) + 1)]
    order = {n: i for i, n in enumerate(sorted(layout.graph.nodes, key=index.get))}

    def picture_order(n):
        return order.get(n, order.get(n[1], 0) if isinstance(n, tuple) else 0)

    for n in sorted(layout.points.nodes, key=picture_order):
        rows[layout.row_of[n]].append(n)
    for sweep in range(_ORDERING_SWEEPS):
        down = sweep % 2 == 0
        for r in range(1, len(rows)) if down else range(len(rows) - 2, -1, -1):
            ref = {n: i for i, n in enumerate(rows[r - 1 if down else r + 1])}
            here = {n: i for i, n in enumerate(rows[r])}
            rows[r].sort(key=functools.partial(_barycentre, layout, ref=ref, here=here, down=down))
    layout.rows = rows


def _barycentre(layout: _Layout, n, ref: dict, here: dict, down: bool) -> float:
    """Mean position of `n`'s neighbours in the reference row (parents going down, children going
    up); its current position when it has none there."""
    neighbours = layout.points.predecessors(n) if down else layout.points.successors(n)
    near = [ref[m] for m in neighbours if m in ref]
    return sum(near) / len(near) if near else here[n]


def _place(layout: _Layout, labels: dict[str, tuple[str, str, str]]) -> None:
    """Box widths from the labels, x under the mean of the parents then pushed apart to remove
    overlaps, y from the row; and the picture's total size."""
    points = layout.points
    layout.width = {
        n: (max(64.0, min(300.0, _CHAR_W * max(len(labels[n][0]), len(labels[n][1])) + 20)) if n in labels else 6.0)
        for n in points.nodes
    }
    x, width = layout.x, layout.width
    for row in layout.rows:
        cursor = 0.0
        for n in row:
            parents = [p for p in points.predecessors(n) if p in x]
            want = (sum(x[p] for p in parents) / len(parents)) if parents else cursor + width[n] / 2
            centre = max(want, cursor + width[n] / 2)
            x[n] = centre
            cursor = centre + width[n] / 2 + _GAP_X
    shift = _MARGIN - min(x[n] - width[n] / 2 for n in points.nodes)
    for n in x:
        x[n] += shift
    layout.y = {n: _MARGIN + layout.row_of[n] * (_BOX_H + _GAP_Y) for n in points.nodes}
    total_w = max(x[n] + width[n] / 2 for n in points.nodes) + _MARGIN
    total_h = _MARGIN * 2 + len(layout.rows) * _BOX_H + (len(layout.rows) - 1) * _GAP_Y
    layout.size = (total_w, total_h)


def _edge_svg(layout: _Layout, s: str, d: str, chain: list, marker: str) -> str:
    """The edge s -> d: down through each route point's row as a straight lane, S-curves between rows."""
    x, y = layout.x, layout.y
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
    return f'<path d="{path}" fill="none" stroke="#777" stroke-width="1.2" marker-end="url(#{marker})"/>'


def _node_svg(layout: _Layout, n: str, label: str, sub: str, role: str) -> str:
    """A node's box: a rounded rectangle in its role's colours (dashed for an unchanged neighbour),
    its label, its sublabel underneath when it has one, and its id as the tooltip."""
    fill, stroke = ROLE_COLORS[role]
    centre, top, w = layout.x[n], layout.y[n], layout.width[n]
    left = centre - w / 2
    dash = ' stroke-dasharray="4 2"' if role == "context" else ""
    return (
        f"<g><title>{_e(n)}</title>"
        f'<rect x="{left:.1f}" y="{top:.1f}" width="{w:.1f}" height="{_BOX_H}" rx="7" '
        f'fill="{fill}" stroke="{stroke}" stroke-width="1.4"{dash}/>'
        f'<text x="{centre:.1f}" y="{top + (15 if sub else 22):.1f}" font-size="12" font-weight="600" '
        f'fill="#1f2328">{_e(label)}</text>'
        + (f'<text x="{centre:.1f}" y="{top + 29:.1f}" font-size="10" fill="#656d76">{_e(sub)}</text>' if sub else "")
        + "</g>"
    )
