"""Targets tvm and tvm-cuda: parity with the torch program (at the example inputs and at a second
sequence length), the saved library run in a fresh process, how optpipe ops lower (decomposition,
native Relax lowering, capability error), the ONNX fallback and MetaSchedule tuning.

TVM builds cost seconds each: models are tiny (1-2 layers, hidden 32-64) and each is built once.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

pytest.importorskip("tvm")

from examples.tiny_gpt import build
from optpipe import capture
from optpipe.errors import TargetError, UsageError
from optpipe.ops import define_op, register_lowering
from optpipe.optimization import check_target, optimize
from optpipe.program import load_program
from optpipe.registry import PassResult, get_target, register_pass
from optpipe.targets import tvm_backend, tvm_build
from tests import hf_models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-4  # fp32 max-abs
# the dynamic main only, half the build: for checks of lowering and import, not of the static copy
# at the example shapes (test_untuned_build_adds_a_static_fast_path_at_the_example_shapes, the tiny GPT)
DYNAMIC = {"static": False}


# -- test-only optpipe ops, and a pass that puts them in a graph ---------------------------------


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _silu_fake(x):
    return torch.empty_like(x)


def _relax_silu(node, importer):
    from tvm import relax

    return importer.block_builder.emit(relax.op.nn.silu(importer.env[node.args[0]]))


def _broken_lowering(node, importer):
    raise RuntimeError("this lowering is broken\nsecond line of detail")


TEST_OPS = {
    "decomposed": define_op("tvm_test_silu", _silu, fake=_silu_fake, decomposition=_silu),
    "native": define_op("tvm_test_silu_native", _silu, fake=_silu_fake, decomposition=_silu),
    "opaque": define_op("tvm_test_silu_opaque", _silu, fake=_silu_fake),  # no decomposition
    "broken": define_op("tvm_test_silu_broken", _silu, fake=_silu_fake, decomposition=_silu),
}
register_lowering(TEST_OPS["native"], "tvm", _relax_silu)
register_lowering(TEST_OPS["broken"], "tvm", _broken_lowering)


@dataclass(frozen=True)
class SwapSiluConfig:
    op: str = field(default="decomposed", metadata={"help": "test op replacing aten.silu: " + ", ".join(TEST_OPS)})

    def __post_init__(self):
        if self.op not in TEST_OPS:
            raise ValueError(f"op must be one of {', '.join(TEST_OPS)}")


@register_pass("test-tvm-swap-silu", SwapSiluConfig, exact=True)
def swap_silu(program, config):
    """Replaces aten.silu with a test-only optpipe op."""
    graph, n = program.gm.graph, 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.silu.default:
            with graph.inserting_after(node):
                new = graph.call_function(TEST_OPS[config.op], node.args)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            n += 1
    program.gm.recompile()
    return PassResult(bool(n), {"rewritten": n})


class SiluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.fc1 = nn.Linear(32, 64)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(64, 32)

    def forward(self, input_ids):
        return self.fc2(self.act(self.fc1(self.emb(input_ids))))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return capture(SiluMLP().eval(), (torch.randint(0, 64, (1, 8)),))


def _assert_parity(report):
    check = report["target_check"]
    assert check["ok"] and check["max_abs"] <= TOL, check
    assert check["inputs"] == 2  # the example inputs and a second sequence length


# -- the tiny GPT: `optpipe optimize` in one process, `optpipe run` in another -------------------


def _optpipe(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "optpipe", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def gpt_out(tmp_path_factory):
    """OUT of examples/tvm_target.py (`optimize examples/tiny_gpt.py:build --target tvm --pipeline
    fuse-attention,dce`, saved and run back), its report and what the script printed: one build of the
    tiny GPT serves the example's test and the OUT's."""
    out = tmp_path_factory.mktemp("tvm") / "OUT"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "tvm_target.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=out.parent,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text()), proc.stdout


@pytest.fixture(scope="module")
def gpt_loaded(gpt_out):
    out, *_ = gpt_out
    return get_target("tvm").load(str(out), load_program(out / "program.pt2"))


def test_tiny_gpt_parity(gpt_out, gpt_loaded):
    out, report, _ = gpt_out
    _assert_parity(report)
    info = report["target_info"]
    assert info["importer"] == "torch" and info["mode"] == "untuned" and info["target"]["kind"] == "llvm"
    assert info["target"]["mcpu"] == tvm_build.host_cpu()
    assert {p.name for p in (out / "tvm").iterdir()} == {"model.so", "model.json"}
    # one library for every batch and length: the dims stay symbolic, named as the program names them
    assert gpt_loaded.fn.meta["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}]
    model, _ = build()
    ids = torch.randint(0, 256, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(gpt_loaded(ids), model(ids), atol=TOL, rtol=0)


def test_optpipe_run_in_a_fresh_process(gpt_out):
    out, *_ = gpt_out
    ids = [[5, 17, 3, 250, 42]]  # a length the model was not captured at
    result = json.loads(_optpipe("run", str(out), "--input", f"input_ids={json.dumps(ids)}", "--json"))
    with torch.no_grad():
        expected = load_program(out / "program.pt2").gm(torch.tensor(ids))
    torch.testing.assert_close(torch.tensor(result["outputs"][0]), expected, atol=TOL, rtol=0)


def test_out_of_range_token_is_clamped_not_a_crash(gpt_loaded):
    # TVM's default gather reads out of bounds on a bad id; the backend clamps instead
    out = gpt_loaded(torch.tensor([[1, 2, 10_000]]))
    assert out.shape == (1, 3, 256) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def raw_gpt():
    """nanoGPT's hand-written attention, unfused, compiled directly."""
    model, inputs = build(n_layer=1)
    program = capture(model, inputs)
    tgt = get_target("tvm")
    # the dynamic main only: its symbolic dims are the point here (the static copy: the MLP's tests)
    return tgt, program, tgt.compile(program, static=False)


