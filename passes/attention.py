"""attention: dense `aten.scaled_dot_product_attention` -> sparse or linear attention (lossy).

Rewrites every selected SDPA node into ONE `torch.ops.optpipe.*` node (see `attention_ops` for the
ops, their kernels, autograd and decompositions):

    kind=sliding-window  -> optpipe.sparse_attention(pattern="sliding-window", window=W)
    kind=block-sparse    -> optpipe.sparse_attention(pattern="block-sparse", block=B, global_tokens=G)
    kind=random          -> optpipe.sparse_attention(pattern="random", ..., random_blocks=R, seed=S)
    kind=strided         -> optpipe.sparse_attention(pattern="strided", stride=S)
    kind=linear          -> optpipe.linear_attention(feature_map=elu|relu, chunk=C)
    kind=performer       -> optpipe.performer_attention(projection=<new buffer>, chunk=C)
    kind=linformer       -> optpipe.linformer_attention(proj_key, proj_value=<new parameters>)
    kind=dense           -> nothing (keep dense attention; with `layers`, choose where)

`layers` selects sites by their order in the graph (0 = the first SDPA node), e.g. `layers=1:-1`
keeps the first and last layers dense.

Masks: a causal site (`is_causal=True`, or a mask that evaluates to the causal pattern) becomes a
causal pattern; an encoder's padding mask (a mask that depends on an input and only on the key
position, shared by all heads, checked on the example inputs) becomes the op's `key_padding_mask`,
honoured by every kind; causal+padding likewise. A model's own causal sliding window (Mistral's
`sliding_window`: the same width at the example length and at twice it) is kept by
kind=sliding-window, at the narrower of the two windows, and refused by every other kind.
A mask that adds a score bias (ALiBi: BLOOM, MPT; T5's relative positions; DeBERTa-v2's
disentangled terms) is kept by the exact sparse kinds (sliding-window, block-sparse, random,
strided): the whole mask becomes the op's `bias` input (added to the scores of the keys the pattern
keeps), so whatever it blocks stays blocked (DeBERTa's padded queries too); the site is causal when
the mask blocks every later key, and gets a key padding mask when it blocks exactly key padding. The
linear kinds refuse it, naming the bias. Cross-attention (query and key lengths that differ) with no
mask or a padding mask is swapped by the bidirectional kernel forms (linear, performer, linformer);
the positional patterns refuse it. Any other mask (per-head masks, per-query patterns), dropout
inside attention and non-4-d inputs are REFUSED, as are causal sites for linformer (its projections
mix the whole sequence, so every token would see the future): the site stays dense and the result
says which mask and why, per site.

Score-modifying sites (`optpipe.score_mod_attention` from fuse-attention: Gemma-2's tanh
soft-capping) are sites too, in graph order with the SDPA nodes, their masks read as SDPA's: the
exact sparse kinds keep the modifier as the op's `score_mod`/`mod_value` (applied to the scaled
scores before the bias and the pattern, as the site applies it before its mask). The kernel kinds
(linear, performer, linformer) refuse them, naming the modifier: they never form the scores
(φ(q)·φ(k) stands for exp(q·k)), and no feature map turns cap·tanh(s/cap) into one — applying the
cap to the kernel values would need the L×S matrix those kinds exist to avoid.

New weights: linformer adds two trainable `(k, max_len)` projections per site (initialised to mean
pooling over k segments, so at init it attends to segment averages; projected keys that see no
token are ignored), performer a `(features, head_dim)` buffer of orthogonal random features drawn
from `seed`; `redraw_projections(gm, step)` redraws them every `redraw` steps of a training loop.
Linformer's max_len: `max-len`, else the site's key length when it is static (a fixed-size input such
as ViT's patches), else the model config's maximum positions; k is at most max_len.

Preconditions: run after `fuse-attention` (which canonicalizes hand-written attention into SDPA
nodes with an explicit scale, `is_causal` and un-repeated GQA K/V): this pass only looks at SDPA
and score_mod_attention nodes. Stats: {"rewritten", "skipped" (not selected, or kind=dense),
"refused", "sites"}; details: `sites`, one entry per site keyed by module path (with `score_mod`,
e.g. "softcap=50.0", on a score-modifying site); `skipped`, `{"site", "reason"}` per refused site;
`notes` on lengths (the sites' query lengths) where a kind does not pay off.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx

from optpipe.attention_sites import (
    SDPA,
    AttentionSite,
    describe_site,
    mask_module,
    same_size,
    sdpa_arguments,
)
from optpipe.graph_toolkit import add_tensor, insert_call, insert_get_attr, value
from optpipe.program import Program
from optpipe.registry import LossyConfig, PassResult, config_fields, register_hook, register_pass
from optpipe.selection import LayerSelection

from . import attention_ops as ops
from .cleanup import eliminate_dead_code

aten = torch.ops.aten

KINDS = ("sliding-window", "block-sparse", "random", "strided", "linear", "performer", "linformer", "dense")
Kind = Literal["sliding-window", "block-sparse", "random", "strided", "linear", "performer", "linformer", "dense"]

# Below these example lengths a kind is slower than dense SDPA on CPU, forward or forward+backward
# (benchmarks/attention.py at 256, 512, 1024 and 4096 tokens, fp32, 8 heads x 64, one thread; the
# defaults of the benchmark's kinds): reported in the pass's notes rather than hidden.
BREAK_EVEN_LENGTH = {
    "sliding-window": 512,
    "block-sparse": 512,
    "random": 1024,
    "strided": 512,
    "linear": 512,
    "performer": 4096,
    "linformer": 1024,
}


@dataclass(frozen=True)
class AttentionConfig(LossyConfig):
    kind: Kind = field(
        default="dense",
        metadata={
            "help": "sliding-window | block-sparse | random | strided (exact attention over a subset of keys), "
            "linear | performer | linformer (approximate, O(n)), dense (leave as is)"
        },
    )
    window: int = field(
        default=128,
        metadata={"help": "sliding-window: keys at distance < window (causal: the window most recent keys)"},
    )
    block: int = field(
        default=64,
        metadata={"help": "block-sparse/random: block size; a query attends its own and the neighbouring key blocks"},
    )
    global_tokens: int = field(
        default=0, metadata={"help": "block-sparse/random: the first N tokens attend and are attended everywhere"}
    )
    random: int = field(default=2, metadata={"help": "random: random key blocks per query block"})
    stride: int = field(
        default=64,
        metadata={
            "help": "strided: keys at distance < stride plus every stride-th key (positions = stride-1 mod stride)"
        },
    )
    feature_map: Literal["elu", "relu"] = field(default="elu", metadata={"help": "linear: feature map (elu+1 or relu)"})
    chunk: int = field(default=64, metadata={"help": "linear/performer, causal: chunk of the prefix-sum form"})
    features: int = field(default=128, metadata={"help": "performer: random features"})
    redraw: int = field(
        default=0,
        metadata={
            "help": "performer: redraw the random features every N training steps (0: fixed); "
            "a training loop calls optpipe.passes.attention.redraw_projections(gm, step)"
        },
    )
    k: int = field(default=64, metadata={"help": "linformer: projected sequence length"})
    max_len: int = field(
        default=0,
        metadata={"help": "linformer: longest sequence the projections accept (0: the model's max positions)"},
    )
    seed: int = field(default=0, metadata={"help": "random/performer/linformer: seed of random draws"})
    layers: LayerSelection = field(
        default=LayerSelection(),
        metadata={"help": "which attention sites (graph order): a slice 2:, :-1, an index 3, or a list [0,11]"},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in KINDS:
            raise ValueError(f"attention: unknown kind {self.kind!r} (kinds: {', '.join(KINDS)})")
        positive = {
            "window": 1,
            "block": 1,
            "random": 0,
            "stride": 2,
            "chunk": 1,
            "features": 1,
            "k": 1,
            "global_tokens": 0,
            "redraw": 0,
            "max_len": 0,
        }
        for name, least in positive.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"attention: {name.replace('_', '-')} must be an integer >= {least}, got {value!r}")
        if self.feature_map not in ops.FEATURE_MAPS:
            raise ValueError(f"attention: feature-map must be one of {', '.join(ops.FEATURE_MAPS)}")
        if not isinstance(self.layers, LayerSelection):
            object.__setattr__(self, "layers", LayerSelection.parse(str(self.layers)))
        if self.kind == "random" and self.random < 1:
            raise ValueError("attention: kind=random needs random >= 1 (random key blocks per query block)")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in config_fields(self)}


# -- site analysis -------------------------------------------------------------------------------------
@dataclass
class _Plan:
    node: torch.fx.Node
    index: int
    path: str
    mask: str
    causal: bool
    key_mask: tuple | None = None
    """(mask node, polarity "bool" or "additive") of a padding mask."""
    window: int | None = None
    """The model's own causal sliding window (kind=sliding-window keeps it)."""
    max_len: int | str | None = None
    """linformer: the longest key length its projections take."""
    length: int | None = None
    """The site's query length on the example inputs (for the pass's notes)."""
    bias: torch.fx.Node | None = None
    """The site's mask when it adds a score bias (the sparse kinds' `bias` input)."""
    score_mod: ops.ScoreMod | None = None
    """The site's score modifier (an optpipe.score_mod_attention site: Gemma-2's soft-capping)."""


