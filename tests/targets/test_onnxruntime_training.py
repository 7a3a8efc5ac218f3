"""Training on the onnxruntime target (onnxruntime-training artifacts built from the program):
the loss curve matches a plain torch.optim.AdamW loop on the same program, batches and weights; MLM
with mostly-ignored labels and frozen parameters; a program rewritten by a lossy pass; trained
weights written back into the program; and the trainability check naming what blocks training."""

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime.training")

from optpipe import capture
from optpipe.errors import TargetError, UsageError
from optpipe.ops import define_op
from optpipe.pipeline import Pipeline
from optpipe.registry import PassResult, register_pass
from optpipe.targets.onnxruntime_training import OrtTrainer, check_trainable, training_loss

aten = torch.ops.aten
HYPER = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0, ignore: float = 0.0):
    """n (input_ids, labels) pairs; `ignore` of the label positions are -100."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        labels = ids.clone()
        labels[torch.rand(batch, seq, generator=gen) < ignore] = -100
        out.append((ids, labels))
    return out


def torch_reference(gm, trainable=None):
    """A deep copy of the program's module and torch.optim.AdamW over its `trainable` parameters."""
    ref = copy.deepcopy(gm)
    params = dict(ref.named_parameters())
    chosen = [p for n, p in params.items() if trainable is None or n in trainable]
    for n, p in params.items():
        p.requires_grad_(trainable is None or n in trainable)
    return ref, torch.optim.AdamW(chosen, **HYPER)


def torch_step(ref, opt, inputs, labels, objective):
    opt.zero_grad()
    loss = training_loss(ref(*inputs), labels, objective)
    loss.backward()
    opt.step()
    return loss.item()


@pytest.fixture(scope="module")
def tiny():
    from examples.tiny_gpt import build

    model, inputs = build()
    return capture(model, inputs)


# ---- clm: the tiny GPT, all parameters -----------------------------------------------------------------


def test_clm_loss_curve_matches_torch_adamw_and_weights_load_back(tiny):
    program = tiny.copy()
    program.gm = copy.deepcopy(tiny.gm)  # own weights: load_into writes into them
    ref, opt = torch_reference(program.gm)
    trainer = OrtTrainer(program, objective="clm", **HYPER)
    assert trainer.info["trainable_tensors"] == 28 and "not_in_graph" not in trainer.info  # wte+lm_head: one
    data = batches(4, batch=4, seq=32, vocab=256, ignore=0.1)  # batch 4: the captured batch is 1
    ort_losses, torch_losses = [], []
    for step in range(20):
        ids, labels = data[step % len(data)]
        ort_losses.append(trainer.step((ids,), labels))
        torch_losses.append(torch_step(ref, opt, (ids,), labels, "clm"))
    diff = max(abs(a - b) for a, b in zip(ort_losses, torch_losses))
    print(f"max |ORT - torch| loss over 20 steps: {diff:.3g}")
    assert diff < 1e-3
    assert ort_losses[-1] < ort_losses[0] - 0.5  # it learns: the same 4 batches again and again

    # gradient accumulation: two half-scaled micro-batches == torch's (l1/2 + l2/2).backward()
    (ids1, lab1), (ids2, lab2) = data[0], data[1]
    l1 = trainer.accumulate((ids1,), lab1, scale=0.5)
    l2 = trainer.accumulate((ids2,), lab2, scale=0.5)
    trainer.optimizer_step(lr=1e-3)
    opt.zero_grad()
    for g in opt.param_groups:
        g["lr"] = 1e-3
    t1 = training_loss(ref(ids1), lab1, "clm")
    (t1 / 2).backward()
    t2 = training_loss(ref(ids2), lab2, "clm")
    (t2 / 2).backward()
    opt.step()
    assert abs(l1 - t1.item()) < 1e-3 and abs(l2 - t2.item()) < 1e-3

    state = trainer.state_dict()
    assert state["transformer.wte.weight"] is state["lm_head.weight"]  # tied in ORT, reported under both names
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state[name], p.detach(), atol=2e-4, rtol=0)

    probe_ids, probe_labels = batches(1, batch=2, seq=16, vocab=256, seed=7)[0]  # another sequence length
    ort_eval = trainer.eval_loss((probe_ids,), probe_labels)
    trainer.load_into(program)
    assert program.gm.get_parameter("transformer.wte.weight") is program.gm.get_parameter("lm_head.weight")
    with torch.no_grad():
        torch_eval = training_loss(program.gm(probe_ids), probe_labels, "clm").item()
    assert abs(ort_eval - torch_eval) < 1e-5
    with torch.no_grad():  # the source program's weights were never touched
        assert not torch.equal(tiny.gm.get_parameter("lm_head.weight"), program.gm.get_parameter("lm_head.weight"))


