"""optpipe ops: one definition (eager, fake, autograd, decomposition, FLOPs) and per-target lowerings."""

import torch
import torch.nn as nn
from torch.testing import FileCheck

from optpipe import capture
from optpipe.ops import can_lower, decompositions, define_op, is_optpipe_op, lowerings_for, opdef, register_lowering
from optpipe.pipeline import INTRODUCED_BY
from optpipe.target import unsupported_nodes


def _impl(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.relu(x) * alpha


def _fake(x, alpha):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.alpha = inputs[1]


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * (x > 0) * ctx.alpha, None


def _decomposition(x, alpha):
    return torch.ops.aten.mul.Tensor(torch.ops.aten.relu.default(x), alpha)


scaled_relu = define_op(
    "test_scaled_relu",
    _impl,
    fake=_fake,
    decomposition=_decomposition,
    backward=_backward,
    setup_context=_setup,
    flops=lambda *a, **k: 7,
)


def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


no_decomposition = define_op("test_opaque", _opaque, fake=lambda x: torch.empty_like(x))


class UsesOp(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.op = op

    def forward(self, x):
        return self.op(self.lin(x), 2.0) if self.op is scaled_relu else self.op(self.lin(x))


def test_op_is_one_node_runs_and_trains():
    m = UsesOp(scaled_relu)
    prog = capture(m, (torch.randn(2, 3, 4),))
    FileCheck().check_count("torch.ops.optpipe.test_scaled_relu.default", 1, exactly=True).run(prog.gm.code)
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(prog.gm(x), torch.relu(m.lin(x)) * 2)
    prog.gm(x).sum().backward()
    expected = nn.Linear(4, 4)
    expected.load_state_dict(m.lin.state_dict())
    (torch.relu(expected(x)) * 2).sum().backward()
    torch.testing.assert_close(prog.gm.lin.weight.grad, expected.weight.grad)


def test_decomposition_table_lowers_to_aten():
    prog = capture(UsesOp(scaled_relu), (torch.randn(2, 3, 4),))
    ep = prog.export().run_decompositions(decompositions())
    code = ep.graph_module.code
    FileCheck().check("aten.relu").check("aten.mul").check_not("optpipe").run(code)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(ep.module()(x), prog.gm(x))


def test_flops_and_registry():
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        scaled_relu(torch.randn(3), 1.0)
    assert counter.get_total_flops() == 7
    assert is_optpipe_op(scaled_relu) and opdef(scaled_relu).name == "test_scaled_relu"
    assert scaled_relu in decompositions() and scaled_relu not in decompositions(exclude=[scaled_relu])


def test_capability_uses_lowerings_and_decompositions():
    register_lowering(no_decomposition, "test-native-target", "native-thing")
    assert lowerings_for("test-native-target") == {no_decomposition: "native-thing"}
    assert can_lower("any-target", scaled_relu)  # by decomposition
    assert can_lower("test-native-target", no_decomposition) and not can_lower("other", no_decomposition)

    prog = capture(UsesOp(no_decomposition), (torch.randn(2, 3, 4),))
    node = next(n for n in prog.gm.graph.nodes if n.target is no_decomposition)
    node.meta["custom"] = {INTRODUCED_BY: "some-pass"}
    (bad,) = unsupported_nodes(prog, "other", supports=lambda op: True)
    assert bad.op == "optpipe.test_opaque" and bad.introduced_by == "some-pass" and bad.module_path == ""
    assert "introduced by some-pass" in str(bad)
    assert unsupported_nodes(prog, "test-native-target", supports=lambda op: True) == []
