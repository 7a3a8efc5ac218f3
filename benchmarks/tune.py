"""`optpipe tune` against the pipelines a user would pick by hand, and Optuna's sampler against
random search, each side by side in one run.

    python benchmarks/tune.py [--trials 12] [--threads 1] [--hypervolume] [--json]

The model is the real pretrained all-MiniLM-L6-v2 (batch 8, seq 128, cpu), judged on Python's own
documentation (`pydoc_data`, the held-out split) with the budget cosine >= 0.99 of the mean-pooled
sentence embeddings to the fp32 model.

1. tune (TPE, the default sampler and space) searches `--trials` candidates.
2. The single-pass pipelines a user would try by hand (int8-dynamic, int8-static, MLP pruning at
   25% and 50%, sliding-window and linear attention), each in eager and compile mode, are built,
   and all of them, the baseline (no pass, eager and compile) and tune's recommendation are timed
   round-robin in the same rounds (median of `--rounds`), and judged on the same data.
   Goal: tune's recommendation is at least as fast as the fastest hand-picked pipeline within
   the budget.
3. `--causal`: a causal LM pre-trained by examples/heal.py at seq 2048 (`--pretrain-steps`), budget
   ppl=+5% of the held-out perplexity, batch 1 x 2048, cpu: tune with `--heal-steps` against every
   single-pass pipeline (sliding-window 64 / 256, linear, MLP pruning 25% / 50%, int8-dynamic; each
   in eager and compile mode), each lossy one healed by as many distillation steps as tune gives a
   candidate when it is outside the budget, all timed round-robin in the same rounds. Goal: tune's
   recommendation is faster than every single-pass pipeline within the budget; the front is printed.
4. `--hypervolume`: does Optuna's sampler find a better front than random search with as many
   trials? Measured without the machine's noise: every candidate of a 54-candidate space (attention
   dense / sliding-window 64, 128, 256 / linear, in all layers or all but the first and last; MLP
   pruning 0, 25%, 50%; int8-dynamic or not) is measured once, on a small byte-level GPT at seq 512
   (examples/heal.py's model, random init, cpu, eager) with the budget top1=0.9; then studies of
   `--hv-trials` trials are replayed on that table with tune's own sampler and search space, TPE and
   random, over `--hv-seeds` seeds. Hypervolume: of the feasible (within budget) points (latency /
   baseline latency, 1 - top-1 agreement) up to (the slowest feasible x, the budget's 0.1).
   Goal: TPE's mean >= random's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from examples.heal import minilm_path
from optpipe.loading import load_model
from optpipe.optimization import optimize
from optpipe.runtime.data import pydoc_corpus
from optpipe.runtime.evaluation import eval_set, measure_cost, reference_outputs, score
from optpipe.runtime.tuning import make_sampler, suggest, tune
from optpipe.runtime.tuning_report import hypervolume
from optpipe.runtime.tuning_space import NO_PASSES, SearchSpace, candidate_key, pipeline_of

HAND_PICKED = [
    "quantize{scheme=int8-dynamic}",
    "quantize{scheme=int8-static}",
    "prune{target=mlp,sparsity=0.25}",
    "prune{target=mlp,sparsity=0.5}",
    "fuse-attention,attention{kind=sliding-window,window=64}",
    "fuse-attention,attention{kind=linear}",
]
BUDGET = 0.99
SINGLE_PASS = [
    "fuse-attention,attention{kind=sliding-window,window=64}",
    "fuse-attention,attention{kind=sliding-window,window=256}",
    "fuse-attention,attention{kind=linear}",
    "prune{target=mlp,sparsity=0.25}",
    "prune{target=mlp,sparsity=0.5}",
    "quantize{scheme=int8-dynamic}",
]
PPL_BUDGET = 0.05


def minilm():
    return load_model(minilm_path(), inputs=["input_ids:int64[8,128]", "attention_mask:int64[8,128]"])


def build_rows(program, corpus, tune_best: dict) -> list[dict]:
    """The baseline, every hand-picked pipeline in both modes and tune's recommendation, built."""
    from optpipe.runtime.data import calibration_batches

    calibration = calibration_batches(corpus, program, batches=4, val_fraction=0.05)  # as tune: the train split
    rows = []
    plan = [("dce", m, "baseline") for m in ("eager", "compile")]
    plan += [(p, m, "hand-picked") for p in HAND_PICKED for m in ("eager", "compile")]
    plan.append((tune_best["pipeline"], tune_best["mode"], "tune"))
    for pipeline, mode, kind in plan:
        try:
            res = optimize(
                program,
                pipeline=pipeline,
                target="cpu",
                target_options={"mode": mode},
                diffs=False,
                calibration=calibration,
            )
        except Exception as e:  # noqa: BLE001 - a pipeline that fails is a row that says so
            rows.append({"pipeline": pipeline, "mode": mode, "kind": kind, "error": str(e).splitlines()[0]})
            continue
        rows.append(
            {
                "pipeline": pipeline,
                "mode": res.report["target_info"].get("mode", mode),
                "kind": kind,
                "fn": res.compiled,
                "program": res.program,
            }
        )
    return rows


