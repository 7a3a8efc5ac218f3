"""Efficient attention on a tiny nanoGPT: capture -> fuse-attention -> attention{kind=sliding-window}.

    python examples/efficient_attention.py [--seq 256] [--window 64] [--layers 1:] [--kind sliding-window]

Prints what each pass did, the verification numbers of the lossy `attention` pass (SQNR, cosine,
top-1 agreement against the program before it), the per-site decisions, a check that a window
covering the whole sequence reproduces dense attention exactly, and one training step through the
rewritten program. Speed is measured in benchmarks/attention.py (ratios at 1k-16k tokens).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import optpipe.passes.attention  # noqa: F401  (registers the `attention` pass)
from examples import tiny_gpt
from optpipe.capture import capture
from optpipe.pipeline import Pipeline


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256, help="sequence length of the example inputs")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--layers", default="1:", help="attention sites to rewrite (slice or [list])")
    parser.add_argument("--kind", default="sliding-window")
    args = parser.parse_args(argv)

    model, _ = tiny_gpt.build(block_size=max(64, args.seq))
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    program = capture(model, (ids,))

    layers = args.layers if not args.layers.startswith("[") else f'"{args.layers}"'
    text = f"fuse-attention,attention{{kind={args.kind},window={args.window},layers={layers}}}"
    pipeline = Pipeline.parse(text)
    print(f"pipeline: {pipeline}")
    optimized, records = pipeline.run(program)
    for r in records:
        v = r.verify or {}
        print(f"  {r.element:60s} modified={r.modified} stats={r.stats}")
        print(
            f"  {'':60s} verify: max_abs={v.get('max_abs'):.3g} sqnr_db={v.get('sqnr_db')} "
            f"cosine={v.get('cosine'):.6f} top1={v.get('top1_agreement')} ok={v.get('ok')}"
        )
    for site in records[-1].details.get("sites", []):
        print(
            f"    site {site['index']} {site['module_path']:22s} {site['action']:9s} "
            f"{site.get('op') or site.get('reason')}"
        )
    for note in records[-1].details.get("notes", []):
        print(f"    note: {note}")

    with torch.no_grad():
        eager = model(ids)
        rewritten = optimized.gm(ids)
    cos = torch.nn.functional.cosine_similarity(eager.flatten(), rewritten.flatten(), dim=0).item()
    print(f"eager vs rewritten: max |diff| = {(eager - rewritten).abs().max().item():.3g}, cosine = {cos:.6f}")

    covering = Pipeline.parse(f"fuse-attention,attention{{kind=sliding-window,window={args.seq}}}")
    exact, _ = covering.run(program)
    with torch.no_grad():
        diff = (exact.gm(ids) - eager).abs().max().item()
    print(f"window={args.seq} (covers the sequence): max |diff| vs dense = {diff:.3g}")

    logits = optimized.gm(ids)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    loss.backward()
    grads = [p.grad for p in optimized.gm.parameters() if p.grad is not None]
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    print(
        f"training step through the rewritten program: loss={loss.item():.4f}, "
        f"{len(grads)} parameter gradients, all finite={finite}"
    )


if __name__ == "__main__":
    main()
