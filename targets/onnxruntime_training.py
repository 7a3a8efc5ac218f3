"""Training on the `onnxruntime` target (onnxruntime-training): `OrtTrainer(program)` runs forward +
loss + backward + AdamW in ONNX Runtime. The target (targets/onnxruntime_backend.py) hands out its
trainer and `check_trainable` from here.

How the artifacts are made from a Program (all in `OrtTrainer.__init__`, after `check_trainable`):
1. The program's graph and the loss are wrapped in one module, `(*inputs, labels, loss_scale) ->
   loss * loss_scale` (`_LossModule`, the loss is `training_loss`), and exported with torch.export
   with the program's dynamic dims (labels share the token input's dims). For mlm+nsp the module
   also takes `next_sentence_label` and `nsp_scale` and returns `(mlm * loss_scale + nsp * nsp_scale,
   mlm, nsp)`: the gradient graph starts at the first output, the two means come back beside it.
2. ALL of optpipe's decompositions (native ORT lowerings are inference kernels without gradients)
   and `TRAINING_DECOMPOSITIONS` (split/chunk/unbind -> slice/select: torchlib writes them as
   SplitToSequence/SequenceAt; elu/softplus -> Exp/Log/Where: ORT 1.19 has no Elu/Softplus
   gradient), only when the graph uses one of them (a retrace costs seconds); then
   `torch.onnx.export(dynamo=True)` (which applies its own decompositions) WITHOUT the onnxscript
   optimizer (it folds transposed weights into new, unnamed initializers, and ORT would then train
   copies) and without the contrib-op fusions.
3. `_make_differentiable`: CastLike -> Cast (ORT 1.19 has no CastLike gradient),
   LayerNormalization with its Mean/InvStdDev outputs present (its gradient reads them), and a
   `Where` whose computed value input is broadcast (T5's relative-position bias, [1, heads, q, k],
   masked at [batch, 1, q, k]) reading that input expanded to the output's shape first: ORT's Where
   gradient is `Where(cond, dY, 0)` at the output's shape, never summed back over the broadcast
   axes, so the gradient of what fed the bias arrived un-reduced (the Squeeze that is Unsqueeze's
   gradient then failed on [batch, heads, q, k]). Expand's gradient does the sum.
4. `onnxruntime.training.artifacts.generate_artifacts(loss=None)` (the graph already ends in the
   loss) with AdamW, then the optimizer graph's `AdamWOptimizer` is switched to `adam_mode=0`:
   ORT's kernel in that mode is torch.optim.AdamW's update (decoupled decay `p -= lr*wd*p` first,
   bias correction on m and v separately, eps added to sqrt(v / (1 - beta2^t))). The stock onnxblock
   AdamW uses mode 1 (Hugging Face's: eps added before the bias correction, decay applied after the
   update), which drifts from torch. Remaining difference: ORT computes the bias corrections in
   float32 (torch in float64), a relative 1e-7 per step.
5. `onnxruntime.training.api`: CheckpointState + Module (train and eval graphs) + Optimizer.

`check_trainable` runs first (and `OrtTrainer` runs it): fp32 parameters, optpipe ops with a
decomposition, then steps 1-2 (kept for the trainer) and every node of the result checked against
the exporter's registry and against `_NO_ORT_GRADIENT` (ATen ops whose ONNX form ORT 1.19 cannot
differentiate, measured), the latter only where a parameter's gradient flows. Whatever still fails
in ORT's gradient builder comes back as one line naming the ONNX op and the FX node it came from.

Parameter names: the exporter names each initializer `model.<program.gm parameter name>`; a tied
group (GPT-2's wte/lm_head) is ONE initializer, so it stays tied in ORT, and `state_dict()` reports it
under every name of the group. A group is trainable when any of its names is in `trainable`.
Buffers are constants of the graph; parameters not in `trainable` are frozen in the checkpoint.

Gradient accumulation: `accumulate(inputs, labels, scale)` runs forward + backward and adds
`scale * d(loss)/d(param)` to the gradient buffers (ORT sums them); `optimizer_step(lr)` applies
AdamW once and clears them. For k micro-batches whose mean loss should drive the step, pass
`scale=1/k` (the same as torch's `(loss / k).backward()`); the returned loss is always unscaled.
`step(inputs, labels, lr)` is `accumulate(..., scale=1) + optimizer_step(lr)`.

Limits: fp32 trainable parameters only (ORT's AdamW kernel); the graph trains in the mode it was
captured in (eval: no dropout); the loss is computed at the shapes given, with dynamic batch/seq
where the program has them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
import time
import weakref

import torch
import torch.utils._pytree as pytree

from optpipe.errors import TargetError, UsageError, first_line
from optpipe.graph_toolkit import module_path
from optpipe.losses import OBJECTIVES, nsp_loss, require_nsp_head, task_loss
from optpipe.ops import decompositions, is_optpipe_op
from optpipe.pipeline import introduced_by
from optpipe.target import UnsupportedNode, op_label, token_input

from .onnx_export import (
    DEFAULT_OPSET,
    EXPORTER_DROPS,
    MAX_IR_VERSION,
    export_error,
    name_scopes,
    native_lowerings_key,
    onnx_decomposition_table,
    onnx_origins,
    onnx_registry,
    ort_message,
    quiet_exporter,
    require_onnx_packages,
    translates,
    views_as_reshapes,
)

TRAIN_OPSET = DEFAULT_OPSET
_MODEL_ATTR = "model"  # the _LossModule attribute holding program.gm: initializers are "model.<name>"
# ONNX ops ORT 1.19 cannot differentiate (measured) that the exporter may write: named, with the FX
# node they came from, when the gradient builder fails.
_NO_GRADIENT_OPS = (
    "SplitToSequence",
    "SequenceAt",
    "SequenceConstruct",
    "ConcatFromSequence",
    "SequenceInsert",
    "CastLike",
    "Einsum",
    "CumSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "Elu",
    "Softplus",
)


training_loss = task_loss  # the loss every optpipe trainer uses (optpipe.losses.task_loss)


def loss_inputs(objective: str) -> list[str]:
    """The loss graph's inputs after the program's: labels and the scale of the loss; for mlm+nsp
    also the next-sentence labels and the scale of their mean loss."""
    if objective == "mlm+nsp":
        return ["labels", "next_sentence_label", "loss_scale", "nsp_scale"]
    return ["labels", "loss_scale"]


def _loss_examples(ids: torch.Tensor, dims: dict | None, objective: str) -> tuple[tuple, list]:
    """Example values and dynamic dims of the `loss_inputs`: labels shaped as the token ids; for mlm+nsp
    one next-sentence label per row (the ids' batch dim). Each scale is its own tensor: torch.export
    makes one input of a tensor passed twice."""
    if objective != "mlm+nsp":
        return (ids.clone(), torch.tensor(1.0)), [dims, None]
    batch = {0: dims[0]} if dims and 0 in dims else None
    nsp_labels = torch.zeros(ids.shape[0], dtype=torch.long)
    return (ids.clone(), nsp_labels, torch.tensor(1.0), torch.tensor(1.0)), [dims, batch, None, None]


class _LossModule(torch.nn.Module):
    """`(*program inputs, labels, loss_scale) -> training_loss * loss_scale`: what is exported. For
    mlm+nsp `(*program inputs, labels, next_sentence_label, loss_scale, nsp_scale) -> (mlm * loss_scale
    + nsp * nsp_scale, mlm, nsp)`, the two means also returned (the gradient graph starts at the first)."""

    def __init__(self, gm, objective: str):
        super().__init__()
        setattr(self, _MODEL_ATTR, gm)
        self.objective = objective

    def forward(self, *args):
        extra = len(loss_inputs(self.objective))
        inputs, losses = args[:-extra], args[-extra:]
        logits = getattr(self, _MODEL_ATTR)(*inputs)
        if self.objective == "mlm+nsp":  # BertForPreTraining: the LM head's logits, then the NSP head's
            labels, nsp_labels, loss_scale, nsp_scale = losses
            mlm, nsp = training_loss(logits[0], labels, "mlm"), nsp_loss(logits[1], nsp_labels)
            return mlm * loss_scale + nsp * nsp_scale, mlm, nsp
        if isinstance(logits, (tuple, list)):  # the LM head's logits come first
            logits = logits[0]
        labels, loss_scale = losses
        return training_loss(logits, labels, self.objective) * loss_scale


def _split_as_slices(x, split_size, dim=0):
    size, out, start = x.shape[dim], [], 0
    while start < size:  # split sizes are static here (the exporter needs them so anyway)
        out.append(torch.ops.aten.slice.Tensor(x, dim, start, min(start + split_size, size)))
        start += split_size
    return out


def _split_sizes_as_slices(x, sizes, dim=0):
    out, start = [], 0
    for size in sizes:
        out.append(torch.ops.aten.slice.Tensor(x, dim, start, start + size))
        start += size
    return out


def _unbind_as_selects(x, dim=0):
    return [torch.ops.aten.select.int(x, dim, i) for i in range(x.shape[dim])]


def _chunk_as_slices(x, chunks, dim=0):
    return _split_as_slices(x, -(-x.shape[dim] // chunks), dim)  # torch.chunk: ceil(size / chunks) each


def _elu_differentiable(x, alpha=1.0, scale=1.0, input_scale=1.0):
    aten = torch.ops.aten
    # exp of the clamped input: the branch where() drops must not overflow (0 * inf = NaN in backward)
    negative = aten.sub.Tensor(aten.exp.default(aten.clamp_max.default(aten.mul.Tensor(x, input_scale), 0.0)), 1.0)
    return aten.where.self(aten.gt.Scalar(x, 0), aten.mul.Tensor(x, scale), aten.mul.Tensor(negative, scale * alpha))


def _softplus_differentiable(x, beta=1.0, threshold=20.0):
    aten = torch.ops.aten
    scaled = aten.mul.Tensor(x, beta)
    soft = aten.div.Tensor(
        aten.log.default(aten.add.Tensor(aten.exp.default(aten.clamp_max.default(scaled, threshold)), 1.0)), beta
    )
    return aten.where.self(aten.gt.Scalar(scaled, threshold), x, soft)


TRAINING_DECOMPOSITIONS = {
    # torchlib writes these as SplitToSequence + SequenceAt, which ORT cannot differentiate
    torch.ops.aten.chunk.default: _chunk_as_slices,
    torch.ops.aten.split.Tensor: _split_as_slices,
    torch.ops.aten.split_with_sizes.default: _split_sizes_as_slices,
    torch.ops.aten.unbind.int: _unbind_as_selects,
    # ONNX Elu and Softplus have no gradient in ORT 1.19; these forms use ops that have one
    torch.ops.aten.elu.default: _elu_differentiable,
    torch.ops.aten.softplus.default: _softplus_differentiable,
}

# ATen ops whose ONNX form has no gradient in ORT 1.19 (measured): blocked when a parameter's
# gradient would flow through them (on shape or mask paths they are harmless)
_NO_ORT_GRADIENT = {
    torch.ops.aten.einsum.default: "Einsum",
    torch.ops.aten.cumsum.default: "CumSum",
    torch.ops.aten.cumprod.default: "CumProd",
    torch.ops.aten.amax.default: "ReduceMax",
    torch.ops.aten.amin.default: "ReduceMin",
    torch.ops.aten.max.dim: "ReduceMax",
    torch.ops.aten.min.dim: "ReduceMin",
    torch.ops.aten.max.default: "ReduceMax",
    torch.ops.aten.min.default: "ReduceMin",
    torch.ops.aten.prod.default: "ReduceProd",
    torch.ops.aten.prod.dim_int: "ReduceProd",
    torch.ops.aten.logcumsumexp.default: "CumSum",
}


class _LossExport:
    """The loss module of a program, exported and decomposed for training: what `check_trainable`
    inspects and `OrtTrainer` hands the ONNX exporter (kept for it, like the inference check)."""

    def __init__(self, program, objective: str):
        from torch.fx.experimental import _config as fx_config

        from optpipe.program import export_module

        self.token = token_input(program)
        inputs = tuple(program.example_inputs)
        dynamic = list(program.dynamic_shapes or [None] * len(inputs))
        names = list(program.input_names) + loss_inputs(objective)
        losses, loss_dims = _loss_examples(inputs[self.token], dynamic[self.token], objective)
        try:
            ep, kept = export_module(
                _LossModule(program.gm, objective), inputs + losses, names, dynamic + loss_dims, strict_dims=True
            )
        except Exception as e:
            raise TargetError(
                f"target onnxruntime: torch.export of the program with its {objective} loss failed: {first_line(e)}",
                "train on cpu/cuda, or drop the last pass",
            ) from e
        # the exporter's own decompositions run inside torch.onnx.export; these are the ones it lacks
        table = {**TRAINING_DECOMPOSITIONS, **decompositions()}
        self.ep = ep
        try:
            if any(n.op == "call_function" and n.target in table for n in ep.graph.nodes):  # a retrace: seconds
                with fx_config.patch(backed_size_oblivious=True), quiet_exporter():
                    self.ep = ep.run_decompositions(table)
            self.ep = views_as_reshapes(self.ep, reshapes=True)  # as for inference: T5's view after a transpose
        except Exception as e:
            raise TargetError(
                f"target onnxruntime: decomposition for training failed: {first_line(e)}",
                "an optpipe op's decomposition does not trace; check the op that introduced it",
            ) from e
        tensors = [(n, d) for n, x, d in zip(names, inputs + losses, kept) if isinstance(x, torch.Tensor)]
        self.input_names = [n for n, _ in tensors]
        self.dynamic = tuple(dict(d) if d else None for _, d in tensors) if any(d for _, d in tensors) else None

    def blocked(self, opset: int) -> list[UnsupportedNode]:
        """Nodes of the decomposed loss graph that the exporter cannot translate at `opset` (judged as
        the inference check does), or whose ONNX form ORT cannot differentiate on a parameter's path."""
        found: dict[str, UnsupportedNode] = {}
        graded = self._on_gradient_path()
        for node in self.ep.graph.nodes:
            if node.target in _NO_ORT_GRADIENT and node in graded:
                label = f"{op_label(node.target)} (ONNX {_NO_ORT_GRADIENT[node.target]}: no gradient in ORT)"
                found.setdefault(label, UnsupportedNode(node.name, label, module_path(node), introduced_by(node)))
        registry = onnx_registry(opset)
        if registry is None:
            return list(found.values())
        onnx_table = onnx_decomposition_table(registry)
        for node in self.ep.graph.nodes:
            if node.op != "call_function" or getattr(node.target, "namespace", None) == "onnx":
                continue
            label = op_label(node.target)
            if label.startswith(EXPORTER_DROPS) or node.target in onnx_table or _composite(node.target):
                continue  # dropped by the exporter, or decomposed by it into ops it has
            if not translates(node, registry):
                origin = op_label(node.meta.get("original_aten") or node.target)
                found.setdefault(origin, UnsupportedNode(node.name, origin, module_path(node), introduced_by(node)))
        return list(found.values())

    def _on_gradient_path(self) -> set:
        """Nodes whose floating-point output depends on a parameter: where a gradient flows."""
        params = {
            s.arg.name
            for s in self.ep.graph_signature.input_specs
            if s.kind == torch.export.graph_signature.InputKind.PARAMETER
        }
        reached: set = set()
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                if node.name in params:
                    reached.add(node)
                continue
            if node.op != "call_function" or not any(a in reached for a in node.all_input_nodes):
                continue
            vals = [v for v in pytree.tree_leaves(node.meta.get("val")) if isinstance(v, torch.Tensor)]
            if any(v.is_floating_point() for v in vals):
                reached.add(node)
        return reached


def _composite(op) -> bool:
    """An op every run_decompositions (the exporter's included) replaces by its ATen implementation."""
    return isinstance(op, torch._ops.OpOverload) and torch._C._dispatch_has_kernel_for_dispatch_key(
        op.name(), "CompositeImplicitAutograd"
    )


_LOSS_EXPORT: tuple | None = None  # (weakref to program, key, _LossExport): check_trainable -> OrtTrainer


def _loss_export(program, objective: str) -> _LossExport:
    global _LOSS_EXPORT
    key = (id(program.gm), program.gm.code, objective, native_lowerings_key())
    cached = _LOSS_EXPORT
    if cached and cached[0]() is program and cached[1] == key:
        return cached[2]
    result = _LossExport(program, objective)
    _LOSS_EXPORT = (weakref.ref(program), key, result)
    return result


def check_trainable(program, objective: str = "clm") -> None:
    """Raise TargetError naming every op that keeps `program` from training on onnxruntime (with its
    module path and the pass that introduced it), before any ONNX work; UsageError for a bad
    objective or a program without a token-id input.

    Checked, cheapest first: fp32 parameters (ORT's AdamW kernel), optpipe ops (training lowers them
    through their decomposition: native ORT lowerings have no gradient), then the program with its
    loss, exported and decomposed, against the exporter's ONNX registry (as the inference check).
    Ops that translate but have no gradient in ORT are named when the gradient graph is built."""
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}", f"choose one of: {', '.join(OBJECTIVES)}")
    if objective == "mlm+nsp":
        require_nsp_head(program, "onnxruntime")
    require_onnx_packages()
    try:
        from onnxruntime.training import artifacts  # noqa: F401
    except ImportError:
        raise UsageError(
            "training on onnxruntime needs onnxruntime-training (onnxruntime.training is missing)",
            "pip install onnxruntime-training (and not the plain onnxruntime, which replaces it)",
        ) from None
    token_input(program)
    wrong = [(n, p.dtype) for n, p in program.gm.named_parameters() if p.dtype != torch.float32]
    if wrong:
        name, dtype = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise TargetError(
            f"target onnxruntime trains fp32 parameters only: {name} is {str(dtype).replace('torch.', '')}{more}",
            "train in fp32 (ORT's AdamW kernel takes float), or train on cpu/cuda",
        )
    have = decompositions()
    blocked = [
        UnsupportedNode(n.name, op_label(n.target), module_path(n), introduced_by(n))
        for n in program.gm.graph.nodes
        if n.op == "call_function" and is_optpipe_op(n.target) and n.target not in have
    ]
    if not blocked:
        blocked = _loss_export(program, objective).blocked(TRAIN_OPSET)
    if blocked:
        listing = "; ".join(str(u) for u in blocked[:10])
        more = f" and {len(blocked) - 10} more" if len(blocked) > 10 else ""
        raise TargetError(
            f"target onnxruntime cannot train {len(blocked)} node(s): {listing}{more}",
            "training lowers optpipe ops through their ATen decomposition: give the op one, or train on cpu/cuda",
        )


