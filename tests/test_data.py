"""optpipe.runtime.data: reading (text, JSONL, folders; streaming with bounded memory), tokenizers (bytes,
the real MiniLM WordPiece tokenizer, a byte-level BPE trained here), packing, seeded shuffling, the
train/val split, resuming, the mlm masking strategies' measured rates, calibration batches and
error messages. Text nobody here wrote: Python's own pydoc topics."""

from __future__ import annotations

import functools
import inspect
import json
import random
import tracemalloc

import pytest
import torch

from optpipe.calibration import with_calibration
from optpipe.errors import UsageError
from optpipe.program import Program
from optpipe.runtime import data as D
from optpipe.runtime.data import (
    ByteTokenizer,
    MaskingConfig,
    PackedBatches,
    TokenMasker,
    calibration_batches,
    iter_documents,
    load_tokenizer,
    pack_sequences,
    prepare_batch,
    pydoc_corpus,
    split_of,
    validation_batches,
)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Python's documentation topics as a blank-line separated text file."""
    path = tmp_path_factory.mktemp("pydoc") / "topics.txt"
    pydoc_corpus(path)
    return path


@pytest.fixture(scope="module")
def minilm_tok():
    from tests.hf_models import minilm_path

    return load_tokenizer(minilm_path(), required=True)


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory, corpus):
    """Byte-level BPE tokenizers as GPT-2 and RoBERTa have them, trained here on the pydoc text
    (no GPT-2 tokenizer is available offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("bpe")
    docs = list(iter_documents(corpus))
    for name, specials in [("gpt2", ["<|endoftext|>"]), ("roberta", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])]:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(docs, trainer)
        (folder / name).mkdir()
        tok.save(str(folder / name / "tokenizer.json"))
    return folder


def write_docs(path, docs):
    path.write_text("".join(d + "\n\n" for d in docs))
    return path


def mlm_batches(path, tok, n, seq_len=64, batch_size=8):
    return [b.clone() for b in _mlm_batches(str(path), tok, n, seq_len, batch_size)]


@functools.cache
def _mlm_batches(path, tok, n, seq_len, batch_size):
    it = PackedBatches(path, tok, seq_len=seq_len, batch_size=batch_size, objective="mlm", seed=0)
    return [next(it) for _ in range(n)]


# -- reading --------------------------------------------------------------------------------------
def test_pydoc_corpus_one_document_per_topic_in_sorted_order(tmp_path):
    from pydoc_data.topics import topics

    n = pydoc_corpus(tmp_path / "a.txt")
    pydoc_corpus(tmp_path / "b.txt")
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()  # deterministic
    docs = list(iter_documents(tmp_path / "a.txt"))
    titles = sorted(t for t in topics if topics[t].strip())
    assert n == len(docs) == len(titles) > 50
    first = [line.rstrip() for line in topics[titles[0]].strip().splitlines() if line.strip()]
    assert docs[0] == "\n".join(first)
    # JSONL keeps each topic's text exactly, blank lines included
    pydoc_corpus(tmp_path / "t.jsonl")
    assert list(iter_documents(tmp_path / "t.jsonl")) == [topics[t].strip() for t in titles]


def test_text_jsonl_folder_and_key(tmp_path):
    (tmp_path / "d").mkdir()
    write_docs(tmp_path / "d" / "b.txt", ["two\nlines", "three"])
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "  "}\n')
    (tmp_path / "d" / ".hidden").write_text("never read")
    assert list(iter_documents(tmp_path / "d")) == ["one", "two\nlines", "three"]  # sorted, blank skipped
    (tmp_path / "c.jsonl").write_text('{"body": "x y"}\n{"body": "z"}\n')
    assert list(iter_documents([tmp_path / "c.jsonl", tmp_path / "d" / "b.txt"], text_key="body")) == [
        "x y",
        "z",
        "two\nlines",
        "three",
    ]
    # several blank (whitespace-only) lines separate one document from the next, nothing more
    (tmp_path / "e.txt").write_text("a\n  \n\n\t\nb\nc\n")
    assert list(iter_documents(tmp_path / "e.txt")) == ["a", "b\nc"]


def test_long_document_without_newlines_is_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "MAX_DOCUMENT_CHARS", 100)
    (tmp_path / "one_line.txt").write_text("x" * 1050)
    docs = list(iter_documents(tmp_path / "one_line.txt"))
    assert [len(d) for d in docs] == [100] * 10 + [50]


def test_streaming_a_large_file_keeps_memory_bounded(tmp_path):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    path = tmp_path / "big.txt"
    with open(path, "w") as fh:
        for _ in range(12_000):
            fh.write(" ".join(rng.choice(words) for _ in range(50)) + "\n\n")
    size = path.stat().st_size
    assert size > 3_000_000
    it = PackedBatches(path, ByteTokenizer(), seq_len=128, batch_size=8, epochs=1, shuffle_buffer=64)
    tracemalloc.start()
    try:
        n = sum(1 for _ in it)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == (size - 12_000) // 128 // 8  # every byte read (each document: +1 eos, -2 of its "\n\n")
    assert peak < size / 8, f"peak {peak} bytes while streaming a {size}-byte file"


# -- tokenizers -----------------------------------------------------------------------------------
def test_byte_tokenizer_ids():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.mask_id) == (259, 256, 257, 258)
    assert tok.cls_id is None and tok.sep_id is None and tok.special_ids == [256, 257, 258]
    assert tok.encode("hé") == [104, 195, 169] and tok.decode([104, 195, 169, 256]) == "hé"


def test_tokenizer_json_special_ids(minilm_tok, bpe_folder):
    assert (minilm_tok.vocab_size, minilm_tok.pad_id, minilm_tok.cls_id, minilm_tok.sep_id, minilm_tok.mask_id) == (
        30522,
        0,
        101,
        102,
        103,
    )
    assert minilm_tok.eos_id is None and minilm_tok.separator_id == 102
    long = "word " * 400  # tokenizer.json asks for truncation and padding to 128: both are off here
    assert len(minilm_tok.encode(long)) == 400
    gpt2 = load_tokenizer(bpe_folder / "gpt2")
    assert gpt2.eos_id == gpt2.tokenizer.token_to_id("<|endoftext|>") and gpt2.mask_id is None
    assert gpt2.vocab_size == 600
    assert isinstance(load_tokenizer(bpe_folder / "missing"), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)


# -- packing --------------------------------------------------------------------------------------
def test_clm_packing_joins_documents_with_eos(tmp_path):
    docs = [f"document number {i}: " + "x" * (i * 7 % 40) + "." for i in range(60)]
    path = write_docs(tmp_path / "d.txt", docs)
    rows = torch.cat(list(PackedBatches(path, seq_len=32, batch_size=4, shuffle=False, epochs=1)))
    assert rows.shape[1] == 32 and rows.dtype == torch.int64
    stream = [t for d in docs for t in list(d.encode()) + [256]]
    n = len(stream) // 32 // 4 * 4 * 32  # whole batches only
    assert rows.flatten().tolist() == stream[:n]


def test_mlm_packing_wraps_with_cls_sep(tmp_path, minilm_tok):
    docs = ["The cat sat on the mat.", "Tokenization is unbelievable.", "A third, longer sentence of words."] * 20
    path = write_docs(tmp_path / "d.txt", docs)
    rows = torch.cat(
        list(PackedBatches(path, minilm_tok, seq_len=16, batch_size=2, objective="mlm", shuffle=False, epochs=1))
    )
    stream = [t for d in docs for t in [101] + minilm_tok.encode(d) + [102]]
    assert rows.flatten().tolist() == stream[: rows.numel()] and rows.numel() > len(stream) - 16 * 2
    assert rows[0, 0] == 101
    clm = next(PackedBatches(path, minilm_tok, seq_len=16, batch_size=2, objective="clm", shuffle=False))
    first = minilm_tok.encode(docs[0]) + [102]  # no eos: sep ends a document
    assert clm.flatten().tolist()[: len(first)] == first


def test_pack_sequences_drops_the_tail():
    rows = list(pack_sequences([[1, 2, 3], [4, 5]], 2, suffix=[0]))
    assert [list(r) for r in rows] == [[1, 2], [3, 0], [4, 5]]


def test_seeded_shuffle_is_deterministic_and_seed_dependent(corpus):
    def first(seed, n=6):
        it = PackedBatches(corpus, seq_len=64, batch_size=4, seed=seed, shuffle_buffer=256)
        return torch.stack([next(it) for _ in range(n)])

    a, b, c = first(0), first(0), first(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    unshuffled = next(PackedBatches(corpus, seq_len=64, batch_size=4, shuffle=False))
    assert not torch.equal(a[0], unshuffled)
    # a shuffle permutes rows, it does not change them: one epoch holds the same multiset of rows
    rows = lambda seed: sorted(
        map(
            tuple,
            torch.cat(
                list(
                    PackedBatches(corpus, seq_len=64, batch_size=1, seed=seed or 0, epochs=1, shuffle=seed is not None)
                )
            ).tolist(),
        )
    )
    assert rows(3) == rows(None)


def test_train_and_validation_are_disjoint_and_cover_the_data(tmp_path):
    docs = [f"<{i:04d}>" + " text" * (i % 5) for i in range(400)]
    path = write_docs(tmp_path / "d.txt", docs)

    def documents(split):
        it = PackedBatches(
            path, seq_len=16, batch_size=1, split=split, val_fraction=0.2, shuffle=False, epochs=1, drop_last=False
        )
        ids = torch.cat(list(it)).flatten().tolist()
        text = bytes(i if i < 256 else 10 for i in ids).decode()
        return {line[:6] for line in text.split("\n")[:-1]}  # the last document may be cut

    train, val = documents("train"), documents("val")
    assert not train & val
    assert len(train | val) >= 398 and 40 < len(val) < 120
    assert all(split_of(d, 0.2) == "val" for d in docs if d[:6] in val)
    vb = validation_batches(path, seq_len=16, batch_size=4, batches=3, val_fraction=0.2)
    assert len(vb) == 3 and all(b.shape == (4, 16) for b in vb)
    assert all(
        torch.equal(x, y)
        for x, y in zip(vb, validation_batches(path, seq_len=16, batch_size=4, batches=3, val_fraction=0.2))
    )


def test_resume_sees_the_batches_an_uninterrupted_run_sees(corpus):
    # small data, so the run wraps around several epochs: the state must carry across them
    kwargs = {"seq_len": 256, "batch_size": 8, "seed": 5, "shuffle_buffer": 32, "val_fraction": 0.5}
    full = PackedBatches(corpus, **kwargs)
    per_epoch = len(list(PackedBatches(corpus, **{**kwargs, "shuffle_buffer": 32}, epochs=1)))
    expected = [next(full) for _ in range(per_epoch * 2 + 5)]
    k = per_epoch + 3
    run = PackedBatches(corpus, **kwargs)
    for _ in range(k):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))
    assert state["batches"] == k
    resumed = PackedBatches(corpus, **kwargs)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed), e) for e in expected[k:])
    skipped = PackedBatches(corpus, **kwargs)
    skipped.skip(k)
    assert torch.equal(next(skipped), expected[k])
    with pytest.raises(UsageError, match="seq_len=256 .now 128."):
        PackedBatches(corpus, **{**kwargs, "seq_len": 128}).load_state_dict(state)


def test_frequency_masker_resumes_with_its_counts_and_generator(corpus, minilm_tok):
    batches = mlm_batches(corpus, minilm_tok, 6)
    masker, g = TokenMasker(minilm_tok, strategy="frequency"), torch.Generator().manual_seed(3)
    expected = [masker(ids, g)["input_ids"] for ids in batches]
    masker, g = TokenMasker(minilm_tok, strategy="frequency"), torch.Generator().manual_seed(3)
    for ids in batches[:3]:
        masker(ids, g)
    state, g_state = masker.state_dict(), g.get_state()
    resumed, g2 = TokenMasker(minilm_tok, strategy="frequency"), torch.Generator()
    resumed.load_state_dict(state)
    g2.set_state(g_state)
    assert all(torch.equal(resumed(ids, g2)["input_ids"], e) for ids, e in zip(batches[3:], expected[3:]))
    with pytest.raises(UsageError, match="masking state"):
        TokenMasker(minilm_tok, strategy="random").load_state_dict(state)


# -- objectives -----------------------------------------------------------------------------------
def test_clm_labels_are_the_inputs():
    ids = torch.arange(12).view(2, 6)
    batch = prepare_batch(ids, "clm")
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["labels"], ids)


def test_random_masking_rate_and_80_10_10(corpus, minilm_tok):
    masker = TokenMasker(minilm_tok)
    g = torch.Generator().manual_seed(0)
    picked = eligible = masked = replaced = kept = 0
    for ids in mlm_batches(corpus, minilm_tok, 40):
        b = masker(ids, g)
        sel = b["labels"] != -100
        assert torch.equal(b["labels"][sel], ids[sel])
        picked += int(sel.sum())
        eligible += int(masker.eligible(ids).sum())
        masked += int((b["input_ids"][sel] == minilm_tok.mask_id).sum())
        kept += int((b["input_ids"][sel] == ids[sel]).sum())
        replaced += int(((b["input_ids"] != ids) & (b["input_ids"] != minilm_tok.mask_id)).sum())
        assert torch.equal(b["input_ids"][~sel], ids[~sel])  # unpicked positions are untouched
    assert abs(picked / eligible - 0.15) < 0.01
    assert abs(masked / picked - 0.8) < 0.03
    assert abs(replaced / picked - 0.1) < 0.02 and abs(kept / picked - 0.1) < 0.02


@pytest.mark.parametrize("strategy", D.STRATEGIES)
def test_special_tokens_are_never_masked(strategy, corpus, minilm_tok):
    masker = TokenMasker(minilm_tok, strategy=strategy, rate=0.5)
    g = torch.Generator().manual_seed(1)
    for ids in mlm_batches(corpus, minilm_tok, 5):
        ids[:, -4:] = minilm_tok.pad_id
        b = masker(ids, g)
        special = torch.isin(ids, torch.tensor([0, 100, 101, 102, 103]))
        assert special.any() and (b["labels"][special] == -100).all()
        assert torch.equal(b["input_ids"][special], ids[special])
        assert (b["labels"] != -100).any()
        # random replacements are ordinary tokens too
        assert not torch.isin(b["input_ids"][~special], torch.tensor([0, 100, 101, 102])).any()


@pytest.mark.parametrize("strategy", D.STRATEGIES)
def test_each_strategy_is_deterministic_and_hits_the_rate(strategy, corpus, minilm_tok):
    batches = mlm_batches(corpus, minilm_tok, 25)
    runs = []
    for _ in range(2):
        masker = TokenMasker(minilm_tok, strategy=strategy)
        g = torch.Generator().manual_seed(7)
        runs.append([masker(ids, g) for ids in batches])
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"]) for a, b in zip(*runs)
    )
    masker = TokenMasker(minilm_tok, strategy=strategy)
    picked = sum(int((r["labels"] != -100).sum()) for r in runs[0])
    eligible = sum(int(masker.eligible(ids).sum()) for ids in batches)
    assert abs(picked / eligible - 0.15) < 0.015, picked / eligible


def _check_whole_words(tok, text, tokens_word_ids, rounds=30):
    """Each word the tokenizer's own pre-tokenizer found is picked whole or not at all; returns
    how many multi-token words were picked (so the check is not vacuous)."""
    enc = tok.tokenizer.encode(text, add_special_tokens=False)
    ids = torch.tensor([enc.ids])
    words = tokens_word_ids(enc)
    masker = TokenMasker(tok, strategy="whole-word", rate=0.3)
    g = torch.Generator().manual_seed(0)
    multi = 0
    for _ in range(rounds):
        picked = masker.select(ids, g)[0].tolist()
        groups: dict = {}
        for i, w in enumerate(words):
            groups.setdefault(w, []).append(picked[i])
        for flags in groups.values():
            assert all(flags) or not any(flags), "a word was masked in part"
            multi += len(flags) > 1 and all(flags)
    return multi


def test_whole_word_masking_with_wordpiece(corpus, minilm_tok):
    text = next(iter_documents(corpus))[:3000]
    assert _check_whole_words(minilm_tok, text, lambda enc: enc.word_ids) > 10
    # and the '##' rule agrees with the pre-tokenizer's words exactly
    enc = minilm_tok.tokenizer.encode(text, add_special_tokens=False)
    starts = minilm_tok.word_starts(torch.tensor([enc.ids]))[0].tolist()
    assert starts == [i == 0 or enc.word_ids[i] != enc.word_ids[i - 1] for i in range(len(enc.ids))]


def test_whole_word_masking_with_byte_level_bpe(corpus, bpe_folder):
    tok = load_tokenizer(bpe_folder / "roberta")
    assert tok.mask_id is not None and tok.cls_id == tok.tokenizer.token_to_id("<s>")
    text = next(iter_documents(corpus))[:3000]
    # words are Ġ-led and punctuation right after a word joins it, so our words are unions of the
    # pre-tokenizer's: those are never split
    assert _check_whole_words(tok, text, lambda enc: enc.word_ids) > 10
    enc = tok.tokenizer.encode("Hello, world!\n\n  unbelievably (tokenized)", add_special_tokens=False)
    starts = tok.word_starts(torch.tensor([enc.ids]))[0].tolist()
    words, word = [], ""
    for t, start in zip(enc.tokens, starts):
        if start and word:
            words.append(word)
            word = ""
        word += t
    assert words + [word] == ["Hello,", "Ġworld!", "ĊĊĠ", "Ġunbelievably", "Ġ(tokenized)"]


def test_whole_word_masking_with_bytes():
    tok = ByteTokenizer()
    text = "alpha beta  gamma\ndelta epsilon " * 20
    ids = torch.tensor([tok.encode(text)])
    masker = TokenMasker(tok, strategy="whole-word", rate=0.4)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        picked = masker.select(ids, g)[0].tolist()
        spaces = [c in " \n" for c in text]
        i = 0
        while i < len(text):
            j = i
            while j < len(text) and spaces[j] == spaces[i] and not spaces[i]:
                j += 1
            j = max(j, i + 1)
            assert len(set(picked[i:j])) == 1
            i = j


def test_span_lengths_are_geometric_with_mean_about_three(corpus, minilm_tok):
    masker = TokenMasker(minilm_tok, strategy="span", rate=0.15, mean_span=3.0, max_span=10)
    g = torch.Generator().manual_seed(0)
    runs = []
    for ids in mlm_batches(corpus, minilm_tok, 20, seq_len=128):
        for row in masker.select(ids, g).tolist():
            n = 0
            for flag in row + [False]:
                if flag:
                    n += 1
                elif n:
                    runs.append(n)
                    n = 0
    mean = sum(runs) / len(runs)
    assert 2.5 < mean < 3.2, mean  # E[min(Geom(1/3), 10)] = 2.95, less where a span meets the budget
    assert max(runs) <= 10 and runs.count(1) > runs.count(2) > runs.count(3)


def test_frequency_masking_prefers_rare_tokens(corpus, minilm_tok):
    batches = mlm_batches(corpus, minilm_tok, 30)
    masker = TokenMasker(minilm_tok, strategy="frequency")
    for ids in batches[:10]:  # a first pass for the counts
        masker.observe(ids)
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(minilm_tok.vocab_size)
    hit = torch.zeros(minilm_tok.vocab_size)
    for ids in batches[10:]:
        b = masker(ids, g)
        seen += torch.bincount(ids.flatten(), minlength=minilm_tok.vocab_size)
        hit += torch.bincount(ids[b["labels"] != -100], minlength=minilm_tok.vocab_size)
    counts = masker.counts
    special = torch.tensor(minilm_tok.special_ids)
    order = [i for i in counts.argsort(descending=True).tolist() if i not in special.tolist() and seen[i] > 0]
    frequent, rare = order[:20], [i for i in order if counts[i] <= 3]
    rate = lambda ids: float(hit[ids].sum() / seen[ids].sum())
    assert len(rare) > 50
    assert rate(rare) > 2 * rate(frequent), (rate(rare), rate(frequent))
    plain = TokenMasker(minilm_tok, strategy="random")
    assert abs(sum(int((plain(ids, g)["labels"] != -100).sum()) for ids in batches[10:]) / hit.sum() - 1) < 0.1


# -- calibration ----------------------------------------------------------------------------------
class _Encoder(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8)
        self.types = torch.nn.Embedding(2, 8)

    def forward(self, input_ids, attention_mask, token_type_ids):
        return (self.emb(input_ids) + self.types(token_type_ids)) * attention_mask.unsqueeze(-1)


def _program(vocab, tokenizer=None):
    gm = torch.fx.symbolic_trace(_Encoder(vocab))
    example = (
        torch.zeros(2, 12, dtype=torch.int64),
        torch.ones(2, 12, dtype=torch.int64),
        torch.zeros(2, 12, dtype=torch.int64),
    )
    meta = {"config": {"vocab_size": vocab}, **({"tokenizer": str(tokenizer)} if tokenizer else {})}
    return Program(gm, example, ["input_ids", "attention_mask", "token_type_ids"], meta=meta)


def test_calibration_batches_use_the_programs_tokenizer(corpus):
    from tests.hf_models import minilm_path

    program = _program(30522, minilm_path())
    sets = calibration_batches(corpus, program, batches=3)
    assert len(sets) == 3
    for ids, mask, types in sets:
        assert ids.shape == mask.shape == types.shape == (2, 12) and ids.dtype == torch.int64
        assert int(ids.max()) < 30522 and mask.eq(1).all() and types.eq(0).all()
    assert sets[0][0][0, 0] == 101  # [CLS] framing for a BERT tokenizer; rows in file order
    with_calibration(program, sets)
    assert program.run(sets[0]).shape == (2, 12, 8)


def test_calibration_batches_with_bytes_and_vocab_check(corpus):
    sets = calibration_batches(corpus, _program(300), batches=2)
    assert len(sets) == 2 and int(sets[0][0].max()) < 259
    with pytest.raises(UsageError, match="vocab size is 128") as e:
        calibration_batches(corpus, _program(128), batches=2)
    assert "bytes" in e.value.message and e.value.hint


# -- errors ---------------------------------------------------------------------------------------
def _error(fn, *args, **kwargs) -> str:
    """The one line of the UsageError that calling `fn` raises (a generator is consumed)."""
    with pytest.raises(UsageError) as e:
        result = fn(*args, **kwargs)
        if inspect.isgenerator(result):
            list(result)
    assert e.value.hint and "\n" not in e.value.one_line()
    return e.value.one_line()


def test_error_messages(tmp_path, bpe_folder):
    assert "does not exist" in _error(iter_documents, tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in _error(iter_documents, tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    assert "holds no text" in _error(iter_documents, tmp_path / "blank.txt")
    (tmp_path / "dir").mkdir()
    assert "holds no files" in _error(iter_documents, tmp_path / "dir")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": oops}\n')
    assert f"{tmp_path / 'bad.jsonl'}:3: not JSON" in _error(iter_documents, tmp_path / "bad.jsonl")
    (tmp_path / "key.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    msg = _error(iter_documents, tmp_path / "key.jsonl")
    assert "key.jsonl:2: no key 'text'" in msg and "--text-key" in msg
    (tmp_path / "list.jsonl").write_text('["a"]\n')
    assert "list.jsonl:1: a JSON list, not an object" in _error(iter_documents, tmp_path / "list.jsonl")
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    assert "is a int, not a string" in _error(iter_documents, tmp_path / "num.jsonl")
    gpt2 = load_tokenizer(bpe_folder / "gpt2")
    assert "no mask token" in _error(TokenMasker, gpt2)
    assert "no tokenizer.json" in _error(load_tokenizer, tmp_path, required=True)
    (tmp_path / "t.txt").write_text("one short document\n")
    assert "val_fraction=0" in _error(PackedBatches, tmp_path / "t.txt", seq_len=4, batch_size=1, split="val")
    assert "falls in the train split" in _error(
        PackedBatches(tmp_path / "t.txt", seq_len=4, batch_size=1, val_fraction=0.999999).__next__
    )
    assert "fewer than seq_len=64" in _error(
        validation_batches, tmp_path / "t.txt", seq_len=64, batch_size=1, batches=1, val_fraction=0.999999
    )
    assert "unknown masking strategy 'bogus'" in _error(MaskingConfig, strategy="bogus")
    assert "unknown objective" in _error(prepare_batch, torch.zeros(1, 2, dtype=torch.long), "xlm")


# -- TrainingData: what `optpipe train` uses ------------------------------------------------------
def test_training_data_resumes_exactly_and_validates_the_same_way(corpus, tmp_path, minilm_tok):
    from tests.hf_models import minilm_path

    kwargs = {
        "tokenizer": str(minilm_path() / "tokenizer.json"),
        "seq_len": 32,
        "objective": "mlm",
        "seed": 2,
        "val_fraction": 0.2,
        "mask": "frequency",
        "vocab_size": 30522,
        "shuffle_buffer": 64,
    }
    full = D.TrainingData(corpus, **kwargs)
    expected = [full.next_batch(4) for _ in range(8)]
    assert all(set(b) == {"input_ids", "labels"} and b["input_ids"].shape == (4, 32) for b in expected)
    run = D.TrainingData(corpus, **kwargs)
    for _ in range(5):
        run.next_batch(4)
    path = tmp_path / "state.pt"
    torch.save(run.state_dict(), path)
    resumed = D.TrainingData(corpus, **kwargs)
    resumed.load_state_dict(torch.load(path, weights_only=True))  # what the trainer's checkpoint does
    for e in expected[5:]:
        b = resumed.next_batch(4)
        assert torch.equal(b["input_ids"], e["input_ids"]) and torch.equal(b["labels"], e["labels"])
    v1, v2 = full.validation_batches(2, 4), resumed.validation_batches(3, 4)
    assert len(v1) == 2 and len(v2) == 3
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(v1, v2))  # same masks every time
    assert D.TrainingData(corpus, seq_len=32, val_fraction=0.0).validation_batches(2, 4) == []
    clm = D.TrainingData(corpus, seq_len=16, vocab_size=259).next_batch(2)
    assert torch.equal(clm["labels"], clm["input_ids"])
    assert "vocab size is 128" in _error(D.TrainingData(corpus, seq_len=16, vocab_size=128).next_batch, 2)
