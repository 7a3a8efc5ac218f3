"""optpipe.graph_toolkit: module paths (export's empty-stack marker is never one), new nodes placed
like the node they stand for with a fake value, tensor attributes under fresh names."""

import torch
import torch.nn as nn

from optpipe import capture
from optpipe.graph_toolkit import (
    EMPTY_STACK_MARK,
    ROOT,
    add_tensor,
    get_attribute,
    insert_call,
    insert_get_attr,
    module_path,
    module_type_name,
    value,
)

aten = torch.ops.aten


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return self.block(x) * 2


def _program():
    return capture(Net(), (torch.randn(2, 8),))


def _node(gm, target):
    return next(n for n in gm.graph.nodes if n.target is target)


def test_module_path_skips_exports_empty_stack_marker():
    gm = _program().gm
    relu = _node(gm, aten.relu.default)
    assert module_path(relu) == "block" and module_type_name(relu).endswith("Block")
    assert module_path(_node(gm, aten.mul.Tensor)) == ROOT
    relu.meta["nn_module_stack"] = {
        **relu.meta["nn_module_stack"],
        "marker": (EMPTY_STACK_MARK, EMPTY_STACK_MARK),
    }
    assert module_path(relu) == "block"  # the marker, innermost here, is not a path
    relu.meta["nn_module_stack"] = {"marker": (EMPTY_STACK_MARK, EMPTY_STACK_MARK)}
    assert module_path(relu) == ROOT and module_type_name(relu) == ""


def test_insert_call_is_placed_like_its_node_with_a_fake_value():
    gm = _program().gm
    relu = _node(gm, aten.relu.default)
    with gm.graph.inserting_after(relu):
        neg = insert_call(gm.graph, aten.neg.default, (relu,), like=relu)
    assert module_path(neg) == "block" and neg.meta["stack_trace"] == relu.meta["stack_trace"]
    assert value(neg).shape == value(relu).shape and value(neg) is not value(relu)
    with gm.graph.inserting_after(neg):
        named = insert_call(gm.graph, aten.neg.default, (neg,), like=relu, val=None, name="negated")
    assert named.name == "negated" and "val" not in named.meta


def test_add_tensor_takes_a_fresh_name_and_get_attr_a_static_fake_value():
    gm = _program().gm
    relu = _node(gm, aten.relu.default)
    first = add_tensor(gm, "block", "scale", torch.ones(8))
    second = add_tensor(gm, "block", "scale", torch.zeros(3), parameter=True)
    assert (first, second) == ("block.scale", "block.scale_1")
    assert isinstance(get_attribute(gm, second), nn.Parameter)
    assert add_tensor(gm, "no.such.module", "scale", torch.ones(1)) == "no_such_module_scale"
    with gm.graph.inserting_before(relu):
        node = insert_get_attr(gm, second, like=relu)
    assert node.op == "get_attr" and module_path(node) == "block"
    assert tuple(value(node).shape) == (3,) and value(node).fake_mode is value(relu).fake_mode
