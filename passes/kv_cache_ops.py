"""The incremental forms of efficient attention that the `kv-cache` pass inserts.

    optpipe.cached_window_attention(q, k, v, k_ring, v_ring, cache_position, key_mask, window, scale)
        -> (out, k_ring', v_ring')
    optpipe.cached_linear_attention(q, k, v, kv_state, k_sum, key_mask, cache_position, feature_map)
        -> (out, kv_state', k_sum')

Both take the new tokens (T of them, written at the cache slots `cache_position`, consecutive) and
the cache state before them, and return the attention output of the new tokens and the new state.
They are written with plain ATen ops on tensors only (no data-dependent shapes), so the same code
is the eager kernel and the decomposition every target lowers.

Sliding window: a ring of `window` slots per layer holds the K/V of the most recent `window`
tokens (slot s at ring index s mod window): memory O(window), independent of the length generated.
A query at slot p sees the keys at slots (p - window, p] that `key_mask` marks as real, and itself.

Linear attention: the recurrent state Σφ(k)vᵀ [B, Hkv, F, Dv] and Σφ(k) [B, Hkv, F] over all
earlier tokens: O(1) memory and time per token. Inside the new tokens it is the causal quadratic
form (a prefill of T tokens costs O(T²·F), a decode step O(F·Dv)).
"""

from __future__ import annotations

import torch

from optpipe.ops import define_op

from .attention_ops import KERNEL_EPS
from .attention_ops import feature_map as apply_feature_map


def _non_negative(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0) for int64 without `clamp` (TVM legalizes an int64 clamp through an infinite bound)."""
    return torch.maximum(x, torch.zeros_like(x))


# -- sliding window ------------------------------------------------------------------------------------
def _window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_ring: torch.Tensor,
    v_ring: torch.Tensor,
    cache_position: torch.Tensor,
    key_mask: torch.Tensor,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = k_ring.shape[2]
    start, end = cache_position.min(), cache_position.max()  # 0-d: shapes every importer can infer
    ring = torch.arange(w, device=key.device)
    held = start - 1 - torch.remainder(start - 1 - ring, w)  # slot each ring entry holds (<0: none)
    slots = torch.cat([held, cache_position])  # [W + T]
    keys = torch.cat([k_ring, key], dim=2)
    values = torch.cat([v_ring, value], dim=2)
    q_slot = cache_position[:, None]  # [T, 1]
    in_window = (slots[None, :] <= q_slot) & (slots[None, :] > q_slot - window) & (slots[None, :] >= 0)
    real = key_mask.index_select(1, _non_negative(slots))  # [B, W + T]
    itself = slots[None, :] == q_slot  # ring slots are all < start
    mask = (in_window[None] & real[:, None, :]) | itself[None]  # [B, T, W + T]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask[:, None], scale=scale, enable_gqa=query.shape[1] != key.shape[1]
    )
    # the ring after these tokens: entry i holds the newest slot <= end with slot = i (mod W)
    newest = end - torch.remainder(end - ring, w)
    from_new = (newest >= start)[:, None]
    source = _non_negative(newest - start)  # newest <= end: never past the new tokens
    new_k = torch.where(from_new, key.index_select(2, source), k_ring)
    new_v = torch.where(from_new, value.index_select(2, source), v_ring)
    return out.contiguous(), new_k, new_v


def _window_fake(query, key, value, k_ring, v_ring, cache_position, key_mask, window, scale):
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    return out, torch.empty_like(k_ring), torch.empty_like(v_ring)


cached_window_attention = define_op(
    "cached_window_attention", _window_attention, fake=_window_fake, decomposition=_window_attention
)


# -- linear attention -----------------------------------------------------------------------------------
def _linear_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_state: torch.Tensor,
    k_sum: torch.Tensor,
    key_mask: torch.Tensor,
    cache_position: torch.Tensor,
    feature_map: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, t, _ = query.shape
    hkv, dv = key.shape[1], value.shape[-1]
    qf = apply_feature_map(query, feature_map)
    real = key_mask.index_select(1, cache_position).to(query.dtype)  # [B, T]
    kf = apply_feature_map(key, feature_map) * real[:, None, :, None]  # padding keys add nothing
    f = qf.shape[-1]
    qg = qf.reshape(b, hkv, h // hkv, t, f)  # [B, Hkv, G, T, F]
    scores = (qg @ kf.unsqueeze(2).transpose(-1, -2)).tril()  # [B, Hkv, G, T, T] causal inside
    num = scores @ value.unsqueeze(2) + qg @ kv_state.unsqueeze(2)  # [B, Hkv, G, T, Dv]
    den = scores.sum(-1) + (qg @ k_sum[:, :, None, :, None]).squeeze(-1)
    out = (num / (den.unsqueeze(-1) + KERNEL_EPS)).reshape(b, h, t, dv)
    return out, kv_state + kf.transpose(-1, -2) @ value, k_sum + kf.sum(2)


def _linear_fake(query, key, value, kv_state, k_sum, key_mask, cache_position, feature_map):
    out = query.new_empty((*query.shape[:-1], value.shape[-1]))
    return out, torch.empty_like(kv_state), torch.empty_like(k_sum)


cached_linear_attention = define_op(
    "cached_linear_attention", _linear_step, fake=_linear_fake, decomposition=_linear_step
)
