"""fuse-attention on the ways model families write attention (issue 16): every site found, numerics.

Small modules written the way each family writes it: Bloom (ALiBi through `baddbmm`, scores viewed
between (B·H, L, S) and (B, H, L, S)), DeBERTa-v2 (K scaled before a 3-D `bmm`, a relative-position
term, a 2-D padding mask), T5 (`scores += position_bias`, in place), Falcon (one K/V head, `scores
/= √d` in place) and Gemma-2 (tanh soft-capping: optpipe's `score_mod_attention`, not SDPA). Each
case asserts the pass fired, the IR, numerics against eager at two lengths, and gradients; the
near-misses are reported in `details["skipped"]` with the reason. The real families run once
(`slow`) through `tests/hf_zoo.py`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import FileCheck, assert_close

from optpipe.attention_sites import find_attention_sites, sdpa_arguments
from optpipe.capture import capture
from optpipe.ops import opdef
from optpipe.passes.attention_ops import score_mod_attention
from tests.passes.test_fuse_attention import SDPA_CALL, capture_dynamic, eager_output, run_pass, sdpa_nodes

B, H, L, D = 2, 4, 8, 16
SCORE_MOD_CALL = "torch.ops.optpipe.score_mod_attention.default("


def qkv(seq: int, batch: int = B):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, H, seq, D, generator=g) for _ in range(3))


def padding_mask(seq: int, batch: int = B):
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[-1, seq // 2 :] = 0
    return mask


class BloomStyle(nn.Module):
    """ALiBi added by `baddbmm` on (B·H, L, S) scores, viewed to (B, H, L, S) for the causal mask
    and softmax, and back to (B·H, L, S) for `bmm` with V."""

    def forward(self, q, k, v):
        b, h, n, d = q.shape
        slopes = torch.tensor([2.0 ** -(i + 1) for i in range(H)])
        alibi = (slopes[:, None, None] * torch.arange(n)).repeat(b, 1, 1)  # (B·H, 1, S)
        q3, k3, v3 = (x.reshape(b * h, n, d) for x in (q, k, v))
        s = alibi.baddbmm(q3, k3.transpose(-1, -2), beta=1.0, alpha=d**-0.5).view(b, h, n, -1)
        blocked = torch.ones(n, n, dtype=torch.bool).tril().logical_not()
        s = s + torch.zeros(n, n).masked_fill(blocked, torch.finfo(s.dtype).min)
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(p.view(b * h, n, -1), v3).view(b, h, n, d)


class DebertaStyle(nn.Module):
    """K scaled by √(d·3) before a 3-D `bmm`, a content-to-position term (learned, from q) added,
    a view to (B, H, L, S) and a 2-D padding mask: padded queries attend nothing (uniformly)."""

    def __init__(self):
        super().__init__()
        self.pos_key = nn.Linear(D, D)

    def forward(self, q, k, v, attention_mask):
        b, h, n, d = q.shape
        q3, k3, v3 = (x.reshape(b * h, n, d) for x in (q, k, v))
        scale = torch.sqrt(torch.tensor(d, dtype=torch.float) * 3)
        s = torch.bmm(q3, k3.transpose(-1, -2) / scale.to(q.dtype))
        c2p = torch.bmm(q3, self.pos_key(k3).transpose(-1, -2))
        s = (s + c2p / scale).view(-1, h, n, n)
        mask = (attention_mask[:, None, :, None] * attention_mask[:, None, None, :]).bool()
        s = s.masked_fill(~mask, torch.finfo(q.dtype).min)
        p = F.dropout(F.softmax(s, -1), 0.1, training=False)
        return torch.bmm(p.view(-1, n, n), v3).view(-1, h, n, d)


class InPlaceBias(nn.Module):
    """T5: a learned relative-position bias added in place (`scores += bias` exports as `add_`)."""

    def __init__(self):
        super().__init__()
        self.rel = nn.Embedding(64, H)

    def forward(self, q, k, v):
        pos = torch.arange(q.shape[-2])
        bias = self.rel(pos[None, :] - pos[:, None] + 32).permute(2, 0, 1)[None]  # (1, H, L, S)
        s = q @ k.transpose(-2, -1)
        s += bias
        return F.softmax(s.float(), dim=-1).type_as(s) @ v


class MultiQuery(nn.Module):
    """Falcon: one K/V head broadcast over the query heads, `scores /= √d` in place."""

    def forward(self, q, k, v):
        k, v = k[:, :1], v[:, :1]
        s = q @ k.transpose(-1, -2)
        s /= math.sqrt(q.shape[-1])
        return F.softmax(s, dim=-1) @ v


class SoftCapped(nn.Module):
    """Gemma-2: scores soft-capped, cap·tanh(s / cap), then the causal mask added."""

    def __init__(self, mask_first: bool = False):
        super().__init__()
        self.mask_first = mask_first

    def forward(self, q, k, v):
        n = q.shape[-2]
        s = q @ k.transpose(-2, -1) * 0.25
        causal = torch.full((n, n), torch.finfo(q.dtype).min).triu(1)
        if self.mask_first:
            s = s + causal
        s = torch.tanh(s / 3.0) * 3.0
        if not self.mask_first:
            s = s + causal
        return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class ClampedScores(nn.Module):
    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1) * 0.25).clamp(min=-1.0)
        return F.softmax(s, -1) @ v


class Router(nn.Module):
    """A softmax that is no attention (a mixture-of-experts router)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, 4))

    def forward(self, q, k, v):
        return F.softmax(q @ self.w, dim=-1)


