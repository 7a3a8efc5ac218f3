"""Capture a model as a `Program` with torch.export (non-strict).

What a user means by a model's output: a plain tensor (or a tuple of tensors) is taken as is.
Models that return an output dict and cache objects (Hugging Face's defaults) are wrapped so that
the captured program returns one tensor — `logits`, else `last_hidden_state`, else the first tensor
field — and are called with `use_cache=False`, so no cache object is ever traced. The choice is
recorded in `program.meta["output"]` and reported.

Dynamic dims: batch and sequence dims (named by the user in `--input int64[batch=1,seq=128]`, or
guessed for token-id style inputs) are exported as `Dim.AUTO`; torch.export keeps dynamic whatever
the model allows and specialises the rest. Which dims stayed dynamic is recorded in
`program.dynamic_shapes`. Size-1 dims would be specialised by export's 0/1 rule, so capture widens
them to 2 for tracing only; the program still runs at size 1.

Mixture-of-experts layers are captured in a dense form that every target runs: each experts module
that follows transformers' stacked-expert convention (3-D `gate_up_proj`/`up_proj` and `down_proj`
weights, `forward(hidden_states, top_k_index, top_k_weights)`) is traced as every expert on every
token — batched matmuls over the stacked weights — combined with the router's top-k weights spread
into a dense [tokens, experts] gate. This is exact up to fp32 rounding (it costs num_experts / top_k
times the routed expert FLOPs: portability over speed) and leaves no
`transformers::grouped_mm_fallback`, `histc`, sort or scatter in the graph, so `program.pt2` loads
and runs without the model's code (or transformers) imported. How many modules were traced so is
recorded in `program.meta["experts"]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from .errors import UsageError, first_line
from .program import Program, export_module

OUTPUT_PREFERENCE = ("logits", "last_hidden_state", "prediction_logits", "start_logits")
OUTPUT_GROUPS = (("prediction_logits", "seq_relationship_logits"),)
"""Outputs kept together: BERT's pre-training heads (masked-LM logits first, then next-sentence),
which `train --objective mlm+nsp` trains both of."""


class _OutputSelector(nn.Module):
    """Calls `model` with named inputs and returns only the tensor at `key` of its output.

    The wrapper shares the model's module, parameter and buffer dicts instead of holding the model
    as a child, so captured module paths and parameter names are the model's own
    (`transformer.h.0.attn`, not `model.transformer.h.0.attn`).
    """

    def __init__(self, model: nn.Module, input_names: Sequence[str], key: Any, call_kwargs: dict):
        super().__init__()
        object.__setattr__(self, "_inner", model)
        self._modules = model._modules
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._input_names = list(input_names)
        self._key = key
        self._call_kwargs = dict(call_kwargs)
        self.training = model.training

    def select(self, *args):
        out = self._inner.forward(**dict(zip(self._input_names, args)), **self._call_kwargs)
        return _pick(out, self._key)


def _output_selector(model, input_names, key, call_kwargs) -> _OutputSelector:
    # forward() gets the model's own argument names, so the captured graph's placeholders (and
    # the program's signature) read `input_ids`, `attention_mask`, ... rather than `args_0`.
    names = [n if n.isidentifier() else f"arg{i}" for i, n in enumerate(input_names)]
    namespace: dict = {}
    exec(f"def forward(self, {', '.join(names)}):\n    return self.select({', '.join(names)})\n", namespace)
    cls = type(f"Captured{type(model).__name__}", (_OutputSelector,), {"forward": namespace["forward"]})
    return cls(model, input_names, key, call_kwargs)


def _pick(out, key):
    if key is None:
        return out
    if isinstance(key, int):
        return out[key]
    if isinstance(key, tuple):
        return tuple(_pick(out, k) for k in key)
    return out[key] if isinstance(out, Mapping) else getattr(out, key)


def _is_tensor_tree(out) -> bool:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return bool(leaves) and all(isinstance(x, torch.Tensor) for x in leaves) and not isinstance(out, Mapping)


def _choose_output(out) -> tuple[Any, str]:
    """Return (key, description) for the tensor path of `out` a user means."""
    if isinstance(out, torch.Tensor):
        return None, "tensor"
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        keys = [k for k in out if isinstance(out[k], torch.Tensor)]
        for group in OUTPUT_GROUPS:
            if all(k in keys for k in group):
                return group, " + ".join(group)
        for k in OUTPUT_PREFERENCE:
            if k in keys:
                return k, k
        if keys:
            return keys[0], keys[0]
        raise UsageError(
            f"the model's output ({type(out).__name__}) holds no tensor",
            "return a tensor, or a dict with a 'logits' or 'last_hidden_state' tensor",
        )
    if isinstance(out, (tuple, list)):
        if _is_tensor_tree(out):
            return None, f"tuple of {len(out)} tensors"
        for i, x in enumerate(out):
            if isinstance(x, torch.Tensor):
                return i, f"output[{i}]"
    raise UsageError(
        f"cannot capture a model whose output is {type(out).__name__}",
        "make forward() return a tensor or a tuple of tensors",
    )


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _forward_arg_names(model: nn.Module, n: int) -> list[str]:
    try:
        params = [
            p
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"arg{i}" for i in range(len(names), n)]


def guess_dynamic_dims(inputs: Sequence, names: Sequence[str]) -> list[dict[int, str] | None]:
    """Batch and sequence dims for the usual transformer inputs (token ids, masks, embeddings). An
    encoder-decoder's decoder inputs (`decoder_*`) have a length of their own, `decoder_seq`."""
    spec = []
    for x, name in zip(inputs, list(names) + [""] * (len(inputs) - len(names))):
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            spec.append(None)
        elif x.dim() == 2 or (x.dim() == 3 and x.is_floating_point()):
            spec.append({0: "batch", 1: "decoder_seq" if name.startswith("decoder_") else "seq"})
        else:
            spec.append({0: "batch"})
    return spec