def _make_differentiable(model) -> dict[str, int]:
    """Rewrite, in place, what ORT 1.19's gradient builder cannot take (an onnx ModelProto):
    CastLike -> Cast to the like-input's type, and LayerNormalization with all three outputs."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in inferred.graph.node:  # Constant nodes: their value's type
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    counts = {"cast_like": 0, "layer_norm_stats": 0}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "CastLike" and node.domain in ("", "ai.onnx") and types.get(node.input[1]):
            nodes.append(
                onnx.helper.make_node(
                    "Cast", [node.input[0]], list(node.output), name=node.name, to=types[node.input[1]]
                )
            )
            counts["cast_like"] += 1
            continue
        if node.op_type == "LayerNormalization" and len(node.output) < 3:
            while len(node.output) < 3:
                node.output.append(f"{node.name or node.output[0]}_stat{len(node.output)}")
            counts["layer_norm_stats"] += 1
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    counts["where_broadcast"] = _expand_where_inputs(model, inferred)
    return counts


_FLOAT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16: what has a gradient


def _expand_where_inputs(model, inferred) -> int:
    """Give every `Where` its computed value inputs (not constants) at the output's shape, in place:
    x -> Expand(Expand(x, Shape(cond)), Shape(other)), the output's shape by bidirectional broadcast,
    wherever shape inference does not show x at that shape already (see the module notes: ORT's Where
    gradient does not reduce a broadcast input). Returns how many inputs were expanded."""
    import onnx

    shapes, floats = {}, set()
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.tensor_type.elem_type in _FLOAT_TYPES:
            floats.add(v.name)
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value or d.dim_param or None for d in v.type.tensor_type.shape.dim]
    prefix = _MODEL_ATTR + "."  # a parameter's initializer (may be trained); the exporter's own are constants
    fixed = {t.name for t in model.graph.initializer if not t.name.startswith(prefix)} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output
    }
    nodes, expanded = [], 0
    for node in model.graph.node:
        if node.op_type == "Where" and node.domain in ("", "ai.onnx") and node.output[0] in floats:
            out = shapes.get(node.output[0])
            for k in (1, 2):
                x = node.input[k]
                if x in fixed or (out is not None and None not in out and shapes.get(x) == out):
                    continue
                tag = f"{node.name or node.output[0]}_in{k}"
                cond, other = node.input[0], node.input[3 - k]
                nodes += [
                    onnx.helper.make_node("Shape", [cond], [f"{tag}_cond_shape"], name=f"{tag}_cond_shape"),
                    onnx.helper.make_node("Shape", [other], [f"{tag}_other_shape"], name=f"{tag}_other_shape"),
                    onnx.helper.make_node("Expand", [x, f"{tag}_cond_shape"], [f"{tag}_half"], name=f"{tag}_half"),
                    onnx.helper.make_node(
                        "Expand", [f"{tag}_half", f"{tag}_other_shape"], [f"{tag}_full"], name=f"{tag}_full"
                    ),
                ]
                node.input[k] = f"{tag}_full"
                expanded += 1
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return expanded


def _blocking_ops(model, params: list[str], extra: tuple = ()) -> str:
    """' (ops: X from module [node], ...)' for the ops without an ORT gradient that lie on a path from
    `params` to the loss; '' when none is found."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen, frontier, where = set(), list(params), []
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            frontier.extend(node.output)
            if node.op_type in _NO_GRADIENT_OPS or node.op_type in extra:
                names = name_scopes(node)
                origin = f" from {names[-2] or '<top>'} [{names[-1]}]" if len(names) >= 2 else ""
                where.append(f"{node.op_type}{origin}")
    if not where:
        return ""
    unique = list(dict.fromkeys(where))
    more = f" and {len(unique) - 3} more" if len(unique) > 3 else ""
    return f" (ONNX ops without a gradient: {', '.join(unique[:3])}{more})"