def measure_rows(rows: list[dict], evset, reference, rounds: int, iters: int) -> None:
    """Quality once; latency round-robin, `rounds` rounds of `iters` calls, the median p50."""
    for r in rows:
        if "fn" in r:
            r["cosine"] = score(r["fn"], evset, reference)["cosine"]
    time_rows(rows, 8, 128, rounds, iters)


def time_rows(rows: list[dict], batch: int, seq_len: int, rounds: int, iters: int) -> None:
    """Every built row timed round-robin, `rounds` rounds of `iters` calls: the median p50."""
    times: dict[int, list[float]] = {i: [] for i, r in enumerate(rows) if "fn" in r}
    for _ in range(rounds):
        for i in times:
            cost = measure_cost(rows[i]["fn"], rows[i]["program"], batch=batch, seq_len=seq_len, iters=iters, warmup=1)
            times[i].append(cost["latency_ms_p50"])
    for i, ts in times.items():
        rows[i]["latency_ms"] = statistics.median(ts)


def report_rows(rows: list[dict]) -> dict:
    base = min(r["latency_ms"] for r in rows if r["kind"] == "baseline" and "latency_ms" in r)
    print(f"\n{'pipeline':58} {'mode':8} {'p50 ms':>8} {'vs base':>8} {'cosine':>8}  in budget")
    for r in rows:
        if "error" in r:
            print(f"{r['pipeline']:58} {r['mode']:8} failed: {r['error'][:60]}")
            continue
        r["speedup"] = base / r["latency_ms"]
        r["within_budget"] = r["cosine"] >= BUDGET
        name = ("[tune] " if r["kind"] == "tune" else "") + r["pipeline"]
        print(
            f"{name:58} {r['mode']:8} {r['latency_ms']:8.2f} {r['speedup']:7.2f}x {r['cosine']:8.4f}  "
            f"{'yes' if r['within_budget'] else 'no'}"
        )
    hand = [r for r in rows if r["kind"] == "hand-picked" and r.get("within_budget")]
    best_hand = min(hand, key=lambda r: r["latency_ms"]) if hand else None
    mine = next(r for r in rows if r["kind"] == "tune")
    verdict = best_hand is None or mine.get("latency_ms", 1e9) <= best_hand["latency_ms"]
    if best_hand:
        print(
            f"\ntune's recommendation {mine.get('latency_ms', float('nan')):.2f} ms vs the fastest hand-picked "
            f"pipeline within budget ({best_hand['pipeline']}, {best_hand['mode']}) {best_hand['latency_ms']:.2f} ms: "
            f"{'ok' if verdict else 'SLOWER'}"
        )
    keep = ("pipeline", "mode", "kind", "latency_ms", "speedup", "cosine", "within_budget", "error")
    return {"rows": [{k: r[k] for k in keep if k in r} for r in rows], "tune_at_least_as_fast": verdict}


def exhaustive_table(work: str, corpus: str, say) -> tuple[dict, SearchSpace]:
    """Every candidate of the sampler space, measured once (a random-sampler tune run that covers
    the whole space): key -> record."""
    from examples.heal import build
    from optpipe.capture import capture

    model, example = build(context=512, layers=2, width=64, heads=4)
    program = capture(model, example)
    space = SearchSpace(
        attention=("dense", "sliding-window", "linear"),
        window=(64, 128, 256),
        layers=(":", "1:-1"),
        prune=(0.0, 0.25, 0.5),
        quantize=("none", "int8-dynamic"),
        mode=("eager",),
    )
    res = tune(
        "examples/heal.py:build",
        corpus,
        os.path.join(work, "table"),
        program=program,
        budget="top1=0.9",
        space=space,
        sampler="random",
        trials=space.distinct(),
        eval_tokens=2048,
        latency_iters=5,
        force=True,
        say=say,
    )
    table = {("baseline" if r["trial"] == "baseline" else r["key"]): r for r in res.records if r["status"] == "ok"}
    return table, space


