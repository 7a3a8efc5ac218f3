"""Static cost analysis of a Program: FLOPs, activation bytes, parameters and ops per module path.

Nothing here runs the model. Shapes come from each node's `meta["val"]` with the symbolic dims
(batch, sequence) bound to the sizes of the program's example inputs; only when a node has no usable
meta (a pass forgot it, or a data-dependent size) is the graph re-interpreted on fake tensors.

- FLOPs use `torch.utils.flop_counter`'s registry of formulas (mm, addmm, bmm, baddbmm, convolution,
  the SDPA kernels, ...), plus the composite ops an exported graph keeps (`linear`, `matmul`,
  `scaled_dot_product_attention`); any other composite op is decomposed on meta tensors under
  `FlopCounterMode`. A pass that introduces an op with real arithmetic should register its formula
  with `torch.utils.flop_counter.register_flop_formula(torch.ops.optpipe.<op>)`; ops outside aten
  without one are listed in `ProgramCosts.uncounted_ops` (counted as 0).
- Activation bytes of a node: the bytes of the tensors it newly produces. Views and in-place ops
  (outputs that alias an input) and `getitem` (the tuple element was counted at its producer) are 0.
- Parameters: parameters and buffers of the GraphModule (as `Program.num_params`), attributed to
  the module path that prefixes their dotted name.
- A node belongs to the innermost module of its `nn_module_stack`; per-module rows also carry the
  totals rolled up over every dotted sub-path (`transformer.h` sums `transformer.h.0`, ...).

>>> costs = analyze(program)                      # doctest: +SKIP
>>> costs.flops, costs.params, costs.modules["transformer.h.0.attn"].total_flops  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.utils import flop_counter

from .graph_toolkit import ROOT, get_attribute, module_path, module_stack, module_type_name, qualified_type_name
from .program import Program


# -- names ------------------------------------------------------------------------------------------
def op_name(target: Any) -> str:
    """Readable name of a call_function target: `aten.matmul`, `optpipe.int8_linear`, `getitem`."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order.{target.name()}"
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return target.__name__
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module and module not in ("builtins", "math") else name


def short_op_name(name: str) -> str:
    """`aten.matmul` -> `matmul`; other namespaces stay qualified (`optpipe.int8_linear`)."""
    return name[5:] if name.startswith("aten.") else name


def node_module(node: torch.fx.Node) -> tuple[str, str]:
    """(module path, module type) of the innermost module a node was traced in; (ROOT, "") if none."""
    return module_path(node), module_type_name(node)


def parent_paths(path: str) -> list[str]:
    """Every enclosing module path of `path`, innermost first, ending with ROOT."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]


def module_sort_key(path: str) -> tuple:
    """Tree order with numeric components compared as numbers (h.2 before h.10)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")) if path else ()


def is_bookkeeping(node: torch.fx.Node) -> bool:
    """Shape arithmetic and runtime asserts: nodes that compute no tensor (excluded from op counts)."""
    if node.op == "call_module":
        return node.target == "_guards_fn"  # export's input-guard check
    if node.op != "call_function":
        return True  # placeholders, get_attr, output
    val = node.meta.get("val")
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
        return True
    name = op_name(node.target)
    return val is None and (
        name.startswith("aten._assert") or name.startswith("aten.sym_") or name.startswith("aten._functional_assert")
    )


def counted_op_name(node: torch.fx.Node) -> str:
    """The name under which a compute node is counted in histograms and diffs."""
    if node.op == "call_module":
        return f"module.{node.target}"
    return op_name(node.target)


# -- costs ------------------------------------------------------------------------------------------
@dataclass
class NodeCost:
    name: str
    op: str
    module: str
    flops: int
    activation_bytes: int


@dataclass
class ModuleCost:
    """Costs of one module path. Plain fields count the nodes/parameters directly in this module
    (its innermost-module share); `total_*` fields include every sub-module."""

    path: str
    type: str = ""
    params: int = 0
    flops: int = 0
    activation_bytes: int = 0
    ops: Counter = field(default_factory=Counter)
    total_params: int = 0
    total_flops: int = 0
    total_activation_bytes: int = 0
    total_nodes: int = 0

    @property
    def nodes(self) -> int:
        return sum(self.ops.values())

    def to_dict(self) -> dict:
        return {
            "module": self.path,
            "type": self.type,
            "params": self.params,
            "flops": self.flops,
            "activation_bytes": self.activation_bytes,
            "nodes": self.nodes,
            "ops": dict(sorted(self.ops.items())),
            "total_params": self.total_params,
            "total_flops": self.total_flops,
            "total_activation_bytes": self.total_activation_bytes,
            "total_nodes": self.total_nodes,
        }


