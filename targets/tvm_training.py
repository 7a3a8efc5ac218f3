"""Training on tvm (`optpipe train --target tvm`): forward, loss and backward compiled by TVM Relax.

The program wrapped with its loss is exported (torch.export, core ATen decompositions) and
imported with Relax's `from_exported_program`, parameters as function inputs. Relax's own autodiff
(`relax.transform.Gradient`) turns that into `main_adjoint(inputs, targets, weights, *params) ->
(loss, grads)`; AdamW (torch.optim.AdamW's update: decoupled weight decay, bias corrections, eps
outside the square root), gradient clipping by global norm, per-parameter learning-rate scales
(layer decay) and weight decay (none on 1-d tensors) are a second Relax function, `adamw`. Both
are built for the host CPU (llvm with the default CPU schedules of targets/tvm_build.py) and
run on TVM's VM; parameters and the optimizer state live as TVM tensors between steps.

The loss is written for Relax's gradient rules: the mean token cross-entropy of
`optpipe.losses.task_loss` as `-Σ log_softmax(logits) · onehot(targets) · weights`, where the
host shifts the labels (clm), marks ignored tokens with weight 0 and folds 1/count and the
micro-batch's share of the batch into `weights`. A module is compiled per input shape (the
training micro-batch and the validation batch: two builds of a few seconds each).

Before any work, `check_trainable` imports the program and runs the Gradient pass; an op Relax
cannot differentiate is named (with the torch op it came from when the name tells) as a
TargetError. `relax.nn.gelu`, `relax.squeeze` and `relax.rsqrt` (T5's RMS norm) have no gradient
in TVM 0.27: this module registers them (exact erf GELU; squeeze's is a reshape back; rsqrt's is
-y^3/2). It also replaces TVM's `relax.where` rule, which returns `where(c, dy, 0)` at the output's
shape even for a broadcast input: T5 masks its relative-position bias [1, heads, q, k] at
[batch, 1, q, k], and the un-reduced gradient then failed the inverse `permute_dims` of the bias's
embedding lookup; here it is summed back to the input's shape (`collapse_sum_to`). And its `take`
rule: TVM's gradient kernel takes 1-d indices only, BERT's pooler reads `hidden[:, 0]` (a 0-d
index); here that index becomes [index] and the gradient gets its axis back. Relax's `layer_norm` is
decomposed (`DecomposeOpsForTraining`) into ops that have one.

Objectives: clm, mlm and seq2seq (an encoder-decoder program: the labels follow the decoder's
inputs, unshifted, as `optpipe.losses` has it), and mlm+nsp: the next-sentence labels and their
weights (the micro-batch's share of the batch's pairs, per pair) are two more inputs, and `main`
returns the loss with its MLM and NSP parts (the Gradient pass differentiates the first).
"""

from __future__ import annotations

import math
import re
import time
import warnings

import torch

from optpipe.errors import TargetError, UsageError
from optpipe.losses import IGNORE_INDEX, OBJECTIVES, require_nsp_head
from optpipe.target import token_input

from .tvm_build import build_relax, cpu_target, decomposition_table, load_tvm


