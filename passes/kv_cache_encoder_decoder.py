"""kv-cache on an encoder-decoder program (T5, BART): the encoder runs once per prompt, the decoder
becomes a step program with a self-attention cache and a cross-attention K/V computed once.

Before (captured `...ForConditionalGeneration`, after `fuse-attention`):

    logits = model(input_ids, attention_mask, decoder_input_ids)   # encoder + decoder, whole prefix

After (`kv-cache` dispatches here when the program takes `decoder_input_ids`):

    encoder_mask, *cross = encoder(input_ids, attention_mask)      # program.companions["encoder"]
    logits, *caches = step(decoder_input_ids, position_ids, cache_position, key_mask, *caches,
                           encoder_mask, *cross)

- `encoder` (a Program saved in the same archive, `Program.companions`): the encoder and, per
  decoder layer, the cross-attention's K and V projections of its output ([B, heads, S, head_dim]),
  plus `encoder_mask` [B, S] (bool, `attention_mask != 0`). They do not change while decoding.
- `step`: the decoder under the decoder-only step contract (`optpipe.kv_step`): the self-attention
  sites get static [B, kv_heads, max_len, head_dim] caches written at `cache_position` (the dense
  path of the causal-LM pass, `StepBuilder` in `passes/kv_cache_step.py`); the cross-attention
  sites read `cross` (k_0, v_0, k_1, ...) and the mask `encoder_mask[:, None, None, :]`. The
  encoder states are trailing inputs that the step does not return (its outputs are the logits
  and the updated self caches).
- Positions follow the step: learned positions (BART's, offset 2) through `position_ids`, like a
  decoder-only LM; a relative position bias (T5's bucketed one) is computed by the model's own
  bias subgraph from the slot distance [T, L] (key slot - query slot) instead of its [T, T]
  positions, then masked like a dense site.

`program.meta["kv_cache"]` is the decoder-only description plus `"encoder"`: its inputs, the states
it returns (name, shape with None for batch and source length, dtype), the example source length
and the program name in `companions`. Verification runs the encoder on the program's inputs, then
the step as a prefill and decode steps (`optpipe.kv_step.encoder_decoder_logits`): the pass is exact.

Preconditions: inputs exactly (input_ids, attention_mask, decoder_input_ids), one logits output,
every cross-attention an SDPA whose mask is the encoder padding mask (checked by value with a padded
mask), decoder self-attention causal (plus ALiBi or a relative bias). Anything else stops the pass
with the site and the reason.
"""

from __future__ import annotations

import torch
import torch.fx

from optpipe.attention_sites import SDPA, sdpa_arguments
from optpipe.errors import PassError
from optpipe.graph_toolkit import ancestors, module_path, value
from optpipe.kv_step import STEP_INPUTS
from optpipe.program import Program
from optpipe.registry import PassResult

from .cleanup import eliminate_dead_code
from .kv_cache_step import (
    ShapeValues,
    Site,
    attention_site,
    drop_guards,
    evaluate_nodes,
    example_prefill,
    is_attention_site,
    kind_counts,
    model_max_len,
    position_candidates,
    propagate_step_meta,
    rewrite_step,
)

aten = torch.ops.aten
SOURCE_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids")
ENCODER = "encoder"
"""The encoder's name in `Program.companions`."""
_MASKED = -5e3  # an additive mask value at or below this blocks its key (as in kv_cache_step)


def insert_encoder_decoder_cache(program: Program, config) -> PassResult:
    """The `kv-cache` pass on an encoder-decoder program (see the module docstring)."""
    gm = program.gm
    ids, mask, tokens = _inputs(program)
    _check_logits(gm)
    max_len = config.max_len or model_max_len(program)
    example_len = program.example_inputs[2].shape[1]
    if max_len < example_len:
        raise PassError(
            f"kv-cache: max-len {max_len} is shorter than the example decoder input ({example_len} tokens)",
            "give kv-cache{max-len=N} with N >= 1 + new tokens",
        )
    cross, own = _split_sites(gm, tokens)
    _check_cross_masks(program, cross)
    encoder = encoder_program(program, cross)
    source_vals = [value(sdpa_arguments(n)[k]) for n in cross for k in ("key", "value")]
    states = _read_encoder_states(gm, tokens, cross)
    _drop_encoder(gm, ids, mask, tokens, states[0])
    shapes = ShapeValues(gm, tokens, program.example_inputs[2])
    shapes.varying |= _descendants(states)
    sites = [_self_site(n, shapes, max_len) for n in own]
    positions = position_candidates(shapes)
    layers, replaced = rewrite_step(gm, tokens, max_len, sites, positions)
    _describe(program, encoder, layers, cross, source_vals, max_len)
    _propagate_meta(gm, program, source_vals)
    stats = {"sites": len(sites) + len(cross), "cached": len(sites), "cross": len(cross), "positions": replaced}
    stats.update(kind_counts(sites))
    relative = sum(s.relative_bias is not None for s in sites)
    if relative:
        stats["relative-bias"] = relative
    notes = [s.note for s in sites if s.note]
    details = {"max_len": max_len, "layers": layers, "encoder": program.meta["kv_cache"]["encoder"], "notes": notes}
    return PassResult(True, stats, details)


