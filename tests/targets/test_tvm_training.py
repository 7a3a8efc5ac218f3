"""Training on the tvm target (Relax autodiff + a Relax AdamW, targets/tvm_training.py): after an
attention swap (linear attention's state squeezes need the gradient rule this module registers;
sliding-window's masks) the losses and weights follow a torch.optim.AdamW loop on the same program
and batches; MLM with most labels ignored and only some parameters trainable (the frozen ones do
not move); eval_loss at another shape. The op-naming refusal and the CLI run (`train --target tvm`,
clipping, layer decay, resume) are in tests/test_training.py."""

import copy

import pytest
import torch

pytest.importorskip("tvm")

import optpipe
from optpipe.losses import task_loss
from optpipe.targets.tvm_training import TvmTrainer

HYPER = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def batches(n: int, batch: int = 2, seq: int = 32, seed: int = 0, ignore: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (batch, seq), generator=gen)
        labels = ids.clone()
        labels[torch.rand(batch, seq, generator=gen) < ignore] = -100
        out.append((ids, labels))
    return out


def reference(gm, trainable=None):
    ref = copy.deepcopy(gm)
    named = dict(ref.named_parameters())
    for n, p in named.items():
        p.requires_grad_(trainable is None or n in trainable)
    groups = [
        {"params": [p for p in named.values() if p.requires_grad and p.dim() >= 2]},
        {"params": [p for p in named.values() if p.requires_grad and p.dim() < 2], "weight_decay": 0.0},
    ]
    return ref, torch.optim.AdamW(groups, foreach=False, **HYPER)


@pytest.fixture(scope="module")
def tiny():
    from examples.tiny_gpt import build

    model, inputs = build()
    return optpipe.capture(model, inputs)


@pytest.mark.parametrize("kind", ["linear", "sliding-window,window=8"])
def test_swapped_attention_trains_like_torch(tiny, kind):
    program, records = optpipe.Pipeline.parse(f"fuse-attention,attention{{kind={kind}}}").run(tiny)
    assert records[-1].modified
    ref, opt = reference(program.gm)
    trainer = TvmTrainer(program, objective="clm", **HYPER)
    diffs = []
    for ids, labels in batches(5):
        mine = trainer.step((ids,), labels)
        opt.zero_grad()
        loss = task_loss(ref(ids), labels, "clm")
        loss.backward()
        opt.step()
        diffs.append(abs(mine - loss.item()))
    assert max(diffs) < 1e-4
    state = trainer.state_dict()
    for name, p in ref.named_parameters():  # AdamW divides by sqrt(v): 1e-7 gradient differences of
        # near-zero gradients grow to ~1e-4 in the first steps (lr 3e-3)
        torch.testing.assert_close(state[name], p.detach(), atol=1e-3, rtol=0, msg=name)


def test_mlm_with_frozen_parameters_and_eval_at_another_shape(tiny):
    program = tiny.copy()
    trainable = [n for n, _ in program.gm.named_parameters() if ".mlp." in n]
    ref, opt = reference(program.gm, set(trainable))
    trainer = TvmTrainer(program, objective="mlm", trainable=trainable, **HYPER)
    for ids, labels in batches(3, ignore=0.85):
        mine = trainer.step((ids,), labels)
        opt.zero_grad()
        loss = task_loss(ref(ids), labels, "mlm")
        loss.backward()
        opt.step()
        assert abs(mine - loss.item()) < 1e-4
    state = trainer.state_dict()
    for name, p in tiny.gm.named_parameters():
        if name in trainable:
            assert not torch.equal(state[name], p.detach()), name
            torch.testing.assert_close(state[name], ref.get_parameter(name).detach(), atol=1e-4, rtol=0)
        else:
            assert torch.equal(state[name], p.detach()), name  # frozen: untouched
    ids, labels = batches(1, batch=1, seq=16, seed=3, ignore=0.5)[0]
    with torch.no_grad():
        expected = task_loss(ref(ids), labels, "mlm").item()
    assert trainer.eval_loss((ids,), labels) == pytest.approx(expected, abs=1e-5)
