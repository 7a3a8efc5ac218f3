"""Structured pruning of the real all-MiniLM-L6-v2: fewer MLP channels (and heads), smaller and faster.

    python examples/prune.py [--target mlp|heads|all] [--sparsity 0.5] [--calibrate]
                             [--batch 8] [--repeat 5] [--threads 1] [-o OUT]

Captures the model on a tokenized batch, runs the verified pipeline
`fuse-attention,prune{method=structured,target=...,sparsity=...}` through `optpipe.optimize`
(target cpu, eager), and prints: what the pass removed per layer (importance scores), the verification
numbers, parameters before/after, the saved program reloaded and timed side by side with the
original model, and the cosine of the mean-pooled sentence embeddings to the unpruned model.
With --calibrate the channels are ranked by their activations on other sentences (and the removed
channels' mean output is folded into the bias). benchmarks/compress.py has the full comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import optpipe
import optpipe.passes.prune
from tests import hf_models

embed = hf_models.sentence_embedding


def latency_ms(fns, repeat: int) -> list[float]:
    """Median latency of each fn, timed round-robin so machine load hits them alike."""
    times = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            fn()
        for _ in range(repeat):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] * 1e3 for t in times]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="mlp", choices=["mlp", "heads", "all"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--calibrate", action="store_true", help="rank by activations on other sentences")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per model (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--out", help="write the optimized program, report and pipeline here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer, ids, mask = hf_models.minilm_sentences(args.batch)
    program = optpipe.capture(model, {"input_ids": ids, "attention_mask": mask})
    if args.calibrate:
        from optpipe.calibration import with_calibration

        with_calibration(program, [hf_models.calibration_set(tokenizer, ids.shape[1])])

    pipeline = f"fuse-attention,prune{{target={args.target},sparsity={args.sparsity}}}"
    res = optpipe.optimize(program, pipeline=pipeline, target="cpu", target_options={"mode": "eager"}, diffs=False)
    record = res.report["passes"][-1]
    stats, verify = record["stats"], record["verify"]
    print(f"pipeline: {res.report['pipeline']}")
    for entry in record["details"]["modules"]:
        if entry.get("action") == "pruned":
            scores = entry["scores"]
            shown = scores if isinstance(scores, list) else f"median {scores['median']}, cut at {scores['threshold']}"
            print(
                f"  {entry['module_path']:32s} {entry['kind']:5s} kept {entry['kept']}/{entry['units']} "
                f"{entry['unit']}s ({entry['importance']}: {shown})"
            )
    print(
        f"pruned {stats['pruned_heads']} heads, {stats['pruned_channels']} MLP channels; parameters "
        f"{stats['params_before'] / 1e6:.2f}M -> {stats['params_after'] / 1e6:.2f}M "
        f"({stats['params_before'] / stats['params_after']:.2f}x fewer)"
    )
    print(f"verification: sqnr {verify['sqnr_db']:.1f} dB, cosine {verify['cosine']:.5f}, ok={verify['ok']}")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "program.pt2")
        res.program.save(path)
        reloaded = optpipe.load_program(path)
    if args.out:
        res.save(args.out)
    before_ms, after_ms = latency_ms(
        [lambda: model(input_ids=ids, attention_mask=mask), lambda: reloaded.gm(ids, mask)], args.repeat
    )
    print(
        f"latency (batch {args.batch}, {args.threads} thread(s)): original {before_ms:.1f} ms, "
        f"pruned {after_ms:.1f} ms ({before_ms / after_ms:.2f}x)"
    )
    with torch.no_grad():
        reference = embed(lambda i, m: model(input_ids=i, attention_mask=m), ids, mask)
        cosine = torch.nn.functional.cosine_similarity(reference, embed(reloaded.gm, ids, mask), dim=-1)
    print(f"sentence-embedding cosine to the original: mean {cosine.mean():.4f}, min {cosine.min():.4f}")


if __name__ == "__main__":
    main()
