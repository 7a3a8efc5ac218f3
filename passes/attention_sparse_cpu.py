"""The eager CPU kernel of `optpipe.sparse_attention`: block-banded flash, forward and backward.

Queries are cut into blocks; block b attends the keys of an overlapping window (an `as_strided`
view over the padded K/V, so windows are not copied). One K/V head at a time (its padded K/V in a
buffer reused across heads), the forward runs ATen's CPU flash kernel over all query blocks as the
heads of one batch with a small per-block band mask; extra key sets (global keys, strided summary
keys, random blocks) are separate flash calls merged exactly through their log-sum-exp.

The backward is flash-style from the saved output and log-sum-exp: per head and key set it
recomputes P = exp(QKᵀ·scale + mask − lse) with batched GEMMs over tiles of blocks and forms
dV = PᵀdO, dS = P∘(dO·Vᵀ − rowsum(dO∘O)), dQ = dS·K·scale, dK = dSᵀ·Q·scale (ATen's flash backward
is several times slower than GEMMs on these short, masked blocks). The tiles' scores and grads live
in per-call buffers reused across heads and tiles: large allocations come as fresh mmap pages, and
faulting them in cost as much as the GEMMs. Autograd keeps q, k, v, out and lse only: O(L·D); the
O(L·window) scores exist for one tile at a time.

An additive score bias (ALiBi, a relative-position bias: broadcastable to (B, H, L, S)) is gathered
per K/V head and key set for the set's rows and keys (`_ScoreBias`) and added to the set's mask, in
the forward and in the backward's recomputed P; the bias itself gets no gradient here (the op's
recompute path differentiates a learned one).

A score modifier (soft-capping; ATen's flash kernel takes none) turns each flash call into the same
attention with the scores written out (`attend`: GEMM, modifier, mask, log-sum-exp, GEMM) and the
backward's recomputed P into exp(mod(QKᵀ·scale) + mask − lse), dS taking the modifier's slope; the
key sets, blocking and merging are unchanged.

Short sequences (and windows covering the whole sequence) take one dense flash call instead; with
`window >= length` and no bias it is exactly causal SDPA. Shapes as the op's (see `attention_ops`); the
semantics are `attention_patterns.sparse_attention_reference`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention_cpu import CONSTANT_MASKS, Workspace, exp_
from .attention_patterns import ScoreMod, SparsePattern, additive_mask, dense_pattern_mask, repeat_kv

aten = torch.ops.aten

# Tuning of the CPU path (benchmarks/attention.py, AVX-512 CPU, fp32, one thread): ATen's flash
# forward is fastest on short query blocks; the GEMM backward on 64-query blocks (a 256 window then
# computes 320 keys per query: 78% useful). The softmax statistics are per query, so the two passes
# may use different blockings of the same pattern.
FORWARD_BLOCK = 32
BACKWARD_BLOCK = 64
DENSE_MAX_LEN = 256
"""Sequences up to this length run as one dense masked flash call (fewer, larger GEMMs win there)."""
BACKWARD_TILE = 1 << 18
"""Score elements (1 MiB of fp32) per GEMM tile of the backward: query blocks are processed in
tiles of about this many (rows x keys), so the scores, their grads and the K/V grads stay in cache."""

_flash = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_flash_backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def attend(query, key, value, mask, scale: float, causal: bool = False, score_mod: ScoreMod | None = None):
    """(out, lse) of softmax(mod(q·kᵀ·scale) + mask) @ v: ATen's CPU flash kernel without a modifier;
    with one (flash takes none), the scores written out, softmax statistics in float32 at least. A row
    with no allowed key gives 0 and lse -inf."""
    if score_mod is None:
        return _flash(query, key, value, 0.0, causal, attn_mask=mask, scale=scale)
    scores = _modified_scores(query, key, mask, scale, causal, score_mod)
    lse = torch.logsumexp(scores, -1)
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    return torch.matmul(p.to(value.dtype), value), lse


def attend_backward(grad, query, key, value, out, lse, mask, scale: float, score_mod: ScoreMod | None = None):
    """(dq, dk, dv) of `attend` from its (out, lse): ATen's flash backward without a modifier; with one,
    dS = P∘(dO·Vᵀ − rowsum(dO∘O))∘mod'(s), dQ = dS·K·scale, dK = dSᵀ·Q·scale, dV = PᵀdO."""
    if score_mod is None:
        return _flash_backward(grad, query, key, value, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    cdt = torch.promote_types(query.dtype, torch.float32)
    q, k, v, g = (t.to(cdt) for t in (query, key, value, grad))
    modified = score_mod(torch.matmul(q, k.transpose(-2, -1)).mul_(scale))
    slope = score_mod.slope(modified)
    scores = modified if mask is None else modified + mask
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1).to(cdt))
    dv = torch.matmul(p.transpose(-2, -1), g)
    delta = (g * out.to(cdt)).sum(-1, keepdim=True)
    ds = (torch.matmul(g, v.transpose(-2, -1)) - delta).mul_(p).mul_(slope)
    dq = torch.matmul(ds, k).mul_(scale)
    dk = torch.matmul(ds.transpose(-2, -1), q).mul_(scale)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)


