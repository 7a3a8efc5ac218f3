"""Training and calibration data: read text, tokenize, pack into fixed-length batches, mask.

```
 files ──read──▶ documents ──split──▶ train | val ──tokenize──▶ ids ──pack──▶ rows of seq_len
       ──shuffle buffer──▶ [batch, seq_len] int64 ──objective──▶ {"input_ids", "labels"}
```

Everything streams: a file is read line by line and never held whole, so files larger than memory
work; what is held at once is one document, the shuffle buffer and one batch.

Files (`--data FILE`; several files or a folder, read recursively in sorted order, hidden files
skipped):
- plain text: documents are separated by one or more blank lines (whitespace-only lines count as
  blank); a document's lines are kept with their newlines. A document longer than
  `MAX_DOCUMENT_CHARS` is cut into pieces of that size, so a file without blank lines (or without
  newlines at all) still streams; the pieces are packed one after another and split (below) like
  separate documents.
- JSONL (`.jsonl`, `.ndjson`, `.json`, or `format="jsonl"`): one JSON object per line, the text in
  field `text_key` (default "text"); blank lines are skipped.

Tokenizers: a `tokenizers` tokenizer.json (`load_tokenizer(folder_or_file)`, `TokenizerJSON`), or
`ByteTokenizer`, the fallback when none is known: ids 0..255 are the UTF-8 bytes, 256 is eos, 257
pad, 258 mask (vocab 259; no cls/sep).

Packing: each document is framed and the frames concatenated, then cut into rows of `seq_len`
(the remainder at the very end is dropped; rows run across documents, RoBERTa "full-sentences"
style). `clm` frames are `doc + [eos]` (`[sep]` when the tokenizer has no eos); `mlm` frames are
`[cls] + doc + [sep]` when the tokenizer has both, else `doc + [eos]`.

Train/validation split: by a hash of each document's text (blake2b), so it is deterministic,
disjoint, independent of file order and of the seed, and duplicate documents land on the same side:
a document is validation when `hash/2**64 < val_fraction`.

Shuffling: a fixed-size buffer of rows (`shuffle_buffer`), drawn from with a `torch.Generator`
seeded with `seed`; validation is never shuffled. Resuming: `PackedBatches.state_dict()` records the
batches consumed; `load_state_dict()` replays the stream up to there (tokenizing, not building
tensors), so a resumed run sees exactly the batches an uninterrupted one would — the approach of
Hugging Face Trainer's batch skipping.

Calibration (`calibration_batches`): the same stream, shaped like a program's example inputs, with
the program's own tokenizer.

Objectives (`prepare_batch`): `clm` gives `labels = input_ids`; the model's loss shifts them by one
(Hugging Face convention: position t predicts labels[t+1]). `mlm` gives masked `input_ids` and
`labels` holding the original id at predicted positions and -100 elsewhere (`TokenMasker`,
strategies random / whole-word / span / frequency, BERT's 80/10/10 replacement).

Example::

    tok = load_tokenizer("model_folder")            # or ByteTokenizer()
    train = PackedBatches("corpus.txt", tok, seq_len=128, batch_size=8, val_fraction=0.05, seed=0)
    val = validation_batches("corpus.txt", tok, seq_len=128, batch_size=8, batches=4, val_fraction=0.05)
    masker = TokenMasker(tok, MaskingConfig(strategy="whole-word"))
    g = torch.Generator().manual_seed(0)
    for ids in train:
        batch = prepare_batch(ids, "mlm", masker=masker, generator=g)   # {"input_ids", "labels"}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import chain, count, islice
from pathlib import Path

import torch

from ..errors import UsageError
from ..losses import IGNORE_INDEX, OBJECTIVES

MAX_DOCUMENT_CHARS = 1 << 20
STRATEGIES = ("random", "whole-word", "span", "frequency")
_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
_DATA_HINT = 'give a text file (documents separated by blank lines) or JSONL with a "text" field'


# -- reading --------------------------------------------------------------------------------------
def data_files(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The files that `data` names: a file, a folder (all files under it, sorted, hidden ones
    skipped) or a list of those. Raises UsageError for a missing path, an empty folder or an empty
    file."""
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not items:
        raise UsageError("no data files given", _DATA_HINT)
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                f
                for f in path.rglob("*")
                if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
            )
            if not found:
                raise UsageError(f"data folder {path} holds no files", _DATA_HINT)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"data file {path} does not exist", "check the path given to --data")
    for f in files:
        if f.stat().st_size == 0:
            raise UsageError(f"data file {f} is empty", _DATA_HINT)
    return files


def iter_documents(data, *, text_key: str = "text", format: str = "auto") -> Iterator[str]:
    """Stream the documents of `data` (see `data_files`), file by file, in order. `format` is
    "auto" (JSONL by suffix .jsonl/.ndjson/.json, else plain text), "text" or "jsonl"."""
    if format not in ("auto", "text", "jsonl"):
        raise UsageError(f"unknown data format {format!r}", "use auto, text or jsonl")
    for path in data_files(data):
        is_jsonl = format == "jsonl" or (format == "auto" and path.suffix.lower() in _JSONL_SUFFIXES)
        yield from (_read_jsonl(path, text_key) if is_jsonl else _read_text(path))


