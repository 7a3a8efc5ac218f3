"""Running a pipeline: every pass applied in order, each one verified against the program before it.

    prog2, records = Pipeline.parse("fuse-attention,dce").run(prog)

A pass rewrites `program.gm` in place (weights are replaced, never mutated, so the caller's model is
untouched). After it, the graph is linted and recompiled, and verification compares the outputs on
the verification inputs with those of the program before the pass (computed once and reused).
Exact passes must match within dtype tolerance; lossy passes must keep the budget (`--budget`, and
the pass's own `min-sqnr` / `min-cosine`, see `optpipe.registry.LossyConfig`). A failing pass
stops the pipeline with an error naming it and the passes before it.

Before any pass runs, the order is checked against what the passes declare (`register_pass(...,
needs=, gives=, takes=, before=, after=, last=, cleanup=)`, see `optpipe.registry.PassOrder`), counting
the passes in the program's history: an illegal order is a `UsageError` naming both passes.

    order_problem("fuse-attention,quantize,prune")
    # 'prune cannot follow quantize: quantize takes away the float linear weights (float-linears) ...'
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .attention_sites import SDPA
from .errors import PassError, UsageError, VerificationError, first_line
from .ops import is_optpipe_op
from .pipeline_text import PassSpec, format_pipeline, parse_pipeline
from .program import Program
from .registry import BASE_CAPABILITIES, CAPABILITIES, LossyConfig, PassOrder, all_passes, get_pass
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

    def check_order(self, history: Sequence[str] = (), *, capabilities: Iterable[str] | None = None) -> None:
        """Raise `UsageError` (one line naming both passes, and a hint) if the passes cannot run in
        this order after `history` (the elements of `program.history`). `capabilities`: what the
        program has before its history (default `BASE_CAPABILITIES`: a captured program whose
        attention is not yet SDPA nodes; `program_capabilities(program)` reads it from a program)."""
        problem = _order_problem(self.specs, history, capabilities)
        if problem:
            raise UsageError(*problem)

    def check_own_order(self) -> None:
        """`check_order` for any program: refuse only what the passes forbid among themselves (as if
        the program already had everything they need), so it can run before a model is loaded."""
        self.check_order(capabilities={c for spec in self.specs for c in spec.info.order.needs})

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
        """Apply the passes to (a copy of) `program`; returns the new program and a record per pass.
        An order the passes do not allow (after the program's history) is refused before any runs."""
        self.check_order(program.history, capabilities=program_capabilities(program))
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


def order_problem(
    specs_or_text: str | Pipeline | Sequence[PassSpec],
    history: Sequence[str] = (),
    *,
    capabilities: Iterable[str] | None = None,
) -> str | None:
    """Why the passes cannot run in this order after `history`, as one line naming both passes, or
    None when they can (what `Pipeline.check_order` raises, without raising). For composing pipelines
    (`optpipe tune`): `order_problem("fuse-attention,quantize,prune")` says prune cannot follow
    quantize. Without `capabilities` the program is assumed to have hand-written attention (so
    `attention` needs `fuse-attention` before it); pass `program_capabilities(program)` to count what
    a given program has, as `Pipeline.run` does. A text that does not parse raises its
    `PipelineSyntaxError`."""
    if isinstance(specs_or_text, str):
        specs = parse_pipeline(specs_or_text)
    else:
        specs = specs_or_text.specs if isinstance(specs_or_text, Pipeline) else list(specs_or_text)
    problem = _order_problem(specs, history, capabilities)
    return problem[0] if problem else None


def program_capabilities(program: Program) -> set[str]:
    """What `program` has before its history ran: `BASE_CAPABILITIES`, plus "sdpa-sites" when its
    graph already has attention sites (a model that calls `F.scaled_dot_product_attention` itself,
    or one that fuse-attention and attention rewrote outside a pipeline) and no KV cache yet."""
    found = set(BASE_CAPABILITIES)
    if not program.meta.get("kv_cache") and any(_is_attention_site(n) for n in program.gm.graph.nodes):
        found.add("sdpa-sites")
    return found


def _is_attention_site(node) -> bool:
    """An SDPA node, or an optpipe attention op that fuse-attention or attention made from one."""
    if node.op != "call_function":
        return False
    return node.target is SDPA or (is_optpipe_op(node.target) and node.target.name().endswith("_attention"))


@dataclass(frozen=True)
class _Step:
    name: str
    order: PassOrder
    done: bool  # in the program's history: already ran, so only what it gave or took counts


def _order_problem(specs, history, capabilities) -> tuple[str, str] | None:
    """(message, hint) for the first pass of `specs` that cannot run where it is, or None."""
    steps = [_Step(n, _declared(n), True) for n in (e.split("{", 1)[0].strip() for e in history)]
    steps += [_Step(spec.name, spec.info.order, False) for spec in specs]
    have = set(BASE_CAPABILITIES if capabilities is None else capabilities)
    taken_by: dict[str, _Step] = {}
    for i, step in enumerate(steps):
        if not step.done:
            problem = _pair_problem(step, steps[:i]) or _needs_problem(step, have, taken_by, steps[i + 1 :])
            if problem:
                return problem
        have -= set(step.order.takes)
        taken_by.update((c, step) for c in step.order.takes)
        have |= set(step.order.gives)
        for c in step.order.gives:
            taken_by.pop(c, None)
    return None


def _declared(name: str) -> PassOrder:
    try:
        return get_pass(name).order
    except UsageError:  # a history entry from a plugin not installed here: it declared nothing we know
        return PassOrder()


def _why(order: PassOrder) -> str:
    return f"; {order.why}" if order.why else ""


def _follows(step: _Step, prev: _Step) -> str:
    return f"{step.name} cannot follow {prev.name}{' (in the program history)' if prev.done else ''}"


def _put_before(step: _Step, prev: _Step) -> str:
    if prev.done:
        return f"start from the program before {prev.name} and put {step.name} ahead of it in the pipeline"
    return f"put {step.name} before {prev.name}"


def _pair_problem(step: _Step, earlier: list[_Step]) -> tuple[str, str] | None:
    """`step` placed after a pass it must precede (its `before`, the other's `after`), or after a `last` one."""
    name = step.name
    for prev in earlier:
        head = _follows(step, prev)
        hint = _put_before(step, prev)
        if prev.name in step.order.before:
            return f"{head}: {name} must run before {prev.name}{_why(step.order)}", hint
        if name in prev.order.after:
            return f"{head}: {prev.name} must run after {name}{_why(prev.order)}", hint
        if prev.order.last and not step.order.cleanup and prev.name != name:
            cleanup = ", ".join(p.name for p in all_passes() if p.order.cleanup) or "none"
            last = f"{prev.name} must run last (only cleanup passes follow it: {cleanup})"
            return f"{head}: {last}{_why(prev.order)}", hint
    return None


def _needs_problem(step: _Step, have: set, taken_by: dict[str, _Step], later: list[_Step]) -> tuple[str, str] | None:
    """A capability `step` needs that is not there: taken by an earlier pass, given only by a later one,
    or given by none."""
    name = step.name
    for cap in step.order.needs:
        if cap in have or (cap in taken_by and taken_by[cap].name == name):  # a rerun knows its own result
            continue
        what = f"the {CAPABILITIES.get(cap, cap)} ({cap})"
        if cap in taken_by:
            taker = taken_by[cap]
            message = f"{_follows(step, taker)}: {taker.name} takes away {what} that {name} needs"
            return message, _put_before(step, taker)
        giver = next((s.name for s in later if cap in s.order.gives), None)
        if giver:
            message = f"{name} cannot run before {giver}: {name} needs {what}, which {giver} gives"
            return message, f"put {giver} before {name}"
        givers = [p.name for p in all_passes() if cap in p.order.gives]
        first = " or ".join(givers) or "a pass that gives it"
        return (
            f"{name} needs {what}, which no pass before it gives: run {first} before {name}",
            f"put {first} before {name} (a program loaded from an OUT counts the passes in its history)",
        )
    return None


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