def _inputs(program: Program) -> tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]:
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    if tuple(program.input_names) != SOURCE_INPUTS or len(placeholders) != 3:
        raise PassError(
            f"kv-cache: the encoder-decoder program takes ({', '.join(program.input_names)}); a cached form is "
            "built from one that takes (input_ids, attention_mask, decoder_input_ids)",
            "capture the model with exactly those three inputs (transformers T5/BART ...ForConditionalGeneration)",
        )
    return tuple(placeholders)


def _check_logits(gm: torch.fx.GraphModule) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = list(out.args[0]) if isinstance(out.args[0], (list, tuple)) else [out.args[0]]
    v = value(flat[0]) if len(flat) == 1 and isinstance(flat[0], torch.fx.Node) else None
    if v is None or v.dim() != 3:
        raise PassError(
            "kv-cache: the encoder-decoder program must return one tensor of logits [batch, seq, vocab]",
            "capture the LM head's logits (HF models: the logits output)",
        )


def _descendants(nodes, values_only: bool = False) -> set[torch.fx.Node]:
    """`nodes` and every node computed from them (`values_only`: not through their sizes)."""
    found = set(nodes)
    for node in next(iter(found)).graph.nodes if found else ():
        if values_only and node.target is aten.sym_size.int:
            continue
        if any(a in found for a in node.all_input_nodes):
            found.add(node)
    return found


def _split_sites(gm: torch.fx.GraphModule, tokens: torch.fx.Node) -> tuple[list, list]:
    """(cross-attention sites, decoder self-attention sites): by what their query and key read."""
    decoder = _descendants([tokens], values_only=True)
    cross, own = [], []
    for node in (n for n in gm.graph.nodes if is_attention_site(n)):
        if node.target is not SDPA:
            query, key = node.args[0], node.args[1]
        else:
            a = sdpa_arguments(node)
            query, key = a["query"], a["key"]
        if query not in decoder:
            continue  # the encoder's own attention: it moves to the encoder program
        if key in decoder:
            own.append(node)
        elif node.target is SDPA and not sdpa_arguments(node)["is_causal"]:
            cross.append(node)
        else:
            raise PassError(
                f"kv-cache: cannot cache the cross-attention at {module_path(node) or node.name}: "
                "only dense (SDPA) cross-attention is cached",
                "keep cross-attention dense (attention{...,layers=...}) or generate without a cache",
            )
    if not cross:
        raise PassError(
            "kv-cache: the encoder-decoder program has no cross-attention site to cache",
            "run fuse-attention before kv-cache (--dump-ir DIR shows the graph it got)",
        )
    return cross, own


