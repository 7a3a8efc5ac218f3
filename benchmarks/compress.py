"""Quantization side by side in one run: speed, saved size and error against fp32 eager.

    python benchmarks/compress.py [--models minilm,gpt2] [--iters 10] [--threads 1] [--json]

Models: the real pretrained all-MiniLM-L6-v2 (batch 8, seq 128, some rows padded) and a
GPT-2-small-sized decoder (transformers GPT2LMHeadModel, random init, 124M params; batch 1, seq 128).

Rows per model (latency: median of --iters rounds after a warm-up, the rows timed round-robin
within each round so a shared machine's load hits them alike; CPU, fp32 activations):
    fp32 eager            the nn.Module itself (the baseline every ratio is against)
    fp32 program          the captured program before quantization (what the pass starts from)
    optpipe int8-dynamic  quantize{scheme=int8-dynamic,embeddings=true}, the saved program reloaded
    torch.ao dynamic      torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, qint8) (its
                          default engine; HF Conv1D layers are not nn.Linear and stay fp32), and for
                          GPT-2 again with its Conv1D layers converted to nn.Linear first (so torch.ao
                          quantizes the same linears as optpipe: the row to compare errors with)
    optpipe int8-static   quantize{scheme=int8-static,embeddings=true} (activation ranges calibrated
                          on the verification inputs: no calibration data attached)
    optpipe int4-weight   quantize{scheme=int4-weight,group=32,embeddings=true} (memory, not speed)
    fp32 fused program    fuse-attention only (the baseline of the prune row)
    optpipe prune mlp 50% fuse-attention,prune{target=mlp,sparsity=0.5}: half of every MLP's channels
                          physically removed; also its speed vs the fused program and the parameter
                          count of the reloaded program against the pass's claim
    ort fp32              the fp32 program through --target onnxruntime (its model.onnx)
    ort quantize_dynamic  onnxruntime.quantization.quantize_dynamic on that same model.onnx
    ort optpipe <scheme>  the optpipe rows' programs through --target onnxruntime; each also gets
                          its speed and SQNR relative to ort quantize_dynamic (--no-onnxruntime: skip)
Columns: latency ratio vs fp32 eager, saved size (program.pt2 for optpipe rows, torch.save of the
module for torch.ao) and its ratio, and the output's error vs fp32 eager (SQNR dB, cosine).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

from benchmarks.models import gpt2_batch, minilm_batch


def minilm():
    return minilm_batch(8, 128)


def gpt2_small():
    return gpt2_batch(128)


MODELS = {"minilm": minilm, "gpt2": gpt2_small}
PIPELINES = {
    "optpipe int8-dynamic": "quantize{scheme=int8-dynamic,embeddings=true}",
    "optpipe int8-static": "quantize{scheme=int8-static,embeddings=true}",
    "optpipe int4-weight": "quantize{scheme=int4-weight,group=32,embeddings=true}",
}


def main_output(out) -> torch.Tensor:
    """The tensor compared: logits or last_hidden_state (HF output objects, tuples, or a tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
    return out[0]


def interleaved_ms(fns: list, iters: int) -> list[float]:
    """Median latency of each fn, timed round-robin (one run of each per round), so that load from
    other processes on a shared machine hits every row alike."""
    times = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            fn()
        for _ in range(iters):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn()
                times[i].append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in times]


def error(ref: torch.Tensor, out: torch.Tensor) -> dict:
    ref, out = ref.float().flatten(), out.float().flatten()
    noise = (ref - out).pow(2).mean().clamp(min=1e-30)
    return {
        "sqnr_db": round(float(10 * torch.log10(ref.pow(2).mean() / noise)), 2),
        "cosine": round(float(torch.nn.functional.cosine_similarity(ref, out, dim=0)), 5),
    }


