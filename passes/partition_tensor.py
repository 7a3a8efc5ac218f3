"""partition{strategy=tensor,ways=N}: tensor (model) parallelism planned on the graph, run on DTensor.

Megatron-style sharding of every attention and MLP block over N ranks:
- attention: the Q/K/V projections are split column-wise by heads (rank r holds heads
  [r·H/N, (r+1)·H/N); under grouped-query attention a unit is a K/V head with the query heads that
  share it; a fused QKV projection gives each rank its rows of Q, of K and of V), every rank runs
  SDPA on its own heads, and the output projection is split row-wise (its input columns);
- MLP: the up (and gate) projections column-wise, the down projection row-wise.
Everything else (embeddings, norms, the LM head, blocks this pass cannot shard) is replicated.

The blocks are found on use-def structure by the structured `prune` pass's analysis (the same
head and MLP groups; run `fuse-attention` first so attention is one SDPA node), and a rank's
program is that program with the other ranks' units removed (`rank_module`): smaller weights, and
the graph's head counts and widths rewritten (`view(B,S,12,64)` -> `view(B,S,6,64)`). Two
collectives are added per block, the `f` and `g` of Megatron-LM, through DTensor
(`optpipe.passes.partition_tensor_ops.tp_copy` / `tp_reduce`):
    tp_copy(x)     before the column-wise projections: identity forward; backward all-reduces the
                   gradient of the replicated input (each rank holds only its heads' share);
    tp_reduce(y)   after the row-wise projection, before its bias: all-reduce (sum) forward;
                   identity backward.
So a forward costs two all-reduces of [batch, seq, hidden] per transformer block, and replicated
parameters get identical gradients on every rank without further communication.

The pass keeps the graph and stores the plan (JSON) in `program.meta["partition"]` with
`strategy: "tensor"`; `optpipe.runtime.parallel.tensor_run` / `tensor_train` (and `optpipe train
--tensor-parallel N`) start the ranks. With `check=true` it builds the N rank programs and runs
them in lock step in this process (the all-reduce is a sum across the N programs) on the example
inputs, and requires the program's outputs (fp32 close: the sum order differs).

Errors: no shardable block; a block whose heads (K/V heads under GQA) or MLP channels do not
divide by `ways`. Stats: {"ways", "sharded_blocks", "replicated_blocks", "sharded_params",
"params_per_rank", "all_reduces"}; details: one row per block (kind, units, per rank, linears
column-/row-wise) and the replicated ones with the reason.
"""

from __future__ import annotations

import functools
import json

import torch
import torch.fx

from optpipe.errors import PassError
from optpipe.passes.partition_tensor_ops import tp_copy, tp_reduce
from optpipe.program import Program
from optpipe.registry import PassResult
from optpipe.verify import outputs_close
from optpipe.weight_sites import linear_shape, weight_tensor

from . import prune as _prune

aten = torch.ops.aten
FORMAT = "optpipe-partition/1"


def _groups(gm: torch.fx.GraphModule) -> tuple[list, list[dict]]:
    """(shardable head and MLP groups, replicated candidates with the reason)."""
    groups, refused = _prune.find_groups(gm, _prune.PruneConfig(method="structured", target="all"))
    kept, replicated = [], [dict(r, action="replicated") for r in refused]
    for g in groups:
        reason = None
        if any(_prune.is_tied(gm, s) for s in g.linears()):
            reason = "a weight is tied to another module"
        elif _shared_parameter(gm, g):
            reason = (
                f"the attention reads {_shared_parameter(gm, g)}, a parameter of all heads (its "
                "gradient would need another all-reduce)"
            )
        if reason:
            replicated.append({"module_path": g.path, "kind": g.kind, "action": "replicated", "reason": reason})
        else:
            kept.append(g)
    return kept, replicated


def _shared_parameter(gm, g) -> str | None:
    """A trainable parameter read inside the head-parallel region (linformer's sequence projections)."""
    own = {t.target for s in g.linears() for t in (s.weight, s.bias) if t is not None}
    for n in g.nodes:
        for a in n.all_input_nodes:
            if (
                a.op == "get_attr"
                and a.target not in own
                and isinstance(weight_tensor(gm, a.target), torch.nn.Parameter)
            ):
                return a.target
    return None


def _group_key(g) -> str:
    return g.consumer.site.weight.target


def _units(g, rank: int, ways: int) -> list[int]:
    per = g.units // ways
    return list(range(rank * per, (rank + 1) * per))


def _param_count(gm) -> int:
    return sum(t.numel() for t in {id(p): p for p in gm.parameters()}.values())


