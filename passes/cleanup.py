"""Cleanups: `dce` (dead code elimination) and `cse` (common subexpression elimination).

Both are exact and run anywhere in a pipeline; put `dce` after passes that leave dead computation
behind (fuse-attention leaves nanoGPT's causal `bias` buffers unread, HF's mask construction dead).

- `dce` removes nodes whose results are never used and that have no side effects, then deletes the
  parameters, buffers and constants the graph no longer reads, so they stop taking memory and
  disappear from the state dict. Differences from `torch.fx.Graph.eliminate_dead_code`: an
  `_assert_tensor_metadata` check on a value nothing else reads goes with that value (export
  sprinkles them over mask construction), an in-place `detach_` of a value nothing else reads goes
  too (export detaches lifted constants that way), and dropout in eval mode (`train=False`, the
  identity) is not treated as random. Checks on graph inputs stay.
- `cse` merges call_function nodes that apply the same pure, deterministic ATen op to the same
  arguments. Random ops (dropout, randn, ...), ops that mutate or have side effects, `empty*` (whose
  contents are undefined) and nodes reading a tensor that something mutates are never merged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from optpipe.program import Program
from optpipe.registry import PassResult, register_pass

aten = torch.ops.aten
_ASSERT_METADATA = aten._assert_tensor_metadata.default


@dataclass(frozen=True)
class DceConfig:
    remove_attrs: bool = field(
        default=True, metadata={"help": "also delete parameters, buffers and constants that no node reads any more"}
    )

    def __post_init__(self):
        if not isinstance(self.remove_attrs, bool):
            raise ValueError(f"dce: remove-attrs must be a bool, got {self.remove_attrs!r}")


@dataclass(frozen=True)
class CseConfig:
    pass


def _is_eval_dropout(node: torch.fx.Node) -> bool:
    if node.target is not aten.dropout.default:
        return False
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return train is False


def _removable(node: torch.fx.Node) -> bool:
    """A node whose only effect is its value (or a check on a value nobody reads)."""
    if node.op in ("placeholder", "output"):
        return False
    if node.target is _ASSERT_METADATA:
        checked = node.args[0]
        return (
            isinstance(checked, torch.fx.Node)
            and checked.op != "placeholder"
            and all(u.target is _ASSERT_METADATA for u in checked.users)
        )
    if node.users:
        return False
    if node.target is aten.detach_.default:  # export's `detach_(lift_fresh_copy(constant))`
        return len(node.args[0].users) == 1
    return _is_eval_dropout(node) or not node.is_impure()


def eliminate_dead_code(gm: torch.fx.GraphModule) -> int:
    """Remove dead nodes of `gm` (see the module docstring); returns how many were removed."""
    removed, changed = 0, True
    while changed:  # a check goes only once the other users of its value are gone
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if _removable(node):
                gm.graph.erase_node(node)
                removed += 1
                changed = True
    return removed


def _tensor_attrs(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Qualified name -> tensor for parameters, buffers and plain tensor attributes (constants)."""
    out = {}
    for prefix, mod in gm.named_modules(remove_duplicate=False):
        for name, value in list(vars(mod).items()) + list(mod._parameters.items()) + list(mod._buffers.items()):
            if isinstance(value, torch.Tensor):
                out[f"{prefix}.{name}" if prefix else name] = value
    return out


def remove_unused_attributes(gm: torch.fx.GraphModule) -> int:
    """Delete tensors of `gm` that no get_attr reads; returns how many were deleted.

    A tensor still read under another name (tied weights: `lm_head.weight` is `wte.weight`) stays,
    so deleting frees memory and never just renames a weight. Submodules that are called
    (`call_module`) keep all their tensors.
    """
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    attrs = _tensor_attrs(gm)
    live = {id(attrs[name]) for name in read if name in attrs}
    removed = 0
    for name, tensor in attrs.items():
        if name in read or id(tensor) in live:
            continue
        if any(name.startswith(prefix + ".") for prefix in called):
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path)
        if hasattr(owner, attr):
            delattr(owner, attr)
            removed += 1
    return removed


@register_pass("dce", DceConfig, exact=True, cleanup=True)
def dce(program: Program, config: DceConfig) -> PassResult:
    """Remove dead nodes, then the parameters and buffers nothing reads any more."""
    gm = program.gm
    removed_nodes = eliminate_dead_code(gm)
    removed_attrs = remove_unused_attributes(gm) if config.remove_attrs else 0
    if removed_nodes or removed_attrs:
        gm.recompile()
    return PassResult(
        bool(removed_nodes or removed_attrs), {"removed_nodes": removed_nodes, "removed_attrs": removed_attrs}
    )


# -- cse ------------------------------------------------------------------------------------------
def _mergeable(node: torch.fx.Node) -> bool:
    op = node.target
    if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
        return False
    if op._schema.is_mutable or torch.Tag.nondeterministic_seeded in op.tags:
        return False
    if op.name().split("::")[-1].split(".")[0] in ("empty", "new_empty", "empty_like", "empty_strided"):
        return False
    return not node.is_impure()


def _key(value):
    """A hashable, type-exact key: `add(x, 1)` and `add(x, 1.0)` differ, as do 0.0 and -0.0."""
    if isinstance(value, torch.fx.Node):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def _mutated(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes passed to an op that may write to its inputs (conservatively: every tensor argument)."""
    out = set()
    for node in gm.graph.nodes:
        if (
            node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and node.target._schema.is_mutable
        ):
            out.update(node.all_input_nodes)
    return out


def eliminate_common_subexpressions(gm: torch.fx.GraphModule) -> int:
    """Merge duplicate pure call_function nodes of `gm`; returns how many were eliminated."""
    mutated = _mutated(gm)
    seen: dict = {}
    eliminated = 0
    for node in list(gm.graph.nodes):
        if not _mergeable(node) or node in mutated or any(a in mutated for a in node.all_input_nodes):
            continue
        try:
            key = (node.target, _key(node.args), _key(node.kwargs))
            hash(key)
        except TypeError:  # an argument that cannot be compared by value
            continue
        first = seen.setdefault(key, node)
        if first is not node:
            # later duplicates now read `first`, so their keys match its users' keys
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            eliminated += 1
    return eliminated


@register_pass("cse", CseConfig, exact=True, cleanup=True)
def cse(program: Program, config: CseConfig) -> PassResult:
    """Merge duplicate pure, deterministic ATen computations."""
    eliminated = eliminate_common_subexpressions(program.gm)
    if eliminated:
        program.gm.recompile()
    return PassResult(bool(eliminated), {"eliminated": eliminated})
