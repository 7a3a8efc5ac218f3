"""Pipeline- and tensor-parallel training throughput vs one process, in one run.

    python benchmarks/partition.py                      # 2 and 4 stages, 4 and 8 micro-batches; 2-way tensor
    python benchmarks/partition.py --stages 2 --microbatches 4 8 16 --steps 6 --layers 8
    python benchmarks/partition.py --stages --tensor-ways 2 4   # tensor parallelism only
    python benchmarks/partition.py --sequence           # sequence parallelism: seq 8192, 4 ranks, window 256

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

`--sequence` (sequence / context parallelism, `partition{strategy=sequence,ways=N}`; nothing else
runs): the GPT at `--sequence-len` tokens (default 8192) over `--sequence-ways` ranks (default 4),
with causal sliding-window attention (`--window`, default 256), dense causal attention and linear
attention. Per form: the bytes one rank sends per training step as planned (halo / ring / prefix
scan) next to what a ring sends on the same program, and the activation memory a training forward
keeps for the backward (the bytes of the tensors autograd saves, parameters excluded), the largest
rank's next to one process on the whole sequence. The ranks run as threads of this process
(`partition_sequence.run_threads`, the same exchanges through in-process mailboxes), so no
torchrun is needed for these counts; `--sequence-timing` adds a short torchrun step-time table
(gloo, one thread per rank) at `--seq` tokens: per form (dense twice: zig-zag shards, the default,
and contiguous ones) the measured step next to one process and next to a simple model, one
process / N + a comm model: the messages on the critical path x `--latency-us` plus their bytes /
`--bandwidth-gbs` (assumed figures, defaults 50 us and 5 GB/s), for the attention exchanges and the
per-parameter gradient all-reduce. Where the machine has fewer cores than ranks, the measured step
also pays for the ranks sharing cores, which the model does not know.
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
from optpipe.passes.partition_sequence import rank_module, run_threads
from optpipe.runtime.parallel import partitioned, pipeline_train, tensor_partitioned, tensor_train
from optpipe.runtime.sequence_parallel import sequence_train


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
    ap.add_argument("--sequence", action="store_true", help="sequence parallelism only (see the docstring)")
    ap.add_argument("--sequence-len", type=int, default=8192)
    ap.add_argument("--sequence-ways", type=int, default=4)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--sequence-timing", action="store_true")
    ap.add_argument("--bandwidth-gbs", type=float, default=5.0, help="--sequence-timing's comm model: GB/s per link")
    ap.add_argument("--latency-us", type=float, default=50.0, help="--sequence-timing's comm model: us per message")
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
    if args.sequence:
        return sequence_main(args)
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


# -- sequence parallelism --------------------------------------------------------------------------------
SEQUENCE_FORMS = {
    "sliding-window": "attention{{kind=sliding-window,window={w}}}",
    "dense": "",
    "linear": "attention{{kind=linear}}",
}


def saved_activation_bytes(module, inputs: tuple) -> int:
    """Bytes of the tensors autograd keeps for the backward of a training forward (parameters
    excluded; each storage once)."""
    params = {p.data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    for p in module.parameters():
        p.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*inputs)
    del out
    return sum(seen.values())


def sequence_rows(args) -> list[dict]:
    """One row per attention form: bytes per step (plan) and activation memory (measured)."""
    n, ways = args.sequence_len, args.sequence_ways
    torch.manual_seed(0)
    model, _ = build(n_layer=2, n_embd=64, n_head=4, block_size=n, flash=True)
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))
    program = optpipe.capture(model, (ids,))
    rows = []
    for form, swap in SEQUENCE_FORMS.items():
        text = ",".join(
            t
            for t in ("fuse-attention", swap.format(w=args.window), f"partition{{strategy=sequence,ways={ways}}}")
            if t
        )
        planned, _ = optpipe.Pipeline.parse(text).run(program, verify=False)
        plan = planned.meta["partition"]
        one = saved_activation_bytes(copy.deepcopy(planned.gm), (ids,))
        per_rank = run_threads(
            rank_module(planned),
            (ids,),
            ways,
            fn=lambda m, xs: saved_activation_bytes(copy.deepcopy(m), xs),
            order=plan["order"],
        )
        rows.append(
            {
                "form": form,
                "exchange": plan["sites"][0]["exchange"],
                "order": plan["order"],
                "bytes_per_step": plan["bytes_per_step"],
                "ring_bytes_per_step": plan["ring_bytes_per_step"],
                "activation_bytes_one_process": one,
                "activation_bytes_per_rank": max(per_rank),
                "planned": planned,
            }
        )
        print(f"  {form}: {plan['bytes_per_step']} B/step, activations {max(per_rank)} of {one}", file=sys.stderr)
    return rows


TIMED_FORMS = (("sliding-window", ""), ("dense", ""), ("dense", "contiguous"), ("linear", ""))
"""(attention, balance) of the timed rows: dense twice, zig-zag (its default) and contiguous shards."""


def comm_model(plan: dict, params: list[torch.Tensor], bandwidth_gbs: float, latency_us: float) -> dict:
    """A simple model of one rank's communication per training step, in ms: the messages on the
    critical path x `latency_us` plus their bytes / `bandwidth_gbs`. Exchanges per attention site
    (from the plan): a ring 2N-1 messages (N-1 forward, N backward) of the bytes the rank sends; a
    halo 2 (forward, backward) in parallel on every rank; a prefix scan a chain of N-1 hops each
    way. The gradient all-reduce (one per parameter tensor, as the runtime does): a ring
    all-reduce, 2(N-1) messages and 2(N-1)/N of the gradient bytes per tensor."""
    n = plan["ways"]
    messages, sent = 0, 0
    for site in plan["sites"]:
        hops = {"ring": 2 * n - 1, "halo": 2, "prefix-scan": 2 * (n - 1)}[site["form"]]
        messages += hops
        sent += site["bytes_per_step"] * ((n - 1) if site["form"] == "prefix-scan" else 1)
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    ar_messages, ar_bytes = 2 * (n - 1) * (len(params) + 1), 2 * (n - 1) / n * grad_bytes  # + the loss

    def ms(count: int, size: float) -> float:
        return (count * latency_us * 1e-6 + size / (bandwidth_gbs * 1e9)) * 1e3

    return {"exchange_ms": ms(messages, sent), "allreduce_ms": ms(ar_messages, ar_bytes)}


def sequence_timing(args) -> list[dict]:
    """A short torchrun step time per timed form at `--seq` tokens next to one process (same
    program) and next to the model: one process / N + the comm model."""
    torch.manual_seed(0)
    model, _ = build(n_layer=2, n_embd=64, n_head=4, block_size=args.seq, flash=True)
    program = optpipe.capture(model, (torch.zeros(1, args.seq, dtype=torch.long),))
    data = lm_batches(args.steps, 1, args.seq)
    ways, timed, bases = args.sequence_ways, [], {}
    for form, balance in TIMED_FORMS:
        swap = SEQUENCE_FORMS[form].format(w=min(args.window, args.seq // ways))
        prog, _ = optpipe.Pipeline.parse(",".join(t for t in ("fuse-attention", swap) if t)).run(program, verify=False)
        option = f",balance={balance}" if balance else ""
        planned, _ = optpipe.Pipeline.parse(f"partition{{strategy=sequence,ways={ways}{option}}}").run(
            prog, verify=False
        )
        base = bases[form] = bases.get(form) or one_process_step(prog, data)  # dense: one baseline for both orders
        res = sequence_train(planned, data, ways=ways, lr=1e-3, timeout=300)
        params = [p for p in planned.gm.parameters() if p.is_floating_point()]
        model_ms = comm_model(planned.meta["partition"], params, args.bandwidth_gbs, args.latency_us)
        timed.append(
            {
                "form": form,
                "order": res["order"],
                "step_ms": statistics.median(res["seconds"][1:]) * 1e3,
                "one_process_ms": base * 1e3,
                **model_ms,
                "model_step_ms": base * 1e3 / ways + model_ms["exchange_ms"] + model_ms["allreduce_ms"],
            }
        )
        print(f"  timed {form} ({res['order']}): {timed[-1]['step_ms']:.1f} ms", file=sys.stderr)
    return timed


def print_sequence_timing(args, timed: list[dict]) -> None:
    print(
        f"\n{args.sequence_ways}-rank training step at seq {args.seq} (batch 1, SGD, gloo); comm model: "
        f"{args.bandwidth_gbs:g} GB/s, {args.latency_us:g} us per message; model step = one process / "
        f"{args.sequence_ways} + comm model\n"
    )
    print(
        "| attention | order | measured step ms | one process ms | speedup | comm model ms (exchanges + "
        "all-reduce) | model step ms | measured / model |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in timed:
        comm = r["exchange_ms"] + r["allreduce_ms"]
        print(
            f"| {r['form']} | {r['order']} | {r['step_ms']:.1f} | {r['one_process_ms']:.1f} | "
            f"{r['one_process_ms'] / r['step_ms']:.2f}x | {comm:.2f} ({r['exchange_ms']:.2f} + "
            f"{r['allreduce_ms']:.2f}) | {r['model_step_ms']:.1f} | {r['step_ms'] / r['model_step_ms']:.2f}x |"
        )


def sequence_main(args) -> None:
    rows = sequence_rows(args)
    timed = sequence_timing(args) if args.sequence_timing else []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"GPT 2x64 (4 heads), batch 1 x seq {args.sequence_len}, {args.sequence_ways} sequence ranks, fp32; "
        f"{cores} CPU core(s), torch {torch.__version__}\n"
    )
    print(
        "| attention | exchange | order | sent per rank per step | a ring on the same program | ring / this | "
        "activations per rank | one process | per rank / one process |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["ring_bytes_per_step"] / max(1, r["bytes_per_step"])
        mem = r["activation_bytes_per_rank"] / r["activation_bytes_one_process"]
        print(
            f"| {r['form']} | {r['exchange']} | {r['order']} | {r['bytes_per_step'] / 2**10:.0f} KiB | "
            f"{r['ring_bytes_per_step'] / 2**10:.0f} KiB | {ratio:.1f}x | "
            f"{r['activation_bytes_per_rank'] / 2**20:.1f} MiB | {r['activation_bytes_one_process'] / 2**20:.1f} MiB | "
            f"{mem:.2f}x |"
        )
    if timed:
        print_sequence_timing(args, timed)
    if args.json:
        with open(args.json, "w") as f:
            out = [{k: v for k, v in r.items() if k != "planned"} for r in rows]
            json.dump({"sequence": out, "sequence_timing": timed}, f, indent=2)


def _batch(program) -> int:
    return int(program.example_inputs[0].shape[0])


if __name__ == "__main__":
    main()
