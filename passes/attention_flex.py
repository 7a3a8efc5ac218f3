"""The CUDA paths of optpipe's attention ops, through FlexAttention (compiled once per process; the
backward goes through FlexAttention's own autograd):

- `optpipe.sparse_attention`: a block mask made from the pattern (`SparsePattern.allowed`, the same
  definition every path follows), and its score modifier then its score bias, if any, as a
  `score_mod`: `mod(score)` (`ScoreMod`, soft-capping) plus `bias[b, h, q_idx, kv_idx]` (broadcast as
  SDPA broadcasts a mask);
- `optpipe.score_mod_attention`: the modifier (`apply_score_mod`, the same definition) and the
  attention mask as a `score_mod` (FlexAttention scales the scores before calling it, as the op
  does), causality as a block mask.

Written for CUDA machines and guarded by device: the CPU test suite does not run it."""

from __future__ import annotations

import functools

import torch

from .attention_patterns import ScoreMod, SparsePattern, apply_score_mod


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def sparse_attention_flex(
    query, key, value, key_padding_mask, pattern: SparsePattern, scale: float, bias=None, score_mod=None
):
    """FlexAttention with a block mask built from `pattern` and the score modifier (`ScoreMod`) then
    the score bias as a `score_mod` (CUDA; untested on the CPU-only CI)."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = query.shape[-2]
    device = query.device
    table = pattern.random_table(-(-n // pattern.block), device) if pattern.random_count else None
    kpm = key_padding_mask.to(torch.bool) if key_padding_mask is not None else None

    def mask_mod(b, h, q_idx, kv_idx):
        ok = pattern.allowed(q_idx, kv_idx, n, random_table=table)
        if kpm is not None:
            ok = ok & kpm[b if kpm.shape[0] > 1 else 0, kv_idx]
        return ok

    batch = query.shape[0] if kpm is not None and kpm.shape[0] > 1 else None
    block_mask = create_block_mask(mask_mod, batch, None, n, key.shape[-2], device=device)
    groups = query.shape[1] // key.shape[1]
    return _compiled_flex_attention()(
        query,
        key,
        value,
        score_mod=_modify_then_add(score_mod, bias.to(query.dtype) if bias is not None else None),
        block_mask=block_mask,
        scale=scale,
        enable_gqa=groups > 1,
    )


def _modify_then_add(score_mod: ScoreMod | None, bias):
    """FlexAttention's score_mod for sparse attention: the modifier on the (scaled) score, then the
    bias entry; None when there is neither."""
    lookup = _mask_lookup(bias)
    if score_mod is None and lookup is None:
        return None

    def modified(score, b, h, q_idx, kv_idx):
        if score_mod is not None:
            score = score_mod(score)
        return score if lookup is None else score + lookup(b, h, q_idx, kv_idx)

    return modified


def _mask_lookup(attn_mask):
    """(b, h, q_idx, kv_idx) -> the mask's entry, broadcast as SDPA broadcasts it (size-1 dims and
    missing leading dims read index 0); None without a mask."""
    if attn_mask is None:
        return None
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    wide = [size != 1 for size in mask.shape]

    def lookup(b, h, q_idx, kv_idx):
        idx = [i if w else 0 for i, w in zip((b, h, q_idx, kv_idx), wide)]
        return mask[idx[0], idx[1], idx[2], idx[3]]

    return lookup


def score_mod_attention_flex(query, key, value, attn_mask, score_mod: str, mod_value: float, scale: float, is_causal):
    """FlexAttention with `score_mod` = the modifier then the mask, and a causal block mask
    (CUDA, 4-d (B, H, L, D) inputs; untested on the CPU-only CI)."""
    from torch.nn.attention.flex_attention import create_block_mask

    lookup = _mask_lookup(attn_mask)
    is_bool = attn_mask is not None and attn_mask.dtype == torch.bool

    def modified(score, b, h, q_idx, kv_idx):
        score = apply_score_mod(score, score_mod, mod_value)
        if lookup is None:
            return score
        entry = lookup(b, h, q_idx, kv_idx)
        return torch.where(entry, score, -float("inf")) if is_bool else score + entry

    block_mask = None
    if is_causal:
        block_mask = create_block_mask(
            lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, query.shape[-2], key.shape[-2], device=query.device
        )
    groups = query.shape[1] // key.shape[1]
    return _compiled_flex_attention()(
        query, key, value, score_mod=modified, block_mask=block_mask, scale=scale, enable_gqa=groups > 1
    )
