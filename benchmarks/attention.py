"""Efficient attention vs causal `F.scaled_dot_product_attention`, side by side in one run (fp32, CPU).

    python benchmarks/attention.py                      # seq 1024, 4096, 16384; whole model, 2 layers
    python benchmarks/attention.py --seqs 4096 --threads 1 --model-layers 12
    python benchmarks/attention.py --quick              # seq 1024 only, no whole model (a smoke run)

Attention: batch 1, 8 heads, head dim 64; every kind through its `torch.ops.optpipe` op, against
causal SDPA (linformer, bidirectional only, against bidirectional SDPA). For each sequence length
and for forward and forward+backward:

- latency: the minimum over `--repeat` rounds, the candidates interleaved round by round (so load
  from other processes hits all of them alike); ratio = dense / kind (> 1: the kind is faster);
- peak memory: the growth of the process's peak resident set (Linux VmHWM, reset through
  /proc/self/clear_refs before each call) over its resident set before the call, with glibc told to
  serve every allocation above 128 KiB by mmap (`mallopt(M_MMAP_THRESHOLD)`) so freed tensors
  leave the resident set at once. Inputs, and their gradients kept from an earlier call, are not
  counted; outputs and gradients made by the call are. ratio = kind / dense (< 1: less memory).
  Memory is measured in a child process of its own, after every latency (and the whole model):
  the fixed mmap threshold makes each large allocation fault in fresh pages, which is not what a
  program sees under glibc's default, adaptive threshold, and it slowed the kernels that allocate
  more (linear at 4096: 6.97x dense with it, 9.34x without, in one back-to-back pair); and in the
  timing process the heap keeps what earlier calls freed, so no call would grow the resident set;
- keys: the average number of keys a query attends (dense causal: (n+1)/2); `1/keys` is the
  FLOP-limit speedup of the sparse kinds.

Note that ATen's CPU SDPA for fp32 is already a flash kernel: it never holds the n x n matrix, so
dense attention's memory is O(n·d) and no kind can cut it to a fraction; the `dense-math` row (the
n x n reference implementation) shows what materialising costs.

Whole model: a GPT-2-small-sized model (768 wide, 12 heads, vocab 50257, `--model-layers` layers,
2 by default to bound the run time) captured by optpipe, `fuse-attention` alone vs
`fuse-attention,attention{kind=sliding-window,window=256}`, one training step (forward, LM loss,
backward) at `--model-seq` tokens.

Prints markdown tables; `--json FILE` also writes the rows.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from optpipe.passes import attention_ops as ops

HEADS, HEAD_DIM = 8, 64
MATH_MAX_LEN = 4096  # the n x n `dense-math` row up to this length (16384 would hold 8 GiB of scores)


# -- measurement ---------------------------------------------------------------------------------------
def _malloc_returns_memory() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def peak_memory_mb(fn) -> float | None:
    """Growth of the peak resident set during `fn()`, in MiB (None where /proc is unavailable)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_mb("VmRSS")
    except OSError:
        return None
    fn()
    return max(0.0, _status_mb("VmHWM") - base)


