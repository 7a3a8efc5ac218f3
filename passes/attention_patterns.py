"""Sparse attention patterns: which keys each query attends, and what attending them means.

`SparsePattern.allowed` is THE definition every path follows (the CPU kernels, FlexAttention on
CUDA, the decomposition); `sparse_attention_reference` — dense SDPA with the pattern's explicit
mask — is the semantics they all match and the `sparse_attention` op's decomposition.

- `sliding-window`: keys at distance < `window` (causal: the `window` most recent keys, the query
  itself included; bidirectional: up to 2·window−1 keys around it);
- `block-sparse`: sequence cut into blocks of `block`; a query attends its own block and the one
  before (and, bidirectional, the one after), plus `global_tokens` global tokens: the first tokens,
  which every query attends and which (bidirectional) attend every key;
- `random`: block-sparse plus `random_blocks` key blocks per query block, picked by a seeded
  integer hash (deterministic, the same on every path and at every length);
- `strided` (Sparse Transformer, "fixed" summary columns): keys at distance < `stride` plus every
  key at a position ≡ stride−1 (mod stride).
Causal patterns never attend a later key. A query row that may attend no key at all (a padded
query whose whole window is padding) outputs zeros.

Score modifiers (`ScoreMod`: soft-capping) act on the scaled scores before any bias or mask, in
dense `score_mod_attention` and in `sparse_attention` alike; `apply_score_mod` and its derivative
`score_mod_slope` are THE definitions (a new modifier adds a case to both and a name to SCORE_MODS).

Everything here is written in standard ATen ops that export and the targets' importers accept
(integer constants as int64 tensors, `maximum` rather than an int64 clamp): the decomposition runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

aten = torch.ops.aten

SPARSE_PATTERNS = ("sliding-window", "block-sparse", "random", "strided")


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


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as an additive one: 0 where allowed, -inf elsewhere."""
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


def sparse_attention_reference(
    query,
    key,
    value,
    key_padding_mask,
    pattern: SparsePattern,
    scale: float,
    bias: torch.Tensor | None = None,
    score_mod: ScoreMod | None = None,
):
    """Dense SDPA with the pattern's explicit mask; rows that may attend nothing give zeros. This is
    the op's decomposition (standard ATen ops only) and the semantics every fast path matches.

    `bias` (float, broadcastable to (B, H, L, S)) is added to the scaled scores of the keys the
    pattern keeps; its -inf entries exclude a key as the pattern does (a row left with no key: zeros).
    `score_mod` (soft-capping) modifies the scaled scores first, as `score_mod_attention` does:
    softmax(mod(q·kᵀ·scale) + bias, over the kept keys) @ v."""
    n = query.shape[-2]
    allowed = dense_pattern_mask(pattern, n, key_padding_mask, device=query.device)
    if bias is not None:
        allowed = allowed & (bias != float("-inf"))
    alive = allowed.any(-1, keepdim=True)
    key, value = repeat_kv(query, key, value)
    if score_mod is not None:
        return _modified_reference(query, key, value, allowed, alive, scale, bias, score_mod)
    if bias is None:
        # a dead row attends everything (no NaN anywhere, in forward or backward), then is zeroed
        mask = allowed | ~alive
    else:  # the bias where allowed, -inf elsewhere; 0 on dead rows (no NaN), which are zeroed
        mask = torch.where(alive, torch.where(allowed, bias, float("-inf")), 0.0).to(query.dtype)
    out = aten.scaled_dot_product_attention.default(query, key, value, attn_mask=mask, scale=scale)
    return torch.where(alive, out, torch.zeros_like(out))


