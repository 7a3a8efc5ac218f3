"""`optpipe tune`: a measured, budgeted search over pipelines, on the user's target and data.

    tune(MODEL, DATA, TUNE_OUT, budget="ppl=+3%", target="cpu")

1. Capture MODEL; cut a fixed evaluation set from the held-out split of DATA (`evaluation.eval_set`,
   the split `train` validates on); run the unoptimized program once as the reference.
2. Rule out what cannot pay off at the user's shapes (`tuning_space.rule_out`: attention kinds below
   their measured break-even length, windows that cover the whole sequence; `rule_out_static`: forms
   whose FLOPs, counted by the static model at the user's batch and length, do not fall enough, and
   for the size objective whatever does not shrink the parameters), then measure the baseline: no
   pass, on the target, in the mode `optimize` uses by default.
3. Screen every pass alone (`screening`: one queued trial per choice, in the baseline's mode), then
   search with Optuna (TPE by default; NSGA-II or random) over two objectives, the cost (latency,
   throughput or size, measured on the target) and the quality loss (from `evaluation.score`), with
   the budget as a constraint. Every trial is `optimize` + `score` + `measure_cost`; with
   `heal_steps`, a lossy candidate within reach of the budget is first healed by distillation from
   MODEL (`train --distill-from`). The study lives in TUNE_OUT/study.db (or `storage`, a database
   URL several workers share), so an interrupted run resumes: trials that were running are retried
   under the same choices, finished ones are never measured again.
4. Re-measure the baseline and the fastest candidates within budget side by side, recommend the
   best one that beats the baseline (else the baseline, and say so), and write TUNE_OUT/
   trials.jsonl, best.toml (a recipe `optimize --recipe` reproduces), best/ (its OUT folder) and
   report.html.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import OptpipeError, UsageError
from ..outdir import MARKER, atomic_folder, check_writable, write_text_atomic
from ..registry import get_hook, get_target
from .evaluation import eval_set, measure_cost, reference_outputs, score
from .tuning_report import pareto_front, recipe_toml, render_tune_html
from .tuning_space import (
    NO_PASSES,
    QualityBudget,
    SearchSpace,
    StaticCost,
    attention_choices,
    baseline_candidate,
    candidate_key,
    pipeline_of,
    rule_out,
    rule_out_static,
    target_options,
)

OBJECTIVES = ("latency", "throughput", "size")
SAMPLERS = ("tpe", "nsga2", "random")
STUDY_NAME = "optpipe-tune"
CONFIRM_TOP = 3
"""Candidates re-measured next to the baseline before one is recommended."""
HEAL_REACH = 3.0
"""A candidate is healed when its quality loss is within this many budgets."""


@dataclass
class TuneSettings:
    """Everything a study depends on; a resumed study must be started with the same values."""

    target: str = "cpu"
    budget: QualityBudget = field(default_factory=lambda: QualityBudget(cosine=0.99))
    objective: str = "latency"
    batch: int = 1
    seq_len: int | None = None
    trials: int = 20
    time_budget: float | None = None
    heal_steps: int = 0
    seed: int = 0
    sampler: str = "tpe"
    eval_tokens: int = 4096
    latency_iters: int = 10
    val_fraction: float = 0.05

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown objective {self.objective!r}", f"one of {', '.join(OBJECTIVES)}")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}", f"one of {', '.join(SAMPLERS)}")
        if self.trials < 1:
            raise UsageError(f"--trials must be at least 1, got {self.trials}", "e.g. --trials 20")

    def fingerprint(self, model: str, data: str, space: SearchSpace) -> dict:
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("trials", "time_budget")}
        keep["budget"] = self.budget.to_dict()
        return {"model": model, "data": os.path.abspath(data), "space": space.dimensions(), **keep}


@dataclass
class Context:
    """One tune run: the program, its evaluation set and reference, and where results go."""

    model: str
    data: str
    out: str
    settings: TuneSettings
    program: Any
    evset: Any
    reference: Any
    space: SearchSpace
    calibration: list | None = None
    measure: Callable | None = None
    ruled_out: list = field(default_factory=list)
    """What `rule_out` dropped before measuring, with the reason."""
    built: dict = field(default_factory=dict)
    """Trial -> its OptimizeResult, kept for the fastest few within budget (re-measured at the end)."""
    started: float = field(default_factory=time.monotonic)
    say: Callable[[str], None] = lambda text: None


@dataclass
class TuneResult:
    out: str
    best: dict
    baseline: dict
    front: list[dict]
    records: list[dict]
    ruled_out: list[dict]
    recommendation: str

    def to_dict(self) -> dict:
        return {
            "out": self.out,
            "best": self.best,
            "baseline": self.baseline,
            "front": self.front,
            "ruled_out": self.ruled_out,
            "recommendation": self.recommendation,
            "trials": len([r for r in self.records if r.get("trial") != "baseline"]),
        }


# -- entry point -------------------------------------------------------------------------------------
def tune(
    model: str,
    data: str,
    out: str,
    *,
    budget: QualityBudget | str | list[str],
    settings: TuneSettings | None = None,
    space: SearchSpace | None = None,
    storage: str | None = None,
    resume: bool = False,
    force: bool = False,
    program=None,
    say: Callable[[str], None] | None = None,
    measure: Callable | None = None,
    **options,
) -> TuneResult:
    """Search pipelines for MODEL on `settings.target`; write TUNE_OUT=`out`.

    `options` are TuneSettings fields (or give `settings`). `program`: MODEL already captured (e.g.
    with other example inputs). `say(text)` hears of each step (plain text). `measure(fn, program,
    candidate) -> cost dict` replaces the latency measurement (tests: a deterministic cost)."""
    budget = budget if isinstance(budget, QualityBudget) else QualityBudget.parse(budget)
    if settings is not None and options:
        raise TypeError(f"tune: give settings or options ({', '.join(options)}), not both")
    settings = settings or TuneSettings(budget=budget, **options)
    settings.budget = budget
    _prepare_out(out, resume, force, storage)
    say = say or (lambda text: None)
    ctx = _context(model, data, out, settings, space, program, measure, say)
    study = _open_study(ctx, storage, resume)
    ctx.started = time.monotonic()  # the time budget counts from here: setup done, study open
    baseline = _baseline(study, ctx)
    _search(study, ctx, baseline)
    records = _records(study)
    _write_trials(out, records)
    best, note = _recommend(ctx, baseline, records)
    front = pareto_front([r for r in records if r["status"] == "ok"], settings.objective)
    result = TuneResult(out, best, baseline, front, records, study.user_attrs.get("ruled_out", []), note)
    _write_outputs(ctx, result)
    return result


def check_out(out: str, resume: bool, force: bool, storage: str | None) -> None:
    """Refuse a TUNE_OUT that cannot be used, before any work: a study to resume that is not
    there, or one there that neither --resume nor --force says what to do with."""
    db = os.path.join(out, "study.db")
    if resume:
        if storage is None and not os.path.isfile(db):
            raise UsageError(f"--resume: {out} holds no study (no study.db)", "start the study without --resume")
        return
    if storage is None and os.path.isfile(db) and not force:
        raise UsageError(f"{out} already holds a study", "add --resume to continue it, or --force to start over")
    check_writable(out, force)


def _prepare_out(out: str, resume: bool, force: bool, storage: str | None) -> None:
    check_out(out, resume, force, storage)
    if resume:
        return
    if force and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("written by optpipe tune; safe to replace with a new optpipe run\n")


def _context(model, data, out, settings, space, program, measure, say) -> Context:
    from ..loading import load_model
    from .data import calibration_batches

    if program is None:
        say(f"load {model}")
        program = load_model(model)
    space = space or SearchSpace.default(settings.target)
    break_even = (get_hook("attention", "break_even") or (lambda: {}))()
    seq_len = settings.seq_len or int(program.example_inputs[0].shape[-1])
    settings.seq_len = seq_len
    evset = eval_set(
        program,
        data,
        seq_len=seq_len,
        batch=settings.batch,
        max_tokens=settings.eval_tokens,
        val_fraction=settings.val_fraction,
        seed=settings.seed,
    )
    say(f"evaluation set: {evset.tokens} tokens of the held-out split of {data}")
    reference = reference_outputs(program.gm, evset, kl=False)
    space, ruled_out = rule_out(space, seq_len=seq_len, target=settings.target, break_even=break_even)
    space, static = static_rule_out(program, space, settings)
    ruled_out += static
    for note in ruled_out:
        say(f"ruled out {note['dimension']}={note['value']}: {note['reason']}")
    # what calibrating passes (int8-static scales, prune importance) measure: the train split
    calibration = calibration_batches(data, program, batches=4, val_fraction=settings.val_fraction)
    return Context(
        model, data, out, settings, program, evset, reference, space, calibration, measure, ruled_out, say=say
    )


def static_rule_out(program, space: SearchSpace, settings: TuneSettings) -> tuple[SearchSpace, list]:
    """`rule_out_static` with the costs `optpipe.analysis.analyze` counts at the user's shapes, each
    attention choice applied without verification (nothing is run)."""
    import torch

    from ..analysis import analyze
    from ..pipeline import Pipeline
    from .data import input_builder

    batch, seq_len = settings.batch, settings.seq_len
    inputs = input_builder(program)(torch.zeros(batch, seq_len, dtype=torch.long))

    def static_cost(prog) -> StaticCost:
        costs = analyze(prog, inputs)
        # a causal SDPA kernel skips the masked half (the sparse ops' formulas count it so, too)
        causal = {n.name for n in prog.gm.graph.nodes if _causal_sdpa(n)}
        attention = sum(n.flops // (2 if n.name in causal else 1) for n in costs.nodes if _SDPA in n.op)
        skipped = sum(n.flops - n.flops // 2 for n in costs.nodes if n.name in causal)
        return StaticCost(costs.flops - skipped, costs.params, attention)

    try:  # fused once, so that attention written as matmul-softmax-matmul counts as attention too
        fused, _ = Pipeline.parse("fuse-attention").run(program, verify=False)
    except Exception:  # noqa: BLE001 - unfused: only SDPA sites count, and no form is modelled
        fused = program
    try:
        baseline = static_cost(fused)
    except Exception:  # noqa: BLE001 - no static model for this program: everything is measured
        return space, []

    def cost_of(choice: dict) -> StaticCost | None:
        # the rest of the candidate's pipeline, on the fused program (its history holds fuse-attention)
        text = pipeline_of(choice).removeprefix("fuse-attention,")
        try:
            swapped, _ = Pipeline.parse(text).run(fused, verify=False)
            return static_cost(swapped)
        except Exception:  # noqa: BLE001 - a choice the static model cannot count is measured instead
            return None

    shape = f"batch {batch} x seq-len {seq_len}"
    return rule_out_static(space, objective=settings.objective, baseline=baseline, cost_of=cost_of, shape=shape)


_SDPA = "scaled_dot_product_attention"


def _causal_sdpa(node) -> bool:
    if node.op != "call_function" or _SDPA not in str(node.target):
        return False
    return bool(node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False))


# -- the study ---------------------------------------------------------------------------------------
def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def make_sampler(name: str, seed: int):
    """tune's Optuna sampler. The budget reaches it as a constraint (`trial.set_constraint`: <= 0 is
    feasible); the objectives are (cost, quality loss), both minimised."""
    optuna = _optuna()
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True, group=True)


def _open_study(ctx: Context, storage: str | None, resume: bool):
    optuna = _optuna()
    url = storage or f"sqlite:///{os.path.abspath(os.path.join(ctx.out, 'study.db'))}"
    fingerprint = ctx.settings.fingerprint(ctx.model, ctx.data, ctx.space)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=url,
        load_if_exists=True,
        directions=["minimize", "minimize"],
        sampler=make_sampler(ctx.settings.sampler, ctx.settings.seed),
    )
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", json.loads(json.dumps(fingerprint, default=str)))
        study.set_user_attr("ruled_out", ctx.ruled_out)
    elif saved != json.loads(json.dumps(fingerprint, default=str)):
        changed = sorted(k for k in fingerprint if saved.get(k) != json.loads(json.dumps(fingerprint[k], default=str)))
        raise UsageError(
            f"the study in {url} was started with other settings ({', '.join(changed)})",
            "resume with the same model, data, target, budget, space and seed, or start a new TUNE_OUT",
        )
    _retry_interrupted(study)
    return study


def _retry_interrupted(study) -> None:
    """Trials left RUNNING by a run of this machine that was killed: mark them failed and queue
    their choices again, so that none is lost and none is counted twice. A trial records its host
    and pid: one whose process still runs (another worker sharing the study) is left alone, and so
    is one from another host, which this machine cannot tell alive from dead."""
    optuna = _optuna()
    host = os.uname().nodename
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or _alive(t.user_attrs.get("pid")):
            continue
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=True)


def _alive(pid: int | None) -> bool:
    if pid is None or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def suggest(trial, space: SearchSpace) -> dict:
    """A candidate from an Optuna trial: the window only for sliding-window, the block only for
    block-sparse, the layers only for a kind that is not dense (define-by-run)."""
    c = {"attention": trial.suggest_categorical("attention", list(space.attention))}
    if c["attention"] == "sliding-window":
        c["window"] = trial.suggest_categorical("window", list(space.window))
    if c["attention"] == "block-sparse":
        c["block"] = trial.suggest_categorical("block", list(space.block))
    if c["attention"] != "dense":
        c["layers"] = trial.suggest_categorical("layers", list(space.layers))
    c["prune"] = trial.suggest_categorical("prune", list(space.prune))
    c["quantize"] = trial.suggest_categorical("quantize", list(space.quantize))
    c["mode"] = trial.suggest_categorical("mode", list(space.mode))
    return c


def screening(space: SearchSpace, mode: str) -> list[dict]:
    """The trials queued before the sampler's: every pass alone, one choice at a time (each attention
    form in every layer, each pruning sparsity, each quantization scheme), in the baseline's mode.
    The sampler then combines what these measured, and the recommendation is never slower than the
    best single pass. A dimension whose no-pass choice is not in the space is not screened."""
    none = {"attention": "dense", "prune": 0.0, "quantize": "none"}
    if any(v not in getattr(space, k) for k, v in none.items()):
        return []
    base = {**none, "mode": mode if mode in space.mode else space.mode[0]}
    layers = ":" if ":" in space.layers else space.layers[0]
    out = [{**base, **choice, "layers": layers} for choice in attention_choices(space)]
    out += [{**base, "prune": p} for p in space.prune if p]
    out += [{**base, "quantize": q} for q in space.quantize if q != "none"]
    return out


def _baseline(study, ctx: Context) -> dict:
    """The unoptimized model on the target: no pass, measured in every mode of the space (eager and
    torch.compile on torch targets), the fastest of them. Every candidate is judged against it."""
    saved = study.user_attrs.get("baseline")
    if saved is not None:
        return saved
    records = []
    for mode in ctx.space.mode:
        ctx.say(f"measure the baseline (no pass, {mode})")
        records.append(_measure(ctx, {**baseline_candidate(ctx.space), "mode": mode}, "baseline", baseline=None))
    failed = [r for r in records if r["status"] != "ok"]
    if len(failed) == len(records):
        raise UsageError(
            f"tune: the unoptimized model fails on {ctx.settings.target}: {failed[0]['reason']}",
            "check `optpipe optimize MODEL --pipeline dce --target T` first",
        )
    record = min((r for r in records if r["status"] == "ok"), key=lambda r: r["objective"])
    record["modes"] = {r["params"]["mode"]: r.get("cost") or r["reason"] for r in records}
    study.set_user_attr("baseline", record)
    return record


def _search(study, ctx: Context, baseline: dict) -> None:
    """Ask-and-tell until `trials` candidates are measured, the space is exhausted or the time is up.
    A candidate sampled again is told its earlier values and not measured twice."""
    if not study.trials:  # a fresh study (a resumed one keeps what it queued)
        for params in screening(ctx.space, baseline["params"]["mode"])[: ctx.settings.trials]:
            study.enqueue_trial(params)
    seen = {"baseline" if r["trial"] == "baseline" else r["key"]: r for r in _records(study)}
    size = ctx.space.distinct() + (0 if ctx.space.has_no_pass() else 1)  # + the baseline, when outside the space
    attempts = 0
    while _measured(study) < ctx.settings.trials and len(seen) < size and attempts < 10 * ctx.settings.trials:
        if _out_of_time(ctx, study):
            ctx.say("time budget reached")
            break
        attempts += 1
        trial = study.ask()
        trial.set_user_attr("host", os.uname().nodename)
        trial.set_user_attr("pid", os.getpid())
        candidate = suggest(trial, ctx.space)
        # no pass in any mode is the baseline again: measured in the mode optimize picks by default
        key = "baseline" if pipeline_of(candidate) == NO_PASSES else candidate_key(candidate)
        if key in seen:
            _tell(study, trial, seen[key], duplicate_of=seen[key]["trial"])
            continue
        ctx.say(f"trial {trial.number}: {pipeline_of(candidate)} ({candidate['mode']})")
        record = _measure(ctx, candidate, trial.number, baseline)
        seen[key] = record
        _keep_fastest(ctx, list(seen.values()))
        _tell(study, trial, record)
        _write_trials(ctx.out, _records(study))


def _keep_fastest(ctx: Context, records: list[dict]) -> None:
    """Keep the built results of the CONFIRM_TOP fastest candidates within budget, drop the rest."""
    ok = [r for r in records if r["status"] == "ok" and r["within_budget"] and r["trial"] != "baseline"]
    keep = {_built_key(r) for r in sorted(ok, key=lambda r: r["objective"])[:CONFIRM_TOP]}
    keep |= {_built_key(r) for r in records if r["trial"] == "baseline"}
    ctx.built = {k: res for k, res in ctx.built.items() if k in keep}


def _built_key(record: Mapping):
    """ctx.built's key of a record: its trial number; the baseline's, by mode (one per mode)."""
    return ("baseline", record["params"]["mode"]) if record["trial"] == "baseline" else record["trial"]


def _tell(study, trial, record: dict, duplicate_of=None) -> None:
    optuna = _optuna()
    if duplicate_of is not None:
        trial.set_user_attr("duplicate_of", duplicate_of)
    else:
        trial.set_user_attr("record", {**record, "trial": trial.number})
    if record["status"] != "ok":
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return
    trial.set_constraint("budget", record["slack"])
    study.tell(trial, [record["objective"], record["quality_loss"]])


def _write_trials(out: str, records: list[dict]) -> None:
    write_text_atomic(
        os.path.join(out, "trials.jsonl"), "".join(json.dumps(r, default=_json_default) + "\n" for r in records)
    )


def _measured(study) -> int:
    """Trials that measured a candidate (ok or failed), not counting duplicates or interruptions."""
    return sum(1 for t in study.get_trials(deepcopy=False) if "record" in t.user_attrs)


def _out_of_time(ctx: Context, study) -> bool:
    limit = ctx.settings.time_budget
    if limit is None:
        return False
    elapsed = time.monotonic() - ctx.started
    durations = [
        t.user_attrs["record"]["seconds"] for t in study.get_trials(deepcopy=False) if "record" in t.user_attrs
    ]
    typical = statistics.median(durations) if durations else 0.0
    # the final step re-measures a few candidates: leave it about one trial's time
    return elapsed + typical >= limit


def _records(study) -> list[dict]:
    """trials.jsonl: the baseline, then one line per measured trial in trial order (a projection of
    the study database, so file and database never disagree)."""
    out = [study.user_attrs["baseline"]] if "baseline" in study.user_attrs else []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if "record" in t.user_attrs:
            out.append(t.user_attrs["record"])
    return out


# -- one trial ---------------------------------------------------------------------------------------
def _measure(ctx: Context, candidate: dict, number, baseline: dict | None) -> dict:
    pipeline = pipeline_of(candidate)
    record = {
        "trial": number,
        "pipeline": pipeline,
        "mode": candidate["mode"],
        "params": candidate,
        "key": candidate_key(candidate),
        "status": "ok",
        "reason": None,
    }
    t0 = time.perf_counter()
    try:
        res = _optimize(ctx, pipeline, candidate)
        fn = res.compiled
        quality = _score(ctx, fn)
        cost = _cost(ctx, fn, res.program, candidate)
        if ctx.settings.heal_steps and baseline is not None and _lossy(pipeline):
            quality, cost, healed = _maybe_heal(ctx, res, candidate, number, quality, cost, baseline)
            record["healed"] = healed
        record.update(quality=quality, cost=cost, mode=res.report["target_info"].get("mode", candidate["mode"]))
    except OptpipeError as e:
        record.update(status="failed", reason=e.one_line())
    record["seconds"] = round(time.perf_counter() - t0, 3)
    if record["status"] == "ok":
        _judge(ctx, record, baseline or record)
        ctx.built[_built_key(record)] = res
    return record


def _cost(ctx: Context, fn, program, candidate: dict) -> dict:
    if ctx.measure is not None:
        return ctx.measure(fn, program, candidate)
    s = ctx.settings
    prepare = get_target(s.target).prepare_inputs
    return measure_cost(fn, program, batch=s.batch, seq_len=s.seq_len, iters=s.latency_iters, prepare=prepare)


def _score(ctx: Context, fn) -> dict:
    return score(fn, ctx.evset, ctx.reference, prepare=get_target(ctx.settings.target).prepare_inputs)


def _optimize(ctx: Context, pipeline: str, candidate: Mapping, final: bool = False):
    """`optimize` on the tune's target. While searching, quality is judged on the data, so the
    passes' own verification and the graph diffs are left out; the `final` build that is saved as
    best/ gets both."""
    from ..optimization import optimize

    return optimize(
        ctx.program,
        pipeline=pipeline,
        target=ctx.settings.target,
        verify=final,
        diffs=final,
        target_options=target_options(candidate, ctx.settings.target),
        calibration=ctx.calibration,
    )


def _compile_out(ctx: Context, folder: str, candidate: Mapping) -> tuple[Any, Any]:
    """(compiled, program) of the OUT folder `folder` (a healed candidate) on the tune's target."""
    from ..loading import load_out

    program, _ = load_out(folder)
    return get_target(ctx.settings.target).compile(program, **target_options(candidate, ctx.settings.target)), program