def _threshold(dtype: torch.dtype) -> float:
    # additive masks: values at or below this block (attention_sites' convention: -inf, dtype-min, -1e9)
    return max(torch.finfo(dtype).min / 2, -1e9)


def _key_padding_source(gm, mask_node, causal: bool, example_inputs) -> tuple | str:
    """(mask node, polarity) when `mask_node` is a key padding mask (each query row equal to the
    last one, with the causal pattern on top when `causal`) on the example inputs; else why not."""
    mv = value(mask_node)
    if mv is None or mv.dim() < 2:
        return "mask without a known shape"
    if mv.dim() > 4:
        return f"{mv.dim()}-d mask"
    polarity = "bool" if mv.dtype == torch.bool else "additive"
    if polarity == "additive" and not mv.is_floating_point():
        return f"mask of dtype {mv.dtype}"
    try:
        with torch.no_grad():
            mask = mask_module(gm, mask_node)(*example_inputs)
    except Exception as e:  # noqa: BLE001 - a mask we cannot evaluate is one we cannot vouch for
        return f"mask could not be evaluated on the example inputs ({type(e).__name__})"
    allowed = mask if mask.dtype == torch.bool else mask > _threshold(mask.dtype)
    if allowed.dim() == 4 and not torch.equal(allowed, allowed[:, :1].expand_as(allowed)):
        return "a per-head mask (only masks shared by all heads map to a key padding mask)"
    if allowed.shape[-2] == 1 and not causal:
        return (mask_node, polarity)
    keys = allowed[..., -1:, :]
    expected = keys.expand_as(allowed)
    if causal:
        n = allowed.shape[-1]
        expected = expected & torch.ones(allowed.shape[-2], n, dtype=torch.bool).tril(n - allowed.shape[-2])
    if not torch.equal(allowed, expected):
        return (
            "mask varies per query beyond "
            + ("causality" if causal else "key padding")
            + " on the example inputs (a custom mask)"
        )
    return (mask_node, polarity)


