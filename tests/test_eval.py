"""optpipe eval: perplexity equal to a direct Hugging Face computation over the same strided windows,
train's validation split, masked-LM accuracy under seeded masks, embedding cosine, cost, the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import optpipe
from optpipe.cli import main
from optpipe.errors import UsageError
from optpipe.runtime.data import ByteTokenizer, TrainingData, iter_documents, pydoc_corpus, split_of, validation_batches
from optpipe.runtime.evaluation import (
    detect_task,
    eval_set,
    evaluate,
    measure_cost,
    reference_outputs,
    score,
    shares_weights,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(ROOT, "examples", "heal.py") + ":build_quick"  # byte-level GPT, context 32
BYTES, EOS = 259, 256  # ByteTokenizer: the vocabulary the tiny models below are built for
SEQ = 32
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny kernels: more threads only oversubscribe


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pydoc.txt"
    pydoc_corpus(path)
    return str(path)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A random-init GPT-2 over the byte vocabulary, saved as a Hugging Face folder (no tokenizer.json:
    text is read as bytes)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=BYTES, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=EOS, eos_token_id=EOS
    )
    folder = tmp_path_factory.mktemp("models") / "gpt2"
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def gpt2(gpt2_folder):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()


@pytest.fixture(scope="module")
def gpt2_program(gpt2_folder):
    return optpipe.load(gpt2_folder)


@pytest.fixture(scope="module")
def gpt2_out(gpt2_folder, tmp_path_factory):
    """`optpipe optimize` of the folder with an exact pipeline, on cpu (eager: no compile in tests)."""
    out = str(tmp_path_factory.mktemp("outs") / "fused")
    res = optpipe.optimize(gpt2_folder, pipeline="fuse-attention,dce", target="cpu", target_options={"mode": "eager"})
    res.save(out)
    return out


def val_stream(corpus, val_fraction=0.05) -> torch.Tensor:
    """The validation documents as bytes, each followed by eos, concatenated (what `train` packs)."""
    docs = [d for d in iter_documents(corpus) if split_of(d, val_fraction) == "val"]
    return torch.tensor([t for d in docs for t in [*d.encode("utf-8", "replace"), EOS]])


@torch.no_grad()
def strided_nll(logits_of, stream, seq_len, stride, max_tokens):
    """Hugging Face's perplexity recipe (docs: "Perplexity of fixed-length models"), over full windows:
    each window scores its last `end - prev_end` labels, shifted by one, with plain cross-entropy."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(stream) - seq_len + 1, stride):
        if count >= max_tokens:
            break
        end = begin + seq_len
        input_ids = stream[begin:end][None]
        target = input_ids.clone()
        target[:, : -(end - prev_end)] = -100
        logits = logits_of(input_ids)
        nll += F.cross_entropy(logits[0, :-1], target[0, 1:], ignore_index=-100, reduction="sum").item()
        count += int((target[0, 1:] != -100).sum())
        prev_end = end
    return nll / count, count


@pytest.mark.parametrize("stride", [SEQ, 12])
def test_clm_ppl_equals_the_hugging_face_computation(gpt2, gpt2_program, corpus, stride):
    assert detect_task(gpt2_program) == "clm"
    ev = eval_set(gpt2_program, corpus, seq_len=SEQ, stride=stride, batch=3, max_tokens=600)
    q = score(gpt2_program.gm, ev)
    nll, count = strided_nll(lambda ids: gpt2(ids).logits, val_stream(corpus), SEQ, stride, 600)
    assert q["tokens"] == count == ev.tokens and count >= 600
    assert q["ppl"] == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-4)
    assert q["nll"] == pytest.approx(nll, rel=1e-5)
    # the HF model itself as the reference: the captured program agrees with it everywhere
    q2 = score(gpt2_program.gm, ev, reference_outputs(gpt2, ev))
    assert q2["top1_agreement"] == 1.0 and q2["kl"] == pytest.approx(0.0, abs=1e-6)
    assert q2["ref_ppl"] == pytest.approx(q["ppl"], rel=1e-5)


def test_the_split_is_trains_validation_split(gpt2_program, tmp_path):
    """Every scored token comes from a validation document; no training document is ever scored,
    and the windows (stride == seq_len) are exactly the rows train validates on."""
    docs = [f"<doc {i:03d}> " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 3) for i in range(60)]
    docs = [d.strip() for d in docs]  # as the reader gives them back: the split hashes that text
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(docs) + "\n")
    ev = eval_set(gpt2_program, str(path), seq_len=SEQ, batch=4, val_fraction=0.3)
    text = ByteTokenizer().decode(torch.cat([b["ids"] for b in ev.batches]).flatten().tolist())
    sides = {d[:9]: split_of(d, 0.3) for d in docs}
    assert {"val", "train"} == set(sides.values())
    assert not [m for m, side in sides.items() if side == "train" and m in text]
    assert sum(m in text for m, side in sides.items() if side == "val") >= sum(s == "val" for s in sides.values()) - 1
    rows = validation_batches(str(path), seq_len=SEQ, batch_size=4, batches=1000, val_fraction=0.3)
    assert torch.equal(torch.cat(rows), torch.cat([b["ids"] for b in ev.batches])[: sum(len(r) for r in rows)])
    assert ev.description["documents"] == sum(s == "val" for s in sides.values())


