"""Quality on real data and cost on the target: what `optpipe eval` reports and `optpipe tune` judges.

```
 data ──split (train's)──▶ held-out documents ──tokenize, frame──▶ ids ──windows / rows──▶ EvalSet
 EvalSet ──fn (the program on its target)──▶ logits / hidden ──score──▶ quality (vs a Reference)
 fn on [batch, seq_len] ──timed──▶ cost (latency p50/p90, tokens/s, peak memory, size)
```

Tasks (`detect_task`), from the program's metadata and its output shape:
- `clm` (causal LM): perplexity = exp(token-weighted mean NLL) over the held-out split with Hugging
  Face's strided sliding window: the split's documents are framed as `train` frames them
  (`doc + [eos]`) and concatenated into one stream; windows of `seq_len` tokens start every
  `stride` tokens; the first window scores all its tokens but the first, each later one only the
  tokens no earlier window scored (its last `stride`), each conditioned on the whole window before
  it. Only full windows are scored (a program may take one fixed length), so the stream's tail
  after the last full window is dropped. With `stride == seq_len` the windows are exactly the
  rows `train` validates on, and ppl == exp(train's val_loss) on them.
- `mlm` (masked LM head, not causal): accuracy and perplexity at the positions a seeded
  `TokenMasker` picks (BERT's 80/10/10), over rows packed as `train --objective mlm` packs them;
  the masks are those of train's validation for the same seed and batch size.
- `embedding` (hidden states `[B, T, H]`, or pooled `[B, H]`): the cosine of the attention-mask
  weighted mean-pooled embedding to the reference's, averaged over sequences; without a reference
  there is nothing to compare, so only cost is reported.

Against a reference (`reference_outputs`, run once, then reused for every candidate): `top1_agreement`
(share of scored positions where the argmax equals the reference's) and `kl` (mean over scored
tokens of KL(reference ‖ model), in nats).

The split is `optpipe.runtime.data.split_of`, the one `train` uses: a document `train` trained on is
never scored. `val_fraction=0` scores every document of the data (for a model never trained here).

Example::

    prog = optpipe.load("gpt2-folder")
    ev = eval_set(prog, "corpus.txt", seq_len=128, stride=64, max_tokens=4096)
    ref = reference_outputs(prog.gm, ev)
    quality = score(compiled, ev, ref)      # {"ppl", "nll", "tokens", "top1_agreement", "kl", "ref_ppl"}
    cost = measure_cost(compiled, prog, batch=1, seq_len=128)
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..analysis import model_bytes
from ..errors import UsageError
from ..inputs import check_inputs, token_vocab
from ..losses import IGNORE_INDEX
from .data import (
    ByteTokenizer,
    MaskingConfig,
    TextTokenizer,
    TokenMasker,
    document_frame,
    input_builder,
    iter_documents,
    load_tokenizer,
    pack_sequences,
    split_of,
    tokenizer_for_program,
)

TASKS = ("clm", "mlm", "embedding")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_MASKED_SUFFIXES = ("ForMaskedLM", "ForPreTraining")
_SHORT_HINT = "give more text, raise --val-fraction, or lower --seq-len"


# -- the task -------------------------------------------------------------------------------------
def detect_task(program) -> str:
    """ "clm", "mlm" or "embedding": what `program`'s first output can be scored as.

    Logits over the vocabulary (last dim == vocab size) are `clm` when the model is causal (its
    config says `is_decoder`, its class is a *ForCausalLM / *LMHeadModel, or its model type is a
    decoder-only one), `mlm` when it is a masked-LM head (*ForMaskedLM, an encoder model type);
    without such metadata the graph is probed: logits that do not change before a changed last
    token are causal. Any other `[B, T, H]` (or pooled `[B, H]`) float output is an `embedding`.
    Raises UsageError for an output it cannot score."""
    if program.meta.get("kv_cache"):
        raise UsageError(
            "eval: this is a kv-cache step program (generation only)",
            "evaluate the program from before the kv-cache pass",
        )
    shape = _output_shape(program)
    if shape is None or len(shape) not in (2, 3):
        raise UsageError(
            f"eval: the program's first output is {'unknown' if shape is None else list(shape)}, "
            "not logits [batch, seq, vocab] or hidden states [batch, seq, hidden]",
            "evaluate language models or encoders whose first output is logits or hidden states",
        )
    vocab = program_vocab(program)
    if len(shape) == 3 and vocab is not None and int(shape[-1]) == vocab:
        causal = _declared_causal(program)
        if causal is None:
            causal = _probe_causal(program)
        return "clm" if causal else "mlm"
    return "embedding"


def program_vocab(program) -> int | None:
    """The model's vocabulary size: its config's, its metadata's, else its embedding's rows."""
    config = program.meta.get("config") or {}
    return config.get("vocab_size") or program.meta.get("vocab_size") or token_vocab(program)


def _output_shape(program) -> tuple | None:
    out = program.gm.graph.output_node().args[0]
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    val = out.meta.get("val") if isinstance(out, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _declared_causal(program) -> bool | None:
    """True/False when the metadata says whether the LM is causal; None when it does not."""
    config = program.meta.get("config") or {}
    cls = str(program.meta.get("model_class") or "")
    if config.get("is_decoder") or cls.endswith(_CAUSAL_SUFFIXES):
        return True
    if cls.endswith(_MASKED_SUFFIXES):
        return False
    model_type = config.get("model_type")
    if not model_type:
        return None
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
    except ImportError:
        return None
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    return True if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else None


@torch.no_grad()
def _probe_causal(program) -> bool:
    """Whether the logits before the last position ignore the last token (a causal mask)."""
    build = input_builder(program)
    ids = program.example_inputs[0]
    if ids.shape[-1] < 2:
        return True
    vocab = program_vocab(program) or 2
    changed = ids.clone()
    changed[..., -1] = (changed[..., -1] + 1) % vocab
    a, b = (first_tensor(program.gm(*build(x))) for x in (ids, changed))
    return bool(torch.allclose(a[:, :-1], b[:, :-1], atol=1e-5, rtol=1e-4))


def first_tensor(out) -> torch.Tensor:
    """The logits / hidden states of a model output: the output itself, the first element of a
    tuple or list, or the first value of a dict / Hugging Face ModelOutput (what optpipe captures
    as `outputs[0]`)."""
    while not isinstance(out, torch.Tensor):
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        elif isinstance(out, Mapping) and out:
            out = next(iter(out.values()))
        else:
            raise UsageError(f"eval: the model returned {type(out).__name__}, not a tensor", "return logits first")
    return out


# -- the data -------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """Fixed, deterministic eval data for one program.

    `batches`: dicts with `ids` (int64 `[batch, seq_len]`, what the model is fed: masked for mlm),
    `inputs` (the program's positional input tuple built from `ids`), `labels` (int64 `[batch,
    seq_len]`: at position t, the id the logits at t must predict; -100 where nothing is scored;
    clm labels are already shifted) and `weights` (float `[batch, seq_len]`: the pooling weights
    of an embedding; 0 in padding rows). A short last batch is padded to `batch` rows with
    copies that score nothing, so every call has the same shape.
    `tokens`: the positions scored (clm/mlm), or the tokens pooled (embedding)."""

    task: str
    batches: list
    seq_len: int
    stride: int
    batch: int
    tokens: int
    description: dict = field(default_factory=dict)


def eval_set(
    program,
    data,
    *,
    tokenizer=None,
    seq_len: int | None = None,
    stride: int | None = None,
    batch: int = 1,
    max_tokens: int | None = None,
    val_fraction: float = 0.05,
    mask_rate: float = 0.15,
    seed: int = 0,
    text_key: str = "text",
    split: str = "val",
    task: str | None = None,
    out: str | os.PathLike | None = None,
) -> EvalSet:
    """The eval data of `program` from text/JSONL `data`, on `split` ("val": train's validation
    split for this `val_fraction`; "train"; `val_fraction=0`: every document).

    `tokenizer`: a TextTokenizer, a tokenizer.json (or folder), or None for the program's own
    (`out`/tokenizer.json, its source's, else bytes). `seq_len`: window/row length (default: the
    program's example length). `stride` (clm only; default seq_len): the step between windows.
    `max_tokens`: stop once this many positions are scored (None: the whole split). `task`:
    override `detect_task`. Raises UsageError for ids beyond the vocabulary (naming the
    tokenizer), too little text for one window, or a length the program does not take."""
    task = task or detect_task(program)
    if task not in TASKS:
        raise UsageError(f"eval: unknown task {task!r}", f"use one of {', '.join(TASKS)}")
    tok = _resolve_tokenizer(program, tokenizer, out)
    seq_len = int(seq_len or program.example_inputs[0].shape[-1])
    stride = int(stride or seq_len) if task == "clm" else seq_len
    if seq_len < 2 or batch < 1 or not 1 <= stride <= seq_len:
        raise UsageError(
            f"eval: need seq_len >= 2, batch >= 1 and 1 <= stride <= seq_len (got {seq_len}, {batch}, {stride})",
            "e.g. --seq-len 128 --stride 64",
        )
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1) (got {val_fraction})", "e.g. --val-fraction 0.05")
    docs = _Documents(data, split, val_fraction, text_key)
    vocab = program_vocab(program)
    if task == "clm":
        rows, labels = _clm_windows(docs, tok, seq_len, stride, max_tokens, vocab)
    else:
        rows, labels = _packed_rows(docs, tok, seq_len, task, max_tokens, vocab, mask_rate, seed, batch)
    if not docs.count:
        raise UsageError(
            f"eval: no document of the data falls in the {split} split (val_fraction={val_fraction})",
            "give more documents (blank-line separated), raise --val-fraction, or --val-fraction 0 to score all",
        )
    if not rows:
        raise UsageError(
            f"eval: the {_split_name(split, val_fraction)} split of the data holds fewer than seq_len={seq_len} tokens",
            _SHORT_HINT,
        )
    batches = _batched(program, rows, labels, batch, task)
    scored = int(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches))
    if task == "embedding":
        scored = int(sum(float(b["weights"].sum()) for b in batches))
    description = {
        "files": [str(data)] if isinstance(data, (str, os.PathLike)) else [str(d) for d in data],
        "split": _split_name(split, val_fraction),
        "val_fraction": val_fraction,
        "documents": docs.count,
        "windows": len(rows),
        "tokens": scored,
        "seq_len": seq_len,
        "stride": stride,
        "batch": batch,
        "tokenizer": tok.name if not isinstance(tok, ByteTokenizer) else "bytes",
        "seed": seed,
    }
    if task == "mlm":
        description["mask_rate"] = mask_rate
    return EvalSet(task, batches, seq_len, stride, batch, scored, description)


def _resolve_tokenizer(program, tokenizer, out) -> TextTokenizer:
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer, required=True)
    return tokenizer_for_program(program, out)


def _split_name(split: str, val_fraction: float) -> str:
    return "all" if val_fraction == 0 else split


class _Documents:
    """The documents of one side of the split, streamed, counted as they go."""

    def __init__(self, data, split: str, val_fraction: float, text_key: str):
        if split not in ("train", "val"):
            raise UsageError(f"unknown split {split!r}", "use train or val")
        self.data, self.split, self.val_fraction, self.text_key = data, split, val_fraction, text_key
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in iter_documents(self.data, text_key=self.text_key):
            if self.val_fraction == 0 or split_of(text, self.val_fraction) == self.split:
                self.count += 1
                yield text


def _framed_ids(docs, tok: TextTokenizer, objective: str, vocab: int | None) -> Iterator[list[int]]:
    """`prefix + ids + suffix` per document, each checked against the model's vocabulary."""
    prefix, suffix = document_frame(tok, objective)
    for text in docs:
        ids = prefix + tok.encode(text) + suffix
        top = max(ids, default=-1)
        if vocab is not None and top >= vocab:
            source = "bytes (no tokenizer.json found)" if isinstance(tok, ByteTokenizer) else tok.name
            raise UsageError(
                f"eval: the data tokenized with {source} gives id {top}, but the model's vocab size is {vocab}",
                "evaluate a model with its own tokenizer.json next to it (or give --tokenizer)",
            )
        yield ids


def _clm_windows(docs, tok, seq_len: int, stride: int, max_tokens, vocab) -> tuple[list, list]:
    """Hugging Face's strided windows over the concatenated stream: (window ids, shifted labels)."""
    stream: list[int] = []
    source = _framed_ids(docs, tok, "clm", vocab)
    rows, labels, scored, prev_end, begin = [], [], 0, 0, 0
    while max_tokens is None or scored < max_tokens:
        end = begin + seq_len
        while len(stream) < end:
            more = next(source, None)
            if more is None:
                return rows, labels
            stream.extend(more)
        ids = torch.tensor(stream[begin:end], dtype=torch.long)
        new = end - prev_end  # positions no earlier window scored: the last `new` of this one
        target = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
        first = max(seq_len - new, 1)  # position 0 has no context in its window
        target[first - 1 : seq_len - 1] = ids[first:]  # logits at t predict ids[t + 1]
        rows.append(ids)
        labels.append(target)
        scored += seq_len - first
        prev_end, begin = end, begin + stride
    return rows, labels


def _packed_rows(docs, tok, seq_len, task, max_tokens, vocab, mask_rate, seed, batch) -> tuple[list, list]:
    """Rows packed as `train` packs them; for mlm, masked batch by batch as train's validation."""
    objective = "mlm" if task == "mlm" or (tok.cls_id is not None and tok.sep_id is not None) else "clm"
    if task == "mlm" and tok.mask_id is None:
        raise UsageError(f"eval: the tokenizer {tok.name} has no mask token", "evaluate an mlm with its tokenizer")
    raw, rows, labels, scored = [], [], [], 0
    masker = g = None
    if task == "mlm":
        masker = TokenMasker(tok, MaskingConfig(rate=mask_rate), vocab_size=vocab)
        g = torch.Generator().manual_seed(seed + 1)  # the generator train's validation masks with
    for row in pack_sequences(_framed_ids(docs, tok, objective, vocab), seq_len):
        raw.append(torch.tensor(row, dtype=torch.long))
        if len(raw) < batch:
            continue
        scored += _flush(raw, rows, labels, masker, g)
        raw = []
        if max_tokens is not None and scored >= max_tokens:
            return rows, labels
    if raw:
        _flush(raw, rows, labels, masker, g)
    return rows, labels


def _flush(raw: list, rows: list, labels: list, masker, g) -> int:
    ids = torch.stack(raw)
    if masker is None:
        rows.extend(ids)
        labels.extend(torch.full_like(ids, IGNORE_INDEX))
        return ids.numel()
    masked = masker(ids, g)
    rows.extend(masked["input_ids"])
    labels.extend(masked["labels"])
    return int((masked["labels"] != IGNORE_INDEX).sum())


def _batched(program, rows: list, labels: list, batch: int, task: str) -> list[dict]:
    build = input_builder(program)
    out = []
    for i in range(0, len(rows), batch):
        ids, lab = torch.stack(rows[i : i + batch]), torch.stack(labels[i : i + batch])
        weights = torch.ones(ids.shape, dtype=torch.float32)
        if len(ids) < batch:  # pad with copies of the last row that score nothing
            pad = batch - len(ids)
            ids = torch.cat([ids, ids[-1:].expand(pad, -1)])
            lab = torch.cat([lab, torch.full((pad, lab.shape[1]), IGNORE_INDEX, dtype=lab.dtype)])
            weights[-pad:] = 0.0
        inputs = build(ids)
        if i == 0:
            check_inputs(program, inputs, where="eval --data")
        out.append({"ids": ids, "inputs": inputs, "labels": lab, "weights": weights})
    return out


# -- running and scoring --------------------------------------------------------------------------
@dataclass
class Reference:
    """What `score` needs of the reference, per batch of an EvalSet: argmax ids and (with kl)
    log-probs at the scored positions (clm/mlm), or pooled embeddings (embedding)."""

    task: str
    tokens: int
    argmax: list = field(default_factory=list)
    logprobs: list | None = None
    pooled: list = field(default_factory=list)
    nll: float | None = None


def _outputs(fn, evset: EvalSet, *, prepare=None, inputs_for=None, progress=None, label="scoring") -> Iterator[tuple]:
    """(batch, first output, where `fn` put it) for each batch of `evset`."""
    for i, b in enumerate(evset.batches):
        inputs = inputs_for(b["ids"]) if inputs_for is not None else b["inputs"]
        if prepare is not None:
            inputs = prepare(inputs)
        with torch.no_grad():
            out = first_tensor(fn(*inputs))
        yield b, out.detach()
        if progress is not None:
            progress(f"{label}: batch {i + 1}/{len(evset.batches)}")


def _scored(b: dict, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [n, vocab], target ids [n]) at the scored positions of one batch."""
    sel = b["labels"] != IGNORE_INDEX
    return F.log_softmax(out[sel.to(out.device)].float(), dim=-1).cpu(), b["labels"][sel]


def _pooled(b: dict, out: torch.Tensor) -> torch.Tensor:
    """Attention-mask weighted mean over tokens ([B, H]); a pooled output is taken as it is."""
    out = out.float().cpu()
    if out.dim() == 2:
        return out
    w = b["weights"]  # the attention mask is all ones (packed text: every position is a real token)
    return (out * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-9)


def reference_outputs(
    fn, evset: EvalSet, *, kl: bool = True, prepare=None, inputs_for=None, progress=None
) -> Reference:
    """Run the reference `fn` over `evset` once and keep only what `score` needs: argmax ids (and,
    with `kl`, log-probs, tokens × vocab floats) at the scored positions, or pooled embeddings.

    `prepare`: applied to each input tuple before the call (a target's `prepare_inputs`).
    `inputs_for`: ids -> input tuple, for a reference that takes other inputs than the program.
    `progress(message)` is called after each batch ("reference: batch 3/10")."""
    ref = Reference(evset.task, evset.tokens, logprobs=[] if kl else None)
    nll = 0.0
    for b, out in _outputs(fn, evset, prepare=prepare, inputs_for=inputs_for, progress=progress, label="reference"):
        if evset.task == "embedding":
            ref.pooled.append(_pooled(b, out))
            continue
        lp, target = _scored(b, out)
        nll -= float(lp.gather(1, target[:, None]).sum(dtype=torch.float64))
        ref.argmax.append(lp.argmax(-1))
        if kl:
            ref.logprobs.append(lp)
    if evset.task != "embedding":
        ref.nll = nll / max(evset.tokens, 1)
    return ref


def score(
    fn, evset: EvalSet, reference: Reference | None = None, progress=None, *, prepare=None, inputs_for=None
) -> dict:
    """The `quality` dict of `fn` on `evset` (see the module docstring for each task's keys).

    clm: `ppl`, `nll` (mean nats per scored token), `tokens`; mlm: also `mlm_accuracy`; with a
    reference: `top1_agreement`, `kl` (None when the reference kept no log-probs), `ref_ppl`.
    embedding: `cosine` (None with a `note` when there is no reference), `sequences`.
    `progress(message)` is called after each batch ("scoring: batch 3/10")."""
    if reference is not None and (reference.task != evset.task or reference.tokens != evset.tokens):
        raise UsageError(
            f"eval: the reference was computed on other data ({reference.task}, {reference.tokens} tokens; "
            f"now {evset.task}, {evset.tokens})",
            "compute reference_outputs on the same EvalSet",
        )
    if evset.task == "embedding":
        return _score_embedding(fn, evset, reference, progress, prepare, inputs_for)
    nll, correct, agree, kl = 0.0, 0, 0, 0.0
    for i, (b, out) in enumerate(_outputs(fn, evset, prepare=prepare, inputs_for=inputs_for, progress=progress)):
        lp, target = _scored(b, out)
        nll -= float(lp.gather(1, target[:, None]).sum(dtype=torch.float64))
        top = lp.argmax(-1)
        correct += int((top == target).sum())
        if reference is not None:
            agree += int((top == reference.argmax[i]).sum())
            if reference.logprobs is not None:
                ref_lp = reference.logprobs[i]
                kl += float((ref_lp.exp() * (ref_lp - lp)).sum(dtype=torch.float64))
    n = max(evset.tokens, 1)
    quality = {"task": evset.task, "ppl": _exp(nll / n), "nll": nll / n, "tokens": evset.tokens}
    if evset.task == "mlm":
        quality["mlm_accuracy"] = correct / n
    if reference is not None:
        quality["top1_agreement"] = agree / n
        # KL >= 0; a match up to rounding can sum to -1e-10
        quality["kl"] = max(kl / n, 0.0) if reference.logprobs is not None else None
        quality["ref_ppl"] = _exp(reference.nll)
    return quality


def _score_embedding(fn, evset, reference, progress, prepare, inputs_for) -> dict:
    if reference is None:
        for _ in _outputs(fn, evset, prepare=prepare, inputs_for=inputs_for, progress=progress):
            pass  # still run it: a program that fails on the data fails here, not silently
        return {
            "task": "embedding",
            "cosine": None,
            "tokens": evset.tokens,
            "note": "an embedding model is judged against a reference; give --reference MODEL",
        }
    total, count = 0.0, 0
    for i, (b, out) in enumerate(_outputs(fn, evset, prepare=prepare, inputs_for=inputs_for, progress=progress)):
        real = b["weights"][:, 0] > 0
        cos = F.cosine_similarity(_pooled(b, out).double(), reference.pooled[i].double(), dim=-1)
        total += float(cos[real].sum())
        count += int(real.sum())
    return {"task": "embedding", "cosine": total / max(count, 1), "sequences": count, "tokens": evset.tokens}


def _exp(nll: float | None) -> float | None:
    return None if nll is None else math.exp(min(nll, 700.0))


# -- cost -----------------------------------------------------------------------------------------
def measure_cost(
    fn,
    program,
    *,
    batch: int,
    seq_len: int,
    iters: int = 20,
    warmup: int = 3,
    size_bytes: int | None = None,
    prepare=None,
    seed: int = 0,
) -> dict:
    """The `cost` dict of `fn` on a `[batch, seq_len]` input built by `input_builder(program)`
    (random ids within the vocabulary), under `torch.no_grad`, after `warmup` calls:

    `latency_ms_p50` / `latency_ms_p90` over `iters` timed calls (CUDA synchronised), `tokens_per_s`
    = batch * seq_len / p50; `peak_mem_mb`: on CUDA, `torch.cuda.max_memory_allocated()` over one
    call after `reset_peak_memory_stats()` (the weights and everything else allocated included); on
    the CPU, the peak of torch's allocations live during one call, beyond those live before it (the
    allocator events of `torch.profiler` with memory profiling: activations and workspaces, not the
    weights; memory other libraries allocate, e.g. ONNX Runtime's or TVM's own arenas, is not seen
    and reads as 0). `size_mb`: `size_bytes` (an OUT's files on disk,
    see `artifact_bytes`) or else the bytes of the program's parameters and buffers (`model_bytes`).
    `prepare`: applied to the inputs once (a target's `prepare_inputs`)."""
    vocab = program_vocab(program) or 2
    ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    inputs = input_builder(program)(ids)
    if prepare is not None:
        inputs = prepare(inputs)
    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(max(warmup, 0)):
            fn(*inputs)
        sync()
        for _ in range(max(iters, 1)):
            start = time.perf_counter()
            fn(*inputs)
            sync()
            times.append((time.perf_counter() - start) * 1000.0)
        peak = _cuda_peak_bytes(fn, inputs) if cuda else _cpu_peak_bytes(fn, inputs)
    p50 = statistics.median(times)
    p90 = _percentile(times, 0.9)
    size = size_bytes if size_bytes is not None else model_bytes(program.gm)
    return {
        "latency_ms_p50": round(p50, 4),
        "latency_ms_p90": round(p90, 4),
        "tokens_per_s": round(batch * seq_len / (p50 / 1000.0), 2) if p50 > 0 else None,
        "peak_mem_mb": round(peak / 2**20, 3),
        "size_mb": round(size / 2**20, 3),
        "batch": batch,
        "seq_len": seq_len,
        "iters": max(iters, 1),
    }


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _cuda_peak_bytes(fn, inputs) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn(*inputs)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def _cpu_peak_bytes(fn, inputs) -> int:
    """Peak of torch's CPU allocations live during one call, beyond those live before it, at op
    granularity: each op's own net allocation (`self_cpu_memory_usage`) at its start, and the frees
    outside any op (profiler `[memory]` events), summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # else kineto prints profiler_start/stop lines on stderr
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*inputs)
    deltas = []
    for e in prof.events():
        amount = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if amount:
            deltas.append((e.time_range.start, amount))
    live = peak = 0
    for _, amount in sorted(deltas, key=lambda d: d[0]):
        live += amount
        peak = max(peak, live)
    return int(peak)


def artifact_bytes(out: str | os.PathLike, target_artifact: str | None = None) -> int:
    """Bytes on disk of an OUT's deployable files: program.pt2 and the target's artifact (a file
    or a folder)."""
    total = 0
    for name in ("program.pt2", target_artifact):
        if not name:
            continue
        path = os.path.join(out, name)
        if os.path.isfile(path):
            total += os.path.getsize(path)
        elif os.path.isdir(path):
            total += sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    return total


# -- the whole eval -------------------------------------------------------------------------------
def evaluate(
    model_or_out,
    data,
    *,
    reference=None,
    target: str | None = None,
    seq_len: int | None = None,
    stride: int | None = None,
    batch: int = 1,
    max_tokens: int | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    mask_rate: float = 0.15,
    latency_iters: int = 20,
    progress=None,
    trust_pickle: bool = False,
    text_key: str = "text",
    tokenizer=None,
) -> dict:
    """The `optpipe eval --json` document: `{"quality", "cost", "target", "data"}`.

    `model_or_out`: an OUT folder (its program on its own target), any MODEL form (captured as
    `optimize` does, run eagerly on `target`, default cpu) or a Program. `reference`: a MODEL, OUT
    or Program to compare with; by default for an OUT, the model it was optimized from (report.json
    `model.source`) when that still loads (else none, with a note in `quality`).
    `progress(message)`: called at each step and after each batch ("scoring: batch 3/10")."""
    say = progress or (lambda message: None)
    say(f"loading {_name(model_or_out)}")
    run = load_runner(model_or_out, target=target, trust_pickle=trust_pickle)
    say("reading the data")
    evset = eval_set(
        run.program,
        data,
        tokenizer=tokenizer,
        seq_len=seq_len,
        stride=stride,
        batch=batch,
        max_tokens=max_tokens,
        val_fraction=val_fraction,
        mask_rate=mask_rate,
        seed=seed,
        text_key=text_key,
        out=run.folder,
    )
    ref, ref_name, note = _reference_for(run, reference, evset, trust_pickle, progress)
    quality = score(run.fn, evset, ref, progress, prepare=run.prepare)
    quality.update(model=run.name, reference=ref_name)
    if note and not quality.get("note"):
        quality["note"] = note
    say("timing")
    cost = measure_cost(
        run.fn,
        run.program,
        batch=batch,
        seq_len=evset.seq_len,
        iters=latency_iters,
        size_bytes=run.size_bytes,
        prepare=run.prepare,
        seed=seed,
    )
    return {"quality": quality, "cost": cost, "target": run.target, "data": evset.description}


def _reference_for(run, reference, evset, trust_pickle, progress) -> tuple:
    """(Reference or None, its name, a note when an OUT's default reference is missing)."""
    spec = reference if reference is not None else run.default_reference()
    if spec is None:
        if run.folder is None:
            return None, None, None
        return None, None, "no reference: no report.json names the model this OUT came from; give --reference"
    if progress is not None:
        progress(f"loading the reference {_name(spec)}")
    ref_run = load_runner(spec, trust_pickle=trust_pickle, quiet=reference is None)
    if ref_run is None:
        return None, None, f"no reference: {_name(spec)} does not load"
    if reference is None and not shares_weights(run.program, ref_run.program):
        return (
            None,
            None,
            (
                f"no reference: the weights of {_name(spec)} (report.json's source) differ from the untouched "
                "ones of this program (trained after capture?); give --reference"
            ),
        )
    inputs_for = input_builder(ref_run.program)
    ref = reference_outputs(ref_run.fn, evset, prepare=ref_run.prepare, inputs_for=inputs_for, progress=progress)
    return ref, ref_run.name, None


def shares_weights(program, source) -> bool:
    """Whether `program` could have been optimized from `source`: every parameter or buffer with the
    same name, shape and dtype in both is equal (passes replace the weights they rewrite; training
    changes them all), and there is at least one such."""
    mine = dict(program.gm.named_parameters()) | dict(program.gm.named_buffers())
    theirs = dict(source.gm.named_parameters()) | dict(source.gm.named_buffers())
    common = [n for n, t in mine.items() if n in theirs and t.shape == theirs[n].shape and t.dtype == theirs[n].dtype]
    return bool(common) and all(torch.equal(mine[n], theirs[n]) for n in common)


@dataclass
class Runner:
    """A program ready to run: `fn(*prepare(inputs))` on its target."""

    program: object
    fn: Callable
    prepare: Callable | None
    target: str
    name: str
    folder: str | None = None
    size_bytes: int | None = None

    def default_reference(self) -> str | None:
        """report.json's `model.source` of an OUT folder, when that path exists."""
        if self.folder is None:
            return None
        try:
            with open(os.path.join(self.folder, "report.json"), encoding="utf-8") as f:
                source = (json.load(f).get("model") or {}).get("source")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(source, str) and (os.path.exists(source) or ":" in source):
            return source
        return None


def load_runner(spec, *, target: str | None = None, trust_pickle: bool = False, quiet: bool = False) -> Runner | None:
    """A Runner for an OUT folder (on its own target) or a MODEL path/spec or a Program (eager on
    `target`, default cpu). `quiet`: None instead of raising when `spec` does not load (a default
    reference)."""
    from ..loading import load_model, load_out
    from ..program import Program
    from ..registry import get_target
    from ..target import load_compiled

    try:
        if isinstance(spec, (str, os.PathLike)) and os.path.isfile(os.path.join(spec, "program.pt2")):
            program, name = load_out(os.fspath(spec))
            if target not in (None, name):
                raise UsageError(
                    f"eval: {spec} was compiled for {name}; --target applies to a MODEL",
                    f"drop --target, or optimize the model for {target} first",
                )
            tgt = get_target(name)
            tgt.available()
            compiled = load_compiled(tgt, os.fspath(spec), program)
            size = artifact_bytes(spec, tgt.artifact)
            return Runner(program, compiled, tgt.prepare_inputs, name, str(spec), os.fspath(spec), size)
        if not isinstance(spec, (Program, str, os.PathLike)):
            raise UsageError(
                f"eval: give a Program, an OUT folder or a MODEL path, not a {type(spec).__name__}",
                "capture a module first: optpipe.capture(model, inputs)",
            )
        program = spec if isinstance(spec, Program) else load_model(os.fspath(spec), trust_pickle=trust_pickle)
    except UsageError:
        if quiet:
            return None
        raise
    name = target or "cpu"
    if name == "cpu":
        return Runner(program, program.gm, None, "cpu", _name(spec))
    tgt = get_target(name)
    tgt.available()
    compiled = tgt.compile(program, mode="eager") if name == "cuda" else tgt.compile(program)
    return Runner(program, compiled, tgt.prepare_inputs, name, _name(spec))


def _name(spec) -> str:
    return str(spec) if isinstance(spec, (str, os.PathLike)) else (spec.meta.get("source") or "program")
