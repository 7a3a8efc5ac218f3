"""Target onnxruntime: parity with the torch program (example inputs and a second sequence length),
the saved OUT run in a fresh process, the capability check, and optpipe ops lowered through their
decomposition or a native onnxscript lowering."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
onnxscript = pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402
from onnxscript import opset18 as op  # noqa: E402
from onnxscript.function_libs.torch_lib.tensor_typing import TFloat  # noqa: E402

from optpipe import capture  # noqa: E402
from optpipe.cli import main  # noqa: E402
from optpipe.errors import TargetError  # noqa: E402
from optpipe.ops import define_op, opdef, register_lowering  # noqa: E402
from optpipe.optimization import check_target, optimize  # noqa: E402
from optpipe.pipeline import Pipeline  # noqa: E402
from optpipe.registry import PassResult, get_target, register_pass  # noqa: E402
from tests import hf_models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
aten = torch.ops.aten


# ---- test-only optpipe ops, a native lowering, and the passes that introduce them -------------------


def _scaled_gelu(x: torch.Tensor, scale: float) -> torch.Tensor:
    return F.gelu(x) * scale


def _same_shape(x, scale):
    return torch.empty_like(x)


def _scaled_gelu_decomposition(x, scale):
    return aten.gelu.default(x) * scale


def _opaque_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


scaled_gelu = define_op(
    "test_ort_scaled_gelu", _scaled_gelu, fake=_same_shape, decomposition=_scaled_gelu_decomposition
)
opaque_gelu = define_op("test_ort_opaque_gelu", _opaque_gelu, fake=lambda x: torch.empty_like(x))  # no way down

MSFT = onnxscript.values.Opset("com.microsoft", 1)


@onnxscript.script(onnxscript.values.Opset("optpipe.test", 1), default_opset=op)
def scaled_gelu_ort(x: TFloat, scale: float) -> TFloat:
    """ORT's contrib Gelu kernel (com.microsoft), where the decomposition gives ONNX's Gelu."""
    return op.Mul(MSFT.Gelu(x), op.CastLike(scale, x))


def replace_gelu(program, fn) -> int:
    """Replace every aten.gelu with `fn(graph, x)`, keeping the node's metadata (module path)."""
    graph, count = program.gm.graph, 0
    for node in list(graph.nodes):
        if node.target is aten.gelu.default:
            with graph.inserting_after(node):
                new = fn(graph, node.args[0])
            new.meta = {k: v for k, v in node.meta.items() if k != "custom"}
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            count += 1
    program.gm.recompile()
    return count


@dataclass(frozen=True)
class NoOptions:
    pass


@register_pass("test-ort-opaque-gelu", NoOptions, exact=True)
def opaque_gelu_pass(program, config):
    """Rewrites gelu into an optpipe op that has neither a decomposition nor an onnxruntime lowering."""
    n = replace_gelu(program, lambda g, x: g.call_function(opaque_gelu, (x,)))
    return PassResult(n > 0, {"rewritten": n})


# ---- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target():
    return get_target("onnxruntime")


@pytest.fixture(scope="module")
def tiny():
    """The tiny nanoGPT with its attention fused into SDPA and the dead mask buffers gone."""
    from examples.tiny_gpt import build

    model, inputs = build()
    program, _ = Pipeline.parse("fuse-attention,dce").run(capture(model, inputs))
    return model, program


@pytest.fixture(scope="module")
def hf_compiled(target):
    """(model, program, compiled with the default options) per (family, attention): each built once
    for the parity table and the fusion checks that read the same build."""
    built = {}

    def get(name: str, attn: str):
        if (name, attn) not in built:
            model, inputs = getattr(hf_models, name)(attn=attn)
            program = capture(model, inputs)
            built[name, attn] = model, program, target.compile(program)
        return built[name, attn]

    return get


def assert_parity(target, compiled, program):
    check = check_target(target, compiled, program)
    assert check["inputs"] == 2  # the example inputs and another sequence length
    assert check["ok"] and check["max_abs"] <= 1e-4, check
    return check