@pytest.mark.slow
def test_optimized_out_against_its_source(gpt2_out, gpt2_folder, gpt2, corpus):
    """An OUT of an exact pipeline, on its own target, judged against the model it was optimized
    from (report.json's model.source, the default reference)."""
    doc = evaluate(gpt2_out, corpus, seq_len=SEQ, stride=16, batch=2, max_tokens=400, latency_iters=2)
    q = doc["quality"]
    assert q["reference"] == os.path.abspath(gpt2_folder)
    assert q["top1_agreement"] == 1.0 and q["kl"] == pytest.approx(0.0, abs=1e-6)
    nll, _ = strided_nll(lambda ids: gpt2(ids).logits, val_stream(corpus), SEQ, 16, 400)
    assert q["ppl"] == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-4)
    assert q["ref_ppl"] == pytest.approx(q["ppl"], rel=1e-5)
    c = doc["cost"]
    assert c["latency_ms_p90"] >= c["latency_ms_p50"] > 0
    assert c["tokens_per_s"] == pytest.approx(2 * SEQ / (c["latency_ms_p50"] / 1000), rel=1e-3)
    assert c["size_mb"] == pytest.approx(os.path.getsize(os.path.join(gpt2_out, "program.pt2")) / 2**20, abs=1e-3)
    assert doc["target"] == "cpu" and doc["data"]["split"] == "val"


def test_cli_json(gpt2_out, corpus):
    args = ["eval", gpt2_out, "--data", corpus, "--seq-len", SEQ, "--max-tokens", 100, "--iters", 2]
    args += ["--reference", gpt2_out, "--json"]  # the default reference (its source) is tested above
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)  # stdout holds the JSON document and nothing else
    assert set(doc) == {"quality", "cost", "target", "data"}
    assert {"ppl", "nll", "tokens", "top1_agreement", "kl", "ref_ppl", "task"} <= set(doc["quality"])
    assert set(doc["cost"]) >= {"latency_ms_p50", "latency_ms_p90", "tokens_per_s", "peak_mem_mb", "size_mb"}
    assert doc["cost"]["peak_mem_mb"] > 0  # activations of a [1, 32] forward, seen by the profiler
    assert {"files", "split", "documents", "windows", "tokens", "tokenizer", "seed"} <= set(doc["data"])
    assert doc["data"]["stride"] == SEQ and doc["quality"]["top1_agreement"] == 1.0


