"""`optpipe train --objective seq2seq` and `--objective mlm+nsp`: the batches (T5 span corruption,
BART denoising, supervised pairs; BERT sentence pairs), a T5, a BART and a BERT with both pre-training
heads trained on Python's documentation, and the one-line refusals. The (input, target) examples
themselves: tests/test_noising.py."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from examples import seq2seq as example
from optpipe.cli import main
from optpipe.errors import UsageError
from optpipe.runtime.data import ByteTokenizer
from optpipe.runtime.noising import IGNORE, shift_right
from optpipe.runtime.seq2seq_data import Seq2SeqData, Seq2SeqOptions

T5_IDS = dict(pad_id=257, eos_id=256, start_id=257)


def _data(corpus, noise="span", seq_len=64, val_fraction=0.05, **kw) -> Seq2SeqData:
    options = Seq2SeqOptions(noise=noise, **T5_IDS, **kw)
    return Seq2SeqData(
        corpus, ByteTokenizer(), seq_len=seq_len, options=options, vocab_size=example.VOCAB, val_fraction=val_fraction
    )


def test_span_batches_fill_the_encoder_exactly(pydoc_text):
    data = _data(pydoc_text)
    b = data.next_batch(4)
    assert b["input_ids"].shape == (4, 64) and bool(b["attention_mask"].all())  # no padding: rows sized to fit
    assert b["labels"].shape == (4, data.target_len) and (b["input_ids"][:, -1] == 256).all()
    assert torch.equal(b["decoder_input_ids"], shift_right(b["labels"], 257, 257))
    sentinels = [example.VOCAB - 1 - i for i in range(8)]
    for row in b["input_ids"].tolist():
        used = [t for t in row if t >= 259]
        assert used == sentinels[: len(used)] and used  # <extra_id_0>, <extra_id_1>, ... in order
    # the same validation batches every time; a restored state gives the batches an uninterrupted run gets
    assert all(
        torch.equal(x["labels"], y["labels"])
        for x, y in zip(data.validation_batches(2, 4), _data(pydoc_text).validation_batches(2, 4))
    )
    state = data.state_dict()
    expected = data.next_batch(2)
    again = _data(pydoc_text)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch(2)["input_ids"], expected["input_ids"])


def test_denoise_batches_target_the_row_as_written(pydoc_text):
    b = _data(pydoc_text, noise="denoise").next_batch(3)
    assert b["labels"].shape == (3, 64) and (b["labels"][:, -1] == 256).all()
    for src, tgt, mask in zip(b["input_ids"], b["labels"], b["attention_mask"]):
        source = src[mask.bool()].tolist()
        assert 258 in source  # infilled spans
        kept = sorted(t for t in source if t < 256)
        assert kept != sorted(t for t in tgt.tolist() if 0 <= t < 256)  # something was masked out
        assert len(source) < 64 or source[-1] == 256


def test_supervised_pairs_split_by_source(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"q": f"question {i}?", "a": f"answer {i}"}) + "\n" for i in range(60)))
    data = _data(str(path), noise="none", seq_len=24, val_fraction=0.2, source_key="q", target_key="a", target_len=12)
    train = [data.next_batch(1) for _ in range(48)]
    val = data.validation_batches(20, 1)
    decode = ByteTokenizer().decode

    def source(b):
        return decode(b["input_ids"][0][b["attention_mask"][0].bool()].tolist())

    assert val and not {source(b) for b in val} & {source(b) for b in train}
    b = val[0]
    assert decode(t for t in b["labels"][0].tolist() if t != IGNORE).startswith("answer ")
    with pytest.raises(UsageError, match="no key 'answer'"):
        _data(str(path), noise="none", source_key="q", target_key="answer").next_batch(1)


def test_options_refuse_in_one_line():
    with pytest.raises(UsageError, match="both --source-key and --target-key"):
        Seq2SeqOptions(noise="none", source_key="q")
    with pytest.raises(UsageError, match="trains on supervised pairs"):
        Seq2SeqOptions(noise="none")
    with pytest.raises(UsageError, match="unknown --noise"):
        Seq2SeqOptions(noise="shuffle")


# BART's denoising trains through the same trainer (its batches: above); `make coverage` runs it too
@pytest.mark.parametrize("model", ["t5", pytest.param("bart", marks=pytest.mark.coverage)])
def test_example_trains_and_validation_loss_falls(model, tmp_path):
    r = example.run(str(tmp_path), model=model, steps=12, seq=32)
    assert r["val_loss_after"] < r["val_loss_before"] - 0.5, r


def test_cli_refuses_seq2seq_on_a_decoder_only_model(pydoc_text, tmp_path):
    r = CliRunner().invoke(
        main,
        [
            "train",
            "examples/tiny_gpt.py:build",
            "--data",
            pydoc_text,
            "--objective",
            "seq2seq",
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code != 0 and "no decoder_input_ids" in r.output and "Traceback" not in r.output


# -- next-sentence prediction ----------------------------------------------------------------------
def bert_pretraining(heads: bool = True):
    """A tiny BertForPreTraining (or BertForMaskedLM: no NSP head) over the byte tokenizer."""
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64,
    )  # fmt: skip
    model = (BertForPreTraining if heads else BertForMaskedLM)(config).eval()
    ids = torch.randint(0, 256, (2, 64))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def bert_masked_lm():
    return bert_pretraining(heads=False)


def test_nsp_batches_are_half_next_sentences(pydoc_text):
    from optpipe.runtime.nsp_data import NspData

    data = NspData(pydoc_text, ByteTokenizer(), seq_len=64, vocab_size=259)
    batches = [data.next_batch(32) for _ in range(12)]
    labels = torch.cat([b["next_sentence_label"] for b in batches])
    assert labels.float().mean().item() == pytest.approx(0.5, abs=0.07)  # 384 pairs: 50/50 within 3.5 sigma
    b = batches[0]
    for ids, types, mask in zip(b["input_ids"], b["token_type_ids"], b["attention_mask"]):
        n = int(mask.sum())
        assert ids[0] == 256 and types[:n].tolist() == sorted(types[:n].tolist())  # [CLS] A [SEP] B [SEP]
        assert (types[:n] == 1).any() and (types[n:] == 0).all()
    masked = (b["labels"] != IGNORE).float().sum() / b["attention_mask"].sum()
    assert 0.08 < masked.item() < 0.22  # 15% of the tokens carry the masked-LM loss
    again = NspData(pydoc_text, ByteTokenizer(), seq_len=64, vocab_size=259)
    assert torch.equal(again.next_batch(32)["next_sentence_label"], batches[0]["next_sentence_label"])  # seeded


def test_mlm_nsp_trains_both_heads_and_reports_both_losses(pydoc_text, tmp_path):
    from optpipe.runtime.training import train

    spec = f"{__file__}:bert_pretraining"
    res = train(spec, pydoc_text, str(tmp_path / "o"), objective="mlm+nsp", steps=6, batch_size=8, lr=2e-3,
                log_every=2, progress=False)  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["loss"] == pytest.approx(row["mlm_loss"] + row["nsp_loss"], rel=1e-4)
        assert 0.3 < row["nsp_loss"] < 1.5  # a 2-way cross-entropy near ln 2 at the start
    assert rows[-1]["mlm_loss"] < rows[0]["mlm_loss"] and res.val_loss is not None
    with pytest.raises(UsageError, match="has no next-sentence head") as e:
        train(f"{__file__}:bert_masked_lm", pydoc_text, str(tmp_path / "x"), objective="mlm+nsp", steps=1)
    assert "BertForPreTraining" in e.value.hint