# ---- mlm: a tiny Hugging Face BERT with an MLM head, most labels ignored, part of it frozen --------------


def test_mlm_bert_with_frozen_parameters():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = transformers.BertForMaskedLM(config).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    program = capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    names = [n for n, _ in program.gm.named_parameters()]
    trainable = [n for n in names if ".layer.1." in n or n.startswith("cls.")]
    frozen = {n: p.detach().clone() for n, p in program.gm.named_parameters() if n not in trainable}
    ref, opt = torch_reference(program.gm, trainable)
    trainer = OrtTrainer(program, objective="mlm", trainable=trainable, **HYPER)
    assert trainer.info["frozen_tensors"] > 0

    data = batches(3, batch=4, seq=16, vocab=128, seed=1, ignore=0.85)
    diffs = []
    for ids, labels in data * 2:
        mask = torch.ones_like(ids)
        mask[0, 12:] = 0  # a padded row
        diffs.append(abs(trainer.step((ids, mask), labels) - torch_step(ref, opt, (ids, mask), labels, "mlm")))
    print(f"mlm: max |ORT - torch| loss over 6 steps: {max(diffs):.3g}")
    assert max(diffs) < 1e-3, diffs

    state = trainer.state_dict()
    for name, before in frozen.items():
        torch.testing.assert_close(state[name], before, atol=0, rtol=0)  # frozen: bit for bit
    moved = [n for n in trainable if not torch.equal(state[n], program.gm.get_parameter(n).detach())]
    assert moved  # (the tied decoder weight is frozen with the word embeddings it shares)
    ids, labels = data[0]
    mask = torch.ones_like(ids)
    ort_eval = trainer.eval_loss((ids, mask), labels)
    trainer.load_into(program)
    with torch.no_grad():
        assert abs(training_loss(program.gm(ids, mask), labels, "mlm").item() - ort_eval) < 1e-5


# ---- a program after a lossy, rewriting pass ------------------------------------------------------------


@pytest.mark.parametrize(
    "attention, op",
    [
        ("kind=sliding-window,window=8", "optpipe.sparse_attention"),
        ("kind=linear,chunk=8", "optpipe.linear_attention"),  # elu+1 features: ONNX Elu has no ORT gradient
    ],
)
def test_program_after_attention_rewrite_trains(tiny, attention, op):
    program, _ = Pipeline.parse(f"fuse-attention,attention{{{attention}}},dce").run(tiny.copy(), verify=False)
    assert op in program.gm.code
    program.gm = copy.deepcopy(program.gm)
    ref, opt = torch_reference(program.gm)
    trainer = OrtTrainer(program, objective="clm", **HYPER)
    diffs = [
        abs(trainer.step((ids,), labels) - torch_step(ref, opt, (ids,), labels, "clm"))
        for ids, labels in batches(5, batch=2, seq=32, vocab=256, seed=3)
    ]
    print(f"{attention}: max |ORT - torch| loss over 5 steps: {max(diffs):.3g}")
    assert max(diffs) < 1e-3, diffs


# ---- the trainability check -----------------------------------------------------------------------------


