"""Training examples for the sequence-to-sequence and next-sentence objectives, built from token ids.

- `span_corruption` (T5): noise spans of the input replaced by sentinels, in order; the target lists
  each sentinel followed by the span it hides, and ends with one more sentinel and EOS.
- `text_infilling` and `permute_sentences` (BART's `denoise`): spans with Poisson lengths replaced
  by one mask token each (a length-0 span inserts a mask), sentence order shuffled; the target is
  the original text.
- `nsp_pairs` (BERT): sentence pairs, half the true next sentence and half a random sentence of
  another document, as `[CLS] A [SEP] B [SEP]` with token types 0 / 1.
- `shift_right`: the decoder's inputs from its labels (teacher forcing), -100 read as padding.

Every function draws from the `torch.Generator` it is given, so a seed fixes the examples.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UsageError

IGNORE = -100
"""Label of a position that carries no loss."""


def _randint(g: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (1,), generator=g))


def _random_partition(total: int, parts: int, g: torch.Generator) -> list[int]:
    """`total` split into `parts` positive lengths, uniformly over the compositions."""
    if parts <= 1:
        return [total]
    cuts = sorted((torch.randperm(total - 1, generator=g)[: parts - 1] + 1).tolist())
    edges = [0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(edges)]


def noise_mask(length: int, rate: float, mean_span: float, g: torch.Generator) -> list[bool]:
    """T5's `random_spans_noise_mask`: round(length * rate) noise tokens in round(noise / mean_span)
    spans, the spans and the gaps between them of random lengths; the first token is never noise."""
    if length < 2:
        return [False] * length
    noise = min(max(int(round(length * rate)), 1), length - 1)
    spans = max(min(int(round(noise / mean_span)), noise, length - noise), 1)
    noise_lengths = _random_partition(noise, spans, g)
    keep_lengths = _random_partition(length - noise, spans, g)
    mask: list[bool] = []
    for keep, span in zip(keep_lengths, noise_lengths):
        mask += [False] * keep + [True] * span
    return mask


@dataclass(frozen=True)
class SpanCorruption:
    """T5 span corruption: `rate` of the tokens in spans of mean length `mean_span`."""

    rate: float = 0.15
    mean_span: float = 3.0

    def __post_init__(self):
        if not 0 < self.rate < 1:
            raise UsageError(f"span corruption rate must be in (0, 1), got {self.rate}", "T5 uses 0.15")
        if self.mean_span < 1:
            raise UsageError(f"mean span length must be at least 1, got {self.mean_span}", "T5 uses 3")


def span_corruption(
    ids: Sequence[int],
    sentinels: Sequence[int],
    eos: int,
    g: torch.Generator,
    config: SpanCorruption = SpanCorruption(),
) -> tuple[list[int], list[int]]:
    """(input ids, target ids) of one T5 example. `sentinels`: the ids of <extra_id_0>, <extra_id_1>,
    ... in order (T5's tokenizer counts them down from the top of its vocabulary)."""
    mask = noise_mask(len(ids), config.rate, config.mean_span, g)
    source: list[int] = []
    target: list[int] = []
    n = 0
    for i, (token, noisy) in enumerate(zip(ids, mask)):
        if not noisy:
            source.append(token)
            continue
        if i == 0 or not mask[i - 1]:  # a span starts: one sentinel on each side
            if n >= len(sentinels):
                raise UsageError(
                    f"span corruption needs more than {len(sentinels)} sentinel ids for {len(ids)} tokens",
                    "shorten --seq-len or give a tokenizer with more <extra_id_N> tokens",
                )
            source.append(sentinels[n])
            target.append(sentinels[n])
            n += 1
        target.append(token)
    if n < len(sentinels):
        target.append(sentinels[n])
    return source + [eos], target + [eos]


def sentinel_ids(vocab: int, count: int, tokenizer=None) -> list[int]:
    """<extra_id_0..count-1>: the tokenizer's own where it has them, else the top `count` ids of the
    vocabulary (counted down, as T5 does)."""
    ids = []
    if tokenizer is not None and hasattr(tokenizer, "token_id"):
        ids = [tokenizer.token_id(f"<extra_id_{i}>") for i in range(count)]
        if all(i is not None for i in ids):
            return ids
    if count >= vocab:
        raise UsageError(f"a vocabulary of {vocab} has no room for {count} sentinels", "use a larger vocabulary")
    return [vocab - 1 - i for i in range(count)]


# -- BART ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Denoising:
    """BART's noise: text infilling (`rate` of the tokens in spans of Poisson(`poisson_lambda`)
    length, each span one mask token) and sentence permutation (`permute`)."""

    rate: float = 0.3
    poisson_lambda: float = 3.0
    permute: bool = True

    def __post_init__(self):
        if not 0 < self.rate < 1:
            raise UsageError(f"infilling rate must be in (0, 1), got {self.rate}", "BART uses 0.3")
        if self.poisson_lambda <= 0:
            raise UsageError(f"span length lambda must be positive, got {self.poisson_lambda}", "BART uses 3")


def permute_sentences(sentences: Sequence[Sequence[int]], g: torch.Generator) -> list[int]:
    """The sentences (each a list of ids) in a random order, concatenated."""
    order = torch.randperm(len(sentences), generator=g).tolist()
    return [t for i in order for t in sentences[i]]


def text_infilling(ids: Sequence[int], mask_id: int, g: torch.Generator, config: Denoising = Denoising()) -> list[int]:
    """`ids` with spans replaced by one `mask_id` each, until `rate` of the tokens are masked; span
    lengths are Poisson(`poisson_lambda`); a length-0 span inserts a mask before a token."""
    n = len(ids)
    budget = int(math.ceil(n * config.rate))
    masked = [False] * n
    inserted: set[int] = set()
    rate = torch.tensor([float(config.poisson_lambda)])
    tries = 0
    while budget > 0 and tries < 4 * n + 16:
        tries += 1
        length = int(torch.poisson(rate, generator=g))
        start = _randint(g, n) if n else 0
        if length == 0:
            inserted.add(start)
            continue
        span = range(start, min(start + min(length, budget), n))
        if any(masked[i] for i in span) or (start > 0 and masked[start - 1]):
            continue  # spans never touch: each stays one mask
        for i in span:
            masked[i] = True
        budget -= len(span)
    out: list[int] = []
    for i, token in enumerate(ids):
        if i in inserted and not masked[i] and not (i > 0 and masked[i - 1]):
            out.append(mask_id)
        if masked[i]:
            if i == 0 or not masked[i - 1]:
                out.append(mask_id)
            continue
        out.append(token)
    return out


def denoising_example(
    sentences: Sequence[Sequence[int]], mask_id: int, g: torch.Generator, config: Denoising = Denoising()
) -> tuple[list[int], list[int]]:
    """(noised input ids, target ids) of one BART example: the target is the document as written."""
    original = [t for s in sentences for t in s]
    shuffled = permute_sentences(sentences, g) if config.permute else list(original)
    return text_infilling(shuffled, mask_id, g, config), original


def shift_right(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: `start`, then the labels without their last one; a -100
    label is fed as `pad`."""
    out = torch.full_like(labels, pad)
    out[..., 0] = start
    out[..., 1:] = labels[..., :-1]
    return out.masked_fill(out == IGNORE, pad)


# -- next-sentence prediction -----------------------------------------------------------------------
@dataclass(frozen=True)
class SentencePair:
    ids: list[int]
    token_types: list[int]
    is_next: int
    """1 when B follows A in its document (BERT's NSP label 0 means "is next": see `nsp_label`)."""


def nsp_pairs(
    documents: Sequence[Sequence[Sequence[int]]],
    *,
    cls: int,
    sep: int,
    max_len: int,
    g: torch.Generator,
) -> list[SentencePair]:
    """One pair per sentence that has a successor: A, then half the time its true next sentence and
    otherwise a random sentence of another document; truncated (longer side first) to `max_len`."""
    if sum(1 for d in documents if d) < 2:
        raise UsageError(
            "next-sentence prediction needs at least two documents", "give more text (blank lines separate documents)"
        )
    pairs = []
    for d, doc in enumerate(documents):
        for i in range(len(doc) - 1):
            a = list(doc[i])
            if _randint(g, 2):
                b, is_next = list(doc[i + 1]), 1
            else:
                other = _randint(g, len(documents) - 1)
                other += other >= d
                while not documents[other]:
                    other = (other + 1) % len(documents)
                    other += other == d
                pool = documents[other]
                b, is_next = list(pool[_randint(g, len(pool))]), 0
            a, b = _truncate_pair(a, b, max_len - 3)
            ids = [cls, *a, sep, *b, sep]
            pairs.append(SentencePair(ids, [0] * (len(a) + 2) + [1] * (len(b) + 1), is_next))
    return pairs


def _truncate_pair(a: list[int], b: list[int], room: int) -> tuple[list[int], list[int]]:
    while len(a) + len(b) > room:
        if len(a) >= len(b):
            a.pop()
        else:
            b.pop()
    return a, b


def nsp_label(pair: SentencePair) -> int:
    """The label of transformers' BERT NSP head: 0 when B is the next sentence, 1 when random."""
    return 0 if pair.is_next else 1


# -- batches -------------------------------------------------------------------------------------------
def span_raw_length(source_len: int, config: SpanCorruption = SpanCorruption()) -> tuple[int, int]:
    """(raw tokens per row, target length) so that span corruption of a row gives exactly
    `source_len` input ids (EOS included), as T5's `compute_input_and_target_lengths` does."""

    def lengths(raw: int) -> tuple[int, int]:
        noise = min(max(int(round(raw * config.rate)), 1), raw - 1)
        spans = max(min(int(round(noise / config.mean_span)), noise, raw - noise), 1)
        return raw - noise + spans + 1, noise + spans + 2

    raw = source_len
    while raw > 2 and lengths(raw + 1)[0] <= source_len:
        raw += 1
    while raw > 2 and lengths(raw)[0] > source_len:
        raw -= 1
    if lengths(raw)[0] != source_len:
        raise UsageError(f"no row length gives {source_len} input ids after span corruption", "raise --seq-len")
    return raw, lengths(raw)[1]


def seq2seq_batch(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad: int, start: int, source_len: int, target_len: int
) -> dict:
    """`{"input_ids", "attention_mask", "decoder_input_ids", "labels"}` of (source, target) id pairs:
    sources padded (or cut) to `source_len`, targets to `target_len` with -100 labels on the padding;
    the decoder's inputs are the labels shifted right after `start`."""
    b = len(pairs)
    ids = torch.full((b, source_len), pad, dtype=torch.long)
    mask = torch.zeros((b, source_len), dtype=torch.long)
    labels = torch.full((b, target_len), IGNORE, dtype=torch.long)
    for i, (src, tgt) in enumerate(pairs):
        src, tgt = list(src)[:source_len], list(tgt)[:target_len]
        ids[i, : len(src)] = torch.tensor(src, dtype=torch.long)
        mask[i, : len(src)] = 1
        labels[i, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "decoder_input_ids": shift_right(labels, start, pad),
        "labels": labels,
    }


def split_sentences(ids: Sequence[int], ends: set[int]) -> list[list[int]]:
    """`ids` cut after every id in `ends` (a full stop, a newline): the sentences BART permutes."""
    out: list[list[int]] = [[]]
    for t in ids:
        out[-1].append(t)
        if t in ends:
            out.append([])
    return [s for s in out if s]
