"""Targets cpu and cuda: parity with the torch program, mode choice, device retargeting."""

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
