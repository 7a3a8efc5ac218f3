"""optpipe's own operators (`torch.ops.optpipe.*`) and how each target lowers them.

An op that a pass introduces is defined ONCE, here in the core's registry, from the pass family's
module: its eager implementation, its fake (meta) implementation, its autograd, and a
decomposition into standard ATen ops that every target can fall back on. A target with a better
native op registers a lowering for it (`register_lowering(op, "onnxruntime", fn)`), from the op's
module too, so adding an op never means editing a target module.

    op = define_op("scaled_gelu", scaled_gelu_impl, fake=scaled_gelu_fake,
                   decomposition=scaled_gelu_decomposition)
    register_lowering(op, "onnxruntime", onnxscript_function)
    defer_lowerings("onnxruntime", install)   # when the lowering needs the target's libraries

What a lowering is depends on the target: for "onnxruntime" an onnxscript function for the dynamo
exporter's `custom_translation_table` — written as `@onnxscript.script(opset, default_opset=...)`
WITH a return annotation (`-> TFloat`; without it the exporter emits a call with no outputs), which
is also the only way to reach ORT contrib ops such as `com.microsoft::Gelu`; for "tvm" an entry of
the Relax importer's custom convert map.

Targets ask `lowerings_for(target)` for native translations and `decompositions(exclude=...)` for
the rest, which they apply with `ExportedProgram.run_decompositions`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

NAMESPACE = "optpipe"


@dataclass
class OpDef:
    name: str
    op: Any  # the OpOverload torch.ops.optpipe.<name>.default
    decomposition: Callable | None
    lowerings: dict[str, Any] = field(default_factory=dict)
    flops: Callable | None = None
    exact_outputs: bool = True
    """False for ops whose output jumps by a rounding step under tiny input differences (dynamic
    activation quantization): targets are then checked by cosine/SQNR, not max-abs."""


_OPS: dict[str, OpDef] = {}
_DEFERRED: dict[str, list[Callable[[], None]]] = {}


def define_op(
    name: str,
    impl: Callable,
    *,
    fake: Callable,
    decomposition: Callable | None = None,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    flops: Callable | None = None,
    mutates_args=(),
    exact_outputs: bool = True,
) -> Any:
    """Define `torch.ops.optpipe.<name>` from a type-annotated `impl`; returns the OpOverload."""
    if name in _OPS:
        return _OPS[name].op
    custom = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)(impl)
    custom.register_fake(fake)
    if backward is not None:
        custom.register_autograd(backward, setup_context=setup_context)
    packet = getattr(getattr(torch.ops, NAMESPACE), name)
    overload = packet.default
    if flops is not None:
        from torch.utils.flop_counter import register_flop_formula

        register_flop_formula(packet)(flops)
    _OPS[name] = OpDef(name, overload, decomposition, flops=flops, exact_outputs=exact_outputs)
    return overload


def register_lowering(op, target: str, lowering: Any) -> None:
    """Register a target-native translation of an optpipe op (its meaning is the target's)."""
    opdef(op).lowerings[target] = lowering


def defer_lowerings(target: str, install: Callable[[], None]) -> None:
    """Run `install` (which calls `register_lowering(..., target, ...)`) the first time anything asks
    for `target`'s lowerings. A lowering may need the target's own libraries (onnxscript for
    onnxruntime), which `import optpipe` must not pay for."""
    _DEFERRED.setdefault(target, []).append(install)


def _install_deferred(target: str) -> None:
    for install in _DEFERRED.pop(target, []):
        install()


def opdef(op) -> OpDef:
    name = op if isinstance(op, str) else _op_name(op)
    if name not in _OPS:
        raise KeyError(f"{name} is not an optpipe op (known: {', '.join(sorted(_OPS)) or 'none'})")
    return _OPS[name]


def is_optpipe_op(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == NAMESPACE


def _op_name(op) -> str:
    if isinstance(op, torch._ops.OpOverload):
        return op._opname if op.namespace == NAMESPACE else str(op)
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op._qualified_op_name.split("::")[-1]
    return str(op)


def rounds_activations(gm) -> bool:
    """Whether `gm` calls an op declared with exact_outputs=False."""
    return any(
        n.op == "call_function"
        and is_optpipe_op(n.target)
        and _op_name(n.target) in _OPS
        and not _OPS[_op_name(n.target)].exact_outputs
        for n in gm.graph.nodes
    )


def all_ops() -> list[OpDef]:
    return list(_OPS.values())


def lowerings_for(target: str) -> dict:
    """{OpOverload: lowering} of the optpipe ops with a native lowering on `target`."""
    _install_deferred(target)
    return {d.op: d.lowerings[target] for d in _OPS.values() if target in d.lowerings}


def decompositions(exclude=()) -> dict:
    """Decomposition table of optpipe ops (minus `exclude`) for `ExportedProgram.run_decompositions`."""
    excluded = set(exclude)
    return {d.op: d.decomposition for d in _OPS.values() if d.decomposition is not None and d.op not in excluded}


def can_lower(target_name: str, op) -> bool:
    """An optpipe op lowers to a target natively or through its decomposition."""
    _install_deferred(target_name)
    d = _OPS.get(_op_name(op))
    return d is not None and (target_name in d.lowerings or d.decomposition is not None)
