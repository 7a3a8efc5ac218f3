"""partition: split a program into N pipeline stages of balanced cost (exact; the graph is kept).

    partition{stages=4,balance=flops,microbatches=8}
    partition{strategy=tensor,ways=2}      tensor parallelism instead: see passes/partition_tensor.py
    partition{strategy=sequence,ways=4}    sequence (context) parallelism: see passes/partition_sequence.py

The program's graph is cut at N-1 places along its topological order into N stage programs. Stage 0
takes the program's inputs; stage k>0 takes the tensors crossing cut k-1 and returns those crossing
cut k; the last stage returns the program's outputs. Composing the stages is the program (checked
on the example inputs when the pass runs, `check=true`). `optpipe.runtime.parallel` runs them one process
per stage under `torch.distributed.pipelining`.

How the cuts are chosen:
- The compute nodes are grouped into segments: the nodes before the first transformer block, each
  block (`…h.3`, `…layers.3`, `…layer.3`, found through `nn_module_stack`), the nodes after the last
  block. Cuts go only between segments, where a single hidden state (plus what the model passes
  along, e.g. a padding mask) crosses. A program without blocks is segmented by module path.
- A segment costs what `balance` says: `flops` (static FLOPs from `optpipe.analysis`), `params`
  (bytes of the parameters it reads first), `memory` (those plus the bytes of the activations it
  produces), or `measured` (seconds per node, timed on the example inputs with an fx Interpreter).
- Dynamic programming over the cut places minimises the slowest stage, where a stage costs its
  segments plus `cut-penalty` × the bytes it sends to the next stage (default: 100 FLOPs or 1 ns
  per byte; 0 for params/memory); ties go to fewer bytes crossing.

What a stage recomputes rather than receives: nodes whose values depend only on shapes and buffers
(sequence-length `sym_size`, `arange` positions, causal masks built from them, rotary tables) are
rebuilt in every stage that needs them; a size read from a tensor the stage does not have is read
from a stage input with the same symbolic dim.

Parameters: each parameter is owned by the stage of its first user. A parameter read by several
stages (tied weights: GPT's `wte` embedding and `lm_head`) is replicated into each of them; the plan
lists it under `tied` with its owner, and `optpipe.runtime.parallel` sums the replicas' gradients across
ranks after every backward, so the copies take identical optimizer steps and stay equal.

Run it last: the plan (stored JSON-only in `program.meta["partition"]`) names its cuts by segment
(`before: transformer.h.6`), so it survives save/load, but a later pass that moves nodes across
blocks invalidates it. `stage_modules(program)` rebuilds the stage GraphModules from it and
`save_stages(program, OUT)` writes `OUT/stages/stage_K.pt2` (torch.export archives) and
`OUT/stages/partition.json`. Stats: {"stages", "cut_bytes", "max_stage_cost", "mean_stage_cost"}
(costs in the `balance` unit; `measured` in microseconds); details: one row per stage, the cuts
with the tensors crossing them (shapes, dtypes, bytes) and the expected pipeline bubble
(p-1)/(m+p-1) for `microbatches` = m.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
import torch.fx

from optpipe.analysis import TensorSpec, analyze, concrete_shapes
from optpipe.errors import PassError
from optpipe.graph_toolkit import get_attribute, module_path, module_stack
from optpipe.program import Program
from optpipe.registry import PassResult, register_hook, register_pass

aten = torch.ops.aten

BALANCES = ("flops", "params", "memory", "measured")
SEQUENCE_ORDERS = ("zigzag", "contiguous")  # strategy=sequence's balance (the default "flops": auto)
STRATEGIES = ("pipeline", "tensor", "sequence")
_DEVICE_RE = re.compile(r"^(cpu|meta|(cuda|xpu|mps)(:\d+)?)$")
_LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers?|blocks?)\.(\d+)(?:\.|$)")
DEFAULT_PENALTY = {"flops": 100.0, "measured": 1e-9, "params": 0.0, "memory": 0.0}
"""Cost units per byte crossing a cut: a CPU at ~100 GFLOP/s sending at ~1 GB/s."""
PRE, POST = "<before the first block>", "<after the last block>"
MEASURE_RUNS = 3


@dataclass(frozen=True)
class PartitionConfig:
    strategy: Literal["pipeline", "tensor", "sequence"] = field(
        default="pipeline",
        metadata={
            "help": "pipeline (cut into stages run one after the other), tensor (shard every attention and "
            "MLP block over `ways` ranks; see passes/partition_tensor.py) or sequence (split the sequence "
            "over `ways` ranks; see passes/partition_sequence.py)"
        },
    )
    stages: int = field(default=2, metadata={"help": "number of pipeline stages (one process each)"})
    ways: int = field(
        default=2,
        metadata={"help": "strategy=tensor: ranks each block is sharded over; strategy=sequence: sequence shards"},
    )
    balance: Literal["flops", "params", "memory", "measured", "zigzag", "contiguous"] = field(
        default="flops",
        metadata={
            "help": "what the stages balance: flops (static), params (parameter bytes), memory (parameter "
            "plus activation bytes), measured (node times on the example inputs); strategy=sequence: the "
            "shard order, zigzag or contiguous (default: zigzag when every attention site is dense causal)"
        },
    )
    devices: tuple[str, ...] = field(
        default=(),
        metadata={"help": "device of each stage, e.g. [cpu,cpu] or [cuda:0,cuda:1] (default: cpu for every stage)"},
    )
    microbatches: int = field(
        default=4,
        metadata={"help": "micro-batches per step the pipeline will run: sets the expected bubble in the report"},
    )
    cut_penalty: float | None = field(
        default=None,
        metadata={
            "help": "cost added per byte a stage sends to the next (default: 100 for flops, 1e-9 s for "
            "measured, 0 for params/memory)"
        },
    )
    check: bool = field(
        default=True,
        metadata={
            "help": "run the stages one after the other on the example inputs and require the program's "
            "outputs exactly (strategy=tensor: the rank programs in lock step, outputs fp32-close; "
            "strategy=sequence: the rank programs as threads on the example's shards, outputs fp32-close)"
        },
    )

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"partition: unknown strategy {self.strategy!r} (one of {', '.join(STRATEGIES)})")
        if isinstance(self.ways, bool) or not isinstance(self.ways, int) or self.ways < 1:
            raise ValueError(f"partition: ways must be a positive integer, got {self.ways!r}")
        if self.strategy in ("tensor", "sequence") and self.stages != 2:
            raise ValueError(f"partition: stages is for strategy=pipeline; strategy={self.strategy} takes ways=N")
        if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages < 1:
            raise ValueError(f"partition: stages must be a positive integer, got {self.stages!r}")
        allowed = SEQUENCE_ORDERS + ("flops",) if self.strategy == "sequence" else BALANCES
        if self.balance not in allowed:
            raise ValueError(
                f"partition: balance {self.balance!r} is not for strategy={self.strategy} "
                f"(one of {', '.join(SEQUENCE_ORDERS if self.strategy == 'sequence' else BALANCES)})"
            )
        if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise ValueError(f"partition: microbatches must be a positive integer, got {self.microbatches!r}")
        if self.cut_penalty is not None and not self.cut_penalty >= 0:
            raise ValueError(f"partition: cut-penalty must be >= 0, got {self.cut_penalty!r}")
        devices = (self.devices,) if isinstance(self.devices, str) else tuple(self.devices)
        object.__setattr__(self, "devices", devices)
        ranks, what = (self.stages, "stages") if self.strategy == "pipeline" else (self.ways, "ways")
        if devices and len(devices) != ranks:
            raise ValueError(f"partition: {len(devices)} devices for {ranks} {what}; give one per rank")
        for d in devices:
            check_device(d)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def penalty(self) -> float:
        return DEFAULT_PENALTY[self.balance] if self.cut_penalty is None else float(self.cut_penalty)


def check_device(device: str) -> None:
    """ValueError with one readable line unless `device` exists on this machine."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ValueError(f"partition: {device!r} is not a device (e.g. cpu, cuda:0)")
    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"partition: device {device} does not exist: this machine has no CUDA device")
        if index and int(index) >= count:
            raise ValueError(
                f"partition: device {device} does not exist: this machine has {count} CUDA "
                f"device(s), cuda:0..cuda:{count - 1}"
            )
    elif (kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())) or (
        kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available())
    ):
        raise ValueError(f"partition: device {device} does not exist on this machine")


