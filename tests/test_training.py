"""optpipe train: objectives, distillation, schedules, checkpoints/resume, data parallel, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import optpipe
from optpipe.errors import UsageError
from optpipe.losses import task_loss
from optpipe.runtime.training import (
    TrainConfig,
    TrainingInterrupted,
    block_paths,
    param_groups,
    rewritten_paths,
    tapped_module,
    train,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "examples", "heal.py") + ":build_quick"  # byte-level GPT, context 32


def write_corpus(tmp_path_factory) -> str:
    """A text file of Python's own docs (`optpipe.runtime.data.pydoc_corpus`) to train on."""
    from optpipe.runtime.data import pydoc_corpus

    path = tmp_path_factory.mktemp("data") / "pydoc.txt"
    pydoc_corpus(path)
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def dense(corpus, tmp_path_factory):
    """A briefly pre-trained dense program (OUT folder)."""
    out = str(tmp_path_factory.mktemp("runs") / "dense")
    train(QUICK, corpus, out, steps=40, batch_size=8, lr=3e-3, log_every=20, progress=False)
    return out


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def trained_weights(out):
    """{name: tensor} of the program in OUT folder (or MODEL) `out`."""
    prog = optpipe.load(out)
    return {n: p.detach().clone() for n, p in prog.gm.named_parameters()}


def test_clm_pretraining_writes_a_trained_out_folder(dense, corpus):
    rows = _metrics(dense)
    assert [r["step"] for r in rows] == [20, 40]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in rows)
    assert "val_loss" in rows[-1] and rows[-1]["val_ppl"] == pytest.approx(
        torch.tensor(rows[-1]["val_loss"]).exp().item(), rel=1e-3
    )
    assert rows[-1]["loss"] < 5.0  # from ln(259) = 5.56 at init
    for name in ("program.pt2", "train.json", "target.json", "pipeline.txt"):
        assert os.path.isfile(os.path.join(dense, name)), name
    # the trained weights are what program.pt2 holds, and the program still runs
    prog = optpipe.load(dense)
    fresh = optpipe.load(QUICK)
    assert not torch.equal(
        dict(prog.gm.named_parameters())["transformer.h.0.mlp.c_fc.weight"],
        dict(fresh.gm.named_parameters())["transformer.h.0.mlp.c_fc.weight"],
    )
    ids = torch.randint(0, 256, (2, 32))
    logits = prog.gm(ids)
    assert logits.shape == (2, 32, 259) and torch.isfinite(logits).all()
    ev = optpipe.runtime.training.evaluate(dense, corpus, batch_size=8)
    assert ev["val_ppl"] == pytest.approx(rows[-1]["val_ppl"], rel=1e-4)