def test_hand_written_attention_imports_with_symbolic_dims(raw_gpt):
    # `bias[:, :, :T, :T]` of nanoGPT's mask buffer: without the in-bounds slice the import fails
    tgt, program, compiled = raw_gpt
    assert check_target(tgt, compiled, program)["max_abs"] <= TOL
    assert compiled.fn.meta["inputs"][0]["shape"] == ["batch", "seq"]


def test_tvm_cuda_lowering_builds_with_dlight_schedules(raw_gpt):
    # no GPU needed to build: every kernel must get a GPU schedule (thread bindings), or TVM's
    # memory verification rejects it
    tgt, program, _ = raw_gpt
    executable = tvm_build.build_relax(tgt.import_program(program).mod, tvm_build.cuda_target("sm_90"))
    assert executable is not None


# -- default CPU schedules -------------------------------------------------------------------------


def _prim_funcs(mod) -> dict:
    import tvm

    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_untuned_cpu_build_parallelizes_and_vectorizes_the_hot_kernels(raw_gpt):
    # without default schedules every kernel is a serial scalar loop nest (MiniLM: 100x eager)
    tgt, program, _ = raw_gpt
    mod = tvm_build.schedule_relax(tgt.import_program(program).mod, tvm_build.cpu_target())
    funcs = _prim_funcs(mod)
    hot = {name: f for name, f in funcs.items() if "matmul" in name or "softmax" in name or "layer_norm" in name}
    assert any("matmul" in name for name in hot), sorted(funcs)
    for name, func in hot.items():
        text = func.script()
        assert func.attrs["tirx.is_scheduled"], name
        assert "T.parallel" in text and "T.vectorized" in text, (name, text)
    # fast math: no scalar libm exp/erf left in any kernel (the GELU and softmax vectorise)
    assert not [name for name, f in funcs.items() if "T.exp(" in f.script() or "T.erf(" in f.script()]


# static M and N; a ragged M (no tile height divides 7); a ragged N (50); N = 3 * 29 with a bias
# epilogue: 29-wide tiles; without one (a tied LM head): N padded to whole 64-wide tiles
@pytest.mark.parametrize(
    "rows, cols, bias", [(12, 80, True), (7, 80, True), (8, 50, True), (8, 87, True), (8, 87, False), (7, 200, False)]
)
def test_matmul_schedule_matches_numpy(rows, cols, bias):
    import numpy as np
    import tvm
    from tvm import te

    a, b, c = (
        te.placeholder((rows, 48), name="A"),
        te.placeholder((48, cols), name="B"),
        te.placeholder((cols,), name="bias"),
    )
    k = te.reduce_axis((0, 48), name="k")
    mm = te.compute((rows, cols), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="matmul")
    out = te.compute((rows, cols), lambda i, j: mm[i, j] + c[j], name="T_add") if bias else mm
    target = tvm_build.cpu_target()
    sch = tvm_build.default_matmul_schedule(te.create_prim_func([a, b, c, out] if bias else [a, b, out]), target)
    script = sch.mod.script() if sch is not None else ""
    assert "T.parallel" in script
    assert ("B_pad" in script) == (not bias), script  # padded only where no epilogue needs the columns
    lib = tvm.compile(sch.mod, target=target)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s, dtype="float32") for s in ((rows, 48), (48, cols), (cols,))][: 3 if bias else 2]
    result = tvm.runtime.tensor(np.zeros((rows, cols), "float32"))
    lib(*[tvm.runtime.tensor(x) for x in args], result)
    np.testing.assert_allclose(result.numpy(), args[0] @ args[1] + (args[2] if bias else 0), rtol=1e-5, atol=1e-5)