def _use_torch_adamw(path: str, betas, eps: float, weight_decay: float) -> None:
    """Set the optimizer graph's AdamWOptimizer to torch.optim.AdamW: adam_mode=0 (see the module
    notes), bias correction on, and these betas/eps/weight decay."""
    import onnx

    model = onnx.load(path)
    values = {
        "alpha": float(betas[0]),
        "beta": float(betas[1]),
        "epsilon": float(eps),
        "weight_decay": float(weight_decay),
    }
    nodes = [n for n in model.graph.node if n.op_type == "AdamWOptimizer"]
    if len(nodes) != 1 or "adam_mode" not in {a.name for a in nodes[0].attribute}:
        raise TargetError(
            "onnxruntime-training wrote no AdamWOptimizer node with adam_mode: cannot match torch.optim.AdamW",
            "check the onnxruntime-training version (1.19 works)",
        )
    for a in nodes[0].attribute:
        if a.name in values:
            a.f = values[a.name]
        elif a.name == "adam_mode":
            a.i = 0
        elif a.name == "correct_bias":
            a.i = 1
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
    onnx.save(model, path)


class OrtTrainer:
    """Train `program` on onnxruntime-training: forward + loss + backward + AdamW in ORT.

    >>> trainer = OrtTrainer(program, objective="clm", lr=1e-3)           # doctest: +SKIP
    >>> for ids in batches: loss = trainer.step((ids,), ids)               # doctest: +SKIP
    >>> trainer.load_into(program); program.save("trained.pt2")           # doctest: +SKIP

    `trainable`: program.gm parameter names to train (None: all); the rest stay frozen.
    `lr`, `betas`, `eps`, `weight_decay`: as torch.optim.AdamW (same update; see the module docstring).
    `clip`, `lr_scales`, `weight_decays` (the Target.trainer contract) must stay off: ORT's AdamW
    has one group and no clipping.
    `workdir`: where the artifacts go (training_model.onnx, eval_model.onnx, optimizer_model.onnx,
    checkpoint); default a temporary folder removed with the trainer.
    """

    def __init__(
        self,
        program,
        *,
        objective: str = "clm",
        trainable: list[str] | None = None,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip: float | None = None,
        lr_scales: dict | None = None,
        weight_decays: dict | None = None,
        workdir: str | None = None,
    ):
        if (
            clip
            or any(v != 1.0 for v in (lr_scales or {}).values())
            or any(v != weight_decay for v in (weight_decays or {}).values() if v)
        ):
            raise UsageError(
                "target onnxruntime trains with one AdamW group and no gradient clipping",
                "drop --clip / --layer-decay / per-parameter weight decay, or train on cpu or tvm",
            )
        names = dict(program.gm.named_parameters(remove_duplicate=False))
        if trainable is not None:
            unknown = [n for n in trainable if n not in names]
            if unknown:
                raise UsageError(
                    f"trainable: no parameter named {unknown[0]!r} in the program",
                    f"parameters look like: {', '.join(list(names)[:5])}",
                )
        check_trainable(program, objective)
        self.objective = objective
        self.lr = float(lr)
        self.info: dict = {}
        self.loss_parts: dict[str, float] = {}  # mlm+nsp: the last micro-batch's mean MLM and NSP losses
        # one entry per tensor: every name of a tied group maps to the group's first name
        groups: dict[int, list[str]] = {}
        for name, p in names.items():
            groups.setdefault(id(p), []).append(name)
        wanted = set(names) if trainable is None else set(trainable)
        self._groups = list(groups.values())
        self._trainable_groups = [g for g in self._groups if wanted & set(g)]
        if not self._trainable_groups:
            raise UsageError("trainable names no parameter: nothing to train", "pass trainable=None to train all")

        own = workdir is None
        self.workdir = tempfile.mkdtemp(prefix="optpipe-ort-train-") if own else os.fspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        if own:
            weakref.finalize(self, shutil.rmtree, self.workdir, True)
        start = time.perf_counter()
        model = self._export(program)
        self.info["export_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        self._generate(model, betas, eps, weight_decay)
        self.info["artifacts_s"] = round(time.perf_counter() - start, 2)
        self._open()

    # -- building the artifacts -------------------------------------------------------------------
    def _export(self, program):
        """The ONNX ModelProto of `_LossModule(program.gm)`, ready for the gradient builder."""
        exported = _loss_export(program, self.objective)
        global _LOSS_EXPORT
        _LOSS_EXPORT = None  # the weights it holds are about to be trained: never reuse it
        self.input_names = list(program.input_names)
        try:
            with quiet_exporter():
                onnx_program = torch.onnx.export(
                    exported.ep,
                    (),
                    dynamo=True,
                    opset_version=TRAIN_OPSET,
                    input_names=exported.input_names,
                    output_names=["loss", "mlm_loss", "nsp_loss"] if self.objective == "mlm+nsp" else ["loss"],
                    dynamic_shapes=exported.dynamic,
                    optimize=False,
                    verbose=False,
                )
        except Exception as e:
            raise export_error(e, exported.ep) from e
        model = onnx_program.model_proto
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        self.info["rewrites"] = _make_differentiable(model)
        return model

    def _generate(self, model, betas, eps, weight_decay) -> None:
        from onnxruntime.training import artifacts

        prefix = _MODEL_ATTR + "."
        initializers = {t.name for t in model.graph.initializer}
        self._onnx_name: dict[str, str] = {}  # group's first name -> initializer
        for group in self._groups:
            hit = next((prefix + n for n in group if prefix + n in initializers), None)
            if hit is not None:
                self._onnx_name[group[0]] = hit
        requires_grad = [self._onnx_name[g[0]] for g in self._trainable_groups if g[0] in self._onnx_name]
        frozen = [
            self._onnx_name[g[0]] for g in self._groups if g[0] in self._onnx_name and g not in self._trainable_groups
        ]
        missing = [g[0] for g in self._trainable_groups if g[0] not in self._onnx_name]
        self.info.update({"trainable_tensors": len(requires_grad), "frozen_tensors": len(frozen)})
        if missing:  # not used by the loss (or folded into a constant): nothing to train there
            self.info["not_in_graph"] = missing
        if not requires_grad:
            raise TargetError(
                "target onnxruntime: none of the trainable parameters reaches the loss",
                "check `trainable` against program.gm.named_parameters()",
            )
        log: list[str] = []
        try:
            with quiet_exporter(), _native_stderr(log):
                artifacts.generate_artifacts(
                    model,
                    requires_grad=requires_grad,
                    frozen_params=frozen,
                    loss=None,
                    optimizer=artifacts.OptimType.AdamW,
                    artifact_directory=self.workdir,
                )
        except Exception as e:
            text = str(e)
            no_grad = re.search(r"gradient builder has not been registered: ?(\w+)", text)
            m = re.search(r"partial derivative for '([^']+)'", text)
            if no_grad:
                message = f"ORT has no gradient for {no_grad.group(1)}"
            else:  # "/onnxruntime_src/...cc:621 ... [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Cannot ..."
                message = re.sub(r"^.*?\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text.strip().splitlines()[0])
            blocking = _blocking_ops(
                model, [m.group(1)] if m else requires_grad, (no_grad.group(1),) if no_grad else ()
            )
            if not blocking:  # ORT's own warning says where the gradient stopped
                logged = re.sub(r"\x1b\[[0-9;]*m", "", "".join(log))
                cut = re.search(r"nodes are unreachable for gradient back propagation: ([^\n]*)", logged)
                blocking = f" (the gradient stops at: {cut.group(1).strip()[:200]})" if cut else ""
            message = message.replace(f"'{prefix}", "'")  # the program's parameter names
            raise TargetError(
                f"target onnxruntime cannot build the gradient graph: {message}{blocking}",
                "an op on the way to the loss has no gradient in onnxruntime-training: train on cpu/cuda",
            ) from e
        _use_torch_adamw(os.path.join(self.workdir, "optimizer_model.onnx"), betas, eps, weight_decay)
        for name in ("training_model.onnx", "eval_model.onnx"):
            _clamp_ir_version(os.path.join(self.workdir, name))

    def _open(self) -> None:
        import onnxruntime as ort
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.log_severity_level = 3
        path = functools.partial(os.path.join, self.workdir)
        self.state = CheckpointState.load_checkpoint(path("checkpoint"))
        try:
            with _native_stderr([]):
                self.module = Module(
                    path("training_model.onnx"),
                    self.state,
                    path("eval_model.onnx"),
                    device="cpu",
                    session_options=options,
                )
                self.optimizer = Optimizer(path("optimizer_model.onnx"), self.module)
        except Exception as e:
            message = ort_message(e)
            raise TargetError(
                f"target onnxruntime: ONNX Runtime cannot load the training graph: {message}"
                f"{onnx_origins(path('training_model.onnx'), message)}",
                "train on cpu/cuda",
            ) from e
        self.optimizer.set_learning_rate(self.lr)
        self.module.train()
        self.module.lazy_reset_grad()
        self._train_feeds = list(self.module.input_names())
        self.module.eval()
        self._eval_feeds = list(self.module.input_names())
        self.module.train()

    # -- training ---------------------------------------------------------------------------------
    def _feeds(self, order: list[str], inputs: tuple, labels: torch.Tensor, scale: float, nsp: dict) -> list:
        import numpy as np

        inputs = tuple(inputs)
        if len(inputs) != len(self.input_names):
            raise UsageError(
                f"the program takes {len(self.input_names)} input(s) ({', '.join(self.input_names)}), got {len(inputs)}"
            )
        by_name = dict(zip(self.input_names, inputs))
        by_name["labels"] = labels
        by_name["loss_scale"] = torch.tensor(float(scale))
        if self.objective == "mlm+nsp":
            if nsp.get("next_sentence_label") is None:
                raise UsageError("onnxruntime training --objective mlm+nsp: pass next_sentence_label")
            by_name["next_sentence_label"] = nsp["next_sentence_label"]
            by_name["nsp_scale"] = torch.tensor(float(nsp.get("nsp_scale", 1.0)))
        feeds = []
        for name in order:
            x = by_name.get(name)
            if not isinstance(x, torch.Tensor):
                raise UsageError(f"onnxruntime training: input {name!r} must be a tensor")
            x = x.detach().cpu()
            if name in ("labels", "next_sentence_label"):
                x = x.to(torch.int64)
            elif name in ("loss_scale", "nsp_scale"):
                x = x.to(torch.float32)
            feeds.append(np.ascontiguousarray(x.numpy()))
        return feeds

    def _run(self, inputs, labels, scale: float, nsp: dict) -> float:
        order = self._train_feeds if self.module.training else self._eval_feeds
        try:
            out = self.module(*self._feeds(order, inputs, labels, scale, nsp))
        except UsageError:
            raise
        except Exception as e:
            raise TargetError(f"onnxruntime training failed to run: {ort_message(e)}") from e
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        loss, *parts = (float(x.item() if hasattr(x, "item") else x) for x in out)
        if parts:  # mlm+nsp: the micro-batch's mean MLM and NSP losses
            self.loss_parts = dict(zip(("mlm_loss", "nsp_loss"), parts))
        return loss / float(scale)

    def accumulate(
        self,
        inputs: tuple,
        labels: torch.Tensor,
        scale: float = 1.0,
        next_sentence_label: torch.Tensor | None = None,
        nsp_scale: float = 1.0,
    ) -> float:
        """Forward + backward only: adds `scale * d(loss)/d(param)` to the gradient buffers (cleared
        by the next `optimizer_step`). Returns the (unscaled) loss. For k micro-batches averaged into
        one step pass `scale=1/k`. mlm+nsp: the loss is `mlm + nsp * nsp_scale / scale` (`nsp_scale`:
        the micro-batch's share of the batch's sentence pairs), its two means in `loss_parts`."""
        if not scale:
            raise UsageError("accumulate: scale must be non-zero")
        self.module.train()
        return self._run(inputs, labels, scale, {"next_sentence_label": next_sentence_label, "nsp_scale": nsp_scale})

    def optimizer_step(self, lr: float | None = None) -> None:
        """One AdamW update from the accumulated gradients, then clear them."""
        if lr is not None and float(lr) != self.lr:
            self.lr = float(lr)
            self.optimizer.set_learning_rate(self.lr)
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def step(self, inputs: tuple, labels: torch.Tensor, lr: float | None = None, **nsp) -> float:
        """One optimizer step on one batch; returns the loss (before the update)."""
        loss = self.accumulate(inputs, labels, **nsp)
        self.optimizer_step(lr)
        return loss

    def eval_loss(self, inputs: tuple, labels: torch.Tensor, next_sentence_label: torch.Tensor | None = None) -> float:
        """The loss on a batch, without gradients or updates; for mlm+nsp its masked-LM part (the
        validation loss of every target), both parts in `loss_parts`."""
        self.module.eval()
        try:
            loss = self._run(inputs, labels, 1.0, {"next_sentence_label": next_sentence_label})
        finally:
            self.module.train()
        return self.loss_parts["mlm_loss"] if self.objective == "mlm+nsp" else loss

    # -- weights ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Current values of the program's parameters (every name of a tied group, sharing one
        tensor), the trained ones from ORT's checkpoint state."""
        values = {name: p.data for name, p in self.state.parameters}
        out = {}
        for group in self._groups:
            onnx_name = self._onnx_name.get(group[0])
            if onnx_name is None or onnx_name not in values:
                continue
            tensor = torch.from_numpy(values[onnx_name].copy())
            for name in group:
                out[name] = tensor
        return out

    def load_into(self, program) -> None:
        """Copy the trained weights into `program.gm` (in place; tied parameters stay tied)."""
        params = dict(program.gm.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, value in self.state_dict().items():
                p = params.get(name)
                if p is None:
                    raise UsageError(
                        f"load_into: the program has no parameter {name!r}",
                        "load into the program the trainer was built from",
                    )
                if p.shape != value.shape:
                    raise UsageError(
                        f"load_into: {name} is {list(p.shape)} in the program but {list(value.shape)} in the trainer"
                    )
                p.copy_(value.to(p.dtype))


def _clamp_ir_version(path: str) -> None:
    import onnx

    model = onnx.load(path)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        onnx.save(model, path)


@contextlib.contextmanager
def _native_stderr(lines: list[str]):
    """Collect what native code writes to fd 2 into `lines` instead of the terminal: ORT's gradient
    builder logs every graph transformer at INFO level through its own logger, whatever the
    default severity. Its warnings (which nodes the gradient cannot reach) go into error messages."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.append(sink.read().decode("utf-8", "replace"))
