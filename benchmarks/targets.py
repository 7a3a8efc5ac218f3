"""Latency of one program on every target, side by side in one run, as ratios to torch eager.

    python benchmarks/targets.py [--models minilm,gpt2] [--tune N] [--iters 20] [--block 5] [--json]

Models: the real pretrained all-MiniLM-L6-v2 (batch 8, seq 128) and a GPT-2-small-sized decoder
(124M params, random init; batch 1, seq 512). Each is captured once and run through
`fuse-attention,dce`; every target then compiles that same program, is checked for parity
against it, and is timed: all compiled first, then rounds in which each target runs `--block`
calls in a row (median per target over all its calls, `--iters` in all), so that a change of load
on a shared machine hits every row alike. Calls come in blocks rather than one target at a time
because every runtime keeps its own thread pool spinning for a while after a call: alternating
call by call, each runtime ran while another's idle workers still held the cores (MiniLM eager
254 ms that way vs ~200 ms alone).

Rows: eager, torch.compile, onnxruntime, tvm (untuned) and, with --tune N > 0, tvm tuned with N
MetaSchedule trials. `--targets eager,onnxruntime,onnxruntime-unfused` adds ONNX Runtime without its
contrib-op fusions (Attention, SkipLayerNormalization, BiasGelu) beside the fused row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

from benchmarks.models import gpt2_batch, minilm_batch


def minilm():
    return minilm_batch(8, 128)


def gpt2_small():
    return gpt2_batch(512)


MODELS = {"minilm": minilm, "gpt2": gpt2_small}


def bench_model(name, model, inputs, targets, iters: int, tune: int, block: int = 5) -> list[dict]:
    """Compile every target first, then time them in rounds of `block` consecutive calls per
    target, so that load changes on a shared machine hit every row alike; latency = median."""
    import optpipe
    from optpipe.optimization import check_target
    from optpipe.registry import get_target

    program = optpipe.capture(model, inputs)
    program, _ = optpipe.Pipeline.parse("fuse-attention,dce").run(program)
    args = program.example_inputs
    rows, runners = [], []
    for label, target, options in targets:
        if label == "tvm tuned" and tune <= 0:
            continue
        row = {"model": name, "name": label}
        rows.append(row)
        try:
            tgt = get_target(target)
            tgt.available()
            start = time.perf_counter()
            compiled = tgt.compile(program, **dict(options, tune=tune if label == "tvm tuned" else 0))
            row["compile_s"] = round(time.perf_counter() - start, 1)
            check = check_target(tgt, compiled, program)
            row["max_abs"] = check["max_abs"]
            if "ort_fusions" in compiled.info:  # which attention/norm/GELU subgraphs became contrib ops
                row["ort_fusions"] = compiled.info["ort_fusions"]
            prepared = tgt.prepare_inputs(args)
            with torch.no_grad():
                compiled(*prepared)  # warm-up
            runners.append((row, compiled, prepared))
        except Exception as e:  # noqa: BLE001 - a target that fails is a row that says so, not a crashed run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            print(f"  {label:<14} failed: {row['error']}", file=sys.stderr)
    times: dict[int, list[float]] = {id(r): [] for r, _, _ in runners}
    with torch.no_grad():
        for _ in range(max(1, -(-iters // block))):
            for row, compiled, prepared in runners:
                for _ in range(block):
                    start = time.perf_counter()
                    compiled(*prepared)
                    times[id(row)].append((time.perf_counter() - start) * 1000)
    eager_ms = statistics.median(times[id(runners[0][0])]) if runners else None
    for row, _, _ in runners:
        ms = statistics.median(times[id(row)])
        row.update(latency_ms=round(ms, 2), ratio_vs_eager=round(eager_ms / ms, 2))
        print(
            f"  {row['name']:<14} {ms:9.2f} ms  {eager_ms / ms:5.2f}x eager  (compile {row['compile_s']} s, "
            f"max-abs {row['max_abs']:.1e})",
            file=sys.stderr,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,gpt2")
    ap.add_argument("--targets", default="eager,compile,onnxruntime,tvm,tvm-tuned")
    ap.add_argument("--tune", type=int, default=64, help="MetaSchedule trials for the 'tvm tuned' row")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per target")
    ap.add_argument("--block", type=int, default=5, help="consecutive calls per target in each round")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for every runtime: torch, ONNX Runtime (it follows torch's setting) and "
        "TVM (TVM_NUM_THREADS); 0: torch's default (the cores), which the other two follow",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    all_targets = {
        "eager": ("eager", "cpu", {"mode": "eager"}),
        "compile": ("torch.compile", "cpu", {"mode": "compile"}),
        "onnxruntime": ("onnxruntime", "onnxruntime", {}),
        # the exporter's graph without the contrib-op fusions, to see what they are worth
        "onnxruntime-unfused": ("onnxruntime unfused", "onnxruntime", {"fuse": False}),
        "tvm": ("tvm", "tvm", {}),
        "tvm-tuned": ("tvm tuned", "tvm", {}),
    }
    targets = [all_targets[t] for t in args.targets.split(",")]
    rows = []
    for key in args.models.split(","):
        name, model, inputs = MODELS[key]()
        print(f"{name} (torch {torch.__version__}, {torch.get_num_threads()} threads)", file=sys.stderr)
        rows += bench_model(name, model, inputs, targets, args.iters, args.tune, args.block)
    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print("| model | target | latency ms | vs eager | compile s | max-abs vs torch |\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['name']} | failed: {r['error']} | | | |")
        else:
            print(
                f"| {r['model']} | {r['name']} | {r['latency_ms']} | {r['ratio_vs_eager']}x | "
                f"{r['compile_s']} | {r['max_abs']:.1e} |"
            )


if __name__ == "__main__":
    main()