# -- the graph as segments ---------------------------------------------------------------------------
def _is_guard(node: torch.fx.Node) -> bool:
    return node.op == "call_module" and node.target == "_guards_fn"


def _is_parameter(gm: torch.nn.Module, node: torch.fx.Node) -> bool:
    return node.op == "get_attr" and isinstance(get_attribute(gm, node.target), torch.nn.Parameter)


def _nondeterministic(target) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def recomputable_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose values depend only on input shapes and buffers (not on input or parameter
    values): sizes, positions, masks. Every stage rebuilds the ones it needs."""
    free: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            recomputable = not _is_parameter(gm, node)
        else:
            recomputable = node.op == "call_function" and (
                node.target is aten.sym_size.int
                or (not _nondeterministic(node.target) and all(a in free for a in node.all_input_nodes))
            )
        if recomputable:
            free.add(node)
    return free


@dataclass
class GraphView:
    """The program's compute nodes in order, grouped into segments, with what each one needs."""

    gm: torch.fx.GraphModule
    free: set
    compute: list[torch.fx.Node]
    position: dict
    keys: list[str]
    """Segment key of each compute node (a block path, PRE/POST, or a module path)."""
    segments: list[tuple[int, int, str]]
    """(start, end, key) ranges of `compute`."""
    uses: dict
    """value node -> compute positions (len(compute) for the output) that read it, directly or
    through recomputed nodes."""

    @property
    def places(self) -> int:
        return len(self.segments) - 1


