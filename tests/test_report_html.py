"""OUT/report.html: self-contained, with the passes table, verification numbers and per-pass diffs."""

import torch
import torch.nn as nn

from optpipe import capture
from optpipe.graph_diff import diff_programs
from optpipe.graph_toolkit import module_path
from optpipe.report import render_report_html

aten = torch.ops.aten


def relu_to_gelu_diff():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = capture(model, (torch.randn(2, 4),))
    after = before.copy()
    graph = after.gm.graph
    relu = next(n for n in graph.nodes if n.target is aten.relu.default)
    assert module_path(relu) == "1"
    with graph.inserting_after(relu):
        gelu = graph.call_function(aten.gelu.default, relu.args)
    gelu.meta = dict(relu.meta)
    relu.replace_all_uses_with(gelu)
    graph.erase_node(relu)
    after.gm.recompile()
    return before, diff_programs(before, after)


def make_report(passes):
    return {
        "optpipe_version": "0.1.0",
        "pipeline": "swap-act,dce",
        "target": "cpu",
        "model": {
            "params_before": 58,
            "params_after": 58,
            "flops_before": 160,
            "flops_after": 160,
            "output": "tensor",
            "class": "torch.nn.modules.container.Sequential",
        },
        "passes": passes,
        "target_check": {"ok": True, "max_abs": 0.0},
    }


PASSES = [
    {
        "name": "swap-act",
        "pipeline": "swap-act{to=gelu}",
        "config": {"to": "gelu"},
        "exact": False,
        "modified": True,
        "stats": {"rewritten": 1},
        "seconds": 0.0123,
        "verify": {"max_abs": 0.0123, "sqnr_db": 31.25, "cosine": 0.99991, "top1_agreement": 0.975, "ok": True},
    },
    {
        "name": "dce",
        "config": {},
        "exact": True,
        "modified": False,
        "stats": {"removed": 0},
        "seconds": 0.001,
        "verify": {"max_abs": None, "sqnr_db": None, "cosine": None, "top1_agreement": None, "ok": None},
    },
]


def test_report_is_self_contained_with_passes_verification_and_drawings():
    _, d = relu_to_gelu_diff()
    page = render_report_html(make_report(PASSES), [d, None])
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "http" not in page and "<script" not in page and "<link" not in page and "<img" not in page
    assert "<svg" in page and "</svg>" in page
    # header, passes table, verification numbers
    for text in (
        "Sequential",
        "swap-act,dce",
        "swap-act{to=gelu}",
        "rewritten=1",
        "lossy",
        "exact",
        "31.2",
        "0.999910",
        "97.5%",
        "0.0123",
        "dce",
    ):
        assert text in page, text
    # the pass's diff: module path and the ops it swapped, as a table and as text
    assert "-relu +gelu" in page and "left the graph unchanged" in page


def test_values_may_be_missing_and_all_text_is_escaped():
    passes = [
        {
            "name": "<b>evil</b>",
            "config": {"x": "<i>"},
            "exact": None,
            "modified": None,
            "stats": None,
            "seconds": None,
            "verify": None,
        }
    ]
    report = {
        "pipeline": "<b>evil</b>",
        "target": None,
        "model": {"params_before": None, "params_after": None, "flops_before": None, "flops_after": None},
        "passes": passes,
        "target_check": None,
    }
    page = render_report_html(report, [])
    assert "<b>evil</b>" not in page and "&lt;b&gt;evil&lt;/b&gt;" in page and "<i>" not in page
    assert "No diff recorded" in page


def test_unchanged_diff_and_no_passes():
    before, _ = relu_to_gelu_diff()
    page = render_report_html(make_report(PASSES[:1]), [diff_programs(before, before.copy())])
    assert "No changes to the graph" in page
    page = render_report_html(make_report([]), [])
    assert "No passes ran" in page and "http" not in page


def test_companion_target_checks_get_their_own_rows():
    """An encoder-decoder's encoder is checked on the target beside the step: one row each, the
    page still named after the model."""
    report = make_report([])
    report["target_check"] = {"ok": True, "max_abs": 1e-7, "companions": {"encoder": {"ok": True, "max_abs": 2e-7}}}
    page = render_report_html(report, [])
    assert "<h1>optpipe report: Sequential</h1>" in page
    assert "target check (encoder)" in page and "max_abs=2e-07" in page
    assert "companions=" not in page
