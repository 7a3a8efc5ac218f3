"""dce and cse: fired (stats), IR (FileCheck), numerics, and what they must never touch."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import FileCheck, assert_close

from examples.tiny_gpt import build as build_tiny_gpt
from optpipe.capture import capture
from optpipe.registry import get_pass


def run_pass(program, name, **options):
    info = get_pass(name)
    result = info.fn(program, info.config_cls(**options))
    program.gm.recompile()
    return result


class DeadBranch(nn.Module):
    """Computes a value it never uses, from a buffer nothing else reads."""

    def __init__(self):
        super().__init__()
        self.register_buffer("unused", torch.ones(8))
        self.register_buffer("scale", torch.full((8,), 2.0))

    def forward(self, x):
        dead = (x.sin() + self.unused).exp()  # noqa: F841
        return x * self.scale


def test_dce_removes_dead_nodes_and_unread_buffers():
    model, x = DeadBranch().eval(), torch.randn(2, 8)
    program = capture(model, (x,))
    FileCheck().check("sin").check("exp").run(program.gm.code)
    result = run_pass(program, "dce")
    assert result.modified
    assert result.stats == {"removed_nodes": 4, "removed_attrs": 1}  # get_attr, sin, add, exp
    FileCheck().check_not("sin").check_not("exp").check_not("unused").run(program.gm.code)
    assert not hasattr(program.gm, "unused") and hasattr(program.gm, "scale")
    assert "unused" not in program.gm.state_dict()
    with torch.no_grad():
        assert_close(program.gm(x), model(x))
    assert not run_pass(program, "dce").modified


def test_dce_drops_causal_buffers_after_fusion_and_keeps_tied_weights():
    model, inputs = build_tiny_gpt()
    program = capture(model, inputs)
    assert run_pass(program, "fuse-attention").stats["fused"] == 2
    result = run_pass(program, "dce")
    assert result.stats["removed_attrs"] == 2  # transformer.h.{0,1}.attn.bias
    gm = program.gm
    FileCheck().check_not('").attn.bias').run(gm.code)
    assert not any(name.endswith("attn.bias") for name, _ in gm.named_buffers())
    # wte.weight is lm_head.weight under another name: still read, so it stays
    assert gm.lm_head.weight is gm.transformer.wte.weight
    with torch.no_grad():
        assert_close(gm(*inputs), model(*inputs))


def test_dce_removes_metadata_checks_of_dead_values_only():
    class DeadCast(nn.Module):
        def forward(self, x):
            x.sin().to(torch.float64)  # dead, but export guards the cast's input with a check
            return x.to(torch.float64) * 2

    check = "torch.ops.aten._assert_tensor_metadata.default("
    x = torch.randn(2, 4)
    program = capture(DeadCast(), (x,))
    assert program.gm.code.count(check) == 2
    result = run_pass(program, "dce")
    assert result.stats["removed_nodes"] == 3  # sin, its check, the cast
    # the check on the graph input stays
    FileCheck().check_count(check, 1, exactly=True).check_not("sin").run(program.gm.code)
    assert_close(program.gm(x), x.to(torch.float64) * 2)


def test_dce_without_dead_code_does_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    program = capture(model, (torch.randn(2, 8),))
    before = program.gm.code
    result = run_pass(program, "dce")
    assert not result.modified and result.stats == {"removed_nodes": 0, "removed_attrs": 0}
    assert program.gm.code == before


class Repeated(nn.Module):
    def forward(self, x):
        return x.sin() * 2 + x.sin() * 2 + (x + 1).cos()


def test_cse_merges_repeated_pure_ops():
    x = torch.randn(3, 5)
    program = capture(Repeated(), (x,))
    result = run_pass(program, "cse")
    assert result.modified and result.stats == {"eliminated": 2}  # the second sin and mul
    code = program.gm.code
    FileCheck().check_count("torch.ops.aten.sin.default", 1, exactly=True).run(code)
    FileCheck().check_count("torch.ops.aten.mul.Tensor", 1, exactly=True).run(code)
    assert_close(program.gm(x), Repeated()(x))
    assert not run_pass(program, "cse").modified


def test_cse_in_a_transformer_keeps_numerics():
    model, inputs = build_tiny_gpt()
    program = capture(model, inputs)
    run_pass(program, "cse")
    with torch.no_grad():
        assert_close(program.gm(*inputs), model(*inputs))


class RandomTwice(nn.Module):
    def forward(self, x):
        a = F.dropout(x, 0.5, training=True) + F.dropout(x, 0.5, training=True)
        return a + torch.randn_like(x) + torch.randn_like(x) + torch.rand(3, 5) + torch.rand(3, 5)


def test_cse_never_merges_random_ops():
    program = capture(RandomTwice(), (torch.randn(3, 5),))
    before = program.gm.code
    result = run_pass(program, "cse")
    assert not result.modified and result.stats == {"eliminated": 0}
    assert program.gm.code == before
    for op in ("dropout.default(", "randn_like.default(", "rand.default("):
        FileCheck().check_count(f"torch.ops.aten.{op}", 2, exactly=True).run(before)


def test_cse_distinguishes_scalar_types():
    class IntAndFloat(nn.Module):
        def forward(self, ids):
            return (ids + 1).float() + (ids + 1.0)  # int64 + 1 stays int64; + 1.0 is float

    ids = torch.arange(6)
    program = capture(IntAndFloat(), (ids,))
    assert run_pass(program, "cse").stats == {"eliminated": 0}
    assert_close(program.gm(ids), IntAndFloat()(ids))


def test_cleanup_passes_are_exact():
    assert get_pass("dce").exact and get_pass("cse").exact
