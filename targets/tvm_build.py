"""From a program to a TVM Relax VM executable: what the `tvm` / `tvm-cuda` targets
(targets/tvm_backend.py) and tvm training (targets/tvm_training.py) build with alike.

- `load_tvm`: TVM, imported on first use (the core reaches the targets only through the registry),
  with its CPU thread pool following torch's thread count.
- The machines: `cpu_target` (llvm for this host's CPU, `host_cpu`) and `cuda_target`.
- `decomposition_table`: core ATen plus optpipe's decompositions, what a program is reduced to
  before the Relax torch importer takes it.
- `build_relax(mod, target, database)`: (CPU: fast math) → LegalizeOps → FoldConstant →
  FuseOps/FuseTIR (`legalize_and_fuse`) → MetaSchedule database schedules, then the default ones
  (`schedule_relax`: dlight's on a GPU, `default_cpu_schedule` on a CPU) → Relax VM.
- The default CPU schedules: matmuls register-tiled, parallel over packed column panels,
  vectorised along the output row, epilogue fused (`schedule_matmul`; `default_matmul_schedule`
  applies it to one kernel); softmax/norms by dlight's CPU Reduction rule; elementwise/layout
  kernels parallel and vectorised.
- `fast_math_pass`: fp32 exp/erf/tanh/softmax/GELU → TOPI's vectorisable polynomial versions.
"""

from __future__ import annotations

import os

import torch

from optpipe import ops
from optpipe.errors import UsageError

# -- TVM and the machines it builds for ------------------------------------------------------------


def load_tvm():
    """The `tvm` package (with Relax), imported on first use; UsageError when it is not installed."""
    # TVM sizes its CPU thread pool once, when it first runs a parallel kernel, from TVM_NUM_THREADS
    # (else half the logical CPUs: on a 2-core machine without SMT, one thread). Follow torch's
    # thread count, as the onnxruntime target does, unless the user chose one.
    os.environ.setdefault("TVM_NUM_THREADS", str(max(1, torch.get_num_threads())))
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ImportError as e:
        raise UsageError(
            f"target tvm: Apache TVM is not importable ({e})", "pip install apache-tvm==0.27.0.post1"
        ) from None
    return tvm


def host_cpu() -> str:
    """The LLVM name of this machine's CPU (e.g. "rocketlake"), which the library is built for."""
    return str(load_tvm().target.codegen.llvm_get_system_cpu())


def cpu_target():
    """llvm for this machine's CPU: what the tvm target and tvm training build for."""
    # num-cores is what MetaSchedule sizes its parallel loops by; codegen ignores it.
    return load_tvm().target.Target({"kind": "llvm", "mcpu": host_cpu(), "num-cores": os.cpu_count() or 1})


def cuda_target(arch: str | None = None):
    """CUDA for `arch` (e.g. "sm_90"; default: the local GPU's), with this CPU as the host."""
    tvm = load_tvm()
    device = tvm.target.Target.from_device(tvm.cuda(0)) if arch is None else {"kind": "cuda", "arch": arch}
    return tvm.target.Target(device, host={"kind": "llvm", "mcpu": host_cpu()})


# -- the decompositions before the Relax import -----------------------------------------------------


def _view_of_any_layout(x, size):
    """`aten.view` that also takes a non-contiguous input (by copying it first).

    Decomposing SDPA into math changes its output's strides, so a later `view` that was legal on
    the fused kernel's output (GPT-2's `c_proj` input) fails to re-trace. The copy is correct
    anywhere, and free in Relax, whose tensors have no strides."""
    from torch._prims_common import is_contiguous_or_false

    if is_contiguous_or_false(x):
        return NotImplemented  # a plain view
    aten = torch.ops.aten
    return aten.view.default(aten.clone.default(x, memory_format=torch.contiguous_format), size)


def decomposition_table(native=()) -> dict:
    """Core ATen decompositions plus optpipe's own, except ops lowered natively."""
    table = dict(torch.export.default_decompositions())
    table[torch.ops.aten.view.default] = _view_of_any_layout
    table.update(ops.decompositions(exclude=native))
    return table


# -- Relax module -> VM executable ------------------------------------------------------------------


