"""fuse-attention: hand-written attention -> one `aten.scaled_dot_product_attention` node.

Rewrites, in the exported ATen graph,

    softmax((q·a @ (kᵀ·b)) * scale  [+ bias | masked_fill(cond, min) | where(cond, ·, min)]*,  dim=-1)
        [-> cast back] [-> dropout(train=False)] @ v

into `aten.scaled_dot_product_attention(q, k, v, attn_mask=?, is_causal=?, scale=s)`, and
canonicalizes SDPA nodes already in the graph (transformers' "sdpa" implementation) the same way:

- the scale is always explicit: `mul`/`div` by a python scalar or a 0-dim constant (arithmetic on
  constants, such as DeBERTa's `sqrt(d·3)`, folded), on the scores, on q or on k, in place or not;
- `baddbmm(bias, q, kᵀ, beta, alpha)` (Bloom's ALiBi) is the matmul, the scale `alpha` and the
  additive bias `beta·bias`; `scores += bias` (`add_`, T5) is an addition;
- additive biases (ALiBi, relative positions, DeBERTa's disentangled terms) become the SDPA
  `attn_mask`, combined with the other masks into one (a `masked_fill` condition as its
  `logical_not`, its fill value kept where floats are combined, so a query row blocked everywhere
  stays uniform as in eager); a mask that is the static causal pattern on square attention becomes
  `is_causal=True` with no mask tensor, a static all-allowed mask disappears;
- matmuls on (B·H, L, ·) with softmax on (B, H, L, S) (Bloom, DeBERTa: views between scores,
  softmax and `bmm`) become one 4-d site on the (B, H, L, D) tensors q/k/v were reshaped from
  (an `unflatten` where there is none), so later passes see heads;
- K/V repeated for grouped-query attention (Llama's `repeat_kv`), or one K/V head that matmul
  broadcasts over the query heads (Falcon's multi-query), are fed un-repeated with
  `enable_gqa=True` (option `enable-gqa`; off, a broadcast K/V head is expanded);
- soft-capped scores, `cap·tanh(s / cap)` before the masks (Gemma-2), are not SDPA: the site
  becomes ONE `optpipe.score_mod_attention(q, k, v, attn_mask, "softcap", cap, scale, is_causal,
  enable_gqa)` node (its CPU kernel, FlexAttention `score_mod` on CUDA, a decomposition for the
  other targets: see `attention_ops`).

New nodes keep the replaced node's `val`, `nn_module_stack` and `stack_trace`; dead nodes are
removed afterwards (the causal buffers they read are left to `dce`).

Every softmax whose output reaches a matmul as its left operand looks like attention: one that is
not fused gets `{"site": module path, "reason": ..., "node": softmax}` in `details["skipped"]`
(the reason names what was not understood, e.g. the op between the scores and softmax), and
`details["notes"]` says when sites were left unfused or none was found at all.

Preconditions: an ATen-level graph with fake-tensor `meta["val"]` on every node (what
`optpipe.capture` produces). Not fused (lookalikes): softmax over another dim, a matmul with a
weight instead of a transposed activation, scores or probabilities used elsewhere, dropout in
training mode, dtype changes other than softmax's upcast-and-back, broadcasting batch dims, a mask
added before soft-capping. Run it first: attention passes (`attention{...}`, `kv-cache`) look for
SDPA nodes.
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
from optpipe.graph_toolkit import fake_value, get_attribute, insert_call, module_path, value
from optpipe.program import Program
from optpipe.registry import PassResult, register_pass

from .attention_ops import score_mod_attention
from .cleanup import eliminate_dead_code

aten = torch.ops.aten
_MATMULS = (aten.matmul.default, aten.bmm.default)
_SOFTMAXES = (aten.softmax.int, aten._softmax.default)
_CASTS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default)
_ASSERT_METADATA = aten._assert_tensor_metadata.default
_NOTS = (aten.logical_not.default, aten.bitwise_not.default)
_MULS = (aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar)
_SCALES = _MULS + (aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar)
# In-place forms (`scores /= c`, `scores += bias`) update their first argument: it must be the scores.
_IN_PLACE = (aten.mul_.Tensor, aten.mul_.Scalar, aten.div_.Tensor, aten.div_.Scalar, aten.add_.Tensor)
_ADDS = (aten.add.Tensor, aten.add_.Tensor)
_MASKED_FILLS = (aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar, aten.masked_fill_.Tensor)
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
# Ops whose output holds the same values in the same logical order as their input.
_SAME_VALUES = _RESHAPES + (aten.clone.default, aten.contiguous.default, aten.alias.default)
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
    fill: float = float("-inf")
    """What a bool mask writes into blocked scores."""
    split: int | None = None
    """Heads to split the mask's (B·H, L, S) batch into: added before the scores became (B, H, L, S)."""


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
    heads: int | None = None
    """The matmuls run on (B·H, L, ·) and softmax on (B, H, L, S): heads to split q, k, v into."""
    softcap: float | None = None
    """The scores are soft-capped, `cap·tanh(s / cap)`, before the masks."""
    shared_kv: bool = False
    """K and V have one head that matmul broadcasts over the query heads (multi-query attention)."""


