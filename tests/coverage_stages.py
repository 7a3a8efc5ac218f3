"""The coverage matrix: every transformers family in `tests/hf_zoo.py` through every stage.

Each stage is a function `(arch) -> str` that raises (an assertion or optpipe's own error) when the
stage fails and returns a short detail for the table otherwise. `tests/test_coverage_matrix.py`
runs them as tests (`make coverage`: all; `make test`: the FAST slice); `benchmarks/coverage.py`
writes them as the markdown table in the README.

A cell that fails because the underlying tool cannot do it (checked directly against torch.export,
the ONNX exporter or TVM, outside optpipe) is listed in LIMITATIONS with that tool named; the test
expects it to fail (strict xfail), so a fix upstream turns the cell red until the entry goes.
"""

from __future__ import annotations

import copy
import functools

import torch

import optpipe
from optpipe.pipeline import Pipeline
from tests import hf_zoo

STAGES = ["fuse", "swap", "kv-cache", "quantize", "prune", "onnxruntime", "tvm"]
STAGE_TITLES = {
    "fuse": "capture + fuse-attention",
    "swap": "attention swap",
    "kv-cache": "kv-cache + generate",
    "quantize": "int8-dynamic",
    "prune": "25% MLP prune",
    "onnxruntime": "onnxruntime",
    "tvm": "tvm",
}
# encoder self-, decoder self- and cross-attention in each of 2 layers
EXPECTED_SITES = {arch: 6 for arch, (kind, _) in hf_zoo.ARCHS.items() if kind == "seq2seq"}
# (arch, stage) -> the named limitation of the underlying tool. Empty cells are expected to pass.
LIMITATIONS: dict[tuple[str, str], str] = {}
# What `make test` runs: the cells no narrower test stands for (each other failure of issue 16 has
# its own regression test next to the pass or target it was fixed in): T5's two sequence lengths on
# onnxruntime, an MoE model on onnxruntime, DeBERTa-v2 through the pipeline (a copied program).
FAST = [("t5", "onnxruntime"), ("mixtral", "onnxruntime"), ("deberta_v2", "fuse")]
PROMPT = [5, 17, 3, 99, 42, 7, 11, 64, 2, 8, 30, 1]
NEW_TOKENS = 12
QUANTIZE_MIN_COSINE = 0.98


def applies(arch: str, stage: str) -> bool:
    """kv-cache and generation are for decoders and encoder-decoders."""
    return stage != "kv-cache" or hf_zoo.ARCHS[arch][0] in ("decoder", "seq2seq")


@functools.lru_cache(maxsize=4)
def model(arch: str):
    return hf_zoo.build(arch, "eager")


@functools.lru_cache(maxsize=4)
def captured(arch: str) -> optpipe.Program:
    m, inputs = model(arch)
    return optpipe.capture(m, inputs)


@functools.lru_cache(maxsize=4)
def fused(arch: str) -> tuple[optpipe.Program, object]:
    program, records = Pipeline.parse("fuse-attention").run(captured(arch))
    return program, records[0]


def _weight_bytes(program: optpipe.Program) -> int:
    state = {**dict(program.gm.named_parameters()), **dict(program.gm.named_buffers())}
    return sum(t.numel() * t.element_size() for t in state.values())


def stage_fuse(arch: str) -> str:
    _, record = fused(arch)
    want = EXPECTED_SITES.get(arch, 2)
    assert record.stats["sites"] == want, f"{record.stats['sites']} of {want} attention sites fused"
    return f"{want} sites"


def stage_swap(arch: str) -> str:
    """Sliding-window attention where the site's mask allows it, linear attention on the sites it
    refuses (cross-attention): every site swapped, or the refusals' reasons in the failure."""
    program, record = fused(arch)
    _, records = Pipeline.parse("attention{kind=sliding-window,window=8},attention{kind=linear}").run(program)
    swapped = sum(r.stats.get("rewritten", 0) for r in records)
    want = record.stats["sites"]
    assert want, "no attention site to swap (fuse-attention found none)"
    if swapped < want:
        reasons = sorted({s["reason"] for s in records[-1].details.get("skipped") or []})
        raise AssertionError(f"{swapped} of {want} sites swapped: " + "; ".join(reasons))
    return f"{swapped} sites"


