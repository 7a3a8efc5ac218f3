"""Numerical verification of a program against the program before a pass.

Inputs: the example inputs, one random in-distribution input of the same shape and, when the
program has a dynamic sequence dim, one at a different sequence length (so a pass that breaks
dynamic shapes is caught at once). Outputs of the program before the pass are computed once and
reused as the reference for the next pass.

Exact passes must match within dtype tolerance. Lossy passes are measured — max-abs error, SQNR
(dB), cosine similarity, top-1 agreement of logits-like outputs — and must stay within a budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.utils._pytree as pytree

SQNR_CAP_DB = 200.0  # reported for a bit-exact match (the ratio is infinite)

# (atol, rtol) for exact passes, scaled by the reference magnitude: rewrites such as SDPA fusion
# reorder float reductions, so "exact" means equal up to rounding, not bit-identical.
EXACT_TOLERANCE = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-3, 1e-2),
    torch.bfloat16: (1e-2, 5e-2),
}


@dataclass
class Budget:
    """Minimum quality a lossy pass must keep (None: not checked)."""

    sqnr: float | None = None
    cosine: float | None = None
    top1: float | None = None

    @classmethod
    def parse(cls, items: Sequence[str]) -> Budget:
        from .errors import UsageError

        values = {}
        for item in items:
            for part in item.split(","):
                key, _, raw = part.partition("=")
                key = key.strip().replace("-", "_")
                if key not in ("sqnr", "cosine", "top1") or not raw:
                    raise UsageError(f"bad --budget {part!r}", "use sqnr=DB, cosine=X or top1=X, e.g. --budget sqnr=20")
                try:
                    values[key] = float(raw)
                except ValueError:
                    raise UsageError(f"bad --budget value {raw!r}", "a number, e.g. --budget sqnr=20") from None
        return cls(**values)

    def merged(self, other: Budget | None) -> Budget:
        if other is None:
            return self
        return Budget(
            *(
                o if o is not None else s
                for s, o in zip((self.sqnr, self.cosine, self.top1), (other.sqnr, other.cosine, other.top1))
            )
        )

    def violations(self, m: Metrics) -> list[str]:
        out = []
        if self.sqnr is not None and (m.sqnr_db is None or m.sqnr_db < self.sqnr):
            out.append(f"SQNR {m.sqnr_db:.1f} dB < {self.sqnr:g}" if m.sqnr_db is not None else "SQNR undefined")
        if self.cosine is not None and (m.cosine is None or m.cosine < self.cosine):
            out.append(f"cosine {m.cosine:.4f} < {self.cosine:g}" if m.cosine is not None else "cosine undefined")
        if self.top1 is not None and m.top1_agreement is not None and m.top1_agreement < self.top1:
            out.append(f"top-1 agreement {m.top1_agreement:.3f} < {self.top1:g}")
        return out


@dataclass
class Metrics:
    max_abs: float | None
    sqnr_db: float | None
    cosine: float | None
    top1_agreement: float | None
    ok: bool = True
    tolerance: float | None = None
    inputs: int = 0
    note: str | None = None
    ref_max: float = field(default=0.0, repr=False)
    """Largest reference magnitude: scales the exact-pass tolerance (not reported)."""

    def to_dict(self) -> dict:
        return {
            k: v
            for k, v in asdict(self).items()
            if k != "ref_max" and (v is not None or k in ("max_abs", "sqnr_db", "cosine", "top1_agreement", "ok"))
        }


def verification_inputs(program, *, seed: int = 0, extra: int = 1) -> list[tuple]:
    """Example inputs plus random in-distribution ones (same shape, and another sequence length).
    A step program (kv-cache) gets a prefill and decode steps over random caches instead."""
    if program.meta.get("kv_cache"):
        from .kv_step import step_verification_inputs

        return step_verification_inputs(program, seed=seed, extra=extra)
    g = torch.Generator().manual_seed(seed)
    base = tuple(program.example_inputs)
    sets = [base]
    vocab = _vocab_size(program)
    for _ in range(extra):
        sets.append(tuple(_like(x, name, g, vocab) for x, name in _named(program, base)))
    seq_dims = _seq_dims(program)
    if seq_dims:
        lengths = {base[i].shape[d] for i, d in seq_dims}
        length = max(lengths)
        new_len = length - max(1, length // 4) if length > 2 else length + 1
        resized = list(base)
        for i, d in seq_dims:
            resized[i] = _resize(base[i], d, new_len)
        sets.append(tuple(_like(x, name, g, vocab) for x, name in _named(program, tuple(resized))))
    return sets


def _named(program, inputs):
    names = list(program.input_names) + [f"arg{i}" for i in range(len(program.input_names), len(inputs))]
    return zip(inputs, names)


def _vocab_size(program) -> int | None:
    cfg = program.meta.get("config") or {}
    return cfg.get("vocab_size") or program.meta.get("vocab_size")


def _seq_dims(program) -> list[tuple[int, int]]:
    out = []
    for i, spec in enumerate(program.dynamic_shapes or []):
        for d, name in (spec or {}).items():
            if name in ("seq", "sequence", "seq_len", "tokens") or (d == 1 and name != "batch"):
                out.append((i, int(d)))
    return out


def _resize(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    if x.shape[dim] >= length:
        return x.narrow(dim, 0, length).clone()
    reps = [1] * x.dim()
    reps[dim] = -(-length // x.shape[dim])
    return x.repeat(*reps).narrow(dim, 0, length).clone()


def _like(x, name: str, g: torch.Generator, vocab: int | None):
    if not isinstance(x, torch.Tensor):
        return x
    if x.dtype == torch.bool or "mask" in name.lower():
        # A padding mask: keep every row attending to something (an all-masked row is NaN in eager
        # attention and a defined value in fused kernels; neither is "in distribution").
        mask = torch.ones_like(x)
        if x.dim() >= 2 and x.shape[-1] > 2:
            pad = torch.randint(0, x.shape[-1] // 2, (x.shape[0],), generator=g)
            for row, p in enumerate(pad.tolist()):
                if p:
                    mask[row, ..., -p:] = 0
        return mask
    if not x.is_floating_point():
        if "type" in name.lower() or "position" in name.lower():
            return x.clone()
        high = vocab or int(x.max().item()) + 1 if x.numel() else 2
        low = int(x.min().item()) if x.numel() and not vocab else 0
        return torch.randint(low, max(high, low + 1), x.shape, generator=g, dtype=x.dtype)
    std = float(x.float().std()) if x.numel() > 1 else 1.0
    mean = float(x.float().mean()) if x.numel() else 0.0
    return (torch.randn(x.shape, generator=g) * (std or 1.0) + mean).to(x.dtype)


def run_outputs(program, input_sets: list[tuple]) -> list[list[torch.Tensor]]:
    """Outputs of `program` (a Program or a GraphModule) on each input set.

    A step program (kv-cache) given the inputs of the LM it was made from (token ids only) returns
    the logits it computes through its cache, so it compares with the program before the pass; given
    step inputs, it runs on copies (it updates its caches in place). A sparse-prediction program given
    the inputs of the program before it (no `predict_mask`) predicts every position (`dense_predictions`)."""
    kv = getattr(program, "meta", {}).get("kv_cache") if not isinstance(program, torch.nn.Module) else None
    sparse = getattr(program, "meta", {}).get("sparse_prediction") if not isinstance(program, torch.nn.Module) else None
    gm = program if isinstance(program, torch.nn.Module) else program.gm
    outs = []
    with torch.no_grad():
        for inputs in input_sets:
            if kv and len(inputs) == 1:
                from .kv_step import cached_logits

                result = cached_logits(gm, kv, inputs[0])
            elif kv and len(inputs) == len(kv.get("encoder", {}).get("source_inputs", ())):
                from .kv_step import encoder_decoder_logits

                result = encoder_decoder_logits(program, inputs)
            elif sparse and len(inputs) == len(program.input_names) - 1:
                result = dense_predictions(gm, sparse, inputs)
            else:
                result = gm(*(x.clone() if kv and isinstance(x, torch.Tensor) else x for x in inputs))
            leaves = pytree.tree_leaves(result)
            outs.append([t.detach() for t in leaves if isinstance(t, torch.Tensor)])
    return outs


def dense_predictions(gm, sparse: dict, inputs: tuple) -> list[torch.Tensor]:
    """A sparse-prediction program's outputs at every position: run with an all-True `predict_mask`
    (the dims of `inputs[sparse["mask_like_index"]]`, the token ids), its [B*T, V] logits reshaped
    to [B, T, V], so they compare with the program before the pass."""
    ids = inputs[sparse["mask_like_index"]]
    result = gm(*inputs, torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device))
    outputs = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
    index = sparse["output_index"]
    outputs[index] = outputs[index].reshape(*ids.shape[:2], -1)
    return outputs


def outputs_close(expected, actual, *, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Whether two (nested) outputs hold the same tensors, each close in float64 (what the partition
    passes check a rank's program against the whole one with)."""
    flat_e = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    flat_a = [t for t in torch.utils._pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    return len(flat_e) == len(flat_a) and all(
        e.shape == a.shape and torch.allclose(a.double(), e.double(), rtol=rtol, atol=atol)
        for e, a in zip(flat_e, flat_a)
    )


def compare(reference: list[list[torch.Tensor]], actual: list[list[torch.Tensor]]) -> Metrics:
    """Quality of `actual` against `reference` over all outputs of all input sets."""
    max_abs, sig, err, dot, na, nb = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    agree = total = 0
    ref_max = 0.0
    for refs, acts in zip(reference, actual):
        if len(refs) != len(acts):
            return Metrics(None, None, None, None, ok=False, note="number of outputs changed")
        for r, a in zip(refs, acts):
            if r.shape != a.shape:
                return Metrics(
                    None, None, None, None, ok=False, note=f"output shape changed {tuple(r.shape)} -> {tuple(a.shape)}"
                )
            if not r.is_floating_point():
                mismatch = float((r != a).sum())
                max_abs = max(max_abs, float(mismatch > 0))
                continue
            r64, a64 = r.double(), a.double()
            if torch.isnan(r64).ne(torch.isnan(a64)).any():
                return Metrics(math.inf, None, None, None, ok=False, note="NaN pattern changed")
            finite = torch.isfinite(r64) & torch.isfinite(a64)
            r64, a64 = r64[finite], a64[finite]
            diff = a64 - r64
            if diff.numel():
                max_abs = max(max_abs, float(diff.abs().max()))
                ref_max = max(ref_max, float(r64.abs().max()))
            sig += float((r64 * r64).sum())
            err += float((diff * diff).sum())
            dot += float((r64 * a64).sum())
            na += float((r64 * r64).sum())
            nb += float((a64 * a64).sum())
            if r.dim() >= 2 and r.shape[-1] > 1:
                agree += int((r.argmax(-1) == a.argmax(-1)).sum())
                total += r.argmax(-1).numel()
    sqnr = SQNR_CAP_DB if err == 0 else (10 * math.log10(sig / err) if sig > 0 else -math.inf)
    cosine = 1.0 if na == 0 and nb == 0 else (dot / math.sqrt(na * nb) if na > 0 and nb > 0 else 0.0)
    return Metrics(
        max_abs,
        round(min(sqnr, SQNR_CAP_DB), 3),
        round(cosine, 8),
        agree / total if total else None,
        inputs=len(reference),
        ref_max=ref_max,
    )


def check_exact(m: Metrics, dtype: torch.dtype) -> Metrics:
    atol, rtol = EXACT_TOLERANCE.get(dtype, EXACT_TOLERANCE[torch.float32])
    tol = atol + rtol * m.ref_max
    m.tolerance = tol
    m.ok = m.ok and m.max_abs is not None and m.max_abs <= tol
    return m


def output_dtype(outputs: list[list[torch.Tensor]]) -> torch.dtype:
    for outs in outputs:
        for t in outs:
            if t.is_floating_point():
                return t.dtype
    return torch.float32
