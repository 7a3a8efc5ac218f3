"""fuse-attention: hand-written attention -> one aten.scaled_dot_product_attention per site.

Every model case asserts the pass fired on every layer (stats, sites), the IR (FileCheck), numerics
against the eager model at the example inputs and at another sequence length, and gradients.
Lookalikes (gates, softmax over queries, returned scores, training dropout, broadcasting keys) must
leave the graph untouched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import FileCheck, assert_close

from examples import tiny_gpt
from optpipe.attention_sites import SDPA, classify_mask, find_attention_sites, sdpa_arguments
from optpipe.capture import capture
from optpipe.registry import get_pass
from tests import hf_models

SDPA_CALL = "torch.ops.aten.scaled_dot_product_attention.default("


def run_pass(program, name="fuse-attention", **options):
    info = get_pass(name)
    result = info.fn(program, info.config_cls(**options))
    program.gm.recompile()
    return result


def sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]


def model_output(model, inputs: dict) -> torch.Tensor:
    """The tensor capture() picks: the output itself, or logits / last_hidden_state."""
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if "logits" in out else out["last_hidden_state"]


def eager_output(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model, inputs)


# -- model cases ---------------------------------------------------------------------------------
def _tiny_gpt(attn: str, seq: int = 32):
    model, (ids,) = tiny_gpt.build() if attn == "eager" else tiny_gpt.build_flash()
    if seq != ids.shape[1]:
        ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids}


@dataclass(frozen=True)
class Case:
    model: str
    attn: str
    fused: int
    canonicalized: int
    mask: str
    gqa: bool = False
    layers: int = 2
    other_seq: int = 24

    @property
    def id(self) -> str:
        return f"{self.model}-{self.attn}"

    def build(self, seq: int | None = None):
        if self.model == "tiny_gpt":
            return _tiny_gpt(self.attn, seq or 32)
        builder = getattr(hf_models, self.model)
        return builder(self.attn, seq) if seq else builder(self.attn)


CASES = [
    Case("tiny_gpt", "eager", fused=2, canonicalized=0, mask="causal", other_seq=20),
    # nanoGPT's flash path: already SDPA with is_causal; the pass only makes the scale explicit
    Case("tiny_gpt", "flash", fused=0, canonicalized=2, mask="causal", other_seq=20),
    Case("gpt2", "eager", fused=2, canonicalized=0, mask="causal"),
    Case("gpt2", "sdpa", fused=0, canonicalized=2, mask="causal"),
    Case("llama", "eager", fused=2, canonicalized=0, mask="causal", gqa=True),
    Case("llama", "sdpa", fused=0, canonicalized=2, mask="causal", gqa=True),
    Case("bert", "eager", fused=2, canonicalized=0, mask="padding"),
    # already canonical: explicit scale, padding mask kept; nothing to do
    Case("bert", "sdpa", fused=0, canonicalized=0, mask="padding"),
]


@functools.cache
def captured(case: Case):
    model, inputs = case.build()
    return model, inputs, capture(model, inputs)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def fused(request):
    case = request.param
    model, inputs, program = captured(case)
    program = program.copy()
    result = run_pass(program)
    return case, model, inputs, program, result


def test_every_site_fused(fused):
    case, model, inputs, program, result = fused
    assert result.stats == {"fused": case.fused, "canonicalized": case.canonicalized, "sites": case.layers}
    assert result.modified == bool(case.fused or case.canonicalized)

    code = program.gm.code
    FileCheck().check_count(SDPA_CALL, case.layers, exactly=True).run(code)
    FileCheck().check_not("softmax").check_not("masked_fill").run(code)
    if case.mask == "causal":
        FileCheck().check_count("is_causal = True", case.layers, exactly=True).run(code)
    else:  # the padding mask stays (positional in transformers' own SDPA calls)
        assert all(sdpa_arguments(n)["attn_mask"] is not None for n in sdpa_nodes(program.gm))
    if case.gqa:
        FileCheck().check_count("enable_gqa = True", case.layers, exactly=True).run(code)

    sites = find_attention_sites(program.gm, program.example_inputs)
    assert len(sites) == case.layers
    assert len({s.module_path for s in sites}) == case.layers and all(s.module_path for s in sites)
    for site in sites:
        assert site.mask == case.mask
        assert site.is_causal == (case.mask == "causal")
        assert (site.heads, site.head_dim, site.scale) == (4, 16, 0.25)
        assert site.gqa == case.gqa and site.kv_heads == (2 if case.gqa else 4)
    for node in sdpa_nodes(program.gm):
        assert node.kwargs["scale"] == 0.25
        assert {"val", "nn_module_stack"} <= node.meta.keys()

    again = program.copy()
    assert not run_pass(again).modified  # canonical form is a fixed point


def test_matches_eager(fused):
    case, model, inputs, program, _ = fused
    assert program.dynamic_shapes and any(program.dynamic_shapes)
    with torch.no_grad():
        assert_close(program.gm(*inputs.values()), eager_output(model, inputs))
        _, other = case.build(case.other_seq)
        assert_close(program.gm(*other.values()), eager_output(model, other))


def _param_grads(module, forward, names):
    params = dict(module.named_parameters())
    out = forward()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad((out * weights).sum(), [params[n] for n in names], allow_unused=True)
    return dict(zip(names, grads))


def test_gradients_match_eager(fused):
    case, model, inputs, program, _ = fused
    names = sorted(set(dict(model.named_parameters())) & set(dict(program.gm.named_parameters())))
    assert len(names) >= len(dict(program.gm.named_parameters())) - 1  # all but a tied alias
    expected = _param_grads(model, lambda: model_output(model, inputs), names)
    actual = _param_grads(program.gm, lambda: program.gm(*inputs.values()), names)
    assert any(g is not None for g in actual.values())
    for name in names:
        if expected[name] is None:
            assert actual[name] is None or not actual[name].any(), name
        else:
            assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gqa_can_be_disabled():
    _, _, program = captured(CASES[4])  # llama-eager
    program = program.copy()
    result = run_pass(program, enable_gqa=False)
    assert result.stats["fused"] == 2
    FileCheck().check_count(SDPA_CALL, 2, exactly=True).check_not("enable_gqa").run(program.gm.code)
    assert all(s.kv_heads == 2 and s.gqa for s in find_attention_sites(program.gm))  # K/V repeat_kv'd


@pytest.mark.slow
def test_real_minilm():
    model, inputs = hf_models.minilm("eager")
    program = capture(model, inputs)
    result = run_pass(program)
    assert result.stats == {"fused": 6, "canonicalized": 0, "sites": 6}
    FileCheck().check_count(SDPA_CALL, 6, exactly=True).check_not("softmax").run(program.gm.code)
    assert [s.mask for s in find_attention_sites(program.gm, program.example_inputs)] == ["padding"] * 6

    expected = eager_output(model, inputs)
    with torch.no_grad():
        actual = program.gm(*inputs.values())
    valid = inputs["attention_mask"].bool()
    assert (~valid).any(), "the batch should contain padding"
    assert_close(actual[valid], expected[valid])
    pooled = lambda h: (h * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    assert_close(pooled(actual), pooled(expected))  # the sentence embedding
    # padded positions (which no one reads) drift more under SDPA's blocked kernel
    assert_close(actual, expected, rtol=1e-4, atol=1e-4)


# -- hand-written variants on small modules -----------------------------------------------------
B, H, L, D = 2, 4, 8, 16


def qkv(seq: int, batch: int = B, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, H, seq, D, generator=g).to(dtype) for _ in range(3))


class ScaleByConstantTensor(nn.Module):
    def forward(self, q, k, v):
        s = (q @ k.transpose(-2, -1)) / torch.full((), 4.0)
        return torch.softmax(s, dim=-1) @ v


class ScaleByLiftedConstant(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.permute(0, 1, 3, 2)) * torch.tensor(0.25)
        return F.softmax(s, dim=-1) @ v


class AdditiveBias(nn.Module):
    """ALiBi-style bias: a float mask that is not 0/-inf, kept as attn_mask."""

    def forward(self, q, k, v, bias):
        s = q @ k.transpose(-2, -1) * 0.25 + bias
        return torch.softmax(s, -1) @ v


class BiasBeforeScale(nn.Module):
    """(q kᵀ + bias) * c: SDPA adds the mask after scaling, so the bias must carry c."""

    def forward(self, q, k, v, bias):
        s = (q @ k.transpose(-2, -1) + bias) * 0.25
        return torch.softmax(s, -1) @ v


class WherePadding(nn.Module):
    """Older HF style: torch.where(mask, scores, dtype-min) with a key padding mask input."""

    def forward(self, q, k, v, attention_mask):
        s = q @ k.transpose(-2, -1) * 0.25
        keep = attention_mask[:, None, None, :].bool()
        s = torch.where(keep, s, torch.full((), torch.finfo(s.dtype).min))
        return torch.softmax(s, -1) @ v


class MaskedFillPadding(nn.Module):
    def forward(self, q, k, v, attention_mask):
        s = q @ k.transpose(-2, -1) * 0.25
        s = s.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
        return torch.softmax(s, -1) @ v


class CausalAndPadding(nn.Module):
    """A static causal masked_fill and an additive padding mask on the same scores."""

    def forward(self, q, k, v, attention_mask):
        T = q.shape[-2]
        s = q @ k.transpose(-2, -1) * 0.25
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).tril().logical_not(), float("-inf"))
        s = s + (1.0 - attention_mask[:, None, None, :].to(s.dtype)) * torch.finfo(s.dtype).min
        return torch.softmax(s, -1) @ v


class SlidingWindow(nn.Module):
    """A window wider than the example length: causal at L=8, not at other lengths."""

    def forward(self, q, k, v):
        T = q.shape[-2]
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        allowed = (j <= i) & (i - j < 12)
        s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~allowed, float("-inf"))
        return torch.softmax(s, -1) @ v


class UpcastSoftmax(nn.Module):
    """bf16 scores, softmax in fp32, cast back (the usual mixed-precision idiom)."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * 0.25
        return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Bmm3d(nn.Module):
    """Heads folded into the batch: [B*H, L, D] with torch.bmm."""

    def forward(self, q, k, v):
        q, k, v = (x.flatten(0, 1) for x in (q, k, v))
        p = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * 0.25, dim=-1)
        return torch.bmm(p, v)