def interleaved_min(candidates: dict, repeat: int) -> dict:
    """{name: best seconds}: one warm-up each, then `repeat` rounds over all candidates."""
    for fn in candidates.values():
        fn()
    best = {name: float("inf") for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


# -- attention kernels ---------------------------------------------------------------------------------
KINDS = {
    # name: (op call, pattern for keys-per-query or None, causal)
    "sliding-window 256": ("sparse", ops.SparsePattern("sliding-window", True, window=256)),
    "block-sparse b64 g64": ("sparse", ops.SparsePattern("block-sparse", True, block=64, global_tokens=64)),
    "random b64 r3 g64": ("sparse", ops.SparsePattern("random", True, block=64, global_tokens=64, random_blocks=3)),
    "strided 64": ("sparse", ops.SparsePattern("strided", True, stride=64)),
    "linear elu c64": ("linear", None),
    "performer m128 c64": ("performer", None),
    "linformer k256 (bidir)": ("linformer", None),
}


def attention_call(kind: str, q, k, v, extra):
    family, pattern = KINDS[kind]
    scale = HEAD_DIM**-0.5
    if family == "sparse":
        p = pattern
        return lambda: ops.sparse_attention(
            q,
            k,
            v,
            None,
            p.kind,
            p.causal,
            scale,
            p.window,
            p.block,
            p.global_tokens,
            p.random_blocks,
            p.stride,
            p.seed,
        )
    if family == "linear":
        return lambda: ops.linear_attention(q, k, v, None, "elu", True, 64)
    if family == "performer":
        return lambda: ops.performer_attention(q, k, v, None, extra["projection"], True, 64, scale, 0)
    return lambda: ops.linformer_attention(q, k, v, None, extra["proj_key"], extra["proj_value"], scale)


def keys_per_query(kind: str, n: int) -> float:
    family, pattern = KINDS[kind]
    if pattern is not None:
        return pattern.keys_per_query(n)
    return float("nan")


def length_candidates(n: int, kinds: list[str]):
    """(names, {train: {name: fn}}) for one sequence length: dense baselines first, the n x n
    `dense-math` row last (up to MATH_MAX_LEN)."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=g) for _ in range(3))
    grad_out = torch.randn(1, HEADS, n, HEAD_DIM, generator=g)
    extra = {
        "projection": ops.orthogonal_random_features(128, HEAD_DIM, seed=0),
        "proj_key": torch.randn(256, n, generator=g) / n**0.5,
        "proj_value": torch.randn(256, n, generator=g) / n**0.5,
    }
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def make(kind, train: bool):
        qq, kk, vv = leaves if train else (q, k, v)
        if kind == "dense":
            call = lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
        elif kind == "dense (bidir)":
            call = lambda: F.scaled_dot_product_attention(qq, kk, vv)
        elif kind == "dense-math":
            math = torch.ops.aten._scaled_dot_product_attention_math
            call = lambda: math(qq, kk, vv, is_causal=True)[0]
        else:
            call = attention_call(kind, qq, kk, vv, extra)
        if not train:

            def forward():
                with torch.no_grad():
                    call()

            return forward

        def step():
            call().backward(grad_out)
            for t in leaves:
                t.grad = None

        return step

    names = ["dense", "dense (bidir)"] + kinds + (["dense-math"] if n <= MATH_MAX_LEN else [])
    return names, {train: {name: make(name, train) for name in names} for train in (False, True)}


def time_length(n: int, kinds: list[str], repeat: int) -> list[dict]:
    """Latency rows of one length (the n x n `dense-math` row timed once, outside the rounds)."""
    names, cands = length_candidates(n, kinds)
    rows = []
    for train, fns in cands.items():
        times = interleaved_min({k: f for k, f in fns.items() if k != "dense-math"}, repeat)
        if "dense-math" in fns:
            times["dense-math"] = interleaved_min({"m": fns["dense-math"]}, 1)["m"]
        for name in names:
            base = "dense (bidir)" if "bidir" in name else "dense"
            rows.append(
                {
                    "seq": n,
                    "mode": "fwd+bwd" if train else "fwd",
                    "kind": name,
                    "ms": times[name] * 1e3,
                    "speedup": times[base] / times[name],
                    "keys": (n + 1) / 2
                    if name in ("dense", "dense-math")
                    else float(n)
                    if name == "dense (bidir)"
                    else keys_per_query(name, n),
                }
            )
    return rows


def peak_memory_rows(seqs: list[int], kinds: list[str]) -> list[dict]:
    """[{seq, mode, kind, peak_mb}] in this process: call it in a fresh one (`--memory-child`)."""
    mmap = _malloc_returns_memory()
    out = []
    for n in seqs:
        started = time.perf_counter()
        _, cands = length_candidates(n, kinds)
        for train, fns in cands.items():
            for fn in fns.values():  # warm-up: lazily built masks and caches are not the call's memory
                fn()
            out += [
                {
                    "seq": n,
                    "mode": "fwd+bwd" if train else "fwd",
                    "kind": name,
                    "peak_mb": peak_memory_mb(fn) if mmap else None,
                }
                for name, fn in fns.items()
            ]
        print(f"seq {n} memory: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return out


def measure_memory(seqs: list[int], kinds: list[str], threads: int | None, rows: list[dict]) -> None:
    """Adds peak_mb / mem_ratio to the latency `rows`, measured by a child process."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-child",
        "--seqs",
        ",".join(map(str, seqs)),
        "--kinds",
        ",".join(kinds),
    ] + (["--threads", str(threads)] if threads else [])
    child = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    mems = {(r["seq"], r["mode"], r["kind"]): r["peak_mb"] for r in json.loads(child.stdout)}
    for row in rows:
        key = (row["seq"], row["mode"], row["kind"])
        base = mems.get((row["seq"], row["mode"], "dense (bidir)" if "bidir" in row["kind"] else "dense"))
        row["peak_mb"] = mems.get(key)
        row["mem_ratio"] = row["peak_mb"] / base if row["peak_mb"] is not None and base else None


