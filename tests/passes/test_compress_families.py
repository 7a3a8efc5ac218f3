"""quantize and prune across transformers families (issue 16): the shapes the per-family tests miss.

quantize: ALBERT's `embedding_hidden_mapping_in` feeds q, k and v (a rewritten linear read by
other rewritten linears), for every scheme; Falcon's `x @ W.T` linears (matmul on a transposed
stored weight); the size guard: a weight another reader keeps in fp32 (a tied LM head whose
embedding stays fp32) or too small to gain is skipped, with the reason, never quantized into a
bigger model. prune (structured, MLP): Phi-3's fused `gate_up_proj` + `chunk`, Falcon's MLP and
Mixtral's experts stacked in [E, N, K] weights, each exact when the pruned channels are dead. Both
passes report every site they leave, as {"site", "reason"} in details["skipped"], and say so in
details["notes"] when they find nothing.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import FileCheck, assert_close

from optpipe.capture import capture
from optpipe.passes import prune as _prune  # noqa: F401  (registers the `prune` pass)
from optpipe.passes import quantize as _quantize  # noqa: F401  (registers the `quantize` pass)
from tests import hf_zoo
from tests.passes.test_prune import first, rewrite
from tests.passes.test_quantize import sqnr

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

OP_CALL = {
    "int8-dynamic": "torch.ops.optpipe.linear_int8_dynamic.default(",
    "int8-static": "torch.ops.optpipe.linear_int8_static.default(",
    "int8-weight": "torch.ops.optpipe.linear_int8_weight.default(",
    "int4-weight": "torch.ops.optpipe.linear_int4_weight.default(",
}


@functools.cache
def captured(arch: str):
    model, inputs = hf_zoo.build(arch)
    return capture(model, inputs)


def skipped(result) -> dict[str, str]:
    return {d["site"]: d["reason"] for d in result.details["skipped"]}


# -- quantize ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scheme, min_db", [("int8-dynamic", 35), ("int8-static", 30), ("int8-weight", 35), ("int4-weight", 18)]
)
def test_albert_chained_linears_every_scheme(scheme, min_db):
    """embedding_hidden_mapping_in's output is the input of layer 0's q, k and v: once it is rewritten
    their calls must read the new node (not the erased linear)."""
    program = captured("albert")
    group = ",group=32" if scheme == "int4-weight" else ""
    out, result = rewrite(program, f"quantize{{scheme={scheme}{group}}}")
    assert result.modified and result.stats["quantized"] == 14  # mapping_in + 2 layers x 6 (shared) + pooler
    assert result.stats["bytes_after"] * 2 < result.stats["bytes_before"]
    FileCheck().check(OP_CALL[scheme]).check_not("aten.linear.default(").run(out.gm.code)
    assert sqnr(first(program.run()), first(out.run())) > min_db


def test_albert_shared_layers_share_one_fused_copy():
    """ALBERT runs one layer's weights twice: the stacked q/k/v int8 weights are made once."""
    out, result = rewrite(captured("albert"), "quantize{scheme=int8-dynamic}")
    _, plain = rewrite(captured("albert"), "quantize{scheme=int8-weight}")
    assert result.stats["fused"] == 6
    assert len([n for n, _ in out.gm.named_buffers() if n.endswith("fused_weight_int8")]) == 1
    assert result.stats["bytes_after"] == plain.stats["bytes_after"]


def test_falcon_matmul_with_transposed_weight_is_a_linear():
    """FalconLinear computes x @ W.T: every one is quantized; the tied LM head is skipped while the
    embedding stays fp32 (an int8 copy would only add bytes) and shares the embedding's int8 table
    with embeddings=true."""
    program = captured("falcon")
    out, result = rewrite(program, "quantize")
    assert result.stats["quantized"] == 8  # 2 x (query_key_value, dense, dense_h_to_4h, dense_4h_to_h)
    FileCheck().check_count(OP_CALL["int8-dynamic"], 6, exactly=True).check_not("numpy_T").run(out.gm.code)
    assert "weight shared with transformer.word_embeddings, which stays fp32" in skipped(result)["lm_head"]
    assert result.stats["bytes_after"] * 2.5 < result.stats["bytes_before"]
    assert sqnr(first(program.run()), first(out.run())) > 30

    both, result = rewrite(program, "quantize{embeddings=true}")
    assert result.stats["quantized"] == 10 and result.details["skipped"] == []
    assert result.stats["bytes_after"] * 3 < result.stats["bytes_before"]
    assert sqnr(first(program.run()), first(both.run())) > 30