def _no_early_stop(m):
    """model.generate()'s greedy NEW_TOKENS tokens, with no eos to stop at."""
    config = copy.deepcopy(m.generation_config)
    config.update(eos_token_id=None, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    return config


def stage_kv_cache(arch: str) -> str:
    m, _ = model(arch)
    program, _ = fused(arch)
    step, _ = Pipeline.parse("kv-cache{max-len=64}").run(program)
    if hf_zoo.ARCHS[arch][0] == "seq2seq":
        return _encoder_decoder_generation(m, step)
    ours = optpipe.generate(step, [PROMPT], NEW_TOKENS).new_ids[0]
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ref = m.generate(ids, attention_mask=torch.ones_like(ids), generation_config=_no_early_stop(m))
    theirs = ref[0, len(PROMPT) :].tolist()
    assert ours == theirs, f"greedy tokens differ from model.generate(): {ours} vs {theirs}"
    short = PROMPT[3:8]  # left-padded in a batch with PROMPT: each row its own positions
    batch = optpipe.generate(step, [PROMPT, short], NEW_TOKENS).new_ids
    assert batch == [ours, optpipe.generate(step, [short], NEW_TOKENS).new_ids[0]], "a left-padded row differs"
    return f"{NEW_TOKENS} tokens == generate()"


def _encoder_decoder_generation(m, step) -> str:
    """The prompts are the encoder's input (two lengths in one batch: the short one padded); greedy
    tokens from the decoder start equal model.generate()'s for each prompt alone."""
    rows = [PROMPT, PROMPT[3:8]]
    ours = optpipe.generate(step, rows, NEW_TOKENS).new_ids
    theirs = []
    for row in rows:
        ids = torch.tensor([row])
        with torch.no_grad():  # no eos to stop at or force (as keywords: a generation_config's None falls back)
            ref = m.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                eos_token_id=None, forced_eos_token_id=None,
            )  # fmt: skip
        theirs.append(ref[0, 1:].tolist())  # after the decoder start id
    assert ours == theirs, f"greedy tokens differ from model.generate(): {ours} vs {theirs}"
    return f"{NEW_TOKENS} tokens == generate()"


def _compressed(arch: str, element: str) -> tuple[object, int, int]:
    """(the pass's record, weight bytes before, after) of one compression pipeline element, which
    must change the program and shrink its weights."""
    program = captured(arch)
    out, records = Pipeline.parse(element).run(program)
    record = records[0]
    assert record.modified, f"{element} changed nothing: {record.details.get('skipped')}"
    before, after = _weight_bytes(program), _weight_bytes(out)
    assert after < before, f"weights did not shrink: {before} -> {after} bytes"
    return record, before, after


def stage_quantize(arch: str) -> str:
    record, before, after = _compressed(arch, "quantize{scheme=int8-dynamic}")
    cosine = record.verify["cosine"]
    assert cosine >= QUANTIZE_MIN_COSINE, f"output cosine {cosine:.4f} < {QUANTIZE_MIN_COSINE}"
    return f"{before / after:.1f}x smaller, cos {cosine:.4f}"


def stage_prune(arch: str) -> str:
    _, before, after = _compressed(arch, "prune{target=mlp,sparsity=0.25}")
    return f"-{1 - after / before:.0%} weights"


def _target_stage(arch: str, target: str, options: dict | None) -> str:
    res = optpipe.optimize(captured(arch), pipeline="fuse-attention", target=target, target_options=options)
    check = res.report["target_check"]
    assert check["ok"], f"{target} differs from torch: max-abs {check['max_abs']:.3g} > {check['tolerance']:.3g}"
    return f"max-abs {check['max_abs']:.1e}"


def stage_onnxruntime(arch: str) -> str:
    return _target_stage(arch, "onnxruntime", None)


def stage_tvm(arch: str) -> str:
    return _target_stage(arch, "tvm", {"static": False})


RUN = {
    "fuse": stage_fuse,
    "swap": stage_swap,
    "kv-cache": stage_kv_cache,
    "quantize": stage_quantize,
    "prune": stage_prune,
    "onnxruntime": stage_onnxruntime,
    "tvm": stage_tvm,
}
