"""Efficient attention operators that the `attention` pass puts in place of dense SDPA, and the
dense attention with a score modifier that `fuse-attention` makes of soft-capped attention.

    torch.ops.optpipe.sparse_attention(q, k, v, key_padding_mask, pattern, causal, scale,
                                       window, block, global_tokens, random_blocks, stride, seed, bias=None,
                                       score_mod=None, mod_value=0.0)
    torch.ops.optpipe.linear_attention(q, k, v, key_padding_mask, feature_map, causal, chunk)
    torch.ops.optpipe.performer_attention(q, k, v, key_padding_mask, projection, causal, chunk,
                                          scale, redraw)
    torch.ops.optpipe.linformer_attention(q, k, v, key_padding_mask, proj_key, proj_value, scale)
    torch.ops.optpipe.score_mod_attention(q, k, v, attn_mask, score_mod, mod_value, scale, is_causal,
                                          enable_gqa)

Shapes follow SDPA: q `(B, H, L, D)`, k/v `(B, Hkv, S, D)` with `H % Hkv == 0` (grouped-query
attention: K/V are never repeated on the fast paths), out `(B, H, L, Dv)`. `key_padding_mask` is
None or a bool `(B|1, S)`, True where a key may be attended (an encoder's padding mask). A query
row that may attend no key at all (a padded query whose whole window is padding) outputs zeros, on
every path. `sparse_attention`'s `bias` is None or an additive float score bias broadcastable to
`(B, H, L, S)` (ALiBi, a relative-position bias), added to the scaled scores of the keys the pattern
keeps (its -inf entries exclude a key, as padding does); it gets a gradient when it requires one
(a learned bias), through the recompute path. Its `score_mod` (None, or a name in SCORE_MODS with
`mod_value`: "softcap", cap) modifies the scaled scores before the bias and the pattern, as
`score_mod_attention` does, so Gemma-2's soft-capped attention swaps to a sparse pattern:
softmax(mod(q·kᵀ·scale) + bias, over the kept keys) @ v, on every path (the CPU kernel writes the
scores out where ATen's flash kernel takes no modifier; FlexAttention's score_mod on CUDA).
`linear_attention` and the other kernel forms take no modifier: they never form a score to modify
(φ(q)·φ(k) stands for exp of the score), and the `attention` pass refuses them on such sites.

Each op is defined here once through `optpipe.ops.define_op` — what its graph node is: eager
implementation, fake impl, autograd, a FLOP formula and a decomposition into standard ATen ops that
every target falls back on. (This is the module the registry's OP_MODULES imports: importing it
registers every op.) The work lives beside it:

- `attention_patterns`: the sparse patterns (`SparsePattern.allowed` is THE definition) and the
  dense reference every sparse path matches, which is also the decomposition;
- `attention_sparse_cpu`: the CPU kernel of sparse attention (block-banded flash, flash-style GEMM
  backward from the saved output and log-sum-exp, kept on the output and recomputed if missing);
- `attention_flex`: its CUDA path (FlexAttention with a block mask from the same pattern);
- `attention_linear_cpu`: the eager causal kernel-attention kernels and their analytic backward;
- `attention_cpu`: the eager kernel of `score_mod_attention` (query block by query block).

`score_mod_attention` is SDPA (same arguments, mask semantics, GQA) with the scaled scores passed
through a modifier before the mask: `softcap` = `cap·tanh(s / cap)` (Gemma-2); `apply_score_mod`
in `attention_patterns` is THE definition, and `score_mod_attention_reference` (its decomposition,
standard ATen ops) the semantics every path matches; CUDA runs it as FlexAttention's `score_mod`.

Kernel (linear) attention: `out_i = φ(q_i)·Σ_j φ(k_j)v_jᵀ / φ(q_i)·Σ_j φ(k_j)`, with φ = elu+1 or
relu (`linear`), or FAVOR+ positive orthogonal random features (`performer`). Causal through the
chunked prefix-sum form: within a chunk the masked quadratic form, across chunks the states
Σφ(k)vᵀ (F, Dv) and Σφ(k) (F) of the chunks before. (Traced with a symbolic length, as the
decomposition is, causal kernel attention takes the masked quadratic form of the same sums: chunk
padding needs length arithmetic export cannot prove.) Eagerly, the causal linear op runs the
head-by-head kernel with the feature map applied inside and keeps its output and normaliser for
the analytic backward (O(L·D)); performer computes its features here and runs the same kernel on
them (`CausalKernelAttention`), its backward recomputing the features. Linformer projects K and V
along the sequence with learned `(k, max_len)` matrices (`E[:, :S]`; projected keys that see no
token are ignored), then runs dense attention over those k keys. The backward of the other ops
recomputes the forward from the saved inputs (no activations are kept between the two).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from optpipe.ops import define_op

from .attention_cpu import score_mod_attention_cpu
from .attention_flex import score_mod_attention_flex, sparse_attention_flex
from .attention_linear_cpu import FEATURE_MAPS, CausalKernelAttention, causal_linear_backward, causal_linear_forward
from .attention_patterns import (
    SCORE_MODS,
    SPARSE_PATTERNS,
    ScoreMod,
    SparsePattern,
    check_score_mod,
    dense_pattern_mask,
    score_mod_attention_reference,
    sparse_attention_reference,
)
from .attention_sparse_cpu import sparse_backward_cpu, sparse_forward_cpu, supports_cpu_kernel

aten = torch.ops.aten

KERNEL_EPS = 1e-6
"""Added to kernel attention's normaliser φ(q)·Σφ(k) (and to the FAVOR+ features): no division by
zero, however small the features."""


# -- what every op shares: shape checks, fake impl, argument lookup, recompute-in-backward ----------
def _recompute_backward(forward: Callable, ctx, grad, tensor_inputs: dict):
    """Gradients of `forward(**inputs)` w.r.t. the differentiable inputs, recomputed from the saved
    inputs alone (nothing else is kept between forward and backward)."""
    names = [name for name in tensor_inputs if ctx.needs_grad.get(name)]
    with torch.enable_grad():
        inputs = {name: (t.detach().requires_grad_(True) if name in names else t) for name, t in tensor_inputs.items()}
        out = forward(**inputs)
        grads = torch.autograd.grad(out, [inputs[n] for n in names], grad, allow_unused=True)
    return dict(zip(names, grads))


def _check_shapes(op: str, query, key, value, key_padding_mask):
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"optpipe.{op}: expected 4-d (B, H, L, D) query/key/value, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[1] % key.shape[1] or key.shape[1] != value.shape[1]:
        raise ValueError(
            f"optpipe.{op}: {query.shape[1]} query heads do not group over "
            f"{key.shape[1]} key / {value.shape[1]} value heads"
        )
    if key_padding_mask is not None and (key_padding_mask.dim() != 2 or key_padding_mask.shape[-1] != key.shape[-2]):
        raise ValueError(
            f"optpipe.{op}: key_padding_mask must be (B, S) with S={key.shape[-2]}, got {tuple(key_padding_mask.shape)}"
        )


def _attention_fake(query, key, value, *args, **kwargs):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _arg(args, kwargs, names, name, default=None):
    i = names.index(name)
    return args[i] if len(args) > i else kwargs.get(name, default)


def _math_forward(math_fn, names, inputs) -> torch.Tensor:
    return math_fn(**dict(zip(names, inputs))).contiguous()


def _setup_recompute(names):
    """Save the inputs only; the backward recomputes the forward (nothing but O(L) activations,
    alive only during the backward)."""

    def setup(ctx, inputs, output):
        args = dict(zip(names, inputs))
        ctx.args = {n: a for n, a in args.items() if not isinstance(a, torch.Tensor)}
        ctx.tensor_names = [n for n, a in args.items() if isinstance(a, torch.Tensor)]
        ctx.needs_grad = {n: ctx.needs_input_grad[i] for i, n in enumerate(names)}
        ctx.names = names
        ctx.save_for_backward(*(args[n] for n in ctx.tensor_names))

    return setup


def _backward_recompute(math_fn):
    def backward(ctx, grad):
        tensors = dict(zip(ctx.tensor_names, ctx.saved_tensors))
        differentiable = {n: t for n, t in tensors.items() if t.is_floating_point()}
        fixed = {n: t for n, t in tensors.items() if not t.is_floating_point()}

        def forward(**diff):
            return math_fn(**{**ctx.args, **fixed, **diff})

        grads = _recompute_backward(forward, ctx, grad, differentiable)
        return tuple(grads.get(n) if ctx.needs_grad[n] else None for n in ctx.names)

    return backward


# -- sparse_attention op -------------------------------------------------------------------------------
_SPARSE_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "pattern",
    "causal",
    "scale",
    "window",
    "block",
    "global_tokens",
    "random_blocks",
    "stride",
    "seed",
    "bias",
    "score_mod",
    "mod_value",
)


def _pattern(
    pattern: str, causal: bool, window: int, block: int, global_tokens: int, random_blocks: int, stride: int, seed: int
) -> SparsePattern:
    """The pattern the op's arguments name (as the op schema passes them: plain ints and bools)."""
    return SparsePattern(
        pattern, bool(causal), int(window), int(block), int(global_tokens), int(random_blocks), int(stride), int(seed)
    )


