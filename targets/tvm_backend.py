"""Targets `tvm` and `tvm-cuda`: the program compiled by Apache TVM Relax into a VM library.

How it lowers
1. `check`, before any lowering: every node that no import path takes, with its module path and
   the pass that introduced it. The source of truth is the Relax torch importer's own convert map
   (`ExportedProgramImporter().create_convert_map()`), looked up on the graph after the same
   decomposition the import runs, plus optpipe ops with neither a decomposition nor a native `tvm`
   lowering (`optpipe.target.unsupported_nodes`).
2. Import: `program.export()` → `run_decompositions(core ATen + optpipe decompositions)` →
   `relax.frontend.torch.from_exported_program`, with optpipe's native lowerings
   (`register_lowering(op, "tvm", fn)`, `fn(node, importer) -> relax expr`; tvm-cuda uses them
   too) in the custom convert map, so those ops are not decomposed. Batch/sequence dims stay
   symbolic (torch's range constraints become TIR var bounds): one library serves every length.
   Fixes on the way in, each needed by a real model: a `view` of a non-contiguous tensor
   (left by SDPA's decomposition, GPT-2) copies first instead of failing to re-trace; a slice torch
   proved in bounds (nanoGPT's `mask[:, :, :T, :T]`) is imported as such, or its `min(T, 64)`
   shape breaks broadcasting, and its negative axis is normalised (Relax's dynamic strided_slice
   takes none: Mistral, Gemma-2); gathers wrap indices (TVM's "fast" `take` reads out of bounds,
   and can crash, on a negative index torch accepts, Falcon's `qkv[..., [-2], :]`, or on a bad
   token id where torch would raise); `torch.sym_max`/`sym_min` of sizes become TIR max/min
   (MPT's ALiBi cuts its bias at `max(0, 64 - T)`), and an input of a broadcasting op whose size
   Relax cannot prove equal to the output's (that bias's `64 - max(0, 64 - T)` against `T`) is
   cast to the size torch proved, checked at run time, or Relax infers no shape and the op is
   never legalized.
   ONNX fallback, taken only when the torch importer lacks converters for some ops (e.g.
   `aten.amax`) and `torch.onnx.export` + `relax.frontend.onnx` convert every node; the report
   says why. Native lowerings do not apply there, so optpipe ops must decompose.
3. Build (targets/tvm_build.py, which tvm training builds with too): (CPU: fast math) →
   LegalizeOps → FoldConstant → FuseOps/FuseTIR → default schedules → Relax VM, for
   `{"kind": "llvm", "mcpu": <this host>, "num-cores": N}`. CPU default schedules
   (`default_cpu_schedule`): matmuls register-tiled, parallel over column panels (each packed by
   its task; a ragged N padded to whole tiles), vectorised along the output row, epilogue fused
   (`schedule_matmul`); softmax/norms by dlight's CPU Reduction rule; elementwise/layout kernels
   parallel and vectorised. Fast math (`fast_math_pass`): fp32 exp/erf/tanh/softmax/GELU use
   TOPI's polynomial versions, which vectorise (LLVM's libm calls do not). tvm-cuda builds for the
   local GPU's arch with dlight's default GPU schedules.
   Beside the dynamic `main`, a copy specialised to the example input shapes (`main_static`,
   called when the inputs have them; `static=False` leaves it out): with static extents the
   matmul tiles divide their loops, and MiniLM b8 s128 ran 2.7x faster through it than through
   `main`. The CPU thread pool follows torch's thread count (TVM_NUM_THREADS, unless set: TVM's
   own default is half the logical CPUs, one thread on a 2-core machine).
4. `tune=N` (llvm): N MetaSchedule trials on `main_static` (other shapes run the dynamic `main`,
   with default schedules). Only the heaviest float-input tasks are tuned (those holding 90% of the
   FLOPs; random-filled indices would read out of bounds in gathers); a matmul's design space
   holds `schedule_matmul`'s template (tile sizes as decisions) beside MetaSchedule's generic
   ones; kernels without a tuning record keep their default schedules. Builder and runner work
   in-process. Database, logs and summary: OUT/tvm/tuning/. tvm-cuda keeps dlight's schedules.
5. Save/load: OUT/tvm/model.so (weights embedded as VM constants) and OUT/tvm/model.json (inputs,
   dtypes, named dims, target, functions); `optpipe run` loads them with `relax.VirtualMachine`,
   without the model's Python code.

Limits: checked in fp32; inference only. The library is built for this host's CPU (mcpu): rebuild
for another machine. Weights live inside model.so in their own layout (repacking them into
column panels at build time measured slower here); each matmul task copies its panel into a
contiguous buffer at run time instead. Tuning helps the example shape only. MetaSchedule needs a
TVM FFI whose `tvm.ir.save_json` works (apache-tvm-ffi 0.1.14.*; 0.1.15.* segfaults), and tuning
is refused up front otherwise.

Training (`optpipe train --target tvm`) lives in targets/tvm_training.py, imported when a trainer
is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from optpipe import ops
from optpipe.errors import TargetError, UsageError, first_line
from optpipe.graph_toolkit import module_path
from optpipe.pipeline import introduced_by
from optpipe.registry import register_target
from optpipe.target import Compiled, Target, UnsupportedNode, op_label, unsupported_hint, unsupported_nodes

from .tvm_build import (
    build_relax,
    cpu_target,
    cuda_target,
    decomposition_table,
    default_matmul_schedule,
    host_cpu,
    legalize_and_fuse,
    load_tvm,
    schedule_matmul,
)

ARTIFACT = "tvm"
LOWERING_KEY = "tvm"  # native lowerings registered for "tvm" serve tvm and tvm-cuda alike
FORMAT = "optpipe-tvm/1"
STATIC_FN = "main_static"


# -- the Relax torch importer --------------------------------------------------------------------


@functools.cache
def torch_importer_ops() -> frozenset[str]:
    """Names (`OpOverload.__name__`, e.g. "add.Tensor") the Relax torch importer converts."""
    load_tvm()
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return frozenset(k for k in ExportedProgramImporter().create_convert_map() if isinstance(k, str))


def _fn_name(target) -> str:
    return getattr(target, "__name__", str(target))


# -- import ------------------------------------------------------------------------------------


@dataclass
class RelaxImport:
    """An imported program: the Relax module and how it was obtained."""

    mod: Any
    importer: str  # "torch" or "onnx"
    native: dict = field(default_factory=dict)  # optpipe op name -> nodes lowered natively
    reason: str = ""


def _symint_expr(x):
    if isinstance(x, torch.SymInt):
        return x.node.expr
    if isinstance(x, torch.fx.Node) and isinstance(x.meta.get("val"), torch.SymInt):
        return x.meta["val"].node.expr
    return x if isinstance(x, int) else None


def _slice_end(node, dim: int, start: int, end, importer):
    """The end of a step-1 `aten.slice` as a Relax bound that torch proved in bounds (the output
    size is end - start, or src size - start for a slice to the end), or None."""
    size = _symint_expr(node.meta["val"].shape[dim])
    src_size = _symint_expr(node.args[0].meta["val"].shape[dim])
    if size is None or start < 0:
        return None
    if isinstance(end, torch.fx.Node):
        end_expr = _symint_expr(end)
        return importer.env[end] if end_expr is not None and size - (end_expr - start) == 0 else None
    if isinstance(end, int) and end >= start and size - (end - start) == 0:  # x[:1] of a symbolic dim >= 1
        return end
    if src_size is not None and size - (src_size - start) == 0:  # to the end (end >= size, e.g. 2**63 - 1)
        return importer.shape_of(importer.env[node.args[0]])[dim]
    return None


def _slice(node, importer):
    """`aten.slice`, with its axis normalised (Relax's strided_slice takes no negative axis on a
    symbolic dim: Mistral's and Gemma-2's masks) and, where torch proved it in bounds (nanoGPT's
    `mask[:, :, :T, :T]`, a slice to the end of a symbolic dim), imported as such: its shape stays
    `T` rather than `min(T, size)`, which breaks broadcasting downstream."""
    from tvm import relax

    args = list(node.args) + [None] * (5 - len(node.args))
    src, dim, start, end, step = args[:5]
    out, x = node.meta.get("val"), importer.env[src]
    if not isinstance(out, torch.Tensor) or not isinstance(src.meta.get("val"), torch.Tensor):
        return importer._slice(node)
    dim, start, step = (dim or 0) % out.dim(), start or 0, 1 if step is None else step
    end = sys.maxsize if end is None else end
    stop = _slice_end(node, dim, start, end, importer) if step == 1 and isinstance(start, int) else None
    if stop is not None:
        if start == 0 and _symint_expr(out.shape[dim]) == _symint_expr(src.meta["val"].shape[dim]):
            return x  # the whole dim
        return importer.block_builder.emit(relax.op.strided_slice(x, [dim], [start], [stop], [1], assume_inbound=True))

    def bound(a):
        return importer.env[a] if isinstance(a, torch.fx.Node) else a

    return importer.block_builder.emit(relax.op.strided_slice(x, [dim], [bound(start)], [bound(end)], [bound(step)]))


def _cumsum(node, importer):
    """`aten.cumsum` in the dtype torch gives it: a bool or integer input sums in int64 (Mistral's
    and Gemma-2's masks cumsum a bool tensor), where Relax would keep a bool sum LLVM cannot add."""
    from tvm import relax

    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return importer._cumsum(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    dtype = str(out.dtype).replace("torch.", "")
    return importer.block_builder.emit(relax.op.cumsum(importer.env[node.args[0]], dim, dtype))


def _repeat(node, importer):
    """`aten.repeat` as reshape -> broadcast -> reshape, so that a repeat count may be symbolic
    (BLOOM's and DeBERTa-v2's biases repeat per batch row), where Relax's `tile` takes ints only."""
    from tvm import relax, sym

    repeats = importer.retrieve_args(node)[1]
    if all(isinstance(r, int) for r in repeats):
        return importer._repeat(node)
    x = importer.env[node.args[0]]
    shape = list(importer.shape_of(x))
    sizes = [1] * (len(repeats) - len(shape)) + shape  # torch: extra repeats add leading dims
    simplify = sym.Analyzer().simplify
    bb = importer.block_builder
    y = bb.emit(relax.op.reshape(x, [d for size in sizes for d in (1, size)]))
    y = bb.emit(relax.op.broadcast_to(y, [d for r, size in zip(repeats, sizes) for d in (r, size)]))
    return bb.emit(relax.op.reshape(y, [simplify(r * size) for r, size in zip(repeats, sizes)]))


def _sym_extremum(name: str):
    """`torch.sym_max` / `torch.sym_min` of sizes as a TIR max/min, which shapes and slice bounds
    take like any size expression (MPT's ALiBi slices its bias from `max(0, 64 - T)`)."""

    def convert(node, importer):
        from tvm import tirx

        a, b = importer.retrieve_args(node)
        if isinstance(a, int) and isinstance(b, int):
            return {"max": max, "min": min}[name](a, b)
        return getattr(tirx, name)(a, b)

    return convert


def _torch_dim(t: torch.Tensor, axis: int):
    """Dim `axis` of `t` counted from the right (-1: last), or None past its rank."""
    return t.shape[axis] if -axis <= t.dim() else None


def _broadcast_dim(node, axis: int, out_dim, importer):
    """The Relax dim of a tensor input of `node` that torch sizes exactly as the output at `axis`."""
    for arg in node.args:
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        if isinstance(val, torch.Tensor) and _symint_expr(_torch_dim(val, axis)) == _symint_expr(out_dim):
            shape = importer.shape_of(importer.env[arg])
            if shape is not None:
                return shape[axis]
    return None


def _cast_to_broadcast(node, importer) -> None:
    """Give each tensor input of a broadcasting op the dims torch proved it has: 1 where it
    broadcasts, else the output's. Relax infers no output shape (and LegalizeOps then skips the op)
    when it cannot prove two dims equal, e.g. MPT's `T` against its sliced ALiBi bias's
    `64 - max(0, 64 - T)` (equal for every T the model accepts). A runtime-checked `match_cast`,
    after one to the rank alone: matching `(4, 1, T)` straight against `(4, 1, 64 - max(0, 64 - T))`
    would bind T to an expression in T, on which CanonicalizeBindings and `dpl.rewrite_call`
    (TVM 0.27, `SymbolicVarCanonicalizer`/`InferSymbolicVarMap`) recurse until the stack overflows."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    from tvm import relax, sym

    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return
    can_prove_equal = sym.Analyzer().can_prove_equal
    for arg in dict.fromkeys(a for a in node.args if isinstance(a, torch.fx.Node)):  # x + x: cast once
        val, x = arg.meta.get("val"), importer.env.get(arg)
        shape = importer.shape_of(x) if isinstance(val, torch.Tensor) and isinstance(x, relax.Expr) else None
        if shape is None or len(shape) != val.dim():
            continue
        dims, cast = list(shape), False
        for axis in range(-val.dim(), 0):
            size = val.shape[axis]
            if statically_known_true(size == 1):
                want = 1
            elif statically_known_true(size != 1):  # torch broadcasts no other way
                want = _broadcast_dim(node, axis, out.shape[axis], importer)
            else:
                want = None
            if want is not None and not can_prove_equal(dims[axis], want):
                dims[axis], cast = want, True
        if cast:
            bb, dtype = importer.block_builder, x.ty.dtype
            rank_only = bb.match_cast(x, relax.TensorType(ndim=len(dims), dtype=dtype))
            importer.env[arg] = bb.match_cast(rank_only, relax.TensorType(dims, dtype))


# elementwise ops that broadcast their tensor inputs (ATen names, after decomposition)
BROADCASTING = (
    "add.Tensor",
    "sub.Tensor",
    "mul.Tensor",
    "div.Tensor",
    "div.Tensor_mode",
    "where.self",
    "maximum.default",
    "minimum.default",
    "pow.Tensor_Tensor",
    "eq.Tensor",
    "ne.Tensor",
    "lt.Tensor",
    "le.Tensor",
    "gt.Tensor",
    "ge.Tensor",
    "logical_and.default",
    "logical_or.default",
)


def _broadcasting(name: str):
    def convert(node, importer):
        _cast_to_broadcast(node, importer)
        return importer.create_convert_map()[name](node)  # the importer's own converter

    return convert


# converters given to the Relax torch importer in place of (or in addition to) its own
IMPORT_FIXES = {
    "slice.Tensor": _slice,
    "cumsum.default": _cumsum,
    "repeat.default": _repeat,
    "sym_max": _sym_extremum("max"),
    "sym_min": _sym_extremum("min"),
} | {name: _broadcasting(name) for name in BROADCASTING}


def _wrap_gathers(mod):
    """`take` with mode "wrap" instead of "fast": torch's values for every index torch accepts,
    negative ones included (Falcon's `qkv[..., [-2], :]`: "fast" reads out of bounds and "clip"
    clamps -2 to 0), and no stray read on an index torch would reject (it wraps)."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    x, idx = wildcard(), wildcard()
    pattern = is_op("relax.take")(x, idx)

    def wrap(call, m):
        if call.attrs.mode != "fast":
            return call
        return relax.op.take(m[x], m[idx], axis=call.attrs.axis, mode="wrap")

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, wrap, func)
    return mod


def _counted(name: str, fn, counts: dict):
    def lower(node, importer):
        counts[name] = counts.get(name, 0) + 1
        return fn(node, importer)

    return lower


def _static_shapes(program) -> list[list[int]]:
    return [list(x.shape) for x in program.example_inputs if isinstance(x, torch.Tensor)]


# -- compiled artifact ---------------------------------------------------------------------------


class TvmModule:
    """A built Relax VM library, callable with the program's positional torch inputs."""

    def __init__(self, executable, meta: dict, device: str, out_spec=None, tuning_dir=None):
        tvm = load_tvm()
        from tvm import relax

        self.executable = executable
        self.meta = meta
        self.device_type = device
        self.device = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        self.vm = relax.VirtualMachine(executable, self.device)
        self.out_spec = out_spec
        self.tuning_dir = tuning_dir  # a TemporaryDirectory until save() copies it into OUT
        self.static_shapes = meta["functions"].get(STATIC_FN)
        self._functions: dict = {}

    def _to_tvm(self, x: torch.Tensor, dtype: str):
        tvm = load_tvm()
        want = getattr(torch, dtype)
        x = x.detach().to(want).contiguous()
        if x.device.type == self.device_type:
            return tvm.runtime.from_dlpack(x)
        return tvm.runtime.tensor(x.cpu().numpy(), device=self.device)

    def _to_torch(self, t) -> torch.Tensor:
        if self.device_type == "cpu" or torch.cuda.is_available():
            return torch.from_dlpack(t)
        return torch.from_numpy(t.numpy())  # a CPU-only torch beside a CUDA TVM

    def function_for(self, inputs) -> str:
        shapes = [list(x.shape) for x in inputs]
        return STATIC_FN if self.static_shapes is not None and shapes == self.static_shapes else "main"

    def __call__(self, *inputs):
        tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
        specs = self.meta["inputs"]
        if len(tensors) != len(specs):
            raise UsageError(
                f"target tvm: the library takes {len(specs)} input(s) "
                f"({', '.join(s['name'] for s in specs)}), got {len(tensors)}"
            )
        args = [self._to_tvm(x, s["dtype"]) for x, s in zip(tensors, specs)]
        name = self.function_for(tensors)
        if name not in self._functions:
            self._functions[name] = self.vm[name]
        out = self._functions[name](*args)
        leaves = [self._to_torch(t) for t in _flatten(out)]
        if self.out_spec is not None and self.out_spec.num_leaves == len(leaves):
            return pytree.tree_unflatten(leaves, self.out_spec)
        return leaves[0] if len(leaves) == 1 else tuple(leaves)


def _flatten(value) -> list:
    tvm = load_tvm()
    if isinstance(value, tvm.runtime.Tensor):
        return [value]
    return [t for item in value for t in _flatten(item)]


# -- the targets ---------------------------------------------------------------------------------


class TvmTarget(Target):
    name = "tvm"
    artifact = ARTIFACT
    device_type = "cpu"

    def check_trainable(self, program, objective: str) -> None:
        check_trainable(program, objective)  # targets/tvm_training.py

    def trainer(self, program, **hyper):
        from .tvm_training import TvmTrainer

        return TvmTrainer(program, **hyper)

    def __init__(self):
        self._exported: tuple | None = None  # (gm, native ops, decomposed ExportedProgram)
        self._plan: _ImportPlan | None = None  # decided by check(), used by import_program()

    # -- capability ---------------------------------------------------------------------------
    def available(self) -> None:
        tvm = load_tvm()
        if not tvm.runtime.enabled("llvm"):
            raise UsageError(
                f"target {self.name}: this TVM build has no LLVM backend",
                "install the apache-tvm wheel, which ships LLVM",
            )

    def check(self, program, tune: int = 0, **options) -> list[UnsupportedNode]:
        """Nodes neither import path takes; also decides between the torch and ONNX importers.
        A `tune` request this install cannot serve fails here too, before any work."""
        if _trials(tune, self.name) and self.device_type == "cpu":
            _require_metaschedule()
        # optpipe ops on the program itself (where passes recorded who introduced them); ATen ops
        # after the decomposition the import runs (export rewrites many on the way).
        found = unsupported_nodes(program, LOWERING_KEY, lambda op: True)
        try:
            ep = self._decomposed(program)
        except Exception as e:  # export itself failing is the user's first problem
            if found:
                return found
            raise TargetError(
                f"target {self.name}: re-exporting the program failed: {first_line(e)}",
                "run `optpipe inspect` on the model; the torch targets may still take it",
            ) from e
        convert = torch_importer_ops() | set(IMPORT_FIXES)
        missing = [
            n
            for n in ep.graph.nodes
            if n.op == "call_function" and not ops.is_optpipe_op(n.target) and _fn_name(n.target) not in convert
        ]
        if not missing and not found:
            self._plan = _ImportPlan(program.gm, "torch")
            return []
        if missing and not found:
            onnx_model = _onnx_if_complete(ep)
            if onnx_model is not None:
                lacks = ", ".join(sorted({op_label(n.target) for n in missing}))
                self._plan = _ImportPlan(program.gm, "onnx", f"the Relax torch importer lacks {lacks}", onnx_model)
                return []
        return found + [_unsupported(n) for n in missing]

    def _native_lowerings(self) -> dict:
        return ops.lowerings_for(LOWERING_KEY)

    def _decomposed(self, program):
        """The re-exported program after decomposition (cached between check and compile)."""
        native = tuple(self._native_lowerings())
        if self._exported and self._exported[0] is program.gm and self._exported[1] == native:
            return self._exported[2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = program.export().run_decompositions(decomposition_table(native))
        self._exported = (program.gm, native, ep)
        return ep

    # -- import ---------------------------------------------------------------------------------
    def import_program(self, program) -> RelaxImport:
        """The program as a Relax IRModule (function `main`), before any TVM optimisation."""
        load_tvm()
        if self._plan is None or self._plan.gm is not program.gm:
            unsupported = self.check(program)
            if unsupported:
                raise TargetError(
                    f"target {self.name} cannot take {len(unsupported)} node(s): "
                    + "; ".join(str(u) for u in unsupported[:10]),
                    unsupported_hint(unsupported),
                )
        plan = self._plan
        ep = self._decomposed(program)
        try:
            if plan.importer == "onnx":
                from tvm.relax.frontend.onnx import from_onnx

                model = plan.onnx_model
                dtypes = {i.name: _onnx_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
                mod = from_onnx(model, dtype_dict=dtypes, keep_params_in_input=False)
                return RelaxImport(_wrap_gathers(mod), "onnx", reason=plan.reason)
            from tvm.relax.frontend.torch import from_exported_program

            counts: dict = {}
            convert = dict(IMPORT_FIXES)
            for op, fn in self._native_lowerings().items():
                convert[_fn_name(op)] = _counted(ops.opdef(op).name, fn, counts)
            mod = from_exported_program(ep, custom_convert_map=convert, run_ep_decomposition=False)
            return RelaxImport(_wrap_gathers(mod), "torch", counts)
        except (TargetError, UsageError):
            raise
        except Exception as e:  # one line; the cause stays chained (OPTPIPE_DEBUG=1)
            raise TargetError(
                f"target {self.name}: Relax import ({plan.importer}) failed: {first_line(e)}",
                "report it with `optpipe inspect` output; the torch targets may take it",
            ) from e

    # -- build ------------------------------------------------------------------------------------
    def build_target(self):
        return cpu_target()

    def compile(self, program, tune: int = 0, static: bool = True, **options) -> Compiled:
        """`tune`: MetaSchedule trials (0: untuned). `static`: beside the dynamic-shape `main`, also
        build `main_static`, specialised to the example input shapes and called when the inputs
        have them (static tiles: MiniLM b8 s128 ran 2.7x faster than through `main`). Options
        meant for other targets are ignored."""
        tvm = load_tvm()
        tune = _trials(tune, self.name)
        start = time.perf_counter()
        imported = self.import_program(program)
        mod = imported.mod
        target = self.build_target()
        info: dict = {
            "device": self.device_type,
            "target": json.loads(str(target)),
            "importer": imported.importer,
            "mode": "untuned",
            "tune": tune,
        }
        if imported.reason:
            info["importer_reason"] = imported.reason
        if imported.native:
            info["native_lowerings"] = imported.native
        inputs = _input_specs(mod, program)
        functions: dict = {"main": None}
        tuning_dir = database = None
        if tune and self.device_type == "cuda":
            info["tuning"] = "ignored: tvm-cuda uses dlight's default GPU schedules"
        elif tune:
            tuning_dir = tempfile.TemporaryDirectory(prefix="optpipe-tvm-tuning-")  # into OUT on save
            try:
                database, summary = tune_static(mod, program, target, tune, tuning_dir.name)
            except (TargetError, UsageError):
                raise
            except Exception as e:
                raise TargetError(
                    f"target {self.name}: MetaSchedule tuning failed: {first_line(e)}",
                    "build untuned (--tune 0); the log is under the tuning logs/ folder",
                ) from e
            info.update(mode=f"tuned ({summary['trials']} trials)", tuning=summary)
        if (static or tune) and _example_binding(mod["main"], program):
            mod[STATIC_FN] = _specialize(mod["main"], program, STATIC_FN)
            functions[STATIC_FN] = _static_shapes(program)
        try:
            executable = build_relax(mod, target, database)
        except Exception as e:
            raise TargetError(
                f"target {self.name}: build failed: {first_line(e)}", "rerun with OPTPIPE_DEBUG=1 for the traceback"
            ) from e
        info["compile_s"] = round(time.perf_counter() - start, 2)
        meta = {
            "format": FORMAT,
            "target": info["target"],
            "device": self.device_type,
            "cpu": host_cpu(),
            "inputs": inputs,
            "functions": functions,
            "importer": imported.importer,
            "tvm_version": tvm.__version__,
        }
        module = TvmModule(executable, meta, self.device_type, _out_spec(program), tuning_dir)
        return Compiled(module, info)

    # -- save / load ------------------------------------------------------------------------------
    def save(self, compiled: Compiled, out_dir: str) -> None:
        module: TvmModule = compiled.fn
        folder = os.path.join(out_dir, ARTIFACT)
        os.makedirs(folder, exist_ok=True)
        module.executable.export_library(os.path.join(folder, "model.so"))
        with open(os.path.join(folder, "model.json"), "w") as f:
            json.dump(module.meta, f, indent=2)
        if module.tuning_dir is not None:
            shutil.copytree(module.tuning_dir.name, os.path.join(folder, "tuning"), dirs_exist_ok=True)

    def load(self, out_dir: str, program) -> Compiled:
        tvm = load_tvm()
        folder = os.path.join(out_dir, ARTIFACT)
        lib_path, meta_path = os.path.join(folder, "model.so"), os.path.join(folder, "model.json")
        if not (os.path.isfile(lib_path) and os.path.isfile(meta_path)):
            raise UsageError(
                f"{out_dir} has no TVM library ({ARTIFACT}/model.so, {ARTIFACT}/model.json)",
                f"rerun `optpipe optimize ... --target {self.name} -o {out_dir}`",
            )
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise UsageError(f"{meta_path}: unknown format {meta.get('format')!r}", f"expected {FORMAT}")
        if meta.get("device", "cpu") == "cpu" and meta.get("cpu") != host_cpu():
            warnings.warn(
                f"{lib_path} was built for CPU {meta.get('cpu')!r}, this is {host_cpu()!r}: "
                "it may use instructions this CPU lacks; rebuild here if it fails",
                stacklevel=2,
            )
        module = TvmModule(tvm.runtime.load_module(lib_path), meta, meta.get("device", "cpu"), _out_spec(program))
        return Compiled(
            module,
            {
                "device": module.device_type,
                "target": meta["target"],
                "importer": meta.get("importer"),
                "mode": "loaded",
            },
        )


class TvmCudaTarget(TvmTarget):
    name = "tvm-cuda"
    device_type = "cuda"

    def available(self) -> None:
        tvm = load_tvm()
        if not tvm.runtime.enabled("cuda") or not tvm.cuda(0).exist:
            raise UsageError(
                "target tvm-cuda: no CUDA device here (tvm.cuda().exist is False)",
                "use --target tvm for this CPU, or run on a machine with an NVIDIA GPU and a CUDA-enabled TVM build",
            )

    def prepare_inputs(self, inputs: tuple) -> tuple:
        if not torch.cuda.is_available():
            return inputs  # TvmModule copies CPU tensors to the GPU itself
        return tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in inputs)

    def build_target(self):
        return cuda_target()


def _trials(tune, target_name: str) -> int:
    try:
        trials = int(tune or 0)
    except (TypeError, ValueError):
        trials = -1
    if trials < 0:
        raise UsageError(
            f"target {target_name}: tune must be a number of trials >= 0, got {tune!r}",
            "e.g. --tune 64; 0 builds untuned",
        )
    return trials


def _unsupported(node) -> UnsupportedNode:
    return UnsupportedNode(node.name, op_label(node.target), module_path(node), introduced_by(node))


def _out_spec(program):
    return getattr(program.gm, "_out_spec", None)


def _input_specs(mod, program) -> list[dict]:
    """Name, dtype and dims (ints, or the symbolic var's name) of each `main` parameter."""
    tvm = load_tvm()
    from tvm import relax

    specs = []
    params = mod["main"].params
    num_input = mod["main"].attrs.get("num_input", len(params)) if mod["main"].attrs else len(params)
    names = list(program.input_names) + [f"arg{i}" for i in range(len(program.input_names), len(params))]
    dynamic = list(program.dynamic_shapes or []) + [None] * len(params)
    for i, p in enumerate(params[: int(num_input)]):
        shape = p.ty.shape.values if isinstance(p.ty.shape, relax.ShapeExpr) else []
        dim_names = dynamic[i] or {}
        # a symbolic dim is named as the program names it ("seq"), else by its TIR var ("s70")
        dims = [
            int(d) if isinstance(d, tvm.tirx.IntImm) else dim_names.get(axis, str(d)) for axis, d in enumerate(shape)
        ]
        specs.append({"name": names[i], "dtype": str(p.ty.dtype), "shape": dims})
    return specs


def _example_binding(func, program) -> dict:
    """{symbolic dim var: its size in the example inputs} over `func`'s parameters."""
    tvm = load_tvm()
    from tvm import relax

    binding = {}
    for p, x in zip(func.params, [x for x in program.example_inputs if isinstance(x, torch.Tensor)]):
        if isinstance(p.ty.shape, relax.ShapeExpr):
            for d, size in zip(p.ty.shape.values, x.shape):
                if isinstance(d, tvm.tirx.Var):
                    binding[d] = int(size)
    return binding


def _specialize(func, program, name: str = "main"):
    """`func` with its symbolic dims bound to the example inputs' sizes, exported as `name`. Fresh
    variables throughout: bindings that do not depend on a symbolic dim would otherwise be the
    same objects in both functions of one module, which Relax's passes reject."""
    from tvm.relax.utils import copy_with_new_vars

    bound = func.bind_symbolic_vars(_example_binding(func, program))
    return copy_with_new_vars(bound).with_attr("global_symbol", name)


# -- ONNX fallback -------------------------------------------------------------------------------


@dataclass
class _ImportPlan:
    gm: Any  # the program graph the plan is for
    importer: str  # "torch" or "onnx"
    reason: str = ""
    onnx_model: Any = None


def _onnx_if_complete(ep):
    """The program as ONNX if the Relax ONNX importer converts every node of it, else None."""
    try:
        import onnx
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # optimize=True folds the exporter's `Constant(value_int=...)` nodes, which the Relax
            # ONNX importer cannot read, into initializers
            model = torch.onnx.export(
                ep, dynamo=True, opset_version=18, optimize=True, external_data=False, verbose=False
            ).model_proto
        onnx.checker.check_model(model)
    except Exception:  # noqa: BLE001 - no ONNX path: the torch importer's gaps get reported
        return None
    known = set(_get_convert_map())
    ok = all(n.domain in ("", "ai.onnx") and n.op_type in known for n in model.graph.node)
    return model if ok else None


def _onnx_dtype(elem_type: int) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


# -- MetaSchedule tuning -------------------------------------------------------------------------


@functools.cache
def metaschedule_blocker() -> str | None:
    """Why MetaSchedule cannot run with this TVM install (None: it can).

    MetaSchedule serialises TIR with `tvm.ir.save_json`, which segfaults with apache-tvm-ffi
    0.1.15.*; probing in a child process keeps the crash out of ours."""
    probe = "import tvm; tvm.ir.save_json(tvm.tirx.IntImm('int32', 1))"
    try:
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "probing tvm.ir.save_json in a child process timed out"
    if proc.returncode == 0:
        return None
    try:
        from importlib.metadata import version

        ffi = version("apache-tvm-ffi")
    except Exception:  # noqa: BLE001
        ffi = "?"
    return (
        f"tvm.ir.save_json crashes with this install (apache-tvm-ffi {ffi}, exit {proc.returncode}), "
        "and MetaSchedule needs it"
    )


def _require_metaschedule() -> None:
    blocker = metaschedule_blocker()
    if blocker:
        raise TargetError(
            f"target tvm: cannot tune: {blocker}", "pin apache-tvm-ffi==0.1.14.post1, or build untuned (--tune 0)"
        )


def _x86_intrinsics_only():
    """TuneContext imports every target's tensor intrinsics (~30 s of TVMScript parsing, most of
    it CUDA's); llvm tuning needs only x86's. Register the package without its __init__ so that
    import is a no-op, and load x86 alone."""
    import importlib.util
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules[name] = package
    importlib.import_module(f"{name}.x86")


def _in_process_measure():
    """MetaSchedule builder/runner that work in this process: the stock ones need a popen pool
    (cloudpickle, psutil) and are slow to start on a small machine."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, PyRunner, RunnerFuture, RunnerResult
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common, run_evaluator_common

    tvm = load_tvm()
    built: dict = {}

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for inp in build_inputs:
                try:
                    key = f"in-process:{len(built)}"
                    built[key] = default_build(inp.mod, inp.target, None)
                    results.append(BuilderResult(key, None))
                except Exception as e:  # noqa: BLE001 - a failed candidate is a tuning record
                    results.append(BuilderResult(None, first_line(e)))
            return results

    @derived_object
    class InProcessRunner(PyRunner):
        def __init__(self):
            super().__init__()
            self.config = EvaluatorConfig(number=3, repeat=1, min_repeat_ms=10)
            self.fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")

        def run(self, runner_inputs):
            futures = []
            for inp in runner_inputs:
                try:
                    rt_mod = built.pop(str(inp.artifact_path))
                    dev = tvm.runtime.device(str(inp.device_type), 0)
                    args = alloc_argument_common(self.fill, dev, [a.as_json() for a in inp.args_info], 1)
                    result = RunnerResult(run_evaluator_common(rt_mod, dev, self.config, args), None)
                except Exception as e:  # noqa: BLE001
                    result = RunnerResult(None, first_line(e))
                futures.append(RunnerFuture(lambda: True, lambda r=result: r))
            return futures

    return InProcessBuilder(), InProcessRunner()


def _float_only(task) -> bool:
    """Tasks whose inputs are all floating point: random-filled integer inputs are out-of-range
    indices, and a gather reading them would crash the in-process runner."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    args = [a.as_json() for a in ArgInfo.from_prim_func(task.dispatched[0]["main"])]
    return all(kind == "TENSOR" and str(dtype).startswith(("float", "bfloat")) for kind, dtype, *_ in args)


FLOP_SHARE_TUNED = 0.9  # tune the heaviest tasks that together hold this share of the FLOPs


def _heavy_tasks(tasks) -> list:
    """The tasks worth trials: heaviest first (FLOPs x calls), until FLOP_SHARE_TUNED of the
    total; the rest keep their default schedules, which tuning would barely improve."""
    from tvm.s_tir.analysis import estimate_tir_flops

    def flops(task) -> float:
        try:
            return float(estimate_tir_flops(task.dispatched[0])) * task.weight
        except Exception:  # noqa: BLE001 - an unanalysable kernel ranks last
            return 0.0

    ranked = sorted(((flops(t), t) for t in tasks), key=lambda ft: -ft[0])
    total, covered, chosen = sum(f for f, _ in ranked), 0.0, []
    for f, task in ranked:
        if chosen and (covered >= FLOP_SHARE_TUNED * total or f == 0.0):
            break
        chosen.append(task)
        covered += f
    return chosen


def _tune_contexts(tasks, target, work_dir: str, strategy: str):
    """TuneContexts whose design space, for a matmul, also holds `schedule_matmul`'s template
    (tile sizes as decisions) next to MetaSchedule's generic spaces: the search then starts
    from a schedule at least as good as the untuned build's."""
    from tvm.s_tir import meta_schedule as ms

    def template(sch):
        schedule_matmul(sch, target, tunable=True)
        return sch

    contexts, weights = [], []
    for task in tasks:
        matmul = default_matmul_schedule(task.dispatched[0], target) is not None
        space = (
            ms.space_generator.SpaceGeneratorUnion(
                [ms.space_generator.PostOrderApply(), ms.space_generator.ScheduleFn(template)]
            )
            if matmul
            else "post-order-apply"
        )
        ctx, weight = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [task], work_dir, space=space, strategy=strategy, num_threads=int(target.attrs["num-cores"]), seed=0
        )
        contexts += ctx
        weights += weight
    return contexts, weights


def tune_static(mod, program, target, trials: int, work_dir: str):
    """MetaSchedule-tune `main` specialised to the example shapes; returns (database, summary)."""
    _require_metaschedule()
    tvm = load_tvm()
    from tvm.s_tir import meta_schedule as ms

    _x86_intrinsics_only()
    static = tvm.IRModule({"main": _specialize(mod["main"], program)})
    specialized = bool(_example_binding(mod["main"], program))
    static = legalize_and_fuse(static, target)
    tasks = _heavy_tasks([t for t in ms.relax_integration.extract_tasks(static, target) if _float_only(t)])
    try:
        import xgboost  # noqa: F401 - a learned cost model makes the evolutionary search worthwhile

        cost_model, strategy = "xgb", "evolutionary"
    except ImportError:
        cost_model, strategy = "random", "replay-trace"
    # MetaSchedule logs every step to stdout (where `--json` output goes): keep its console to
    # warnings, on stderr; the full logs are written under work_dir/logs.
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level == logging.NOTSET:
        ms_logger.setLevel(logging.WARNING)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        contexts, weights = _tune_contexts(tasks, target, work_dir, strategy)
        database = ms.database.JSONDatabase(work_dir=work_dir)
        builder, runner = _in_process_measure()
        per_task = max(1, -(-trials // max(1, len(contexts))))
        if contexts:
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=work_dir,
                max_trials_global=trials,
                max_trials_per_task=per_task,
                num_trials_per_iter=min(per_task, 64),
                builder=builder,
                runner=runner,
                database=database,
                cost_model=cost_model,
                measure_callbacks=[ms.measure_callback.AddToDatabase(), ms.measure_callback.UpdateCostModel()],
            )
    summary = {
        "trials": len(database),
        "tasks": len(contexts),
        "strategy": strategy,
        "cost_model": cost_model,
        "specialized": specialized,
        "shapes": _static_shapes(program),
        "seconds": round(time.perf_counter() - start, 2),
        "best_us": _best_times(database, contexts),
    }
    with open(os.path.join(work_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return database, summary


def _best_times(database, contexts) -> dict:
    best = {}
    for ctx in contexts:
        records = database.get_top_k(database.commit_workload(ctx.mod), 1)
        if records and records[0].run_secs:
            best[ctx.task_name] = round(float(records[0].run_secs[0]) * 1e6, 2)
    return best


register_target("tvm", TvmTarget)
register_target("tvm-cuda", TvmCudaTarget)


# -- training: targets/tvm_training.py (imported when asked for) -------------------------------------
def check_trainable(program, objective: str = "clm") -> None:
    """TargetError (naming the op without a Relax gradient) unless tvm can train `program`."""
    from .tvm_training import check_trainable as check

    check(program, objective)
