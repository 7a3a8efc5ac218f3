"""sparse-prediction: run the vocabulary head only at the positions whose logits are needed.

In masked-LM training ~15% of the positions carry a label, in supervised fine-tuning the prompt
carries none, yet the LM head (BERT: transform dense + gelu + LayerNorm, then the decoder over the
vocabulary; GPT-2: ln_f and lm_head) runs on every position. This pass moves the head after a
gather of the rows that are needed.

Before:

    logits = head(hidden)                                   # [B, T, V]

After (one new input, appended after the others):

    logits = step(*inputs, predict_mask)                    # [N, V], N = predict_mask.sum()
    flat = hidden.reshape(-1, H); rows = flat[nonzero(predict_mask.reshape(-1))]; logits = head(rows)

- `predict_mask`: bool `[B, T]` (True: this position's logits are needed), the dims of the token
  ids; rows come in row-major order, so `labels[predict_mask]` lines up with the logits.
- The head is found by walking back from the logits output (a float `[B, T, V]` whose batch and
  sequence dims are the token ids') through position-wise ops whose value nothing else reads:
  weight projections (linear, addmm, mm, matmul against a stored weight), gelu / relu / tanh /
  sigmoid / silu, layer_norm over the last dim, adds / muls / subs / divs of a scalar or a
  per-channel constant, eval-mode dropout, dtype casts, views and reshapes that only change the
  feature dims (flattening [B, T] into rows and back included) and slices that keep every
  position. The first value where the walk stops is the hidden state `[B, T, H]` (GPT-2: the last
  residual add, BERT: the last residual add before the encoder's output LayerNorm). The head must
  contain a weight projection: an encoder without an LM head is refused, as are a kv-cache step
  program and a program this pass already rewrote. Other outputs stay as they are.
- The selection is `nonzero` + `index_select`: exact (the head's ops are row-wise), with exact
  gradients (index_select's backward scatters into the rows it read), and it re-exports with a
  data-dependent N, so `Program.save` / `load_program` round-trip.

Where it runs: last (only cleanups may follow), on a training program; it changes the program's
inputs and its logits' shape like kv-cache, and cannot run together with it. Verification runs
the program before the pass and this one with an all-True mask (`optpipe.verify.run_outputs`
reshapes the `[B*T, V]` logits back to `[B, T, V]`), so the pass is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode

from optpipe.errors import PassError
from optpipe.graph_toolkit import insert_call, module_path, value
from optpipe.program import Program
from optpipe.registry import PassResult, register_pass
from optpipe.weight_sites import weight_site

aten = torch.ops.aten
INPUT = "predict_mask"
"""Name of the input the pass adds."""

_UNARY = {
    aten.gelu.default,
    aten.relu.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.silu.default,
    aten.clone.default,
    aten.alias.default,
    aten.to.dtype,
    aten._to_copy.default,
}
_BINARY = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.mul.Scalar,
    aten.div.Scalar,
}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_PROJECTIONS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default}


@dataclass(frozen=True)
class SparsePredictionConfig:
    pass


@dataclass
class _HeadOp:
    node: torch.fx.Node
    arg: int  # position of the activation in node.args
    lead: int  # leading (position) dims of the node's value: 2 ([B, T]) or 1 ([B*T])


@dataclass
class _Head:
    logits: torch.fx.Node
    output_index: int  # among the program's tensor outputs
    hidden: torch.fx.Node
    ops: list[_HeadOp] = field(default_factory=list)  # forward order


@register_pass(
    "sparse-prediction",
    SparsePredictionConfig,
    exact=True,
    before=("kv-cache",),
    last=True,
    why="it adds a predict_mask input and returns logits [N, V] for training; no other rewrite "
    "(kv-cache's step program included) keeps that interface",
)
def sparse_prediction(program: Program, config: SparsePredictionConfig) -> PassResult:
    """Run the LM head only at the positions of a new `predict_mask` input (logits become [N, V])."""
    _refuse_unsupported(program)
    gm = program.gm
    like = _token_input(program)
    ids = [n for n in gm.graph.nodes if n.op == "placeholder"][like]
    head = _find_head(gm, value(ids))
    details = {
        "input": INPUT,
        "hidden": head.hidden.name,
        "hidden_path": module_path(head.hidden),
        "head": [_op_name(op.node) for op in head.ops],
        "head_paths": sorted({module_path(op.node) for op in head.ops} - {""}),
    }
    projections = sum(op.node.target in _PROJECTIONS for op in head.ops)
    mask = _add_mask_input(program, ids)
    last = _replay_on_rows(gm, head, mask)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.replace_input_with(head.logits, last)
    for op in reversed(head.ops):  # the head at every position: nothing reads it any more
        gm.graph.erase_node(op.node)
    gm.graph.lint()
    gm.recompile()

    details["vocab"] = vocab = int(value(last).shape[-1])
    program.meta["sparse_prediction"] = {
        "input": INPUT,
        "hidden": head.hidden.name,
        "head_ops": len(head.ops),
        "vocab": vocab,
        "mask_like": program.input_names[like],
        "mask_like_index": like,
        "output_index": head.output_index,
    }
    program.input_names = list(program.input_names) + [INPUT]
    program.example_inputs = tuple(program.example_inputs) + (
        torch.ones(
            program.example_inputs[like].shape[:2], dtype=torch.bool, device=program.example_inputs[like].device
        ),
    )
    if program.dynamic_shapes is not None:
        spec = program.dynamic_shapes[like]
        program.dynamic_shapes = list(program.dynamic_shapes) + [dict(spec) if spec else None]
    return PassResult(True, {"moved": 1, "head_ops": len(head.ops), "projections": projections}, details)


def _refuse_unsupported(program: Program) -> None:
    if program.meta.get("sparse_prediction"):
        raise PassError(
            "sparse-prediction: the program already predicts sparsely (it takes predict_mask)",
            "run sparse-prediction once, on the program before it",
        )
    if program.meta.get("kv_cache"):
        raise PassError(
            "sparse-prediction: the program is a kv-cache step program; it predicts the new tokens only",
            "run sparse-prediction on the training program, not after kv-cache",
        )


def _token_input(program: Program) -> int:
    """Index of the input whose [batch, seq] the mask takes: `input_ids`, else the first 2-d integer one."""
    examples = list(program.example_inputs)
    names = list(program.input_names)
    if "input_ids" in names and names.index("input_ids") < len(examples):
        return names.index("input_ids")
    for i, x in enumerate(examples):
        if isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point() and x.dtype != torch.bool:
            return i
    raise PassError(
        f"sparse-prediction: the program takes ({', '.join(names)}), none of them token ids [batch, seq]",
        "capture the model with its input_ids (e.g. --input input_ids:int64[batch=1,seq=128])",
    )


# -- finding the head ----------------------------------------------------------------------------------
def _expr(size) -> sympy.Expr:
    return sympy.sympify(size.node.expr) if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _same_expr(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.expand(a - b) == 0


def _same(a, b) -> bool:
    return _same_expr(_expr(a), _expr(b))


def _product(sizes) -> sympy.Expr:
    return sympy.Mul(*[_expr(s) for s in sizes]) if sizes else sympy.Integer(1)


def _constants(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes that read no input: parameters, buffers and what is computed from them alone."""
    out = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" or (
            node.op == "call_function" and node.all_input_nodes and all(a in out for a in node.all_input_nodes)
        ):
            out.add(node)
    return out


