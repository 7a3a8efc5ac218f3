"""What `optpipe train --objective seq2seq` feeds an encoder-decoder program (T5, BART, any model
taking `input_ids`, `attention_mask`, `decoder_input_ids`).

    --noise span       T5 span corruption of packed text (`noising.span_corruption`): rows of raw
                       tokens sized so every input is exactly --seq-len ids, sentinels in order
    --noise denoise    BART: sentences permuted, spans infilled with one mask each; the target is
                       the row as written
    --noise none --source-key K --target-key K
                       supervised pairs, one JSONL record each

Batches are `{"input_ids", "attention_mask", "decoder_input_ids", "labels"}` (labels -100 on the
padding, decoder inputs the labels shifted right after the model's decoder start id). The split is
train's: a document (or a pair, by its source text) falls on the same side every time.
`Seq2SeqData` has `TrainingData`'s interface (next_batch, validation_batches, state_dict).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count, islice

import torch

from ..errors import UsageError
from .data import (
    CountedStream,
    PackedBatches,
    TextTokenizer,
    check_token_ids,
    iter_pairs,
    load_tokenizer,
    shuffle_buffer,
    split_of,
)
from .noising import (
    Denoising,
    SpanCorruption,
    denoising_example,
    sentinel_ids,
    seq2seq_batch,
    span_corruption,
    span_raw_length,
    split_sentences,
)

NOISES = ("span", "denoise", "none")
SENTENCE_ENDS = (".", "!", "?", "\n")


@dataclass(frozen=True)
class Seq2SeqOptions:
    """How (source, target) pairs are made; the special ids come from the program's config."""

    noise: str = "span"
    rate: float | None = None
    """span: 0.15 of the tokens (T5); denoise: 0.3 (BART)."""
    mean_span: float = 3.0
    target_len: int | None = None
    """Decoder length (default: what span corruption needs, else --seq-len)."""
    source_key: str | None = None
    target_key: str | None = None
    pad_id: int = 0
    eos_id: int = 1
    start_id: int = 0

    def __post_init__(self):
        if self.noise not in NOISES:
            raise UsageError(f"unknown --noise {self.noise!r}", f"one of {', '.join(NOISES)}")
        pairs = self.source_key is not None or self.target_key is not None
        if pairs and (self.source_key is None or self.target_key is None):
            raise UsageError("supervised pairs need both --source-key and --target-key", "e.g. --source-key question")
        if pairs and self.noise != "none":
            raise UsageError(f"--noise {self.noise} noises text, not supervised pairs", "give --noise none")
        if not pairs and self.noise == "none":
            raise UsageError("--noise none trains on supervised pairs", "give --source-key and --target-key")

    @property
    def pairs(self) -> bool:
        return self.source_key is not None


class PairedRows(CountedStream):
    """Tokenized (source, target) pairs of JSONL records on one side of the split, shuffled and
    repeated for training; `state_dict` counts the rows consumed."""

    def __init__(self, data, tokenizer, options: Seq2SeqOptions, *, split, val_fraction, seed, epochs=None):
        self.data, self.tokenizer, self.options = data, tokenizer, options
        self.split, self.val_fraction, self.seed, self.epochs = split, val_fraction, seed, epochs

    def _pairs(self) -> Iterator[tuple[list[int], list[int]]]:
        found = 0
        for source, target in iter_pairs(self.data, self.options.source_key, self.options.target_key):
            if self.val_fraction and split_of(source, self.val_fraction) != self.split:
                continue
            found += 1
            src, tgt = self.tokenizer.encode_batch([source, target])
            yield src + [self.options.eos_id], tgt + [self.options.eos_id]
        if not found:
            raise UsageError(f"no pair of the data falls in the {self.split} split", "give more pairs")

    def _stream(self) -> Iterator:
        epochs = count() if self.epochs is None else range(self.epochs)
        rows = (row for _ in epochs for row in self._pairs())
        if self.split == "train":
            rows = shuffle_buffer(rows, 1024, torch.Generator().manual_seed(self.seed))
        return rows


