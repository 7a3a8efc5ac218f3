"""Attention sites in a captured graph: where `aten.scaled_dot_product_attention` runs, with which
heads, scale and mask.

Used by `optpipe inspect` and by the attention passes (`fuse-attention` decides `is_causal` from
`classify_mask`; sparse/linear attention passes select sites by mask kind and module path).

A mask is classified by evaluating the part of the graph that builds it:

- "none": every query attends every key;
- "causal": query i attends keys j <= i (top-left aligned, square), independent of input data;
- "padding": depends on input data (an `attention_mask` input), attends everywhere when that input
  is all ones;
- "causal+padding": depends on input data, causal when that input is all ones;
- "custom": anything else (sliding windows, biases such as ALiBi, masks that could not be evaluated,
  masks computed from parameters: learned relative-position biases).

A mask that reaches the graph inputs only through their shapes (`sym_size`, `new_ones`, ...) is a
static pattern; it is evaluated at the example shapes and again at other sizes of the dynamic dims,
so a pattern that only looks causal at one length (a sliding window wider than the example) is not
mistaken for causal.

>>> sites = find_attention_sites(program.gm, program.example_inputs)  # doctest: +SKIP
>>> [s.mask for s in sites]                                            # doctest: +SKIP
['causal', 'causal']
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph_toolkit import ancestors, module_path, value

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

MASK_KINDS = ("none", "causal", "padding", "causal+padding", "custom")

# Ops that read only the shape/dtype/device of their first argument, never its values.
_SHAPE_ONLY_OPS = {
    aten.sym_size.int,
    aten.sym_numel.default,
    aten.sym_stride.int,
    aten.sym_storage_offset.default,
    aten.new_ones.default,
    aten.new_zeros.default,
    aten.new_empty.default,
    aten.new_full.default,
    aten.empty_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten._assert_tensor_metadata.default,
}
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@dataclass
class AttentionSite:
    node: str
    """Name of the SDPA node in the graph."""
    module_path: str
    """Innermost module that ran it (`transformer.h.0.attn`)."""
    mask: str
    """One of MASK_KINDS."""
    is_causal: bool
    heads: int | None
    kv_heads: int | None
    """K/V heads before any repeat_kv: fewer than `heads` under grouped-query attention."""
    head_dim: int | None
    scale: float | None
    """Softmax scale: the explicit `scale=` or SDPA's default 1/sqrt(head_dim)."""
    gqa: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- small graph facts ----------------------------------------------------------------------------
def same_size(a, b) -> bool:
    """Sizes (ints or SymInts) that are equal for every value of the dynamic dims."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(same_size(x, y) for x, y in zip(a.shape, b.shape))


def concrete(size) -> int | None:
    return size if isinstance(size, int) else None


def sdpa_arguments(node: torch.fx.Node) -> dict:
    """The arguments of an SDPA node by name, defaults filled in."""
    args = dict(_SDPA_DEFAULTS)
    args.update(zip(_SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def skip_noop_slices(node):
    """`x[:, :, :]`-style slices that keep the whole dim (export leaves them around repeat_kv)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten.slice.Tensor:
        _, dim, start, end, step = list(node.args) + [0, None, None, 1][len(node.args) - 1 :]
        src = value(node.args[0])
        if src is None or start not in (0, None) or step != 1:
            break
        if end is not None and not (isinstance(end, int) and end >= 2**62) and not same_size(end, src.shape[dim]):
            break
        node = node.args[0]
    return node


def repeat_kv_source(node) -> tuple[torch.fx.Node, int] | None:
    """If `node` is K or V repeated along heads (Llama's `repeat_kv`: unsqueeze(2) -> expand ->
    reshape, or `repeat_interleave(n, dim=1)`), return (un-repeated tensor, n_rep)."""
    out = value(node)
    if out is None or out.dim() != 4 or node.op != "call_function":
        return None
    if node.target is aten.repeat_interleave.self_int:
        src, reps, dim = (list(node.args) + [None])[:3]
        src_val = value(src)
        if dim is None or dim % 4 != 1 or not isinstance(reps, int) or src_val is None:
            return None
        return (src, reps) if src_val.shape[1] * reps == out.shape[1] else None
    if node.target not in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return None
    expand = skip_noop_slices(node.args[0])
    if not (isinstance(expand, torch.fx.Node) and expand.target is aten.expand.default):
        return None
    unsq = skip_noop_slices(expand.args[0])
    if not (isinstance(unsq, torch.fx.Node) and unsq.target is aten.unsqueeze.default and unsq.args[1] % 5 == 2):
        return None
    src = skip_noop_slices(unsq.args[0])
    src_val, wide = value(src), value(expand)
    if src_val is None or wide is None or src_val.dim() != 4 or wide.dim() != 5:
        return None
    n_rep = concrete(wide.shape[2])
    b, kvh, s, d = src_val.shape
    if n_rep is None or not all(
        same_size(x, y) for x, y in zip((b, kvh, s, d), (wide.shape[0], wide.shape[1], wide.shape[3], wide.shape[4]))
    ):
        return None
    if not all(same_size(x, y) for x, y in zip((b, kvh * n_rep, s, d), out.shape)):
        return None
    return src, n_rep


