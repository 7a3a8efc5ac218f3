"""Target `onnxruntime`: the program is exported to ONNX and run by an ONNX Runtime session.

Lowering, in order:
1. `program.export()` re-exports the rewritten graph as an ExportedProgram with its dynamic dims.
2. `check` applies, in one `run_decompositions`, optpipe's op decompositions
   (`optpipe.ops.decompositions`, minus the ops with a native `onnxruntime` lowering) and the ONNX
   exporter's own table (every torch decomposition of an op torchlib cannot translate directly),
   then dispatches every node of the result against the exporter's ONNX registry (torchlib at the
   chosen opset), exactly as the exporter will, and maps failures back to the program's nodes:
   module path and the pass that introduced them. optpipe ops are judged by
   `optpipe.target.unsupported_nodes` (natively lowered or decomposable). `compile` reuses that
   decomposed program (optimize() calls check then compile), else applies optpipe's table alone.
3. `torch.onnx.export(ep, dynamo=True)` with an explicit opset (default 20; ORT 1.19 reads 18-21),
   `custom_translation_table=lowerings_for("onnxruntime")` (onnxscript functions, e.g. ORT contrib
   ops), named dynamic axes (batch/seq as captured) and the onnxscript graph optimizer. The IR
   version is clamped to 10 (ORT 1.19 rejects newer files); weights stay inside `model.onnx` unless
   they pass protobuf's 2 GB limit (then `model.onnx.data`).
4. Transformer fusions into ORT contrib ops (`fuse_for_onnxruntime`, the list is `ORT_FUSIONS`;
   `compile(..., fuse=False)` skips them): the exporter writes attention as MatMul/Softmax/Transpose
   and a linear as MatMul + Add, which ORT's load-time optimizer only partly fuses (its attention
   fusion knows the TorchScript exporter's BERT pattern, not this one). onnxscript's ORT rewriter
   recognises SDPA, multi-head attention with its Q/K/V projections, skip layer norms and bias-GELU
   and rewrites them into `com.microsoft` ops: `Attention` (one packed QKV GEMM plus the attention
   kernel), `MultiHeadAttention`, `SkipLayerNormalization`, `BiasGelu`. Only fusions whose ops ORT
   1.19's CPU kernels run are applied, one onnxscript rule is tightened (`_mha_fusion`), and the
   result is adapted to 1.19 (its attention bias needs one row per head). Same fp32 math; the
   target check compares the result with the torch program as for any lowering.
5. An `InferenceSession` (CUDAExecutionProvider first when torch sees a GPU and ORT has the
   provider, always CPUExecutionProvider explicitly) with ORT_ENABLE_ALL; ORT writes the graph it
   optimized to `model.optimized.onnx` for inspection.

Failures past the check stay one line (TargetError): an exporter error names the FX node (op,
module path) it failed on; ORT refusing the model names the op and the modules its nodes came from.

Why the dynamo exporter and not the TorchScript one: only it reads an ExportedProgram (the IR we
already hold, with symbolic batch/seq dims) and takes onnxscript translations for custom ops, which
is how optpipe ops reach ORT natively. If the onnxscript optimizer or the fusions fail on a graph,
or ORT cannot load the fused graph, the unfused export is kept (ORT optimizes it on load anyway)
and the report says so (`info["onnx_optimizer"]`, `info["ort_fusions"]`).

`optpipe run OUT` loads the portable `OUT/model.onnx` (not the optimized file, which ORT marks as
specific to the machine that wrote it), so running needs neither the model's Python code nor a
re-export. Inputs are torch tensors in the program's order; outputs come back as torch tensors in
the program's output structure.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
import weakref

import torch
import torch.utils._pytree as pytree

from optpipe.errors import TargetError, UsageError
from optpipe.losses import task_loss
from optpipe.ops import decompositions, is_optpipe_op, lowerings_for
from optpipe.pipeline import introduced_by
from optpipe.registry import register_target
from optpipe.target import Compiled, Target, UnsupportedNode, op_label, token_input, unsupported_nodes

TARGET = "onnxruntime"
DEFAULT_OPSET = 20
OPSETS = range(18, 22)  # torchlib is written at 18; ORT 1.19 reads up to 21
MAX_IR_VERSION = 10  # ORT 1.19 cannot read IR version 11 (what onnx >= 1.18 writes)
MODEL_FILE = "model.onnx"
OPTIMIZED_FILE = "model.optimized.onnx"

# Nodes the exporter drops before translating (runtime shape checks), so they need no ONNX op.
_DROPPED = ("aten._assert", "aten.sym_constrain_range")


def providers() -> list[str]:
    """Execution providers to ask for: CUDA first when this process can use a GPU."""
    import onnxruntime as ort

    chosen = ["CPUExecutionProvider"]
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        chosen.insert(0, "CUDAExecutionProvider")
    return chosen


@functools.cache
def onnx_registry(opset: int):
    """The exporter's ATen -> ONNX registry (torchlib) at `opset`, or None if torch moved it."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:  # a torch without the dynamo exporter internals: export errors still apply
        return None
    with _quiet_exporter():
        return _registration.ONNXRegistry.from_torchlib(opset_version=opset)


def _onnx_decomposition_table(registry) -> dict:
    """What the exporter decomposes before translating: every torch decomposition of an op that
    has no ONNX function of its own."""
    from torch.onnx._internal.exporter import _decomp

    return _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs through `logging` (e.g. 'torchvision is not installed') and warns through
    `warnings`; neither belongs on a user's terminal (nor on `--json`'s stdout)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return "" if path.startswith("_empty_nn_module_stack") else path