def _read_text(path: Path) -> Iterator[str]:
    found = 0
    parts: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        while True:
            line = fh.readline(MAX_DOCUMENT_CHARS)  # bounded even when the file has no newline
            if not line or (not line.strip() and line.endswith("\n")):
                text = "".join(parts).rstrip()
                if text:
                    found += 1
                    yield text
                parts, size = [], 0
                if not line:
                    break
                continue
            parts.append(line)
            size += len(line)
            if size >= MAX_DOCUMENT_CHARS:
                found += 1
                yield "".join(parts)
                parts, size = [], 0
    if not found:
        raise UsageError(f"data file {path} holds no text", _DATA_HINT)


def _read_jsonl(path: Path, key: str) -> Iterator[str]:
    return (fields[0] for fields in _read_jsonl_fields(path, (key,), "name the text field with --text-key"))


def iter_pairs(data, source_key: str, target_key: str) -> Iterator[tuple[str, str]]:
    """(source, target) texts of the JSONL records of `data` (see `data_files`): supervised pairs."""
    hint = "name the fields with --source-key and --target-key"
    for path in data_files(data):
        yield from _read_jsonl_fields(path, (source_key, target_key), hint)


def _read_jsonl_fields(path: Path, keys: tuple[str, ...], hint: str) -> Iterator[tuple[str, ...]]:
    found = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(
                    f"{path}:{lineno}: not JSON ({e.msg})", "JSONL wants one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise UsageError(
                    f"{path}:{lineno}: a JSON {type(obj).__name__}, not an object",
                    f'JSONL wants one object per line, like {{"{keys[0]}": "..."}}',
                )
            for key in keys:
                if key not in obj:
                    names = ", ".join(map(repr, list(obj)[:8])) or "none"
                    raise UsageError(f"{path}:{lineno}: no key {key!r} (keys: {names})", hint)
                if not isinstance(obj[key], str):
                    raise UsageError(
                        f"{path}:{lineno}: {key!r} is a {type(obj[key]).__name__}, not a string",
                        "the text field must hold a string",
                    )
            texts = tuple(obj[k] for k in keys)
            if all(t.strip() for t in texts):
                found += 1
                yield texts
    if not found:
        raise UsageError(f"data file {path} holds no text", _DATA_HINT)


def split_of(text: str, val_fraction: float) -> str:
    """ "val" or "train": the side of the split a document falls on (by a hash of its text)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return "val" if h / 2.0**64 < val_fraction else "train"


def pydoc_corpus(path: str | os.PathLike) -> int:
    """Write Python's own documentation (`pydoc_data.topics.topics`, text nobody here wrote) to
    `path`, one document per topic in sorted topic order; returns the number of documents.

    A `.jsonl` path gets `{"title", "text"}` lines with the text as is. Any other path gets plain
    text with documents separated by one blank line; blank lines inside a topic are dropped so
    that each topic reads back as exactly one document."""
    from pydoc_data.topics import topics

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for title in sorted(topics):
            text = topics[title].strip()
            if not text:
                continue
            if path.suffix.lower() in _JSONL_SUFFIXES:
                fh.write(json.dumps({"title": title, "text": text}) + "\n")
            else:
                fh.write("\n".join(line.rstrip() for line in text.splitlines() if line.strip()) + "\n\n")
            n += 1
    return n


# -- tokenizers -----------------------------------------------------------------------------------
_WHITESPACE_MARKS = set(" \t\n\r\x0b\x0cĠĊĉčċČ▁")  # byte-level BPE shows space/newline/tab as Ġ/Ċ/ĉ; SentencePiece as ▁
# word classes of a token: special; whitespace; whitespace ending in a space mark (Ġ, ▁: a word may
# follow it without a mark of its own, as "Ġ" + "__" for " __"); a word-leading piece; a continuation
_SPECIAL, _SPACE, _SPACE_LEAD, _LEAD, _CONT = range(5)
_JOINS = torch.zeros(5, 5, dtype=torch.bool)  # [class before, class of the token]: same word
for _a, _b in [
    (_SPACE, _SPACE),
    (_SPACE, _SPACE_LEAD),
    (_SPACE_LEAD, _SPACE),
    (_SPACE_LEAD, _SPACE_LEAD),
    (_SPACE_LEAD, _CONT),
    (_LEAD, _CONT),
    (_CONT, _CONT),
]:
    _JOINS[_a, _b] = True
_SPECIAL_NAMES = {
    "mask": ("[MASK]", "<mask>", "<MASK>"),
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|padding|>"),
    "cls": ("[CLS]", "<cls>", "<s>"),
    "sep": ("[SEP]", "<sep>", "</s>"),
    "eos": ("<|endoftext|>", "<|end_of_text|>", "<eos>", "</s>", "[EOS]"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
}


class TextTokenizer:
    """What the data pipeline needs of a tokenizer: `encode_batch`, `decode`, the vocab size, the
    special ids (None where the tokenizer has no such token) and word boundaries (`word_starts`)."""

    name = "tokenizer"
    vocab_size: int
    eos_id: int | None = None
    pad_id: int | None = None
    mask_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    unk_id: int | None = None
    _word_class: torch.Tensor  # per id: one of _SPECIAL, _SPACE, _SPACE_LEAD, _LEAD, _CONT

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_id(self, text: str) -> int | None:
        """The id of the token spelled `text` (e.g. "<extra_id_0>"), None when there is none."""
        return None

    @property
    def special_ids(self) -> list[int]:
        """Ids never masked and never drawn as random replacements."""
        return sorted(
            {
                i
                for i in (self.eos_id, self.pad_id, self.mask_id, self.cls_id, self.sep_id, self.unk_id)
                if i is not None
            }
            | set(self._extra_special)
        )

    _extra_special: tuple = ()

    @property
    def separator_id(self) -> int | None:
        """The id that ends a document in a packed clm row: eos, else sep."""
        return self.eos_id if self.eos_id is not None else self.sep_id

    def word_starts(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor shaped like `ids` ([..., seq]): True where a token begins a new word.

        Each token is a special token, whitespace, a word-leading piece or a continuation piece. A
        continuation joins the word of a leading or continuation piece before it, or of whitespace
        ending in a space mark (Ġ, ▁); whitespace joins whitespace before it; everything else begins
        a word, and so does every row."""
        cls = self._word_class[ids.clamp(0, self.vocab_size - 1)]
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[..., 1:] = ~_JOINS[cls[..., :-1], cls[..., 1:]]
        return starts

    def _set_word_classes(self, classes: list[int]) -> None:
        self._word_class = torch.tensor(classes, dtype=torch.long)
        self._word_class[torch.tensor(self.special_ids, dtype=torch.long)] = _SPECIAL

    def describe(self) -> dict:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "mask_id": self.mask_id,
            "cls_id": self.cls_id,
            "sep_id": self.sep_id,
        }


