"""What the eager CPU attention kernels share (`attention_sparse_cpu`, `attention_linear_cpu`).

- `exp_`: an in-place exp through exp2, ~3x faster than ATen's CPU exp;
- `CONSTANT_MASKS`: a small LRU of the constant masks and ones matrices the kernels build from
  their shapes (band masks, causal chunk masks, prefix matrices), reused across layers and between
  forward and backward;
- `Workspace`: per-call scratch buffers reused across heads and tiles;
- `score_mod_attention_cpu`: the eager kernel of `optpipe.score_mod_attention` (dense attention with a
  score modifier such as soft-capping), query block by query block.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .attention_patterns import apply_score_mod, masked_scores, repeat_kv

_LOG2E = 1.0 / math.log(2.0)
MASK_CACHE_SIZE = 64


def exp_(t: torch.Tensor) -> torch.Tensor:
    """`t.exp_()` computed as exp2(t·log2 e), for the eager CPU kernels: ATen's CPU exp runs ~3x
    slower than its exp2 (1.1 vs 0.33 ns per fp32 element here, AVX-512). Rounding t·log2 e costs
    a relative error of at most ~|t|·6e-8 (8e-7 for the |t| < 14 where softmax weights exceed
    1e-6; exp(-inf) stays 0)."""
    return t.mul_(_LOG2E).exp2_()


class MaskCache:
    """An LRU of constant tensors keyed by what determines them: band masks depend only on
    (pattern, length, blocking, dtype, device), so layers and the backward reuse them. Masks with a
    key padding mask are data and never cached."""

    def __init__(self, size: int):
        self.size, self.entries = size, OrderedDict()

    def get(self, key, build):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = build()
        self.entries[key] = value
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


CONSTANT_MASKS = MaskCache(MASK_CACHE_SIZE)
"""The one cache every CPU kernel draws its constant masks from (keys start with what they are)."""


class Workspace:
    """Per-call scratch buffers, reused across heads and tiles: a large fresh tensor faults its
    pages in on first write (glibc serves big allocations by mmap), which on these loops cost as
    much as the GEMMs that fill them."""

    def __init__(self, dtype, device):
        self.dtype, self.device, self.bufs = dtype, device, {}

    def get(self, name: str, shape) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.bufs[name] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return buf[:numel].view(shape)

    def padded(self, name: str, t: torch.Tensor, before: int, total: int) -> torch.Tensor:
        """(S, D) rows -> (total, D) with `before` zero rows in front, in a reused buffer (one K/V head
        at a time: small; the zero rows are written once)."""
        old = self.bufs.get(name)
        out = self.get(name, (total, t.shape[-1]))
        fresh = self.bufs[name] is not old
        if fresh:
            out[:before].zero_()
            out[before + t.shape[0] :].zero_()
        out[before : before + t.shape[0]].copy_(t)
        return out


SCORE_MOD_BLOCK = 256
"""Queries per block in `score_mod_attention_cpu`: the scores live as (B, H, block, S), not (B, H, L, S)."""


def score_mod_attention_cpu(query, key, value, attn_mask, score_mod: str, mod_value: float, scale: float, is_causal):
    """Dense attention with a score modifier, one block of queries at a time (the scores of a block
    only), modifier and softmax in place. Same semantics as `score_mod_attention_reference`: the
    scores are modified, then masked, then softmaxed in float32 at least."""
    key, value = repeat_kv(query, key, value) if query.dim() == 4 else (key, value)
    n = query.shape[-2]
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    kt = key.transpose(-2, -1)
    for start in range(0, n, SCORE_MOD_BLOCK):
        stop = min(start + SCORE_MOD_BLOCK, n)
        scores = torch.matmul(query[..., start:stop, :], kt).mul_(scale)
        scores = apply_score_mod(scores, score_mod, mod_value)
        mask = attn_mask
        if mask is not None and mask.dim() >= 2 and mask.shape[-2] == n:
            mask = mask[..., start:stop, :]
        scores = masked_scores(scores, mask, is_causal, row0=start)
        probs = torch.softmax(scores, -1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
        out[..., start:stop, :] = torch.matmul(probs, value)
    return out
