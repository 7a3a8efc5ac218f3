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
- Anything else (bidirectional attention, other sparse patterns, performer, linformer, non-causal
  masks) cannot be cached: the pass stops with the site and the reason.

Positions: the `arange(seq)` that position embeddings (learned, or RoPE) are computed from is
replaced by `position_ids`, so both see the offset. Causal masks must already be canonical
(`is_causal=True`, which `fuse-attention` produces); the pass refuses explicit masks.

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
from optpipe.graph_toolkit import copy_placement, module_path, value
from optpipe.kv_step import STEP_INPUTS
from optpipe.ops import is_optpipe_op
from optpipe.program import Program
from optpipe.registry import PassResult, register_pass

from . import kv_cache_ops  # noqa: F401 - defines optpipe.cached_window_attention / cached_linear_attention

aten = torch.ops.aten
_ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)
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


@register_pass("kv-cache", KVCacheConfig, exact=True)
def kv_cache(program: Program, config: KVCacheConfig) -> PassResult:
    """Turn a causal LM into a step program with static KV caches (prefill + decode)."""
    if program.meta.get("kv_cache"):
        return PassResult(False, {"sites": 0, "cached": 0}, {"reason": "the program already has a KV cache"})
    gm = program.gm
    tokens = _token_input(program)
    sites = [_site(n) for n in gm.graph.nodes if _is_attention(n)]
    if not sites:
        return PassResult(False, {"sites": 0, "cached": 0}, {"reason": "no attention sites"})
    max_len = config.max_len or _model_max_len(program)
    example_len = program.example_inputs[0].shape[1]
    if max_len < example_len:
        raise PassError(
            f"kv-cache: max-len {max_len} is shorter than the example input ({example_len} tokens)",
            "give kv-cache{max-len=N} with N >= prompt + new tokens",
        )
    _single_output(gm)

    builder = _StepBuilder(gm, tokens, max_len)
    positions = builder.replace_positions()
    layers = [builder.cache_site(i, s) for i, s in enumerate(sites)]
    builder.finish()

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
    return PassResult(True, stats, {"max_len": max_len, "layers": layers})


# -- what can be cached ----------------------------------------------------------------------------
_ATTENTION_OPS = ("sparse_attention", "linear_attention", "performer_attention", "linformer_attention")


def _is_attention(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and (
        node.target is SDPA or (is_optpipe_op(node.target) and node.target._opname in _ATTENTION_OPS)
    )


def _op_arguments(node: torch.fx.Node) -> dict:
    """An optpipe op's arguments by name (schema defaults filled in)."""
    schema = node.target._schema.arguments
    args = {a.name: a.default_value for a in schema if a.has_default_value()}
    args.update(zip((a.name for a in schema), node.args))
    args.update(node.kwargs)
    return args


def _site(node: torch.fx.Node) -> _Site:
    path = module_path(node) or node.name
    if node.target is SDPA:
        a = sdpa_arguments(node)
        if not a["is_causal"] or a["attn_mask"] is not None:
            raise PassError(
                f"kv-cache: attention at {path} is not plain causal attention "
                f"({'a mask argument' if a['attn_mask'] is not None else 'bidirectional'}); "
                "only causal self-attention can be cached",
                "run fuse-attention first, which turns causal masks into is_causal",
            )
        if a["dropout_p"]:
            raise PassError(f"kv-cache: attention at {path} applies dropout", "cache an eval-mode model")
        return _Site(node, "dense", path, a["query"], a["key"], a["value"], a.get("scale"), bool(a.get("enable_gqa")))
    a, op = _op_arguments(node), node.target._opname
    kind = a["pattern"] if op == "sparse_attention" else op.replace("_attention", "")
    if not a.get("causal"):
        reason = "it is bidirectional"
    elif a.get("key_padding_mask") is not None:
        reason = "it has a key padding mask"
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
    def replace_positions(self) -> int:
        """`arange(seq)` (and `arange(seq).unsqueeze(0)`) -> position_ids [B, T]."""
        seq = value(self.tokens).shape[1]
        count = 0
        for node in list(self.graph.nodes):
            if node.op != "call_function" or node.target not in _ARANGES or not node.users:
                continue
            start, end, step = _arange_bounds(node)
            if start != 0 or step != 1 or not _same_sym(end, seq):
                continue
            chain, offset = [node], 0
            while len(chain[-1].users) == 1:
                user = next(iter(chain[-1].users))
                if user.target is aten.add.Tensor and user.args[0] is chain[-1] and isinstance(user.args[1], int):
                    offset += user.args[1]
                    chain.append(user)
                    continue
                if user.target is aten.unsqueeze.default and user.args[1] == 0:
                    chain.append(user)  # [1, T]: the batch dim position_ids already has
                break
            with self.graph.inserting_before(chain[-1]):
                positions = self.position_ids if offset == 0 else self._call(aten.add.Tensor, self.position_ids, offset)
            chain[-1].replace_all_uses_with(positions)
            for dead in reversed(chain):  # no step should still compute arange(T)
                if not dead.users:
                    self.graph.erase_node(dead)
            count += 1
        return count

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
            kwargs = {"attn_mask": self._mask(), "scale": site.scale}  # mask built before the first site
            if site.gqa:
                kwargs["enable_gqa"] = True
            # attend over the filled slots only: k_all[:, :, :L] (a view; the full buffers are the outputs)
            k_used, v_used = (self._call(aten.slice.Tensor, c, 2, 0, self._filled()) for c in (k_all, v_all))
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
                site.scale,
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

    def _mask(self) -> torch.fx.Node:
        """[B, 1, T, L] bool: slot <= the query's slot and a real token, or the query itself."""
        if self._dense_mask is None:  # at the caller's insertion point: before the first dense site
            slots = self._call(aten.arange.default, self._filled(), dtype=torch.int64, device=value(self.tokens).device)
            q_slot = self._call(aten.unsqueeze.default, self.cache_position, -1)
            causal = self._call(aten.le.Tensor, slots, q_slot)
            itself = self._call(aten.eq.Tensor, slots, q_slot)
            # unsqueeze, not view: a runner may pass a narrowed (strided) view of a longer mask
            keys = self._call(aten.unsqueeze.default, self._call(aten.unsqueeze.default, self.key_mask, 1), 1)
            allowed = self._call(aten.logical_and.default, causal, keys)
            self._dense_mask = self._call(aten.logical_or.default, allowed, itself)
            for node in (slots, q_slot, causal, itself, keys.args[0], keys, allowed, self._dense_mask):
                node.meta["nn_module_stack"] = {}
        return self._dense_mask

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


def _arange_bounds(node: torch.fx.Node):
    args = list(node.args)
    if node.target is aten.arange.default:
        return 0, args[0], 1
    start, end = args[0], args[1]
    step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
    return start, end, step


def _same_sym(end, seq) -> bool:
    end_val = end.meta.get("val") if isinstance(end, torch.fx.Node) else end
    try:
        return str(end_val) == str(seq)
    except Exception:  # noqa: BLE001
        return False


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
