"""`optpipe generate` on encoder-decoder programs (T5, BART), without a cache and with one
(`kv-cache`: the encoder once per prompt, cached decoder steps): the prompts feed the encoder, the
decoder starts from the model's decoder start id, and greedy tokens equal `model.generate()` token
for token."""

from __future__ import annotations

import json

import pytest
import torch

import optpipe
from examples import seq2seq as example
from optpipe.errors import UsageError
from optpipe.pipeline import Pipeline
from optpipe.runtime.generation import generate

PROMPTS = [[10, 20, 30, 40, 50, 60, 70], [7, 8, 9]]


@pytest.fixture(scope="module")
def captured():
    """name -> (model, program): T5 and BART, initialised wide enough that the tokens depend on the
    whole prompt."""
    out = {}
    for name in ("t5", "bart"):
        model, inputs = getattr(example, name)(seq=16)
        torch.manual_seed(1)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
        out[name] = model, optpipe.capture(model, inputs)
    return out


@pytest.fixture(scope="module")
def cached(captured):
    """name -> the kv-cache program of `captured`'s (verified in tests/passes/test_kv_cache_encoder_decoder.py)."""
    pipeline = Pipeline.parse("fuse-attention,kv-cache{max-len=40}")
    return {name: pipeline.run(program, verify=False)[0] for name, (_, program) in captured.items()}


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_greedy_tokens_equal_transformers_generate(name, captured):
    model, program = captured[name]
    _check_equals_transformers(model, generate(program, PROMPTS, 32, stop_tokens=[model.config.eos_token_id]))


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_cached_greedy_tokens_equal_transformers_generate(name, captured, cached):
    model = captured[name][0]
    res = generate(cached[name], PROMPTS, 32, stop_tokens=[model.config.eos_token_id])
    _check_equals_transformers(model, res)
    assert res.steps == max(len(n) for n in res.new_ids)  # one decoder step per token


def test_eos_stops_a_row_only_when_asked(cached):
    """As for a decoder-only program: `generate` stops at the tokens it is given (`optpipe generate`
    gives the model's eos unless --ignore-eos), never at the config's eos by itself."""
    program = cached["bart"].copy()
    first = generate(program, PROMPTS[:1], 6).new_ids[0][0]
    program.meta["config"] = {**program.meta["config"], "eos_token_id": first}  # the model says "eos" first
    assert generate(program, PROMPTS[:1], 6).new_ids[0] == generate(cached["bart"], PROMPTS[:1], 6).new_ids[0]
    assert len(generate(program, PROMPTS[:1], 6).new_ids[0]) == 6
    assert generate(program, PROMPTS[:1], 6, stop_tokens=[first]).new_ids == [[first]]


def test_cached_refuses_speculative_decoding(cached):
    with pytest.raises(UsageError, match="not an encoder-decoder"):
        generate(cached["t5"], PROMPTS[:1], 4, draft=cached["t5"])


def _check_equals_transformers(model, res) -> None:
    for prompt, new in zip(PROMPTS, res.new_ids):
        ids = torch.tensor([prompt])
        hf = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False, num_beams=1
        )[0, 1:].tolist()  # without the decoder start token
        assert new == hf[: len(new)] and (len(new) == 32 or new[-1] == model.config.eos_token_id)
    assert len({tuple(n) for n in res.new_ids}) == 2  # the prompts matter


def test_refuses_a_program_without_a_decoder_start(captured):
    program = captured["t5"][1].copy()
    program.meta["config"] = {}
    with pytest.raises(UsageError, match="no decoder_start_token_id"):
        generate(program, PROMPTS, 4)


@pytest.mark.slow
def test_generate_cli_on_a_cached_out_folder(tmp_path):
    """`optpipe optimize ... kv-cache` writes the encoder into OUT/program.pt2 beside the step
    program; `optpipe generate OUT` (a fresh load) gives transformers' tokens."""
    from click.testing import CliRunner

    from optpipe.cli import main

    out = tmp_path / "OUT"
    args = ["optimize", f"{example.__file__}:t5", "--pipeline", "fuse-attention,kv-cache{max-len=24}"]
    r = CliRunner().invoke(main, [*args, "--mode", "eager", "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main, ["generate", str(out), "--prompt-ids", "10,20,30,40", "--max-new-tokens", "12", "--json"]
    )
    assert r.exit_code == 0, r.output
    new = json.loads(r.output)["new_ids"][0]
    model, _ = example.t5()
    ids = torch.tensor([[10, 20, 30, 40]])
    hf = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert new == hf[0, 1:].tolist()[: len(new)]