def onnx_ops(compiled) -> list[tuple[str, str]]:
    model = onnx.load(os.path.join(compiled.fn.workdir, "model.onnx"))
    return [(n.domain, n.op_type) for n in model.graph.node]


# ---- parity ------------------------------------------------------------------------------------------


def test_tiny_gpt_parity_and_model_file(target, tiny):
    _, program = tiny
    assert "scaled_dot_product_attention" in program.gm.code
    assert target.check(program) == []
    compiled = target.compile(program, mode="auto", tune=0)  # options for other targets are ignored
    assert_parity(target, compiled, program)
    info = compiled.info
    assert info["exporter"].startswith("torch.onnx.export") and 18 <= info["opset"] <= 21
    assert info["providers"][-1] == "CPUExecutionProvider" and info["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert info["model_bytes"] > 0 and info["optimized_model_bytes"] > 0 and not info["external_data"]
    model = onnx.load(os.path.join(compiled.fn.workdir, "model.onnx"))
    onnx.checker.check_model(model)
    assert model.ir_version <= 10
    assert {o.domain: o.version for o in model.opset_import}[""] == info["opset"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    assert len(model.graph.initializer) > 0  # weights inside the one file


BERT_FUSED = {"Attention", "SkipLayerNormalization", "BiasGelu"}  # QKV + attention in one op; biases folded


@pytest.mark.parametrize(
    "name,attn,contrib",
    [
        ("gpt2", "sdpa", {"MultiHeadAttention", "SkipLayerNormalization"}),
        ("llama", "sdpa", {"MultiHeadAttention"}),
        ("bert", "eager", BERT_FUSED),
        ("minilm", "sdpa", BERT_FUSED),
    ],
)
def test_hf_model_parity(target, hf_compiled, name, attn, contrib):
    model, program, compiled = hf_compiled(name, attn)
    if "attention_mask" in program.input_names:
        mask = program.example_inputs[program.input_names.index("attention_mask")]
        assert (mask == 0).any()  # a padded batch: the mask matters
    assert_parity(target, compiled, program)
    ops = onnx_ops(compiled)  # attention runs as an ORT contrib kernel, not MatMul/Softmax
    assert {op for domain, op in ops if domain == "com.microsoft"} == contrib
    assert ("", "Softmax") not in ops
    x = program.example_inputs
    with torch.no_grad():  # and against the Hugging Face model itself
        ref = model(**dict(zip(program.input_names, x)))
    ref = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
    assert (compiled(*x) - ref).abs().max().item() <= 1e-4


# ---- contrib-op fusions -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_program(hf_compiled):
    return hf_compiled("bert", "eager")[1]


def test_bert_attention_fuses_into_contrib_ops(target, hf_compiled):
    _, bert_program, compiled = hf_compiled("bert", "eager")
    assert_parity(target, compiled, bert_program)
    fused = compiled.info["ort_fusions"]  # two layers: one fusion of each kind per layer
    assert fused["attention"] == 2 and fused["bias_gelu"] == 2 and fused["skip_layer_normalization"] == 4
    assert fused["attention_bias_per_head"] == 2  # the (B, 1, S, S) padding mask, one row per head for ORT 1.19
    ops = onnx_ops(compiled)
    assert ops.count(("com.microsoft", "Attention")) == 2
    assert not {("", "Softmax"), ("", "Gelu"), ("", "Transpose")} & set(ops)


def test_fuse_false_keeps_the_exported_graph(target, bert_program):
    compiled = target.compile(bert_program, fuse=False)
    assert_parity(target, compiled, bert_program)
    assert "ort_fusions" not in compiled.info
    assert not [op for domain, op in onnx_ops(compiled) if domain == "com.microsoft"]


def test_gpt2_flattened_heads_are_not_fused_with_their_projection(target, hf_compiled):
    """GPT-2's Conv1D flattens the merged heads to (B*S, D) for a 2-D Gemm: the projection-fusing MHA
    rule must not match there (its (B, S, D) output would reach the Gemm); attention still goes native."""
    _, program, compiled = hf_compiled("gpt2", "sdpa")
    assert_parity(target, compiled, program)
    fused = compiled.info["ort_fusions"]
    assert "mha2" not in fused and "attention" not in fused and fused["sdpa_via_mha"] == 2


def test_fused_graph_onnxruntime_rejects_falls_back_to_the_export(target, bert_program, monkeypatch):
    from optpipe.targets import onnxruntime_backend as backend

    fuse = backend.fuse_for_onnxruntime

    def fuse_into_an_unknown_op(model):
        counts = fuse(model)
        next(n for n in model.graph if n.op_type == "Attention").op_type = "NoSuchAttention"
        return counts

    monkeypatch.setattr(backend, "fuse_for_onnxruntime", fuse_into_an_unknown_op)
    compiled = target.compile(bert_program)
    assert compiled.info["ort_fusions"].startswith("skipped: ") and "NoSuchAttention" in compiled.info["ort_fusions"]
    assert_parity(target, compiled, bert_program)
    assert not [op for domain, op in onnx_ops(compiled) if domain == "com.microsoft"]


def test_fusion_failure_is_a_note(target, tiny, monkeypatch):
    from optpipe.targets import onnxruntime_backend as backend

    def broken(model):
        raise RuntimeError("no match today")

    monkeypatch.setattr(backend, "fuse_for_onnxruntime", broken)
    compiled = target.compile(tiny[1])
    assert compiled.info["ort_fusions"] == "skipped: RuntimeError: no match today"
    assert_parity(target, compiled, tiny[1])


# ---- optpipe ops: decomposition, native lowering, neither ---------------------------------------------


@pytest.fixture(scope="module")
def scaled(tiny):
    program = tiny[1].copy()
    n = replace_gelu(program, lambda g, x: g.call_function(scaled_gelu, (x, 2.0)))
    assert n == 2 and "optpipe.test_ort_scaled_gelu" in program.gm.code
    return program


def test_optpipe_op_lowers_through_its_decomposition(target, scaled):
    assert target.check(scaled) == []
    compiled = target.compile(scaled, fuse=False)  # the lowering itself, before contrib-op fusions
    assert_parity(target, compiled, scaled)
    ops = onnx_ops(compiled)
    assert ("", "Gelu") in ops and ("com.microsoft", "Gelu") not in ops
    assert compiled.info["optpipe_ops_decomposed"] == ["optpipe.test_ort_scaled_gelu"]
    assert compiled.info["optpipe_ops_native"] == []


def test_optpipe_op_native_lowering_replaces_the_decomposition(target, scaled):
    register_lowering(scaled_gelu, "onnxruntime", scaled_gelu_ort)
    try:
        assert target.check(scaled) == []
        compiled = target.compile(scaled, fuse=False)
    finally:
        opdef(scaled_gelu).lowerings.pop("onnxruntime")
    assert_parity(target, compiled, scaled)
    ops = onnx_ops(compiled)
    assert ops.count(("com.microsoft", "Gelu")) == 2 and ("", "Gelu") not in ops
    assert compiled.info["optpipe_ops_native"] == ["optpipe.test_ort_scaled_gelu"]


def test_op_without_lowering_is_a_capability_error(target, tiny):
    with pytest.raises(TargetError) as err:
        optimize(tiny[1], pipeline="test-ort-opaque-gelu", target="onnxruntime", diffs=False)
    msg = err.value.one_line()
    assert "cannot take 2 node(s)" in msg and "\n" not in msg
    assert "optpipe.test_ort_opaque_gelu at transformer.h.0.mlp.gelu" in msg
    assert "introduced by test-ort-opaque-gelu" in msg


class RunningMax(nn.Module):
    """cummax: an ATen op torchlib cannot translate and torch has no decomposition for."""

    def forward(self, h):
        return h - torch.cummax(h, dim=1).values


class WithRunningMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.norm = RunningMax()
        self.proj = nn.Linear(8, 8)

    def forward(self, input_ids):
        return self.proj(self.norm(self.emb(input_ids)))


def test_aten_op_the_exporter_lacks_is_named_before_export(target):
    program = capture(WithRunningMax(), (torch.randint(0, 32, (1, 8)),))
    found = target.check(program)
    assert [(u.op, u.module_path) for u in found] == [("aten.cummax", "norm")]
    with pytest.raises(TargetError, match="aten.cummax") as err:  # and through optimize: one line
        optimize(program, pipeline="cse", target="onnxruntime", diffs=False)
    assert "\n" not in err.value.one_line()


def test_export_failure_is_one_line_naming_the_node(target, scaled):
    def broken(x: TFloat, scale: float) -> TFloat:  # a lowering that raises while translating
        raise ValueError("no such kernel")

    register_lowering(scaled_gelu, "onnxruntime", broken)
    try:
        with pytest.raises(TargetError) as err:
            target.compile(scaled)
    finally:
        opdef(scaled_gelu).lowerings.pop("onnxruntime")
    msg = err.value.one_line()
    assert "\n" not in msg and "optpipe.test_ort_scaled_gelu" in msg and "transformer.h.0.mlp.gelu" in msg


@onnxscript.script(onnxscript.values.Opset("optpipe.test", 1), default_opset=op)
def scaled_gelu_unknown_to_ort(x: TFloat, scale: float) -> TFloat:
    return MSFT.NoSuchGelu(x)


def test_op_onnxruntime_has_no_kernel_for_is_one_line(target, scaled):
    register_lowering(scaled_gelu, "onnxruntime", scaled_gelu_unknown_to_ort)  # exports, but ORT lacks it
    try:
        with pytest.raises(TargetError) as err:
            target.compile(scaled)
    finally:
        opdef(scaled_gelu).lowerings.pop("onnxruntime")
    msg = err.value.one_line()
    assert "\n" not in msg and "NoSuchGelu" in msg and "transformer.h.0.mlp.gelu" in msg


# ---- the example: optimize -> OUT; then `optpipe run` on it, in a fresh process -----------------------


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """OUT written by examples/onnxruntime_target.py, and its stdout. The same optimize() call and save
    as `optpipe optimize examples/tiny_gpt.py:build --target onnxruntime -p fuse-attention,dce -o OUT`
    (the CLI's own handling of --target: tests/targets/test_tvm.py's subprocess)."""
    out = tmp_path_factory.mktemp("ort") / "OUT"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "onnxruntime_target.py"), str(out)],
        capture_output=True,
        text=True,
        cwd=out.parent,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


