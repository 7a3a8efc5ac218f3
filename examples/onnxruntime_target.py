"""Optimize the tiny GPT for ONNX Runtime, save OUT, and run the saved artifact.

    python examples/onnxruntime_target.py [OUT]

OUT/model.onnx is a self-contained ONNX file (dynamic batch and sequence axes): step 3 runs it with
plain onnxruntime, without optpipe or the model's code. `optpipe run OUT --json` does the same
from the command line.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from tiny_gpt import build

import optpipe


def _best_ms(fn, *args, iters: int = 20) -> float:
    """Best of `iters` runs: on a shared 2-core machine the median mostly measures the neighbours."""
    fn(*args)  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def main(out: str) -> None:
    model, example_inputs = build()

    # 1. fuse attention, clean up, lower to onnxruntime; optimize() checks ORT against torch
    res = optpipe.optimize(model, example_inputs, pipeline="fuse-attention,dce", target="onnxruntime")
    info, check = res.report["target_info"], res.report["target_check"]
    print(
        f"exported with {info['exporter']}: opset {info['opset']}, IR {info['ir_version']}, "
        f"{info['onnx_nodes']} ONNX nodes, {info['model_bytes'] / 1e6:.2f} MB; providers {info['providers']}"
    )
    print(f"target check: max-abs {check['max_abs']:.2e} over {check['inputs']} input sets, ok={check['ok']}")
    res.save(out)
    print(f"wrote {out}: {sorted(os.listdir(out))}")

    # 2. load it back the way `optpipe run OUT` does (program.pt2 only for input names)
    from optpipe.program import load_program
    from optpipe.registry import get_target

    program = load_program(os.path.join(out, "program.pt2"))
    compiled = get_target("onnxruntime").load(out, program)
    x = torch.randint(0, 256, (2, 40))  # another batch size and sequence length
    with torch.no_grad():
        err = (compiled(x) - model(x)).abs().max().item()
    print(f"OUT on onnxruntime vs the eager model at batch 2, seq 40: max-abs {err:.2e}")

    # 3. plain onnxruntime: the artifact needs nothing from optpipe
    import onnxruntime as ort

    session = ort.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input_ids": x.numpy()})
    print(
        f"plain onnxruntime: logits {list(logits.shape)}, "
        f"max-abs vs optpipe's runner {abs(logits - compiled(x).numpy()).max():.1e}"
    )

    # 4. latency side by side in one run, best of 20 (a ratio, not a benchmark)
    ids = example_inputs[0]
    with torch.no_grad():
        eager_ms = _best_ms(model, ids)
    ort_ms = _best_ms(compiled, ids)
    print(
        f"latency at {list(ids.shape)}: torch eager {eager_ms:.2f} ms, onnxruntime {ort_ms:.2f} ms "
        f"({eager_ms / ort_ms:.1f}x)"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "OUT"))
