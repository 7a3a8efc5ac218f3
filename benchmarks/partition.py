"""Pipeline- and tensor-parallel training throughput vs one process, in one run.

    python benchmarks/partition.py                      # 2 and 4 stages, 4 and 8 micro-batches; 2-way tensor
    python benchmarks/partition.py --stages 2 --microbatches 4 8 16 --steps 6 --layers 8
    python benchmarks/partition.py --stages --tensor-ways 2 4   # tensor parallelism only

Model: the nanoGPT-style GPT of examples/tiny_gpt.py at `--layers` x `--width` (vocab 256,
`--seq` tokens), captured by optpipe and split by `partition{stages=p}` (FLOP-balanced). One
training step = forward, next-token loss, backward, SGD step on a batch of `--batch` sequences.

- one process: the unsplit program, whole batch at once, `torch.set_num_threads(1)`;
- pipeline: `optpipe.runtime.parallel.pipeline_train` with p ranks (torchrun, gloo, OMP_NUM_THREADS=1 each),
  1F1B over m micro-batches; step time measured on the ranks between barriers (start-up and the
  first step, which infers the stage metadata, excluded; median of the rest).

- tensor: `optpipe.runtime.parallel.tensor_train` with t ranks (`partition{strategy=tensor,ways=t}`: heads
  and MLP channels sharded, two all-reduces per block each way), the whole batch on every rank.

The bubble model: with balanced stages and free communication a p-stage pipeline over m micro-batches
is idle (p-1)/(m+p-1) of the time, so its ideal speedup over one process is p·m/(m+p-1). Measured
speedup = one-process step / pipelined step; efficiency = measured / ideal. Each rank is one
thread, so p ranks need p cores: on a machine with fewer cores than ranks the processes share them
and the measured speedup is capped near the core count (the table says how many cores there were).
Prints a markdown table; `--json FILE` also writes the rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import optpipe
from examples.tiny_gpt import build, lm_batches
from optpipe.losses import task_loss
from optpipe.runtime.parallel import partitioned, pipeline_train, tensor_partitioned, tensor_train


def one_process_step(program, data: list[dict]) -> float:
    torch.set_num_threads(1)
    gm = copy.deepcopy(program.gm)
    for p in gm.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(gm.parameters(), lr=1e-3)
    times = []
    for b in data:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        task_loss(gm(b["input_ids"]), b["labels"], "clm").backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--tensor-ways", type=int, nargs="*", default=[2])
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json")
    return ap.parse_args()


def pipeline_rows(args, program, data, base: float) -> list[dict]:
    """One row per (stages, micro-batches): the pipelined step next to the bubble model."""
    rows = []
    for p in args.stages:
        split = partitioned(program, p)
        imbalance = split.meta["partition"]["imbalance"]
        for m in args.microbatches:
            res = pipeline_train(split, data, stages=p, microbatches=m, lr=1e-3, timeout=300)
            step = statistics.median(res["seconds"][1:])
            ideal = p * m / (m + p - 1)
            rows.append(
                {
                    "stages": p,
                    "microbatches": m,
                    "bubble": (p - 1) / (m + p - 1),
                    "imbalance": imbalance,
                    "step_ms": step * 1e3,
                    "one_process_ms": base * 1e3,
                    "speedup": base / step,
                    "ideal_speedup": ideal,
                    "efficiency": base / step / ideal,
                }
            )
            print(f"  p={p} m={m}: {step * 1e3:.1f} ms/step", file=sys.stderr)
    return rows


def tensor_rows(args, program, data, base: float) -> list[dict]:
    """One row per tensor-parallel width: the step, the parameters per rank and the all-reduced bytes."""
    rows = []
    for t in args.tensor_ways:
        res = tensor_train(program, data, ways=t, lr=1e-3, timeout=300)
        step = statistics.median(res["seconds"][1:])
        plan = tensor_partitioned(program, t).meta["partition"]
        rows.append(
            {
                "ways": t,
                "params_per_rank": plan["params_per_rank"],
                "params": plan["params"],
                "all_reduce_bytes": 2 * plan["all_reduce_bytes"] * args.batch // max(1, _batch(program)),
                "step_ms": step * 1e3,
                "one_process_ms": base * 1e3,
                "speedup": base / step,
            }
        )
        print(f"  tensor t={t}: {step * 1e3:.1f} ms/step", file=sys.stderr)
    return rows


def print_tables(pipeline: list[dict], tensor: list[dict], cores: int) -> None:
    if pipeline:
        print(
            "| stages p | micro-batches m | bubble (p-1)/(m+p-1) | stage imbalance (max/mean FLOPs) | "
            "pipeline step ms | one process ms | speedup | ideal p·m/(m+p-1) | efficiency |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in pipeline:
            print(
                f"| {r['stages']} | {r['microbatches']} | {r['bubble']:.1%} | {r['imbalance']:.3f} | "
                f"{r['step_ms']:.1f} | {r['one_process_ms']:.1f} | {r['speedup']:.2f}x | "
                f"{r['ideal_speedup']:.2f}x | {r['efficiency']:.0%} |"
            )
    if tensor:
        print(
            "\n| tensor ways t | params per rank | all-reduced per step (fwd + bwd) | tensor step ms | "
            "one process ms | speedup | ideal |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in tensor:
            print(
                f"| {r['ways']} | {r['params_per_rank'] / 1e6:.2f}M of {r['params'] / 1e6:.2f}M | "
                f"{r['all_reduce_bytes'] / 2**20:.1f} MiB | {r['step_ms']:.1f} | {r['one_process_ms']:.1f} | "
                f"{r['speedup']:.2f}x | {r['ways']}x |"
            )
    if any(r["stages"] > cores for r in pipeline) or any(r["ways"] > cores for r in tensor):
        print(
            f"\nNote: rows with more ranks than the {cores} available core(s) oversubscribe the CPU "
            "(one single-threaded process per rank); their speedup is bounded by the core count."
        )


def main() -> None:
    args = parse_args()
    model, _ = build(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64), block_size=args.seq)
    program = optpipe.capture(model, (torch.zeros(1, args.seq, dtype=torch.long),))
    data = lm_batches(args.steps, args.batch, args.seq)
    base = one_process_step(program, data)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    pipeline = pipeline_rows(args, program, data, base)
    print(
        f"GPT {args.layers}x{args.width}, batch {args.batch} x seq {args.seq}, SGD step, fp32; "
        f"{cores} CPU core(s) available, torch {torch.__version__}\n"
    )
    tensor = tensor_rows(args, program, data, base)
    print_tables(pipeline, tensor, cores)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pipeline": pipeline, "tensor": tensor}, f, indent=2)


def _batch(program) -> int:
    return int(program.example_inputs[0].shape[0])


if __name__ == "__main__":
    main()