def _padding_mask(seq=L, batch=B):
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[-1, seq // 2 :] = 0
    return mask


def _with_bias(seq):
    return qkv(seq) + (torch.randn(H, seq, seq, generator=torch.Generator().manual_seed(1)),)


# name: (module, inputs at a sequence length, mask kind of the fused site, attn_mask kept)
VARIANTS = {
    "div-full-constant": (ScaleByConstantTensor, qkv, "none", False),
    "mul-lifted-constant-permute": (ScaleByLiftedConstant, qkv, "none", False),
    "additive-bias": (AdditiveBias, _with_bias, "custom", True),
    "bias-before-scale": (BiasBeforeScale, _with_bias, "custom", True),
    "where-padding": (WherePadding, lambda seq: qkv(seq) + (_padding_mask(seq),), "padding", True),
    "masked-fill-padding": (MaskedFillPadding, lambda seq: qkv(seq) + (_padding_mask(seq),), "padding", True),
    "causal-and-padding": (CausalAndPadding, lambda seq: qkv(seq) + (_padding_mask(seq),), "causal+padding", True),
    "sliding-window": (SlidingWindow, qkv, "custom", True),
    "upcast-softmax-bf16": (UpcastSoftmax, lambda seq: qkv(seq, dtype=torch.bfloat16), "none", False),
    "bmm-3d": (Bmm3d, qkv, "none", False),
}


def capture_dynamic(model, inputs):
    """Capture with dynamic batch and sequence dims (capture's guess keeps 4-D seq dims static)."""
    dims = {4: {0: "batch", 2: "seq"}, 3: {1: "seq", 2: "seq"}, 2: {0: "batch", 1: "seq"}}
    return capture(model, inputs, dynamic_shapes=[dims[x.dim()] for x in inputs])


@pytest.mark.parametrize("name", VARIANTS)
def test_hand_written_variants(name):
    cls, make_inputs, mask_kind, has_mask = VARIANTS[name]
    model, inputs = cls().eval(), make_inputs(L)
    program = capture_dynamic(model, inputs)
    result = run_pass(program)
    assert result.modified and result.stats["fused"] == 1 and result.stats["sites"] == 1
    code = program.gm.code
    FileCheck().check(SDPA_CALL).check("scale = ").run(code)
    FileCheck().check_not("softmax").check_not("bmm").check_not("matmul").run(code)
    (site,) = find_attention_sites(program.gm, program.example_inputs)
    assert site.mask == mask_kind and site.scale == 0.25
    assert ("attn_mask = " in code) == has_mask
    tol = {"rtol": 1.6e-2, "atol": 1e-2} if inputs[0].dtype == torch.bfloat16 else {}
    with torch.no_grad():
        for seq in (L, 11):
            inputs = make_inputs(seq)
            assert_close(program.gm(*inputs), model(*inputs), **tol)


def test_sliding_window_is_not_mistaken_for_causal():
    program = capture_dynamic(SlidingWindow(), qkv(L))
    (mask,) = [n.args[1] for n in program.gm.graph.nodes if n.target is torch.ops.aten.masked_fill.Scalar]
    # at the example length (8 < window 12) the pattern is exactly causal; other lengths differ
    assert classify_mask(program.gm, mask, program.example_inputs, blocked_when_true=True) == "custom"
    run_pass(program)
    FileCheck().check_not("is_causal").run(program.gm.code)
    with torch.no_grad():
        longer = qkv(seq=20)
        assert_close(program.gm(*longer), SlidingWindow()(*longer))


# -- lookalikes: must not fire ----------------------------------------------------------------------
class Gate(nn.Module):
    """Mixture-of-experts-style gate: softmax over x @ W, then @ W2 (weights, not activations)."""

    def __init__(self, transposed=False):
        super().__init__()
        self.transposed = transposed
        self.w = nn.Parameter(torch.randn(D, D))
        self.w2 = nn.Parameter(torch.randn(D, D))

    def forward(self, x, k, v):
        w = self.w.transpose(-2, -1) if self.transposed else self.w
        return torch.softmax(x @ w * 0.25, dim=-1) @ self.w2


class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-2) @ v