def test_loss_matches_a_plain_torch_loop(corpus, tmp_path):
    """The trainer's loss and update are AdamW on mean next-token cross-entropy, nothing else."""
    from optpipe.runtime.data import TrainingData

    cfg = {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup": 0, "clip": None, "weight_decay": 0.0}
    res = train(QUICK, corpus, str(tmp_path / "a"), log_every=1, progress=False, **cfg)
    prog = optpipe.load(QUICK)
    data = TrainingData(corpus, seq_len=32, objective="clm", seed=0, vocab_size=259)
    opt = torch.optim.AdamW(prog.gm.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    config = TrainConfig(**cfg)
    losses = []
    for step in range(3):
        batch = data.next_batch(4)
        for g in opt.param_groups:
            g["lr"] = config.lr_at(step)
        opt.zero_grad()
        loss = task_loss(prog.gm(batch["input_ids"]), batch["labels"], "clm")
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert [r["loss"] for r in res.metrics] == pytest.approx(losses, abs=1e-5)


def test_gradient_accumulation_gives_the_same_steps(corpus, tmp_path):
    a = train(QUICK, corpus, str(tmp_path / "a"), steps=4, batch_size=8, log_every=1, progress=False)
    b = train(QUICK, corpus, str(tmp_path / "b"), steps=4, batch_size=8, grad_accum=4, log_every=1, progress=False)
    assert [r["loss"] for r in a.metrics] == pytest.approx([r["loss"] for r in b.metrics], abs=1e-5)
    wa, wb = trained_weights(a.out), trained_weights(b.out)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)


def test_schedule_warmup_then_cosine():
    c = TrainConfig(steps=100, lr=1e-3, warmup=10, min_lr=1e-4)
    assert c.lr_at(0) == pytest.approx(1e-4)
    assert c.lr_at(9) == pytest.approx(1e-3)
    assert c.lr_at(55) == pytest.approx(0.55e-3, rel=1e-2)
    assert c.lr_at(99) == pytest.approx(1e-4, rel=0.05)
    assert all(c.lr_at(i) >= c.lr_at(i + 1) for i in range(10, 99))


def test_layer_decay_and_weight_decay_groups():
    prog = optpipe.load(QUICK)
    named = list(prog.gm.named_parameters())
    groups = param_groups(named, TrainConfig(layer_decay=0.5, weight_decay=0.1))
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["transformer.h.1.attn.c_attn.weight"] == 0.5  # layer 1 of 2
    assert scale["transformer.h.0.attn.c_attn.weight"] == 0.25
    assert scale["transformer.wpe.weight"] == 0.125  # embeddings below the first layer
    assert scale["transformer.ln_f.weight"] == 1.0
    assert decay["transformer.h.0.mlp.c_fc.weight"] == 0.1 and decay["transformer.h.0.mlp.c_fc.bias"] == 0.0


def test_distillation_heals_a_sliding_window_swap(dense, corpus, tmp_path):
    swapped = str(tmp_path / "sw")
    optpipe.optimize(dense, pipeline="attention{kind=sliding-window,window=4}", target="cpu").save(swapped)
    prog = optpipe.load(swapped)
    assert rewritten_paths(prog) == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert block_paths(prog) == ["transformer.h.0", "transformer.h.1"]
    before = optpipe.runtime.training.evaluate(swapped, corpus, batch_size=8)["val_loss"]
    healed = train(
        swapped,
        corpus,
        str(tmp_path / "healed"),
        steps=30,
        batch_size=8,
        lr=1e-3,
        distill_from=dense,
        log_every=10,
        progress=False,
    )
    with open(os.path.join(healed.out, "train.json")) as f:
        taps = json.load(f)["taps"]
    assert taps == ["transformer.h.0", "transformer.h.1", "transformer.h.0.attn", "transformer.h.1.attn"]
    assert healed.val_loss < before
    # the healed program keeps its sliding-window attention
    assert "optpipe.sparse_attention" in optpipe.load(healed.out).gm.code


def test_tapped_module_returns_module_outputs(dense):
    prog = optpipe.load(dense)
    fn, found = tapped_module(prog, ["transformer.h.1", "transformer.h.0.mlp", "no.such.module"])
    assert found == ["transformer.h.1", "transformer.h.0.mlp"]
    ids = torch.randint(0, 256, (2, 32))
    logits, h1, mlp0 = fn(ids)
    torch.testing.assert_close(logits, prog.gm(ids))
    assert h1.shape == (2, 32, 32) and mlp0.shape == (2, 32, 32)


def test_trainable_changed_trains_only_rewritten_modules(dense, corpus, tmp_path):
    swapped = str(tmp_path / "sw")
    optpipe.optimize(dense, pipeline="attention{kind=sliding-window,window=4,layers=1}", target="cpu").save(swapped)
    res = train(
        swapped,
        corpus,
        str(tmp_path / "t"),
        steps=3,
        batch_size=4,
        trainable="changed",
        distill_from=dense,
        progress=False,
    )
    before, after = trained_weights(swapped), trained_weights(res.out)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("transformer.h.1.attn.") for n in changed)
    with pytest.raises(UsageError, match="no parameter matches"):
        train(swapped, corpus, str(tmp_path / "u"), steps=1, trainable="nothing.*", progress=False)


def test_mlm_on_the_real_minilm_with_whole_word_masking(tmp_path):
    from tests.hf_models import minilm_path

    text = tmp_path / "docs.jsonl"
    with open(text, "w") as f:
        for i in range(200):
            f.write(
                json.dumps(
                    {
                        "text": f"Sentence number {i} talks about optimizing transformer models "
                        f"with sparse attention and quantization, part {i % 7}."
                    }
                )
                + "\n"
            )
    mlm = os.path.join(ROOT, "examples", "heal.py") + ":minilm_mlm"
    res = train(
        mlm,
        str(text),
        str(tmp_path / "mlm"),
        objective="mlm",
        mask="whole-word",
        steps=3,
        batch_size=2,
        seq_len=32,
        lr=1e-3,
        trainable="cls.*",
        val_fraction=0.2,
        val_batches=1,
        log_every=1,
        progress=False,
    )
    assert res.val_ppl is not None and all(r["loss"] < 12 for r in res.metrics)
    assert os.path.isfile(os.path.join(res.out, "tokenizer.json"))  # the WordPiece tokenizer, not bytes
    before, after = trained_weights(mlm), trained_weights(res.out)
    assert torch.equal(
        before["bert.encoder.layer.0.output.dense.weight"], after["bert.encoder.layer.0.output.dense.weight"]
    )
    assert not torch.equal(
        before["cls.predictions.transform.dense.weight"], after["cls.predictions.transform.dense.weight"]
    )
    # the encoder alone (hidden states, no LM head) is refused before any work
    with pytest.raises(UsageError, match="not logits over its 30522-token vocabulary"):
        train(str(minilm_path()), str(text), str(tmp_path / "enc"), objective="mlm", steps=1, progress=False)