def replay(table: dict, space: SearchSpace, sampler: str, seed: int, trials: int) -> float:
    """A study of `trials` distinct candidates replayed on the measured table; its hypervolume."""
    import optuna

    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(sampler, seed))
    base = table["baseline"]["objective"]
    seen: dict[str, dict] = {}
    for _ in range(20 * trials):
        if len(seen) >= trials:
            break
        trial = study.ask()
        c = suggest(trial, space)
        key = "baseline" if pipeline_of(c) == NO_PASSES else candidate_key(c)
        r = table.get(key)
        if r is None:  # a candidate that failed to build: failed here too
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        trial.set_constraint("budget", r["slack"])
        study.tell(trial, [r["objective"], r["quality_loss"]])
        seen[key] = r
    feasible = [r for r in table.values() if r["within_budget"]]
    ref = (max(r["objective"] for r in feasible) / base * 1.05, 0.1)
    pts = [(r["objective"] / base, r["quality_loss"]) for r in seen.values() if r["within_budget"]]
    return hypervolume(pts, ref)


def sampler_comparison(work: str, corpus: str, trials: int, seeds: int, say) -> dict:
    table, space = exhaustive_table(work, corpus, say)
    hv = {s: [replay(table, space, s, seed, trials) for seed in range(seeds)] for s in ("tpe", "random")}
    wins = sum(t >= r for t, r in zip(hv["tpe"], hv["random"]))
    out = {
        "candidates_measured": len(table),
        "trials": trials,
        "seeds": seeds,
        "tpe_mean": statistics.mean(hv["tpe"]),
        "random_mean": statistics.mean(hv["random"]),
        "tpe_at_least_random": wins,
    }
    print(
        f"\nhypervolume over {seeds} seeds at {trials} trials ({len(table)} candidates measured once): "
        f"TPE mean {out['tpe_mean']:.4f}, random mean {out['random_mean']:.4f}; TPE >= random in {wins}/{seeds} "
        f"({'ok' if out['tpe_mean'] >= out['random_mean'] else 'TPE BELOW RANDOM'})"
    )
    return out


def minilm_against_hand_picked(work: str, corpus: str, args, say) -> dict:
    program = minilm()
    common = dict(budget=f"cosine={BUDGET}", batch=8, seq_len=128, trials=args.trials, seed=args.seed, force=True)
    tpe = tune(minilm_path(), corpus, os.path.join(work, "tpe"), program=program, say=say, **common)
    print(tpe.recommendation)
    evset = eval_set(program, corpus, seq_len=128, batch=8, max_tokens=4096)
    reference = reference_outputs(program.gm, evset, kl=False)
    rows = build_rows(program, corpus, tpe.best)
    measure_rows(rows, evset, reference, args.rounds, args.iters)
    return report_rows(rows)


def causal_against_single_pass(work: str, corpus: str, args, say) -> dict:
    """The --causal run: pre-train, tune, build and heal the single-pass rows, time them all."""
    from examples.heal import LONG_CONTEXT, pretrain

    n = LONG_CONTEXT
    if args.pretrained:
        dense = args.pretrained
    else:
        say(f"pre-train the byte-level GPT at context {n}, {args.pretrain_steps} steps")
        dense = pretrain(work, corpus, steps=args.pretrain_steps, long=True)
    program = load_model(dense)
    common = dict(batch=1, seq_len=n, eval_tokens=args.eval_tokens, seed=args.seed, force=True)
    res = tune(
        dense, corpus, os.path.join(work, "causal"), budget=f"ppl=+{PPL_BUDGET:.0%}", trials=args.trials,
        heal_steps=args.heal_steps, program=program, say=say, **common,
    )  # fmt: skip
    print(res.recommendation)
    print_front(res)
    evset = eval_set(program, corpus, seq_len=n, batch=1, max_tokens=args.eval_tokens)
    reference = reference_outputs(program.gm, evset, kl=False)
    base_ppl = score(program.gm, evset, reference)["ppl"]
    rows = [{"pipeline": "dce", "mode": m, "kind": "baseline", "out": dense} for m in ("eager", "compile")]
    rows += [{"pipeline": p, "mode": m, "kind": "single-pass"} for p in SINGLE_PASS for m in ("eager", "compile")]
    rows.append({"pipeline": res.best["pipeline"], "mode": res.best["mode"], "kind": "tune", "out": res.out + "/best"})
    for i, row in enumerate(rows):
        _build_causal_row(row, os.path.join(work, f"row{i}"), dense, corpus, evset, reference, base_ppl, args, say)
    time_rows(rows, 1, n, args.rounds, args.iters)
    return _report_causal(rows, base_ppl)


def print_front(res) -> None:
    print("\nthe front (trials.jsonl):")
    for r in res.front:
        ppl = r["quality"].get("ppl")
        print(f"  {r['pipeline']:72} {r['mode']:8} {r['cost']['latency_ms_p50']:9.2f} ms  ppl {ppl:.4f}")


