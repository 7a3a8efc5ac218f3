"""quantize: linear layers (and optionally embeddings) -> int8 / int4 optpipe ops (lossy).

Every selected linear becomes ONE `torch.ops.optpipe.*` node whose weights are new int8/uint8
buffers on the same module; the fp32 weight is deleted from the module (unless something else still
reads it), so the saved program shrinks with it:

    before   linear(x, W, b)                  | addmm(b, x, Wc) / mm(x, Wc)   (HF Conv1D: Wc = Wᵀ)
             | matmul(x, numpy_T(W)) (Falcon's x @ W.T) | matmul(x, Wc)
    after    scheme=int8-dynamic  -> optpipe.linear_int8_dynamic(x, W_q int8, W_scale[N], b)
             scheme=int8-static   -> optpipe.linear_int8_static(x, W_q int8, W_scale[N], x_qparams[2], b)
             scheme=int8-weight   -> optpipe.linear_int8_weight(x, W_q int8, W_scale[N], b)
             scheme=int4-weight   -> optpipe.linear_int4_weight(x, W_q uint8[N,K/2], W_qparams[N,K/g,2], b, g)
    with embeddings=true:
    before   embedding(E, ids)
    after    optpipe.embedding_int8(E_q int8, E_scale[V], ids)
             (a tied LM head shares E_q/E_scale with the embedding: one int8 copy, no fp32 left)

See `quantize_ops` for the numerics and kernels (int8-dynamic: per-output-channel int8 weights,
per-token activation scales, oneDNN int8 on CPU).

int8-static calibrates before it rewrites: the fp32 graph runs (an fx Interpreter) on
`optpipe.calibration.calibration_inputs(program)` — the attached `--calibration-data`, else the
verification inputs — at most `calibration_batches` sets, recording every selected linear's input:
its min and max per channel and a few random rows. Each distinct input node gets ONE uint8 (scale,
zero point) and one SmoothQuant smoothing (q, k and v share theirs): x is divided per input channel
by s = max|x|^α / max|W|^(1-α) and the weights multiplied by s (outlier channels, e.g. after a
LayerNorm, stop eating the per-tensor range); α is the one of `SMOOTHING_ALPHAS` whose linears'
output error on the kept rows is least (or `smoothing` when given; 0 = off; a weight tied to an
embedding or another input is not smoothed). Then `mse` shrinks the range of x/s to the clip of
least squared error, `minmax` keeps it whole, `percentile` takes the 99.99th percentile of each
tail. The buffers `input_qparams` [2] and `input_smooth` [K] sit next to each weight.
details["calibration"] says which inputs were used and how many inputs chose each α.

Selection: `modules` and `skip` are globs over the module path that owns the weight
(`encoder.layer.0.attention.self.query`, `lm_head`); a pattern matches the whole path or any dotted
tail of it (`skip=[lm_head,*embed*]`, `modules=[*.mlp.*]`). Skipped modules keep their nodes and
fp32 weights untouched.

A compression pass never makes the model bigger: a weight that some other reader keeps in fp32 (a
tied LM head whose embedding stays fp32 with embeddings=false, a weight also read by a non-linear
op) would gain an int8 copy and free nothing, and a weight too small for its scales to pay off
(in_features 1) would grow; their sites are skipped with the reason, before anything is rewritten.
MoE experts stacked in one [E, N, K] weight are skipped too (no batched int8 kernel).

Preconditions: none beyond a captured program; run it last among the rewrites that need fp32
weights (fuse-attention, attention, prune), and for int8-static after every rewrite that changes
the activations the linears read. Stats: {"quantized", "skipped", "bytes_before",
"bytes_after"}; details: "modules", one entry per linear/embedding, keyed by module path, with the
op or the reason it was skipped; "skipped", [{"site": module path, "reason"}] for every site left
as it was; "notes", pass-level remarks (no site found, nothing quantized).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx

from optpipe.graph_toolkit import add_tensor, insert_call, insert_get_attr, module_path, value
from optpipe.program import Program
from optpipe.registry import LossyConfig, PassResult, config_fields, register_pass
from optpipe.weight_sites import (
    WeightSite,
    linear_shape,
    logical_weight,
    path_matches,
    weight_readers,
    weight_site,
    weight_tensor,
)

from . import quantize_ops as ops
from .cleanup import eliminate_dead_code

aten = torch.ops.aten

SCHEMES = ("int8-dynamic", "int8-static", "int8-weight", "int4-weight")
Scheme = Literal["int8-dynamic", "int8-static", "int8-weight", "int4-weight"]
CALIBRATION_METHODS = ("mse", "minmax", "percentile")
PERCENTILE = 99.99
CALIBRATION_ROWS = 1024
"""Activation rows (tokens) kept per input node, spread over the calibration sets, for the range and
smoothing searches."""
SMOOTHING_ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)
SAMPLE = 1 << 18
GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class QuantizeConfig(LossyConfig):
    scheme: Scheme = field(
        default="int8-dynamic",
        metadata={
            "help": "int8-dynamic (int8 weights per output channel, int8 activations per token: faster on "
            "CPU), int8-static (activation scales calibrated once, per tensor: fastest), int8-weight / "
            "int4-weight (weight-only, dequantized on the fly: smaller)"
        },
    )
    group: int = field(
        default=128,
        metadata={"help": "int4-weight: input channels per scale (32, 64 or 128; smaller is more accurate)"},
    )
    modules: tuple[str, ...] = field(
        default=("*",),
        metadata={"help": "globs of module paths (or their dotted tails) to quantize, e.g. [*.mlp.*,*attn*]"},
    )
    skip: tuple[str, ...] = field(
        default=(),
        metadata={"help": "globs of module paths (or dotted tails) to leave in fp32, e.g. [lm_head,*embed*]"},
    )
    embeddings: bool = field(
        default=False,
        metadata={"help": "also store embedding tables as int8 with a scale per row (most of a small model's bytes)"},
    )
    calibration_batches: int = field(
        default=8,
        metadata={
            "help": "int8-static: calibration input sets to measure activation ranges on (the attached "
            "--calibration-data, else the verification inputs)"
        },
    )
    smoothing: float | None = field(
        default=None,
        metadata={
            "help": "int8-static: SmoothQuant strength α in [0, 1): input channels are divided by "
            "max|x|^α / max|W|^(1-α) and the weights multiplied by it; 0 turns it off; unset: chosen "
            f"per input among {', '.join(map(str, SMOOTHING_ALPHAS))} by the linears' output error"
        },
    )
    calibration_method: Literal["mse", "minmax", "percentile"] = field(
        default="mse",
        metadata={
            "help": "int8-static: activation range per input: mse (the clipping of least squared error), "
            f"minmax (no clipping), percentile ({PERCENTILE}th of each tail)"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantize: unknown scheme {self.scheme!r} (schemes: {', '.join(SCHEMES)})")
        if self.group not in GROUPS or isinstance(self.group, bool):
            raise ValueError(f"quantize: group must be one of {', '.join(map(str, GROUPS))}, got {self.group!r}")
        for name in ("modules", "skip"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not all(isinstance(p, str) and p for p in getattr(self, name)):
                raise ValueError(f"quantize: {name} must be a list of module-path globs, got {value!r}")
        if not self.modules:
            raise ValueError("quantize: modules is empty; use [*] for every linear")
        if (
            isinstance(self.calibration_batches, bool)
            or not isinstance(self.calibration_batches, int)
            or self.calibration_batches < 1
        ):
            raise ValueError(
                f"quantize: calibration-batches must be a positive integer, got {self.calibration_batches!r}"
            )
        if self.smoothing is not None and (
            isinstance(self.smoothing, bool)
            or not isinstance(self.smoothing, (int, float))
            or not 0 <= self.smoothing < 1
        ):
            raise ValueError(f"quantize: smoothing must be in [0, 1), got {self.smoothing!r}")
        if self.calibration_method not in CALIBRATION_METHODS:
            raise ValueError(
                f"quantize: unknown calibration-method {self.calibration_method!r} "
                f"(methods: {', '.join(CALIBRATION_METHODS)})"
            )

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in config_fields(self)}


def _refusal(gm, site: WeightSite, config: QuantizeConfig) -> str | None:
    if site.kind == "embedding":
        return None
    _, k = linear_shape(gm, site)
    if config.scheme == "int4-weight" and k % config.group:
        return f"in_features {k} is not a multiple of group={config.group}"
    xv = value(site.x)
    if xv is None or not xv.is_floating_point():
        return "input without a recorded floating-point value"
    return None


# -- rewriting -------------------------------------------------------------------------------------------------
class _Quantizer:
    """Quantizes each fp32 weight once (a tied weight read by a linear and an embedding is shared)."""

    def __init__(self, gm: torch.fx.GraphModule, config: QuantizeConfig):
        self.gm, self.config = gm, config
        self.done: dict[tuple[int, str, bool], tuple[str, str]] = {}

    def buffers(self, site: WeightSite, layout: str, smooth: torch.Tensor | None = None) -> tuple[str, str]:
        """Attribute paths of (quantized weight, scale) for `site` in `layout` (int8-rows | int4), of
        the weight times `smooth` per input channel when given."""
        weight = weight_tensor(self.gm, site.weight.target)
        key = (id(weight), layout, site.transposed, id(smooth))
        if key in self.done:
            return self.done[key]
        w = weight.detach().t() if site.transposed else weight.detach()
        if smooth is not None:
            w = w * smooth[None, :]
        if layout == "int4":
            q, scale = ops.quantize_int4_grouped(w, self.config.group)
        else:
            q, scale = ops.quantize_int8_per_channel(w)
        name = site.weight.target.rpartition(".")[2]
        owner = site.owner
        names = (
            add_tensor(self.gm, owner, f"{name}_{layout.replace('-', '_')}", q),
            add_tensor(self.gm, owner, f"{name}_{'qparams' if layout == 'int4' else 'scale'}", scale),
        )
        self.done[key] = names
        return names


def _rewrite(
    gm, site: WeightSite, config: QuantizeConfig, quantizer: _Quantizer, activation: tuple | None = None
) -> str:
    node = site.node
    # read x and the bias from the node now, not from when the sites were collected: a linear feeding
    # another (ALBERT's embedding_hidden_mapping_in feeds q, k and v) was replaced meanwhile
    site = weight_site(gm, node)
    layout = "int4" if (site.kind == "linear" and config.scheme == "int4-weight") else "int8"
    act_qparams, smooth = activation or (None, None)
    q_name, s_name = quantizer.buffers(site, layout, smooth)
    with gm.graph.inserting_before(node):
        q_node = insert_get_attr(gm, q_name, like=site.weight)
        s_node = insert_get_attr(gm, s_name, like=site.weight)
        if site.kind == "embedding":
            op, args = ops.embedding_int8, (q_node, s_node, node.args[1])
        elif config.scheme == "int4-weight":
            op, args = ops.linear_int4_weight, (site.x, q_node, s_node, site.bias, config.group)
        elif config.scheme == "int8-static":
            a_node = insert_get_attr(
                gm, add_tensor(gm, site.owner, "input_qparams", act_qparams.clone()), like=site.weight
            )
            m_node = (
                None
                if smooth is None
                else insert_get_attr(gm, add_tensor(gm, site.owner, "input_smooth", smooth.clone()), like=site.weight)
            )
            op, args = ops.linear_int8_static, (site.x, q_node, s_node, a_node, m_node, site.bias)
        else:
            op = ops.linear_int8_dynamic if config.scheme == "int8-dynamic" else ops.linear_int8_weight
            args = (site.x, q_node, s_node, site.bias)
        # the new node keeps the replaced node's value (same shape)
        new = insert_call(gm.graph, op, args, like=node, val=node.meta.get("val"))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return f"optpipe.{op._opname}"


def fuse_shared_input_linears(gm: torch.fx.GraphModule) -> tuple[int, set[str]]:
    """int8-dynamic linears reading the same activation (q, k, v) -> ONE call on their weights
    stacked by output rows, then a split: the activation is quantized once, not once per linear,
    and the GEMM is wider. Exact: per-output-channel weight scales and per-token activation scales
    are the same rows either way. Layers sharing their weights (ALBERT) share the stacked copy too.
    Returns (linears fused, buffer targets no longer read)."""
    op = ops.linear_int8_dynamic
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (op, getattr(op, "default", None)):
            groups.setdefault(node.args[0], []).append(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    fused, replaced, stacked = 0, set(), {}
    for x, members in groups.items():
        names = _stacked_buffers(gm, members, stacked)
        if names is None:
            continue
        rows = [weight_tensor(gm, m.args[1].target).shape[0] for m in members]
        first = min(members, key=order.__getitem__)
        with gm.graph.inserting_before(first):
            args = [x] + [insert_get_attr(gm, t, like=first.args[1]) if t else None for t in names]
            new = insert_call(gm.graph, op, tuple(args), like=first)
            parts = insert_call(gm.graph, aten.split_with_sizes.default, (new, rows, -1), like=first)
            outs = [insert_call(gm.graph, operator.getitem, (parts, i), like=first) for i in range(len(members))]
        for member, out in zip(members, outs):
            replaced.update(a.target for a in member.args[1:] if isinstance(a, torch.fx.Node) and a.op == "get_attr")
            member.replace_all_uses_with(out)
            gm.graph.erase_node(member)
        fused += len(members)
    return fused, replaced


def _stacked_buffers(gm, members: list[torch.fx.Node], stacked: dict) -> tuple | None:
    """(weight, scale, bias or None) targets of `members`' weights stacked by rows (made once per
    distinct set of weights), or None when they cannot be stacked."""
    if len(members) < 2 or any(not all(isinstance(a, torch.fx.Node) for a in m.args[1:3]) for m in members):
        return None
    weights = [weight_tensor(gm, m.args[1].target) for m in members]
    scales = [weight_tensor(gm, m.args[2].target) for m in members]
    if any(w is None or w.dim() != 2 for w in weights) or len({w.shape[1] for w in weights}) != 1:
        return None
    bias_args = [m.args[3] if len(m.args) > 3 else None for m in members]
    biases = [weight_tensor(gm, b.target) if isinstance(b, torch.fx.Node) else None for b in bias_args]
    if any(isinstance(a, torch.fx.Node) and b is None for a, b in zip(bias_args, biases)):
        return None  # a bias computed in the graph, not a stored one
    key = tuple(id(t) if t is not None else None for t in weights + scales + biases)
    if key in stacked:
        return stacked[key]
    owner = _common_prefix([m.args[1].target.rpartition(".")[0] for m in members])
    bias = None
    if any(b is not None for b in biases):
        zeros = [torch.zeros(w.shape[0], dtype=scales[0].dtype) for w in weights]
        bias = add_tensor(
            gm, owner, "fused_bias", torch.cat([b if b is not None else z for b, z in zip(biases, zeros)])
        )
    stacked[key] = (
        add_tensor(gm, owner, "fused_weight_int8", torch.cat(weights)),
        add_tensor(gm, owner, "fused_weight_scale", torch.cat(scales)),
        bias,
    )
    return stacked[key]


def _common_prefix(paths: list[str]) -> str:
    common = []
    for parts in zip(*(p.split(".") for p in paths)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _drop_unused_weights(gm: torch.fx.GraphModule, candidates: set[str]) -> list[str]:
    """Delete fp32 weights that no graph node reads any more, under every name they have (a tied
    embedding is registered under both of its names even when the graph reads only one)."""
    read = {id(weight_tensor(gm, n.target)) for n in gm.graph.nodes if n.op == "get_attr"}
    dead = {id(t) for t in (weight_tensor(gm, c) for c in candidates) if t is not None and id(t) not in read}
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    dropped = []
    for target, tensor in named:
        if id(tensor) in dead:
            owner_path, _, name = target.rpartition(".")
            delattr(gm.get_submodule(owner_path) if owner_path else gm, name)
            dropped.append(target)
    return dropped


def state_bytes(module: torch.nn.Module) -> int:
    """Bytes of distinct parameters and buffers (what the saved program stores)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _decide(gm, site, config: QuantizeConfig) -> str | None:
    """Why `site` stays as it is (None: quantize it)."""
    if isinstance(site, str):
        return site
    if site.kind == "embedding" and not config.embeddings:
        return "embeddings=false"
    skipped_by = path_matches(site.path, config.skip)
    if skipped_by:
        return f"skip={skipped_by}"
    if not path_matches(site.path, config.modules):
        return f"not selected by modules={list(config.modules)}"
    return _refusal(gm, site, config)


