"""partition{strategy=sequence}: one sequence split over N ranks, each attention site with its exchange.

Pass: fires on the tiny nanoGPT with dense causal attention (ring), causal sliding-window attention
(halo) and causal linear attention (prefix scan); IR (FileCheck on the rank program): one exchange
node per site, the position `arange` shifted to the shard's offset, the original attention gone.
Numerics, in this process (the ranks as threads talking through `ThreadComm`): the ranks' outputs,
loss and gradients equal the program's at 2 and 4 ranks and at another sequence length; the
exchanges themselves (ring with GQA, causal and bidirectional, at 3 ranks; halo; prefix scan)
against their one-process reference, forward and backward. The plan records the bytes per step
(halo << ring) and survives save/load. HF GPT-2 and Llama (GQA, RoPE) plan rings whose ranks
reproduce the program, loss and gradients at 2 and 4 ranks (coverage). Errors: a length not
divisible by ways, a sparse form that cannot split, a window past a shard, a static sequence dim,
a pipeline-only option.
Multi-process (torchrun, gloo) parity: tests/test_sequence_parallel.py.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.testing import FileCheck, assert_close

import optpipe
from optpipe.capture import capture
from optpipe.errors import PassError
from optpipe.losses import task_loss
from optpipe.passes.attention_ops import linear_attention, sparse_attention
from optpipe.passes.partition_sequence import gather, rank_module, run_threads, unshard
from optpipe.passes.partition_sequence_ops import (
    sequence_dense_attention,
    sequence_linear_attention,
    sequence_window_attention,
)
from optpipe.runtime.sequence_parallel import shard_labels, shard_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FORMS = {
    "dense": ("", "ring_attention", "scaled_dot_product_attention"),
    "window": ("attention{kind=sliding-window,window=8},", "halo_window_attention", "optpipe.sparse_attention"),
    "linear": ("attention{kind=linear},", "prefix_linear_attention", "optpipe.linear_attention"),
}


@functools.cache
def tiny(form: str = "dense"):
    from examples import tiny_gpt

    model, inputs = tiny_gpt.build()
    program, _ = optpipe.Pipeline.parse(f"fuse-attention,{FORMS[form][0]}".rstrip(",")).run(capture(model, inputs))
    return program


def planned(program, ways: int = 2, balance: str = ""):
    option = f",balance={balance}" if balance else ""
    out, records = optpipe.Pipeline.parse(f"partition{{strategy=sequence,ways={ways}{option}}}").run(program)
    return out, records[-1]


def order(program) -> str:
    return program.meta["partition"]["order"]


def ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("form", FORMS)
def test_each_attention_form_gets_its_exchange(form):
    out, record = planned(tiny(form), ways=2)
    stats = record.stats
    kind = {"dense": "ring", "window": "halo", "linear": "prefix_scan"}[form]
    assert stats["attention_sites"] == 2 and stats[kind] == 2 and stats["positions"] == 1
    code = rank_module(out).code
    FileCheck().check("sequence_positions").check_count(FORMS[form][1], 2).run(code)
    FileCheck().check_not(FORMS[form][2]).run(code)
    # another length, 4 ranks: the shards' outputs are the program's
    x = ids(2, 48)
    expected = out.run((x,))
    four, _ = planned(tiny(form), ways=4)
    with torch.no_grad():
        actual = gather(run_threads(rank_module(four), (x,), 4, order=order(four)), order(four))
    assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def _one_process(program, x):
    gm = copy.deepcopy(program.gm)
    for p in gm.parameters():
        p.requires_grad_(True)
    loss = task_loss(gm(x), x, "clm")
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in gm.named_parameters(remove_duplicate=False)}


def _rank_step(tokens: int):
    def step(module, inputs):
        module = copy.deepcopy(module)
        for p in module.parameters():
            p.requires_grad_(True)
        x, targets = inputs
        loss = shard_loss(module(x), targets, tokens)
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in module.named_parameters(remove_duplicate=False)}

    return step


def assert_ranks_match_one_process(program, x: torch.Tensor, ways: int) -> None:
    """The loss and gradients of `program`'s ranks (threads), summed, equal one process's on `x`."""
    loss, grads = _one_process(program, x)
    targets, tokens = shard_labels(x, "clm")
    ranks = run_threads(rank_module(program), (x, targets), ways, fn=_rank_step(tokens), order=order(program))
    assert_close(sum(r[0] for r in ranks), loss, rtol=0, atol=1e-6)
    for name in ranks[0][1]:
        assert_close(sum(r[1][name] for r in ranks), grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "form,ways,balance",
    [
        ("dense", 2, ""),
        ("window", 2, ""),
        ("linear", 2, ""),
        ("dense", 4, ""),
        ("window", 4, ""),
        ("dense", 4, "contiguous"),
    ],
)
def test_loss_and_gradients_match_one_process(form, ways, balance):
    program, _ = planned(tiny(form), ways, balance)
    assert order(program) == ("zigzag" if form == "dense" and not balance else "contiguous")
    assert_ranks_match_one_process(program, ids(2, 32), ways)


def _exchange(fn, inputs, ways: int, grad_out, order: str = "contiguous"):
    """(output, input gradients) of `fn` on the ranks' shards, gathered along the sequence (dim 2)."""

    def step(_, local):
        local = [t.detach().requires_grad_() for t in local[:-1]] + [local[-1]]
        out = fn(*local[:-1])
        out.backward(local[-1])
        return out.detach(), [t.grad for t in local[:-1]]

    shards = [t.transpose(1, 2) for t in (*inputs, grad_out)]  # the sequence on dim 1 for run_threads
    ranks = run_threads(
        None, tuple(shards), ways, fn=lambda m, xs: step(m, [t.transpose(1, 2) for t in xs]), order=order
    )
    out = unshard([r[0].transpose(1, 2) for r in ranks], order).transpose(1, 2)
    return out, [unshard([r[1][i].transpose(1, 2) for r in ranks], order).transpose(1, 2) for i in range(len(inputs))]