def _judge(ctx: Context, record: dict, baseline: dict) -> None:
    budget = ctx.settings.budget
    record["objective"] = objective_value(record["cost"], ctx.settings.objective)
    record["quality_loss"] = budget.loss(record["quality"], baseline["quality"])
    record["slack"] = budget.slack(record["quality"], baseline["quality"])
    record["within_budget"] = record["slack"] <= 1e-12
    if not record["within_budget"]:
        record["reason"] = "; ".join(budget.violations(record["quality"], baseline["quality"]))
    base_cost = objective_value(baseline["cost"], ctx.settings.objective)
    record["vs_baseline"] = round(base_cost / record["objective"], 4) if record["objective"] else None


def objective_value(cost: Mapping, objective: str) -> float:
    """The number to minimise: latency (ms, p50), its inverse throughput (the same order at a fixed
    shape, reported as tokens/s), or size on disk (MB)."""
    if objective == "size":
        return float(cost["size_mb"])
    return float(cost["latency_ms_p50"])


def _lossy(pipeline: str) -> bool:
    return any(p in pipeline for p in ("attention{", "prune{", "quantize{"))


def _maybe_heal(ctx: Context, res, candidate: dict, number, quality, cost, baseline) -> tuple[dict, dict, dict]:
    """Heal a candidate within reach of the budget by distillation from MODEL, then judge it again."""
    from .training import train

    budget = ctx.settings.budget
    slack = budget.slack(quality, baseline["quality"])
    reach = HEAL_REACH * max(budget.allowance(k) for k in budget.names())
    if ctx.evset.task not in ("clm", "mlm"):
        return quality, cost, {"steps": 0, "reason": "the model has no LM head to train"}
    if slack <= 0 or slack > reach:
        why = "within the budget already" if slack <= 0 else f"{slack:.3g} past the budget, out of reach"
        return quality, cost, {"steps": 0, "reason": why}
    folder = os.path.join(ctx.out, "trials", f"{number:04d}")
    os.makedirs(folder, exist_ok=True)
    res.save(os.path.join(folder, "out"), force=True)
    ctx.say(f"trial {number}: heal {ctx.settings.heal_steps} steps by distillation from {ctx.model}")
    train(
        os.path.join(folder, "out"),
        ctx.data,
        os.path.join(folder, "healed"),
        force=True,
        progress=False,
        steps=ctx.settings.heal_steps,
        distill_from=ctx.model,
        objective=ctx.evset.task,
        seq_len=ctx.settings.seq_len,
        seed=ctx.settings.seed,
        val_fraction=ctx.settings.val_fraction,
    )
    compiled, _ = _compile_out(ctx, os.path.join(folder, "healed"), candidate)
    healed_quality = _score(ctx, compiled)  # training keeps the graph: the cost is the same
    return (
        healed_quality,
        cost,
        {
            "steps": ctx.settings.heal_steps,
            "quality_before": quality,
            "out": os.path.join(folder, "healed"),
        },
    )


