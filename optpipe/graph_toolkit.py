"""The few FX operations every pass needs, written once.

Passes say what they rewrite; how a node is read, placed and described lives here:

    value(node)                       the fake tensor export recorded for a node (None if not a tensor)
    module_path(node)                 the innermost module the node was traced in ("" for the root)
    module_stack(node)                every module it was traced in, outermost first, with their types
    module_type_name(node)            the innermost module's class, `package.module.Class`
    get_attribute(gm, target)         the object a get_attr target names (None if there is none)
    insert_call(graph, op, args, like=node)
                                      `op(*args)` at the graph's insert point, with `node`'s module path
                                      and stack trace, and a fake value computed from the arguments'
    fake_value(op, args)              that fake value alone (None for a graph without fake values)
    copy_placement(like, node)        give an already inserted node `like`'s module path and stack trace
    add_tensor(gm, owner, name, t)    a parameter or buffer under a fresh name; returns its path
    insert_get_attr(gm, target, like=node)
                                      a get_attr node for that tensor, with meta and a fake value
    ancestors(node)                   the node and every node it is computed from

Module paths come from `meta["nn_module_stack"]` with one rule: export's pseudo module for shape
bookkeeping nodes (`_empty_nn_module_stack_from_metadata_hook`, which Hugging Face models show on
many nodes) is never a path; a node with no other entry belongs to the root.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode

ROOT = ""
"""Module path of nodes traced outside every submodule."""
EMPTY_STACK_MARK = "_empty_nn_module_stack_from_metadata_hook"
"""The pseudo module export puts on shape bookkeeping nodes (sym_size, ...): not a module path."""
PLACEMENT_META = ("nn_module_stack", "stack_trace")
"""Meta a new node inherits from the node it stands for: diffs, selection and errors key on it."""


# -- reading ----------------------------------------------------------------------------------------
def value(node: Any) -> torch.Tensor | None:
    """The fake tensor export recorded for `node`, if `node` is a node whose value is a tensor."""
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    """`node` and every node it is computed from (its inputs, their inputs, ...)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def module_stack(node: torch.fx.Node) -> list[tuple[str, Any]]:
    """(module path, module type) of every module `node` was traced in, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(path, kind) for path, kind in stack.values() if path != EMPTY_STACK_MARK]


def module_path(node: torch.fx.Node) -> str:
    """Path of the innermost module `node` was traced in; ROOT ("") if none."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ROOT


def module_type_name(node: torch.fx.Node) -> str:
    """Qualified class name of the innermost module `node` was traced in ("" for the root)."""
    stack = module_stack(node)
    return qualified_type_name(stack[-1][1]) if stack else ""


def qualified_type_name(kind: Any) -> str:
    """`package.module.Class` of a module type in `nn_module_stack` (export may record a string)."""
    return f"{kind.__module__}.{kind.__qualname__}" if isinstance(kind, type) else str(kind)


def get_attribute(gm: torch.nn.Module, target: str) -> Any:
    """The object at dotted `target` under `gm` (a get_attr node's target), or None."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


# -- writing ----------------------------------------------------------------------------------------
def copy_placement(like: torch.fx.Node, node: torch.fx.Node) -> torch.fx.Node:
    """Give `node` the module path and stack trace of `like` (the node it stands for)."""
    for key in PLACEMENT_META:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def fake_value(op: Callable, args: tuple, kwargs: dict | None = None) -> Any:
    """`op` run on the fake values of its node arguments, under their fake mode; None when the
    arguments carry no fake tensor (a graph traced without export)."""
    fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs or {}), lambda n: n.meta.get("val"))
    leaves = pytree.tree_leaves((fake_args, fake_kwargs))
    mode = detect_fake_mode([a for a in leaves if isinstance(a, torch.Tensor)])
    if mode is None:
        return None
    with mode:
        return op(*fake_args, **fake_kwargs)


_COMPUTE = object()


def insert_call(
    graph: torch.fx.Graph,
    op: Callable,
    args: tuple,
    kwargs: dict | None = None,
    *,
    like: torch.fx.Node,
    val: Any = _COMPUTE,
    name: str | None = None,
) -> torch.fx.Node:
    """Insert `op(*args, **kwargs)` at the graph's insert point, placed like `like`. Its fake value is
    computed from the arguments' unless `val` is given (e.g. the value of the node it replaces; None
    leaves it unset). `name` is the node's name if free (default: derived from `op`)."""
    node = copy_placement(like, graph.create_node("call_function", op, args, kwargs or {}, name=name))
    fake = fake_value(op, args, kwargs) if val is _COMPUTE else val
    if fake is not None:
        node.meta["val"] = fake
    return node


def add_tensor(
    gm: torch.fx.GraphModule, owner_path: str, name: str, tensor: torch.Tensor, *, parameter: bool = False
) -> str:
    """Register `tensor` on the submodule at `owner_path` (the root if "" or not a submodule) under
    `name`, or `name_1`, `name_2`, ... if taken. Returns the attribute's dotted path."""
    owner, prefix = gm, ""
    if owner_path:
        try:
            owner, prefix = gm.get_submodule(owner_path), owner_path + "."
        except AttributeError:
            name = owner_path.replace(".", "_") + "_" + name
    base, i = name, 1
    while hasattr(owner, name):
        name, i = f"{base}_{i}", i + 1
    if parameter:
        owner.register_parameter(name, torch.nn.Parameter(tensor))
    else:
        owner.register_buffer(name, tensor)
    return prefix + name


def insert_get_attr(
    gm: torch.fx.GraphModule, target: str, *, like: torch.fx.Node, graph: torch.fx.Graph | None = None
) -> torch.fx.Node:
    """A get_attr node reading `target` at the insert point of `graph` (default `gm.graph`), placed
    like `like`, with a static-shaped fake value of the tensor (in the fake mode of `like`'s value,
    else of the graph inputs')."""
    graph = gm.graph if graph is None else graph
    node = copy_placement(like, graph.get_attr(target))
    tensor = get_attribute(gm, target)
    mode = detect_fake_mode([value(like)]) or detect_fake_mode(_input_values(graph))
    if mode is not None and isinstance(tensor, torch.Tensor):
        node.meta["val"] = mode.from_tensor(tensor, static_shapes=True)
    return node


def _input_values(graph: torch.fx.Graph) -> list[torch.Tensor]:
    return [v for v in (value(n) for n in graph.nodes if n.op == "placeholder") if v is not None]