def _modified_scores(query, key, mask, scale: float, causal: bool, score_mod: ScoreMod) -> torch.Tensor:
    cdt = torch.promote_types(query.dtype, torch.float32)
    scores = score_mod(torch.matmul(query.to(cdt), key.to(cdt).transpose(-2, -1)).mul_(scale))
    if causal:
        n, s = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(n, s, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
    return scores if mask is None else scores + mask.to(cdt)


def supports_cpu_kernel(query: torch.Tensor) -> bool:
    """The query is on the CPU, in a dtype ATen's CPU flash kernels take, and they exist here."""
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
    positions: torch.Tensor  # key positions (nb, S); (S,) when flat (out of range where padded)
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


class _ScoreBias:
    """The op's score bias (None: none) gathered for one K/V head x and one key set: (m, R, S) for
    query blocks first..last, or (1, nb·R, S) for a flat set, to add to the set's mask."""

    def __init__(self, bias: torch.Tensor | None, layout: _Layout, dtype, device):
        self.bias = None if bias is None else bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).to(dtype)
        self.layout = layout
        if bias is not None:
            self.rows = layout.row_positions(device).clamp(max=layout.n - 1)  # padded rows read the last one
            self.row_heads = torch.arange(layout.rows, device=device) // layout.block  # the group's head of a row

    def head(self, x: int) -> torch.Tensor:
        """(G|1, L|1, S|1): the bias of the query heads sharing K/V head x."""
        layout, bias = self.layout, self.bias
        b, kv = divmod(x, layout.kv_heads)
        t = bias[b if bias.shape[0] > 1 else 0]
        return t[kv * layout.groups : (kv + 1) * layout.groups] if t.shape[0] > 1 else t

    def add(self, s: _KeySet, x: int, mask: torch.Tensor, first: int = 0, last: int | None = None) -> torch.Tensor:
        if self.bias is None:
            return mask
        t, layout = self.head(x), self.layout
        last = layout.n_blocks if s.flat or last is None else last
        first = 0 if s.flat else first
        zero = torch.zeros((), dtype=torch.long, device=t.device)
        heads = self.row_heads[None, :, None] if t.shape[0] > 1 else zero
        rows = self.rows[first:last, :, None] if t.shape[1] > 1 else zero
        keys = s.positions if s.flat else s.positions[first:last]
        keys = keys.clamp(0, layout.n - 1)[..., None, :] if t.shape[2] > 1 else zero
        gathered = t[heads, rows, keys].expand(last - first, layout.rows, s.positions.shape[-1])
        return mask + (s.rows(gathered, layout) if s.flat else gathered)


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


