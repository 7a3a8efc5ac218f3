"""prune: structured (heads and MLP channels physically removed) and unstructured (magnitude, wanda,
2:4) pruning.

Structured, on the tiny nanoGPT (fused qkv + split), HF GPT-2 (Conv1D addmm), BERT and Llama (GQA,
gated MLP): fired (stats), IR (FileCheck on the rewritten size constants), exactness when the pruned
units are dead, parameter counts, gradients, `skip` bit-identical, activation-aware ranking from
calibration data, save/load, the CLI, the real MiniLM's sentence embeddings. Unstructured: exactly
the claimed zeros per layer / per row / per group of four, graph unchanged. Negative cases: bad
options are one-line errors, a program without a prunable site is unmodified.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import FileCheck, assert_close

import optpipe
from optpipe.calibration import with_calibration
from optpipe.capture import capture
from optpipe.pipeline import Pipeline
from optpipe.pipeline_text import parse_pipeline
from optpipe.weight_sites import WeightSite, linear_shape, logical_weight, weight_site
from tests import hf_models

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tiny_gpt():
    from examples.tiny_gpt import build

    model, inputs = build()
    return model, inputs


def _model(name: str):
    return _tiny_gpt() if name == "tiny_gpt" else getattr(hf_models, name)()


@functools.cache
def fused(name: str):
    """The model captured and run through fuse-attention (what prune expects)."""
    model, inputs = _model(name)
    program = capture(model, inputs)
    program, _ = Pipeline.parse("fuse-attention").run(program, verify=False)
    return program


def rewrite(program, element: str):
    spec = parse_pipeline(element)[0]
    program = program.copy()
    result = spec.info.fn(program, spec.config)
    program.gm.graph.lint()
    program.gm.recompile()
    return program, result


def first(out):
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out[0] if isinstance(out, (tuple, list)) else out


def weight(program, name: str) -> torch.Tensor:
    return dict(program.gm.named_parameters())[name]


# -- structured ---------------------------------------------------------------------------------------------
STRUCTURED = {
    # name: (heads removed, channels removed, IR checks, weight shapes after 50% of everything)
    "tiny_gpt": (
        4,
        256,
        ["aten.split.Tensor(linear, 32, 2)", "sym_size_int_5, 2, 16]", "sym_size_int_5, 32]"],
        {
            "transformer.h.0.attn.c_attn.weight": (96, 64),
            "transformer.h.0.attn.c_proj.weight": (64, 32),
            "transformer.h.0.mlp.c_fc.weight": (128, 64),
            "transformer.h.0.mlp.c_proj.weight": (64, 128),
        },
    ),
    "gpt2": (
        4,
        256,
        ["sym_size_int_13, 96]", "aten.split.Tensor(view_2, 32, 2)", "[-1, 32]", "[-1, 128]"],
        {
            "transformer.h.0.attn.c_attn.weight": (64, 96),
            "transformer.h.0.attn.c_proj.weight": (32, 64),
            "transformer.h.0.mlp.c_fc.weight": (64, 128),
            "transformer.h.0.mlp.c_proj.weight": (128, 64),
        },
    ),
    "bert": (
        4,
        128,
        ["aten.linear.default(reshape"],
        {
            "encoder.layer.0.attention.self.query.weight": (32, 64),
            "encoder.layer.0.attention.output.dense.weight": (64, 32),
            "encoder.layer.0.intermediate.dense.weight": (64, 64),
            "encoder.layer.0.output.dense.weight": (64, 64),
        },
    ),
    # GQA: 4 query heads share 2 K/V heads; a unit is one K/V head with its 2 query heads
    "llama": (
        4,
        128,
        ["enable_gqa = True"],
        {
            "model.layers.0.self_attn.q_proj.weight": (32, 64),
            "model.layers.0.self_attn.k_proj.weight": (16, 64),
            "model.layers.0.self_attn.v_proj.weight": (16, 64),
            "model.layers.0.self_attn.o_proj.weight": (64, 32),
            "model.layers.0.mlp.gate_proj.weight": (64, 64),
            "model.layers.0.mlp.up_proj.weight": (64, 64),
            "model.layers.0.mlp.down_proj.weight": (64, 64),
        },
    ),
}


@pytest.mark.parametrize("name", list(STRUCTURED))
def test_structured_removes_heads_and_channels(name):
    heads, channels, checks, shapes = STRUCTURED[name]
    program = fused(name)
    pruned, result = rewrite(program, "prune{sparsity=0.5}")
    assert result.modified
    assert result.stats["pruned_heads"] == heads and result.stats["pruned_channels"] == channels
    assert result.stats["refused"] == 0 and result.stats["groups"] == 4
    assert result.stats["params_after"] == sum(p.numel() for p in pruned.gm.parameters())
    assert (
        result.stats["params_after"] < result.stats["params_before"] == sum(p.numel() for p in program.gm.parameters())
    )
    code = pruned.gm.code
    FileCheck().check_count("torch.ops.aten.scaled_dot_product_attention.default(", 2, exactly=True).run(code)
    for check in checks:
        FileCheck().check(check).run(code)
    for param, shape in shapes.items():
        assert tuple(weight(pruned, param).shape) == shape, param
    out = first(pruned.run())
    assert out.shape == first(program.run()).shape and torch.isfinite(out).all()
    ids = program.example_inputs[0]
    longer = tuple(torch.cat([x, x[:, :5]], 1) for x in program.example_inputs)  # another length
    assert first(pruned.gm(*longer)).shape[:2] == (ids.shape[0], ids.shape[1] + 5)
    heads_entry = next(d for d in result.details["modules"] if d["kind"] == "heads")
    assert (
        len(heads_entry["scores"]) == heads_entry["units"] and len(heads_entry["removed"]) == heads_entry["units"] // 2
    )
    mlp_entry = next(d for d in result.details["modules"] if d["kind"] == "mlp")
    assert set(mlp_entry["scores"]) >= {"min", "median", "max"} and mlp_entry["importance"] == "magnitude"


def _dead_units(name: str):
    """The model with half its heads (K/V groups for Llama) and half its MLP channels zeroed at
    their output projection: they contribute nothing, score 0, and are the ones pruned."""
    model, inputs = _model(name)
    with torch.no_grad():
        if name == "gpt2":  # Conv1D weights are [in, out]
            for block in model.transformer.h:
                block.attn.c_proj.weight[0:16] = 0  # head 0
                block.attn.c_proj.weight[32:48] = 0  # head 2
                block.mlp.c_proj.weight[::2] = 0
        else:
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[:, 32:64] = 0  # K/V group 1 = query heads 2, 3
                layer.mlp.down_proj.weight[:, 1::2] = 0
    return model, inputs


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_structured_is_exact_when_pruned_units_are_dead(name):
    model, inputs = _dead_units(name)
    program = capture(model, inputs)
    program, _ = Pipeline.parse("fuse-attention").run(program, verify=False)
    pruned, result = rewrite(program, "prune{sparsity=0.5}")
    removed = {d["module_path"]: d["removed"] for d in result.details["modules"] if d["kind"] == "heads"}
    assert all(r == ([0, 2] if name == "gpt2" else [1]) for r in removed.values()), removed
    assert_close(first(pruned.run()), first(program.run()), atol=1e-5, rtol=1e-5)


def test_sparsity_zero_is_exact_and_unmodified():
    program = fused("gpt2")
    same, result = rewrite(program, "prune{sparsity=0}")
    assert not result.modified and result.stats["groups"] == 4
    assert result.stats["pruned_heads"] == result.stats["pruned_channels"] == 0
    assert same.gm.code == program.gm.code
    assert torch.equal(first(same.run()), first(program.run()))


def test_target_selects_heads_or_mlp():
    program = fused("bert")
    _, heads = rewrite(program, "prune{target=heads,sparsity=0.5}")
    _, mlp = rewrite(program, "prune{target=mlp,sparsity=0.25}")
    assert heads.stats["pruned_heads"] == 4 and heads.stats["pruned_channels"] == 0
    assert mlp.stats["pruned_heads"] == 0 and mlp.stats["pruned_channels"] == 2 * 32


def test_pruned_program_trains():
    program = fused("tiny_gpt")
    pruned, _ = rewrite(program, "prune{sparsity=0.5}")
    gm = pruned.gm.train()
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    ids = pruned.example_inputs[0]
    losses = []
    for _ in range(3):
        logits = first(gm(ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)
    assert losses[-1] < losses[0]


def test_skip_leaves_named_modules_bit_identical():
    program = fused("bert")
    pruned, result = rewrite(program, "prune{sparsity=0.5,skip=[encoder.layer.0.*]}")
    assert result.stats["pruned_heads"] == 2 and result.stats["pruned_channels"] == 64
    skipped = [d for d in result.details["modules"] if d["action"] == "skipped"]
    assert {d["module_path"] for d in skipped} == {"encoder.layer.0.attention.self", "encoder.layer.0"}
    assert all(d["reason"] == "skip=encoder.layer.0.*" for d in skipped)
    original, kept = dict(program.gm.named_parameters()), dict(pruned.gm.named_parameters())
    layer0 = [n for n in original if n.startswith("encoder.layer.0.")]
    assert layer0 and all(kept[n] is original[n] for n in layer0)
    FileCheck().check("aten.view.default(linear, [sym_size_int_9, sym_size_int_12, -1, 16])").run(pruned.gm.code)


def test_activation_importance_from_calibration():
    program = fused("bert").copy()
    gen = torch.Generator().manual_seed(5)
    ids, mask = program.example_inputs
    with_calibration(program, [(torch.randint(0, hf_models.VOCAB, ids.shape, generator=gen), mask) for _ in range(2)])
    _, result = rewrite(program, "prune{target=mlp,sparsity=0.5}")  # auto: calibration attached
    entries = [d for d in result.details["modules"] if d["kind"] == "mlp"]
    assert all(d["importance"] == "activation" for d in entries) and result.stats["pruned_channels"] == 128
    _, by_weight = rewrite(program, "prune{target=mlp,sparsity=0.5,importance=magnitude}")
    assert {d["importance"] for d in by_weight.details["modules"]} == {"magnitude"}


# -- unstructured --------------------------------------------------------------------------------------------
def _linears(program):
    out = {}
    for node in program.gm.graph.nodes:
        site = weight_site(program.gm, node)
        if isinstance(site, WeightSite) and site.kind == "linear":
            w = logical_weight(program.gm, site)
            assert tuple(w.shape) == linear_shape(program.gm, site)
            out[site.path] = w
    return out


@pytest.mark.parametrize("method, sparsity", [("magnitude", 0.3), ("wanda", 0.5)])
def test_unstructured_zeros_exactly_as_claimed(method, sparsity):
    program = fused("llama")
    pruned, result = rewrite(program, f"prune{{method={method},sparsity={sparsity}}}")
    assert result.modified and result.stats["pruned"] == 15  # 2 x (q, k, v, o, gate, up, down) + lm_head
    assert pruned.gm.code == program.gm.code  # graph unchanged, only weights
    for path, w in _linears(pruned).items():
        if method == "magnitude":  # per layer
            assert int((w == 0).sum()) == round(sparsity * w.numel()), path
        else:  # per output row
            assert ((w == 0).sum(1) == round(sparsity * w.shape[1])).all(), path
    assert result.stats["params_after"] == result.stats["params_before"]
    assert result.stats["weights_zeroed"] == sum(int((w == 0).sum()) for w in _linears(pruned).values())
    out = first(pruned.run())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_two_four_keeps_two_of_every_four(importance):
    program = fused("bert")
    pruned, result = rewrite(program, f"prune{{method=2:4,importance={importance}}}")
    assert result.stats["pruned"] == 12
    for path, w in _linears(pruned).items():
        zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
        assert (zeros >= 2).all(), path
    assert {d["score"] for d in result.details["modules"]} == {"wanda" if importance == "activation" else "magnitude"}


def test_unstructured_skips_tied_weights_and_skip_globs():
    program = fused("gpt2")
    pruned, result = rewrite(program, "prune{method=magnitude,sparsity=0.5,skip=[*.mlp.*]}")
    reasons = {d["module_path"]: d.get("reason") for d in result.details["modules"] if d["action"] == "skipped"}
    assert reasons["lm_head"] == "weight tied to another module"
    assert reasons["transformer.h.0.mlp.c_fc"] == "skip=*.mlp.*"
    original, kept = dict(program.gm.named_parameters()), dict(pruned.gm.named_parameters())
    assert kept["transformer.h.1.mlp.c_proj.weight"] is original["transformer.h.1.mlp.c_proj.weight"]
    assert result.stats["pruned"] == 4


# -- negative cases ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "element, message",
    [
        ("prune{method=random}", "expected one of"),
        ("prune{sparsity=1.5}", "sparsity must be in [0, 1)"),
        ("prune{method=2:4,sparsity=0.3}", "2:4 always removes half"),
        ("prune{method=magnitude,target=heads}", "for method=structured only"),
        ("prune{modules=[]}", "modules is empty"),
    ],
)
def test_bad_options_are_one_line_errors(element, message):
    with pytest.raises(Exception) as info:
        parse_pipeline(element)
    assert message in str(info.value) and "\n" not in str(info.value).strip().splitlines()[0]


def test_pipeline_text_round_trips():
    for text in ("prune{method=2:4,importance=activation}", "prune{target=mlp,sparsity=0.25,skip=[lm_head]}"):
        spec = parse_pipeline(text)[0]
        assert str(spec) == text and parse_pipeline(str(spec))[0].config == spec.config


def test_no_prunable_site_is_unmodified():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).eval()
    program = capture(model, (torch.randn(2, 8),))
    same, result = rewrite(program, "prune")
    assert not result.modified and result.stats["groups"] == 0 and same.gm.code == program.gm.code


def test_budget_stops_a_pass_that_loses_too_much():
    from optpipe.errors import VerificationError

    program = fused("bert")
    with pytest.raises(VerificationError, match="over budget"):
        optpipe.optimize(program, pipeline="prune{sparsity=0.5,min-sqnr=90}", target="cpu", diffs=False)


# -- save / load, CLI, real weights ---------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    program = fused("llama")
    pruned, result = rewrite(program, "prune{sparsity=0.5}")
    path = tmp_path / "program.pt2"
    pruned.save(path)
    loaded = optpipe.load_program(path)
    assert sum(p.numel() for p in loaded.gm.parameters()) == result.stats["params_after"]
    ids = torch.randint(0, hf_models.VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    assert_close(first(loaded.gm(ids)), first(pruned.gm(ids)))
    assert_close(first(torch.export.load(str(path)).module()(ids)), first(pruned.gm(ids)))


def test_cli_optimize(tmp_path):
    out = tmp_path / "OUT"
    pipeline = "fuse-attention,prune{method=structured,target=mlp,sparsity=0.25}"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "optpipe",
            "optimize",
            "examples/tiny_gpt.py:build",
            "--target",
            "cpu",
            "--mode",
            "eager",
            "--pipeline",
            pipeline,
            "-o",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    record = next(p for p in report["passes"] if p["name"] == "prune")
    assert record["modified"] and record["stats"]["pruned_channels"] == 2 * 64
    assert record["verify"]["ok"] and record["verify"]["cosine"] is not None
    assert report["model"]["params_after"] < report["model"]["params_before"]
    assert (out / "program.pt2").exists()


def test_minilm_structured_mlp_keeps_sentence_embeddings():
    """The real all-MiniLM-L6-v2, a quarter of every MLP removed (by activation importance on the
    sentences themselves): 6 x 384 channels and their weights gone, embeddings still close."""
    model, inputs = hf_models.minilm()
    program = capture(model, inputs)
    program, _ = Pipeline.parse("fuse-attention").run(program, verify=False)
    pruned, result = rewrite(program, "prune{target=mlp,sparsity=0.25,importance=activation}")
    assert result.stats["pruned_channels"] == 6 * 384
    assert result.stats["params_before"] - result.stats["params_after"] == 6 * 384 * (384 + 1 + 384)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    def embed(p):
        hidden = first(p.gm(ids, mask))
        w = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * w).sum(1) / w.sum(1)

    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(embed(program), embed(pruned), dim=-1)
    print(
        f"MiniLM 25% MLP pruned: params {result.stats['params_before']} -> {result.stats['params_after']}, "
        f"sentence-embedding cosine mean {cosine.mean():.4f} min {cosine.min():.4f}"
    )
    assert cosine.min() > 0.92, cosine  # bias compensation: 0.91 -> 0.95 mean
