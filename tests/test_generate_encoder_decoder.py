"""`optpipe generate` on encoder-decoder programs (T5, BART) without a cache: the prompts feed the
encoder, the decoder starts from the model's decoder start id, and greedy tokens equal
`model.generate()` token for token. (The cached encoder-decoder step program is issue 18's next part.)"""

from __future__ import annotations

import pytest
import torch

import optpipe
from examples import seq2seq as example
from optpipe.errors import UsageError
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


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_greedy_tokens_equal_transformers_generate(name, captured):
    model, program = captured[name]
    res = generate(program, PROMPTS, 32)
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
