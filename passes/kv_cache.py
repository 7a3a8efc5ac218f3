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

The program's calling convention changes, so verification compares the step program, run as a
prefill followed by single-token decode steps (`optpipe.kv_step.cached_logits`), with the
logits of the program before: the pass is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import getitem as _getitem

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from optpipe.attention_sites import SDPA, sdpa_arguments
from optpipe.errors import PassError
from optpipe.graph_toolkit import add_tensor, copy_placement, module_path, value
from optpipe.kv_step import STEP_INPUTS
from optpipe.ops import is_optpipe_op
from optpipe.program import Program
from optpipe.registry import PassResult, register_pass

from . import kv_cache_ops  # noqa: F401 - defines optpipe.cached_window_attention / cached_linear_attention
from .cleanup import eliminate_dead_code

aten = torch.ops.aten
_SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "block_size", "n_ctx", "max_seq_len")


@dataclass(frozen=True)
class KVCacheConfig:
    max_len: int = field(
        default=0,
        metadata={"help": "cache slots: the longest prompt + generated length (0: the model's max positions)"},
    )

    def __post_init__(self):
        if not isinstance(self.max_len, int) or isinstance(self.max_len, bool) or self.max_len < 0:
            raise ValueError(f"kv-cache: max-len must be an integer >= 0, got {self.max_len!r}")


@dataclass
class _Site:
    node: torch.fx.Node
    kind: str  # "dense" | "sliding-window" | "linear"
    path: str
    query: torch.fx.Node
    key: torch.fx.Node
    value: torch.fx.Node
    scale: float | None = None
    gqa: bool = False
    window: int = 0
    feature_map: str = "elu"
    slopes: torch.Tensor | None = None
    """ALiBi: per-head slope of the score bias, slope * (key slot - query slot)."""
    note: str = ""
    extra: dict = field(default_factory=dict)
    """A dense optpipe op's own arguments (score_mod_attention's modifier), kept as they are."""


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
    """Turn a causal LM into a step program with static KV caches (prefill + decode)."""
    if program.meta.get("kv_cache"):
        return PassResult(False, {"sites": 0, "cached": 0}, {"reason": "the program already has a KV cache"})
    gm = program.gm
    tokens = _token_input(program)
    attention = [n for n in gm.graph.nodes if _is_attention(n)]
    if not attention:
        raise _no_sites_error(gm)
    max_len = config.max_len or _model_max_len(program)
    example_len = program.example_inputs[0].shape[1]
    if max_len < example_len:
        raise PassError(
            f"kv-cache: max-len {max_len} is shorter than the example input ({example_len} tokens)",
            "give kv-cache{max-len=N} with N >= prompt + new tokens",
        )
    _single_output(gm)
    shapes = ShapeValues(gm, tokens, program.example_inputs[0])
    sites = [_site(n, shapes, max_len) for n in attention]
    position_nodes = _position_candidates(shapes)

    builder = _StepBuilder(gm, tokens, max_len)
    layers = [builder.cache_site(i, s) for i, s in enumerate(sites)]
    builder.finish()
    eliminate_dead_code(gm)  # the masks the cache replaced, and the positions only they read
    positions = builder.replace_positions(position_nodes)
    eliminate_dead_code(gm)  # no step should still compute arange(T)
    gm.graph.lint()
    gm.recompile()

    batch = program.example_inputs[0].shape[0]
    program.meta["kv_cache"] = {
        "max_len": max_len,
        "inputs": list(STEP_INPUTS),
        "layers": layers,
        "token_input": program.input_names[0],
    }
    program.example_inputs = _example_step_inputs(program, batch, example_len)
    program.input_names = list(STEP_INPUTS) + [c["name"] for layer in layers for c in layer["caches"]]
    program.dynamic_shapes = [{0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}, {0: "seq"}, {0: "batch", 1: "kv_len"}] + [
        {0: "batch"}
    ] * (len(program.input_names) - len(STEP_INPUTS))
    _propagate_meta(gm, program)
    kinds = [s.kind for s in sites]
    stats = {"sites": len(sites), "cached": len(sites), "positions": positions}
    for kind in sorted(set(kinds)):
        stats[kind] = kinds.count(kind)
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