def _block_key(node: torch.fx.Node) -> str | None:
    for path, _ in module_stack(node):
        m = _LAYER_RE.search(path)
        if m:
            return path[: m.end()].rstrip(".")
    return None


def graph_view(gm: torch.fx.GraphModule) -> GraphView:
    free = recomputable_nodes(gm)
    compute = [
        n for n in gm.graph.nodes if n.op in ("call_function", "call_module") and n not in free and not _is_guard(n)
    ]
    position = {n: i for i, n in enumerate(compute)}
    raw = [_block_key(n) for n in compute]
    layered = [i for i, k in enumerate(raw) if k is not None]
    keys: list[str] = []
    if layered:
        first, last = layered[0], layered[-1]
        current = None
        for i, k in enumerate(raw):
            if k is not None:
                current = k
            keys.append(PRE if i < first else POST if i > last else current)
    else:  # no transformer blocks: any module boundary may be cut
        current = PRE
        for n in compute:
            path = module_path(n)
            current = path or current
            keys.append(current)
    segments: list[tuple[int, int, str]] = []
    for i, k in enumerate(keys):
        if segments and segments[-1][2] == k:
            segments[-1] = (segments[-1][0], i + 1, k)
        else:
            segments.append((i, i + 1, k))

    uses: dict[torch.fx.Node, list[int]] = {}

    def reads(pos: int, arg: torch.fx.Node, seen: set):
        if arg in seen:
            return
        seen.add(arg)
        if arg in free:
            for a in arg.all_input_nodes:
                if arg.target is not aten.sym_size.int:  # a size is re-read where it is needed
                    reads(pos, a, seen)
            return
        if arg.op == "get_attr":
            return
        uses.setdefault(arg, []).append(pos)

    for i, n in enumerate(compute):
        seen: set = set()
        for a in n.all_input_nodes:
            reads(i, a, seen)
    seen = set()
    for a in gm.graph.output_node().all_input_nodes:
        reads(len(compute), a, seen)
    return GraphView(gm, free, compute, position, keys, segments, uses)


def _defined_at(view: GraphView, v: torch.fx.Node) -> int:
    """Compute position that produces `v` (-1 for a program input)."""
    return view.position.get(v, -1)


def crossing(view: GraphView, boundary: int) -> list[torch.fx.Node]:
    """Values live across the boundary before compute position `boundary`, in graph order."""
    out = [v for v, ps in view.uses.items() if _defined_at(view, v) < boundary <= max(ps)]
    order = {n: i for i, n in enumerate(view.gm.graph.nodes)}
    return sorted(out, key=order.__getitem__)