def capture(
    model: nn.Module,
    example_inputs: Sequence | Mapping | torch.Tensor,
    *,
    input_names: Sequence[str] | None = None,
    dynamic_shapes=None,
    meta: dict | None = None,
) -> Program:
    """Capture `model` on `example_inputs` as a Program.

    `example_inputs`: a tensor, a tuple of positional tensors, or a dict of named tensors.
    `dynamic_shapes`: per input `{dim: name}`; default: batch/sequence dims guessed from the inputs.

    >>> prog = capture(model, (torch.randint(0, 100, (1, 16)),))  # doctest: +SKIP
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        input_names = list(example_inputs.keys())
        example_inputs = tuple(example_inputs.values())
    example_inputs = tuple(example_inputs)
    if input_names is None:
        input_names = _forward_arg_names(model, len(example_inputs))
    input_names = list(input_names)
    meta = dict(meta or {})
    model = model.eval()

    call_kwargs = {}
    for flag, value in (("use_cache", False), ("return_dict", True)):
        if flag not in input_names and _accepts(model, flag) and hasattr(model, "config"):
            call_kwargs[flag] = value
    out = _run_once(model, input_names, example_inputs, call_kwargs)
    key, description = _choose_output(out)
    meta.setdefault("output", description)
    _describe_model(model, meta)
    module = _output_selector(model, input_names, key, call_kwargs)

    if dynamic_shapes is None:
        dynamic_shapes = guess_dynamic_dims(example_inputs, input_names)
    try:
        with dense_experts(model) as n_experts:
            if n_experts:
                meta["experts"] = f"dense: {n_experts} experts module(s), every expert on every token"
            ep, kept = export_module(module, example_inputs, input_names, dynamic_shapes)
    except Exception as first_error:  # noqa: BLE001 - retried static, reported below
        try:
            with dense_experts(model):
                ep, kept = export_module(module, example_inputs, input_names, None)
        except Exception:  # noqa: BLE001 - the first (dynamic) error is the one that explains it
            raise UsageError(
                f"torch.export could not capture {type(model).__name__}: {first_line(first_error)}",
                "check that forward() runs on the example inputs; see torch.export docs",
            ) from first_error
    gm = ep.module()
    return Program(gm, example_inputs, input_names, kept, meta, [])


def _run_once(model: nn.Module, input_names: list[str], example_inputs: tuple, call_kwargs: dict):
    """The model's output on the example inputs; its own error on them as one line."""
    try:
        with torch.no_grad():
            return model(**dict(zip(input_names, example_inputs)), **call_kwargs)
    except Exception as e:  # the model's own error on these inputs: say so in one line
        shapes = ", ".join(f"{n}:{_describe(x)}" for n, x in zip(input_names, example_inputs))
        raise UsageError(
            f"{type(model).__name__} fails on the example inputs ({shapes}): {first_line(e)}",
            "check the --input names, dtypes and shapes",
        ) from e


