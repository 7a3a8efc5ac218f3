"""Static cost analysis: FLOPs against hand-computed values and torch's FlopCounterMode, activation
bytes, parameters and op counts per module path, roll-up to parents."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from optpipe import capture
from optpipe.analysis import analyze, format_count, format_percent, op_name, parent_paths
from tests.fixtures.tiny_models import TinyGPT, ids


class Mlp(nn.Module):
    def __init__(self, dim=8, hidden=16, out=4):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = Mlp()
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.head(self.mlp(x))


class Attention(nn.Module):
    """Grouped-query attention through F.scaled_dot_product_attention."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return y.transpose(1, 2).reshape(b, t, -1)


class Projection(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return x @ self.w


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x)


def test_mlp_flops_params_and_attribution():
    model = Net()
    program = capture(model, (torch.randn(3, 8),))
    costs = analyze(program)
    fc1, fc2, head = 2 * 3 * 8 * 16, 2 * 3 * 16 * 4, 2 * 3 * 4 * 2
    assert costs.flops == fc1 + fc2 + head
    assert costs.modules["mlp.fc1"].flops == fc1
    assert costs.modules["mlp.fc2"].flops == fc2
    assert costs.modules["head"].flops == head
    assert costs.modules["mlp.act"].flops == 0
    # roll-up: a parent's totals are its sub-modules' sums; the root is the program
    assert costs.modules["mlp"].total_flops == fc1 + fc2
    assert costs.modules[""].total_flops == costs.flops
    assert costs.params == sum(p.numel() for p in model.parameters()) == program.num_params()
    assert costs.modules["mlp.fc1"].params == 8 * 16 + 16
    assert costs.modules["mlp"].total_params == sum(p.numel() for p in model.mlp.parameters())
    assert costs.modules["head"].params == 4 * 2
    assert costs.ops["aten.linear"] == 3 and costs.ops["aten.relu"] == 1
    assert dict(costs.modules["mlp.act"].ops) == {"aten.relu": 1}
    assert costs.modules["mlp.act"].activation_bytes == 3 * 16 * 4  # relu's float32 output
    assert costs.shapes_from == "meta"
    json.dumps(costs.to_dict(include_nodes=True))


def test_symbolic_dims_are_evaluated_at_the_example_shapes():
    # batch 1 is widened to 2 for tracing; the counts must use the example's own sizes
    program = capture(Mlp(), (torch.randn(1, 5, 8),))
    assert program.dynamic_shapes and program.dynamic_shapes[0]
    assert analyze(program).flops == 2 * 5 * 8 * 16 + 2 * 5 * 16 * 4


def test_sdpa_with_grouped_query_attention():
    b, t, heads, head_dim = 2, 6, 4, 8
    program = capture(Attention(), (torch.randn(b, t, 32),))
    costs = analyze(program)
    # q @ kᵀ and p @ v over the query heads (K/V broadcast to them)
    sdpa = 2 * (2 * b * heads * t * t * head_dim)
    q, kv = 2 * b * t * 32 * 32, 2 * b * t * 32 * 32
    assert costs.modules[""].flops == sdpa
    assert costs.modules["q"].flops == q and costs.modules["kv"].flops == kv
    assert costs.flops == sdpa + q + kv
    assert costs.ops["aten.scaled_dot_product_attention"] == 1


def test_matmul_and_conv():
    program = capture(Projection(), (torch.randn(2, 3, 8),))
    assert analyze(program).flops == 2 * 2 * 3 * 8 * 6
    program = capture(ConvNet(), (torch.randn(1, 3, 10, 10),))
    costs = analyze(program)
    assert costs.flops == 2 * (8 * 8) * 8 * 3 * (3 * 3)  # 2 · output pixels · c_out · c_in · kernel
    assert costs.modules["conv"].params == 8 * 3 * 9 + 8


def test_matches_flop_counter_on_a_real_run():
    program = capture(TinyGPT(), (ids(),))
    with FlopCounterMode(display=False) as counter:
        program.run()
    costs = analyze(program)
    assert costs.flops == counter.get_total_flops() > 0
    assert costs.modules["h.0.attn"].total_flops == costs.modules["h.1.attn"].total_flops > 0
    assert costs.modules["h"].total_flops == sum(costs.modules[f"h.{i}"].total_flops for i in range(2))
    # tied embedding / head weight counted once
    assert costs.params == program.num_params()
    assert costs.uncounted_ops == []


def test_nodes_without_meta_are_shape_propagated_on_fake_tensors():
    program = capture(TinyGPT(), (ids(),))
    expected = analyze(program)
    stripped = program.copy()
    for node in stripped.gm.graph.nodes:
        node.meta.pop("val", None)
    costs = analyze(stripped)
    assert costs.shapes_from == "meta+fake"
    assert (costs.flops, costs.activation_bytes) == (expected.flops, expected.activation_bytes)


@torch.library.custom_op("optpipe_test_analysis::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _(x):
    return torch.empty_like(x)


class UsesCustomOp(nn.Module):
    def forward(self, x):
        return torch.ops.optpipe_test_analysis.double(x)


def test_custom_op_without_formula_is_reported_then_counted_once_registered():
    from torch.utils import flop_counter

    program = capture(UsesCustomOp(), (torch.randn(4, 4),))
    op = torch.ops.optpipe_test_analysis.double
    if op not in flop_counter.flop_registry:
        costs = analyze(program)
        assert costs.uncounted_ops == ["optpipe_test_analysis.double"] and costs.flops == 0
        flop_counter.register_flop_formula(op)(lambda x_shape, out_shape=None, **kw: x_shape[0] * x_shape[1])
    costs = analyze(program)
    assert costs.flops == 16 and costs.uncounted_ops == []


def test_names_and_formatting():
    assert op_name(torch.ops.aten.matmul.default) == "aten.matmul"
    assert op_name(torch.ops.aten.add.Tensor) == "aten.add"
    import operator

    assert op_name(operator.getitem) == "getitem"
    assert parent_paths("transformer.h.0.attn") == ["transformer.h.0", "transformer.h", "transformer", ""]
    assert parent_paths("") == []
    assert format_count(1_234_567) == "1.23M" and format_count(999) == "999"
    assert format_count(2048, "B") == "2.0 KiB"
    assert format_percent(100, 97) == "-3.0%" and format_percent(0, 5) == "new"
    assert format_percent(7, 7) == "±0%"


@pytest.mark.parametrize("seq", [4, 9])
def test_counts_scale_with_the_example_sequence_length(seq):
    program = capture(TinyGPT(), (ids(seq=seq),))
    with FlopCounterMode(display=False) as counter:
        program.run()
    assert analyze(program).flops == counter.get_total_flops()
