"""Semantic graph diff keyed by module path: empty for equal programs, exactly the rewritten modules
for a manual rewrite and for fuse-attention, programs with different parameter sets, HTML page."""

import json
from unittest import mock

import pytest
import torch
import torch.nn as nn

from optpipe import capture, graph_svg
from optpipe.graph_diff import diff_programs
from optpipe.graph_svg import GraphPicture, layered_svg, render_svg
from optpipe.graph_toolkit import module_path
from tests.fixtures.tiny_models import TinyGPT, ids

aten = torch.ops.aten


class Block(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(2 * dim, dim)
        self.register_buffer("gain", torch.full((dim,), 0.5))

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x))) * self.gain


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.fixture
def program():
    torch.manual_seed(0)
    return capture(Stack(), (torch.randn(2, 4, 8),))


def replace_op(program, path, old, new):
    """relu -> gelu (or any unary op) in the nodes of one module path."""
    graph = program.gm.graph
    for node in list(graph.nodes):
        if node.target is old and module_path(node) == path:
            with graph.inserting_after(node):
                repl = graph.call_function(new, node.args, node.kwargs)
            repl.meta = dict(node.meta)
            node.replace_all_uses_with(repl)
            graph.erase_node(node)
    program.gm.recompile()
    return program


def test_program_against_itself_is_empty(program):
    for other in (program, program.copy()):
        d = diff_programs(program, other)
        assert d.empty and d.modules == [] and d.regions == []
        assert d.to_text() == "graph diff: no changes"
        assert d.to_dict()["modules"] == [] and d.to_dict()["empty"] is True


def test_manual_rewrite_shows_exactly_that_module(program):
    after = replace_op(program.copy(), "blocks.1.act", aten.relu.default, aten.gelu.default)
    d = diff_programs(program, after)
    assert [m.path for m in d.modules] == ["blocks.1.act"]
    (m,) = d.modules
    assert m.status == "rewritten"
    assert m.removed == {"aten.relu": 1} and m.added == {"aten.gelu": 1}
    assert m.params == (0, 0) and m.flops == (0, 0)
    assert m.changed_nodes["removed"] == ["relu_1"] and len(m.changed_nodes["added"]) == 1
    assert d.totals["nodes"][0] == d.totals["nodes"][1]
    text = d.to_text()
    assert "blocks.1.act" in text and "-relu +gelu" in text and "blocks.0" not in text
    assert json.loads(json.dumps(d.to_dict()))["modules"][0]["added"] == {"aten.gelu": 1}


def test_unchanged_nodes_between_two_rewrites_are_not_flagged(program):
    after = program.copy()
    for path in ("blocks.0.act", "blocks.2.act"):
        replace_op(after, path, aten.relu.default, aten.gelu.default)
    d = diff_programs(program, after)
    assert [m.path for m in d.modules] == ["blocks.0.act", "blocks.2.act"]
    changed = [n for m in d.modules for n in m.changed_nodes["removed"] + m.changed_nodes["added"]]
    assert len(changed) == 4  # the two relus and the two gelus, nothing of blocks.1 in between
    # the same rewrite in another layer is drawn once and listed
    assert len(d.regions) == 1 and d.regions[0].same_rewrite_in == ["blocks.2.act"]


def test_rewired_module_with_the_same_ops(program):
    after = program.copy()
    graph = after.gm.graph
    # fc2(relu(fc1(x))) -> fc2(fc1(x)) with the relu kept alive elsewhere: same ops, other wiring
    relu = next(n for n in graph.nodes if n.target is aten.relu.default and module_path(n) == "blocks.0.act")
    (fc2,) = list(relu.users)
    fc2.replace_input_with(relu, relu.args[0])
    out = next(n for n in graph.nodes if n.op == "output")
    graph.erase_node(relu)
    with graph.inserting_before(out):
        keep = graph.call_function(aten.relu.default, (relu.args[0],))
    keep.meta = dict(relu.meta)
    after.gm.recompile()
    d = diff_programs(program, after)
    statuses = {m.path: m.status for m in d.modules}
    assert statuses == {"blocks.0.act": "rewired"}
    assert "rewired" in d.to_text()


