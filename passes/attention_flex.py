"""The CUDA path of `optpipe.sparse_attention`: FlexAttention with a block mask made from the
pattern (`SparsePattern.allowed`, the same definition every path follows), compiled once per
process; the backward goes through FlexAttention's own autograd. Written for CUDA machines and
guarded by device: the CPU test suite does not run it."""

from __future__ import annotations

import functools

import torch

from .attention_patterns import SparsePattern


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def sparse_attention_flex(query, key, value, key_padding_mask, pattern: SparsePattern, scale: float):
    """FlexAttention with a block mask built from `pattern` (CUDA; untested on the CPU-only CI)."""
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
    return _compiled_flex_attention()(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=groups > 1)