@dataclass
class ProgramCosts:
    params: int
    flops: int
    activation_bytes: int
    ops: Counter
    modules: dict[str, ModuleCost]
    """Module path -> costs, in tree order; ROOT ("") is the whole program."""
    nodes: list[NodeCost]
    uncounted_ops: list[str] = field(default_factory=list)
    """Ops whose FLOPs could not be counted (no formula registered for an op outside aten, or an
    input shape that did not resolve); they count 0 in `flops`."""
    shapes_from: str = "meta"
    """How concrete shapes were obtained: "meta" (node meta bound to the example inputs) or
    "meta+fake" (some nodes re-interpreted on fake tensors)."""

    def to_dict(self, include_nodes: bool = False) -> dict:
        d = {
            "params": self.params,
            "flops": self.flops,
            "activation_bytes": self.activation_bytes,
            "nodes": sum(self.ops.values()),
            "ops": dict(self.ops.most_common()),
            "modules": [m.to_dict() for m in self.modules.values()],
            "uncounted_ops": list(self.uncounted_ops),
            "shapes_from": self.shapes_from,
        }
        if include_nodes:
            d["node_costs"] = [vars(n) for n in self.nodes]
        return d


def analyze(program: Program, inputs: tuple | None = None) -> ProgramCosts:
    """Static FLOPs, activation bytes, parameters and op histogram of `program`, per module path, at
    the sizes of `inputs` (positional; default: the program's example inputs)."""
    gm = program.gm
    shapes, shapes_from = concrete_shapes(gm, program.example_inputs if inputs is None else inputs)
    modules: dict[str, ModuleCost] = {}

    def row(path: str, mod_type: str = "") -> ModuleCost:
        m = modules.get(path)
        if m is None:
            m = modules[path] = ModuleCost(path)
        if mod_type and not m.type:
            m.type = mod_type
        return m

    row(ROOT)
    for path, n in _param_counts(gm).items():
        row(path).params += n

    nodes, unknown = [], set()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module") or is_bookkeeping(node):
            continue
        path, mod_type = node_module(node)
        # the types of enclosing modules come along in the stack; keep them for the rows
        for p, t in module_stack(node):
            row(p, qualified_type_name(t))
        flops = node_flops(node, shapes)
        if flops is None:
            unknown.add(counted_op_name(node))
            flops = 0
        act = activation_bytes(node, shapes.get(node))
        name = counted_op_name(node)
        m = row(path, mod_type)
        m.flops += flops
        m.activation_bytes += act
        m.ops[name] += 1
        nodes.append(NodeCost(node.name, name, path, flops, act))

    for path in list(modules):
        for parent in parent_paths(path):
            row(parent)
    for m in modules.values():
        for target in [m.path] + parent_paths(m.path):
            t = modules[target]
            t.total_params += m.params
            t.total_flops += m.flops
            t.total_activation_bytes += m.activation_bytes
            t.total_nodes += m.nodes

    ordered = {p: modules[p] for p in sorted(modules, key=module_sort_key)}
    root = ordered[ROOT]
    ops = Counter()
    for m in ordered.values():
        ops.update(m.ops)
    return ProgramCosts(
        root.total_params,
        root.total_flops,
        root.total_activation_bytes,
        ops,
        ordered,
        nodes,
        sorted(unknown),
        shapes_from,
    )


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _param_counts(gm: torch.nn.Module) -> dict[str, int]:
    """Elements of parameters and buffers per owning module path. A tensor shared under several
    names (tied embeddings) counts once, for the first of its names in tree order, so that the
    attribution does not depend on the order attributes were registered in."""
    names_by_tensor: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, t in named:
        names_by_tensor.setdefault(id(t), []).append(name)
        tensors[id(t)] = t
    counts = Counter()
    for key, names in names_by_tensor.items():
        owner = min(names, key=lambda n: module_sort_key(n.rpartition(".")[0]) + ((2, 0, n),))
        counts[owner.rpartition(".")[0]] += tensors[key].numel()
    return dict(counts)


