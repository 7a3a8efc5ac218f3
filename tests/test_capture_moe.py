"""Capture of mixture-of-experts models: the experts run dense (every expert on every token, batched
matmuls over the stacked weights, a dense top-k gate), so the graph holds only portable ATen ops,
matches eager, and `program.pt2` runs in a fresh process without transformers."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from optpipe import capture
from optpipe.capture import dense_experts, is_stacked_experts
from tests import hf_zoo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_PORTABLE = ("transformers", "histc", "grouped_mm", "sort", "index_put", "scatter", "nonzero", "one_hot")


def _ops(program) -> set[str]:
    return {str(n.target) for n in program.gm.graph.nodes if n.op == "call_function"}


@pytest.fixture(scope="module")
def mixtral():
    model, inputs = hf_zoo.build("mixtral")
    return model, inputs, capture(model, inputs)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_captures_dense_portable_ops_and_matches_eager(arch, mixtral):
    model, inputs, program = mixtral if arch == "mixtral" else (*hf_zoo.build(arch), None)
    program = program or capture(model, inputs)
    assert program.meta["experts"].startswith("dense: 2 experts module")
    ops = _ops(program)
    assert not [op for op in ops if any(bad in op for bad in NOT_PORTABLE)], sorted(ops)
    assert "aten.topk.default" in ops and "aten.matmul.default" in ops  # the router and the experts
    ids = torch.randint(3, hf_zoo.VOCAB - 1, (2, 11), generator=torch.Generator().manual_seed(1))  # new shape
    with torch.no_grad():
        torch.testing.assert_close(program.gm(ids), model(ids).logits, atol=1e-4, rtol=1e-4)
    # the model's own experts forward is back after capture
    assert not any("forward" in vars(m) for m in model.modules() if is_stacked_experts(m))


class NotExperts(nn.Module):  # a 3-D parameter named down_proj alone is not an experts module
    def __init__(self):
        super().__init__()
        self.down_proj = nn.Parameter(torch.zeros(2, 3, 4))

    def forward(self, x):
        return x


def test_only_stacked_experts_modules_are_switched():
    with dense_experts(NotExperts()) as n:
        assert n == 0


@pytest.mark.slow
def test_moe_program_runs_from_pt2_in_a_fresh_process_without_transformers(mixtral, tmp_path):
    model, inputs, program = mixtral
    path = tmp_path / "program.pt2"
    program.save(path)
    ids = torch.randint(3, hf_zoo.VOCAB - 1, (1, 9), generator=torch.Generator().manual_seed(2))
    torch.save({"ids": ids}, tmp_path / "ids.pt")
    script = (
        "import sys, torch, optpipe\n"
        f"ep = torch.export.load({str(path)!r})\n"
        f"out = ep.module()(torch.load({str(tmp_path / 'ids.pt')!r})['ids'])\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "out.pt"), model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.coverage  # make test runs the (mixtral, onnxruntime) cell of tests/test_coverage_matrix.py
def test_moe_program_runs_on_onnxruntime(mixtral):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from optpipe.registry import get_target

    model, inputs, program = mixtral
    target = get_target("onnxruntime")
    assert target.check(program) == []
    compiled = target.compile(program)
    ids = inputs["input_ids"]
    got = compiled(ids)
    got = got[0] if isinstance(got, (list, tuple)) else got
    torch.testing.assert_close(torch.as_tensor(got), program.gm(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_moe_program_passes_the_tvm_capability_check(mixtral):
    pytest.importorskip("tvm")
    from optpipe.registry import get_target

    assert get_target("tvm").check(mixtral[2]) == []