def plan_tensor(program: Program, ways: int, devices: tuple[str, ...], check: bool) -> PassResult:
    """The body of `partition{strategy=tensor}` (see the module docstring)."""
    gm = program.gm
    groups, replicated = _groups(gm)
    if not groups:
        reasons = "; ".join(f"{r['module_path']}: {r['reason']}" for r in replicated[:3])
        raise PassError(
            "partition: no attention or MLP block to shard for tensor parallelism"
            + (f" ({reasons})" if reasons else ""),
            "run fuse-attention first, so attention is one SDPA node",
        )
    for g in groups:
        if g.units % ways:
            what = {"head": "heads", "kv-group": "K/V heads", "channel": "MLP channels"}[g.unit_name]
            raise PassError(
                f"partition: {ways}-way tensor parallel: {g.path} has {g.units} {what}, not divisible by {ways}",
                f"use ways that divide {g.units}",
            )
    rows = []
    sharded = 0
    for g in groups:
        linears = [s.site for s in g.producers]
        colwise = list(dict.fromkeys(s.weight.target for s in linears))
        weights = colwise + [g.consumer.site.weight.target]
        sharded += sum(weight_tensor(gm, w).numel() for w in weights)
        sharded += sum(
            weight_tensor(gm, s.bias.target).numel() for s in {id(s): s for s in linears}.values() if s.bias is not None
        )
        rows.append(
            {
                "module_path": g.path,
                "kind": g.kind,
                "unit": g.unit_name,
                "units": g.units,
                "per_rank": g.units // ways,
                "heads_per_unit": g.heads_per_unit,
                "colwise": [w.rpartition(".")[0] for w in colwise],
                "rowwise": g.consumer.site.weight.target.rpartition(".")[0],
                "key": _group_key(g),
                "hidden": linear_shape(gm, g.consumer.site)[0],
            }
        )
    total = _param_count(gm)
    shapes = [tuple(x.shape) for x in program.example_inputs if isinstance(x, torch.Tensor)]
    tokens = shapes[0][0] * shapes[0][1] if shapes and len(shapes[0]) >= 2 else None
    info = {
        "format": FORMAT,
        "strategy": "tensor",
        "ways": ways,
        "devices": list(devices) or ["cpu"] * ways,
        "blocks": rows,
        "replicated": replicated,
        "params": total,
        "sharded_params": sharded,
        "params_per_rank": total - sharded + sharded // ways,
        "all_reduces": len(rows),
        "all_reduce_bytes": (sum(r["hidden"] for r in rows) * tokens * 4) if tokens else None,
        "example_inputs": [list(s) for s in shapes],
    }
    program.meta["partition"] = json.loads(json.dumps(info, default=str))
    if check:
        check_ranks(program)
    stats = {
        "ways": ways,
        "sharded_blocks": len(rows),
        "replicated_blocks": len(replicated),
        "sharded_params": sharded,
        "params_per_rank": info["params_per_rank"],
        "all_reduces": len(rows),
    }
    details = {
        "strategy": "tensor",
        "blocks": [{k: v for k, v in r.items() if k != "key"} for r in rows],
        "replicated": replicated,
        "all_reduce_bytes_per_forward": info["all_reduce_bytes"],
        "params": total,
    }
    return PassResult(True, stats, details)


# -- a rank's program ---------------------------------------------------------------------------------------
def rank_module(program: Program, rank: int, ways: int | None = None) -> torch.fx.GraphModule:
    """Rank `rank`'s GraphModule of a program planned with `partition{strategy=tensor}`: its share
    of every sharded block's weights, the graph's sizes rewritten, `tp_copy`/`tp_reduce` inserted.
    Replicated parameters are shared with `program.gm`."""
    info = program.meta.get("partition") or {}
    if info.get("strategy") != "tensor":
        raise PassError("the program has no tensor-parallel plan", "add partition{strategy=tensor,ways=N}")
    ways = ways or info["ways"]
    if not 0 <= rank < ways:
        raise PassError(f"tensor parallel: rank {rank} outside 0..{ways - 1}", "use a rank below ways")
    local = program.copy()
    groups, _ = _groups(local.gm)
    by_key = {_group_key(g): g for g in groups}
    planned = [b["key"] for b in info["blocks"]]
    missing = [k for k in planned if k not in by_key]
    if missing:
        raise PassError(
            f"the tensor-parallel plan names {missing[0].rpartition('.')[0]}, which is no longer "
            "a shardable block of the program",
            "run partition last in the pipeline",
        )
    chosen = [by_key[k] for k in planned]
    plan = []
    for g in chosen:
        kept = _units(g, rank, ways)
        plan.append((g, kept, [u for u in range(g.units) if u not in kept]))
    try:
        _prune.apply_groups(local, plan)
    except _prune.Refused as e:
        raise PassError(
            f"tensor parallel: cannot shard the program's sizes ({e})",
            "a view or split takes its size from the inputs; file a bug with --dump-ir",
        ) from e
    _insert_collectives(local.gm, chosen)
    return local.gm