@pytest.mark.parametrize(
    "case, message",
    [
        ("beyond-vocab", "tokenized with bytes"),
        ("empty", "is empty"),
        ("short", "fewer than seq_len=32 tokens"),
    ],
)
def test_bad_data_is_one_line(case, message, gpt2_out, tmp_path):
    data, model = tmp_path / "data.txt", gpt2_out
    if case == "beyond-vocab":  # a model of 128 tokens, and bytes up to 255
        model = os.path.join(ROOT, "tests", "hf_models.py") + ":gpt2"
        data.write_text("héllo wörld, " * 20 + "\n")
    elif case == "empty":
        data.write_text("")
    else:
        data.write_text("too short\n")
    args = ["eval", model, "--data", data, "--val-fraction", 0, "--seq-len", SEQ, "--iters", 1, "--json"]
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2 and r.stdout == ""
    errors = [line for line in r.stderr.splitlines() if line.startswith("optpipe: error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr


def test_an_out_runs_on_its_own_target(gpt2_out, corpus):
    r = CliRunner().invoke(main, ["eval", gpt2_out, "--data", corpus, "--target", "onnxruntime", "--json"])
    assert r.exit_code == 2 and r.stdout == "" and "compiled for cpu" in r.stderr


@pytest.fixture(scope="module")
def bert_mlm():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=BYTES,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=257,
    )
    model = BertForMaskedLM(config).eval()
    ids = torch.zeros(1, SEQ, dtype=torch.long)
    return model, optpipe.capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_mlm_accuracy_under_seeded_masks(bert_mlm, corpus):
    model, prog = bert_mlm
    assert detect_task(prog) == "mlm"
    a, b = (eval_set(prog, corpus, seq_len=SEQ, batch=4, max_tokens=150, seed=3) for _ in range(2))
    for x, y in zip(a.batches, b.batches, strict=True):  # the same masks twice
        assert torch.equal(x["ids"], y["ids"]) and torch.equal(x["labels"], y["labels"])
    other = eval_set(prog, corpus, seq_len=SEQ, batch=4, max_tokens=150, seed=4)
    assert not torch.equal(other.batches[0]["labels"], a.batches[0]["labels"])
    # the masks of train's validation for the same seed and batch size
    val = TrainingData(corpus, seq_len=SEQ, objective="mlm", seed=3, vocab_size=BYTES).validation_batches(
        len(a.batches), 4
    )
    for x, y in zip(a.batches, val, strict=True):
        assert torch.equal(x["ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    q = score(prog.gm, a)
    assert 0.0 <= q["mlm_accuracy"] <= 1.0 and q["tokens"] == a.tokens >= 150
    nll = correct = 0.0
    with torch.no_grad():
        for x in a.batches:
            logits = model(x["ids"], attention_mask=torch.ones_like(x["ids"])).logits
            sel = x["labels"] != -100
            nll += F.cross_entropy(logits[sel], x["labels"][sel], reduction="sum").item()
            correct += int((logits[sel].argmax(-1) == x["labels"][sel]).sum())
    assert q["ppl"] == pytest.approx(torch.tensor(nll / a.tokens).exp().item(), rel=1e-4)
    assert q["mlm_accuracy"] == correct / a.tokens
    q2 = score(prog.gm, a, reference_outputs(model, a))
    assert q2["top1_agreement"] == 1.0 and q2["kl"] == pytest.approx(0.0, abs=1e-6)


def test_embedding_cosine(corpus):
    import copy

    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=BYTES, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.zeros(1, SEQ, dtype=torch.long)
    prog = optpipe.capture(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert detect_task(prog) == "embedding"
    ev = eval_set(prog, corpus, seq_len=SEQ, batch=3, max_tokens=200)
    alone = score(prog.gm, ev)
    assert alone["cosine"] is None and "reference" in alone["note"]
    ref = reference_outputs(model, ev)
    assert score(prog.gm, ev, ref)["cosine"] == pytest.approx(1.0, abs=1e-6)
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for p in perturbed.encoder.layer[0].intermediate.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    cos = score(perturbed, ev, ref)["cosine"]
    assert 0.5 < cos < 0.9999


def test_measure_cost_on_a_program(gpt2_program):
    c = measure_cost(gpt2_program.gm, gpt2_program, batch=2, seq_len=16, iters=3, warmup=1)
    params = sum(p.numel() * p.element_size() for p in gpt2_program.gm.parameters())
    assert params <= c["size_mb"] * 2**20 <= params * 1.2  # tied lm_head counted once
    assert c["latency_ms_p50"] > 0 and c["peak_mem_mb"] > 0


@pytest.mark.slow
def test_a_trained_model_equals_a_direct_computation(corpus, tmp_path):
    """A byte-level GPT trained by `optpipe train` (the model of examples/heal.py): eval's ppl over
    train's validation rows is train's own val_ppl, and a strided one the direct computation."""
    out = str(tmp_path / "trained")
    res = optpipe.train(QUICK, corpus, out, steps=6, batch_size=8, val_batches=2, log_every=3, progress=False)
    val_ppl = [r["val_ppl"] for r in res.metrics if "val_ppl" in r][-1]
    q = evaluate(out, corpus, seq_len=SEQ, batch=8, max_tokens=2 * 8 * (SEQ - 1), latency_iters=1)["quality"]
    assert q["tokens"] == 2 * 8 * (SEQ - 1) and q["ppl"] == pytest.approx(val_ppl, rel=1e-4)
    gm = optpipe.load(out).gm
    ev = eval_set(optpipe.load(out), corpus, seq_len=SEQ, stride=8, batch=4, max_tokens=500)
    nll, _ = strided_nll(gm, val_stream(corpus), SEQ, 8, 500)
    assert score(gm, ev)["ppl"] == pytest.approx(torch.tensor(nll).exp().item(), rel=1e-4)
    # trained after capture: its source (the factory) is no longer what it was optimized from
    assert shares_weights(optpipe.load(out), optpipe.load(out))
    assert not shares_weights(optpipe.load(out), optpipe.load(QUICK))


def test_unscorable_output_and_bad_options(gpt2_program, corpus):
    with pytest.raises(UsageError, match="stride"):
        eval_set(gpt2_program, corpus, seq_len=SEQ, stride=SEQ + 1)
    prog = optpipe.capture(torch.nn.Linear(4, 4), (torch.randn(4),))
    with pytest.raises(UsageError, match="cannot|not logits"):
        detect_task(prog)
