"""Generation speed, side by side in one run: no cache vs optpipe's kv-cache vs transformers' generate().

    python benchmarks/generate.py [--prompt 128] [--new 512] [--no-cache-tokens 64] [--json]
    python benchmarks/generate.py --prompt 128 --new 512 --no-cache-sample 16 --threads 1

Model: GPT-2 small (124M params, random init from its config; `--model tiny-gpt`: examples/tiny_gpt.py,
nanoGPT-style, 4 layers x 128), greedy decoding, batch 1.
Rows (tokens/s, and the ratio to the no-cache row):
  (a) no cache: the captured program recomputes the whole sequence for every new token. Its cost
      per token only grows with the length, so by default it runs the first --no-cache-tokens of
      the --new tokens (its tokens/s there is an upper bound for the full run; the ratios are
      lower bounds); --no-cache-tokens 0 runs all of them.
      --no-cache-sample K instead estimates (a) over the whole run without running every step:
      step i of (a) is one full forward over the prompt + the first i generated tokens, then an
      argmax, at context length prompt+i (prompt .. prompt+new-1). That step is timed (median of
      --no-cache-repeats runs) at every K-th context length, and at the last one; the prefixes are
      taken from (b)'s generated tokens, so they are exactly what (a) would see, and each sampled
      step's argmax is checked against the token (b) produced at that position (the count of
      agreements is reported). (a)'s total time is then an ESTIMATE: the sampled per-step times
      are linearly interpolated over context length and summed over all `new` context lengths
      (the trapezoid rule over context length, exact if the per-step time is piecewise linear
      between samples). (a)'s tokens/s = new / that estimated total, and the "vs (a)" ratios use
      it. With --no-cache-sample, (a) is not run for real unless --no-cache-tokens N > 0 is given;
      then (a) also runs over the first N tokens, an extra row shown next to the estimate for
      the same stretch.
  (b) optpipe: `fuse-attention,dce,kv-cache{max-len=prompt+new}`, the step program run eagerly,
      and (b') the same step program through torch.compile (what `--target cpu --mode compile` runs).
      Its caches are static (prompt+new slots); each step attends over the filled slots only.
  (c) transformers' own `model.generate()` with its dynamic cache, same weights (GPT-2 small only).
  (d) default options, what a user gets: `optpipe.optimize(..., target="cpu")` (`optimize` without
      --mode: the target picks eager or torch.compile on decode steps), saved, loaded back the way
      `optpipe generate OUT` loads it (`Target.load`, which warms a compiled program up), then
      generated through the target's step function; the mode it picked is in the row's name.
(b), (b'), (c) and (d) each get a short warm-up generation first, then run --repeats times (default 5)
round-robin, the first to go rotating; each row shows its fastest run (the least disturbed by other
work on the machine; the range over the runs is printed too).
Checks: (d) is within 10% of the best of (b) and (b') and at least as fast as (c); (b) produces
exactly the tokens of (c) and, over the tokens (a) ran, of (a) (with
--no-cache-sample: at the sampled positions).

With --encoder-decoder: T5 (random init, examples/seq2seq.py's t5() at --width/--layers, default
256 x 4), greedy --new tokens from one prompt of --prompt tokens: (e) no cache (the captured
program runs encoder and decoder over the whole prefix per token), (f) `fuse-attention,kv-cache`
(the encoder once, cached decoder steps; eager), (f') the same step program through torch.compile
(what `--target cpu` picks when it is faster), (g) transformers' generate(); EOS does not stop
(e) and (f) (HF gets min_new_tokens), and (f), (f') must give (e)'s tokens.

    python benchmarks/generate.py --encoder-decoder --prompt 64 --new 128 --repeats 3

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

import torch

from benchmarks.models import gpt2_small

MODELS = ("gpt2-small", "tiny-gpt")


def cached_program(model, prompt: torch.Tensor, max_len: int, extra: str = ""):
    import optpipe

    program = optpipe.capture(model, {"input_ids": prompt})
    pipeline = f"fuse-attention,dce{extra},kv-cache{{max-len={max_len}}}"
    step, _ = optpipe.Pipeline.parse(pipeline).run(program, verify=False)
    return program, step


def hf_generate(model, prompt: torch.Tensor, new: int):
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        seconds = time.perf_counter() - start
    return out[0, prompt.shape[1] :].tolist(), seconds


class HFRun:
    """(c)'s result in the shape of a GenerationResult (the fields the rows use)."""

    def __init__(self, new_ids: list[int], seconds: float):
        self.new_ids, self.seconds = new_ids, seconds
        self.tokens_per_s = len(new_ids) / seconds