class _KeySetBuilder:
    """Builds the key sets of one call over K/V heads padded to `total` rows, the sequence starting
    at row `offset`: the local window of every query block, then (by pattern) the global tokens,
    the strided summary columns and the random blocks. Their masks are cached when there is no key
    padding mask."""

    def __init__(self, pattern: SparsePattern, layout: _Layout, key_padding_mask, dtype, device):
        self.pattern, self.layout, self.dtype, self.device = pattern, layout, dtype, device
        bs, nb = layout.block, layout.n_blocks
        self.before, self.after = _neighbour_blocks(pattern, bs)
        self.span = (self.before + 1 + self.after) * bs
        self.offset = self.before * bs
        self.total = (self.before + nb + self.after) * bs
        self.rows = layout.row_positions(device)  # (nb, R)
        self.kpm = _pad_mask(key_padding_mask, self.offset, self.total)  # (Bk, total) or None

    def additive(self, name, build_allowed, keys_of_kpm):
        """(mask, alive): cached when there is no key padding mask."""
        layout, dtype = self.layout, self.dtype

        def build():
            allowed = build_allowed()
            return additive_mask(allowed, dtype), allowed.any(-1)

        if self.kpm is None:
            key = (self.pattern, name, layout.n, layout.block, layout.groups, dtype, str(self.device))
            return CONSTANT_MASKS.get(key, build)
        allowed = build_allowed() & keys_of_kpm()
        allowed = _expand_rows(allowed, layout)
        return additive_mask(allowed, dtype), allowed.any(-1)

    def local(self) -> _KeySet:
        """A window of blocks around each query block (overlapping views of K/V)."""
        pattern, rows, kpm = self.pattern, self.rows, self.kpm
        bs, nb, n = self.layout.block, self.layout.n_blocks, self.layout.n
        before, after, span = self.before, self.after, self.span
        local_keys = (torch.arange(nb, device=self.device).unsqueeze(1) - before) * bs + torch.arange(
            span, device=self.device
        )

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

        mask, alive = self.additive("local", local_allowed, lambda: kpm.unfold(1, span, bs).unsqueeze(2))
        return _KeySet("local", local_keys, mask, alive, False, local_kv, local_scatter)

    def shared(self, name: str, positions: torch.Tensor, sel: slice) -> _KeySet:
        """A key list every query row may draw from (global tokens, strided summary columns): the
        keys at `positions`, rows `sel` of the padded K/V."""
        pattern, kpm = self.pattern, self.kpm
        flat_rows = self.rows.reshape(1, -1)  # (1, nb·R)

        def allowed():
            i = flat_rows.unsqueeze(-1)
            ok = ~pattern.local(i, positions) & ((positions <= i) if pattern.causal else True)
            return ok.unsqueeze(0)  # (1, 1, nb·R, S)

        mask, alive = self.additive(name, allowed, lambda: kpm[:, sel][:, None, None, :])

        def kv(kp, vp):
            return kp[sel].unsqueeze(0), vp[sel].unsqueeze(0)

        def scatter(dkp, dvp, dk, dv, first=0):
            dkp[sel].add_(dk[0])
            dvp[sel].add_(dv[0])

        return _KeySet(name, positions, mask, alive, True, kv, scatter)

    def random(self, global_keys: int) -> _KeySet:
        """Random key blocks, gathered per query block (block kinds use the layout's own blocking);
        keys already local or global to a query are left to those sets."""
        pattern, rows, kpm, offset, device = self.pattern, self.rows, self.kpm, self.offset, self.device
        bs, nb, n = self.layout.block, self.layout.n_blocks, self.layout.n
        r = pattern.random_count
        picks, valid = pattern.random_picks(nb, device)
        earlier = torch.ones(r, r, dtype=torch.bool, device=device).tril(-1)
        duplicate = ((picks.unsqueeze(-1) == picks.unsqueeze(-2)) & earlier).any(-1)
        valid = valid & ~duplicate
        flat_picks = (picks * valid).reshape(-1)
        rpos = (picks.unsqueeze(-1) * bs + torch.arange(bs, device=device)).reshape(nb, r * bs)
        rvalid = valid.unsqueeze(-1).expand(nb, r, bs).reshape(nb, r * bs)

        def random_allowed():
            i, j = rows.unsqueeze(-1), rpos.unsqueeze(1)
            ok = rvalid.unsqueeze(1) & ~pattern.local(i, j) & (j >= global_keys) & (j < n)
            if pattern.causal:
                ok = ok & (j <= i)
            return ok.unsqueeze(0)

        def random_kpm():
            keys = kpm[:, offset : offset + nb * bs].reshape(kpm.shape[0], nb, bs)
            return keys.index_select(1, flat_picks).reshape(kpm.shape[0], nb, 1, r * bs)

        mask, alive = self.additive("random", random_allowed, random_kpm)

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

        return _KeySet("random", rpos, mask, alive, False, random_kv, random_scatter)


