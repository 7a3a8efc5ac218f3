"""The kv-cache family's shared toolkit: which attention sites can be cached (`attention_site`),
values that depend on the token ids' shape only (`ShapeValues`: positions and masks, recognised by
what they compute), and the rewrite into a step program (`StepBuilder`: step inputs, per-site caches,
positions). `passes/kv_cache.py` (causal LMs) and `passes/kv_cache_encoder_decoder.py` (T5, BART)
build their step programs with it; see kv_cache.py's docstring for the contract and the site kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import getitem as _getitem

import torch
import torch.fx

from optpipe.attention_sites import SDPA, sdpa_arguments
from optpipe.errors import PassError
from optpipe.graph_toolkit import add_tensor, copy_placement, module_path, value
from optpipe.ops import is_optpipe_op
from optpipe.program import Program

from . import kv_cache_ops  # noqa: F401 - defines optpipe.cached_window_attention / cached_linear_attention
from .cleanup import eliminate_dead_code

aten = torch.ops.aten
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "block_size", "n_ctx", "max_seq_len")


@dataclass
class Site:
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
    relative_bias: tuple | None = None
    """(distance, bias, negate): the model computes its score bias `bias` [.., H, T, T] from the
    distance node (key - query positions, or query - key when `negate`); T5's bucketed relative bias."""
    note: str = ""
    extra: dict = field(default_factory=dict)
    """A dense optpipe op's own arguments (score_mod_attention's modifier), kept as they are."""


# -- what can be cached ----------------------------------------------------------------------------
_ATTENTION_OPS = ("sparse_attention", "linear_attention", "performer_attention", "linformer_attention")
_DENSE_OPS = ("score_mod_attention",)  # SDPA's arguments plus a score modifier: cached like SDPA
_SDPA_LIKE = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def is_attention_site(node: torch.fx.Node) -> bool:
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


def attention_site(node: torch.fx.Node, shapes: ShapeValues, max_len: int) -> Site:
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
        return Site(node, kind, path, a["query"], a["key"], a["value"], a["scale"], window=a["window"])
    elif kind == "linear":
        return Site(node, kind, path, a["query"], a["key"], a["value"], feature_map=a["feature_map"])
    else:
        reason = f"{kind} attention has no incremental form here"
    raise PassError(
        f"kv-cache: cannot cache the {kind} attention at {path}: {reason}",
        "keep this layer dense (attention{...,layers=...}) or generate without a cache",
    )


def _sdpa_site(node: torch.fx.Node, path: str, shapes: ShapeValues, max_len: int) -> Site:
    """A causal SDPA, or one whose mask is a function of positions the cache can compute for any
    offset: causal, a native sliding window (-> the ring-buffer cache), or causal plus ALiBi."""
    a = sdpa_arguments(node) if node.target is SDPA else _op_arguments(node)
    if a.get("dropout_p"):
        raise PassError(f"kv-cache: attention at {path} applies dropout", "cache an eval-mode model")
    site = Site(node, "dense", path, a["query"], a["key"], a["value"], a.get("scale"), bool(a.get("enable_gqa")))
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


def model_max_len(program: Program) -> int:
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
        ids = torch.zeros(self.example.shape[0], length, dtype=self.example.dtype, device=self.example.device)
        return evaluate_nodes(self.gm, {self.tokens: ids}, nodes)


def evaluate_nodes(gm: torch.fx.GraphModule, feeds: dict, nodes: list) -> list[torch.Tensor]:
    """The values of `nodes` with placeholders set from `feeds` (only the nodes they need run)."""
    needed, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack += node.all_input_nodes
    interpreter = torch.fx.Interpreter(gm)
    interpreter.env.update(feeds)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node in needed and node not in feeds:
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


def position_candidates(shapes: ShapeValues) -> list[torch.fx.Node]:
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
class StepBuilder:
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
        `position_candidates`) -> position_ids [B, T]: learned and rotary embeddings, and any offset
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
    def cache_site(self, index: int, site: Site) -> dict:
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

    def _cached_form(self, site: Site, first: torch.fx.Node, second: torch.fx.Node):
        """(attention output, [updated caches]) of the site over its caches."""
        if site.kind == "dense":
            k_all, v_all = self._write(first, site.key), self._write(second, site.value)
            if site.relative_bias is not None:
                mask = self._relative_mask(site)
            else:  # built before the first site
                mask = self._mask(site.window) if site.slopes is None else self._biased_mask(site)
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

    def _biased_mask(self, site: Site) -> torch.fx.Node:
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

    def _relative_mask(self, site: Site) -> torch.fx.Node:
        """[B, H, T, L]: the model's own bias computation fed the slot distance [T, L] instead of its
        [T, T] positions (so the bias follows the step's slots), where `_mask` allows, else -inf."""
        distance, bias, negate = site.relative_bias
        if bias not in self._biased_masks:
            allowed = self._mask()
            new = self._distance if not negate else self._call(aten.neg.default, self._distance)
            new.meta["nn_module_stack"] = {}
            copies = {distance: new}  # a copy of the bias computation, reading the slot distance
            for node in _between(distance, bias):
                copies[node] = self.graph.node_copy(node, lambda n: copies.get(n, n))
            masked = self._call(aten.where.ScalarOther, allowed, copies[bias], float("-inf"))
            masked.meta["nn_module_stack"] = {}
            self._biased_masks[bias] = masked
        return self._biased_masks[bias]

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
        drop_guards(self.gm)
        self.graph.lint()
        self.gm.recompile()


