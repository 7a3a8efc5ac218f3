"""The `--input` language: what a model is fed, written on the command line; and the check at the
door that what a program is fed fits what it takes (`check_inputs`).

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from .errors import UsageError, first_line

if TYPE_CHECKING:
    from .program import Program

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
    if value.startswith("@"):
        tensor = _load_tensor_file(value[1:], text)
    else:
        tensor = _tensor_from_json(value, text)
    if dtype_text:  # written by the user: cast as asked
        return InputValue(name, tensor.to(parse_dtype(dtype_text, text, VALUE_FORM)))
    if default_dtype is not None and tensor.dtype != default_dtype:
        tensor = _cast_exactly(tensor, default_dtype, text)
    return InputValue(name, tensor)


def _cast_exactly(tensor: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """`tensor` as the `dtype` the program takes; to integers or bools only when no value changes
    (1.5 is not a token id)."""
    cast = tensor.to(dtype)
    if dtype.is_floating_point or tensor.dtype == torch.bool or torch.equal(cast.to(tensor.dtype), tensor):
        return cast
    changed = (cast.to(tensor.dtype) != tensor).nonzero()[0]
    value = tensor[tuple(changed)].item()
    raise UsageError(
        f"bad --input {where!r}: the program takes {dtype_name(dtype)}, and {value!r} is not one",
        f"give {dtype_name(dtype)} values, or write the dtype to convert them: name:{dtype_name(dtype)}=...",
    )


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


# -- what a program takes, checked at the door ---------------------------------------------------------
@dataclass(frozen=True)
class DimSpec:
    """One dim of a program input: a static size, or a dynamic dim with its range."""

    size: int | None
    """The static size; None for a dynamic dim."""
    symbol: str | None = None
    """A dynamic dim's symbol: every input dim with the same symbol must have the same size."""
    name: str | None = None
    """A dynamic dim's name at capture (`batch`, `seq`), when known."""
    low: int = 0
    high: int | None = None

    def __str__(self) -> str:
        if self.size is not None:
            return str(self.size)
        label = self.name or self.symbol or "dynamic"
        if self.high is not None:
            return f"{label}≤{self.high}" if self.low <= 1 else f"{label}={self.low}..{self.high}"
        return label if self.low <= 1 else f"{label}≥{self.low}"

    def describe(self) -> str:
        """`dim 1 (seq)`'s expectation in words: "64", "1 to 64", "any size"."""
        if self.size is not None:
            return str(self.size)
        if self.high is not None:
            return f"{self.low} to {self.high}"
        return f"at least {self.low}" if self.low > 1 else "any size"


@dataclass(frozen=True)
class ProgramInput:
    """One input of a program as its graph takes it (`program_inputs`)."""

    name: str
    dtype: torch.dtype | None
    dims: tuple[DimSpec, ...] | None
    """None: not a tensor, or not known."""
    vocab: int | None = None
    """Token ids must be in [0, vocab): the rows of the (first) embedding the input indexes."""

    def __str__(self) -> str:
        if self.dtype is None or self.dims is None:
            return self.name
        ids = f" (ids < {self.vocab})" if self.vocab else ""
        return f"{self.name}:{dtype_name(self.dtype)}[{','.join(map(str, self.dims))}]{ids}"


