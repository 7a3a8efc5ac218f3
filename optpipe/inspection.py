"""`optpipe inspect`: what a Program is made of: ops, parameters, FLOPs, activation memory per
module, and every attention site.

Attention sites are the graph's `scaled_dot_product_attention` nodes (form "sdpa") plus the
hand-written ones (`softmax(q @ kᵀ) @ v`), found by running `fuse-attention` on a copy of the
program and reporting the SDPA nodes it creates (form "hand-written (fusable)"). The program itself
is never modified.

>>> data = inspect_program(program)     # doctest: +SKIP
>>> print(format_inspect(data))         # doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter

import torch

from .analysis import ROOT, analyze, format_count, module_sort_key
from .program import Program

SDPA_FORM = "sdpa"
HAND_WRITTEN_FORM = "hand-written (fusable)"


def inspect_program(program: Program) -> dict:
    """JSON-able description of `program` (the data of `optpipe inspect --json`).

    Keys: "model", "inputs", "params", "flops", "activation_bytes", "nodes", "ops" (op name ->
    count), "modules" (per module path, totals including sub-modules), "attention" (one row per
    site: module, form, mask, heads, kv_heads, head_dim, ...), "uncounted_ops", "notes".
    """
    costs = analyze(program)
    attention, notes = attention_sites(program)
    if attention:
        notes += _attention_advice(program)
    if costs.uncounted_ops:
        notes.append("FLOPs not counted for: " + ", ".join(costs.uncounted_ops))
    modules = [
        {
            "module": m.path,
            "type": m.type,
            "depth": m.path.count(".") + 1 if m.path else 0,
            "params": m.total_params,
            "flops": m.total_flops,
            "activation_bytes": m.total_activation_bytes,
            "nodes": m.total_nodes,
        }
        for m in costs.modules.values()
    ]
    return {
        "model": program.meta.get("model_class"),
        "inputs": _describe_inputs(program),
        "params": costs.params,
        "flops": costs.flops,
        "activation_bytes": costs.activation_bytes,
        "nodes": sum(costs.ops.values()),
        "ops": dict(costs.ops.most_common()),
        "modules": modules,
        "attention": attention,
        "uncounted_ops": list(costs.uncounted_ops),
        "notes": notes,
    }


def _describe_inputs(program: Program) -> list[dict]:
    rows = []
    dynamic = program.dynamic_shapes or [None] * len(program.example_inputs)
    for name, x, dims in zip(program.input_names, program.example_inputs, dynamic):
        if isinstance(x, torch.Tensor):
            dims = dims or {}
            shape = ", ".join(f"{dims[d]}={s}" if d in dims else str(s) for d, s in enumerate(x.shape))
            rows.append(
                {
                    "name": name,
                    "dtype": str(x.dtype).removeprefix("torch."),
                    "shape": list(x.shape),
                    "spec": f"{name}:{str(x.dtype).removeprefix('torch.')}[{shape}]",
                }
            )
        else:
            rows.append({"name": name, "dtype": type(x).__name__, "shape": None, "spec": f"{name}={x!r}"})
    return rows


def _attention_advice(program: Program) -> list[str]:
    """What the `attention` pass would say at this program's sequence length (e.g. kinds that are
    slower than dense SDPA there), through the pass module's `length_advice(n)`."""
    from .registry import get_hook

    lengths = [x.shape[1] for x in program.example_inputs if hasattr(x, "shape") and len(x.shape) >= 2]
    advice = get_hook("attention", "length_advice") if lengths else None
    return advice(max(lengths)) if advice else []


