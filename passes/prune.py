"""prune: remove attention heads and MLP channels (structured), or zero weights (unstructured, 2:4).

    method=structured   rank units by importance and PHYSICALLY remove the lowest `sparsity` of them:
                        target=heads: attention heads (under grouped-query attention a unit is a K/V
                          head with the query heads that share it, so the GQA ratio stays valid);
                        target=mlp: MLP intermediate channels (gate and up rows, down columns together);
                        target=all: both.
                        The linears get smaller weights (new nn.Parameters), and the graph's size
                        constants follow: `view(B,S,4,16)` -> `view(B,S,2,16)`, `split(qkv,64)` ->
                        `split(qkv,32)`, `reshape(B,S,64)` -> `reshape(B,S,32)`.
    method=magnitude    zero the `sparsity` smallest |W| of each linear (per layer); graph unchanged
    method=wanda        zero the `sparsity` lowest |W_ij|·‖X_j‖₂ of each output row (X: calibration
                        activations of the linear's input, see `optpipe.calibration`)
    method=2:4          keep the 2 largest of every 4 consecutive input weights (|W|, or the wanda
                        score with importance=activation); on CUDA half/bfloat16 weights are stored
                        with `torch.sparse.to_sparse_semi_structured`, elsewhere as masked dense.

Sites are found on use-def structure, not names:
- an MLP group is a linear ("down") whose input is computed from other linears' outputs ("up",
  "gate") through elementwise ops and views that keep the channel dim only, where nothing else
  reads those values (BERT intermediate/output, GPT-2 c_fc/c_proj via addmm, Llama gate/up/down,
  Falcon's `x @ W.T`); a producer may be equal pieces of one fused linear (Phi-3's
  `gate_up_proj(x).chunk(2, -1)`: the kept channels' rows are kept in every piece); MoE experts
  stacked in [E, N, K] weights (transformers' experts modules, captured densely) form a group too,
  and the same channel slots are removed from every expert (importance summed over the experts);
- a head group is an `aten.scaled_dot_product_attention` node (run `fuse-attention` first) whose
  q, k and v come from projections through a head split (`view(.., H, D)`), transposes and RoPE-like
  elementwise ops (slices and cats over head_dim only), and whose output is merged back
  (`transpose -> reshape(.., H*D)`) into one output projection. Fused QKV (`split` of one linear,
  GPT-2 Conv1D, nanoGPT) works.
Anything else is refused, with the reason in the details: a linear reached through an activation
function (it looks like an MLP's down projection) or a linear-like node on an unsupported weight is
listed in details["skipped"] as {"site": module path, "reason"} (the per-site contract, also for
tied / deselected groups and unstructured skips), and details["notes"] says when nothing was found
or nothing pruned. After the weights shrink, the graph is
re-run on the example inputs and every view/reshape/expand/split whose input shape changed gets
its literal sizes rewritten; a size that would have to change but comes from the input (a SymInt)
refuses the whole rewrite and restores the program.

Importance (structured): per unit, ‖W_out[:, unit]‖ · ‖W_in[unit, :]‖ (magnitude), or
‖X[:, unit]‖ · ‖W_out[:, unit]‖ with X the output projection's input on calibration data
(activation). importance=auto takes activations when calibration data is attached
(`optpipe.calibration.with_calibration`, `--calibration-data`), magnitudes otherwise.

Selection: `modules` / `skip` are globs over module paths with quantize's semantics (the whole path
or a dotted tail); a structured group is pruned only when every linear in it is selected.
Tied weights (an LM head sharing the embedding table) are never pruned. Unstructured masks are
not enforced during later training (fine-tuning regrows the zeros): prune again after training.

Preconditions: run after `fuse-attention` (head pruning looks at SDPA nodes and the `attention`
pass's ops, not at hand-written softmax(q @ kᵀ) @ v) and before
`quantize`. Stats: structured {"pruned_heads", "pruned_channels", "groups", "refused",
"params_before", "params_after"}; unstructured {"pruned", "skipped", "weights_zeroed",
"params_before", "params_after", "nonzero_after"}. Details: one entry per group / linear, keyed
by module path, with importance scores and what was removed.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx

from optpipe.attention_sites import SDPA, concrete, sdpa_arguments
from optpipe.graph_toolkit import module_path, value
from optpipe.program import Program
from optpipe.registry import LossyConfig, PassResult, config_fields, register_pass
from optpipe.weight_sites import (
    WeightSite,
    experts_site,
    linear_shape,
    logical_weight,
    path_matches,
    weight_readers,
    weight_site,
    weight_tensor,
)

aten = torch.ops.aten

METHODS = ("structured", "magnitude", "wanda", "2:4")
Method = Literal["structured", "magnitude", "wanda", "2:4"]
Target = Literal["all", "heads", "mlp"]
Importance = Literal["auto", "magnitude", "activation"]

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_UNARY = {
    aten.gelu.default,
    aten.relu.default,
    aten.silu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.erf.default,
    aten.neg.default,
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.alias.default,
    aten.leaky_relu.default,
    aten.hardtanh.default,
    aten.abs.default,
    aten.exp.default,
}
_BINARY = {
    aten.mul.Tensor,
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.div.Tensor,
    aten.pow.Tensor_Scalar,
    aten.mul.Scalar,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.div.Scalar,
    aten.pow.Tensor_Tensor,
    aten.where.self,
    aten.maximum.default,
    aten.minimum.default,
}
_HEAD_ELEMENTWISE = _UNARY | _BINARY | {aten.slice.Tensor, aten.cat.default}
_FREE = {
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.dropout.default,
}


@dataclass(frozen=True)
class PruneConfig(LossyConfig):
    method: Method = field(
        default="structured",
        metadata={
            "help": "structured (remove heads / MLP channels: smaller and faster), magnitude (zero the "
            "smallest |W| per layer), wanda (zero the lowest |W|·‖X‖ per output row), "
            "2:4 (2 of every 4 input weights kept)"
        },
    )
    target: Target = field(default="all", metadata={"help": "structured only: heads, mlp or all"})
    sparsity: float = field(
        default=0.5,
        metadata={
            "help": "fraction to remove: of heads / channels per layer (structured) or of weights "
            "(magnitude per layer, wanda per row); 2:4 is always 0.5"
        },
    )
    importance: Importance = field(
        default="auto",
        metadata={
            "help": "structured and 2:4 ranking: magnitude (weights only), activation (weights x "
            "calibration activations), auto (activation when calibration data is attached)"
        },
    )
    modules: tuple[str, ...] = field(
        default=("*",), metadata={"help": "globs of module paths (or their dotted tails) to prune, e.g. [*.mlp.*]"}
    )
    skip: tuple[str, ...] = field(
        default=(),
        metadata={"help": "globs of module paths (or dotted tails) to leave untouched, e.g. [lm_head,*.0.*]"},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"prune: unknown method {self.method!r} (methods: {', '.join(METHODS)})")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ValueError(f"prune: sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.method == "2:4" and self.sparsity != 0.5:
            raise ValueError(f"prune: method=2:4 always removes half the weights; drop sparsity={self.sparsity}")
        if self.method != "structured" and self.target != "all":
            raise ValueError(f"prune: target={self.target} is for method=structured only")
        if self.method in ("magnitude", "wanda") and self.importance != "auto":
            raise ValueError(f"prune: importance is implied by method={self.method}")
        for name in ("modules", "skip"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not all(isinstance(p, str) and p for p in value):
                raise ValueError(f"prune: {name} must be a list of module-path globs, got {value!r}")
        if not self.modules:
            raise ValueError("prune: modules is empty; use [*] for every module")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in config_fields(self)}


class Refused(Exception):
    """A site that cannot be pruned; the message goes into the details."""


# -- activations ----------------------------------------------------------------------------------------------
class _ChannelNorms(torch.fx.Interpreter):
    """Runs the graph, accumulating Σx² per last-dim channel of the watched nodes' values."""

    def __init__(self, gm, watched):
        super().__init__(gm)
        self.watched = set(watched)
        self.sumsq: dict[torch.fx.Node, torch.Tensor] = {}
        self.sums: dict[torch.fx.Node, torch.Tensor] = {}
        self.rows: dict[torch.fx.Node, int] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watched and isinstance(out, torch.Tensor) and out.is_floating_point():
            x = out.detach().double().reshape(-1, out.shape[-1])
            self.sumsq[n] = self.sumsq.get(n, 0) + x.pow(2).sum(0)
            self.sums[n] = self.sums.get(n, 0) + x.sum(0)
            self.rows[n] = self.rows.get(n, 0) + x.shape[0]
        return out