def legalize_and_fuse(mod, target):
    """Relax ops → fused TIR kernels, still unscheduled; the same passes for tuning (task
    extraction) and building, so the database's workloads match the built kernels."""
    tvm = load_tvm()
    from tvm import relax

    cpu = "gpu" not in target.keys
    passes = [
        relax.transform.DecomposeOpsForInference(),
        *([fast_math_pass()] if cpu else []),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def schedule_relax(mod, target, database=None):
    """An imported Relax module legalized, fused and scheduled for `target`: MetaSchedule
    `database`'s schedules first, then the default ones (dlight's on a GPU, `default_cpu_schedule`
    on a CPU) for every kernel the database does not cover. What `build_relax` compiles."""
    load_tvm()
    from tvm import relax

    mod = legalize_and_fuse(mod, target)
    if database is not None:
        with target, database:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    if "gpu" in target.keys:
        from tvm.s_tir import dlight as dl

        rules = dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
        )
    else:
        rules = default_cpu_schedule()
    with target:
        return rules(mod)


def build_relax(mod, target, database=None):
    """Build an imported Relax module into a VM executable for `target` (a `tvm.target.Target`),
    scheduled by `schedule_relax`."""
    tvm = load_tvm()
    from tvm import relax

    # the default_build pipeline: memory planning, shape lowering and VM codegen
    return tvm.compile(
        schedule_relax(mod, target, database), target, relax_pipeline=relax.get_pipeline("default_build")
    )


# -- default CPU schedules -----------------------------------------------------------------------
# LegalizeOps leaves every kernel a plain serial loop nest: one core, scalar code, a matmul that
# walks its weight column by column (MiniLM-L6 ran ~100x slower than torch). TVM 0.27's dlight has
# CPU rules for reductions (softmax, layer norm) and GEMV, none for matmul or plain elementwise
# kernels; the two rules below fill that gap, so an untuned build is within reach of torch eager.

MATMUL_ROWS = (4, 8, 6, 2)  # register-tile heights to try, first that divides a static M wins
MATMUL_VECTORS = 4  # register-tile width in vectors: 4 x 4 zmm accumulators with AVX-512