class _SharedAndTiny(torch.nn.Module):
    """A weight also read by a non-linear op, a 1-input linear (scales outweigh the int8 savings)
    and one plain linear."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(16, 16)
        self.tiny = torch.nn.Linear(1, 16)
        self.plain = torch.nn.Linear(16, 16)

    def forward(self, x):
        y = self.shared(x) + self.shared.weight.mean() + self.tiny(x[..., :1])
        return self.plain(y)


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-static"])
def test_quantize_never_makes_the_model_bigger(scheme):
    torch.manual_seed(0)
    program = capture(_SharedAndTiny().eval(), (torch.randn(2, 5, 16),))
    out, result = rewrite(program, f"quantize{{scheme={scheme}}}")
    assert result.stats["quantized"] == 1 and result.stats["bytes_after"] < result.stats["bytes_before"]
    reasons = skipped(result)
    assert "weight also read by mean" in reasons["shared"] and "an int8 copy would add" in reasons["shared"]
    assert "would not be smaller than the fp32 weight" in reasons["tiny"]
    FileCheck().check_count("aten.linear.default(", 2, exactly=True).check(OP_CALL[scheme]).run(out.gm.code)
    assert sqnr(first(program.run()), first(out.run())) > 30


def test_quantize_notes_when_there_is_no_site():
    program = capture(torch.nn.LayerNorm(8).eval(), (torch.randn(2, 8),))
    same, result = rewrite(program, "quantize")
    assert not result.modified and result.details["skipped"] == []
    assert any(n.startswith("no site found") for n in result.details["notes"])
    assert same.gm.code == program.gm.code


# -- prune ------------------------------------------------------------------------------------------------------
ALBERT = "encoder.albert_layer_groups.0.albert_layers.0"
DEAD = slice(1, None, 4)  # a quarter of the MLP channels, zeroed at the output projection
OUTPUT_PROJECTIONS = ("mlp.down_proj.weight", "dense_4h_to_h.weight", "experts.down_proj", "ffn_output.weight")


def _dead_mlp_channels(arch: str):
    """The family's model with a quarter of its MLP channels dead (zero output-projection columns):
    they score 0, are the ones a 25% prune removes, and removing them changes nothing."""
    model, inputs = hf_zoo.build(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(OUTPUT_PROJECTIONS):
                p[..., DEAD] = 0
    return capture(model, inputs)


PRUNE_CASES = {
    # Phi-3: gate and up are the two halves of one gate_up_proj, split by chunk(2, -1)
    "phi3": (64, "aten.chunk", {"model.layers.0.mlp.gate_up_proj.weight": (192, 64)}),
    # Falcon: x @ W.T linears
    "falcon": (128, "aten.matmul", {"transformer.h.1.mlp.dense_4h_to_h.weight": (64, 192)}),
    # Mixtral: 4 experts stacked in [E, N, K] weights, the same channel slots removed from each
    "mixtral": (
        64,
        "aten.chunk",
        {"model.layers.0.mlp.experts.gate_up_proj": (4, 192, 64), "model.layers.1.mlp.experts.down_proj": (4, 64, 96)},
    ),
    # ALBERT: both layers run one shared set of weights, pruned once for both
    "albert": (32, "aten.linear", {f"{ALBERT}.ffn.weight": (96, 64), f"{ALBERT}.ffn_output.weight": (64, 96)}),
}


@pytest.mark.parametrize("arch", list(PRUNE_CASES))
def test_structured_mlp_prune_across_families(arch):
    channels, op, weights = PRUNE_CASES[arch]
    program = _dead_mlp_channels(arch)
    out, result = rewrite(program, "prune{target=mlp,sparsity=0.25}")
    assert result.modified and result.stats["pruned_channels"] == channels
    assert result.details["skipped"] == [] and result.details["notes"] == []
    params = dict(out.gm.named_parameters())
    assert {name: tuple(params[name].shape) for name in weights} == weights
    FileCheck().check(op).run(out.gm.code)
    assert_close(first(out.run()), first(program.run()), atol=1e-5, rtol=1e-5)
    if arch == "albert":
        (entry,) = [d for d in result.details["modules"] if d["action"] == "pruned"]
        assert len(entry["shared_with"]) == 1


class _FusedUpShared(torch.nn.Module):
    """gate/up as halves of one linear, but the up half is also read outside the MLP."""

    def __init__(self):
        super().__init__()
        self.gate_up = torch.nn.Linear(8, 32, bias=False)
        self.down = torch.nn.Linear(16, 8, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up) + up.sum(-1, keepdim=True)


class _StackedExperts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = torch.nn.Parameter(torch.randn(2, 8, 8))

    def forward(self, x):
        return (x @ self.experts.transpose(-1, -2)).sum(0)


def test_prune_reports_what_it_cannot_do():
    program = capture(_FusedUpShared().eval(), (torch.randn(2, 3, 8),))
    same, result = rewrite(program, "prune{target=mlp,sparsity=0.25}")
    assert not result.modified and same.gm.code == program.gm.code
    assert "also read outside the MLP" in skipped(result)["down"]
    assert any(n.startswith("nothing pruned") for n in result.details["notes"])

    experts = capture(_StackedExperts().eval(), (torch.randn(3, 8),))
    _, result = rewrite(experts, "prune{method=magnitude}")
    assert not result.modified
    assert any("stacked MoE experts" in d["reason"] for d in result.details["skipped"])

    _, result = rewrite(capture(torch.nn.LayerNorm(8).eval(), (torch.randn(2, 8),)), "prune")
    assert not result.modified and any(n.startswith("no site found") for n in result.details["notes"])