@torch.no_grad()
def loss_targets(labels: torch.Tensor, objective: str, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, weights) for `_LossModule`: per position the label it predicts (0 where ignored)
    and its weight (scale / number of counted tokens; 0 where ignored)."""
    if objective == "clm":
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    elif objective not in ("mlm", "mlm+nsp", "seq2seq"):  # seq2seq's labels come unshifted (optpipe.losses)
        raise UsageError(f"unknown objective {objective!r}", f"one of {', '.join(OBJECTIVES)}")
    valid = labels != IGNORE_INDEX
    count = int(valid.sum())
    weights = valid.float() * (scale / max(count, 1))
    return torch.where(valid, labels, torch.zeros_like(labels)), weights


def _weighted_nll(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-Σ log_softmax(logits)[target] · weight, over every position (written for Relax's gradients)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    classes = torch.arange(logits.shape[-1], device=targets.device)
    onehot = (targets.unsqueeze(-1) == classes).to(logp.dtype)
    return -((logp * onehot).sum(-1) * weights).sum()


class _LossModule(torch.nn.Module):
    """`(*program inputs, targets, weights) -> -Σ log p(target) · weight`: what Relax differentiates.
    With `nsp` (mlm+nsp) `(*program inputs, targets, weights, nsp_targets, nsp_weights) -> (mlm + nsp,
    mlm, nsp)`, the next-sentence head's loss written the same way (the gradient is of the first)."""

    def __init__(self, gm, nsp: bool = False):
        super().__init__()
        self.model, self.nsp = gm, nsp

    def forward(self, *args):
        if self.nsp:
            *inputs, targets, weights, nsp_targets, nsp_weights = args
        else:
            *inputs, targets, weights = args
        outs = self.model(*inputs)
        logits = outs[0] if isinstance(outs, (tuple, list)) else outs
        mlm = _weighted_nll(logits, targets, weights)
        if not self.nsp:
            return mlm
        nsp = _weighted_nll(outs[1], nsp_targets, nsp_weights)
        return mlm + nsp, mlm, nsp


_RULES_REGISTERED = False


def _register_gradients() -> None:
    """Relax gradient rules TVM 0.27 lacks and optpipe's programs need (registered once)."""
    global _RULES_REGISTERED
    if _RULES_REGISTERED:
        return
    load_tvm()
    from tvm import relax
    from tvm.relax import op as R
    from tvm.relax.op.base import register_gradient
    from tvm.relax.op.grad import no_grad, take_backward

    @register_gradient("relax.nn.gelu")
    def _gelu_grad(orig_var, orig_call, output_grad, ctx):
        x = orig_call.args[0]
        dtype = x.ty.dtype
        const = lambda v: relax.const(v, dtype)
        cdf = const(0.5) * (const(1.0) + R.erf(x * const(1 / math.sqrt(2))))
        pdf = R.exp(const(-0.5) * x * x) * const(1 / math.sqrt(2 * math.pi))
        return [output_grad * (cdf + x * pdf)]

    @register_gradient("relax.squeeze")
    def _squeeze_grad(orig_var, orig_call, output_grad, ctx):
        return [R.reshape(output_grad, orig_call.args[0].ty.shape)]

    @register_gradient("relax.rsqrt")
    def _rsqrt_grad(orig_var, orig_call, output_grad, ctx):
        # y = x^(-1/2): dy/dx = -1/2 x^(-3/2) = -1/2 y^3 (T5's RMS norm)
        half = relax.const(-0.5, orig_call.args[0].ty.dtype)
        return [output_grad * half * orig_var * orig_var * orig_var]

    @register_gradient("relax.where", level=11)  # TVM's own rule (level 10) does not reduce broadcasts
    def _where_grad(orig_var, orig_call, output_grad, ctx):
        # where(c, x, y) broadcasts x and y (T5's position bias [1, heads, q, k] masked at [batch, 1, q, k]);
        # their gradients are where(c, g, 0) and where(c, 0, g) summed back to their own shapes
        cond, x, y = orig_call.args
        dx = R.where(cond, output_grad, relax.const(0, x.ty.dtype))
        dy = R.where(cond, relax.const(0, y.ty.dtype), output_grad)
        return [no_grad(cond), _sum_to(dx, x, orig_var), _sum_to(dy, y, orig_var)]

    @register_gradient("relax.take", level=11)  # TVM's own rule (level 10) fails to build for a 0-d index
    def _take_grad(orig_var, orig_call, output_grad, ctx):
        # BERT's pooler reads hidden[:, 0]: take at a 0-d index, which drops the axis; TVM's
        # take_backward kernel takes 1-d indices only, so it gets [index] and the axis back
        x, indices = orig_call.args
        axis = orig_call.attrs["axis"]
        if axis is not None and indices.ty.ndim == 0:
            indices, output_grad = R.reshape(indices, [1]), R.expand_dims(output_grad, int(axis))
        return [take_backward(output_grad, x, indices, axis), no_grad(orig_call.args[1])]

    _RULES_REGISTERED = True