def _reference(fn, inputs, grad_out):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize(
    "name,ways",
    [
        ("ring-causal", 3),
        ("ring-zigzag", 3),
        ("ring-zigzag-fp64", 3),  # not fp32: explicit scores instead of torch's fused CPU kernel
        ("ring-bidirectional", 3),
        ("halo", 2),
        ("halo", 4),
        ("prefix", 3),
    ],
)
def test_exchanges_match_their_one_process_reference(name, ways):
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, h, 24, 8, generator=g) for h in (4, 2, 2, 4))  # GQA: 2 K/V heads
    if name.endswith("fp64"):
        q, k, v, dout = (t.double() for t in (q, k, v, dout))
    fns = {
        "ring-causal": (
            lambda q, k, v: sequence_dense_attention(q, k, v, None, True),
            lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        ),
        "ring-zigzag": (  # zig-zag shards: chunks r and 5-r of 6, causal by global position
            lambda q, k, v: sequence_dense_attention(q, k, v, None, True, True),
            lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        ),
        "ring-bidirectional": (
            lambda q, k, v: sequence_dense_attention(q, k, v, 0.3, False),
            lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True),
        ),
        "halo": (
            lambda q, k, v: sequence_window_attention(q, k, v, 5, 0.3, 64),
            lambda q, k, v: sparse_attention(q, k, v, None, "sliding-window", True, 0.3, 5, 64, 0, 0, 0, 0),
        ),
        "prefix": (
            lambda q, k, v: sequence_linear_attention(q, k, v, "elu", 3),  # chunks of 3: 8 tokens padded to 9
            lambda q, k, v: linear_attention(q, k, v, None, "elu", True, 8),
        ),
    }
    ranked, reference = fns[name.removesuffix("-fp64")]
    out, grads = _exchange(ranked, (q, k, v), ways, dout, "zigzag" if "zigzag" in name else "contiguous")
    out_e, grads_e = _reference(reference, (q, k, v), dout)
    assert_close(out, out_e, rtol=1e-5, atol=2e-6)
    for a, e in zip(grads, grads_e):
        assert_close(a, e, rtol=1e-5, atol=3e-6)


def test_the_plan_records_bytes_per_exchange_and_survives_save_and_load(tmp_path):
    window, _ = planned(tiny("window"), ways=4)
    dense, _ = planned(tiny("dense"), ways=4)
    w, d = window.meta["partition"], dense.meta["partition"]
    assert w["strategy"] == "sequence" and w["ways"] == 4 and w["shard_len"] == 8
    site = w["sites"][0]
    assert site["exchange"] == "halo" and site["halo"] == 7
    # [1, 4 heads, 7 halo rows, 16 + 16] fp32, forward and backward
    assert site["forward_bytes"] == site["backward_bytes"] == 7 * 4 * 32 * 4
    assert d["sites"][0]["bytes_per_step"] == d["sites"][0]["ring_forward_bytes"] + d["sites"][0]["ring_backward_bytes"]
    assert w["ring_bytes_per_step"] == d["bytes_per_step"] and d["bytes_per_step"] > w["bytes_per_step"]
    window.save(str(tmp_path / "p"))
    assert optpipe.load(str(tmp_path / "p")).meta["partition"] == w


