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
   Every `view` of a computed tensor then reads a contiguous copy (`views_as_reshapes`): the
   exporter re-traces with strides of its own (T5's view after a transpose would not trace).
3. `torch.onnx.export(ep, dynamo=True)` with an explicit opset (default 20; ORT 1.19 reads 18-21),
   `custom_translation_table=lowerings_for("onnxruntime")` (onnxscript functions, e.g. ORT contrib
   ops), named dynamic axes (batch/seq as captured) and the onnxscript graph optimizer. The IR
   version is clamped to 10 (ORT 1.19 rejects newer files); weights stay inside `model.onnx` unless
   they pass protobuf's 2 GB limit (then `model.onnx.data`).
4. Transformer fusions into ORT contrib ops (`fuse_for_onnxruntime` of
   targets/onnxruntime_fusions.py, the list is `ORT_FUSIONS`; `compile(..., fuse=False)` skips
   them): attention, skip layer norms and bias-GELUs rewritten into `com.microsoft` ops that ORT
   1.19's CPU kernels run, because its load-time optimizer only partly fuses the dynamo exporter's
   graph. Same fp32 math; the target check compares the result with the torch program as for any
   lowering.
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

Training on this target (`optpipe train --target onnxruntime`) lives in
targets/onnxruntime_training.py, imported when a trainer is asked for; what inference and training
share of the exporter and ORT (registry, quiet export, one-line errors) is targets/onnx_export.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref

import torch
import torch.utils._pytree as pytree

from optpipe.errors import TargetError, UsageError, first_line
from optpipe.graph_toolkit import module_path
from optpipe.ops import decompositions, is_optpipe_op, lowerings_for
from optpipe.pipeline import introduced_by
from optpipe.registry import register_target
from optpipe.target import Compiled, Target, UnsupportedNode, op_label, unsupported_nodes

from .onnx_export import (
    DEFAULT_OPSET,
    EXPORTER_DROPS,
    MAX_IR_VERSION,
    OPSETS,
    TARGET,
    export_error,
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
from .onnxruntime_fusions import fuse_for_onnxruntime

MODEL_FILE = "model.onnx"
OPTIMIZED_FILE = "model.optimized.onnx"


def providers() -> list[str]:
    """Execution providers to ask for: CUDA first when this process can use a GPU."""
    import onnxruntime as ort

    chosen = ["CPUExecutionProvider"]
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        chosen.insert(0, "CUDAExecutionProvider")
    return chosen


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
                f"onnxruntime rejected the inputs: {ort_message(e)}", f"the model takes: {self._expected()}"
            ) from None
        except Exception as e:  # a kernel failure: one line (the cause stays chained)
            raise TargetError(f"onnxruntime failed to run the model: {ort_message(e)}") from e
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


class OnnxRuntimeTarget(Target):
    name = TARGET
    artifact = MODEL_FILE

    def __init__(self):
        self._cache: tuple | None = None  # (weakref to program, key, decomposed ExportedProgram)

    def available(self) -> None:
        require_onnx_packages()

    # -- capability check -----------------------------------------------------------------------
    def check(self, program, opset: int = DEFAULT_OPSET, **options) -> list[UnsupportedNode]:
        """Every node the exporter cannot translate at `opset` after decomposition, before export."""
        opset = _check_opset(opset)
        registry = onnx_registry(opset)
        if registry is None:  # only optpipe ops can be judged; export errors still come as one line
            return unsupported_nodes(program, TARGET, lambda t: True)
        ep = self._decomposed(program, opset)
        failed: dict[str, torch.fx.Node] = {}  # op label in the program -> a failing decomposed node
        for node in ep.graph.nodes:
            if node.op != "call_function" or is_optpipe_op(node.target):
                continue  # optpipe ops: judged by unsupported_nodes below (lowering or decomposition)
            label = op_label(node.target)
            if label.startswith(EXPORTER_DROPS) or getattr(node.target, "namespace", None) == "onnx":
                continue  # checks the exporter drops; torch.ops.onnx.* become ONNX nodes as they are
            if not translates(node, registry):
                failed.setdefault(op_label(node.meta.get("original_aten") or node.target), node)
        found = unsupported_nodes(program, TARGET, lambda t: op_label(t) not in failed)
        named = {u.op for u in found}
        for label, node in failed.items():  # produced by a decomposition: name the decomposed node
            if label not in named:
                found.append(UnsupportedNode(node.name, op_label(node.target), module_path(node), introduced_by(node)))
        return found

    def _decomposed(self, program, opset: int):
        """program.export() + optpipe's and the exporter's decompositions: what check inspects.
        Kept for the compile that follows the check (optimize() calls them back to back)."""
        key = (program.gm.code, opset, native_lowerings_key())
        cached = self._cache
        if cached and cached[0]() is program and cached[1] == key:
            return cached[2]
        registry = onnx_registry(opset)
        table = onnx_decomposition_table(registry) if registry is not None else {}
        ep = _decompose(_reexport(program), table)
        self._cache = (weakref.ref(program), key, ep)
        return ep

    def _exportable(self, program, opset: int):
        """The ExportedProgram to hand the exporter: the checked one when check just ran on this
        program, else a fresh export with optpipe's decompositions (the exporter runs its own)."""
        cached, self._cache = self._cache, None
        if cached and cached[0]() is program and cached[1] == (program.gm.code, opset, native_lowerings_key()):
            return cached[2]
        ep = _reexport(program)
        table = decompositions(exclude=lowerings_for(TARGET))
        return _decompose(ep, table) if table and _uses_any(program, table) else views_as_reshapes(ep)

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

    # -- training: targets/onnxruntime_training.py (imported when asked for) ----------------------
    def check_trainable(self, program, objective: str) -> None:
        from .onnxruntime_training import check_trainable

        check_trainable(program, objective)

    def trainer(self, program, **hyper):
        from .onnxruntime_training import OrtTrainer

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


def _reexport(program):
    try:
        return program.export()
    except Exception as e:  # a graph torch.export rejects: one line
        raise TargetError(
            f"target onnxruntime: torch.export could not re-export the program: {first_line(e)}",
            "run the program on the cpu target, or drop the last pass",
        ) from e


def _decompose(ep, table: dict):
    """optpipe's decompositions (minus natively lowered ops) on top of `table`, in one retrace."""
    from torch.fx.experimental import _config as fx_config

    table = {**table, **decompositions(exclude=lowerings_for(TARGET))}
    try:
        # the exporter decomposes under the same flag (size-0/1 dims stay dynamic)
        with fx_config.patch(backed_size_oblivious=True), quiet_exporter():
            ep = ep.run_decompositions(table)
    except Exception as e:
        raise TargetError(
            f"target onnxruntime: decomposition failed: {first_line(e)}",
            "an optpipe op's decomposition does not trace; check the op that introduced it",
        ) from e
    return views_as_reshapes(ep)


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


def _axis_names(ep, program) -> tuple:
    """Named axes ("batch", "seq") instead of the exporter's s0, s1: one name per symbol of the
    graph, so dims that torch.export proved equal share a name and dims it did not get their own
    (T5's decoder_input_ids "seq" is another length than input_ids': "decoder_input_ids.seq")."""
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"][-len(program.example_inputs) :]
    by_symbol: dict[str, str] = {}
    taken: set[str] = set()
    named = []
    for node, input_name, spec in zip(placeholders, program.input_names, program.dynamic_shapes):
        val = node.meta.get("val")
        if not spec or not isinstance(val, torch.Tensor):
            named.append(None)
            continue
        axes = {}
        for dim, name in spec.items():
            symbol = str(val.shape[dim])
            if symbol not in by_symbol:
                by_symbol[symbol] = name if name not in taken else f"{input_name}.{name}"
                taken.add(by_symbol[symbol])
            axes[dim] = by_symbol[symbol]
        named.append(axes)
    return tuple(named)


def _export(ep, program, opset: int, fuse: bool = True):
    """torch.onnx.export of the decomposed program, optimized and (with `fuse`) rewritten into ORT
    contrib ops; returns (ONNXProgram, notes for the report: "onnx_optimizer", "ort_fusions")."""
    dynamic = _axis_names(ep, program) if any(program.dynamic_shapes or []) else None
    tensor_names = [n for n, x in zip(program.input_names, program.example_inputs) if isinstance(x, torch.Tensor)]
    try:
        with quiet_exporter():
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
    except Exception as e:
        raise export_error(e, ep) from e
    notes = {}
    try:  # the same optimizer optimize=True runs, separately so a failure in it is not fatal
        with quiet_exporter():
            onnx_program.optimize()
    except Exception as e:  # noqa: BLE001
        notes["onnx_optimizer"] = f"skipped: {first_line(e)}"
    if fuse and "onnx_optimizer" not in notes:  # the fusions match the optimizer's canonical graph
        try:
            notes["ort_fusions"] = fuse_for_onnxruntime(onnx_program.model)
        except Exception as e:  # noqa: BLE001 - a fusion is an optimization, never a reason to fail
            # the graph may be half rewritten (e.g. fused attention without its bias fix): start over
            onnx_program, notes = _export(ep, program, opset, fuse=False)
            notes["ort_fusions"] = f"skipped: {first_line(e)}"
    onnx_program.model.ir_version = min(onnx_program.model.ir_version, MAX_IR_VERSION)
    return onnx_program, notes


def _output_names(program) -> list[str] | None:
    spec = getattr(program.gm, "_out_spec", None)
    if spec is None:
        return None
    n = spec.num_leaves
    label = str(program.meta.get("output") or "")
    if n == 1:
        return [label if label.isidentifier() and label != "tensor" else "output"]
    return [f"output_{i}" for i in range(n)]


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
    except Exception as e:  # e.g. NOT_IMPLEMENTED: no kernel for an op at this opset
        message = ort_message(e)
        raise TargetError(
            f"target onnxruntime: ONNX Runtime cannot load {os.path.basename(path)}: {message}"
            f"{onnx_origins(path, message)}",
            "ONNX Runtime has no kernel for that op: register an onnxruntime lowering for it or use another target",
        ) from e


register_target(TARGET, OnnxRuntimeTarget)