def channel_stats(program: Program, nodes, limit: int = 8) -> dict[torch.fx.Node, tuple[torch.Tensor, torch.Tensor]]:
    """(‖X_j‖₂, mean X_j) over the calibration inputs for each node's last-dim channel j."""
    from optpipe.calibration import calibration_inputs

    recorder = _ChannelNorms(program.gm, nodes)
    with torch.no_grad():
        for inputs in calibration_inputs(program, limit=limit):
            recorder.run(*inputs)
    return {n: (s.sqrt().float(), (recorder.sums[n] / recorder.rows[n]).float()) for n, s in recorder.sumsq.items()}


def channel_norms(program: Program, nodes, limit: int = 8) -> dict[torch.fx.Node, torch.Tensor]:
    """‖X_j‖₂ over the calibration inputs for each node's last-dim channel j (float32)."""
    return {n: norm for n, (norm, _) in channel_stats(program, nodes, limit).items()}


def _use_activations(program: Program, config: PruneConfig) -> bool:
    if config.method == "wanda":
        return True
    if config.importance == "auto":
        return bool(program.calibration)
    return config.importance == "activation"


# -- selection helpers ----------------------------------------------------------------------------------------
def _selected(path: str, config: PruneConfig) -> str | None:
    """Why `path` is not pruned (None: it is)."""
    by = path_matches(path, config.skip)
    if by:
        return f"skip={by}"
    if not path_matches(path, config.modules):
        return f"not selected by modules={list(config.modules)}"
    return None


def is_tied(gm: torch.fx.GraphModule, site: WeightSite, among: set = frozenset()) -> bool:
    """Whether the weight is shared: read by a node other than the site's (and those `among`), or
    registered under another name."""
    weight = weight_tensor(gm, site.weight.target)
    others = set(weight_readers(gm, weight)) - {site.node} - set(among)
    names = [k for k, t in gm.named_parameters(remove_duplicate=False) if t is weight]
    return bool(others) or len(names) > 1


def _replace_param(gm, target: str, tensor: torch.Tensor) -> torch.Tensor:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, name)
    new = (
        torch.nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad)
        if isinstance(old, torch.nn.Parameter)
        else tensor.contiguous()
    )
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, name, new)
    else:
        owner.register_buffer(name, new)
    return old


def _count_params(gm) -> int:
    seen, total = set(), 0
    for t in gm.parameters():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


# -- structured: groups -----------------------------------------------------------------------------------
@dataclass
class _Slice:
    """Rows (producer) or columns (consumer) of a linear that carry one group's units:
    unit u owns [offset + u*per_unit, offset + (u+1)*per_unit)."""

    site: WeightSite
    offset: int
    per_unit: int

    def indices(self, units) -> list[int]:
        return [self.offset + u * self.per_unit + i for u in units for i in range(self.per_unit)]


