"""torch.onnx's dynamo exporter and ONNX Runtime as the `onnxruntime` target uses them, for inference
(targets/onnxruntime_backend.py) and for training (targets/onnxruntime_training.py) alike.

What both need: the packages (`require_onnx_packages`), the opsets and IR version ORT 1.19 reads,
the exporter's own ATen -> ONNX registry and decompositions (`onnx_registry`,
`onnx_decomposition_table`) and its per-node translation check (`translates`), the exporter kept
quiet (`quiet_exporter`), and failures as one line naming where they came from: an exporter error
names the FX node (`export_error`), an ORT error its op and the modules of that op's ONNX nodes
(`ort_message`, `onnx_origins`, from the scopes the exporter records: `name_scopes`).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import logging
import re
import warnings

from optpipe.errors import TargetError, UsageError, first_line
from optpipe.graph_toolkit import module_path
from optpipe.ops import lowerings_for
from optpipe.target import op_label

TARGET = "onnxruntime"  # the target's name, and the key its native lowerings are registered under
DEFAULT_OPSET = 20
OPSETS = range(18, 22)  # torchlib is written at 18; ORT 1.19 reads up to 21
MAX_IR_VERSION = 10  # ORT 1.19 cannot read IR version 11 (what onnx >= 1.18 writes)

EXPORTER_DROPS = ("aten._assert", "aten.sym_constrain_range")
"""Op labels the exporter drops before translating (runtime shape checks): they need no ONNX op."""


def require_onnx_packages() -> None:
    """UsageError unless onnx, onnxscript and onnxruntime are importable."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UsageError(
            f"target onnxruntime needs {e.name}, which is not installed",
            "pip install onnx onnxscript onnxruntime-training",
        ) from None


def native_lowerings_key() -> tuple:
    """The ops lowered natively on onnxruntime, as a cache key: registering one changes what a
    decomposed program looks like."""
    return tuple(sorted(map(str, lowerings_for(TARGET))))


@functools.cache
def onnx_registry(opset: int):
    """The exporter's ATen -> ONNX registry (torchlib) at `opset`, or None if torch moved it."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:  # a torch without the dynamo exporter internals: export errors still apply
        return None
    with quiet_exporter():
        return _registration.ONNXRegistry.from_torchlib(opset_version=opset)


def onnx_decomposition_table(registry) -> dict:
    """What the exporter decomposes before translating: every torch decomposition of an op that
    has no ONNX function of its own."""
    from torch.onnx._internal.exporter import _decomp

    return _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))


def translates(node, registry) -> bool:
    """Whether the exporter finds an ONNX function for `node` in `registry`, as it will on export."""
    from torch.onnx._internal.exporter import _dispatching

    try:
        fn, _ = _dispatching.dispatch(node, registry)
    except Exception:  # noqa: BLE001 - the exporter would fail on this node too
        return False
    return fn is not None


@contextlib.contextmanager
def quiet_exporter():
    """The exporter logs through `logging` (e.g. 'torchvision is not installed') and warns through
    `warnings`; neither belongs on a user's terminal (nor on `--json`'s stdout)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]  # onnx_ir: its
    levels = [logger.level for logger in loggers]  # "Attribute type is ambiguous" on an empty list attribute
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


_NODE_IN_ERROR = re.compile(r"translating node %(\w+) : .*?target=([\w.:]+)")


def export_error(e: BaseException, ep) -> TargetError:
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
            path = module_path(node) if node is not None else ""
            op = op_label(node.target) if node is not None else m.group(2)
            where = f" at {op} in {path or '<top>'} [{m.group(1)}]"
            break
    cause = chain[-1]
    return TargetError(
        f"target onnxruntime: ONNX export failed{where}: {first_line(cause)}",
        "register an onnxruntime lowering or a decomposition for the op, or use another target",
    )


def ort_message(e: BaseException) -> str:
    """The part of an ONNX Runtime error worth a user's line."""
    # "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions ..." -> the last part
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return re.sub(r"^Load model from \S+ failed: ?", "", text)


def name_scopes(onnx_node) -> list[str]:
    """The module scopes the exporter recorded on an ONNX node (a NodeProto), outermost first, the
    FX node's name last; [] when it recorded none."""
    scopes = {p.key: p.value for p in onnx_node.metadata_props}.get("pkg.torch.onnx.name_scopes")
    try:
        return ast.literal_eval(scopes) if scopes else []
    except (ValueError, SyntaxError):
        return []


# ORT names an op it has no kernel for as "com.microsoft:Foo(-1)" or "... for Foo(20) node with name"
_ORT_OP = re.compile(r"(?:([\w.]+):)?(\w+)\((-?\d+)\)")


def onnx_origins(path: str, message: str, limit: int = 3) -> str:
    """' (from module.path [fx node], ...)' for the ONNX nodes of the op an ORT error names."""
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
            names = name_scopes(node)
            if len(names) >= 2:
                where.append(f"{names[-2] or '<top>'} [{names[-1]}]")
    if not where:
        return ""
    more = f" and {len(where) - limit} more" if len(where) > limit else ""
    return f" (from {', '.join(where[:limit])}{more})"


def views_as_reshapes(ep, reshapes: bool = False):
    """`ep` with every `aten.view` (with `reshapes`, every `aten.reshape` too, which the exporter turns
    into a view when it re-traces an undecomposed graph: training's) of a computed tensor reading a
    contiguous copy (in place): what
    ONNX's Reshape is, and the copy is an Identity the optimizer drops.

    The exporter re-traces the program, and its strides need not be ours: an SDPA output that was
    laid out (batch, seq, heads, dim) at capture comes out contiguous (batch, heads, seq, dim)
    there, and the view after its transpose (T5's attention: `.transpose(1, 2).reshape(b, n, -1)`)
    no longer traces. With symbolic dims even `aten.reshape` decomposes into that view."""
    import torch

    aten, graph = torch.ops.aten, ep.graph
    kinds = (aten.view.default, aten.reshape.default) if reshapes else (aten.view.default,)
    views = [n for n in graph.nodes if n.op == "call_function" and n.target in kinds]
    for view in views:
        source = view.args[0]
        with graph.inserting_before(view):
            copy = graph.call_function(aten.clone.default, (source,), {"memory_format": torch.contiguous_format})
        copy.meta = {**view.meta, "val": source.meta["val"].clone(memory_format=torch.contiguous_format)}
        view.replace_input_with(source, copy)
    if views:
        ep.graph_module.recompile()
    return ep