def test_zigzag_order_for_dense_causal_contiguous_where_neighbours_talk():
    """Dense causal: zig-zag by default (rank r holds chunks r and 2N-1-r; every rank the same
    attention work), recorded in the plan with its reason; windowed and linear sites (and a program
    mixing dense causal with windowed sites) stay contiguous and the plan says why."""
    dense, record = planned(tiny("dense"), ways=4)
    plan = dense.meta["partition"]
    assert (plan["order"], record.stats["zigzag"]) == ("zigzag", 1) and "causal dense" in plan["order_reason"]
    assert plan["shards"][0] == [[0, 4], [28, 32]] and plan["shards"][3] == [[12, 16], [16, 20]]
    assert plan["causal_attention_imbalance"] == 1.0 and plan["causal_attention_work"] == [2.0] * 4
    FileCheck().check("sequence_positions").check("True").check_count("ring_attention", 2).run(rank_module(dense).code)
    contiguous, _ = planned(tiny("dense"), ways=4, balance="contiguous")
    assert order(contiguous) == "contiguous" and contiguous.meta["partition"]["causal_attention_imbalance"] == 1.75
    mixed, _ = optpipe.Pipeline.parse("attention{kind=sliding-window,window=8,layers=1:}").run(tiny())
    for program, why in ((tiny("window"), "halo sites"), (tiny("linear"), "prefix scan sites"), (mixed, "halo")):
        out, _ = planned(program, ways=2)  # the pass's check runs the ranks against the program
        assert order(out) == "contiguous" and why in out.meta["partition"]["order_reason"]
        assert "shards stay contiguous" in out.meta["partition"]["order_reason"]
    assert [s["form"] for s in planned(mixed, ways=2)[0].meta["partition"]["sites"]] == ["ring", "halo"]


@pytest.mark.parametrize(
    "form,option,match",
    [
        ("dense", "ways=3", r"sequence length 32 does not divide into 3 shards"),
        ("window", "ways=8", r"window of 8 at transformer.h.0.attn reaches past the left neighbour's 4 tokens"),
        ("block", "ways=2", r"cannot split the attention at transformer.h.0.attn: causal block-sparse"),
        ("static", "ways=2", r"needs a dynamic sequence dim, the program's is fixed at 32"),
        ("window", "ways=2,balance=zigzag", r"balance=zigzag refused: the halo sites talk to the neighbouring shard"),
        ("dense", "ways=32,balance=zigzag", r"balance=zigzag refused: sequence length 32 does not split into 64"),
    ],
)
def test_one_line_errors(form, option, match):
    if form == "block":
        program, _ = optpipe.Pipeline.parse("attention{kind=block-sparse,block=8}").run(tiny())
    elif form == "static":
        from examples import tiny_gpt

        model, inputs = tiny_gpt.build(flash=True)
        program = capture(model, inputs, dynamic_shapes=[{}])
    else:
        program = tiny(form)
    with pytest.raises(PassError, match=match) as e:
        optpipe.Pipeline.parse(f"partition{{strategy=sequence,{option}}}").run(program)
    assert "\n" not in str(e.value)


def test_a_pipeline_option_is_refused():
    with pytest.raises(Exception, match="strategy=sequence takes ways=N"):
        optpipe.Pipeline.parse("partition{strategy=sequence,stages=3}")
    with pytest.raises(Exception, match="balance 'params' is not for strategy=sequence"):
        optpipe.Pipeline.parse("partition{strategy=sequence,balance=params}")
    with pytest.raises(Exception, match="balance 'zigzag' is not for strategy=pipeline"):
        optpipe.Pipeline.parse("partition{stages=2,balance=zigzag}")
    text = "partition{strategy=sequence,ways=4,balance=contiguous}"
    assert str(optpipe.Pipeline.parse(text)) == text


@pytest.mark.coverage
@pytest.mark.parametrize("name,ways", [("gpt2", 2), ("llama", 2), ("llama", 4)])
def test_hf_models_plan_rings_whose_ranks_match_one_process(name, ways):
    from tests import hf_models

    model, inputs = getattr(hf_models, name)(attn="sdpa")
    program, _ = optpipe.Pipeline.parse("fuse-attention").run(capture(model, inputs))
    out, record = planned(program, ways)  # the pass's own check: the ranks reproduce the outputs
    assert record.stats["ring"] == 2 and record.stats["positions"] == 1 and order(out) == "zigzag"
    x = torch.randint(0, hf_models.VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    assert_ranks_match_one_process(out, x, ways)
