"""The KV step program's contract: what a step program (made by the `kv-cache` pass) takes, and how
its inputs are built for a prefill, a decode step and verification.

A step program takes `(input_ids [B,T], position_ids [B,T], cache_position [T], key_mask [B,L],
*caches)` and returns `(logits [B,T,V], *caches)`; `program.meta["kv_cache"]` describes its caches
(`layers[i]["caches"]`: name, shape with None for the batch, dtype) and `max_len`. Dense layers
attend over the first L cache slots only, so a runner passes the mask of the slots filled so far
(`key_mask[:, :last slot + 1]`, a view of one [B, max_len] buffer): a decode step's cost grows
with the context, not with max_len.

An encoder-decoder step program (T5, BART) follows the same contract with trailing inputs that it
does not return: the encoder's states (`encoder_mask [B,S]`, then each cross-attention's K and V),
computed once per prompt by the encoder program `program.companions[kv["encoder"]["program"]]`
(`encoder_states`) and passed unchanged to every step (`states=` below).

The pass writes programs to this contract, verification checks them through it, and the runtime
(`optpipe.runtime.generation`) and every target's generation loop drive them through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

STEP_INPUTS = ("input_ids", "position_ids", "cache_position", "key_mask")


def empty_caches(kv: dict, batch: int, device="cpu") -> list[torch.Tensor]:
    """Zeroed caches for a batch, in the step program's input order."""
    return [
        torch.zeros(batch, *c["shape"][1:], dtype=getattr(torch, c["dtype"]), device=device)
        for layer in kv["layers"]
        for c in layer["caches"]
    ]


def placeholder_states(kv: dict, batch: int, device="cpu") -> tuple:
    """Encoder states of the right shapes (zero K/V over `source_len` unmasked keys) for a step
    program run without its encoder (timing, warm-up); () for a decoder-only step program."""
    encoder = kv.get("encoder")
    if not encoder:
        return ()
    n = encoder["source_len"]
    states = []
    for s in encoder["states"]:
        shape = [batch] + [n if d is None else d for d in s["shape"][1:]]
        states.append(torch.ones(shape, dtype=torch.bool, device=device) if s["dtype"] == "bool" else
                      torch.zeros(shape, dtype=getattr(torch, s["dtype"]), device=device))  # fmt: skip
    return tuple(states)


def encoder_states(
    program, input_ids: torch.Tensor, attention_mask: torch.Tensor, run: Callable | None = None
) -> tuple:
    """The encoder-decoder step program's trailing inputs for these prompts: its encoder program
    (`run` overrides how it is run) on (input_ids, attention_mask)."""
    encoder = program.companions[program.meta["kv_cache"]["encoder"]["program"]]
    with torch.no_grad():
        out = (run or encoder.gm)(input_ids, attention_mask)
    return tuple(out)


def prefill_inputs(input_ids: torch.Tensor, max_len: int, lengths: Sequence[int] | None = None) -> tuple:
    """Step inputs for a prefill of left-padded `input_ids` [B, P] (`lengths`: real tokens per row).
    The key mask is the whole [B, max_len] buffer (valid as is; runners pass `filled(key_mask, n)`)."""
    b, p = input_ids.shape
    device = input_ids.device
    lengths = [p] * b if lengths is None else list(lengths)
    pad = torch.tensor([p - n for n in lengths], device=device)
    steps = torch.arange(p, device=device)
    position_ids = (steps[None, :] - pad[:, None]).clamp(min=0)
    key_mask = torch.zeros(b, max_len, dtype=torch.bool, device=device)
    key_mask[:, :p] = steps[None, :] >= pad[:, None]
    return input_ids, position_ids, steps.clone(), key_mask


def filled(key_mask: torch.Tensor, n: int) -> torch.Tensor:
    """The mask of the first `n` slots: what a step whose last token goes to slot n-1 attends over."""
    view = key_mask[:, :n]
    return view if view.is_contiguous() else view.contiguous()  # batch 1: a view; else a small copy


PREFILL_CHUNK = 512