@dataclass
class _Group:
    kind: str  # "heads" | "mlp"
    path: str
    units: int
    unit_name: str  # "head" | "kv-group" | "channel"
    producers: list[_Slice]
    consumer: _Slice
    nodes: set = field(default_factory=set)
    heads_per_unit: int = 1

    def linears(self) -> list[WeightSite]:
        return [s.site for s in self.producers] + [self.consumer.site]


def _sites_by_node(gm, experts: bool = False) -> dict[torch.fx.Node, WeightSite]:
    out = {}
    for node in gm.graph.nodes:
        site = weight_site(gm, node)
        if experts and not isinstance(site, WeightSite):
            site = experts_site(gm, node) or site
        if isinstance(site, WeightSite) and site.kind in ("linear", "experts"):
            out[node] = site
    return out


def _last(node) -> int | None:
    v = value(node)
    return concrete(v.shape[-1]) if v is not None and v.dim() else None


_PIECES = (aten.chunk.default, aten.split.Tensor)


def _piece(gm, node: torch.fx.Node, sites: dict, k: int) -> tuple[WeightSite, int] | None:
    """(linear, row offset) when `node` is one of k-wide equal pieces of a linear's output along the
    channel dim: Phi-3's fused `gate_up_proj(x).chunk(2, -1)`, or a `split(k, -1)`."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return None
    src, index = node.args
    if not (isinstance(src, torch.fx.Node) and src.target in _PIECES and src.args[0] in sites):
        return None
    site = sites[src.args[0]]
    rows = linear_shape(gm, site)[0]
    dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
    if dim not in (-1, value(src.args[0]).dim() - 1):
        return None
    width = rows // src.args[1] if src.target is aten.chunk.default and rows % src.args[1] == 0 else src.args[1]
    if width != k or rows % k:
        return None
    return site, index * k


_ACTIVATIONS = {
    aten.gelu.default,
    aten.relu.default,
    aten.silu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.leaky_relu.default,
    aten.hardtanh.default,
}


def _mlp_group(gm, consumer: WeightSite, sites: dict) -> _Group:
    """The linears feeding `consumer` through channel-wise ops (an MLP), or Refused. A refusal met
    after an activation function is marked `mlp_like` (the linear looks like an MLP's down
    projection, so the user wants to know why it was not pruned)."""
    activations: list[torch.fx.Node] = []
    try:
        return _mlp_walk(gm, consumer, sites, activations)
    except Refused as e:
        e.mlp_like = bool(activations)
        raise


def _mlp_walk(gm, consumer: WeightSite, sites: dict, activations: list) -> _Group:
    """`_mlp_group`'s use-def walk. A producer may be a piece of a fused linear (gate and up as
    halves of one `gate_up_proj`): its rows of every piece are pruned together, so every piece must
    belong to the MLP."""
    k = linear_shape(gm, consumer)[1]
    interior, producers, stack = set(), [], [consumer.x]
    while stack:
        node = stack.pop()
        if node in interior or any(p.site.node is node for p in producers):
            continue
        if not isinstance(node, torch.fx.Node) or _last(node) != k:
            raise Refused("input is not computed channel-wise from other linears")
        if node in sites:
            if linear_shape(gm, sites[node])[0] != k:
                raise Refused("a producing linear has a different width")
            producers.append(_Slice(sites[node], 0, 1))
            continue
        piece = _piece(gm, node, sites, k)
        if piece is not None:
            interior.update((node, node.args[0]))
            producers.append(_Slice(piece[0], piece[1], 1))
            continue
        t = node.target
        if node.op != "call_function":
            raise Refused(f"input reaches {node.op} {node.name}")
        interior.add(node)
        if t in _ACTIVATIONS:
            activations.append(node)
        if t in _VIEWS or t in _UNARY:
            stack.append(node.args[0])
        elif t in _BINARY:
            for a in list(node.args) + list(node.kwargs.values()):
                if isinstance(a, torch.fx.Node):
                    if _last(a) == 1 and k != 1:
                        continue  # per-token broadcast
                    stack.append(a)
        else:
            raise Refused(f"input goes through {t} ({node.name})")
    if not producers:
        raise Refused("no producing linear")
    for site in {id(p.site): p.site for p in producers}.values():
        if sum(k for p in producers if p.site is site) != linear_shape(gm, site)[0]:
            raise Refused(f"{site.path} has output rows the MLP does not read")
    group_nodes = interior | {p.site.node for p in producers}
    for n in group_nodes:
        if not set(n.users) <= group_nodes | {consumer.node}:
            raise Refused(f"{n.name} is also read outside the MLP")
    paths = [p.site.path for p in producers] + [consumer.path]
    return _Group("mlp", _common_prefix(paths), k, "channel", producers, _Slice(consumer, 0, 1), group_nodes)


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common) or paths[-1]


def _head_path(start, heads: int, nodes: set) -> torch.fx.Node:
    """Walk from an SDPA input back to the view splitting a projection into heads; returns that
    view. Every node on the way (with a head axis) is added to `nodes`."""
    splits, stack, seen = set(), [(start, 1)], set()
    while stack:
        node, axis = stack.pop()
        if (node, axis) in seen:
            continue
        seen.add((node, axis))
        v = value(node)
        if v is None or v.dim() != 4 or concrete(v.shape[axis]) != heads or node.op != "call_function":
            raise Refused(f"unexpected value on the head path at {getattr(node, 'name', node)}")
        nodes.add(node)
        t = node.target
        src = value(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) else None
        if t in _VIEWS and src is not None and src.dim() == 3:
            if axis != 2:
                raise Refused(f"head split {node.name} does not put heads at dim 2")
            splits.add(node)
        elif t is aten.transpose.int:
            a, b = node.args[1] % 4, node.args[2] % 4
            stack.append((node.args[0], b if axis == a else a if axis == b else axis))
        elif t is aten.permute.default:
            stack.append((node.args[0], node.args[1][axis] % 4))
        elif t in _HEAD_ELEMENTWISE:
            if t in (aten.slice.Tensor, aten.cat.default):
                dim = (node.args[1] if len(node.args) > 1 else 0) % 4
                if dim == axis:
                    raise Refused(f"{node.name} slices or concatenates across heads")
            args = node.args[0] if t is aten.cat.default else node.args
            for a in list(args):
                av = value(a)
                if av is None:
                    continue
                pos = axis - (4 - av.dim())
                if pos < 0 or av.shape[pos] == 1:
                    continue  # broadcast over heads (RoPE cos/sin, masks)
                stack.append((a, axis))
        else:
            raise Refused(f"{t} ({node.name}) between projection and attention")
    if len(splits) != 1:
        raise Refused("q/k/v does not come from a single head split")
    return splits.pop()


def _producer(split_view, sites: dict, nodes: set) -> tuple[WeightSite, int]:
    """The linear (and row offset inside it) whose output the head split reads."""
    node, offset = split_view.args[0], 0
    while True:
        if node in sites:
            nodes.add(node)
            return sites[node], offset
        nodes.add(node)
        if node.op == "call_function" and node.target in _VIEWS and _last(node.args[0]) == _last(node):
            node = node.args[0]
        elif (
            node.op == "call_function" and node.target is operator.getitem and node.args[0].target is aten.split.Tensor
        ):
            split = node.args[0]
            dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
            if dim not in (-1, value(split.args[0]).dim() - 1):
                raise Refused("projection split along a non-channel dim")
            offset += node.args[1] * split.args[1]
            nodes.add(split)
            node = split.args[0]
        else:
            raise Refused(f"head split reads {node.name}, not a projection")


def _same_shape(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = value(a), value(b)
    return va is not None and vb is not None and tuple(va.shape) == tuple(vb.shape)


def _output_consumer(sdpa, heads: int, head_dim: int, sites: dict, nodes: set) -> WeightSite:
    node, axis, merged = sdpa, 1, False
    while True:
        if len(node.users) != 1:
            raise Refused(f"attention output {node.name} has {len(node.users)} readers")
        user = next(iter(node.users))
        if user in sites and sites[user].x is node:
            if not merged:
                raise Refused("output projection reads unmerged heads")
            return sites[user]
        nodes.add(user)
        t = user.target
        if t is aten.transpose.int and not merged:
            a, b = user.args[1] % 4, user.args[2] % 4
            axis = b if axis == a else a if axis == b else axis
        elif t is aten.permute.default and not merged:
            axis = [p % 4 for p in user.args[1]].index(axis)
        elif t in _FREE or (t in _VIEWS and _same_shape(user, node)):  # HF's reshape(B, -1, S, D)
            pass
        elif t in _VIEWS and not merged:
            if axis != 2 or _last(user) != heads * head_dim:
                raise Refused("heads are not merged into the channel dim")
            merged = True
        elif t in _VIEWS and merged and _last(user) == heads * head_dim:
            pass
        else:
            raise Refused(f"{t} ({user.name}) between attention and its output projection")
        node = user


HEAD_PARALLEL_OPS = (
    "sparse_attention",
    "linear_attention",
    "performer_attention",
    "linformer_attention",
    "score_mod_attention",
)
"""optpipe's attention ops (the `attention` pass's kinds): like SDPA, each head attends on its own
(q, k, v are the first three arguments; projections are shared by all heads; score_mod_attention's mask may
be per head, and then its heads are not pruned)."""


def attention_nodes(gm) -> list[torch.fx.Node]:
    """SDPA nodes and nodes of optpipe's head-parallel attention ops, in graph order."""
    ops = {SDPA} | {
        getattr(torch.ops.optpipe, name).default for name in HEAD_PARALLEL_OPS if hasattr(torch.ops.optpipe, name)
    }
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ops]


