"""quantize: linears (and embeddings) -> int8-dynamic / int8-static / int8-weight / int4-weight ops.

Ops: the eager kernels (oneDNN int8 for int8-dynamic and int8-static, torch._int_mm for CUDA, run
here on the CPU; the CUDA dispatch checked by mocking) match their ATen decompositions; int4 packing
round-trips; gradients reach the activations and biases. int8-static calibration: falls back to the
verification inputs, attached sets change the scales, calibration-batches limits them, the methods
clip in order. int8-dynamic is per token: a row's output does not depend on the other rows of the
call (each kernel, and ONNX Runtime). ONNX Runtime: int8-dynamic, int8-static and int4-weight
(MatMulNBits) lower natively on a small MLP, with parity and the expected weight shrink. Pass:
fired (stats) and IR (FileCheck) on tiny BERT (aten.linear) and GPT-2 (Conv1D addmm, tied LM head),
fp32 weights removed and bytes shrinking; numerics vs fp32 by SQNR; `skip` leaves the named modules
bit-identical; `modules` selects; bad options are one-line errors; the budget gate stops a pass that
loses too much; save/load; decompositions and ONNX Runtime / TVM parity; the real MiniLM's sentence embeddings over
64 sentences; the example script runs.
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from torch.testing import FileCheck, assert_close

import optpipe
import optpipe.ops
from optpipe.calibration import calibration_inputs, with_calibration
from optpipe.capture import capture
from optpipe.errors import VerificationError
from optpipe.passes import quantize as quantize_pass  # registers the `quantize` pass
from optpipe.passes import quantize_ops as ops
from optpipe.pipeline_text import parse_pipeline
from tests import hf_models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OP_CALL = {
    "int8-dynamic": "torch.ops.optpipe.linear_int8_dynamic.default(",
    "int8-static": "torch.ops.optpipe.linear_int8_static.default(",
    "int8-weight": "torch.ops.optpipe.linear_int8_weight.default(",
    "int4-weight": "torch.ops.optpipe.linear_int4_weight.default(",
}
SCHEMES = tuple(OP_CALL)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.cache
def captured(name: str):
    model, inputs = getattr(hf_models, name)()
    return model, capture(model, inputs)


def rewrite(program, element: str):
    """(copy of `program` after the pipeline element, its PassResult)."""
    spec = parse_pipeline(element)[0]
    program = program.copy()
    result = spec.info.fn(program, spec.config)
    return program, result


@functools.cache
def _rewritten(name: str, canonical: str):
    return rewrite(captured(name)[1], canonical)


def rewritten_of(name: str, element: str):
    """rewrite() of the captured `name` model, shared by the tests that ask for the same pipeline element
    (spelled any way that parses to the same config). Read-only: run it, never rewrite it in place."""
    return _rewritten(name, str(parse_pipeline(element)[0]))


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp(min=1e-30))).item()


# -- ops -------------------------------------------------------------------------------------------------
def _weights(n=48, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)


@pytest.mark.parametrize("bias", [True, False])
def test_int8_dynamic_kernel_matches_decomposition(bias):
    w, b = _weights()
    q, scale = ops.quantize_int8_per_channel(w)
    x = torch.randn(3, 7, 64) * torch.linspace(0.1, 10, 7)[:, None]  # token scales spanning 100x
    b = b if bias else None
    eager = ops.linear_int8_dynamic(x, q, scale, b)
    reference = ops.int8_dynamic_reference(x, q, scale, b)
    assert sqnr(reference, eager) > 60
    exact = torch.nn.functional.linear(x, w, b)
    assert sqnr(exact, eager) > 35  # per-token scales: small tokens keep their precision


def _rows_alone(fn, x: torch.Tensor) -> torch.Tensor:
    """fn run on each token row of x [1, T, K] by itself (a decode step), concatenated."""
    return torch.cat([fn(x[:, t : t + 1]) for t in range(x.shape[1])], dim=1)


def _call(kernel, x, q, scale, b):
    return kernel(x, q, scale, b)


def test_int8_dynamic_row_is_independent_of_the_other_rows():
    """Per token means per token: a row's output is the same run with 15 other rows (a prefill, a
    batch) or alone (a kv-cache decode step). Rows of different ranges (some all positive, as after
    a ReLU) made a range over the whole call move; the fixed quantizer of x / max|x| has none."""
    w, b = _weights(seed=2)
    q, scale = ops.quantize_int8_per_channel(w)
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(2)) * torch.logspace(-1, 1, 16)[:, None]
    x[:, ::3] = x[:, ::3].abs()
    kernels = [ops.linear_int8_dynamic, ops.int8_dynamic_reference, ops.int8_dynamic_int_mm]
    for kernel in kernels:
        together = kernel(x, q, scale, b)
        assert torch.equal(together, _rows_alone(functools.partial(_call, kernel, q=q, scale=scale, b=b), x)), kernel
    # the kernels agree on the quantized values (symmetric int8 per token, scale max|x| / 127)
    assert sqnr(ops.int8_dynamic_reference(x, q, scale, b), ops.int8_dynamic_int_mm(x, q, scale, b)) > 60


def test_int8_dynamic_prepacks_once_per_weight():
    w, b = _weights(seed=1)
    q, scale = ops.quantize_int8_per_channel(w)
    x = torch.randn(4, 64)
    ops.linear_int8_dynamic(x, q, scale, b)
    size = len(ops.PREPACKED)
    for _ in range(3):
        ops.linear_int8_dynamic(x, q, scale, b)
    assert len(ops.PREPACKED) == size
    before = ops.linear_int8_dynamic(x, q, scale, None)
    q.neg_()  # modified in place: repacked, not served stale
    assert_close(ops.linear_int8_dynamic(x, q, scale, None), -before, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("smoothed", [False, True])
def test_int8_static_kernel_matches_decomposition(bias, smoothed):
    w, b = _weights()
    x = torch.randn(3, 7, 64)
    smooth = None
    if smoothed:  # an outlier channel, divided out of x and multiplied into W
        x[..., 5] *= 30
        smooth = ops.smoothing_factors(x.abs().amax((0, 1)), w.abs().amax(0), 0.7)
    q, scale = ops.quantize_int8_per_channel(w * (smooth if smoothed else 1))
    xs = x / smooth if smoothed else x
    qparams = ops.calibrated_qparams(float(xs.min()), float(xs.max()))
    b = b if bias else None
    assert ops.int8_static_kernel(x, q) == ("onednn" if ops.HAS_ONEDNN else "reference")
    eager = ops.linear_int8_static(x, q, scale, qparams, smooth, b)
    reference = ops.int8_static_reference(x, q, scale, qparams, smooth, b)
    assert sqnr(reference, eager) > 60
    assert sqnr(torch.nn.functional.linear(x, w, b), eager) > 30
    zero = int(qparams[1])
    assert 0 < zero < 255
    assert ops.int8_static_reference(torch.zeros(1, 64), q, scale, qparams, smooth, None).abs().max() == 0


def test_smoothing_tames_an_outlier_channel():
    """SmoothQuant: with one input channel 50x the others, per-tensor activations lose the rest;
    dividing the channels by max|x|^α / max|W|^(1-α) (and multiplying W) wins most of it back."""
    w, _ = _weights(k=64)
    x = torch.randn(256, 64)
    x[:, 3] *= 50
    exact = torch.nn.functional.linear(x, w)

    def error(alpha):
        smooth = ops.smoothing_factors(x.abs().amax(0), w.abs().amax(0), alpha) if alpha else None
        xs = x / smooth if alpha else x
        q, scale = ops.quantize_int8_per_channel(w * smooth if alpha else w)
        qparams = ops.calibrated_qparams(float(xs.min()), float(xs.max()))
        return sqnr(exact, ops.linear_int8_static(x, q, scale, qparams, smooth, None))

    assert error(0.5) > error(0) + 6


@pytest.mark.parametrize("bias", [True, False])
def test_int_mm_kernels_match_decompositions(bias):
    """The CUDA paths (torch._int_mm) are device-agnostic: checked here on the CPU."""
    w, b = _weights()
    q, scale = ops.quantize_int8_per_channel(w)
    x = torch.randn(4, 8, 64)  # 32 rows: _int_mm needs more than 16
    b = b if bias else None
    qparams = ops.calibrated_qparams(float(x.min()), float(x.max()))
    smooth = torch.rand(64) + 0.5
    for s in (None, smooth):
        static = ops.int8_static_int_mm(x, q, scale, qparams, s, b)
        assert static.shape == (4, 8, 48)
        assert sqnr(ops.int8_static_reference(x, q, scale, qparams, s, b), static) > 60
    dynamic = ops.int8_dynamic_int_mm(x, q, scale, b)  # symmetric int8 per token
    assert sqnr(torch.nn.functional.linear(x, w, b), dynamic) > 35


def test_cuda_tensors_dispatch_to_int_mm(monkeypatch):
    """A CUDA input with _int_mm-friendly shapes takes the torch._int_mm kernel (mocked: no GPU)."""
    w, b = _weights()
    q, scale = ops.quantize_int8_per_channel(w)
    calls = []
    real_int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, m: calls.append(a.shape) or real_int_mm(a, m))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    big, small, odd = torch.randn(32, 64), torch.randn(8, 64), torch.randn(32, 60)
    assert ops.int8_dynamic_kernel(big, q) == "int_mm" and ops.int8_static_kernel(big, q) == "int_mm"
    assert ops.int8_dynamic_kernel(small, q) != "int_mm"  # M <= 16: cuBLAS int8 refuses it
    assert ops.int8_dynamic_kernel(odd, q[:, :60]) != "int_mm"  # K not a multiple of 8
    ops.linear_int8_dynamic_impl(big, q, scale, b)
    ops.linear_int8_static_impl(big, q, scale, ops.calibrated_qparams(-4, 4), None, b)
    assert calls == [(32, 64), (32, 64)]
    ops.linear_int8_dynamic_impl(small, q, scale, b)
    assert len(calls) == 2


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_pack_round_trip(group):
    w, _ = _weights(n=8, k=256)
    packed, qparams = ops.quantize_int4_grouped(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 128) and qparams.shape == (8, 256 // group, 2)
    scale, zero = qparams[..., :1], qparams[..., 1:]
    dense = ops.dequantize_int4(packed, qparams, group, torch.float32)
    levels = dense.reshape(8, -1, group) / scale + zero
    assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # integer levels
    assert levels.round().min() >= 0 and levels.round().max() <= 15
    assert sqnr(w, dense) > 15


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradients_reach_activations_and_bias(scheme):
    w, b = _weights()
    x = torch.randn(2, 5, 64, requires_grad=True)
    bias = b.clone().requires_grad_(True)
    if scheme == "int4-weight":
        q, scale = ops.quantize_int4_grouped(w, 32)
        out = ops.linear_int4_weight(x, q, scale, bias, 32)
        dense = ops.dequantize_int4(q, scale, 32, torch.float32)
    elif scheme == "int8-static":
        q, scale = ops.quantize_int8_per_channel(w)
        smooth = torch.rand(64) + 0.5
        out = ops.linear_int8_static(x, q, scale, ops.calibrated_qparams(-1.0, 1.0), smooth, bias)
        dense = ops.dequantize_int8(q, scale, torch.float32) / smooth
    else:
        q, scale = ops.quantize_int8_per_channel(w)
        op = ops.linear_int8_dynamic if scheme == "int8-dynamic" else ops.linear_int8_weight
        out = op(x, q, scale, bias)
        dense = ops.dequantize_int8(q, scale, torch.float32)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_close(x.grad, grad @ dense, atol=1e-5, rtol=1e-5)
    assert_close(bias.grad, grad.sum((0, 1)), atol=1e-5, rtol=1e-5)


# -- the pass ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheme, min_db", [("int8-dynamic", 35), ("int8-static", 30), ("int8-weight", 35), ("int4-weight", 20)]
)
def test_bert_linears_rewritten(scheme, min_db):
    _, program = captured("bert")
    element = f"quantize{{scheme={scheme}}}" if scheme != "int4-weight" else "quantize{scheme=int4-weight,group=32}"
    rewritten, result = rewritten_of("bert", element)
    assert result.modified
    assert result.stats["quantized"] == 12 and result.stats["skipped"] == 3  # 2 x (q,k,v,o,up,down); 3 embeddings
    assert result.stats["bytes_after"] < result.stats["bytes_before"]
    code = rewritten.gm.code
    calls = 8 if scheme == "int8-dynamic" else 12  # int8-dynamic: q, k, v fused into one call per layer
    FileCheck().check_count(OP_CALL[scheme], calls, exactly=True).check_not("aten.linear.default(").run(code)
    names = dict(rewritten.gm.named_parameters())
    assert not any(n.endswith(("query.weight", "dense.weight")) for n in names), "fp32 weights left behind"
    ref, out = first(program.run()), first(rewritten.run())
    assert sqnr(ref, out) > min_db
    quantized = [d for d in result.details["modules"] if d["action"] == "quantized"]
    assert {d["module_path"] for d in quantized} >= {
        "encoder.layer.0.attention.self.query",
        "encoder.layer.1.output.dense",
    }


def test_int8_dynamic_fuses_linears_that_share_an_input(monkeypatch):
    """q, k and v read the same activation: one int8 call on their stacked weights, then a split.
    Exact against the unfused calls, and no bytes added to the saved program."""
    _, program = captured("bert")
    fused, result = rewritten_of("bert", "quantize{scheme=int8-dynamic}")
    assert result.stats["fused"] == 6  # 2 layers x (q, k, v)
    FileCheck().check("fused_weight_int8").check(OP_CALL["int8-dynamic"]).check("split_with_sizes").check_count(
        "getitem", 3
    ).run(fused.gm.code)
    assert not any(n.endswith("query.bias") for n, _ in fused.gm.named_parameters())
    monkeypatch.setattr(quantize_pass, "fuse_shared_input_linears", lambda gm: (0, set()))
    separate, plain = rewrite(program, "quantize{scheme=int8-dynamic}")
    assert plain.stats["fused"] == 0
    assert_close(first(fused.run()), first(separate.run()), rtol=0, atol=0)
    assert result.stats["bytes_after"] == plain.stats["bytes_after"]
    # different inputs (o, up, down) are never merged
    assert fused.gm.code.count(OP_CALL["int8-dynamic"]) == 8


def test_gpt2_conv1d_and_tied_lm_head():
    """GPT-2's Conv1D (addmm on a [in, out] weight) is caught; the LM head shares its weight with the
    token embedding, whose fp32 table stays with embeddings=false: an int8 copy for the head alone
    would make the model bigger, so the head is skipped (with the reason) until embeddings=true,
    which then shares ONE int8 copy."""
    _, program = captured("gpt2")
    rewritten, result = rewritten_of("gpt2", "quantize")
    assert result.stats["quantized"] == 8  # 2 x (c_attn, c_proj, c_fc, c_proj)
    FileCheck().check_not("aten.addmm.default(").check(OP_CALL["int8-dynamic"]).run(rewritten.gm.code)
    skipped = {d["site"]: d["reason"] for d in result.details["skipped"]}
    assert "weight shared with transformer.wte, which stays fp32" in skipped["lm_head"]
    assert "fp32_weights_kept" not in result.details
    assert sqnr(first(program.run()), first(rewritten.run())) > 30

    both, result = rewritten_of("gpt2", "quantize{embeddings=true}")
    assert result.stats["quantized"] == 11 and "fp32_weights_kept" not in result.details
    FileCheck().check("torch.ops.optpipe.embedding_int8.default(").run(both.gm.code)
    vocab = hf_models.VOCAB
    int8 = [t for t in both.gm.buffers() if t.dtype == torch.int8 and t.shape[0] == vocab]
    assert len(int8) == 1  # the embedding and the head read the same buffer
    assert not any(p.shape[0] == vocab for p in both.gm.parameters())
    assert result.stats["bytes_after"] * 2.5 < result.stats["bytes_before"]
    assert sqnr(first(program.run()), first(both.run())) > 30


def test_int8_static_tied_lm_head_keeps_one_int8_copy():
    """The tied LM head is not smoothed (that would need a second int8 copy of the table)."""
    _, program = captured("gpt2")
    rewritten, result = rewritten_of("gpt2", "quantize{scheme=int8-static,embeddings=true}")
    assert result.stats["quantized"] == 11
    assert len([t for t in rewritten.gm.buffers() if t.dtype == torch.int8 and t.shape[0] == hf_models.VOCAB]) == 1
    assert result.details["calibration"]["smoothing"].get("0", 0) >= 1
    assert sqnr(first(program.run()), first(rewritten.run())) > 30


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-static"])
def test_skip_leaves_named_modules_bit_identical(scheme):
    _, program = captured("bert")
    rewritten, result = rewrite(program, f"quantize{{scheme={scheme},skip=[encoder.layer.0.*,*.output.dense]}}")
    skipped = {d["module_path"]: d["reason"] for d in result.details["modules"] if d["action"] == "skipped"}
    assert skipped["encoder.layer.0.attention.self.query"] == "skip=encoder.layer.0.*"
    assert skipped["encoder.layer.1.output.dense"] == "skip=*.output.dense"
    assert result.stats["quantized"] == 4  # layer 1: q, k, v, intermediate
    original = dict(program.gm.named_parameters())
    kept = dict(rewritten.gm.named_parameters())
    for name, tensor in original.items():
        if name.startswith("encoder.layer.0.") or ".output.dense." in name:
            assert kept[name] is tensor and torch.equal(kept[name], tensor), name
    linears = lambda gm: {
        str(n.args[1].target)
        for n in gm.graph.nodes
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default
    }
    expected = {t for t in linears(program.gm) if t.startswith("encoder.layer.0.") or ".output.dense." in t}
    assert linears(rewritten.gm) == expected and len(expected) == 8


def test_modules_selects_and_nothing_selected_is_unmodified():
    _, program = captured("bert")
    _, result = rewrite(program, "quantize{modules=[*.intermediate.dense]}")
    assert result.stats["quantized"] == 2
    untouched, result = rewrite(program, "quantize{modules=[no_such_module]}")
    assert not result.modified and result.stats["quantized"] == 0
    assert untouched.gm.code == program.gm.code


def _act_qparams(gm) -> dict[str, list[float]]:
    return {name: t.tolist() for name, t in gm.named_buffers() if name.endswith("input_qparams")}


def test_int8_static_calibrates_on_verification_inputs_without_data():
    _, program = captured("bert")
    rewritten, result = rewritten_of("bert", "quantize{scheme=int8-static}")
    calibration = result.details["calibration"]
    expected_sets = len(calibration_inputs(program))
    assert calibration["source"] == "verification inputs" and calibration["sets"] == expected_sets
    assert calibration["method"] == "mse" and calibration["inputs"] == 8
    assert sum(calibration["smoothing"].values()) == 8  # one α chosen per input
    # 12 linears read 8 distinct activations (q, k, v share theirs): one range each, shared
    scales = _act_qparams(rewritten.gm)
    assert len(scales) == 12 and len({tuple(v) for v in scales.values()}) == 8
    assert all(v[0] > 0 and 0 <= v[1] <= 255 and v[1] == int(v[1]) for v in scales.values())
    # the same sets attached explicitly give the same scales: they are what it used
    attached, result = rewrite(
        with_calibration(program.copy(), calibration_inputs(program)), "quantize{scheme=int8-static}"
    )
    assert result.details["calibration"]["source"] == "attached calibration data"
    assert _act_qparams(attached.gm) == scales


def test_int8_static_calibration_data_changes_the_scales():
    _, program = captured("bert")
    baseline, _ = rewritten_of("bert", "quantize{scheme=int8-static}")
    g = torch.Generator().manual_seed(7)
    sets = [(torch.randint(0, 8, (3, 24), generator=g), torch.ones(3, 24, dtype=torch.int64)) for _ in range(5)]
    calibrated, result = rewrite(
        with_calibration(program.copy(), sets), "quantize{scheme=int8-static,calibration-batches=2}"
    )
    assert result.details["calibration"]["source"] == "attached calibration data"
    assert result.details["calibration"]["sets"] == 2
    before, after = _act_qparams(baseline.gm), _act_qparams(calibrated.gm)
    assert before.keys() == after.keys() and all(before[k] != after[k] for k in before)
    quantized = [d for d in result.details["modules"] if d["action"] == "quantized"]
    assert all(d["act_scale"] > 0 for d in quantized)
    assert sqnr(first(program.run()), first(calibrated.run())) > 20


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_int8_static_methods_clip_in_order(method):
    """minmax covers every calibration value; the others clip (mse chooses its clip by error)."""
    _, program = captured("bert")
    rewritten, result = rewritten_of("bert", f"quantize{{scheme=int8-static,smoothing=0,calibration-method={method}}}")
    assert result.details["calibration"]["method"] == method and result.details["calibration"]["smoothing"] == {"0": 8}
    assert not any(name.endswith("input_smooth") for name, _ in rewritten.gm.named_buffers())
    minmax, _ = rewritten_of("bert", "quantize{scheme=int8-static,smoothing=0,calibration-method=minmax}")
    widths = lambda gm: {k: v[0] for k, v in _act_qparams(gm).items()}
    ours, widest = widths(rewritten.gm), widths(minmax.gm)
    assert all(ours[k] <= widest[k] * (1 + 1e-6) for k in ours)
    assert sqnr(first(program.run()), first(rewritten.run())) > 30


class _MLP(torch.nn.Module):
    """Linears with K = 96 and 256: int4 group 32 gives 3 blocks (odd: zero points padded) and 8."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(96, 256)
        self.down = torch.nn.Linear(256, 128, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@functools.cache
def _mlp_program():
    x = torch.randn(2, 24, 96, generator=torch.Generator().manual_seed(0))
    return capture(_MLP().eval(), (x,))


@functools.cache
def _mlp_on_onnxruntime(pipeline: str):
    """optimize()'s result for the MLP on onnxruntime, built once per pipeline."""
    return optpipe.optimize(_mlp_program(), pipeline=pipeline, target="onnxruntime", diffs=False)


@functools.cache
def _onnx_size(pipeline: str) -> tuple:
    """(model.onnx initializer bytes, op types, report, native ops) of the MLP on onnxruntime."""
    import onnx
    import onnx.numpy_helper

    res = _mlp_on_onnxruntime(pipeline)
    with tempfile.TemporaryDirectory() as out:
        res.save(os.path.join(out, "OUT"))
        path = os.path.join(out, "OUT", "model.onnx")
        model = onnx.load(path)
        kinds = {n.op_type for n in model.graph.node}
        weights = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
        return weights, kinds, res.report, res.compiled.info.get("optpipe_ops_native")


@pytest.mark.parametrize(
    "pipeline, native_ops, op, smaller",
    [
        ("quantize{scheme=int8-dynamic}", {"QuantizeLinear", "MatMulInteger"}, "optpipe.linear_int8_dynamic", 3.6),
        ("quantize{scheme=int8-static}", {"QuantizeLinear", "MatMulInteger"}, "optpipe.linear_int8_static", 3.6),
        ("quantize{scheme=int4-weight,group=32}", {"MatMulNBits"}, "optpipe.linear_int4_weight", 6.0),
    ],
)
def test_onnxruntime_native_lowering(pipeline, native_ops, op, smaller):
    """int8-static lowers to QuantizeLinear + MatMulInteger, int4-weight to com.microsoft::MatMulNBits
    (ORT's block-wise int4 GEMM); both match the torch program on ORT and shrink the ONNX weights by
    what their formats promise: int8 + a scale per channel (+ int8-static's smoothing per input channel)
    ~3.7x, int4 + scale and zero point per 32 ~6.1x."""
    reason = _target_available("optpipe.targets.onnxruntime_backend")
    if reason:
        pytest.skip(reason)
    fp32_bytes, _, _, _ = _onnx_size("dce")
    size, kinds, report, native = _onnx_size(pipeline)
    assert native == [op] and native_ops <= kinds and "MatMul" not in kinds
    assert report["target_check"]["ok"], report["target_check"]
    assert report["target_check"].get("sqnr_db", 99) > 60 or report["target_check"]["max_abs"] < 1e-4
    assert fp32_bytes / size > smaller, (fp32_bytes, size)


def test_onnxruntime_int8_dynamic_row_is_independent_of_the_other_rows():
    """The ORT lowering quantizes per token too (QuantizeLinear with constant parameters): a row
    run alone gives what it gives among 15 others."""
    reason = _target_available("optpipe.targets.onnxruntime_backend")
    if reason:
        pytest.skip(reason)
    res = _mlp_on_onnxruntime("quantize{scheme=int8-dynamic}")  # test_onnxruntime_native_lowering's build
    assert res.compiled.info["optpipe_ops_native"] == ["optpipe.linear_int8_dynamic"]
    x = torch.randn(1, 16, 96, generator=torch.Generator().manual_seed(4)) * torch.logspace(-1, 1, 16)[:, None]
    x[:, ::3] = x[:, ::3].abs()
    together = first(res.compiled(x))
    assert_close(together, _rows_alone(lambda r: first(res.compiled(r)), x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "element, message",
    [
        ("quantize{scheme=int3}", "expected one of"),
        ("quantize{scheme=int4-weight,group=48}", "group must be one of 32, 64, 128"),
        ("quantize{modules=[]}", "modules is empty"),
        ("quantize{scheme=int8-static,calibration-batches=0}", "calibration-batches must be a positive integer"),
        ("quantize{calibration-method=kl}", "expected one of"),
        ("quantize{scheme=int8-static,smoothing=1.5}", "smoothing must be in [0, 1)"),
    ],
)
def test_bad_options_are_one_line_errors(element, message):
    with pytest.raises(Exception) as info:
        parse_pipeline(element)
    assert message in str(info.value) and "\n" not in str(info.value).strip().splitlines()[0]


def test_pipeline_text_round_trips():
    text = "quantize{scheme=int4-weight,group=32,skip=[lm_head,*embed*],min-cosine=0.99}"
    specs = parse_pipeline(text)
    assert parse_pipeline(str(specs[0]))[0].config == specs[0].config
    assert specs[0].config.skip == ("lm_head", "*embed*")


def test_budget_stops_a_pass_that_loses_too_much():
    _, program = captured("bert")
    with pytest.raises(VerificationError, match="over budget"):
        optpipe.optimize(
            program, pipeline="quantize{scheme=int4-weight,group=128,min-sqnr=90}", target="cpu", diffs=False
        )
    res = optpipe.optimize(
        program, pipeline="quantize{min-cosine=0.99}", target="cpu", diffs=False, target_options={"mode": "eager"}
    )  # the budget is the point, not torch.compile
    record = res.report["passes"][-1]
    assert record["exact"] is False and record["verify"]["ok"] and record["verify"]["cosine"] > 0.99
    assert record["stats"]["quantized"] == 12


@functools.cache
def saved_size(name: str) -> int:
    """Bytes of the captured fp32 program's saved archive (saved once for every scheme)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fp32.pt2")
        captured(name)[1].save(path)
        return os.path.getsize(path)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_load_round_trip(scheme, tmp_path):
    rewritten, result = rewritten_of("gpt2", f"quantize{{scheme={scheme},embeddings=true}}")
    path = tmp_path / "program.pt2"
    rewritten.save(path)
    saved = saved_size("gpt2") - os.path.getsize(path)  # tiny model: the graph is most of the file
    assert saved > 0.9 * (result.stats["bytes_before"] - result.stats["bytes_after"])
    loaded = optpipe.load_program(path)
    FileCheck().check(OP_CALL[scheme]).run(loaded.gm.code)
    ids = torch.randint(0, hf_models.VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    assert_close(first(loaded.gm(ids)), first(rewritten.gm(ids)))
    plain = torch.export.load(str(path)).module()  # a real torch.export archive
    assert_close(first(plain(ids)), first(rewritten.gm(ids)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_decompositions_lower_to_aten_with_parity(scheme):
    _, program = captured("bert")
    rewritten, _ = rewrite(program, f"quantize{{scheme={scheme},embeddings=true}}")
    ep = rewritten.export().run_decompositions(optpipe.ops.decompositions())
    assert "optpipe" not in ep.graph_module.code
    inputs = tuple(rewritten.example_inputs)
    assert sqnr(first(rewritten.run(inputs)), first(ep.module()(*inputs))) > 60


def _target_available(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - not installed
        return f"{module} not importable: {type(e).__name__}: {e}"
    return None


# One build per target: each scheme quantizes other modules of the BERT (one lowering each), the last one
# the embeddings too. The ORT pipeline gives int8-dynamic the attention: q, k, v fused into one call.
TARGET_PIPELINES = {
    "onnxruntime": (
        "quantize{scheme=int4-weight,group=32,modules=[encoder.layer.1.*]},"
        "quantize{scheme=int8-static,modules=[*.intermediate.dense,encoder.layer.0.output.dense]},"
        "quantize{scheme=int8-dynamic,embeddings=true}"
    ),
    "tvm": "quantize{scheme=int8-weight,modules=[encoder.layer.1.*]},quantize{scheme=int8-dynamic,embeddings=true}",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, module, schemes",
    [
        ("onnxruntime", "optpipe.targets.onnxruntime_backend", ("int4-weight", "int8-static", "int8-dynamic")),
        ("tvm", "optpipe.targets.tvm_backend", ("int8-weight", "int8-dynamic")),
    ],
)
def test_target_parity(target, module, schemes):
    """The target takes the quantized program and matches the torch program (optimize's check)."""
    reason = _target_available(module)
    if reason:
        pytest.skip(reason)
    from optpipe.registry import get_target

    tgt = get_target(target)
    try:
        tgt.available()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"{target} unavailable: {e}")
    _, program = captured("bert")
    # tvm: the dynamic main only; its static copy at the example shapes is tests/targets/test_tvm.py's
    options = {"static": False} if target == "tvm" else None
    res = optpipe.optimize(
        program, pipeline=TARGET_PIPELINES[target], target=target, diffs=False, target_options=options
    )
    passes = res.report["passes"]
    assert [p["config"]["scheme"] for p in passes] == list(schemes)
    assert all(p["stats"]["quantized"] > 0 for p in passes) and sum(p["stats"]["quantized"] for p in passes) >= 12
    code = res.program.gm.code
    assert all(OP_CALL[scheme] in code for scheme in schemes) and "embedding_int8" in code
    assert "aten.linear.default(" not in code
    assert res.report["target_check"]["ok"], res.report["target_check"]
    if target == "onnxruntime":  # ORT's integer ops and MatMulNBits, not the fp32 decompositions
        native = sorted(f"optpipe.linear_{scheme.replace('-', '_')}" for scheme in schemes)
        assert res.compiled.info["optpipe_ops_native"] == native
        import onnx

        with tempfile.TemporaryDirectory() as out:
            res.save(os.path.join(out, "OUT"))
            kinds = {n.op_type for n in onnx.load(os.path.join(out, "OUT", "model.onnx")).graph.node}
        # constant-parameter QuantizeLinear: DynamicQuantizeLinear's range over the call is not per token
        assert {"QuantizeLinear", "MatMulInteger", "MatMulNBits"} <= kinds and "DynamicQuantizeLinear" not in kinds


# -- real weights ---------------------------------------------------------------------------------------------
SUBJECTS = [
    "The cat",
    "A senior engineer",
    "My grandmother",
    "The stock market",
    "This small robot",
    "Our football team",
    "The new vaccine",
    "A quiet village",
    "The compiler",
    "Heavy rain",
]
PREDICATES = [
    "sat on the warm windowsill all afternoon.",
    "fixed the bug before the release went out.",
    "bakes bread every Sunday morning for the neighbours.",
    "fell sharply after the announcement.",
    "learned to sort recycling without any help.",
    "won the championship after extra time!",
    "reduced hospital admissions by a third.",
    "floods every spring when the river rises.",
]
QUESTIONS = [
    "How do I reset my password?",
    "Where is the nearest train station?",
    "Why is the sky blue?",
    "What time does the museum open on Mondays?",
    "Can transformers run on a phone?",
    "Is it going to snow tomorrow in Oslo?",
    "Who wrote the theory of general relativity?",
    "What is the capital of Australia?",
]


def sentences(count: int = 64) -> list[str]:
    """Varied sentences: statements mixing subjects and predicates, questions, short and long lines."""
    out = [f"{s} {p}" for i, s in enumerate(SUBJECTS) for j, p in enumerate(PREDICATES) if (i + j) % 4 != 3]
    out += QUESTIONS + [
        "Hi.",
        "ok",
        "Quantization makes large language models cheaper to serve.",
        "Int8 matrix multiplication with per-token activation scales keeps accuracy high "
        "while the weights take a quarter of the memory they used to.",
    ]
    assert len(out) >= count
    return out[:count]


@pytest.fixture(scope="module")
def minilm_batch():
    model, _ = hf_models.minilm()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_models.minilm_path(), local_files_only=True)
    batch = tokenizer(sentences(), padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    program = capture(model, {k: v[:4] for k, v in inputs.items()})
    return program, (inputs["input_ids"], inputs["attention_mask"])


def embed(program, inputs) -> torch.Tensor:
    out = program.gm(*inputs)
    hidden = out["last_hidden_state"] if isinstance(out, dict) else first(out)
    mask = inputs[1].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "element, least",
    [
        ("quantize{scheme=int8-dynamic}", 0.99),
        ("quantize{scheme=int8-static}", 0.99),
        ("quantize{scheme=int4-weight,group=32}", 0.97),
    ],
)
def test_minilm_sentence_embeddings_keep_cosine(minilm_batch, element, least):
    program, inputs = minilm_batch
    rewritten, result = rewrite(program, element)
    assert result.stats["quantized"] == 37  # 6 layers x (q, k, v, o, up, down) + the pooler
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(embed(program, inputs), embed(rewritten, inputs), dim=-1)
    assert len(cosine) >= 64
    assert cosine.mean() >= least, f"{element}: mean cosine {cosine.mean():.4f} (min {cosine.min():.4f})"


@pytest.mark.slow
def test_quantize_example_runs(tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "quantize.py"), "--repeat", "2", "--batch", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "int8-dynamic" in r.stdout and "smaller" in r.stdout


@pytest.mark.slow
def test_minilm_int8_static_calibrated_on_sentences(minilm_batch):
    """Calibrated on real sentences (32 of them, attached as calibration data) instead of random
    token ids, int8-static keeps int8-dynamic's quality on the other 32."""
    program, (ids, mask) = minilm_batch
    calibrated = with_calibration(program.copy(), [(ids[i : i + 8], mask[i : i + 8]) for i in range(32, 64, 8)])
    rewritten, result = rewrite(calibrated, "quantize{scheme=int8-static}")
    assert result.details["calibration"]["source"] == "attached calibration data"
    held_out = (ids[:32], mask[:32])
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(embed(program, held_out), embed(rewritten, held_out), dim=-1)
    assert cosine.mean() >= 0.995, f"mean cosine {cosine.mean():.4f} (min {cosine.min():.4f})"
