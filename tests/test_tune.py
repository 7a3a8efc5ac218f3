"""`optpipe tune`: the budget and the space, the search on a tiny byte-level GPT judged on Python's
own documentation, the recommendation (never slower than the baseline, never outside the budget),
seeds, and the outputs (trials.jsonl, best.toml that
`optimize --recipe` reproduces, best/, report.html).

The searches here replace the latency measurement by a deterministic cost model (`measure=`), so
that what is asserted does not depend on this machine's load; quality is measured for real. The
study side (time budget, a killed run resumed, healing) is tests/test_tune_study.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from optpipe.cli import main
from optpipe.errors import UsageError
from optpipe.runtime.tuning import TuneSettings, static_rule_out
from optpipe.runtime.tuning_report import hypervolume, pareto_front
from optpipe.runtime.tuning_space import (
    QualityBudget,
    SearchSpace,
    StaticCost,
    parse_duration,
    pipeline_of,
    rule_out,
    rule_out_static,
)
from tests.tune_helpers import MODEL, lines, model_cost, run


# -- the budget and the space ------------------------------------------------------------------------
def test_budget_parses_and_judges():
    b = QualityBudget.parse(["ppl=+3%", "top1=0.9"])
    assert (b.ppl, b.top1, b.cosine) == (0.03, 0.9, None)
    base = {"ppl": 10.0, "top1_agreement": 1.0}
    assert b.slack({"ppl": 10.2, "top1_agreement": 0.95}, base) <= 0
    assert b.violations({"ppl": 10.5, "top1_agreement": 0.95}, base) == [
        "ppl 10.5 (+5.00%) is outside the budget ppl=+3%"
    ]
    for bad in ("ppl", "speed=2", "cosine=1.5", "ppl=-3%", "top1=x"):
        with pytest.raises(UsageError):
            QualityBudget.parse(bad)


def test_budget_names_a_metric_the_model_has():
    with pytest.raises(UsageError, match="has no perplexity"):
        QualityBudget.parse("ppl=+3%").slack({"cosine": 0.99}, {"cosine": 1.0})


def test_pipeline_order_and_rule_out():
    c = {"attention": "sliding-window", "window": 64, "layers": "1:-1", "prune": 0.25, "quantize": "int8-dynamic"}
    assert pipeline_of(c) == (
        "fuse-attention,attention{kind=sliding-window,window=64,layers=1:-1},"
        "prune{target=mlp,sparsity=0.25},quantize{scheme=int8-dynamic},dce"
    )
    assert pipeline_of({"attention": "dense", "prune": 0.0, "quantize": "none"}) == "dce"
    space, notes = rule_out(
        SearchSpace(attention=("dense", "sliding-window", "linear"), window=(16, 64)),
        seq_len=32,
        target="cpu",
        break_even={"linear": 512, "sliding-window": 16},
    )
    assert space.attention == ("dense", "sliding-window") and space.window == (16,)
    assert {(n["dimension"], n["value"]) for n in notes} == {("attention", "linear"), ("window", 64)}
    # on another target the CPU break-even says nothing
    space, _ = rule_out(
        SearchSpace(attention=("linear",)), seq_len=32, target="onnxruntime", break_even={"linear": 512}
    )
    assert space.attention == ("linear",)


def test_rule_out_static_keeps_what_can_pay_off():
    space = SearchSpace(attention=("dense", "sliding-window", "linear", "block-sparse"), window=(16, 64), block=(8,))
    base = StaticCost(flops=1000, params=50, attention_flops=400)
    costs = {16: StaticCost(700, 50), 64: StaticCost(990, 50), "linear": StaticCost(1100, 50)}

    def cost_of(choice):
        return costs.get(choice.get("window", choice["attention"]))  # block-sparse: not modelled (None)

    left, notes = rule_out_static(space, objective="latency", baseline=base, cost_of=cost_of, shape="b1 x 32")
    assert left.attention == ("dense", "sliding-window", "block-sparse") and left.window == (16,)
    assert {(n["dimension"], n["value"]) for n in notes} == {("window", 64), ("attention", "linear")}
    assert "0.990x the baseline's FLOPs at b1 x 32 (attention is 40.0% of them)" in notes[0]["reason"]
    # size: only what shrinks the parameters; the mode never does
    left, notes = rule_out_static(
        dataclasses.replace(space, mode=("eager", "compile")),
        objective="size",
        baseline=base,
        cost_of=cost_of,
        shape="b1 x 32",
    )
    assert left.attention == ("dense", "block-sparse") and left.mode == ("eager",)
    assert ("mode", "compile") in {(n["dimension"], n["value"]) for n in notes}


def test_static_model_on_a_real_program_at_the_users_length():
    """The tiny GPT at context 256: attention is a large share at 256 tokens, a small one at 16; a
    window that covers the sequence computes dense attention's FLOPs."""
    from examples.heal import build
    from optpipe.capture import capture

    program = capture(*build(context=256, layers=2, width=32, heads=2))
    space = SearchSpace(attention=("dense", "sliding-window", "linear"), window=(32, 256))
    settings = TuneSettings(budget=QualityBudget(ppl=0.05), seq_len=256)
    left, notes = static_rule_out(program, space, settings)
    assert left.attention == ("dense", "sliding-window", "linear") and left.window == (32,)
    assert [(n["dimension"], n["value"]) for n in notes] == [("window", 256)]
    assert "at batch 1 x seq-len 256" in notes[0]["reason"]
    settings.seq_len = 16
    left, notes = static_rule_out(program, space, settings)
    assert left.attention == ("dense",) and {n["value"] for n in notes} == {32, 256, "linear"}