def _key_sets(pattern: SparsePattern, layout: _Layout, key_padding_mask, dtype, device):
    """(sets, offset, total): the key sets that together cover the pattern, each key attended
    exactly once, over K/V heads padded to `total` rows with the sequence starting at `offset`."""
    n = layout.n
    build = _KeySetBuilder(pattern, layout, key_padding_mask, dtype, device)
    offset = build.offset
    sets = [build.local()]
    # global keys (block-sparse, random): the first g tokens, for queries not already local to them
    g = min(pattern.global_keys, n)
    if g:
        sets.append(build.shared("global", torch.arange(g, device=device), slice(offset, offset + g)))
    # strided summary keys: every stride-th position (a strided view)
    if pattern.kind == "strided" and n // pattern.stride > 0:
        s, count = pattern.stride, n // pattern.stride
        first = offset + s - 1
        positions = torch.arange(count, device=device) * s + s - 1
        sets.append(build.shared("summary", positions, slice(first, first + (count - 1) * s + 1, s)))
    if pattern.random_count:
        sets.append(build.random(g))
    return sets, offset, build.total


def _blocking(pattern: SparsePattern, forward: bool) -> int:
    if pattern.band is None:
        return pattern.block
    return FORWARD_BLOCK if forward else BACKWARD_BLOCK


def _global_rows(pattern: SparsePattern, n: int) -> int:
    return 0 if pattern.causal else min(pattern.global_keys, n)


def _rows_attending_all(query, key, value, key_padding_mask, g, groups, bias=None):
    """Bidirectional global tokens (rows < g) attend every key: the inputs of one dense flash call,
    with the G query heads of a K/V head stacked as rows (K/V not repeated)."""
    b, hkv = key.shape[0], key.shape[1]
    q = query[:, :, :g].reshape(b, hkv, groups * g, query.shape[-1])
    mask = None
    if key_padding_mask is not None:
        allowed = key_padding_mask.to(torch.bool)[:, None, None, :].expand(-1, 1, q.shape[-2], -1)
        mask = additive_mask(allowed, query.dtype)
    if bias is not None:  # the first g query rows of each head, stacked as the rows are
        full = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        rows = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).to(query.dtype).expand(full)[:, :, :g]
        rows = rows.reshape(q.shape[0], hkv, groups * g, key.shape[2])
        mask = rows if mask is None else mask + rows
    return q, key, value, mask


