"""Weight sites: the linear and embedding calls of a captured program, found by use-def structure.

A site is `aten.linear(x, W, b)`, `aten.addmm(b, x, W)` / `aten.mm(x, W)` (weights stored
[in, out], as HF's Conv1D does), `aten.matmul(x, Wᵀ)` (`x @ W.T`, Falcon's FalconLinear: the
transpose is `numpy_T`, `t`, `transpose(0, 1)` or `permute([1, 0])` of the stored weight),
`aten.matmul(x, W)` (weights stored [in, out]) or `aten.embedding(E, ids)`, where the weight is a
parameter or buffer of the program (a `get_attr` node). Passes that rewrite weights (quantize, prune) find
their sites here, and select them by module path with `path_matches`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.fx

from .graph_toolkit import module_path

aten = torch.ops.aten


def path_matches(path: str, patterns: tuple[str, ...]) -> str | None:
    """The first glob matching `path` or one of its dotted tails (`c_proj` matches `h.0.attn.c_proj`)."""
    parts = path.split(".")
    tails = [".".join(parts[i:]) for i in range(len(parts))] or [path]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(tail, pattern) for tail in tails):
            return pattern
    return None


@dataclass
class WeightSite:
    node: torch.fx.Node
    kind: str  # "linear" | "embedding" | "experts" (see `experts_site`)
    weight: torch.fx.Node  # the get_attr node of the fp32 weight
    transposed: bool  # weight stored [in, out] (addmm/mm, HF Conv1D)
    x: torch.fx.Node | None = None
    bias: torch.fx.Node | None = None

    @property
    def owner(self) -> str:
        """Submodule holding the weight (where the quantized buffers go)."""
        return self.weight.target.rpartition(".")[0]

    @property
    def path(self) -> str:
        """Module that calls it (a tied weight has one owner name but several callers)."""
        return module_path(self.node) or self.owner


def weight_tensor(gm: torch.fx.GraphModule, target: str) -> torch.Tensor | None:
    try:
        owner_path, _, name = target.rpartition(".")
        value = getattr(gm.get_submodule(owner_path) if owner_path else gm, name)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _weight_node(gm, arg) -> torch.fx.Node | None:
    if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
        return None
    t = weight_tensor(gm, arg.target)
    return arg if t is not None and t.is_floating_point() and t.dim() == 2 else None


_TRANSPOSES = (aten.numpy_T.default, aten.t.default, aten.transpose.int, aten.permute.default)


def _transposed_weight(gm, arg) -> torch.fx.Node | None:
    """The get_attr node of W when `arg` is Wᵀ of a 2-d stored weight (numpy_T, t, transpose, permute)."""
    if not (isinstance(arg, torch.fx.Node) and arg.op == "call_function" and arg.args):
        return None
    t = arg.target
    swaps = (
        t in (aten.numpy_T.default, aten.t.default)
        or (t is aten.transpose.int and {d % 2 for d in arg.args[1:3]} == {0, 1})
        or (t is aten.permute.default and [d % 2 for d in arg.args[1]] == [1, 0])
    )
    return _weight_node(gm, arg.args[0]) if swaps else None


def _matmul_site(gm, node: torch.fx.Node) -> WeightSite | str | None:
    """`x @ W.T` (stored [out, in]) or `x @ W` (stored [in, out]) with a stored 2-d W; the reason
    when W is a stack of weights (MoE experts as one [E, N, K] tensor)."""
    x, rhs = node.args[0], node.args[1]
    w = _transposed_weight(gm, rhs)
    if w is not None:
        return WeightSite(node, "linear", w, False, x)
    w = _weight_node(gm, rhs)
    if w is not None:
        return WeightSite(node, "linear", w, True, x)
    if isinstance(rhs, torch.fx.Node) and rhs.op == "call_function" and rhs.target in _TRANSPOSES and rhs.args:
        rhs = rhs.args[0]
    stored = weight_tensor(gm, rhs.target) if isinstance(rhs, torch.fx.Node) and rhs.op == "get_attr" else None
    if stored is not None and stored.is_floating_point() and stored.dim() > 2:
        return (
            f"batched {stored.dim()}-d weight {rhs.target} {list(stored.shape)} (stacked MoE experts): "
            "only 2-d linear weights are supported"
        )
    return None


def weight_site(gm, node: torch.fx.Node) -> WeightSite | str | None:
    """A quantizable site, the reason a linear-like node is not one, or None for other nodes."""
    if node.op != "call_function":
        return None
    t = node.target
    if t is aten.linear.default:
        w = _weight_node(gm, node.args[1])
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return WeightSite(node, "linear", w, False, node.args[0], bias) if w is not None else None
    if t is aten.addmm.default:
        w = _weight_node(gm, node.args[2])
        if w is None:
            return None
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return "addmm with alpha/beta other than 1"
        return WeightSite(node, "linear", w, True, node.args[1], node.args[0])
    if t is aten.mm.default:
        w = _weight_node(gm, node.args[1])
        return WeightSite(node, "linear", w, True, node.args[0]) if w is not None else None
    if t is aten.matmul.default:
        return _matmul_site(gm, node)
    if t is aten.embedding.default:
        w = _weight_node(gm, node.args[0])  # padding_idx/scale_grad_by_freq only affect gradients
        return WeightSite(node, "embedding", w, False) if w is not None else None
    return None


def weight_readers(gm, tensor: torch.Tensor) -> list[torch.fx.Node]:
    """The nodes that read `tensor` under any name, looking through a transpose of it (`x @ W.T`)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "get_attr" and weight_tensor(gm, n.target) is tensor:
            for user in n.users:
                out.extend(user.users if user.target in _TRANSPOSES else [user])
    return out


def logical_weight(gm, site: WeightSite) -> torch.Tensor:
    """A linear site's weight (detached) as [out_features, in_features] ([E, N, K] for an experts
    site), however it is stored."""
    w = weight_tensor(gm, site.weight.target).detach()
    return w.transpose(-1, -2) if site.transposed else w


def linear_shape(gm, site: WeightSite) -> tuple[int, int]:
    """(out_features N, in_features K) of a linear site (of each expert, for an experts site)."""
    shape = tuple(weight_tensor(gm, site.weight.target).shape[-2:])
    return (shape[1], shape[0]) if site.transposed else shape


def experts_site(gm, node: torch.fx.Node) -> WeightSite | None:
    """`x @ W.transpose(-1, -2)` with W a stored [E, N, K] stack of expert weights (MoE experts run
    densely, as transformers' experts modules are captured): a site of kind "experts" whose value
    is [E, ..., N]. Not a `weight_site` (no quantized kernel takes it); prune's structured MLP
    pruning does, removing the same channel slots from every expert."""
    if not (node.op == "call_function" and node.target is aten.matmul.default and len(node.args) == 2):
        return None
    rhs = node.args[1]
    if not (isinstance(rhs, torch.fx.Node) and rhs.op == "call_function" and rhs.target is aten.transpose.int):
        return None
    w, dims = rhs.args[0], {d % 3 for d in rhs.args[1:3]}
    stored = weight_tensor(gm, w.target) if isinstance(w, torch.fx.Node) and w.op == "get_attr" else None
    if stored is None or not stored.is_floating_point() or stored.dim() != 3 or dims != {1, 2}:
        return None
    return WeightSite(node, "experts", w, False, node.args[0])
