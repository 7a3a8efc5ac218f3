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
layout of our own (`optpipe.graph_svg`). The HTML itself is `optpipe.report`'s.

>>> d = diff_programs(before, after)         # doctest: +SKIP
>>> print(d.to_text())                       # doctest: +SKIP
graph diff: 2 modules changed (2 rewritten)
  nodes 68 → 52 (-23.5%)   params 30.6K → 30.6K (±0%)   flops 442K → 442K (±0%)   activations ...

  h.0.attn  rewritten   -masked_fill -matmul×2 -mul -softmax ... +scaled_dot_product_attention   act -67.3%
  h.1.attn  rewritten   -masked_fill -matmul×2 -mul -softmax ... +scaled_dot_product_attention   act -67.3%
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx

from .analysis import (
    ProgramCosts,
    analyze,
    counted_op_name,
    format_count,
    format_percent,
    is_bookkeeping,
    module_sort_key,
    short_op_name,
)
from .graph_svg import GraphPicture
from .graph_svg import render_svg as render_svg  # still answers here: the drawing moved to graph_svg
from .graph_toolkit import get_attribute, module_path
from .program import Program
from .report import PAGE_CSS as PAGE_CSS  # still answers here: the page moved to report
from .report import diff_html_page, diff_html_section, display_path, op_count_text
from .report import html_page as html_page  # still answers here: the page moved to report

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
        parts = [f"-{op_count_text(op, n)}" for op, n in self.removed.items()]
        parts += [f"+{op_count_text(op, n)}" for op, n in self.added.items()]
        if not parts and self.status == "rewired":
            parts = ["(same ops, rewired)"]
        return " ".join(parts)

    def deltas_text(self) -> str:
        parts = []
        for name, (before, after) in (("params", self.params), ("flops", self.flops), ("act", self.activation_bytes)):
            if before != after:
                parts.append(f"{name} {format_percent(before, after)}")
        return "  ".join(parts)


def _delta(pair: tuple[int, int]) -> dict:
    return {"before": pair[0], "after": pair[1], "delta": pair[1] - pair[0]}


@dataclass
class ChangedRegion:
    module: str
    before: GraphPicture
    after: GraphPicture
    same_rewrite_in: list[str] = field(default_factory=list)
    """Other modules whose rewrite has the same shape (not drawn again)."""
    truncated: bool = False
    """More changed nodes than `drawn_limit` on one side: only the first `drawn_limit` are drawn."""
    drawn_limit: int = MAX_DRAWN_CHANGES


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
        width = max((len(display_path(m.path)) for m in self.modules), default=0)
        status_width = max((len(m.status) for m in self.modules), default=0)
        for m in self.modules:
            parts = [
                f"  {display_path(m.path):<{width}}  {m.status:<{status_width}}",
                m.op_changes_text(),
                m.deltas_text(),
            ]
            lines.append("   ".join(p for p in parts if p).rstrip())
        return "\n".join(lines)

    def html_section(self, id_prefix: str = "d") -> str:
        """The diff as an HTML fragment (tables and drawings), for embedding in a page."""
        return diff_html_section(self, id_prefix)

    def to_html(self, title: str = "optpipe graph diff") -> str:
        """A self-contained HTML page (inline CSS and SVG, no external assets)."""
        return diff_html_page(self, title)


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
        changed_by_module[module_path(n)]["removed"].append(n.name)
    for n in added_nodes:
        changed_by_module[module_path(n)]["added"].append(n.name)

    paths = sorted(set(costs_a.modules) | set(costs_b.modules), key=module_sort_key)
    module_diffs = (
        _module_diff(p, costs_a.modules.get(p), costs_b.modules.get(p), changed_by_module.get(p)) for p in paths
    )
    rows = [row for row in module_diffs if row is not None]
    totals = {
        "nodes": (sum(costs_a.ops.values()), sum(costs_b.ops.values())),
        "params": (costs_a.params, costs_b.params),
        "flops": (costs_a.flops, costs_b.flops),
        "activation_bytes": (costs_a.activation_bytes, costs_b.activation_bytes),
    }
    regions, undrawn = _changed_regions(removed_nodes, added_nodes)
    return GraphDiff(rows, totals, regions, undrawn)


def _module_diff(path: str, ma, mb, changed: dict[str, list[str]] | None) -> ModuleDiff | None:
    """How the module at `path` changed from its costs `ma` (before) to `mb` (after), either None
    where the module is absent; None when it did not change. `changed`: its unmatched nodes."""
    ops_a = ma.ops if ma else Counter()
    ops_b = mb.ops if mb else Counter()
    added, removed = ops_b - ops_a, ops_a - ops_b
    numbers = {
        k: (getattr(ma, k, 0) if ma else 0, getattr(mb, k, 0) if mb else 0)
        for k in ("params", "flops", "activation_bytes")
    }
    if added and removed:
        status = "rewritten"
    elif added:
        status = "added"
    elif removed:
        status = "removed"
    elif changed is not None:
        status = "rewired"
    elif any(x != y for x, y in numbers.values()):
        status = "changed"
    else:
        return None
    return ModuleDiff(
        path,
        (mb.type if mb else "") or (ma.type if ma else ""),
        status,
        dict(sorted(added.items())),
        dict(sorted(removed.items())),
        numbers["params"],
        numbers["flops"],
        numbers["activation_bytes"],
        changed or {"removed": [], "added": []},
    )


def _node_signature(node: torch.fx.Node) -> tuple:
    """What must agree for two nodes to be "the same": op, module path and constant arguments."""
    if node.op in ("placeholder", "get_attr"):
        return (node.op, node.target)
    if node.op == "output":
        return ("output",)
    target = str(node.target) if isinstance(node.target, torch._ops.OpOverload) else counted_op_name(node)
    consts = torch.fx.node.map_arg((node.args, node.kwargs), lambda _: "%")
    return (node.op, target, module_path(node), repr(consts))


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
        by_module[module_path(n)][0].append(n)
    for n in added:
        by_module[module_path(n)][1].append(n)
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