def _attention_arguments(node: torch.fx.Node) -> dict:
    if node.target is SDPA:
        return sdpa_arguments(node)
    # score_mod_attention(q, k, v, attn_mask, ...) and sparse_attention(..., bias) carry the site's additive
    # bias (ALiBi, relative position) like SDPA's mask
    name = node.target.name()
    if name.startswith("optpipe::score_mod_attention"):
        mask = node.args[3]
    elif name.startswith("optpipe::sparse_attention"):
        mask = node.kwargs.get("bias", node.args[13] if len(node.args) > 13 else None)
    else:
        mask = None
    return {"query": node.args[0], "key": node.args[1], "value": node.args[2], "dropout_p": 0.0, "attn_mask": mask}


def _head_group(gm, sdpa, sites: dict) -> _Group:
    args = _attention_arguments(sdpa)
    q, k, v = value(args["query"]), value(args["key"]), value(args["value"])
    if q is None or q.dim() != 4 or k is None or k.dim() != 4:
        raise Refused("attention inputs are not 4-d")
    heads, kv_heads, head_dim = concrete(q.shape[1]), concrete(k.shape[1]), concrete(q.shape[-1])
    if None in (heads, kv_heads, head_dim) or heads % kv_heads or concrete(v.shape[1]) != kv_heads:
        raise Refused("head counts are not static, or K/V heads do not divide the query heads")
    if concrete(v.shape[-1]) != head_dim:
        raise Refused("value head_dim differs from query head_dim")
    if args["dropout_p"]:
        raise Refused("dropout inside attention")
    mask = args["attn_mask"]
    mv = value(mask) if mask is not None else None
    if mv is not None and mv.dim() == 4 and mv.shape[1] != 1:
        raise Refused("per-head attention mask")
    rep = heads // kv_heads
    nodes = {sdpa}
    slices = []
    for name, n_heads, per in (
        ("query", heads, rep * head_dim),
        ("key", kv_heads, head_dim),
        ("value", kv_heads, head_dim),
    ):
        view = _head_path(args[name], n_heads, nodes)
        site, offset = _producer(view, sites, nodes)
        slices.append(_Slice(site, offset, per))
    consumer = _output_consumer(sdpa, heads, head_dim, sites, nodes)
    for site in {id(s.site): s.site for s in slices}.values():
        rows = sum(len(s.indices(range(kv_heads))) for s in slices if s.site is site)
        if rows != linear_shape(gm, site)[0]:
            raise Refused(f"projection {site.path} has rows the attention does not read")
    if linear_shape(gm, consumer)[1] != heads * head_dim:
        raise Refused("output projection width is not heads * head_dim")
    for n in nodes:
        if not set(n.users) <= nodes | {consumer.node}:
            raise Refused(f"{n.name} is also read outside the attention")
    return _Group(
        "heads",
        module_path(sdpa),
        kv_heads,
        "kv-group" if rep > 1 else "head",
        slices,
        _Slice(consumer, 0, rep * head_dim),
        nodes,
        rep,
    )