def _users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that read `node`'s values (export's metadata checks and `x.type_as(node)`, which reads
    only its dtype, do not count)."""
    return [
        u
        for u in node.users
        if u.target is not _ASSERT_METADATA and not (u.target is aten.type_as.default and u.args[0] is not node)
    ]


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


class _Unmatched(Exception):
    """Why a softmax-attention-looking subgraph is not fused: the `reason` of its `skipped` entry."""


def _describe(node) -> str:
    if not isinstance(node, torch.fx.Node):
        return f"a constant ({node!r})"
    if node.op == "call_function":
        return f"`{node.target}`"
    return f"a {node.op} ({node.target})"


def _is_batch_view(node: torch.fx.Node) -> bool:
    """A reshape between (B·H, L, S) and (B, H, L, S) (or an identity one): last two dims kept,
    leading dims merged or split."""
    src, out = value(node.args[0]) if node.args else None, value(node)
    if node.target not in _RESHAPES or src is None or out is None or not {src.dim(), out.dim()} <= {3, 4}:
        return False
    if not all(same_size(a, b) for a, b in zip(src.shape[-2:], out.shape[-2:])):
        return False
    return same_size(math.prod(src.shape[:-2]), math.prod(out.shape[:-2]))


class _Matcher:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        # parameters and buffers are state (a learned temperature); lifted constants are not
        self.state_names = {n for n, _ in gm.named_parameters(remove_duplicate=False)} | {
            n for n, _ in gm.named_buffers(remove_duplicate=False)
        }
        self._folded: dict = {}

    def constant(self, arg) -> float | None:
        """The value of a python scalar or a 0-dim constant tensor (`full([], v)`, a lifted
        constant, arithmetic on those such as DeBERTa's `sqrt(d·3)`), None for anything else
        (including parameters and buffers, which may change)."""
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
        if arg.op == "call_function":
            return self.folded(arg)
        return None

    def folded(self, node: torch.fx.Node) -> float | None:
        """A 0-dim tensor computed from constants alone (no input, parameter or buffer), evaluated once."""
        if node not in self._folded:
            self._folded[node] = None
            v = value(node)
            needed = self.constant_subgraph(node) if isinstance(v, torch.Tensor) and v.dim() == 0 else None
            if needed:
                graph, env = torch.fx.Graph(), {}
                for n in self.gm.graph.nodes:
                    if n in needed:
                        env[n] = graph.node_copy(n, lambda x: env[x])
                graph.output(env[node])
                with torch.no_grad():
                    self._folded[node] = float(torch.fx.GraphModule(self.gm, graph)())
        return self._folded[node]

    def constant_subgraph(self, node: torch.fx.Node, limit: int = 32) -> set[torch.fx.Node] | None:
        """The few aten nodes and constants `node` is computed from, None when it reads anything else
        (an input, a parameter, a buffer) or more than `limit` nodes."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            if len(seen) >= limit or not self.foldable(n):
                return None
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return seen

    def foldable(self, n: torch.fx.Node) -> bool:
        if n.op == "get_attr":
            return n.target not in self.state_names
        return n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "aten"

    def is_weight(self, node) -> bool:
        """A tensor read from the module (parameter, buffer) through views only."""
        while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _VIEWS:
            node = node.args[0]
        return isinstance(node, torch.fx.Node) and node.op == "get_attr"

    def scaled(self, node) -> tuple[torch.fx.Node, float] | None:
        """(x, c) when `node` is x·c or x/c by a positive constant."""
        if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _SCALES):
            return None
        a, b = node.args[:2]
        mul = node.target in _MULS
        for x, c in [(a, b), (b, a)] if mul and node.target not in _IN_PLACE else [(a, b)]:
            factor = self.constant(c)
            if isinstance(x, torch.fx.Node) and factor is not None and factor > 0:
                return x, factor if mul else 1 / factor
        return None

    def peel(self, node) -> tuple[torch.fx.Node, float]:
        """`node` without its constant scalings (q·c, kᵀ/c: DeBERTa scales K), and their product."""
        factor = 1.0
        while (found := self.scaled(node)) is not None:
            node, factor = found[0], factor * found[1]
        return node, factor

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

    def softcap(self, node) -> tuple[float, list[torch.fx.Node], torch.fx.Node] | None:
        """(cap, [mul, tanh, div], x) when `node` is cap·tanh(x / cap) (Gemma-2's soft-capping)."""
        outer = self.scaled(node)
        if outer is None or outer[0].op != "call_function" or outer[0].target is not aten.tanh.default:
            return None
        tanh, cap = outer
        inner = self.scaled(tanh.args[0])
        if inner is None or not math.isclose(inner[1] * cap, 1.0, rel_tol=1e-6):
            return None
        return cap, [node, tanh, tanh.args[0]], inner[0]

    # -- the score chain: from softmax's input back to q @ kᵀ ------------------------------------
    def scores(self, node, steps: list) -> torch.fx.Node:
        """Walk back from `node` to the q @ kᵀ matmul, appending (node, kind, payload) steps."""
        if not isinstance(node, torch.fx.Node) or node.op != "call_function":
            raise _Unmatched(f"the scores come from {_describe(node)}, not from q @ kᵀ")
        t = node.target
        if t in _MATMULS:
            return node
        if t is aten.baddbmm.default:  # beta·bias + alpha·(q @ kᵀ) (Bloom's ALiBi)
            beta, alpha = self.constant(_arg(node, 3, "beta", 1)), self.constant(_arg(node, 4, "alpha", 1))
            if beta is None or alpha is None or alpha <= 0:
                raise _Unmatched("`aten.baddbmm` with a non-constant or non-positive alpha/beta")
            if beta:
                steps.append((node, "mask", _Mask(node.args[0], "additive", beta)))
            steps.append((node, "scale", alpha))
            return node
        if t in _SCALES:
            capped = self.softcap(node)
            if capped is not None:
                cap, nodes, x = capped
                steps += [(nodes[0], "softcap", cap), (nodes[1], "softcap", None), (nodes[2], "softcap", None)]
                return self.scores(x, steps)
            found = self.scaled(node)
            if found is None:
                raise _Unmatched(f"{_describe(node)} by a non-constant between the scores and softmax")
            steps.append((node, "scale", found[1]))
            return self.scores(found[0], steps)
        if t in _ADDS and node.kwargs.get("alpha", 1) == 1:
            return self.additive(node, steps)
        if t in _MASKED_FILLS + (aten.where.ScalarOther, aten.where.self):
            fill_first = t in _MASKED_FILLS
            a, b, fill = node.args[:3]
            x, cond = (a, b) if fill_first else (b, a)  # masked_fill(x, cond, fill), where(cond, x, fill)
            if not is_blocking_value(self.constant(fill), value(node).dtype):
                raise _Unmatched(f"{_describe(node)} with a fill value that does not block attention")
            steps.append((node, "mask", _Mask(cond, "block" if fill_first else "attend", fill=self.constant(fill))))
            return self.scores(x, steps)
        if _is_noop_cast(node) or (t in _RESHAPES and _is_batch_view(node)):
            steps.append((node, "cast" if t in _CASTS else "view", None))
            return self.scores(node.args[0], steps)
        raise _Unmatched(f"{_describe(node)} between the scores and softmax is not understood")

    def additive(self, node: torch.fx.Node, steps: list) -> torch.fx.Node:
        """scores + bias (either order; `scores += bias` exports as `add_` on the scores)."""
        a, b = node.args[:2]
        first = None
        for x, m in [(a, b)] if node.target in _IN_PLACE else [(a, b), (b, a)]:
            if not (isinstance(x, torch.fx.Node) and isinstance(m, torch.fx.Node) and m is not x):
                continue
            trial = steps + [(node, "mask", _Mask(m, "additive"))]
            try:
                found = self.scores(x, trial)
            except _Unmatched as e:
                first = first or e
                continue
            steps[:] = trial
            return found
        raise first or _Unmatched(f"{_describe(node)} of the scores and a non-tensor")

    def probabilities(self, pv: torch.fx.Node) -> list[torch.fx.Node]:
        """[pv, ..., softmax]: eval dropout, casts and batch views between softmax and `@ v`."""
        chain, node = [pv], pv.args[0]
        while isinstance(node, torch.fx.Node) and node.target not in _SOFTMAXES:
            eval_dropout = node.target is aten.dropout.default and _arg(node, 2, "train", True) is False
            if node.target is aten.dropout.default and not eval_dropout:
                raise _Unmatched("dropout in training mode on the probabilities")
            if not (eval_dropout or _is_float_cast(node) or (node.op == "call_function" and _is_batch_view(node))):
                raise _Unmatched(f"{_describe(node)} between softmax and the matmul with V is not understood")
            chain.append(node)
            node = node.args[0]
        if not isinstance(node, torch.fx.Node):
            raise _Unmatched("no softmax before the matmul with V")
        return chain + [node]

    def match(self, pv: torch.fx.Node) -> _Match:
        """Match softmax(scores) @ v ending at the matmul `pv`; raises _Unmatched for lookalikes."""
        chain = self.probabilities(pv)
        softmax = chain[-1]
        s_in, s_val = softmax.args[0], value(softmax.args[0])
        if s_val is None or softmax.args[1] % s_val.dim() != s_val.dim() - 1:
            raise _Unmatched(f"softmax over dim {softmax.args[1]}, not over the keys (the last dim)")
        steps: list = []
        qk = self.scores(s_in, steps)
        chain += list(dict.fromkeys(n for n, _, _ in steps if n is not qk)) + [qk]
        operands = qk.args[1:3] if qk.target is aten.baddbmm.default else qk.args[:2]
        q, q_factor = self.peel(operands[0])
        kt, k_factor = self.peel(operands[1])
        k, k_factor2 = self.peel(self.untransposed(kt))
        v = pv.args[1]
        if k is None or self.untransposed(kt) is None:
            raise _Unmatched("the keys of q @ k are not transposed activations")
        if self.is_weight(k) or self.is_weight(v):
            raise _Unmatched("the keys or values are a weight (a gate or a classifier, not attention)")
        heads = self.frame(qk, s_val, chain)
        shared_kv = self.check_shapes(q, k, v, qk, pv, chain)
        if any(len(_users(n)) != 1 for n in chain[1:]):
            raise _Unmatched("the scores or probabilities are used elsewhere (returned or logged)")
        scale, masks, softcap = _combine(steps)
        masks = self.checked_masks(masks, steps, value(q), value(qk), heads)
        scale *= q_factor * k_factor * k_factor2
        return _Match(q, k, v, scale, masks, pv, chain, heads, softcap, shared_kv)

    def frame(self, qk, s_val, chain) -> int | None:
        """Heads to split the matmuls' (B·H, L, ·) batch into when softmax runs on (B, H, L, S)
        (Bloom, DeBERTa); None when matmuls and softmax share their rank."""
        mm = value(qk)
        if mm is None:
            raise _Unmatched("the scores have no shape information")
        if not all(
            value(n) is not None and (same_shape(value(n), mm) or same_shape(value(n), s_val)) for n in chain[1:]
        ):
            raise _Unmatched("a mask broadcasts the scores or probabilities to a wider shape")
        if mm.dim() == s_val.dim():
            return None
        heads = concrete(s_val.shape[1]) if (mm.dim(), s_val.dim()) == (3, 4) else None
        if heads is None or not same_size(s_val.shape[0] * heads, mm.shape[0]):
            raise _Unmatched(f"scores reshaped from {tuple(mm.shape)} to {tuple(s_val.shape)} around softmax")
        return heads

    def check_shapes(self, q, k, v, qk, pv, chain) -> bool:
        """Raises when SDPA cannot compute this matmul pair; True when K/V have one head for all."""
        qv, kv, vv, sv, ov, pval = (value(n) for n in (q, k, v, qk, pv, pv.args[0]))
        if any(x is None for x in (qv, kv, vv, sv, ov, pval)):
            raise _Unmatched("q, k or v has no shape information")
        r = qv.dim()
        if r < 3 or kv.dim() != r or vv.dim() != r:
            raise _Unmatched(f"q, k, v of ranks {qv.dim()}, {kv.dim()}, {vv.dim()} (SDPA needs equal ranks >= 3)")
        if not (qv.dtype == kv.dtype == vv.dtype == pval.dtype == sv.dtype) or not qv.is_floating_point():
            raise _Unmatched("q, k, v, scores and probabilities differ in dtype")
        if not all(_as_precise(value(n).dtype, qv.dtype) for n in chain[1 : chain.index(qk)]):
            raise _Unmatched("the scores or probabilities are narrowed below the query's precision")
        if not (same_size(qv.shape[-1], kv.shape[-1]) and same_size(kv.shape[-2], vv.shape[-2])):
            raise _Unmatched("q·k or k/v sizes do not agree")
        batch = list(zip(qv.shape[:-2], kv.shape[:-2], vv.shape[:-2]))
        # one K/V head shared by every query head (multi-query attention): SDPA's grouped-query form
        shared_kv = r == 4 and kv.shape[1] == vv.shape[1] == 1 and isinstance(qv.shape[1], int) and qv.shape[1] > 1
        if not all(
            same_size(a, b) and same_size(a, c) for i, (a, b, c) in enumerate(batch) if not (shared_kv and i == 1)
        ):
            raise _Unmatched("matmul broadcasts the batch dims of k or v (SDPA does not)")
        if not (same_size(sv.shape[-2], qv.shape[-2]) and same_size(sv.shape[-1], kv.shape[-2])):
            raise _Unmatched("the scores are not (queries, keys)")
        if not same_size(ov.shape[-1], vv.shape[-1]):
            raise _Unmatched("the output is not (queries, value dim)")
        return shared_kv

    def checked_masks(self, masks, steps, qv, mm, heads) -> list[_Mask]:
        """The masks, those added before the scores were reshaped to (B, H, L, S) marked to be split too."""
        before_view, seen_view = set(), False
        for _, kind, payload in steps:  # walking order: from softmax back to q @ kᵀ
            seen_view |= kind == "view"
            if kind == "mask" and seen_view:
                before_view.add(id(payload))
        for m in masks:
            mv = value(m.node)
            if mv is None:
                raise _Unmatched("a mask has no shape information")
            if m.polarity == "additive" and mv.dtype != qv.dtype:
                raise _Unmatched(f"an additive mask of dtype {mv.dtype} on {qv.dtype} scores")
            if m.polarity != "additive" and mv.dtype != torch.bool:
                raise _Unmatched(f"a masked_fill/where condition of dtype {mv.dtype}")
            m.split = heads if heads and id(m) in before_view and mv.dim() == 3 else None
            if m.split and not (mv.shape[0] == 1 or same_size(mv.shape[0], mm.shape[0])):
                raise _Unmatched(f"a bias of shape {tuple(mv.shape)} on (B·H, L, S) scores")
        return masks