def _sparse_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    pattern: str,
    causal: bool,
    scale: float,
    window: int,
    block: int,
    global_tokens: int,
    random_blocks: int,
    stride: int,
    seed: int,
    bias: torch.Tensor | None = None,
    score_mod: str | None = None,
    mod_value: float = 0.0,
) -> torch.Tensor:
    p = _pattern(pattern, causal, window, block, global_tokens, random_blocks, stride, seed)
    _check_shapes("sparse_attention", query, key, value, key_padding_mask)
    _check_bias(query, key, bias)
    mod = ScoreMod.of(score_mod, mod_value)
    if query.is_cuda:
        return sparse_attention_flex(query, key, value, key_padding_mask, p, scale, bias, mod)
    if supports_cpu_kernel(query):
        out, lse = sparse_forward_cpu(query, key, value, key_padding_mask, p, scale, bias, mod)
        if query.requires_grad or key.requires_grad or value.requires_grad:
            out._optpipe_lse = lse  # the backward's softmax statistics; recomputed when missing
        return out
    return sparse_attention_reference(query, key, value, key_padding_mask, p, scale, bias, mod).contiguous()


def _check_bias(query, key, bias) -> None:
    if bias is None:
        return
    full = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    if not bias.is_floating_point() or bias.dim() > 4:
        raise ValueError(
            f"optpipe.sparse_attention: bias must be a float tensor of at most 4 dims, got {bias.dtype} "
            f"{tuple(bias.shape)}"
        )
    shape = (1,) * (4 - bias.dim()) + tuple(bias.shape)
    if any(b != 1 and b != f for b, f in zip(shape, full)):
        raise ValueError(
            f"optpipe.sparse_attention: bias {tuple(bias.shape)} does not broadcast to (B, H, L, S) = {full}"
        )


