"""attention across transformers families (tests/hf_zoo.py, after fuse-attention): sites whose mask
an efficient form keeps are swapped — a model's own causal sliding window (Mistral), fixed-length
encoders (ViT: linformer takes the site's key length), bidirectional encoders with padding and
cross-attention with a padding mask (BART, T5), sites whose mask adds a score bias (ALiBi: MPT and a
hand-written module; T5's relative positions) under the exact sparse kinds, which take the bias as an
input — and every other site is refused with the mask named, per site, in `details["skipped"]`.

Score bias: the op (every sparse kind, its block-banded CPU path and its dense one, with grouped-query
heads and key padding) equals dense attention with the bias and the pattern's band written out,
forward and gradients w.r.t. q/k/v (and a learned bias); the pass keeps ALiBi exactly (a window at
least the length: the model) and as the banded reference (a narrower one), whatever else the mask
blocks (a model's own window, DeBERTa-v2's padded queries); the linear kinds refuse it, naming the bias.

Score modifiers (Gemma-2's tanh soft-capping, `optpipe.score_mod_attention` after fuse-attention): the
sparse kinds swap those sites keeping the cap (the model exactly where the window covers it, its
gradients too, and not the model once the cap is dropped); the op with a cap equals the capped scores
written out for every kind, path, causality, padding and bias, forward and gradients, and so do its
decomposition (standard ATen ops, what the targets lower) and its FlexAttention path; the kernel kinds
refuse such sites, naming the modifier.

Exactness where it holds: sliding-window at the model's window is the model's attention; linformer
with as many projected keys as keys (mean pooling over one-token segments) is dense attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import FileCheck, assert_close

import optpipe.ops
from optpipe.capture import capture
from optpipe.errors import PassError
from optpipe.passes import attention as attention_pass  # noqa: F401 - registers the `attention` pass
from optpipe.passes import attention_ops as ops
from optpipe.registry import get_pass
from tests import hf_zoo

SDPA_CALL = "torch.ops.aten.scaled_dot_product_attention.default("


def _fused(arch: str):
    """(model, inputs, program after fuse-attention) of a tiny `arch` with transformers' SDPA."""
    model, inputs = hf_zoo.build(arch, hf_zoo.attention_implementations(arch)[-1])
    program = capture(model, inputs)
    info = get_pass("fuse-attention")
    info.fn(program, info.config_cls())
    program.gm.recompile()
    return model, inputs, program


def _swap(program, **options):
    """(copy of `program` after attention{options}, its PassResult)."""
    info = get_pass("attention")
    program = program.copy()
    result = info.fn(program, info.config_cls(**options))
    program.gm.recompile()
    return program, result


def _eager(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, use_cache=False) if "decoder_input_ids" in inputs else model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _check_padded_rows(model, inputs, program, swapped) -> None:
    """Unpadded: exactly the model (one projected key per key). Padded: what the padded tokens hold
    does not matter. (Linformer's padded keys still enter its softmax as zero scores, so a padded
    row is not dense attention; see attention_ops.)"""
    names = program.input_names
    full = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
    with torch.no_grad():
        assert_close(swapped.gm(*(full[n] for n in names)), _eager(model, full), atol=1e-4, rtol=1e-4)
        other_ids = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, 5)
        changed = {**inputs, "input_ids": other_ids}
        assert_close(swapped.gm(*(changed[n] for n in names)), swapped.gm(*(inputs[n] for n in names)))


def _refusals(result) -> dict[str, str]:
    skipped = result.details.get("skipped", [])
    assert all(set(s) == {"site", "reason"} for s in skipped)
    return {s["site"]: s["reason"] for s in skipped}


@pytest.fixture(scope="module")
def mistral():
    return _fused("mistral")


