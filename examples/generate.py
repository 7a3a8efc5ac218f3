"""KV caching and generation: turn the tiny GPT into a prefill + decode step program and generate.

    python examples/generate.py [OUT]

1. capture the tiny GPT, `fuse-attention,dce,kv-cache{max-len=192}`, save it to OUT (default: a
   temporary folder) — then `optpipe generate OUT --prompt-ids 1,2,3 --max-new-tokens 32` works too;
2. generate 128 tokens greedily from a batch of prompts of different lengths, with the cache and by
   recomputing the whole prefix every token, and check both give the same tokens;
3. the same with sliding-window attention (a ring-buffer cache of `window` slots);
4. speculative decoding with a one-layer draft (greedy output identical to the target's alone).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

import optpipe
from examples.tiny_gpt import build
from optpipe.runtime.generation import Sampling

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82], [18, 28, 18, 28, 45]]


def main(out: str) -> None:
    model, example = build(block_size=256)
    plain, _ = optpipe.Pipeline.parse("fuse-attention,dce").run(optpipe.capture(model, example))
    res = optpipe.optimize(plain, pipeline="kv-cache{max-len=192}", target="cpu", target_options={"mode": "eager"})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    res.save(out, force=True)
    step = res.program
    layers = step.meta["kv_cache"]["layers"]
    print(f"step program inputs: {', '.join(step.input_names)}")
    print(f"caches: {len(layers)} layers x {layers[0]['caches'][0]['shape'][1:]} ({layers[0]['kind']})")

    cached = optpipe.generate(step, PROMPTS, 128)
    recomputed = optpipe.generate(plain, PROMPTS, 128)
    assert cached.new_ids == recomputed.new_ids, "the cache changed the greedy tokens"
    print(
        f"greedy, 3 prompts x 128 tokens: cache {cached.tokens_per_s:.0f} tokens/s, recompute "
        f"{recomputed.tokens_per_s:.0f} tokens/s ({cached.tokens_per_s / recomputed.tokens_per_s:.1f}x), "
        f"same tokens: True"
    )
    sampled = optpipe.generate(step, PROMPTS, 16, sampling=Sampling(temperature=0.8, top_p=0.9, seed=0))
    print(f"sampled (T=0.8, top-p 0.9, seed 0): {sampled.new_ids[0]}")

    window, _ = optpipe.Pipeline.parse("attention{kind=sliding-window,window=16},kv-cache{max-len=192}").run(plain)
    swapped, _ = optpipe.Pipeline.parse("attention{kind=sliding-window,window=16}").run(plain)
    ring = window.meta["kv_cache"]["layers"][0]["caches"][0]["shape"]
    same = optpipe.generate(window, PROMPTS, 64).new_ids == optpipe.generate(swapped, PROMPTS, 64).new_ids
    print(f"sliding-window 16: ring cache {ring[1:]} per layer, same tokens as without a cache: {same}")
    assert same

    draft_model = copy.deepcopy(model)
    draft_model.transformer.h = draft_model.transformer.h[:1]
    draft, _ = optpipe.Pipeline.parse("fuse-attention,dce,kv-cache{max-len=192}").run(
        optpipe.capture(draft_model, example)
    )
    spec = optpipe.generate(step, PROMPTS[:1], 64, draft=draft, draft_tokens=4)
    alone = optpipe.generate(step, PROMPTS[:1], 64)
    assert spec.new_ids == alone.new_ids
    print(
        f"speculative (1-layer draft, 4 tokens/step): acceptance {spec.acceptance_rate:.0%}, "
        f"{spec.steps} target steps for 64 tokens, identical to the target alone: True"
    )
    print(f"wrote {out}; try: optpipe generate {out} --prompt-ids 1,2,3 --max-new-tokens 16")


if __name__ == "__main__":
    with torch.no_grad():
        main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="optpipe-generate-") + "/OUT")