def _vector_lanes(target, bits: int = 32) -> int:
    from tvm.target.codegen import llvm_get_vector_width

    width = llvm_get_vector_width(target)
    return max((width if width > 0 else 128) // bits, 4)


def _is_var(region, var) -> bool:
    return isinstance(region.min, load_tvm().tirx.Var) and region.min.same_as(var)


def _normalized_blocks(sch):
    """The function's blocks after inlining its elementwise pro/epilogues where possible."""
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base.common_schedules import try_inline_contiguous_spatial

    infos = normalize_prim_func(sch)
    return None if infos is None else try_inline_contiguous_spatial(sch, infos)


def default_matmul_schedule(func, target):
    """The default register-tiled schedule of a matmul kernel (see `schedule_matmul`), or None."""
    from tvm import s_tir
    from tvm.s_tir.schedule import ScheduleError

    sch = s_tir.Schedule(func)
    try:
        return sch if schedule_matmul(sch, target) else None
    except ScheduleError:  # e.g. an epilogue that cannot be inlined: leave it to the other rules
        return None


def _choice(sch, options: list[int], tunable: bool):
    """options[0], or with `tunable` a decision MetaSchedule samples among all of them."""
    if not tunable or len(options) == 1:
        return options[0]
    return sch.sample_categorical(candidates=options, probs=[1.0 / len(options)] * len(options))


def schedule_matmul(sch, target, tunable: bool = False) -> bool:
    """Schedule `C[..., i, j] = sum_k A[..., i, k] * B[..., k, j]` (plus an elementwise epilogue)
    in `sch`; False (with `sch` possibly inlined, otherwise untouched) when it is not such a kernel.

    Each parallel task owns a column panel of B, which it first copies into a contiguous buffer
    (packing: a 3072 x 64 panel of a 768-wide B is 3072 strided rows; packed, 512x3072x768 ran at
    205 instead of 108 GFLOP/s on 2 threads) and keeps in cache while it walks the rows in tiles of
    `rows` rows; a tile's `rows` x `cols` accumulator lives in vector registers across the whole k
    loop, and the epilogue (bias add, residual, ...) is applied on the way out. A ragged N with no
    epilogue (GPT-2's tied 50257-token head) is padded to whole tiles instead (`pad_einsum`: the
    panel copy zero-fills the missing columns, the tile rows are cut back on the way out): 1367 →
    197 ms on that head, against the odd-width tiles below.
    `tunable`: the tile sizes become MetaSchedule decisions (the tuned design space)."""
    from tvm.s_tir.dlight.base import get_extent

    blocks = _normalized_blocks(sch)
    if not blocks or blocks[0].is_injective() or any(not b.is_injective() for b in blocks[1:]):
        return False
    kinds = blocks[0].dom_kind()
    if not kinds.endswith("SSR") or kinds.count("R") != 1 or "O" in kinds:
        return False
    block = blocks[0].block_rv
    stmt = sch.get(block)
    if len(stmt.reads) != 2 or len(stmt.writes) != 1:
        return False
    vj = stmt.iter_vars[-2].var
    # j must be the contiguous (last) axis of the output and of one operand: that is the axis
    # vectorised; a transposed operand (B[..., j, k]) would turn every vector load into a gather
    if not _is_var(stmt.writes[0].region[-1], vj) or not any(_is_var(r.region[-1], vj) for r in stmt.reads):
        return False
    lanes = _vector_lanes(target)
    width = lanes * MATMUL_VECTORS
    *batch, i, j, k = sch.get_loops(block)
    rows, cols = get_extent(sch, i), get_extent(sch, j)
    padded_in = padded_out = ()
    if isinstance(cols, int) and cols > width and cols % width and len(blocks) == 1:
        sch.pad_einsum(block, [1] * (len(batch) + 1) + [width, 1])
        padded_in, padded_out = sch.get_producers(block), sch.get_consumers(block)
        *batch, i, j, k = sch.get_loops(block)
        cols = get_extent(sch, j)
    # tile heights dividing a static M (no ragged last tile), the preferred one first
    row_options = [m for m in MATMUL_ROWS if isinstance(rows, int) and rows % m == 0] or [MATMUL_ROWS[0]]
    col_options = [lanes * v for v in (MATMUL_VECTORS, 2, 1) if not isinstance(cols, int) or cols % (lanes * v) == 0]
    if isinstance(cols, int) and cols < width:
        col_options = [cols if cols < lanes else cols // lanes * lanes]
    elif isinstance(cols, int) and not col_options:
        # no vector multiple divides N (GPT-2's vocabulary, 50257 = 29 * 1733): an odd-width tile
        # that divides it (LLVM splits <29 x float> into 16+8+4+1) beats a ragged last tile,
        # whose predicate would keep the whole loop from vectorising (~5x slower)
        col_options = [d for d in range(width, lanes - 1, -1) if cols % d == 0][:1]
    i0, i1 = sch.split(i, [None, _choice(sch, row_options, tunable)])
    j0, j1 = sch.split(j, [None, _choice(sch, col_options or [width], tunable)])
    sch.reorder(*batch, j0, i0, k, i1, j1)
    task = sch.fuse(*batch, j0) if batch else j0
    sch.parallel(task)
    # the panel copy: the padding block where N was padded, else a cache read of B (the operand
    # whose last axis is j)
    panels = padded_in or (
        sch.cache_read(block, next(n for n, r in enumerate(stmt.reads) if _is_var(r.region[-1], vj)), "global"),
    )
    for panel in panels:
        sch.compute_at(panel, task)
    accumulator = sch.cache_write(block, 0, "local")
    for epilogue in blocks[1:]:
        sch.reverse_compute_inline(epilogue.block_rv)
    sch.reverse_compute_at(accumulator, i0, preserve_unit_loops=True)
    for cut in padded_out:
        sch.reverse_compute_at(cut, task)
    sch.unroll(i1)
    sch.vectorize(j1)
    init = sch.decompose_reduction(block, k)  # after vectorize: the split-off update is no reduction
    for b in (init, accumulator, *padded_out, *panels):
        sch.vectorize(sch.get_loops(b)[-1])
    return True


def _elementwise_schedule(func, target):
    """One elementwise/layout loop nest (after inlining): outer loops fused and parallel, the
    innermost vectorised when its static extent is a multiple of the vector width."""
    from tvm import s_tir
    from tvm.s_tir.dlight.base import get_extent

    sch = s_tir.Schedule(func)
    blocks = _normalized_blocks(sch)
    if not blocks or len(blocks) != 1 or not blocks[0].is_injective():
        return None
    block = blocks[0].block_rv
    loops = sch.get_loops(block)
    if not loops:
        return None
    lanes, vector = _vector_lanes(target), None
    extent = get_extent(sch, loops[-1])
    if isinstance(extent, int) and extent % lanes == 0:
        outer_inner, vector = sch.split(loops[-1], [None, lanes])
        loops = [*loops[:-1], outer_inner]
    sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
    if vector is not None:
        sch.vectorize(vector)
    return sch


def default_cpu_schedule():
    """ApplyDefaultSchedule with matmul, reduction (softmax, norms), GEMV and elementwise rules;
    kernels none of them takes (and those a tuning database scheduled) are left as they are."""
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    def rule(fn):
        class _Rule(CPUScheduleRule):
            def apply(self, func, target, _tunable):
                if not isinstance(func, load_tvm().tirx.PrimFunc) or not self.is_target_available(target):
                    return None
                return fn(func, target)

        _Rule.__name__ = fn.__name__
        return _Rule()

    def guarded(inner):  # dlight's analyses assert on some backward kernels: leave those to the next rule
        def apply(func, target):
            try:
                return inner.apply(func, target, False)
            except Exception:  # noqa: BLE001 - a heuristic schedule that fails is just not applied
                return None

        apply.__name__ = type(inner).__name__
        return rule(apply)

    return dl.ApplyDefaultSchedule(
        rule(default_matmul_schedule), guarded(dl.cpu.Reduction()), guarded(dl.cpu.GEMV()), rule(_elementwise_schedule)
    )


# -- fast math -------------------------------------------------------------------------------------
# LLVM has no vector exp/erf: `T.exp`/`T.erf` become one libm call per element, and MiniLM's GELU
# alone took longer than all its matmuls. TOPI's polynomial versions (relative error ~1e-7) vectorise.


def _fast_gelu(x):
    from tvm import tirx, topi

    half = tirx.const(0.5, x.dtype)
    erf = topi.fast_erf(topi.multiply(x, tirx.const(0.7071067811865476, x.dtype)))
    return topi.multiply(x, topi.add(topi.multiply(erf, half), half))


def fast_math_pass():
    """Relax pass: fp32 `exp`, `erf`, `tanh`, `nn.softmax` and `nn.gelu` (erf form) → TOPI's fast,
    vectorisable approximations, and `x ** 2`, `x ** 3` → products (`powf` is a libm call per
    element: GPT-2's tanh GELU took 9.5 ms a layer at seq 512). Put it before LegalizeOps."""
    tvm = load_tvm()
    from tvm import relax, topi
    from tvm.relax.expr_functor import PyExprMutator, mutator

    unary = {"relax.exp": topi.fast_exp, "relax.erf": topi.fast_erf, "relax.tanh": topi.fast_tanh}

    @mutator
    class FastMath(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if (
                not isinstance(call.op, tvm.ir.Op)
                or not call.args
                or getattr(call.args[0].ty, "dtype", None) != "float32"
                or not isinstance(getattr(call.args[0].ty, "shape", None), relax.ShapeExpr)
            ):
                return call  # call_te needs a known-rank shape (a data-dependent one stays as it is)
            name, x = call.op.name, call.args[0]
            if name == "relax.nn.gelu":
                return self.builder_.call_te(_fast_gelu, x, primfunc_name_hint="fast_gelu")
            if name == "relax.nn.softmax":
                return self.builder_.call_te(topi.nn.fast_softmax, x, call.attrs.axis)
            if name in unary:
                return self.builder_.call_te(unary[name], x)
            if name == "relax.power" and isinstance(call.args[1], tvm.ir.expr.Constant):  # x**2, x**3 (tanh GELU)
                exponent = call.args[1].value.numpy()
                if exponent.size == 1 and float(exponent) in (2.0, 3.0):
                    square = self.builder_.emit(relax.op.multiply(x, x))
                    return square if float(exponent) == 2.0 else relax.op.multiply(square, x)
            return call

    @tvm.transform.module_pass(opt_level=0, name="FastMath")
    def fast_math(mod, _ctx):
        mutator_ = FastMath(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator_.builder_.update_func(gv, mutator_.visit_expr(func))
        return mutator_.builder_.get()

    return fast_math
