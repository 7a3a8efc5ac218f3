"""kv-cache on encoder-decoder programs (T5, BART from transformers): the encoder becomes a companion
program run once per prompt, the decoder a step program with self-attention caches and the
cross-attention K/V as inputs.

Fired (stats) and IR (FileCheck) for both; T5's relative position bias follows the cache slots and
BART's learned positions (offset 2) read position_ids; logits through the cache (encoder once,
prefill, then one decode step per token) equal the uncached program's under a padded encoder mask;
save/load keeps the encoder in the same archive; encoder and step program on onnxruntime and tvm
(T5; BART on onnxruntime in `make coverage`); refusals with one-line errors.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import FileCheck, assert_close

import optpipe
from examples import seq2seq as example
from optpipe.errors import PassError, UsageError
from optpipe.kv_step import encoder_decoder_logits
from optpipe.pipeline import Pipeline
from optpipe.program import load_program
from optpipe.runtime.generation import generate

PROMPTS = [[10, 20, 30, 40, 50, 60, 70], [7, 8, 9]]


@pytest.fixture(scope="module", params=["t5", "bart"])
def programs(request):
    """(name, program after fuse-attention, cached program, kv-cache's record)."""
    model, inputs = getattr(example, request.param)(seq=16)
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    plain, _ = Pipeline.parse("fuse-attention,dce").run(optpipe.capture(model, inputs))
    cached, records = Pipeline.parse("kv-cache{max-len=40}").run(plain)
    return request.param, plain, cached, records[0]


def test_fires_and_rewrites_the_graph(programs):
    name, _, cached, record = programs
    assert record.modified and record.stats["cached"] == record.stats["cross"] == record.stats["dense"] == 2
    assert record.verify["ok"] and record.verify["max_abs"] < 1e-4
    if name == "t5":  # no absolute positions; the bucketed relative bias follows the slots
        assert record.stats["relative-bias"] == 2 and record.stats["positions"] == 0
    else:  # learned positions (offset 2) read position_ids
        assert record.stats["positions"] == 1 and "relative-bias" not in record.stats
    assert cached.input_names == [
        "input_ids", "position_ids", "cache_position", "key_mask", "k_cache_0", "v_cache_0", "k_cache_1",
        "v_cache_1", "encoder_mask", "cross_k_0", "cross_v_0", "cross_k_1", "cross_v_1",
    ]  # fmt: skip
    code = cached.gm.code
    FileCheck().check("def forward(self, decoder_input_ids, position_ids, cache_position, key_mask").check(
        "index_put_.default(k_cache_0"
    ).check("scaled_dot_product_attention.default(").check("cross_k_0, cross_v_0").check(
        "index_put_.default(k_cache_1"
    ).check("cross_k_1, cross_v_1").run(code)
    FileCheck().check_not("attention_mask").check_not("embed_tokens").run(code.split("def forward", 1)[1])
    if name == "t5":  # the model's bias subgraph reads the slot distance (key slot - query slot)
        FileCheck().check("sub.Tensor(arange").check("relative_attention_bias").check("where").run(code)
    else:
        FileCheck().check("add.Tensor(position_ids, 2)").run(code)
    encoder = cached.companions["encoder"]
    FileCheck().check("def forward(self, input_ids, attention_mask)").check_not("decoder_input_ids").run(
        encoder.gm.code
    )
    kv = cached.meta["kv_cache"]
    assert kv["layers"][0]["caches"][0]["shape"] == [None, 4, 40, 16]
    assert [s["name"] for s in kv["encoder"]["states"]][:2] == ["encoder_mask", "cross_k_0"]


def test_logits_through_the_cache_equal_the_uncached_program(programs):
    """Encoder once, a prefill of 2 decoder tokens, then 10 decode steps (the relative bias and the
    positions at 10 further slots), with a padded encoder mask."""
    _, plain, cached, _ = programs
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    decoder_ids = torch.randint(0, 256, (2, 12), generator=g)
    with torch.no_grad():
        expected = plain.gm(ids, mask, decoder_ids)
        from optpipe.kv_step import cached_logits, encoder_states

        states = encoder_states(cached, ids, mask)
        got = cached_logits(cached.gm, cached.meta["kv_cache"], decoder_ids, decode_last=10, states=states)
    assert_close(got, expected, atol=1e-4, rtol=0)
    assert_close(encoder_decoder_logits(cached, (ids, mask, decoder_ids)), expected, atol=1e-4, rtol=0)


def test_save_load_round_trip(programs, tmp_path):
    _, _, cached, _ = programs
    cached.save(tmp_path / "program.pt2")
    loaded = load_program(tmp_path / "program.pt2")
    assert loaded.meta["kv_cache"] == cached.meta["kv_cache"] and loaded.input_names == cached.input_names
    assert list(loaded.companions) == ["encoder"]
    assert loaded.companions["encoder"].input_names == ["input_ids", "attention_mask"]
    assert generate(loaded, PROMPTS, 8).new_ids == generate(cached, PROMPTS, 8).new_ids
    step = torch.export.load(tmp_path / "program.pt2").module()  # a plain archive: the step program
    assert_close(step(*cached.example_inputs)[0], cached.gm(*cached.example_inputs)[0])


def test_a_cached_program_is_left_alone(programs):
    _, _, cached, _ = programs
    _, records = Pipeline.parse("kv-cache{max-len=40}").run(cached)
    assert not records[0].modified and "already" in records[0].details["reason"]


def test_max_len_must_hold_the_example_and_the_generation(programs):
    name, plain, cached, _ = programs
    with pytest.raises(PassError, match="max-len 2 is shorter than the example decoder input"):
        Pipeline.parse("kv-cache{max-len=2}").run(plain)
    with pytest.raises(UsageError, match="exceed the cache \\(40 slots\\)"):
        generate(cached, PROMPTS, 40)


def test_a_decoder_example_as_long_as_the_cache_exports(programs):
    """The step's example is shortened by one token when it fills the cache; the shortened batch is
    a contiguous copy (a strided slice made the exported program's guards fail in decomposition,
    so onnxruntime and tvm refused BART at max-len = its example length)."""
    name, plain, _, _ = programs
    length = plain.example_inputs[2].shape[1]
    cached, _ = Pipeline.parse(f"kv-cache{{max-len={length}}}").run(plain)
    ids = cached.example_inputs[0]
    assert ids.shape == (2, length - 1) and ids.is_contiguous()
    cached.export().run_decompositions({})


# -- targets ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, target",
    [
        ("t5", "onnxruntime"),
        pytest.param("bart", "onnxruntime", marks=pytest.mark.coverage),
        ("t5", "tvm"),
    ],
)
def test_step_program_on_targets(name, target, tmp_path):
    """Encoder and decoder step on the target: both are compiled and checked against torch (the
    step's check covers a prefill and a decode step with the encoder's real states), OUT keeps the
    encoder's artifact under companions/encoder/, and greedy tokens equal torch's, in process and
    from the saved OUT; an OUT without companions/ (written before they were compiled) runs its
    encoder in torch."""
    import shutil

    from optpipe.loading import load_out
    from optpipe.registry import get_target
    from optpipe.runtime.generation import target_functions
    from optpipe.target import load_compiled

    model, inputs = getattr(example, name)(seq=16, layers=1)  # one layer: quick builds
    res = optpipe.optimize(
        model,
        inputs,
        pipeline="fuse-attention,kv-cache{max-len=24}",
        target=target,
        diffs=False,
        target_options={"static": False} if target == "tvm" else None,
    )
    check = res.report["target_check"]
    assert check["ok"] and check["inputs"] >= 2 and check["max_abs"] <= check["tolerance"]
    encoder_check = check["companions"]["encoder"]
    assert encoder_check["ok"] and encoder_check["max_abs"] <= encoder_check["tolerance"]
    functions = target_functions(res.target, res.compiled, res.program)
    assert set(functions) == {"step", "encoder"}
    reference = generate(res.program, PROMPTS, 12).new_ids
    assert generate(res.program, PROMPTS, 12, **functions).new_ids == reference
    out = res.save(str(tmp_path / "OUT"))
    artifact = tmp_path / "OUT" / "companions" / "encoder" / get_target(target).artifact
    assert artifact.exists(), sorted(p.name for p in (tmp_path / "OUT").rglob("*"))
    program, _ = load_out(out)
    loaded = load_compiled(get_target(target), out, program)
    assert set(loaded.companions) == {"encoder"}
    assert generate(program, PROMPTS, 12, **target_functions(get_target(target), loaded, program)).new_ids == reference
    shutil.rmtree(tmp_path / "OUT" / "companions")  # an OUT written before companions were compiled:
    loaded = load_compiled(get_target(target), out, program)  # its encoder runs in torch, as it did
    assert loaded.companions == {}
    assert generate(program, PROMPTS, 6, **target_functions(get_target(target), loaded, program)).new_ids == [
        r[:6] for r in reference
    ]


# -- refusals ---------------------------------------------------------------------------------------
class _OtherInputs(torch.nn.Module):
    """An encoder-decoder-looking model without an attention mask input."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, input_ids, decoder_input_ids):
        memory = self.emb(input_ids)[:, None]
        query = self.emb(decoder_input_ids)[:, None]
        return self.head(torch.nn.functional.scaled_dot_product_attention(query, memory, memory)[:, 0])


def test_refuses_other_inputs():
    program = optpipe.capture(
        _OtherInputs(), {"input_ids": torch.randint(0, 32, (1, 8)), "decoder_input_ids": torch.randint(0, 32, (1, 4))}
    )
    with pytest.raises(PassError, match="takes \\(input_ids, decoder_input_ids\\); a cached form") as e:
        Pipeline.parse("kv-cache{max-len=16}").run(program)
    assert "\n" not in str(e.value.args[0])