def test_space_file(tmp_path):
    f = tmp_path / "space.toml"
    f.write_text('attention = ["dense"]\nprune = [0.0, 0.5]\nquantize = "int8-dynamic"\n')
    space = SearchSpace.from_toml(f, "cpu")
    assert space.prune == (0.0, 0.5) and space.quantize == ("int8-dynamic",) and space.mode == ("eager", "compile")
    assert space.size() == 2 * 1 * 2
    f.write_text('attention = ["sparse"]\n')
    with pytest.raises(UsageError, match="attention = 'sparse' is not one of"):
        SearchSpace.from_toml(f, "cpu")
    f.write_text("speed = [1]\n")
    with pytest.raises(UsageError, match="unknown dimension 'speed'"):
        SearchSpace.from_toml(f, "cpu")
    assert parse_duration("20m") == 1200 and parse_duration("90") == 90
    with pytest.raises(UsageError):
        parse_duration("soon")


def test_pareto_front_and_hypervolume():
    pts = [
        {"trial": 0, "objective": 1.0, "quality_loss": 0.5},
        {"trial": 1, "objective": 2.0, "quality_loss": 0.1},
        {"trial": 2, "objective": 2.5, "quality_loss": 0.4},  # dominated by 1
    ]
    assert [r["trial"] for r in pareto_front(pts)] == [0, 1]
    # the union of [1,3]x[0.5,1] and [2,3]x[0.1,1]
    assert hypervolume([(1.0, 0.5), (2.0, 0.1), (2.5, 0.4)], (3.0, 1.0)) == pytest.approx(2 * 0.5 + 1 * 0.4)


