"""The examples of the sequence-to-sequence and next-sentence objectives (optpipe.runtime.noising):
rates within tolerance, sentinels in order, nothing of the target leaked into the input, and the
original text recoverable from every (input, target) pair."""

from __future__ import annotations

import itertools

import pytest
import torch

from optpipe.errors import UsageError
from optpipe.runtime.noising import (
    Denoising,
    SpanCorruption,
    denoising_example,
    noise_mask,
    nsp_label,
    nsp_pairs,
    sentinel_ids,
    shift_right,
    span_corruption,
    text_infilling,
)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VOCAB = 1000
SENTINELS = sentinel_ids(VOCAB, 100)
EOS, MASK = 1, 2


def _restore(source: list[int], target: list[int]) -> list[int]:
    """The original ids from a T5 (input, target) pair: each sentinel of the input replaced by the
    span that follows the same sentinel in the target."""
    spans, current = {}, None
    for t in target[:-1]:
        if t in SENTINELS:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    out = []
    for t in source[:-1]:
        out += spans[t] if t in SENTINELS else [t]
    return out


@settings(max_examples=60, deadline=None)
@given(length=st.integers(2, 300), seed=st.integers(0, 2**16), rate=st.floats(0.05, 0.5))
def test_span_corruption_round_trips_and_keeps_sentinels_in_order(length, seed, rate):
    ids = list(range(10, 10 + length))  # distinct ids: a leak would be visible
    g = torch.Generator().manual_seed(seed)
    source, target = span_corruption(ids, SENTINELS, EOS, g, SpanCorruption(rate=rate))
    assert source[-1] == EOS and target[-1] == EOS
    used = [t for t in source if t in SENTINELS]
    assert used == SENTINELS[: len(used)] and used  # in order, from <extra_id_0>
    assert [t for t in target if t in SENTINELS] == SENTINELS[: len(used) + 1]  # one more to close
    assert _restore(source, target) == ids
    hidden = {t for t in target if t not in SENTINELS and t != EOS}
    assert not hidden & set(source)  # no token of the target is visible in the input


def test_span_corruption_rate_and_span_length():
    g = torch.Generator().manual_seed(0)
    noise, spans, total = 0, 0, 0
    for _ in range(200):
        mask = noise_mask(512, 0.15, 3.0, g)
        noise += sum(mask)
        spans += sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
        total += len(mask)
    assert noise / total == pytest.approx(0.15, abs=0.005)
    assert noise / spans == pytest.approx(3.0, rel=0.1)


def test_span_corruption_refuses_without_enough_sentinels():
    with pytest.raises(UsageError, match="more than 2 sentinel ids"):
        span_corruption(list(range(10, 210)), SENTINELS[:2], EOS, torch.Generator().manual_seed(0))
    with pytest.raises(UsageError, match="rate must be in"):
        SpanCorruption(rate=1.5)


def test_sentinels_from_the_tokenizer_else_the_top_of_the_vocabulary():
    class Tok:
        def token_id(self, text):
            return {f"<extra_id_{i}>": 500 + i for i in range(3)}.get(text)

    assert sentinel_ids(VOCAB, 3, Tok()) == [500, 501, 502]
    assert sentinel_ids(VOCAB, 4, Tok()) == [999, 998, 997, 996]  # the tokenizer has only three
    with pytest.raises(UsageError, match="no room"):
        sentinel_ids(8, 8)


def test_text_infilling_masks_the_rate_in_spans_of_one_mask_each():
    g = torch.Generator().manual_seed(0)
    ids = list(range(10, 1010))
    masked_total = masks = 0
    for _ in range(20):
        out = text_infilling(ids, MASK, g, Denoising(rate=0.3))
        kept = [t for t in out if t != MASK]
        assert kept == sorted(kept) and set(kept) <= set(ids)  # order kept, nothing invented
        masked_total += len(ids) - len(kept)
        masks += out.count(MASK)
        assert all(not (a == b == MASK) for a, b in itertools.pairwise(out))  # a span is one mask
    assert masked_total / (20 * len(ids)) == pytest.approx(0.3, abs=0.02)
    assert masked_total / masks > 1.5  # spans of several tokens (Poisson mean 3, zeros insert)


def test_denoising_targets_the_document_as_written():
    sentences = [[10, 11, 12], [20, 21], [30, 31, 32, 33], [40]]
    orders = set()
    for seed in range(30):
        source, target = denoising_example(sentences, MASK, torch.Generator().manual_seed(seed))
        assert target == [t for s in sentences for t in s]
        firsts = tuple(t // 10 for t in source if t != MASK and t % 10 == 0)
        orders.add(firsts)
    assert len(orders) > 3  # sentences are permuted
    src, _ = denoising_example(sentences, MASK, torch.Generator().manual_seed(0), Denoising(permute=False))
    kept = [t for t in src if t != MASK]
    assert kept == sorted(kept)


def test_shift_right_feeds_the_previous_label():
    labels = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])
    assert shift_right(labels, start=0, pad=0).tolist() == [[0, 5, 6, 7], [0, 8, 0, 0]]


def test_nsp_pairs_are_half_true_next_sentences():
    g = torch.Generator().manual_seed(0)
    docs = [[[d * 100 + s, d * 100 + s] for s in range(8)] for d in range(1, 60)]
    pairs = nsp_pairs(docs, cls=3, sep=4, max_len=16, g=g)
    assert len(pairs) == 59 * 7
    assert sum(p.is_next for p in pairs) / len(pairs) == pytest.approx(0.5, abs=0.04)
    for p in pairs:
        assert p.ids[0] == 3 and p.ids.count(4) == 2 and p.ids[-1] == 4
        a_end = p.ids.index(4)
        a, b = p.ids[1:a_end], p.ids[a_end + 1 : -1]
        assert p.token_types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        same_doc, follows = a[0] // 100 == b[0] // 100, b[0] == a[0] + 1
        assert (same_doc and follows) if p.is_next else not same_doc
        assert nsp_label(p) == (0 if p.is_next else 1)


def test_nsp_truncates_the_longer_side_and_needs_two_documents():
    g = torch.Generator().manual_seed(1)
    pairs = nsp_pairs([[list(range(20)), list(range(30, 33))], [[50, 51]]], cls=3, sep=4, max_len=12, g=g)
    assert all(len(p.ids) <= 12 for p in pairs)
    with pytest.raises(UsageError, match="at least two documents"):
        nsp_pairs([[[1], [2]]], cls=3, sep=4, max_len=12, g=g)