def test_fuse_attention_rewrites_each_attention_module():
    registry = pytest.importorskip("optpipe.registry")
    pytest.importorskip("optpipe.passes.fuse_attention")
    before = capture(TinyGPT(), (ids(),))
    after = before.copy()
    info = registry.get_pass("fuse-attention")
    assert info.fn(after, info.config_cls()).stats["fused"] == 2
    d = diff_programs(before, after)
    assert [m.path for m in d.modules] == ["h.0.attn", "h.1.attn"]
    for m in d.modules:
        assert m.status == "rewritten"
        assert m.added == {"aten.scaled_dot_product_attention": 1}
        assert m.removed["aten.matmul"] == 2 and m.removed["aten.softmax"] == 1
        assert m.flops[0] == m.flops[1]  # SDPA counts exactly the two matmuls it replaced
    assert "-matmul×2" in d.to_text() and "+scaled_dot_product_attention" in d.to_text()


def test_programs_with_different_parameter_sets(program):
    after = program.copy()
    graph = after.gm.graph
    # drop blocks.2's gain buffer: x * gain -> x * 0.5
    gain = next(n for n in graph.nodes if n.op == "get_attr" and n.target == "blocks.2.gain")
    for user in list(gain.users):
        user.replace_input_with(gain, 0.5)
    graph.erase_node(gain)
    delattr(getattr(after.gm.blocks, "2"), "gain")
    after.gm.recompile()
    assert after.num_params() == program.num_params() - 8
    d = diff_programs(program, after)
    rows = {m.path: m for m in d.modules}
    assert rows["blocks.2"].params == (8, 0)
    assert d.totals["params"] == (program.num_params(), program.num_params() - 8)


def test_html_is_self_contained_with_a_drawing(program):
    after = replace_op(program.copy(), "blocks.1.act", aten.relu.default, aten.gelu.default)
    d = diff_programs(program, after)
    with mock.patch.object(graph_svg.shutil, "which", return_value=None):  # our own layout
        page = d.to_html()
    for html in [page] + ([d.to_html()] if graph_svg.shutil.which("dot") else []):
        assert html.startswith("<!DOCTYPE html>") and "<svg" in html and "</svg>" in html
        assert "http" not in html and "<script" not in html and "<link" not in html
        assert "blocks.1.act" in html and "gelu" in html and "relu" in html
    assert page.count("<svg") == 2  # before and after


def test_layered_svg_layout():
    pic = GraphPicture(
        nodes=[
            ("x", "x", "input", "input"),
            ("w", "fc.weight", "parameter", "input"),
            ("mm", "matmul", "", "removed"),
            ("sm", "softmax", "", "removed"),
            ("out", "view", "view_3", "context"),
        ],
        edges=[("x", "mm"), ("w", "mm"), ("mm", "sm"), ("sm", "out")],
    )
    svg = layered_svg(pic, "t")
    assert svg.startswith("<svg") and svg.count("<rect") == 5 and svg.count("<path") == 4 + 1
    assert 'marker-end="url(#t-arrow)"' in svg
    # x feeds both the first and the last op: that long edge gets a lane through the rows between
    pic.edges.append(("x", "out"))
    svg = layered_svg(pic, "t")
    assert svg.count("<rect") == 5 and " L" in svg
    assert render_svg(GraphPicture()) == '<p class="muted">(nothing)</p>'


def test_optpipe_diff_api_survives_importing_the_module(program):
    import optpipe

    assert callable(optpipe.diff) and not isinstance(optpipe.diff, type(json))
    d = optpipe.diff(program, program.copy())
    assert d["empty"] is True and d["modules"] == []