# -- costs -------------------------------------------------------------------------------------------
def node_costs(program: Program, view: GraphView, balance: str) -> list[float]:
    """Cost of each compute node in the `balance` unit (FLOPs, bytes or seconds)."""
    if balance == "measured":
        return _measured_costs(program, view)
    costs = [0.0] * len(view.compute)
    if balance == "flops" or balance == "memory":
        by_name = {c.name: c for c in analyze(program).nodes}
        for i, n in enumerate(view.compute):
            c = by_name.get(n.name)
            if c is not None:
                costs[i] = float(c.flops if balance == "flops" else c.activation_bytes)
    if balance in ("params", "memory"):
        for i, nbytes in _first_param_use(view).items():
            costs[i] += float(nbytes)
    return costs


def _first_param_use(view: GraphView) -> dict[int, int]:
    """Compute position -> bytes of the parameters it is the first to read (tied ones count once)."""
    seen, out = set(), {}
    for i, n in enumerate(view.compute):
        for a in n.all_input_nodes:
            if _is_parameter(view.gm, a):
                t = get_attribute(view.gm, a.target)
                if id(t) not in seen:
                    seen.add(id(t))
                    out[i] = out.get(i, 0) + t.numel() * t.element_size()
    return out


def _measured_costs(program: Program, view: GraphView) -> list[float]:
    times: dict[torch.fx.Node, list[float]] = {}

    class Timer(torch.fx.Interpreter):
        def run_node(self, n):
            start = time.perf_counter()
            out = super().run_node(n)
            times.setdefault(n, []).append(time.perf_counter() - start)
            return out

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(MEASURE_RUNS):
            Timer(program.gm).run(*program.example_inputs)
    return [min(times.get(n, [0.0])) for n in view.compute]


# -- choosing the cuts ---------------------------------------------------------------------------------
def choose_cuts(seg_costs: list[float], cut_bytes: list[int], stages: int, penalty: float) -> list[int]:
    """Indices i (cut after segment i) of the `stages`-1 cuts minimising the slowest stage, where a
    stage costs its segments plus `penalty` × the bytes it sends on; ties: fewest bytes crossing."""
    n = len(seg_costs)
    prefix = [0.0]
    for c in seg_costs:
        prefix.append(prefix[-1] + c)
    inf = (math.inf, math.inf)
    # best[k][j]: (slowest stage, bytes crossing) splitting segments [0, j) into k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    back = [[-1] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            sends = cut_bytes[j - 1] if j < n else 0
            for i in range(k - 1, j):
                prev = best[k - 1][i]
                if prev[0] == math.inf:
                    continue
                stage = prefix[j] - prefix[i] + penalty * sends
                cand = (max(prev[0], stage), prev[1] + sends)
                if cand < best[k][j]:
                    best[k][j], back[k][j] = cand, i
    cuts, j = [], n
    for k in range(stages, 0, -1):
        i = back[k][j]
        if i > 0:
            cuts.append(i - 1)
        j = i
    return sorted(cuts)


# -- building the stages -------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """Stage k runs compute positions [start, end); it receives `inputs` and sends `outputs`."""

    index: int
    start: int
    end: int
    inputs: list[torch.fx.Node]
    outputs: list[torch.fx.Node] | None
    """None for the last stage (it returns the program's outputs)."""


def stage_plans(view: GraphView, boundaries: list[int]) -> list[StagePlan]:
    """Stage ranges and the tensors crossing each boundary (compute positions where a stage starts)."""
    placeholders = [n for n in view.gm.graph.nodes if n.op == "placeholder"]
    edges = [0] + list(boundaries) + [len(view.compute)]
    plans, inputs = [], placeholders
    extra: dict[int, set] = {}
    order = {n: i for i, n in enumerate(view.gm.graph.nodes)}
    for _ in range(len(view.compute) + 1):  # each round passes at least one more tensor along
        plans, inputs = [], placeholders
        for k in range(len(edges) - 1):
            start, end = edges[k], edges[k + 1]
            if k == len(edges) - 2:
                plans.append(StagePlan(k, start, end, inputs, None))
                break
            outs = crossing(view, end)
            for v in extra.get(end, ()):  # a tensor whose size a later stage reads
                if v not in outs:
                    outs.append(v)
            outs.sort(key=order.__getitem__)
            plans.append(StagePlan(k, start, end, inputs, outs))
            inputs = outs
        missing = _unresolved_sizes(view, plans)
        if not missing:
            return plans
        for k, v in missing:  # pass `v` along from where it is defined to stage k
            for b in edges[1 : k + 1]:
                if _defined_at(view, v) < b:
                    extra.setdefault(b, set()).add(v)
    raise PassError("partition: could not route the sizes the stages read", "report this program")


