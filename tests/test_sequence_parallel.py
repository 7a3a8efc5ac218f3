"""Sequence-parallel runs under torchrun (gloo on CPU): `optpipe.runtime.sequence_parallel`.

Parity with one process for the tiny GPT: loss every step, gradients of the last step and the
weights after 3 AdamW steps within 1e-5, and the forward logits of `sequence_run`, for causal
sliding-window attention (halo) at 2 ranks (make test), dense causal attention (ring, on zig-zag
shards) and linear attention (prefix scan) at 2 and 4 ranks, 2-way sequence x 2-way data parallel,
and HF GPT-2 and Llama (GQA, RoPE) with every form at 2 and 4 ranks (make coverage: each starts
torchrun, 15-50 s here). A rank that dies stops the others with an error naming it;
examples/sequence_parallel.py runs.
`optpipe train OUT --sequence-parallel N`: a 2-step CLI run against one process (make coverage,
~20 s) and its one-line refusals (make test).
In-process parity (ranks as threads, every form, 2 and 4 ranks): tests/passes/test_partition_sequence.py.
"""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from torch.testing import assert_close

import optpipe
from optpipe.capture import capture
from optpipe.runtime.launch import FAIL_RANK_ENV
from optpipe.runtime.parallel import PipelineError
from optpipe.runtime.sequence_parallel import sequence_run, sequence_train
from tests.parallel_reference import one_process_run
from tests.test_examples import run_example

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SWAPS = {"dense": "", "window": ",attention{kind=sliding-window,window=8}", "linear": ",attention{kind=linear}"}
LR = 1e-3
EPS = 1e-6  # AdamW's update g/(|g|+eps) turns 1e-9 gradient noise (sum order) on near-zero gradients (a
# K bias's, zero in exact arithmetic) into lr-sized steps at eps=1e-8: the comparison needs a conditioned map


@functools.cache
def program(form: str, model: str = "tiny"):
    if model == "tiny":
        from examples import tiny_gpt

        module, inputs = tiny_gpt.build()
    else:
        from tests import hf_models

        module, inputs = getattr(hf_models, model)(attn="sdpa")
    swap = SWAPS[form] if model == "tiny" else SWAPS[form].replace("window=8", "window=4")  # the HF examples'
    # 16 tokens are planned in shards of 4 at 4 ranks: a window reaches one neighbour (refused beyond)
    out, _ = optpipe.Pipeline.parse("fuse-attention" + swap).run(capture(module, inputs))
    return out


def batches(steps: int, batch: int, seq: int = 32, vocab: int = 256) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def check_parity(
    prog, ways: int, dp: int = 1, batch: int = 2, vocab: int = 256, optimizer="adamw", lr=LR, clip=None, accum=1
) -> dict:
    data = batches(3, batch * dp, vocab=vocab)
    options = {"optimizer": optimizer, "lr": lr, "eps": EPS, "clip": clip, "grad_accum": accum}
    res = sequence_train(prog, data, ways=ways, data_parallel=dp, timeout=60, **options)
    gm, losses, grads = one_process_run(prog, data, optimizer, lr, clip, eps=EPS)
    assert res["ranks"] == ways * dp
    assert_close(torch.tensor(res["losses"]), torch.tensor(losses), rtol=0, atol=1e-5)
    for name, g in res["grads"].items():
        assert_close(g, grads[name], rtol=0, atol=1e-5, msg=name)
    worst = max((w - gm.get_parameter(name).detach()).abs().max().item() for name, w in res["weights"].items())
    assert worst <= 1e-5, worst
    return res


def check_logits(prog, ways: int) -> dict:
    ids = batches(1, 2)[0]["input_ids"]
    res = sequence_run(prog, (ids,), ways=ways, timeout=60)
    assert_close(res["output"], prog.run((ids,)), rtol=1e-4, atol=1e-5)
    return res


def test_sliding_window_training_matches_one_process():
    """AdamW; then SGD with an lr per step, clipping that binds and two accumulated micro-batches."""
    check_parity(program("window"), ways=2)
    check_parity(program("window"), ways=2, optimizer="sgd", lr=[0.05, 0.03, 0.01], clip=0.5, accum=2)


@pytest.mark.coverage
@pytest.mark.parametrize("form,ways", [("dense", 2), ("linear", 2), ("window", 4), ("dense", 4), ("linear", 4)])
def test_training_and_logits_match_one_process(form, ways):
    """Dense causal attention runs on zig-zag shards (the default), the others on contiguous ones."""
    order = "zigzag" if form == "dense" else "contiguous"
    assert check_parity(program(form), ways=ways)["order"] == order
    assert check_logits(program(form), ways=ways)["order"] == order


@pytest.mark.coverage
@pytest.mark.parametrize("form", ["linear", "dense", "window"])
def test_sequence_times_data_parallel_matches_one_process(form):
    check_parity(program(form), ways=2, dp=2)