class Seq2SeqData:
    """The data of one seq2seq training run (`TrainingData`'s interface)."""

    masker = None

    def __init__(
        self,
        data,
        tokenizer=None,
        *,
        seq_len: int,
        options: Seq2SeqOptions,
        seed: int = 0,
        val_fraction: float = 0.05,
        text_key: str = "text",
        vocab_size: int | None = None,
    ):
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer, required=tokenizer is not None)
        self.data, self.tokenizer, self.options = data, tokenizer, options
        self.seq_len, self.seed, self.val_fraction, self.text_key = seq_len, seed, val_fraction, text_key
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.raw_len, self.target_len = self._lengths()
        self._noise = self._make_noise()
        self._rows = self._row_source("train")
        self._generator = torch.Generator().manual_seed(seed)
        self._val: dict[int, tuple[int, list[dict]]] = {}

    def _lengths(self) -> tuple[int, int]:
        o = self.options
        if o.noise == "span":
            raw, target = span_raw_length(self.seq_len, SpanCorruption(o.rate or 0.15, o.mean_span))
            return raw, o.target_len or target
        return self.seq_len - 1, o.target_len or self.seq_len

    def _make_noise(self):
        """row ids -> (source, target) for the text noises; None for supervised pairs."""
        o, tok = self.options, self.tokenizer
        if o.noise == "span":
            config = SpanCorruption(o.rate or 0.15, o.mean_span)
            sentinels = sentinel_ids(self.vocab_size, self.target_len, tok)
            return lambda row, g: span_corruption(row, sentinels, o.eos_id, g, config)
        if o.noise == "denoise":
            mask = tok.mask_id
            if mask is None:
                raise UsageError(f"--noise denoise needs a mask token, and {tok.name} has none", "use --noise span")
            config = Denoising(o.rate or 0.3)
            ends = {ids[-1] for ids in tok.encode_batch(list(SENTENCE_ENDS)) if ids}

            def denoise(row, g):
                source, target = denoising_example(split_sentences(row, ends), mask, g, config)
                return source + [o.eos_id], target + [o.eos_id]

            return denoise
        return None

    def _row_source(self, split: str, epochs: int | None = None):
        if self.options.pairs:
            return PairedRows(
                self.data,
                self.tokenizer,
                self.options,
                split=split,
                val_fraction=self.val_fraction,
                seed=self.seed,
                epochs=epochs,
            )
        return PackedBatches(
            self.data,
            self.tokenizer,
            seq_len=self.raw_len,
            batch_size=1,
            objective="clm",
            split=split,
            val_fraction=self.val_fraction,
            seed=self.seed,
            epochs=epochs,
            drop_last=False,
            text_key=self.text_key,
        )

    def _prepare(self, rows: list, g: torch.Generator) -> dict:
        if self._noise is None:
            pairs = rows
        else:
            pairs = [self._noise(r[0].tolist(), g) for r in rows]
        batch = seq2seq_batch(
            pairs,
            pad=self.options.pad_id,
            start=self.options.start_id,
            source_len=self.seq_len,
            target_len=self.target_len,
        )
        check_token_ids(max(int(batch["input_ids"].max()), int(batch["labels"].max())), self.vocab_size, self.tokenizer)
        return batch

    def next_batch(self, batch_size: int) -> dict:
        return self._prepare([next(self._rows) for _ in range(batch_size)], self._generator)

    def validation_batches(self, batches: int, batch_size: int) -> list[dict]:
        """The first `batches` batches of the validation split, noised the same way every time."""
        if self.val_fraction == 0:
            return []
        asked, cached = self._val.get(batch_size, (0, []))
        if asked < batches:
            rows = self._row_source("val", epochs=1)
            g = torch.Generator().manual_seed(self.seed + 1)
            cached = []
            try:
                for _ in range(batches):
                    chunk = list(islice(rows, batch_size))
                    if not chunk:
                        break
                    cached.append(self._prepare(chunk, g))
            except UsageError as e:
                if "split" not in e.message:
                    raise
            self._val[batch_size] = (batches, cached)
        return cached[:batches]

    def state_dict(self) -> dict:
        return {"rows": self._rows.state_dict(), "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._rows.load_state_dict(state["rows"])
        self._generator.set_state(state["generator"])


def options_for(program, config, tokenizer: TextTokenizer) -> Seq2SeqOptions:
    """`Seq2SeqOptions` from `train`'s config and the program's model config (pad, eos, decoder start)."""
    model = program.meta.get("config") or {}
    if "decoder_input_ids" not in program.input_names:
        raise UsageError(
            f"train --objective seq2seq: the program takes {', '.join(program.input_names)}, no decoder_input_ids",
            "capture an encoder-decoder model (e.g. T5ForConditionalGeneration) with decoder_input_ids",
        )

    def special(key: str, fallback):
        value = model.get(key)
        return int(value) if value is not None else fallback

    pad = special("pad_token_id", tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    eos = special("eos_token_id", tokenizer.eos_id if tokenizer.eos_id is not None else 1)
    return Seq2SeqOptions(
        noise=config.noise,
        rate=config.noise_rate,
        mean_span=config.mean_span,
        target_len=config.target_len,
        source_key=config.source_key,
        target_key=config.target_key,
        pad_id=pad,
        eos_id=eos,
        start_id=special("decoder_start_token_id", pad),
    )
