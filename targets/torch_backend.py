"""Targets `cpu` and `cuda`: the program runs in PyTorch, eagerly or through torch.compile.

By default (`mode=auto`) both are measured and the faster one is chosen; the report says which and
why. They are measured on the work the artifact will do: a plain program on its example inputs, a
step program (kv-cache) on decode steps (one token per call over a growing cache, after a prefill of
the example prompt), with its prefill and decode graphs compiled beforehand (`dynamic=True`, so a
longer cache does not recompile), eager and compiled steps timed alternately so that load on a shared
machine falls on both. A compiled step program is warmed up the same way when loaded, so generation
never pays for compilation. The deployable artifact is the saved program (program.pt2); the mode is
recorded in target.json so `optpipe run` compiles it the same way.

Both paths run the program's graph as a plain GraphModule (`runtime_module`): a program loaded from
program.pt2 is torch.export's unlifted module, whose forward hooks re-check the inputs' tree
structure in Python on every call, outside the graph torch.compile captures: on the tiny GPT's
decode step, 748 Python calls per token instead of 351, and a compiled step program saved and
loaded spent 10-20% more CPU per token than the same program compiled in memory, which is the one
`auto` had timed.

The cuda path moves weights and inputs to the GPU and rewrites device constants that export baked
into the graph (`arange(..., device=cpu)` and the like).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

from optpipe.errors import UsageError
from optpipe.kv_step import decode_step_seconds, interleaved_decode_seconds
from optpipe.registry import register_target
from optpipe.target import Compiled, Target

MODES = ("auto", "eager", "compile")


def retarget_device(gm: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """Move weights to `device` and rewrite `device=` constants baked into the graph."""
    gm = gm.to(device)
    changed = False
    for node in gm.graph.nodes:
        dev = node.kwargs.get("device")
        if isinstance(dev, torch.device) and dev.type != device.type:
            node.update_kwarg("device", device)
            changed = True
    if changed:
        gm.recompile()
    return gm


def runtime_module(program) -> torch.fx.GraphModule:
    """The program's graph as a plain GraphModule sharing its weights, without torch.export's call
    hooks: `ep.module()` (every program loaded from an archive) checks each call's input tree spec
    and toggles module-input bookkeeping in Python forward hooks, which torch.compile does not
    capture (it compiles the inner `forward`) and which a decode step would pay once per token.
    Inputs are checked at the door (`optpipe.inputs`); the graph's own shape guards stay in it."""
    return program.copy().gm


def _time_ms(fn, inputs, iters: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(iters):
            start = time.perf_counter()
            fn(*inputs)
            if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].is_cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _warm_up(fn, program, inputs: tuple) -> None:
    """One call on the example inputs; a step program (kv-cache) gets a prefill and decode steps
    instead, from fresh caches (its example caches stay as they are), which compiles both graphs."""
    kv = program.meta.get("kv_cache")
    if kv:
        decode_step_seconds(fn, kv, inputs[0], steps=0)
    else:
        with torch.no_grad():
            fn(*inputs)


def _decode_ms(eager, compiled, program, inputs: tuple, steps: int = 16) -> tuple[float, float]:
    """ms of a decode step, eager and compiled, after a prefill of the example prompt (the shapes
    generation uses), the two timed alternately step by step. The least disturbed step of each
    counts: other processes only ever add time, and on a busy machine a median still swings by
    more than the 10% that separates the modes on a mid-sized model."""
    times = interleaved_decode_seconds(
        {"eager": eager, "compile": compiled}, program.meta["kv_cache"], inputs[0], steps=steps
    )
    return min(times["eager"]) * 1000, min(times["compile"]) * 1000