def _unresolved_sizes(view: GraphView, plans: list[StagePlan]) -> list[tuple[int, torch.fx.Node]]:
    missing = []
    for plan in plans:
        available = set(plan.inputs) | set(view.compute[plan.start : plan.end])
        for node in _needed_sizes(view, plan):
            x = node.args[0]
            if x not in available and _static_size(node) is None and _substitute(node, plan.inputs) is None:
                missing.append((plan.index, x))
    return missing


def _needed_sizes(view: GraphView, plan: StagePlan) -> list[torch.fx.Node]:
    found, seen = [], set()

    def walk(arg):
        if arg in seen or arg not in view.free:
            return
        seen.add(arg)
        if arg.target is aten.sym_size.int:
            found.append(arg)
            return
        for a in arg.all_input_nodes:
            walk(a)

    nodes = view.compute[plan.start : plan.end]
    roots = [a for n in nodes for a in n.all_input_nodes]
    if plan.outputs is None:
        roots += view.gm.graph.output_node().all_input_nodes
    for a in roots:
        walk(a)
    return found


def _static_size(size_node: torch.fx.Node) -> int | None:
    val = size_node.meta.get("val")
    return int(val) if isinstance(val, int) and not isinstance(val, bool) else None


def _substitute(size_node: torch.fx.Node, inputs: list[torch.fx.Node]) -> tuple[torch.fx.Node, int] | None:
    """A stage input and dim whose size is the same symbol as `size_node`'s."""
    val = size_node.meta.get("val")
    if not isinstance(val, torch.SymInt):
        return None
    expr = val.node.expr
    for x in inputs:
        xv = x.meta.get("val")
        if isinstance(xv, torch.Tensor):
            for d, s in enumerate(xv.shape):
                if isinstance(s, torch.SymInt) and s.node.expr == expr:
                    return x, d
    return None


def build_stage(view: GraphView, plan: StagePlan) -> torch.fx.GraphModule:
    """The GraphModule of one stage: placeholders for its inputs, its compute nodes, the nodes it
    recomputes, and an output of the tensors it sends on (or the program's outputs)."""
    gm = view.gm
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for x in plan.inputs:
        p = graph.placeholder(x.name)
        p.meta = {k: v for k, v in x.meta.items() if k in ("val", "tensor_meta", "stack_trace")}
        env[x] = p

    def value(arg: torch.fx.Node) -> torch.fx.Node:
        if arg in env:
            return env[arg]
        if arg.op == "get_attr":
            env[arg] = graph.get_attr(arg.target)
            env[arg].meta = dict(arg.meta)
            return env[arg]
        if arg in view.free:
            if arg.target is aten.sym_size.int and arg.args[0] not in env:
                if _static_size(arg) is not None:  # a dim export specialised: the number itself
                    return _static_size(arg)
                sub = _substitute(arg, plan.inputs)
                if sub is None:  # stage_plans passes the tensor along in that case
                    raise PassError(
                        f"partition: stage {plan.index} needs the size of {arg.args[0].name}, which it does not receive"
                    )
                new = graph.call_function(aten.sym_size.int, (env[sub[0]], sub[1]))
                new.meta = dict(arg.meta)
                env[arg] = new
                return new
            env[arg] = graph.node_copy(arg, value)
            return env[arg]
        raise PassError(
            f"partition: stage {plan.index} reads {arg.name} "
            f"({module_path(arg) or 'top level'}), which no earlier stage sends"
        )

    for node in view.compute[plan.start : plan.end]:
        env[node] = graph.node_copy(node, value)
    if plan.outputs is None:
        out = gm.graph.output_node().args[0]
        flat = list(out) if isinstance(out, (tuple, list)) else [out]
        result = torch.fx.node.map_arg(flat, value)
        graph.output(result[0] if len(result) == 1 else tuple(result))
    else:
        graph.output(tuple(value(v) for v in plan.outputs))
    graph.eliminate_dead_code()
    stage = torch.fx.GraphModule(gm, graph, class_name=f"Stage{plan.index}")
    return stage


