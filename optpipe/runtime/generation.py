"""Generation from step programs (made by the `kv-cache` pass) and from plain causal LMs.

A step program takes `(input_ids [B,T], position_ids [B,T], cache_position [T], key_mask [B,L],
*caches)` and returns `(logits [B,T,V], *caches)`; `program.meta["kv_cache"]` describes its caches
(`layers[i]["caches"]`: name, shape with None for the batch, dtype) and `max_len`. Dense layers
attend over the first L cache slots only, so the runner passes the mask of the slots filled so far
(`key_mask[:, :last slot + 1]`, a view of one [B, max_len] buffer): a decode step's cost grows
with the context, not with max_len. This module
builds those inputs, runs prefill and decode steps, samples, and does speculative decoding. It
needs only the step callable, so the same loop drives the torch program, ONNX Runtime and TVM.

    result = generate(program, [[1, 2, 3], [4, 5]], max_new_tokens=32)            # greedy
    result = generate(program, prompts, 32, sampling=Sampling(temperature=0.8, top_p=0.9, seed=0))
    result = generate(program, prompts, 32, draft=small_program, draft_tokens=4)   # speculative

An encoder-decoder (T5, BART) generates from the prompts as the encoder's input: without a cache
every token runs encoder and decoder over the whole prefix; its kv-cache form runs the encoder
program once (`program.companions`) and one decoder step per token, the encoder's states passed
to every step (`optpipe.kv_step`).

Batches of prompts of different lengths are left-padded: pad slots are masked out of every key set
(`key_mask`), and positions count from each prompt's own first token, so every row gets the tokens
it would get alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..kv_step import empty_caches, encoder_states, filled, prefill


# -- sampling ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """Decoding rule. temperature 0 is greedy (the default); top_k 0 and top_p 1 switch those off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}", "0 means greedy decoding")
        if self.top_k < 0:
            raise UsageError(f"top-k must be >= 0, got {self.top_k}", "0 switches top-k off")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top-p must be in (0, 1], got {self.top_p}", "1 switches top-p off")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.top_k == 0 and self.top_p == 1.0

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g

    def choose(self, logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Next token per row from logits [B, V]."""
        if self.greedy:
            return logits.argmax(-1)
        logits = logits.float() / (self.temperature or 1.0)
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > self.top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1).cpu(), 1, generator=g).squeeze(-1).to(logits.device)


# -- generation -------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    ids: list[list[int]]
    """Prompt and new tokens, per row (no padding)."""
    new_ids: list[list[int]]
    seconds: float
    prefill_seconds: float = 0.0
    steps: int = 0
    """Calls of the (target) program after the prefill."""
    accepted: int | None = None
    """Speculative decoding: draft tokens the target accepted (of `proposed`)."""
    proposed: int | None = None
    text: list[str] | None = None

    @property
    def new_tokens(self) -> int:
        return sum(len(r) for r in self.new_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    def to_dict(self) -> dict:
        out = {
            "ids": self.ids,
            "new_ids": self.new_ids,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "seconds": round(self.seconds, 6),
        }
        if self.text is not None:
            out["text"] = self.text
        if self.proposed is not None:
            out["speculative"] = {
                "accepted": self.accepted,
                "proposed": self.proposed,
                "acceptance_rate": round(self.acceptance_rate or 0.0, 4),
                "target_steps": self.steps,
            }
        return out


def step_function(program) -> Callable:
    """The torch program's step callable (no autograd)."""

    def step(*inputs):
        with torch.no_grad():
            return program.gm(*inputs)

    return step


def target_step_function(target, compiled) -> Callable:
    """The step callable of a program compiled for a target (`Target.load`'s result): the target's
    own input preparation, no autograd, outputs as a tuple."""

    def step(*inputs):
        with torch.no_grad():
            out = compiled(*target.prepare_inputs(inputs))
        return tuple(out) if isinstance(out, (list, tuple)) else out

    return step


def target_functions(target, compiled, program) -> dict[str, Callable]:
    """`generate`'s keyword arguments that run a program compiled for a target: `step` and, for an
    encoder-decoder whose encoder was compiled too (`compiled.companions`), `encoder`."""
    functions = {"step": target_step_function(target, compiled)}
    encoder = ((program.meta.get("kv_cache") or {}).get("encoder") or {}).get("program")
    if encoder in compiled.companions:
        functions["encoder"] = target_step_function(target, compiled.companions[encoder])
    return functions


def generate(
    program,
    prompts,
    max_new_tokens: int,
    *,
    sampling: Sampling = Sampling(),
    stop_tokens: Sequence[int] = (),
    step: Callable | None = None,
    draft=None,
    draft_step: Callable | None = None,
    draft_tokens: int = 4,
    pad_id: int = 0,
    encoder: Callable | None = None,
) -> GenerationResult:
    """Generate `max_new_tokens` per prompt (a list of token-id lists, or a [B, P] tensor).

    `program` is a step program (kv-cache) or a plain causal LM (then every token recomputes the
    whole prefix). `step` overrides how the step program is run (a target's compiled artifact).
    `draft` (a smaller step program) turns on speculative decoding: it proposes `draft_tokens`
    tokens, the target checks them in one call; greedy output is identical to the target's alone.
    A cached encoder-decoder runs its encoder program once per call (`encoder` overrides how)."""
    rows = _prompt_rows(prompts)
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {max_new_tokens}", "e.g. --max-new-tokens 32")
    stops = {int(t) for t in stop_tokens}
    kv = program.meta.get("kv_cache")
    if draft is not None:
        if (kv or {}).get("encoder") or (draft.meta.get("kv_cache") or {}).get("encoder"):
            raise UsageError(
                "speculative decoding takes decoder-only step programs, not an encoder-decoder",
                "generate without --draft",
            )
        if kv is None or not draft.meta.get("kv_cache"):
            raise UsageError(
                "speculative decoding needs step programs (kv-cache) for the target and the draft",
                "optimize both with a pipeline ending in kv-cache{max-len=N}",
            )
        if not sampling.greedy:
            raise UsageError("speculative decoding is greedy here", "drop --temperature/--top-k/--top-p with --draft")
        return _speculative(
            program,
            draft,
            rows,
            max_new_tokens,
            stops,
            step or step_function(program),
            draft_step or step_function(draft),
            draft_tokens,
        )
    if kv is not None and kv.get("encoder"):
        run = step or step_function(program)
        return _generate_encoder_decoder_cached(program, kv, rows, max_new_tokens, sampling, stops, run, encoder)
    if kv is None and "decoder_input_ids" in program.input_names:
        return _generate_encoder_decoder(program, rows, max_new_tokens, sampling, stops, step)
    if kv is None:
        return _generate_recompute(program, rows, max_new_tokens, sampling, stops, step)
    return _generate_cached(kv, rows, max_new_tokens, sampling, stops, step or step_function(program), pad_id)


def _prompt_rows(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    rows = [[int(t) for t in row] for row in prompts]
    if not rows or any(not r for r in rows):
        raise UsageError("every prompt needs at least one token", "give --prompt TEXT or --prompt-ids 1,2,3")
    return rows


def _check_room(kv: dict, longest: int, max_new_tokens: int) -> None:
    need = longest + max_new_tokens
    if need > kv["max_len"]:
        raise UsageError(
            f"prompt ({longest} tokens) + {max_new_tokens} new tokens exceed the cache ({kv['max_len']} slots)",
            f"fewer --max-new-tokens, or kv-cache{{max-len={need}}}",
        )


class _Rows:
    """Per-row bookkeeping: new tokens, and which rows have stopped."""

    def __init__(self, prompts: list[list[int]], stops: set[int]):
        self.prompts, self.stops = prompts, stops
        self.new: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * len(prompts)

    def add(self, tokens: torch.Tensor) -> None:
        for row, t in enumerate(tokens.tolist()):
            if not self.done[row]:
                self.new[row].append(int(t))
                self.done[row] = int(t) in self.stops

    def finished(self, limit: int) -> bool:
        return all(d or len(n) >= limit for d, n in zip(self.done, self.new))

    def result(self, seconds: float, **kw) -> GenerationResult:
        return GenerationResult([p + n for p, n in zip(self.prompts, self.new)], self.new, seconds, **kw)


def _generate_cached(kv, rows, max_new_tokens, sampling, stops, step, pad_id) -> GenerationResult:
    lengths = [len(r) for r in rows]
    longest = max(lengths)
    _check_room(kv, longest, max_new_tokens)
    if not max_new_tokens:  # nothing to compute (and a prompt as long as the cache never runs)
        return _Rows(rows, stops).result(0.0)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, longest - len(r) :] = torch.tensor(r)
    g = sampling.generator()
    state = _Rows(rows, stops)
    start = time.perf_counter()
    logits, key_mask, caches = prefill(step, kv, ids, lengths)
    prefill_s = time.perf_counter() - start
    steps = 0
    next_pos = torch.tensor(lengths)[:, None]
    key_mask[:, longest : longest + max_new_tokens] = True  # every generated slot holds a real token
    while max_new_tokens:
        token = sampling.choose(logits[:, -1], g)
        state.add(token)
        if state.finished(max_new_tokens):
            break
        slot = longest + steps
        # fresh (not offset views): some runtimes take only 64-byte-aligned buffers
        logits, *caches = step(
            token[:, None], next_pos + steps, torch.tensor([slot]), filled(key_mask, slot + 1), *caches
        )
        steps += 1
    return state.result(time.perf_counter() - start, prefill_seconds=prefill_s, steps=steps)


def _generate_recompute(program, rows, max_new_tokens, sampling, stops, step) -> GenerationResult:
    """No cache: every new token runs the whole sequence again. Rows of different lengths run one
    by one (a plain LM has no padding input)."""
    run = step or (lambda ids: program.gm(ids))
    groups = [rows] if len({len(r) for r in rows}) == 1 else [[r] for r in rows]
    g = sampling.generator()
    start = time.perf_counter()
    new: list[list[int]] = []
    for group in groups:
        state = _Rows(group, stops)
        ids = torch.tensor(group, dtype=torch.int64)
        with torch.no_grad():
            while max_new_tokens:
                logits = run(ids)
                logits = logits[0] if isinstance(logits, (tuple, list)) else logits
                token = sampling.choose(logits[:, -1], g)
                state.add(token)
                if state.finished(max_new_tokens):
                    break
                ids = torch.cat([ids, token[:, None]], dim=1)
        new += state.new
    return GenerationResult([p + n for p, n in zip(rows, new)], new, time.perf_counter() - start)


def _decoder_start(program, rows, stops) -> tuple[int, set, torch.Tensor, torch.Tensor]:
    """An encoder-decoder's decoder start id, stop tokens and encoder inputs: the prompts right-padded,
    and their attention mask. (The model's EOS stops a row when the caller asks, as for a decoder-only
    program: `optpipe generate` adds it unless --ignore-eos.)"""
    config = program.meta.get("config") or {}
    start_id = config.get("decoder_start_token_id")
    if start_id is None:
        raise UsageError(
            "generate: the encoder-decoder program records no decoder_start_token_id",
            "capture it from a transformers model (its config names the decoder's first token)",
        )
    pad = int(config.get("pad_token_id") or 0)
    longest = max(len(r) for r in rows)
    source = torch.full((len(rows), longest), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), longest), dtype=torch.int64)
    for i, r in enumerate(rows):
        source[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return int(start_id), stops, source, mask


def _generate_encoder_decoder(program, rows, max_new_tokens, sampling, stops, step) -> GenerationResult:
    """An encoder-decoder program (T5, BART) without a cache: the prompts are the encoder's input
    (right-padded, masked), the decoder starts from the model's decoder start id and every new token
    runs encoder and decoder again. `new_ids` are the decoder's tokens."""
    start_id, stops, source, mask = _decoder_start(program, rows, stops)
    given = {"input_ids": source, "attention_mask": mask}
    names = list(program.input_names)
    run = step or program.gm
    g = sampling.generator()
    state = _Rows([[] for _ in rows], stops)
    decoded = torch.full((len(rows), 1), int(start_id), dtype=torch.int64)
    start = time.perf_counter()
    with torch.no_grad():
        while max_new_tokens:
            out = run(*(decoded if n == "decoder_input_ids" else given[n] for n in names))
            logits = out[0] if isinstance(out, (tuple, list)) else out
            token = sampling.choose(logits[:, -1], g)
            state.add(token)
            if state.finished(max_new_tokens):
                break
            decoded = torch.cat([decoded, token[:, None]], dim=1)
    return GenerationResult([list(r) for r in rows], state.new, time.perf_counter() - start)


def _generate_encoder_decoder_cached(program, kv, rows, max_new_tokens, sampling, stops, step, encoder):
    """A cached encoder-decoder (kv-cache on T5, BART): the encoder runs once on the prompts (its
    states are the step's trailing inputs), then one decoder step per token from the decoder start
    id, each token written to the next cache slot. `encoder` overrides how the encoder program runs."""
    start_id, stops, source, mask = _decoder_start(program, rows, stops)
    _check_room(kv, 1, max_new_tokens)
    state = _Rows([[] for _ in rows], stops)
    if not max_new_tokens:
        return GenerationResult([list(r) for r in rows], state.new, 0.0)
    b, g = len(rows), sampling.generator()
    start = time.perf_counter()
    states = encoder_states(program, source, mask, run=encoder)
    encoder_s = time.perf_counter() - start
    caches = empty_caches(kv, b)
    key_mask = torch.zeros(b, kv["max_len"], dtype=torch.bool)
    token = torch.full((b, 1), start_id, dtype=torch.int64)
    steps = 0
    while True:
        key_mask[:, steps] = True
        slot = torch.tensor([steps])
        logits, *caches = step(token, slot.expand(b, 1), slot, filled(key_mask, steps + 1), *caches, *states)
        steps += 1
        choice = sampling.choose(logits[:, -1], g)
        state.add(choice)
        if state.finished(max_new_tokens):
            break
        token = choice[:, None]
    seconds = time.perf_counter() - start
    return GenerationResult([list(r) for r in rows], state.new, seconds, prefill_seconds=encoder_s, steps=steps)


def _speculative(target, draft, rows, max_new_tokens, stops, step, draft_step, k) -> GenerationResult:
    """Greedy speculative decoding (one prompt): the draft proposes k tokens one by one, the target
    scores the last accepted token and the k proposals in one call; the longest prefix where they
    agree with the target's own argmax is kept, plus the target's token after it. Stale cache
    entries of rejected tokens sit in slots no query can see until they are overwritten."""
    if len(rows) != 1:
        raise UsageError("speculative decoding takes one prompt at a time", "give a single --prompt")
    if k < 1:
        raise UsageError(f"--draft-tokens must be >= 1, got {k}", "e.g. --draft-tokens 4")
    tkv, dkv = target.meta["kv_cache"], draft.meta["kv_cache"]
    for name, kv in (("target", tkv), ("draft", dkv)):
        kinds = {layer["kind"] for layer in kv["layers"]}
        if kinds != {"dense"}:
            raise UsageError(
                f"speculative decoding needs dense KV caches; the {name} has {', '.join(sorted(kinds))}",
                "sliding-window and linear caches cannot roll back rejected tokens",
            )
    prompt = rows[0]
    n = len(prompt)
    _check_room(tkv, n, max_new_tokens + k + 1)
    _check_room(dkv, n, max_new_tokens + k + 1)
    state = _Rows(rows, stops)
    start = time.perf_counter()
    ids = torch.tensor([prompt])
    logits, t_mask, t_caches = prefill(step, tkv, ids)
    _, d_mask, d_caches = prefill(draft_step, dkv, ids)
    prefill_s = time.perf_counter() - start
    tokens = list(prompt) + [int(logits[0, -1].argmax())]  # the target's first token
    state.add(torch.tensor(tokens[-1:]))
    draft_done = n  # tokens the draft's cache holds (slots 0..draft_done-1)
    accepted = proposed = steps = 0
    while not state.finished(max_new_tokens):
        room = max_new_tokens - len(state.new[0])
        kk = max(1, min(k, room))
        # draft: catch up on the tokens its cache lacks, then propose kk tokens greedily
        proposal: list[int] = []
        feed = tokens[draft_done:]
        for _ in range(kk):
            d_logits, *d_caches = _call(draft_step, feed, draft_done, d_mask, d_caches)
            draft_done += len(feed)
            proposal.append(int(d_logits[0, -1].argmax()))
            feed = proposal[-1:]
        # target: score [last token, proposal] in one call
        base = len(tokens) - 1
        t_logits, *t_caches = _call(step, tokens[-1:] + proposal, base, t_mask, t_caches)
        steps += 1
        choice = t_logits[0].argmax(-1).tolist()
        j = 0
        while j < kk and proposal[j] == choice[j]:
            j += 1
        accepted += j
        proposed += kk
        emitted = proposal[:j] + [choice[j]]
        for t in emitted:
            state.add(torch.tensor([t]))
            if state.finished(max_new_tokens):
                break
        tokens += emitted
        draft_done = min(draft_done, len(tokens) - 1)  # roll the draft back to the accepted prefix
    return state.result(
        time.perf_counter() - start, prefill_seconds=prefill_s, steps=steps, accepted=accepted, proposed=proposed
    )


def _call(step, tokens: list[int], first_slot: int, key_mask, caches):
    """One step over `tokens` written at slots first_slot.. (batch of one, no padding)."""
    t = len(tokens)
    slots = torch.arange(first_slot, first_slot + t)
    key_mask[:, first_slot : first_slot + t] = True
    return step(torch.tensor([tokens]), slots[None, :], slots, filled(key_mask, first_slot + t), *caches)