def sample_no_cache(base, prompt: torch.Tensor, new_ids: list[int], every: int, repeats: int) -> dict:
    """Time (a)'s per-token step (full forward over the prefix + argmax) at every `every`-th context
    length from prompt to prompt+new-1 (plus the last), with prefixes from `new_ids` ((b)'s tokens).
    Estimates (a)'s total over all `new` steps by linear interpolation of the sampled times over
    context length, summed at every context length (trapezoid rule)."""
    p, new = prompt.shape[1], len(new_ids)
    full = torch.cat([prompt, torch.tensor([new_ids], dtype=prompt.dtype)], dim=1)
    offsets = sorted(set(range(0, new, every)) | {new - 1})  # step i runs at context p + i
    contexts, times, agree = [], [], 0
    with torch.no_grad():
        base.gm(full[:, :p])  # warm-up, as the other rows get
        for i in offsets:
            ids = full[:, : p + i].clone()
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                logits = base.gm(ids)
                logits = logits[0] if isinstance(logits, (tuple, list)) else logits
                token = int(logits[:, -1].argmax(-1))
                runs.append(time.perf_counter() - start)
            agree += token == new_ids[i]
            contexts.append(p + i)
            times.append(sorted(runs)[len(runs) // 2])
    per_step = interpolate(contexts, times)  # one estimate per context length p .. p+new-1
    total = sum(per_step)
    return {
        "every": every,
        "repeats": repeats,
        "samples": len(offsets),
        "agree": agree,
        "contexts": contexts,
        "step_seconds": times,
        "per_step_estimate": per_step,
        "estimated_seconds": total,
        "tokens_per_s": new / total,
    }


def interpolate(xs: list[int], ys: list[float]) -> list[float]:
    """ys linearly interpolated at every integer from xs[0] to xs[-1] (xs increasing)."""
    out = []
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        out += [y0 + (y1 - y0) * (x - x0) / (x1 - x0) for x in range(x0, x1)]
    return out + [ys[-1]]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument(
        "--no-cache-tokens",
        type=int,
        default=None,
        help="run (a) for real over the first N tokens (default 64; 0: all). With "
        "--no-cache-sample: not run by default or with 0",
    )
    ap.add_argument(
        "--no-cache-sample",
        type=int,
        default=0,
        metavar="K",
        help="estimate (a) over the whole run from its step timed at every K-th context length",
    )
    ap.add_argument("--no-cache-repeats", type=int, default=3, help="timed runs per sampled context (median)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="generations per row for (b), (b'), (c) and (d), round-robin; each row shows its fastest",
    )
    ap.add_argument("--model", choices=MODELS, default="gpt2-small")
    ap.add_argument("--linear", action="store_true", help="linear-attention decode latency at 256 vs 8192")
    ap.add_argument("--speculative", action="store_true", help="speculative decoding with a half-depth draft")
    ap.add_argument("--encoder-decoder", action="store_true", help="T5: kv-cache vs no cache vs generate()")
    ap.add_argument("--width", type=int, default=256, help="--encoder-decoder: T5's d_model")
    ap.add_argument("--layers", type=int, default=4, help="--encoder-decoder: T5's encoder and decoder layers")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args()


def real_no_cache_tokens(args) -> int:
    """How many tokens (a) generates for real (0: none)."""
    if args.no_cache_tokens is None:
        return 0 if args.no_cache_sample > 0 else min(64, args.new)
    if args.no_cache_sample > 0:
        return min(max(args.no_cache_tokens, 0), args.new)  # 0 here: skip the real run
    return args.new if args.no_cache_tokens <= 0 else min(args.no_cache_tokens, args.new)


def no_cache_rows(args, base, prompt, cached) -> tuple[list[dict], dict, dict | None]:
    """Row (a): without a cache, estimated over the whole run and/or measured over its first tokens."""
    from optpipe.runtime.generation import generate

    rows, checks, sampled = [], {}, None
    if args.no_cache_sample > 0:
        sampled = sample_no_cache(base, prompt, cached.new_ids[0], args.no_cache_sample, max(1, args.no_cache_repeats))
        rows.append(
            {
                "name": f"(a) no cache (all {args.new}, estimated)",
                "tokens": args.new,
                "seconds": sampled["estimated_seconds"],
                "tokens_per_s": sampled["tokens_per_s"],
                "estimated": True,
            }
        )
        checks["a_sampled_agrees_with_b"] = f"{sampled['agree']}/{sampled['samples']}"
    n_a = real_no_cache_tokens(args)
    if n_a:
        plain = generate(base, prompt, n_a)
        real = {
            "name": f"(a) no cache (first {n_a} tokens)",
            "tokens": n_a,
            "seconds": plain.seconds,
            "tokens_per_s": plain.tokens_per_s,
        }
        if sampled is not None:  # the estimate for the same stretch, as a cross-check
            real["estimate_same_tokens_s"] = sum(sampled["per_step_estimate"][:n_a])
        rows.append(real)
        checks["b_equals_a"] = cached.new_ids[0][:n_a] == plain.new_ids[0]
    return rows, checks, sampled


def cached_row(name: str, tokens: int, result) -> dict:
    return {
        "name": name,
        "tokens": tokens,
        "seconds": result.seconds,
        "tokens_per_s": result.tokens_per_s,
        "prefill_s": result.prefill_seconds,
    }


def build_model(name: str, max_len: int):
    """(model, vocabulary, description, is a transformers model)."""
    if name == "tiny-gpt":
        from examples import tiny_gpt

        model, _ = tiny_gpt.build(block_size=max(256, max_len), vocab_size=512, n_layer=4, n_embd=128, n_head=4)
        return model.eval(), 512, "tiny GPT (examples/tiny_gpt.py, 4 x 128, random init)", False
    return gpt2_small(positions=max(1024, max_len)), 50257, "GPT-2 small (124M, random init)", True


def default_options_step(model, prompt: torch.Tensor, max_len: int):
    """(d): optimize with the default target options, save, load as `optpipe generate` does; returns
    (the program, the target's step function, the mode `auto` chose and why)."""
    import tempfile

    import optpipe
    from optpipe.loading import load_out
    from optpipe.runtime.generation import target_step_function
    from optpipe.target import load_compiled

    res = optpipe.optimize(
        model, {"input_ids": prompt}, f"fuse-attention,dce,kv-cache{{max-len={max_len}}}", target="cpu", verify=False
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "OUT")
        res.save(out)
        program, _ = load_out(out)
        tgt = res.target
        compiled = load_compiled(tgt, out, program)  # what `optpipe generate OUT` runs
    return program, target_step_function(tgt, compiled), res.compiled.info


def interleaved_runs(runs: dict, repeats: int) -> dict:
    """Each of `runs` (name -> a generation) `repeats` times, round-robin with the first to go
    rotating, so that a burst of load on a shared machine hits every row, not one. Returns name ->
    the fastest run (the least disturbed) and the spread of tokens/s over the repeats."""
    names = list(runs)
    results: dict[str, list] = {name: [] for name in names}
    for r in range(max(1, repeats)):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            results[name].append(runs[name]())
    return {name: (max(rs, key=lambda x: x.tokens_per_s), [x.tokens_per_s for x in rs]) for name, rs in results.items()}


def timed_generations(args, model, prompt, max_len: int, step, is_hf: bool) -> tuple[dict, dict]:
    """Rows (b), (b'), (c) and (d), each warmed up, then run `--repeats` times round-robin. Returns
    (name -> (fastest run, tokens/s of every run), what `auto` chose for (d) and why)."""
    from optpipe.runtime.generation import generate

    compiled_gm = torch.compile(step.gm, dynamic=True)

    def compiled_step(*inputs):
        with torch.no_grad():
            return compiled_gm(*inputs)

    program, default_step, chose = default_options_step(model, prompt, max_len)
    runs = {
        "b": lambda: generate(step, prompt, args.new),
        "b'": lambda: generate(step, prompt, args.new, step=compiled_step),
        "d": lambda: generate(program, prompt, args.new, step=default_step),
    }
    if is_hf:
        runs["c"] = lambda: HFRun(*hf_generate(model, prompt, args.new))
        hf_generate(model, prompt, 4)
    generate(step, prompt, 4)  # warm-ups (the compiled ones: their prefill and decode shapes)
    generate(step, prompt, 4, step=compiled_step)
    generate(program, prompt, 4, step=default_step)
    return interleaved_runs(runs, args.repeats), chose


def measure(args) -> dict:
    """Rows (a), (b), (b'), (c) and (d), with the checks that they generate the same tokens."""
    max_len = args.prompt + args.new
    model, vocab, description, is_hf = build_model(args.model, max_len)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    base, step = cached_program(model, prompt, max_len)
    timed, chose = timed_generations(args, model, prompt, max_len, step, is_hf)
    (cached, _), (compiled, _), (default_out, _) = timed["b"], timed["b'"], timed["d"]
    default_tokens = default_out.new_ids[0]
    default = cached_row(f"(d) default options (auto -> {chose.get('mode')})", args.new, default_out)
    default["reason"] = chose.get("reason")
    if is_hf:
        hf_tokens, hf_s = timed["c"][0].new_ids, timed["c"][0].seconds
    rows, checks, sampled = no_cache_rows(args, base, prompt, cached)
    rows.append(cached_row("(b) optpipe kv-cache", args.new, cached))
    rows.append(cached_row("(b') optpipe kv-cache, torch.compile", args.new, compiled))
    if is_hf:
        rows.append(
            {
                "name": "(c) transformers generate()",
                "tokens": args.new,
                "seconds": hf_s,
                "tokens_per_s": args.new / hf_s,
            }
        )
    rows.append(default)
    checks.update({"b_compiled_equals_b": compiled.new_ids[0] == cached.new_ids[0]})
    checks["d_equals_b"] = default_tokens == cached.new_ids[0]
    for r in rows:
        r["vs_no_cache"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    by_name = {r["name"][:4]: r for r in rows}
    best = max(by_name["(b) "]["tokens_per_s"], by_name["(b')"]["tokens_per_s"])
    spread = {key: [round(x, 2) for x in timed[key][1]] for key in timed}
    result = {
        "model": description,
        "repeats": args.repeats,
        "tokens_per_s_each_run": spread,
        "prompt": args.prompt,
        "new": args.new,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "checks": checks,
        "d_vs_best": default["tokens_per_s"] / best,
    }
    if is_hf:
        checks.update({"b_equals_c": cached.new_ids[0] == hf_tokens})
        b_compiled, c = by_name["(b')"], by_name["(c) "]
        result["b_vs_c"] = by_name["(b) "]["tokens_per_s"] / c["tokens_per_s"]
        result["b_compiled_vs_c"] = b_compiled["tokens_per_s"] / c["tokens_per_s"]
        result["d_vs_c"] = default["tokens_per_s"] / c["tokens_per_s"]
    if sampled is not None:
        result["no_cache_sample"] = {k: v for k, v in sampled.items() if k != "per_step_estimate"}
    if args.speculative:
        result["speculative"] = speculative(model, prompt, args.new, max_len, cached)
    if args.linear:
        result["linear_decode"] = linear_decode()
    return result


def print_result(result: dict, args) -> None:
    rows, checks = result["rows"], result["checks"]
    print(
        f"{result['model']}, prompt {args.prompt}, {args.new} new tokens, greedy, batch 1, {result['threads']} threads"
    )
    if "no_cache_sample" in result:
        s = result["no_cache_sample"]
        print(
            f"(a) over all {args.new} tokens is an ESTIMATE: its step (full forward + argmax) timed at "
            f"{s['samples']} context lengths ({s['contexts'][0]}, {s['contexts'][0] + s['every']}, ... , "
            f"{s['contexts'][-1]}; median of {s['repeats']}), {s['step_seconds'][0] * 1000:.0f} ms at "
            f"{s['contexts'][0]} to {s['step_seconds'][-1] * 1000:.0f} ms at {s['contexts'][-1]}, "
            f"interpolated linearly and summed over every context length (trapezoid rule): "
            f"{s['estimated_seconds']:.1f} s in all; sampled next tokens equal to (b)'s: {s['agree']}/{s['samples']}"
        )
    width = max(34, *(len(r["name"]) for r in rows))
    print(f"{'row':{width}s} {'tokens/s':>9s} {'vs (a)':>8s}")
    for r in rows:
        print(f"{r['name']:{width}s} {r['tokens_per_s']:9.2f} {r['vs_no_cache']:7.1f}x")
        if "estimate_same_tokens_s" in r:
            print(
                f"{'':{width}s} (measured {r['seconds']:.1f} s; the estimate for the same {r['tokens']} "
                f"tokens: {r['estimate_same_tokens_s']:.1f} s)"
            )
    ratios = f"(d) / best of (b), (b') = {result['d_vs_best']:.2f}x"
    if "b_vs_c" in result:
        ratios += (
            f", (d) / (c) = {result['d_vs_c']:.2f}x, (b) / (c) = {result['b_vs_c']:.2f}x, "
            f"(b') / (c) = {result['b_compiled_vs_c']:.2f}x"
        )
    print(f"{ratios}; checks: {checks}")
    each = ", ".join(f"({k}) {min(v):.1f}-{max(v):.1f}" for k, v in result["tokens_per_s_each_run"].items())
    print(f"rows (b), (b'), (c), (d): the fastest of {result['repeats']} runs, round-robin; tokens/s range: {each}")
    print(f"(d) chose: {rows[-1].get('reason')}")
    if "speculative" in result:
        s = result["speculative"]
        print(
            f"speculative (draft: first {s['draft_layers']} layers, k={s['k']}): acceptance "
            f"{s['acceptance_rate']:.1%}, {s['tokens_per_s']:.2f} tokens/s = {s['speedup_vs_b']:.2f}x (b); "
            f"same tokens as (b): {s['same_tokens']}"
        )
    if "linear_decode" in result:
        d = result["linear_decode"]
        print(
            f"linear-attention decode, ms/token: context {d['short']} {d['short_ms']:.2f}, context "
            f"{d['long']} {d['long_ms']:.2f} (ratio {d['ratio']:.2f}x)"
        )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.encoder_decoder:
        result = encoder_decoder(args)
        print(json.dumps(result, indent=2) if args.json else encoder_decoder_text(result))
        return
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_result(result, args)


def encoder_decoder(args) -> dict:
    """Rows (e), (f) and (g) (see the module docstring), round-robin, each its fastest run."""
    import optpipe
    from examples.seq2seq import t5
    from optpipe.runtime.generation import generate

    model, inputs = t5(seq=args.prompt, width=args.width, layers=args.layers)
    plain = optpipe.capture(model, inputs)
    plain, _ = optpipe.Pipeline.parse("fuse-attention,dce").run(plain, verify=False)
    cached, _ = optpipe.Pipeline.parse(f"kv-cache{{max-len={args.new + 1}}}").run(plain, verify=False)
    eos = model.config.eos_token_id
    for program in (plain, cached):  # every row makes --new tokens
        program.meta["config"] = dict(program.meta.get("config") or {}, eos_token_id=None)
    prompt = torch.randint(0, 256, (1, args.prompt), generator=torch.Generator().manual_seed(0))

    def hf():
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                min_new_tokens=args.new, do_sample=False, num_beams=1,
            )  # fmt: skip
        return HFRun(out[0, 1:].tolist(), time.perf_counter() - start)

    compiled_gm = torch.compile(cached.gm, dynamic=True)

    def compiled_step(*inputs):
        with torch.no_grad():
            return compiled_gm(*inputs)

    runs = {
        "e": lambda: generate(plain, prompt, args.new),
        "f": lambda: generate(cached, prompt, args.new),
        "f'": lambda: generate(cached, prompt, args.new, step=compiled_step),
        "g": hf,
    }
    for run in runs.values():  # warm-up (f': compiles its first-step and later-step graphs)
        run()
    best = interleaved_runs(runs, args.repeats)
    rows = {name: {"tokens_per_s": r.tokens_per_s, "runs": spread} for name, (r, spread) in best.items()}
    return {
        "model": f"t5 d_model={args.width} layers={args.layers} ({plain.num_params() / 1e6:.1f}M params)",
        "prompt": args.prompt,
        "new": args.new,
        "threads": torch.get_num_threads(),
        "rows": rows,
        "speedup_vs_no_cache": rows["f"]["tokens_per_s"] / rows["e"]["tokens_per_s"],
        "compiled_speedup_vs_no_cache": rows["f'"]["tokens_per_s"] / rows["e"]["tokens_per_s"],
        "same_tokens_as_no_cache": best["f"][0].new_ids == best["e"][0].new_ids == best["f'"][0].new_ids,
        "same_tokens_as_hf": _until_eos(best["f"][0].new_ids, eos) == _until_eos(best["g"][0].new_ids, eos),
    }


def _until_eos(ids: list, eos: int | None) -> list:
    """The tokens before the first EOS (where generate(), held to min_new_tokens, goes on otherwise)."""
    ids = ids[0] if ids and isinstance(ids[0], list) else ids
    return ids[: ids.index(eos)] if eos in ids else ids


def encoder_decoder_text(result: dict) -> str:
    names = {
        "e": "(e) no cache",
        "f": "(f) optpipe kv-cache",
        "f'": "(f') kv-cache, torch.compile",
        "g": "(g) transformers generate()",
    }
    lines = [
        f"{result['model']}, prompt {result['prompt']}, {result['new']} new tokens, greedy, batch 1, "
        f"{result['threads']} threads"
    ]
    for key, row in result["rows"].items():
        spread = ", ".join(f"{x:.1f}" for x in row["runs"])
        lines.append(f"  {names[key]:<30} {row['tokens_per_s']:9.1f} tokens/s   (runs: {spread})")
    lines.append(
        f"  kv-cache vs no cache: {result['speedup_vs_no_cache']:.1f}x eager, "
        f"{result['compiled_speedup_vs_no_cache']:.1f}x compiled; same tokens as no cache: "
        f"{result['same_tokens_as_no_cache']}, as generate(): {result['same_tokens_as_hf']}"
    )
    return "\n".join(lines)


def speculative(model, prompt, new, max_len, reference, k: int = 4) -> dict:
    """Draft: the same weights with only the first half of the layers."""
    import copy

    from optpipe.runtime.generation import generate

    draft_model = copy.deepcopy(model)
    half = len(draft_model.transformer.h) // 2
    draft_model.transformer.h = draft_model.transformer.h[:half]
    draft_model.config.n_layer = half
    _, target = cached_program(model, prompt, max_len + k + 1)
    _, draft = cached_program(draft_model, prompt, max_len + k + 1)
    res = generate(target, prompt, new, draft=draft, draft_tokens=k)
    return {
        "draft_layers": half,
        "k": k,
        "acceptance_rate": res.acceptance_rate,
        "tokens_per_s": res.tokens_per_s,
        "speedup_vs_b": res.tokens_per_s / reference.tokens_per_s,
        "same_tokens": res.new_ids == reference.new_ids,
    }


def linear_decode(short: int = 256, long: int = 8192, steps: int = 32) -> dict:
    """Per-token decode latency with the linear-attention recurrent state, after a prompt of
    `short` vs `long` tokens (GPT-2-small-sized, all layers linear)."""
    from optpipe.kv_step import filled, prefill

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
