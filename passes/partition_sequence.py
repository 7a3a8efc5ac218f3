"""partition{strategy=sequence,ways=N}: sequence (context) parallelism planned on the graph.

One sequence is split over N ranks: rank r holds a shard of T/N tokens of every input with a
sequence dim (dim 1 of `input_ids`), and every weight whole. The shard order (`balance`) is
zig-zag where every attention site is dense causal SDPA: with 2N chunks of T/2N tokens, rank r
holds chunks r and 2N-1-r, so each rank computes the same share of the causal score triangle
(contiguous shards give the last rank 2N-1 times the first's); elsewhere contiguous, rank r
holding [r·T/N, (r+1)·T/N), because the halo and the prefix scan talk to the rank holding the
tokens just before (a program mixing dense causal with windowed or linear sites stays contiguous;
the plan's "order_reason" says why; `balance=contiguous` forces contiguous shards, `balance=zigzag`
refuses a program it cannot zig-zag). Token-wise ops (embeddings, norms, projections, MLPs, the LM
head) run on the shard as they are; what mixes tokens gets the exchange its form needs
(passes/partition_sequence_ops.py):

- positions: every `arange` over the sequence (learned position embeddings, rotary tables built
  from it) is shifted to the shard's global offsets (`sequence_positions`; zig-zag: each chunk's);
- dense causal (or bidirectional) SDPA: ring attention (`seq_ring_attention`): K/V shards go
  around the ring, merged with an online softmax; (N-1) K/V shards sent per rank forward, and the
  backward passes them again with their gradients. Grouped-query K/V travel unrepeated; the causal
  mask is by global position (zig-zag: half a block per step is visible, and only it is computed);
- causal sliding-window attention (`optpipe.sparse_attention`, pattern sliding-window): a halo
  exchange (`seq_halo`): each rank receives only the last `window`-1 keys/values of its left
  neighbour, so communication is O(window), not O(T); backward sends the halo's gradient back;
- causal linear attention (`optpipe.linear_attention`): an exclusive prefix scan (`seq_prefix`)
  of the per-rank state Σφ(k)vᵀ [B, Hkv, F, Dv] and Σφ(k) [B, Hkv, F]: O(F·Dv) per layer whatever
  the length; backward the suffix scan of their gradients.
Replicated parameters get partial gradients on each rank (its tokens' share); the runtime sums them
over the ranks (`optpipe.runtime.sequence_parallel`), so every rank takes the same optimizer step.

Preconditions: the program's sequence dim is dynamic (capture marks it so where the model allows),
the example sequence length divides by `ways`, attention is one node per site (run `fuse-attention`
and any `attention{...}` swap first), and every attention site has a form listed above. Errors (one
line, with a hint): sequence not divisible, a static sequence dim, a form this cannot split
(bidirectional or block/random/strided sparse, non-causal linear, performer, linformer, an explicit
mask or padding mask, dropout), a window longer than a shard.

The graph is kept; the plan (JSON) goes into `program.meta["partition"]` with `strategy:
"sequence"`, the `order` (and `order_reason`), each rank's token ranges (`shards`), the causal
attention work per rank and its max/mean (`causal_attention_imbalance`), and one row per attention
site with its exchange and the bytes it sends per rank per training step (forward + backward; and
what a ring would send on the same site, to compare).
`rank_module(program)` builds the rank program (the same for every rank: whom it talks to comes
from `sequence_parallel_comm`). With `check=true` the N rank programs run as threads of this process
on the example inputs' shards and must reproduce the program's outputs (fp32-close). Stats:
{"ways", "attention_sites", "ring", "halo", "prefix_scan", "positions", "bytes_per_step", "zigzag"}.
"""

from __future__ import annotations

import json
import threading

import torch
import torch.fx

from optpipe.analysis import concrete_shapes
from optpipe.errors import PassError
from optpipe.graph_toolkit import insert_call, module_path
from optpipe.program import Program
from optpipe.registry import PassResult
from optpipe.verify import outputs_close

from .partition_sequence_ops import (
    ThreadComm,
    sequence_dense_attention,
    sequence_linear_attention,
    sequence_parallel_comm,
    sequence_positions,
    sequence_window_attention,
)

