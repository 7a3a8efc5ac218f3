"""`optpipe train --objective mlm+nsp` (BERT pre-training: masked LM + next-sentence prediction) on
the onnxruntime and tvm targets: a tiny BertForPreTraining (tests/test_pretraining_objectives.py's)
follows the torch run step by step, in its loss and in each part (`mlm_loss`, `nsp_loss` in
metrics.jsonl), and its trained next-sentence head holds torch's weights; a program without that head
is refused in one line.

The loss graph of each target takes the NSP labels as one more input and adds the head's mean
cross-entropy weighted by the micro-batch's share of the batch's sentence pairs (onnxruntime runs
with --grad-accum 2 so that weight is not 1). What TVM needed: a gradient for `take` at a 0-d index
(the pooler reads hidden[:, 0]; TVM's take_backward takes 1-d indices only)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import optpipe
from optpipe.cli import main
from optpipe.errors import UsageError
from optpipe.runtime.train_config import TrainConfig
from optpipe.runtime.training import train
from tests.test_pretraining_objectives import bert_masked_lm, bert_pretraining

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
RUN = {
    "objective": "mlm+nsp", "seq_len": 64, "batch_size": 8, "steps": 5, "lr": 2e-3, "warmup": 0, "clip": None,
    "log_every": 1, "val_every": 5, "val_batches": 2, "progress": False,
}  # fmt: skip
HEAD = ("cls.seq_relationship.weight", "bert.pooler.dense.weight")  # the next-sentence head and what feeds it


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A saved program: every run loads its own weights (a Program's copies share them)."""
    path = str(tmp_path_factory.mktemp("nsp") / "bert.pt2")
    optpipe.capture(*bert_pretraining()).save(path)
    return path


@pytest.fixture(scope="module")
def torch_runs(tiny_bert, pydoc_text, tmp_path_factory):
    """The torch run of RUN at a --grad-accum, made once (a second or so each)."""
    runs = {}

    def run(grad_accum: int):
        if grad_accum not in runs:
            out = str(tmp_path_factory.mktemp("nsp") / f"cpu{grad_accum}")
            runs[grad_accum] = train(tiny_bert, pydoc_text, out, grad_accum=grad_accum, **RUN)
        return runs[grad_accum]

    return run


def follows_torch(run, reference, initial: str):
    for key in ("loss", "mlm_loss", "nsp_loss"):
        diffs = [abs(a[key] - b[key]) for a, b in zip(reference.metrics, run.metrics)]
        assert len(diffs) == RUN["steps"] and max(diffs) < 1e-4, (key, diffs)
    assert reference.metrics[-1]["mlm_loss"] < reference.metrics[0]["mlm_loss"] - 0.1  # it learned something
    assert run.val_loss == pytest.approx(reference.val_loss, abs=1e-4)  # the masked-LM part, as on torch
    start, mine, ref = (dict(optpipe.load(p).gm.named_parameters()) for p in (initial, run.out, reference.out))
    for name in HEAD:  # the NSP gradient reached the head: it moved, and as torch's did
        assert (ref[name] - start[name]).abs().max() > 1e-3, name
        torch.testing.assert_close(mine[name], ref[name], atol=1e-4, rtol=0)


def test_mlm_nsp_on_onnxruntime_follows_torch(tiny_bert, torch_runs, pydoc_text, tmp_path):
    pytest.importorskip("onnxruntime.training")
    run = train(tiny_bert, pydoc_text, str(tmp_path / "ort"), target="onnxruntime", grad_accum=2, **RUN)
    follows_torch(run, torch_runs(2), tiny_bert)


def test_mlm_nsp_on_tvm_follows_torch(tiny_bert, torch_runs, pydoc_text, tmp_path):
    """One Relax build (~15 s): the validation batch has the training batch's shape."""
    pytest.importorskip("tvm")
    run = train(tiny_bert, pydoc_text, str(tmp_path / "tvm"), target="tvm", **RUN)
    follows_torch(run, torch_runs(1), tiny_bert)


@pytest.mark.parametrize("target", ["onnxruntime", "tvm"])
def test_a_program_without_nsp_head_is_refused_in_one_line(target):
    from optpipe.registry import get_target

    TrainConfig(objective="mlm+nsp", target=target, clip=0)  # the objective trains there
    program = optpipe.capture(*bert_masked_lm())
    with pytest.raises(UsageError, match=rf"target {target} cannot train --objective mlm\+nsp: .*next-sentence") as e:
        get_target(target).check_trainable(program, "mlm+nsp")
    assert "\n" not in str(e.value) and "BertForPreTraining" in e.value.hint


def test_cli_refuses_mlm_nsp_without_the_head_on_onnxruntime(pydoc_text, tmp_path):
    spec = "tests/test_pretraining_objectives.py:bert_masked_lm"
    args = ["train", spec, "--data", pydoc_text, "--objective", "mlm+nsp", "--target", "onnxruntime", "--clip", "0"]
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "no next-sentence head" in r.output and "Traceback" not in r.output, r.output
