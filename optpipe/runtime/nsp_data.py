"""What `optpipe train --objective mlm+nsp` feeds a BERT pre-training program (`BertForPreTraining`:
masked-LM logits and the next-sentence head, with a `token_type_ids` input).

Documents of the split are cut into sentences; `noising.nsp_pairs` pairs each sentence with its true
successor or, half the time, a random sentence of another document (within a window of
`WINDOW` documents, seeded), as `[CLS] A [SEP] B [SEP]` with token types 0 / 1, padded to --seq-len;
then the masked-LM masking of `TokenMasker` (special ids are never masked). Batches are
`{"input_ids", "attention_mask", "token_type_ids", "labels", "next_sentence_label"}`, the last one
BERT's: 0 when B follows A, 1 when it is random. `NspData` has `TrainingData`'s interface.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import count, islice

import torch

from ..errors import UsageError
from .data import (
    CountedStream,
    MaskingConfig,
    TokenMasker,
    check_token_ids,
    iter_documents,
    load_tokenizer,
    shuffle_buffer,
    split_of,
)
from .noising import nsp_label, nsp_pairs

WINDOW = 64
"""Documents paired at a time (a random B comes from another document of the same window)."""
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


class PairRows(CountedStream):
    """Sentence pairs of one side of the split, as (ids, token types, NSP label); train repeats and
    shuffles; `state_dict` counts the pairs consumed."""

    def __init__(self, data, tokenizer, *, seq_len, split, val_fraction, seed, text_key, epochs=None):
        self.data, self.tokenizer, self.seq_len, self.split = data, tokenizer, seq_len, split
        self.val_fraction, self.seed, self.text_key, self.epochs = val_fraction, seed, text_key, epochs
        cls = tokenizer.cls_id if tokenizer.cls_id is not None else tokenizer.eos_id
        sep = tokenizer.sep_id if tokenizer.sep_id is not None else tokenizer.eos_id
        if cls is None or sep is None:
            raise UsageError(f"next-sentence pairs need [CLS] and [SEP] ids; {tokenizer.name} has none", "use BERT's")
        self.cls, self.sep = cls, sep

    def _documents(self) -> Iterator[list[list[int]]]:
        for text in iter_documents(self.data, text_key=self.text_key):
            if self.val_fraction and split_of(text, self.val_fraction) != self.split:
                continue
            sentences = [s.strip() for s in _SENTENCE.split(text) if s.strip()]
            yield [ids for ids in self.tokenizer.encode_batch(sentences) if ids]

    def _stream(self) -> Iterator:
        pairs = self._pairs()
        return shuffle_buffer(pairs, 256, torch.Generator().manual_seed(self.seed)) if self.split == "train" else pairs

    def _pairs(self) -> Iterator:
        g = torch.Generator().manual_seed(self.seed)
        epochs = count() if self.epochs is None else range(self.epochs)
        for _ in epochs:
            docs, made = self._documents(), 0
            while (window := [d for d in islice(docs, WINDOW) if d]) and len(window) > 1:
                pairs = nsp_pairs(window, cls=self.cls, sep=self.sep, max_len=self.seq_len, g=g)
                made += len(pairs)
                order = torch.randperm(len(pairs), generator=g).tolist() if self.split == "train" else range(len(pairs))
                yield from (pairs[i] for i in order)
            if not made:
                raise UsageError(
                    f"next-sentence prediction found no sentence pair in the {self.split} split of the data",
                    "give documents of several sentences (blank lines separate documents)",
                )


class NspData:
    """The data of one mlm+nsp training run (`TrainingData`'s interface)."""

    def __init__(
        self,
        data,
        tokenizer=None,
        *,
        seq_len: int,
        seed: int = 0,
        val_fraction: float = 0.05,
        mask: str = "random",
        mask_rate: float = 0.15,
        text_key: str = "text",
        vocab_size: int | None = None,
    ):
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer, required=tokenizer is not None)
        self.data, self.tokenizer, self.seq_len, self.seed = data, tokenizer, seq_len, seed
        self.val_fraction, self.text_key, self.vocab_size = val_fraction, text_key, vocab_size
        self.masker = TokenMasker(tokenizer, MaskingConfig(strategy=mask, rate=mask_rate), vocab_size=vocab_size)
        self._rows = self._source("train")
        self._generator = torch.Generator().manual_seed(seed)
        self._val: dict[int, tuple[int, list[dict]]] = {}

    def _source(self, split: str, epochs: int | None = None) -> PairRows:
        return PairRows(
            self.data,
            self.tokenizer,
            seq_len=self.seq_len,
            split=split,
            val_fraction=self.val_fraction,
            seed=self.seed,
            text_key=self.text_key,
            epochs=epochs,
        )

    def _prepare(self, pairs: list, g: torch.Generator, masker: TokenMasker) -> dict:
        b, n = len(pairs), self.seq_len
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        ids = torch.full((b, n), pad, dtype=torch.long)
        types = torch.zeros((b, n), dtype=torch.long)
        attention = torch.zeros((b, n), dtype=torch.long)
        for i, p in enumerate(pairs):
            ids[i, : len(p.ids)] = torch.tensor(p.ids)
            types[i, : len(p.token_types)] = torch.tensor(p.token_types)
            attention[i, : len(p.ids)] = 1
        check_token_ids(int(ids.max()), self.vocab_size, self.tokenizer)
        masked = masker(ids, g)
        return {
            "input_ids": masked["input_ids"],
            "attention_mask": attention,
            "token_type_ids": types,
            "labels": masked["labels"],
            "next_sentence_label": torch.tensor([nsp_label(p) for p in pairs], dtype=torch.long),
        }

    def next_batch(self, batch_size: int) -> dict:
        return self._prepare([next(self._rows) for _ in range(batch_size)], self._generator, self.masker)

    def validation_batches(self, batches: int, batch_size: int) -> list[dict]:
        if self.val_fraction == 0:
            return []
        asked, cached = self._val.get(batch_size, (0, []))
        if asked < batches:
            rows, g = self._source("val", epochs=1), torch.Generator().manual_seed(self.seed + 1)
            masker = TokenMasker(self.tokenizer, self.masker.config, vocab_size=self.vocab_size)
            cached = []
            try:
                while len(cached) < batches and (chunk := list(islice(rows, batch_size))):
                    cached.append(self._prepare(chunk, g, masker))
            except UsageError as e:
                if "documents" not in e.message and "split" not in e.message:
                    raise
            self._val[batch_size] = (batches, cached)
        return cached[:batches]

    def state_dict(self) -> dict:
        rows, masker = self._rows.state_dict(), self.masker.state_dict()
        return {"rows": rows, "generator": self._generator.get_state(), "masker": masker}

    def load_state_dict(self, state: dict) -> None:
        self._rows.load_state_dict(state["rows"])
        self._generator.set_state(state["generator"])
        self.masker.load_state_dict(state["masker"])