# -- the recommendation ------------------------------------------------------------------------------
def _recommend(ctx: Context, baseline: dict, records: list[dict]) -> tuple[dict, str]:
    """The fastest (or smallest) candidate within budget that, re-measured next to the baseline,
    beats it; else the baseline. Returns (the record, with `confirmed` costs, and a sentence)."""
    ok = [r for r in records if r.get("trial") != "baseline" and r["status"] == "ok" and r["within_budget"]]
    ok.sort(key=lambda r: r["objective"])
    if not ok:
        return baseline, "no candidate stayed within the budget: the baseline (no pass) is recommended"
    contenders = [r for r in ok if _beats(r["cost"], baseline["cost"], ctx.settings.objective)]
    if not contenders:
        return baseline, "no candidate within the budget beat the baseline: the baseline (no pass) is recommended"
    room = _confirm_room(ctx, records)
    if room == 0:
        best = contenders[0]
        return best, f"trial {best['trial']} is recommended ({_speedup(ctx, baseline['cost'], best['cost'])}; " + (
            "not re-measured: the time budget is spent)"
        )
    contenders = contenders[:room]
    confirmed = _confirm(ctx, baseline, contenders)
    base = confirmed[0]
    wins = [(c, r) for c, r in zip(confirmed[1:], contenders) if _beats(c, base, ctx.settings.objective)]
    if not wins:
        return baseline, "re-measured next to the baseline, no candidate was faster: the baseline is recommended"
    cost, best = min(wins, key=lambda cr: objective_value(cr[0], ctx.settings.objective))
    best = {**best, "confirmed": cost, "baseline_confirmed": base}
    return best, f"trial {best['trial']} is recommended: {_speedup(ctx, base, cost)}, re-measured side by side"


