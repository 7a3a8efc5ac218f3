"""The eager CPU kernels of causal kernel (linear) attention, `optpipe.linear_attention` and
`optpipe.performer_attention` with `causal=True`.

Kernel attention is `out_i = φ(q_i)·Σ_j φ(k_j)v_jᵀ / φ(q_i)·Σ_j φ(k_j)`; causal, through the
chunked prefix-sum form: within a chunk the masked quadratic form, across chunks the states
Σφ(k)vᵀ (F, Dv) and Σφ(k) (F) of the chunks before — never an O(L·F·D) cumulative sum.

`causal_linear_forward` runs it head by head: batched GEMMs over the chunks for the states, one
GEMM with a triangular ones matrix for their exclusive prefix sums (a running add past 64 chunks),
the feature map applied per head into reused buffers and the output written in place, so nothing
full-size but the output is allocated. Its analytic backward (`causal_linear_backward`) shares each
intra-chunk score matrix between two products and applies φ' itself (elu+1: min(φ, 1)); the linear
op keeps its output and normaliser for it (O(L·D)). `CausalKernelAttention` is the same pair as an
autograd function over precomputed features (performer's). `chunked_causal_product` is the same
product with stacked heads, every chunk in one batched GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention_cpu import CONSTANT_MASKS, exp_

FEATURE_MAPS = ("elu", "relu")
"""The feature maps φ of `linear_attention`: elu(x)+1 and relu(x)."""


def _chunk_mask(c: int, gq: int, gk: int, reverse: bool, dtype, device) -> torch.Tensor:
    """(gq·c, gk·c) 0/1: causal (or anti-causal) inside a chunk, tiled over the stacked heads."""

    def build():
        tri = torch.ones(c, c, dtype=dtype, device=device)
        return (tri.triu() if reverse else tri.tril()).repeat(gq, gk)

    return CONSTANT_MASKS.get(("chunk", c, gq, gk, reverse, dtype, str(device)), build)


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
            exp_(torch.clamp(x, max=0, out=out)).add_(torch.clamp(x, min=0, out=self._relu))
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

    return CONSTANT_MASKS.get(("prefix", nc, reverse, dtype, str(device)), build)


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


def causal_linear_forward(query, key, value, key_padding_mask, fmap: str | None, chunk: int, eps: float):
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


def causal_linear_backward(
    grad, query, key, value, key_padding_mask, fmap: str | None, out, den, chunk: int, needs=(True, True, True)
):
    """(dq, dk, dv) of `causal_linear_forward` from its saved output and normaliser (grads w.r.t. the
    raw query/key: through φ when `fmap` is set), one head at a time. With a = g/den,
    dY = [a, −rowsum(a∘out)] (the grads of [numerator, normaliser]) and v' = [v, 1], per chunk:
      dφq = dY·Σ_before v'ᵀφk + tril(dY v'ᵀ)·φk
      dφk = v'·Σ_after dYᵀφq  + tril(dY v'ᵀ)ᵀ·φq
      dv  = φk·Σ_after φqᵀa   + tril(φq φkᵀ)ᵀ·a
    — the intra-chunk score matrices are shared by two products each, and Σ φqᵀa is the first Dv
    columns of Σ φqᵀdY. `needs`: which of (dq, dk, dv) to compute (the others are None)."""
    step = _CausalBackward(grad, query, key, value, key_padding_mask, fmap, out, den, chunk, needs)
    for bi in range(query.shape[0]):
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask[bi if key_padding_mask.shape[0] > 1 else 0].to(query.dtype).unsqueeze(-1)
        for hk in range(key.shape[1]):
            step.kv_head(bi, hk, mask)
    return step.dq, step.dk, step.dvalue


class _CausalBackward:
    """`causal_linear_backward` one K/V head at a time: its inputs, the grads it fills, and the
    (L, ·) buffers every head reuses (features, v' = [v, 1], dY, chunk states, intra-chunk scores),
    all in the chunk layout (nc, c, ·)."""

    def __init__(self, grad, query, key, value, key_padding_mask, fmap, out, den, chunk, needs):
        self.grad, self.query, self.key, self.value, self.out, self.den = grad, query, key, value, out, den
        n, f = query.shape[2], query.shape[3]
        self.kv_heads, dv = key.shape[1], value.shape[-1]
        self.groups = query.shape[1] // self.kv_heads
        c, nc, p = _head_layout(n, chunk)
        self.n, self.f, self.dv, self.c, self.nc, self.p = n, f, dv, c, nc, p
        self.fmap, self.phi = fmap, _HeadFeatures(fmap)
        self.need_q, self.need_k, self.need_v = needs
        self.kbuf, self.qbuf = query.new_zeros(p, f), query.new_zeros(p, f)
        self.vbuf = query.new_zeros(p, dv + 1)
        self.vbuf[:n, dv] = 1
        self.dybuf = query.new_zeros(p, dv + 1)
        self.kv_states = query.new_empty(nc, dv + 1, f)  # v'ᵀφk per chunk
        self.before = query.new_empty(nc, dv + 1, f)
        self.qy_states = query.new_empty(nc, f, dv + 1)  # φqᵀdY per chunk (summed over the group)
        self.after = query.new_empty(nc, f, dv + 1)
        self.s_dy = query.new_empty(nc, c, c)
        self.s_qk = query.new_empty(nc, c, c)
        self.dphiq = query.new_empty(nc, c, f)
        self.dphik = query.new_empty(nc, c, f)
        self.dvbuf = query.new_empty(nc, c, dv) if self.need_v and p != n else None
        self.scratch = query.new_empty(n, dv)
        keep_raw = self.need_k and fmap is not None and key_padding_mask is not None
        self.phik_raw = query.new_empty(n, f) if keep_raw else None
        self.dq = torch.empty_like(query) if self.need_q else None
        self.dk = torch.empty_like(key) if self.need_k else None
        self.dvalue = torch.empty_like(value) if self.need_v else None
        self.kc, self.qc, self.vc, self.dyc = (t.view(nc, c, -1) for t in (self.kbuf, self.qbuf, self.vbuf, self.dybuf))

    def kv_head(self, bi: int, hk: int, mask: torch.Tensor | None) -> None:
        """The grads of K/V head hk of batch row bi and of the query heads that share it."""
        n, dv = self.n, self.dv
        self.phi(self.key[bi, hk], self.kbuf)  # unmasked φk first (φ' of the keys) ...
        if self.phik_raw is not None:  # (without a mask: φk itself)
            self.phik_raw.copy_(self.kbuf[:n])
        if mask is not None:
            self.kbuf[:n].mul_(mask)  # ... then the masked features
        self.vbuf[:n, :dv].copy_(self.value[bi, hk])
        if self.need_q:
            torch.bmm(self.vc.transpose(1, 2), self.kc, out=self.kv_states)
            _chunk_prefix(self.kv_states, self.before, False)
        dvc = None
        if self.need_v:  # dv straight into the gradient (a buffer only when chunks pad the length)
            dvc = (self.dvalue[bi, hk] if self.dvbuf is None else self.dvbuf).view(self.nc, self.c, dv)
        for g in range(self.groups):
            self.query_head(bi, hk, g, dvc)
        if self.need_k or self.need_v:
            _chunk_prefix(self.qy_states, self.after, True)
        if self.need_k:
            self.key_grad(bi, hk, mask)
        if self.need_v:
            dvc.baddbmm_(self.kc, self.after[..., :dv])
            if self.dvbuf is not None:
                self.dvalue[bi, hk].copy_(self.dvbuf.view(self.p, dv)[:n])

    def query_head(self, bi: int, hk: int, g: int, dvc: torch.Tensor | None) -> None:
        """Query head g of the group: its dq, and its share of the K/V head's chunk sums (the
        first query head of a group writes them, the others add)."""
        n, dv, p, f = self.n, self.dv, self.p, self.f
        kc, qc, vc, dyc, s_dy, s_qk = self.kc, self.qc, self.vc, self.dyc, self.s_dy, self.s_qk
        hq = hk * self.groups + g
        d = self.den[bi * self.kv_heads + hk, g]
        a = self.dybuf[:n, :dv]
        torch.div(self.grad[bi, hq], d, out=a)
        torch.sum(torch.mul(a, self.out[bi, hq], out=self.scratch), -1, keepdim=True, out=self.dybuf[:n, dv:]).neg_()
        self.phi(self.query[bi, hq], self.qbuf)
        torch.bmm(dyc, vc.transpose(1, 2), out=s_dy).tril_()
        if self.need_q:
            torch.bmm(dyc, self.before, out=self.dphiq).baddbmm_(s_dy, kc)
            self.phi.chain(self.dphiq.view(p, f)[:n], self.qbuf[:n], None, self.dq[bi, hq])
        if (self.need_k or self.need_v) and g == 0:
            torch.bmm(qc.transpose(1, 2), dyc, out=self.qy_states)
        elif self.need_k or self.need_v:
            self.qy_states.baddbmm_(qc.transpose(1, 2), dyc)
        if self.need_k:
            if g == 0:
                torch.bmm(s_dy.transpose(1, 2), qc, out=self.dphik)
            else:
                self.dphik.baddbmm_(s_dy.transpose(1, 2), qc)
        if self.need_v:
            torch.bmm(qc, kc.transpose(1, 2), out=s_qk).tril_()
            if g == 0:
                torch.bmm(s_qk.transpose(1, 2), dyc[..., :dv], out=dvc)
            else:
                dvc.baddbmm_(s_qk.transpose(1, 2), dyc[..., :dv])

    def key_grad(self, bi: int, hk: int, mask: torch.Tensor | None) -> None:
        """dk of K/V head hk from the group's dφk: the suffix-sum term added, then through φ'
        (and the key padding mask)."""
        self.dphik.baddbmm_(self.vc, self.after.transpose(1, 2))
        dphik = self.dphik.view(self.p, self.f)[: self.n]
        if self.fmap is None:
            if mask is not None:
                torch.mul(dphik, mask, out=self.dk[bi, hk])
            else:
                self.dk[bi, hk].copy_(dphik)
        else:
            phik = self.kbuf[: self.n] if self.phik_raw is None else self.phik_raw
            self.phi.chain(dphik, phik, mask, self.dk[bi, hk])


class CausalKernelAttention(torch.autograd.Function):
    """Eager causal kernel attention over precomputed features qf (B, H, L, F), kf (B, Hkv, L, F)
    with the analytic backward above (grads w.r.t. the features); saves φq, φk, v, out and the
    normaliser: O(L·(F+D)), nothing per chunk pair or per position.
    `CausalKernelAttention.apply(qf, kf, value, chunk, eps)`."""

    @staticmethod
    def forward(ctx, qf, kf, value, chunk: int, eps: float):
        out, den = causal_linear_forward(qf, kf, value, None, None, chunk, eps)
        ctx.chunk = chunk
        ctx.save_for_backward(qf, kf, value, out, den)
        return out

    @staticmethod
    def backward(ctx, grad):
        qf, kf, value, out, den = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        return causal_linear_backward(grad, qf, kf, value, None, None, out, den, ctx.chunk, needs) + (None, None)
