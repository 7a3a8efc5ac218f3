"""Capture + fuse-attention + verification on a GPT-2-small-sized model (124M params, random init).

    python benchmarks/capture.py [--layers 12] [--seq 128] [--attn eager|sdpa] [--json]

Reports the wall time of each step; the goal is the whole job under 60 s on the project's 2-core
CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import transformers

    import optpipe
    from optpipe.analysis import analyze

    torch.manual_seed(0)
    rows = {}
    t0 = time.perf_counter()
    config = transformers.GPT2Config(n_layer=args.layers, attn_implementation=args.attn)
    model = transformers.GPT2LMHeadModel(config).eval()
    rows["build_model_s"] = time.perf_counter() - t0
    ids = torch.randint(0, config.vocab_size, (1, args.seq))

    t = time.perf_counter()
    program = optpipe.capture(model, (ids,))
    rows["capture_s"] = time.perf_counter() - t

    t = time.perf_counter()
    optimized, records = optpipe.Pipeline.parse("fuse-attention").run(program, verify=True)
    rows["fuse_attention_and_verify_s"] = time.perf_counter() - t
    rows["fuse_attention_s"] = records[0].seconds
    rows["verify_s"] = rows["fuse_attention_and_verify_s"] - records[0].seconds
    rows["total_s"] = rows["capture_s"] + rows["fuse_attention_and_verify_s"]
    rows["params"] = analyze(program).params
    rows["stats"] = records[0].stats
    rows["verify"] = records[0].verify
    rows.update(
        layers=args.layers, seq=args.seq, attn=args.attn, torch=torch.__version__, threads=torch.get_num_threads()
    )
    if args.json:
        print(json.dumps(rows, default=str))
        return
    print(
        f"GPT-2 ({rows['params'] / 1e6:.1f}M params, {args.layers} layers, seq {args.seq}, attn={args.attn}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    for k in ("build_model_s", "capture_s", "fuse_attention_s", "verify_s", "total_s"):
        print(f"  {k:<18} {rows[k]:8.2f} s")
    print(
        f"  fuse-attention stats {rows['stats']}; verify max-abs {rows['verify']['max_abs']:.2e}, "
        f"ok={rows['verify']['ok']}"
    )
    print(f"  goal: capture + fuse-attention + verify < 60 s: {'met' if rows['total_s'] < 60 else 'NOT met'}")


if __name__ == "__main__":
    main()
