"""Efficient attention operators that the `attention` pass puts in place of dense SDPA.

    torch.ops.optpipe.sparse_attention(q, k, v, key_padding_mask, pattern, causal, scale,
                                       window, block, global_tokens, random_blocks, stride, seed)
    torch.ops.optpipe.linear_attention(q, k, v, key_padding_mask, feature_map, causal, chunk)
    torch.ops.optpipe.performer_attention(q, k, v, key_padding_mask, projection, causal, chunk,
                                          scale, redraw)
    torch.ops.optpipe.linformer_attention(q, k, v, key_padding_mask, proj_key, proj_value, scale)

Shapes follow SDPA: q `(B, H, L, D)`, k/v `(B, Hkv, S, D)` with `H % Hkv == 0` (grouped-query
attention: K/V are never repeated on the fast paths), out `(B, H, L, Dv)`. `key_padding_mask` is
None or a bool `(B|1, S)`, True where a key may be attended (an encoder's padding mask). A query
row that may attend no key at all (a padded query whose whole window is padding) outputs zeros, on
every path.

Each op is defined once through `optpipe.ops.define_op`: eager kernels, fake impl, autograd, a FLOP
formula and a decomposition into standard ATen ops that every target falls back on.

Sparse patterns (exact softmax attention over a subset of keys; `SparsePattern.allowed` is THE
definition, the decomposition builds exactly that mask):

- `sliding-window`: keys at distance < `window` (causal: the `window` most recent keys, the query
  itself included; bidirectional: up to 2·window−1 keys around it);
- `block-sparse`: sequence cut into blocks of `block`; a query attends its own block and the one
  before (and, bidirectional, the one after), plus `global_tokens` global tokens: the first tokens,
  which every query attends and which (bidirectional) attend every key;
- `random`: block-sparse plus `random_blocks` key blocks per query block, picked by a seeded
  integer hash (deterministic, the same on every path and at every length);
- `strided` (Sparse Transformer, "fixed" summary columns): keys at distance < `stride` plus every
  key at a position ≡ stride−1 (mod stride).
Causal patterns never attend a later key.

Fast CPU path: block-banded. Queries are cut into blocks; block b attends the keys of an
overlapping window (an `as_strided` view over the padded K/V, so windows are not copied). One K/V
head at a time (its padded K/V in a buffer reused across heads), the forward runs ATen's CPU flash
kernel over all query blocks as the heads of one batch with a small per-block band mask; extra key
sets (global keys, strided summary keys, random blocks) are separate flash calls merged exactly
through their log-sum-exp. The backward is flash-style
from the saved output and log-sum-exp (kept on the output, recomputed if missing): per head and key
set it recomputes P = exp(QKᵀ·scale + mask − lse) with batched GEMMs over tiles of blocks and forms
dV = PᵀdO, dS = P∘(dO·Vᵀ − rowsum(dO∘O)), dQ = dS·K·scale, dK = dSᵀ·Q·scale (ATen's flash backward
is several times slower than GEMMs on these short, masked blocks). The tiles' scores and grads live
in per-call buffers reused across heads and tiles: large allocations come as fresh mmap pages, and
faulting them in cost as much as the GEMMs. Autograd keeps q, k, v, out and lse only: O(L·D); the
O(L·window) scores exist for one tile at a time. Short sequences (and windows covering the whole
sequence) take one dense flash call instead; with `window >= length` it is exactly causal SDPA.

CUDA path: FlexAttention with a block mask made from the same pattern (compiled once per process);
backward through FlexAttention's autograd. Written for CUDA machines, guarded by device; the CPU
test suite does not run it.

Kernel (linear) attention: `out_i = φ(q_i)·Σ_j φ(k_j)v_jᵀ / φ(q_i)·Σ_j φ(k_j)`, with φ = elu+1 or
relu (`linear`), or FAVOR+ positive orthogonal random features (`performer`). Causal through the
chunked prefix-sum form: within a chunk the masked quadratic form, across chunks the states
Σφ(k)vᵀ (F, Dv) and Σφ(k) (F) of the chunks before — never an O(L·F·D) cumulative sum. (Traced with
a symbolic length, as the decomposition is, causal kernel attention takes the masked quadratic form
of the same sums: chunk padding needs length arithmetic export cannot prove.) Eagerly, the causal
form runs head by head (`_causal_heads_forward`): batched GEMMs over the chunks for the states, one
GEMM with a triangular ones matrix for their exclusive prefix sums (a running add past 64
chunks), the feature map applied per
head into reused buffers and the output written in place, so nothing full-size but the output is
allocated. Its analytic backward (`_causal_heads_backward`) shares each intra-chunk score matrix
between two products and applies φ' itself (elu+1: min(φ, 1)); the linear op keeps its output and
normaliser for it (O(L·D)), performer recomputes its features. (`chunked_causal_product` is the
same product with stacked heads, every chunk in one batched GEMM.) Linformer
projects K and V along the sequence with learned `(k, max_len)` matrices (`E[:, :S]`; projected
keys that see no token are ignored), then runs dense attention over those k keys. The backward of
the other ops recomputes the forward from the saved inputs (no activations are kept between the
two).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from optpipe.ops import define_op

aten = torch.ops.aten

SPARSE_PATTERNS = ("sliding-window", "block-sparse", "random", "strided")
FEATURE_MAPS = ("elu", "relu")

# Tuning of the CPU path (benchmarks/attention.py, AVX-512 CPU, fp32, one thread): ATen's flash
# forward is fastest on short query blocks; the GEMM backward on 64-query blocks (a 256 window then
# computes 320 keys per query: 78% useful). The softmax statistics are per query, so the two passes
# may use different blockings of the same pattern.
FORWARD_BLOCK = 32
BACKWARD_BLOCK = 64
DENSE_MAX_LEN = 256
_BACKWARD_TILE = 1 << 18
"""Score elements (1 MiB of fp32) per GEMM tile of the backward: query blocks are processed in
tiles of about this many (rows x keys), so the scores, their grads and the K/V grads stay in cache."""
"""Sequences up to this length run as one dense masked flash call (fewer, larger GEMMs win there)."""
_MASK_CACHE_SIZE = 64
_EPS = 1e-6
_LOG2E = 1.0 / math.log(2.0)


def _exp_(t: torch.Tensor) -> torch.Tensor:
    """`t.exp_()` computed as exp2(t·log2 e), for the eager CPU kernels: ATen's CPU exp runs ~3x
    slower than its exp2 (1.1 vs 0.33 ns per fp32 element here, AVX-512). Rounding t·log2 e costs
    a relative error of at most ~|t|·6e-8 (8e-7 for the |t| < 14 where softmax weights exceed
    1e-6; exp(-inf) stays 0)."""
    return t.mul_(_LOG2E).exp2_()


# -- patterns ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparsePattern:
    """Which keys each query attends; `allowed(i, j, n)` is the definition every path follows."""

    kind: str
    causal: bool
    window: int = 0
    block: int = 64
    global_tokens: int = 0
    random_blocks: int = 0
    stride: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in SPARSE_PATTERNS:
            raise ValueError(f"unknown sparse pattern {self.kind!r} (known: {', '.join(SPARSE_PATTERNS)})")
        if self.kind == "sliding-window" and self.window < 1:
            raise ValueError(f"sliding-window needs window >= 1, got {self.window}")
        if self.kind == "strided" and self.stride < 1:
            raise ValueError(f"strided needs stride >= 1, got {self.stride}")
        if self.kind in ("block-sparse", "random") and self.block < 1:
            raise ValueError(f"{self.kind} needs block >= 1, got {self.block}")
        if self.global_tokens < 0 or self.random_blocks < 0:
            raise ValueError("global_tokens and random_blocks must be >= 0")

    # token-level band for sliding-window / strided; None for the block-local kinds
    @property
    def band(self) -> int | None:
        return self.window if self.kind == "sliding-window" else self.stride if self.kind == "strided" else None

    @property
    def global_keys(self) -> int:
        return self.global_tokens if self.kind in ("block-sparse", "random") else 0

    @property
    def random_count(self) -> int:
        return self.random_blocks if self.kind == "random" else 0

    def local(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Local part of the pattern (causality included) for broadcastable position tensors."""
        if self.band is not None:
            d = i - j
            return ((d >= 0) & (d < self.band)) if self.causal else ((d < self.band) & (d > -self.band))
        d = _block_of(i, self.block) - _block_of(j, self.block)
        return ((d >= 0) & (d <= 1) & (j <= i)) if self.causal else ((d >= -1) & (d <= 1))

    def summary(self, j: torch.Tensor) -> torch.Tensor:
        """Strided pattern's summary columns: j ≡ stride-1 (mod stride)."""
        return torch.remainder(j, _const(self.stride, j)) == self.stride - 1

    def random_picks(self, n_blocks, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(picks, valid), both (n_blocks, random_blocks): the key blocks each query block draws.

        Causal picks come from the blocks before the local ones (b < qb-1); bidirectional ones from
        all blocks. An integer hash of (seed, query block, draw) keeps them deterministic and
        expressible in ATen ops at any (symbolic) length."""
        r = self.random_count
        qb = torch.arange(n_blocks, device=device).unsqueeze(1)
        draw = torch.arange(r, device=device).unsqueeze(0)
        m = 2147483648  # 2**31: keeps every product below 2**63
        mod = _const(m, qb)  # int64 tensor constants: some importers type bare ints as int32
        x = torch.remainder(
            qb * _const(40503, qb) + draw * _const(9973, qb) + _const((self.seed % m) * 69069 % m + 1, qb), mod
        )
        for _ in range(3):
            x = torch.remainder(x * _const(1103515245, qb) + _const(12345, qb), mod)
        h = torch.div(x, _const(65536, qb), rounding_mode="floor")
        if self.causal:
            candidates = qb - 1
            valid = (candidates > 0).expand(-1, r)
            picks = torch.remainder(h, torch.maximum(candidates, _const(1, candidates)))  # (no clamp: TVM legalizes an
            # int64 clamp through an infinite bound)
        else:
            # n_blocks as a (1, 1) tensor (exporters take tensor divisors, not symbolic ints; a max,
            # not `qb[-1:]`, whose sliced shape TVM cannot prove is 1)
            total = qb.max(0, keepdim=True).values + 1
            picks = torch.remainder(h, total)
            valid = picks >= 0  # every draw is valid
        return picks, valid

    def random_table(self, n_blocks, device=None) -> torch.Tensor:
        """(n_blocks, n_blocks) bool: key block kb is a random pick of query block qb."""
        picks, valid = self.random_picks(n_blocks, device)
        kb = torch.arange(n_blocks, device=device)
        return ((picks.unsqueeze(-1) == kb) & valid.unsqueeze(-1)).any(1)

    def allowed(self, i: torch.Tensor, j: torch.Tensor, n, random_table: torch.Tensor | None = None) -> torch.Tensor:
        """May query i attend key j (sequence length n)? Broadcastable integer position tensors."""
        ok = self.local(i, j)
        g = self.global_keys
        if g:
            ok = ok | (j < g) | ((i < g) if not self.causal else torch.zeros_like(ok))
        if self.kind == "strided":
            ok = ok | self.summary(j)
        if self.random_count:
            if random_table is None:
                nb = (n + self.block - 1) // self.block
                random_table = self.random_table(nb, device=i.device)
            if i.dim() == 2 and j.dim() == 2 and i.shape[1] == 1 and j.shape[0] == 1:
                # (L, 1) x (1, S) positions: two gathers (simpler for importers than 2-d indexing)
                rows = random_table.index_select(0, _block_of(i[:, 0], self.block))
                ok = ok | rows.index_select(1, _block_of(j[0], self.block))
            else:
                ok = ok | random_table[_block_of(i, self.block), _block_of(j, self.block)]
        if self.causal:
            ok = ok & (j <= i)
        return ok & (j < n) & (i < n)

    def covers_all(self, n: int) -> bool:
        """The pattern allows every (causal) pair at length n: dense attention computes it exactly."""
        if self.band is not None:
            return self.band >= n
        return (n + self.block - 1) // self.block <= 2

    def keys_per_query(self, n: int) -> float:
        """Average number of keys a query attends at length n (for FLOP counts)."""
        if n <= 0:
            return 0.0
        if self.band is not None:
            w = min(self.band, n)
            if self.causal:
                pairs = w * n - w * (w - 1) / 2
            else:
                pairs = n + 2 * (w - 1) * n - (w - 1) * w
            keys = pairs / n
            if self.kind == "strided":
                keys += (n // self.stride) * (0.5 if self.causal else 1.0)
            return min(keys, (n + 1) / 2 if self.causal else n)
        local = (1.5 if self.causal else 3.0) * self.block
        keys = local + self.global_keys + self.random_count * self.block * (0.5 if self.causal else 1.0)
        return min(keys, (n + 1) / 2 if self.causal else float(n))


def _const(value: int, like: torch.Tensor) -> torch.Tensor:
    """A 0-d integer constant of `like`'s dtype. Made by `arange` rather than `full`: importers type
    bare python ints as int32 (wrong next to int64 positions, and 2**31 overflows), and TVM cannot
    legalize a 0-d `full`."""
    return torch.arange(value, value + 1, dtype=like.dtype, device=like.device).reshape(())


def _block_of(pos: torch.Tensor, block: int) -> torch.Tensor:
    return torch.div(pos, _const(block, pos), rounding_mode="floor")


def _pattern(
    pattern: str, causal: bool, window: int, block: int, global_tokens: int, random_blocks: int, stride: int, seed: int
) -> SparsePattern:
    return SparsePattern(
        pattern, bool(causal), int(window), int(block), int(global_tokens), int(random_blocks), int(stride), int(seed)
    )


def _very_negative_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


# -- the reference: dense attention with the pattern's explicit mask ---------------------------------
def dense_pattern_mask(
    pattern: SparsePattern, n, key_padding_mask: torch.Tensor | None = None, device=None
) -> torch.Tensor:
    """The pattern as an explicit bool mask `(L, S)` or `(B, 1, L, S)` with a key padding mask."""
    pos = torch.arange(n, device=device)
    allowed = pattern.allowed(pos.unsqueeze(1), pos.unsqueeze(0), n)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].to(torch.bool)
    return allowed


def sparse_attention_reference(query, key, value, key_padding_mask, pattern: SparsePattern, scale: float):
    """Dense SDPA with the pattern's explicit mask; rows that may attend nothing give zeros. This is
    the op's decomposition (standard ATen ops only) and the semantics every fast path matches."""
    n = query.shape[-2]
    allowed = dense_pattern_mask(pattern, n, key_padding_mask, device=query.device)
    alive = allowed.any(-1, keepdim=True)
    # a dead row attends everything (no NaN anywhere, in forward or backward), then is zeroed
    allowed = allowed | ~alive
    key, value = _repeat_kv(query, key, value)
    out = aten.scaled_dot_product_attention.default(query, key, value, attn_mask=allowed, scale=scale)
    return torch.where(alive, out, torch.zeros_like(out))


def _repeat_kv(query, key, value):
    groups = query.shape[-3] // key.shape[-3]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)


# -- CPU: block-banded flash ---------------------------------------------------------------------------
_flash = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _cpu_fast_path(query: torch.Tensor) -> bool:
    return (
        query.device.type == "cpu"
        and _flash is not None
        and _flash_backward is not None
        and query.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    )


@dataclass
class _Layout:
    """Queries of (B, H, N, D) as (B·Hkv, nb, G·Bs, D): the G query heads sharing a K/V head are
    stacked in each block's rows, so K/V are read once per group and never repeated."""

    batch: int
    kv_heads: int
    groups: int
    n: int
    block: int

    @property
    def n_blocks(self) -> int:
        return -(-self.n // self.block)

    @property
    def padded(self) -> int:
        return self.n_blocks * self.block

    @property
    def rows(self) -> int:
        return self.groups * self.block

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, ...) -> (B·Hkv, nb, G·Bs, ...)."""
        tail = x.shape[3:]
        if self.padded != self.n:
            pad = [0, 0] * len(tail) + [0, self.padded - self.n]
            x = F.pad(x, pad)
        x = x.reshape(self.batch, self.kv_heads, self.groups, self.n_blocks, self.block, *tail)
        if self.groups > 1:
            x = x.transpose(2, 3)
        return x.reshape(self.batch * self.kv_heads, self.n_blocks, self.rows, *tail)

    def from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B·Hkv, nb, G·Bs, ...) -> (B, H, N, ...)."""
        tail = x.shape[3:]
        x = x.reshape(self.batch, self.kv_heads, self.n_blocks, self.groups, self.block, *tail)
        if self.groups > 1:
            x = x.transpose(2, 3)
        x = x.reshape(self.batch, self.kv_heads * self.groups, self.padded, *tail)
        return x[:, :, : self.n] if self.padded != self.n else x

    def row_positions(self, device) -> torch.Tensor:
        """(nb, G·Bs) query position of each layout row."""
        r = torch.arange(self.rows, device=device) % self.block
        return torch.arange(self.n_blocks, device=device).unsqueeze(1) * self.block + r


@dataclass
class _KeySet:
    """One set of keys per query block. The sets of a pattern partition its keys (each allowed key is
    in exactly one set), so their softmaxes merge exactly through the log-sum-exp. A set holds its
    additive mask and says how to view its keys in one (padded) K/V head and where their grads go."""

    name: str
    mask: torch.Tensor  # additive (Xm|1, nb, R, S); (Xm|1, 1, nb·R, S) when flat
    alive: torch.Tensor  # bool (Xm|1, nb, R) / (Xm|1, 1, nb·R): rows with an allowed key here
    flat: bool  # one key list shared by every row (rows: the whole layout flattened)
    kv: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    """(kp, vp) padded (T, D) rows of one K/V head -> (K, V) (nb|1, S, D), views where possible"""
    scatter: Callable[..., None]
    """(dkp, dvp, dK, dV, first): add the set's key/value grads of query blocks first.. (all rows
    when flat) into one head's padded grads"""

    def head_mask(self, x: int) -> torch.Tensor:
        return self.mask[x if self.mask.shape[0] > 1 else 0]

    def head_alive(self, x: int) -> torch.Tensor:
        return self.alive[x if self.alive.shape[0] > 1 else 0]

    def rows(self, t: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """(nb, R, ...) of one head -> this set's row batching."""
        return t.reshape(1, layout.n_blocks * layout.rows, *t.shape[2:]) if self.flat else t

    def unrows(self, t: torch.Tensor, layout: _Layout) -> torch.Tensor:
        return t.reshape(layout.n_blocks, layout.rows, *t.shape[2:]) if self.flat else t


class _MaskCache:
    """Band masks depend only on (pattern, length, blocking, dtype, device): layers and the
    backward reuse them. Masks with a key padding mask are data and never cached."""

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


_MASKS = _MaskCache(_MASK_CACHE_SIZE)


def _pad_mask(key_padding_mask: torch.Tensor | None, before: int, total: int):
    if key_padding_mask is None:
        return None
    kpm = key_padding_mask.to(torch.bool)
    return F.pad(kpm, (before, total - before - kpm.shape[-1]), value=False)


def _expand_rows(mask: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """(Bk, ...) per-batch mask -> (Bk·Hkv, ...) to line up with the layout's first dim."""
    if mask.shape[0] == 1:
        return mask
    return (
        mask.unsqueeze(1)
        .expand(mask.shape[0], layout.kv_heads, *mask.shape[1:])
        .reshape(mask.shape[0] * layout.kv_heads, *mask.shape[1:])
    )


def _windows(t: torch.Tensor, n_blocks: int, block: int, span: int) -> torch.Tensor:
    """(T, D) rows -> (nb, span, D): block b's window starts at row b·block (overlapping, no copy)."""
    return t.as_strided((n_blocks, span, t.shape[-1]), (block * t.stride(0), t.stride(0), t.stride(1)))


def _key_sets(pattern: SparsePattern, layout: _Layout, key_padding_mask, dtype, device):
    """(sets, offset, total): the key sets that together cover the pattern, each key attended
    exactly once, over K/V heads padded to `total` rows with the sequence starting at `offset`."""
    bs, nb, n = layout.block, layout.n_blocks, layout.n
    before, after = _neighbour_blocks(pattern, bs)
    span = (before + 1 + after) * bs
    offset = before * bs
    total = (before + nb + after) * bs
    rows = layout.row_positions(device)  # (nb, R)
    local_keys = (torch.arange(nb, device=device).unsqueeze(1) - before) * bs + torch.arange(span, device=device)
    kpm = _pad_mask(key_padding_mask, offset, total)  # (Bk, total) or None
    flat_rows = rows.reshape(1, -1)  # (1, nb·R)
    sets: list[_KeySet] = []

    def additive(name, build_allowed, keys_of_kpm):
        """(mask, alive): cached when there is no key padding mask."""

        def build():
            allowed = build_allowed()
            return _very_negative_mask(allowed, dtype), allowed.any(-1)

        if kpm is None:
            key = (pattern, name, n, bs, layout.groups, dtype, str(device))
            return _MASKS.get(key, build)
        allowed = build_allowed() & keys_of_kpm()
        allowed = _expand_rows(allowed, layout)
        return _very_negative_mask(allowed, dtype), allowed.any(-1)

    # 1. local keys: a window of blocks around each query block (overlapping views of K/V)
    def local_allowed():
        j = local_keys.unsqueeze(1)  # (nb, 1, span)
        ok = pattern.local(rows.unsqueeze(-1), j) & (j >= 0) & (j < n)
        return ok.unsqueeze(0)  # (1, nb, R, span)

    def local_kv(kp, vp):
        return _windows(kp, nb, bs, span), _windows(vp, nb, bs, span)

    def local_scatter(dkp, dvp, dk, dv, first=0):
        m = dk.shape[0]  # query blocks first .. first+m
        for t in range(before + 1 + after):  # window block t of query block b is key block b + t
            lo = (first + t) * bs
            dkp[lo : lo + m * bs].view(m, bs, -1).add_(dk[:, t * bs : (t + 1) * bs])
            dvp[lo : lo + m * bs].view(m, bs, -1).add_(dv[:, t * bs : (t + 1) * bs])

    mask, alive = additive("local", local_allowed, lambda: kpm.unfold(1, span, bs).unsqueeze(2))
    sets.append(_KeySet("local", mask, alive, False, local_kv, local_scatter))

    def shared(name, positions, sel, extra_allowed=None):
        """A key list every query row may draw from (global tokens, strided summary columns)."""

        def allowed():
            i = flat_rows.unsqueeze(-1)
            ok = ~pattern.local(i, positions) & ((positions <= i) if pattern.causal else True)
            return ok.unsqueeze(0)  # (1, 1, nb·R, S)

        mask, alive = additive(name, allowed, lambda: kpm[:, sel][:, None, None, :])

        def kv(kp, vp):
            return kp[sel].unsqueeze(0), vp[sel].unsqueeze(0)

        def scatter(dkp, dvp, dk, dv, first=0):
            dkp[sel].add_(dk[0])
            dvp[sel].add_(dv[0])

        sets.append(_KeySet(name, mask, alive, True, kv, scatter))

    # 2. global keys (block-sparse, random): the first g tokens, for queries not already local to them
    g = min(pattern.global_keys, n)
    if g:
        shared("global", torch.arange(g, device=device), slice(offset, offset + g))

    # 3. strided summary keys: every stride-th position (a strided view)
    if pattern.kind == "strided" and n // pattern.stride > 0:
        s, count = pattern.stride, n // pattern.stride
        first = offset + s - 1
        shared("summary", torch.arange(count, device=device) * s + s - 1, slice(first, first + (count - 1) * s + 1, s))

    # 4. random key blocks: gathered per query block (block kinds use the layout's own blocking)
    r = pattern.random_count
    if r:
        picks, valid = pattern.random_picks(nb, device)
        earlier = torch.ones(r, r, dtype=torch.bool, device=device).tril(-1)
        duplicate = ((picks.unsqueeze(-1) == picks.unsqueeze(-2)) & earlier).any(-1)
        valid = valid & ~duplicate
        flat_picks = (picks * valid).reshape(-1)
        rpos = (picks.unsqueeze(-1) * bs + torch.arange(bs, device=device)).reshape(nb, r * bs)
        rvalid = valid.unsqueeze(-1).expand(nb, r, bs).reshape(nb, r * bs)

        def random_allowed():
            i, j = rows.unsqueeze(-1), rpos.unsqueeze(1)
            ok = rvalid.unsqueeze(1) & ~pattern.local(i, j) & (j >= g) & (j < n)
            if pattern.causal:
                ok = ok & (j <= i)
            return ok.unsqueeze(0)

        def random_kpm():
            keys = kpm[:, offset : offset + nb * bs].reshape(kpm.shape[0], nb, bs)
            return keys.index_select(1, flat_picks).reshape(kpm.shape[0], nb, 1, r * bs)

        mask, alive = additive("random", random_allowed, random_kpm)

        # (whole blocks as the rows of a 2-d view, gathered by `embedding`: a row copy, several
        # times faster on CPU than index_select's element loop)
        def random_kv(kp, vp):
            return tuple(
                F.embedding(flat_picks, t[offset : offset + nb * bs].view(nb, -1)).view(nb, r * bs, t.shape[-1])
                for t in (kp, vp)
            )

        def random_scatter(dkp, dvp, dk, dv, first=0):
            m = dk.shape[0]
            picks_here = flat_picks[first * r : (first + m) * r]
            for grads, blocks in ((dkp, dk), (dvp, dv)):
                grads[offset : offset + nb * bs].view(nb, -1).index_add_(0, picks_here, blocks.reshape(m * r, -1))

        sets.append(_KeySet("random", mask, alive, False, random_kv, random_scatter))
    return sets, offset, total


def _blocking(pattern: SparsePattern, forward: bool) -> int:
    if pattern.band is None:
        return pattern.block
    return FORWARD_BLOCK if forward else BACKWARD_BLOCK


class _Workspace:
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


def _global_rows(pattern: SparsePattern, n: int) -> int:
    return 0 if pattern.causal else min(pattern.global_keys, n)


def _rows_attending_all(query, key, value, key_padding_mask, g, groups):
    """Bidirectional global tokens (rows < g) attend every key: the inputs of one dense flash call,
    with the G query heads of a K/V head stacked as rows (K/V not repeated)."""
    b, hkv = key.shape[0], key.shape[1]
    q = query[:, :, :g].reshape(b, hkv, groups * g, query.shape[-1])
    mask = None
    if key_padding_mask is not None:
        allowed = key_padding_mask.to(torch.bool)[:, None, None, :].expand(-1, 1, q.shape[-2], -1)
        mask = _very_negative_mask(allowed, query.dtype)
    return q, key, value, mask


def _neighbour_blocks(pattern, block: int) -> tuple[int, int]:
    """Key blocks a query block reaches before and after itself: enough to cover the band, or one
    neighbour each way for block-local patterns (none after for causal ones)."""
    reach = -(-(pattern.band - 1) // block) if pattern.band is not None else 1
    return reach, (0 if pattern.causal else reach)


def _sparse_forward_cpu(query, key, value, key_padding_mask, pattern: SparsePattern, scale: float):
    """(out (B, H, N, Dv), lse (B, H, N); float32, float64 for float64 inputs): per K/V head, one
    ATen CPU flash call per key set over all query blocks (as the heads of one batch), merged
    through the log-sum-exp. (One call over all K/V heads as the batch measured slower: it pads
    every head's K/V into fresh memory at once.)"""
    b, h, n, _ = query.shape
    hkv = key.shape[1]
    groups = h // hkv
    if n <= DENSE_MAX_LEN or pattern.covers_all(n):
        return _dense_forward_cpu(query, key, value, key_padding_mask, pattern, scale)
    layout = _Layout(b, hkv, groups, n, _blocking(pattern, forward=True))
    sets, offset, total = _key_sets(pattern, layout, key_padding_mask, query.dtype, query.device)
    q_blocks = layout.to_blocks(query)  # (X, nb, R, D)
    x_count = b * hkv
    k3, v3 = key.reshape(x_count, n, key.shape[-1]), value.reshape(x_count, n, value.shape[-1])
    out_blocks = query.new_empty(x_count, layout.n_blocks, layout.rows, value.shape[-1])
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32  # as ATen's flash kernel
    lse_blocks = torch.empty(x_count, layout.n_blocks, layout.rows, dtype=lse_dtype, device=query.device)
    ws = _Workspace(query.dtype, query.device)
    for x in range(x_count):  # one K/V head at a time: only its padded copy and scores are alive
        kp, vp = ws.padded("kp", k3[x], offset, total), ws.padded("vp", v3[x], offset, total)
        outs, lses = [], []
        for s in sets:
            k_s, v_s = s.kv(kp, vp)
            o, l = _flash(
                s.rows(q_blocks[x], layout).unsqueeze(0),
                k_s.unsqueeze(0),
                v_s.unsqueeze(0),
                0.0,
                False,
                attn_mask=s.head_mask(x).unsqueeze(0),
                scale=scale,
            )
            o, l = s.unrows(o[0], layout), s.unrows(l[0], layout)
            if len(sets) > 1:
                l = l.masked_fill(~s.unrows(s.head_alive(x), layout), float("-inf"))
            outs.append(o)
            lses.append(l)
        if len(sets) == 1:
            out_blocks[x] = outs[0]
            lse_blocks[x] = lses[0]
            continue
        lse = torch.logsumexp(torch.stack(lses), dim=0)
        finite = torch.isfinite(lse)
        safe = torch.where(finite, lse, torch.zeros_like(lse))
        acc = out_blocks[x].zero_()
        for o, l in zip(outs, lses):  # softmax over the union = each set's softmax weighted by its mass
            w = torch.exp(l - safe).masked_fill_(~finite, 0.0)
            acc.addcmul_(o, w.unsqueeze(-1).to(o.dtype))
        lse_blocks[x] = lse
    out, lse = layout.from_blocks(out_blocks), layout.from_blocks(lse_blocks.unsqueeze(-1)).squeeze(-1)
    g = _global_rows(pattern, n)
    if g:
        q, k4, v4, mask = _rows_attending_all(query, key, value, key_padding_mask, g, groups)
        og, lg = _flash(q, k4, v4, attn_mask=mask, scale=scale)
        out = out.clone()
        lse = lse.clone()
        out[:, :, :g] = og.reshape(b, h, g, -1)
        lse[:, :, :g] = lg.reshape(b, h, g)
    return out.contiguous(), lse.contiguous()


def _sparse_backward_cpu(grad, query, key, value, key_padding_mask, pattern: SparsePattern, scale, out, lse):
    """Flash-style backward from the saved (out, lse), as batched GEMMs per K/V head and key set:
    P = exp(QKᵀ·scale + mask − lse), dV = PᵀdO, dS = P∘(dO·Vᵀ − rowsum(dO∘O)), dQ = dS·K·scale,
    dK = dSᵀ·Q·scale. Only one head's (nb, R, S) scores are alive at a time."""
    b, h, n, d = query.shape
    hkv = key.shape[1]
    groups = h // hkv
    if n <= DENSE_MAX_LEN or pattern.covers_all(n):
        return _dense_backward_cpu(grad, query, key, value, key_padding_mask, pattern, scale, out, lse)
    layout = _Layout(b, hkv, groups, n, _blocking(pattern, forward=False))
    g = _global_rows(pattern, n)
    grad_rest = grad
    if g:
        grad_rest = grad.clone()
        grad_rest[:, :, :g] = 0
    cdt = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
    sets, offset, total = _key_sets(pattern, layout, key_padding_mask, cdt, query.device)
    q_blocks, g_blocks, o_blocks = (layout.to_blocks(t) for t in (query, grad_rest, out))
    l_blocks = layout.to_blocks(lse.unsqueeze(-1))  # (X, nb, R, 1)
    # rows that attend nothing: any finite lse makes their probabilities exp(-inf) = 0
    l_blocks = torch.where(torch.isfinite(l_blocks), l_blocks, torch.zeros_like(l_blocks)).to(cdt)
    x_count = b * hkv
    k3, v3 = key.reshape(x_count, n, d), value.reshape(x_count, n, value.shape[-1])
    dq_blocks = torch.empty(q_blocks.shape, dtype=cdt, device=query.device)
    dk3 = torch.empty(k3.shape, dtype=key.dtype, device=key.device)
    ws = _Workspace(cdt, query.device)
    dv3 = torch.empty(v3.shape, dtype=value.dtype, device=value.device)
    for x in range(x_count):
        kp, vp = ws.padded("kp", k3[x], offset, total), ws.padded("vp", v3[x], offset, total)
        dkp, dvp = ws.get("dkp", kp.shape).zero_(), ws.get("dvp", vp.shape).zero_()
        qx = torch.mul(q_blocks[x].to(cdt), scale, out=ws.get("qx", q_blocks.shape[1:]))  # (nb, R, D)
        gx = g_blocks[x].to(cdt)
        prod = torch.mul(gx, o_blocks[x].to(cdt), out=ws.get("prod", gx.shape))
        deltax = torch.sum(prod, -1, keepdim=True, out=ws.get("delta", gx.shape[:-1] + (1,)))  # rowsum(dO∘O)
        dqx = dq_blocks[x]
        for i, s in enumerate(sets):
            k_all, v_all = s.kv(kp, vp)
            mask_all = s.head_mask(x)
            # tiles of query blocks whose scores fit in cache (flat sets: all rows at once)
            step = layout.n_blocks if s.flat else max(1, _BACKWARD_TILE // (layout.rows * k_all.shape[1]))
            for b0 in range(0, layout.n_blocks, step):
                b1 = min(b0 + step, layout.n_blocks)
                if s.flat:
                    k_s, v_s, mask = k_all, v_all, mask_all
                    qr, gr, lr, dr, dqr = (s.rows(t, layout) for t in (qx, gx, l_blocks[x], deltax, dqx))
                else:
                    k_s, v_s = k_all[b0:b1], v_all[b0:b1]
                    mask = mask_all[b0:b1] if mask_all.shape[0] > 1 else mask_all
                    qr, gr, lr, dr, dqr = (t[b0:b1] for t in (qx, gx, l_blocks[x], deltax, dqx))
                m, r, keys = qr.shape[0], qr.shape[1], k_s.shape[1]
                # (mask − lse) first: one pass over the tile, then the GEMM accumulates into it
                p = _exp_(torch.sub(mask, lr, out=ws.get("p", (m, r, keys))).baddbmm_(qr, k_s.transpose(1, 2)))
                dv_s = torch.bmm(p.transpose(1, 2), gr, out=ws.get("dv_s", (m, keys, gr.shape[-1])))
                ds = torch.bmm(gr, v_s.transpose(1, 2), out=ws.get("ds", (m, r, keys))).sub_(dr).mul_(p)
                if i == 0:
                    torch.bmm(ds, k_s, out=dqr)
                else:
                    dqr.baddbmm_(ds, k_s)
                dk_s = torch.bmm(ds.transpose(1, 2), qr, out=ws.get("dk_s", (m, keys, qr.shape[-1])))
                s.scatter(dkp, dvp, dk_s, dv_s, b0)
        dqx.mul_(scale)
        dk3[x] = dkp[offset : offset + n]
        dv3[x] = dvp[offset : offset + n]
    dq = layout.from_blocks(dq_blocks).to(query.dtype)
    dk, dv = dk3.reshape(key.shape), dv3.reshape(value.shape)
    if g:
        q, k4, v4, mask = _rows_attending_all(query, key, value, key_padding_mask, g, groups)
        og = out[:, :, :g].reshape(q.shape[:-1] + (out.shape[-1],))
        lg = lse[:, :, :g].reshape(q.shape[:-1])
        gg = grad[:, :, :g].reshape(og.shape).to(query.dtype)
        dqg, dkg, dvg = _flash_backward(gg, q, k4, v4, og, lg, 0.0, False, attn_mask=mask, scale=scale)
        dq = dq.clone()
        dq[:, :, :g] += dqg.reshape(b, h, g, -1)
        dk = dk + dkg
        dv = dv + dvg
    return dq, dk, dv


def _dense_inputs(query, key, value, key_padding_mask, pattern: SparsePattern):
    """One flash call over the whole sequence: (key, value, attn_mask, is_causal)."""
    n = query.shape[-2]
    key, value = _repeat_kv(query, key, value)  # short sequences only: the copies are small
    if pattern.covers_all(n) and key_padding_mask is None:
        return key, value, None, pattern.causal
    allowed = dense_pattern_mask(pattern, n, key_padding_mask, device=query.device)
    if allowed.dim() == 2:
        allowed = allowed[None, None]
    return key, value, _very_negative_mask(allowed, query.dtype), False


def _dense_forward_cpu(query, key, value, key_padding_mask, pattern, scale):
    k, v, mask, causal = _dense_inputs(query, key, value, key_padding_mask, pattern)
    return _flash(query, k, v, 0.0, causal, attn_mask=mask, scale=scale)


def _dense_backward_cpu(grad, query, key, value, key_padding_mask, pattern, scale, out, lse):
    k, v, mask, causal = _dense_inputs(query, key, value, key_padding_mask, pattern)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    dq, dk, dv = _flash_backward(grad.to(query.dtype), query, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        dk = dk.unflatten(1, (key.shape[1], groups)).sum(2)
        dv = dv.unflatten(1, (key.shape[1], groups)).sum(2)
    return dq, dk, dv


# -- CUDA: FlexAttention ------------------------------------------------------------------------------
@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _sparse_flex(query, key, value, key_padding_mask, pattern: SparsePattern, scale: float):
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


# -- generic recompute-in-backward ---------------------------------------------------------------------
def _recompute_backward(forward: Callable, ctx, grad, tensor_inputs: dict):
    """Gradients of `forward(**inputs)` w.r.t. the differentiable inputs, recomputed from the saved
    inputs alone (nothing else is kept between forward and backward)."""
    names = [name for name in tensor_inputs if ctx.needs_grad.get(name)]
    with torch.enable_grad():
        inputs = {name: (t.detach().requires_grad_(True) if name in names else t) for name, t in tensor_inputs.items()}
        out = forward(**inputs)
        grads = torch.autograd.grad(out, [inputs[n] for n in names], grad, allow_unused=True)
    return dict(zip(names, grads))


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
) -> torch.Tensor:
    p = _pattern(pattern, causal, window, block, global_tokens, random_blocks, stride, seed)
    _check_shapes("sparse_attention", query, key, value, key_padding_mask)
    if query.is_cuda:
        return _sparse_flex(query, key, value, key_padding_mask, p, scale)
    if _cpu_fast_path(query):
        out, lse = _sparse_forward_cpu(query, key, value, key_padding_mask, p, scale)
        if query.requires_grad or key.requires_grad or value.requires_grad:
            out._optpipe_lse = lse  # the backward's softmax statistics; recomputed when missing
        return out
    return sparse_attention_reference(query, key, value, key_padding_mask, p, scale).contiguous()


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


def _sparse_setup(ctx, inputs, output):
    args = dict(zip(_SPARSE_ARGS, inputs))
    ctx.pattern = _pattern(
        *(args[n] for n in ("pattern", "causal", "window", "block", "global_tokens", "random_blocks", "stride", "seed"))
    )
    ctx.scale = args["scale"]
    ctx.needs_grad = {
        "query": ctx.needs_input_grad[0],
        "key": ctx.needs_input_grad[1],
        "value": ctx.needs_input_grad[2],
    }
    lse = getattr(output, "_optpipe_lse", None)
    saved = [args["query"], args["key"], args["value"], output]
    ctx.has_mask = args["key_padding_mask"] is not None
    if ctx.has_mask:
        saved.append(args["key_padding_mask"])
    if lse is not None:
        saved.append(lse)
    ctx.has_lse = lse is not None
    ctx.save_for_backward(*saved)


def _sparse_backward(ctx, grad):
    saved = list(ctx.saved_tensors)
    query, key, value, out = saved[:4]
    kpm = saved[4] if ctx.has_mask else None
    lse = saved[-1] if ctx.has_lse else None
    p, scale = ctx.pattern, ctx.scale
    if _cpu_fast_path(query) and not query.is_cuda:
        if lse is None:
            out, lse = _sparse_forward_cpu(query, key, value, kpm, p, scale)
        dq, dk, dv = _sparse_backward_cpu(grad.contiguous(), query, key, value, kpm, p, scale, out, lse)
    else:
        fwd = _sparse_flex if query.is_cuda else sparse_attention_reference
        grads = _recompute_backward(
            lambda query, key, value: fwd(query, key, value, kpm, p, scale),
            ctx,
            grad,
            {"query": query, "key": key, "value": value},
        )
        dq, dk, dv = grads.get("query"), grads.get("key"), grads.get("value")
    return (
        dq if ctx.needs_grad["query"] else None,
        dk if ctx.needs_grad["key"] else None,
        dv if ctx.needs_grad["value"] else None,
    ) + (None,) * (len(_SPARSE_ARGS) - 3)


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
):
    p = _pattern(pattern, causal, window, block, global_tokens, random_blocks, stride, seed)
    return sparse_attention_reference(query, key, value, key_padding_mask, p, scale)


def _arg(args, kwargs, names, name, default=None):
    i = names.index(name)
    return args[i] if len(args) > i else kwargs.get(name, default)


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


def _chunk_mask(c: int, gq: int, gk: int, reverse: bool, dtype, device) -> torch.Tensor:
    """(gq·c, gk·c) 0/1: causal (or anti-causal) inside a chunk, tiled over the stacked heads."""

    def build():
        tri = torch.ones(c, c, dtype=dtype, device=device)
        return (tri.triu() if reverse else tri.tril()).repeat(gq, gk)

    return _MASKS.get(("chunk", c, gq, gk, reverse, dtype, str(device)), build)


def _to_chunks(t: torch.Tensor, c: int) -> torch.Tensor:
    """(X, G, n, E) -> (X·nc, G·c, E): the G heads' rows of each chunk stacked (n a multiple of c)."""
    x, g, n, e = t.shape
    if g == 1:
        return t.reshape(x * (n // c), c, e)
    return t.reshape(x, g, n // c, c, e).transpose(1, 2).reshape(x * (n // c), g * c, e)


def _from_chunks(t: torch.Tensor, x: int, g: int, nc: int, c: int) -> torch.Tensor:
    e = t.shape[-1]
    if g == 1:
        return t.reshape(x, 1, nc * c, e)
    return t.reshape(x, nc, g, c, e).transpose(1, 2).reshape(x, g, nc * c, e)


def _exclusive_scan(chunks: torch.Tensor, reverse: bool) -> torch.Tensor:
    """(X, nc, M) -> sum over the chunks before each chunk (after it, when `reverse`). A running
    in-place add over the nc chunk rows: ATen's cumsum over a middle dim is a slow strided scan."""
    out = torch.empty_like(chunks)
    nc = chunks.shape[1]
    order = range(nc - 1, -1, -1) if reverse else range(nc)
    prev = None
    for i in order:
        if prev is None:
            out[:, i].zero_()
        else:
            torch.add(out[:, prev], chunks[:, prev], out=out[:, i])
        prev = i
    return out


def chunked_causal_product(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int, reverse: bool = False
) -> torch.Tensor:
    """`Y[g, i] = Σ_g' Σ_{j ≤ i} (q[g, i]·k[g', j]) v[g', j]` (`j ≥ i` when `reverse`) for q
    (X, Gq, n, F), k (X, Gk, n, F), v (X, Gk, n, E) -> (X, Gq, n, E), in chunks of `chunk`: inside
    a chunk the masked quadratic form, across chunks the running sum of the chunks' kᵀv states
    (nc states of F×E, never one per position). Every chunk of every head in one batched GEMM."""
    x, gq, n, f = q.shape
    gk, e = k.shape[1], v.shape[-1]
    c = max(1, min(chunk, n))
    nc = -(-n // c)
    if nc * c != n:  # zero rows: padded keys add nothing, padded queries are cut off
        q, k, v = (F.pad(t, (0, 0, 0, nc * c - n)) for t in (q, k, v))
    qc, kc, vc = _to_chunks(q, c), _to_chunks(k, c), _to_chunks(v, c)
    state = _exclusive_scan(torch.bmm(kc.transpose(1, 2), vc).view(x, nc, f * e), reverse)
    y = torch.bmm(qc, state.view(x * nc, f, e))
    scores = torch.bmm(qc, kc.transpose(1, 2)).mul_(_chunk_mask(c, gq, gk, reverse, q.dtype, q.device))
    y.baddbmm_(scores, vc)
    y = _from_chunks(y, x, gq, nc, c)
    return y[:, :, :n] if nc * c != n else y


class _HeadFeatures:
    """Writes one head's features φ(x) (keys: times the key padding mask) into a reused (P, F)
    buffer whose rows past the sequence stay zero, and gives φ' from φ for the backward: elu+1 has
    φ' = min(φ, 1) (φ = x+1 > 1 for x > 0, φ = eˣ ≤ 1 otherwise), relu φ' = [φ > 0]; None: the
    inputs are the features already (φ' = 1)."""

    def __init__(self, name: str | None):
        if name is not None and name not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {name!r} (known: {', '.join(FEATURE_MAPS)})")
        self.name = name
        self._relu: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, buf: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        out = buf[:n]
        if self.name == "elu":  # elu(x) + 1 = exp(min(x, 0)) + max(x, 0): 2.5x faster than ATen's elu
            if self._relu is None or self._relu.shape != x.shape:
                self._relu = torch.empty_like(x, memory_format=torch.contiguous_format)
            _exp_(torch.clamp(x, max=0, out=out)).add_(torch.clamp(x, min=0, out=self._relu))
        elif self.name == "relu":
            torch.clamp(x, min=0, out=out)
        else:
            out.copy_(x)
        if mask is not None:
            out.mul_(mask)
        return buf

    def chain(self, dphi: torch.Tensor, phi: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor):
        """out = dφ·φ'(x)·mask, with φ the unmasked features of x."""
        if self.name == "elu":
            torch.clamp(phi, max=1, out=out).mul_(dphi)
        elif self.name == "relu":
            torch.mul(phi > 0, dphi, out=out)
        else:
            out.copy_(dphi)
        if mask is not None:
            out.mul_(mask)


def _head_layout(n: int, chunk: int):
    c = max(1, min(chunk, n))
    nc = -(-n // c)
    return c, nc, nc * c


def _prefix_matrix(nc: int, reverse: bool, dtype, device) -> torch.Tensor:
    """(nc, nc) strictly lower (upper, `reverse`) ones: one GEMM gives every chunk the sum of the
    chunks before (after) it."""

    def build():
        tri = torch.ones(nc, nc, dtype=dtype, device=device)
        return tri.triu(1) if reverse else tri.tril(-1)

    return _MASKS.get(("prefix", nc, reverse, dtype, str(device)), build)


def _chunk_prefix(states: torch.Tensor, out: torch.Tensor, reverse: bool) -> None:
    """out[i] = Σ states[j] over the chunks j before i (after i, `reverse`): one GEMM with a
    triangular ones matrix for up to 64 chunks, a running add beyond (the GEMM's nc² work grows)."""
    nc = states.shape[0]
    flat, acc = states.view(nc, -1), out.view(nc, -1)
    if nc <= 64:
        torch.mm(_prefix_matrix(nc, reverse, states.dtype, states.device), flat, out=acc)
        return
    order = range(nc - 1, -1, -1) if reverse else range(nc)
    prev = None
    for i in order:
        if prev is None:
            acc[i].zero_()
        else:
            torch.add(acc[prev], flat[prev], out=acc[i])
        prev = i


def _causal_heads_forward(query, key, value, key_padding_mask, fmap: str | None, chunk: int, eps: float):
    """(out (B, H, L, Dv), den (B·Hkv, G, L, 1)) of causal kernel attention with features φ = `fmap`
    (None: query/key are the features), one head at a time through reused (L, ·) buffers: per K/V
    head the chunk states φkᵀv, Σφk (batched GEMMs) and their exclusive prefix sums (one GEMM with
    a triangular ones matrix), then per query head, in the chunk layout,
    num = φq·state + tril(φq φkᵀ)·v and den = φq·Σφk + rowsum(tril(φq φkᵀ)), written straight into
    the output. Every intermediate is one head's size and reused: a fresh large allocation faults
    its pages in, which costs more than the arithmetic that fills it."""
    b, h, n, f = query.shape
    hkv, dv = key.shape[1], value.shape[-1]
    groups = h // hkv
    c, nc, p = _head_layout(n, chunk)
    phi = _HeadFeatures(fmap)
    dt = query.dtype
    kbuf = query.new_zeros(p, f)
    qbuf = query.new_zeros(p, f)
    vbuf = query.new_zeros(p, dv) if p != n else None
    ybuf = query.new_empty(p, dv) if p != n else None
    states = query.new_empty(nc, f, dv)
    prefix = query.new_empty(nc, f, dv)
    zsum = query.new_empty(nc, f, 1)
    zpre = query.new_empty(nc, f, 1)
    scores = query.new_empty(nc, c, c)
    dsum = query.new_empty(nc, c, 1)
    out = query.new_empty(b, h, n, dv)
    den = query.new_empty(b * hkv, groups, n, 1)
    dpad = query.new_empty(p, 1) if p != n else None
    kc, qc = kbuf.view(nc, c, f), qbuf.view(nc, c, f)
    for bi in range(b):
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[bi if key_padding_mask.shape[0] > 1 else 0].to(dt).unsqueeze(-1)
        for hk in range(hkv):
            phi(key[bi, hk], kbuf, mask)
            if vbuf is None:
                vc = value[bi, hk].contiguous().view(nc, c, dv)
            else:
                vbuf[:n].copy_(value[bi, hk])
                vc = vbuf.view(nc, c, dv)
            torch.bmm(kc.transpose(1, 2), vc, out=states)
            torch.sum(kc, 1, keepdim=True, out=zsum.view(nc, 1, f))
            _chunk_prefix(states, prefix, False)
            _chunk_prefix(zsum, zpre, False)
            for g in range(groups):
                hq = hk * groups + g
                phi(query[bi, hq], qbuf)
                y = (out[bi, hq] if ybuf is None else ybuf).view(nc, c, dv)
                torch.bmm(qc, prefix, out=y)
                torch.bmm(qc, kc.transpose(1, 2), out=scores).tril_()
                y.baddbmm_(scores, vc)
                d = den[bi * hkv + hk, g]
                dfull = (d if dpad is None else dpad).view(nc, c, 1)
                torch.sum(scores, -1, keepdim=True, out=dsum)
                # φq·Σφk per chunk as (1, F)·(F, c) rows: this batched GEMV form ran ~4x faster
                # than the (c, F)·(F, 1) one (dfull's memory is the same either way)
                torch.bmm(zpre.transpose(1, 2), qc.transpose(1, 2), out=dfull.view(nc, 1, c))
                dfull.add_(dsum).add_(eps)
                if ybuf is None:
                    out[bi, hq].div_(d)
                else:
                    d.copy_(dpad[:n])
                    torch.div(ybuf[:n], d, out=out[bi, hq])
    return out, den


def _causal_heads_backward(
    grad, query, key, value, key_padding_mask, fmap: str | None, out, den, chunk: int, needs=(True, True, True)
):
    """(dq, dk, dv) of `_causal_heads_forward` from its saved output and normaliser (grads w.r.t. the
    raw query/key: through φ when `fmap` is set), one head at a time. With a = g/den,
    dY = [a, −rowsum(a∘out)] (the grads of [numerator, normaliser]) and v' = [v, 1], per chunk:
      dφq = dY·Σ_before v'ᵀφk + tril(dY v'ᵀ)·φk
      dφk = v'·Σ_after dYᵀφq  + tril(dY v'ᵀ)ᵀ·φq
      dv  = φk·Σ_after φqᵀa   + tril(φq φkᵀ)ᵀ·a
    — the intra-chunk score matrices are shared by two products each, and Σ φqᵀa is the first Dv
    columns of Σ φqᵀdY."""
    b, h, n, f = query.shape
    hkv, dv = key.shape[1], value.shape[-1]
    groups = h // hkv
    c, nc, p = _head_layout(n, chunk)
    phi = _HeadFeatures(fmap)
    dt = query.dtype
    need_q, need_k, need_v = needs
    kbuf, qbuf = query.new_zeros(p, f), query.new_zeros(p, f)
    vbuf = query.new_zeros(p, dv + 1)
    vbuf[:n, dv] = 1
    dybuf = query.new_zeros(p, dv + 1)
    kv_states = query.new_empty(nc, dv + 1, f)  # v'ᵀφk per chunk
    before = query.new_empty(nc, dv + 1, f)
    qy_states = query.new_empty(nc, f, dv + 1)  # φqᵀdY per chunk (summed over the group)
    after = query.new_empty(nc, f, dv + 1)
    s_dy = query.new_empty(nc, c, c)
    s_qk = query.new_empty(nc, c, c)
    dphiq = query.new_empty(nc, c, f)
    dphik = query.new_empty(nc, c, f)
    dvbuf = query.new_empty(nc, c, dv) if need_v and p != n else None
    scratch = query.new_empty(n, dv)
    phik_raw = query.new_empty(n, f) if need_k and fmap is not None and key_padding_mask is not None else None
    dq = torch.empty_like(query) if need_q else None
    dk = torch.empty_like(key) if need_k else None
    dvalue = torch.empty_like(value) if need_v else None
    kc, qc, vc, dyc = (t.view(nc, c, -1) for t in (kbuf, qbuf, vbuf, dybuf))
    for bi in range(b):
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[bi if key_padding_mask.shape[0] > 1 else 0].to(dt).unsqueeze(-1)
        for hk in range(hkv):
            phi(key[bi, hk], kbuf)  # unmasked φk first (φ' of the keys) ...
            if phik_raw is not None:  # (without a mask: φk itself)
                phik_raw.copy_(kbuf[:n])
            if mask is not None:
                kbuf[:n].mul_(mask)  # ... then the masked features
            vbuf[:n, :dv].copy_(value[bi, hk])
            if need_q:
                torch.bmm(vc.transpose(1, 2), kc, out=kv_states)
                _chunk_prefix(kv_states, before, False)
            for g in range(groups):
                hq = hk * groups + g
                d = den[bi * hkv + hk, g]
                a = dybuf[:n, :dv]
                torch.div(grad[bi, hq], d, out=a)
                torch.sum(torch.mul(a, out[bi, hq], out=scratch), -1, keepdim=True, out=dybuf[:n, dv:]).neg_()
                phi(query[bi, hq], qbuf)
                if need_v:  # dv straight into the gradient (a buffer only when chunks pad the length)
                    dvc = (dvalue[bi, hk] if dvbuf is None else dvbuf).view(nc, c, dv)
                torch.bmm(dyc, vc.transpose(1, 2), out=s_dy).tril_()
                if need_q:
                    torch.bmm(dyc, before, out=dphiq).baddbmm_(s_dy, kc)
                    phi.chain(dphiq.view(p, f)[:n], qbuf[:n], None, dq[bi, hq])
                if (need_k or need_v) and g == 0:
                    torch.bmm(qc.transpose(1, 2), dyc, out=qy_states)
                elif need_k or need_v:
                    qy_states.baddbmm_(qc.transpose(1, 2), dyc)
                if need_k:
                    if g == 0:
                        torch.bmm(s_dy.transpose(1, 2), qc, out=dphik)
                    else:
                        dphik.baddbmm_(s_dy.transpose(1, 2), qc)
                if need_v:
                    torch.bmm(qc, kc.transpose(1, 2), out=s_qk).tril_()
                    if g == 0:
                        torch.bmm(s_qk.transpose(1, 2), dyc[..., :dv], out=dvc)
                    else:
                        dvc.baddbmm_(s_qk.transpose(1, 2), dyc[..., :dv])
            if need_k or need_v:
                _chunk_prefix(qy_states, after, True)
            if need_k:
                dphik.baddbmm_(vc, after.transpose(1, 2))
                if fmap is None:
                    torch.mul(dphik.view(p, f)[:n], mask, out=dk[bi, hk]) if mask is not None else dk[bi, hk].copy_(
                        dphik.view(p, f)[:n]
                    )
                else:
                    phi.chain(dphik.view(p, f)[:n], kbuf[:n] if phik_raw is None else phik_raw, mask, dk[bi, hk])
            if need_v:
                dvc.baddbmm_(kc, after[..., :dv])
                if dvbuf is not None:
                    dvalue[bi, hk].copy_(dvbuf.view(p, dv)[:n])
    return dq, dk, dvalue


def _causal_kernel_forward(qf, kf, value, chunk: int, eps: float):
    """(out (B, H, L, Dv), den (B·Hkv, G, L, 1)) from features qf (B, H, L, F), kf (B, Hkv, L, F):
    with v' = [v, 1], one chunked causal product φq·Σφkᵀv' gives the numerator and the normaliser
    together (`_causal_heads_forward`, head by head)."""
    return _causal_heads_forward(qf, kf, value, None, None, chunk, eps)


def _causal_kernel_backward(grad, qf, kf, value, out, den, chunk: int, needs=(True, True, True)):
    """(dφq, dφk, dv) of `_causal_kernel_forward` from its saved output and normaliser."""
    return _causal_heads_backward(grad, qf, kf, value, None, None, out, den, chunk, needs)


class _CausalKernelAttention(torch.autograd.Function):
    """Eager causal kernel attention with the analytic backward above; saves φq, φk, v, out and
    the normaliser: O(L·(F+D)), nothing per chunk pair or per position."""

    @staticmethod
    def forward(ctx, qf, kf, value, chunk: int, eps: float):
        out, den = _causal_kernel_forward(qf, kf, value, chunk, eps)
        ctx.chunk = chunk
        ctx.save_for_backward(qf, kf, value, out, den)
        return out

    @staticmethod
    def backward(ctx, grad):
        qf, kf, value, out, den = ctx.saved_tensors
        return _causal_kernel_backward(grad, qf, kf, value, out, den, ctx.chunk, ctx.needs_input_grad[:3]) + (
            None,
            None,
        )


def kernel_attention(
    qf: torch.Tensor, kf: torch.Tensor, value: torch.Tensor, causal: bool, chunk: int, eps: float = _EPS
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
        return _CausalKernelAttention.apply(qf, kf, value, chunk, eps)
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
    if name == "elu":  # in place on elu's fresh output (its backward reads the input)
        return F.elu(x).add_(1) if _eager() else F.elu(x) + 1
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"unknown feature map {name!r} (known: {', '.join(FEATURE_MAPS)})")


def _masked_keys(kf: torch.Tensor, key_padding_mask) -> torch.Tensor:
    if key_padding_mask is None:
        return kf
    return kf * key_padding_mask.to(kf.dtype)[:, None, :, None]


_feature_map = feature_map  # the linear op's `feature_map` argument shadows the function


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
        out, den = _causal_heads_forward(query, key, value, key_padding_mask, feature_map, chunk, _EPS)
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
    dq, dk, dv = _causal_heads_backward(grad.contiguous(), query, key, value, kpm, name, out, den, chunk, needs)
    found = {"query": dq, "key": dk, "value": dv}
    return tuple(found.get(n) for n in _LINEAR_ARGS)


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
    return torch.exp(logits) / math.sqrt(projection.shape[0]) + _EPS


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
    seen = (proj_key[:, :s].abs().sum(-1) > 0).unsqueeze(0)  # projected keys that see a token
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

ATTENTION_OPS = (sparse_attention, linear_attention, performer_attention, linformer_attention)

__all__ = [
    "ATTENTION_OPS",
    "FEATURE_MAPS",
    "SPARSE_PATTERNS",
    "SparsePattern",
    "dense_pattern_mask",
    "favor_features",
    "kernel_attention",
    "linear_attention",
    "linear_attention_math",
    "linformer_attention",
    "linformer_attention_math",
    "orthogonal_random_features",
    "performer_attention",
    "performer_attention_math",
    "sparse_attention",
    "sparse_attention_reference",
]