# -- the pass ------------------------------------------------------------------------------------------
def _spec(shapes: dict, node: torch.fx.Node) -> dict:
    spec = shapes.get(node)
    val = node.meta.get("val")
    symbolic = [str(d) for d in val.shape] if isinstance(val, torch.Tensor) else None
    if isinstance(spec, TensorSpec):
        return {
            "name": node.name,
            "shape": list(spec.dims),
            "symbolic_shape": symbolic,
            "dtype": str(spec.dtype).replace("torch.", ""),
            "bytes": spec.nbytes(),
        }
    return {"name": node.name, "shape": None, "symbolic_shape": symbolic, "dtype": None, "bytes": 0}


def _params_of(view: GraphView, nodes) -> dict[str, torch.Tensor]:
    out = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if _is_parameter(view.gm, a):
                out.setdefault(a.target, get_attribute(view.gm, a.target))
    return out


def _stage_params(view: GraphView, plan: StagePlan) -> dict[str, torch.Tensor]:
    nodes = list(view.compute[plan.start : plan.end])
    if plan.outputs is None:
        nodes.append(view.gm.graph.output_node())
    return _params_of(view, nodes)


def bubble(stages: int, microbatches: int) -> float:
    """Idle fraction of a GPipe/1F1B schedule: (p-1)/(m+p-1)."""
    return (stages - 1) / (microbatches + stages - 1)


@register_pass(
    "partition",
    PartitionConfig,
    exact=True,
    last=True,
    why="its cuts balance the costs of the graph it saw, which a later rewrite changes",
)
def partition(program: Program, config: PartitionConfig) -> PassResult:
    """Split the program into pipeline stages of balanced FLOPs/params/memory/measured time, cutting
    between transformer blocks (or, strategy=tensor, shard the blocks over `ways` ranks; strategy=sequence,
    split the sequence over `ways` ranks); the plan goes into program.meta["partition"]."""
    if config.strategy == "tensor":
        from .partition_tensor import plan_tensor

        return plan_tensor(program, config.ways, config.devices, config.check and not _on_meta(program))
    if config.strategy == "sequence":
        from .partition_sequence import plan_sequence

        order = config.balance if config.balance in SEQUENCE_ORDERS else None
        return plan_sequence(program, config.ways, config.devices, config.check and not _on_meta(program), order)
    view = graph_view(program.gm)
    if config.stages - 1 > view.places:
        raise PassError(
            f"partition: {config.stages} stages but the program has only {view.places} places to cut",
            f"use at most {view.places + 1} stages (cuts go between "
            "transformer blocks and the layers before and after them)",
        )
    costs = node_costs(program, view, config.balance)
    shapes, _ = concrete_shapes(program.gm, program.example_inputs)
    seg_costs = [sum(costs[s:e]) for s, e, _ in view.segments]
    seg_bytes = [sum(_spec(shapes, v)["bytes"] for v in crossing(view, e)) for s, e, _ in view.segments[:-1]]
    cuts = choose_cuts(seg_costs, seg_bytes, config.stages, config.penalty)
    plans = stage_plans(view, [view.segments[i][1] for i in cuts])
    rows, tied = _stage_rows(view, plans, costs, shapes, config)
    cut_rows = _cut_rows(view, plans, shapes)
    info = _plan_info(program, config, view, rows, cut_rows, tied)
    program.meta["partition"] = json.loads(json.dumps(info, default=str))
    if config.check and not _on_meta(program):
        check_composition(program)
    scale = 1e6 if config.balance == "measured" else 1.0
    stats = {
        "stages": config.stages,
        "cut_bytes": sum(c["bytes"] for c in cut_rows),
        "max_stage_cost": int(round(info["max_stage_cost"] * scale)),
        "mean_stage_cost": int(round(info["mean_stage_cost"] * scale)),
    }
    details = {
        "stages": [{k: v for k, v in r.items() if k not in ("param_names", "segments")} for r in rows],
        "cuts": cut_rows,
        "tied": tied,
        **{key: info[key] for key in ("bubble", "microbatches", "imbalance", "cost_unit")},
    }
    return PassResult(True, stats, details)


