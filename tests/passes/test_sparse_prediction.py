"""sparse-prediction: the LM head runs only on the positions whose logits are needed.

Fired (stats, meta) and IR (FileCheck: the gather comes before the head's projections) on tiny
BertForMaskedLM and GPT2LMHeadModel from transformers; the pipeline verifies it exact (all-True
mask); the gathered rows equal the dense logits at the masked positions, at another batch and
length too; masked-LM (BERT) and supervised fine-tuning with a masked prompt (GPT-2, next-token
loss) give the dense loss and every parameter's gradient within 1e-5; save/load round trip;
refusals: an encoder without an LM head, logits mixed across positions, a kv-cache step program,
a second run, and pipelines that put it beside kv-cache.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import FileCheck, assert_close

import optpipe
from optpipe.errors import PassError, UsageError
from optpipe.losses import IGNORE_INDEX, task_loss
from optpipe.pipeline import Pipeline
from optpipe.program import load_program
from optpipe.registry import get_pass

VOCAB = 100  # unlike every other width (hidden 64, intermediate 128, GPT-2 MLP 256)


def bert_mlm():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return BertForMaskedLM(config).eval()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=1, n_head=4, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1
    )
    return GPT2LMHeadModel(config).eval()


MODELS = {"bert": (bert_mlm, "cls_predictions_decoder_weight"), "gpt2": (gpt2, "lm_head_weight")}


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(MODELS))
def programs(request):
    """(model name, dense program, sparse program, pass record)."""
    build, _ = MODELS[request.param]
    dense = optpipe.capture(build(), {"input_ids": ids(2, 16)})
    sparse, records = Pipeline.parse("sparse-prediction").run(dense)
    return request.param, dense, sparse, records[0]


def run_pass(program):
    info = get_pass("sparse-prediction")
    return info.fn(program, info.config_cls())


def test_fires_and_gathers_before_the_head(programs):
    name, dense, sparse, record = programs
    assert record.modified and record.stats["moved"] == 1
    assert record.verify["ok"] and record.verify["max_abs"] < 1e-5  # all-True mask vs the dense program
    decoder = MODELS[name][1]
    if name == "bert":  # the encoder's output LayerNorm, then transform dense + gelu + LayerNorm + decoder
        assert record.details["head"] == ["layer_norm", "linear", "gelu", "layer_norm", "linear"]
        assert record.stats["projections"] == 2
        assert "cls.predictions.transform.dense" in record.details["head_paths"]
    else:  # ln_f, export's view and identity slices (logits_to_keep=0), lm_head
        assert record.details["head"][0] == "layer_norm" and record.details["head"][-1] == "linear"
        assert record.stats["projections"] == 1
    meta = sparse.meta["sparse_prediction"]
    assert meta["input"] == "predict_mask" and meta["vocab"] == VOCAB and meta["head_ops"] == record.stats["head_ops"]
    assert meta["hidden"] == record.details["hidden"] and meta["output_index"] == 0
    assert sparse.input_names == ["input_ids", "predict_mask"]
    assert sparse.dynamic_shapes[1] == dense.dynamic_shapes[0]
    mask_example = sparse.example_inputs[1]
    assert mask_example.dtype == torch.bool and mask_example.all() and mask_example.shape == (2, 16)
    code = sparse.gm.code
    projection = rf"aten\.linear\.default\(\w+, {decoder}"  # the vocabulary projection
    FileCheck().check("def forward(self, input_ids, predict_mask)").check(f"{meta['hidden']} = ").check(
        "aten.reshape.default(predict_mask, [-1])"
    ).check("aten.nonzero.default(").check("aten.index_select.default(").check_regex(projection).run(code)
    before_gather = code.split("aten.index_select.default(", 1)[0]
    assert re.search(projection, before_gather) is None
    assert len(re.findall(projection, code)) == 1


def test_head_runs_after_the_gather_only(programs):
    """The vocabulary projection's input has N rows, not B*T."""
    _, _, sparse, _ = programs
    projections = [
        n for n in sparse.gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default
    ]
    gather = next(n for n in sparse.gm.graph.nodes if n.target is torch.ops.aten.index_select.default)
    order = list(sparse.gm.graph.nodes)
    vocab_linear = next(n for n in projections if n.meta["val"].shape[-1] == VOCAB)
    assert order.index(vocab_linear) > order.index(gather)
    rows = vocab_linear.meta["val"].shape[0]
    assert isinstance(rows, torch.SymInt) and rows.node.expr.free_symbols  # data-dependent N


