"""Train the same program on torch, onnxruntime-training and TVM, side by side.

    python examples/train_on_target.py [--steps 20] [--targets cpu,onnxruntime,tvm] [OUT_ROOT]

A byte-level GPT (examples/heal.py `build_quick`: 2 layers, 32 wide, context 32) is trained on
Python's own documentation (`pydoc_data`, written out by `optpipe.runtime.data.pydoc_corpus`) with the
same options on every target: `optpipe.train(..., target=T)`, the API of `optpipe train --target T`.
onnxruntime-training runs loss, gradients and AdamW inside ORT (one AdamW group, no clipping);
TVM imports the program and its loss into Relax, takes gradients with Relax's autodiff and runs a
Relax AdamW. Prints each target's loss curve, the largest difference to the cpu run, and the
validation perplexity of the trained OUT folders.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch

import optpipe
from optpipe.runtime.data import pydoc_corpus

MODEL = os.path.join(ROOT, "examples", "heal.py") + ":build_quick"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="folder for the OUT2 folders (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--targets", default="cpu,onnxruntime,tvm")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = args.out or tempfile.mkdtemp(prefix="optpipe-train-targets-")
    os.makedirs(root, exist_ok=True)
    corpus = os.path.join(root, "pydoc.txt")
    pydoc_corpus(corpus)
    common = {"steps": args.steps, "batch_size": 4, "lr": 2e-3, "clip": None, "log_every": 1, "progress": False}
    curves, results = {}, {}
    for target in args.targets.split(","):
        res = optpipe.train(MODEL, corpus, os.path.join(root, target), force=True, target=target, **common)
        curves[target] = [r["loss"] for r in res.metrics]
        results[target] = res
        print(
            f"{target:<12} loss {curves[target][0]:.4f} -> {curves[target][-1]:.4f}  "
            f"validation perplexity {res.val_ppl:.2f}  wrote {res.out}"
        )
    base = curves.get("cpu")
    for target, curve in curves.items():
        if base is not None and target != "cpu":
            diff = max(abs(a - b) for a, b in zip(curve, base))
            print(f"{target}: max |loss - cpu loss| over {len(curve)} steps = {diff:.2g}")


if __name__ == "__main__":
    main()