def _sparse_setup(ctx, inputs, output):
    args = dict(zip(_SPARSE_ARGS, inputs))
    ctx.pattern = _pattern(
        *(args[n] for n in ("pattern", "causal", "window", "block", "global_tokens", "random_blocks", "stride", "seed"))
    )
    ctx.scale = args["scale"]
    ctx.score_mod = ScoreMod.of(args.get("score_mod"), args.get("mod_value", 0.0))
    ctx.needs_grad = {
        name: ctx.needs_input_grad[_SPARSE_ARGS.index(name)] for name in ("query", "key", "value", "bias")
    }
    lse = getattr(output, "_optpipe_lse", None)
    saved = [args["query"], args["key"], args["value"], output]
    ctx.has_mask = args["key_padding_mask"] is not None
    if ctx.has_mask:
        saved.append(args["key_padding_mask"])
    ctx.has_bias = args.get("bias") is not None
    if ctx.has_bias:
        saved.append(args["bias"])
    if lse is not None:
        saved.append(lse)
    ctx.has_lse = lse is not None
    ctx.save_for_backward(*saved)


def _sparse_backward(ctx, grad):
    saved = list(ctx.saved_tensors)
    query, key, value, out = saved[:4]
    rest = iter(saved[4:])
    kpm = next(rest) if ctx.has_mask else None
    bias = next(rest) if ctx.has_bias else None
    lse = next(rest) if ctx.has_lse else None
    p, scale, mod = ctx.pattern, ctx.scale, ctx.score_mod
    # a bias that needs a gradient (a learned one) takes the recompute path, which differentiates it too
    if supports_cpu_kernel(query) and not query.is_cuda and not ctx.needs_grad["bias"]:
        if lse is None:
            out, lse = sparse_forward_cpu(query, key, value, kpm, p, scale, bias, mod)
        dq, dk, dv = sparse_backward_cpu(grad.contiguous(), query, key, value, kpm, p, scale, out, lse, bias, mod)
        grads = {"query": dq, "key": dk, "value": dv}
    else:
        fwd = sparse_attention_flex if query.is_cuda else sparse_attention_reference
        inputs = {"query": query, "key": key, "value": value, **({"bias": bias} if bias is not None else {})}
        grads = _recompute_backward(
            lambda query, key, value, bias=None: fwd(query, key, value, kpm, p, scale, bias, mod), ctx, grad, inputs
        )
    return tuple(grads.get(n) if ctx.needs_grad.get(n) else None for n in _SPARSE_ARGS)