def bench_model(name, model, inputs, iters: int, tmp: str) -> list[dict]:
    import optpipe
    import optpipe.passes.quantize

    args = tuple(inputs.values())
    with torch.no_grad():
        reference = main_output(model(**inputs))
    program = optpipe.capture(model, inputs)
    fp32_path = os.path.join(tmp, "fp32.pt2")
    program.save(fp32_path)
    fp32_bytes = os.path.getsize(fp32_path)
    candidates = [
        ("fp32 eager", lambda: model(**inputs), fp32_bytes, {}),
        ("fp32 program", lambda: program.gm(*args), fp32_bytes, {}),
    ]
    for label, pipeline in PIPELINES.items():
        quantized, records = optpipe.Pipeline.parse(pipeline).run(program.copy(), verify=False)
        path = os.path.join(tmp, f"{label.split()[-1]}.pt2")
        quantized.save(path)
        loaded = optpipe.load_program(path)
        candidates.append(
            (
                label,
                functools.partial(loaded.gm, *args),
                os.path.getsize(path),
                {"quantized": records[-1].stats["quantized"]},
            )
        )
    candidates[3:3] = torch_ao_rows(model, inputs, tmp)
    candidates += prune_rows(program, args, tmp)
    if ONNXRUNTIME_ROWS:
        candidates += onnxruntime_rows(program, tmp)
    latencies = interleaved_ms([c[1] for c in candidates], iters)
    rows = []
    for (label, fn, size, extra), ms in zip(candidates, latencies):
        with torch.no_grad():
            out = main_output(fn())
        row = {
            "model": name,
            "name": label,
            "latency_ms": round(ms, 2),
            "speedup": round(latencies[0] / ms, 2),
            "size_mb": round(size / 2**20, 1),
            "size_ratio": round(fp32_bytes / size, 2),
            **error(reference, out),
            **extra,
        }
        rows.append(row)
        print(
            f"  {label:<24} {ms:9.2f} ms {row['speedup']:5.2f}x  {row['size_mb']:8.1f} MB "
            f"{row['size_ratio']:5.2f}x smaller  sqnr {row['sqnr_db']:6.2f} dB  cos {row['cosine']:.5f}",
            file=sys.stderr,
        )
    compare_with_ort_quantize_dynamic(rows)
    check_prune_claims(rows)
    return rows


def torch_ao_rows(model, inputs, tmp: str) -> list[tuple]:
    """torch.ao's quantize_dynamic on the model as it is and, when it has HF Conv1D layers (GPT-2),
    on a copy with those converted to nn.Linear, so that torch.ao quantizes the same linears
    optpipe does (the fair error comparison)."""
    rows = [_torch_ao_row(copy.deepcopy(model), inputs, tmp, "")]
    converted = _conv1d_as_linear(copy.deepcopy(model))
    if converted is not None:
        rows.append(_torch_ao_row(converted, inputs, tmp, "; Conv1D as nn.Linear"))
    return rows


def _torch_ao_row(model, inputs, tmp: str, note: str) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        path = os.path.join(tmp, f"ao{len(note)}.pt")
        torch.save(ao, path)
    return (
        f"torch.ao dynamic ({torch.backends.quantized.engine}{note})",
        lambda: ao(**inputs),
        os.path.getsize(path),
        {},
    )