class OrtRunner:
    """Runs an InferenceSession on torch tensors: `runner(*inputs) -> outputs` (torch, on CPU)."""

    def __init__(self, session, input_names: list[str], out_spec=None, workdir: str | None = None):
        self.session = session
        self.input_names = list(input_names)
        self.out_spec = out_spec
        self.onnx_inputs = {i.name: i for i in session.get_inputs()}
        self.workdir = workdir
        if workdir:  # the exported files live until the runner goes
            weakref.finalize(self, shutil.rmtree, workdir, True)

    def __call__(self, *inputs):
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        feeds = {}
        for name, x in zip(self.input_names, inputs):
            if name in self.onnx_inputs:  # static non-tensor inputs were folded into the graph
                feeds[name] = self._to_numpy(name, x)
        missing = [n for n in self.onnx_inputs if n not in feeds]
        if missing:
            raise UsageError(f"onnxruntime: missing input {missing[0]!r}", f"the model takes: {self._expected()}")
        try:
            outputs = self.session.run(None, feeds)
        except InvalidArgument as e:  # shapes the graph rejects
            raise UsageError(
                f"onnxruntime rejected the inputs: {_ort_message(e)}", f"the model takes: {self._expected()}"
            ) from None
        except Exception as e:  # noqa: BLE001 - a kernel failure: one line, not a traceback
            raise TargetError(f"onnxruntime failed to run the model: {_ort_message(e)}") from None
        leaves = [torch.from_numpy(o.copy()) for o in outputs]
        if self.out_spec is not None and self.out_spec.num_leaves == len(leaves):
            return pytree.tree_unflatten(leaves, self.out_spec)
        return leaves[0] if len(leaves) == 1 else tuple(leaves)

    def _to_numpy(self, name: str, x):
        if not isinstance(x, torch.Tensor):
            raise UsageError(
                f"onnxruntime: input {name!r} must be a tensor, got {type(x).__name__}",
                f"the model takes: {self._expected()}",
            )
        spec = self.onnx_inputs[name]
        expected = _ONNX_TO_TORCH.get(spec.type)
        if expected is not None and x.dtype != expected:
            raise UsageError(
                f"input {name!r} is {str(x.dtype).replace('torch.', '')} but the ONNX model takes "
                f"{str(expected).replace('torch.', '')}",
                f"the model takes: {self._expected()}",
            )
        if len(spec.shape) != x.dim():
            raise UsageError(
                f"input {name!r} has {x.dim()} dims {list(x.shape)} but the ONNX model takes {len(spec.shape)}",
                f"the model takes: {self._expected()}",
            )
        for d, (want, got) in enumerate(zip(spec.shape, x.shape)):
            if isinstance(want, int) and want != got:
                raise UsageError(
                    f"input {name!r} dim {d} is {got} but the ONNX model fixes it at {want}",
                    f"the model takes: {self._expected()}",
                )
        return x.detach().cpu().contiguous().numpy()

    def _expected(self) -> str:
        return ", ".join(
            f"{i.name}:{i.type.replace('tensor(', '').rstrip(')')}[{','.join(str(d) for d in i.shape)}]"
            for i in self.onnx_inputs.values()
        )


_ONNX_TO_TORCH = {
    "tensor(float)": torch.float32,
    "tensor(double)": torch.float64,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(int8)": torch.int8,
    "tensor(uint8)": torch.uint8,
    "tensor(bool)": torch.bool,
}


def _ort_message(e: BaseException) -> str:
    # "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions ..." -> the last part
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return re.sub(r"^Load model from \S+ failed: ?", "", text)


# ORT names an op it has no kernel for as "com.microsoft:Foo(-1)" or "... for Foo(20) node with name"
_ORT_OP = re.compile(r"(?:([\w.]+):)?(\w+)\((-?\d+)\)")


def _onnx_origins(path: str, message: str, limit: int = 3) -> str:
    """' (from module.path [fx node], ...)' for the ONNX nodes of the op an ORT error names: the
    exporter records each node's module scopes in its metadata."""
    import ast

    import onnx

    m = _ORT_OP.search(message)
    if not m:
        return ""
    domain, op_type = m.group(1) or "", m.group(2)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - only decoration for the error message
        return ""
    where = []
    for node in model.graph.node:
        if node.op_type == op_type and node.domain in ({domain} if domain else {"", "ai.onnx"}):
            scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
            try:
                names = ast.literal_eval(scopes) if scopes else []
            except (ValueError, SyntaxError):
                names = []
            if len(names) >= 2:
                where.append(f"{names[-2] or '<top>'} [{names[-1]}]")
    if not where:
        return ""
    more = f" and {len(where) - limit} more" if len(where) > limit else ""
    return f" (from {', '.join(where[:limit])}{more})"