def attention_sites(program: Program) -> tuple[list[dict], list[str]]:
    """(site rows, notes): SDPA nodes of the graph and hand-written attention that fuse-attention
    would turn into SDPA, in module order."""
    notes: list[str] = []
    try:
        from .attention_sites import find_attention_sites
    except ImportError as e:
        return [], [f"attention sites not searched: {e}"]
    existing = find_attention_sites(program.gm, program.example_inputs)
    rows = [_site_row(s, SDPA_FORM) for s in existing]
    try:
        from .registry import get_pass

        info = get_pass("fuse-attention")
        fused = program.copy()
        result = info.fn(fused, info.config_cls())
    except Exception as e:  # noqa: BLE001 - inspect must still describe what it can
        notes.append(f"hand-written attention not searched: fuse-attention failed: {type(e).__name__}: {e}")
    else:
        if result.modified:
            # fuse-attention may also rebuild the SDPA nodes that were there (canonicalize), so a
            # module's first N sites are the N it already had; the rest were hand-written
            already = Counter(s.module_path for s in existing)
            for s in find_attention_sites(fused.gm, fused.example_inputs):
                if already[s.module_path] > 0:
                    already[s.module_path] -= 1
                else:
                    rows.append(_site_row(s, HAND_WRITTEN_FORM))
    rows.sort(key=lambda r: module_sort_key(r["module"]))
    return rows, notes


def _site_row(site, form: str) -> dict:
    return {
        "module": site.module_path,
        "form": form,
        "mask": site.mask,
        "heads": site.heads,
        "kv_heads": site.kv_heads,
        "head_dim": site.head_dim,
        "is_causal": site.is_causal,
        "gqa": site.gqa,
        "scale": site.scale,
        "node": site.node,
    }


# -- text -------------------------------------------------------------------------------------------
def format_table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> list[str]:
    """Aligned columns; column indices in `right` are right-aligned (numbers)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        line = "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines.append(line.rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _short_type(t: str) -> str:
    return t.rsplit(".", 1)[-1] if t else ""


def format_inspect(d: dict) -> str:
    """Readable terminal text of `inspect_program`'s dict."""
    out = []
    if d.get("model"):
        out.append(f"model   {d['model']}")
    if d.get("inputs"):
        out.append("inputs  " + "  ".join(i["spec"] for i in d["inputs"]))
    out.append(
        f"params {format_count(d['params'])}   FLOPs {format_count(d['flops'])}   "
        f"activations {format_count(d['activation_bytes'], 'B')}   nodes {d['nodes']}"
    )
    out += _attention_lines(d.get("attention") or [])
    out += _module_lines(d["modules"])
    ops = d.get("ops") or {}
    out += ["", f"ops ({len(ops)} kinds, {sum(ops.values())} nodes)"]
    out += ["  " + line for line in format_table(["op", "count"], [[k, v] for k, v in ops.items()], right={1})]

    for note in d.get("notes") or []:
        out.append(f"note: {note}")
    return "\n".join(out)


def _attention_lines(sites: list[dict]) -> list[str]:
    out = ["", f"attention sites ({len(sites)})"]
    if not sites:
        return [*out, "  none"]
    rows = [
        [
            s["module"] or "(root)",
            s["form"],
            s["mask"],
            s["heads"],
            s["kv_heads"],
            s["head_dim"],
            f"{s['scale']:.4g}" if isinstance(s.get("scale"), float) else s.get("scale"),
        ]
        for s in sites
    ]
    headers = ["module", "form", "mask", "heads", "kv-heads", "head-dim", "scale"]
    return out + ["  " + line for line in format_table(headers, rows, right={3, 4, 5, 6})]


def _module_lines(modules: list[dict]) -> list[str]:
    """The module tree, indented by depth, with each module's totals (sub-modules included)."""
    rows = [
        [
            "  " * m["depth"] + (m["module"].rsplit(".", 1)[-1] if m["module"] != ROOT else "(root)"),
            _short_type(m["type"]),
            format_count(m["params"]),
            format_count(m["flops"]),
            format_count(m["activation_bytes"], "B"),
            m["nodes"],
        ]
        for m in modules
    ]
    headers = ["module", "type", "params", "FLOPs", "activations", "nodes"]
    return ["", f"modules ({len(modules)}; totals include sub-modules)"] + [
        "  " + line for line in format_table(headers, rows, right={2, 3, 4, 5})
    ]
