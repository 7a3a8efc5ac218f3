"""partition: N pipeline stages cut between transformer blocks; pipelined training on gloo ranks.

Pass: fires on the tiny nanoGPT (hand-written and SDPA attention) and a tiny HF GPT-2: N stages
whose composition is the program exactly, every parameter in exactly one stage except the tied
wte/lm_head (replicated, listed under `tied` with its owner), the report fields, FileCheck that
stage 0 holds the embeddings and the last stage the LM head, shape-only nodes (HF's causal mask)
recomputed rather than sent. The plan survives save/load, and the stage archives (torch.export)
compose to the program at another batch and sequence length. Balance: a GPT-2-small-sized program
(12 layers, 768 wide, seq 1024, built on the meta device: FLOPs come from metadata) in 4 stages by
FLOPs has its slowest stage within 1.15x of the mean. Execution: 2- and 4-stage training under
torchrun (gloo, one process per stage; and 4 stages interleaved over 2 ranks) follows the
single-process run (losses, gradients, weights within 1e-5). Errors: too many stages, a device that
does not exist, a rank that dies or hangs (the others stop, the error names it). Pipelined inference
from a saved program folder runs in examples/partition.py (tests/test_examples.py), to keep this
file's torchrun launches few.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
from torch.testing import FileCheck, assert_close

import optpipe
from optpipe.capture import capture
from optpipe.errors import PassError, UsageError
from optpipe.passes import partition as partition_pass  # registers the `partition` pass
from optpipe.runtime.parallel import FAIL_MODE_ENV, FAIL_RANK_ENV, PipelineError, pipeline_train
from tests import hf_models
from tests.parallel_reference import one_process_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.cache
def captured(name: str):
    if name == "gpt2":
        model, inputs = hf_models.gpt2()
    else:
        from examples import tiny_gpt

        model, inputs = getattr(tiny_gpt, name)()
    return capture(model, inputs)


def partitioned(program, element: str):
    out, records = optpipe.Pipeline.parse(element).run(program)
    return out, records[0]


def unique_params(module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


@pytest.mark.parametrize("name,stages", [("build", 2), ("build", 4), ("build_flash", 3), ("gpt2", 2), ("gpt2", 4)])
def test_stages_compose_to_the_program(name, stages):
    program = captured(name)
    out, record = partitioned(program, f"partition{{stages={stages}}}")
    assert record.modified and record.verify["ok"]
    assert record.stats["stages"] == stages and record.stats["cut_bytes"] > 0
    assert record.stats["max_stage_cost"] >= record.stats["mean_stage_cost"] > 0
    modules = partition_pass.stage_modules(out)
    assert len(modules) == stages
    for inputs in (program.example_inputs, (torch.randint(0, 128, (3, 11)),)):
        with torch.no_grad():
            assert_close(partition_pass.run_stages(modules, inputs), program.gm(*inputs), rtol=0, atol=0)

    info = out.meta["partition"]
    assert info["num_stages"] == stages and len(info["stages"]) == stages and len(info["cuts"]) == stages - 1
    assert info["bubble"] == pytest.approx((stages - 1) / (info["microbatches"] + stages - 1))
    for cut in info["cuts"]:
        assert cut["bytes"] == sum(t["bytes"] for t in cut["tensors"]) > 0
        assert all(t["shape"] and t["dtype"] for t in cut["tensors"])
    assert [r["stage"] for r in record.details["stages"]] == list(range(stages))

    # every parameter in exactly one stage, but the tied embedding / LM head, owned by its first user
    holders: dict[int, list[int]] = {}
    for k, stage in enumerate(modules):
        for key in unique_params(stage):
            holders.setdefault(key, []).append(k)
    names = unique_params(program.gm)
    assert set(holders) == set(names)
    tied = {t["param"]: t for t in info["tied"]}
    for key, where in holders.items():
        if len(where) > 1:
            t = next(t for t in tied.values() if id(program.gm.get_parameter(t["param"])) == key)
            assert where == t["stages"] == [0, stages - 1] and t["owner"] == 0
    assert len(tied) == 1  # nanoGPT and GPT-2 tie wte and lm_head

    # stage 0: token (tied weight) and position embeddings; last stage: the LM head, no embedding
    FileCheck().check("aten.embedding.default(lm_head_weight").run(modules[0].code)
    FileCheck().check("aten.embedding.default(transformer_wpe_weight").run(modules[0].code)
    FileCheck().check_not("lm_head_weight)").run(modules[0].code)  # the LM head matmul is not here
    FileCheck().check_regex(r"aten\.linear\.default\(\w+, lm_head_weight\)").run(modules[-1].code)
    FileCheck().check_not("torch.ops.aten.embedding").run(modules[-1].code)


def test_shape_only_nodes_are_recomputed_not_sent():
    """HF GPT-2 builds its causal mask from the sequence length: each stage rebuilds it, and only
    the hidden state crosses a cut."""
    out, _ = partitioned(captured("gpt2"), "partition{stages=4}")
    for cut in out.meta["partition"]["cuts"]:
        assert len(cut["tensors"]) == 1 and cut["tensors"][0]["dtype"] == "float32"
        assert cut["tensors"][0]["symbolic_shape"][-1] == "64"
    code = partition_pass.stage_modules(out)[2].code
    FileCheck().check("sym_size").check("arange").check("softmax").run(code)


def test_pipeline_string_round_trips():
    s = "partition{stages=4,balance=memory,devices=[cpu,cpu,cpu,cpu],microbatches=8}"
    assert str(optpipe.Pipeline.parse(s)) == s
    assert str(optpipe.Pipeline.parse("partition")) == "partition"


@pytest.mark.parametrize("balance", ["params", "memory", "measured"])
def test_other_balances(balance):
    out, record = partitioned(captured("build"), f"partition{{stages=2,balance={balance}}}")
    info = out.meta["partition"]
    assert info["balance"] == balance and record.stats["max_stage_cost"] > 0
    assert info["cost_unit"] == {"params": "bytes", "memory": "bytes", "measured": "seconds"}[balance]


def test_plan_survives_save_and_load_and_stage_archives_run(tmp_path):
    program = captured("build")
    out, _ = partitioned(program, "partition{stages=3}")
    out.save(tmp_path / "program.pt2")
    loaded = optpipe.load_program(tmp_path / "program.pt2")
    inputs = (torch.randint(0, 256, (2, 20)),)
    with torch.no_grad():
        expected = program.gm(*inputs)
        assert_close(partition_pass.run_stages(partition_pass.stage_modules(loaded), inputs), expected, rtol=0, atol=0)
    paths = partition_pass.save_stages(out, tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["stage_0.pt2", "stage_1.pt2", "stage_2.pt2"]
    assert (tmp_path / "stages" / "partition.json").exists()
    stages = [torch.export.load(p).module() for p in paths]
    with torch.no_grad():
        assert_close(partition_pass.run_stages(stages, inputs), expected, rtol=0, atol=0)


class _Logits(torch.nn.Module):
    """A Hugging Face LM called on `input_ids` alone, returning its logits (what capture() calls)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