class OnnxRuntimeTarget(Target):
    name = TARGET
    artifact = MODEL_FILE

    def __init__(self):
        self._cache: tuple | None = None  # (weakref to program, key, decomposed ExportedProgram)

    def available(self) -> None:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise UsageError(
                f"target onnxruntime needs {e.name}, which is not installed",
                "pip install onnx onnxscript onnxruntime-training",
            ) from None

    # -- capability check -----------------------------------------------------------------------
    def check(self, program, opset: int = DEFAULT_OPSET, **options) -> list[UnsupportedNode]:
        """Every node the exporter cannot translate at `opset` after decomposition, before export."""
        opset = _check_opset(opset)
        registry = onnx_registry(opset)
        if registry is None:  # only optpipe ops can be judged; export errors still come as one line
            return unsupported_nodes(program, TARGET, lambda t: True)
        from torch.onnx._internal.exporter import _dispatching

        ep = self._decomposed(program, opset)
        failed: dict[str, torch.fx.Node] = {}  # op label in the program -> a failing decomposed node
        for node in ep.graph.nodes:
            if node.op != "call_function" or is_optpipe_op(node.target):
                continue  # optpipe ops: judged by unsupported_nodes below (lowering or decomposition)
            label = op_label(node.target)
            if label.startswith(_DROPPED) or getattr(node.target, "namespace", None) == "onnx":
                continue  # checks the exporter drops; torch.ops.onnx.* become ONNX nodes as they are
            try:
                fn, _ = _dispatching.dispatch(node, registry)
            except Exception:  # noqa: BLE001 - the exporter would fail on this node too
                fn = None
            if fn is None:
                origin = node.meta.get("original_aten") or node.target
                failed.setdefault(op_label(origin), node)
        found = unsupported_nodes(program, TARGET, lambda t: op_label(t) not in failed)
        named = {u.op for u in found}
        for label, node in failed.items():  # produced by a decomposition: name the decomposed node
            if label not in named:
                found.append(UnsupportedNode(node.name, op_label(node.target), _module_path(node), introduced_by(node)))
        return found

    def _decomposed(self, program, opset: int):
        """program.export() + optpipe's and the exporter's decompositions: what check inspects.
        Kept for the compile that follows the check (optimize() calls them back to back)."""
        key = (program.gm.code, opset, _native_key())
        cached = self._cache
        if cached and cached[0]() is program and cached[1] == key:
            return cached[2]
        registry = onnx_registry(opset)
        table = _onnx_decomposition_table(registry) if registry is not None else {}
        ep = _decompose(_reexport(program), table)
        self._cache = (weakref.ref(program), key, ep)
        return ep

    def _exportable(self, program, opset: int):
        """The ExportedProgram to hand the exporter: the checked one when check just ran on this
        program, else a fresh export with optpipe's decompositions (the exporter runs its own)."""
        cached, self._cache = self._cache, None
        if cached and cached[0]() is program and cached[1] == (program.gm.code, opset, _native_key()):
            return cached[2]
        ep = _reexport(program)
        table = decompositions(exclude=lowerings_for(TARGET))
        return _decompose(ep, table) if table and _uses_any(program, table) else ep

    # -- lowering ---------------------------------------------------------------------------------
    def compile(self, program, opset: int = DEFAULT_OPSET, fuse: bool = True, **options) -> Compiled:
        """Export to ONNX and open a session. `fuse=False` keeps the exporter's graph (no contrib-op
        fusions; ORT still optimizes it on load). `options` meant for other targets (`mode`,
        `tune`) are ignored."""
        import onnxruntime as ort

        opset = _check_opset(opset)
        workdir = tempfile.mkdtemp(prefix="optpipe-ort-")
        try:
            ep = self._exportable(program, opset)
            onnx_program, notes, session, seconds = _export_and_open(ep, program, opset, bool(fuse), workdir)
            model = onnx_program.model
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        native = sorted(op_label(op) for op in lowerings_for(TARGET) if _uses(program, op))
        decomposed = sorted(
            {op_label(n.target) for n in program.gm.graph.nodes if n.op == "call_function" and is_optpipe_op(n.target)}
            - set(native)
        )
        info = {
            "exporter": "torch.onnx.export(dynamo=True)",
            "opset": model.opset_imports.get("", opset),
            "ir_version": model.ir_version,
            "providers": session.get_providers(),
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "onnxruntime_version": ort.__version__,
            "model_bytes": _size(workdir, MODEL_FILE),
            "optimized_model_bytes": _size(workdir, OPTIMIZED_FILE),
            "external_data": os.path.exists(os.path.join(workdir, MODEL_FILE + ".data")),
            "onnx_nodes": len(model.graph),
            "inputs": [f"{i.name}:{i.type}{i.shape}" for i in session.get_inputs()],
            "optpipe_ops_native": native,
            "optpipe_ops_decomposed": decomposed,
            "export_s": round(seconds[0], 2),
            "session_s": round(seconds[1], 2),
        }
        info.update(notes)
        runner = OrtRunner(session, program.input_names, getattr(program.gm, "_out_spec", None), workdir)
        return Compiled(runner, info)

    def save(self, compiled: Compiled, out_dir: str) -> None:
        workdir = getattr(compiled.fn, "workdir", None)
        if not workdir:
            raise TargetError("target onnxruntime: only a compiled program can be saved (this one was loaded)")
        for name in sorted(os.listdir(workdir)):  # model.onnx, model.optimized.onnx (+ .data files)
            shutil.copy2(os.path.join(workdir, name), os.path.join(out_dir, name))

    def check_trainable(self, program, objective: str) -> None:
        check_trainable(program, objective)  # the training section, below

    def trainer(self, program, **hyper) -> OrtTrainer:
        return OrtTrainer(program, **hyper)

    def load(self, out_dir: str, program) -> Compiled:
        path = os.path.join(out_dir, MODEL_FILE)
        if not os.path.isfile(path):
            raise UsageError(
                f"{out_dir} has no {MODEL_FILE}", "re-run `optpipe optimize ... --target onnxruntime -o OUT`"
            )
        session = _session(path, None)
        info = {"providers": session.get_providers(), "graph_optimization_level": "ORT_ENABLE_ALL", "model": MODEL_FILE}
        return Compiled(OrtRunner(session, program.input_names, getattr(program.gm, "_out_spec", None)), info)


