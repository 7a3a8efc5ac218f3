"""Quantize the real all-MiniLM-L6-v2 sentence encoder: size, speed and embedding quality.

    python examples/quantize.py [--scheme int8-dynamic|int8-static|int8-weight|int4-weight] [--group 32]
                                [--batch 8] [--repeat 5] [--threads 1]

Captures the model on a tokenized batch, runs the verified pipeline `quantize{...,embeddings=true}`
through `optpipe.optimize` (target cpu, eager: quantized programs are checked against the torch
program bit for bit, and torch.compile's fused fp32 arithmetic can flip a rounding), saves both
programs, and prints: what the pass did, the verification numbers, the saved program sizes, fp32
vs quantized latency measured side by side, and the cosine of the mean-pooled sentence embeddings
to the fp32 model. int8-static calibrates its activation ranges on a second batch of sentences,
attached with `optpipe.calibration.with_calibration` (the CLI's `--calibration-data FILE`).
benchmarks/compress.py has the full comparison (GPT-2-sized decoder, torch.ao and ONNX Runtime
quantizers).
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
import optpipe.passes.quantize
from tests import hf_models

embed = hf_models.sentence_embedding


def latency_ms(fn, repeat: int) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scheme", default="int8-dynamic", choices=["int8-dynamic", "int8-static", "int8-weight", "int4-weight"]
    )
    parser.add_argument("--group", type=int, default=32, help="int4-weight: input channels per scale")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per model (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer, ids, mask = hf_models.minilm_sentences(args.batch)

    options = f"scheme={args.scheme},embeddings=true" + (f",group={args.group}" if args.scheme == "int4-weight" else "")
    pipeline = f"quantize{{{options}}}"
    fp32 = optpipe.capture(model, {"input_ids": ids, "attention_mask": mask})
    if args.scheme == "int8-static":  # calibrate on other sentences than the ones measured below
        from optpipe.calibration import with_calibration

        with_calibration(fp32, [hf_models.calibration_set(tokenizer, ids.shape[1])])
    res = optpipe.optimize(fp32, pipeline=pipeline, target="cpu", target_options={"mode": "eager"}, diffs=False)
    record = res.report["passes"][-1]
    stats, verify = record["stats"], record["verify"]
    print(f"pipeline: {res.report['pipeline']}")
    print(
        f"quantized {stats['quantized']} modules, skipped {stats['skipped']}; "
        f"weights {stats['bytes_before'] / 2**20:.1f} MiB -> {stats['bytes_after'] / 2**20:.1f} MiB"
    )
    print(f"verification: sqnr {verify['sqnr_db']:.1f} dB, cosine {verify['cosine']:.5f}, ok={verify['ok']}")

    program = res.program
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for name, prog in (("fp32", fp32), (args.scheme, program)):
            path = os.path.join(tmp, f"{name}.pt2")
            prog.save(path)
            sizes[name] = os.path.getsize(path)
        reloaded = optpipe.load_program(os.path.join(tmp, f"{args.scheme}.pt2"))
    print(
        f"saved program: fp32 {sizes['fp32'] / 2**20:.1f} MiB, {args.scheme} "
        f"{sizes[args.scheme] / 2**20:.1f} MiB ({sizes['fp32'] / sizes[args.scheme]:.2f}x smaller)"
    )

    fp32_ms = latency_ms(lambda: model(input_ids=ids, attention_mask=mask), args.repeat)
    q_ms = latency_ms(lambda: reloaded.gm(ids, mask), args.repeat)
    print(
        f"latency (batch {args.batch}, {args.threads} thread(s)): fp32 eager {fp32_ms:.1f} ms, "
        f"{args.scheme} {q_ms:.1f} ms ({fp32_ms / q_ms:.2f}x)"
    )

    with torch.no_grad():
        reference = embed(lambda i, m: model(input_ids=i, attention_mask=m), ids, mask)
        cosine = torch.nn.functional.cosine_similarity(reference, embed(reloaded.gm, ids, mask), dim=-1)
    print(f"sentence-embedding cosine to fp32: mean {cosine.mean():.4f}, min {cosine.min():.4f}")


if __name__ == "__main__":
    main()