def _sparse_decomposition(
    query,
    key,
    value,
    key_padding_mask,
    pattern,
    causal,
    scale,
    window,
    block,
    global_tokens,
    random_blocks,
    stride,
    seed,
    bias=None,
    score_mod=None,
    mod_value=0.0,
):
    p = _pattern(pattern, causal, window, block, global_tokens, random_blocks, stride, seed)
    return sparse_attention_reference(
        query, key, value, key_padding_mask, p, scale, bias, ScoreMod.of(score_mod, mod_value)
    )


def _sparse_flops(*args, out_shape=None, **kwargs) -> int:
    q, v = _arg(args, kwargs, _SPARSE_ARGS, "query"), _arg(args, kwargs, _SPARSE_ARGS, "value")
    names = ("pattern", "causal", "window", "block", "global_tokens", "random_blocks", "stride", "seed")
    p = _pattern(*(_arg(args, kwargs, _SPARSE_ARGS, n) for n in names))
    b, h, n, d = q
    keys = p.keys_per_query(n)
    return int(2 * b * h * n * keys * (d + v[-1]))


sparse_attention = define_op(
    "sparse_attention",
    _sparse_impl,
    fake=_attention_fake,
    decomposition=_sparse_decomposition,
    backward=_sparse_backward,
    setup_context=_sparse_setup,
    flops=_sparse_flops,
)


# -- kernel (linear) attention ---------------------------------------------------------------------------
def _grouped(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, L, F) -> (B, Hkv, G, L, F)."""
    b, h = query.shape[:2]
    return query.reshape(b, kv_heads, h // kv_heads, *query.shape[2:])


def _eager() -> bool:
    """Running eagerly, not being traced into a graph (where decompositions must stay functional)."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is None and not torch.compiler.is_compiling()