def _check_opset(opset) -> int:
    if int(opset) not in OPSETS:
        raise UsageError(
            f"target onnxruntime: opset {opset} is not supported",
            f"onnxruntime 1.19 reads opsets {OPSETS[0]}-{OPSETS[-1]}; the default is {DEFAULT_OPSET}",
        )
    return int(opset)


def _uses(program, op) -> bool:
    return _uses_any(program, (op,))


def _uses_any(program, ops) -> bool:
    return any(n.op == "call_function" and n.target in ops for n in program.gm.graph.nodes)


def _native_key() -> tuple:
    return tuple(sorted(map(str, lowerings_for(TARGET))))


def _reexport(program):
    try:
        return program.export()
    except Exception as e:  # noqa: BLE001 - a graph torch.export rejects: one line
        raise TargetError(
            f"target onnxruntime: torch.export could not re-export the program: {_first_line(e)}",
            "run the program on the cpu target, or drop the last pass",
        ) from None


def _decompose(ep, table: dict):
    """optpipe's decompositions (minus natively lowered ops) on top of `table`, in one retrace."""
    from torch.fx.experimental import _config as fx_config

    table = {**table, **decompositions(exclude=lowerings_for(TARGET))}
    try:
        # the exporter decomposes under the same flag (size-0/1 dims stay dynamic)
        with fx_config.patch(backed_size_oblivious=True), _quiet_exporter():
            return ep.run_decompositions(table)
    except Exception as e:  # noqa: BLE001
        raise TargetError(
            f"target onnxruntime: decomposition failed: {_first_line(e)}",
            "an optpipe op's decomposition does not trace; check the op that introduced it",
        ) from None


def _clear(workdir: str) -> None:
    for name in os.listdir(workdir):
        os.remove(os.path.join(workdir, name))


def _size(workdir: str, name: str) -> int:
    return sum(
        os.path.getsize(os.path.join(workdir, f)) for f in os.listdir(workdir) if f == name or f == name + ".data"
    )


def _export_and_open(ep, program, opset: int, fuse: bool, workdir: str):
    """Export (and fuse) into `workdir`/model.onnx and open its session; returns (ONNXProgram, notes,
    session, (export seconds, session seconds)). A fused graph ORT refuses is replaced by the
    unfused export, so a fusion never costs the user a working model."""
    path = os.path.join(workdir, MODEL_FILE)
    start = time.perf_counter()
    onnx_program, notes = _export(ep, program, opset, fuse=fuse)
    onnx_program.save(path, external_data=False)  # switches to external data past 2 GB
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    try:
        session = _session(path, os.path.join(workdir, OPTIMIZED_FILE))
    except TargetError as e:
        if not isinstance(notes.get("ort_fusions"), dict) or not notes["ort_fusions"]:
            raise  # nothing was fused: the export itself is what ORT cannot take
        _clear(workdir)
        onnx_program, notes, session, (again_export_s, again_session_s) = _export_and_open(
            ep, program, opset, False, workdir
        )
        notes["ort_fusions"] = f"skipped: {e.message}"
        return onnx_program, notes, session, (export_s + again_export_s, time.perf_counter() - start - again_export_s)
    return onnx_program, notes, session, (export_s, time.perf_counter() - start)


def _export(ep, program, opset: int, fuse: bool = True):
    """torch.onnx.export of the decomposed program, optimized and (with `fuse`) rewritten into ORT
    contrib ops; returns (ONNXProgram, notes for the report: "onnx_optimizer", "ort_fusions")."""
    dynamic = None
    if any(program.dynamic_shapes or []):
        # named axes ("batch", "seq") instead of the exporter's s0, s1
        dynamic = tuple(dict(d) if d else None for d in program.dynamic_shapes)
    tensor_names = [n for n, x in zip(program.input_names, program.example_inputs) if isinstance(x, torch.Tensor)]
    try:
        with _quiet_exporter():
            onnx_program = torch.onnx.export(
                ep,
                (),
                dynamo=True,
                opset_version=opset,
                input_names=tensor_names,
                output_names=_output_names(program),
                dynamic_shapes=dynamic,
                custom_translation_table=lowerings_for(TARGET),
                optimize=False,
                verbose=False,
            )
    except Exception as e:  # noqa: BLE001
        raise _export_error(e, ep) from None
    notes = {}
    try:  # the same optimizer optimize=True runs, separately so a failure in it is not fatal
        with _quiet_exporter():
            onnx_program.optimize()
    except Exception as e:  # noqa: BLE001
        notes["onnx_optimizer"] = f"skipped: {_first_line(e)}"
    if fuse and "onnx_optimizer" not in notes:  # the fusions match the optimizer's canonical graph
        try:
            notes["ort_fusions"] = fuse_for_onnxruntime(onnx_program.model)
        except Exception as e:  # noqa: BLE001 - a fusion is an optimization, never a reason to fail
            # the graph may be half rewritten (e.g. fused attention without its bias fix): start over
            onnx_program, notes = _export(ep, program, opset, fuse=False)
            notes["ort_fusions"] = f"skipped: {_first_line(e)}"
    onnx_program.model.ir_version = min(onnx_program.model.ir_version, MAX_IR_VERSION)
    return onnx_program, notes


