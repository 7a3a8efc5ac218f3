"""Targets cpu and cuda: parity with the torch program, mode choice, device retargeting."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from optpipe import capture
from optpipe.errors import UsageError
from optpipe.optimization import check_target, optimize
from optpipe.registry import get_target


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 64)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        b, t, _ = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
        pos = torch.arange(t, device=input_ids.device)  # export bakes device=cpu into the graph
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, 32)
        return self.out(y + pos[None, :, None].float())


@pytest.fixture(scope="module")
def program():
    torch.manual_seed(0)
    return capture(Attn(), (torch.randint(0, 64, (1, 16)),))


def test_cpu_eager_parity(program):
    tgt = get_target("cpu")
    compiled = tgt.compile(program, mode="eager")
    check = check_target(tgt, compiled, program)
    assert check["ok"] and check["max_abs"] == 0.0 and check["inputs"] == 2  # example + another length
    assert compiled.info["mode"] == "eager"


@pytest.mark.slow
def test_cpu_auto_measures_both_and_stays_in_parity(program):
    tgt = get_target("cpu")
    compiled = tgt.compile(program, mode="auto", iters=3)
    info = compiled.info
    assert info["mode"] in ("eager", "compile") and info["eager_ms"] > 0 and info["compile_ms"] > 0
    assert "faster" in info["reason"]
    check = check_target(tgt, compiled, program)
    assert check["ok"] and check["max_abs"] <= 1e-4


def test_optimize_records_target_info(program):
    res = optimize(program, pipeline="cse", target="cpu", target_options={"mode": "eager"})
    assert res.report["target"] == "cpu" and res.report["target_info"]["mode"] == "eager"
    assert res.report["target_check"]["ok"]


def test_retarget_rewrites_baked_devices(program):
    from optpipe.targets.torch_backend import retarget_device

    gm = retarget_device(program.copy().gm, torch.device("meta"))
    assert "device(type='cpu')" not in gm.code and "device(type='meta')" in gm.code
    out = gm(torch.randint(0, 64, (1, 16), device="meta"))
    assert out.device.type == "meta" and out.shape == (1, 16, 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_a_clear_error(program):
    with pytest.raises(UsageError, match="no CUDA device"):
        optimize(program, pipeline="cse", target="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_parity(program):
    res = optimize(program, pipeline="cse", target="cuda", target_options={"mode": "eager"})
    assert res.report["target_check"]["ok"] and res.report["target_check"]["max_abs"] <= 1e-4


# -- a step program (kv-cache) as `optpipe generate OUT` runs it -------------------------------------------
@pytest.fixture()
def quick_compile(monkeypatch):
    """torch.compile with dynamo's own guards and recompiles but no inductor codegen: what these tests
    check is which frames get compiled and when, not the kernels (seconds instead of minutes)."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))


@pytest.fixture(scope="module")
def step_program():
    from examples import tiny_gpt
    from optpipe.pipeline import Pipeline

    model, _ = tiny_gpt.build(block_size=64, vocab_size=64, n_layer=1, n_embd=32, n_head=2)
    program = capture(model, (torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0)),))
    step, _ = Pipeline.parse("fuse-attention,kv-cache{max-len=40}").run(program, verify=False)
    return step


def _frames_of_one_call(fn, *inputs) -> set[str]:
    """Source files of every Python frame one call enters."""
    import sys

    files: set[str] = set()

    def record(frame, event, arg):
        if event == "call":
            files.add(frame.f_code.co_filename)

    sys.setprofile(record)
    try:
        fn(*inputs)
    finally:
        sys.setprofile(None)
    return files


@pytest.mark.slow  # a save and a load (torch.export both ways), then two compiles: 15-20 s on a busy 2-core box
def test_loaded_step_program_skips_export_hooks_and_never_recompiles(step_program, quick_compile, tmp_path):
    """program.pt2 loads as torch.export's unlifted module, whose forward hooks re-check the input
    tree in Python on every call, outside the compiled graph: the decode step `optpipe generate`
    runs must not enter torch.export at all (that made the loaded program ~10% slower per token than
    the one `auto` had timed), and it compiles its prefill and decode graphs once, at load."""
    import json

    from optpipe.kv_step import filled, prefill
    from optpipe.program import load_program
    from optpipe.runtime.generation import generate, target_step_function

    step_program.save(tmp_path / "program.pt2")
    (tmp_path / "target.json").write_text(json.dumps({"target": "cpu", "info": {"mode": "compile"}}))
    program = load_program(tmp_path / "program.pt2")  # what `optpipe generate OUT` loads
    assert program.gm._forward_pre_hooks  # the archive's module: export's input checks as hooks
    tgt = get_target("cpu")
    step = target_step_function(tgt, tgt.load(str(tmp_path), program))

    kv = program.meta["kv_cache"]
    prompt = program.example_inputs[0]
    logits, key_mask, caches = prefill(step, kv, prompt)
    slot = prompt.shape[1]
    key_mask[:, slot] = True
    position = torch.tensor([slot])
    token = logits[:, -1].argmax(-1, keepdim=True)
    files = _frames_of_one_call(step, token, position[None], position, filled(key_mask, slot + 1), *caches)
    assert not [f for f in files if f"{os.sep}torch{os.sep}export{os.sep}" in f]

    with torch._dynamo.config.patch(error_on_recompile=True):  # any new graph from here on raises
        ids = generate(program, prompt, 12, step=step).new_ids
    assert ids == generate(step_program, prompt, 12).new_ids


def test_auto_keeps_the_callable_it_timed(step_program, quick_compile, monkeypatch):
    """`auto` times eager and torch.compile side by side on the same decode steps, and what it
    returns is the very callable that won, not another compile of the program."""
    import optpipe.targets.torch_backend as backend

    timed = {}

    def spy(steps_by_name, kv, input_ids, steps=8, warmup=2):
        timed.update(steps_by_name)
        return {"eager": [2.0] * steps, "compile": [1.0] * steps}  # compile wins

    monkeypatch.setattr(backend, "interleaved_decode_seconds", spy)
    compiled = get_target("cpu").compile(step_program, mode="auto")
    assert compiled.info["mode"] == "compile" and compiled.info["compile_ms"] == 1000.0
    assert compiled.fn is timed["compile"]
    assert not timed["eager"]._forward_pre_hooks and not timed["eager"]._forward_hooks


def test_decode_steps_are_timed_alternately(step_program):
    """Decode step i runs on every callable before step i+1 runs on any (who goes first alternates),
    each callable on its own caches: load on a shared machine falls on all of them."""
    from optpipe.kv_step import interleaved_decode_seconds
    from optpipe.runtime.generation import step_function

    calls = []

    def spy(name):
        def step(*inputs):
            calls.append((name, inputs[3].shape[1], inputs[4].data_ptr()))
            return step_function(step_program)(*inputs)

        return step

    kv = step_program.meta["kv_cache"]
    times = interleaved_decode_seconds({"a": spy("a"), "b": spy("b")}, kv, step_program.example_inputs[0], 3, 1)
    assert [len(t) for t in times.values()] == [3, 3]
    decode = calls[2:]  # after one prefill each
    assert [name for name, _, _ in decode] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [width for _, width, _ in decode] == [9, 9, 10, 10, 11, 11, 12, 12]  # one token over L = 9, 10, ...
    assert {cache for n, _, cache in decode if n == "a"}.isdisjoint({cache for n, _, cache in decode if n == "b"})