def test_fast_math_turns_small_integer_powers_into_products():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            cube = bb.emit(relax.op.power(x, relax.const(3.0, "float32")))
            other = bb.emit(relax.op.power(cube, relax.const(0.5, "float32")))
            out = bb.emit_output(other)
        bb.emit_func_output(out)
    text = tvm_build.fast_math_pass()(bb.get()).script()
    assert text.count("R.multiply") == 2 and text.count("R.power") == 1, text  # x**0.5 stays a power


def test_transposed_matmul_is_left_to_the_other_rules():
    # B[j, k]: vectorising j would gather; the matmul rule declines rather than schedule it badly
    from tvm import te

    a, b = te.placeholder((16, 32), name="A"), te.placeholder((64, 32), name="B")
    k = te.reduce_axis((0, 32), name="k")
    mm = te.compute((16, 64), lambda i, j: te.sum(a[i, k] * b[j, k], axis=k), name="matmul")
    assert tvm_build.default_matmul_schedule(te.create_prim_func([a, b, mm]), tvm_build.cpu_target()) is None


HF_MODELS = {"gpt2": hf_models.gpt2, "llama": hf_models.llama, "bert": hf_models.bert, "minilm": hf_models.minilm}
# the static copy at the example shapes (which doubles the build) on one HF model: BERT's padded mask;
# the others build the dynamic main only (both input sets of the parity check run it)
STATIC = {"bert": True}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_model_parity(name):
    model, inputs = HF_MODELS[name]()
    options = {"static": STATIC.get(name, False)}
    res = optimize(model, inputs, pipeline="fuse-attention,dce", target="tvm", diffs=False, target_options=options)
    assert ("main_static" in res.compiled.fn.meta["functions"]) == options["static"]
    _assert_parity(res.report)
    if "attention_mask" in inputs:  # a padded batch at another length, beyond what optimize checks
        ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
        mask = torch.ones(2, 11, dtype=torch.int64)
        mask[0, 7:] = 0
        with torch.no_grad():
            torch.testing.assert_close(res.compiled(ids, mask), res.program.gm(ids, mask), atol=TOL, rtol=0)


# -- the example ------------------------------------------------------------------------------


def test_example_script(gpt_out):
    out, _, printed = gpt_out
    assert "compiled for llvm" in printed and "reloaded" in printed
    assert (out / "tvm" / "model.so").is_file()


# -- optpipe ops ---------------------------------------------------------------------------------


def _relax_text(program) -> str:
    return get_target("tvm").import_program(program).mod.script(show_meta=False)


def test_optpipe_op_lowers_by_decomposition(mlp):
    res = optimize(mlp, pipeline="test-tvm-swap-silu{op=decomposed}", target="tvm", diffs=False, target_options=DYNAMIC)
    assert res.records[0].stats == {"rewritten": 1}
    _assert_parity(res.report)
    assert "native_lowerings" not in res.report["target_info"]
    text = _relax_text(res.program)
    assert "R.sigmoid" in text and "R.nn.silu" not in text


def test_optpipe_op_uses_its_native_tvm_lowering(mlp):
    res = optimize(mlp, pipeline="test-tvm-swap-silu{op=native}", target="tvm", diffs=False, target_options=DYNAMIC)
    _assert_parity(res.report)
    assert res.report["target_info"]["native_lowerings"] == {"tvm_test_silu_native": 1}
    text = _relax_text(res.program)
    assert "R.nn.silu" in text and "R.sigmoid" not in text


def test_optpipe_op_without_lowering_is_a_capability_error(mlp):
    with pytest.raises(
        TargetError,
        match=r"optpipe\.tvm_test_silu_opaque at act .*introduced by "
        r"test-tvm-swap-silu",
    ):
        optimize(mlp, pipeline="test-tvm-swap-silu{op=opaque}", target="tvm", diffs=False)


def test_a_failing_lowering_is_a_one_line_target_error(mlp):
    with pytest.raises(TargetError) as err:
        optimize(mlp, pipeline="test-tvm-swap-silu{op=broken}", target="tvm", diffs=False)
    assert "Relax import (torch) failed: RuntimeError: this lowering is broken" in str(err.value)
    assert "\n" not in err.value.one_line()


# -- ops the Relax torch importer lacks ----------------------------------------------------------


class Erfinv(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)

    def forward(self, input_ids):
        return torch.special.erfinv(torch.tanh(self.emb(input_ids)))