@pytest.fixture(scope="module")
def out(example):
    return example[0]


def test_example_script(example):
    out, stdout = example
    assert "ok=True" in stdout and "plain onnxruntime" in stdout
    assert (out / "model.onnx").exists() and (out / "model.optimized.onnx").exists()


def test_optimize_writes_the_onnx_artifacts(out):
    assert {"program.pt2", "model.onnx", "model.optimized.onnx", "target.json", "report.json"} <= set(os.listdir(out))
    saved = json.loads((out / "target.json").read_text())
    assert saved["target"] == "onnxruntime" and saved["info"]["opset"] == 20
    report = json.loads((out / "report.json").read_text())
    assert report["target_check"]["ok"] and report["target_check"]["max_abs"] <= 1e-4


def test_run_in_a_fresh_process_matches_the_model(out, tiny):
    ids = [[5, 17, 200, 3, 99, 42, 7]]
    env = dict(os.environ, PYTHONPATH="")  # no model code: OUT alone
    r = subprocess.run(
        [sys.executable, "-m", "optpipe", "run", str(out), "--input", f"input_ids={ids}", "--json"],
        capture_output=True,
        text=True,
        cwd=out.parent,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    model, _ = tiny
    with torch.no_grad():
        ref = model(torch.tensor(ids))
    assert (torch.tensor(doc["outputs"][0]) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "spec,pattern",
    [("input_ids:int64[1,2,3]", "has 3 dim(s) [1, 2, 3]; the program takes 2"), ("input_ids:int32[1,4]", "int32")],
)
def test_run_with_bad_input_is_one_line(out, spec, pattern):
    r = CliRunner().invoke(main, ["run", str(out), "--input", spec])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("optpipe: error:")]
    assert len(errors) == 1 and pattern in errors[0] and "Traceback" not in r.stderr
