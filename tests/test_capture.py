"""Capture: the tensor path a user means, dynamic dims, metadata, save/load."""

import pytest
import torch
import torch.nn as nn
import transformers

from optpipe import capture, load_program
from optpipe.errors import UsageError


def gpt2(**kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=99, n_positions=64, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_hf_default_config_takes_logits_and_never_the_cache():
    model = gpt2()
    assert model.config.use_cache  # the default a user brings
    ids = torch.randint(0, 99, (1, 10))
    prog = capture(model, (ids,))
    assert prog.meta["output"] == "logits" and prog.input_names == ["input_ids"]
    assert "cache" not in prog.gm.code.lower()
    x = torch.randint(0, 99, (3, 17))
    torch.testing.assert_close(prog.gm(x), model(x).logits)


def test_encoder_takes_last_hidden_state_with_padding_mask():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=99
    )
    model = transformers.BertModel(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 99, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    prog = capture(model, inputs)
    assert prog.meta["output"] == "last_hidden_state"
    assert prog.input_names == ["input_ids", "attention_mask"]
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    ids = torch.randint(0, 99, (2, 8))
    torch.testing.assert_close(prog.gm(ids, mask), model(input_ids=ids, attention_mask=mask).last_hidden_state)


class CacheLike:  # not a tensor: must never reach the exported graph's outputs
    pass


class ReturnsCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x), CacheLike()


class ReturnsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return {"hidden": self.lin(x), "aux": x.sum()}


def test_tuple_with_cache_object_takes_the_tensor():
    m = ReturnsCache().eval()
    prog = capture(m, (torch.randn(2, 5, 8),))
    assert prog.meta["output"] == "output[0]"
    x = torch.randn(4, 3, 8)
    torch.testing.assert_close(prog.gm(x), m(x)[0])


def test_dict_output_takes_first_tensor_field_and_says_so():
    prog = capture(ReturnsDict().eval(), (torch.randn(2, 5, 8),))
    assert prog.meta["output"] == "hidden"


def test_dynamic_dims_and_metadata():
    prog = capture(gpt2(), (torch.randint(0, 99, (1, 10)),))
    assert prog.dynamic_shapes == [{0: "batch", 1: "seq"}]
    calls = [
        n
        for n in prog.gm.graph.nodes
        if n.op == "call_function"
        and "aten" in str(n.target)
        and n.target.__name__.split(".")[0] in ("linear", "addmm", "matmul", "layer_norm")
    ]
    assert calls
    for n in calls:
        assert "val" in n.meta and n.meta.get("nn_module_stack")
    paths = {list(n.meta["nn_module_stack"].values())[-1][0] for n in calls}
    assert any(p.startswith("transformer.h.0") for p in paths)  # the model's own module paths


def test_static_fallback_when_dims_cannot_be_dynamic():
    class Fixed(nn.Module):
        def forward(self, x):
            return x + torch.ones(2, 5, 8)  # broadcasting pins batch and sequence

    prog = capture(Fixed(), (torch.randn(2, 5, 8),))
    assert prog.dynamic_shapes == [None]


def test_capture_error_is_a_usage_error():
    class Broken(nn.Module):
        def forward(self, x):
            return x @ torch.randn(3, 3)

    with pytest.raises(UsageError):
        capture(Broken(), (torch.randn(2, 4),))


def test_save_load_round_trip_keeps_meta(tmp_path):
    prog = capture(gpt2(), (torch.randint(0, 99, (1, 10)),))
    prog.save(tmp_path / "p.pt2")
    back = load_program(tmp_path / "p.pt2")
    assert back.meta["output"] == "logits" and back.meta["config"]["vocab_size"] == 99
    assert back.dynamic_shapes == prog.dynamic_shapes and back.input_names == ["input_ids"]
    x = torch.randint(0, 99, (2, 33))
    torch.testing.assert_close(back.gm(x), prog.gm(x))
    # module paths survive the round trip (diffs and layer selection are keyed by them)
    paths = {
        list(n.meta["nn_module_stack"].values())[-1][0]
        for n in back.gm.graph.nodes
        if n.op == "call_function" and n.meta.get("nn_module_stack")
    }
    assert "transformer.h.1.mlp.c_fc" in paths