# name: (module, inputs at a sequence length, fused op call, attn_mask kept, is_causal)
CASES = {
    "bloom-alibi-baddbmm": (BloomStyle, qkv, SDPA_CALL, True, False),
    "deberta-scaled-k-relative": (DebertaStyle, lambda n: qkv(n) + (padding_mask(n),), SDPA_CALL, True, False),
    "t5-in-place-bias": (InPlaceBias, qkv, SDPA_CALL, True, False),
    "falcon-multi-query": (MultiQuery, qkv, SDPA_CALL, False, False),
    "gemma2-softcap": (SoftCapped, qkv, SCORE_MOD_CALL, False, True),
}


def _grads(module, inputs):
    """Input gradients of a random projection of the output. Padded query rows (a 2-D mask blocks
    every key) are left out: eager's masked_fill cuts their gradient, an SDPA mask passes the
    gradient of their uniform softmax (the forward values are the same)."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = module(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    if len(inputs) == 4:
        weights = weights * inputs[3][:, None, :, None]
    diff = [x for x in leaves if x.requires_grad]
    return torch.autograd.grad((out * weights).sum(), diff)


@pytest.mark.parametrize("name", CASES)
def test_family_site_fused(name):
    cls, make_inputs, call, has_mask, causal = CASES[name]
    model = cls().eval()
    program = capture_dynamic(model, make_inputs(L))
    result = run_pass(program)
    assert result.stats == {"fused": 1, "canonicalized": 0, "sites": 1}
    assert result.details["skipped"] == [] and result.details["notes"] == []
    code = program.gm.code
    FileCheck().check_count(call, 1, exactly=True).run(code)
    for op in ("softmax", "baddbmm", "tanh", "add_", "div_"):
        FileCheck().check_not(f"aten.{op}.").run(code)
    matmuls = code.count("aten.bmm.default(") + code.count("aten.matmul.default(")
    assert matmuls == (1 if isinstance(model, DebertaStyle) else 0)  # DeBERTa's c2p term stays in the mask
    if call == SDPA_CALL:
        (node,) = sdpa_nodes(program.gm)
        assert (sdpa_arguments(node)["attn_mask"] is not None) == has_mask
        assert node.args[0].op == "placeholder"  # q itself, not re-split from (B·H, L, D)
        (site,) = find_attention_sites(program.gm, program.example_inputs)
        assert (site.heads, site.head_dim, site.is_causal) == (H, D, causal)  # 4-d: (B, H, L, D)
    else:
        FileCheck().check("'softcap', 3.0, 0.25, True").run(code)
    with torch.no_grad():
        for seq in (L, 11):
            inputs = make_inputs(seq)
            assert_close(program.gm(*inputs), model(*inputs))
    inputs = make_inputs(L)
    for actual, expected in zip(_grads(program.gm, inputs), _grads(model, inputs)):
        assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_multi_query_without_gqa_expands_kv():
    program = capture_dynamic(MultiQuery(), qkv(L))
    assert run_pass(program, enable_gqa=False).stats["fused"] == 1
    FileCheck().check("aten.expand.default").check(SDPA_CALL).check_not("enable_gqa").run(program.gm.code)
    with torch.no_grad():
        assert_close(program.gm(*qkv(11)), MultiQuery()(*qkv(11)))


# -- near misses: reported, not fused ----------------------------------------------------------------
NEAR_MISSES = {
    "mask-before-softcap": (lambda: SoftCapped(mask_first=True), "before soft-capping"),
    "unknown-op-on-scores": (ClampedScores, "`aten.clamp.default` between the scores and softmax"),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_misses_are_reported(name):
    factory, reason = NEAR_MISSES[name]
    program = capture(factory().eval(), qkv(L))
    before = program.gm.code
    result = run_pass(program)
    assert not result.modified and result.stats["sites"] == 0 and program.gm.code == before
    (skipped,) = result.details["skipped"]
    assert reason in skipped["reason"] and set(skipped) >= {"site", "reason"}
    assert any("left unfused" in note for note in result.details["notes"])


def test_no_attention_is_noted():
    program = capture(Router().eval(), qkv(L))
    result = run_pass(program)
    assert not result.modified and result.details["skipped"] == []
    assert any("no attention site found" in note for note in result.details["notes"])


# -- the score-modifier op: CPU kernel, decomposition (what ORT and TVM run), autograd ----------------
def test_score_mod_op_matches_its_decomposition():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 300, 16, generator=g, requires_grad=True)  # > one CPU query block
    k, v = (torch.randn(2, 2, 300, 16, generator=g, requires_grad=True) for _ in range(2))
    keep = torch.rand(2, 1, 1, 300, generator=g) > 0.2
    decomposition = opdef(score_mod_attention).decomposition
    for mask, causal in ((keep, False), (torch.randn(1, 4, 300, 300, generator=g), True)):
        args = (mask, "softcap", 5.0, 0.25, causal, True)
        out, ref = score_mod_attention(q, k, v, *args), decomposition(q, k, v, *args)
        assert_close(out, ref)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        assert_close(grads, torch.autograd.grad(ref.square().sum(), (q, k, v)))
    with pytest.raises(ValueError, match="unknown score modifier"):
        score_mod_attention(q, k, v, None, "alibi", 1.0, 0.25, False, True)


# -- the families themselves -------------------------------------------------------------------------
@pytest.mark.coverage  # make test runs these families' fuse cell in tests/test_coverage_matrix.py
@pytest.mark.parametrize("arch", ["bloom", "deberta_v2", "gemma2"])
def test_hf_family_every_site_fused(arch):
    from tests import hf_zoo

    model, inputs = hf_zoo.build(arch, "eager")
    program = capture(model, inputs)
    result = run_pass(program)
    assert result.stats["fused"] == result.stats["sites"] == 2 and result.details["skipped"] == []
    FileCheck().check_not("softmax").run(program.gm.code)
    with torch.no_grad():
        assert_close(program.gm(*inputs.values()), eager_output(model, inputs))
