"""Pass order: what passes declare they need, give and take, and the orders refused because of it
(optpipe.registry.PassOrder, optpipe.pipeline.order_problem / Pipeline.check_order)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from click.testing import CliRunner

import optpipe
import tests.toy_passes  # noqa: F401  (test-add-noise, test-broken-exact: passes that declare no order)
from optpipe.cli import main
from optpipe.errors import UsageError
from optpipe.pipeline import Pipeline, order_problem, program_capabilities
from optpipe.registry import PassResult, get_pass, register_pass

Q = "quantize{scheme=int8-dynamic}"
P = "prune{target=mlp,sparsity=0.25}"
SW = "attention{kind=sliding-window,window=8}"
CANONICAL = f"fuse-attention,{SW},{P},{Q},kv-cache"

# (pipeline, the pass refused, the pass it is refused against, a word of the reason)
ILLEGAL = [
    (f"fuse-attention,{Q},{P}", "prune", "quantize", "float-linears"),
    (f"fuse-attention,{Q},prune{{target=heads}}", "prune", "quantize", "float-linears"),
    ("attention{kind=linear}", "attention", "fuse-attention", "sdpa-sites"),
    (f"{SW},fuse-attention", "attention", "fuse-attention", "sdpa-sites"),
    ("kv-cache", "kv-cache", "fuse-attention", "sdpa-sites"),
    (f"{Q},kv-cache", "kv-cache", "fuse-attention", "sdpa-sites"),
    (f"fuse-attention,kv-cache,{SW}", "attention", "kv-cache", "sdpa-sites"),
    ("fuse-attention,kv-cache,fuse-attention", "fuse-attention", "kv-cache", "cached step attention"),
    (f"{P},fuse-attention", "fuse-attention", "prune", "attention heads"),
    (f"fuse-attention,partition{{stages=2}},{Q}", "quantize", "partition", "must run last"),
    ("fuse-attention,partition{stages=2},kv-cache", "kv-cache", "partition", "must run last"),
    ("fuse-attention,partition{strategy=tensor,ways=2},fuse-attention", "fuse-attention", "partition", "last"),
]

LEGAL = [
    CANONICAL,
    "fuse-attention,dce,cse",
    f"fuse-attention,{SW},attention{{kind=linear}},dce",  # a second kind on the sites the first refused
    f"fuse-attention,kv-cache,{Q}",  # int8-dynamic is exact per token: either order (test_kv_cache_families)
    f"fuse-attention,{Q},{SW}",  # attention rewrites SDPA nodes, not linears
    f"{Q},quantize{{scheme=int8-weight}}",  # mixed schemes: the second takes what the first skipped
    f"{P},{Q}",
    "fuse-attention,kv-cache,partition{stages=2},dce,cse",
    "fuse-attention,kv-cache,kv-cache",  # a cached program is left alone (test_kv_cache)
    f"fuse-attention,{P},partition{{strategy=tensor,ways=2}}",
]


@pytest.mark.parametrize("text,refused,other,why", ILLEGAL, ids=[case[0] for case in ILLEGAL])
def test_illegal_order_is_refused_in_one_line_naming_both_passes(text, refused, other, why):
    problem = order_problem(text)
    assert problem and "\n" not in problem and why in problem
    assert problem.startswith(f"{refused} ") and f" {other}" in problem
    with pytest.raises(UsageError) as raised:
        Pipeline.parse(text).check_order()
    assert raised.value.message == problem and other in raised.value.hint and refused in raised.value.hint


def test_prune_after_quantize_names_the_reason_and_the_fix():
    with pytest.raises(UsageError) as raised:
        Pipeline.parse(f"fuse-attention,{Q},{P}").check_order()
    assert raised.value.one_line() == (
        "prune cannot follow quantize: quantize takes away the float linear weights (float-linears) that "
        "prune needs (hint: put prune before quantize)"
    )


@pytest.mark.parametrize("text", LEGAL)
def test_legal_orders_are_accepted(text):
    assert order_problem(text) is None
    Pipeline.parse(text).check_order()
    Pipeline.parse(text).check_own_order()


def test_order_problem_takes_specs_and_pipelines_and_parses_text():
    pipe = Pipeline.parse(f"fuse-attention,{Q},{P}")
    assert order_problem(pipe) == order_problem(pipe.specs) == order_problem(str(pipe))
    with pytest.raises(UsageError, match="unknown pass"):
        order_problem("fuse-attention,no-such-pass")


def test_history_counts_what_earlier_passes_gave_and_took():
    assert order_problem("attention{kind=linear}", history=["fuse-attention", "dce"]) is None
    assert order_problem("kv-cache", history=["fuse-attention", SW]) is None
    problem = order_problem(P, history=["fuse-attention", Q])
    assert problem.startswith("prune cannot follow quantize (in the program history)")
    with pytest.raises(UsageError) as raised:
        Pipeline.parse(P).check_order(["fuse-attention", Q])
    assert raised.value.hint.startswith("start from the program before quantize")
    problem = order_problem("dce,quantize", history=["fuse-attention", "partition{stages=2}"])
    assert problem.startswith("quantize cannot follow partition (in the program history)")
    assert order_problem("dce,cse", history=["partition{stages=2}"]) is None
    # a history entry from a plugin that is not installed here declared nothing we know of
    assert order_problem("attention", history=["fuse-attention", "some-plugin{x=1}"]) is None


def test_passes_that_declare_nothing_run_anywhere():
    assert get_pass("test-add-noise").order == get_pass("test-broken-exact").order
    text = f"test-add-noise,fuse-attention,test-add-noise,{SW},test-broken-exact,{P},test-add-noise,{Q},test-add-noise"
    assert order_problem(text) is None
    # they neither give nor take: the declared passes around them are still checked
    assert order_problem(f"fuse-attention,{Q},test-add-noise,{P}").startswith("prune cannot follow quantize")


def test_register_pass_checks_the_declarations():
    from tests.toy_passes import NoOptions

    def noop(program, config):
        return PassResult(False)

    with pytest.raises(TypeError, match="cannot also be last"):
        register_pass("test-order-both", NoOptions, exact=True, last=True, cleanup=True)(noop)
    with pytest.raises(TypeError, match="must be names"):
        register_pass("test-order-bad", NoOptions, exact=True, needs=(1,))(noop)
    register_pass("test-order-gives", NoOptions, exact=True, gives="my-capability")(noop)
    register_pass("test-order-needs", NoOptions, exact=True, needs=("my-capability",))(noop)
    assert get_pass("test-order-gives").order.gives == ("my-capability",)
    assert order_problem("test-order-gives,test-order-needs") is None
    problem = order_problem("test-order-needs")
    assert problem == (
        "test-order-needs needs the my-capability (my-capability), which no pass before it gives: "
        "run test-order-gives before test-order-needs"
    )


# -- at run time: the program's own graph and history ---------------------------------------------------
@functools.cache
def _captured(flash: bool = False):
    from examples import tiny_gpt

    model, inputs = (tiny_gpt.build_flash if flash else tiny_gpt.build)(n_layer=1)
    return optpipe.capture(model, inputs)


def test_run_refuses_before_any_pass_runs():
    program = _captured()
    ran = []
    with pytest.raises(UsageError, match="prune cannot follow quantize"):
        Pipeline.parse(f"fuse-attention,{Q},{P}").run(program, verify=False, on_pass=lambda i, s: ran.append(s))
    assert ran == [] and program.history == []


def test_a_model_with_its_own_sdpa_needs_no_fuse_attention():
    """`F.scaled_dot_product_attention` in the model: the captured graph already has the sites (how
    examples/heal.py's models are swapped); hand-written attention has none."""
    assert "sdpa-sites" in program_capabilities(_captured(flash=True))
    assert "sdpa-sites" not in program_capabilities(_captured())
    swapped, records = Pipeline.parse(SW).run(_captured(flash=True), verify=False)
    assert records[0].modified and "optpipe.sparse_attention" in swapped.gm.code
    with pytest.raises(UsageError, match="attention needs the canonical SDPA attention sites"):
        Pipeline.parse(SW).run(_captured(), verify=False)
    # the static check cannot see the model: it refuses what only some models allow
    assert order_problem(SW) is not None


def test_the_canonical_order_runs(tmp_path):
    program, records = Pipeline.parse(CANONICAL).run(_captured(), verify=False)
    assert [r.name for r in records] == ["fuse-attention", "attention", "prune", "quantize", "kv-cache"]
    assert all(r.modified for r in records) and program.meta["kv_cache"]


def test_history_of_a_loaded_out_is_respected(tmp_path):
    fused, _ = Pipeline.parse("fuse-attention").run(_captured(), verify=False)
    (tmp_path / "OUT").mkdir()
    fused.save(str(tmp_path / "OUT" / "program.pt2"))
    loaded = optpipe.load(str(tmp_path / "OUT"))
    assert loaded.history == ["fuse-attention"]
    swapped, records = Pipeline.parse(SW).run(loaded, verify=False)
    assert records[0].modified
    with pytest.raises(UsageError, match="prune cannot follow quantize"):
        Pipeline.parse(P).run(Pipeline.parse(Q).run(loaded, verify=False)[0], verify=False)


# -- the CLI -------------------------------------------------------------------------------------------
def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_optimize_refuses_an_illegal_order_with_exit_2(tmp_path):
    from examples import tiny_gpt

    model = f"{tiny_gpt.__file__}:build"
    r = cli("optimize", model, "--pipeline", f"fuse-attention,{Q},{P}", "-o", tmp_path / "OUT")
    assert r.exit_code == 2
    errors = [line for line in r.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and "prune cannot follow quantize" in errors[0] and "put prune before quantize" in errors[0]
    assert not (tmp_path / "OUT").exists()


def test_cli_passes_shows_the_order():
    r = cli("passes", "prune")
    assert r.exit_code == 0 and "order:" in r.output
    assert "needs    float-linears" in r.output and "after    fuse-attention" in r.output
    order = json.loads(cli("passes", "kv-cache", "--json").stdout)["order"]
    assert order["needs"] == ["sdpa-sites"] and order["takes"] == ["sdpa-sites"] and not order["last"]
    assert json.loads(cli("passes", "partition", "--json").stdout)["order"]["last"] is True
    assert json.loads(cli("passes", "dce", "--json").stdout)["order"]["cleanup"] is True
    assert "may run anywhere" in cli("passes", "test-add-noise").output


def test_optimize_api_refuses_before_capture():
    """The pipeline's own order is checked before the model is captured (a module that cannot be)."""

    class Uncapturable(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("captured")

    with pytest.raises(UsageError, match="prune cannot follow quantize"):
        optpipe.optimize(Uncapturable(), (torch.zeros(1),), pipeline=f"{Q},{P}")
