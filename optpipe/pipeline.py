"""Running a pipeline: every pass applied in order, each one verified against the program before it.

    prog2, records = Pipeline.parse("fuse-attention,dce").run(prog)

A pass rewrites `program.gm` in place (weights are replaced, never mutated, so the caller's model is
untouched). After it, the graph is linted and recompiled, and verification compares the outputs on
the verification inputs with those of the program before the pass (computed once and reused).
Exact passes must match within dtype tolerance; lossy passes must keep the budget (`--budget`, and
the pass's own `min-sqnr` / `min-cosine`, see `optpipe.registry.LossyConfig`). A failing pass
stops the pipeline with an error naming it and the passes before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import PassError, VerificationError, first_line
from .pipeline_text import PassSpec, format_pipeline, parse_pipeline
from .program import Program
from .registry import LossyConfig
from .verify import Budget, Metrics, check_exact, compare, output_dtype, run_outputs, verification_inputs


@dataclass
class PassRecord:
    name: str
    element: str
    config: dict
    exact: bool
    modified: bool
    stats: dict
    details: dict
    seconds: float
    verify: dict | None
    before: Program | None = field(default=None, repr=False)
    """The program before this pass (graph copy, shared weights), kept when diffs are wanted."""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "pipeline": self.element,
            "config": self.config,
            "exact": self.exact,
            "modified": self.modified,
            "stats": self.stats,
            "details": self.details,
            "seconds": round(self.seconds, 4),
            "verify": self.verify,
        }


class Pipeline:
    def __init__(self, specs: Sequence[PassSpec]):
        self.specs = list(specs)

    @classmethod
    def parse(cls, text: str) -> Pipeline:
        return cls(parse_pipeline(text))

    def __str__(self) -> str:
        return format_pipeline(self.specs)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __len__(self) -> int:
        return len(self.specs)

    def run(
        self,
        program: Program,
        *,
        verify: bool = True,
        budget: Budget | None = None,
        instruments: Sequence = (),
        keep_before: bool = False,
        on_pass: Callable[[int, PassSpec], Any] | None = None,
        copy: bool = True,
    ) -> tuple[Program, list[PassRecord]]:
        """Apply the passes to (a copy of) `program`; returns the new program and a record per pass."""
        program = program.copy() if copy else program
        budget = budget or Budget()
        records: list[PassRecord] = []
        inputs = verification_inputs(program) if verify else None
        reference = run_outputs(program, inputs) if verify else None
        for index, spec in enumerate(self.specs):
            if on_pass:
                on_pass(index, spec)
            before = program.copy() if keep_before else None
            for inst in instruments:
                inst.before_pass(index, spec, program)
            nodes_before = set(program.gm.graph.nodes)
            start = time.perf_counter()
            try:
                result = spec.info.fn(program, spec.config)
                program.gm.graph.lint()
                program.gm.recompile()
            except (PassError, VerificationError):
                raise
            except Exception as e:  # a pass bug: name the pass, keep the cause chained
                raise PassError(
                    f"pass {spec} failed{_after(records)}: {first_line(e)}",
                    "rerun with --dump-ir DIR to see the graph it got",
                ) from e
            seconds = time.perf_counter() - start
            tag_new_nodes(program.gm, nodes_before, spec.name)
            program.history.append(str(spec))
            metrics = None
            if verify:
                if result.modified:
                    actual = _run_checked(program, inputs, spec, records)
                    metrics = compare(reference, actual)
                    _judge(metrics, spec, budget, output_dtype(reference), records)
                    reference = actual
                else:
                    metrics = Metrics(0.0, None, 1.0, 1.0, ok=True, inputs=len(inputs), note="unchanged")
            record = PassRecord(
                spec.name,
                str(spec),
                spec.config_dict(),
                spec.info.exact,
                result.modified,
                dict(result.stats),
                dict(result.details),
                seconds,
                metrics.to_dict() if metrics else None,
                before,
            )
            records.append(record)
            for inst in instruments:
                inst.after_pass(index, spec, program, record)
        return program, records


INTRODUCED_BY = "optpipe_pass"


def tag_new_nodes(gm, nodes_before: set, pass_name: str) -> None:
    """Record which pass introduced each new node (in meta["custom"], which torch.export keeps
    through re-export and save/load), so a target's capability check can name it."""
    for node in gm.graph.nodes:
        if node not in nodes_before and node.op == "call_function":
            custom = dict(node.meta.get("custom") or {})
            custom.setdefault(INTRODUCED_BY, pass_name)
            node.meta["custom"] = custom


def introduced_by(node) -> str | None:
    return (node.meta.get("custom") or {}).get(INTRODUCED_BY)


def _after(records) -> str:
    return f" (after {', '.join(r.element for r in records)})" if records else ""


def _run_checked(program, inputs, spec, records):
    try:
        return run_outputs(program, inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs[-1] if hasattr(x, "shape"))
        raise VerificationError(
            f"program after {spec}{_after(records)} fails to run: {first_line(e)}",
            f"verification inputs include shapes {shapes}",
        ) from e


def _judge(m: Metrics, spec: PassSpec, budget: Budget, dtype, records) -> None:
    if m.note and not m.ok:
        raise VerificationError(f"verification of {spec}{_after(records)} failed: {m.note}")
    if spec.info.exact:
        check_exact(m, dtype)
        if not m.ok:
            raise VerificationError(
                f"exact pass {spec}{_after(records)} changed the outputs: max-abs {m.max_abs:.3g} > "
                f"tolerance {m.tolerance:.3g}",
                "this is a bug in the pass; --dump-ir DIR shows its rewrite",
            )
        return
    config: LossyConfig = spec.config  # register_pass requires it of a lossy pass
    pass_budget = Budget(sqnr=config.min_sqnr, cosine=config.min_cosine)
    problems = budget.merged(pass_budget).violations(m)
    if problems:
        m.ok = False
        raise VerificationError(
            f"lossy pass {spec}{_after(records)} is over budget: {'; '.join(problems)}",
            "loosen --budget or the pass's options, or choose fewer layers",
        )
