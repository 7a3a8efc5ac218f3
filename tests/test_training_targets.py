"""optpipe train on other targets (onnxruntime-training, tvm) and model-parallel (--stages,
--tensor-parallel): loss curves against the torch run, resume on tvm, refusals before any work.
Split from tests/test_training.py so that pytest-xdist can run the two modules side by side."""

from __future__ import annotations

import json

import pytest
import torch

import optpipe
from optpipe.errors import UsageError
from optpipe.runtime.training import TrainingInterrupted, train
from tests.test_training import QUICK, trained_weights, write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory)


def test_onnxruntime_target_follows_the_torch_loss_curve(corpus, tmp_path):
    common = {"steps": 20, "batch_size": 4, "lr": 2e-3, "clip": None, "log_every": 1, "progress": False}
    cpu = train(QUICK, corpus, str(tmp_path / "cpu"), **common)
    ort = train(QUICK, corpus, str(tmp_path / "ort"), target="onnxruntime", **common)
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(cpu.metrics, ort.metrics)]
    assert len(diffs) == 20 and max(diffs) < 1e-3
    assert cpu.metrics[-1]["loss"] < cpu.metrics[0]["loss"] - 0.2  # it learned something
    assert ort.val_loss == pytest.approx(cpu.val_loss, abs=1e-3)  # the written program holds ORT's weights
    ev = optpipe.runtime.training.evaluate(ort.out, corpus, batch_size=4)
    assert ev["val_loss"] == pytest.approx(ort.val_loss, abs=1e-5)
    with pytest.raises(UsageError, match="clip"):
        train(QUICK, corpus, str(tmp_path / "x"), target="onnxruntime", steps=1, progress=False)


def test_tvm_target_follows_the_torch_loss_curve_and_resumes(corpus, tmp_path):
    """Relax autodiff + Relax AdamW with everything the torch run uses: clipping, weight decay
    (none on 1-d tensors), layer decay, gradient accumulation; then resume on tvm from a checkpoint
    (the second run reuses the first one's builds: same graph, weights are inputs)."""
    common = {
        "steps": 20,
        "batch_size": 4,
        "grad_accum": 2,
        "lr": 2e-3,
        "weight_decay": 0.1,
        "layer_decay": 0.8,
        "clip": 0.5,
        "log_every": 1,
        "checkpoint_every": 5,
        "progress": False,
    }
    cpu = train(QUICK, corpus, str(tmp_path / "cpu"), **common)
    tvm = train(QUICK, corpus, str(tmp_path / "tvm"), target="tvm", **common)
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(cpu.metrics, tvm.metrics)]
    assert len(diffs) == 20 and max(diffs) < 1e-3
    assert tvm.val_loss == pytest.approx(cpu.val_loss, abs=1e-3)
    ev = optpipe.runtime.training.evaluate(tvm.out, corpus, batch_size=4)  # the written program holds TVM's weights
    assert ev["val_loss"] == pytest.approx(tvm.val_loss, abs=1e-5)
    wa, wb = trained_weights(cpu.out), trained_weights(tvm.out)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-4, rtol=1e-3)
    with pytest.raises(TrainingInterrupted):
        train(QUICK, corpus, str(tmp_path / "part"), target="tvm", stop_after=10, **common)
    resumed = train(QUICK, corpus, str(tmp_path / "part"), target="tvm", resume=True, **common)
    assert [r["loss"] for r in resumed.metrics][-5:] == [r["loss"] for r in tvm.metrics][-5:]
    wa, wb = trained_weights(tvm.out), trained_weights(resumed.out)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_tvm_target_names_the_op_it_cannot_differentiate_before_any_work(tmp_path):
    from optpipe.capture import capture
    from optpipe.errors import TargetError
    from optpipe.registry import get_target

    class Clamped(torch.nn.Module):  # clamp imports as relax.clip, which has no Relax gradient
        def __init__(self):
            super().__init__()
            self.emb, self.fc, self.head = (
                torch.nn.Embedding(259, 16),
                torch.nn.Linear(16, 16),
                torch.nn.Linear(16, 259),
            )

        def forward(self, ids):
            return self.head(self.fc(self.emb(ids)).clamp(-1, 1))

    program = capture(Clamped(), (torch.zeros(1, 8, dtype=torch.long),))
    with pytest.raises(TargetError, match="no gradient for relax.clip") as e:
        get_target("tvm").check_trainable(program, "clm")
    assert "\n" not in str(e.value)
    get_target("tvm").check_trainable(optpipe.load(QUICK), "mlm")  # the GPT passes: gelu's rule is registered


def test_model_parallel_training_matches_one_process(corpus, tmp_path):
    """`optpipe train --stages 2` and `--tensor-parallel 2`: the same AdamW steps as one process,
    with the warmup + cosine schedule, gradient clipping at a norm that binds (the whole model's
    gradient norm: over the stages' and the shards' parameters) and weight decay on matrices only.
    Tensor x data parallel: tests/passes/test_partition_tensor.py."""
    common = {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup": 1, "clip": 0.05, "weight_decay": 0.1, "log_every": 1}
    one = train(QUICK, corpus, str(tmp_path / "one"), progress=False, **common)
    two = train(QUICK, corpus, str(tmp_path / "two"), stages=2, microbatches=2, **common)
    tp = train(QUICK, corpus, str(tmp_path / "tp"), tensor_parallel=2, grad_accum=2, **common)  # same math
    wa = trained_weights(one.out)
    assert len({r["lr"] for r in one.metrics}) > 1  # not constant
    for run in (two, tp):
        assert [r["loss"] for r in run.metrics] == pytest.approx([r["loss"] for r in one.metrics], abs=1e-5)
        assert [r["lr"] for r in run.metrics] == pytest.approx([r["lr"] for r in one.metrics])
        wb = trained_weights(run.out)
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)
    info = json.loads((tmp_path / "tp" / "train.json").read_text())
    assert (info["tensor_parallel"], info["data_parallel"]) == (2, 1)
    with pytest.raises(UsageError, match="does not take --distill-from"):
        train(QUICK, corpus, str(tmp_path / "x"), stages=2, distill_from=QUICK, steps=1)
    with pytest.raises(UsageError, match="--stages does not take --grad-accum") as e:
        train(QUICK, corpus, str(tmp_path / "x"), stages=2, grad_accum=2, steps=1)
    assert "accumulates over its --microbatches" in e.value.one_line()
    with pytest.raises(UsageError, match="--stages does not take --layer-decay"):
        train(QUICK, corpus, str(tmp_path / "x"), stages=2, layer_decay=0.8, steps=1)
    with pytest.raises(UsageError, match="--tensor-parallel does not take --resume"):
        train(QUICK, corpus, str(tmp_path / "x"), tensor_parallel=2, resume=True, steps=1)