# onnxscript's ORT fusions (onnxscript.rewriter.ort_fusions), in the order its `fuse_xformers`
# applies them, limited to what ORT 1.19's CPU kernels run. Left out: GroupQueryAttention and
# RotaryEmbedding/cos-sin caches (the fused forms follow newer ORT releases' op definitions), and
# the RMS-norm fusions (not yet checked against ORT 1.19's kernels).
ORT_FUSIONS = (
    "erf_gelu",
    "skip_layer_normalization",
    "sdpa",
    "mha1",
    "mha2",
    "mha_scale",
    "mha_bias",
    "attention",
    "gelu",
    "bias_gelu",
    "sdpa_via_mha",
)


def _fusion_rules() -> dict:
    from onnxscript.rewriter.ort_fusions import (
        attention,
        bias_gelu,
        erfgelu,
        gelu,
        mha_bias,
        mha_scale,
        sdpa,
        sdpa_via_mha,
        skip_normalization,
    )

    return {
        "erf_gelu": erfgelu.fuse_erfgelu,
        "skip_layer_normalization": skip_normalization.fuse_skip_layer_normalization,
        "sdpa": functools.partial(sdpa.fuse_sdpa, apply_shape_inference=True),  # new nodes need shapes
        "mha1": _mha_fusion(has_past_present=True),
        "mha2": _mha_fusion(has_past_present=False),
        "mha_scale": mha_scale.fuse_mha_scale,
        "mha_bias": mha_bias.fuse_mha_bias,
        "attention": attention.fuse_attention,
        "gelu": gelu.fuse_gelu,
        "bias_gelu": bias_gelu.fuse_bias_gelu,
        "sdpa_via_mha": sdpa_via_mha.replace_sdpa_by_mha,
    }


def _mha_fusion(has_past_present: bool):
    """onnxscript's MultiHeadAttention fusion (`mha.fuse_mha1`/`fuse_mha2`), refusing a match whose
    closing Reshape is not to (B, S, D).

    Why: GPT-2's Conv1D flattens the merged heads straight to (B*S, D) for a Gemm; the exporter
    folds both reshapes into one, onnxscript's check does not look at that Reshape's target, and
    the fused node's (B, S, D) output then reaches the 2-D-only Gemm (ORT refuses the model)."""
    from onnxscript.rewriter import _fusion_utils, pattern
    from onnxscript.rewriter.ort_fusions import mha

    class MultiHeadAttentionTo3D(mha.MultiHeadAttention):
        def check(self, context, attention_reshaped=None, **bindings):
            result = super().check(context, attention_reshaped=attention_reshaped, **bindings)
            shape = attention_reshaped.shape if attention_reshaped is not None else None
            if result and (shape is None or shape.rank() != 3):
                return pattern.MatchResult().fail("attention output is not reshaped to (B, S, D)", attention_reshaped)
            return result

    rules = [
        MultiHeadAttentionTo3D.rule(
            f"MHA{'_Rotary' if rotary else ''}{'_Past' if has_past_present else ''}"
            f"{'_CrossAttention' if cross else ''}",
            is_rotary=rotary,
            has_past_present=has_past_present,
            is_cross_attention=cross,
        )
        for rotary in (False, True)
        for cross in ((False,) if has_past_present else (False, True))
    ]
    return _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet(rules))


def fuse_for_onnxruntime(model) -> dict[str, int]:
    """Rewrite transformer subgraphs of an exported `onnx_ir.Model` into ORT contrib ops, in place;
    returns how often each fusion of `ORT_FUSIONS` fired (only those that did).

    Why: ORT's load-time optimizer fuses attention only in the TorchScript exporter's old BERT
    pattern, so the dynamo export runs attention as separate MatMul/Softmax/Transpose kernels and
    every linear as MatMul + Add. The fused ops run each attention as one kernel with one packed
    QKV GEMM, and fold biases into the LayerNorm/GELU kernels."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import shape_optimization
    from onnxscript.rewriter.rules.common import gemm_to_matmul_add_rule

    with _quiet_exporter():
        # torchlib writes a linear on 3-D input as Reshape -> Gemm -> Reshape; the fusions match the
        # MatMul + Add form (and ORT turns a 2-D MatMul + Add back into Gemm on load)
        rewrite(model, [gemm_to_matmul_add_rule])
        # the fusions check shapes: infer them, and fold the exporter's shape arithmetic first
        common_passes.ShapeInferencePass()(model)
        shape_optimization.rules.apply_to_model(model)
        optimize(model)
        rules = _fusion_rules()
        counts = {name: rules[name](model) for name in ORT_FUSIONS}
        optimize(model)  # inlines the fusions' intermediate functions that no later fusion took
    counts["attention_bias_per_head"] = _attention_bias_per_head(model)
    return {name: n for name, n in counts.items() if n}


_BIAS_INPUT = {"Attention": 5, "MultiHeadAttention": 5}  # the attention bias ("relative_position_bias")


def _attention_bias_per_head(model) -> int:
    """Broadcast every attention bias of a fused Attention/MultiHeadAttention node to one row per
    head; returns how many nodes needed it.

    Why: the fusions pass a (B, 1, S, L) additive mask through as the attention bias, which newer
    ORT releases broadcast over heads; ORT 1.19's CPU kernels refuse it at run time ("dimension 1
    should be same as number of heads"). One Expand per distinct bias, shared by the layers."""
    import numpy as np
    import onnx_ir as ir

    expanded: dict[int, ir.Value] = {}
    count = 0
    for node in list(model.graph):
        index = _BIAS_INPUT.get(node.op_type)
        if node.domain != "com.microsoft" or index is None or len(node.inputs) <= index:
            continue
        bias = node.inputs[index]
        heads = node.attributes.get_int("num_heads", 0)
        if bias is None or not heads:
            continue
        shape = bias.shape
        if shape is not None and len(shape) == 4 and shape[1] == heads:
            continue
        if id(bias) not in expanded:
            repeat = ir.Value(name=f"{bias.name}_heads", const_value=ir.tensor(np.array([1, heads, 1, 1], np.int64)))
            model.graph.register_initializer(repeat)
            expand = ir.node("Expand", [bias, repeat], name=f"{bias.name}_per_head")
            producer = bias.producer()
            if producer is not None and producer.graph is model.graph:
                model.graph.insert_after(producer, expand)
            else:  # a graph input or initializer
                model.graph.insert_before(node, expand)
            expanded[id(bias)] = expand.outputs[0]
        node.replace_input_with(index, expanded[id(bias)])
        count += 1
    return count