# -- size guard: a compression pass never makes the model bigger -----------------------------------------------
def _quantized_bytes(n: int, k: int, layout: str, config: QuantizeConfig) -> int:
    """Bytes of one weight's quantized buffers: int8 [N,K] + fp32 scale [N]; int4 [N,K/2] + fp32 [N,K/g,2]."""
    if layout == "int4":
        return n * (k // 2) + n * (k // config.group) * 2 * 4
    return n * k + n * 4


def _growth_refusals(gm, decided: list, config: QuantizeConfig) -> dict[torch.fx.Node, str]:
    """{site node: reason} for the chosen sites whose weight would cost more bytes quantized than it
    frees: a weight another reader keeps in fp32 (a tied LM head whose embedding stays fp32) gains an
    int8 copy and frees nothing; a tiny weight's scales can outweigh its savings."""
    by_weight: dict[int, list] = {}
    for node, site, reason in decided:
        if isinstance(site, WeightSite):
            by_weight.setdefault(id(weight_tensor(gm, site.weight.target)), []).append((node, site, reason))
    why_fp32 = {node: (site.path, reason) for node, site, reason in decided if isinstance(site, WeightSite)}
    refusals = {}
    for entries in by_weight.values():
        chosen = [(node, site) for node, site, reason in entries if reason is None]
        if not chosen:
            continue
        tensor = weight_tensor(gm, chosen[0][1].weight.target)
        chosen_nodes = {node for node, _ in chosen}
        fp32_readers = [n for n in weight_readers(gm, tensor) if n not in chosen_nodes]
        freed = 0 if fp32_readers else tensor.numel() * tensor.element_size()
        added, layouts = 0, set()
        for _, site in chosen:
            n, k = linear_shape(gm, site) if site.kind == "linear" else tuple(tensor.shape)
            layout = "int4" if (site.kind == "linear" and config.scheme == "int4-weight") else "int8"
            if (layout, site.transposed) not in layouts:
                layouts.add((layout, site.transposed))
                added += _quantized_bytes(n, k, layout, config)
            if config.scheme == "int8-static" and site.kind == "linear":
                added += 8 + 4 * k  # input_qparams and (at most) input_smooth
        if added < freed:
            continue
        reader = fp32_readers[0] if fp32_readers else None
        if reader in why_fp32:
            path, why = why_fp32[reader]
            reason = f"weight shared with {path}, which stays fp32 ({why}): an int8 copy would add {added:,} bytes"
        elif reader is not None:
            reason = (
                f"weight also read by {reader.name} ({reader.target}) in fp32: an int8 copy would add {added:,} bytes"
            )
        else:
            reason = f"quantized buffers ({added:,} bytes) would not be smaller than the fp32 weight ({freed:,})"
        refusals.update(dict.fromkeys(chosen_nodes, reason))
    return refusals


# -- calibration (int8-static) ----------------------------------------------------------------------------
class _RangeRecorder(torch.fx.Interpreter):
    """Runs the fp32 graph, keeping per input channel of each watched node its min and max, and a
    few random rows (tokens) of it."""

    def __init__(self, gm, watched: set, generator: torch.Generator, rows_per_set: int):
        super().__init__(gm)
        self.watched, self.g, self.rows_per_set = watched, generator, rows_per_set
        self.stats: dict[torch.fx.Node, dict] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watched and isinstance(out, torch.Tensor) and out.numel():
            rows = out.detach().float().reshape(-1, out.shape[-1])
            st = self.stats.setdefault(n, {"min": rows.amin(0), "max": rows.amax(0), "rows": []})
            st["min"], st["max"] = torch.minimum(st["min"], rows.amin(0)), torch.maximum(st["max"], rows.amax(0))
            keep = torch.randperm(rows.shape[0], generator=self.g)[: self.rows_per_set]
            st["rows"].append(rows[keep])
        return out


def _dense_weights(gm, sites: list[WeightSite]) -> torch.Tensor:
    """The [ΣN, K] fp32 weights of every linear reading the same input, stacked."""
    return torch.cat([logical_weight(gm, s).float() for s in sites])


def _activation_choice(st: dict, weight: torch.Tensor, alpha: float, method: str):
    """(act_qparams, smoothing or None, output squared error on the kept rows) at SmoothQuant α."""
    smooth = None
    divisor = torch.ones_like(st["min"])
    if alpha:
        x_absmax = torch.maximum(st["max"], st["min"].neg())
        smooth = divisor = ops.smoothing_factors(x_absmax, weight.abs().amax(0), alpha)
    rows = torch.cat(st["rows"])
    scaled = rows / divisor
    lo, hi = float((st["min"] / divisor).min()), float((st["max"] / divisor).max())
    sample = scaled.reshape(-1)
    if sample.numel() > SAMPLE:
        sample = sample[torch.randperm(sample.numel(), generator=torch.Generator().manual_seed(0))[:SAMPLE]]
    if method == "mse":
        lo, hi = ops.mse_range(sample, lo, hi)
    elif method == "percentile":
        lo, hi = (float(torch.quantile(sample, q)) for q in (1 - PERCENTILE / 100, PERCENTILE / 100))
    qparams = ops.calibrated_qparams(lo, hi)
    q, w_scale = ops.quantize_int8_per_channel(weight * divisor[None, :])
    ref = rows @ weight.t()
    out = ops.int8_static_reference(scaled, q, w_scale, qparams, None, None)
    return qparams, smooth, float((out - ref).pow(2).sum())


def _calibrate(
    program: Program, gm, sites: list[WeightSite], config: QuantizeConfig, all_sites: list[WeightSite]
) -> tuple[dict, dict]:
    """({input node: (act_qparams [2], smoothing [K] or None)}, details): one per-tensor uint8 range
    and one smoothing per distinct input, so linears reading the same activation (q, k, v) share it."""
    from optpipe.calibration import calibration_inputs

    sets = calibration_inputs(program, limit=config.calibration_batches)
    recorder = _RangeRecorder(
        gm, {site.x for site in sites}, torch.Generator().manual_seed(0), max(1, CALIBRATION_ROWS // len(sets))
    )
    with torch.no_grad():
        for inputs in sets:
            recorder.run(*inputs)
    by_input: dict[torch.fx.Node, list[WeightSite]] = {}
    for site in sites:
        by_input.setdefault(site.x, []).append(site)
    alphas = SMOOTHING_ALPHAS if config.smoothing is None else (config.smoothing,)
    readers: dict[int, set] = {}  # weight tensor -> the inputs it is applied to (embedding: None)
    for site in all_sites:
        readers.setdefault(id(weight_tensor(gm, site.weight.target)), set()).add(site.x)
    activations, chosen = {}, {}
    with torch.no_grad():
        for node, st in recorder.stats.items():
            weight = _dense_weights(gm, by_input[node])
            # a weight shared with another input or an embedding (a tied LM head) keeps one int8 copy:
            # smoothing it for this input would need a second
            tied = any(readers[id(weight_tensor(gm, s.weight.target))] != {node} for s in by_input[node])
            options = [
                (_activation_choice(st, weight, a, config.calibration_method), a) for a in ((0.0,) if tied else alphas)
            ]
            (qparams, smooth, _), alpha = min(options, key=lambda o: o[0][2])
            activations[node] = (qparams, smooth)
            chosen[alpha] = chosen.get(alpha, 0) + 1
    source = "attached calibration data" if program.calibration else "verification inputs"
    return activations, {
        "source": source,
        "sets": len(sets),
        "method": config.calibration_method,
        "smoothing": {f"{a:g}": n for a, n in sorted(chosen.items())},
        "inputs": len(activations),
    }


@register_pass("quantize", QuantizeConfig, exact=False, takes=("float-linears",))
def quantize(program: Program, config: QuantizeConfig) -> PassResult:
    """Quantize linear layers (int8-dynamic, int8-static, int8-weight or int4-weight) and, with
    embeddings=true, embedding tables to int8 optpipe ops; fp32 weights no longer read are removed."""
    gm = program.gm
    bytes_before = state_bytes(gm)
    quantizer = _Quantizer(gm, config)
    decided = []
    for node in list(gm.graph.nodes):
        site = weight_site(gm, node)
        if site is not None:
            decided.append((node, site, _decide(gm, site, config)))
    growth = _growth_refusals(gm, decided, config)
    decided = [(node, site, reason or growth.get(node)) for node, site, reason in decided]
    calibration, act_qparams = None, {}
    chosen = [site for _, site, reason in decided if reason is None]
    linears = [site for site in chosen if site.kind == "linear"]
    if config.scheme == "int8-static" and linears:
        act_qparams, calibration = _calibrate(program, gm, linears, config, chosen)
    details, weights = [], set()
    for node, site, reason in decided:
        path = site.path if isinstance(site, WeightSite) else module_path(node)
        entry = {"module_path": path, "node": node.name, "kind": getattr(site, "kind", "linear")}
        if reason is None and site.kind == "linear" and config.scheme == "int8-static" and site.x not in act_qparams:
            reason = "input not reached by the calibration inputs"
        if reason is not None:
            details.append({**entry, "action": "skipped", "reason": reason})
            continue
        weights.add(site.weight.target)
        activation = act_qparams.get(site.x) if site.kind == "linear" else None
        entry["op"] = _rewrite(gm, site, config, quantizer, activation)
        if activation is not None:
            entry["act_scale"], entry["act_zero_point"] = float(activation[0][0]), int(activation[0][1])
        details.append({**entry, "action": "quantized"})
    quantized = sum(1 for d in details if d["action"] == "quantized")
    dropped, fused = [], 0
    if quantized:
        if config.scheme == "int8-dynamic":
            fused, unread = fuse_shared_input_linears(gm)
            weights |= unread
        eliminate_dead_code(gm)
        dropped = _drop_unused_weights(gm, weights)
        gm.graph.lint()
        gm.recompile()
    kept = sorted(t for t in weights - set(dropped) if weight_tensor(gm, t) is not None)
    stats = {
        "quantized": quantized,
        "skipped": len(details) - quantized,
        "fused": fused,
        "bytes_before": bytes_before,
        "bytes_after": state_bytes(gm),
    }
    result = {"modules": details, "skipped": _skipped(details), "notes": _notes(details, stats)}
    if calibration is not None:
        result["calibration"] = calibration
    if kept:
        result["fp32_weights_kept"] = dict.fromkeys(
            kept, "still read by a node that was not quantized (tied or skipped)"
        )
    return PassResult(bool(quantized), stats, result)


def _skipped(details: list[dict]) -> list[dict]:
    """The per-site reporting contract: {"site", "reason"} for every site left as it was."""
    return [{"site": d["module_path"], "reason": d["reason"]} for d in details if d["action"] == "skipped"]


def _notes(details: list[dict], stats: dict) -> list[str]:
    if not details:
        return [
            "no site found: no aten.linear / addmm / mm / matmul on a stored 2-d weight (nor embedding); "
            "nothing to quantize"
        ]
    if not stats["quantized"]:
        return [f"nothing quantized: all {len(details)} sites were skipped (see skipped for the reasons)"]
    return []


__all__ = ["SCHEMES", "QuantizeConfig", "path_matches", "quantize", "state_bytes"]