def _build_causal_row(row: dict, folder: str, dense: str, corpus: str, evset, reference, base_ppl, args, say) -> None:
    """Optimize (or load tune's best/), heal a lossy row outside the budget, judge its perplexity."""
    from optpipe.runtime.training import train

    def build(model, pipeline):
        return optimize(model, pipeline=pipeline, target="cpu", target_options={"mode": row["mode"]}, diffs=False)

    try:
        res = build(row.get("out", dense), "dce" if "out" in row else row["pipeline"])
        ppl = score(res.compiled, evset, reference)["ppl"]
        if row["kind"] == "single-pass" and ppl > base_ppl * (1 + PPL_BUDGET) and args.heal_steps:
            say(f"heal {row['pipeline']} ({row['mode']}) {args.heal_steps} steps")
            res.save(folder, force=True)
            healed = folder + "-healed"
            train(
                folder, corpus, healed, force=True, progress=False, steps=args.heal_steps, distill_from=dense,
                objective="clm", seq_len=evset.seq_len, seed=args.seed, val_fraction=0.05,
            )  # fmt: skip
            res = build(healed, "dce")
            row["healed"] = True
            ppl = score(res.compiled, evset, reference)["ppl"]
    except Exception as e:  # noqa: BLE001 - a pipeline that fails is a row that says so
        row["error"] = str(e).splitlines()[0]
        return
    row.update(fn=res.compiled, program=res.program, ppl=ppl)


def _report_causal(rows: list[dict], base_ppl: float) -> dict:
    base = min(r["latency_ms"] for r in rows if r["kind"] == "baseline" and "latency_ms" in r)
    print(f"\n{'pipeline':62} {'mode':8} {'p50 ms':>9} {'vs base':>8} {'ppl':>8}  in budget")
    for r in rows:
        if "error" in r:
            print(f"{r['pipeline']:62} {r['mode']:8} failed: {r['error'][:60]}")
            continue
        r["speedup"] = base / r["latency_ms"]
        r["within_budget"] = r["ppl"] <= base_ppl * (1 + PPL_BUDGET)
        name = ("[tune] " if r["kind"] == "tune" else "") + r["pipeline"] + (" (healed)" if r.get("healed") else "")
        print(
            f"{name:62} {r['mode']:8} {r['latency_ms']:9.2f} {r['speedup']:7.2f}x {r['ppl']:8.4f}  "
            f"{'yes' if r['within_budget'] else 'no'}"
        )
    single = [r for r in rows if r["kind"] == "single-pass" and r.get("within_budget")]
    mine = next(r for r in rows if r["kind"] == "tune")
    verdict = all(mine.get("latency_ms", 1e9) < r["latency_ms"] for r in single)
    fastest = min(single, key=lambda r: r["latency_ms"]) if single else None
    if fastest:
        print(
            f"\ntune's recommendation {mine.get('latency_ms', float('nan')):.2f} ms vs the fastest single-pass "
            f"pipeline within budget ({fastest['pipeline']}, {fastest['mode']}) {fastest['latency_ms']:.2f} ms: "
            f"{'faster' if verdict else 'NOT FASTER'}"
        )
    keep = ("pipeline", "mode", "kind", "latency_ms", "speedup", "ppl", "within_budget", "healed", "error")
    return {"rows": [{k: r[k] for k in keep if k in r} for r in rows], "tune_faster_than_single_pass": verdict}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hypervolume", action="store_true", help="also TPE vs random search (hypervolume)")
    ap.add_argument("--hv-trials", type=int, default=12)
    ap.add_argument("--hv-seeds", type=int, default=20)
    ap.add_argument("--skip-minilm", action="store_true", help="only the sampler comparison")
    ap.add_argument("--causal", action="store_true", help="instead of MiniLM: the causal LM at seq 2048")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="--causal: pre-training steps")
    ap.add_argument("--heal-steps", type=int, default=50, help="--causal: distillation steps per lossy candidate")
    ap.add_argument("--pretrained", help="--causal: an OUT pre-trained by examples/heal.py --long (skips pre-training)")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="--causal: held-out tokens judged")
    ap.add_argument("--workdir", help="keep the TUNE_OUT folders here (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.workdir or tempfile.mkdtemp(prefix="optpipe-bench-tune-")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "pydoc.txt")
    pydoc_corpus(corpus)
    say = lambda text: print(f"  {text}", file=sys.stderr)
    summary: dict = {"trials": args.trials, "threads": args.threads}
    if args.causal:
        summary["causal"] = causal_against_single_pass(work, corpus, args, say)
    elif not args.skip_minilm:
        summary.update(minilm_against_hand_picked(work, corpus, args, say))
    if args.hypervolume:
        summary["hypervolume"] = sampler_comparison(work, corpus, args.hv_trials, args.hv_seeds, say)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