def _between(first: torch.fx.Node, last: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes on paths from `first` (excluded) to `last` (included), in graph order."""
    reach, order = {first}, []
    for node in first.graph.nodes:
        if node is not first and any(a in reach for a in node.all_input_nodes):
            reach.add(node)
            order.append(node)
        if node is last:
            break
    needed, stack = set(), [last]
    while stack:
        node = stack.pop()
        if node not in needed and node in reach:
            needed.add(node)
            stack += node.all_input_nodes
    return [n for n in order if n in needed]


def drop_guards(gm: torch.fx.GraphModule) -> None:
    """The captured program's input guards check the old signature; the step program's inputs are
    checked by its own runner (and re-exported with new guards when saved)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")


def rewrite_step(gm: torch.fx.GraphModule, tokens, max_len: int, sites: list, position_nodes) -> tuple[list, int]:
    """Cache every site and give the step's positions to what read arange(seq): the rewrite both
    kv-cache flows share. Returns (the layers' cache descriptions, positions replaced)."""
    builder = StepBuilder(gm, tokens, max_len)
    layers = [builder.cache_site(i, s) for i, s in enumerate(sites)]
    builder.finish()
    eliminate_dead_code(gm)  # the masks the cache replaced, and the positions only they read
    replaced = builder.replace_positions(position_nodes)
    eliminate_dead_code(gm)  # no step should still compute arange(T)
    gm.graph.lint()
    gm.recompile()
    return layers, replaced


def kind_counts(sites: list) -> dict[str, int]:
    """How many sites of each cache kind (the pass's stats)."""
    kinds = [s.kind for s in sites]
    return {kind: kinds.count(kind) for kind in sorted(set(kinds))}


def propagate_step_meta(
    gm: torch.fx.GraphModule, program: Program, *, what: str, hint: str, extra=None, fake_values: list = ()
) -> None:
    """Fake-tensor metadata for every node of a step program: symbolic batch and sequence from the
    token input, the filled length L its own symbol (hinted by the example key mask), the caches at
    their shapes, then `extra(batch)`'s fakes for the step's trailing inputs (made in the fake mode of
    the tokens and `fake_values`).
    A step that does not type-check is a PassError naming `what`, with `hint`."""
    from torch._dynamo.source import ConstantSource
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.symbolic_shapes import DimDynamic
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tokens = placeholders[0]
    mode = detect_fake_mode([tokens.meta["val"], *fake_values])
    batch, seq = tokens.meta["val"].shape
    kv_len = hint_len = program.example_inputs[3].shape[1]
    if mode.shape_env is not None:  # L: its own symbol (hinted below max_len, where slicing would fix it)
        env = mode.shape_env
        symbol = env.create_symbol(hint_len, ConstantSource("kv_len"), dynamic_dim=DimDynamic.DYNAMIC)
        kv_len = env.create_symintnode(symbol, hint=hint_len)
    fakes = [tokens.meta["val"]]
    with mode:
        fakes += [torch.empty(batch, seq, dtype=torch.int64), torch.empty(seq, dtype=torch.int64)]
        fakes.append(torch.empty(batch, kv_len, dtype=torch.bool))
        for cache in (c for layer in program.meta["kv_cache"]["layers"] for c in layer["caches"]):
            fakes.append(torch.empty(batch, *cache["shape"][1:], dtype=getattr(torch, cache["dtype"])))
        fakes += list(extra(batch)) if extra is not None else []
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
    except Exception as e:
        raise PassError(
            f"kv-cache: {what} does not type-check: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            hint,
        ) from e
    for node, fake in zip(placeholders, fakes):
        node.meta["val"] = fake


def example_prefill(ids: torch.Tensor, kv: dict) -> tuple:
    """A step program's example: a prefill of the example tokens `ids` [B, T] from empty caches
    (`kv`: the program's meta["kv_cache"]), its mask narrowed to the tokens written. That length
    must not equal max_len: an export traced there would fix L to max_len (the slice of the whole
    buffer), so a prompt as long as the cache is shortened by one token (a contiguous copy: the
    exporters guard on the example's strides)."""
    from optpipe.kv_step import empty_caches, filled, prefill_inputs

    max_len = kv["max_len"]
    if ids.shape[1] >= max_len > 1:
        ids = ids[:, : max_len - 1].contiguous()
    caches = empty_caches(kv, ids.shape[0], device=ids.device)
    ids, position_ids, cache_position, key_mask = prefill_inputs(ids, max_len)
    return (ids, position_ids, cache_position, filled(key_mask, ids.shape[1])) + tuple(caches)