def _check_cross_masks(program: Program, cross: list) -> None:
    """Each cross-attention mask must be the encoder padding mask broadcast over heads and queries
    (the step computes it from `encoder_mask`): checked at the example with a padded mask."""
    ids, mask, tokens = (n for n in program.gm.graph.nodes if n.op == "placeholder")
    x_ids, x_mask, x_tokens = program.example_inputs
    padded = torch.ones_like(x_mask)
    if padded.shape[1] > 1:
        padded[0, -max(1, padded.shape[1] // 3) :] = 0
    masks = [sdpa_arguments(n)["attn_mask"] for n in cross]
    nodes = [m for m in masks if isinstance(m, torch.fx.Node)]
    found = dict(zip(nodes, evaluate_nodes(program.gm, {ids: x_ids, mask: padded, tokens: x_tokens}, nodes)))
    keys = padded.ne(0)[:, None, None, :]
    for node, m in zip(cross, masks):
        got = found.get(m)
        if got is None or got.dim() > 4 or got.shape[-1] != keys.shape[-1]:
            ok = False
        elif got.dtype == torch.bool:
            ok = bool((got == keys).all())
        else:
            allowed = got > _MASKED
            ok = bool((allowed == keys).all()) and float(got.masked_fill(~allowed, 0).abs().max()) == 0.0
        if not ok:
            raise PassError(
                f"kv-cache: the cross-attention at {module_path(node) or node.name} has a mask other than "
                "the encoder padding mask",
                "only cross-attention masked by attention_mask alone can be cached",
            )


def encoder_program(program: Program, cross: list) -> Program:
    """The encoder: (input_ids, attention_mask) -> (encoder_mask, k_0, v_0, k_1, ...) where k_i,
    v_i are cross-attention site i's key and value ([B, heads, S, head_dim])."""
    enc = program.copy()
    gm = enc.gm
    by_name = {n.name: n for n in gm.graph.nodes}
    ids, mask, tokens = (n for n in gm.graph.nodes if n.op == "placeholder")
    states = [by_name[sdpa_arguments(n)[k].name] for n in cross for k in ("key", "value")]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        keys = gm.graph.call_function(aten.ne.Scalar, (mask, 0))
    out.args = (tuple([keys] + states),)
    _plain_calls(gm)
    for node in list(tokens.users):  # the batch size, read from the decoder's ids
        if node.target is aten.sym_size.int and node.args[1] == 0:
            node.args = (ids, 0)
    _remove_dead(gm)
    if [u for u in tokens.users if u.target is not aten._assert_tensor_metadata.default]:
        raise PassError(
            "kv-cache: the cross-attention keys and values depend on the decoder's input",
            "only an encoder that reads input_ids and attention_mask alone can run once per prompt",
        )
    for node in list(tokens.users):
        gm.graph.erase_node(node)
    gm.graph.erase_node(tokens)
    gm.graph.lint()
    gm.recompile()
    enc.example_inputs = tuple(program.example_inputs[:2])
    enc.input_names = list(SOURCE_INPUTS[:2])
    enc.dynamic_shapes = list(program.dynamic_shapes[:2]) if program.dynamic_shapes else None
    enc.meta = {"role": "encoder", "config": program.meta.get("config") or {}}
    enc.history = []
    return enc


def _plain_calls(gm: torch.fx.GraphModule) -> None:
    """Positional inputs and outputs (no pytree specs), no input guards of the old signature."""
    gm.graph._codegen = torch.fx.graph.CodeGen()
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(gm, attr):
            delattr(gm, attr)
    drop_guards(gm)


def _remove_dead(gm: torch.fx.GraphModule) -> None:
    """Dead code, and attention nothing reads (SDPA counts as impure for its dropout argument)."""
    while True:
        eliminate_dead_code(gm)
        unread = [n for n in gm.graph.nodes if is_attention_site(n) and not n.users]
        if not unread:
            return
        for node in unread:
            gm.graph.erase_node(node)


def _read_encoder_states(gm: torch.fx.GraphModule, tokens: torch.fx.Node, cross: list) -> list[torch.fx.Node]:
    """New inputs encoder_mask, cross_k_i, cross_v_i; each cross-attention site reads them."""
    names = ["encoder_mask"] + [f"cross_{kv}_{i}" for i in range(len(cross)) for kv in ("k", "v")]
    states, last = [], tokens
    for name in names:
        with gm.graph.inserting_after(last):
            last = gm.graph.placeholder(name)
        states.append(last)
    with gm.graph.inserting_before(cross[0]):
        view = gm.graph.call_function(aten.unsqueeze.default, (states[0], 1))
        view = gm.graph.call_function(aten.unsqueeze.default, (view, 1))  # [B, 1, 1, S]
    for i, node in enumerate(cross):
        kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}
        node.args = (node.args[0], states[1 + 2 * i], states[2 + 2 * i], view) + tuple(node.args[4:])
        node.kwargs = kwargs
    return states


def _drop_encoder(gm, ids, mask, tokens, encoder_mask) -> None:
    """Remove the encoder from the step graph: the sizes it still reads come from the step's inputs."""
    _plain_calls(gm)
    for node in list(ids.users) + list(mask.users):
        if node.target is aten.sym_size.int:
            node.args = (tokens, 0) if node.args[1] == 0 else (encoder_mask, 1)
    _remove_dead(gm)
    for source in (ids, mask):
        users = [u for u in source.users if u.target is not aten._assert_tensor_metadata.default]
        if users:
            raise PassError(
                f"kv-cache: the decoder reads {source.name} other than through cross-attention "
                f"({users[0].name} at {module_path(users[0]) or 'the root'})",
                "only a decoder that sees the encoder through cross-attention can be cached",
            )
        for node in list(source.users):
            gm.graph.erase_node(node)
        gm.graph.erase_node(source)


def _self_site(node: torch.fx.Node, shapes: ShapeValues, max_len: int) -> Site:
    """A decoder self-attention site: causal with a relative position bias (T5), or what
    `attention_site` takes (causal, ALiBi, sliding window)."""
    if node.target is SDPA:
        a = sdpa_arguments(node)
        relative = _relative_bias(a["attn_mask"], shapes)
        if relative is not None:
            path = module_path(node) or node.name
            site = Site(node, "dense", path, a["query"], a["key"], a["value"], a["scale"], bool(a["enable_gqa"]))
            site.relative_bias = relative
            site.note = f"{path}: relative position bias follows the cache slots"
            return site
    return attention_site(node, shapes, max_len)


def _relative_bias(mask, shapes: ShapeValues) -> tuple | None:
    """(distance, bias, negate) when `mask` is causal with a score bias computed from a relative
    distance matrix (key - query positions, [T, T]); None otherwise."""
    n = max(shapes.lengths(8))  # the example's length, or 8 where the decoder length is dynamic
    if not shapes.shape_only(mask) or n < 2:
        return None
    upstream = ancestors(mask)
    cone = [node for node in mask.graph.nodes if node in upstream and shapes.shape_only(node)]  # in graph order
    values = dict(zip(cone, shapes.evaluate(cone, n)))
    steps = torch.arange(n)
    distance = steps[None, :] - steps[:, None]
    found = None
    for node in cone:
        v = values[node]
        integer = isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype != torch.bool
        if integer and v.shape == (n, n) and (torch.equal(v, distance) or torch.equal(v, -distance)):
            found = (node, bool(torch.equal(v, -distance)))
            break
    if found is None:
        return None
    bias = _frontier(found[0], cone)
    if bias is None:
        return None
    m, b = values[mask], values[bias]
    allowed = m > _MASKED if m.is_floating_point() else None
    causal = distance <= 0
    if allowed is None or not bool((allowed == causal).all()):
        return None
    if not torch.allclose(m, torch.where(causal, b.expand_as(m), m), atol=0, rtol=0):
        return None
    return found[0], bias, found[1]


def _frontier(distance: torch.fx.Node, cone: list) -> torch.fx.Node | None:
    """The last node computed from `distance` alone before it meets the rest of the mask (the causal
    part): the score bias."""
    inside = set(cone)
    reads = _descendants([distance]) & inside
    for node in cone:
        if node in reads and any(
            u in inside and any(_computed(a, reads) for a in u.all_input_nodes) for u in node.users
        ):
            return node
    return None


def _computed(node: torch.fx.Node, reads: set) -> bool:
    """A computed tensor (not a weight or constant) that does not read the distance."""
    return node not in reads and node.op == "call_function" and value(node) is not None and value(node).dim() > 0


def _describe(program: Program, encoder: Program, layers: list, cross: list, source_vals: list, max_len: int) -> None:
    """program.meta["kv_cache"], the step's inputs, example inputs and dynamic dims."""
    states = [{"name": "encoder_mask", "shape": [None, None], "dtype": "bool"}]
    for i, v in enumerate(source_vals):
        name = f"cross_{'kv'[i % 2]}_{i // 2}"
        states.append({"name": name, "shape": [None, int(v.shape[1]), None, int(v.shape[3])], "dtype": _dtype(v)})
    x_ids, x_mask, x_tokens = program.example_inputs
    config = program.meta.get("config") or {}
    program.meta["kv_cache"] = {
        "max_len": max_len,
        "inputs": list(STEP_INPUTS),
        "layers": layers,
        "token_input": "decoder_input_ids",
        "encoder": {
            "program": ENCODER,
            "inputs": list(SOURCE_INPUTS[:2]),
            "source_inputs": list(SOURCE_INPUTS),
            "states": states,
            "source_len": int(x_ids.shape[1]),
            "cross_layers": [module_path(n) or n.name for n in cross],
            "decoder_start_token_id": config.get("decoder_start_token_id"),
        },
    }
    program.companions[ENCODER] = encoder
    with torch.no_grad():
        encoder_states = tuple(encoder.gm(x_ids, x_mask))
    program.example_inputs = example_prefill(x_tokens, program.meta["kv_cache"]) + encoder_states
    cache_names = [c["name"] for layer in layers for c in layer["caches"]]
    program.input_names = list(STEP_INPUTS) + cache_names + [s["name"] for s in states]
    program.dynamic_shapes = (
        [{0: "batch", 1: "decoder_seq"}, {0: "batch", 1: "decoder_seq"}, {0: "decoder_seq"}, {0: "batch", 1: "kv_len"}]
        + [{0: "batch"}] * len(cache_names)
        + [{0: "batch", 1: "seq"}]
        + [{0: "batch", 2: "seq"}] * (len(states) - 1)
    )


def _dtype(v: torch.Tensor) -> str:
    return str(v.dtype).replace("torch.", "")


def _propagate_meta(gm: torch.fx.GraphModule, program: Program, source_vals: list) -> None:
    """Fake values (symbolic batch, decoder length, filled length and source length) for every node:
    the step's, then the encoder mask and the cross K/V at the source length."""
    source = source_vals[0].shape[2]

    def encoder_states(batch):
        yield torch.empty(batch, source, dtype=torch.bool)
        yield from (torch.empty(batch, v.shape[1], source, v.shape[3], dtype=v.dtype) for v in source_vals)

    propagate_step_meta(
        gm,
        program,
        what="the encoder-decoder step program",
        hint="rerun with --dump-ir DIR to see the graph",
        extra=encoder_states,
        fake_values=source_vals,
    )