@pytest.mark.parametrize("batch, seq", [(2, 16), (3, 9)])
def test_rows_equal_dense_logits_at_the_mask(programs, batch, seq):
    _, dense, sparse, _ = programs
    tokens = ids(batch, seq, seed=1)
    mask = torch.rand(batch, seq, generator=torch.Generator().manual_seed(2)) < 0.3
    with torch.no_grad():
        full = dense.gm(tokens)
        rows = sparse.gm(tokens, mask)
        none = sparse.gm(tokens, torch.zeros_like(mask))
    assert rows.shape == (int(mask.sum()), VOCAB)
    assert_close(rows, full[mask], atol=1e-5, rtol=0)
    assert none.shape == (0, VOCAB)


def labels_for(name: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(labels, predict_mask, objective): BERT masked LM at ~15% of positions; GPT-2 supervised
    fine-tuning, loss on the answer only (labels -100 over each row's prompt), next-token shifted."""
    g = torch.Generator().manual_seed(3)
    if name == "bert":
        chosen = torch.rand(tokens.shape, generator=g) < 0.15
        chosen[:, 0] = True  # at least one label per row
        labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
        return labels, labels != IGNORE_INDEX, "mlm"
    labels = tokens.clone()
    for row, prompt in enumerate([5, 11]):
        labels[row, :prompt] = IGNORE_INDEX
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # logits at t predict labels[t + 1]
    return labels, mask, "clm"


def sparse_targets(name: str, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return labels[mask] if name == "bert" else labels[:, 1:][mask[:, :-1]]


def test_loss_and_gradients_equal_dense(programs):
    name, dense, sparse, _ = programs
    tokens = ids(2, 16, seed=4)
    labels, mask, objective = labels_for(name, tokens)
    assert 0 < int(mask.sum()) < mask.numel()
    params = dict(dense.gm.named_parameters())
    assert params.keys() == dict(sparse.gm.named_parameters()).keys()
    names = [k for k, p in params.items() if p.requires_grad]
    assert names

    dense_loss = task_loss(dense.gm(tokens), labels, objective)
    dense_grads = torch.autograd.grad(dense_loss, [params[k] for k in names])
    sparse_params = dict(sparse.gm.named_parameters())
    logits = sparse.gm(tokens, mask)
    sparse_loss = F.cross_entropy(logits, sparse_targets(name, labels, mask))
    sparse_grads = torch.autograd.grad(sparse_loss, [sparse_params[k] for k in names])

    assert_close(sparse_loss, dense_loss, atol=1e-5, rtol=0)
    for key, d, s in zip(names, dense_grads, sparse_grads):
        assert_close(s, d, atol=1e-5, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_save_load_round_trip(programs, tmp_path):
    name, _, sparse, _ = programs
    if name != "bert":
        pytest.skip("one model is enough: the re-export is the same gather")
    sparse.save(tmp_path / "program.pt2")
    loaded = load_program(tmp_path / "program.pt2")
    assert loaded.input_names == sparse.input_names
    assert loaded.meta["sparse_prediction"] == sparse.meta["sparse_prediction"]
    assert loaded.dynamic_shapes == sparse.dynamic_shapes
    tokens = ids(3, 10, seed=5)
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(6)) < 0.5
    with torch.no_grad():
        assert_close(loaded.gm(tokens, mask), sparse.gm(tokens, mask), atol=1e-6, rtol=0)
        plain = torch.export.load(str(tmp_path / "program.pt2")).module()  # a real archive
        assert_close(plain(tokens, mask), sparse.gm(tokens, mask), atol=1e-6, rtol=0)
    # a loaded sparse program verifies through the normal pipeline (cleanups may follow)
    _, records = Pipeline.parse("dce").run(loaded)
    assert records[0].verify["ok"]


class RowsHead(nn.Module):
    """A head written on flattened rows (HF Conv1D: view to [B*T, H], addmm, view back), with a
    per-channel scale, a scalar shift and tanh; the hidden state is a residual add."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.mix = nn.Linear(32, 32)
        self.scale = nn.Parameter(torch.rand(32) + 0.5)
        self.weight = nn.Parameter(torch.randn(32, VOCAB) / 6)
        self.bias = nn.Parameter(torch.randn(VOCAB) / 6)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = h + self.mix(h).cumsum(1)  # mixes positions: the head starts after it
        b, t, width = h.shape
        rows = torch.tanh(h * self.scale - 0.5).view(-1, width)
        return torch.addmm(self.bias, rows, self.weight).view(b, t, -1)


def test_head_on_flattened_rows():
    torch.manual_seed(0)
    program = capture(RowsHead())
    dense = program.copy()
    result = run_pass(program)
    assert result.stats["projections"] == 1
    assert result.details["head"][-3:] == ["view", "addmm", "view"] and "tanh" in result.details["head"]
    FileCheck().check("aten.index_select.default(").check("aten.tanh.default(").check("aten.addmm.default(").run(
        program.gm.code
    )
    tokens, mask = ids(3, 7, seed=7), torch.rand(3, 7, generator=torch.Generator().manual_seed(8)) < 0.4
    with torch.no_grad():
        assert_close(program.gm(tokens, mask), dense.gm(tokens)[mask], atol=1e-5, rtol=0)


# -- refusals -----------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """Token ids -> hidden states, no LM head (the last op mixes positions into each)."""

    def __init__(self, mix_after_head: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, VOCAB) if mix_after_head else None

    def forward(self, input_ids):
        h = self.embed(input_ids)
        h = self.norm(h + h.mean(1, keepdim=True))
        if self.head is None:
            return h
        logits = self.head(h)
        return logits - logits.mean(1, keepdim=True)  # each position's logits read the others'


def capture(model):
    return optpipe.capture(model.eval(), {"input_ids": ids(2, 8)})


def test_refuses_an_encoder_without_lm_head():
    with pytest.raises(PassError, match="no LM head: output layer_norm .* at norm is not a weight projection") as e:
        Pipeline.parse("sparse-prediction").run(capture(Encoder()))
    assert "BertForMaskedLM" in e.value.hint and "\n" not in e.value.one_line()


def test_refuses_logits_that_mix_positions():
    """A near miss: the projection is there, but the logits' last op reads every position."""
    with pytest.raises(PassError, match="no LM head"):
        run_pass(capture(Encoder(mix_after_head=True)))


def test_refuses_kv_cache_programs_and_a_second_run(programs):
    _, dense, sparse, _ = programs
    step = dense.copy()
    step.meta["kv_cache"] = {"max_len": 32, "layers": []}  # what kv-cache leaves (its refusal reads only this)
    with pytest.raises(PassError, match="kv-cache step program"):
        run_pass(step)
    with pytest.raises(PassError, match="already predicts sparsely"):
        run_pass(sparse.copy())
    with pytest.raises(PassError, match="already predicts sparsely"):  # through a pipeline too
        Pipeline.parse("sparse-prediction").run(sparse)


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("kv-cache,sparse-prediction", "sparse-prediction cannot follow kv-cache: sparse-prediction must run before"),
        ("sparse-prediction,kv-cache", "kv-cache cannot follow sparse-prediction.*must run last.*predict_mask"),
        ("sparse-prediction,quantize", "quantize cannot follow sparse-prediction"),
    ],
)
def test_order_runs_it_last_and_apart_from_kv_cache(pipeline, message):
    with pytest.raises(UsageError, match=message):
        Pipeline.parse(pipeline).check_own_order()
    Pipeline.parse("fuse-attention,sparse-prediction,dce").check_own_order()  # cleanups may follow


# -- train applies it --------------------------------------------------------------------------------
def bert_mlm_bytes():
    """A tiny BertForMaskedLM over optpipe's byte tokenizer (259 ids), with a [1, 32] example."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64,
    )  # fmt: skip
    return BertForMaskedLM(config).eval(), {"input_ids": torch.randint(0, 256, (1, 32))}


def test_train_applies_it_to_mlm_and_saves_the_dense_program(pydoc_text, tmp_path):
    from optpipe.program import load_program
    from optpipe.runtime.training import train

    spec = f"{__file__}:bert_mlm_bytes"
    common = dict(objective="mlm", steps=3, batch_size=4, log_every=1, progress=False)
    sparse = train(spec, pydoc_text, str(tmp_path / "auto"), **common)
    dense = train(spec, pydoc_text, str(tmp_path / "off"), sparse_prediction="off", **common)
    note = json.loads((tmp_path / "auto" / "train.json").read_text())["sparse_prediction"]
    assert note["applied"] and 0 < note["flops_saved"] < note["head_flops_share"]
    assert json.loads((tmp_path / "off" / "train.json").read_text())["sparse_prediction"] == {
        "applied": False,
        "reason": "off",
    }
    for a, b in zip(sparse.metrics, dense.metrics):  # the same steps: losses equal to dense
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    saved = load_program(tmp_path / "auto" / "program.pt2")
    assert saved.input_names == ["input_ids"] and "sparse_prediction" not in saved.meta
    # clm labels every position: nothing to skip, and `on` says why it cannot apply
    with pytest.raises(UsageError, match="--sparse-prediction on: the objective labels every position"):
        train(spec, pydoc_text, str(tmp_path / "clm"), objective="clm", steps=1, sparse_prediction="on", progress=False)