def kernel_attention(
    qf: torch.Tensor, kf: torch.Tensor, value: torch.Tensor, causal: bool, chunk: int, eps: float = KERNEL_EPS
) -> torch.Tensor:
    """`φ(q)·Σφ(k)vᵀ / φ(q)·Σφ(k)` from feature maps qf (B, H, L, F), kf (B, Hkv, S, F).

    Causal: chunked prefix sums — per chunk of `chunk` queries, the masked quadratic form inside
    the chunk plus the state Σφ(k)vᵀ (F, Dv) and Σφ(k) (F) of all earlier chunks."""
    b, h, n, f = qf.shape
    hkv, dv = kf.shape[1], value.shape[-1]
    groups = h // hkv
    if not causal:
        state = kf.transpose(-1, -2) @ value  # (B, Hkv, F, Dv)
        z = kf.sum(-2)  # (B, Hkv, F)
        qg = _grouped(qf, hkv)  # (B, Hkv, G, L, F)
        num = qg @ state.unsqueeze(2)
        den = (qg @ z[:, :, None, :, None]).squeeze(-1)
        return (num / (den.unsqueeze(-1) + eps)).reshape(b, h, n, dv)
    if isinstance(n, int) and _eager():
        return CausalKernelAttention.apply(qf, kf, value, chunk, eps)
    if not isinstance(n, int):
        # symbolic length (export, decompositions for other targets): the masked quadratic form of
        # the same sums — chunk padding would need length arithmetic that export cannot prove
        scores = (_grouped(qf, hkv) @ kf.unsqueeze(2).transpose(-1, -2)).tril()  # (B, Hkv, G, L, S)
        num = scores @ value.unsqueeze(2)
        return (num / (scores.sum(-1, keepdim=True) + eps)).reshape(b, h, n, dv)
    c = max(1, min(chunk, n))
    nc = -(-n // c)
    pad = nc * c - n
    if pad:
        qf, kf, value = (F.pad(t, (0, 0, 0, pad)) for t in (qf, kf, value))
    qc = _grouped(qf, hkv).reshape(b, hkv, groups, nc, c, f).transpose(2, 3).reshape(b, hkv, nc, groups * c, f)
    kc = kf.reshape(b, hkv, nc, c, f)
    vc = value.reshape(b, hkv, nc, c, dv)
    state = _exclusive_prefix(kc.transpose(-1, -2) @ vc)  # (B, Hkv, nc, F, Dv)
    z = _exclusive_prefix(kc.sum(-2))  # (B, Hkv, nc, F)
    scores = qc @ kc.transpose(-1, -2)  # (B, Hkv, nc, G·c, c)
    if _eager():  # in place on fresh matmul outputs (their backward reads the inputs only)
        scores.view(b, hkv, nc, groups, c, c).tril_()  # causal inside the chunk
        num = (scores @ vc).add_(qc @ state)  # (B, Hkv, nc, G·c, Dv)
        den = scores.sum(-1).add_((qc @ z.unsqueeze(-1)).squeeze(-1))  # (B, Hkv, nc, G·c)
    else:  # traced graphs (decompositions) stay functional
        scores = scores.reshape(b, hkv, nc, groups, c, c).tril().reshape(scores.shape)
        num = scores @ vc + qc @ state
        den = scores.sum(-1) + (qc @ z.unsqueeze(-1)).squeeze(-1)
    out = num / (den.unsqueeze(-1) + eps)
    return out.reshape(b, hkv, nc, groups, c, dv).transpose(2, 3).reshape(b, h, nc * c, dv)[:, :, :n]


def _exclusive_prefix(x: torch.Tensor) -> torch.Tensor:
    """Sum over the chunks before each chunk (dim 2), as two small GEMMs with strictly lower-
    triangular ones matrices: within groups of about √nc chunks, then across the groups' totals
    (O(nc^1.5) work; a cumsum over dim 2 is a slow strided scan on CPU)."""
    b, h, nc = x.shape[:3]
    flat = x.reshape(b, h, nc, -1)
    g = max(1, round(math.sqrt(nc)))
    ng = -(-nc // g)
    if ng * g != nc:
        flat = F.pad(flat, (0, 0, 0, ng * g - nc))
    blocks = flat.reshape(b, h, ng, g, -1)
    tri = torch.ones(g, g, dtype=x.dtype, device=x.device).tril(-1)
    out = tri @ blocks  # within each group
    if ng > 1:
        totals = blocks.sum(3)  # (b, h, ng, M)
        tri_groups = torch.ones(ng, ng, dtype=x.dtype, device=x.device).tril(-1)
        out = out + (tri_groups @ totals).unsqueeze(3)  # groups before
    return out.reshape(b, h, ng * g, -1)[:, :, :nc].reshape(x.shape)


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """φ(x) of the linear op: elu(x)+1 or relu(x) (`FEATURE_MAPS`)."""
    if name == "elu":  # in place on elu's fresh output (its backward reads the input)
        return F.elu(x).add_(1) if _eager() else F.elu(x) + 1
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown feature map {name!r} (known: {', '.join(FEATURE_MAPS)})")


def _masked_keys(kf: torch.Tensor, key_padding_mask) -> torch.Tensor:
    if key_padding_mask is None:
        return kf
    return kf * key_padding_mask.to(kf.dtype)[:, None, :, None]


_LINEAR_ARGS = ("query", "key", "value", "key_padding_mask", "feature_map", "causal", "chunk")


def linear_attention_math(query, key, value, key_padding_mask, feature_map_name: str, causal: bool, chunk: int):
    qf, kf = feature_map(query, feature_map_name), feature_map(key, feature_map_name)
    return kernel_attention(qf, _masked_keys(kf, key_padding_mask), value, causal, chunk)


def _linear_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    feature_map: str,
    causal: bool,
    chunk: int,
) -> torch.Tensor:
    _check_shapes("linear_attention", query, key, value, key_padding_mask)
    if causal and _eager():  # the feature maps applied head by head inside (no full-size φq, φk)
        out, den = causal_linear_forward(query, key, value, key_padding_mask, feature_map, chunk, KERNEL_EPS)
        out._optpipe_den = den  # the backward's normaliser (saved by setup_context)
        return out
    return _math_forward(
        _linear_math_kw, _LINEAR_ARGS, (query, key, value, key_padding_mask, feature_map, causal, chunk)
    )


def _linear_setup(ctx, inputs, output):
    den = getattr(output, "_optpipe_den", None)
    ctx.fast = den is not None
    if not ctx.fast:
        return _setup_recompute(_LINEAR_ARGS)(ctx, inputs, output)
    # the analytic backward keeps the inputs, the output and the normaliser: O(L·D)
    args = dict(zip(_LINEAR_ARGS, inputs))
    ctx.args = {n: a for n, a in args.items() if not isinstance(a, torch.Tensor)}
    ctx.tensor_names = [n for n, a in args.items() if isinstance(a, torch.Tensor)]
    ctx.needs_grad = {n: ctx.needs_input_grad[i] for i, n in enumerate(_LINEAR_ARGS)}
    ctx.names = _LINEAR_ARGS
    ctx.save_for_backward(*(args[n] for n in ctx.tensor_names), output, den)


def _linear_backward(ctx, grad):
    if not ctx.fast:
        return _recompute_linear(ctx, grad)
    *saved, out, den = ctx.saved_tensors
    tensors = dict(zip(ctx.tensor_names, saved))
    query, key, value = tensors["query"], tensors["key"], tensors["value"]
    kpm, name, chunk = tensors.get("key_padding_mask"), ctx.args["feature_map"], ctx.args["chunk"]
    needs = tuple(ctx.needs_grad[n] for n in ("query", "key", "value"))
    dq, dk, dv = causal_linear_backward(grad.contiguous(), query, key, value, kpm, name, out, den, chunk, needs)
    found = {"query": dq, "key": dk, "value": dv}
    return tuple(found.get(n) for n in _LINEAR_ARGS)


def _linear_math_kw(query, key, value, key_padding_mask=None, feature_map="elu", causal=False, chunk=64):
    return linear_attention_math(query, key, value, key_padding_mask, feature_map, causal, chunk)


def _kernel_flops(n, b, h, hkv, f, d, dv, causal, chunk) -> int:
    flops = 2 * b * hkv * n * f * (dv + 1) + 2 * b * h * n * f * (dv + 1)
    if causal:
        c = min(chunk, n)
        flops += 2 * b * h * n * c * (f + dv + 1)
    return int(flops)


def _linear_flops(*args, out_shape=None, **kwargs) -> int:
    q, k, v = (_arg(args, kwargs, _LINEAR_ARGS, n) for n in ("query", "key", "value"))
    causal, chunk = _arg(args, kwargs, _LINEAR_ARGS, "causal"), _arg(args, kwargs, _LINEAR_ARGS, "chunk")
    b, h, n, d = q
    return _kernel_flops(n, b, h, k[1], d, d, v[-1], causal, chunk)


_recompute_linear = _backward_recompute(_linear_math_kw)
linear_attention = define_op(
    "linear_attention",
    _linear_impl,
    fake=_attention_fake,
    decomposition=_linear_math_kw,
    backward=_linear_backward,
    setup_context=_linear_setup,
    flops=_linear_flops,
)


# -- performer (FAVOR+) ------------------------------------------------------------------------------------
def orthogonal_random_features(features: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """FAVOR+ projection (features, dim): stacked random orthogonal blocks, rows scaled to the norms
    of Gaussian vectors (so each row is marginally N(0, I)), drawn from `seed`."""
    gen = torch.Generator().manual_seed(int(seed))
    blocks = []
    for _ in range(-(-features // dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        blocks.append(q.T)
    w = torch.cat(blocks)[:features]
    norms = torch.randn(features, dim, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (w * norms).to(dtype)


def favor_features(
    x: torch.Tensor, projection: torch.Tensor, scale: float, is_query: bool, causal: bool
) -> torch.Tensor:
    """Positive random features φ(x) = exp(Wx' − |x'|²/2 − c)/√m with x' = x·√scale, so that
    E[φ(q)·φ(k)] ∝ exp(q·k·scale). The stabiliser c cancels in the ratio: per row for queries, per
    head for keys — except causal keys, where a shared maximum would read the future."""
    x = x * math.sqrt(scale)
    proj = x @ projection.to(x.dtype).T  # (B, H, L, m)
    sq = (x * x).sum(-1, keepdim=True) / 2
    logits = proj - sq
    # (max over a dim, not amax: TVM's Relax torch importer takes `max.dim` but not `amax`)
    if is_query:
        logits = logits - logits.detach().max(-1, keepdim=True).values
    elif not causal:
        logits = logits - logits.detach().max(-1, keepdim=True).values.max(-2, keepdim=True).values
    return torch.exp(logits) / math.sqrt(projection.shape[0]) + KERNEL_EPS


_PERFORMER_ARGS = ("query", "key", "value", "key_padding_mask", "projection", "causal", "chunk", "scale", "redraw")


def performer_attention_math(
    query, key, value, key_padding_mask=None, projection=None, causal=False, chunk=64, scale=1.0, redraw=0
):
    qf = favor_features(query, projection, scale, True, causal)
    kf = favor_features(key, projection, scale, False, causal)
    return kernel_attention(qf, _masked_keys(kf, key_padding_mask), value, causal, chunk)


def _performer_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    projection: torch.Tensor,
    causal: bool,
    chunk: int,
    scale: float,
    redraw: int,
) -> torch.Tensor:
    _check_shapes("performer_attention", query, key, value, key_padding_mask)
    return _math_forward(
        performer_attention_math,
        _PERFORMER_ARGS,
        (query, key, value, key_padding_mask, projection, causal, chunk, scale, redraw),
    )


def _performer_flops(*args, out_shape=None, **kwargs) -> int:
    q, k, v, proj = (_arg(args, kwargs, _PERFORMER_ARGS, n) for n in ("query", "key", "value", "projection"))
    causal, chunk = _arg(args, kwargs, _PERFORMER_ARGS, "causal"), _arg(args, kwargs, _PERFORMER_ARGS, "chunk")
    b, h, n, d = q
    m = proj[0]
    return _kernel_flops(n, b, h, k[1], m, d, v[-1], causal, chunk) + 2 * (b * h * n + b * k[1] * n) * m * d


performer_attention = define_op(
    "performer_attention",
    _performer_impl,
    fake=_attention_fake,
    decomposition=performer_attention_math,
    backward=_backward_recompute(performer_attention_math),
    setup_context=_setup_recompute(_PERFORMER_ARGS),
    flops=_performer_flops,
)


# -- linformer ---------------------------------------------------------------------------------------------
_LINFORMER_ARGS = ("query", "key", "value", "key_padding_mask", "proj_key", "proj_value", "scale")


def linformer_attention_math(query, key, value, key_padding_mask=None, proj_key=None, proj_value=None, scale=1.0):
    s = key.shape[-2]
    if key_padding_mask is not None:
        keep = key_padding_mask.to(key.dtype)[:, None, :, None]
        key, value = key * keep, value * keep
    k_low = proj_key[:, :s].to(key.dtype) @ key  # (B, Hkv, k, D)
    v_low = proj_value[:, :s].to(value.dtype) @ value
    b, h, n, d = query.shape
    hkv = key.shape[1]
    q = query.reshape(b, hkv, (h // hkv) * n, d)  # groups share the projected K/V
    # projected keys that see a (real) token: one that sums only padding would enter the softmax as a 0 score
    reach = proj_key[:, :s].abs().to(key.dtype)
    if key_padding_mask is None:
        seen = (reach.sum(-1) > 0).unsqueeze(0)
    else:
        seen = (key_padding_mask.to(key.dtype) @ reach.transpose(0, 1) > 0)[:, None, None, :]  # (B, 1, 1, k)
    out = aten.scaled_dot_product_attention.default(q, k_low, v_low, attn_mask=seen, scale=scale)
    return out.reshape(b, h, n, value.shape[-1])


def _linformer_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    proj_key: torch.Tensor,
    proj_value: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    _check_shapes("linformer_attention", query, key, value, key_padding_mask)
    if key.shape[-2] > proj_key.shape[-1]:
        raise ValueError(
            f"optpipe.linformer_attention: sequence length {key.shape[-2]} exceeds the "
            f"projections' max length {proj_key.shape[-1]} (rerun the pass with a larger max-len)"
        )
    return _math_forward(
        linformer_attention_math, _LINFORMER_ARGS, (query, key, value, key_padding_mask, proj_key, proj_value, scale)
    )


def _linformer_flops(*args, out_shape=None, **kwargs) -> int:
    q, k, v, e = (_arg(args, kwargs, _LINFORMER_ARGS, n) for n in ("query", "key", "value", "proj_key"))
    b, h, n, d = q
    kk = e[0]
    return int(2 * 2 * b * k[1] * kk * k[2] * d + 2 * b * h * n * kk * (d + v[-1]))


linformer_attention = define_op(
    "linformer_attention",
    _linformer_impl,
    fake=_attention_fake,
    decomposition=linformer_attention_math,
    backward=_backward_recompute(linformer_attention_math),
    setup_context=_setup_recompute(_LINFORMER_ARGS),
    flops=_linformer_flops,
)

# -- dense attention with a score modifier -------------------------------------------------------------
SCORE_MOD_ARGS = ("query", "key", "value", "attn_mask", "score_mod", "mod_value", "scale", "is_causal", "enable_gqa")


def _score_mod_impl(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    score_mod: str,
    mod_value: float,
    scale: float,
    is_causal: bool,
    enable_gqa: bool,
) -> torch.Tensor:
    check_score_mod(score_mod, mod_value)
    if query.dim() == 4 and query.is_cuda:
        return score_mod_attention_flex(query, key, value, attn_mask, score_mod, mod_value, scale, is_causal)
    return score_mod_attention_cpu(query, key, value, attn_mask, score_mod, mod_value, scale, is_causal)


def _score_mod_math(
    query, key, value, attn_mask=None, score_mod="softcap", mod_value=1.0, scale=1.0, is_causal=False, enable_gqa=False
):
    return score_mod_attention_reference(
        query, key, value, attn_mask, score_mod, mod_value, scale, is_causal, enable_gqa
    )


def _score_mod_differentiable(
    query, key, value, attn_mask=None, score_mod="softcap", mod_value=1.0, scale=1.0, is_causal=False, enable_gqa=False
):
    """What the backward recomputes: FlexAttention (its own fused backward) on CUDA, the reference elsewhere."""
    if query.dim() == 4 and query.is_cuda:
        return score_mod_attention_flex(query, key, value, attn_mask, score_mod, mod_value, scale, is_causal)
    return score_mod_attention_reference(
        query, key, value, attn_mask, score_mod, mod_value, scale, is_causal, enable_gqa
    )


def _score_mod_flops(*args, out_shape=None, **kwargs) -> int:
    q, k, v = (_arg(args, kwargs, SCORE_MOD_ARGS, n) for n in ("query", "key", "value"))
    *batch, n, d = q
    return int(2 * math.prod(batch) * n * k[-2] * (d + v[-1]))


score_mod_attention = define_op(
    "score_mod_attention",
    _score_mod_impl,
    fake=_attention_fake,
    decomposition=_score_mod_math,
    backward=_backward_recompute(_score_mod_differentiable),
    setup_context=_setup_recompute(SCORE_MOD_ARGS),
    flops=_score_mod_flops,
)

ATTENTION_OPS = (sparse_attention, linear_attention, performer_attention, linformer_attention, score_mod_attention)

__all__ = [
    "ATTENTION_OPS",
    "FEATURE_MAPS",
    "KERNEL_EPS",
    "SCORE_MODS",
    "SCORE_MOD_ARGS",
    "SPARSE_PATTERNS",
    "ScoreMod",
    "SparsePattern",
    "dense_pattern_mask",
    "favor_features",
    "feature_map",
    "kernel_attention",
    "linear_attention",
    "linear_attention_math",
    "linformer_attention",
    "linformer_attention_math",
    "orthogonal_random_features",
    "performer_attention",
    "performer_attention_math",
    "score_mod_attention",
    "score_mod_attention_reference",
    "sparse_attention",
    "sparse_attention_reference",
]