def _stage_rows(view: GraphView, plans: list[StagePlan], costs, shapes, config: PartitionConfig):
    """(one row per stage: cost, nodes, segments, parameters, inputs, bytes sent; the parameters
    several stages read, each with the stage that owns it and the name each stage reads it by)."""
    holders: dict[int, dict[int, str]] = {}  # tensor -> {stage: the name it reads it by}
    tensors: dict[int, torch.Tensor] = {}
    rows = []
    for plan in plans:
        params = _stage_params(view, plan)
        for name, t in params.items():
            holders.setdefault(id(t), {}).setdefault(plan.index, name)
            tensors[id(t)] = t
        keys = list(dict.fromkeys(view.keys[plan.start : plan.end]))
        sends = [_spec(shapes, v) for v in plan.outputs] if plan.outputs is not None else []
        rows.append(
            {
                "stage": plan.index,
                "device": config.devices[plan.index] if config.devices else "cpu",
                "cost": sum(costs[plan.start : plan.end]),
                "nodes": plan.end - plan.start,
                "segments": keys,
                "first": keys[0],
                "last": keys[-1],
                "params": sum(t.numel() for t in params.values()),
                "param_bytes": sum(t.numel() * t.element_size() for t in params.values()),
                "param_names": sorted(params),
                "inputs": [x.name for x in plan.inputs],
                "send_bytes": sum(s["bytes"] for s in sends),
            }
        )
    tied = []
    for key, names in holders.items():
        if len(names) > 1:
            owner = min(names)
            tied.append(
                {
                    "param": names[owner],
                    "stages": sorted(names),
                    "owner": owner,
                    "names": {str(k): v for k, v in sorted(names.items())},
                    "shape": list(tensors[key].shape),
                    "dtype": str(tensors[key].dtype).replace("torch.", ""),
                }
            )
    return rows, tied


def _cut_rows(view: GraphView, plans: list[StagePlan], shapes) -> list[dict]:
    """One row per cut: the segment it comes before and the tensors crossing it."""
    rows = []
    for plan in plans[:-1]:
        tensors = [_spec(shapes, v) for v in plan.outputs]
        rows.append(
            {
                "after_stage": plan.index,
                "before": view.keys[plan.end],
                "position": plan.end,
                "tensors": tensors,
                "bytes": sum(t["bytes"] for t in tensors),
            }
        )
    return rows


def _plan_info(program: Program, config: PartitionConfig, view: GraphView, rows, cut_rows, tied) -> dict:
    """The plan as stored in program.meta["partition"] (format optpipe-partition/1)."""
    stage_costs = [r["cost"] for r in rows]
    mean = statistics.fmean(stage_costs)
    return {
        "format": "optpipe-partition/1",
        "num_stages": config.stages,
        "balance": config.balance,
        "cost_unit": {"flops": "FLOPs", "params": "bytes", "memory": "bytes", "measured": "seconds"}[config.balance],
        "cut_penalty": config.penalty,
        "devices": list(config.devices) or ["cpu"] * config.stages,
        "microbatches": config.microbatches,
        "bubble": bubble(config.stages, config.microbatches),
        "compute_nodes": len(view.compute),
        "stages": rows,
        "cuts": cut_rows,
        "tied": tied,
        "max_stage_cost": max(stage_costs),
        "mean_stage_cost": mean,
        "imbalance": max(stage_costs) / mean if mean else 1.0,
        "example_inputs": [list(x.shape) for x in program.example_inputs if isinstance(x, torch.Tensor)],
    }


def _on_meta(program: Program) -> bool:
    return any(p.is_meta for p in program.gm.parameters()) or any(
        isinstance(x, torch.Tensor) and x.is_meta for x in program.example_inputs
    )