@pytest.mark.coverage
@pytest.mark.parametrize("ways", [2, 4])
@pytest.mark.parametrize("form", ["dense", "window", "linear"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_gpt2_and_llama_match_one_process(name, form, ways):
    """GPT-2 (learned positions) and Llama (GQA, RoPE) at global offsets, every form, 2 and 4 ranks."""
    from tests import hf_models

    prog = program(form, name)
    res = check_parity(prog, ways=ways, batch=1, vocab=hf_models.VOCAB)
    assert res["order"] == ("zigzag" if form == "dense" else "contiguous")


@pytest.mark.coverage
def test_hf_llama_sequence_times_data_parallel_matches_one_process():
    from tests import hf_models

    check_parity(program("dense", "llama"), ways=2, dp=2, batch=1, vocab=hf_models.VOCAB)


@pytest.mark.coverage
def test_a_sequence_parallel_rank_that_dies_stops_the_others(monkeypatch):
    monkeypatch.setenv(FAIL_RANK_ENV, "1")
    with pytest.raises(PipelineError, match=r"sequence parallel rank 1 \(sequence shard 1 of 2, replica 0\)") as e:
        sequence_train(program("window"), batches(1, 2), ways=2, timeout=20)
    assert "\n" not in str(e.value)


@pytest.mark.coverage
def test_sequence_parallel_example(tmp_path):
    out = run_example("sequence_parallel.py", tmp_path / "OUT", "--ways", "2", "--steps", "2", tmp_path=tmp_path)
    assert "same training: True" in out and "'halo': 2" in out
    assert "| transformer.h.0.attn | halo | 7168 | 32768 |" in out
    assert float(out.split("max |ranks - program| = ")[1].split()[0]) <= 1e-5
    assert (tmp_path / "OUT" / "program.pt2").exists()


# -- optpipe train OUT --sequence-parallel N ------------------------------------------------------------------
def cli(*args):
    from click.testing import CliRunner

    from optpipe.cli import main

    return CliRunner().invoke(main, ["train", *map(str, args)])


@pytest.mark.coverage
def test_cli_train_sequence_parallel_matches_one_process(pydoc_text, tmp_path):
    """A sliding-window GPT OUT trained 3 steps over 2 sequence ranks (torchrun, ~20 s here): the
    losses and lrs in metrics.jsonl are the one-process run's, warmup + cosine schedule and gradient
    clipping (at a norm that binds) included; train.json holds the plan."""
    from optpipe.loading import load_model
    from tests.test_training import QUICK

    window, _ = optpipe.Pipeline.parse("attention{kind=sliding-window,window=8}").run(load_model(QUICK))
    window.save(str(tmp_path / "OUT"))
    common = ["--data", pydoc_text, "--objective", "clm", "--steps", 3, "--batch-size", 2, "--lr", 1e-3]
    common += ["--warmup", 1, "--clip", 0.05, "--log-every", 1]
    r = cli(tmp_path / "OUT", *common, "--sequence-parallel", 2, "-o", tmp_path / "sp")
    assert r.exit_code == 0, r.output
    one = cli(tmp_path / "OUT", *common, "-o", tmp_path / "one")
    assert one.exit_code == 0, one.output
    rows = [json.loads(line) for line in (tmp_path / "sp" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], abs=1e-5)
    assert [r["lr"] for r in rows] == pytest.approx([r["lr"] for r in ref]) and len({r["lr"] for r in rows}) > 1
    info = json.loads((tmp_path / "sp" / "train.json").read_text())
    assert (info["sequence_parallel"], info["data_parallel"]) == (2, 1)
    assert [s["exchange"] for s in info["partition"]["sites"]] == ["halo", "halo"]
    assert (tmp_path / "sp" / "program.pt2").exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--seq-len", 30, "--sequence-parallel", 4], r"--seq-len 30 does not divide into 4 shards"),
        (["--sequence-parallel", 3], r"sequence length 32 does not divide into 3 shards"),
        (["--sequence-parallel", 2, "--tensor-parallel", 2], r"--sequence-parallel and --tensor-parallel together"),
        (["--sequence-parallel", 2, "--nproc", 2, "--batch-size", 3], r"batch size 3 does not split over 2"),
        (["--sequence-parallel", 2, "--distill-from", "x"], r"--sequence-parallel does not take --distill-from"),
    ],
)
def test_cli_train_sequence_parallel_refuses_in_one_line(pydoc_text, tmp_path, args, match):
    from tests.test_training import QUICK

    r = cli(QUICK, "--data", pydoc_text, "--steps", 1, *args, "-o", tmp_path / "o")
    assert r.exit_code == 2, r.output
    assert re.search(match, r.output) and r.output.count("\n") <= 2, r.output
