"""Weight sites: the linear and embedding calls of a captured program, found by use-def structure.

A site is `aten.linear(x, W, b)`, `aten.addmm(b, x, W)` / `aten.mm(x, W)` (weights stored
[in, out], as HF's Conv1D does) or `aten.embedding(E, ids)`, where the weight is a parameter or
buffer of the program (a `get_attr` node). Passes that rewrite weights (quantize, prune) find
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
    kind: str  # "linear" | "embedding"
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
    if t is aten.embedding.default:
        w = _weight_node(gm, node.args[0])  # padding_idx/scale_grad_by_freq only affect gradients
        return WeightSite(node, "embedding", w, False) if w is not None else None
    return None


def logical_weight(gm, site: WeightSite) -> torch.Tensor:
    """A linear site's weight (detached) as [out_features, in_features], however it is stored."""
    w = weight_tensor(gm, site.weight.target).detach()
    return w.t() if site.transposed else w


def linear_shape(gm, site: WeightSite) -> tuple[int, int]:
    """(out_features N, in_features K) of a linear site."""
    shape = tuple(weight_tensor(gm, site.weight.target).shape)
    return (shape[1], shape[0]) if site.transposed else shape