class ReturnsProbabilities(nn.Module):
    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
        return p @ v, p


class TrainingDropout(nn.Module):
    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
        return F.dropout(p, 0.1, training=True) @ v


class BroadcastKeys(nn.Module):
    """One key/value set for the whole batch: matmul broadcasts it, SDPA would not."""

    def forward(self, q, k, v):
        k, v = k.mean(0, keepdim=True), v.mean(0, keepdim=True)
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


class UntransposedKeys(nn.Module):
    """q @ k (k not transposed): a valid matmul when L == D, not attention."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k * 0.25, dim=-1) @ v


LOOKALIKES = {
    "gate": Gate,
    "gate-transposed-weight": lambda: Gate(transposed=True),
    "softmax-over-queries": SoftmaxOverQueries,
    "probabilities-returned": ReturnsProbabilities,
    "training-dropout": TrainingDropout,
    "broadcast-keys": BroadcastKeys,
    "untransposed-keys": UntransposedKeys,
}


@pytest.mark.parametrize("name", LOOKALIKES)
def test_lookalikes_are_not_fused(name):
    inputs = qkv(seq=D)
    program = capture(LOOKALIKES[name]().eval(), inputs)
    before = program.gm.code
    result = run_pass(program)
    assert not result.modified
    assert result.stats == {"fused": 0, "canonicalized": 0, "sites": 0}
    assert program.gm.code == before
    FileCheck().check("softmax").run(program.gm.code)


def test_config_is_validated():
    info = get_pass("fuse-attention")
    assert info.exact
    assert {o["name"] for o in info.options()} >= {"enable-gqa", "causal"}
    assert all(o["help"] for o in info.options())
    with pytest.raises(ValueError, match="enable-gqa must be true or false"):
        info.config_cls(enable_gqa="yes")