# -- concrete shapes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """A tensor's concrete shape and dtype. Iterates as its shape, and `.shape` is itself, so the
    flop_counter formulas (which unpack shapes or read `.shape`) take it directly."""

    dims: tuple[int, ...]
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.dims

    def __iter__(self):
        return iter(self.dims)

    def __len__(self):
        return len(self.dims)

    def __getitem__(self, i):
        return self.dims[i]

    def numel(self) -> int:
        return math.prod(self.dims)

    def nbytes(self) -> int:
        return self.numel() * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    try:
        return dtype.itemsize
    except AttributeError:
        return torch.empty((), dtype=dtype).element_size()


class _Unresolved(Exception):
    pass


def concrete_shapes(gm: torch.fx.GraphModule, example_inputs) -> tuple[dict[torch.fx.Node, Any], str]:
    """Map every node to its output with tensors as `TensorSpec`s at the example inputs' sizes.

    Symbolic dims in `meta["val"]` are bound to the example inputs' sizes through the placeholders
    (export traces on widened inputs, so the meta's own hints can be off). Nodes whose meta does not
    resolve are re-interpreted on fake tensors. Returns (shapes, "meta" | "meta+fake").
    """
    bindings = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, x in zip(placeholders, example_inputs or ()):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and isinstance(x, torch.Tensor) and val.dim() == x.dim():
            for d, size in zip(val.shape, x.shape):
                if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                    bindings[d.node.expr] = int(size)

    shapes, missing = {}, []
    for node in gm.graph.nodes:
        if node.op == "output" or (node.op == "call_module" and node.target == "_guards_fn"):
            continue
        if node.op == "get_attr":
            shapes[node] = _spec_tree(get_attribute(gm, node.target), bindings)
            continue
        val = node.meta.get("val", _MISSING)
        try:
            if val is _MISSING:
                raise _Unresolved
            shapes[node] = _spec_tree(val, bindings)
        except _Unresolved:
            missing.append(node)
    if not missing:
        return shapes, "meta"
    fake = _fake_shapes(gm, example_inputs)
    for node in missing:
        shapes[node] = fake.get(node)
    return shapes, "meta+fake"


_MISSING = object()


def _concrete_int(d, bindings) -> int:
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        expr = d.node.expr
        value = expr.xreplace(bindings) if bindings and hasattr(expr, "xreplace") else expr
        if isinstance(value, int) or getattr(value, "is_number", False):
            return int(value)
        hint = d.node.hint
        if hint is not None:
            return int(hint)
    raise _Unresolved


def _spec_tree(val, bindings):
    if isinstance(val, torch.Tensor):
        return TensorSpec(tuple(_concrete_int(d, bindings) for d in val.shape), val.dtype)
    if isinstance(val, (list, tuple)):  # plain tuples also for torch.return_types
        return (list if isinstance(val, list) else tuple)(_spec_tree(v, bindings) for v in val)
    if isinstance(val, torch.SymInt):
        return _concrete_int(val, bindings)
    return val


def _fake_shapes(gm: torch.fx.GraphModule, example_inputs) -> dict:
    """Interpret the graph on fake copies of the example inputs; node -> output spec (best effort)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    recorded: dict = {}

    class ShapeRecorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            with contextlib.suppress(_Unresolved):
                recorded[n] = _spec_tree(out, {})
            return out

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    try:
        with mode, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ShapeRecorder(gm).run(*fake_inputs)
    except Exception:  # noqa: BLE001 - whatever ran before the failure is still usable
        pass
    return recorded


# -- per-node costs ---------------------------------------------------------------------------------
def _resolve_args(node: torch.fx.Node, shapes: dict):
    """The node's arguments with every input node replaced by its concrete value/TensorSpec."""
    return torch.fx.node.map_arg(node.args, shapes.get), torch.fx.node.map_arg(node.kwargs, shapes.get)


def node_flops(node: torch.fx.Node, shapes: dict) -> int | None:
    """FLOPs of one node at the example shapes; None when they cannot be counted (no formula for
    the op, or an input whose shape is unknown)."""
    target = node.target
    if node.op != "call_function":
        return None
    if not isinstance(target, torch._ops.OpOverload):
        return 0 if op_name(target) in _PYTHON_ZERO_FLOP else None
    if any(shapes.get(n) is None for n in node.all_input_nodes):
        return None
    args, kwargs = _resolve_args(node, shapes)
    packet = target.overloadpacket
    try:
        if packet in _COMPOSITE_FLOPS:
            return int(_COMPOSITE_FLOPS[packet](*args, **kwargs))
        if packet in flop_counter.flop_registry:
            return int(flop_counter.flop_registry[packet](*args, **kwargs, out_val=shapes.get(node)))
        if _is_composite(target):
            return _decomposed_flops(target, args, kwargs)
    except Exception:  # noqa: BLE001 - a formula that does not take these shapes: uncounted
        return None
    # other aten/prims ops (pointwise, reductions, views) count 0, as flop_counter does
    return 0 if target.namespace in ("aten", "prims") else None


_PYTHON_ZERO_FLOP = {"getitem"}


def _linear_flops(x, w, bias=None) -> int:
    # x[..., in] @ w[out, in]^T: bias adds are not counted (flop_counter counts addmm as mm)
    rows = math.prod(x.shape[:-1])
    return flop_counter.mm_flop((rows, w.shape[1]), (w.shape[1], w.shape[0]))


def _matmul_flops(a, b) -> int:
    a_shape, b_shape = list(a.shape), list(b.shape)
    if len(a_shape) == 1:
        a_shape = [1] + a_shape
    if len(b_shape) == 1:
        b_shape = b_shape + [1]
    batch = torch.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2]))
    m, k = a_shape[-2:]
    n = b_shape[-1]
    return flop_counter.bmm_flop((math.prod(batch), m, k), (math.prod(batch), k, n))