# -- mask classification ---------------------------------------------------------------------------
def _reads_value_of(node: torch.fx.Node, source) -> bool:
    """Whether `node`'s value depends on the value (not just the shape) of a node `source` accepts."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if source(n):
            return True
        if not (n.op == "call_function" and n.target in _SHAPE_ONLY_OPS):
            stack.extend(n.all_input_nodes)
    return False


def reads_input_data(node: torch.fx.Node) -> bool:
    """Whether `node`'s value depends on the values (not just the shapes) of a graph input."""
    return _reads_value_of(node, lambda n: n.op == "placeholder")


def reads_parameters(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether `node`'s values are computed from a parameter of `gm` (a learned bias, not a mask
    pattern); reading only a parameter's shape (`new_ones(embeds)`) does not count."""
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    return _reads_value_of(node, lambda n: n.op == "get_attr" and n.target in params)


def mask_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.GraphModule:
    """A GraphModule over `gm` (so get_attr finds its buffers) computing just `node` from all of
    `gm`'s placeholders."""
    needed = ancestors(node)
    graph, env = torch.fx.Graph(), {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" or n in needed:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[node])
    return torch.fx.GraphModule(gm, graph)


def _size_hints(gm, example_inputs) -> dict:
    """Dynamic-dim symbol -> its size at the example inputs."""
    hints = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, ph in enumerate(placeholders):
        v = value(ph)
        if v is None:
            continue
        real = example_inputs[i] if example_inputs is not None and i < len(example_inputs) else None
        for d, size in enumerate(v.shape):
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                hint = real.shape[d] if isinstance(real, torch.Tensor) else size.node.hint
                if hint is not None:
                    hints[size.node.expr] = int(hint)
    return hints


def _inputs_at(gm, example_inputs, sizes: dict | None, ones: bool) -> tuple:
    """Placeholder values: the example inputs, or tensors of the placeholders' shapes with the
    dynamic dims at `sizes` (all ones when `ones`, so a padding mask attends everywhere)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = []
    for i, ph in enumerate(placeholders):
        real = example_inputs[i] if example_inputs is not None and i < len(example_inputs) else None
        v = value(ph)
        if v is None or (sizes is None and real is not None and not ones):
            values.append(real)
            continue
        shape = [_dim_size(size, d, real, sizes) for d, size in enumerate(v.shape)]
        values.append(torch.ones(shape, dtype=v.dtype) if ones else torch.zeros(shape, dtype=v.dtype))
    return tuple(values)


def _dim_size(size, d: int, real, sizes: dict | None) -> int:
    if isinstance(size, int):
        return size
    if sizes:
        return int(size.node.expr.xreplace(sizes))
    return int(real.shape[d]) if isinstance(real, torch.Tensor) else int(size.node.hint)


def _very_negative(dtype: torch.dtype) -> float:
    """Additive-mask values at or below this block attention (-inf, dtype-min, -1e9, ...)."""
    return max(torch.finfo(dtype).min / 2, -1e9)


def is_blocking_value(fill, dtype: torch.dtype) -> bool:
    """A fill value (masked_fill / where) that blocks attention just as -inf does."""
    return isinstance(fill, (int, float)) and fill <= _very_negative(dtype)


def _allowed(mask: torch.Tensor, blocked_when_true: bool) -> torch.Tensor | None:
    """Boolean "query may attend key" of a mask tensor, or None when it is not a mask (a bias)."""
    if mask.dtype == torch.bool:
        return ~mask if blocked_when_true else mask
    if mask.is_floating_point():
        blocked = mask <= _very_negative(mask.dtype)
        if not bool(((mask == 0) | blocked).all()):
            return None
        return ~blocked
    return None


def _pattern(allowed: torch.Tensor) -> str:
    if bool(allowed.all()):
        return "none"
    if allowed.dim() < 2:
        return "custom"
    L, S = allowed.shape[-2:]
    if L == S and bool((allowed == torch.ones(L, S, dtype=torch.bool).tril()).all()):
        return "causal"
    return "custom"


def classify_mask(
    gm: torch.fx.GraphModule,
    mask_node: torch.fx.Node,
    example_inputs: Sequence | None = None,
    *,
    blocked_when_true: bool = False,
) -> str:
    """Classify the attention mask computed by `mask_node` as one of MASK_KINDS.

    Boolean masks are True where attention is allowed (SDPA's convention), or True where it is
    blocked when `blocked_when_true` (a `masked_fill(scores, cond, -inf)` condition). Float masks are
    additive: 0 to attend, -inf or dtype-min to block; any other value makes the mask "custom".
    `example_inputs` are the program's inputs; without them, sizes come from the graph's shape hints.
    """
    if reads_parameters(gm, mask_node):
        return "custom"  # a learned bias (T5's, DeBERTa's relative positions): no need to run the model to see it
    try:
        sub = mask_module(gm, mask_node)
    except Exception:  # noqa: BLE001 - a mask we cannot extract is one we cannot vouch for
        return "custom"
    data = reads_input_data(mask_node)
    hints = _size_hints(gm, example_inputs)
    # The example shapes, then every dynamic dim larger and smaller: a static pattern must hold at
    # all of them (a window wider than the example is caught; the growth is bounded for memory).
    variants = [None] + [
        {s: min(2 * h + 3, h + 256) for s, h in hints.items()},
        {s: max(h // 2, 2) for s, h in hints.items()},
    ] * bool(hints)
    kinds = set()
    for i, sizes in enumerate(variants):
        try:
            with torch.no_grad():
                mask = sub(*_inputs_at(gm, example_inputs, sizes, ones=data))
        except Exception:  # noqa: BLE001 - other sizes may exceed the model's limits
            if i == 0:
                return "custom"
            continue
        if not isinstance(mask, torch.Tensor):
            return "custom"
        allowed = _allowed(mask, blocked_when_true)
        kinds.add("custom" if allowed is None else _pattern(allowed))
    kind = kinds.pop() if len(kinds) == 1 else "custom"
    if data:
        return {"none": "padding", "causal": "causal+padding"}.get(kind, "custom")
    return kind


# -- sites -----------------------------------------------------------------------------------------
def describe_site(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    example_inputs: Sequence | None = None,
    *,
    args: dict | None = None,
) -> AttentionSite:
    """The site an attention node is. `args` are its arguments by SDPA's names (default: the node's, as
    an SDPA call); an optpipe attention op with SDPA's arguments passes its own, and may, unlike SDPA,
    take a mask together with `is_causal`."""
    args = sdpa_arguments(node) if args is None else args
    q, k = value(args["query"]), value(args["key"])
    heads = concrete(q.shape[-3]) if q is not None and q.dim() == 4 else None
    kv_heads = concrete(k.shape[-3]) if k is not None and k.dim() == 4 else None
    repeated = repeat_kv_source(args["key"])
    if repeated is not None and kv_heads is not None:
        kv_heads //= repeated[1]
    head_dim = concrete(q.shape[-1]) if q is not None else None
    scale = args["scale"]
    if scale is None and head_dim:
        scale = 1.0 / math.sqrt(head_dim)
    mask = args["attn_mask"]
    kind = classify_mask(gm, mask, example_inputs) if mask is not None else "none"
    if args["is_causal"]:
        kind = "causal" if kind in ("none", "causal") else "causal+" + kind
    return AttentionSite(
        node=node.name,
        module_path=module_path(node),
        mask=kind,
        is_causal=bool(args["is_causal"]),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scale=scale,
        gqa=heads is not None and kv_heads is not None and kv_heads < heads,
    )


def find_attention_sites(gm: torch.fx.GraphModule, example_inputs: Sequence | None = None) -> list[AttentionSite]:
    """Every `aten.scaled_dot_product_attention` node of `gm`, in graph order."""
    return [
        describe_site(gm, n, example_inputs) for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA
    ]
