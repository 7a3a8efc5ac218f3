"""fuse-attention: hand-written attention -> one `aten.scaled_dot_product_attention` node.

Rewrites, in the exported ATen graph,

    softmax((q @ kᵀ) * scale  [+ mask | masked_fill(cond, -inf) | where(cond, ·, -inf)]*,  dim=-1)
        [-> cast back] [-> dropout(train=False)] @ v

into `aten.scaled_dot_product_attention(q, k, v, attn_mask=?, is_causal=?, scale=s)`, and
canonicalizes SDPA nodes already in the graph (transformers' "sdpa" implementation) the same way:

- the scale is always explicit (`mul`/`div` by a python scalar or a 0-dim constant, folded);
- a mask that is the static causal pattern on square attention becomes `is_causal=True` with no
  mask tensor (later passes see the site is causal), a static all-allowed mask disappears, and any
  other mask (padding, custom) stays as `attn_mask` (a `masked_fill` condition as its
  `logical_not`; several masks combined into one);
- K/V repeated for grouped-query attention (Llama's `repeat_kv`) are replaced by the un-repeated
  tensors with `enable_gqa=True` (option `enable-gqa`).

New nodes keep the replaced node's `val`, `nn_module_stack` and `stack_trace`; dead nodes are
removed afterwards (the causal buffers they read are left to `dce`).

Preconditions: an ATen-level graph with fake-tensor `meta["val"]` on every node (what
`optpipe.capture` produces). Not fused (lookalikes): softmax over another dim, a matmul with a
weight instead of a transposed activation, scores or probabilities used elsewhere, dropout in
training mode, dtype changes other than softmax's upcast-and-back, broadcasting batch dims.
Run it first: attention passes (`attention{...}`, `kv-cache`) look for SDPA nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import reduce

import torch
import torch.fx

from optpipe.attention_sites import (
    SDPA,
    classify_mask,
    concrete,
    is_blocking_value,
    repeat_kv_source,
    same_shape,
    same_size,
    sdpa_arguments,
)
from optpipe.graph_toolkit import get_attribute, insert_call, module_path, value
from optpipe.program import Program
from optpipe.registry import PassResult, register_pass

from .cleanup import eliminate_dead_code

aten = torch.ops.aten
_MATMULS = (aten.matmul.default, aten.bmm.default)
_SOFTMAXES = (aten.softmax.int, aten._softmax.default)
_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default)
_ASSERT_METADATA = aten._assert_tensor_metadata.default
_NOTS = (aten.logical_not.default, aten.bitwise_not.default)
# Ops through which a 0-dim constant or a weight keeps its identity.
_PASS_THROUGH = (
    aten.detach.default,
    aten.detach_.default,
    aten.lift_fresh_copy.default,
    aten.clone.default,
    aten.alias.default,
)
_VIEWS = (
    (
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.t.default,
        aten.transpose.int,
        aten.permute.default,
        aten.unsqueeze.default,
        aten.expand.default,
        aten.slice.Tensor,
    )
    + _PASS_THROUGH
    + _CASTS
)


@dataclass(frozen=True)
class FuseAttentionConfig:
    enable_gqa: bool = field(
        default=True,
        metadata={
            "help": "feed K/V repeated for grouped-query attention (repeat_kv) to SDPA un-repeated, "
            "with enable_gqa=True"
        },
    )
    causal: bool = field(
        default=True,
        metadata={"help": "turn static causal masks on square attention into is_causal=True (no mask tensor)"},
    )
    canonicalize_sdpa: bool = field(
        default=True, metadata={"help": "also canonicalize scaled_dot_product_attention nodes already in the graph"}
    )

    def __post_init__(self):
        for f in fields(self):
            if not isinstance(getattr(self, f.name), bool):
                raise ValueError(
                    f"fuse-attention: {f.name.replace('_', '-')} must be true or false, got {getattr(self, f.name)!r}"
                )


@dataclass
class _Mask:
    node: torch.fx.Node
    polarity: str
    """"additive" (float, added to the scores), "attend" (bool, True = attend) or "block"
    (bool masked_fill condition, True = blocked)."""
    factor: float = 1.0
    """Scale applied to the scores after an additive mask was added (the mask must carry it)."""


@dataclass
class _Match:
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    scale: float
    masks: list[_Mask]
    output: torch.fx.Node
    chain: list[torch.fx.Node]
    """The replaced nodes, from the output back to q @ kᵀ."""


def _users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that compute something (export's metadata checks do not count as uses)."""
    return [u for u in node.users if u.target is not _ASSERT_METADATA]