# -- what can be cached ----------------------------------------------------------------------------
_ATTENTION_OPS = ("sparse_attention", "linear_attention", "performer_attention", "linformer_attention")
_DENSE_OPS = ("score_mod_attention",)  # SDPA's arguments plus a score modifier: cached like SDPA
_SDPA_LIKE = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _is_attention(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target is SDPA or (is_optpipe_op(node.target) and node.target._opname in _ATTENTION_OPS + _DENSE_OPS)
    )


def _op_arguments(node: torch.fx.Node) -> dict:
    """An optpipe op's arguments by name (schema defaults filled in)."""
    schema = node.target._schema.arguments
    args = {a.name: a.default_value for a in schema if a.has_default_value()}
    args.update(zip((a.name for a in schema), node.args))
    args.update(node.kwargs)
    return args


def _site(node: torch.fx.Node, shapes: ShapeValues, max_len: int) -> _Site:
    path = module_path(node) or node.name
    if node.target is SDPA or node.target._opname in _DENSE_OPS:
        return _sdpa_site(node, path, shapes, max_len)
    a, op = _op_arguments(node), node.target._opname
    kind = a["pattern"] if op == "sparse_attention" else op.replace("_attention", "")
    if not a.get("causal"):
        reason = "it is bidirectional"
    elif a.get("key_padding_mask") is not None:
        reason = "it has a key padding mask"
    elif a.get("bias") is not None:
        reason = "it carries an additive score bias (ALiBi, relative position), which the ring buffer does not shift"
    elif a.get("score_mod") is not None:
        reason = f"its scores are modified ({a['score_mod']}={a['mod_value']}), which the ring-buffer kernel does not"
    elif kind == "sliding-window":
        return _Site(node, kind, path, a["query"], a["key"], a["value"], a["scale"], window=a["window"])
    elif kind == "linear":
        return _Site(node, kind, path, a["query"], a["key"], a["value"], feature_map=a["feature_map"])
    else:
        reason = f"{kind} attention has no incremental form here"
    raise PassError(
        f"kv-cache: cannot cache the {kind} attention at {path}: {reason}",
        "keep this layer dense (attention{...,layers=...}) or generate without a cache",
    )


def _sdpa_site(node: torch.fx.Node, path: str, shapes: ShapeValues, max_len: int) -> _Site:
    """A causal SDPA, or one whose mask is a function of positions the cache can compute for any
    offset: causal, a native sliding window (-> the ring-buffer cache), or causal plus ALiBi."""
    a = sdpa_arguments(node) if node.target is SDPA else _op_arguments(node)
    if a.get("dropout_p"):
        raise PassError(f"kv-cache: attention at {path} applies dropout", "cache an eval-mode model")
    site = _Site(node, "dense", path, a["query"], a["key"], a["value"], a.get("scale"), bool(a.get("enable_gqa")))
    if node.target is not SDPA:
        site.extra = {k: v for k, v in a.items() if k not in _SDPA_LIKE}
    if a["is_causal"] and a["attn_mask"] is None:
        return site
    if a["attn_mask"] is None:
        raise PassError(
            f"kv-cache: attention at {path} is not plain causal attention (bidirectional); "
            "only causal self-attention can be cached",
            "run fuse-attention first, which turns causal masks into is_causal",
        )
    try:
        pattern = classify_mask(a["attn_mask"], shapes, max_len)
    except MaskNotCacheable as e:
        raise PassError(
            f"kv-cache: attention at {path} is not causal attention the cache can follow (its mask {e})",
            "only causal masks, native sliding windows and ALiBi-style biases can be cached",
        ) from None
    if pattern.window and not site.extra:
        site.kind, site.window = "sliding-window", pattern.window
        site.note = f"{path}: native sliding-window mask (window {pattern.window}) -> ring-buffer cache"
    elif pattern.window:  # the ring-buffer kernel is SDPA's: a dense cache under a windowed mask
        site.window = pattern.window
        site.note = f"{path}: native sliding-window mask (window {pattern.window}) -> windowed mask on a dense cache"
    elif pattern.slopes is not None:
        site.slopes = pattern.slopes
        site.note = f"{path}: ALiBi score bias ({pattern.slopes.numel()} slopes) follows the cache offset"
    return site


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


