"""kv-cache: a causal LM becomes a prefill + decode step program with static caches.

Fired (stats) and IR (FileCheck) on tiny GPT, GPT-2 and Llama (GQA, RoPE) from transformers;
dense sites attend over the filled slots only (L = key_mask.shape[1]; the same logits as with the
full mask and as the whole sequence; not on window/linear sites); greedy tokens identical to full
recompute for 128 new tokens with logits within 1e-4 at every step; sliding-window ring buffers
and linear-attention state give the swapped model's tokens with memory independent of the
generated length; left-padded batches equal each prompt alone; sampling,
stop tokens and speculative decoding; save/load; onnxruntime and tvm parity of the step program;
refusals (bidirectional, masks, extra inputs, too short a cache) with clear errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import FileCheck, assert_close

import optpipe
from examples import tiny_gpt
from optpipe.errors import PassError, UsageError
from optpipe.kv_step import cached_logits, prefill
from optpipe.pipeline import Pipeline
from optpipe.program import load_program
from optpipe.runtime.generation import Sampling, generate, step_function
from tests import hf_models

NEW = 128
PROMPTS = [[5, 17, 3, 99, 42, 7, 11, 64, 2, 8, 30, 1], [9, 8, 7], [4, 4, 100, 23, 56]]


def gpt2(layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=128, n_positions=256, n_embd=64, n_layer=layers, n_head=4, bos_token_id=127, eos_token_id=127
    )
    return GPT2LMHeadModel(config).eval()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def tiny():
    model, _ = tiny_gpt.build(block_size=256, vocab_size=128)
    return model


MODELS = {"tiny-gpt": tiny, "gpt2": gpt2, "llama": llama}


@pytest.fixture(scope="module", params=list(MODELS))
def programs(request):
    """(plain LM program after fuse-attention, step program) for each model."""
    model = MODELS[request.param]()
    plain = optpipe.capture(
        model, {"input_ids": torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))}
    )
    plain, _ = Pipeline.parse("fuse-attention,dce").run(plain)
    step, records = Pipeline.parse("kv-cache{max-len=160}").run(plain)
    return request.param, plain, step, records[0]


def test_fires_and_rewrites_the_graph(programs):
    name, plain, step, record = programs
    assert record.modified and record.stats["cached"] == record.stats["sites"] == 2
    assert record.stats["dense"] == 2 and record.stats["positions"] >= 1
    assert record.verify["ok"] and record.verify["max_abs"] < 1e-4
    assert step.input_names[:4] == ["input_ids", "position_ids", "cache_position", "key_mask"]
    assert step.input_names[4:] == ["k_cache_0", "v_cache_0", "k_cache_1", "v_cache_1"]
    code = step.gm.code
    FileCheck().check("def forward(self, input_ids, position_ids, cache_position, key_mask, k_cache_0").check(
        "index_put_.default(k_cache_0"
    ).check("scaled_dot_product_attention.default(").check("index_put_.default(k_cache_1").run(code)
    assert "is_causal = True" not in code  # the cache mask replaces the causal flag
    assert "position_ids" in code.split("def forward", 1)[1].split("\n", 2)[2]  # positions read
    kv = step.meta["kv_cache"]
    heads = 2 if name == "llama" else 4  # Llama keeps its 2 K/V heads (GQA), not 4 repeated ones
    assert kv["layers"][0]["caches"][0]["shape"] == [None, heads, 160, 16]
    if name == "llama":
        FileCheck().check("enable_gqa = True").run(code)


def _key_lengths_seen(step, inputs) -> list[int]:
    """The key length each SDPA of one step call attends over."""
    seen = []

    class Spy(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):
            if target is torch.ops.aten.scaled_dot_product_attention.default:
                seen.append(args[1].shape[2])
            return super().call_function(target, args, kwargs)

    with torch.no_grad():
        out = Spy(step.gm).run(*inputs)
    return seen, out[0]


def test_dense_sites_attend_over_the_filled_slots_only(programs):
    _, plain, step, _ = programs
    code = step.gm.code
    # L = key_mask.shape[1]; each cache written in full, then narrowed to L for SDPA (a view)
    FileCheck().check("index_put_.default(k_cache_0").check("sym_size.int(key_mask, 1)").check(
        "aten.slice.Tensor(index_put_"
    ).check("aten.slice.Tensor(index_put_").check("scaled_dot_product_attention.default(").run(code)
    FileCheck().check_count("aten.slice.Tensor(index_put_", 4, exactly=True).run(code)
    assert step.dynamic_shapes[3] == {0: "batch", 1: "kv_len"}
    key_mask = next(n for n in step.gm.graph.nodes if n.target == "key_mask")
    assert isinstance(key_mask.meta["val"].shape[1], torch.SymInt)
    # a decode step at slot 20: keys of 21 slots, not 160; the full [B, max_len] mask (what a
    # static-shape runner passes) gives the same logits, and both those of the whole sequence
    seq = torch.tensor([PROMPTS[0] + PROMPTS[2] + PROMPTS[1] + [1]])  # 21 tokens
    kv = step.meta["kv_cache"]
    with torch.no_grad():
        _, key_mask, caches = prefill(step_function(step), kv, seq[:, :20])
        full = plain.gm(seq)[:, -1]
    slot = torch.tensor([20])
    key_mask[:, 20] = True
    narrow_in = (seq[:, 20:], slot[None], slot, key_mask[:, :21].clone(), *[c.clone() for c in caches])
    wide_in = (seq[:, 20:], slot[None], slot, key_mask.clone(), *[c.clone() for c in caches])
    lengths, narrow = _key_lengths_seen(step, narrow_in)
    assert lengths == [21, 21]
    lengths, wide = _key_lengths_seen(step, wide_in)
    assert lengths == [160, 160]
    assert_close(narrow[:, -1], wide[:, -1], atol=1e-5, rtol=0)
    assert_close(narrow[:, -1], full, atol=1e-4, rtol=0)


def test_greedy_equals_full_recompute_for_128_tokens(programs):
    _, plain, step, _ = programs
    prompt = [PROMPTS[0]]
    cached = generate(step, prompt, NEW)
    assert len(cached.new_ids[0]) == NEW
    # one full forward of the plain (causal) program over the generated sequence: at each position the
    # logits that a greedy full recompute sees at that step (generate() on a plain program, token by
    # token, is test_efficient_caches_match_the_swapped_model's reference)
    seq = torch.tensor(cached.ids)[:, :-1]
    with torch.no_grad():
        full = plain.gm(seq)
        stepwise = cached_logits(step_function(step), step.meta["kv_cache"], seq, decode_last=NEW)
    assert cached.new_ids == full[:, len(prompt[0]) - 1 :].argmax(-1).tolist()  # the recompute's greedy tokens
    # logits at every step: the cache path (prefill + 128 decode steps) vs one full forward
    assert_close(stepwise, full, atol=1e-4, rtol=0)


def test_left_padded_batch_equals_each_prompt_alone(programs):
    _, _, step, _ = programs
    batch = generate(step, PROMPTS, 12)
    for row, prompt in enumerate(PROMPTS):
        assert batch.new_ids[row] == generate(step, [prompt], 12).new_ids[0]
        assert batch.ids[row][: len(prompt)] == prompt


@pytest.mark.parametrize(
    "attention, kind",
    [("attention{kind=sliding-window,window=8}", "sliding-window"), ("attention{kind=linear}", "linear")],
)
@pytest.mark.parametrize("model", ["tiny-gpt", "llama"])
def test_efficient_caches_match_the_swapped_model(model, attention, kind):
    plain = optpipe.capture(MODELS[model](), {"input_ids": torch.randint(0, 128, (1, 16))})
    swapped, _ = Pipeline.parse(f"fuse-attention,dce,{attention}").run(plain)
    step, records = Pipeline.parse("kv-cache{max-len=160}").run(swapped)
    assert records[0].stats[kind] == 2 and records[0].verify["ok"]
    FileCheck().check(f"optpipe.cached_{'window' if kind == 'sliding-window' else 'linear'}_attention").check_not(
        "sym_size.int(key_mask, 1)"
    ).run(step.gm.code)  # nothing dense to narrow
    cached = generate(step, PROMPTS, 40)
    assert cached.new_ids == generate(swapped, PROMPTS, 40).new_ids
    shapes = [c["shape"] for layer in step.meta["kv_cache"]["layers"] for c in layer["caches"]]
    heads = 2 if model == "llama" else 4
    if kind == "sliding-window":  # a ring of `window` slots, not max-len
        assert shapes[0] == [None, heads, 8, 16]
    else:  # recurrent state: Σφ(k)vᵀ and Σφ(k)
        assert shapes[:2] == [[None, heads, 16, 16], [None, heads, 16]]


def test_mixed_dense_and_window_layers_narrow_only_the_dense_one():
    plain = optpipe.capture(tiny(), {"input_ids": torch.randint(0, 128, (1, 16))})
    swapped, _ = Pipeline.parse("fuse-attention,dce,attention{kind=sliding-window,window=8,layers=1:}").run(plain)
    step, records = Pipeline.parse("kv-cache{max-len=160}").run(swapped)
    assert records[0].stats["dense"] == records[0].stats["sliding-window"] == 1 and records[0].verify["ok"]
    code = step.gm.code
    FileCheck().check("index_put_.default(k_cache_0").check_count(
        "aten.slice.Tensor(index_put_", 2, exactly=True
    ).check("optpipe.cached_window_attention").run(code)
    assert "index_put_.default(k_cache_1" not in code  # the ring is written by its own op, whole
    assert generate(step, PROMPTS, 40).new_ids == generate(swapped, PROMPTS, 40).new_ids


def test_sampling_is_seeded_and_reduces_to_greedy(programs):
    _, _, step, _ = programs
    greedy = generate(step, PROMPTS[:1], 16)
    assert generate(step, PROMPTS[:1], 16, sampling=Sampling(top_k=1, seed=3)).new_ids == greedy.new_ids
    assert (
        generate(step, PROMPTS[:1], 16, sampling=Sampling(temperature=1.0, top_p=1e-6, seed=3)).new_ids
        == greedy.new_ids
    )
    a = generate(step, PROMPTS, 16, sampling=Sampling(temperature=1.5, top_k=50, top_p=0.95, seed=7))
    b = generate(step, PROMPTS, 16, sampling=Sampling(temperature=1.5, top_k=50, top_p=0.95, seed=7))
    assert a.new_ids == b.new_ids and a.new_ids != greedy.new_ids * 3


def test_stop_tokens_end_a_row(programs):
    _, _, step, _ = programs
    free = generate(step, PROMPTS, 10).new_ids
    stop = free[0][3]
    stopped = generate(step, PROMPTS, 10, stop_tokens=[stop]).new_ids
    first = free[0].index(stop)
    assert stopped[0] == free[0][: first + 1]
    for row in range(1, 3):  # other rows run on (until they meet the stop token themselves)
        cut = free[row].index(stop) + 1 if stop in free[row] else 10
        assert stopped[row] == free[row][:cut]


def test_speculative_decoding_is_identical_to_the_target_alone():
    target_model = gpt2(layers=4)
    draft_model = copy.deepcopy(target_model)
    draft_model.transformer.h = draft_model.transformer.h[:2]
    draft_model.config.n_layer = 2
    example = {"input_ids": torch.randint(0, 128, (1, 16))}
    pipeline = Pipeline.parse("fuse-attention,dce,kv-cache{max-len=120}")
    target, _ = pipeline.run(optpipe.capture(target_model, example))
    draft, _ = pipeline.run(optpipe.capture(draft_model, example))
    alone = generate(target, PROMPTS[:1], 48)
    for k in (1, 3):
        spec = generate(target, PROMPTS[:1], 48, draft=draft, draft_tokens=k)
        assert spec.new_ids == alone.new_ids
        assert spec.proposed > 0 and 0 <= spec.accepted <= spec.proposed
        assert spec.steps < 48  # fewer target calls than tokens whenever anything is accepted
    itself = generate(target, PROMPTS[:1], 48, draft=target.copy(), draft_tokens=4)
    assert itself.acceptance_rate == 1.0 and itself.new_ids == alone.new_ids


def test_save_load_round_trip(programs, tmp_path):
    _, _, step, _ = programs
    step.save(tmp_path / "step.pt2")
    loaded = load_program(tmp_path / "step.pt2")
    assert loaded.meta["kv_cache"] == step.meta["kv_cache"]
    assert loaded.input_names == step.input_names
    assert generate(loaded, PROMPTS, 12).new_ids == generate(step, PROMPTS, 12).new_ids


# -- targets ----------------------------------------------------------------------------------------
ATTENTIONS = ["", ",attention{kind=sliding-window,window=8}", ",attention{kind=linear}"]


# the linear state on TVM (one more step-program build) runs in make coverage: CI's time budget
@pytest.mark.parametrize(
    ("attention", "target"),
    [
        pytest.param(a, t, marks=[pytest.mark.coverage] if (a, t) == (ATTENTIONS[2], "tvm") else [])
        for a in ATTENTIONS
        for t in ("onnxruntime", "tvm")
    ],
)
def test_step_program_on_targets(target, attention, tmp_path):
    from optpipe.runtime.generation import target_step_function

    model, _ = tiny_gpt.build(block_size=256, vocab_size=128, n_layer=1)  # one layer: quick builds
    res = optpipe.optimize(
        model,
        (torch.randint(0, 128, (1, 16)),),
        pipeline=f"fuse-attention,dce{attention},kv-cache{{max-len=64}}",
        target=target,
        diffs=False,
        # tvm: the dynamic main only (every decode step has another shape than the example's)
        target_options={"static": False} if target == "tvm" else None,
    )
    check = res.report["target_check"]
    # prefill and a decode step over random caches, within 1e-4 relative to the logits' magnitude
    assert check["ok"] and check["inputs"] >= 2 and check["max_abs"] <= check["tolerance"]
    on_target = generate(res.program, PROMPTS, 16, step=target_step_function(res.target, res.compiled))
    assert on_target.new_ids == generate(res.program, PROMPTS, 16).new_ids


# -- refusals ---------------------------------------------------------------------------------------
def test_refuses_bidirectional_models():
    model, inputs = hf_models.bert()
    program = optpipe.capture(model, inputs)
    with pytest.raises(PassError, match="takes \\(input_ids, attention_mask\\)"):
        Pipeline.parse("fuse-attention,kv-cache{max-len=64}").run(program)


def test_refuses_non_causal_attention():
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(32, 16)
            self.head = torch.nn.Linear(16, 32)

        def forward(self, ids):
            x = self.emb(ids)[:, None]
            return self.head(torch.nn.functional.scaled_dot_product_attention(x, x, x)[:, 0])

    program = optpipe.capture(Encoder(), (torch.randint(0, 32, (1, 8)),))
    with pytest.raises(PassError, match="not plain causal attention .*bidirectional"):
        Pipeline.parse("kv-cache{max-len=16}").run(program)


def test_refuses_kinds_without_an_incremental_form():
    plain = optpipe.capture(tiny(), {"input_ids": torch.randint(0, 128, (1, 16))})
    swapped, _ = Pipeline.parse("fuse-attention,dce,attention{kind=strided,stride=4}").run(plain)
    with pytest.raises(PassError, match="cannot cache the strided attention at transformer.h.0.attn"):
        Pipeline.parse("kv-cache{max-len=64}").run(swapped)


def test_max_len_must_hold_the_example_and_the_generation(programs):
    _, plain, step, _ = programs
    with pytest.raises(PassError, match="max-len 8 is shorter than the example"):
        Pipeline.parse("kv-cache{max-len=8}").run(plain)
    with pytest.raises(UsageError, match="exceed the cache \\(160 slots\\)"):
        generate(step, PROMPTS[:1], 150)
    with pytest.raises(UsageError, match="max-len must be an integer"):
        Pipeline.parse("kv-cache{max-len=-1}")


def test_a_cached_program_is_left_alone(programs):
    _, _, step, _ = programs
    again, records = Pipeline.parse("kv-cache{max-len=160}").run(step)
    assert not records[0].modified and "already" in records[0].details["reason"]