def _modified_reference(query, key, value, allowed, alive, scale, bias, score_mod: ScoreMod):
    """softmax(mod(q·kᵀ·scale) + bias) @ v over the allowed keys, written out (SDPA has no modifier);
    the softmax in float32 at least, as `score_mod_attention_reference`'s. Dead rows: zeros."""
    scores = score_mod((query @ key.transpose(-2, -1)) * scale)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    # blocked keys -inf; a dead row's scores 0 (no NaN, forward or backward), its output zeroed
    scores = torch.where(alive, torch.where(allowed, scores, float("-inf")), 0.0)
    probs = torch.softmax(scores, -1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    out = probs @ value
    return torch.where(alive, out, torch.zeros_like(out))


def repeat_kv(query, key, value):
    """K/V with each head repeated for the query heads that share it (grouped-query attention)."""
    groups = query.shape[-3] // key.shape[-3]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)


# -- score modifiers: dense attention whose scores pass through a function before softmax ------------
SCORE_MODS = ("softcap",)
"""`softcap`: tanh soft-capping of the scaled scores, `s -> cap·tanh(s / cap)` (Gemma-2, Grok), before
any mask is added."""


def check_score_mod(score_mod: str, mod_value: float) -> None:
    if score_mod not in SCORE_MODS:
        raise ValueError(f"unknown score modifier {score_mod!r} (known: {', '.join(SCORE_MODS)})")
    if score_mod == "softcap" and not mod_value > 0:
        raise ValueError(f"softcap needs a cap > 0, got {mod_value}")


def apply_score_mod(scores: torch.Tensor, score_mod: str, mod_value: float) -> torch.Tensor:
    """The modifier on scaled scores (THE definition: the CPU kernels and FlexAttention's score_mod
    call it too)."""
    if score_mod == "softcap":
        return torch.tanh(scores / mod_value) * mod_value
    raise ValueError(f"unknown score modifier {score_mod!r} (known: {', '.join(SCORE_MODS)})")


def score_mod_slope(modified: torch.Tensor, score_mod: str, mod_value: float) -> torch.Tensor:
    """d mod(s)/ds, written in terms of mod(s) (what the CPU kernels' backward has at hand):
    softcap: 1 − (m/cap)² = 1 − tanh²(s/cap). A new modifier adds its case here and in `apply_score_mod`."""
    if score_mod == "softcap":
        return 1.0 - (modified / mod_value).square()
    raise ValueError(f"unknown score modifier {score_mod!r} (known: {', '.join(SCORE_MODS)})")


@dataclass(frozen=True)
class ScoreMod:
    """A score modifier as the ops' (score_mod, mod_value) arguments name it, checked; called on
    scaled scores (before any bias or mask), `slope` its derivative from the modified scores."""

    name: str
    value: float

    def __post_init__(self):
        check_score_mod(self.name, self.value)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return apply_score_mod(scores, self.name, self.value)

    def slope(self, modified: torch.Tensor) -> torch.Tensor:
        return score_mod_slope(modified, self.name, self.value)

    def __str__(self) -> str:
        return f"{self.name}={self.value}"

    @staticmethod
    def of(score_mod: str | None, mod_value: float) -> ScoreMod | None:
        """The modifier the op arguments name; None for `score_mod=None` (no modifier)."""
        return None if score_mod is None else ScoreMod(str(score_mod), float(mod_value))


def masked_scores(scores: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool, row0=0) -> torch.Tensor:
    """Scores with SDPA's mask semantics: a bool mask attends where True, a float mask is added;
    `is_causal` blocks keys after the query (top-left aligned; `row0` is the first query's index)."""
    if is_causal:
        n, s = scores.shape[-2:]
        rows = torch.arange(n, device=scores.device).unsqueeze(-1) + row0
        scores = scores.masked_fill(torch.arange(s, device=scores.device) > rows, float("-inf"))
    if attn_mask is None:
        return scores
    if attn_mask.dtype == torch.bool:
        return scores.masked_fill(attn_mask.logical_not(), float("-inf"))
    return scores + attn_mask


def score_mod_attention_reference(
    query, key, value, attn_mask, score_mod: str, mod_value: float, scale: float, is_causal: bool, enable_gqa: bool
):
    """softmax(mask(mod(q·kᵀ·scale))) @ v in standard ATen ops: the `score_mod_attention` op's
    semantics and its decomposition. The softmax runs in float32 at least (as the eager models do)."""
    if enable_gqa and query.dim() >= 3:
        key, value = repeat_kv(query, key, value)
    scores = apply_score_mod((query @ key.transpose(-2, -1)) * scale, score_mod, mod_value)
    scores = masked_scores(scores, attn_mask, is_causal)
    probs = torch.softmax(scores, -1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    return probs @ value