def _gpt2_small_on_meta(seq: int = 1024):
    """GPT-2 small's shape (12 layers, 768 wide, 50257 tokens) with no weights in memory: captured
    by torch.export on the meta device (capture() would run it eagerly first)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from optpipe.capture import export_module

    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, attn_implementation="sdpa")
    with torch.device("meta"):
        model = GPT2LMHeadModel(config).eval()
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    ep, kept = export_module(_Logits(model), (ids,), ["input_ids"], [{0: "batch", 1: "seq"}])
    return optpipe.Program(ep.module(), (ids,), ["input_ids"], kept, {}, [])


def test_flops_balance_on_gpt2_small():
    from optpipe.analysis import analyze
    from optpipe.registry import get_pass

    program = _gpt2_small_on_meta()
    info = get_pass("partition")
    result = info.fn(program, partition_pass.PartitionConfig(stages=4, balance="flops"))
    plan = program.meta["partition"]
    costs = [s["cost"] for s in plan["stages"]]
    assert sum(costs) == pytest.approx(analyze(program).flops, rel=1e-9)
    assert max(costs) <= 1.15 * (sum(costs) / 4), costs  # the requirement
    assert result.stats["max_stage_cost"] / result.stats["mean_stage_cost"] <= 1.15
    assert plan["stages"][-1]["segments"] == [partition_pass.POST]  # the 38M-parameter LM head alone
    assert partition_pass.graph_view(program.gm).places == 13  # 12 blocks: 13 places to cut


def test_too_many_stages_is_one_line():
    with pytest.raises(PassError) as e:
        partitioned(captured("build"), "partition{stages=6}")
    assert "6 stages but the program has only 3 places to cut" in e.value.one_line()
    assert "at most 4 stages" in e.value.one_line()


def test_a_schedule_needs_one_lr_per_step():
    with pytest.raises(UsageError, match="pipeline: 1 learning rates for 2 steps"):
        pipeline_train(captured("build"), _batches(), stages=2, lr=[1e-3])


def test_nonexistent_device_is_one_line():
    with pytest.raises(UsageError) as e:
        optpipe.Pipeline.parse("partition{stages=2,devices=[cpu,cuda:99]}")
    assert "device cuda:99 does not exist" in e.value.one_line()
    with pytest.raises(UsageError, match="2 devices for 3 stages"):
        optpipe.Pipeline.parse("partition{stages=3,devices=[cpu,cpu]}")


# -- pipelined execution (torchrun, gloo) -----------------------------------------------------------
def _batches(steps: int = 2, batch: int = 4, seq: int = 16):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 256, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


@pytest.mark.parametrize(
    "stages,ranks,schedule,optimizer,clip",
    [
        (2, 2, "1f1b", "sgd", 0.5),  # a per-step lr, and the norm over both stages (the tied weight once)
        (4, 4, "gpipe", "adamw", None),
        (4, 2, "1f1b", "sgd", None),  # interleaved 1F1B: rank r holds stages r and r+2
    ],
)
def test_pipelined_training_matches_one_process(stages, ranks, schedule, optimizer, clip):
    program = captured("build")
    batches = _batches()
    lr = ([0.05, 0.02] if clip else 0.05) if optimizer == "sgd" else 1e-3
    res = pipeline_train(
        program,
        batches,
        stages=stages,
        ranks=ranks,
        microbatches=4,
        schedule=schedule,
        optimizer=optimizer,
        lr=lr,
        clip=clip,
        timeout=60,
    )
    gm, losses, grads = one_process_run(program, batches, optimizer, lr, clip)
    assert res["stages"] == stages and res["ranks"] == ranks
    assert res["losses"] == pytest.approx(losses, abs=1e-5)
    assert set(res["weights"]) >= {"lm_head.weight", "transformer.wpe.weight"}
    for name, w in res["weights"].items():
        assert_close(w, gm.get_parameter(name).detach(), rtol=0, atol=1e-5, msg=name)
    for name, g in res["grads"].items():  # the tied weight's grad sums its embedding and LM-head uses
        assert_close(g, grads_of(gm, grads, name), rtol=0, atol=1e-5, msg=name)
    assert len(res["grads"]) == len(set(unique_params(program.gm)))


def grads_of(gm, grads: dict, name: str) -> torch.Tensor:
    p = gm.get_parameter(name)
    return next(grads[n] for n, q in gm.named_parameters() if q is p)


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_a_rank_that_dies_or_hangs_stops_the_others(monkeypatch, mode):
    """`exit`: rank 1 vanishes (torchrun stops the rest); `hang`: rank 1 stays alive but stuck, and
    its neighbours' waits time out after `timeout` seconds. Either way the error names rank 1."""
    monkeypatch.setenv(FAIL_RANK_ENV, "1")
    monkeypatch.setenv(FAIL_MODE_ENV, mode)
    start = time.monotonic()
    with pytest.raises(PipelineError) as e:
        pipeline_train(captured("build"), _batches(1), stages=2, microbatches=2, timeout=5)
    assert time.monotonic() - start < 120  # a guard against hanging, not a speed check
    message = e.value.one_line()
    assert "pipeline rank 1 (stage 1)" in message
    assert ("stopped responding: rank(s) 0 timed out" in message) == (mode == "hang")


@pytest.mark.parametrize(
    "before",
    [
        "attention{kind=sliding-window,window=8},prune{method=structured,target=mlp,sparsity=0.5}",
        "quantize{scheme=int8-dynamic,skip=[lm_head]}",
    ],
)
def test_partitions_after_lossy_passes(before):
    """An attention-swapped and pruned (or quantized) program splits, and its stages compose to it;
    balance uses the cost after compression."""
    program = captured("build_flash")
    squeezed, _ = optpipe.Pipeline.parse(f"fuse-attention,{before}").run(program)
    out, record = partitioned(squeezed, "partition{stages=2}")
    assert record.modified and record.verify["ok"] and record.stats["stages"] == 2
    stages = partition_pass.stage_modules(out)
    ids = program.example_inputs[0]
    torch.testing.assert_close(partition_pass.run_stages(stages, (ids,)), out.gm(ids), rtol=0, atol=0)
    dense, _ = partitioned(program, "partition{stages=2}")
    cost = lambda p: sum(s["cost"] for s in p.meta["partition"]["stages"])
    if "prune" in before:  # half the MLP channels gone: the stages are balanced on the smaller cost
        assert cost(out) < 0.9 * cost(dense)