def _sdpa_flops(q, k, v, *args, **kwargs) -> int:
    if len(q) == 4 and len(k) == 4 and len(v) == 4:
        return flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape)
    # other ranks: leading dims are batch; K/V broadcast to the query's batch
    batch = math.prod(q.shape[:-2])
    l_q, e = q.shape[-2:]
    s, e_v = k.shape[-2], v.shape[-1]
    return flop_counter.bmm_flop((batch, l_q, e), (batch, e, s)) + flop_counter.bmm_flop(
        (batch, l_q, s), (batch, s, e_v)
    )


# Composite ops that export keeps in the graph (pre-dispatch IR) and flop_counter never sees.
_COMPOSITE_FLOPS = {
    torch.ops.aten.linear: _linear_flops,
    torch.ops.aten.matmul: _matmul_flops,
    torch.ops.aten.scaled_dot_product_attention: _sdpa_flops,
}


def _is_composite(op: torch._ops.OpOverload) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")
    except RuntimeError:
        return False


def _decomposed_flops(op, args, kwargs) -> int:
    key = (op, _freeze((args, kwargs)))
    return _decomposed_flops_cached(key, op, args, kwargs)


def _freeze(x):
    if isinstance(x, TensorSpec):
        return ("T", x.dims, str(x.dtype))
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return repr(x)


_decomposed_cache: dict = {}


def _decomposed_flops_cached(key, op, args, kwargs) -> int:
    """Run a composite op on fake tensors under FlopCounterMode (it decomposes to counted ops).
    Fake rather than meta tensors, so device moves (`aten.to(device=cpu)`) work too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if key in _decomposed_cache:
        return _decomposed_cache[key]
    counter = flop_counter.FlopCounterMode(display=False)
    with FakeTensorMode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_fake = lambda a: torch.empty(a.dims, dtype=a.dtype) if isinstance(a, TensorSpec) else a
        fargs, fkwargs = torch.utils._pytree.tree_map(
            to_fake, (args, kwargs), is_leaf=lambda a: isinstance(a, TensorSpec)
        )
        with counter:
            op(*fargs, **fkwargs)
    flops = int(counter.get_total_flops())
    if len(_decomposed_cache) < 4096:
        _decomposed_cache[key] = flops
    return flops


def _aliases_input(target) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return target is operator.getitem
    return any(r.alias_info is not None for r in target._schema.returns)


def activation_bytes(node: torch.fx.Node, out) -> int:
    """Bytes of the tensors `node` newly produces (0 for views, in-place ops and getitem)."""
    if node.op == "call_function" and _aliases_input(node.target):
        return 0
    return sum(
        t.nbytes()
        for t in torch.utils._pytree.tree_leaves(out, is_leaf=lambda a: isinstance(a, TensorSpec))
        if isinstance(t, TensorSpec)
    )


# -- formatting (shared by inspect, diff and the report) --------------------------------------------
def format_count(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M'; with unit 'B' uses binary prefixes (KiB, MiB)."""
    if n is None:
        return "—"
    if unit == "B":
        for prefix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or prefix == "TiB":
                return f"{n:.0f} {prefix}" if prefix == "B" else f"{n:.1f} {prefix}"
            n /= 1024
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or prefix == "P":
            text = f"{n:.0f}" if prefix == "" else f"{n:.3g}{prefix}"
            return f"{text}{unit}"
        n /= 1000
    return str(n)


def format_percent(before: float, after: float) -> str:
    if before == after:
        return "±0%"
    if not before:
        return "new"
    pct = 100.0 * (after - before) / before
    return f"{pct:+.1f}%" if abs(pct) >= 0.05 else f"{pct:+.2g}%"