def _conv1d_as_linear(model):
    """`model` with every transformers Conv1D replaced by the equivalent nn.Linear (None: it has none)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    found = False
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)
                found = True
    return model if found else None


# -- onnxruntime rows: optpipe's ONNX lowerings vs onnxruntime.quantization on the same model ----------------
ONNXRUNTIME_ROWS = True
PRUNE_PIPELINES = {
    "fp32 fused program": "fuse-attention",
    "optpipe prune mlp 50%": "fuse-attention,prune{target=mlp,sparsity=0.5}",
}


def prune_rows(program, args: tuple, tmp: str) -> list[tuple]:
    """The fused fp32 program and the structured-pruned one (saved and reloaded), with the
    parameter counts the pass claims and the reloaded program has."""
    import optpipe
    import optpipe.passes.prune

    rows = []
    for label, pipeline in PRUNE_PIPELINES.items():
        pruned, records = optpipe.Pipeline.parse(pipeline).run(program.copy(), verify=False)
        path = os.path.join(tmp, f"prune-{len(rows)}.pt2")
        pruned.save(path)
        loaded = optpipe.load_program(path)
        extra = {"params": sum(p.numel() for p in loaded.gm.parameters())}
        if records[-1].name == "prune":
            stats = records[-1].stats
            extra.update(
                params_claimed=stats["params_after"],
                params_before=stats["params_before"],
                pruned_channels=stats["pruned_channels"],
            )
        rows.append((label, functools.partial(loaded.gm, *args), os.path.getsize(path), extra))
    return rows


def check_prune_claims(rows: list[dict]) -> None:
    """Speed of the pruned program against the fused one (what pruning alone buys), and whether
    the reloaded program has the parameter count the pass reported."""
    fused = next((r for r in rows if r["name"] == "fp32 fused program"), None)
    for row in rows:
        if "params_claimed" in row and fused is not None:
            row["speedup_vs_fused"] = round(fused["latency_ms"] / row["latency_ms"], 2)
            row["params_ok"] = row["params"] == row["params_claimed"]
            print(
                f"  {row['name']}: {row['speedup_vs_fused']:.2f}x vs the fused program, "
                f"{row['speedup']:.2f}x vs fp32 eager; params {row['params_before'] / 1e6:.2f}M -> "
                f"{row['params'] / 1e6:.2f}M (claimed {row['params_claimed'] / 1e6:.2f}M, "
                f"{'matches' if row['params_ok'] else 'MISMATCH'})",
                file=sys.stderr,
            )


ORT_PIPELINES = {
    "ort fp32": "dce",
    "ort optpipe int8-dynamic": PIPELINES["optpipe int8-dynamic"],
    "ort optpipe int8-static": PIPELINES["optpipe int8-static"],
    "ort optpipe int4-weight": PIPELINES["optpipe int4-weight"],
}
ORT_QUANTIZE_DYNAMIC = "ort quantize_dynamic"


def onnxruntime_rows(program, tmp: str) -> list[tuple]:
    """Rows on ONNX Runtime: the fp32 program through `--target onnxruntime` (its model.onnx), that
    same file through `onnxruntime.quantization.quantize_dynamic` (defaults: int8 weights per
    tensor, uint8 activations per tensor), and optpipe's quantized programs through the target.
    Every session: CPU provider, ORT_ENABLE_ALL, intra-op threads = torch's."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import quantize_dynamic
    except ImportError as e:
        print(f"  (onnxruntime rows skipped: {e})", file=sys.stderr)
        return []
    import optpipe
    from optpipe.registry import get_target

    # compiled directly rather than through optimize() (whose target check judges the ORT program
    # against the torch program): the rows below report every row's error against fp32 eager
    tmp = tempfile.mkdtemp(dir=tmp)  # one folder per model
    target, paths = get_target("onnxruntime"), {}
    for label, pipeline in ORT_PIPELINES.items():
        quantized, _ = optpipe.Pipeline.parse(pipeline).run(program.copy(), verify=False)
        out = os.path.join(tmp, label.replace(" ", "_"))
        os.makedirs(out)
        target.save(target.compile(quantized), out)
        paths[label] = os.path.join(out, "model.onnx")
        if label == "ort fp32":
            paths[ORT_QUANTIZE_DYNAMIC] = os.path.join(tmp, "ort_quantize_dynamic.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(paths[label], paths[ORT_QUANTIZE_DYNAMIC])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    options.log_severity_level = 3
    rows = []
    for label, path in paths.items():
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        feed = {n: x.numpy() for n, x in zip(program.input_names, program.example_inputs) if n in names}
        rows.append((label, functools.partial(_first_output, session, feed), os.path.getsize(path), {}))
    return rows


def _first_output(session, feed) -> torch.Tensor:
    return torch.from_numpy(session.run(None, feed)[0])


def compare_with_ort_quantize_dynamic(rows: list[dict]) -> None:
    """Adds to each optpipe ORT row its speed relative to onnxruntime's quantize_dynamic (>1: faster)
    and whether its error is no worse (SQNR vs fp32 eager)."""
    baseline = next((r for r in rows if r["name"] == ORT_QUANTIZE_DYNAMIC), None)
    if baseline is None:
        return
    for row in rows:
        if row["name"].startswith("ort optpipe"):
            row["speed_vs_ort_qd"] = round(baseline["latency_ms"] / row["latency_ms"], 2)
            row["sqnr_vs_ort_qd_db"] = round(row["sqnr_db"] - baseline["sqnr_db"], 2)
            print(
                f"  {row['name']:<24} vs {ORT_QUANTIZE_DYNAMIC}: {row['speed_vs_ort_qd']:.2f}x speed, "
                f"{row['sqnr_vs_ort_qd_db']:+.2f} dB SQNR",
                file=sys.stderr,
            )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,gpt2")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the machine is shared)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-onnxruntime", action="store_true", help="skip the onnxruntime rows (exports are slow)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global ONNXRUNTIME_ROWS
    ONNXRUNTIME_ROWS = not args.no_onnxruntime
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            name, model, inputs = MODELS[key]()
            print(f"{name} ({args.threads} thread(s), median of {args.iters})", file=sys.stderr)
            rows += bench_model(name, model, inputs, args.iters, tmp)
    if args.json:
        print(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
