"""Split one sequence of a tiny GPT over CPU processes (sequence / context parallelism).

    python examples/sequence_parallel.py [OUT] [--ways 2] [--attention sliding-window] [--steps 2]

Captures the nanoGPT-style model of examples/tiny_gpt.py, swaps its attention (`--attention dense`
keeps causal SDPA; `sliding-window` and `linear` run the `attention` pass) and runs the verified
pipeline `...,partition{strategy=sequence,ways=N}`: every rank holds a shard of the tokens
(zig-zag chunks r and 2N-1-r for dense causal attention, a contiguous shard otherwise), positions
use global offsets, and each attention site gets its exchange (dense: ring
attention; sliding window: a halo of the left neighbour's last window-1 keys/values; linear: a
prefix scan of the recurrent state). Prints the plan with the bytes each exchange sends per step
(beside what a ring would send), saves OUT/program.pt2 (the plan rides along), then starts N gloo
ranks with torchrun: inference from the saved folder against the program, and a few SGD steps
against the same steps in one process.
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
from optpipe.runtime.sequence_parallel import sequence_run, sequence_train

SWAPS = {"dense": "", "sliding-window": "attention{kind=sliding-window,window=8},", "linear": "attention{kind=linear},"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="folder for program.pt2 (default: a temporary one)")
    ap.add_argument("--ways", type=int, default=2)
    ap.add_argument("--attention", choices=list(SWAPS), default="sliding-window")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)

    model, inputs = build()
    program = optpipe.capture(model, inputs)
    text = f"fuse-attention,{SWAPS[args.attention]}partition{{strategy=sequence,ways={args.ways}}}"
    planned, records = optpipe.Pipeline.parse(text).run(program)
    rec = records[-1]
    print(f"{text}: stats={rec.stats} verify ok={rec.verify['ok']}")
    print(f"shard order: {rec.details['order']} ({rec.details['order_reason']})")
    print("| site | exchange | bytes/step per rank | a ring's |")
    print("|---|---|---|---|")
    for s in rec.details["sites"]:
        ring = s["ring_forward_bytes"] + s["ring_backward_bytes"]
        print(f"| {s['module_path']} | {s['exchange']} | {s['bytes_per_step']} | {ring} |")

    out = args.out or tempfile.mkdtemp(prefix="optpipe-sequence-")
    os.makedirs(out, exist_ok=True)
    planned.save(os.path.join(out, "program.pt2"))
    print(f"wrote {os.path.join(out, 'program.pt2')}")

    batches = lm_batches(args.steps, 2)
    ids = batches[0]["input_ids"]
    res = sequence_run(os.path.join(out, "program.pt2"), (ids,))
    with torch.no_grad():
        reference = planned.gm(ids)
    print(f"sequence-parallel inference: max |ranks - program| = {(res['output'] - reference).abs().max().item():.3g}")

    res = sequence_train(planned, batches, lr=0.05, optimizer="sgd")
    check_against_one_process(planned.gm, res, batches, 0.05, f"{res['ranks']} ranks:")


if __name__ == "__main__":
    main()
