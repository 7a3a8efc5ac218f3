"""`optpipe.evaluate`: what an optimization costs in quality on real text, and what it buys on the target.

A small byte-level GPT (the model of examples/heal.py) is trained briefly on Python's own docs
(`pydoc_data`, text nobody here wrote), optimized two ways (an exact pipeline, and int8 dynamic
quantization), and each OUT is evaluated on the held-out split `train` never saw: perplexity with
strided windows, next-token agreement and KL to the trained model, and latency/size on cpu.

    python examples/evaluate.py [--workdir DIR] [--steps N] [--json]

The same from the command line: `optpipe eval OUT --data corpus.txt --reference DENSE --stride 16`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import optpipe
from optpipe.runtime.data import pydoc_corpus

MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "heal.py") + ":build_quick"  # context 32
PIPELINES = {"exact": "fuse-attention,dce", "int8": "quantize{scheme=int8-dynamic}"}


def main(workdir: str, steps: int = 30, as_json: bool = False) -> dict:
    torch.manual_seed(0)
    corpus = os.path.join(workdir, "pydoc.txt")
    pydoc_corpus(corpus)
    dense = os.path.join(workdir, "dense")
    optpipe.train(MODEL, corpus, dense, steps=steps, batch_size=8, lr=3e-3, log_every=steps, progress=False)
    options = {"seq_len": 32, "stride": 16, "batch": 4, "max_tokens": 2000, "latency_iters": 5}
    results = {"dense": optpipe.evaluate(dense, corpus, **options)}
    for name, pipeline in PIPELINES.items():
        out = os.path.join(workdir, name)
        optpipe.optimize(dense, pipeline=pipeline, target="cpu", target_options={"mode": "eager"}).save(out)
        results[name] = optpipe.evaluate(out, corpus, reference=dense, **options)
    if as_json:
        print(json.dumps({k: {"quality": v["quality"], "cost": v["cost"]} for k, v in results.items()}))
        return results
    data = results["dense"]["data"]
    print(
        f"held-out split: {data['documents']} documents, {data['tokens']} tokens scored "
        f"(windows of {data['seq_len']}, stride {data['stride']})"
    )
    print(f"{'':8} {'ppl':>8} {'top1':>7} {'kl':>9} {'p50 ms':>8} {'size MB':>8}")
    for name, r in results.items():
        q, c = r["quality"], r["cost"]
        top1 = "-" if q.get("top1_agreement") is None else f"{q['top1_agreement']:.4f}"
        kl = "-" if q.get("kl") is None else f"{q['kl']:.2e}"
        print(f"{name:8} {q['ppl']:8.3f} {top1:>7} {kl:>9} {c['latency_ms_p50']:8.3f} {c['size_mb']:8.3f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="Where the corpus and OUT folders go (default: a temp dir).")
    parser.add_argument("--steps", type=int, default=30, help="Training steps of the dense model.")
    parser.add_argument("--json", action="store_true", help="Print the results as one JSON line.")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp()
    os.makedirs(workdir, exist_ok=True)
    main(workdir, args.steps, args.json)