class ByteTokenizer(TextTokenizer):
    """UTF-8 bytes as ids 0..255, plus eos=256, pad=257, mask=258 (vocab 259; no cls/sep). Words
    are runs of non-whitespace bytes."""

    name = "bytes"
    vocab_size = 259
    eos_id, pad_id, mask_id = 256, 257, 258

    def __init__(self):
        ws = {9, 10, 11, 12, 13, 32}
        self._set_word_classes([_SPACE if i in ws else _CONT for i in range(self.vocab_size)])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8", "replace")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", "replace")


class TokenizerJSON(TextTokenizer):
    """A `tokenizers.Tokenizer` (tokenizer.json), with truncation and padding turned off.

    Special ids come from the token names ([MASK]/<mask>, [PAD]/<pad>, [CLS]/<s>, [SEP]/</s>,
    <|endoftext|>/</s>/<eos>, [UNK]/<unk>). Word boundaries come from the vocabulary: WordPiece
    continuation pieces start with `##`; byte-level BPE (GPT-2, Ġ) and SentencePiece (▁) pieces
    start a word when they begin with the space mark (a piece without it continues the word before,
    so trailing punctuation joins its word; a run of whitespace pieces is one word); other models
    treat every token as a word."""

    def __init__(self, tokenizer, path: str = ""):
        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self.path = path
        self.name = path or "tokenizer.json"
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        for kind, names in _SPECIAL_NAMES.items():
            found = next((i for i in map(tokenizer.token_to_id, names) if i is not None), None)
            setattr(self, f"{kind}_id", found)
        self._extra_special = tuple(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self._set_word_classes(self._word_classes())

    def _word_classes(self) -> list[int]:
        spec = json.loads(self._tok.to_str())
        model = spec.get("model") or {}
        tokens = [self._tok.id_to_token(i) or "" for i in range(self.vocab_size)]
        prefix = model.get("continuing_subword_prefix")
        if model.get("type") == "WordPiece" or prefix:
            prefix = prefix or "##"
            return [_CONT if t.startswith(prefix) else _LEAD for t in tokens]
        surface = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder"), spec.get("normalizer")])
        if "ByteLevel" in surface or "Metaspace" in surface:
            return [
                (_SPACE_LEAD if t and t[-1] in "Ġ▁" else _SPACE)
                if all(c in _WHITESPACE_MARKS for c in t)
                else _LEAD
                if t[0] in _WHITESPACE_MARKS
                else _CONT
                for t in tokens
            ]
        return [_LEAD] * len(tokens)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    @property
    def tokenizer(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok


def load_tokenizer(path_or_dir: str | os.PathLike | None = None, required: bool = False) -> TextTokenizer:
    """The tokenizer in `path_or_dir` (a tokenizer.json, or a folder holding one: a model folder or
    an OUT folder). Without one (or without the `tokenizers` package): `ByteTokenizer()`, or a
    UsageError when `required`."""
    file = None
    if path_or_dir is not None:
        p = Path(path_or_dir)
        file = p / "tokenizer.json" if p.is_dir() else p
    if file is None or not file.is_file():
        if required:
            raise UsageError(
                f"{path_or_dir or 'the model'} has no tokenizer.json",
                "give a folder with a tokenizer.json, or train on bytes without one",
            )
        return ByteTokenizer()
    try:
        from tokenizers import Tokenizer
    except ImportError:
        if required:
            raise UsageError(f"reading {file} needs the `tokenizers` package", "pip install tokenizers") from None
        return ByteTokenizer()
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        raise UsageError(
            f"{file} is not a tokenizers tokenizer.json ({str(e).splitlines()[0]})",
            "save it with tokenizers' Tokenizer.save, or transformers' save_pretrained",
        ) from None
    return TokenizerJSON(tok, str(file))


def tokenizer_for_program(program, out: str | os.PathLike | None = None, required: bool = False) -> TextTokenizer:
    """OUT/tokenizer.json, else the program's source tokenizer (`program.meta["tokenizer"]`),
    else bytes (or a UsageError when `required`)."""
    candidates = [Path(out) / "tokenizer.json"] if out else []
    if program.meta.get("tokenizer"):
        candidates.append(Path(program.meta["tokenizer"]) / "tokenizer.json")
    found = next((c for c in candidates if c.is_file()), None)
    if found is None and required:
        raise UsageError(f"{out or 'the program'} has no tokenizer.json", "give a model folder that has one")
    return load_tokenizer(found, required=required)


# -- packing --------------------------------------------------------------------------------------
def document_frame(tokenizer: TextTokenizer, objective: str) -> tuple[list[int], list[int]]:
    """(prefix, suffix) ids put around each document before packing (see the module docstring)."""
    _check_objective(objective)
    if objective == "mlm" and tokenizer.cls_id is not None and tokenizer.sep_id is not None:
        return [tokenizer.cls_id], [tokenizer.sep_id]
    sep = tokenizer.separator_id
    return [], ([] if sep is None else [sep])


def pack_sequences(
    token_docs: Iterable[list[int]], seq_len: int, prefix: Sequence[int] = (), suffix: Sequence[int] = ()
) -> Iterator[array]:
    """Concatenate `prefix + doc + suffix` for each document and cut the stream into rows of
    `seq_len` ids (int32 arrays); the incomplete row at the end is dropped."""
    buf: list[int] = []
    for ids in token_docs:
        buf.extend(prefix)
        buf.extend(ids)
        buf.extend(suffix)
        if len(buf) >= seq_len:
            end = len(buf) // seq_len * seq_len
            for i in range(0, end, seq_len):
                yield array("i", buf[i : i + seq_len])
            buf = buf[end:]


def shuffle_buffer(items: Iterable, size: int, generator: torch.Generator) -> Iterator:
    """Streaming shuffle: hold `size` items, emit a uniformly drawn one as each new item arrives,
    then the rest in random order. Deterministic given the generator's state."""
    buf: list = []
    draws: list[int] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        if not draws:
            draws = torch.randint(0, size, (1024,), generator=generator).tolist()[::-1]
        j = draws.pop()
        yield buf[j]
        buf[j] = item
    for j in torch.randperm(len(buf), generator=generator).tolist():
        yield buf[j]


class PackedBatches:
    """Batches of packed token ids, `[batch_size, seq_len]` int64, streamed from `data`.

    `split`: "train" (documents not in validation; shuffled unless `shuffle=False`) or "val".
    `epochs`: None repeats the data forever (rows run on across epoch ends), else stops after that
    many passes. `drop_last`: drop a final batch with fewer than `batch_size` rows.

    Iterate it (it is its own iterator). `state_dict()` / `load_state_dict(state)` save and restore
    the position (batches consumed); `skip(n)` fast-forwards."""

    def __init__(
        self,
        data,
        tokenizer: TextTokenizer | None = None,
        *,
        seq_len: int,
        batch_size: int,
        objective: str = "clm",
        split: str = "train",
        val_fraction: float = 0.0,
        seed: int = 0,
        shuffle: bool | None = None,
        shuffle_buffer: int = 1024,
        epochs: int | None = None,
        drop_last: bool = True,
        text_key: str = "text",
        format: str = "auto",
    ):
        _check_objective(objective)
        if seq_len < 1 or batch_size < 1:
            raise UsageError(
                f"seq_len and batch_size must be positive (got {seq_len}, {batch_size})",
                "give --seq-len and --batch-size of at least 1",
            )
        if split not in ("train", "val"):
            raise UsageError(f"unknown split {split!r}", "use train or val")
        if not 0.0 <= val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1) (got {val_fraction})", "e.g. --val-fraction 0.05")
        if split == "val" and val_fraction == 0.0:
            raise UsageError("the validation split is empty with val_fraction=0", "give --val-fraction, e.g. 0.05")
        if epochs is not None and epochs < 1:
            raise UsageError(f"epochs must be at least 1 (got {epochs})", "or None to repeat forever")
        self.files = data_files(data)  # errors about paths now, not at the first batch
        self.tokenizer = tokenizer or ByteTokenizer()
        self.seq_len, self.batch_size, self.objective = seq_len, batch_size, objective
        self.split, self.val_fraction, self.seed = split, val_fraction, seed
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.shuffle_buffer, self.epochs, self.drop_last = max(1, shuffle_buffer), epochs, drop_last
        self.text_key, self.format = text_key, format
        self.batches_consumed = 0
        self._rows: Iterator[array] | None = None

    # -- the stream --
    def _documents(self) -> Iterator[str]:
        n = 0
        for text in iter_documents(self.files, text_key=self.text_key, format=self.format):
            if self.val_fraction == 0.0 or split_of(text, self.val_fraction) == self.split:
                n += 1
                yield text
        if not n:
            names = ", ".join(map(str, self.files[:3])) + (" ..." if len(self.files) > 3 else "")
            raise UsageError(
                f"no document of {names} falls in the {self.split} split (val_fraction={self.val_fraction})",
                "give more documents (blank-line separated), or change --val-fraction",
            )

    def _tokenized(self, docs: Iterable[str], chunk: int = 64) -> Iterator[list[int]]:
        while True:
            texts = list(islice(docs, chunk))
            if not texts:
                return
            yield from self.tokenizer.encode_batch(texts)

    def _make_rows(self) -> Iterator[array]:
        epochs = count() if self.epochs is None else range(self.epochs)
        docs = chain.from_iterable(self._documents() for _ in epochs)
        rows = pack_sequences(self._tokenized(docs), self.seq_len, *document_frame(self.tokenizer, self.objective))
        if self.shuffle:
            rows = shuffle_buffer(rows, self.shuffle_buffer, torch.Generator().manual_seed(self.seed))
        return rows

    def _next_rows(self) -> list[array]:
        if self._rows is None:
            self._rows = self._make_rows()
        rows = list(islice(self._rows, self.batch_size))
        if not rows or (self.drop_last and len(rows) < self.batch_size):
            raise StopIteration
        self.batches_consumed += 1
        return rows

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> torch.Tensor:
        rows = self._next_rows()
        return torch.stack([torch.frombuffer(r, dtype=torch.int32) for r in rows]).to(torch.int64)

    def skip(self, n: int) -> int:
        """Consume `n` batches without building them; returns how many there were."""
        done = 0
        try:
            for _ in range(n):
                self._next_rows()
                done += 1
        except StopIteration:
            pass
        return done

    # -- resuming --
    def _fingerprint(self) -> dict:
        return {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "objective": self.objective,
            "split": self.split,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "vocab_size": self.tokenizer.vocab_size,
        }

    def state_dict(self) -> dict:
        """JSON-serialisable position: the batches consumed, and the settings they depend on."""
        return {"batches": self.batches_consumed, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Restart the stream and fast-forward to `state["batches"]`; the settings must match."""
        mine = self._fingerprint()
        diff = [f"{k}={state.get(k)!r} (now {v!r})" for k, v in mine.items() if k in state and state[k] != v]
        if diff:
            raise UsageError(
                f"the data state was saved with other settings: {', '.join(diff)}",
                "resume with the same data options, or start a fresh run",
            )
        self._rows = None
        self.batches_consumed = 0
        self.skip(int(state["batches"]))


class CountedStream:
    """An iterator over the stream `_stream()` builds, counting the items it hands out, so that
    `load_state_dict(state_dict())` replays a fresh stream to the same position (the rows of a
    resumed run are those of an uninterrupted one). Subclasses define `_stream`."""

    consumed = 0
    _it: Iterator | None = None

    def _stream(self) -> Iterator:
        raise NotImplementedError

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = self._stream()
        row = next(self._it)
        self.consumed += 1
        return row

    def state_dict(self) -> dict:
        return {"rows": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self._it, self.consumed = None, 0
        for _ in islice(self, int(state["rows"])):
            pass


def validation_batches(
    data,
    tokenizer: TextTokenizer | None = None,
    *,
    seq_len: int,
    batch_size: int,
    batches: int,
    val_fraction: float,
    objective: str = "clm",
    text_key: str = "text",
    format: str = "auto",
) -> list[torch.Tensor]:
    """The first `batches` batches of the validation split (unshuffled; the last one may have fewer
    rows): a fixed, finite list to evaluate on."""
    it = PackedBatches(
        data,
        tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        objective=objective,
        split="val",
        val_fraction=val_fraction,
        shuffle=False,
        epochs=1,
        drop_last=False,
        text_key=text_key,
        format=format,
    )
    out = list(islice(it, batches))
    if not out:
        raise UsageError(
            f"the validation split of the data holds fewer than seq_len={seq_len} tokens",
            "raise --val-fraction, or lower --seq-len",
        )
    return out


# -- objectives -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskingConfig:
    """How `mlm` picks the positions to predict.

    strategy: "random" (each token with probability `rate`), "whole-word" (each word with
        probability `rate`, all its pieces together), "span" (contiguous spans, lengths geometric
        with mean `mean_span` clipped to `max_span`, SpanBERT-style, over tokens, until
        `rate` of the row is covered; spans never touch, so each one stays visible), "frequency"
        (probability ∝ (count+1)^-frequency_power of the token, counts from the data seen,
        scaled so the expected rate is `rate`).
    mask_fraction / random_fraction: of the picked positions, the share replaced by the mask token
        / by a random token; the rest keep their token (BERT's 80/10/10)."""

    strategy: str = "random"
    rate: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    mean_span: float = 3.0
    max_span: int = 10
    frequency_power: float = 0.5

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise UsageError(f"unknown masking strategy {self.strategy!r}", f"use one of {', '.join(STRATEGIES)}")
        if not 0.0 < self.rate < 1.0:
            raise UsageError(f"masking rate must be in (0, 1) (got {self.rate})", "BERT uses 0.15")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise UsageError(
                f"mask_fraction + random_fraction must be within [0, 1] (got {self.mask_fraction} + "
                f"{self.random_fraction})",
                "BERT uses 0.8 and 0.1",
            )
        if self.mean_span < 1 or self.max_span < 1:
            raise UsageError(
                f"mean_span and max_span must be at least 1 (got {self.mean_span}, {self.max_span})",
                "SpanBERT-like: mean_span=3, max_span=10",
            )
        if self.frequency_power < 0:
            raise UsageError(f"frequency_power must be >= 0 (got {self.frequency_power})", "0.5 is a good start")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MaskingConfig:
        return cls(**d)


class TokenMasker:
    """Masked-language-model batch preparation: `masker(ids, generator)` →
    `{"input_ids": masked ids, "labels": original ids at predicted positions, -100 elsewhere}`.

    Special tokens (cls, sep, pad, eos, mask, unk, any added special token) are never picked.
    Deterministic given the generator. For "frequency", token counts accumulate over every batch
    masked (the data seen); `observe(ids)` adds a first pass ahead of training."""

    def __init__(
        self, tokenizer: TextTokenizer, config: MaskingConfig | None = None, *, vocab_size: int | None = None, **options
    ):
        """`vocab_size`: the model's, when smaller than the tokenizer's; random replacements stay
        below it. `options`: MaskingConfig fields, when no `config` is given."""
        self.config = config or MaskingConfig(**options)
        if tokenizer.mask_id is None:
            raise UsageError(
                f"the {tokenizer.name} tokenizer has no mask token, so it cannot train --objective mlm",
                "use --objective clm, or a tokenizer with [MASK] or <mask>",
            )
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self._special = torch.tensor(tokenizer.special_ids, dtype=torch.long)
        normal = torch.ones(self.vocab_size, dtype=torch.bool)
        normal[self._special] = False
        self._normal_ids = normal.nonzero().flatten()
        if vocab_size is not None:
            self._normal_ids = self._normal_ids[self._normal_ids < vocab_size]
        self.counts = torch.zeros(self.vocab_size, dtype=torch.long)

    def observe(self, ids: torch.Tensor) -> None:
        """Add the tokens of `ids` to the frequency counts."""
        self.counts += torch.bincount(ids.flatten().clamp(0, self.vocab_size - 1), minlength=self.vocab_size)

    def state_dict(self) -> dict:
        """The config and the frequency counts, for a checkpoint (the generator's state is the
        caller's: `generator.get_state()`)."""
        return {"config": self.config.to_dict(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        if MaskingConfig.from_dict(state["config"]) != self.config:
            raise UsageError(
                f"the masking state was saved with {state['config']}, not {self.config.to_dict()}",
                "resume with the same masking options",
            )
        self.counts = torch.as_tensor(state["counts"], dtype=torch.long).clone()

    def eligible(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor shaped like `ids`: positions that may be picked (not a special token)."""
        return ~torch.isin(ids, self._special)

    def select(self, ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bool tensor shaped like `ids`: the positions to predict."""
        cfg, ok = self.config, self.eligible(ids)
        if cfg.strategy == "random":
            picked = torch.rand(ids.shape, generator=generator) < cfg.rate
        elif cfg.strategy == "whole-word":
            starts = self.tokenizer.word_starts(ids) | ~ok
            word = starts.flatten().long().cumsum(0) - 1
            picked = (torch.rand(int(word[-1]) + 1, generator=generator) < cfg.rate)[word].view(ids.shape)
        elif cfg.strategy == "span":
            picked = self._spans(ok, generator)
        else:
            self.observe(ids)
            picked = torch.rand(ids.shape, generator=generator) < self._frequency_probs(ids, ok)
        picked &= ok
        if not picked.any() and ok.any():  # an all -100 batch makes the loss NaN
            where = ok.flatten().nonzero().flatten()
            picked.view(-1)[where[torch.randint(len(where), (1,), generator=generator)]] = True
        return picked

    def _frequency_probs(self, ids: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        w = (self.counts[ids.clamp(0, self.vocab_size - 1)].double() + 1.0) ** -self.config.frequency_power
        w = torch.where(ok, w, torch.zeros_like(w))
        target = self.config.rate * float(ok.sum())
        full = torch.zeros_like(ok)
        p = torch.zeros_like(w)
        for _ in range(64):  # water-filling: probabilities that would pass 1 are capped, the rest rescaled
            rest = w.masked_fill(full, 0.0)
            scale = (target - float(full.sum())) / max(float(rest.sum()), 1e-30)
            p = torch.where(full, torch.ones_like(w), rest * scale)
            over = (p > 1.0) & ~full
            if not over.any():
                break
            full |= over
        return p.clamp(max=1.0).float()

    def _spans(self, ok: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        cfg = self.config
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
        log_q = math.log(1.0 - 1.0 / cfg.mean_span) if cfg.mean_span > 1 else None
        picked = torch.zeros_like(ok)
        for r, row_ok in enumerate(ok.tolist()):
            seq = len(row_ok)
            positions = [i for i, e in enumerate(row_ok) if e]
            want = cfg.rate * len(positions)
            budget = int(want) + (rng.random() < want - int(want))  # unbiased rounding
            marked = [False] * seq
            have = tries = 0
            while have < budget and tries < 20 * budget + 20:
                tries += 1
                length = 1 if log_q is None else 1 + int(math.log(1.0 - rng.random()) / log_q)
                length = min(length, cfg.max_span, budget - have)
                start = rng.choice(positions)
                if marked[start] or (start > 0 and marked[start - 1]):
                    continue
                end = start
                while end < seq and end - start < length and row_ok[end] and not marked[end]:
                    end += 1
                if end < seq and marked[end]:
                    continue
                for i in range(start, end):
                    marked[i] = True
                have += end - start
            picked[r] = torch.tensor(marked)
        return picked

    def __call__(self, ids: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        cfg = self.config
        picked = self.select(ids, generator)
        labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
        u = torch.rand(ids.shape, generator=generator)
        to_mask = picked & (u < cfg.mask_fraction)
        to_random = picked & (u >= cfg.mask_fraction) & (u < cfg.mask_fraction + cfg.random_fraction)
        inputs = ids.clone()
        inputs[to_mask] = self.tokenizer.mask_id
        n = int(to_random.sum())
        if n:
            inputs[to_random] = self._normal_ids[torch.randint(len(self._normal_ids), (n,), generator=generator)]
        return {"input_ids": inputs, "labels": labels}


def prepare_batch(
    ids: torch.Tensor, objective: str, *, masker: TokenMasker | None = None, generator: torch.Generator | None = None
) -> dict:
    """`{"input_ids", "labels"}` for one batch of packed ids. `clm`: labels are the ids themselves
    (the loss shifts by one). `mlm`: see `TokenMasker` (required)."""
    _check_objective(objective)
    if objective == "clm":
        return {"input_ids": ids, "labels": ids.clone()}
    if masker is None:
        raise UsageError("--objective mlm needs a masker", "pass masker=TokenMasker(tokenizer)")
    return masker(ids, generator)


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}", f"use one of {', '.join(OBJECTIVES)}")


# -- calibration ----------------------------------------------------------------------------------
def calibration_batches(
    data,
    program,
    *,
    batches: int = 4,
    text_key: str = "text",
    out: str | os.PathLike | None = None,
    val_fraction: float = 0.0,
) -> list[tuple]:
    """`batches` input tuples shaped like `program.example_inputs`, from the text in `data`.

    input_ids [B, S] takes B and S from the example input, tokenized with the program's tokenizer
    (OUT/tokenizer.json with `out`, else `program.meta["tokenizer"]`, else bytes) and packed as for
    mlm when the tokenizer has cls/sep, else clm. attention_mask is ones, token_type_ids zeros,
    position_ids 0..S-1; any other input keeps its example value. Rows come in file order (no
    shuffle); the data repeats if it is short. `val_fraction`: leave out the documents of that
    validation split (as `train` and `eval` cut it), so that nothing calibrated on is evaluated on.
    Raises UsageError when a token id is not below the model's vocab size."""
    names, examples = list(program.input_names), tuple(program.example_inputs)
    if "input_ids" in names:
        k = names.index("input_ids")
    else:
        k = next(
            (
                i
                for i, x in enumerate(examples)
                if isinstance(x, torch.Tensor) and x.dim() == 2 and not x.dtype.is_floating_point
            ),
            None,
        )
        if k is None:
            raise UsageError(
                "the program has no input_ids input to calibrate on text",
                "give calibration inputs as tensors (optpipe.calibration.with_calibration)",
            )
    ref = examples[k]
    if not isinstance(ref, torch.Tensor) or ref.dim() != 2:
        raise UsageError(
            f"input {names[k]!r} is not a [batch, seq] tensor, so text cannot fill it",
            "give calibration inputs as tensors (optpipe.calibration.with_calibration)",
        )
    b, s = ref.shape
    tok = tokenizer_for_program(program, out)
    objective = "mlm" if tok.cls_id is not None and tok.sep_id is not None else "clm"
    stream = PackedBatches(
        data,
        tok,
        seq_len=int(s),
        batch_size=int(b),
        objective=objective,
        shuffle=False,
        text_key=text_key,
        val_fraction=val_fraction,
    )
    config = program.meta.get("config") or {}
    vocab = config.get("vocab_size") or program.meta.get("vocab_size")
    framing = max((i for ids in document_frame(tok, objective) for i in ids), default=0)  # ids every document brings
    sets = []
    for ids in islice(stream, batches):
        top = max(int(ids.max()), framing)
        if vocab is not None and top >= vocab:
            source = "bytes (the program has no tokenizer)" if isinstance(tok, ByteTokenizer) else tok.name
            raise UsageError(
                f"calibration text tokenized with {source} gives id {top}, but the model's vocab size is {vocab}",
                "calibrate a model with its own tokenizer.json, or give input tensors instead",
            )
        row = []
        for name, x in zip(names, examples):
            if name == names[k]:
                row.append(ids.to(ref.dtype))
            elif name == "attention_mask" and isinstance(x, torch.Tensor):
                row.append(torch.ones(b, s, dtype=x.dtype) if x.dim() == 2 else torch.ones_like(x))
            elif name == "token_type_ids" and isinstance(x, torch.Tensor):
                row.append(torch.zeros(b, s, dtype=x.dtype))
            elif name == "position_ids" and isinstance(x, torch.Tensor):
                row.append(torch.arange(s, dtype=x.dtype).expand(x.shape[0] if x.shape[0] == 1 else b, s).clone())
            else:
                row.append(x)
        sets.append(tuple(row))
    return sets


# -- what `optpipe train` uses ---------------------------------------------------------------------
def input_builder(program) -> Callable[[torch.Tensor | dict], tuple]:
    """The function from a batch to `program`'s positional inputs: what trainers feed the program.
    A batch is a dict of named tensors (an input the program takes by that name is fed as it is) or
    just the input_ids; inputs the batch does not hold are built from the ids (an attention mask of
    ones, token types of zeros, positions 0..T-1)."""
    names = [n.lower() for n in program.input_names]
    if not names or ("ids" not in names[0] and "input" not in names[0]):
        raise UsageError(
            f"train: the program's first input is {program.input_names[0]!r}, not token ids",
            "train language models whose first input is input_ids",
        )
    refs = program.example_inputs

    def build(batch: torch.Tensor | dict) -> tuple:
        given = batch if isinstance(batch, dict) else {}
        ids = given["input_ids"] if given else batch
        out = [ids]
        for name, raw, ref in zip(names[1:], program.input_names[1:], refs[1:]):
            if raw in given:
                out.append(given[raw].to(ref.dtype))
            elif "mask" in name:
                out.append(torch.ones(ids.shape, dtype=ref.dtype, device=ids.device))
            elif "type" in name:
                out.append(torch.zeros(ids.shape, dtype=ref.dtype, device=ids.device))
            elif "position" in name:
                out.append(torch.arange(ids.shape[1], device=ids.device).expand(ids.shape).to(ref.dtype))
            else:
                raise UsageError(
                    f"train: cannot build the program input {name!r} from token ids",
                    "train programs that take input_ids (and masks / token types); "
                    "encoder-decoder programs with --objective seq2seq",
                )
        return tuple(out)

    return build


def check_token_ids(top: int, vocab_size: int | None, tokenizer: TextTokenizer) -> None:
    """UsageError when the largest id the data gives, `top`, is outside the model's vocabulary (a
    tokenizer that does not fit the model)."""
    if vocab_size is not None and top >= vocab_size:
        source = "bytes (no tokenizer.json found)" if isinstance(tokenizer, ByteTokenizer) else tokenizer.name
        raise UsageError(
            f"the data tokenized with {source} gives id {top}, but the model's vocab size is {vocab_size}",
            "train with the model's own tokenizer.json next to it",
        )


class TrainingData:
    """The data of one training run: endless shuffled train batches, a fixed validation set, and a
    state to checkpoint. Batches are dicts `{"input_ids", "labels"}` of int64 `[batch, seq_len]`.

    `tokenizer`: a TextTokenizer, a tokenizer.json (or folder holding one), or None for bytes.
    `mask`/`mask_rate`: the mlm strategy and rate (`MaskingConfig`). `vocab_size`: the model's;
    ids at or above it are a UsageError (a tokenizer that does not fit the model).

    Train rows are drawn one by one, so `next_batch(n)` may change `n`; the state counts rows.
    mlm masks come from a generator seeded with `seed`, saved with the state; validation batches
    are masked once, with a generator of their own, so every evaluation sees the same masks."""

    def __init__(
        self,
        data,
        tokenizer=None,
        *,
        seq_len: int,
        objective: str = "clm",
        seed: int = 0,
        val_fraction: float = 0.05,
        mask: str = "random",
        mask_rate: float = 0.15,
        text_key: str = "text",
        vocab_size: int | None = None,
        shuffle_buffer: int = 1024,
    ):
        _check_objective(objective)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer, required=tokenizer is not None)
        self.data, self.tokenizer, self.seq_len, self.objective = data, tokenizer, seq_len, objective
        self.seed, self.val_fraction, self.text_key, self.vocab_size = seed, val_fraction, text_key, vocab_size
        self.masker = (
            TokenMasker(tokenizer, MaskingConfig(strategy=mask, rate=mask_rate), vocab_size=vocab_size)
            if objective == "mlm"
            else None
        )
        self._rows = PackedBatches(
            data,
            tokenizer,
            seq_len=seq_len,
            batch_size=1,
            objective=objective,
            val_fraction=val_fraction,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            text_key=text_key,
        )
        self._generator = torch.Generator().manual_seed(seed)
        self._framing = max((i for ids in document_frame(tokenizer, objective) for i in ids), default=-1)
        self._val: dict[int, tuple[int, list[dict]]] = {}  # batch size -> (batches asked, prepared batches)

    def _prepare(self, ids: torch.Tensor, generator: torch.Generator, masker: TokenMasker | None) -> dict:
        check_token_ids(max(int(ids.max()), self._framing), self.vocab_size, self.tokenizer)
        return prepare_batch(ids, self.objective, masker=masker, generator=generator)

    def next_batch(self, batch_size: int) -> dict:
        """The next `batch_size` training rows, prepared for the objective."""
        ids = torch.cat([next(self._rows) for _ in range(batch_size)])
        return self._prepare(ids, self._generator, self.masker)

    def validation_batches(self, batches: int, batch_size: int) -> list[dict]:
        """The first `batches` batches of the validation split, prepared (and for mlm masked) the
        same way every time; [] when there is no validation split (val_fraction 0, or too little
        text in it for one row)."""
        if self.val_fraction == 0:
            return []
        asked, cached = self._val.get(batch_size, (0, []))
        if asked < batches:  # built for fewer batches (or never): build the longer list, same prefix
            try:
                ids = validation_batches(
                    self.data,
                    self.tokenizer,
                    seq_len=self.seq_len,
                    batch_size=batch_size,
                    batches=batches,
                    val_fraction=self.val_fraction,
                    objective=self.objective,
                    text_key=self.text_key,
                )
            except UsageError as e:
                if "split" not in e.message:  # a missing file or bad JSONL is still an error
                    raise
                ids = []
            g = torch.Generator().manual_seed(self.seed + 1)
            # a masker of its own: frequency counts of validation text stay out of training's state
            masker = (
                None
                if self.masker is None
                else TokenMasker(self.tokenizer, self.masker.config, vocab_size=self.vocab_size)
            )
            cached = [self._prepare(x, g, masker) for x in ids]
            self._val[batch_size] = (batches, cached)
        return cached[:batches]

    def state_dict(self) -> dict:
        """Rows consumed, the masking generator and the frequency counts: what a checkpoint needs
        for a resumed run to see the batches an uninterrupted one would (torch.save-able with
        weights_only loading)."""
        state = {"rows": self._rows.state_dict(), "generator": self._generator.get_state()}
        if self.masker is not None:
            state["masker"] = self.masker.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._rows.load_state_dict(state["rows"])
        self._generator.set_state(state["generator"])
        if self.masker is not None and "masker" in state:
            self.masker.load_state_dict(state["masker"])
