"""Shard a tiny GPT's attention heads and MLP channels over CPU processes (tensor parallelism).

    python examples/tensor_parallel.py [OUT] [--ways 2] [--data-parallel 1] [--steps 2]

Captures the nanoGPT-style model of examples/tiny_gpt.py and runs the verified pipeline
`fuse-attention,partition{strategy=tensor,ways=N}`: every attention block is split by heads and
every MLP by channels (Megatron-LM's column-/row-wise projections), with two all-reduces per block
through DTensor. Prints the plan, saves OUT/program.pt2 (the plan rides along in its metadata),
then starts N x data-parallel gloo ranks with torchrun: inference from the saved folder against
the unsharded program, and a few SGD steps against the same steps in one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import optpipe
from examples.tiny_gpt import build, check_against_one_process, lm_batches
from optpipe.analysis import format_count
from optpipe.runtime.parallel import tensor_run, tensor_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="folder for program.pt2 (default: a temporary one)")
    ap.add_argument("--ways", type=int, default=2)
    ap.add_argument("--data-parallel", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, inputs = build()
    program = optpipe.capture(model, inputs)
    text = f"fuse-attention,partition{{strategy=tensor,ways={args.ways}}}"
    sharded, records = optpipe.Pipeline.parse(text).run(program)
    rec = records[-1]
    print(f"{text}: stats={rec.stats} verify ok={rec.verify['ok']}")
    print("| block | kind | units | per rank | column-wise | row-wise |")
    print("|---|---|---|---|---|---|")
    for b in rec.details["blocks"]:
        print(
            f"| {b['module_path']} | {b['kind']} | {b['units']} {b['unit']}s | {b['per_rank']} | "
            f"{', '.join(b['colwise'])} | {b['rowwise']} |"
        )
    print(
        f"parameters per rank: {format_count(rec.stats['params_per_rank'])} of "
        f"{format_count(rec.details['params'])}; all-reduces per forward: {rec.stats['all_reduces']}"
    )

    out = args.out or tempfile.mkdtemp(prefix="optpipe-tensor-")
    os.makedirs(out, exist_ok=True)
    sharded.save(os.path.join(out, "program.pt2"))
    print(f"wrote {os.path.join(out, 'program.pt2')}")

    batches = lm_batches(args.steps, 4 * args.data_parallel)
    ids = batches[0]["input_ids"]
    res = tensor_run(os.path.join(out, "program.pt2"), (ids,), data_parallel=args.data_parallel)
    with torch.no_grad():
        reference = program.gm(ids)
    print(f"tensor-parallel inference: max |ranks - program| = {(res['output'] - reference).abs().max().item():.3g}")

    res = tensor_train(sharded, batches, data_parallel=args.data_parallel, lr=0.05, optimizer="sgd")
    check_against_one_process(program.gm, res, batches, 0.05, f"{res['ranks']} ranks:")


if __name__ == "__main__":
    main()
