"""Targets onnxruntime and tvm on the ops that broke transformers families (issue 16): each test
is the one op (or the few ops) a family tripped on, in a module of its own, compiled and checked
against torch at the example inputs and a second sequence length.

TVM builds only the dynamic `main` (`static=False`): a few seconds per module.
"""

import pytest
import torch
import torch.nn as nn

from optpipe import capture
from optpipe.optimization import optimize

TOL = 1e-5
TVM = {"static": False}


def _ids(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 32, (batch, seq), generator=torch.Generator().manual_seed(0))


def _parity(module: nn.Module, target: str, *inputs, pipeline: str = "dce"):
    torch.manual_seed(0)
    program = capture(module.eval(), inputs or (_ids(),))
    res = optimize(program, pipeline=pipeline, target=target, target_options=TVM if target == "tvm" else None)
    check = res.report["target_check"]
    assert check["ok"] and check["max_abs"] <= TOL, check
    assert check["inputs"] == 2  # the example inputs and a second sequence length
    return res


class Embedded(nn.Module):
    """token ids -> (batch, seq, 4, 16) activations, for the op under test (`op`)."""

    def __init__(self, op):
        super().__init__()
        self.emb = nn.Embedding(32, 64)
        self.op = op

    def forward(self, input_ids):
        h = self.emb(input_ids)
        return self.op(h.view(*input_ids.shape, 4, 16))


# -- tvm -----------------------------------------------------------------------------------------


def _negative_index(h):  # Falcon's multi-query split: fused_qkv[..., [-2], :], [..., [-1], :]
    return h[..., [-2], :] * 2 + h[..., [-1], :]


def _negative_axis_slice(h):  # Mistral/Gemma-2's masks: slices along dim -1, one to a symbolic end
    n = h.shape[1]
    pos = torch.arange(n + 1, device=h.device).expand(h.shape[0], -1)
    head = torch.ops.aten.slice.Tensor(pos, -1, 0, n)
    tail = torch.ops.aten.slice.Tensor(pos, -1, 1)  # to the end (9223372036854775807)
    return h.sum(-1) + (head * 2 - tail).to(h.dtype)[..., None]


def _bool_cumsum(h):  # Mistral/Gemma-2's masks: torch sums a bool tensor in int64
    return h.sum(-1) + (h[..., 0, 0] > 0).cumsum(-1)[..., None].to(h.dtype)


def _symbolic_repeat(h):  # BLOOM's / DeBERTa-v2's biases: a tensor repeated once per batch row
    bias = h[:1, :, 0, :].sum(-1)  # (1, seq)
    return h.sum(-1) + bias.repeat(h.shape[0], 1)[..., None]


def _alibi(h):  # MPT's ALiBi: a bias built for 64 positions, cut to the last T by max(0, 64 - T) (sym_max)
    n = h.shape[1]
    bias = torch.arange(64.0, device=h.device).expand(4, 1, 64) / 64
    scores = torch.einsum("bqhd,bkhd->bhqk", h / 4, h / 4)
    return scores + bias[:, max(0, 1 - n) :, max(0, 64 - n) :]


def _alibi_from_min(h):  # the same cut from min(T, 64) (sym_min)
    n = h.shape[1]
    bias = torch.arange(64.0, device=h.device).expand(4, 1, 64) / 64
    return h.sum(-1).transpose(1, 2)[..., None] + bias[:, :, 64 - min(n, 64) :]


@pytest.mark.parametrize(
    "op",
    [_negative_index, _negative_axis_slice, _bool_cumsum, _symbolic_repeat, _alibi, _alibi_from_min],
    ids=lambda f: f.__name__.strip("_"),
)
def test_tvm(op):
    pytest.importorskip("tvm")
    _parity(Embedded(op), "tvm")


def test_tvm_sizes_from_sym_max_broadcast_under_a_runtime_check():
    """MPT: the bias cut by max(0, 64 - T) has a size Relax cannot prove equal to T, so the add gets
    that input cast to T, checked when called (the scores beside it, already T, are not cast); past
    64 positions, where the torch program raises, so does the library, instead of reading past the bias."""
    pytest.importorskip("tvm")
    from optpipe.targets.tvm_backend import TvmTarget

    target, program = TvmTarget(), capture(Embedded(_alibi).eval(), (_ids(),))
    script = target.import_program(program).mod.script()
    assert "T.max(" in script
    casts = [line for line in script.splitlines() if "R.match_cast(" in line]
    assert len(casts) == 2 and "ndim=3" in casts[0] and "(4, 1, s" in casts[1], casts  # rank, then sizes
    library = target.compile(program, static=False).fn
    for seq in (8, 63):
        ids = _ids(seq=seq)
        torch.testing.assert_close(library(ids), program.gm(ids), atol=TOL, rtol=0)
    too_long = _ids(seq=65)
    with pytest.raises(AssertionError, match="Guard failed"):
        program.gm(too_long)
    with pytest.raises(RuntimeError, match="match_cast error"):
        library(too_long)


# -- onnxruntime ---------------------------------------------------------------------------------


class MaskedAttention(nn.Module):
    """T5's attention tail: SDPA with a float bias, then transpose + reshape (a view) back to
    (batch, seq, hidden); which strides SDPA's output has depends on how it is traced."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 64)
        self.qkv = nn.ModuleList(nn.Linear(64, 64, bias=False) for _ in range(3))
        self.bias = nn.Embedding(16, 4)

    def forward(self, input_ids):
        b, n = input_ids.shape
        h = self.emb(input_ids)
        q, k, v = (proj(h).view(b, n, 4, 16).transpose(1, 2) for proj in self.qkv)
        pos = torch.arange(n)
        bias = self.bias((pos[None, :] - pos[:, None]).clamp(0, 15)).permute(2, 0, 1)[None]
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out.transpose(1, 2).reshape(b, n, -1)


def test_onnxruntime_view_after_transpose():
    pytest.importorskip("onnxruntime")
    _parity(MaskedAttention(), "onnxruntime")


# -- one-line errors -----------------------------------------------------------------------------


def test_unsupported_hint_names_the_model_when_no_pass_introduced_the_op():
    pytest.importorskip("tvm")
    from optpipe.target import UnsupportedNode, unsupported_hint

    captured = [UnsupportedNode("erfinv", "aten.erfinv", "", None)]
    assert unsupported_hint(captured) == "the captured model itself contains the op(s): choose another target"
    rewritten = captured + [UnsupportedNode("q", "optpipe.quant", "h.0", "quantize")]
    assert unsupported_hint(rewritten).endswith("drop the pass that introduced them (quantize)")


def test_a_failing_build_keeps_its_cause_for_the_debug_traceback(monkeypatch):
    pytest.importorskip("tvm")
    from optpipe.errors import TargetError
    from optpipe.targets import tvm_backend

    def broken(*args, **kwargs):
        raise RuntimeError("llvm said no")

    monkeypatch.setattr(tvm_backend, "build_relax", broken)
    program = capture(Embedded(_negative_index).eval(), (_ids(),))
    with pytest.raises(TargetError, match="build failed: RuntimeError: llvm said no") as err:
        optimize(program, pipeline="dce", target="tvm", target_options=TVM)
    assert isinstance(err.value.__cause__, RuntimeError)  # OPTPIPE_DEBUG=1 prints the chained traceback