def test_mistral_sliding_window_keeps_the_models_window(mistral):
    model, _, program = mistral
    swapped, result = _swap(program, kind="sliding-window", window=64)
    assert result.stats["rewritten"] == 2 and result.stats["refused"] == 0
    assert [d["window"] for d in result.details["sites"]] == [8, 8]  # the model's window, not 64
    FileCheck().check("optpipe.sparse_attention").check_not(SDPA_CALL).run(swapped.gm.code)
    ids = torch.randint(3, hf_zoo.VOCAB - 1, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # longer than the window and than the example: exactly the model
        assert_close(swapped.gm(ids), model(ids).logits, atol=1e-4, rtol=1e-4)


def test_mistral_window_refused_by_kinds_that_would_attend_beyond_it(mistral):
    _, _, program = mistral
    swapped, result = _swap(program, kind="linear")
    assert result.stats["rewritten"] == 0 and not result.modified
    refusals = _refusals(result)
    assert sorted(refusals) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all("sliding-window mask (window 8)" in r and "kind=linear" in r for r in refusals.values())
    FileCheck().check(SDPA_CALL).check_not("optpipe.").run(swapped.gm.code)


def test_vit_linformer_takes_the_sites_key_length_not_an_input_dim():
    model, inputs, program = _fused("vit")
    program.meta["config"].pop("max_position_embeddings", None)  # ViT's length is fixed: no max needed
    swapped, result = _swap(program, kind="linformer")
    assert result.stats["rewritten"] == 2, result.details
    projections = [p for n, p in swapped.gm.named_parameters() if n.endswith("linformer_proj_key")]
    assert [p.shape for p in projections] == [(17, 17)] * 2  # 16 patches + CLS, not pixel_values' 3 channels
    assert "example length 17" in " ".join(result.details["notes"])
    FileCheck().check("optpipe.linformer_attention").check_not(SDPA_CALL).run(swapped.gm.code)
    with torch.no_grad():
        assert_close(swapped.gm(*program.example_inputs), _eager(model, inputs), atol=1e-4, rtol=1e-4)


def test_bart_encoder_and_cross_attention_with_padding_swap():
    model, inputs, program = _fused("bart")
    swapped, result = _swap(program, kind="linformer", k=64)
    assert result.stats == {"rewritten": 4, "skipped": 0, "refused": 2, "sites": 6}
    rewritten = {d["module_path"]: d for d in result.details["sites"] if d["action"] == "rewritten"}
    assert "model.decoder.layers.0.encoder_attn" in rewritten and "model.encoder.layers.1.self_attn" in rewritten
    assert all(d["key_padding_mask"] for d in rewritten.values())
    refusals = _refusals(result)
    assert sorted(refusals) == ["model.decoder.layers.0.self_attn", "model.decoder.layers.1.self_attn"]
    assert all(r.startswith("causal mask: linformer is bidirectional only") for r in refusals.values())
    _check_padded_rows(model, inputs, program, swapped)
    _, linear = _swap(program, kind="linear")
    assert linear.stats["rewritten"] == 6 and "skipped" not in linear.details


def test_t5_cross_attention_swaps_and_biased_sites_name_the_bias():
    model, inputs, program = _fused("t5")
    swapped, result = _swap(program, kind="linformer", k=64)
    assert result.stats["rewritten"] == 2 and result.stats["refused"] == 4
    assert {d["module_path"] for d in result.details["sites"] if d["action"] == "rewritten"} == {
        "decoder.block.0.layer.1.EncDecAttention",
        "decoder.block.1.layer.1.EncDecAttention",
    }
    assert all("additive score bias" in r and "kind=linformer" in r for r in _refusals(result).values())
    FileCheck().check("optpipe.linformer_attention").run(swapped.gm.code)
    _check_padded_rows(model, inputs, program, swapped)
    # the sparse kinds keep the relative-position bias (with the encoder's padding, the decoder's
    # causality); a positional pattern has no meaning across two sequences: refused, saying so
    sparse_program, sparse = _swap(program, kind="sliding-window", window=64)
    assert sparse.stats == {"rewritten": 4, "skipped": 0, "refused": 2, "sites": 6}
    masks = {d["module_path"]: d["mask"] for d in sparse.details["sites"] if d["action"] == "rewritten"}
    assert masks == {
        "encoder.block.0.layer.0.SelfAttention": "padding+bias",
        "encoder.block.1.layer.0.SelfAttention": "padding+bias",
        "decoder.block.0.layer.0.SelfAttention": "causal+bias",
        "decoder.block.1.layer.0.SelfAttention": "causal+bias",
    }
    cross = _refusals(sparse)
    assert sorted(cross) == ["decoder.block.0.layer.1.EncDecAttention", "decoder.block.1.layer.1.EncDecAttention"]
    assert all(r.startswith("cross-attention") for r in cross.values())
    with torch.no_grad():  # a window covering the sequence: exactly the model, bias included
        got = sparse_program.gm(*(inputs[n] for n in program.input_names))
        assert_close(got, _eager(model, inputs), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def gemma2():
    """Gemma-2 with its scores soft-capped at 2 (50 by default: at the tiny model's scores, tanh would be
    near the identity and a lost cap would go unseen)."""
    model, inputs = hf_zoo.build("gemma2", "eager")
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = 2.0
    program = capture(model, inputs)
    info = get_pass("fuse-attention")
    info.fn(program, info.config_cls())
    program.gm.recompile()
    return model, program


def test_gemma2_soft_capped_sites_swap_to_sliding_window(gemma2):
    model, program = gemma2
    assert "optpipe.score_mod_attention" in program.gm.code
    swapped, result = _swap(program, kind="sliding-window", window=64)
    assert result.stats == {"rewritten": 2, "skipped": 0, "refused": 0, "sites": 2}
    sites = result.details["sites"]
    assert [d["score_mod"] for d in sites] == ["softcap=2.0"] * 2
    assert [d["mask"] for d in sites] == ["causal sliding window 8", "causal"] and sites[0]["window"] == 8
    FileCheck().check_count("torch.ops.optpipe.sparse_attention.default(", 2).check_not("score_mod_attention").run(
        swapped.gm.code
    )
    FileCheck().check("'sliding-window', True, 0.0625, 8, ").check("None, 'softcap', 2.0)").run(swapped.gm.code)
    # the model's window on its sliding layer, 64 >= 21 tokens on its global one: exactly the model
    ids = torch.randint(3, hf_zoo.VOCAB - 1, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        assert_close(swapped.gm(ids), expected, atol=1e-4, rtol=1e-4)
        for node in swapped.gm.graph.nodes:  # near-miss: the same swap with the cap dropped is not the model
            if node.target is ops.sparse_attention:
                node.args = node.args[:14]
        swapped.gm.recompile()
        assert "softcap" not in swapped.gm.code and (swapped.gm(ids) - expected).abs().max() > 1e-2


def test_gemma2_swapped_gradients_match_the_model(gemma2):
    model, program = gemma2
    swapped, _ = _swap(program, kind="sliding-window", window=64)
    ids = torch.randint(3, hf_zoo.VOCAB - 1, (1, 19), generator=torch.Generator().manual_seed(3))
    weights = [model.get_parameter(f"model.layers.{i}.self_attn.{p}_proj.weight") for i in (0, 1) for p in "qk"]
    got = torch.autograd.grad(swapped.gm(ids).square().mean(), weights)
    want = torch.autograd.grad(model(ids).logits.square().mean(), weights)
    assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_gemma2_swapped_sites_are_not_cached_without_their_cap(gemma2):
    """kv-cache's ring buffer takes no score modifier: it stops naming the site and the cap (the
    dense score_mod_attention sites, unswapped, are cached)."""
    _, program = gemma2
    swapped, _ = _swap(program, kind="sliding-window", window=8)
    info = get_pass("kv-cache")
    with pytest.raises(PassError, match=r"model.layers.0.self_attn: its scores are modified \(softcap=2.0\)"):
        info.fn(swapped, info.config_cls(max_len=64))


def test_gemma2_linear_kinds_refuse_the_soft_cap_naming_it(gemma2):
    _, program = gemma2
    for kind in ("linear", "performer", "linformer"):
        swapped, result = _swap(program, kind=kind)
        assert not result.modified and result.stats["refused"] == 2 and result.stats["sites"] == 2
        refusals = _refusals(result)
        assert sorted(refusals) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        assert all(
            r.startswith("scores modified before the softmax (softcap=2.0") and f"kind={kind} never forms" in r
            for r in refusals.values()
        )
        assert swapped.gm.code == program.gm.code


def test_no_attention_sites_says_to_run_fuse_attention_first():
    program = capture(torch.nn.Linear(8, 8).eval(), (torch.randn(2, 8),))
    swapped, result = _swap(program, kind="linear")
    assert not result.modified and result.stats["sites"] == 0
    assert any("run fuse-attention first" in n for n in result.details["notes"])
    assert swapped.gm.code == program.gm.code


# -- score biases (ALiBi, relative positions) kept by the exact sparse kinds ---------------------------------
def _alibi(heads: int, n: int, dtype=torch.float32) -> torch.Tensor:
    """(H, L, S) ALiBi bias: -slope_h * (i - j), slopes 2^-1, 2^-2, ..."""
    slopes = 2.0 ** -torch.arange(1, heads + 1, dtype=dtype)
    pos = torch.arange(n, dtype=dtype)
    return -slopes[:, None, None] * (pos[:, None] - pos[None, :])


class AlibiAttention(nn.Module):
    """Causal attention with an ALiBi bias passed to SDPA as its float attn_mask (causality as its
    -inf entries); with `window`, keys at distance >= window are blocked too (the banded reference)."""

    def __init__(self, window: int = 0, heads: int = 4, dim: int = 32):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        i, j = torch.arange(n, device=x.device)[:, None], torch.arange(n, device=x.device)[None, :]
        blocked = (j > i) | ((i - j >= self.window) if self.window else torch.zeros_like(j > i))
        mask = _alibi(self.heads, n, x.dtype).masked_fill(blocked, float("-inf"))
        return self.out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, d))


@pytest.fixture(scope="module")
def alibi():
    torch.manual_seed(0)
    model = AlibiAttention().eval()
    return model, capture(model, (torch.randn(2, 24, 32),))


def test_alibi_bias_kept_by_sliding_window(alibi):
    model, program = alibi
    swapped, result = _swap(program, kind="sliding-window", window=8)
    assert result.stats == {"rewritten": 1, "skipped": 0, "refused": 0, "sites": 1}
    site = result.details["sites"][0]
    assert site["mask"] == "causal+bias" and site["bias"] and site["causal"] and not site["key_padding_mask"]
    FileCheck().check("torch.ops.optpipe.sparse_attention.default(").check_not(SDPA_CALL).run(swapped.gm.code)
    banded = AlibiAttention(window=8)
    banded.load_state_dict(model.state_dict())
    for n in (24, 300):  # the dense flash path and the block-banded one (past DENSE_MAX_LEN)
        x = torch.randn(2, n, 32, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            assert_close(swapped.gm(x), banded(x), atol=1e-5, rtol=1e-5)
    # gradients through the swapped graph (w.r.t. the input and the q/k/v projection)
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(7))
    grads = []
    for module in (swapped.gm, banded):
        xr = x.clone().requires_grad_(True)
        module(xr).square().sum().backward()
        grads.append((xr.grad, module.get_parameter("qkv.weight").grad))
        module.zero_grad()
    assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_alibi_window_covering_the_sequence_is_the_model(alibi):
    model, program = alibi
    for kind, options in (("sliding-window", {"window": 64}), ("block-sparse", {"block": 32}), ("strided", {})):
        swapped, result = _swap(program, kind=kind, **options)
        assert result.stats["rewritten"] == 1, kind
        x = torch.randn(1, 19, 32, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert_close(swapped.gm(x), model(x), atol=1e-5, rtol=1e-5, msg=kind)
    ep = swapped.export().run_decompositions(optpipe.ops.decompositions())  # the decomposition keeps the bias
    assert "optpipe" not in ep.graph_module.code
    with torch.no_grad():
        assert_close(ep.module()(*program.example_inputs), model(*program.example_inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "performer", "linformer"])
def test_alibi_bias_refused_by_linear_kinds(alibi, kind):
    _, program = alibi
    swapped, result = _swap(program, kind=kind)
    assert not result.modified and result.stats["refused"] == 1
    reason = result.details["sites"][0]["reason"]
    assert "additive score bias" in reason and f"kind={kind} has no input for" in reason
    assert swapped.gm.code == program.gm.code


def test_bias_over_a_mask_that_blocks_more_keeps_what_it_blocks():
    """ALiBi over the model's own window of 5: the mask is the bias, blocked entries included, so a
    wider sliding window is exactly the model."""
    torch.manual_seed(0)
    model = AlibiAttention(window=5).eval()
    program = capture(model, (torch.randn(1, 16, 32),))
    swapped, result = _swap(program, kind="sliding-window", window=8)
    assert result.stats["rewritten"] == 1 and result.details["sites"][0]["mask"] == "causal+bias"
    for n in (16, 290):
        x = torch.randn(1, n, 32, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            assert_close(swapped.gm(x), model(x), atol=1e-5, rtol=1e-5)


def _banded_reference(q, k, v, key_padding_mask, allowed, scale, bias):
    """softmax(q·kᵀ·scale + bias, over the allowed keys) @ v, written out; rows with no key give 0."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) * scale + bias).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


PATTERN_OPTIONS = {  # (window, block, global_tokens, random_blocks, stride)
    "sliding-window": (24, 64, 0, 0, 64),
    "block-sparse": (128, 32, 3, 0, 64),
    "random": (128, 32, 2, 2, 64),
    "strided": (128, 64, 0, 0, 24),
}


@pytest.mark.parametrize("n", [40, 300])  # the dense path and the block-banded one
@pytest.mark.parametrize("kind", ops.SPARSE_PATTERNS)
def test_sparse_op_with_bias_matches_the_banded_reference(kind, n):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(2, 4, n, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, n, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[1, n - 13 :] = False
    options = PATTERN_OPTIONS[kind]
    pattern = ops.SparsePattern(kind, True, *options, seed=1)
    pos = torch.arange(n)
    allowed = pattern.allowed(pos[:, None], pos[None, :], n)
    cases = [  # (bias, key padding mask, differentiate the bias)
        (torch.randn(2, 4, n, n, generator=gen, dtype=torch.float64), kpm, False),
        (_alibi(4, n, torch.float64)[None], None, False),
        (torch.randn(1, 4, 1, n, generator=gen, dtype=torch.float64), kpm, True),  # a learned bias
    ]
    for bias, mask, learned in cases:
        bias.requires_grad_(learned)
        out = ops.sparse_attention(q, k, v, mask, kind, True, 0.25, *options, 1, bias)
        expected = _banded_reference(q, k, v, mask, allowed, 0.25, bias)
        assert_close(out, expected, atol=1e-10, rtol=1e-10)
        grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        inputs = (q, k, v, bias) if learned else (q, k, v)
        got, want = (torch.autograd.grad(o, inputs, grad) for o in (out, expected))
        assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.fixture(scope="module")
def mpt():
    return _fused("mpt")


def test_mpt_alibi_sites_swap_under_every_sparse_kind(mpt):
    model, _, program = mpt
    ids = torch.randint(3, hf_zoo.VOCAB - 1, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    for kind in ops.SPARSE_PATTERNS:  # options covering 21 tokens: the model's attention, its ALiBi included
        swapped, result = _swap(program, kind=kind, window=64, block=16, stride=64, random=1)
        assert result.stats == {"rewritten": 2, "skipped": 0, "refused": 0, "sites": 2}, kind
        assert all(d["mask"] == "causal+bias" and d["bias"] for d in result.details["sites"])
        FileCheck().check_count("optpipe.sparse_attention", 2).check_not(SDPA_CALL).run(swapped.gm.code)
        with torch.no_grad():
            assert_close(swapped.gm(ids), expected, atol=1e-4, rtol=1e-4, msg=kind)


def test_mpt_alibi_refused_by_linear_with_the_bias_named(mpt):
    _, _, program = mpt
    swapped, result = _swap(program, kind="linear")
    assert result.stats["rewritten"] == 0 and result.stats["refused"] == 2
    assert all("additive score bias" in r and "kind=linear" in r for r in _refusals(result).values())
    FileCheck().check(SDPA_CALL).check_not("optpipe.").run(swapped.gm.code)


def test_deberta_v2_bias_with_padded_queries_is_kept():
    model, inputs, program = _fused("deberta_v2")
    swapped, result = _swap(program, kind="sliding-window", window=64)
    assert result.stats == {"rewritten": 2, "skipped": 0, "refused": 0, "sites": 2}
    # its mask blocks padded queries as well as padded keys: not a key padding mask, kept in the bias
    assert all(d["mask"] == "bias" and not d["key_padding_mask"] for d in result.details["sites"])
    FileCheck().check("optpipe.sparse_attention").check_not(SDPA_CALL).run(swapped.gm.code)
    with torch.no_grad():  # padded rows included: the bias blocks what the model's mask blocks
        got = swapped.gm(*(inputs[n] for n in program.input_names))
        assert_close(got, _eager(model, inputs), atol=1e-4, rtol=1e-4)


# -- score modifiers (Gemma-2's soft-capping) in the sparse op ------------------------------------------------
def _capped_reference(q, k, v, key_padding_mask, allowed, scale, bias, cap):
    """softmax(cap·tanh(q·kᵀ·scale / cap) + bias, over the allowed keys) @ v, written out; rows with no key give 0."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = cap * torch.tanh(q @ k.transpose(-1, -2) * scale / cap) + (0.0 if bias is None else bias)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) @ v


SMALL_PATTERNS = {  # (window, block, global_tokens, random_blocks, stride): several blocks at 37 tokens
    "sliding-window": (7, 64, 0, 0, 64),
    "block-sparse": (128, 8, 3, 0, 64),
    "random": (128, 8, 2, 2, 64),
    "strided": (128, 64, 0, 0, 6),
}


@pytest.mark.parametrize("path", ["dense", "banded"])
@pytest.mark.parametrize("kind", ops.SPARSE_PATTERNS)
def test_sparse_op_with_softcap_matches_the_hand_written_reference(monkeypatch, kind, path):
    """Every sparse kind, causal and not, grouped-query heads, key padding and a bias: the CPU
    kernel (its dense flash-sized path, and the block-banded one forced at 37 tokens) and the
    decomposition equal the soft-capped scores written out, forward and gradients."""
    from optpipe.passes import attention_sparse_cpu

    if path == "banded":
        monkeypatch.setattr(attention_sparse_cpu, "DENSE_MAX_LEN", 0)
    n, gen = 37, torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n, 8, generator=gen, dtype=torch.float64) * 3  # scores well into tanh's bend
    k, v = (torch.randn(2, 2, n, 8, generator=gen, dtype=torch.float64) * 3 for _ in range(2))
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[1, n - 9 :] = False
    options = SMALL_PATTERNS[kind]
    decomposition = optpipe.ops.opdef(ops.sparse_attention).decomposition
    for causal, mask, bias in ((True, None, None), (False, kpm, torch.randn(1, 4, 1, n, generator=gen).double())):
        pattern = ops.SparsePattern(kind, causal, *options, seed=1)
        pos = torch.arange(n)
        allowed = pattern.allowed(pos[:, None], pos[None, :], n)
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        args = (mask, kind, causal, 0.5, *options, 1, bias, "softcap", 2.0)
        out = ops.sparse_attention(*inputs, *args)
        expected = _capped_reference(*inputs, mask, allowed, 0.5, bias, 2.0)
        assert_close(out, expected, atol=1e-10, rtol=1e-10)
        assert_close(decomposition(*inputs, *args), expected, atol=1e-10, rtol=1e-10)
        grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        got, want = (torch.autograd.grad(o, inputs, grad) for o in (out, expected))
        assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_sparse_op_softcap_exports_to_standard_ops_and_checks_its_modifier():
    class Capped(nn.Module):
        def forward(self, q, k, v):
            return ops.sparse_attention(
                q, k, v, None, "sliding-window", True, 0.5, 4, 64, 0, 0, 64, 0, None, "softcap", 1.0
            )

    q, k, v = (torch.randn(1, 2, 12, 8, generator=torch.Generator().manual_seed(i)) * 4 for i in range(3))
    ep = torch.export.export(Capped(), (q, k, v)).run_decompositions(optpipe.ops.decompositions())
    assert "optpipe" not in ep.graph_module.code and "aten.tanh" in ep.graph_module.code  # what the targets lower
    assert_close(ep.module()(q, k, v), Capped()(q, k, v), atol=1e-6, rtol=1e-6)
    plain = ops.sparse_attention(q, k, v, None, "sliding-window", True, 0.5, 4, 64, 0, 0, 64, 0)
    assert (plain - Capped()(q, k, v)).abs().max() > 1e-2  # the cap matters at these scores
    for bad, value in (("alibi", 1.0), ("softcap", 0.0)):
        with pytest.raises(ValueError, match="unknown score modifier|cap > 0"):
            ops.sparse_attention(q, k, v, None, "sliding-window", True, 0.5, 4, 64, 0, 0, 64, 0, None, bad, value)


def test_sparse_flex_path_applies_the_softcap(monkeypatch):
    """The CUDA path's score_mod (modifier, then bias) and block mask, run by eager FlexAttention on CPU
    (forward only: FlexAttention has no CPU backward)."""
    from torch.nn.attention.flex_attention import flex_attention

    from optpipe.passes import attention_flex

    monkeypatch.setattr(attention_flex, "_compiled_flex_attention", lambda: flex_attention)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 24, 16, generator=gen) * 3
    k, v = (torch.randn(2, 2, 24, 16, generator=gen) * 3 for _ in range(2))
    kpm = torch.ones(2, 24, dtype=torch.bool)
    kpm[1, 18:] = False
    bias, mod = torch.randn(1, 4, 1, 24, generator=gen), ops.ScoreMod("softcap", 2.0)
    pattern = ops.SparsePattern("sliding-window", True, window=5)
    with pytest.warns(UserWarning):  # (eager FlexAttention warns that it is unfused)
        out = attention_flex.sparse_attention_flex(q, k, v, kpm, pattern, 0.25, bias, mod)
    expected = ops.sparse_attention_reference(q, k, v, kpm, pattern, 0.25, bias, mod)
    assert_close(out, expected, atol=1e-5, rtol=1e-5)