def _describe_model(model: nn.Module, meta: dict) -> None:
    """Fill what `meta` does not say yet: the model's config, class and tokenizer folder."""
    if "config" not in meta:
        config = getattr(model, "config", None)
        if hasattr(config, "to_dict"):  # transformers
            meta["config"] = _jsonable(config.to_dict())
        elif dataclasses.is_dataclass(config) and not isinstance(config, type):  # nanoGPT-style
            meta["config"] = _jsonable(dataclasses.asdict(config))
    meta.setdefault("model_class", f"{type(model).__module__}.{type(model).__qualname__}")
    if "tokenizer" not in meta:  # a transformers model loaded from a local folder that has its tokenizer
        folder = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
        if isinstance(folder, str) and folder and os.path.isfile(os.path.join(folder, "tokenizer.json")):
            meta["tokenizer"] = os.path.abspath(folder)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
    return type(x).__name__


def _jsonable(obj):
    import json

    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return {}


def is_stacked_experts(module: nn.Module) -> bool:
    """A transformers experts module: stacked 3-D expert weights, called with the router's top-k."""
    up = (
        getattr(module, "gate_up_proj", None) if getattr(module, "has_gate", True) else getattr(module, "up_proj", None)
    )
    down = getattr(module, "down_proj", None)
    return (
        isinstance(up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and up.dim() == 3
        and down.dim() == 3
        and isinstance(getattr(module, "num_experts", None), int)
        and hasattr(module, "is_transposed")
    )


@contextlib.contextmanager
def dense_experts(model: nn.Module) -> Iterator[int]:
    """Within the block, every stacked-experts module of `model` runs `dense_experts_forward`.

    Yields how many modules were switched; the model's own forward is back afterwards.
    """
    switched = [m for m in model.modules() if is_stacked_experts(m)]
    for m in switched:
        m.forward = dense_experts_forward.__get__(m)
    try:
        yield len(switched)
    finally:
        for m in switched:
            m.__dict__.pop("forward", None)


def _expert_linear(x: torch.Tensor, weight: torch.Tensor, bias, is_transposed: bool) -> torch.Tensor:
    # x [T, K] or [E, T, K]; weight [E, N, K] ([E, K, N] when transposed) -> [E, T, N]
    out = torch.matmul(x, weight if is_transposed else weight.transpose(-1, -2))
    return out if bias is None else out + bias.unsqueeze(-2)


def dense_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """Every expert on every token, weighted by a dense [tokens, experts] gate from the top-k routing.

    Same result as transformers' grouped/batched expert forwards (tokens routed to an expert get its
    output times their routing weight; an index outside [0, num_experts) contributes nothing), traced
    to matmul, elementwise and reduction ops only.
    """
    has_bias = getattr(self, "has_bias", False)
    if self.has_gate:
        up, up_bias = self.gate_up_proj, getattr(self, "gate_up_proj_bias", None) if has_bias else None
    else:
        up, up_bias = self.up_proj, getattr(self, "up_proj_bias", None) if has_bias else None
    down_bias = getattr(self, "down_proj_bias", None) if has_bias else None
    h = _expert_linear(hidden_states.to(up.dtype), up, up_bias, self.is_transposed)  # [E, T, I]
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out = _expert_linear(h, self.down_proj, down_bias, self.is_transposed)  # [E, T, H]
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    experts = torch.arange(self.num_experts, device=top_k_index.device)
    chosen = (top_k_index.unsqueeze(-1) == experts).to(out.dtype)  # [T, k, E]
    gate = (chosen * top_k_weights.to(out.dtype).unsqueeze(-1)).sum(dim=1)  # [T, E]
    return (out * gate.transpose(0, 1).unsqueeze(-1)).sum(dim=0).to(hidden_states.dtype)