def _neighbour_blocks(pattern, block: int) -> tuple[int, int]:
    """Key blocks a query block reaches before and after itself: enough to cover the band, or one
    neighbour each way for block-local patterns (none after for causal ones)."""
    reach = -(-(pattern.band - 1) // block) if pattern.band is not None else 1
    return reach, (0 if pattern.causal else reach)


def sparse_forward_cpu(
    query, key, value, key_padding_mask, pattern: SparsePattern, scale: float, bias=None, score_mod=None
):
    """(out (B, H, N, Dv), lse (B, H, N); float32, float64 for float64 inputs): per K/V head, one
    ATen CPU flash call per key set over all query blocks (as the heads of one batch), merged
    through the log-sum-exp. (One call over all K/V heads as the batch measured slower: it pads
    every head's K/V into fresh memory at once.)"""
    b, h, n, _ = query.shape
    hkv = key.shape[1]
    groups = h // hkv
    if n <= DENSE_MAX_LEN or pattern.covers_all(n):
        return _dense_forward_cpu(query, key, value, key_padding_mask, pattern, scale, bias, score_mod)
    layout = _Layout(b, hkv, groups, n, _blocking(pattern, forward=True))
    sets, offset, total = _key_sets(pattern, layout, key_padding_mask, query.dtype, query.device)
    score_bias = _ScoreBias(bias, layout, query.dtype, query.device)
    q_blocks = layout.to_blocks(query)  # (X, nb, R, D)
    x_count = b * hkv
    k3, v3 = key.reshape(x_count, n, key.shape[-1]), value.reshape(x_count, n, value.shape[-1])
    out_blocks = query.new_empty(x_count, layout.n_blocks, layout.rows, value.shape[-1])
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32  # as ATen's flash kernel
    lse_blocks = torch.empty(x_count, layout.n_blocks, layout.rows, dtype=lse_dtype, device=query.device)
    ws = Workspace(query.dtype, query.device)
    for x in range(x_count):  # one K/V head at a time: only its padded copy and scores are alive
        kp, vp = ws.padded("kp", k3[x], offset, total), ws.padded("vp", v3[x], offset, total)
        outs, lses = [], []
        for s in sets:
            k_s, v_s = s.kv(kp, vp)
            o, l = attend(
                s.rows(q_blocks[x], layout).unsqueeze(0),
                k_s.unsqueeze(0),
                v_s.unsqueeze(0),
                score_bias.add(s, x, s.head_mask(x)).unsqueeze(0),
                scale,
                score_mod=score_mod,
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
        q, k4, v4, mask = _rows_attending_all(query, key, value, key_padding_mask, g, groups, bias)
        og, lg = attend(q, k4, v4, mask, scale, score_mod=score_mod)
        out = out.clone()
        lse = lse.clone()
        out[:, :, :g] = og.reshape(b, h, g, -1)
        lse[:, :, :g] = lg.reshape(b, h, g)
    return out.contiguous(), lse.contiguous()


def sparse_backward_cpu(
    grad, query, key, value, key_padding_mask, pattern: SparsePattern, scale, out, lse, bias=None, score_mod=None
):
    """Flash-style backward from the saved (out, lse), as batched GEMMs per K/V head and key set:
    P = exp(QKᵀ·scale + mask − lse), dV = PᵀdO, dS = P∘(dO·Vᵀ − rowsum(dO∘O)), dQ = dS·K·scale,
    dK = dSᵀ·Q·scale. Only one head's (nb, R, S) scores are alive at a time."""
    b, h, n, d = query.shape
    hkv = key.shape[1]
    groups = h // hkv
    if n <= DENSE_MAX_LEN or pattern.covers_all(n):
        return _dense_backward_cpu(grad, query, key, value, key_padding_mask, pattern, scale, out, lse, bias, score_mod)
    layout = _Layout(b, hkv, groups, n, _blocking(pattern, forward=False))
    g = _global_rows(pattern, n)
    grad_rest = grad
    if g:
        grad_rest = grad.clone()
        grad_rest[:, :, :g] = 0
    cdt = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32
    sets, offset, total = _key_sets(pattern, layout, key_padding_mask, cdt, query.device)
    score_bias = _ScoreBias(bias, layout, cdt, query.device)
    q_blocks, g_blocks, o_blocks = (layout.to_blocks(t) for t in (query, grad_rest, out))
    l_blocks = layout.to_blocks(lse.unsqueeze(-1))  # (X, nb, R, 1)
    # rows that attend nothing: any finite lse makes their probabilities exp(-inf) = 0
    l_blocks = torch.where(torch.isfinite(l_blocks), l_blocks, torch.zeros_like(l_blocks)).to(cdt)
    x_count = b * hkv
    k3, v3 = key.reshape(x_count, n, d), value.reshape(x_count, n, value.shape[-1])
    dq_blocks = torch.empty(q_blocks.shape, dtype=cdt, device=query.device)
    dk3 = torch.empty(k3.shape, dtype=key.dtype, device=key.device)
    ws = Workspace(cdt, query.device)
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
            step = layout.n_blocks if s.flat else max(1, BACKWARD_TILE // (layout.rows * k_all.shape[1]))
            for b0 in range(0, layout.n_blocks, step):
                b1 = min(b0 + step, layout.n_blocks)
                if s.flat:
                    k_s, v_s, mask = k_all, v_all, mask_all
                    qr, gr, lr, dr, dqr = (s.rows(t, layout) for t in (qx, gx, l_blocks[x], deltax, dqx))
                else:
                    k_s, v_s = k_all[b0:b1], v_all[b0:b1]
                    mask = mask_all[b0:b1] if mask_all.shape[0] > 1 else mask_all
                    qr, gr, lr, dr, dqr = (t[b0:b1] for t in (qx, gx, l_blocks[x], deltax, dqx))
                mask = score_bias.add(s, x, mask, b0, b1)
                m, r, keys = qr.shape[0], qr.shape[1], k_s.shape[1]
                p, slope = _tile_probabilities(ws, qr, k_s, mask, lr, score_mod)
                dv_s = torch.bmm(p.transpose(1, 2), gr, out=ws.get("dv_s", (m, keys, gr.shape[-1])))
                ds = torch.bmm(gr, v_s.transpose(1, 2), out=ws.get("ds", (m, r, keys))).sub_(dr).mul_(p)
                ds = ds if slope is None else ds.mul_(slope)  # through the modifier: w.r.t. the unmodified scores
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
        q, k4, v4, mask = _rows_attending_all(query, key, value, key_padding_mask, g, groups, bias)
        og = out[:, :, :g].reshape(q.shape[:-1] + (out.shape[-1],))
        lg = lse[:, :, :g].reshape(q.shape[:-1])
        gg = grad[:, :, :g].reshape(og.shape).to(query.dtype)
        dqg, dkg, dvg = attend_backward(gg, q, k4, v4, og, lg, mask, scale, score_mod)
        dq = dq.clone()
        dq[:, :, :g] += dqg.reshape(b, h, g, -1)
        dk = dk + dkg
        dv = dv + dvg
    return dq, dk, dv


def _tile_probabilities(ws: Workspace, qr, k_s, mask, lr, score_mod):
    """(P, slope) of a backward tile: P = exp(mod(QKᵀ·scale) + mask − lse) (qr holds Q·scale) and the
    modifier's slope at the scores (None without a modifier)."""
    m, r, keys = qr.shape[0], qr.shape[1], k_s.shape[1]
    if score_mod is None:  # (mask − lse) first: one pass over the tile, then the GEMM accumulates into it
        return exp_(torch.sub(mask, lr, out=ws.get("p", (m, r, keys))).baddbmm_(qr, k_s.transpose(1, 2))), None
    modified = score_mod(torch.bmm(qr, k_s.transpose(1, 2), out=ws.get("p", (m, r, keys))))
    slope = score_mod.slope(modified)
    return exp_(modified.add_(mask).sub_(lr)), slope


def _dense_inputs(query, key, value, key_padding_mask, pattern: SparsePattern, bias=None, explicit=False):
    """One flash call over the whole sequence: (key, value, attn_mask, is_causal); `explicit`: the
    pattern as a mask even where causality would do (the written-out path with a modifier)."""
    n = query.shape[-2]
    key, value = repeat_kv(query, key, value)  # short sequences only: the copies are small
    if pattern.covers_all(n) and key_padding_mask is None and bias is None and not explicit:
        return key, value, None, pattern.causal
    allowed = dense_pattern_mask(pattern, n, key_padding_mask, device=query.device)
    if allowed.dim() == 2:
        allowed = allowed[None, None]
    mask = additive_mask(allowed, query.dtype)
    if bias is not None:
        mask = mask + bias.to(query.dtype)
    return key, value, mask, False


def _dense_forward_cpu(query, key, value, key_padding_mask, pattern, scale, bias=None, score_mod=None):
    k, v, mask, causal = _dense_inputs(query, key, value, key_padding_mask, pattern, bias, score_mod is not None)
    out, lse = attend(query, k, v, mask, scale, causal, score_mod)
    # flash lays its output out [B, N, H, D]; the op's contract (and its fake kernel, which
    # torch.compile checks the strides against) is a contiguous [B, H, N, D]
    return out.contiguous(), lse.contiguous()


def _dense_backward_cpu(grad, query, key, value, key_padding_mask, pattern, scale, out, lse, bias=None, score_mod=None):
    k, v, mask, causal = _dense_inputs(query, key, value, key_padding_mask, pattern, bias, score_mod is not None)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    if score_mod is not None:
        dq, dk, dv = attend_backward(grad.to(query.dtype), query, k, v, out, lse, mask, scale, score_mod)
    else:
        dq, dk, dv = _flash_backward(
            grad.to(query.dtype), query, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        dk = dk.unflatten(1, (key.shape[1], groups)).sum(2)
        dv = dv.unflatten(1, (key.shape[1], groups)).sum(2)
    return dq, dk, dv