def _find_head(gm: torch.fx.GraphModule, ids) -> _Head:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [n for n in pytree.tree_leaves(output.args[0]) if isinstance(value(n), torch.Tensor)]
    constants = _constants(gm)
    found = None
    for index, node in enumerate(leaves):
        v = value(node)
        if (
            v.dim() == 3
            and v.is_floating_point()
            and _same(v.shape[0], ids.shape[0])
            and _same(v.shape[1], ids.shape[1])
            and list(node.users) == [output]
            and leaves.count(node) == 1
        ):
            head = _walk_back(gm, node, index, constants)
            if any(op.node.target in _PROJECTIONS for op in head.ops):
                return head
            found = found or head
    if found is None:
        raise PassError(
            "sparse-prediction: no output is per-position logits [batch, seq, vocab] of the token ids",
            "the pass needs a language-model head (BertForMaskedLM, GPT2LMHeadModel, ...) captured with its logits",
        )
    shape = list(value(found.logits).shape)
    raise PassError(
        f"sparse-prediction: no LM head: output {found.logits.name} {shape} at "
        f"{module_path(found.logits) or 'the root'} is not a weight projection of the hidden states",
        "capture the model with its LM head (e.g. BertForMaskedLM, not BertModel)",
    )


def _walk_back(gm: torch.fx.GraphModule, logits: torch.fx.Node, index: int, constants: set) -> _Head:
    """The longest chain of position-wise ops that ends at `logits` and that nothing else reads."""
    ops: list[_HeadOp] = []
    node, lead = logits, 2
    rows = _product(value(logits).shape[:2])
    while True:
        step = _position_wise(gm, node, lead, rows, constants)
        if step is None:
            break
        arg, lead_in = step
        ops.append(_HeadOp(node, arg, lead))
        node, lead = node.args[arg], lead_in
        if len(node.users) != 1 or node.op != "call_function":
            break
    while ops and value(ops[-1].node.args[ops[-1].arg]).dim() != lead + 1:  # hidden must be [rows, H]
        lead = ops.pop().lead
    hidden = ops[-1].node.args[ops[-1].arg] if ops else logits
    return _Head(logits, index, hidden, ops[::-1])


def _activation(node: torch.fx.Node, constants: set) -> int | None:
    """Position in node.args of the one argument that reads the inputs, or None (several, or none)."""
    found = [i for i, a in enumerate(node.args) if isinstance(a, torch.fx.Node) and a not in constants]
    kw_nodes = [a for a in node.kwargs.values() if isinstance(a, torch.fx.Node) and a not in constants]
    return found[0] if len(found) == 1 and not kw_nodes else None


