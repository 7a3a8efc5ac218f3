"""`optimize`: capture → verified passes → target, with a report. The CLI's `optimize` and the
Python API both go through here.

    res = optpipe.optimize(model, (ids,), pipeline="fuse-attention,dce", target="cpu")
    res.save("OUT")
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from .analysis import model_bytes
from .errors import TargetError, UsageError
from .ops import rounds_activations
from .outdir import atomic_folder
from .pipeline import PassRecord, Pipeline
from .presets import load_recipe, preset_pipeline
from .program import Program
from .registry import get_hook, get_target
from .target import save_compiled, unsupported_hint
from .verify import Budget, compare, run_outputs, verification_inputs
from .version import __version__


@dataclass
class OptimizeResult:
    program: Program
    original: Program
    records: list[PassRecord]
    report: dict
    target: Any = None
    compiled: Any = None
    diffs: list = field(default_factory=list)

    def save(self, out: str, *, force: bool = False, dump_ir: str | None = None) -> str:
        """Write the OUT folder atomically: program.pt2, artifact, pipeline.txt, report.json/.html."""
        from .report import render_report_html

        with atomic_folder(out, force=force) as tmp:
            self.program.save(os.path.join(tmp, "program.pt2"))
            for name in dict.fromkeys(element.split("{", 1)[0] for element in self.program.history):
                save = get_hook(name, "save")  # e.g. partition's OUT/stages/ for the pipeline ranks
                if save is not None:
                    save(self.program, tmp)
            if self.target is not None and self.compiled is not None:
                save_compiled(self.target, self.compiled, tmp)
            with open(os.path.join(tmp, "pipeline.txt"), "w") as f:
                f.write(self.report["pipeline"] + "\n")
            with open(os.path.join(tmp, "target.json"), "w") as f:
                json.dump({"target": self.report["target"], "info": self.report.get("target_info", {})}, f, indent=2)
            with open(os.path.join(tmp, "report.json"), "w") as f:
                json.dump(self.report, f, indent=2, default=str)
            with open(os.path.join(tmp, "report.html"), "w") as f:
                f.write(render_report_html(self.report, self.diffs))
            tokenizer = os.path.join(self.program.meta.get("tokenizer") or "", "tokenizer.json")
            if self.program.meta.get("tokenizer") and os.path.isfile(tokenizer):
                shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.json"))  # `optpipe generate --prompt`
            if dump_ir and os.path.isdir(dump_ir):
                shutil.copytree(dump_ir, os.path.join(tmp, "ir"))
        return out


def resolve_pipeline(pipeline: str | None, preset: str | None, recipe: str | None) -> tuple[str, dict]:
    """The pipeline string from exactly one of --pipeline / --preset / --recipe (+ recipe extras)."""
    given = [x for x in (pipeline, preset, recipe) if x]
    if len(given) > 1:
        raise UsageError("give only one of --pipeline, --preset and --recipe", "they all choose the passes")
    if recipe:
        data = load_recipe(recipe)
        return data["pipeline"], data
    if preset:
        return preset_pipeline(preset), {}
    if pipeline is None:
        raise UsageError(
            "no passes given", "use --pipeline S, --preset NAME or --recipe FILE (e.g. --pipeline fuse-attention,dce)"
        )
    return pipeline, {}


def optimize(
    model_or_program,
    example_inputs=None,
    pipeline: str | Pipeline | None = None,
    *,
    target: str = "cpu",
    preset: str | None = None,
    recipe: str | None = None,
    verify: bool = True,
    budget: Budget | dict | None = None,
    instruments: Sequence = (),
    target_options: dict | None = None,
    diffs: bool = True,
    progress=None,
    calibration=None,
) -> OptimizeResult:
    """Capture (if needed), run the verified pipeline, compile for `target` and check parity.

    `model_or_program`: an nn.Module (with `example_inputs`), a Program, or a MODEL path/spec.
    `calibration`: input sets that calibrating passes (int8-static, wanda) measure activations on, or
    a function of the captured program returning them (`optpipe.optimize` turns a text/JSONL file
    into one, tokenized like `optpipe.runtime.data.calibration_batches`).
    """
    from .analysis import analyze

    step = progress or _NoProgress()
    pipe, budget = _pipeline_and_budget(pipeline, preset, recipe, budget, step)
    if recipe and target_options is None:
        target_options = resolve_pipeline(None, None, recipe)[1]["target_options"]
    tgt = get_target(target)
    tgt.available()  # fails fast on e.g. a missing GPU, before any work
    program = _with_calibration(_as_program(model_or_program, example_inputs, step), calibration, step)

    before_costs = analyze(program)
    with step(f"run {len(pipe)} pass(es)") as s:

        def on_pass(i, spec):
            s.update(f"pass {i + 1}/{len(pipe)}: {spec}")

        optimized, records = pipe.run(
            program, verify=verify, budget=budget, instruments=instruments, keep_before=diffs, on_pass=on_pass
        )
    after_costs = analyze(optimized)

    compiled, target_check = _compile_and_check(tgt, target, optimized, target_options or {}, step)
    pass_diffs = _pass_diffs(records, optimized) if diffs else []
    report = {
        "optpipe_version": __version__,
        "pipeline": str(pipe),
        "target": target,
        "model": _model_numbers(program, before_costs, after_costs, optimized),
        "capture": {
            "input_names": program.input_names,
            "inputs": [_describe(x) for x in program.example_inputs],
            "dynamic_shapes": program.dynamic_shapes,
        },
        "passes": [r.to_dict() for r in records],
        "target_info": compiled.info,
        "target_check": target_check,
    }
    return OptimizeResult(optimized, program, records, report, tgt, compiled, pass_diffs)


def _pipeline_and_budget(pipeline, preset, recipe, budget, step) -> tuple[Pipeline, Budget | None]:
    """The parsed pipeline (from a Pipeline, a string, a preset or a recipe) and the verification
    budget (the one given, else the recipe's)."""
    if isinstance(pipeline, Pipeline):
        pipe = pipeline
    else:
        text, extras = resolve_pipeline(pipeline, preset, recipe)
        if extras.get("budget") and budget is None:
            budget = extras["budget"]
        with step("parse pipeline"):
            pipe = Pipeline.parse(text)
    pipe.check_own_order()  # before loading the model; Pipeline.run checks again with its history
    if isinstance(budget, dict):
        budget = Budget(**{k: float(v) for k, v in budget.items()})
    return pipe, budget


def _with_calibration(program: Program, calibration, step) -> Program:
    """`program` with its calibration input sets attached (a copy), or itself when there are none."""
    if calibration is None:
        return program
    from .calibration import with_calibration

    if isinstance(calibration, (str, os.PathLike)):
        raise UsageError(
            f"calibration data {os.fspath(calibration)!r} is a file: read it first",
            "call optpipe.optimize (it tokenizes files), or pass input sets",
        )
    if callable(calibration):  # reads the data for the captured program (optpipe.optimize's files)
        with step("read calibration data"):
            calibration = calibration(program)
    return with_calibration(program.copy(), calibration)


def _compile_and_check(tgt, target: str, program: Program, options: dict, step) -> tuple[Any, dict]:
    """(the compiled program, its check against the torch program). The capability check comes
    before lowering and names every node the target cannot take; a target whose outputs differ
    from the torch program's is an error. The program's companions (an encoder-decoder's encoder)
    are compiled and checked the same way, into `compiled.companions` and the check's "companions"."""
    compiled, target_check = _compile_one(tgt, target, program, options, step, "")
    companion_options = tgt.companion_options(options)
    for name, companion in program.companions.items():
        compiled.companions[name], check = _compile_one(tgt, target, companion, companion_options, step, f" ({name})")
        target_check.setdefault("companions", {})[name] = check
    return compiled, target_check


def _compile_one(tgt, target: str, program: Program, options: dict, step, which: str) -> tuple[Any, dict]:
    unsupported = tgt.check(program, **options)
    if unsupported:
        listing = "; ".join(str(u) for u in unsupported[:10])
        more = f" and {len(unsupported) - 10} more" if len(unsupported) > 10 else ""
        raise TargetError(
            f"target {target} cannot take {len(unsupported)} node(s){which}: {listing}{more}",
            unsupported_hint(unsupported),
        )
    with step(f"compile for {target}{which}"):
        compiled = tgt.compile(program, **options)
    with step(f"check {target} against the torch program{which}"):
        target_check = check_target(tgt, compiled, program)
    if not target_check["ok"]:
        raise TargetError(
            f"target {target} output{which} differs from the torch program: max-abs {target_check['max_abs']:.3g}",
            "report this with the OUT folder's report.json",
        )
    return compiled, target_check


def _pass_diffs(records: list[PassRecord], final: Program) -> list:
    """The GraphDiff of every pass that modified the program (None for the others). The records
    then drop their `before` programs: the result keeps no intermediate program."""
    from .graph_diff import diff_programs

    pass_diffs = []
    for r in records:
        pass_diffs.append(diff_programs(r.before, _next_program(records, r, final)) if r.modified else None)
        r.before = None
    return pass_diffs


def _model_numbers(program: Program, before, after, optimized: Program) -> dict:
    """report.json's "model": parameters (count and bytes: int8 weights have scales beside them, so
    the count can grow while the bytes shrink) and FLOPs before and after, and what the model is."""
    return {
        "params_before": before.params,
        "params_after": after.params,
        "bytes_before": model_bytes(program.gm),
        "bytes_after": model_bytes(optimized.gm),
        "flops_before": before.flops,
        "flops_after": after.flops,
        "output": program.meta.get("output"),
        "class": program.meta.get("model_class"),
        "source": program.meta.get("source"),
    }


def _next_program(records, record, final):
    i = records.index(record)
    for later in records[i + 1 :]:
        if later.before is not None:
            return later.before
    return final


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
    return repr(x)


def check_target(tgt, compiled, program: Program) -> dict:
    """Compare the target's outputs with the torch program on the example inputs and at a second
    sequence length."""
    inputs = verification_inputs(program, extra=0)
    reference = run_outputs(program, inputs)
    actual = []
    with torch.no_grad():
        for inp in inputs:
            out = compiled(*tgt.prepare_inputs(inp))
            actual.append([t.detach().cpu() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)])
    m = compare(reference, actual)
    if rounds_activations(program.gm):
        # dynamic activation quantization: a tiny upstream difference moves a value across a
        # rounding step, and over a few layers such flips add up (measured on the real MiniLM,
        # int8-dynamic on onnxruntime vs torch: cosine 0.998, 25 dB, where the quantization itself
        # costs 19 dB against fp32). So judge closeness as a whole, not element by element: a wrong
        # lowering (a lost scale, a transposed weight) lands far below these bounds.
        ok = m.cosine is not None and m.cosine >= 0.995 and (m.sqnr_db is None or m.sqnr_db >= 20)
        return {
            "ok": bool(ok),
            "max_abs": m.max_abs,
            "cosine": m.cosine,
            "sqnr_db": m.sqnr_db,
            "inputs": len(inputs),
            "tolerance": "cosine >= 0.995, SQNR >= 20 dB (quantized activations)",
        }
    tol = 1e-4 * max(1.0, m.ref_max)
    return {
        "ok": bool(m.ok and m.max_abs is not None and m.max_abs <= tol),
        "max_abs": m.max_abs,
        "cosine": m.cosine,
        "inputs": len(inputs),
        "tolerance": tol,
    }


def _as_program(obj, example_inputs, step) -> Program:
    from .capture import capture

    if isinstance(obj, Program):
        return obj
    if isinstance(obj, torch.nn.Module):
        if example_inputs is None:
            raise UsageError("optimize(model) needs example_inputs", "pass a tuple or dict of tensors")
        with step("capture with torch.export"):
            return capture(obj, example_inputs)
    if isinstance(obj, (str, os.PathLike)):
        from .loading import load_model

        with step(f"load {obj}"):
            return load_model(os.fspath(obj), inputs=example_inputs)
    raise UsageError(f"cannot optimize a {type(obj).__name__}", "give an nn.Module, a Program or a path")


class _NoProgress:
    def __call__(self, label):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, label):
        pass