def _combine(steps: list) -> tuple[float, list[_Mask], float | None]:
    """(scale, masks, softcap) from the steps in the order they are applied."""
    scale, masks, cap = 1.0, [], None
    for _, kind, payload in reversed(steps):
        if kind == "scale":
            if cap is not None:
                raise _Unmatched("the scores are scaled after soft-capping")
            scale *= payload
            for m in masks:
                m.factor *= payload if m.polarity == "additive" else 1.0
        elif kind == "softcap" and payload is not None:
            if cap is not None or masks:
                raise _Unmatched("a mask or a second cap applied before soft-capping (tanh would bound it)")
            cap = payload
        elif kind == "mask":
            masks.append(payload)
    return scale, masks, cap


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
        for b, m in zip(bools, [m for m in masks if m.polarity != "additive"]):
            # the model's own fill (dtype-min): a query row blocked everywhere stays uniform, not NaN
            acc = insert_call(graph, aten.where.ScalarOther, (b, acc, m.fill), like=like)
        return acc, False

    def split_heads(self, node: torch.fx.Node, heads: int, like) -> torch.fx.Node:
        """A (B·H, L, ·) tensor as (B, H, L, ·): the 4-d tensor it was reshaped from where there is
        one (Bloom's and DeBERTa's q/k/v), else an `unflatten` (a (1, L, S) bias: an `unsqueeze`)."""
        v, src = value(node), node
        while isinstance(src, torch.fx.Node) and src.op == "call_function" and src.target in _SAME_VALUES:
            src = src.args[0]
            sv = value(src)
            if sv is not None and sv.dim() == 4 and sv.shape[1] == heads and same_shape(sv.flatten(0, 1), v):
                return src
        if v.shape[0] == 1:
            return insert_call(self.gm.graph, aten.unsqueeze.default, (node, 0), like=like)
        return insert_call(self.gm.graph, aten.unflatten.int, (node, 0, [-1, heads]), like=like)

    def attention_call(self, match: _Match, q, k, v, attn_mask, is_causal, gqa, like) -> torch.fx.Node:
        """SDPA, or optpipe's score_mod_attention when the scores are soft-capped (not SDPA)."""
        graph, val = self.gm.graph, None if match.heads else like.meta.get("val")
        if match.softcap is None:
            kwargs = _sdpa_kwargs(attn_mask, 0.0, is_causal, match.scale, gqa)
            val = fake_value(SDPA, (q, k, v), kwargs) if val is None else val
            return insert_call(graph, SDPA, (q, k, v), kwargs, like=like, val=val, name="scaled_dot_product_attention")
        args = (q, k, v, attn_mask, "softcap", match.softcap, match.scale, is_causal, gqa)
        val = fake_value(score_mod_attention, args) if val is None else val
        return insert_call(graph, score_mod_attention, args, like=like, val=val, name="score_mod_attention")

    def fuse(self, match: _Match) -> dict:
        graph, out = self.gm.graph, match.output
        with graph.inserting_before(out):
            q, k, v = match.q, match.k, match.v
            if match.heads:
                q, k, v = (self.split_heads(x, match.heads, out) for x in (q, k, v))
            for m in match.masks:
                m.node = self.split_heads(m.node, m.split, out) if m.split else m.node
            attn_mask, is_causal = self.mask_operand(match.masks, q, k, out)
            k, v, gqa = self.unrepeated(k, v) if not match.shared_kv else (k, v, self.config.enable_gqa)
            if match.shared_kv and not gqa:
                k, v = (
                    insert_call(self.gm.graph, aten.expand.default, (x, [-1, value(q).shape[1], -1, -1]), like=out)
                    for x in (k, v)
                )
            fused = self.attention_call(match, q, k, v, attn_mask, is_causal, gqa, out)
            result = fused
            if match.heads:  # back to the (B·H, L, Dv) of the matmul; reshapes to 4-d read `fused`
                result = insert_call(graph, aten.flatten.using_ints, (fused, 0, 1), like=out, val=out.meta.get("val"))
        out.replace_all_uses_with(result)
        for user in list(result.users) if result is not fused else []:
            if user.op == "call_function" and user.target in _RESHAPES and same_shape(value(user), value(fused)):
                user.replace_all_uses_with(fused)
        for node in match.chain:  # output first: each node's only user is already gone
            for check in [u for u in node.users if u.target is _ASSERT_METADATA]:
                graph.erase_node(check)
            graph.erase_node(node)
        return {
            "node": fused.name,
            "module_path": module_path(fused),
            "action": "fused",
            "is_causal": is_causal,
            "attn_mask": attn_mask is not None,
            "gqa": gqa,
            **({"score_mod": f"softcap={match.softcap:g}"} if match.softcap is not None else {}),
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


def _consumer_matmul(softmax: torch.fx.Node, depth: int = 4) -> torch.fx.Node | None:
    """The matmul that takes softmax's output (through up to `depth` ops) as its left operand: the
    `@ v` of attention. None for softmax used otherwise (routers, classifier heads)."""
    frontier = [softmax]
    for _ in range(depth):
        nxt = []
        for node in frontier:
            for user in _users(node):
                if user.op == "call_function" and user.target in _MATMULS and user.args[0] is node:
                    return user
                if user.op == "call_function" and user.target not in _MATMULS:
                    nxt.append(user)
        frontier = nxt
    return None


@register_pass("fuse-attention", FuseAttentionConfig, exact=True, gives=("sdpa-sites",))
def fuse_attention(program: Program, config: FuseAttentionConfig) -> PassResult:
    """Canonicalize attention into one scaled_dot_product_attention node per site (one
    optpipe.score_mod_attention node where the scores are soft-capped)."""
    gm = program.gm
    rewriter, matcher = _Rewriter(program, config), _Matcher(gm)
    existing = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    sites, skipped = [], []
    for softmax in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SOFTMAXES]:
        pv = _consumer_matmul(softmax) if not softmax._erased else None
        if pv is None:
            continue
        try:
            match = matcher.match(pv)
        except _Unmatched as e:
            skipped.append({"site": module_path(softmax), "reason": str(e), "node": softmax.name})
            continue
        sites.append(rewriter.fuse(match))
    fused = len(sites)
    if config.canonicalize_sdpa:
        sites += [d for d in map(rewriter.canonicalize, existing) if d is not None]
    canonicalized = len(sites) - fused
    if sites:
        eliminate_dead_code(gm)
        gm.graph.lint()
        gm.recompile()
    total = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in (SDPA, score_mod_attention))
    return PassResult(
        bool(sites),
        {"fused": fused, "canonicalized": canonicalized, "sites": total},
        {"sites": sites, "skipped": skipped, "notes": _notes(total, skipped)},
    )


def _notes(total: int, skipped: list[dict]) -> list[str]:
    notes = []
    if skipped:
        notes.append(
            f"{len(skipped)} softmax-attention subgraph(s) left unfused (see skipped): later attention passes "
            "will not see them"
        )
    if not total and not skipped:
        notes.append("no attention site found: no softmax feeds a matmul with values, and no SDPA node")
    return notes