class Amax(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.lin = nn.Linear(16, 16)

    def forward(self, input_ids):
        h = self.lin(self.emb(input_ids))
        return h - h.amax(-1, keepdim=True)


def test_aten_op_tvm_lacks_is_a_capability_error():
    # neither the torch importer nor the ONNX path takes erfinv: named before any lowering
    program = capture(Erfinv().eval(), (torch.randint(0, 32, (1, 8)),))
    with pytest.raises(TargetError, match=r"cannot take 1 node\(s\): aten\.erfinv at <top>"):
        optimize(program, pipeline="dce", target="tvm", diffs=False)


def test_onnx_fallback_when_the_torch_importer_lacks_an_op():
    torch.manual_seed(0)
    program = capture(Amax().eval(), (torch.randint(0, 32, (1, 8)),))
    res = optimize(program, pipeline="dce", target="tvm", diffs=False, target_options=DYNAMIC)
    _assert_parity(res.report)
    info = res.report["target_info"]
    assert info["importer"] == "onnx" and "aten.amax" in info["importer_reason"]


# -- options and devices -------------------------------------------------------------------------


def test_bad_tune_value_is_a_usage_error(mlp):
    with pytest.raises(UsageError, match="tune must be"):
        get_target("tvm").check(mlp, tune=-3)


def test_untuned_build_adds_a_static_fast_path_at_the_example_shapes(mlp):
    # static tiles at the example shape (MiniLM b8 s128: 2.7x faster than the dynamic main)
    tgt = get_target("tvm")
    module = tgt.compile(mlp).fn
    assert module.meta["functions"] == {"main": None, "main_static": [[1, 8]]}
    other = (torch.randint(0, 64, (2, 5)),)
    assert module.function_for(mlp.example_inputs) == "main_static"
    assert module.function_for(other) == "main"
    with torch.no_grad():
        for inputs in (mlp.example_inputs, other):
            torch.testing.assert_close(module(*inputs), mlp.gm(*inputs), atol=TOL, rtol=0)
    dynamic_only = tgt.compile(mlp, static=False).fn
    assert dynamic_only.meta["functions"] == {"main": None}
    assert dynamic_only.function_for(mlp.example_inputs) == "main"


def test_tvm_thread_pool_follows_torch_unless_the_user_chose(monkeypatch):
    # TVM reads TVM_NUM_THREADS when its pool starts (its default: half the logical CPUs)
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    tvm_build.load_tvm()
    assert os.environ["TVM_NUM_THREADS"] == str(torch.get_num_threads())
    monkeypatch.setenv("TVM_NUM_THREADS", "7")
    tvm_build.load_tvm()
    assert os.environ["TVM_NUM_THREADS"] == "7"


@pytest.mark.skipif(tvm_backend.metaschedule_blocker() is None, reason="MetaSchedule works here")
def test_tuning_refused_clearly_when_metaschedule_cannot_run(mlp):
    with pytest.raises(TargetError, match="cannot tune: .*save_json") as err:
        optimize(mlp, pipeline="dce", target="tvm", diffs=False, target_options={"tune": 4})
    assert "apache-tvm-ffi" in err.value.hint


@pytest.mark.skipif(
    tvm_backend.metaschedule_blocker() is not None,
    reason=f"MetaSchedule cannot run here: {tvm_backend.metaschedule_blocker()}",
)
def test_tuning_specializes_tunes_and_saves_the_database(mlp, tmp_path):
    # a few trials on the MLP's two matmuls: seconds, not minutes
    res = optimize(mlp, pipeline="dce", target="tvm", diffs=False, target_options={"tune": 4})
    _assert_parity(res.report)  # the example shape runs main_static, the other length main
    info = res.report["target_info"]
    assert info["mode"].startswith("tuned") and info["tuning"]["trials"] >= 1
    assert info["tuning"]["specialized"] and info["tuning"]["shapes"] == [[1, 8]]
    module = res.compiled.fn
    assert module.function_for(mlp.example_inputs) == "main_static"
    assert module.function_for((torch.zeros(1, 5, dtype=torch.int64),)) == "main"
    res.save(tmp_path / "OUT")
    tuning = tmp_path / "OUT" / "tvm" / "tuning"
    saved = {p.name for p in tuning.iterdir()}
    assert {"database_workload.json", "database_tuning_record.json", "summary.json"} <= saved
    assert json.loads((tmp_path / "OUT" / "tvm" / "model.json").read_text())["functions"]["main_static"] == [[1, 8]]


def test_tvm_cuda_without_a_gpu_is_a_clear_error(mlp):
    import tvm

    if tvm.runtime.enabled("cuda") and tvm.cuda(0).exist:
        pytest.skip("checks the no-GPU error")
    with pytest.raises(UsageError, match=r"no CUDA device.*tvm\.cuda\(\)\.exist"):
        optimize(mlp, pipeline="dce", target="tvm-cuda", diffs=False)
