"""kv-cache across model families: masks and positions recognised by what they compute.

- native sliding-window masks (Mistral) become the ring-buffer cache; causal + ALiBi biases (Bloom,
  MPT, a hand-written one) follow the cache offset; Gemma-2's soft-capped attention op is cached;
  masks the cache cannot follow (lookahead, a bias not linear in distance) are refused;
- learned positions with an offset computed as `cumsum(ones) - 1 + 2` (OPT) see the step's positions;
- a program with nothing to cache is a clear error, not a silent no-op;
- the decode-step workload that the cpu target's `auto` mode times runs one token per call over a
  growing cache.
Greedy tokens equal transformers' `generate()` for the families fixed here (tests/hf_zoo.py).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck

import optpipe
from optpipe.errors import PassError
from optpipe.kv_step import decode_step_seconds
from optpipe.pipeline import Pipeline
from optpipe.runtime.generation import generate, step_function, target_step_function
from tests import hf_zoo

PROMPT, NEW = 10, 20  # longer than hf_zoo's sliding window (8): the ring buffer wraps


def _hf_tokens(model, prompt: torch.Tensor) -> list[int]:
    model.generation_config.eos_token_id = None  # greedy for NEW tokens, like optpipe's generate
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    return out[0, prompt.shape[1] :].tolist()


def _cached(arch: str):
    model, inputs = hf_zoo.build(arch)
    program = optpipe.capture(model, inputs)
    step, records = Pipeline.parse("fuse-attention,dce,kv-cache{max-len=64}").run(program)
    return model, inputs["input_ids"][:, :PROMPT], step, records[-1]


@pytest.mark.parametrize("arch", ["mistral", "opt", "gemma2"])
def test_greedy_tokens_equal_transformers_generate(arch):
    model, prompt, step, record = _cached(arch)
    assert record.modified and record.verify["ok"] and record.verify["max_abs"] < 1e-4
    assert generate(step, prompt, NEW).new_ids[0] == _hf_tokens(model, prompt)


@pytest.mark.parametrize("arch", ["bloom", "mpt"])
def test_alibi_families_follow_the_cache_offset(arch):
    """fuse-attention hands ALiBi over as an additive attn_mask; the cache recomputes it per step."""
    model, prompt, step, record = _cached(arch)
    assert record.verify["ok"] and any("ALiBi score bias (4 slopes)" in n for n in record.details["notes"])
    FileCheck().check("alibi_slopes").check("where.ScalarOther").run(step.gm.code)
    assert generate(step, prompt, NEW).new_ids[0] == _hf_tokens(model, prompt)


def test_native_sliding_window_mask_becomes_the_ring_buffer():
    _, _, step, record = _cached("mistral")
    assert record.stats["sliding-window"] == record.stats["sites"] == 2 and "dense" not in record.stats
    assert any("native sliding-window mask (window 8)" in n for n in record.details["notes"])
    assert step.meta["kv_cache"]["layers"][0]["caches"][0]["shape"] == [None, 2, 8, 16]  # 8 slots, 2 K/V heads
    FileCheck().check_count("optpipe.cached_window_attention", 2, exactly=True).check_not(
        "scaled_dot_product_attention"
    ).run(step.gm.code)
    assert "cumsum" not in step.gm.code and "diff.default" not in step.gm.code  # the old mask is gone


def test_learned_positions_keep_their_offset():
    """OPT: positions = cumsum(ones) - 1, then + 2 into the table; the step reads position_ids + 2."""
    _, _, step, record = _cached("opt")
    assert record.stats["positions"] == 1
    FileCheck().check("add.Tensor(position_ids, 2)").check("embedding.default(model_decoder_embed_positions").run(
        step.gm.code
    )
    assert "cumsum" not in step.gm.code


# -- masks built by hand -------------------------------------------------------------------------------
class MaskedLM(torch.nn.Module):
    """One SDPA layer whose attn_mask is `mask_fn(query position, key position)` ([H, T, T])."""

    def __init__(self, mask_fn, heads: int = 2, dim: int = 16, vocab: int = 32):
        super().__init__()
        self.mask_fn, self.heads = mask_fn, heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Linear(dim, vocab)
        torch.nn.init.normal_(self.qkv.weight, std=0.5)

    def forward(self, ids):
        b, t = ids.shape
        q, k, v = self.qkv(self.emb(ids)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        pos = torch.arange(t, device=ids.device)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask_fn(pos[:, None], pos))
        return self.head(y.transpose(1, 2).reshape(b, t, -1))


SLOPES = torch.tensor([0.5, 0.125])


def alibi(q, k):
    bias = SLOPES[:, None, None] * (k - q).float()  # ALiBi: slope * key distance
    return bias.masked_fill(k > q, float("-inf"))


def _masked_program(mask_fn):
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (1, 12), generator=torch.Generator().manual_seed(0))
    return optpipe.capture(MaskedLM(mask_fn).eval(), (ids,))


def test_alibi_bias_follows_the_cache_offset():
    plain = _masked_program(alibi)
    step, records = Pipeline.parse("kv-cache{max-len=48}").run(plain)
    record = records[0]
    assert record.stats["dense"] == 1 and record.verify["ok"] and record.verify["max_abs"] < 1e-4
    assert any("ALiBi" in n for n in record.details["notes"])
    FileCheck().check("alibi_slopes").check("aten.mul.Tensor(").check("where.ScalarOther").check(
        "scaled_dot_product_attention"
    ).run(step.gm.code)
    assert torch.allclose(step.gm.alibi_slopes.flatten(), SLOPES)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1]]
    assert generate(step, prompts, 24).new_ids == generate(plain, prompts, 24).new_ids


@pytest.mark.parametrize(
    "mask_fn, reason",
    [
        (lambda q, k: k <= q + 1, "neither causal nor a causal sliding window"),  # sees one token ahead
        (lambda q, k: (-0.1 * (k - q).float() ** 2).masked_fill(k > q, float("-inf")), "not linear in the key"),
    ],
)
def test_masks_the_cache_cannot_follow_are_refused(mask_fn, reason):
    with pytest.raises(PassError, match=f"not causal attention the cache can follow .*{reason}"):
        Pipeline.parse("kv-cache{max-len=48}").run(_masked_program(mask_fn))


# -- nothing to cache --------------------------------------------------------------------------------
def test_a_program_without_attention_sites_is_an_error():
    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32, 32)

        def forward(self, ids):
            return self.emb(ids)

    program = optpipe.capture(Bigram(), (torch.randint(0, 32, (1, 8)),))
    with pytest.raises(PassError, match="no attention site to cache \\(the program has no attention\\)"):
        Pipeline.parse("fuse-attention,kv-cache{max-len=16}").run(program)


def test_unrecognised_attention_is_named():
    """Hand-written attention without fuse-attention first: the error names where the softmax is."""
    from examples import tiny_gpt
    from optpipe.errors import UsageError
    from optpipe.registry import get_pass

    model, _ = tiny_gpt.build(block_size=64, vocab_size=64, n_layer=1)
    program = optpipe.capture(model, (torch.randint(0, 64, (1, 8)),))
    # as a pipeline, the order is refused first: kv-cache needs the sites fuse-attention gives
    with pytest.raises(UsageError, match="kv-cache"):
        Pipeline.parse("kv-cache{max-len=32}").run(program)
    # the pass itself (e.g. after a fuse-attention that did not recognise the attention) names it
    kv = get_pass("kv-cache")
    with pytest.raises(PassError, match="softmax at transformer.h.0.attn is attention fuse-attention did not"):
        kv.fn(program.copy(), kv.config_cls(max_len=32))


# -- the work generation does ------------------------------------------------------------------------
def test_decode_workload_is_one_token_per_call_over_a_growing_cache():
    """What `--mode auto` times for a step program (targets/torch_backend.py)."""
    from examples import tiny_gpt

    model, _ = tiny_gpt.build(block_size=64, vocab_size=64, n_layer=1)
    program = optpipe.capture(model, (torch.randint(0, 64, (1, 8)),))
    step, _ = Pipeline.parse("fuse-attention,kv-cache{max-len=32}").run(program, verify=False)
    calls = []

    def spy(*inputs):
        calls.append((inputs[0].shape[1], inputs[3].shape[1]))
        return step_function(step)(*inputs)

    times = decode_step_seconds(spy, step.meta["kv_cache"], step.example_inputs[0], steps=5, warmup=2)
    assert len(times) == 5
    assert calls == [(8, 8)] + [(1, 9 + i) for i in range(7)]  # prefill, then 1 token over L = 9, 10, ...


def test_auto_mode_judges_a_step_program_on_decode_steps():
    """The cpu target's default mode times eager and torch.compile on decode steps, not the prefill
    example; the compiled program is warmed up (prefill and decode graphs) before it is timed."""
    from examples import tiny_gpt
    from optpipe.registry import get_target

    model, _ = tiny_gpt.build(block_size=64, vocab_size=64, n_layer=1)
    program = optpipe.capture(model, (torch.randint(0, 64, (1, 8)),))
    step, _ = Pipeline.parse("fuse-attention,kv-cache{max-len=32}").run(program, verify=False)
    target = get_target("cpu")
    compiled = target.compile(step)
    assert "on decode steps" in compiled.info["reason"] and compiled.info["mode"] in ("eager", "compile")
    run = target_step_function(target, compiled)
    assert generate(step, [[1, 2, 3]], 6, step=run).new_ids == generate(step, [[1, 2, 3]], 6).new_ids


@pytest.mark.parametrize(
    "pipeline",
    [
        "fuse-attention,quantize{scheme=int8-dynamic},kv-cache{max-len=64}",
        "fuse-attention,kv-cache{max-len=64},quantize{scheme=int8-dynamic}",
    ],
)
def test_int8_dynamic_and_the_cache_in_either_order(pipeline):
    """int8-dynamic quantizes each token by itself, so a one-token decode step computes what the
    full-sequence run computes for it: kv-cache stays exact after quantize (it was 0.05 off when
    the activation range spanned the whole call), and greedy tokens equal the uncached program's."""
    from examples import tiny_gpt

    model, inputs = tiny_gpt.build()
    program = optpipe.capture(model, inputs)
    step, records = Pipeline.parse(pipeline).run(program)
    cache = next(r for r in records if r.name == "kv-cache")
    assert cache.modified and cache.verify["ok"] and cache.verify["max_abs"] < 1e-4
    quantized, _ = Pipeline.parse("quantize{scheme=int8-dynamic}").run(program)
    prompt = inputs[0][:, :PROMPT]
    assert generate(step, prompt, NEW).new_ids == generate(quantized, prompt, NEW).new_ids