# -- whole model --------------------------------------------------------------------------------------
def bench_model(layers: int, seq: int, repeat: int) -> list[dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    import optpipe.passes.attention  # noqa: F401  (registers the pass)
    from optpipe.capture import capture
    from optpipe.pipeline import Pipeline

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=layers, n_embd=768, n_head=12, n_positions=seq, vocab_size=50257, attn_implementation="sdpa"
    )
    model = GPT2LMHeadModel(config).train(False)
    ids = torch.randint(0, config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    program = capture(model, {"input_ids": ids})
    dense, _ = Pipeline.parse("fuse-attention").run(program, verify=False)
    sparse, records = Pipeline.parse("attention{kind=sliding-window,window=256}").run(dense, verify=False)
    assert records[0].stats["rewritten"] == layers, records[0].stats
    long_ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))

    def step(prog):
        def run():
            logits = prog.gm(long_ids)
            loss = F.cross_entropy(logits[0, :-1], long_ids[0, 1:])
            loss.backward()
            for p in prog.gm.parameters():
                p.grad = None

        return run

    def forward(prog):
        def run():
            with torch.no_grad():
                prog.gm(long_ids)

        return run

    rows = []
    for mode, make in (("fwd", forward), ("fwd+bwd", step)):
        times = interleaved_min({"dense": make(dense), "sliding-window 256": make(sparse)}, repeat)
        for name in ("dense", "sliding-window 256"):
            rows.append(
                {
                    "model": f"GPT-2-small-sized, {layers} layers",
                    "seq": seq,
                    "mode": mode,
                    "kind": name,
                    "ms": times[name] * 1e3,
                    "speedup": times["dense"] / times[name],
                }
            )
    return rows


# -- output ------------------------------------------------------------------------------------------------
def _fmt(x, spec):
    return "n/a" if x is None or x != x else format(x, spec)


def attention_table(rows: list[dict]) -> str:
    out = []
    for n in sorted({r["seq"] for r in rows}):
        out.append(f"\n#### seq {n} (batch 1, {HEADS} heads x {HEAD_DIM}, fp32)\n")
        out.append(
            "| kind | keys/query | fwd ms | fwd speedup | fwd peak MiB | fwd mem ratio "
            "| fwd+bwd ms | fwd+bwd speedup | fwd+bwd peak MiB | fwd+bwd mem ratio |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        kinds = [r["kind"] for r in rows if r["seq"] == n and r["mode"] == "fwd"]
        for kind in kinds:
            f = next(r for r in rows if r["seq"] == n and r["mode"] == "fwd" and r["kind"] == kind)
            b = next(r for r in rows if r["seq"] == n and r["mode"] == "fwd+bwd" and r["kind"] == kind)
            out.append(
                f"| {kind} | {_fmt(f['keys'], '.0f')} | {f['ms']:.1f} | {f['speedup']:.2f}x | "
                f"{_fmt(f.get('peak_mb'), '.1f')} | {_fmt(f.get('mem_ratio'), '.2f')} | {b['ms']:.1f} | "
                f"{b['speedup']:.2f}x | {_fmt(b.get('peak_mb'), '.1f')} | {_fmt(b.get('mem_ratio'), '.2f')} |"
            )
    return "\n".join(out)


def model_table(rows: list[dict]) -> str:
    out = [
        "\n#### whole model: one step at seq {} ({})\n".format(rows[0]["seq"], rows[0]["model"]),
        "| attention | fwd ms | fwd speedup | fwd+bwd ms | fwd+bwd speedup |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in ("dense", "sliding-window 256"):
        f = next(r for r in rows if r["mode"] == "fwd" and r["kind"] == kind)
        b = next(r for r in rows if r["mode"] == "fwd+bwd" and r["kind"] == kind)
        out.append(f"| {kind} | {f['ms']:.0f} | {f['speedup']:.2f}x | {b['ms']:.0f} | {b['speedup']:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="1024,4096,16384")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of: " + ", ".join(KINDS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--model-layers", type=int, default=2, help="0 skips the whole-model run")
    parser.add_argument("--model-seq", type=int, default=4096)
    parser.add_argument("--model-repeat", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="seq 1024, one repeat, no whole model")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.seqs, args.repeat, args.model_layers = "1024", 1, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; known: {', '.join(KINDS)}")
    seqs = [int(s) for s in args.seqs.split(",") if s]
    if args.memory_child:
        print(json.dumps(peak_memory_rows(seqs, kinds)))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.processor() or platform.machine()}, cpu capability "
        f"{torch.backends.cpu.get_cpu_capability()}, "
        f"load average {os.getloadavg()[0]:.2f}"
        if hasattr(os, "getloadavg")
        else ""
    )
    rows = []
    for n in seqs:
        started = time.perf_counter()
        rows += time_length(n, kinds, args.repeat)
        print(f"seq {n} latency: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    model_rows = []
    if args.model_layers:
        started = time.perf_counter()
        model_rows = bench_model(args.model_layers, args.model_seq, args.model_repeat)
        print(f"whole model: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    measure_memory(seqs, kinds, args.threads, rows)
    if hasattr(os, "getloadavg"):
        print(f"(load average {os.getloadavg()[0]:.2f} at the end)")
    print(attention_table(rows))
    if model_rows:
        print(model_table(model_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"attention": rows, "model": model_rows, "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