def _output_names(program) -> list[str] | None:
    spec = getattr(program.gm, "_out_spec", None)
    if spec is None:
        return None
    n = spec.num_leaves
    label = str(program.meta.get("output") or "")
    if n == 1:
        return [label if label.isidentifier() and label != "tensor" else "output"]
    return [f"output_{i}" for i in range(n)]


_NODE_IN_ERROR = re.compile(r"translating node %(\w+) : .*?target=([\w.:]+)")


def _export_error(e: BaseException, ep) -> TargetError:
    """A one-line TargetError naming the node the exporter failed on, its module path and cause."""
    chain, seen = [], e
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    where = ""
    for exc in chain:
        m = _NODE_IN_ERROR.search(str(exc))
        if m:
            node = next((n for n in ep.graph.nodes if n.name == m.group(1)), None)
            path = _module_path(node) if node is not None else ""
            op = op_label(node.target) if node is not None else m.group(2)
            where = f" at {op} in {path or '<top>'} [{m.group(1)}]"
            break
    cause = chain[-1]
    return TargetError(
        f"target onnxruntime: ONNX export failed{where}: {_first_line(cause)}",
        "register an onnxruntime lowering or a decomposition for the op, or use another target",
    )


def _session(path: str, optimized_path: str | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(1, torch.get_num_threads())  # as many threads as torch uses
    options.log_severity_level = 3  # ORT warns on every save of an ENABLE_ALL graph; errors still show
    if optimized_path:
        options.optimized_model_filepath = optimized_path
        if os.path.exists(path + ".data"):  # a > 2 GB model: the optimized copy needs external data too
            options.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", os.path.basename(optimized_path) + ".data"
            )
    try:
        return ort.InferenceSession(path, options, providers=providers())
    except Exception as e:  # noqa: BLE001 - e.g. NOT_IMPLEMENTED: no kernel for an op at this opset
        message = _ort_message(e)
        raise TargetError(
            f"target onnxruntime: ONNX Runtime cannot load {os.path.basename(path)}: {message}"
            f"{_onnx_origins(path, message)}",
            "ONNX Runtime has no kernel for that op: register an onnxruntime lowering for it or use another target",
        ) from None


register_target(TARGET, OnnxRuntimeTarget)