def _sum_to(grad, like, out):
    """`grad` (at `out`'s shape) summed over the axes `like` was broadcast along; as it is when the
    shapes are provably the same."""
    from tvm.relax import op as R
    from tvm.sym import Analyzer

    shape, full = like.ty.shape, out.ty.shape
    if getattr(shape, "values", None) is None or getattr(full, "values", None) is None:
        return grad  # an unknown rank: TVM's own rule
    analyzer = Analyzer()
    if len(shape.values) == len(full.values) and all(
        analyzer.can_prove_equal(a, b) for a, b in zip(shape.values, full.values)
    ):
        return grad
    return R.collapse_sum_to(grad, shape)


def _scalar_main(mod):
    """`main` returning its loss tensor instead of the importer's 1-tuple (Gradient's target); for
    mlm+nsp a tuple expression of the loss and its two parts (Gradient's target: the first)."""
    from tvm import relax

    main = mod["main"]
    blocks = list(main.body.blocks)
    out_var = main.body.body
    last = blocks[-1]
    bound = next((b for b in last.bindings if b.var.same_as(out_var)), None)
    if bound is None or not isinstance(bound.value, relax.Tuple) or len(bound.value.fields) not in (1, 3):
        raise TargetError("target tvm: unexpected Relax output structure for the loss", "report it")
    fields = list(bound.value.fields)
    outs = [relax.Var(name, f.ty) for name, f in zip(("loss", "mlm_loss", "nsp_loss"), fields)]
    blocks[-1] = relax.DataflowBlock(
        [b for b in last.bindings if not b.var.same_as(out_var)]
        + [relax.VarBinding(o, f) for o, f in zip(outs, fields)]
    )
    body, ty = (outs[0], outs[0].ty) if len(outs) == 1 else (relax.Tuple(outs), relax.TupleType([o.ty for o in outs]))
    mod["main"] = relax.Function(main.params, relax.SeqExpr(blocks, body), ty, attrs=main.attrs)
    return relax.transform.Normalize()(mod)


_NO_GRADIENT = re.compile(
    r"(relax\.[\w.]+)\W.*(?:gradient|FPrimalGradient)|(?:gradient|FPrimalGradient).*?(relax\.[\w.]+)", re.I | re.S
)


_BUILDS: dict = {}
"""Built training modules of this process by (program structure, input shapes, trainable names):
weights are inputs of the Relax functions, so a module serves every program with the same graph."""


def _structure_key(program) -> tuple:
    gm = program.gm
    tensors = [
        (n, tuple(t.shape), str(t.dtype))
        for n, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    ]
    return gm.code, tuple(tensors)


class _Compiled:
    """One input shape's Relax module: its VM, and which parameter each Relax input is."""

    def __init__(self, vm, keys: list, grad_ids: list):
        self.vm, self.keys, self.grad_ids = vm, keys, grad_ids