# -- using the plan ----------------------------------------------------------------------------------
def stage_plans_for(program: Program) -> tuple[GraphView, list[StagePlan]]:
    """Rebuild the stage plans of a partitioned program from `program.meta["partition"]`."""
    info = program.meta.get("partition")
    if not info:
        raise PassError("the program is not partitioned", "add partition{stages=N} to the pipeline")
    if info.get("strategy") in ("tensor", "sequence"):
        runner = "parallel.tensor" if info["strategy"] == "tensor" else "sequence_parallel.sequence"
        raise PassError(
            f"the program is planned for {info['strategy']} parallelism, not pipeline stages",
            f"run it with optpipe.runtime.{runner}_run / {runner}_train",
        )
    view = graph_view(program.gm)
    starts: dict[str, list[int]] = {}
    for s, _, key in view.segments[1:]:
        starts.setdefault(key, []).append(s)
    boundaries = []
    for cut in info["cuts"]:
        if cut["before"] not in starts:
            raise PassError(
                f"the partition plan cuts before {cut['before']!r}, which is no longer a block boundary of the program",
                "run partition last in the pipeline",
            )
        found = starts[cut["before"]]  # the recorded position when the segment still starts there
        boundaries.append(cut["position"] if cut.get("position") in found else found[0])
    return view, stage_plans(view, boundaries)


def stage_modules(program: Program) -> list[torch.fx.GraphModule]:
    """The stage GraphModules of a partitioned program (parameters shared with `program.gm`)."""
    view, plans = stage_plans_for(program)
    return [build_stage(view, p) for p in plans]


def run_stages(stages, inputs: tuple):
    """Run the stages one after the other: what the pipeline computes for one micro-batch."""
    x = tuple(inputs)
    for stage in stages:
        out = stage(*x)
        x = out if isinstance(out, tuple) else (out,)
    return out


def check_composition(program: Program) -> None:
    with torch.no_grad():
        expected = program.run()
        actual = run_stages(stage_modules(program), program.example_inputs)
    flat_e = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    flat_a = [t for t in torch.utils._pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    if len(flat_e) != len(flat_a) or not all(torch.equal(e, a) for e, a in zip(flat_e, flat_a)):
        raise PassError(
            "partition: the composed stages do not reproduce the program's outputs",
            "this is a bug in the partition pass; --dump-ir DIR shows the program",
        )


def stage_example_inputs(program: Program, stages) -> list[tuple]:
    """Each stage's inputs on the program's example inputs."""
    out, x = [], tuple(program.example_inputs)
    with torch.no_grad():
        for stage in stages:
            out.append(x)
            y = stage(*x)
            x = y if isinstance(y, tuple) else (y,)
    return out


@register_hook("partition", "save")
def save_stages(program: Program, out: str | os.PathLike) -> list[str]:
    """Write `out/stages/stage_K.pt2` (one torch.export archive per stage, dynamic where the program
    is) and `out/stages/partition.json`; returns the archive paths. The core's save hook. A
    tensor-parallel plan writes nothing: it lives in program.pt2's metadata, and each rank builds
    its share from the program."""
    from optpipe.program import export_module

    plan = program.meta.get("partition")
    if not plan or plan.get("strategy") in ("tensor", "sequence"):
        return []
    folder = os.path.join(os.fspath(out), "stages")
    os.makedirs(folder, exist_ok=True)
    view, plans = stage_plans_for(program)
    stages = [build_stage(view, p) for p in plans]
    examples = stage_example_inputs(program, stages)
    paths = []
    for plan, stage, inputs in zip(plans, stages, examples):
        dynamic = [_dynamic_dims(x) for x in plan.inputs]
        names = [x.name for x in plan.inputs]
        ep, _ = export_module(stage, inputs, names, dynamic)
        path = os.path.join(folder, f"stage_{plan.index}.pt2")
        tmp = os.path.join(folder, f".stage_{plan.index}.tmp.pt2")
        torch.export.save(ep, tmp)
        os.replace(tmp, path)
        paths.append(path)
    with open(os.path.join(folder, "partition.json"), "w") as f:
        json.dump(
            {
                **program.meta["partition"],
                "input_names": list(program.input_names),
                "files": [os.path.basename(p) for p in paths],
            },
            f,
            indent=2,
        )
    return paths


def _dynamic_dims(x: torch.fx.Node) -> dict[int, str] | None:
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    dims = {d: f"d{d}" for d, s in enumerate(val.shape) if isinstance(s, torch.SymInt) and s.node.expr.free_symbols}
    return dims or None