# =====================================================================================================
# Training on onnxruntime-training
# =====================================================================================================
# Training: `OrtTrainer(program)` runs forward + loss + backward + AdamW in ONNX Runtime.
#
# How the artifacts are made from a Program (all in `OrtTrainer.__init__`, after `check_trainable`):
# 1. The program's graph and the loss are wrapped in one module, `(*inputs, labels, loss_scale) ->
#    loss * loss_scale` (`_LossModule`, the loss is `training_loss`), and exported with torch.export
#    with the program's dynamic dims (labels share the token input's dims).
# 2. ALL of optpipe's decompositions (native ORT lowerings are inference kernels without gradients)
#    and `_TRAINING_DECOMPOSITIONS` (split/chunk/unbind -> slice/select: torchlib writes them as
#    SplitToSequence/SequenceAt; elu/softplus -> Exp/Log/Where: ORT 1.19 has no Elu/Softplus
#    gradient), only when the graph uses one of them (a retrace costs seconds); then
#    `torch.onnx.export(dynamo=True)` (which applies its own decompositions) WITHOUT the onnxscript
#    optimizer (it folds transposed weights into new, unnamed initializers, and ORT would then train
#    copies) and without the contrib-op fusions.
# 3. `_make_differentiable`: CastLike -> Cast (ORT 1.19 has no CastLike gradient) and
#    LayerNormalization with its Mean/InvStdDev outputs present (its gradient reads them).
# 4. `onnxruntime.training.artifacts.generate_artifacts(loss=None)` (the graph already ends in the
#    loss) with AdamW, then the optimizer graph's `AdamWOptimizer` is switched to `adam_mode=0`:
#    ORT's kernel in that mode is torch.optim.AdamW's update (decoupled decay `p -= lr*wd*p` first,
#    bias correction on m and v separately, eps added to sqrt(v / (1 - beta2^t))). The stock onnxblock
#    AdamW uses mode 1 (Hugging Face's: eps added before the bias correction, decay applied after the
#    update), which drifts from torch. Remaining difference: ORT computes the bias corrections in
#    float32 (torch in float64), a relative 1e-7 per step.
# 5. `onnxruntime.training.api`: CheckpointState + Module (train and eval graphs) + Optimizer.
#
# `check_trainable` runs first (and `OrtTrainer` runs it): fp32 parameters, optpipe ops with a
# decomposition, then steps 1-2 (kept for the trainer) and every node of the result checked against
# the exporter's registry and against `_NO_ORT_GRADIENT` (ATen ops whose ONNX form ORT 1.19 cannot
# differentiate, measured), the latter only where a parameter's gradient flows. Whatever still fails
# in ORT's gradient builder comes back as one line naming the ONNX op and the FX node it came from.
#
# Parameter names: the exporter names each initializer `model.<program.gm parameter name>`; a tied
# group (GPT-2's wte/lm_head) is ONE initializer, so it stays tied in ORT, and `state_dict()` reports it
# under every name of the group. A group is trainable when any of its names is in `trainable`.
# Buffers are constants of the graph; parameters not in `trainable` are frozen in the checkpoint.
#
# Gradient accumulation: `accumulate(inputs, labels, scale)` runs forward + backward and adds
# `scale * d(loss)/d(param)` to the gradient buffers (ORT sums them); `optimizer_step(lr)` applies
# AdamW once and clears them. For k micro-batches whose mean loss should drive the step, pass
# `scale=1/k` (the same as torch's `(loss / k).backward()`); the returned loss is always unscaled.
# `step(inputs, labels, lr)` is `accumulate(..., scale=1) + optimizer_step(lr)`.
#
# Limits: fp32 trainable parameters only (ORT's AdamW kernel); the graph trains in the mode it was
# captured in (eval: no dropout); the loss is computed at the shapes given, with dynamic batch/seq
# where the program has them.

OBJECTIVES = ("clm", "mlm")
IGNORE_INDEX = -100
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


class _LossModule(torch.nn.Module):
    """`(*program inputs, labels, loss_scale) -> training_loss * loss_scale`: what is exported."""

    def __init__(self, gm, objective: str):
        super().__init__()
        setattr(self, _MODEL_ATTR, gm)
        self.objective = objective

    def forward(self, *args):
        *inputs, labels, loss_scale = args
        logits = getattr(self, _MODEL_ATTR)(*inputs)
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


