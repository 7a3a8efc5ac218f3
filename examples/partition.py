"""Split a tiny GPT into pipeline stages and train it pipelined on CPU processes.

    python examples/partition.py [OUT] [--stages 2] [--microbatches 4] [--steps 2]

Captures the nanoGPT-style model of examples/tiny_gpt.py, runs the verified pipeline
`partition{stages=N}` (cuts between transformer blocks, balanced by FLOPs), prints the stage table
and the tensors crossing each cut, writes the stage programs to OUT/stages/stage_K.pt2
(torch.export archives) next to OUT/program.pt2, then runs the stages under torchrun (gloo, one
process per stage): inference from the saved OUT folder against the unsplit program, and a few SGD
steps against the same steps in one process.
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
from optpipe.passes.partition import save_stages
from optpipe.runtime.parallel import pipeline_run, pipeline_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="folder for stages/ (default: a temporary one)")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, inputs = build()
    program = optpipe.capture(model, inputs)
    element = f"partition{{stages={args.stages},microbatches={args.microbatches}}}"
    split, records = optpipe.Pipeline.parse(element).run(program)
    rec = records[0]
    print(f"{element}: stats={rec.stats} verify ok={rec.verify['ok']}")
    print("| stage | first | last | FLOPs | params | sends |")
    print("|---|---|---|---|---|---|")
    for row in rec.details["stages"]:
        print(
            f"| {row['stage']} | {row['first']} | {row['last']} | {format_count(row['cost'])} | "
            f"{format_count(row['params'])} | {format_count(row['send_bytes'], 'B')} |"
        )
    for cut in rec.details["cuts"]:
        tensors = ", ".join(f"{t['name']} {t['dtype']}{t['symbolic_shape']}" for t in cut["tensors"])
        print(f"cut after stage {cut['after_stage']} (before {cut['before']}): {tensors}")
    for t in rec.details["tied"]:
        print(f"tied: {t['param']} replicated in stages {t['stages']} (owner {t['owner']}), gradients summed")
    print(f"expected bubble with {args.microbatches} micro-batches: {rec.details['bubble']:.1%}")

    out = args.out or tempfile.mkdtemp(prefix="optpipe-partition-")
    os.makedirs(out, exist_ok=True)
    split.save(os.path.join(out, "program.pt2"))  # the plan rides along in program.meta["partition"]
    paths = save_stages(split, out)
    print(f"wrote program.pt2 and {len(paths)} stage programs to {os.path.join(out, 'stages')}")

    batches = lm_batches(args.steps, args.microbatches * 2)
    logits = pipeline_run(out, (batches[0]["input_ids"],), microbatches=args.microbatches)  # the saved stages
    with torch.no_grad():
        reference = program.gm(batches[0]["input_ids"])
    print(f"pipelined inference: max |pipeline - program| = {(logits - reference).abs().max().item():.3g}")

    res = pipeline_train(split, batches, microbatches=args.microbatches, lr=0.05, optimizer="sgd")
    check_against_one_process(program.gm, res, batches, 0.05, "pipelined")


if __name__ == "__main__":
    main()