def prefill(
    step: Callable,
    kv: dict,
    input_ids: torch.Tensor,
    lengths: Sequence[int] | None = None,
    chunk: int = PREFILL_CHUNK,
    states: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Run left-padded prompts [B, P] through a step program from empty caches, `chunk` tokens per
    call (bounded memory for long prompts: linear attention's in-chunk form is quadratic in the
    chunk). `states`: an encoder-decoder's encoder states (default `placeholder_states`).
    Returns (logits of the last chunk, key_mask, caches)."""
    b, p = input_ids.shape
    states = placeholder_states(kv, b, input_ids.device) if states is None else tuple(states)
    ids, position_ids, cache_position, key_mask = prefill_inputs(input_ids, kv["max_len"], lengths)
    caches = empty_caches(kv, b, input_ids.device)
    for start in range(0, p, chunk):
        piece = slice(start, min(p, start + chunk))
        logits, *caches = step(
            ids[:, piece], position_ids[:, piece], cache_position[piece], filled(key_mask, piece.stop), *caches, *states
        )
    return logits, key_mask, caches


def step_verification_inputs(program, *, seed: int = 0, extra: int = 1) -> list[tuple]:
    """Inputs that exercise a step program: its example (a prefill from empty caches), a decode step
    of 1 token and, with `extra`, a chunk of 3 tokens, at random positions over random caches."""
    kv = program.meta["kv_cache"]
    g = torch.Generator().manual_seed(seed)
    ids = program.example_inputs[0]
    b, vocab = ids.shape[0], int(_vocab(program) or int(ids.max()) + 1)
    sets = [tuple(program.example_inputs)]
    n_states = len(kv["encoder"]["states"]) if kv.get("encoder") else 0
    states = tuple(program.example_inputs[len(program.example_inputs) - n_states :]) if n_states else ()
    for t in [1, 3] if extra else [1]:
        start = int(torch.randint(1, max(2, kv["max_len"] - t), (1,), generator=g))
        new = torch.randint(0, vocab, (b, t), generator=g)
        caches = [torch.randn(x.shape, generator=g).to(x.dtype) * 0.5 for x in empty_caches(kv, b)]
        key_mask = torch.ones(b, start + t, dtype=torch.bool)  # the slots filled after these tokens
        cache_position = torch.arange(start, start + t)
        sets.append((new, cache_position[None, :].expand(b, t).clone(), cache_position, key_mask, *caches, *states))
    return sets


def _vocab(program) -> int | None:
    cfg = program.meta.get("config") or {}
    return cfg.get("vocab_size") or program.meta.get("vocab_size")


def cached_logits(
    step: Callable, kv: dict, input_ids: torch.Tensor, decode_last: int = 3, states: tuple | None = None
) -> torch.Tensor:
    """Logits of every position of `input_ids` computed through the cache: a prefill of all but the
    last `decode_last` tokens, then one decode step per token (what verification compares with the
    program without a cache). `states`: an encoder-decoder's encoder states."""
    b, n = input_ids.shape
    states = placeholder_states(kv, b, input_ids.device) if states is None else tuple(states)
    split = max(1, n - decode_last)
    caches = empty_caches(kv, b, input_ids.device)
    ids, pos, cache_pos, key_mask = prefill_inputs(input_ids[:, :split], kv["max_len"])
    logits, *caches = step(ids, pos, cache_pos, filled(key_mask, split), *caches, *states)
    pieces = [logits]
    for t in range(split, n):
        key_mask[:, t] = True
        slot = torch.tensor([t], device=input_ids.device)
        logits, *caches = step(
            input_ids[:, t : t + 1], slot.expand(b, 1), slot, filled(key_mask, t + 1), *caches, *states
        )
        pieces.append(logits)
    return torch.cat(pieces, dim=1)


def encoder_decoder_logits(program, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """An encoder-decoder step program's logits for the inputs of the program it was made from
    (input_ids, attention_mask, decoder_input_ids): the encoder once, then `cached_logits`."""
    input_ids, attention_mask, decoder_input_ids = inputs
    states = encoder_states(program, input_ids, attention_mask)
    kv = program.meta["kv_cache"]
    if decoder_input_ids.shape[1] >= kv["max_len"]:
        kv = _longer_caches(kv, decoder_input_ids.shape[1] + 1)
    return cached_logits(program.gm, kv, decoder_input_ids, states=states)


def _longer_caches(kv: dict, max_len: int) -> dict:
    """`kv` with dense caches of `max_len` slots: verification may feed a decoder input longer than
    the cache (its sequence dims all get one length); the eager step program takes any cache length."""
    longer = dict(kv, max_len=max_len, layers=[])
    for layer in kv["layers"]:
        caches = layer["caches"]
        if layer["kind"] == "dense":
            caches = [dict(c, shape=c["shape"][:2] + [max_len] + c["shape"][3:]) for c in caches]
        longer["layers"].append(dict(layer, caches=caches))
    return longer


def decode_step_seconds(step: Callable, kv: dict, input_ids: torch.Tensor, steps: int = 8, warmup: int = 2) -> list:
    """Seconds of each of `steps` greedy decode steps after a prefill of `input_ids` and `warmup`
    untimed decode steps: the work generation does (one token per call over a growing context),
    at its shapes. A compiled step program compiles its prefill and decode graphs in the untimed
    part (`steps=0` only warms it up); a program that recompiled per step would show it here."""
    return interleaved_decode_seconds({"step": step}, kv, input_ids, steps=steps, warmup=warmup)["step"]


def interleaved_decode_seconds(
    steps_by_name: Mapping[str, Callable], kv: dict, input_ids: torch.Tensor, steps: int = 8, warmup: int = 2
) -> dict[str, list]:
    """`decode_step_seconds` for several step callables (e.g. eager and torch.compile), timed side by
    side: each gets its own prefill and caches, then decode step i runs on every callable before
    step i+1 runs on any (the first to go alternates), so a burst of load on a shared machine lands
    on all of them instead of deciding which one looks faster."""
    import time

    b = input_ids.shape[0]
    room = kv["max_len"] - warmup - steps - 1  # every step's mask narrower than the cache
    ids = input_ids[:, : max(1, min(input_ids.shape[1], room))]
    if kv.get("encoder"):  # a decoder starts from one token, a prompt of one: generation's shapes
        ids, b = input_ids[:1, :1], 1
    names = list(steps_by_name)
    times: dict[str, list] = {name: [] for name in names}
    states = placeholder_states(kv, b, ids.device)
    with torch.no_grad():
        state = {name: prefill(steps_by_name[name], kv, ids, states=states) for name in names}
        for i in range(warmup + steps):
            slot = ids.shape[1] + i
            position = torch.tensor([slot], device=ids.device)
            for name in names if i % 2 == 0 else names[::-1]:
                logits, key_mask, caches = state[name]
                key_mask[:, slot] = True
                token = logits[:, -1].argmax(-1, keepdim=True)
                start = time.perf_counter()
                logits, *caches = steps_by_name[name](
                    token, position.expand(b, 1), position, filled(key_mask, slot + 1), *caches, *states
                )
                if logits.is_cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
                state[name] = (logits, key_mask, caches)
    return times