_TRAINING_DECOMPOSITIONS = {
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
        labels, scale = inputs[self.token].clone(), torch.tensor(1.0)
        dynamic = list(program.dynamic_shapes or [None] * len(inputs))
        names = list(program.input_names) + ["labels", "loss_scale"]
        try:
            ep, kept = export_module(
                _LossModule(program.gm, objective),
                inputs + (labels, scale),
                names,
                dynamic + [dynamic[self.token], None],
                strict_dims=True,
            )
        except Exception as e:  # noqa: BLE001
            raise TargetError(
                f"target onnxruntime: torch.export of the program with its {objective} loss failed: {_first_line(e)}",
                "train on cpu/cuda, or drop the last pass",
            ) from None
        # the exporter's own decompositions run inside torch.onnx.export; these are the ones it lacks
        table = {**_TRAINING_DECOMPOSITIONS, **decompositions()}
        self.ep = ep
        try:
            if any(n.op == "call_function" and n.target in table for n in ep.graph.nodes):  # a retrace: seconds
                with fx_config.patch(backed_size_oblivious=True), _quiet_exporter():
                    self.ep = ep.run_decompositions(table)
        except Exception as e:  # noqa: BLE001
            raise TargetError(
                f"target onnxruntime: decomposition for training failed: {_first_line(e)}",
                "an optpipe op's decomposition does not trace; check the op that introduced it",
            ) from None
        tensors = [(n, d) for n, x, d in zip(names, inputs + (labels, scale), kept) if isinstance(x, torch.Tensor)]
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
                found.setdefault(label, UnsupportedNode(node.name, label, _module_path(node), introduced_by(node)))
        registry = onnx_registry(opset)
        if registry is None:
            return list(found.values())
        from torch.onnx._internal.exporter import _dispatching

        onnx_table = _onnx_decomposition_table(registry)
        for node in self.ep.graph.nodes:
            if node.op != "call_function" or getattr(node.target, "namespace", None) == "onnx":
                continue
            label = op_label(node.target)
            if label.startswith(_DROPPED) or node.target in onnx_table or _composite(node.target):
                continue  # dropped by the exporter, or decomposed by it into ops it has
            try:
                fn, _ = _dispatching.dispatch(node, registry)
            except Exception:  # noqa: BLE001 - the exporter would fail on this node too
                fn = None
            if fn is None:
                origin = node.meta.get("original_aten") or node.target
                found.setdefault(
                    op_label(origin),
                    UnsupportedNode(node.name, op_label(origin), _module_path(node), introduced_by(node)),
                )
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
    key = (id(program.gm), program.gm.code, objective, _native_key())
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
    OnnxRuntimeTarget().available()
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
        UnsupportedNode(n.name, op_label(n.target), _module_path(n), introduced_by(n))
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
    return counts


def _blocking_ops(model, params: list[str], extra: tuple = ()) -> str:
    """' (ops: X from module [node], ...)' for the ops without an ORT gradient that lie on a path from
    `params` to the loss; '' when none is found."""
    import ast

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
                scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes")
                try:
                    names = ast.literal_eval(scopes) if scopes else []
                except (ValueError, SyntaxError):
                    names = []
                origin = f" from {names[-2] or '<top>'} [{names[-1]}]" if len(names) >= 2 else ""
                where.append(f"{node.op_type}{origin}")
    if not where:
        return ""
    unique = list(dict.fromkeys(where))
    more = f" and {len(unique) - 3} more" if len(unique) > 3 else ""
    return f" (ONNX ops without a gradient: {', '.join(unique[:3])}{more})"


def _use_torch_adamw(path: str, betas, eps: float, weight_decay: float) -> None:
    """Set the optimizer graph's AdamWOptimizer to torch.optim.AdamW: adam_mode=0 (see the section
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
    `lr`, `betas`, `eps`, `weight_decay`: as torch.optim.AdamW (same update; see the section notes).
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
            with _quiet_exporter():
                onnx_program = torch.onnx.export(
                    exported.ep,
                    (),
                    dynamo=True,
                    opset_version=TRAIN_OPSET,
                    input_names=exported.input_names,
                    output_names=["loss"],
                    dynamic_shapes=exported.dynamic,
                    optimize=False,
                    verbose=False,
                )
        except Exception as e:  # noqa: BLE001
            raise _export_error(e, exported.ep) from None
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
            with _quiet_exporter(), _native_stderr(log):
                artifacts.generate_artifacts(
                    model,
                    requires_grad=requires_grad,
                    frozen_params=frozen,
                    loss=None,
                    optimizer=artifacts.OptimType.AdamW,
                    artifact_directory=self.workdir,
                )
        except Exception as e:  # noqa: BLE001 - the gradient builder's refusal: one line, with the op
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
            ) from None
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
        except Exception as e:  # noqa: BLE001
            message = _ort_message(e)
            raise TargetError(
                f"target onnxruntime: ONNX Runtime cannot load the training graph: {message}"
                f"{_onnx_origins(path('training_model.onnx'), message)}",
                "train on cpu/cuda",
            ) from None
        self.optimizer.set_learning_rate(self.lr)
        self.module.train()
        self.module.lazy_reset_grad()
        self._train_feeds = list(self.module.input_names())
        self.module.eval()
        self._eval_feeds = list(self.module.input_names())
        self.module.train()

    # -- training ---------------------------------------------------------------------------------
    def _feeds(self, order: list[str], inputs: tuple, labels: torch.Tensor, scale: float) -> list:
        import numpy as np

        inputs = tuple(inputs)
        if len(inputs) != len(self.input_names):
            raise UsageError(
                f"the program takes {len(self.input_names)} input(s) ({', '.join(self.input_names)}), got {len(inputs)}"
            )
        by_name = dict(zip(self.input_names, inputs))
        by_name["labels"] = labels
        by_name["loss_scale"] = torch.tensor(float(scale))
        feeds = []
        for name in order:
            x = by_name.get(name)
            if not isinstance(x, torch.Tensor):
                raise UsageError(f"onnxruntime training: input {name!r} must be a tensor")
            x = x.detach().cpu()
            if name == "labels":
                x = x.to(torch.int64)
            elif name == "loss_scale":
                x = x.to(torch.float32)
            feeds.append(np.ascontiguousarray(x.numpy()))
        return feeds

    def _run(self, inputs, labels, scale: float) -> float:
        try:
            out = self.module(
                *self._feeds(self._train_feeds if self.module.training else self._eval_feeds, inputs, labels, scale)
            )
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - shapes the graph rejects, a kernel failure
            raise TargetError(f"onnxruntime training failed to run: {_ort_message(e)}") from None
        loss = out[0] if isinstance(out, (list, tuple)) else out
        return float(loss.item() if hasattr(loss, "item") else loss) / float(scale)

    def accumulate(self, inputs: tuple, labels: torch.Tensor, scale: float = 1.0) -> float:
        """Forward + backward only: adds `scale * d(loss)/d(param)` to the gradient buffers (cleared
        by the next `optimizer_step`). Returns the (unscaled) loss. For k micro-batches averaged into
        one step pass `scale=1/k`."""
        if not scale:
            raise UsageError("accumulate: scale must be non-zero")
        self.module.train()
        return self._run(inputs, labels, scale)

    def optimizer_step(self, lr: float | None = None) -> None:
        """One AdamW update from the accumulated gradients, then clear them."""
        if lr is not None and float(lr) != self.lr:
            self.lr = float(lr)
            self.optimizer.set_learning_rate(self.lr)
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def step(self, inputs: tuple, labels: torch.Tensor, lr: float | None = None) -> float:
        """One optimizer step on one batch; returns the loss (before the update)."""
        loss = self.accumulate(inputs, labels)
        self.optimizer_step(lr)
        return loss

    def eval_loss(self, inputs: tuple, labels: torch.Tensor) -> float:
        """The loss on a batch, without gradients or updates."""
        self.module.eval()
        try:
            return self._run(inputs, labels, 1.0)
        finally:
            self.module.train()

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