def _position_wise(gm, node: torch.fx.Node, lead: int, rows, constants: set) -> tuple[int, int] | None:
    """(activation arg, its leading dims) when `node` (leading dims `lead`) acts on each position alone."""
    if node.op != "call_function":
        return None
    arg = _activation(node, constants)
    if arg is None or value(node) is None or value(node.args[arg]) is None:
        return None
    out, x, target = value(node), value(node.args[arg]), node.target
    if target in _RESHAPES:
        lead_in = next((k for k in (2, 1) if x.dim() > k and _same_expr(_product(x.shape[:k]), rows)), None)
        return (arg, lead_in) if lead_in and out.dim() > lead else None
    if target is aten.slice.Tensor:
        return (arg, lead) if _slice_keeps_positions(node, x, lead) else None
    if out.dim() != x.dim() and target not in _PROJECTIONS:
        return None
    if target in _PROJECTIONS:
        site = weight_site(gm, node)
        ok = not isinstance(site, (str, type(None))) and site.x is node.args[arg] and x.dim() == out.dim()
        return (arg, lead) if ok else None
    if target is aten.layer_norm.default:
        return (arg, lead) if arg == 0 and len(node.args[1]) <= x.dim() - lead else None
    if target is aten.dropout.default:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return (arg, lead) if arg == 0 and train is False else None
    if target in _UNARY:
        return (arg, lead) if arg == 0 else None
    if target in _BINARY:
        other = node.args[1 - arg] if len(node.args) > 1 else None
        per_channel = not isinstance(other, torch.fx.Node) or (
            value(other) is not None and value(other).dim() <= out.dim() - lead
        )
        return (arg, lead) if per_channel else None
    return None


def _slice_keeps_positions(node: torch.fx.Node, x, lead: int) -> bool:
    """A slice of a feature dim, or one that keeps every position (`hidden[:, 0:]`, GPT-2's logits_to_keep=0)."""
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1 :])[:4]
    dim = dim % x.dim()
    if dim >= lead:
        return True
    end = end.meta.get("val") if isinstance(end, torch.fx.Node) else end  # a symbolic size
    if not isinstance(end, (int, torch.SymInt, type(None))):
        return False
    whole = start in (0, None) and step == 1
    return whole and (end is None or (isinstance(end, int) and end >= 2**62) or _same(end, x.shape[dim]))


# -- the rewrite ---------------------------------------------------------------------------------------
def _add_mask_input(program: Program, ids: torch.fx.Node) -> torch.fx.Node:
    """The `predict_mask` placeholder after the last input, with a fake value of the ids' [B, T]."""
    graph = program.gm.graph
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        mask = graph.placeholder(INPUT)
    fake = value(ids)
    mode = detect_fake_mode([fake]) if fake is not None else None
    if mode is not None:
        with mode:
            mask.meta["val"] = torch.empty(fake.shape[:2], dtype=torch.bool)
    codegen = graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:  # export's calling convention: (args, kwargs)
        args = tuple(program.example_inputs) + (torch.ones(1, dtype=torch.bool),)
        in_spec = pytree.tree_structure((args, {}))
        codegen.pytree_info = info._replace(orig_args=[*info.orig_args, INPUT], in_spec=in_spec)
    return mask


def _replay_on_rows(gm: torch.fx.GraphModule, head: _Head, mask: torch.fx.Node) -> torch.fx.Node:
    """Insert the gather and the head's ops on the gathered rows; returns the new logits node."""
    graph = gm.graph
    first = head.ops[0].node
    hidden = head.hidden
    features = value(hidden).shape[-1]
    with graph.inserting_before(head.logits):
        flat = insert_call(graph, aten.reshape.default, (hidden, [-1, features]), like=first)
        flat_mask = insert_call(graph, aten.reshape.default, (mask, [-1]), like=first)
        where = insert_call(graph, aten.nonzero.default, (flat_mask,), like=first)
        index = insert_call(graph, aten.reshape.default, (where, [-1]), like=first)
        rows = insert_call(graph, aten.index_select.default, (flat, 0, index), like=first)
        for op in head.ops:
            rows = _row_op(graph, op, rows)
    return rows


def _row_op(graph: torch.fx.Graph, op: _HeadOp, rows: torch.fx.Node) -> torch.fx.Node:
    """`op` applied to rows [N, *features] instead of [*positions, *features]."""
    node, x = op.node, value(rows)
    if node.target in _RESHAPES:
        features = list(value(node).shape[op.lead :])
        if all(_same(a, b) for a, b in zip(features, x.shape[1:])) and len(features) == x.dim() - 1:
            return rows
        return insert_call(graph, aten.reshape.default, (rows, [-1, *[int(f) for f in features]]), like=node)
    if node.target is aten.slice.Tensor:
        dim = node.args[1] % value(node).dim()
        if dim < op.lead:  # keeps every position
            return rows
        args = (rows, dim - op.lead + 1, *node.args[2:])
        return insert_call(graph, aten.slice.Tensor, args, node.kwargs, like=node)
    args = list(node.args)
    args[op.arg] = rows
    return insert_call(graph, node.target, tuple(args), node.kwargs, like=node)


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    return target.name().split("::")[-1] if hasattr(target, "name") else str(target)