def _model_max_len(program: Program) -> int:
    config = program.meta.get("config") or {}
    for key in _MAX_LEN_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    raise PassError("kv-cache: the model's maximum length is unknown", "give kv-cache{max-len=N}")


# -- values that depend on the tokens' shape only (positions, masks) -------------------------------
_SHAPE_OPS = {
    aten.sym_size.int,
    aten.sym_numel.default,
    aten.ones_like.default,
    aten.zeros_like.default,
    aten.empty_like.default,
    aten.full_like.default,
    aten.new_ones.default,
    aten.new_zeros.default,
    aten.new_empty.default,
    aten.new_full.default,
}
_MASK_PROBE_MAX = 2048  # longest sequence a mask is evaluated at (memory: probe² per mask)


class ShapeValues:
    """The nodes whose value depends on the token ids' shape but not on their values (position ids,
    masks, ALiBi biases, however the model computes them), and their values at any sequence length:
    the pass recognises positions and masks by what they compute, not by how."""

    def __init__(self, gm: torch.fx.GraphModule, tokens: torch.fx.Node, example: torch.Tensor):
        self.gm, self.tokens, self.example = gm, tokens, example
        self.varying = {tokens}
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in _SHAPE_OPS:
                continue  # reads its first argument's shape only
            if node.op == "call_module" or any(a in self.varying for a in node.all_input_nodes):
                self.varying.add(node)
        self.dynamic = isinstance(value(tokens).shape[1], torch.SymInt)

    def shape_only(self, node) -> bool:
        return isinstance(node, torch.fx.Node) and node.op in ("call_function", "get_attr") and node not in self.varying

    def lengths(self, longest: int) -> list[int]:
        """Sequence lengths to probe: the example's and, with a dynamic sequence, `longest`."""
        n = self.example.shape[1]
        return sorted({n, max(n, min(longest, _MASK_PROBE_MAX))} if self.dynamic else {n})

    def evaluate(self, nodes: list[torch.fx.Node], length: int) -> list[torch.Tensor]:
        """The values of shape-only `nodes` for token ids of `length` (the example's batch)."""
        needed, stack = set(), list(nodes)
        while stack:
            node = stack.pop()
            if node not in needed:
                needed.add(node)
                stack += node.all_input_nodes
        interpreter = torch.fx.Interpreter(self.gm)
        ids = torch.zeros(self.example.shape[0], length, dtype=self.example.dtype, device=self.example.device)
        interpreter.env[self.tokens] = ids
        with torch.no_grad():
            for node in self.gm.graph.nodes:
                if node in needed and node is not self.tokens:
                    interpreter.env[node] = interpreter.run_node(node)
        return [interpreter.env[n] for n in nodes]


class MaskNotCacheable(Exception):
    """Why an attention mask is not one the cache can compute for new positions."""


@dataclass
class MaskPattern:
    window: int = 0
    """Keys per query (itself and the window - 1 before it); 0: causal, no window."""
    slopes: torch.Tensor | None = None
    """ALiBi: per-head slope of the additive bias slope * (key position - query position)."""


_MASKED = -5e3  # an additive mask value at or below this blocks its key (-inf, finfo.min, -1e4)


def classify_mask(mask: torch.fx.Node, shapes: ShapeValues, max_len: int) -> MaskPattern:
    """What an SDPA mask computes, from its values at the example length and at max_len: causal,
    causal within a window of the last W positions, and either plus a bias linear in the key
    distance (ALiBi); anything else raises MaskNotCacheable."""
    if not shapes.shape_only(mask):
        raise MaskNotCacheable("depends on the input values, e.g. a padding mask")
    found = [_mask_pattern(shapes.evaluate([mask], n)[0], n) for n in shapes.lengths(max_len)]
    longest = found[-1]
    for n, pattern in zip(shapes.lengths(max_len), found):
        if (pattern.window or n) != min(longest.window or n, n):
            raise MaskNotCacheable("is a different pattern at different lengths")
    if longest.window and longest.slopes is not None:
        raise MaskNotCacheable("is a sliding window with a score bias")
    return longest


