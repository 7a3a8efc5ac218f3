"""The exchanges in a sequence-parallel rank's graph (inserted by `partition{strategy=sequence}`,
passes/partition_sequence.py) and the ranks they talk to.

Three ops, defined once through `optpipe.ops.define_op` (fake impl and autograd with them), each a
point-to-point exchange between the ranks that hold consecutive shards of one sequence:

    torch.ops.optpipe.seq_halo(x, size)                 the left neighbour's last `size` rows of x
                                                        (dim -2); rank 0 gets zeros. Backward sends
                                                        the halo's gradient back to its owner.
    torch.ops.optpipe.seq_prefix(x)                     exclusive prefix sum of x over the ranks (a
                                                        chain r-1 -> r); backward the suffix chain.
    torch.ops.optpipe.seq_ring_attention(q, k, v, scale, causal, zigzag)
                                                        ring attention: K/V shards passed around the
                                                        ring, merged with an online softmax; the
                                                        backward passes K/V with their gradients
                                                        around once more, home again at the end.
                                                        `zigzag`: causal with zig-zag shards, each
                                                        rank computing only the visible half-blocks.
                                                        A block runs on torch's fused CPU attention
                                                        kernel (fp32 on CPU), else on explicit
                                                        fp32 scores.

The attention sites of the rank graph call the composite functions at the end of this module
(`sequence_window_attention`, `sequence_linear_attention`, `sequence_dense_attention`) and
positions are shifted by `sequence_positions`: one readable node per site. Whom to talk to comes
from the communicator set by `sequence_parallel_comm(comm)`: a `DistributedComm` (torch.distributed
P2P, what the torchrun ranks use) or a `ThreadComm` (ranks as threads of one process, what the
pass's own check uses).
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading

import torch
import torch.utils.checkpoint

from optpipe.errors import PipelineError
from optpipe.ops import define_op

from .attention_ops import KERNEL_EPS, feature_map, sparse_attention

_STATE = threading.local()
_GLOBAL: dict = {"comm": None}


# -- who talks to whom ------------------------------------------------------------------------------------
class DistributedComm:
    """Point-to-point over torch.distributed: `ranks` are the global ranks holding the shards, in
    sequence order (this process is `ranks[rank]`)."""

    def __init__(self, rank: int, ranks: list[int], group=None):
        self.rank, self.world, self.ranks, self.group = rank, len(ranks), list(ranks), group

    def start(self, dst: int | None, t: torch.Tensor | None, src: int | None, like: torch.Tensor | None):
        """Start sending `t` to rank `dst` and receiving a tensor shaped like `like` from rank `src`
        (either side may be None); returns `wait()`, which returns what was received."""
        import torch.distributed as dist

        out = None if src is None else torch.empty_like(like, memory_format=torch.contiguous_format)
        reqs = [] if dst is None else [dist.isend(t.contiguous(), self.ranks[dst], group=self.group)]
        if src is not None:
            reqs.append(dist.irecv(out, self.ranks[src], group=self.group))

        def wait():
            for r in reqs:
                r.wait()
            return out

        return wait

    def exchange(self, dst: int | None, t: torch.Tensor | None, src: int | None, like: torch.Tensor | None):
        """`start(...)()`: send and receive, and wait for both."""
        return self.start(dst, t, src, like)()


class ThreadComm:
    """Ranks as threads of one process (the pass's check, tests): mailboxes per (src, dst) pair."""

    def __init__(self, rank: int, world: int, boxes: dict, timeout: float = 120.0):
        self.rank, self.world, self.boxes, self.timeout = rank, world, boxes, timeout

    @staticmethod
    def mailboxes(world: int) -> dict:
        return {(s, d): queue.Queue() for s in range(world) for d in range(world)}

    def start(self, dst: int | None, t: torch.Tensor | None, src: int | None, like: torch.Tensor | None):
        if dst is not None:
            self.boxes[(self.rank, dst)].put(t.detach().clone())
        return lambda: self._receive(src)

    def exchange(self, dst: int | None, t: torch.Tensor | None, src: int | None, like: torch.Tensor | None):
        return self.start(dst, t, src, like)()

    def _receive(self, src: int | None):
        if src is None:
            return None
        try:
            return self.boxes[(src, self.rank)].get(timeout=self.timeout)
        except queue.Empty as e:
            raise PipelineError(
                f"sequence parallel: rank {self.rank} timed out waiting for rank {src}", "a rank is stuck or died"
            ) from e


@contextlib.contextmanager
def sequence_parallel_comm(comm, *, thread_local: bool = False):
    """Within this block the sequence-parallel exchanges talk through `comm`. `thread_local`: for
    this thread only (ranks as threads); otherwise for the process (autograd may run the backward
    on another thread)."""
    holder = _STATE.__dict__ if thread_local else _GLOBAL
    previous, holder["comm"] = holder.get("comm"), comm
    try:
        yield comm
    finally:
        holder["comm"] = previous


def current_comm():
    comm = getattr(_STATE, "comm", None) or _GLOBAL["comm"]
    if comm is None:
        raise PipelineError(
            "a sequence-parallel rank program ran outside sequence_parallel_comm",
            "run it with optpipe.runtime.sequence_parallel.sequence_run / sequence_train",
        )
    return comm


# -- seq_halo: the left neighbour's last rows -----------------------------------------------------------------
def _halo_shape(x: torch.Tensor, size: int) -> list[int]:
    return [*x.shape[:-2], size, x.shape[-1]]


def _halo_impl(x: torch.Tensor, size: int) -> torch.Tensor:
    comm = current_comm()
    tail = x[..., x.shape[-2] - size :, :]
    right = comm.rank + 1 if comm.rank + 1 < comm.world else None
    got = comm.exchange(right, tail, comm.rank - 1 if comm.rank > 0 else None, tail)
    return x.new_zeros(_halo_shape(x, size)) if got is None else got


def _halo_fake(x, size):
    return x.new_empty(_halo_shape(x, size))


def _halo_setup(ctx, inputs, output):
    x, size = inputs
    ctx.size, ctx.shape = size, x.shape


def _halo_backward(ctx, grad):
    comm = current_comm()
    right = comm.rank + 1 if comm.rank + 1 < comm.world else None
    got = comm.exchange(comm.rank - 1 if comm.rank > 0 else None, grad, right, grad)
    dx = grad.new_zeros(ctx.shape)
    if got is not None:
        dx[..., ctx.shape[-2] - ctx.size :, :] = got
    return dx, None


seq_halo = define_op("seq_halo", _halo_impl, fake=_halo_fake, backward=_halo_backward, setup_context=_halo_setup)


# -- seq_prefix: exclusive prefix sum over the ranks -----------------------------------------------------------
def _prefix_impl(x: torch.Tensor) -> torch.Tensor:
    comm = current_comm()
    before = comm.exchange(None, None, comm.rank - 1, x) if comm.rank > 0 else torch.zeros_like(x)
    if comm.rank + 1 < comm.world:
        comm.exchange(comm.rank + 1, before + x, None, None)
    return before


def _prefix_fake(x):
    return torch.empty_like(x)


def _prefix_backward(ctx, grad):
    # d(prefix_j)/d(x_r) = 1 for every later rank j: the suffix sum of the later ranks' gradients
    comm = current_comm()
    after = comm.exchange(None, None, comm.rank + 1, grad) if comm.rank + 1 < comm.world else torch.zeros_like(grad)
    if comm.rank > 0:
        comm.exchange(comm.rank - 1, grad + after, None, None)
    return after


seq_prefix = define_op("seq_prefix", _prefix_impl, fake=_prefix_fake, backward=_prefix_backward)


# -- seq_ring_attention --------------------------------------------------------------------------------------
def _grouped_q(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, Hkv, G, L, D): grouped-query attention without repeating K/V."""
    b, h = q.shape[:2]
    return q.reshape(b, kv_heads, h // kv_heads, *q.shape[2:])


def _block_scores(q5, k, scale: float, diagonal: bool) -> torch.Tensor:
    """Scaled scores (B, Hkv, G, L, S) of the local queries against one K shard; `diagonal`: the
    shard is the queries' own, so causal inside it."""
    s = (q5 @ k.unsqueeze(2).transpose(-1, -2)) * scale
    if diagonal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _flash(q5: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a block runs on torch's fused CPU attention kernel (which returns the block's
    log-sum-exp, and whose backward takes the whole attention's output and log-sum-exp), rather
    than on explicit fp32 scores (5-10x slower: every score is written to memory several times)."""
    return (
        _FLASH_CPU is not None
        and _FLASH_CPU_BACKWARD is not None
        and q5.device.type == "cpu"
        and q5.dtype == k.dtype == v.dtype == torch.float32
        and k.shape[-1] == v.shape[-1]
    )


def _heads(q5: torch.Tensor, *kv: torch.Tensor) -> tuple:
    """(B, Hkv, G, L, D) queries as (B, H, L, D), and K/V (B, Hkv, S, D) repeated to H heads."""
    b, hkv, g, n, d = q5.shape
    return (q5.reshape(b, hkv * g, n, d), *(t.repeat_interleave(g, 1) if g > 1 else t.contiguous() for t in kv))


def _block_attend(q5, k, v, scale: float, diagonal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, Hkv, G, L, Dv), log-sum-exp (B, Hkv, G, L)) of the queries over one K/V block;
    `diagonal`: causal inside it."""
    if _flash(q5, k, v):
        q, ke, ve = _heads(q5, k, v)
        out, lse = _FLASH_CPU(q, ke, ve, 0.0, diagonal, scale=scale)
        return out.reshape(*q5.shape[:-1], v.shape[-1]), lse.reshape(q5.shape[:-1])
    s = _block_scores(q5, k, scale, diagonal)
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse.unsqueeze(-1)) @ v.unsqueeze(2), lse


def _block_grads(q5, g5, o5, lse, delta, k, v, scale: float, diagonal: bool) -> tuple:
    """(dq (B, Hkv, G, L, D), dk (B, Hkv, S, D), dv (B, Hkv, S, Dv)) of one block, given the whole
    attention's output `o5`, log-sum-exp and delta = Σ grad·output per query."""
    if _flash(q5, k, v):
        b, hkv, g, n, _ = q5.shape
        q, ke, ve = _heads(q5, k, v)
        flat = [t.reshape(b, hkv * g, n, t.shape[-1]) for t in (g5, o5)]
        dq, dk, dv = _FLASH_CPU_BACKWARD(
            flat[0], q, ke, ve, flat[1], lse.reshape(b, hkv * g, n), 0.0, diagonal, scale=scale
        )
        dk, dv = (t.reshape(b, hkv, g, *t.shape[2:]).sum(2) for t in (dk, dv))
        return dq.reshape(q5.shape), dk, dv
    p = torch.exp(_block_scores(q5, k, scale, diagonal) - lse.unsqueeze(-1))
    ds = p * (g5 @ v.unsqueeze(2).transpose(-1, -2) - delta) * scale
    return ds @ k.unsqueeze(2), (ds.transpose(-1, -2) @ q5).sum(2), (p.transpose(-1, -2) @ g5).sum(2)


def ring_block(rank: int, src: int, causal: bool, zigzag: bool, n: int) -> tuple[slice, slice, bool] | None:
    """What the `n` local queries of `rank` see of the K/V shard of `src`: (query rows, key rows,
    causal inside the block), or None for nothing. Contiguous shards: the shards before in full,
    the own one causally. Zig-zag shards (rank r holds chunks r and 2N-1-r of 2N, each n/2 long):
    a shard before gives every query its first chunk, a shard after gives the second chunk's
    queries everything, the own shard is causal in local order (its chunks are in global order):
    every rank does the same work, half a block per step."""
    if not causal:
        return slice(None), slice(None), False
    if src == rank:
        return slice(None), slice(None), True
    if not zigzag:
        return (slice(None), slice(None), False) if src < rank else None
    half = n // 2
    return (slice(None), slice(0, half), False) if src < rank else (slice(half, None), slice(None), False)


def _ring_forward(q, k, v, scale: float, causal: bool, zigzag: bool):
    comm = current_comm()
    q5 = _grouped_q(q, k.shape[1]).float()
    out = torch.zeros(*q5.shape[:-1], v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full(q5.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    kv = torch.cat([k, v], -1)
    d = k.shape[-1]
    for step in range(comm.world):
        src = (comm.rank - step) % comm.world
        # the next shard travels while this one is computed on
        pending = None
        if step + 1 < comm.world:
            pending = comm.start((comm.rank + 1) % comm.world, kv, (comm.rank - 1) % comm.world, kv)
        block = ring_block(comm.rank, src, causal, zigzag, q.shape[-2])
        if block is not None:
            rows, keys, diagonal = block
            kc, vc = kv[..., keys, :d].float(), kv[..., keys, d:].float()
            block_out, block_lse = _block_attend(q5[..., rows, :], kc, vc, scale, diagonal)
            old = lse[..., rows]
            new_lse = torch.logaddexp(old, block_lse)
            out[..., rows, :] = out[..., rows, :] * torch.exp(old - new_lse).unsqueeze(-1) + block_out * torch.exp(
                block_lse - new_lse
            ).unsqueeze(-1)
            lse[..., rows] = new_lse
        if pending is not None:
            kv = pending()
    return out.reshape(q.shape[:-1] + (v.shape[-1],)).to(q.dtype), lse


def _ring_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, zigzag: bool
) -> torch.Tensor:
    out, lse = _ring_forward(q, k, v, scale, causal, zigzag)
    if q.requires_grad or k.requires_grad or v.requires_grad:
        out._optpipe_lse = lse  # the backward's softmax statistics
    return out


def _ring_fake(q, k, v, scale, causal, zigzag):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _ring_setup(ctx, inputs, output):
    q, k, v, scale, causal, zigzag = inputs
    ctx.scale, ctx.causal, ctx.zigzag = scale, causal, zigzag
    lse = getattr(output, "_optpipe_lse", None)
    ctx.save_for_backward(q, k, v, output, *([lse] if lse is not None else []))


def _ring_backward(ctx, grad):
    q, k, v, out, *rest = ctx.saved_tensors
    comm, scale, causal = current_comm(), ctx.scale, ctx.causal
    lse = rest[0] if rest else _ring_forward(q, k, v, scale, causal, ctx.zigzag)[1]
    hkv, d = k.shape[1], k.shape[-1]
    q5, g5, o5 = (_grouped_q(t, hkv).float() for t in (q, grad, out))
    delta = (g5 * o5).sum(-1, keepdim=True)  # (B, Hkv, G, L, 1)
    dq = torch.zeros_like(q5)
    # the shard that travels: K, V and their gradients so far
    travel = torch.cat([k, v, torch.zeros_like(k), torch.zeros_like(v)], -1).float()
    dv_at = 2 * d + v.shape[-1]
    for step in range(comm.world):
        src = (comm.rank - step) % comm.world
        block = ring_block(comm.rank, src, causal, ctx.zigzag, q.shape[-2])
        if block is not None:
            rows, keys, diagonal = block
            kc, vc = travel[..., keys, :d], travel[..., keys, d : d + v.shape[-1]]
            parts = (t[..., rows, :] for t in (q5, g5, o5))
            dq_b, dk_b, dv_b = _block_grads(*parts, lse[..., rows], delta[..., rows, :], kc, vc, scale, diagonal)
            dq[..., rows, :] += dq_b
            travel[..., keys, dv_at - d : dv_at] += dk_b
            travel[..., keys, dv_at:] += dv_b
        nxt, prv = (comm.rank + 1) % comm.world, (comm.rank - 1) % comm.world
        if step + 1 < comm.world:
            travel = comm.exchange(nxt, travel, prv, travel)
        else:  # home again: only the gradients travel the last hop
            travel = comm.exchange(nxt, travel[..., dv_at - d :].contiguous(), prv, travel[..., dv_at - d :])
    dk, dv = travel[..., :d], travel[..., d:]
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


seq_ring_attention = define_op(
    "seq_ring_attention", _ring_impl, fake=_ring_fake, backward=_ring_backward, setup_context=_ring_setup
)


# -- what a rank graph's attention sites and positions call -------------------------------------------------
def sequence_positions(positions: torch.Tensor, zigzag: bool = False) -> torch.Tensor:
    """Global positions of this rank's shard: the local `arange` shifted by rank × its length; zig-zag
    shards (chunks r and 2N-1-r of 2N): each half by its chunk's offset."""
    comm = current_comm()
    n = positions.shape[-1]
    if not zigzag:
        return positions + comm.rank * n
    half = n // 2
    offset = torch.full_like(positions, comm.rank * half)
    offset[..., half:] = (2 * comm.world - 2 - comm.rank) * half  # chunk 2N-1-r starts at (2N-1-r)·n/2
    return positions + offset


def _in_layout_of(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`out` with the memory order of `q`, as SDPA returns it (the graph after an SDPA node may
    view its transpose without a copy when the queries were a transposed view)."""
    order = sorted(range(q.dim()), key=lambda d: -q.stride(d))
    return out.permute(order).contiguous().permute([order.index(d) for d in range(q.dim())])


def sequence_dense_attention(
    q, k, v, scale: float | None = None, causal: bool = True, zigzag: bool = False
) -> torch.Tensor:
    """Dense SDPA of the local queries over the whole sequence (ring attention); `zigzag`: the
    shards are zig-zag ordered (see `ring_block`)."""
    if current_comm().world == 1:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    out = seq_ring_attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, causal, zigzag)
    return _in_layout_of(out, q)


def sequence_window_attention(q, k, v, window: int, scale: float, block: int, score_mod=None, mod_value=0.0):
    """Causal sliding-window attention of the local queries: the left neighbour's last `window`-1
    keys/values arrive as a halo, the queries are padded by as many zero rows (dropped after), and
    the same `optpipe.sparse_attention` op runs on the extended shard (rank 0: the halo is masked)."""
    comm, halo = current_comm(), window - 1
    args = ("sliding-window", True, scale, window, block, 0, 0, 0, 0, None, score_mod, mod_value)
    if comm.world == 1 or halo == 0:
        return sparse_attention(q, k, v, None, *args)
    if halo > k.shape[-2]:
        raise PipelineError(
            f"sequence parallel: a window of {window} reaches past the left neighbour's {k.shape[-2]} tokens",
            "use fewer ranks, a longer sequence or a smaller window",
        )
    d = k.shape[-1]
    got = seq_halo(torch.cat([k, v], -1), halo)
    k_ext, v_ext = torch.cat([got[..., :d], k], -2), torch.cat([got[..., d:], v], -2)
    q_ext = torch.cat([q.new_zeros(*q.shape[:-2], halo, q.shape[-1]), q], -2)
    mask = None
    if comm.rank == 0:  # no left neighbour: the zero halo must not be attended
        mask = torch.arange(halo + q.shape[-2], device=q.device).unsqueeze(0) >= halo
    return sparse_attention(q_ext, k_ext, v_ext, mask, *args)[..., halo:, :].contiguous()


def _chunked_causal(qg, kf, v1, before, c: int, eps: float) -> torch.Tensor:
    """φ(q)·Σφ(k)[v 1]ᵀ over the keys up to each query, normalised: within a chunk of `c` tokens the
    masked quadratic form, across chunks the states of the chunks before (plus `before`, the
    ranks before's). qg (B, Hkv, G, L, F), kf (B, Hkv, L, F), v1 (B, Hkv, L, Dv + 1); L divides by c."""
    b, hkv, g, n, f = qg.shape
    nc, dv = n // c, v1.shape[-1] - 1
    qc = qg.reshape(b, hkv, g, nc, c, f)
    kc, vc = kf.reshape(b, hkv, nc, c, f), v1.reshape(b, hkv, nc, c, dv + 1)
    states = kc.transpose(-1, -2) @ vc  # (B, Hkv, nc, F, Dv + 1)
    carried = states.cumsum(2) - states
    if before is not None:
        carried = carried + before.unsqueeze(2)
    scores = (qc @ kc.unsqueeze(2).transpose(-1, -2)).tril()  # (B, Hkv, G, nc, c, c)
    nd = scores @ vc.unsqueeze(2) + qc @ carried.unsqueeze(2)  # (B, Hkv, G, nc, c, Dv + 1)
    return (nd[..., :dv] / (nd[..., dv:] + eps)).reshape(b, hkv, g, n, dv)


def sequence_linear_attention(q, k, v, feature_map_name: str, chunk: int = 64, eps: float = KERNEL_EPS):
    """Causal kernel attention of the local queries: the state Σφ(k)vᵀ and Σφ(k) of the ranks
    before arrives by `seq_prefix`; within the shard, chunked prefix sums, recomputed in the
    backward (activation memory O(L·D), as the one-process kernel keeps)."""
    qf, kf = feature_map(q, feature_map_name), feature_map(k, feature_map_name)
    b, h, n, f = qf.shape
    hkv, dv = kf.shape[1], v.shape[-1]
    c = max(1, min(chunk, n))
    pad = -n % c
    qg = _grouped_q(qf, hkv)  # (B, Hkv, G, L, F)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # the ones column carries the normaliser Σφ(k)
    before = None
    if current_comm().world > 1:
        before = seq_prefix(kf.transpose(-1, -2) @ v1)  # (B, Hkv, F, Dv + 1) of the ranks before
    if pad:
        qg, kf, v1 = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (qg, kf, v1))
    out = torch.utils.checkpoint.checkpoint(_chunked_causal, qg, kf, v1, before, c, eps, use_reentrant=False)
    return out.reshape(b, h, n + pad, dv)[:, :, :n].contiguous()


SEQUENCE_OPS = (seq_halo, seq_prefix, seq_ring_attention)

__all__ = [
    "SEQUENCE_OPS",
    "DistributedComm",
    "ThreadComm",
    "current_comm",
    "ring_block",
    "seq_halo",
    "seq_prefix",
    "seq_ring_attention",
    "sequence_dense_attention",
    "sequence_linear_attention",
    "sequence_parallel_comm",
    "sequence_positions",
    "sequence_window_attention",
]