def test_interrupt_saves_a_checkpoint_and_resume_is_bit_exact(corpus, tmp_path):
    full = train(
        QUICK, corpus, str(tmp_path / "full"), steps=12, batch_size=4, checkpoint_every=4, log_every=2, progress=False
    )
    out = str(tmp_path / "cut")
    with pytest.raises(TrainingInterrupted) as e:
        train(QUICK, corpus, out, steps=12, batch_size=4, checkpoint_every=4, log_every=2, progress=False, stop_after=7)
    assert e.value.step == 7 and e.value.checkpoint.endswith("step-0000007")
    resumed = train(
        QUICK, corpus, out, steps=12, batch_size=4, checkpoint_every=4, log_every=2, progress=False, resume=True
    )
    wa, wb = trained_weights(full.out), trained_weights(resumed.out)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert _metrics(full.out) == [
        {**r, "tokens_per_s": r2["tokens_per_s"]} for r, r2 in zip(_metrics(out), _metrics(full.out))
    ]


def _cli(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "optpipe", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_kill_9_then_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    args = [
        "train",
        QUICK,
        "--data",
        corpus,
        "--steps",
        "40",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "5",
        "--log-every",
        "5",
    ]
    full = _cli(*args, "-o", str(tmp_path / "full"))
    assert full.wait(timeout=300) == 0, full.stderr.read()
    out = tmp_path / "killed"
    proc = _cli(*args, "-o", str(out))
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-0000010").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "program.pt2").exists(), "the run finished before it was killed; kill it sooner"
    resumed = _cli(*args, "-o", str(out), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    wa, wb = trained_weights(str(tmp_path / "full")), trained_weights(str(out))
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_ctrl_c_writes_a_checkpoint_and_exits_130(corpus, tmp_path):
    out = tmp_path / "run"
    proc = _cli("train", QUICK, "--data", corpus, "--steps", "100000", "--batch-size", "2", "-o", str(out))
    deadline = time.time() + 120
    while not (out / "train.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = proc.stderr.read()
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    assert (out / "checkpoints" / "latest").exists()


def test_two_process_data_parallel_matches_one_process(corpus, tmp_path):
    one = train(QUICK, corpus, str(tmp_path / "one"), steps=6, batch_size=8, log_every=1, progress=False)
    two = train(QUICK, corpus, str(tmp_path / "two"), steps=6, batch_size=8, log_every=1, nproc=2)
    assert [r["loss"] for r in two.metrics] == pytest.approx([r["loss"] for r in one.metrics], abs=1e-5)
    wa, wb = trained_weights(one.out), trained_weights(two.out)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=1e-4)


def test_errors_are_one_line(corpus, tmp_path, dense):
    from click.testing import CliRunner

    from optpipe.cli import main

    def run(*args):
        r = CliRunner().invoke(main, ["train", *map(str, args)])
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
        return r.exit_code, r.stderr.strip()

    code, err = run(QUICK, "--data", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o1"))
    assert code == 2 and "missing.txt" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o1").exists()  # refused before anything was written
    small = os.path.join(ROOT, "examples", "tiny_gpt.py") + ":build"  # vocab 256: bytes need 259
    code, err = run(small, "--data", corpus, "--steps", "1", "-o", str(tmp_path / "o2"))
    assert code == 2 and "vocab size is 256" in err
    code, err = run(dense, "--data", corpus, "--steps", "1", "-o", dense)
    assert code == 2 and "is the model it reads" in err and os.path.isfile(os.path.join(dense, "program.pt2"))
    train(QUICK, corpus, str(tmp_path / "done"), steps=1, checkpoint_every=1, progress=False)
    code, err = run(QUICK, "--data", corpus, "--steps", "1", "-o", str(tmp_path / "done"))
    assert code == 2 and "--resume" in err  # an existing run is not overwritten without --force
    code, err = run(QUICK, "--data", corpus, "--batch-size", "6", "--grad-accum", "4", "-o", str(tmp_path / "o3"))
    assert code == 2 and "divisible" in err
    code, err = run(QUICK, "--data", corpus, "--resume", "-o", str(tmp_path / "nothing"))
    assert code == 2 and "does not exist" in err
    code, err = run(QUICK, "--data", corpus, "--amp", "-o", str(tmp_path / "o4"))
    assert code == 2 and "--amp" in err