def _insert_collectives(gm: torch.fx.GraphModule, groups) -> None:
    graph = gm.graph
    for g in groups:
        copies: dict[torch.fx.Node, torch.fx.Node] = {}
        for site in {id(s.site): s.site for s in g.producers}.values():
            x = site.x
            if x not in copies:
                with graph.inserting_after(x):
                    copies[x] = graph.call_function(tp_copy, (x,))
                copies[x].meta = dict(x.meta)
            site.node.replace_input_with(x, copies[x])
        c = g.consumer.site
        node, bias = c.node, c.bias
        if bias is not None:
            if node.target is aten.linear.default:
                node.args = (node.args[0], node.args[1])
                node.kwargs = {}
            else:  # addmm(bias, x, W) -> mm(x, W)
                node.target, node.args, node.kwargs = aten.mm.default, (node.args[1], node.args[2]), {}
        with graph.inserting_after(node):
            reduced = graph.call_function(tp_reduce, (node,))
        reduced.meta = dict(node.meta)
        out = reduced
        if bias is not None:
            with graph.inserting_after(reduced):
                out = graph.call_function(aten.add.Tensor, (reduced, bias))
            out.meta = dict(node.meta)
        node.replace_all_uses_with(out, delete_user_cb=lambda u, reduced=reduced: u is not reduced)
    graph.lint()
    gm.recompile()


def shard_layout(program: Program, rank: int) -> dict[str, tuple[int, list[int]]]:
    """{parameter name: (dim, indices into the full parameter)} of rank `rank`'s shards, in the
    order `rank_module` stores them (dim of the stored tensor: HF Conv1D weights are [in, out])."""
    info = program.meta["partition"]
    gm = program.gm
    groups, _ = _groups(gm)
    by_key = {_group_key(g): g for g in groups}
    rows: dict[str, tuple] = {}
    cols: dict[str, tuple] = {}
    for key in (b["key"] for b in info["blocks"]):
        g = by_key[key]
        kept = _units(g, rank, info["ways"])
        for s in g.producers:
            rows.setdefault(s.site.weight.target, (s.site, []))[1].extend(s.indices(kept))
        cols.setdefault(g.consumer.site.weight.target, (g.consumer.site, []))[1].extend(g.consumer.indices(kept))
    layout = {}
    for target, (site, idx) in rows.items():
        idx = sorted(idx)
        layout[target] = (1 if site.transposed else 0, idx)
        if site.bias is not None:
            layout[site.bias.target] = (0, idx)
    for target, (site, idx) in cols.items():
        layout[target] = (0 if site.transposed else 1, sorted(idx))
    return layout


def full_parameters(program: Program, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Reassemble full parameters from every rank's (named) local tensors, e.g. weights or grads
    after tensor-parallel training; replicated ones are taken from rank 0."""
    layouts = [shard_layout(program, r) for r in range(len(shards))]
    out = {}
    for name, t in shards[0].items():
        if name not in layouts[0]:
            out[name] = t
            continue
        full = torch.empty_like(weight_tensor(program.gm, name), dtype=t.dtype)
        for layout, local in zip(layouts, shards):
            dim, idx = layout[name]
            full.index_copy_(dim, torch.tensor(idx, dtype=torch.long), local[name])
        out[name] = full
    return out


# -- checking in one process ---------------------------------------------------------------------------------
def run_lockstep(modules: list[torch.fx.GraphModule], inputs: tuple):
    """Run the rank programs side by side, node by node, in this process; `tp_reduce` sums its
    input across them (what the all-reduce does) and `tp_copy` is the identity. Returns each
    rank's outputs."""
    runners = [torch.fx.Interpreter(m) for m in modules]
    for r in runners:
        r.env = {}
        r.args_iter = iter(inputs)
    outputs = [None] * len(modules)
    with torch.no_grad():
        for column in zip(*(m.graph.nodes for m in modules)):
            first = column[0]
            if first.op == "call_function" and first.target in (tp_copy, tp_reduce):
                parts = [r.env[n.args[0]] for r, n in zip(runners, column)]
                value = functools.reduce(torch.add, parts) if first.target is tp_reduce else None
                for r, n, part in zip(runners, column, parts):
                    r.env[n] = part if value is None else value.clone()
                continue
            for i, (r, n) in enumerate(zip(runners, column)):
                value = r.run_node(n)
                if n.op == "output":  # the program's output structure, as calling the module gives
                    outputs[i] = modules[i].graph._codegen.process_outputs(value)
                else:
                    r.env[n] = value
    return outputs


def check_ranks(program: Program) -> None:
    ways = program.meta["partition"]["ways"]
    modules = [rank_module(program, r) for r in range(ways)]
    expected = program.run()
    for rank, actual in enumerate(run_lockstep(modules, tuple(program.example_inputs))):
        if not outputs_close(expected, actual):
            raise PassError(
                f"partition: tensor-parallel rank {rank} does not reproduce the program's outputs",
                "this is a bug in the partition pass; --dump-ir DIR shows the program",
            )
