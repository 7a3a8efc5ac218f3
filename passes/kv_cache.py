"""kv-cache: a causal LM (tokens -> logits) becomes a step program with static per-layer caches.

Before (captured LM, after `fuse-attention`):

    logits = model(input_ids)                                    # recomputes the whole prefix

After:

    logits, *caches = step(input_ids, position_ids, cache_position, key_mask, *caches)

- `input_ids [B, T]`: the new tokens (the prompt at prefill, one token per decode step);
- `position_ids [B, T]`: their positions in their own sequence (differs per row under left padding);
- `cache_position [T]`: the cache slots they are written to (shared by the batch);
- `key_mask [B, L]` (bool): which of the first L slots hold real tokens (False for left padding).
  L is a dynamic dim: the slots filled once this step's tokens are written (`cache_position[-1]
  + 1`); dense sites attend over those L slots only (see below);
- one pair of caches per attention site, updated in place (the updated tensors are also returned,
  so exporters see them as outputs).

Per site kind:
- dense SDPA: static `[B, kv_heads, max_len, head_dim]` K/V buffers. New K/V are written at
  `cache_position` (`index_put_`), then the buffers are narrowed to their first L slots (L =
  `key_mask.shape[1]`, an `aten.slice` view, no copy) and the query attends over those under the
  mask `slot <= its slot and key_mask` (each query also sees itself, so the rows of padding stay
  finite): a decode step at context n costs O(n), not O(max_len), like a cache that grows. The
  narrowing is a slice with a symbolic end, which onnxruntime (Slice) and TVM (`strided_slice`)
  take as is, so every target runs this same program, with L dynamic. The eager program takes any
  L up to max_len (a longer mask than needed gives the same result); a re-exported one
  (`program.pt2`, and what targets import) carries a guard L != max_len that torch.export derives
  from the narrowed view's strides, so runners pass L < max_len there: every step of a generation
  does (the last token is never written to the cache).
  Grouped-query attention keeps its smaller K/V (`enable_gqa`).
- sliding-window (`optpipe.sparse_attention`, causal, pattern sliding-window): a ring buffer of
  `window` slots (memory O(window), independent of the generated length); see `cached_window_attention`.
- linear (`optpipe.linear_attention`, causal): its recurrent state (`[B, H, F, Dv]` sum of
  phi(k) v^T and `[B, H, F]` sum of phi(k)): O(1) memory and time per token.
- dense optpipe ops with SDPA's arguments (`optpipe.score_mod_attention`, Gemma-2's soft-capping):
  cached like dense SDPA, the op kept with its own arguments.
- Anything else (bidirectional attention, other sparse patterns, performer, linformer, non-causal
  masks) cannot be cached: the pass stops with the site and the reason. A program with no
  attention site at all is an error too (the user asked for a cache): it names the softmax that
  fuse-attention did not recognise, if any.

Masks and positions are recognised by what they compute, not by how (`ShapeValues`): a node whose
value depends on the token ids' shape only is evaluated at the example length and at max-len.
- An SDPA `attn_mask` (bool, or additive with blocked keys <= -5e3) is classified (`classify_mask`):
  causal -> as `is_causal`; causal within the last W positions (a native sliding window, Mistral,
  Gemma-3) -> the ring buffer of W slots (a dense cache under a windowed mask for an op the ring
  kernel does not implement); causal plus a bias linear in the key distance, slope[h] * (k - q)
  (ALiBi) -> the dense cache with that bias computed from the slots (it follows the offset). Masks
  that read token values (padding), look ahead, or carry another bias are refused.
- Positions: every value equal to `arange(seq)` ([T], [1, T] or [B, T]; `arange`, or OPT's
  `cumsum(ones) - 1`) is replaced by `position_ids`, so learned and rotary embeddings, and any
  offset added after (OPT's +2), see the step's positions. The masks the cache replaces, and the
  positions only they read, are removed first.

An encoder-decoder program (T5, BART: inputs input_ids, attention_mask, decoder_input_ids) gets its
cached form from `passes/kv_cache_encoder_decoder.py`: the encoder once per prompt, a decoder step
program under this contract with the cross-attention K/V as extra inputs. The site analysis and the
rewrite both use live in `passes/kv_cache_step.py`.

The program's calling convention changes, so verification compares the step program, run as a
prefill followed by single-token decode steps (`optpipe.kv_step.cached_logits`), with the
logits of the program before: the pass is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from optpipe.errors import PassError
from optpipe.graph_toolkit import module_path, value
from optpipe.kv_step import STEP_INPUTS
from optpipe.program import Program
from optpipe.registry import PassResult, register_pass

from .kv_cache_encoder_decoder import insert_encoder_decoder_cache
from .kv_cache_step import (
    ShapeValues,
    attention_site,
    example_prefill,
    is_attention_site,
    kind_counts,
    model_max_len,
    position_candidates,
    propagate_step_meta,
    rewrite_step,
)

aten = torch.ops.aten
_SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)


@dataclass(frozen=True)
class KVCacheConfig:
    max_len: int = field(
        default=0,
        metadata={"help": "cache slots: the longest prompt + generated length (0: the model's max positions)"},
    )

    def __post_init__(self):
        if not isinstance(self.max_len, int) or isinstance(self.max_len, bool) or self.max_len < 0:
            raise ValueError(f"kv-cache: max-len must be an integer >= 0, got {self.max_len!r}")


@register_pass(
    "kv-cache",
    KVCacheConfig,
    exact=True,
    needs=("sdpa-sites",),
    takes=("sdpa-sites",),
    after=("fuse-attention",),
    why="it turns the attention sites into cached step attention, which fuse-attention no longer recognises",
)
def kv_cache(program: Program, config: KVCacheConfig) -> PassResult:
    """Turn a causal LM (or an encoder-decoder's decoder) into a step program with static KV caches."""
    if program.meta.get("kv_cache"):
        return PassResult(False, {"sites": 0, "cached": 0}, {"reason": "the program already has a KV cache"})
    if "decoder_input_ids" in program.input_names:  # T5, BART: encoder once, cached decoder steps
        return insert_encoder_decoder_cache(program, config)
    gm = program.gm
    tokens = _token_input(program)
    attention = [n for n in gm.graph.nodes if is_attention_site(n)]
    if not attention:
        raise _no_sites_error(gm)
    max_len = config.max_len or model_max_len(program)
    example_len = program.example_inputs[0].shape[1]
    if max_len < example_len:
        raise PassError(
            f"kv-cache: max-len {max_len} is shorter than the example input ({example_len} tokens)",
            "give kv-cache{max-len=N} with N >= prompt + new tokens",
        )
    _single_output(gm)
    shapes = ShapeValues(gm, tokens, program.example_inputs[0])
    sites = [attention_site(n, shapes, max_len) for n in attention]
    position_nodes = position_candidates(shapes)

    layers, positions = rewrite_step(gm, tokens, max_len, sites, position_nodes)

    program.meta["kv_cache"] = {
        "max_len": max_len,
        "inputs": list(STEP_INPUTS),
        "layers": layers,
        "token_input": program.input_names[0],
    }
    program.example_inputs = example_prefill(program.example_inputs[0], program.meta["kv_cache"])
    program.input_names = list(STEP_INPUTS) + [c["name"] for layer in layers for c in layer["caches"]]
    program.dynamic_shapes = [{0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}, {0: "seq"}, {0: "batch", 1: "kv_len"}] + [
        {0: "batch"}
    ] * (len(program.input_names) - len(STEP_INPUTS))
    propagate_step_meta(
        gm,
        program,
        what="the step program",
        hint="positions are probably computed in a way the pass does not recognise; "
        "rerun with --dump-ir DIR to see the graph",
    )
    stats = {"sites": len(sites), "cached": len(sites), "positions": positions, **kind_counts(sites)}
    notes = [s.note for s in sites if s.note]
    return PassResult(True, stats, {"max_len": max_len, "layers": layers, "notes": notes})


def _no_sites_error(gm: torch.fx.GraphModule) -> PassError:
    """The user asked for a cache and there is nothing to cache: say where attention probably is."""
    softmax = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _SOFTMAX]
    paths = sorted({module_path(n) or n.name for n in softmax})
    if paths:
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        return PassError(
            f"kv-cache: no attention site to cache; the softmax at {shown} is attention fuse-attention "
            "did not recognise",
            "run fuse-attention before kv-cache (--dump-ir DIR shows the graph it got); "
            "an attention form it does not know cannot be cached yet",
        )
    return PassError(
        "kv-cache: no attention site to cache (the program has no attention)",
        "kv-cache makes a decode-step program for a causal LM with attention",
    )


def _token_input(program: Program) -> torch.fx.Node:
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    ids = program.example_inputs[0] if program.example_inputs else None
    if (
        len(placeholders) != 1
        or not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or ids.dtype not in (torch.int64, torch.int32)
    ):
        names = ", ".join(program.input_names)
        raise PassError(
            f"kv-cache: the program takes ({names}); a step program is built from a causal LM "
            "that takes token ids [batch, seq] only",
            "capture the model with input_ids alone (e.g. --input input_ids:int64[batch=1,seq=32])",
        )
    return placeholders[0]


def _single_output(gm: torch.fx.GraphModule) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = out.args[0]
    flat = list(flat) if isinstance(flat, (list, tuple)) else [flat]
    v = value(flat[0]) if len(flat) == 1 and isinstance(flat[0], torch.fx.Node) else None
    if v is None or v.dim() != 3:
        raise PassError(
            "kv-cache: the program must return one tensor of logits [batch, seq, vocab]",
            "capture the LM head's logits (HF models: the logits output)",
        )