_VIEW_OPS = ("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "expand", "clone", "contiguous")
_INPUT_HINT_LIMIT = 4
"""Program inputs spelled out in the hint of an input error."""


def program_inputs(program: Program) -> list[ProgramInput]:
    """The inputs of `program`'s graph: names, dtypes, static sizes, dynamic dims with their ranges
    (from the fake values torch.export left on the placeholders) and, for token ids, the vocabulary.
    Empty when the graph's inputs do not map one to one onto `program.input_names`."""
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    names = list(program.input_names)
    if len(names) != len(placeholders):  # nested inputs (a tuple of caches) flattened: no safe mapping
        return []
    dynamic = list(program.dynamic_shapes or [])
    vocab = indexed_vocab(program.gm)
    out = []
    for i, (name, node) in enumerate(zip(names, placeholders)):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            out.append(ProgramInput(name, None, None))
            continue
        dim_names = (dynamic[i] if i < len(dynamic) else None) or {}
        dims = tuple(_dim_spec(size, dim_names.get(d)) for d, size in enumerate(val.shape))
        out.append(ProgramInput(name, val.dtype, dims, vocab.get(node.name)))
    return out


def _dim_spec(size, name: str | None) -> DimSpec:
    if isinstance(size, int):
        return DimSpec(size)
    expr = size.node.expr
    if expr.is_number:
        return DimSpec(int(expr))
    if not expr.is_Symbol:  # a size computed from others (s0*2): checked by the program itself
        return DimSpec(None, None, name)
    ranges = size.node.shape_env.var_to_range.get(expr)
    low = _finite(ranges.lower) if ranges is not None else None
    high = _finite(ranges.upper) if ranges is not None else None
    low = low or 0
    # torch.export traces dynamic dims from 2 up (it specialises 0 and 1), yet the graph runs on 1
    return DimSpec(None, str(expr), name, 1 if low == 2 else low, high)


def _finite(bound) -> int | None:
    """A range bound as an int; None for ±infinity (torch's int_oo claims to be finite)."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def indexed_vocab(gm: torch.fx.GraphModule) -> dict[str, int]:
    """{placeholder name: rows of the embedding table it indexes} for the graph's id inputs (through
    views; an input that indexes several tables gets the smallest)."""
    vocab: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not _is_embedding(node) or len(node.args) < 2:
            continue
        rows = _rows(gm, node.args[0])
        for arg in node.args[1:]:
            while isinstance(arg, torch.fx.Node) and arg.op == "call_function" and _is_view(arg):
                arg = arg.args[0]
            if rows and isinstance(arg, torch.fx.Node) and arg.op == "placeholder":
                vocab[arg.name] = min(rows, vocab.get(arg.name, rows))
    return vocab


def _is_embedding(node: torch.fx.Node) -> bool:
    """aten.embedding, or an optpipe op that looks rows up the same way (`embedding_int8(table, ...)`)."""
    namespace, _, rest = str(node.target).partition(".")
    return namespace in ("aten", "optpipe") and rest.split(".")[0].startswith("embedding") and "backward" not in rest


def _is_view(node: torch.fx.Node) -> bool:
    name = str(node.target).split(".")
    return len(name) > 1 and name[1] in _VIEW_OPS and bool(node.args)


def _rows(gm: torch.fx.GraphModule, weight) -> int | None:
    if not isinstance(weight, torch.fx.Node):
        return None
    val = weight.meta.get("val")
    if not isinstance(val, torch.Tensor) and weight.op == "get_attr":
        val = gm
        for part in str(weight.target).split("."):
            val = getattr(val, part, None)
    if isinstance(val, torch.Tensor) and val.dim() == 2 and isinstance(val.shape[0], int):
        return int(val.shape[0])
    return None


def check_inputs(program: Program, inputs: Sequence | Mapping, *, where: str = "--input") -> None:
    """Check `inputs` (in the program's order, or by name) against what `program` takes: names,
    dtypes, ranks, static sizes, dynamic dims within their range and the same size wherever they
    are shared, and token ids within the vocabulary. Raises one-line UsageError naming the input
    and what was expected, before anything runs (a wrong input otherwise fails deep in a kernel).

    `where` says where the inputs came from, for the message (`--input`, `train --data ...`)."""
    expected = program_inputs(program)
    if not expected:  # nothing known about the graph's inputs: the program checks them itself
        return
    if isinstance(inputs, Mapping):
        unknown = [k for k in inputs if k not in {e.name for e in expected}]
        if unknown:
            raise UsageError(f"{where} {unknown[0]!r}: the program has no such input", _takes(expected))
        given = [inputs.get(e.name) for e in expected]
    else:
        given = list(inputs)
        if len(given) != len(expected):
            raise UsageError(f"{where}: {len(given)} inputs given, the program takes {len(expected)}", _takes(expected))
    sizes: dict[str, tuple[int, str, int]] = {}
    for spec, value in zip(expected, given):
        if value is None:
            raise UsageError(f"{where} {spec.name!r} is missing", _takes(expected))
        _check_one(spec, value, where, sizes)


def _takes(expected: list[ProgramInput]) -> str:
    shown = " ".join(map(str, expected[:_INPUT_HINT_LIMIT]))
    more = f" and {len(expected) - _INPUT_HINT_LIMIT} more" if len(expected) > _INPUT_HINT_LIMIT else ""
    return f"the program takes {shown}{more}"


def _check_one(spec: ProgramInput, x, where: str, sizes: dict) -> None:
    name = spec.name
    if spec.dims is None:
        return
    hint, what = f"expected {spec}", f"{where} {name!r}"
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"{what} is a {type(x).__name__}, not a tensor", hint)
    if x.dtype != spec.dtype:
        raise UsageError(f"{what} is {dtype_name(x.dtype)}; the program takes {dtype_name(spec.dtype)}", hint)
    if x.dim() != len(spec.dims):
        raise UsageError(f"{what} has {x.dim()} dim(s) {list(x.shape)}; the program takes {len(spec.dims)}", hint)
    for d, (n, dim) in enumerate(zip(x.shape, spec.dims)):
        label = f"dim {d}" + (f" ({dim.name})" if dim.name else "")
        if (dim.size is not None and n != dim.size) or n < dim.low or (dim.high is not None and n > dim.high):
            raise UsageError(f"{what} {label} is {n}; the program takes {dim.describe()}", hint)
        if dim.symbol:
            first = sizes.setdefault(dim.symbol, (n, name, d))
            if first[0] != n:
                raise UsageError(
                    f"{what} {label} is {n} but {first[0]} in {first[1]!r} (dim {first[2]}); "
                    "the program takes one size for both",
                    hint,
                )
    if spec.vocab and x.numel() and not x.is_floating_point() and x.dtype != torch.bool:
        _check_ids(x, spec.vocab, what, hint)


def _check_ids(x: torch.Tensor, vocab: int, what: str, hint: str) -> None:
    bad = ((x < 0) | (x >= vocab)).nonzero()
    if len(bad):
        at = tuple(int(i) for i in bad[0])
        raise UsageError(
            f"{what} holds token id {int(x[at])} at {list(at)}, outside the vocabulary 0..{vocab - 1}", hint
        )


def check_token_ids(program: Program, rows: Sequence[Sequence[int]], *, where: str = "--prompt-ids") -> None:
    """Every id of `rows` (prompts) within the vocabulary of the program's first token-id input."""
    vocab = token_vocab(program)
    if vocab is None:
        return
    for r, row in enumerate(rows):
        for i, token in enumerate(row):
            if not 0 <= token < vocab:
                raise UsageError(
                    f"{where}: token id {token} (prompt {r}, position {i}) is outside the vocabulary 0..{vocab - 1}",
                    f"the model has {vocab} tokens",
                )


def token_vocab(program: Program) -> int | None:
    """The vocabulary of the program's first token-id input, from its graph (None: no embedding)."""
    return next((p.vocab for p in program_inputs(program) if p.vocab), None)
