"""partition{strategy=tensor}: blocks sharded over N ranks (Megatron f/g on DTensor); gloo training.

Pass: fires on the tiny nanoGPT (fused QKV, hand-written attention fused to SDPA), HF GPT-2 (Conv1D
addmm, fused QKV), Llama (GQA: a unit is a K/V head with its query heads; gated MLP) and BERT
(padding mask): every attention and MLP block sharded, nothing replicated. IR (FileCheck on rank 0's
program): `tp_copy` before the column-wise projections, head counts and widths halved, `tp_reduce`
after the row-wise projection and before its bias. Numerics: the rank programs run in lock step
(the all-reduce a sum across them) reproduce the program, at the example and at another sequence
length. After structured pruning the pruned program shards; after an attention swap (sliding
window, linear, performer) the swapped attention shards by heads; int8 attention stays replicated
with the reason; the plan survives save/load.
Execution (torchrun, gloo): 2-way tensor-parallel training (tiny GPT, SGD), and 2-way tensor x 2-way
data parallel (GPT-2: Conv1D weights stored [in, out], AdamW), follow the single-process run (losses,
gradients within 1e-5; weights within 1e-5 with SGD, 1e-4 with AdamW). Llama's GQA sharding is
checked in lock step above. Errors: heads not divisible by ways, nothing to shard, a pipeline-only
option, a rank that dies. `optpipe train --tensor-parallel` is in tests/test_training.py, examples/partition.py runs
tensor-parallel inference (tests/test_examples.py).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import FileCheck, assert_close

import optpipe
from optpipe.capture import capture
from optpipe.errors import PassError
from optpipe.pipeline_text import PipelineSyntaxError
from optpipe.runtime.parallel import FAIL_RANK_ENV, PipelineError, tensor_train
from passes.partition_tensor import rank_module, run_lockstep
from tests import hf_models
from tests.parallel_reference import one_process_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.cache
def captured(name: str):
    if name == "build":
        from examples import tiny_gpt

        model, inputs = tiny_gpt.build()
    else:
        model, inputs = getattr(hf_models, name)(attn="sdpa")
    program, _ = optpipe.Pipeline.parse("fuse-attention").run(capture(model, inputs))
    return program


def sharded(program, ways: int = 2, before: str = ""):
    out, records = optpipe.Pipeline.parse(f"{before}partition{{strategy=tensor,ways={ways}}}").run(program)
    return out, records[-1]


@pytest.mark.parametrize("name,units", [("build", 4), ("gpt2", 4), ("llama", 2), ("bert", 4)])
def test_every_block_is_sharded_and_the_ranks_reproduce_the_program(name, units):
    program = captured(name)
    out, record = sharded(program)
    layers = 2
    assert record.modified and record.stats["ways"] == 2
    assert record.stats["sharded_blocks"] == 2 * layers and record.stats["replicated_blocks"] == 0
    assert record.stats["params_per_rank"] < out.num_params()
    heads = [b for b in record.details["blocks"] if b["kind"] == "heads"]
    assert [b["units"] for b in heads] == [units] * layers and all(b["per_rank"] == units // 2 for b in heads)
    assert out.meta["partition"]["strategy"] == "tensor"
    assert torch.equal(out.run(), program.run())  # the graph is kept; the plan is metadata
    ranks = [rank_module(out, r) for r in range(2)]
    for inputs in (program.example_inputs, tuple(_longer(x) for x in program.example_inputs)):
        expected = program.run(inputs)
        for actual in run_lockstep(ranks, inputs):
            assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _longer(x: torch.Tensor) -> torch.Tensor:
    """The same batch at sequence length 24 (a second shape through the dynamic dims)."""
    return torch.cat([x, x[:, :8]], dim=1)


def test_rank_program_ir_nanogpt_fused_qkv():
    out, _ = sharded(captured("build"))
    code = rank_module(out, 1).code
    (
        FileCheck()
        .check("tp_copy")
        .check("aten.linear")
        .check("aten.split.Tensor")
        .check_same(", 32, 2")
        .check("aten.view.default")
        .check_same(", 2, 16]")
        .check("scaled_dot_product_attention")
        .check("aten.view.default")
        .check_same(", 32]")
        .check("aten.linear")
        .check_not("_bias)")
        .check("tp_reduce")
        .check("aten.add.Tensor")
        .check_same("c_proj_bias")
        .check("tp_copy")
        .check("aten.linear")
        .check("aten.gelu")
        .check("aten.linear")
        .check("tp_reduce")
        .run(code)
    )
    assert code.count("tp_copy(") == 4 and code.count("tp_reduce(") == 4
    w = dict(rank_module(out, 1).named_parameters())
    full = dict(out.gm.named_parameters())
    assert w["transformer.h.0.attn.c_attn.weight"].shape == (96, 64)  # rank 1's rows of Q, of K and of V
    assert torch.equal(w["transformer.h.0.attn.c_attn.weight"][:32], full["transformer.h.0.attn.c_attn.weight"][32:64])
    assert torch.equal(w["transformer.h.0.mlp.c_proj.weight"], full["transformer.h.0.mlp.c_proj.weight"][:, 128:])
    assert w["lm_head.weight"] is full["lm_head.weight"]  # replicated, shared


def test_rank_program_ir_llama_gqa():
    out, _ = sharded(captured("llama"))
    code = rank_module(out, 0).code
    (
        FileCheck()
        .check("tp_copy")
        .check("q_proj")
        .check("k_proj")
        .check("v_proj")
        .check("scaled_dot_product_attention")
        .check_same("enable_gqa = True")
        .check("o_proj")
        .check("tp_reduce")
        .check("tp_copy")
        .check("gate_proj")
        .check("up_proj")
        .check("aten.silu")
        .check("down_proj")
        .check("tp_reduce")
        .run(code)
    )
    w = dict(rank_module(out, 0).named_parameters())
    attn = "model.layers.0.self_attn"
    assert w[f"{attn}.q_proj.weight"].shape == (32, 64)  # 4 query heads -> 2 per rank (head_dim 16)
    assert w[f"{attn}.k_proj.weight"].shape == w[f"{attn}.v_proj.weight"].shape == (16, 64)  # 2 K/V -> 1
    assert w[f"{attn}.o_proj.weight"].shape == (64, 32)
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (64, 64)


def test_pruned_program_shards_and_plan_survives_save_and_load(tmp_path):
    program = captured("gpt2")
    out, record = sharded(program, before="prune{target=heads,sparsity=0.5},")
    assert record.stats["sharded_blocks"] == 4
    assert [b["per_rank"] for b in record.details["blocks"] if b["kind"] == "heads"] == [1, 1]
    out.save(tmp_path / "program.pt2")
    loaded = optpipe.load(str(tmp_path / "program.pt2"))
    ranks = [rank_module(loaded, r) for r in range(2)]
    assert_close(run_lockstep(ranks, loaded.example_inputs)[0], out.run(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "before", ["attention{kind=sliding-window,window=8}", "attention{kind=linear}", "attention{kind=performer}"]
)
def test_swapped_attention_shards_by_heads(before):
    program = captured("build")
    out, record = sharded(program, before=before + ",")  # the pass's lock-step check ran
    assert record.stats["sharded_blocks"] == 4
    swapped = out.run()
    ranks = [rank_module(out, r) for r in range(2)]
    FileCheck().check("tp_copy").check("torch.ops.optpipe").check("tp_reduce").run(ranks[0].code)
    assert_close(run_lockstep(ranks, out.example_inputs)[1], swapped, rtol=1e-5, atol=1e-5)


def test_quantized_attention_stays_replicated_with_the_reason():
    out, record = sharded(captured("build"), before="quantize{scheme=int8-dynamic,modules=[*.attn.*]},")
    assert {b["kind"] for b in record.details["blocks"]} == {"mlp"}
    assert [r["module_path"] for r in record.details["replicated"]] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all("not a projection" in r["reason"] for r in record.details["replicated"])


def test_errors_are_one_line():
    with pytest.raises(PassError, match=r"4 heads, not divisible by 3") as e:
        sharded(captured("build"), ways=3)
    assert "\n" not in str(e.value)
    with pytest.raises(PassError, match="no attention or MLP block to shard"):
        sharded(capture(torch.nn.Sequential(torch.nn.Embedding(8, 4)), (torch.tensor([[1, 2]]),)))
    with pytest.raises(PipelineSyntaxError, match="stages is for strategy=pipeline"):
        optpipe.Pipeline.parse("partition{strategy=tensor,stages=4}")
    with pytest.raises(PipelineSyntaxError, match="ways must be a positive integer"):
        optpipe.Pipeline.parse("partition{strategy=tensor,ways=0}")
    with pytest.raises(PipelineError, match="outside tensor_parallel_mesh"):
        out, _ = sharded(captured("build"))
        rank_module(out, 0)(*out.example_inputs)


def test_unfused_attention_is_replicated_with_the_reason():
    from examples import tiny_gpt

    model, inputs = tiny_gpt.build()
    out, record = sharded(capture(model, inputs))  # no fuse-attention: only the MLPs shard
    assert record.stats["sharded_blocks"] == 2
    assert {b["kind"] for b in record.details["blocks"]} == {"mlp"}


# -- execution (torchrun, gloo) ---------------------------------------------------------------------------
def _batches(steps: int = 2, batch: int = 4, seq: int = 16):
    g = torch.Generator().manual_seed(1)
    return [
        {"input_ids": ids, "labels": ids}
        for ids in (torch.randint(0, hf_models.VOCAB, (batch, seq), generator=g) for _ in range(steps))
    ]


@pytest.mark.parametrize(
    "name,dp,optimizer,clip",
    [("build", 1, "sgd", 0.5), ("gpt2", 2, "adamw", None)],  # clip: the norm over shards and replicated tensors
)
def test_tensor_parallel_training_matches_one_process(name, dp, optimizer, clip):
    program = captured(name)
    batches = _batches()
    lr = [0.05, 0.02] if optimizer == "sgd" else 1e-3
    accum = 2 if clip else 1  # the SGD case also accumulates two micro-batches per step
    res = tensor_train(
        program, batches, ways=2, data_parallel=dp, optimizer=optimizer, lr=lr, clip=clip, grad_accum=accum, timeout=60
    )
    gm, losses, grads = one_process_run(program, batches, optimizer, lr, clip)
    assert res["ranks"] == 2 * dp and res["ways"] == 2
    assert res["losses"] == pytest.approx(losses, abs=1e-5)
    assert set(res["grads"]) == set(res["weights"]) and set(res["grads"]) <= set(grads)
    assert len(res["grads"]) == len({id(p) for p in gm.parameters()})
    for name_, g in res["grads"].items():
        assert_close(g, grads[name_], rtol=0, atol=1e-5, msg=name_)
    for name_, w in res["weights"].items():  # AdamW's first steps amplify 1e-7 gradient differences
        assert_close(w, gm.get_parameter(name_).detach(), rtol=0, atol=1e-5 if optimizer == "sgd" else 1e-4, msg=name_)


def test_a_tensor_parallel_rank_that_dies_stops_the_others(monkeypatch):
    """(Tensor-parallel inference from a saved folder: examples/tensor_parallel.py, tests/test_examples_parallel.py.)"""
    monkeypatch.setenv(FAIL_RANK_ENV, "1")
    with pytest.raises(PipelineError, match=r"tensor parallel rank 1 \(shard 1 of 2, replica 0\)") as e:
        tensor_train(captured("build"), _batches(1), ways=2, timeout=20)
    assert "\n" not in str(e.value)
