"""The `--input` language: what a model is fed, written on the command line.

Two forms:

- a *spec* (`optimize`, `inspect`, ...) describes a tensor to make up:
  `name:dtype[dims]`, e.g. `input_ids:int64[1,128]`. A dim written `name=size`
  (`input_ids:int64[batch=1,seq=128]`) is marked dynamic under that name; a plain size is static.
- a *value* (`optpipe run`) gives the tensor itself: `name=@file.pt` (a tensor saved with
  `torch.save`, loaded with `weights_only=True`) or `name=[[1,2,3]]` (a JSON literal). A dtype may
  be given, `name:int32=[[1,2,3]]`; otherwise it is inferred (ints -> int64, floats -> float32).

>>> parse_input_spec("input_ids:int64[batch=1,seq=128]")
InputSpec(name='input_ids', dtype=torch.int64, shape=(1, 128), dynamic={0: 'batch', 1: 'seq'})
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .errors import UsageError, first_line

DTYPES: dict[str, torch.dtype] = {
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bool": torch.bool,
}
SPEC_FORM = "name:dtype[dims], e.g. input_ids:int64[1,128] or input_ids:int64[batch=1,seq=128]"
VALUE_FORM = "name=@tensor.pt or name=[[1,2,3]] (optionally name:int64=...)"

_NAME = r"[A-Za-z_][\w.]*"
_SPEC_RE = re.compile(rf"^\s*({_NAME})\s*:\s*(\w+)\s*\[(.*)\]\s*$")
_VALUE_RE = re.compile(rf"^\s*({_NAME})\s*(?::\s*(\w+)\s*)?=(.*)$", re.DOTALL)
_DIM_RE = re.compile(r"^\s*(?:([A-Za-z_]\w*)\s*=\s*)?(\d+)\s*$")


@dataclass(frozen=True)
class InputSpec:
    """One model input to make up: its name, dtype, example shape and which dims are dynamic."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    dynamic: dict[int, str] = field(default_factory=dict)
    """Dims captured as dynamic, {dim index: dim name}; empty: all static."""

    def __str__(self) -> str:
        dims = ",".join(f"{self.dynamic[i]}={n}" if i in self.dynamic else str(n) for i, n in enumerate(self.shape))
        return f"{self.name}:{dtype_name(self.dtype)}[{dims}]"


class InputValue(NamedTuple):
    """A named tensor given on the command line (`name=@file.pt`, `name=[[1,2]]`)."""

    name: str
    tensor: torch.Tensor


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(text: str, where: str, form: str = SPEC_FORM) -> torch.dtype:
    dtype = DTYPES.get(text.strip().lower())
    if dtype is None:
        raise UsageError(
            f"bad --input {where!r}: unknown dtype {text.strip()!r} (one of {', '.join(DTYPES)})", f"expected {form}"
        )
    return dtype


def parse_input_spec(text: str) -> InputSpec:
    """Parse `name:dtype[dims]`; a dim `name=size` is dynamic. Raises UsageError on a bad spec."""
    match = _SPEC_RE.match(text)
    if not match:
        raise UsageError(f"bad --input {text!r}: {_spec_problem(text)}", f"expected {SPEC_FORM}")
    name, dtype_text, dims_text = match.groups()
    dtype = parse_dtype(dtype_text, text)
    shape, dynamic = [], {}
    if dims_text.strip():
        for i, dim in enumerate(dims_text.split(",")):
            dim_match = _DIM_RE.match(dim)
            if not dim_match:
                problem = (
                    f"dim {dim.strip()!r} needs a size, e.g. {dim.strip()}=128"
                    if re.fullmatch(r"\s*[A-Za-z_]\w*\s*", dim)
                    else f"bad dim {dim.strip()!r}"
                )
                raise UsageError(f"bad --input {text!r}: {problem}", f"expected {SPEC_FORM}")
            dim_name, size = dim_match.group(1), int(dim_match.group(2))
            if dim_name:
                if dim_name in dynamic.values():
                    raise UsageError(
                        f"bad --input {text!r}: dim name {dim_name!r} used twice",
                        f"expected {SPEC_FORM}, each dim name once",
                    )
                dynamic[i] = dim_name
            shape.append(size)
    return InputSpec(name, dtype, tuple(shape), dynamic)


def _spec_problem(text: str) -> str:
    """Say what is off in a spec that does not match the grammar, for the one-line error."""
    if not text.strip():
        return "empty"
    if ":" not in text:
        return "missing ':dtype' after the name"
    name = text.split(":", 1)[0].strip()
    if not re.fullmatch(_NAME, name):
        return f"bad input name {name!r}"
    if "[" not in text:
        return "missing the shape in [...]"
    if not text.rstrip().endswith("]"):
        return "the shape must end with ']'"
    return "does not match the form"


