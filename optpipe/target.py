"""The target interface. Each backend (one module under targets/) subclasses `Target` and
registers itself with `optpipe.registry.register_target`.

Lowering is two steps: `check` names every node the target cannot take (with its module path and
the pass that introduced it) before any work is done; `compile` builds a runnable artifact, which
`save` writes into OUT and `load` brings back in a fresh process (`optpipe run`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .graph_toolkit import module_path


@dataclass
class UnsupportedNode:
    node: str
    op: str
    module_path: str
    introduced_by: str | None

    def __str__(self) -> str:
        origin = f" (introduced by {self.introduced_by})" if self.introduced_by else ""
        return f"{self.op} at {self.module_path or '<top>'} [{self.node}]{origin}"


def unsupported_hint(unsupported: list[UnsupportedNode]) -> str:
    """What to do about nodes a target cannot take: drop the pass that introduced them, or, where
    no pass did, know that the captured model itself contains the op."""
    passes = sorted({u.introduced_by for u in unsupported if u.introduced_by})
    if not passes:
        return "the captured model itself contains the op(s): choose another target"
    return f"choose another target or drop the pass that introduced them ({', '.join(passes)})"


@dataclass
class Compiled:
    """A program compiled for a target: `fn(*inputs)` runs it; `info` goes into the report.
    `companions`: the program's companions (`Program.companions`, e.g. an encoder-decoder's
    encoder) compiled for the same target, by name."""

    fn: Callable
    info: dict
    companions: dict[str, Compiled] = field(default_factory=dict)

    def __call__(self, *inputs):
        return self.fn(*inputs)


class Target:
    name: str = ""
    artifact: str | None = None
    """File or folder the target writes into OUT, besides program.pt2 (None: the program is it)."""

    def available(self) -> None:
        """Raise UsageError when this machine cannot run the target (no GPU, backend missing)."""

    def check(self, program, **options: Any) -> list[UnsupportedNode]:
        """Nodes of `program` this target cannot take (empty: all of them lower). `options` are the
        compile options (targets ignore those meant for others)."""
        return []

    def compile(self, program, **options: Any) -> Compiled:
        raise NotImplementedError

    def save(self, compiled: Compiled, out_dir: str) -> None:
        pass

    def load(self, out_dir: str, program) -> Compiled:
        raise NotImplementedError

    def prepare_inputs(self, inputs: tuple) -> tuple:
        return inputs

    def companion_options(self, options: dict) -> dict:
        """The compile options of a program's companions (an encoder-decoder's encoder runs once per
        prompt, beside the step program that runs once per token)."""
        return options

    # -- training (optpipe train --target NAME) --
    def check_trainable(self, program, objective: str) -> None:
        """Raise (TargetError naming the blocking op) when this target cannot train `program`,
        before any work. Targets that train override this and `trainer`."""
        from .errors import TargetError

        raise TargetError(f"target {self.name} cannot train programs", "train on cpu, cuda or onnxruntime")

    def trainer(
        self,
        program,
        *,
        objective: str,
        trainable: list[str] | None,
        lr: float,
        betas,
        eps: float,
        weight_decay: float,
        clip: float | None = None,
        lr_scales: dict | None = None,
        weight_decays: dict | None = None,
    ):
        """An object with `accumulate(inputs, labels, scale)`, `optimizer_step(lr)`, `eval_loss`,
        `state_dict()` and `load_into(program)` that trains `program` on this target (AdamW;
        `clip`: max global gradient norm; `lr_scales` / `weight_decays`: per parameter name). With
        `optimizer_state()` and `load_state(weights, optimizer_state)` too, runs can resume.
        For mlm+nsp, `accumulate` also takes `next_sentence_label` and `nsp_scale` (the micro-batch's
        share of the batch's sentence pairs), `eval_loss` takes `next_sentence_label` and returns
        the masked-LM part, and `loss_parts` holds the last micro-batch's mean MLM and NSP losses."""
        self.check_trainable(program, objective)
        raise NotImplementedError


COMPANIONS = "companions"
"""OUT/companions/<name>/: the target's artifact of each companion program."""


def save_compiled(target: Target, compiled: Compiled, out_dir: str) -> None:
    """`target.save` of the program and of each compiled companion (into OUT/companions/<name>/;
    nothing for a target whose artifact is the program itself)."""
    target.save(compiled, out_dir)
    if target.artifact is None:
        return
    for name, companion in compiled.companions.items():
        folder = os.path.join(out_dir, COMPANIONS, name)
        os.makedirs(folder, exist_ok=True)
        target.save(companion, folder)


def load_compiled(target: Target, out_dir: str, program) -> Compiled:
    """`target.load` of the program and of each companion the target saved an artifact for (an OUT
    written before companions were compiled runs them in torch, as it did)."""
    compiled = target.load(out_dir, program)
    for name, companion in program.companions.items():
        folder = os.path.join(out_dir, COMPANIONS, name)
        if target.artifact is None or os.path.isdir(folder):
            compiled.companions[name] = target.load(folder, companion)
    return compiled


def token_input(program) -> int:
    """Index of the input the labels are shaped like: `decoder_input_ids` in an encoder-decoder
    program (its logits follow the decoder), else the first 2-D integer tensor (the token ids);
    UsageError naming the inputs when there is none (training needs one)."""
    from .errors import UsageError

    if "decoder_input_ids" in program.input_names:
        return list(program.input_names).index("decoder_input_ids")
    for i, x in enumerate(program.example_inputs):
        if isinstance(x, torch.Tensor) and x.dim() == 2 and not x.is_floating_point() and x.dtype != torch.bool:
            return i
    raise UsageError(
        "training needs a token-id input (an integer [batch, seq] tensor); the program takes "
        + ", ".join(
            f"{n}:{str(getattr(x, 'dtype', type(x).__name__)).replace('torch.', '')}{list(getattr(x, 'shape', []))}"
            for n, x in zip(program.input_names, program.example_inputs)
        )
    )


def unsupported_nodes(program, target_name: str, supports: Callable[[Any], bool]) -> list[UnsupportedNode]:
    """Every call_function node whose op `supports` rejects, except optpipe ops that lower to
    `target_name` (natively or by decomposition). Listed with module path and introducing pass."""
    from .ops import can_lower, is_optpipe_op
    from .pipeline import introduced_by

    found = []
    for node in program.gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if is_optpipe_op(target):
            ok = can_lower(target_name, target)
        else:
            ok = supports(target)
        if not ok:
            found.append(UnsupportedNode(node.name, op_label(target), module_path(node), introduced_by(node)))
    return found


def op_label(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}" + (
            "" if target._overloadname == "default" else f".{target._overloadname}"
        )
    return getattr(target, "__name__", str(target))
