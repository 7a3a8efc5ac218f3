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

Sparse prediction (`--sparse-prediction`, runs only this section): a BERT-base-sized masked LM
(BertForMaskedLM: vocab 30522, hidden 768, 12 heads, intermediate 3072, seq 512, `--sp-layers`
encoder layers, default 2 so it runs in reasonable time on CPU: the head's share of the step shrinks
with more layers), one MLM step (forward, loss, backward) at 15% masked positions, the captured
program vs the same program after `sparse-prediction` (same weights), round-robin; steps/s and ratio.

    python benchmarks/train.py --sparse-prediction --sp-layers 2 --repeat 5

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


SP_CONFIG = {"vocab_size": 30522, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}


def mlm_programs(layers: int, seq: int, batch: int) -> dict:
    """BERT-base-sized BertForMaskedLM with `layers` encoder layers: the captured program, and the same
    program (same weights) after `sparse-prediction`."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(**SP_CONFIG, num_hidden_layers=layers, max_position_embeddings=max(512, seq))
    model = BertForMaskedLM(config).eval()
    dense = optpipe.capture(model, {"input_ids": torch.zeros(batch, seq, dtype=torch.long)})
    sparse, _ = optpipe.Pipeline.parse("sparse-prediction").run(dense, verify=False)
    return {"dense": dense, "sparse-prediction": sparse}


def mlm_batch(batch: int, seq: int, rate: float) -> tuple:
    """Token ids and MLM labels with `rate` of the positions labelled (-100 elsewhere)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SP_CONFIG["vocab_size"], (batch, seq), generator=g)
    chosen = torch.rand(batch, seq, generator=g) < rate
    return ids, torch.where(chosen, ids, torch.full_like(ids, -100))


def mlm_step(program, ids, labels):
    """One MLM step, forward, loss and backward; the sparse program gets the labelled positions."""
    gm, mask = program.gm, labels != -100
    sparse = "sparse_prediction" in program.meta

    def step():
        gm.zero_grad(set_to_none=True)
        if sparse:
            loss = torch.nn.functional.cross_entropy(gm(ids, mask), labels[mask])
        else:
            loss = task_loss(gm(ids), labels, "mlm")
        loss.backward()
        return float(loss.detach())

    return step


def sparse_prediction_rows(layers: int, seq: int, batch: int, rate: float, repeat: int) -> list[dict]:
    progs = mlm_programs(layers, seq, batch)
    ids, labels = mlm_batch(batch, seq, rate)
    steps = {name: mlm_step(p, ids, labels) for name, p in progs.items()}
    losses = {name: fn() for name, fn in steps.items()}  # same weights, same batch: same loss
    best = round_robin(steps, repeat)
    return [
        {
            "program": name,
            "layers": layers,
            "seq": seq,
            "batch": batch,
            "masked": int((labels != -100).sum()),
            "loss": losses[name],
            "step_ms": t * 1e3,
            "steps_per_s": 1 / t,
            "ratio_vs_dense": best["dense"] / t,
        }
        for name, t in best.items()
    ]


def print_sparse_prediction(args) -> list[dict]:
    rows = sparse_prediction_rows(args.sp_layers, args.sp_seq, args.sp_batch, args.sp_rate, args.repeat)
    print(
        f"# MLM training step (forward, loss, backward), BERT-base-sized BertForMaskedLM with {args.sp_layers} "
        f"encoder layer{'s' if args.sp_layers != 1 else ''} (of BERT-base's 12), vocab 30522, "
        f"seq {args.sp_seq}, batch {args.sp_batch}, "
        f"{args.sp_rate:.0%} masked, fp32, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}\n"
    )
    print(
        "| program | layers | masked / positions | loss | step ms | steps/s | vs dense |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['program']} | {r['layers']} | {r['masked']} / {r['batch'] * r['seq']} | {r['loss']:.4f} | "
            f"{r['step_ms']:.1f} | {r['steps_per_s']:.2f} | {r['ratio_vs_dense']:.2f}x |"
        )
    return rows


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
    ap.add_argument(
        "--sparse-prediction", action="store_true", help="only the sparse-prediction MLM section (see above)"
    )
    ap.add_argument("--sp-layers", type=int, default=2, help="encoder layers of the BERT-base-sized MLM model")
    ap.add_argument("--sp-seq", type=int, default=512)
    ap.add_argument("--sp-batch", type=int, default=1)
    ap.add_argument("--sp-rate", type=float, default=0.15, help="fraction of positions masked (labelled)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sparse_prediction:
        rows = print_sparse_prediction(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"sparse_prediction": rows}, f, indent=2)
        return 0
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