def _speedup(ctx: Context, base: Mapping, cost: Mapping) -> str:
    ratio = objective_value(base, ctx.settings.objective) / objective_value(cost, ctx.settings.objective)
    return f"{ratio:.2f}x {'smaller' if ctx.settings.objective == 'size' else 'faster'} than the baseline"


def _confirm_room(ctx: Context, records: list[dict]) -> int:
    """How many contenders the re-measurement can take: CONFIRM_TOP, fewer when the time budget
    leaves less than one rebuild per contender plus the baseline's (0: none)."""
    limit = ctx.settings.time_budget
    if limit is None:
        return CONFIRM_TOP
    typical = statistics.median([r["seconds"] for r in records if "seconds" in r] or [0.0])
    left = limit - (time.monotonic() - ctx.started)
    return max(0, min(CONFIRM_TOP, int(left // max(typical, 1e-3)) - 1))


def _beats(cost: Mapping, base: Mapping, objective: str) -> bool:
    if cost["latency_ms_p50"] > base["latency_ms_p50"]:
        return False  # never slower than the unoptimized model, whatever the objective
    return objective_value(cost, objective) < objective_value(base, objective)


def _confirm(ctx: Context, baseline: dict, contenders: list[dict]) -> list[dict]:
    """Rebuild the baseline and the contenders and measure them in turns (three rounds), so that
    they are compared under the same machine load. Returns their median costs, baseline first."""
    ctx.say(f"re-measure the baseline and {len(contenders)} candidate(s) side by side")
    built = []
    for r in [baseline, *contenders]:
        res = ctx.built.get(_built_key(r)) or _optimize(ctx, r["pipeline"], r["params"])
        if r.get("healed", {}).get("out"):
            built.append((*_compile_out(ctx, r["healed"]["out"], r["params"]), r, res))
        else:
            built.append((res.compiled, res.program, r, res))
    rounds = [[_cost(ctx, fn, program, r["params"]) for fn, program, r, _ in built] for _ in range(3)]
    return [_median_cost([rd[i] for rd in rounds]) for i in range(len(built))]


def _median_cost(costs: list[dict]) -> dict:
    out = dict(costs[0])
    for key in ("latency_ms_p50", "latency_ms_p90", "tokens_per_s", "peak_mem_mb"):
        values = [c[key] for c in costs if c.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    return out


# -- outputs -----------------------------------------------------------------------------------------
def _write_outputs(ctx: Context, result: TuneResult) -> None:
    best, out = result.best, ctx.out
    search_seconds = time.monotonic() - ctx.started
    if best.get("healed", {}).get("out"):
        with atomic_folder(os.path.join(out, "best"), force=True) as tmp:  # the healed OUT2, as best/
            shutil.copytree(best["healed"]["out"], tmp, dirs_exist_ok=True)
    else:
        ctx.say(f"build best/ with verification: {best['pipeline']}")
        _optimize(ctx, best["pipeline"], best["params"], final=True).save(os.path.join(out, "best"), force=True)
    write_text_atomic(os.path.join(out, "best.toml"), recipe_toml(best, ctx.settings, result.recommendation))
    summary = {
        **result.to_dict(),
        "settings": json.loads(json.dumps(dataclasses.asdict(ctx.settings), default=str)),
        # this run's search and re-measurement (what --time-budget limits), then best/'s verified build
        "seconds": round(search_seconds, 3),
        "best_build_seconds": round(time.monotonic() - ctx.started - search_seconds, 3),
    }
    write_text_atomic(os.path.join(out, "tune.json"), json.dumps(summary, indent=2, default=_json_default) + "\n")
    write_text_atomic(os.path.join(out, "report.html"), render_tune_html(summary, result.records))


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