aten = torch.ops.aten
FORMAT = "optpipe-partition/1"
SEQ_DIM = 1
SDPA = aten.scaled_dot_product_attention.default
_SPARSE = ("pattern", "causal", "scale", "window", "block", "global_tokens", "random_blocks", "stride", "seed")
_OTHER_ATTENTION = ("performer_attention", "linformer_attention", "score_mod_attention")


# -- which exchange each attention site gets ---------------------------------------------------------
def _arg(node: torch.fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _refuse(node: torch.fx.Node, what: str, hint: str):
    raise PassError(
        f"partition: sequence parallel cannot split the attention at {module_path(node) or node.name}: {what}", hint
    )


def _optpipe_op(node: torch.fx.Node) -> str | None:
    target = node.target
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "optpipe":
        return target._opname
    return None


def classify(node: torch.fx.Node) -> dict | None:
    """{"form": "ring" | "halo" | "prefix-scan", ...} for an attention node; None for other nodes.
    Raises PassError for an attention form that cannot be split over the sequence."""
    if node.op != "call_function":
        return None
    if node.target is SDPA:
        if _arg(node, 3, "attn_mask") is not None:
            _refuse(node, "SDPA with an explicit mask", "fuse-attention first (a causal mask becomes is_causal)")
        if _arg(node, 4, "dropout_p", 0.0):
            _refuse(node, "attention dropout", "train without attention dropout")
        return {"form": "ring", "causal": bool(_arg(node, 5, "is_causal", False)), "scale": _arg(node, 6, "scale")}
    name = _optpipe_op(node)
    if name == "sparse_attention":
        args = {n: _arg(node, i + 4, n) for i, n in enumerate(_SPARSE)}
        if args["pattern"] != "sliding-window" or not args["causal"]:
            what = f"{'causal' if args['causal'] else 'bidirectional'} {args['pattern']} sparse attention"
            _refuse(node, what, "only causal sliding-window, dense and causal linear attention split")
        if _arg(node, 3, "key_padding_mask") is not None or _arg(node, 13, "bias") is not None:
            _refuse(node, "a padding mask or score bias", "train causal LMs without padding")
        return {"form": "halo", "window": int(args["window"]), **args}
    if name == "linear_attention":
        if not _arg(node, 5, "causal"):
            _refuse(
                node, "bidirectional linear attention", "use the causal form (attention{kind=linear} on a causal LM)"
            )
        if _arg(node, 3, "key_padding_mask") is not None:
            _refuse(node, "a padding mask", "train causal LMs without padding")
        return {
            "form": "prefix-scan",
            "feature_map": _arg(node, 4, "feature_map", "elu"),
            "chunk": _arg(node, 6, "chunk", 64),
        }
    if name in _OTHER_ATTENTION:
        _refuse(node, name.replace("_", " "), "use dense, sliding-window or linear attention")
    return None


def _is_position(node: torch.fx.Node, seq) -> bool:
    """An `arange` whose length is the sequence's (positions, rotary tables, masks built from it)."""
    if node.op != "call_function" or getattr(node.target, "overloadpacket", None) is not aten.arange:
        return False
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 1 and str(val.shape[0]) == str(seq)


def _sequence_symbol(program: Program):
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    val = placeholders[0].meta.get("val") if placeholders else None
    if not isinstance(val, torch.Tensor) or val.dim() <= SEQ_DIM:
        raise PassError("partition: sequence parallel needs a first input of [batch, seq, ...]", "pass input_ids")
    seq = val.shape[SEQ_DIM]
    if not isinstance(seq, torch.SymInt):
        raise PassError(
            "partition: sequence parallel needs a dynamic sequence dim, the program's is fixed at "
            f"{seq} (its views would keep the full length)",
            "capture with a dynamic seq dim, e.g. --input input_ids:int64[batch=1,seq=128]",
        )
    return seq


# -- bytes each exchange sends ---------------------------------------------------------------------------
def exchange_bytes(row: dict, ways: int) -> dict:
    """Bytes one rank sends per training step (forward, backward) at a site; `ring_*`: a ring's."""
    b, hkv, t, dk = row["key_shape"]
    dv, item = row["value_dim"], row["itemsize"]
    local = t // ways
    kv = b * hkv * local * (dk + dv) * item
    ring = {"ring_forward_bytes": (ways - 1) * kv, "ring_backward_bytes": (2 * (ways - 1) + 1) * kv}
    if ways == 1:
        ring = {"ring_forward_bytes": 0, "ring_backward_bytes": 0}
    if row["form"] == "ring":
        fwd, bwd = ring["ring_forward_bytes"], ring["ring_backward_bytes"]
    elif row["form"] == "halo":
        fwd = bwd = b * hkv * (row["window"] - 1) * (dk + dv) * item if ways > 1 else 0
    else:  # the state Σφ(k)vᵀ and Σφ(k): F = Dk for elu/relu feature maps
        fwd = bwd = b * hkv * dk * (dv + 1) * item if ways > 1 else 0
    return {"forward_bytes": fwd, "backward_bytes": bwd, "bytes_per_step": fwd + bwd, **ring}


# -- the plan ----------------------------------------------------------------------------------------------
def _site_rows(program: Program, ways: int, local: int) -> list[dict]:
    shapes, _ = concrete_shapes(program.gm, program.example_inputs)
    rows = []
    for node in program.gm.graph.nodes:
        form = classify(node)
        if form is None:
            continue
        key, value = shapes[node.args[1]], shapes[node.args[2]]
        row = {
            "module_path": module_path(node),
            "node": node.name,
            "op": "sdpa" if node.target is SDPA else _optpipe_op(node),
            "form": form["form"],
            "exchange": {"ring": "ring attention", "halo": "halo", "prefix-scan": "prefix scan"}[form["form"]],
            "causal": form.get("causal", True),
            "key_shape": list(key.shape),
            "value_dim": value.shape[-1],
            "itemsize": torch.empty((), dtype=key.dtype).element_size(),
        }
        if form["form"] == "halo":
            row["window"] = form["window"]
            row["halo"] = form["window"] - 1
            if row["halo"] > local and ways > 1:
                raise PassError(
                    f"partition: sequence parallel: the sliding window of {form['window']} at {row['module_path']} "
                    f"reaches past the left neighbour's {local} tokens",
                    f"use fewer ways (each shard at least {row['halo']} tokens) or a longer sequence",
                )
        rows.append({**row, **exchange_bytes(row, ways)})
    return rows


# -- the order of the shards ----------------------------------------------------------------------------------
def choose_order(rows: list[dict], ways: int, length: int, balance: str | None) -> tuple[str, str]:
    """("zigzag" | "contiguous", why) for the sites `rows`; `balance` the user's choice (None: auto).
    Zig-zag evens out causal dense attention; the halo and the prefix scan talk to the shard that
    holds the tokens just before, which only contiguous shards have."""
    causal_rings = [r for r in rows if r["form"] == "ring" and r["causal"]]
    neighbours = sorted({r["exchange"] for r in rows if r["form"] != "ring"})
    refusal = None
    if neighbours:
        refusal = f"the {' and '.join(neighbours)} sites talk to the neighbouring shard, so shards stay contiguous"
    elif length % (2 * ways):
        refusal = f"sequence length {length} does not split into {2 * ways} zig-zag chunks"
    if balance == "zigzag" and refusal:
        hint = "drop balance=zigzag" if neighbours else f"use a sequence length that is a multiple of {2 * ways}"
        raise PassError(f"partition: sequence parallel: balance=zigzag refused: {refusal}", hint)
    if balance == "contiguous":
        return "contiguous", "balance=contiguous"
    if refusal:
        return "contiguous", refusal
    if not causal_rings or ways == 1:
        return "contiguous", "no causal dense attention to balance"
    return "zigzag", "causal dense attention: zig-zag chunks give every rank the same attention work"


def shard_ranges(length: int, ways: int, order: str) -> list[list[list[int]]]:
    """Per rank, the [start, end) token ranges it holds, in its local order."""
    if order == "zigzag":
        c = length // (2 * ways)
        return [[[r * c, (r + 1) * c], [(2 * ways - 1 - r) * c, (2 * ways - r) * c]] for r in range(ways)]
    n = length // ways
    return [[[r * n, (r + 1) * n]] for r in range(ways)]


def causal_work(ways: int, order: str) -> list[float]:
    """Score entries each rank computes for one causal dense site, in shard_len² units: contiguous
    rank r the r shards before and half its own (r + 1/2); zig-zag half a block a step (N/2)."""
    return [ways / 2 if order == "zigzag" else r + 0.5 for r in range(ways)]


def plan_sequence(
    program: Program, ways: int, devices: tuple[str, ...], check: bool, balance: str | None = None
) -> PassResult:
    """The body of `partition{strategy=sequence}` (see the module docstring)."""
    seq = _sequence_symbol(program)
    first = program.example_inputs[0]
    length = int(first.shape[SEQ_DIM])
    if length % ways:
        raise PassError(
            f"partition: sequence parallel: sequence length {length} does not divide into {ways} shards",
            f"use a sequence length that is a multiple of {ways}",
        )
    rows = _site_rows(program, ways, length // ways)
    positions = [n.name for n in program.gm.graph.nodes if _is_position(n, seq)]
    forms = [r["form"] for r in rows]
    order, why = choose_order(rows, ways, length, balance)
    work = causal_work(ways, order) if any(r["form"] == "ring" and r["causal"] for r in rows) else None
    info = {
        "format": FORMAT,
        "strategy": "sequence",
        "ways": ways,
        "devices": list(devices) or ["cpu"] * ways,
        "seq_dim": SEQ_DIM,
        "seq_len": length,
        "shard_len": length // ways,
        "order": order,
        "order_reason": why,
        "shards": shard_ranges(length, ways, order),
        "causal_attention_work": work,
        "causal_attention_imbalance": max(work) / (sum(work) / len(work)) if work else None,
        "sites": rows,
        "positions": positions,
        "bytes_per_step": sum(r["bytes_per_step"] for r in rows),
        "ring_bytes_per_step": sum(r["ring_forward_bytes"] + r["ring_backward_bytes"] for r in rows),
        "example_inputs": [list(x.shape) for x in program.example_inputs if isinstance(x, torch.Tensor)],
    }
    program.meta["partition"] = json.loads(json.dumps(info, default=str))
    if check and ways > 1:
        check_ranks(program)
    stats = {
        "ways": ways,
        "attention_sites": len(rows),
        "ring": forms.count("ring"),
        "halo": forms.count("halo"),
        "prefix_scan": forms.count("prefix-scan"),
        "positions": len(positions),
        "bytes_per_step": info["bytes_per_step"],
        "zigzag": int(order == "zigzag"),
    }
    keys = ("strategy", "seq_len", "shard_len", "order", "order_reason", "causal_attention_imbalance", "sites")
    details = {k: info[k] for k in (*keys, "bytes_per_step", "ring_bytes_per_step")}
    return PassResult(True, stats, details)


# -- a rank's program ---------------------------------------------------------------------------------------
def rank_module(program: Program) -> torch.fx.GraphModule:
    """The rank program of a program planned with `partition{strategy=sequence}`: every attention
    site calls its exchange, every position `arange` is shifted to the shard's offset. The same
    module serves every rank (run it inside `sequence_parallel_comm`); parameters are shared with
    `program.gm`."""
    info = program.meta.get("partition") or {}
    if info.get("strategy") != "sequence":
        raise PassError("the program has no sequence-parallel plan", "add partition{strategy=sequence,ways=N}")
    local = program.copy()
    graph = local.gm.graph
    seq = _sequence_symbol(local)
    zigzag = info.get("order") == "zigzag"
    for node in list(graph.nodes):
        if _is_position(node, seq):
            with graph.inserting_after(node):
                shifted = insert_call(graph, sequence_positions, (node, zigzag), like=node, val=node.meta.get("val"))
            node.replace_all_uses_with(shifted, delete_user_cb=lambda u, s=shifted: u is not s)
            continue
        form = classify(node)
        if form is not None:
            fn, args, name = _site_call(node, form, zigzag)
            with graph.inserting_after(node):
                site = insert_call(graph, fn, args, like=node, val=node.meta.get("val"), name=name)
            node.replace_all_uses_with(site)
            graph.erase_node(node)
    graph.lint()
    local.gm.recompile()
    return local.gm


def _site_call(node: torch.fx.Node, form: dict, zigzag: bool) -> tuple:
    """(function, args, node name) of the rank graph's call at an attention site."""
    q, k, v = node.args[:3]
    if form["form"] == "ring":
        return sequence_dense_attention, (q, k, v, form["scale"], form["causal"], zigzag), "ring_attention"
    if form["form"] == "halo":
        extra = (_arg(node, 14, "score_mod"), _arg(node, 15, "mod_value", 0.0))
        args = (q, k, v, form["window"], form["scale"], form["block"], *extra)
        return sequence_window_attention, args, "halo_window_attention"
    return sequence_linear_attention, (q, k, v, form["feature_map"], form["chunk"]), "prefix_linear_attention"


def shard(x, rank: int, ways: int, length: int, order: str = "contiguous"):
    """Rank `rank`'s shard of an input (tensors with the sequence dim of `length`; others whole):
    contiguous, or zig-zag (chunks rank and 2·ways-1-rank of 2·ways, in that order)."""
    if not (isinstance(x, torch.Tensor) and x.dim() > SEQ_DIM and x.shape[SEQ_DIM] == length):
        return x
    if order == "zigzag":
        chunks = x.chunk(2 * ways, SEQ_DIM)
        return torch.cat([chunks[rank], chunks[2 * ways - 1 - rank]], SEQ_DIM)
    return x.chunk(ways, SEQ_DIM)[rank]


def unshard(parts: list[torch.Tensor], order: str = "contiguous") -> torch.Tensor:
    """The whole sequence from every rank's shard (rank order): `shard`'s inverse."""
    if order == "zigzag":
        halves = [p.chunk(2, SEQ_DIM) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], SEQ_DIM)
    return torch.cat(parts, SEQ_DIM)


def gather(outputs: list, order: str = "contiguous"):
    """The whole-sequence output from every rank's (tensors joined along the sequence dim)."""
    flat = [torch.utils._pytree.tree_flatten(o) for o in outputs]
    leaves = []
    for parts in zip(*(f[0] for f in flat)):
        if isinstance(parts[0], torch.Tensor) and parts[0].dim() > SEQ_DIM:
            leaves.append(unshard(list(parts), order))
        else:
            leaves.append(parts[0])
    return torch.utils._pytree.tree_unflatten(leaves, flat[0][1])


def run_threads(module: torch.fx.GraphModule, inputs: tuple, ways: int, fn=None, order: str = "contiguous") -> list:
    """Run `fn(module, rank_inputs)` (default: the module) on `ways` ranks as threads of this
    process, talking through a `ThreadComm`; each rank's result. Raises the first rank's error.
    `order`: how the inputs are sharded (the plan's "order")."""
    boxes, results, errors = ThreadComm.mailboxes(ways), [None] * ways, {}
    length = inputs[0].shape[SEQ_DIM]
    fn = fn or (lambda m, xs: m(*xs))

    def work(rank: int) -> None:
        try:
            with sequence_parallel_comm(ThreadComm(rank, ways, boxes, timeout=300.0), thread_local=True):
                results[rank] = fn(module, tuple(shard(x, rank, ways, length, order) for x in inputs))
        except Exception as e:  # noqa: BLE001 - reported below with the rank that saw it
            errors[rank] = e

    threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in range(ways)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        rank = min(errors)
        raise PassError(
            f"partition: sequence-parallel rank {rank} failed: {type(errors[rank]).__name__}: {errors[rank]}",
            "this is a bug in the partition pass; --dump-ir DIR shows the program",
        ) from errors[rank]
    return results


def check_ranks(program: Program) -> None:
    """The rank programs, run as threads on the example inputs' shards, reproduce the program."""
    ways, order = program.meta["partition"]["ways"], program.meta["partition"].get("order", "contiguous")
    expected = program.run()
    with torch.no_grad():
        actual = gather(run_threads(rank_module(program), tuple(program.example_inputs), ways, order=order), order)
    if not outputs_close(expected, actual):
        raise PassError(
            "partition: the sequence-parallel ranks do not reproduce the program's outputs (an op mixes "
            "tokens that this pass does not know)",
            "--dump-ir DIR shows the program; file it with the op that mixes tokens",
        )