def _native_only_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


# an optpipe op without a decomposition: training (which decomposes every optpipe op) cannot take it
native_only_gelu = define_op("test_ort_train_native_only_gelu", _native_only_gelu, fake=lambda x: torch.empty_like(x))


@dataclass(frozen=True)
class NoOptions:
    pass


@register_pass("test-ort-train-native-only-gelu", NoOptions, exact=True)
def native_only_gelu_pass(program, config):
    count = 0
    for node in list(program.gm.graph.nodes):
        if node.target is aten.gelu.default:
            with program.gm.graph.inserting_after(node):
                new = program.gm.graph.call_function(native_only_gelu, (node.args[0],))
            new.meta = {k: v for k, v in node.meta.items() if k != "custom"}
            node.replace_all_uses_with(new)
            program.gm.graph.erase_node(node)
            count += 1
    program.gm.recompile()
    return PassResult(count > 0, {"rewritten": count})


def test_check_trainable_names_the_blocking_op_and_its_pass(tiny):
    program, _ = Pipeline.parse("test-ort-train-native-only-gelu").run(tiny.copy(), verify=False)
    with pytest.raises(TargetError) as info:
        check_trainable(program, "clm")
    msg = str(info.value)
    assert "cannot train 2 node(s)" in msg
    assert "optpipe.test_ort_train_native_only_gelu at transformer.h.0.mlp.gelu" in msg
    assert "introduced by test-ort-train-native-only-gelu" in msg
    with pytest.raises(TargetError, match="test_ort_train_native_only_gelu"):
        OrtTrainer(program)  # the trainer runs the same check before any export


def test_bad_objective_and_trainable_names_are_usage_errors(tiny):
    with pytest.raises(UsageError, match="unknown objective 'prefix-lm'"):
        check_trainable(tiny, "prefix-lm")
    with pytest.raises(UsageError, match="no parameter named 'nope.weight'"):
        OrtTrainer(tiny, trainable=["nope.weight"])


class ToyLM(torch.nn.Module):
    """Embedding -> gated linear unit (a split) [-> cumsum over the sequence] -> vocabulary logits."""

    def __init__(self, cumsum: bool = False):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 16)
        self.glu = torch.nn.Linear(16, 32)
        self.head = torch.nn.Linear(16, 64)
        self.cumsum = cumsum

    def forward(self, input_ids):
        a, b = self.glu(self.emb(input_ids)).split(16, dim=-1)
        h = a * torch.sigmoid(b)
        return self.head(h.cumsum(1) if self.cumsum else h)


def toy_program(cumsum: bool = False):
    torch.manual_seed(0)
    return capture(ToyLM(cumsum).eval(), (torch.randint(0, 64, (2, 8)),))


def test_check_trainable_names_an_op_without_ort_gradient():
    with pytest.raises(TargetError) as info:
        check_trainable(toy_program(cumsum=True), "clm")
    msg = str(info.value)
    assert "cannot train 1 node(s): aten.cumsum (ONNX CumSum: no gradient in ORT)" in msg


def test_gradient_builder_failure_names_the_onnx_op_and_its_module(monkeypatch):
    from optpipe.targets import onnxruntime_training as training

    # without the split -> slice decomposition torchlib writes SplitToSequence, which ORT cannot differentiate
    kept = {op: fn for op, fn in training.TRAINING_DECOMPOSITIONS.items() if "split" not in str(op)}
    monkeypatch.setattr(training, "TRAINING_DECOMPOSITIONS", kept)
    with pytest.raises(TargetError) as info:
        OrtTrainer(toy_program(), objective="clm")
    msg = str(info.value)
    # ORT names the first parameter it cannot reach, which depends on its graph walk order
    assert "cannot build the gradient graph: Cannot compute the partial derivative for '" in msg
    assert "ONNX ops without a gradient: SplitToSequence from <top> [split]" in msg, msg
    assert "ONNXRuntimeError" not in msg and "\x1b" not in msg
