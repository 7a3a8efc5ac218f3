"""Training throughput: dense vs optimized programs, and torch vs onnxruntime-training vs tvm, in one run.

    python benchmarks/train.py                         # seq 1024 and 4096; ORT at seq 256
    python benchmarks/train.py --seqs 1024 --threads 1 --repeat 3
    python benchmarks/train.py --quick                 # seq 256 only (a smoke run)

Model: a byte-level GPT (examples/heal.py `build`: 4 layers, 256 wide, 4 heads of 64, vocab 259)
captured by optpipe, then `attention{kind=sliding-window,window=256}` and `attention{kind=linear}`.
One training step = forward, next-token loss, backward, AdamW step, batch 1, fp32 on CPU. The
programs are timed round-robin (one step each per round, `--repeat` rounds, minimum kept), so load
from other processes hits them alike; tokens/s = seq / step time, ratio = kind / dense.

torch vs the target trainers: the same programs, same step (`OrtTrainer`: loss and AdamW in the ORT
graph; `TvmTrainer`: Relax autodiff and a Relax AdamW, built for the host CPU), at `--ort-seq`;
ratio = torch step time / target step time (> 1: the target is faster).

Prints markdown tables; `--json FILE` also writes the rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import optpipe
from examples.heal import build
from optpipe.losses import task_loss

KINDS = {
    "dense": None,
    "sliding-window (256)": "attention{kind=sliding-window,window=256}",
    "linear": "attention{kind=linear}",
}


def programs(seq: int, layers: int, width: int) -> dict:
    model, _ = build(context=seq, layers=layers, width=width, heads=width // 64)
    base = optpipe.capture(model, (torch.zeros(1, seq, dtype=torch.long),))
    out = {}
    for name, pipeline in KINDS.items():
        out[name] = base if pipeline is None else optpipe.Pipeline.parse(pipeline).run(base.copy(), verify=False)[0]
    return out


def torch_step(program, seq: int):
    gm = program.gm
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(0))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = task_loss(gm(ids), ids, "clm")
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def round_robin(steps: dict, repeat: int) -> dict:
    for fn in steps.values():  # warm up: allocator, optimizer state, one-time kernels
        fn()
    best = {name: float("inf") for name in steps}
    for _ in range(repeat):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


TRAINERS = {
    "onnxruntime-training": ("optpipe.targets.onnxruntime_training", "OrtTrainer"),
    "tvm": ("optpipe.targets.tvm_training", "TvmTrainer"),
}


def target_rows(seq: int, layers: int, width: int, repeat: int, targets: list[str]) -> list[dict]:
    """Per program: torch's step and each target trainer's step on the same batch, round-robin."""
    import importlib

    rows = []
    progs = programs(seq, layers, width)
    ids = torch.randint(0, 256, (1, seq), generator=torch.Generator().manual_seed(0))
    for name, prog in progs.items():
        steps, row = {"torch": torch_step(prog.copy(), seq)}, {"program": name, "seq": seq, "errors": {}}
        for target in targets:
            module, cls = TRAINERS[target]
            try:
                trainer = getattr(importlib.import_module(module), cls)(prog, objective="clm", lr=1e-4)
                trainer.step((ids,), ids)  # builds (TVM compiles per input shape) outside the timing
                steps[target] = functools.partial(trainer.step, (ids,), ids)
            except Exception as e:  # noqa: BLE001 - a program a target cannot train is a cell, not a crash
                row["errors"][target] = str(e).splitlines()[0][:120]
        best = round_robin(steps, repeat)
        row.update({f"{k}_ms": v * 1e3 for k, v in best.items()})
        row.update({f"torch_over_{k}": best["torch"] / v for k, v in best.items() if k != "torch"})
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="1024,4096")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ort-seq", type=int, default=256)
    ap.add_argument(
        "--targets",
        default="onnxruntime-training,tvm",
        help="target trainers to time against torch at --ort-seq (comma-separated; empty: none)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seqs = [256] if args.quick else [int(s) for s in args.seqs.split(",")]
    print(
        f"# training step, byte GPT {args.layers}x{args.width}, batch 1, fp32, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}\n"
    )
    print("| seq | program | step ms | tokens/s | vs dense |\n|---|---|---|---|---|")
    rows = []
    for seq in seqs:
        progs = programs(seq, args.layers, args.width)
        best = round_robin({name: torch_step(p, seq) for name, p in progs.items()}, args.repeat)
        for name, t in best.items():
            row = {
                "seq": seq,
                "program": name,
                "step_ms": t * 1e3,
                "tokens_per_s": seq / t,
                "ratio_vs_dense": best["dense"] / t,
            }
            rows.append(row)
            print(
                f"| {seq} | {name} | {row['step_ms']:.1f} | {row['tokens_per_s']:.0f} | {row['ratio_vs_dense']:.2f}x |"
            )
    backends = []
    targets = [t for t in args.targets.split(",") if t]
    if targets:
        backends = target_rows(args.ort_seq if not args.quick else 64, args.layers, args.width, args.repeat, targets)
        print(
            "\n| seq | program | torch step ms | "
            + " | ".join(f"{t} step ms | torch / {t}" for t in targets)
            + " |\n|---|---|---|"
            + "---|---|" * len(targets)
        )
        for r in backends:
            cells = []
            for t in targets:
                if t in r["errors"]:
                    cells += [f"cannot train: {r['errors'][t]}", ""]
                else:
                    cells += [f"{r[t + '_ms']:.1f}", f"{r['torch_over_' + t]:.2f}x"]
            print(f"| {r['seq']} | {r['program']} | {r['torch_ms']:.1f} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": rows, "targets": backends}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