def _relax_training_module(program, example: tuple, trainable_ids: set, nsp: bool = False):
    """(Relax IRModule with `main` (loss) and `main_adjoint`, per non-user Relax input its source:
    ("state", name in `_LossModule(program.gm)`) or ("const", tensor), and the names of the
    parameters `main_adjoint` returns gradients for, in order). `nsp`: the mlm+nsp loss."""
    load_tvm()
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    _register_gradients()
    module = _LossModule(program.gm, nsp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, example, strict=False)
        ep = ep.run_decompositions(decomposition_table(()))
    mod = from_exported_program(ep, keep_params_as_input=True, run_ep_decomposition=False)
    mod = _scalar_main(mod)
    mod = relax.transform.DecomposeOpsForTraining()(mod)
    kinds = torch.export.graph_signature.InputKind
    state = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    by_arg = {}  # Relax input name -> ("state", module name) or ("const", tensor)
    for spec in ep.graph_signature.input_specs:
        if spec.kind == kinds.USER_INPUT:
            continue
        if spec.kind in (kinds.PARAMETER, kinds.BUFFER) and spec.target in state:
            by_arg[spec.arg.name] = ("state", spec.target)
        else:
            by_arg[spec.arg.name] = ("const", ep.constants.get(spec.target, ep.state_dict.get(spec.target)))
    params = list(mod["main"].params)
    user = len(example)
    inputs = []
    for var in params[user:]:
        if var.name not in by_arg:
            raise TargetError(
                f"target tvm: Relax input {var.name} matches no parameter of the program",
                "report it; train on cpu or onnxruntime meanwhile",
            )
        inputs.append(by_arg[var.name])
    require = [
        v
        for v, (kind, ref) in zip(params[user:], inputs)
        if kind == "state" and isinstance(state[ref], torch.nn.Parameter) and id(state[ref]) in trainable_ids
    ]
    if not require:
        raise UsageError("train --target tvm: no trainable parameter reaches the loss", "check --trainable")
    try:
        mod = relax.transform.Gradient("main", require_grads=require)(mod)
    except Exception as e:  # noqa: BLE001 - name the op Relax cannot differentiate
        text = str(e)
        found = _NO_GRADIENT.search(text)
        op = next((g for g in (found.groups() if found else ()) if g), None)
        raise TargetError(
            f"target tvm cannot train this program: Relax has no gradient for "
            f"{op or 'an op of it'}" + ("" if op else f" ({text.strip().splitlines()[-1][:200]})"),
            "train on cpu/cuda or onnxruntime, or drop the pass that introduced the op "
            "(a node no pass tagged comes from the model itself)",
        ) from None
    mod, _ = relax.frontend.detach_params(mod)
    var_index = {v.name: i for i, v in enumerate(params[user:])}
    grads = [inputs[var_index[v.name]][1] for v in require]
    return mod, inputs, grads


def check_trainable(program, objective: str = "clm") -> None:
    """TargetError before any training when tvm cannot train `program`: fp32 parameters only, and
    every op between the parameters and the loss must have a Relax gradient (checked by importing
    the program at its example shape and running the Gradient pass)."""
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}", f"one of {', '.join(OBJECTIVES)}")
    if objective == "mlm+nsp":
        require_nsp_head(program, "tvm")
    bad = [n for n, p in program.gm.named_parameters() if p.dtype != torch.float32]
    if bad:
        raise TargetError(
            f"target tvm trains fp32 parameters; {bad[0]} is {program.gm.get_parameter(bad[0]).dtype}",
            "train before quantizing, or on cpu",
        )
    nsp = objective == "mlm+nsp"
    _relax_training_module(program, _example(program, nsp), {id(p) for p in program.gm.parameters()}, nsp)


def _example(program, nsp: bool = False) -> tuple:
    inputs = tuple(program.example_inputs)
    ids = inputs[token_input(program)]
    loss_args = loss_targets(ids, "mlm")
    if nsp:
        loss_args += loss_targets(torch.zeros(ids.shape[0], dtype=torch.long), "mlm")
    return (*inputs, *loss_args)