def find_groups(gm, config: PruneConfig, experts: bool = False) -> tuple[list[_Group], list[dict]]:
    """Prunable head and MLP groups, and the refused candidates with their reasons. With `experts`,
    MoE experts stacked in [E, N, K] weights form MLP groups too (the same channel slots of every
    expert)."""
    sites = _sites_by_node(gm, experts)
    groups, refused = [], []
    if config.target in ("all", "heads"):
        for node in attention_nodes(gm):
            try:
                groups.append(_head_group(gm, node, sites))
            except Refused as e:
                refused.append(
                    {"module_path": module_path(node), "kind": "heads", "action": "refused", "reason": str(e)}
                )
    if config.target in ("all", "mlp"):
        in_heads = {n for g in groups for n in g.nodes}
        for node, site in sites.items():
            if node in in_heads or site.x in in_heads:
                continue
            try:
                groups.append(_mlp_group(gm, site, sites))
            except Refused as e:
                if getattr(e, "mlp_like", False):  # most linears are not the end of an MLP: only these
                    refused.append({"module_path": site.path, "kind": "mlp", "action": "refused", "reason": str(e)})
        grouped = {s.node for g in groups for s in g.linears()}
        refused.extend(d for n, d in _unsupported_sites(gm) if n not in grouped)
    return groups, refused


def _unsupported_sites(gm) -> list[tuple[torch.fx.Node, dict]]:
    """Linear-like nodes that are not sites (MoE experts stacked in one 3-d weight), with the reason."""
    out = []
    for node in gm.graph.nodes:
        reason = weight_site(gm, node)
        if isinstance(reason, str):
            out.append((node, {"module_path": module_path(node), "kind": "mlp", "action": "skipped", "reason": reason}))
    return out


def _choose(gm, groups: list[_Group], config: PruneConfig, details: list) -> tuple[list[_Group], dict]:
    """(groups to prune, {id(group): paths of the groups running the same weights}); the others
    go into `details` with the reason. Groups running the same weights (ALBERT's layers share one
    set) are pruned once, through the first of them."""
    clusters: dict[tuple, list[_Group]] = {}
    for g in groups:
        key = tuple((s.site.weight.target, s.offset, s.per_unit) for s in [*g.producers, g.consumer])
        clusters.setdefault(key, []).append(g)
    chosen, sharing = [], {}
    for cluster in clusters.values():
        g, nodes = cluster[0], {s.node for h in cluster for s in h.linears()}
        reason = next((r for r in (_selected(s.path, config) for h in cluster for s in h.linears()) if r), None)
        if reason is None and any(is_tied(gm, s, nodes) for s in g.linears()):
            reason = "a weight is tied to another module"
        if reason:
            details.extend(
                {"module_path": h.path, "kind": h.kind, "action": "skipped", "reason": reason} for h in cluster
            )
            continue
        chosen.append(g)
        sharing[id(g)] = [h.path for h in cluster[1:]]
    return chosen, sharing


# -- structured: scoring and choosing ---------------------------------------------------------------------------
def _unit_norms(w: torch.Tensor, s: _Slice, units: int, dim: int) -> torch.Tensor:
    """Frobenius norm per unit of a slice of `w` along `dim` (0: rows, 1: columns); an experts
    weight [E, N, K] counts every expert's rows (columns) of the unit."""
    if w.dim() == 3:
        w = w.transpose(0, 1).reshape(w.shape[1], -1) if dim == 0 else w.reshape(-1, w.shape[-1])
    part = w.narrow(dim, s.offset, units * s.per_unit).double()
    part = part.reshape(units, s.per_unit, -1) if dim == 0 else part.t().reshape(units, s.per_unit, -1)
    return part.pow(2).sum((1, 2))


def score_group(gm, group: _Group, norms: dict | None) -> torch.Tensor:
    """Importance per unit (higher: keep)."""
    c = group.consumer
    w_out = logical_weight(gm, c.site)
    out_sq = _unit_norms(w_out, c, group.units, 1)
    if norms is not None and c.site.x in norms:
        x = norms[c.site.x].double().pow(2)
        x_sq = x.narrow(0, c.offset, group.units * c.per_unit).reshape(group.units, -1).sum(1)
        return (x_sq * out_sq).sqrt().float()
    in_sq = sum(_unit_norms(logical_weight(gm, p.site), p, group.units, 0) for p in group.producers)
    return (in_sq * out_sq).sqrt().float()


