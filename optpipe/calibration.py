"""Calibration data: the input sets that lossy passes measure activations on.

int8-static activation scales and wanda importance (|W|·‖X‖) need real activations. A program
carries them in `program.calibration` (set by `optpipe optimize --calibration-data FILE`, or by
`with_calibration` from the Python API); without them, passes fall back to the verification
inputs (the example inputs plus random in-distribution ones), which is what a user gets from any
tool that calibrates on "sample inputs".
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import UsageError
from .program import Program


def with_calibration(program: Program, input_sets: Iterable) -> Program:
    """Attach calibration input sets (each a tensor or a tuple of tensors shaped like the program's
    inputs) to `program`, in place; returns it."""
    sets = []
    for i, item in enumerate(input_sets):
        item = (item,) if isinstance(item, torch.Tensor) else tuple(item)
        if len(item) != len(program.example_inputs):
            raise UsageError(
                f"calibration set {i} has {len(item)} inputs, the program takes {len(program.example_inputs)}",
                "give one tensor per model input",
            )
        for x, ref, name in zip(item, program.example_inputs, program.input_names):
            if isinstance(ref, torch.Tensor) and (
                not isinstance(x, torch.Tensor) or x.dim() != ref.dim() or x.dtype != ref.dtype
            ):
                raise UsageError(
                    f"calibration set {i}: input {name!r} must be a {ref.dtype} tensor with {ref.dim()} dims",
                    f"shape it like the example input {tuple(ref.shape)}",
                )
        sets.append(item)
    if not sets:
        raise UsageError("calibration data is empty", "give at least one batch")
    program.calibration = sets
    return program


def calibration_inputs(program: Program, *, limit: int | None = None) -> list[tuple]:
    """The input sets to calibrate on: `program.calibration` when attached, else the verification
    inputs. At most `limit` sets."""
    if program.calibration:
        sets = list(program.calibration)
    else:
        from .verify import verification_inputs

        sets = verification_inputs(program, extra=2)
    return sets[:limit] if limit else sets