class TvmTrainer:
    """Train `program` on TVM: `accumulate` runs forward + backward (Relax `main_adjoint`) and
    sums gradients, `optimizer_step` runs the Relax AdamW (clip, weight decay, lr scales).

    `trainable`: program parameter names (None: all). `lr_scales` / `weight_decays`: per name
    (default 1 / `weight_decay` for tensors with 2+ dims, 0 for 1-d ones). `clip`: max global
    gradient norm (None: no clipping)."""

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
    ):
        tvm = load_tvm()
        names = dict(program.gm.named_parameters(remove_duplicate=False))
        wanted = set(names) if trainable is None else set(trainable)
        unknown = sorted(wanted - set(names))
        if unknown:
            raise UsageError(
                f"trainable: no parameter named {unknown[0]!r} in the program",
                f"parameters look like: {', '.join(list(names)[:5])}",
            )
        self.program, self.objective = program, objective
        self.lr, self.betas, self.eps, self.clip = float(lr), tuple(betas), float(eps), clip
        self.info: dict = {}
        self.loss_parts: dict[str, float] = {}  # mlm+nsp: the last micro-batch's mean MLM and NSP losses
        self._first: dict[int, str] = {}  # tensor id -> its first name
        for name, p in names.items():
            self._first.setdefault(id(p), name)
        self._trainable = list(dict.fromkeys(id(p) for name, p in names.items() if name in wanted))
        if not self._trainable:
            raise UsageError("trainable names no parameter: nothing to train", "pass trainable=None to train all")
        self._tensors = {id(p): p for p in names.values()}
        self._device = tvm.cpu()
        self._values: dict[int, object] = {}  # tensor id -> tvm tensor (parameters and buffers)
        self._compiled: dict[tuple, _Compiled] = {}
        self._grads: dict[int, object] | None = None
        self.step_count = 0
        self._m = {i: self._zeros(self._tensors[i]) for i in self._trainable}
        self._v = {i: self._zeros(self._tensors[i]) for i in self._trainable}
        scales = lr_scales or {}
        decays = weight_decays or {}
        self._scale = [float(scales.get(self._first[i], 1.0)) for i in self._trainable]
        self._decay = [
            float(decays.get(self._first[i], weight_decay if self._tensors[i].dim() >= 2 else 0.0))
            for i in self._trainable
        ]
        start = time.perf_counter()
        self._adamw = self._build_adamw()
        self.info["optimizer_build_s"] = round(time.perf_counter() - start, 2)

    # -- tensors ----------------------------------------------------------------------------------
    def _to_tvm(self, x: torch.Tensor):
        tvm = load_tvm()
        return tvm.runtime.tensor(x.detach().cpu().contiguous().numpy(), self._device)

    def _zeros(self, like: torch.Tensor):
        return self._to_tvm(torch.zeros_like(like, dtype=torch.float32))

    @staticmethod
    def _to_torch(t) -> torch.Tensor:
        return torch.from_numpy(t.numpy().copy())

    def _value(self, t: torch.Tensor):
        key = id(t)
        if key not in self._values:
            self._values[key] = self._to_tvm(t)
        return self._values[key]

    # -- building -----------------------------------------------------------------------------------
    def _module_for(self, inputs: tuple, loss_args: tuple) -> _Compiled:
        key = tuple((tuple(x.shape), str(x.dtype)) for x in (*inputs, *loss_args))
        if key not in self._compiled:
            start = time.perf_counter()
            cache_key = (_structure_key(self.program), key, tuple(sorted(self._first[i] for i in self._trainable)))
            if cache_key not in _BUILDS:  # a resumed run or a second trainer of the same program reuses it
                mod, refs, grad_names = _relax_training_module(
                    self.program, (*inputs, *loss_args), set(self._trainable), self.objective == "mlm+nsp"
                )
                _BUILDS[cache_key] = (build_relax(mod, cpu_target()), refs, grad_names)
            executable, refs, grad_names = _BUILDS[cache_key]
            module = _LossModule(self.program.gm)
            state = dict(module.named_parameters(remove_duplicate=False)) | dict(
                module.named_buffers(remove_duplicate=False)
            )
            values = [state[ref] if kind == "state" else ref for kind, ref in refs]
            for v in values:
                self._tensors.setdefault(id(v), v)
            vm = load_tvm().relax.VirtualMachine(executable, self._device)
            self._compiled[key] = _Compiled(vm, [id(v) for v in values], [id(state[n]) for n in grad_names])
            self.info.setdefault("build_s", []).append(round(time.perf_counter() - start, 2))
        return self._compiled[key]

    def _build_adamw(self):
        """The Relax AdamW: (params, grads, m, v, lr, 1/bc1, 1/sqrt(bc2)) -> (params', m', v')."""
        tvm = load_tvm()
        from tvm import relax
        from tvm.relax import op as R

        shapes = [tuple(self._tensors[i].shape) for i in self._trainable]
        b1, b2 = self.betas
        key = ("adamw", tuple(shapes), self.betas, self.eps, self.clip, tuple(self._scale), tuple(self._decay))
        if key in _BUILDS:
            return tvm.relax.VirtualMachine(_BUILDS[key], self._device)
        f32 = lambda v: relax.const(v, "float32")

        def tensors(prefix):
            return [relax.Var(f"{prefix}{k}", relax.TensorType(s, "float32")) for k, s in enumerate(shapes)]

        ps, gs, ms, vs = tensors("p"), tensors("g"), tensors("m"), tensors("v")
        lr, inv_bc1, inv_bc2_sqrt = (
            relax.Var(n, relax.TensorType((), "float32")) for n in ("lr", "inv_bc1", "inv_bc2_sqrt")
        )
        bb = relax.BlockBuilder()
        with bb.function("adamw", [*ps, *gs, *ms, *vs, lr, inv_bc1, inv_bc2_sqrt]):
            with bb.dataflow():
                grads = list(gs)
                if self.clip:  # torch.nn.utils.clip_grad_norm_: one global norm, coefficient capped at 1
                    total = None
                    for g in gs:
                        sq = bb.emit(R.sum(R.multiply(g, g)))
                        total = sq if total is None else bb.emit(R.add(total, sq))
                    norm = bb.emit(R.sqrt(total))
                    coef = bb.emit(R.minimum(R.divide(f32(float(self.clip)), R.add(norm, f32(1e-6))), f32(1.0)))
                    grads = [bb.emit(R.multiply(g, coef)) for g in gs]
                new_p, new_m, new_v = [], [], []
                for p, g, m, v, scale, decay in zip(ps, grads, ms, vs, self._scale, self._decay):
                    lr_p = bb.emit(R.multiply(lr, f32(scale)))
                    if decay:
                        p = bb.emit(R.multiply(p, R.subtract(f32(1.0), R.multiply(lr_p, f32(decay)))))
                    m1 = bb.emit(R.add(R.multiply(m, f32(b1)), R.multiply(g, f32(1 - b1))))
                    v1 = bb.emit(R.add(R.multiply(v, f32(b2)), R.multiply(R.multiply(g, g), f32(1 - b2))))
                    denom = bb.emit(R.add(R.multiply(R.sqrt(v1), inv_bc2_sqrt), f32(self.eps)))
                    step = bb.emit(R.multiply(lr_p, inv_bc1))
                    new_p.append(bb.emit(R.subtract(p, R.multiply(step, R.divide(m1, denom)))))
                    new_m.append(m1)
                    new_v.append(v1)
                out = bb.emit_output(relax.Tuple([*new_p, *new_m, *new_v]))
            bb.emit_func_output(out)
        _BUILDS[key] = build_relax(bb.get(), cpu_target())
        return tvm.relax.VirtualMachine(_BUILDS[key], self._device)

    # -- training -----------------------------------------------------------------------------------
    def _run(self, inputs: tuple, labels: torch.Tensor, scale: float, fn: str, nsp: dict):
        loss_args = loss_targets(labels, self.objective, scale)
        if self.objective == "mlm+nsp":  # one label per pair, each weighted nsp_scale / pairs
            if nsp.get("next_sentence_label") is None:
                raise UsageError("tvm training --objective mlm+nsp: pass next_sentence_label")
            loss_args += loss_targets(nsp["next_sentence_label"], "mlm", nsp.get("nsp_scale", 1.0))
        compiled = self._module_for(tuple(inputs), loss_args)
        args = [self._to_tvm(x) for x in (*inputs, *loss_args)]
        args += [self._value(self._tensors[k]) for k in compiled.keys]
        return compiled, compiled.vm[fn](*args)

    def _loss(self, out, scale: float, nsp_scale: float) -> float:
        """The (unscaled) loss of `main`'s output; for mlm+nsp its two means go to `loss_parts`."""
        if self.objective != "mlm+nsp":
            return float(out.numpy()) / scale if scale else 0.0
        loss, mlm, nsp = (float(x.numpy()) for x in out)
        self.loss_parts = {"mlm_loss": mlm / scale, "nsp_loss": nsp / nsp_scale}
        return loss / scale

    def accumulate(
        self,
        inputs: tuple,
        labels: torch.Tensor,
        scale: float = 1.0,
        next_sentence_label: torch.Tensor | None = None,
        nsp_scale: float = 1.0,
    ) -> float:
        """Forward + backward on one micro-batch (its gradients weighted by `scale`, its share of
        the batch) and add them to the pending gradients; returns the micro-batch's mean loss.
        mlm+nsp: the loss is `mlm + nsp * nsp_scale / scale` (`nsp_scale`: the micro-batch's share
        of the batch's sentence pairs), its two means in `loss_parts`."""
        nsp = {"next_sentence_label": next_sentence_label, "nsp_scale": nsp_scale}
        compiled, (out, grads) = self._run(inputs, labels, scale, "main_adjoint", nsp)
        if self._grads is None:
            self._grads = {}
        tvm = load_tvm()
        # gradients of a tied tensor (read under two names) add up, and so do micro-batches
        for key, g in zip(compiled.grad_ids, grads):
            self._grads[key] = g if key not in self._grads else tvm.runtime.tensor(self._grads[key].numpy() + g.numpy())
        return self._loss(out, scale, nsp_scale)

    def optimizer_step(self, lr: float | None = None) -> None:
        """One AdamW step with the pending gradients (then cleared); `lr` overrides the constructor's."""
        if self._grads is None:
            return
        self.step_count += 1
        b1, b2 = self.betas
        scalars = [
            torch.tensor(float(self.lr if lr is None else lr)),
            torch.tensor(1.0 / (1.0 - b1**self.step_count)),
            torch.tensor(1.0 / math.sqrt(1.0 - b2**self.step_count)),
        ]
        keys = self._trainable
        grads = [self._grads.get(k) or self._zeros(self._tensors[k]) for k in keys]
        out = self._adamw["adamw"](
            *[self._value(self._tensors[k]) for k in keys],
            *grads,
            *[self._m[k] for k in keys],
            *[self._v[k] for k in keys],
            *[self._to_tvm(s.float()) for s in scalars],
        )
        n = len(keys)
        for i, k in enumerate(keys):
            self._values[k], self._m[k], self._v[k] = out[i], out[n + i], out[2 * n + i]
        self._grads = None

    def step(self, inputs: tuple, labels: torch.Tensor, lr: float | None = None, **nsp) -> float:
        loss = self.accumulate(inputs, labels, **nsp)
        self.optimizer_step(lr)
        return loss

    def eval_loss(self, inputs: tuple, labels: torch.Tensor, next_sentence_label: torch.Tensor | None = None) -> float:
        """The mean loss on a batch; for mlm+nsp its masked-LM part (the validation loss of every
        target), both parts in `loss_parts`."""
        _, out = self._run(inputs, labels, 1.0, "main", {"next_sentence_label": next_sentence_label})
        loss = self._loss(out, 1.0, 1.0)
        return self.loss_parts["mlm_loss"] if self.objective == "mlm+nsp" else loss

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The program's parameters as trained (every name of a tied tensor)."""
        out = {}
        for name, p in self.program.gm.named_parameters(remove_duplicate=False):
            value = self._values.get(id(p))
            out[name] = self._to_torch(value) if value is not None else p.detach().clone()
        return out

    def load_into(self, program) -> None:
        params = dict(program.gm.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, value in self.state_dict().items():
                if name in params:
                    params[name].copy_(value)

    def optimizer_state(self) -> dict:
        """AdamW's state by parameter name (for checkpoints)."""
        return {
            "step": self.step_count,
            "m": {self._first[k]: self._to_torch(self._m[k]) for k in self._trainable},
            "v": {self._first[k]: self._to_torch(self._v[k]) for k in self._trainable},
        }

    def load_state(self, weights: dict[str, torch.Tensor], optimizer: dict | None) -> None:
        """Resume: parameters (by name) and the AdamW state of `optimizer_state()`."""
        names = dict(self.program.gm.named_parameters(remove_duplicate=False))
        for name, value in weights.items():
            if name in names:
                self._values[id(names[name])] = self._to_tvm(value)
        if optimizer:
            by_name = {self._first[k]: k for k in self._trainable}
            for name, value in optimizer["m"].items():
                self._m[by_name[name]] = self._to_tvm(value)
            for name, value in optimizer["v"].items():
                self._v[by_name[name]] = self._to_tvm(value)
            self.step_count = int(optimizer["step"])