def parse_input_value(text: str, default_dtype: torch.dtype | None = None) -> InputValue:
    """Parse `name=@file.pt` or `name=<JSON literal>` (optionally `name:dtype=...`).

    The dtype is, in order: the one written in `text`, `default_dtype` (e.g. what the program
    expects for that input), the file's own, or inferred from the literal.
    """
    match = _VALUE_RE.match(text)
    if not match:
        raise UsageError(f"bad --input {text!r}: expected a name, '=' and a value", f"expected {VALUE_FORM}")
    name, dtype_text, value = match.group(1), match.group(2), match.group(3).strip()
    dtype = parse_dtype(dtype_text, text, VALUE_FORM) if dtype_text else default_dtype
    if value.startswith("@"):
        tensor = _load_tensor_file(value[1:], text)
    else:
        tensor = _tensor_from_json(value, text)
    return InputValue(name, tensor.to(dtype) if dtype is not None else tensor)


def _load_tensor_file(path: str, where: str) -> torch.Tensor:
    if not os.path.isfile(path):
        raise UsageError(f"bad --input {where!r}: no such file {path!r}", f"expected {VALUE_FORM}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(
            f"bad --input {where!r}: cannot read {path} as a tensor ({first_line(e)})",
            "save it with torch.save(tensor, path)",
        ) from e
    if not isinstance(obj, torch.Tensor):
        raise UsageError(
            f"bad --input {where!r}: {path} holds a {type(obj).__name__}, not a tensor",
            "save it with torch.save(tensor, path)",
        )
    return obj


def _tensor_from_json(value: str, where: str) -> torch.Tensor:
    try:
        data = json.loads(value)
    except json.JSONDecodeError as e:
        raise UsageError(
            f"bad --input {where!r}: the value is not valid JSON ({e.msg} at column {e.colno})",
            f"expected {VALUE_FORM}",
        ) from e
    try:
        return torch.tensor(data)  # ints -> int64, floats -> float32, bools -> bool
    except (TypeError, ValueError, RuntimeError) as e:
        raise UsageError(
            f"bad --input {where!r}: not a rectangular array of numbers ({e})", f"expected {VALUE_FORM}"
        ) from e


def is_value_form(text: str) -> bool:
    """True for `name=...` / `name:dtype=...` (a value), False for `name:dtype[dims]` (a spec)."""
    return bool(_VALUE_RE.match(text))  # a spec has '[' right after its dtype, never '='


def parse_input_arg(text: str, default_dtype: torch.dtype | None = None) -> InputSpec | InputValue:
    """Either form, for commands (like `run`) that take both."""
    return parse_input_value(text, default_dtype) if is_value_form(text) else parse_input_spec(text)


def check_specs(specs: Sequence[InputSpec]) -> None:
    """Names are unique, and a dynamic dim name means the same size in every input."""
    seen_names: set[str] = set()
    dim_sizes: dict[str, tuple[int, str]] = {}
    for spec in specs:
        if spec.name in seen_names:
            raise UsageError(f"--input {spec.name!r} is given twice", "give each input once")
        seen_names.add(spec.name)
        for dim, dim_name in spec.dynamic.items():
            size = spec.shape[dim]
            if dim_name in dim_sizes and dim_sizes[dim_name][0] != size:
                other_size, other = dim_sizes[dim_name]
                raise UsageError(
                    f"--input dim {dim_name!r} is {other_size} in {other!r} but {size} in {spec.name!r}",
                    "a named dim must have one size across inputs",
                )
            dim_sizes.setdefault(dim_name, (size, spec.name))


def make_example_inputs(
    specs: Sequence[InputSpec], *, vocab_size: int | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Tensors for `specs`, reproducible from `seed`, keyed by input name in order.

    Integer inputs are token ids in [0, vocab_size) (unknown vocab: [0, 2), which fits any
    embedding), except by name: `*mask*` -> ones, `token_type_ids` -> zeros, `position_ids` ->
    0..n-1 along the last dim. Floats are standard normal; bools are True for masks, else random.
    """
    check_specs(specs)
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        shape, dtype, name = spec.shape, spec.dtype, spec.name.lower()
        if "mask" in name:
            x = torch.ones(shape, dtype=dtype)
        elif dtype.is_floating_point:
            x = torch.randn(shape, generator=generator).to(dtype)
        elif dtype == torch.bool:
            x = torch.randint(0, 2, shape, generator=generator).bool()
        elif name == "token_type_ids":
            x = torch.zeros(shape, dtype=dtype)
        elif name == "position_ids" and shape:
            x = torch.arange(shape[-1], dtype=dtype).expand(shape).contiguous()
        else:
            x = torch.randint(0, max(vocab_size or 2, 1), shape, generator=generator, dtype=dtype)
        out[spec.name] = x
    return out


def dynamic_shapes_of(specs: Sequence[InputSpec]) -> list[dict[int, str] | None]:
    """The per-input dynamic-shape spec that `capture` takes."""
    return [dict(spec.dynamic) or None for spec in specs]