def _arg(node: torch.fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _is_noop_cast(node: torch.fx.Node) -> bool:
    src, out = value(node.args[0]) if node.args else None, value(node)
    return (
        node.target in _CASTS
        and src is not None
        and out is not None
        and src.dtype == out.dtype
        and src.device == out.device
    )


def _is_float_cast(node: torch.fx.Node) -> bool:
    """A cast between float dtypes on the same device (softmax in fp32, then back)."""
    src, out = value(node.args[0]) if node.args else None, value(node)
    return (
        node.target in _CASTS
        and src is not None
        and out is not None
        and src.device == out.device
        and src.is_floating_point()
        and out.is_floating_point()
    )


def _as_precise(dtype: torch.dtype, ref: torch.dtype) -> bool:
    """SDPA keeps probabilities at least as precise as the query: a narrowing in between would
    make the fused result differ by more than the query dtype's tolerance."""
    return dtype == ref or (dtype.is_floating_point and dtype.itemsize > ref.itemsize)


class _Matcher:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        # parameters and buffers are state (a learned temperature); lifted constants are not
        self.state_names = {n for n, _ in gm.named_parameters(remove_duplicate=False)} | {
            n for n, _ in gm.named_buffers(remove_duplicate=False)
        }

    def constant(self, arg) -> float | None:
        """The value of a python scalar or a 0-dim constant tensor (`full([], v)`, a lifted
        constant), None for anything else (including parameters and buffers, which may change)."""
        if isinstance(arg, bool):
            return None
        if isinstance(arg, (int, float)):
            return float(arg)
        if not isinstance(arg, torch.fx.Node):
            return None
        if arg.target is aten.full.default and list(arg.args[0]) == []:
            return self.constant(arg.args[1])
        if arg.target is aten.scalar_tensor.default:
            return self.constant(arg.args[0])
        if arg.target in _PASS_THROUGH:
            return self.constant(arg.args[0])
        if arg.op == "get_attr" and arg.target not in self.state_names:
            t = get_attribute(self.gm, arg.target)
            if isinstance(t, torch.Tensor) and t.dim() == 0:
                return float(t.item())
        return None

    def is_weight(self, node) -> bool:
        """A tensor read from the module (parameter, buffer) through views only."""
        while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _VIEWS:
            node = node.args[0]
        return isinstance(node, torch.fx.Node) and node.op == "get_attr"

    def untransposed(self, kt: torch.fx.Node) -> torch.fx.Node | None:
        """k when `kt` is k with its last two dims swapped."""
        out = value(kt)
        if out is None or out.dim() < 2 or kt.op != "call_function":
            return None
        r = out.dim()
        swaps_last_two = (kt.target is aten.transpose.int and {kt.args[1] % r, kt.args[2] % r} == {r - 2, r - 1}) or (
            kt.target is aten.permute.default and [d % r for d in kt.args[1]] == list(range(r - 2)) + [r - 1, r - 2]
        )
        return kt.args[0] if swaps_last_two else None

    # -- the score chain: from softmax's input back to q @ kᵀ ------------------------------------
    def scores(self, node, steps: list) -> torch.fx.Node | None:
        """Walk back from `node` to the q @ kᵀ matmul, appending (node, kind, payload) steps."""
        if not isinstance(node, torch.fx.Node) or node.op != "call_function":
            return None
        t = node.target
        if t in _MATMULS:
            return node
        if t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            a, b = node.args[:2]
            pairs = [(a, b), (b, a)] if t in (aten.mul.Tensor, aten.mul.Scalar) else [(a, b)]
            for x, c in pairs:
                factor = self.constant(c)
                if isinstance(x, torch.fx.Node) and factor is not None and factor > 0:
                    steps.append((node, "scale", factor if t in (aten.mul.Tensor, aten.mul.Scalar) else 1 / factor))
                    return self.scores(x, steps)
            return None
        if t is aten.add.Tensor and node.kwargs.get("alpha", 1) == 1:
            a, b = node.args[:2]
            for x, m in ((a, b), (b, a)):
                if isinstance(x, torch.fx.Node) and isinstance(m, torch.fx.Node) and m is not x:
                    trial = steps + [(node, "mask", _Mask(m, "additive"))]
                    found = self.scores(x, trial)
                    if found is not None:
                        steps[:] = trial
                        return found
            return None
        if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            x, cond, fill = node.args[:3]
            if is_blocking_value(self.constant(fill), value(node).dtype):
                steps.append((node, "mask", _Mask(cond, "block")))
                return self.scores(x, steps)
            return None
        if t in (aten.where.ScalarOther, aten.where.self):
            cond, x, other = node.args[:3]
            if is_blocking_value(self.constant(other), value(node).dtype):
                steps.append((node, "mask", _Mask(cond, "attend")))
                return self.scores(x, steps)
            return None
        if _is_noop_cast(node):
            steps.append((node, "cast", None))
            return self.scores(node.args[0], steps)
        return None

    def match(self, pv: torch.fx.Node) -> _Match | None:
        """Match softmax(scores) @ v ending at the matmul `pv`; None for lookalikes."""
        probs, v = pv.args[:2]
        chain = [pv]
        node = probs
        # probabilities: eval dropout and casts between softmax and @ v
        while isinstance(node, torch.fx.Node) and node.target not in _SOFTMAXES:
            eval_dropout = node.target is aten.dropout.default and _arg(node, 2, "train", True) is False
            if not (eval_dropout or _is_float_cast(node)):
                return None
            chain.append(node)
            node = node.args[0]
        if not isinstance(node, torch.fx.Node):
            return None
        softmax = node
        chain.append(softmax)
        s_in = softmax.args[0]
        s_val = value(s_in)
        if s_val is None or softmax.args[1] % s_val.dim() != s_val.dim() - 1:
            return None
        steps: list = []
        qk = self.scores(s_in, steps)
        if qk is None:
            return None
        chain += [n for n, _, _ in steps] + [qk]
        q, kt = qk.args[:2]
        k = self.untransposed(kt)
        if k is None or self.is_weight(k) or self.is_weight(v):
            return None
        if not self.shapes_ok(q, k, v, qk, pv, probs, chain):
            return None
        if any(len(_users(n)) != 1 for n in chain[1:]):
            return None  # scores or probabilities are used elsewhere (returned, logged, ...)

        scale, masks = 1.0, []
        for _, kind, payload in reversed(steps):  # in the order they are applied
            if kind == "scale":
                scale *= payload
                for m in masks:
                    m.factor *= payload if m.polarity == "additive" else 1.0
            elif kind == "mask":
                masks.append(payload)
        qv = value(q)
        for m in masks:
            mv = value(m.node)
            if (
                mv is None
                or (m.polarity == "additive" and mv.dtype != qv.dtype)
                or (m.polarity != "additive" and mv.dtype != torch.bool)
            ):
                return None
        return _Match(q, k, v, scale, masks, pv, chain)

    def shapes_ok(self, q, k, v, qk, pv, probs, chain) -> bool:
        qv, kv, vv, sv, ov, pval = (value(n) for n in (q, k, v, qk, pv, probs))
        if any(x is None for x in (qv, kv, vv, sv, ov, pval)):
            return False
        r = qv.dim()
        if r < 3 or kv.dim() != r or vv.dim() != r:
            return False
        if not (qv.dtype == kv.dtype == vv.dtype == pval.dtype == sv.dtype) or not qv.is_floating_point():
            return False
        if not all(_as_precise(value(n).dtype, qv.dtype) for n in chain[1 : chain.index(qk)] if value(n) is not None):
            return False
        if not (same_size(qv.shape[-1], kv.shape[-1]) and same_size(kv.shape[-2], vv.shape[-2])):
            return False
        if not all(same_size(a, b) and same_size(a, c) for a, b, c in zip(qv.shape[:-2], kv.shape[:-2], vv.shape[:-2])):
            return False  # SDPA does not broadcast batch dims as matmul does
        if not (same_size(sv.shape[-2], qv.shape[-2]) and same_size(sv.shape[-1], kv.shape[-2])):
            return False
        # every score / probability node keeps the score shape (a mask may not broadcast it wider)
        return all(value(n) is not None and same_shape(value(n), sv) for n in chain[1:]) and same_size(
            ov.shape[-1], vv.shape[-1]
        )


# -- rewriting --------------------------------------------------------------------------------------
def _sdpa_kwargs(attn_mask, dropout_p, is_causal, scale, enable_gqa) -> dict:
    """SDPA arguments in canonical form: defaults left out, the scale always explicit."""
    kwargs = {}
    if attn_mask is not None:
        kwargs["attn_mask"] = attn_mask
    if dropout_p:
        kwargs["dropout_p"] = dropout_p
    if is_causal:
        kwargs["is_causal"] = True
    kwargs["scale"] = scale
    if enable_gqa:
        kwargs["enable_gqa"] = True
    return kwargs


class _Rewriter:
    def __init__(self, program: Program, config: FuseAttentionConfig):
        self.gm, self.config = program.gm, config
        self.example_inputs = program.example_inputs
        self._kinds: dict = {}

    def mask_kind(self, node: torch.fx.Node, polarity: str) -> str:
        key = (node, polarity)
        if key not in self._kinds:  # HF models share one mask across all layers
            self._kinds[key] = classify_mask(self.gm, node, self.example_inputs, blocked_when_true=polarity == "block")
        return self._kinds[key]

    def unrepeated(self, k, v):
        """(k, v, enable_gqa): K/V before repeat_kv when both are repeated alike."""
        if self.config.enable_gqa and value(k) is not None and value(k).dim() == 4:
            rk, rv = repeat_kv_source(k), repeat_kv_source(v)
            if rk and rv and rk[1] == rv[1]:
                return rk[0], rv[0], True
        return k, v, False

    def mask_operand(self, masks: list[_Mask], q, k, like) -> tuple[torch.fx.Node | None, bool]:
        """(attn_mask, is_causal) equivalent to `masks` applied to q @ kᵀ."""
        graph = self.gm.graph
        kinds = [self.mask_kind(m.node, m.polarity) for m in masks]
        masks = [m for m, kind in zip(masks, kinds) if kind != "none"]
        kinds = [kind for kind in kinds if kind != "none"]
        if not masks:
            return None, False
        square = same_size(value(q).shape[-2], value(k).shape[-2])
        if self.config.causal and square and all(kind == "causal" for kind in kinds):
            return None, True
        bools, floats = [], []
        for m in masks:
            if m.polarity == "block" and m.node.target in _NOTS:
                bools.append(m.node.args[0])  # masked_fill(~allowed, -inf): attend where allowed
            elif m.polarity == "block":
                bools.append(insert_call(graph, aten.logical_not.default, (m.node,), like=like))
            elif m.polarity == "attend":
                bools.append(m.node)
            elif m.factor != 1.0:
                floats.append(insert_call(graph, aten.mul.Tensor, (m.node, m.factor), like=like))
            else:
                floats.append(m.node)
        if not floats:
            return reduce(lambda a, b: insert_call(graph, aten.logical_and.default, (a, b), like=like), bools), False
        acc = reduce(lambda a, b: insert_call(graph, aten.add.Tensor, (a, b), like=like), floats)
        for b in bools:
            acc = insert_call(graph, aten.where.ScalarOther, (b, acc, float("-inf")), like=like)
        return acc, False

    def fuse(self, match: _Match) -> dict:
        graph, out = self.gm.graph, match.output
        with graph.inserting_before(out):
            attn_mask, is_causal = self.mask_operand(match.masks, match.q, match.k, out)
            k, v, gqa = self.unrepeated(match.k, match.v)
            kwargs = _sdpa_kwargs(attn_mask, 0.0, is_causal, match.scale, gqa)
            sdpa = insert_call(
                graph,
                SDPA,
                (match.q, k, v),
                kwargs,
                like=out,
                val=out.meta.get("val"),
                name="scaled_dot_product_attention",
            )
        out.replace_all_uses_with(sdpa)
        for node in match.chain:  # output first: each node's only user is already gone
            for check in [u for u in node.users if u.target is _ASSERT_METADATA]:
                graph.erase_node(check)
            graph.erase_node(node)
        return {
            "node": sdpa.name,
            "module_path": module_path(sdpa),
            "action": "fused",
            "is_causal": is_causal,
            "attn_mask": attn_mask is not None,
            "gqa": gqa,
        }

    def canonicalize(self, node: torch.fx.Node) -> dict | None:
        args = sdpa_arguments(node)
        q, k, v, mask = args["query"], args["key"], args["value"], args["attn_mask"]
        is_causal, scale, gqa = args["is_causal"], args["scale"], args["enable_gqa"]
        qv = value(q)
        if qv is None or value(k) is None:
            return None
        if mask is not None and not is_causal:
            kind = self.mask_kind(mask, "attend")
            if kind == "none":
                mask = None
            elif kind == "causal" and self.config.causal and same_size(qv.shape[-2], value(k).shape[-2]):
                mask, is_causal = None, True
        if not gqa:
            k, v, gqa = self.unrepeated(k, v)
        if scale is None and concrete(qv.shape[-1]):
            scale = 1.0 / math.sqrt(qv.shape[-1])
        new = {
            **args,
            "key": k,
            "value": v,
            "attn_mask": mask,
            "is_causal": is_causal,
            "scale": scale,
            "enable_gqa": gqa,
        }
        if all(new[name] is args[name] or new[name] == args[name] for name in args):
            return None  # already canonical, whichever way its arguments are spelled
        node.args = (q, k, v)
        node.kwargs = _sdpa_kwargs(mask, args["dropout_p"], is_causal, scale, gqa)
        return {
            "node": node.name,
            "module_path": module_path(node),
            "action": "canonicalized",
            "is_causal": bool(is_causal),
            "attn_mask": mask is not None,
            "gqa": bool(gqa),
        }


@register_pass("fuse-attention", FuseAttentionConfig, exact=True)
def fuse_attention(program: Program, config: FuseAttentionConfig) -> PassResult:
    """Canonicalize attention into one scaled_dot_product_attention node per site."""
    gm = program.gm
    rewriter, matcher = _Rewriter(program, config), _Matcher(gm)
    existing = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    sites = []
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _MATMULS and not node._erased:
            match = matcher.match(node)
            if match is not None:
                sites.append(rewriter.fuse(match))
    fused = len(sites)
    if config.canonicalize_sdpa:
        sites += [d for d in map(rewriter.canonicalize, existing) if d is not None]
    canonicalized = len(sites) - fused
    if sites:
        eliminate_dead_code(gm)
        gm.graph.lint()
        gm.recompile()
    total = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA)
    return PassResult(bool(sites), {"fused": fused, "canonicalized": canonicalized, "sites": total}, {"sites": sites})