# -- the search ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def searched(pydoc_text, tune_program, tmp_path_factory):
    """One search of 3 trials, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("searched") / "t"
    return run(pydoc_text, out, program=tune_program, trials=3, seed=7), out


def test_tune_recommends_within_budget_and_writes_outputs(searched, tmp_path):
    res, out = searched
    records = lines(out / "trials.jsonl")
    assert records[0]["trial"] == "baseline" and records[0]["pipeline"] == "dce"
    measured = records[1:]
    assert len(measured) == 3 and len({r["key"] for r in records}) == len(records)  # nothing measured twice
    for r in measured:
        assert r["status"] == "ok" and r["quality"]["ppl"] > 1 and 0 <= r["quality"]["top1_agreement"] <= 1
        assert r["within_budget"] == (r["quality"]["ppl"] <= records[0]["quality"]["ppl"] * 1.05)
    best = res.best
    assert best["trial"] != "baseline" and best["within_budget"]
    assert best["objective"] == min(r["objective"] for r in measured if r["within_budget"])
    # best.toml reproduces best/ exactly
    recipe = (out / "best.toml").read_text()
    assert f'pipeline = "{best["pipeline"]}"' in recipe and 'mode = "eager"' in recipe
    r = CliRunner().invoke(main, ["optimize", MODEL, "--recipe", str(out / "best.toml"), "-o", str(tmp_path / "again")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again" / "pipeline.txt").read_text() == (out / "best" / "pipeline.txt").read_text()
    assert json.loads((tmp_path / "again" / "target.json").read_text())["info"]["mode"] == "eager"
    page = (out / "report.html").read_text()
    assert "<svg" in page and "baseline (no pass)" in page and "Pareto front" in page
    assert "<script" not in page and 'href="http' not in page and 'src="http' not in page  # no network


def test_tune_recommends_the_baseline_when_nothing_beats_it(tuned, tmp_path):
    def slower(fn, program, candidate):  # every pass makes it slower
        c = model_cost(fn, program, candidate)
        return {**c, "latency_ms_p50": 20.0 - c["latency_ms_p50"]}

    res = tuned(tmp_path / "slow", measure=slower, trials=2)
    assert res.best["trial"] == "baseline" and "baseline" in res.recommendation
    assert (tmp_path / "slow" / "best" / "pipeline.txt").read_text().strip() == "dce"
    # and outside the budget: a budget nothing but the reference keeps
    prune_only = SearchSpace(attention=("dense",), prune=(0.0, 0.25, 0.5), quantize=("none",), mode=("eager",))
    res = tuned(tmp_path / "strict", budget="top1=1.0", trials=2, space=prune_only)
    assert res.best["trial"] == "baseline" and "within the budget" in res.recommendation
    assert all(not r["within_budget"] for r in res.records[1:] if r["pipeline"] != "dce")


def test_same_seed_same_trials(searched, tuned, tmp_path):
    first, _ = searched
    again = tuned(tmp_path / "again", trials=3, seed=7)
    assert [r["key"] for r in again.records] == [r["key"] for r in first.records]


def test_resume_refuses_other_settings(searched, tuned):
    _, out = searched
    with pytest.raises(UsageError, match="other settings"):
        tuned(out, trials=4, resume=True, seed=3)


def test_cli_tune_one_line_errors(pydoc_text, tmp_path):
    r = CliRunner().invoke(
        main, ["tune", MODEL, "--data", pydoc_text, "--budget", "speed=2", "-o", str(tmp_path / "x")]
    )
    assert r.exit_code == 2 and "bad --budget 'speed=2'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(
        main, ["tune", MODEL, "--data", pydoc_text, "--budget", "ppl=+3%", "--resume", "-o", str(tmp_path / "none")]
    )
    assert r.exit_code == 2 and "holds no study" in r.output


def test_settings_validate():
    with pytest.raises(UsageError, match="unknown objective"):
        TuneSettings(objective="speed")


def test_screening_queues_every_pass_alone_in_the_baselines_mode():
    from optpipe.runtime.tuning import screening

    space = SearchSpace(
        attention=("dense", "sliding-window", "linear"),
        window=(64, 256),
        layers=(":", "1:-1"),
        prune=(0.0, 0.5),
        quantize=("none", "int8-dynamic"),
        mode=("eager", "compile"),
    )
    queued = screening(space, "compile")
    assert [pipeline_of(c) for c in queued] == [
        "fuse-attention,attention{kind=sliding-window,window=64},dce",
        "fuse-attention,attention{kind=sliding-window,window=256},dce",
        "fuse-attention,attention{kind=linear},dce",
        "prune{target=mlp,sparsity=0.5},dce",
        "quantize{scheme=int8-dynamic},dce",
    ]
    assert {c["mode"] for c in queued} == {"compile"}
    # a space without the no-pass choice of a dimension screens nothing (every candidate has a pass)
    assert screening(dataclasses.replace(space, prune=(0.25, 0.5)), "eager") == []


def test_tune_screens_before_sampling(searched):
    res, out = searched
    measured = [r for r in lines(out / "trials.jsonl") if r["trial"] != "baseline"]
    # the space of the shared search: prune 0.25 alone, then int8-dynamic alone, then the sampler
    assert [r["pipeline"] for r in measured[:2]] == [
        "prune{target=mlp,sparsity=0.25},dce",
        "quantize{scheme=int8-dynamic},dce",
    ]
