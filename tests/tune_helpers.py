"""What the tune tests share: a tiny model, a small space, a deterministic cost model, and `run`
(`tune` with them). The fixtures `pydoc_text`, `tune_program` and `tuned` are in conftest.py."""

from __future__ import annotations

import json

from optpipe.runtime.tuning import tune
from optpipe.runtime.tuning_space import SearchSpace

MODEL = "examples/heal.py:build_quick"  # byte-level GPT, context 32
SPACE = SearchSpace(attention=("dense",), prune=(0.0, 0.25), quantize=("none", "int8-dynamic"), mode=("eager",))
FAST = dict(eval_tokens=256, latency_iters=2, seq_len=32)


def model_cost(fn, program, candidate, base_ms: float = 10.0) -> dict:
    """A deterministic cost: pruning and int8 each make the model faster and smaller."""
    ms = base_ms * (1 - 0.5 * candidate.get("prune", 0.0)) * (0.6 if candidate.get("quantize") != "none" else 1.0)
    mb = 1.0 * (1 - candidate.get("prune", 0.0)) * (0.3 if candidate.get("quantize") != "none" else 1.0)
    return {"latency_ms_p50": ms, "latency_ms_p90": ms, "tokens_per_s": 32 / ms * 1000, "peak_mem_mb": 0, "size_mb": mb}


def lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def run(corpus, out, budget="ppl=+5%", measure=model_cost, space=SPACE, **kw):
    return tune(MODEL, corpus, str(out), budget=budget, space=space, measure=measure, **{**FAST, **kw})
