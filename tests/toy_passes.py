"""Passes used only by tests: a lossy one with a controllable error, and a broken exact one."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from optpipe.registry import LossyConfig, PassResult, register_pass


@dataclass(frozen=True)
class AddNoiseConfig(LossyConfig):  # lossy: its budget is LossyConfig's min-sqnr / min-cosine
    scale: float = field(default=1e-3, metadata={"help": "relative size of the noise added to the output"})

    def __post_init__(self):
        super().__post_init__()
        if self.scale < 0:
            raise ValueError("scale must be >= 0")


def _perturb_output(program, fn_name: str, arg) -> int:
    graph = program.gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    flat = out.args[0]
    first = flat[0] if isinstance(flat, (tuple, list)) else flat
    with graph.inserting_before(out):
        new = graph.call_function(getattr(torch.ops.aten, fn_name).Tensor, (first, arg))
        new.meta = dict(first.meta)
    out.replace_input_with(first, new)
    return 1


@register_pass("test-add-noise", AddNoiseConfig, exact=False)
def add_noise(program, config):
    """Scales the first output by (1 + scale): a lossy rewrite with a known SQNR."""
    if config.scale == 0:
        return PassResult(False, {"perturbed": 0})
    return PassResult(True, {"perturbed": _perturb_output(program, "mul", 1.0 + config.scale)})


@dataclass(frozen=True)
class NoOptions:
    pass


@register_pass("test-broken-exact", NoOptions, exact=True)
def broken_exact(program, config):
    """Claims to be exact but adds 1 to the output (verification must catch it)."""
    return PassResult(True, {"perturbed": _perturb_output(program, "add", 1.0)})


@register_pass("test-raises", NoOptions, exact=True)
def raises(program, config):
    """A pass with a bug."""
    raise RuntimeError("kaboom")
