"""Generation speed, side by side in one run: no cache vs optpipe's kv-cache vs transformers' generate().

    python benchmarks/generate.py [--prompt 128] [--new 512] [--no-cache-tokens 64] [--json]

Model: GPT-2 small (124M params, random init from its config), greedy decoding, batch 1.
Rows (tokens/s, and the ratio to the no-cache row):
  (a) no cache: the captured program recomputes the whole sequence for every new token. Its cost
      per token only grows with the length, so by default it runs the first --no-cache-tokens of
      the --new tokens (its tokens/s there is an upper bound for the full run; the ratios are
      lower bounds); --no-cache-tokens 0 runs all of them.
  (b) optpipe: `fuse-attention,dce,kv-cache{max-len=prompt+new}`, the step program run eagerly,
      and (b') the same step program through torch.compile (what `--target cpu --mode compile` runs).
      Its caches are static (prompt+new slots); each step attends over the filled slots only.
  (c) transformers' own `model.generate()` with its dynamic cache, same weights.
(b), (b') and (c) each get a short warm-up generation first.
Checks: (b) produces exactly the tokens of (c) and, over the tokens (a) ran, of (a).

Also, with --linear: per-token decode latency of the linear-attention cache (recurrent state) at
context 256 vs 8192 (a GPT-2-small-sized model with all layers `attention{kind=linear}`), and with
--speculative: speculative decoding with a draft made of the first half of the layers
(acceptance rate and speedup over (b)).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from benchmarks.models import gpt2_small  # noqa: E402


def cached_program(model, prompt: torch.Tensor, max_len: int, extra: str = ""):
    import optpipe

    program = optpipe.capture(model, {"input_ids": prompt})
    pipeline = f"fuse-attention,dce{extra},kv-cache{{max-len={max_len}}}"
    step, _ = optpipe.Pipeline.parse(pipeline).run(program, verify=False)
    return program, step


def hf_generate(model, prompt: torch.Tensor, new: int):
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
        seconds = time.perf_counter() - start
    return out[0, prompt.shape[1]:].tolist(), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--no-cache-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--linear", action="store_true", help="linear-attention decode latency at 256 vs 8192")
    ap.add_argument("--speculative", action="store_true", help="speculative decoding with a half-depth draft")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from optpipe.generation import generate

    model = gpt2_small()
    prompt = torch.randint(0, 50257, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    max_len = args.prompt + args.new
    base, step = cached_program(model, prompt, max_len)
    rows = []

    hf_generate(model, prompt, 4)  # warm-up, as (b) gets
    hf_tokens, hf_s = hf_generate(model, prompt, args.new)
    generate(step, prompt, 4)  # warm-up
    cached = generate(step, prompt, args.new)
    n_a = args.new if args.no_cache_tokens <= 0 else min(args.no_cache_tokens, args.new)
    compiled_gm = torch.compile(step.gm, dynamic=True)

    def compiled_step(*inputs):
        with torch.no_grad():
            return compiled_gm(*inputs)

    generate(step, prompt, 4, step=compiled_step)  # compiles prefill and decode shapes
    compiled = generate(step, prompt, args.new, step=compiled_step)
    plain = generate(base, prompt, n_a)
    rows.append({"name": f"(a) no cache (first {n_a} tokens)", "tokens": n_a, "seconds": plain.seconds,
                 "tokens_per_s": plain.tokens_per_s})
    rows.append({"name": "(b) optpipe kv-cache", "tokens": args.new, "seconds": cached.seconds,
                 "tokens_per_s": cached.tokens_per_s, "prefill_s": cached.prefill_seconds})
    rows.append({"name": "(b') optpipe kv-cache, torch.compile", "tokens": args.new, "seconds": compiled.seconds,
                 "tokens_per_s": compiled.tokens_per_s, "prefill_s": compiled.prefill_seconds})
    rows.append({"name": "(c) transformers generate()", "tokens": args.new, "seconds": hf_s,
                 "tokens_per_s": args.new / hf_s})
    checks = {"b_equals_c": cached.new_ids[0] == hf_tokens, "b_compiled_equals_c": compiled.new_ids[0] == hf_tokens,
              "b_equals_a": cached.new_ids[0][:n_a] == plain.new_ids[0]}
    a_rate = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_no_cache"] = r["tokens_per_s"] / a_rate
    result = {"model": "GPT-2 small (124M, random init)", "prompt": args.prompt, "new": args.new,
              "threads": torch.get_num_threads(), "rows": rows, "checks": checks,
              "b_vs_c": rows[1]["tokens_per_s"] / rows[3]["tokens_per_s"],
              "b_compiled_vs_c": rows[2]["tokens_per_s"] / rows[3]["tokens_per_s"]}
    if args.speculative:
        result["speculative"] = speculative(model, prompt, args.new, max_len, cached)
    if args.linear:
        result["linear_decode"] = linear_decode()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']}, prompt {args.prompt}, {args.new} new tokens, greedy, batch 1, "
          f"{result['threads']} threads")
    print(f"{'row':34s} {'tokens/s':>9s} {'vs (a)':>8s}")
    for r in rows:
        print(f"{r['name']:34s} {r['tokens_per_s']:9.2f} {r['vs_no_cache']:7.1f}x")
    print(f"(b) / (c) = {result['b_vs_c']:.2f}x, (b') / (c) = {result['b_compiled_vs_c']:.2f}x; checks: {checks}")
    if "speculative" in result:
        s = result["speculative"]
        print(f"speculative (draft: first {s['draft_layers']} layers, k={s['k']}): acceptance "
              f"{s['acceptance_rate']:.1%}, {s['tokens_per_s']:.2f} tokens/s = {s['speedup_vs_b']:.2f}x (b); "
              f"same tokens as (b): {s['same_tokens']}")
    if "linear_decode" in result:
        d = result["linear_decode"]
        print(f"linear-attention decode, ms/token: context {d['short']} {d['short_ms']:.2f}, context "
              f"{d['long']} {d['long_ms']:.2f} (ratio {d['ratio']:.2f}x)")


def speculative(model, prompt, new, max_len, reference, k: int = 4) -> dict:
    """Draft: the same weights with only the first half of the layers."""
    import copy

    from optpipe.generation import generate

    draft_model = copy.deepcopy(model)
    half = len(draft_model.transformer.h) // 2
    draft_model.transformer.h = draft_model.transformer.h[:half]
    draft_model.config.n_layer = half
    _, target = cached_program(model, prompt, max_len + k + 1)
    _, draft = cached_program(draft_model, prompt, max_len + k + 1)
    res = generate(target, prompt, new, draft=draft, draft_tokens=k)
    return {"draft_layers": half, "k": k, "acceptance_rate": res.acceptance_rate, "tokens_per_s": res.tokens_per_s,
            "speedup_vs_b": res.tokens_per_s / reference.tokens_per_s,
            "same_tokens": res.new_ids == reference.new_ids}


def linear_decode(short: int = 256, long: int = 8192, steps: int = 32) -> dict:
    """Per-token decode latency with the linear-attention recurrent state, after a prompt of
    `short` vs `long` tokens (GPT-2-small-sized, all layers linear)."""
    from optpipe.generation import filled, prefill

    model = gpt2_small(positions=long + steps)
    prompt = torch.randint(0, 50257, (1, 64))
    _, step = cached_program(model, prompt, long + steps, extra=",attention{kind=linear}")
    kv = step.meta["kv_cache"]
    out = {"short": short, "long": long}
    for label, n in (("short", short), ("long", long)):
        ids = torch.randint(0, 50257, (1, n))
        with torch.no_grad():
            _, key_mask, caches = prefill(step.gm, kv, ids)
            times = []
            for i in range(steps):
                key_mask[:, n + i] = True
                slot = torch.tensor([n + i])
                start = time.perf_counter()
                _, *caches = step.gm(ids[:, :1], slot[None], slot, filled(key_mask, n + i + 1), *caches)
                times.append(time.perf_counter() - start)
        out[f"{label}_ms"] = 1000 * sorted(times)[len(times) // 2]
    out["ratio"] = out["long_ms"] / out["short_ms"]
    return out


if __name__ == "__main__":
    main()