def _removed_count(units: int, sparsity: float) -> int:
    return min(int(math.floor(units * sparsity + 1e-9)), units - 1)


# -- structured: rewriting -------------------------------------------------------------------------------------
class _Shapes(torch.fx.Interpreter):
    """Concrete output shapes of every node on one run."""

    def __init__(self, gm):
        super().__init__(gm)
        self.shapes = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.shapes[n] = _shape_of(out)
        return out


def _shape_of(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [tuple(v.shape) for v in value]
    return None


def _regroup(old_in, old_out):
    """Pair up runs of input and output dims of a view whose products match."""
    groups, i, j = [], 0, 0
    while i < len(old_in) or j < len(old_out):
        gi, gj = [], []
        pi = pj = 1
        if i < len(old_in):
            gi.append(i)
            pi = old_in[i]
            i += 1
        if j < len(old_out):
            gj.append(j)
            pj = old_out[j]
            j += 1
        while pi != pj:
            if (pi < pj and i < len(old_in)) or j >= len(old_out):
                if i >= len(old_in):
                    raise Refused("view dims do not pair up")
                gi.append(i)
                pi *= old_in[i]
                i += 1
            else:
                gj.append(j)
                pj *= old_out[j]
                j += 1
        groups.append((gi, gj))
    return groups


def _new_view_sizes(old_in, old_out, new_in) -> list[int]:
    new_out = list(old_out)
    for gi, gj in _regroup(old_in, old_out):
        old_p = math.prod(old_in[i] for i in gi)
        new_p = math.prod(new_in[i] for i in gi)
        if old_p == new_p:
            continue
        for j in gj:  # heads/channels are the outer factor of a merged dim
            if old_out[j] > 1 and (old_out[j] * new_p) % old_p == 0:
                new_out[j] = old_out[j] * new_p // old_p
                break
        else:
            raise Refused(f"cannot resize a view from {old_in} -> {old_out} for input {new_in}")
    return new_out


class _Resizer(torch.fx.Interpreter):
    """Re-runs the graph after the weights shrank, rewriting literal sizes of views, expands and
    splits whose input shape changed; remembers the old args to undo."""

    def __init__(self, gm, old_shapes):
        super().__init__(gm)
        self.old = old_shapes
        self.new = {}
        self.patched: list[tuple[torch.fx.Node, tuple]] = []

    def run_node(self, n):
        if n.op == "call_function" and n.args and isinstance(n.args[0], torch.fx.Node):
            src = n.args[0]
            cur = self.env[src]
            if isinstance(cur, torch.Tensor) and tuple(cur.shape) != self.old.get(src):
                self._resize(n, self.old[src], tuple(cur.shape))
        out = super().run_node(n)
        self.new[n] = _shape_of(out)
        return out

    def _patch(self, n, args):
        self.patched.append((n, n.args))
        n.args = tuple(args)

    def _resize(self, n, old_in, new_in):
        t = n.target
        if t in _VIEWS or t is aten.expand.default:
            sizes = list(n.args[1])
            old_out = self.old[n]
            if t is aten.expand.default:
                lead = len(old_out) - len(old_in)
                new_out = list(old_out)
                for d in range(len(old_in)):
                    if old_in[d] == old_out[d + lead]:
                        new_out[d + lead] = new_in[d]
            else:
                new_out = _new_view_sizes(old_in, old_out, new_in)
            for d, (o, nw) in enumerate(zip(old_out, new_out)):
                if o == nw or (isinstance(sizes[d], int) and sizes[d] == -1):
                    continue
                if not isinstance(sizes[d], int):
                    raise Refused(f"{n.name}: size {d} comes from the inputs but would change")
                sizes[d] = nw
            if sizes != list(n.args[1]):
                self._patch(n, (n.args[0], sizes, *n.args[2:]))
        elif t is aten.split.Tensor:
            dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
            pieces = len(self.old[n])
            if old_in[dim] != n.args[1] * pieces or new_in[dim] % pieces:
                raise Refused(f"{n.name}: uneven split of a pruned dim")
            self._patch(n, (n.args[0], new_in[dim] // pieces, *n.args[2:]))
        elif t in (aten.slice.Tensor, aten.narrow.default, aten.split_with_sizes.default):
            dim = n.args[1] if t is not aten.split_with_sizes.default else (n.args[2] if len(n.args) > 2 else 0)
            if len(old_in) and old_in[dim] != new_in[dim]:
                full = (
                    t is aten.slice.Tensor
                    and (len(n.args) < 3 or n.args[2] in (0, None))
                    and (len(n.args) < 4 or n.args[3] is None or n.args[3] >= old_in[dim])
                    and (len(n.args) < 5 or n.args[4] == 1)
                )
                if not full:
                    raise Refused(f"{n.name} slices a pruned dim")

    def undo(self):
        for n, args in reversed(self.patched):
            n.args = args


def _refresh_vals(gm, old_shapes, new_shapes) -> None:
    """Update meta["val"] of nodes whose (static) sizes changed."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    if fake_mode is None:
        return

    def resized(fake, old, new):
        if not isinstance(fake, torch.Tensor) or old == new or old is None or new is None:
            return fake
        sizes = [nw if o != nw else s for s, o, nw in zip(fake.shape, old, new)]
        with fake_mode:
            return fake.new_empty(sizes)

    for n in gm.graph.nodes:
        old, new, fake = old_shapes.get(n), new_shapes.get(n), n.meta.get("val")
        if old == new or fake is None:
            continue
        if isinstance(fake, (list, tuple)) and isinstance(old, list):
            n.meta["val"] = type(fake)(resized(f, o, w) for f, o, w in zip(fake, old, new))
        else:
            n.meta["val"] = resized(fake, old, new)
    for n in gm.graph.nodes:  # get_attr values of the replaced weights
        if n.op == "get_attr":
            t = weight_tensor(gm, n.target)
            v = n.meta.get("val")
            if t is not None and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(t.shape):
                n.meta["val"] = fake_mode.from_tensor(t, static_shapes=True)


def _compensated_bias(gm, group: _Group, removed: list[int], means: dict | None) -> torch.Tensor | None:
    """The output projection's bias plus the mean contribution of the removed units (FLAP-style):
    a removed channel whose activation is mostly a constant offset costs almost nothing."""
    c = group.consumer
    if means is None or c.site.x not in means or c.site.bias is None:
        return None
    cols = torch.tensor(c.indices(removed), dtype=torch.long)
    w = logical_weight(gm, c.site)
    b = weight_tensor(gm, c.site.bias.target).detach()
    return b + (w.index_select(1, cols).double() @ means[c.site.x].double()[cols]).to(b.dtype)


def apply_groups(program: Program, plan: list[tuple[_Group, list[int], list[int]]], means: dict | None = None) -> None:
    """Shrink the linears of every (group, kept units) and the graph's sizes; all or nothing."""
    gm = program.gm
    rows: dict[str, tuple[WeightSite, list[int]]] = {}
    cols: dict[str, tuple[WeightSite, list[int]]] = {}
    biases = {}
    for group, _kept, removed in plan:
        bias = _compensated_bias(gm, group, removed, means)
        if bias is not None:
            biases[group.consumer.site.bias.target] = bias
    for group, kept, _ in plan:
        for s in group.producers:
            rows.setdefault(s.site.weight.target, (s.site, []))[1].extend(s.indices(kept))
        cols.setdefault(group.consumer.site.weight.target, (group.consumer.site, []))[1].extend(
            group.consumer.indices(kept)
        )
    with torch.no_grad():
        recorder = _Shapes(gm)
        recorder.run(*program.example_inputs)
    old_shapes = recorder.shapes
    replaced = []
    resizer = _Resizer(gm, old_shapes)
    try:
        for key in set(rows) | set(cols):
            site = (rows.get(key) or cols.get(key))[0]
            w = logical_weight(gm, site)
            if key in rows:
                keep = torch.tensor(sorted(rows[key][1]), dtype=torch.long)
                w = w.index_select(-2, keep)
                if site.bias is not None:
                    b = weight_tensor(gm, site.bias.target).detach()
                    replaced.append((site.bias.target, _replace_param(gm, site.bias.target, b.index_select(0, keep))))
            if key in cols:
                w = w.index_select(-1, torch.tensor(sorted(cols[key][1]), dtype=torch.long))
                if site.bias is not None and site.bias.target in biases:
                    replaced.append((site.bias.target, _replace_param(gm, site.bias.target, biases[site.bias.target])))
            replaced.append(
                (
                    site.weight.target,
                    _replace_param(gm, site.weight.target, w.transpose(-1, -2) if site.transposed else w),
                )
            )
        with torch.no_grad():
            resizer.run(*program.example_inputs)
        output = next(n for n in gm.graph.nodes if n.op == "output")
        if resizer.new[output] != old_shapes[output]:
            raise Refused(f"output shapes changed from {old_shapes[output]} to {resizer.new[output]}")
    except Exception:
        resizer.undo()
        for target, old in reversed(replaced):
            owner_path, _, name = target.rpartition(".")
            setattr(gm.get_submodule(owner_path) if owner_path else gm, name, old)
        raise
    _refresh_vals(gm, old_shapes, resizer.new)


def _structured(program: Program, config: PruneConfig) -> PassResult:
    gm = program.gm
    params_before = _count_params(gm)
    groups, refused = find_groups(gm, config, experts=True)
    details = list(refused)
    chosen, sharing = _choose(gm, groups, config, details)
    norms, means = None, None
    if chosen and _use_activations(program, config):
        stats = channel_stats(program, {g.consumer.site.x for g in chosen})
        norms = {n: v[0] for n, v in stats.items()}
        means = {n: v[1] for n, v in stats.items()}
    plan, entries = [], []
    for g in chosen:
        scores = score_group(gm, g, norms)
        n_remove = _removed_count(g.units, config.sparsity)
        order = torch.argsort(scores, stable=True)
        removed = sorted(order[:n_remove].tolist())
        kept = sorted(order[n_remove:].tolist())
        entry = {
            "module_path": g.path,
            "kind": g.kind,
            "action": "pruned" if removed else "kept",
            "unit": g.unit_name,
            "units": g.units,
            "kept": len(kept),
            "linears": list(dict.fromkeys(s.path for s in g.linears())),
            "importance": "activation" if norms is not None else "magnitude",
        }
        if sharing.get(id(g)):
            entry["shared_with"] = sharing[id(g)]
        if g.kind == "heads":
            entry["scores"] = [round(float(s), 4) for s in scores]
            entry["removed"] = removed
            entry["heads_removed"] = len(removed) * g.heads_per_unit
        else:
            q = torch.quantile(scores.double(), torch.tensor([0.0, 0.5, 1.0], dtype=torch.double))
            entry["scores"] = {
                "min": round(float(q[0]), 4),
                "median": round(float(q[1]), 4),
                "max": round(float(q[2]), 4),
                "threshold": round(float(scores[order[n_remove - 1]]), 4) if removed else None,
            }
            entry["removed"] = len(removed)
        entries.append(entry)
        if removed:
            plan.append((g, kept, removed))
    if plan:
        try:
            apply_groups(program, plan, means)
        except Refused as e:
            for entry in entries:
                entry.update(action="refused", reason=f"graph resize failed: {e}")
            plan = []
    details.extend(entries)
    pruned = [e for e in entries if e["action"] == "pruned"]
    if plan:
        gm.graph.lint()
        gm.recompile()
    stats = {
        "pruned_heads": sum(e.get("heads_removed", 0) for e in pruned),
        "pruned_channels": sum(e["removed"] for e in pruned if e["kind"] == "mlp"),
        "groups": len(groups),
        "refused": sum(1 for d in details if d["action"] == "refused"),
        "params_before": params_before,
        "params_after": _count_params(gm),
    }
    return PassResult(bool(plan), stats, _report(details, config))


# -- unstructured -----------------------------------------------------------------------------------------------
def _mask(w: torch.Tensor, score: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    """Boolean keep-mask of the logical [N, K] weight."""
    n, k = w.shape
    keep = torch.ones(w.shape, dtype=torch.bool, device=w.device)
    if config.method == "2:4":
        groups = score.reshape(n, k // 4, 4)
        drop = groups.argsort(dim=-1, stable=True)[..., :2]
        keep = keep.reshape(n, k // 4, 4).scatter(-1, drop, False).reshape(n, k)
    elif config.method == "wanda":
        count = int(round(k * config.sparsity))
        if count:
            keep.scatter_(1, score.argsort(dim=1, stable=True)[:, :count], False)
    else:
        count = int(round(w.numel() * config.sparsity))
        if count:
            keep.view(-1)[score.flatten().argsort(stable=True)[:count]] = False
    return keep


def _store_masked(gm, site: WeightSite, masked: torch.Tensor, semi_structured: bool) -> None:
    stored = masked.t() if site.transposed else masked
    if semi_structured and stored.is_cuda and stored.dtype in (torch.float16, torch.bfloat16) and not site.transposed:
        # CUDA sparse tensor cores: F.linear dispatches on the semi-structured subclass
        from torch.sparse import to_sparse_semi_structured

        owner_path, _, name = site.weight.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        setattr(owner, name, torch.nn.Parameter(to_sparse_semi_structured(stored.contiguous()), requires_grad=False))
        return
    _replace_param(gm, site.weight.target, stored)


def _unstructured(program: Program, config: PruneConfig) -> PassResult:
    gm = program.gm
    params_before = _count_params(gm)
    sites, details = [], []
    for node in gm.graph.nodes:
        site = weight_site(gm, node)
        if isinstance(site, str):
            details.append({"module_path": module_path(node), "node": node.name, "action": "skipped", "reason": site})
        if not isinstance(site, WeightSite) or site.kind != "linear":
            continue
        entry = {"module_path": site.path, "node": node.name}
        n, k = linear_shape(gm, site)
        reason = _selected(site.path, config)
        if reason is None and is_tied(gm, site):
            reason = "weight tied to another module"
        if reason is None and config.method == "2:4" and k % 4:
            reason = f"in_features {k} is not a multiple of 4"
        if reason:
            details.append({**entry, "action": "skipped", "reason": reason})
        else:
            sites.append((site, entry))
    norms = None
    if sites and _use_activations(program, config):
        norms = channel_norms(program, {s.x for s, _ in sites})
    zeroed = 0
    for site, entry in sites:
        w = logical_weight(gm, site)
        score = w.abs().float()
        if norms is not None and site.x in norms:
            score = score * norms[site.x][None, :]
        keep = _mask(w, score, config)
        masked = torch.where(keep, w, torch.zeros((), dtype=w.dtype))
        zeroed += int((~keep).sum())
        _store_masked(gm, site, masked, config.method == "2:4")
        details.append(
            {
                **entry,
                "action": "pruned",
                "score": "wanda" if norms is not None else "magnitude",
                "sparsity": round(float((masked == 0).double().mean()), 4),
            }
        )
    if sites:
        gm.recompile()
    nonzero = sum(
        int((p != 0).sum())
        for p in {id(p): p for p in gm.parameters()}.values()
        if not p.is_sparse and p.layout == torch.strided
    )
    stats = {
        "pruned": len(sites),
        "skipped": len(details) - len(sites),
        "weights_zeroed": zeroed,
        "params_before": params_before,
        "params_after": _count_params(gm),
        "nonzero_after": nonzero,
    }
    return PassResult(bool(sites), stats, _report(details, config))


def _report(details: list[dict], config: PruneConfig) -> dict:
    """details["modules"] plus the per-site contract: {"site", "reason"} for each site refused or
    skipped, and pass-level notes (nothing found, nothing pruned)."""
    skipped = [
        {"site": d["module_path"], "reason": d["reason"]} for d in details if d["action"] in ("refused", "skipped")
    ]
    notes = []
    what = {"heads": "attention head groups", "mlp": "MLP groups"}.get(config.target, "head or MLP groups")
    if not details:
        found = what if config.method == "structured" else "linear layers"
        notes.append(f"no site found: no prunable {found} in the graph; nothing to prune")
    elif not any(d["action"] == "pruned" for d in details):
        kept = sum(1 for d in details if d["action"] == "kept")
        notes.append(
            f"nothing pruned: {len(skipped)} sites refused or skipped (see skipped), "
            f"{kept} kept whole at sparsity={config.sparsity}"
        )
    return {"modules": details, "skipped": skipped, "notes": notes}


@register_pass(
    "prune",
    PruneConfig,
    exact=False,
    needs=("float-linears",),
    after=("fuse-attention",),
    why="it finds attention heads at the SDPA sites fuse-attention makes",
)
def prune(program: Program, config: PruneConfig) -> PassResult:
    """Prune attention heads and MLP channels (structured: smaller weights, rewritten shapes) or
    zero weights (magnitude, wanda, 2:4)."""
    if config.method == "structured":
        return _structured(program, config)
    return _unstructured(program, config)


__all__ = ["METHODS", "PruneConfig", "channel_norms", "channel_stats", "find_groups", "prune", "score_group"]