def _mask_pattern(mask: torch.Tensor, n: int) -> MaskPattern:
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (n, n):
        raise MaskNotCacheable(f"has shape {tuple(mask.shape)}, not [..., seq, seq]")
    if mask.dtype == torch.bool:
        allowed, bias = mask, None
    elif mask.is_floating_point():
        allowed = mask > _MASKED
        bias = torch.where(allowed, mask, torch.zeros((), dtype=mask.dtype))
    else:
        raise MaskNotCacheable(f"has dtype {mask.dtype}")
    rows = allowed.reshape(-1, n, n)
    if not bool((rows == rows[0]).all()):
        raise MaskNotCacheable("differs between batch rows or heads")
    steps = torch.arange(n)
    distance = steps[:, None] - steps[None, :]  # query - key
    window = int(rows[0, -1].sum())
    if not torch.equal(rows[0], (distance >= 0) & (distance < window)):
        raise MaskNotCacheable("is neither causal nor a causal sliding window")
    slopes = None
    if bias is not None and window > 1 and bool(bias.ne(0).any()):
        slopes = _alibi_slopes(bias, rows[0], distance)
    return MaskPattern(window if window < n else 0, slopes)


def _alibi_slopes(bias: torch.Tensor, allowed: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Per-head s with bias[h, q, k] = s[h] * (k - q) + (anything constant along a row, which
    softmax ignores) on the allowed keys."""
    if bias.dim() == 4:
        if not bool((bias == bias[:1]).all()):
            raise MaskNotCacheable("has a score bias that differs between batch rows")
        bias = bias[0]
    if bias.dim() == 2:
        bias = bias[None]
    if bias.dim() != 3:
        raise MaskNotCacheable(f"has a score bias of shape {tuple(bias.shape)}")
    bias = bias.double()
    relative = bias - bias.diagonal(dim1=-2, dim2=-1)[..., :, None]  # bias[h, q, k] - bias[h, q, q]
    slopes = -relative[:, -1, -2]  # bias[h, q, q - 1] - bias[h, q, q] = -s[h]
    expected = slopes[:, None, None] * -distance.double()
    error = (relative - expected).abs().masked_fill(~allowed, 0).max()
    if float(error) > 1e-4 * max(1.0, float(relative.abs().max())):
        raise MaskNotCacheable("adds a score bias that is not linear in the key distance (ALiBi)")
    return slopes.float()


def _position_candidates(shapes: ShapeValues) -> list[torch.fx.Node]:
    """Nodes whose value is the token positions `arange(seq)` ([seq], [1, seq] or [batch, seq]),
    computed from the sequence length alone: `arange`, `cumsum(ones) - 1` (OPT), ..."""
    tokens = value(shapes.tokens)
    batch, seq = tokens.shape
    nodes = []
    for node in shapes.gm.graph.nodes:
        v = value(node)
        if not shapes.shape_only(node) or not isinstance(v, torch.Tensor) or v.dim() not in (1, 2):
            continue
        if (
            v.dtype == torch.bool
            or str(v.shape[-1]) != str(seq)
            or (v.dim() == 2 and str(v.shape[0]) not in ("1", str(batch)))
        ):
            continue
        nodes.append(node)
    for n in shapes.lengths(shapes.example.shape[1] + 1):  # two lengths when the sequence is dynamic
        if nodes:
            nodes = [node for node, v in zip(nodes, shapes.evaluate(nodes, n)) if _is_arange(v, n)]
    return nodes


def _value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Users that read the value (not export's metadata checks, which go with it)."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def _is_arange(v: torch.Tensor, n: int) -> bool:
    return v.shape[-1] == n and bool((v == torch.arange(n, dtype=v.dtype).expand_as(v)).all())


# -- the rewrite -----------------------------------------------------------------------------------
class _StepBuilder:
    """Adds the step inputs, rewrites positions and attention sites, and returns the caches."""

    def __init__(self, gm: torch.fx.GraphModule, tokens: torch.fx.Node, max_len: int):
        self.gm, self.graph, self.tokens, self.max_len = gm, gm.graph, tokens, max_len
        self.cache_outputs: list[torch.fx.Node] = []
        self._last_input = tokens
        self.position_ids = self._input("position_ids")
        self.cache_position = self._input("cache_position")
        self.key_mask = self._input("key_mask")
        self._dense_mask = None
        self._distance = None
        self._biased_masks: dict = {}
        self._window_masks: dict = {}
        self._mask_parts = ()
        self._kv_len = None
        self._write_index: dict = {}

    def _input(self, name: str) -> torch.fx.Node:
        with self.graph.inserting_after(self._last_input):
            node = self.graph.placeholder(name)
        self._last_input = node
        return node

    def _call(self, op, *args, **kwargs) -> torch.fx.Node:
        return self.graph.call_function(op, args, kwargs)

    # positions ---------------------------------------------------------------------------------
    def replace_positions(self, candidates: list[torch.fx.Node]) -> int:
        """Every surviving computation of the positions `arange(seq)` (found by value, see
        `_position_candidates`) -> position_ids [B, T]: learned and rotary embeddings, and any offset
        the model adds (OPT's +2), then see the step's positions. The replaced node is the last of
        a single-use chain of position values (arange -> +0 -> unsqueeze(0) -> to(int64) ...)."""
        alive = set(self.graph.nodes)
        members = {n for n in candidates if n in alive}
        roots = [n for n in candidates if n in members and not any(a in members for a in n.all_input_nodes)]
        return sum(self._replace_chain(root, members) for root in roots)

    def _replace_chain(self, node: torch.fx.Node, members: set) -> int:
        end, users = node, _value_users(node)
        while len(users) == 1 and users[0] in members:
            end, users = users[0], _value_users(users[0])
        v = value(end)
        if v.dim() == 1 and users and all(u in members for u in users):  # [T] -> each [1, T] use
            return sum(self._replace_chain(u, members) for u in users)
        with self.graph.inserting_before(end):
            # a [T] row of positions becomes the [B, T] rows (left padding gives each row its own),
            # which the batch-broadcasting uses of [T] positions (embedding + x) take as they are
            positions = self.position_ids
            if v.dtype != torch.int64:
                positions = self._call(aten.to.dtype, positions, v.dtype)
        end.replace_all_uses_with(positions)
        return 1

    # caches --------------------------------------------------------------------------------------
    def cache_site(self, index: int, site: _Site) -> dict:
        """Give `site` its cache inputs and replace it by its cached form; returns its cache spec."""
        k_val, v_val = value(site.key), value(site.value)
        kv_heads, head_dim, v_dim = k_val.shape[1], k_val.shape[-1], v_val.shape[-1]
        dtype = str(k_val.dtype).replace("torch.", "")
        if site.kind == "linear":  # recurrent state Σφ(k)vᵀ and Σφ(k), per K/V head
            caches = [
                (f"kv_state_{index}", [None, kv_heads, head_dim, v_dim]),
                (f"k_sum_{index}", [None, kv_heads, head_dim]),
            ]
        else:  # K/V: every slot (dense), or a ring of `window` slots
            slots = self.max_len if site.kind == "dense" else min(site.window, self.max_len)
            caches = [
                (f"k_cache_{index}", [None, kv_heads, slots, head_dim]),
                (f"v_cache_{index}", [None, kv_heads, slots, v_dim]),
            ]
        first, second = (self._input(name) for name, _ in caches)
        with self.graph.inserting_before(site.node):
            new, updated = self._cached_form(site, first, second)
        self.cache_outputs += updated
        copy_placement(site.node, new)
        site.node.replace_all_uses_with(new)
        self.graph.erase_node(site.node)
        return {
            "module": site.path,
            "kind": site.kind,
            "caches": [{"name": name, "shape": shape, "dtype": dtype} for name, shape in caches],
        }

    def _cached_form(self, site: _Site, first: torch.fx.Node, second: torch.fx.Node):
        """(attention output, [updated caches]) of the site over its caches."""
        if site.kind == "dense":
            k_all, v_all = self._write(first, site.key), self._write(second, site.value)
            mask = self._mask(site.window) if site.slopes is None else self._biased_mask(site)  # before the first site
            # attend over the filled slots only: k_all[:, :, :L] (a view; the full buffers are the outputs)
            k_used, v_used = (self._call(aten.slice.Tensor, c, 2, 0, self._filled()) for c in (k_all, v_all))
            kwargs = {"attn_mask": mask, "scale": site.scale}
            if site.gqa:
                kwargs["enable_gqa"] = True
            if site.extra:  # an optpipe dense op: its own arguments, by name
                kwargs.update(
                    site.extra, query=site.query, key=k_used, value=v_used, is_causal=False, enable_gqa=site.gqa
                )
                return self._call(site.node.target, **kwargs), [k_all, v_all]
            return self._call(SDPA, site.query, k_used, v_used, **kwargs), [k_all, v_all]
        if site.kind == "sliding-window":
            result = self._call(
                torch.ops.optpipe.cached_window_attention.default,
                site.query,
                site.key,
                site.value,
                first,
                second,
                self.cache_position,
                self.key_mask,
                site.window,
                value(site.query).shape[-1] ** -0.5 if site.scale is None else site.scale,
            )
        else:
            result = self._call(
                torch.ops.optpipe.cached_linear_attention.default,
                site.query,
                site.key,
                site.value,
                first,
                second,
                self.key_mask,
                self.cache_position,
                site.feature_map,
            )
        return self._call(_getitem, result, 0), [self._call(_getitem, result, i) for i in (1, 2)]

    def _write(self, cache: torch.fx.Node, new: torch.fx.Node) -> torch.fx.Node:
        """cache[:, :, cache_position] = new, in place, as an `index_put_` with one broadcast index
        tensor per dim (what every target's importer takes; TVM's cannot fill in omitted dims).
        The index tensors are built once per shape of `new` and shared by every site that has it."""
        shape = tuple(str(s) for s in value(new).shape)
        if shape not in self._write_index:
            size = lambda d: self._call(aten.sym_size.int, new, d)
            device = value(self.tokens).device
            shapes = ([-1, 1, 1, 1], [1, -1, 1, 1], None, [1, 1, 1, -1])
            index = []
            for d, view in enumerate(shapes):
                if view is None:
                    index.append(self._call(aten.view.default, self.cache_position, [1, 1, -1, 1]))
                else:
                    steps = self._call(aten.arange.default, size(d), dtype=torch.int64, device=device)
                    index.append(self._call(aten.view.default, steps, view))
            self._write_index[shape] = index
        return self._call(aten.index_put_.default, cache, self._write_index[shape], new)

    def _filled(self) -> torch.fx.Node:
        """L = key_mask.shape[1]: the slots a step attends over (built before the first dense site)."""
        if self._kv_len is None:
            self._kv_len = self._call(aten.sym_size.int, self.key_mask, 1)
            self._kv_len.meta["nn_module_stack"] = {}
        return self._kv_len

    def _mask(self, window: int = 0) -> torch.fx.Node:
        """[B, 1, T, L] bool: slot <= the query's slot (and > slot - window) and a real token, or the
        query itself."""
        if self._dense_mask is None:  # at the caller's insertion point: before the first dense site
            slots = self._call(aten.arange.default, self._filled(), dtype=torch.int64, device=value(self.tokens).device)
            q_slot = self._call(aten.unsqueeze.default, self.cache_position, -1)
            causal = self._call(aten.le.Tensor, slots, q_slot)
            itself = self._call(aten.eq.Tensor, slots, q_slot)
            # unsqueeze, not view: a runner may pass a narrowed (strided) view of a longer mask
            keys = self._call(aten.unsqueeze.default, self._call(aten.unsqueeze.default, self.key_mask, 1), 1)
            allowed = self._call(aten.logical_and.default, causal, keys)
            self._dense_mask = self._call(aten.logical_or.default, allowed, itself)
            self._distance = self._call(aten.sub.Tensor, slots, q_slot)  # [T, L] key slot - query slot
            self._mask_parts = (allowed, itself)
            for node in (slots, q_slot, causal, itself, keys.args[0], keys, allowed, self._dense_mask, self._distance):
                node.meta["nn_module_stack"] = {}
        if window and window not in self._window_masks:
            allowed, itself = self._mask_parts
            recent = self._call(aten.gt.Scalar, self._distance, -window)  # key slot > query slot - window
            windowed = self._call(aten.logical_and.default, allowed, recent)
            self._window_masks[window] = self._call(aten.logical_or.default, windowed, itself)
            for node in (recent, windowed, self._window_masks[window]):
                node.meta["nn_module_stack"] = {}
        return self._window_masks[window] if window else self._dense_mask

    def _biased_mask(self, site: _Site) -> torch.fx.Node:
        """ALiBi: [B, H, T, L] float, slope[h] * (key slot - query slot) where `_mask` allows, else
        -inf. Slots differ from positions by a per-row constant (left padding), which softmax ignores."""
        key = tuple(site.slopes.tolist())
        if key not in self._biased_masks:
            allowed = self._mask()
            dtype = value(site.query).dtype
            slopes = add_tensor(self.gm, "", "alibi_slopes", site.slopes.to(dtype).view(1, -1, 1, 1))
            nodes = [self.graph.get_attr(slopes)]
            nodes.append(self._call(aten.to.dtype, self._distance, dtype))
            nodes.append(self._call(aten.mul.Tensor, nodes[0], nodes[1]))  # [1, H, T, L]
            nodes.append(self._call(aten.where.ScalarOther, allowed, nodes[2], float("-inf")))
            for node in nodes:
                node.meta["nn_module_stack"] = {}
            self._biased_masks[key] = nodes[-1]
        return self._biased_masks[key]

    def finish(self) -> None:
        """Plain positional calling convention; outputs (logits, *updated caches)."""
        out = next(n for n in self.graph.nodes if n.op == "output")
        flat = out.args[0]
        logits = flat[0] if isinstance(flat, (list, tuple)) else flat
        out.args = (tuple([logits] + self.cache_outputs),)
        self.graph._codegen = torch.fx.graph.CodeGen()
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(self.gm, attr):
                delattr(self.gm, attr)
        _drop_guards(self.gm)
        self.graph.lint()
        self.gm.recompile()


def _drop_guards(gm: torch.fx.GraphModule) -> None:
    """The captured program's input guards check the old signature; the step program's inputs are
    checked by its own runner (and re-exported with new guards when saved)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")


def _example_step_inputs(program: Program, batch: int, length: int) -> tuple:
    """A prefill of the example tokens from empty caches, its mask narrowed to the tokens written.
    That length must not equal max_len: an export traced there would fix L to max_len (the slice
    of the whole buffer), so a prompt as long as the cache is shortened by one token."""
    from optpipe.kv_step import empty_caches, filled, prefill_inputs

    ids = program.example_inputs[0]
    max_len = program.meta["kv_cache"]["max_len"]
    if ids.shape[1] >= max_len > 1:
        ids = ids[:, : max_len - 1]
    caches = empty_caches(program.meta["kv_cache"], batch, device=ids.device)
    ids, position_ids, cache_position, key_mask = prefill_inputs(ids, max_len)
    return (ids, position_ids, cache_position, filled(key_mask, ids.shape[1])) + tuple(caches)


def _propagate_meta(gm: torch.fx.GraphModule, program: Program) -> None:
    """Fake-tensor metadata (with the symbolic batch, sequence and filled length) for the new and
    changed nodes."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    tokens = next(n for n in gm.graph.nodes if n.op == "placeholder")
    mode = detect_fake_mode([tokens.meta["val"]])
    batch, seq = tokens.meta["val"].shape
    kv_len = hint = program.example_inputs[3].shape[1]
    if mode.shape_env is not None:  # L: its own symbol (hinted below max_len, where slicing would fix it)
        env = mode.shape_env
        kv_len = env.create_symintnode(
            env.create_symbol(hint, ConstantSource("kv_len"), dynamic_dim=DimDynamic.DYNAMIC), hint=hint
        )
    fakes = [tokens.meta["val"]]
    with mode:
        fakes.append(torch.empty(batch, seq, dtype=torch.int64))
        fakes.append(torch.empty(seq, dtype=torch.int64))
        fakes.append(torch.empty(batch, kv_len, dtype=torch.bool))
        for layer in program.meta["kv_cache"]["layers"]:
            for cache in layer["caches"]:
                fakes.append(torch.empty(batch, *cache["shape"][1:], dtype=getattr(torch, cache["dtype"])))
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    except Exception as e:
        raise PassError(
            f"kv-cache: the step program does not type-check: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}",
            "positions are probably computed in a way the pass does not recognise; "
            "rerun with --dump-ir DIR to see the graph",
        ) from e
    for node, fake in zip([n for n in gm.graph.nodes if n.op == "placeholder"], fakes):
        node.meta["val"] = fake