def _length(size) -> int | None:
    """A sequence length as an int: itself when static, its example value (hint) when dynamic."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else None


def _grown_inputs(program: Program) -> tuple | None:
    """The example inputs with every dynamic dim doubled (tiled), or None when no dim is dynamic."""
    specs = list(program.dynamic_shapes or [])
    if not any(specs):
        return None
    grown = []
    for x, spec in zip(program.example_inputs, specs + [None] * len(program.example_inputs)):
        for d in sorted(spec or {}) if isinstance(x, torch.Tensor) else ():
            x = torch.cat([x, x], dim=d)
        grown.append(x)
    return tuple(grown)


def _allowed_at(gm, mask_node, inputs) -> torch.Tensor | str:
    """Boolean "query may attend key" of the mask on `inputs`, or why it is not a plain mask."""
    try:
        with torch.no_grad():
            mask = mask_module(gm, mask_node)(*inputs)
    except Exception as e:  # noqa: BLE001 - a mask we cannot evaluate is one we cannot vouch for
        return f"the mask could not be evaluated on the example inputs ({type(e).__name__})"
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return f"a mask of dtype {mask.dtype}"
    blocked = mask <= _threshold(mask.dtype)
    if not bool(((mask == 0) | blocked).all()):
        return SCORE_BIAS
    return ~blocked


SCORE_BIAS = (
    "an additive score bias in the mask (values other than 0 and -inf: ALiBi, a relative-position bias or similar)"
)


def _bias_blocking(allowed: torch.Tensor) -> tuple[bool, bool]:
    """(causal, padded) of what a biased mask blocks: causal when it blocks every later key; padded
    when what it blocks is exactly key padding (on top of causality), which then also becomes the op's
    key padding mask. Anything else it blocks (padded queries, per-head or per-query masks) stays in
    the bias, blocked as the site blocks it."""
    n, s = allowed.shape[-2:]
    future = torch.ones(n, s, dtype=torch.bool).triu(1)
    causal = n == s and not bool((allowed & future).any())
    keys = allowed[..., -1:, :]  # a causal mask's last query row sees every key but padding
    expected = keys.expand_as(allowed) & ~future if causal else keys.expand_as(allowed)
    same_heads = allowed.dim() < 4 or torch.equal(allowed, allowed[:, :1].expand_as(allowed))
    return causal, same_heads and allowed.dim() in (2, 4) and not bool(keys.all()) and torch.equal(allowed, expected)


def _plan_bias(program: Program, mask_node, plan: _Plan, config: AttentionConfig) -> _Plan | str:
    """A site whose mask adds a score bias: the exact sparse kinds take the whole mask as their bias
    (what it blocks stays blocked, so the site is kept exactly but for the keys the pattern drops),
    causal when the mask blocks every later key and with a key padding mask when it blocks exactly
    key padding (the same at the example length and, with dynamic dims, at twice it); the others refuse."""
    if config.kind not in ops.SPARSE_PATTERNS:
        return (
            f"custom mask: {SCORE_BIAS}, which kind={config.kind} has no input for (the exact sparse kinds "
            f"keep it: {', '.join(ops.SPARSE_PATTERNS)})"
        )
    found = []
    for inputs in (program.example_inputs, _grown_inputs(program)):
        if inputs is None:
            continue
        try:
            with torch.no_grad():
                mask = mask_module(program.gm, mask_node)(*inputs)
        except Exception as e:  # noqa: BLE001 - a mask we cannot evaluate is one we cannot vouch for
            return f"custom mask: {SCORE_BIAS} that could not be evaluated ({type(e).__name__})"
        found.append(_bias_blocking(mask > _threshold(mask.dtype)))
    # (not causal, no key padding mask: still exact, the bias blocking what the site blocks)
    causal, padded = all(f[0] for f in found), all(f[1] for f in found)
    plan.causal, plan.bias = causal, mask_node
    plan.key_mask = (mask_node, "additive") if padded else None
    plan.mask = "+".join([*(["causal"] if causal else []), *(["padding"] if padded else []), "bias"])
    return plan


def _causal_window(allowed: torch.Tensor) -> int | None:
    """W when `allowed` is the causal sliding window "key j <= query i and i - j < W" (same for every
    batch row and head), narrower than the sequence; else None."""
    n = allowed.shape[-1]
    if allowed.dim() < 2 or allowed.shape[-2] != n or not bool((allowed == allowed[(0,) * (allowed.dim() - 2)]).all()):
        return None
    rows = allowed[(0,) * (allowed.dim() - 2)]
    w = int(rows[-1].sum())
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return w if 0 < w < n and torch.equal(rows, (j <= i) & (i - j < w)) else None


def _custom_mask(program: Program, mask_node) -> int | str:
    """The window of a model's causal sliding-window mask (the same width at the example length and
    at twice it), or which mask this is and why no efficient form keeps it."""
    gm = program.gm
    allowed = _allowed_at(gm, mask_node, program.example_inputs)
    if isinstance(allowed, str):
        return allowed
    if allowed.dim() == 4 and not torch.equal(allowed, allowed[:, :1].expand_as(allowed)):
        return "a per-head mask (only masks shared by all heads map to the efficient forms)"
    window = _causal_window(allowed)
    grown = _grown_inputs(program)
    if window is not None and grown is not None:
        again = _allowed_at(gm, mask_node, grown)
        window = window if not isinstance(again, str) and _causal_window(again) == window else None
    if window is not None:
        return window
    return "a per-query mask that is neither causal, a causal sliding window nor key padding"


def _is_score_mod(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is ops.score_mod_attention


def _site_arguments(node: torch.fx.Node) -> dict:
    """An attention node's arguments by name, SDPA's defaults filled in; a score_mod_attention node's
    (the same as SDPA's but dropout) plus its `score_mod` as a `ScoreMod`."""
    if not _is_score_mod(node):
        return sdpa_arguments(node)
    args = {"attn_mask": None, "is_causal": False, "enable_gqa": False, **dict(zip(ops.SCORE_MOD_ARGS, node.args))}
    args.update(node.kwargs)
    return {**args, "dropout_p": 0.0, "score_mod": ops.ScoreMod.of(args["score_mod"], args["mod_value"])}


def _describe(gm, node: torch.fx.Node, example_inputs) -> AttentionSite:
    """The site an attention node is (an SDPA or a score_mod_attention node)."""
    return describe_site(gm, node, example_inputs, args=_site_arguments(node))


def _modifier_refusal(mod: ops.ScoreMod, config: AttentionConfig) -> str | None:
    """Why `config.kind` cannot keep a site's score modifier; None for the sparse kinds, which take it."""
    if config.kind in ops.SPARSE_PATTERNS:
        return None
    return (
        f"scores modified before the softmax ({mod}, optpipe.score_mod_attention): kind={config.kind} never "
        "forms the scores to modify (its kernel φ(q)·φ(k) stands for exp(q·k), and applying the modifier to "
        "it would need the L×S matrix the kind avoids); the exact sparse kinds keep the modifier: "
        + ", ".join(ops.SPARSE_PATTERNS)
    )


def _plan_site(program: Program, node, index, site, config: AttentionConfig) -> _Plan | str:
    """A rewrite plan for one SDPA (or score_mod_attention) node, or the reason it is refused (naming
    the mask or the score modifier)."""
    args = _site_arguments(node)
    mod = args.get("score_mod")
    refusal = _modifier_refusal(mod, config) if mod is not None else None
    if refusal:
        return refusal
    if site.mask.startswith("causal+") and site.mask != "causal+padding":
        return f"{site.mask} mask with is_causal=True: only causality, key padding or a window is kept"
    q, k, v = (value(args[n]) for n in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return "query/key/value without recorded shapes"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"{q.dim()}-d attention (the efficient forms take (batch, heads, seq, dim))"
    if args["dropout_p"]:
        return f"dropout_p={args['dropout_p']} inside attention cannot be preserved"
    if not (isinstance(q.shape[1], int) and isinstance(k.shape[1], int)) or q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads do not group over {k.shape[1]} key/value heads"
    causal = site.mask in ("causal", "causal+padding")
    plan = _plan_mask(program, node, index, site, config, causal)
    if isinstance(plan, str):
        return plan
    plan.score_mod = mod
    if not same_size(q.shape[-2], k.shape[-2]):
        cross = _plan_cross(plan, config)
        if cross:
            return cross
    if plan.causal and config.kind == "linformer":
        return (
            f"{plan.mask} mask: linformer is bidirectional only (its projections mix the whole sequence, so "
            "a causal site would see the future); use sliding-window, linear or performer for decoders"
        )
    if config.kind == "linformer":
        plan.max_len = _max_len(program, config, k.shape[-2])
        if isinstance(plan.max_len, str):
            return plan.max_len
    return plan


def _plan_mask(program: Program, node, index, site, config: AttentionConfig, causal: bool) -> _Plan | str:
    """The part of the plan the mask decides: causal, key padding, the model's own window."""
    gm, mask_node = program.gm, _site_arguments(node)["attn_mask"]
    plan = _Plan(node, index, site.module_path, site.mask, causal)
    if site.mask in ("padding", "causal+padding"):
        source = _key_padding_source(gm, mask_node, causal, program.example_inputs)
        if isinstance(source, str):
            return f"{site.mask} mask: {source}"
        plan.key_mask = source
    elif site.mask == "custom":
        found = _custom_mask(program, mask_node)
        if found == SCORE_BIAS:
            return _plan_bias(program, mask_node, plan, config)
        if isinstance(found, str):
            return f"custom mask: {found}"
        if config.kind != "sliding-window":
            return (
                f"the model's causal sliding-window mask (window {found}) cannot be kept by kind={config.kind}, "
                "which would attend beyond the window; kind=sliding-window keeps it"
            )
        plan.causal, plan.mask, plan.window = True, f"causal sliding window {found}", found
    return plan


def _plan_cross(plan: _Plan, config: AttentionConfig) -> str | None:
    """Why a site whose query and key lengths differ (cross-attention, a KV cache) cannot take
    `config.kind`; None when it can: a bidirectional kernel form needs no position alignment."""
    if plan.causal:
        return (
            f"{plan.mask} mask over query and key lengths that differ (a KV cache): the causal diagonal "
            "does not line up"
        )
    if config.kind in ops.SPARSE_PATTERNS:
        return (
            f"cross-attention (query and key lengths differ): kind={config.kind} relates query and key "
            "positions, which belong to different sequences; linear, performer or linformer swap it"
        )
    return None


# -- rewriting -------------------------------------------------------------------------------------
def _key_mask_node(graph, plan: _Plan, like):
    """Graph nodes turning the site's mask into a (B|1, S) bool key padding mask."""
    mask_node, polarity = plan.key_mask
    # read the mask before its broadcast over queries: then nothing O(L·S) needs to stay alive
    while (
        mask_node.op == "call_function"
        and mask_node.target is aten.expand.default
        and value(mask_node.args[0]) is not None
        and value(mask_node.args[0]).dim() == value(mask_node).dim()
        and value(mask_node.args[0]).shape[-2] == 1
    ):
        mask_node = mask_node.args[0]
    mv = value(mask_node)
    x = mask_node
    if polarity == "additive":
        x = insert_call(graph, aten.gt.Scalar, (x, _threshold(mv.dtype)), like=like)
    x = insert_call(graph, aten.select.int, (x, -2, -1), like=like)  # the last query row
    if mv.dim() == 4:
        x = insert_call(graph, aten.select.int, (x, 1, 0), like=like)  # the (size-1) head axis
    elif mv.dim() == 2:
        x = insert_call(graph, aten.unsqueeze.default, (x, 0), like=like)
    return x


def _max_len(program: Program, config: AttentionConfig, key_length) -> int | str:
    """Linformer's projection length: max-len, else the site's key length when it is static (a
    fixed-size input such as ViT's patches), else the model config's maximum positions."""
    if config.max_len:
        if isinstance(key_length, int) and key_length > config.max_len:
            return f"max-len={config.max_len} is shorter than this site's key length {key_length}"
        return config.max_len
    if isinstance(key_length, int):
        return key_length
    cfg = program.meta.get("config") or {}
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "block_size"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    return (
        "linformer needs max-len (the longest sequence its projections accept): this site's key length "
        "is dynamic and the model config names no maximum"
    )


def mean_pooling_projection(k: int, max_len: int, dtype=torch.float32) -> torch.Tensor:
    """(k, max_len): row r averages the r-th of k equal segments of the sequence."""
    seg = -(-max_len // k)
    rows = torch.arange(max_len) // seg
    proj = torch.zeros(k, max_len, dtype=dtype)
    proj[rows, torch.arange(max_len)] = 1.0 / seg
    return proj


def _rewrite(program: Program, plan: _Plan, config: AttentionConfig) -> dict:
    gm, graph, node = program.gm, program.gm.graph, plan.node
    args = _site_arguments(node)
    q, k, v = args["query"], args["key"], args["value"]
    qv = value(q)
    scale = args["scale"] if args["scale"] is not None else 1.0 / math.sqrt(qv.shape[-1])
    with graph.inserting_before(node):
        key_mask = _key_mask_node(graph, plan, node) if plan.key_mask else None
        if config.kind in ops.SPARSE_PATTERNS:
            op = ops.sparse_attention
            op_args = (
                q,
                k,
                v,
                key_mask,
                config.kind,
                plan.causal,
                float(scale),
                min(config.window, plan.window or config.window),
                config.block,
                config.global_tokens,
                config.random if config.kind == "random" else 0,
                config.stride,
                config.seed,
                *((plan.bias,) if plan.bias is not None or plan.score_mod is not None else ()),
                *((plan.score_mod.name, plan.score_mod.value) if plan.score_mod is not None else ()),
            )
        elif config.kind == "linear":
            op = ops.linear_attention
            op_args = (q, k, v, key_mask, config.feature_map, plan.causal, config.chunk)
        elif config.kind == "performer":
            op = ops.performer_attention
            proj = ops.orthogonal_random_features(
                config.features, qv.shape[-1], config.seed + plan.index, dtype=qv.dtype
            )
            target = add_tensor(gm, plan.path, "performer_projection", proj)
            proj_node = insert_get_attr(gm, target, like=node)
            op_args = (q, k, v, key_mask, proj_node, plan.causal, config.chunk, float(scale), config.redraw)
        else:  # linformer
            op = ops.linformer_attention
            init = mean_pooling_projection(min(config.k, plan.max_len), plan.max_len, dtype=qv.dtype)
            targets = [
                add_tensor(gm, plan.path, f"linformer_proj_{which}", init.clone(), parameter=True)
                for which in ("key", "value")
            ]
            ek, ev = (insert_get_attr(gm, t, like=node) for t in targets)
            op_args = (q, k, v, key_mask, ek, ev, float(scale))
        new = insert_call(graph, op, op_args, like=node)
    if "val" in node.meta:  # the op's value has the shape of the SDPA value it stands for
        new.meta["val"] = node.meta["val"]
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    _reshape_after(new)
    return {
        "index": plan.index,
        "module_path": plan.path,
        "node": new.name,
        "action": "rewritten",
        "op": f"optpipe.{op._opname}",
        "mask": plan.mask,
        "causal": plan.causal,
        **({"window": min(config.window, plan.window)} if plan.window and config.kind == "sliding-window" else {}),
        "key_padding_mask": key_mask is not None,
        **({"bias": True} if plan.bias is not None else {}),
        **({"score_mod": str(plan.score_mod)} if plan.score_mod is not None else {}),
    }


@register_hook("attention", "break_even")
def break_even() -> dict[str, int]:
    """For `optpipe tune`: per kind, the sequence length below which it is slower than dense SDPA on CPU."""
    return dict(BREAK_EVEN_LENGTH)


@register_hook("attention", "length_advice")
def length_advice(n: int) -> list[str]:
    """For `optpipe inspect`: the kinds that do not pay off at sequence length `n` on CPU."""
    slower = [f"{kind} (below ~{even})" for kind, even in BREAK_EVEN_LENGTH.items() if n < even]
    if not slower:
        return []
    return [
        f"at {n} tokens these attention kinds are slower than dense SDPA on CPU: {', '.join(slower)}; "
        "they pay off on longer sequences (benchmarks/attention.py)"
    ]


def _notes(config: AttentionConfig, lengths: set[int]) -> list[str]:
    notes = []
    if not lengths:
        return notes
    n = max(lengths)
    even = BREAK_EVEN_LENGTH.get(config.kind)
    if even and n < even:
        notes.append(
            f"kind={config.kind} is slower than dense SDPA on CPU below about {even} tokens "
            f"(example length {n}); it pays off on longer sequences (benchmarks/attention.py)"
        )
    if config.kind == "sliding-window" and config.window >= n:
        notes.append(
            f"window={config.window} >= example length {n}: at that length every query sees every "
            "(earlier) key, which the op computes as dense attention"
        )
    return notes


def _reshape_after(node: torch.fx.Node) -> None:
    """view -> reshape on the layout ops after a rewritten site. SDPA returns its output laid out
    [B, S, H, D] (so `out.transpose(1, 2).view(B, S, H*D)` works without `.contiguous()`, and
    export drops that call); the optpipe ops return a contiguous [B, H, S, D], which such a view
    cannot take. reshape is the same view where one exists, a copy where not."""
    stack = [node]
    while stack:
        for user in list(stack.pop().users):
            if user.op != "call_function":
                continue
            if user.target is aten.view.default:
                user.target = aten.reshape.default
            elif user.target in (aten.transpose.int, aten.permute.default):
                stack.append(user)


@register_pass("attention", AttentionConfig, exact=False, needs=("sdpa-sites",))
def attention(program: Program, config: AttentionConfig) -> PassResult:
    """Rewrite dense SDPA attention into sparse (sliding-window, block-sparse, random, strided) or
    linear (linear, performer, linformer) attention ops; refuse sites whose mask it cannot keep."""
    gm = program.gm
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and (n.target is SDPA or _is_score_mod(n))]
    total = len(nodes)
    details, plans = [], []
    for index, node in enumerate(nodes):
        site = _describe(gm, node, program.example_inputs)
        entry = {"index": index, "module_path": site.module_path, "node": site.node, "mask": site.mask}
        if _is_score_mod(node):
            entry["score_mod"] = str(_site_arguments(node)["score_mod"])
        if config.kind == "dense":
            details.append({**entry, "action": "skipped", "reason": "kind=dense keeps dense attention"})
            continue
        if not config.layers.selects(index, total):
            reason = f"layers={config.layers} does not select site {index} of {total}"
            details.append({**entry, "action": "skipped", "reason": reason})
            continue
        plan = _plan_site(program, node, index, site, config)
        if isinstance(plan, str):
            details.append({**entry, "action": "refused", "reason": plan})
            continue
        plan.length = _length(value(node).shape[-2]) if value(node) is not None else None
        plans.append(plan)
        details.append(None)  # filled in after the rewrite, in site order
    for plan in plans:
        details[details.index(None)] = _rewrite(program, plan, config)
    if plans:
        eliminate_dead_code(gm)
        gm.graph.lint()
        gm.recompile()
    counts = {
        action: sum(1 for d in details if d["action"] == action) for action in ("rewritten", "skipped", "refused")
    }
    result_details = {"sites": details}
    refused = [{"site": d["module_path"], "reason": d["reason"]} for d in details if d["action"] == "refused"]
    if refused:
        result_details["skipped"] = refused
    notes = _notes(config, {p.length for p in plans if p.length}) if plans else []
    if not details:
        notes.append(
            "no attention sites (aten.scaled_dot_product_attention) in the graph: run fuse-attention "
            "first, which canonicalizes hand-written attention into them"
        )
    if notes:
        result_details["notes"] = notes
    return PassResult(bool(plans), {**counts, "sites": len(details)}, result_details)


# -- training support ------------------------------------------------------------------------------------
def redraw_projections(gm: torch.nn.Module, step: int, seed: int | None = None) -> int:
    """Redraw the performer feature buffers whose `redraw` interval divides `step` (call once per
    training step). Returns how many were redrawn. Deterministic for a given (seed, step)."""
    count = 0
    graph = getattr(gm, "graph", None)
    if graph is None:
        return 0
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not ops.performer_attention:
            continue
        interval = node.args[8] if len(node.args) > 8 else node.kwargs.get("redraw", 0)
        proj_node = node.args[4] if len(node.args) > 4 else node.kwargs.get("projection")
        if not interval or step % interval or not (isinstance(proj_node, torch.fx.Node) and proj_node.op == "get_attr"):
            continue
        buf = gm.get_buffer(proj_node.target)
        draw_seed = zlib.crc32(f"{seed or 0}:{step}:{proj_node.target}".encode())
        with torch.no_grad():
            buf.copy_(ops.orthogonal_random_features(buf.shape[0], buf.shape[1], draw_seed, dtype=buf.dtype))
        count += 1
    return count


__all__ = ["KINDS", "AttentionConfig", "attention", "mean_pooling_projection", "redraw_projections"]