class TorchTarget(Target):
    name = "cpu"
    device_type = "cpu"

    def device(self) -> torch.device:
        return torch.device(self.device_type)

    def check_trainable(self, program, objective: str) -> None:
        """Every program trains in torch (optpipe ops carry autograd); optpipe.runtime.training runs it."""

    def prepare_inputs(self, inputs: tuple) -> tuple:
        dev = self.device()
        return tuple(x.to(dev) if isinstance(x, torch.Tensor) else x for x in inputs)

    def companion_options(self, options: dict) -> dict:
        """Companions run eager: an encoder runs once per prompt, so compiling it never pays."""
        return {**options, "mode": "eager"}

    def _module(self, program):
        gm = runtime_module(program)
        return retarget_device(gm, self.device()) if self.device_type != "cpu" else gm

    def compile(self, program, mode: str = "auto", iters: int = 5, **options) -> Compiled:
        """`options` meant for other targets (e.g. tvm's `tune`) are ignored."""
        if mode not in MODES:
            raise UsageError(f"target {self.name}: unknown mode {mode!r}", f"modes: {', '.join(MODES)}")
        gm = self._module(program)
        inputs = self.prepare_inputs(program.example_inputs)
        info: dict = {"device": self.device_type, "mode": mode}
        if mode == "eager":
            return Compiled(gm, info)
        dynamic = any(program.dynamic_shapes or [])
        start = time.perf_counter()
        try:
            compiled = torch.compile(gm, dynamic=dynamic or None)
            _warm_up(compiled, program, inputs)  # compile now, not on the user's first call
        except Exception as e:  # noqa: BLE001 - no C compiler, unsupported op, ...: eager still works
            if mode == "compile":
                raise UsageError(
                    f"target {self.name}: torch.compile failed: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}",
                    "use --mode eager",
                ) from None
            info.update(mode="eager", reason=f"torch.compile failed ({type(e).__name__})")
            return Compiled(gm, info)
        info["compile_s"] = round(time.perf_counter() - start, 2)
        if mode == "compile":
            return Compiled(compiled, info)
        if program.meta.get("kv_cache"):  # judged on the work generation does: decode steps
            eager_ms, compiled_ms = _decode_ms(gm, compiled, program, inputs)
            workload = "on decode steps (one token per call over a growing cache)"
        else:
            eager_ms, compiled_ms = _time_ms(gm, inputs, iters), _time_ms(compiled, inputs, iters)
            workload = "on the example inputs"
        faster = "compile" if compiled_ms < eager_ms else "eager"
        info.update(
            mode=faster,
            eager_ms=round(eager_ms, 3),
            compile_ms=round(compiled_ms, 3),
            reason=f"{faster} was faster {workload} (eager {eager_ms:.2f} ms, torch.compile {compiled_ms:.2f} ms)",
        )
        return Compiled(compiled if faster == "compile" else gm, info)

    def save(self, compiled: Compiled, out_dir: str) -> None:
        pass  # the artifact is program.pt2; the mode lives in target.json

    def load(self, out_dir: str, program) -> Compiled:
        mode = "eager"
        path = os.path.join(out_dir, "target.json")
        if os.path.isfile(path):
            with open(path) as f:
                mode = (json.load(f).get("info") or {}).get("mode", "eager")
        gm = self._module(program)
        if mode == "compile":
            compiled = torch.compile(gm, dynamic=any(program.dynamic_shapes or []) or None)
            if program.meta.get("kv_cache"):  # compile prefill and decode graphs now, not while generating
                _warm_up(compiled, program, self.prepare_inputs(program.example_inputs))
            return Compiled(compiled, {"device": self.device_type, "mode": mode})
        return Compiled(gm, {"device": self.device_type, "mode": "eager"})


class CudaTarget(TorchTarget):
    name = "cuda"
    device_type = "cuda"

    def available(self) -> None:
        if not torch.cuda.is_available():
            raise UsageError(
                "target cuda: no CUDA device here (torch.cuda.is_available() is False)",
                "use --target cpu, or install a CUDA build of torch on a GPU machine",
            )


register_target("cpu", TorchTarget)
register_target("cuda", CudaTarget)
