"""Model-parallel execution of programs on torch.distributed: pipeline parallelism (one process per
stage) and tensor parallelism (every block sharded over ranks, times data-parallel replicas).

    res = pipeline_train(program, batches, stages=4, microbatches=8, schedule="1f1b", lr=1e-3)
    res["losses"], res["weights"], res["grads"]
    logits = pipeline_run(program, (input_ids,), stages=2, microbatches=4)
    res = tensor_train(program, batches, ways=2, data_parallel=2)

The program is split by the `partition` pass (run here with `stages=N` unless the program already
carries a plan for N stages, or an OUT folder already holds `stages/stage_K.pt2`). The stages are
written as torch.export archives, and `optpipe.runtime.launch` starts one torchrun rank per stage
(the launcher data-parallel training uses too; each rank runs `run_pipeline_rank`). Each rank
loads its stage(s), wraps them in `torch.distributed.pipelining.PipelineStage` and runs a
schedule: `gpipe` (all forwards, then all backwards) or `1f1b`; with fewer ranks than stages
(`ranks=R`, stages a multiple of R) rank r holds stages r, r+R, … and runs
`ScheduleInterleaved1F1B`. Inference uses the forward-only pass of the same schedule. Tensor
parallelism (`partition{strategy=tensor}`) runs `run_tensor_rank` on each rank of a 2-d
DeviceMesh ("dp", "tp").

Training: each batch (`{"input_ids", "labels"}`) is one optimizer step (SGD or AdamW on each rank's
own parameters). The loss is `optpipe.losses.task_loss` per micro-batch; gradients are averaged
over micro-batches, so with micro-batches holding equal numbers of label tokens the step is the
single-process step on the whole batch. Tied parameters (replicated into several stages by the
partition pass) have their replicas' gradients summed across ranks (an all-reduce) before the step.
`lr` may be a schedule (one lr per step, `step_lr`), and `clip` clips the norm of the whole model's
gradient, summed over the ranks' parameters (`clip_to_global_norm`), as in one process.

Failure: every collective and point-to-point wait of the run is bounded by `timeout` seconds (the
pipeline's process group; start-up and rendezvous get `STARTUP_TIMEOUT`), and torchrun stops the
other ranks as soon as one exits with an error, so a rank that dies stops the run with an error
naming it instead of hanging; a rank that stays alive but stuck is named as the silent neighbour
of the ranks whose waits timed out (`optpipe.runtime.launch`). For tests,
`OPTPIPE_PIPELINE_FAIL_RANK=r` makes rank r exit abruptly before step `OPTPIPE_PIPELINE_FAIL_STEP`
(default 0).
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
from collections.abc import Sequence

import torch

from ..errors import PipelineError, UsageError
from ..losses import task_loss
from ..passes import partition, partition_tensor
from ..passes.partition_tensor_ops import tensor_parallel_mesh
from ..program import Program
from ..registry import load_op_modules
from .data import input_builder
from .launch import FAIL_MODE_ENV, FAIL_RANK_ENV, FAIL_STEP_ENV, STARTUP_TIMEOUT, fault_point, run_ranks

SCHEDULES = ("1f1b", "gpipe")
OPTIMIZERS = ("sgd", "adamw")


# -- the parent: prepare stages, launch ranks, gather results -------------------------------------------
def pipeline_train(
    model,
    batches: Sequence[dict],
    *,
    stages: int | None = None,
    microbatches: int = 4,
    schedule: str = "1f1b",
    lr: float | Sequence[float] = 1e-3,
    optimizer: str = "sgd",
    steps: int | None = None,
    ranks: int | None = None,
    objective: str = "clm",
    timeout: float = 60.0,
    balance: str = "flops",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip: float | None = None,
) -> dict:
    """Train `model` (a Program, an OUT folder or any MODEL form) pipelined over `stages` ranks.

    `batches`: one dict per optimizer step with `input_ids` [B, T] and `labels` [B, T] (B divisible
    by `microbatches`); `steps` cycles through them (default: one step per batch). Returns
    {"losses": [mean micro-batch loss per step], "weights": {name: tensor} after training,
    "grads": {name: tensor} of the last step, "stages": N, "ranks": R, "seconds": wall time of the
    steps on the ranks (excluding start-up)}. `lr`: one for every step, or one per step (a schedule).
    `clip`: the largest norm of the whole gradient (over every rank's parameters), as in one process.
    AdamW's `weight_decay` applies to matrices, not to biases and norm scales, as in `optpipe train`.
    """
    if schedule not in SCHEDULES:
        raise UsageError(f"pipeline: unknown schedule {schedule!r}", f"one of {', '.join(SCHEDULES)}")
    options = train_options(
        "pipeline", batches, lr=lr, optimizer=optimizer, steps=steps, objective=objective, betas=betas, eps=eps,
        weight_decay=weight_decay, clip=clip,
    )  # fmt: skip
    return _launch(
        "train",
        model,
        list(batches),
        stages=stages,
        microbatches=microbatches,
        schedule=schedule,
        ranks=ranks,
        timeout=timeout,
        balance=balance,
        options=options,
    )


def pipeline_run(
    model,
    inputs: tuple | torch.Tensor,
    *,
    stages: int | None = None,
    microbatches: int = 4,
    ranks: int | None = None,
    timeout: float = 60.0,
    balance: str = "flops",
    repeat: int = 1,
):
    """Run `model` forward pipelined over `stages` ranks on `inputs` (the program's positional
    inputs for the whole batch; split into `microbatches` along dim 0). Returns the last stage's
    output for the whole batch. `repeat` runs it that many times (timing: see `pipeline_run_timed`)."""
    return pipeline_run_timed(
        model,
        inputs,
        stages=stages,
        microbatches=microbatches,
        ranks=ranks,
        timeout=timeout,
        balance=balance,
        repeat=repeat,
    )["output"]


def pipeline_run_timed(
    model, inputs, *, stages=None, microbatches=4, ranks=None, timeout=60.0, balance="flops", repeat=1
) -> dict:
    """`pipeline_run`, returning {"output", "seconds" (per run, after a warm-up run)}."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return _launch(
        "run",
        model,
        [tuple(inputs)],
        stages=stages,
        microbatches=microbatches,
        schedule="gpipe",
        ranks=ranks,
        timeout=timeout,
        balance=balance,
        options=run_options(repeat),
    )


def prepare_stages(
    model, stages: int | None, folder: str, *, microbatches: int = 4, balance: str = "flops"
) -> tuple[str, dict, Program | None]:
    """(stage folder, partition plan, program): the stage archives for `model`, partitioning it
    (into `stages`) and writing `folder/stages/` unless an OUT folder already holds them."""
    if isinstance(model, (str, os.PathLike)) and os.path.isfile(os.path.join(model, "stages", "partition.json")):
        stage_dir = os.path.join(os.fspath(model), "stages")
        with open(os.path.join(stage_dir, "partition.json")) as f:
            info = json.load(f)
        if stages is None or stages == info["num_stages"]:
            return stage_dir, info, None
    program = as_program(model)
    info = program.meta.get("partition")
    if info is None or (stages is not None and stages != info["num_stages"]):
        program = partitioned(program, stages or 2, microbatches=microbatches, balance=balance)
    partition.save_stages(program, folder)
    stage_dir = os.path.join(folder, "stages")
    with open(os.path.join(stage_dir, "partition.json")) as f:
        return stage_dir, json.load(f), program


def partitioned(program: Program, stages: int, *, microbatches: int = 4, balance: str = "flops") -> Program:
    """A copy of `program` with the partition pass applied (the pass itself checks that the stages
    compose to the program on the example inputs)."""
    from ..pipeline import Pipeline

    text = f"partition{{stages={stages},balance={balance},microbatches={microbatches}}}"
    out, _ = Pipeline.parse(text).run(program, verify=False)
    return out


def as_program(model) -> Program:
    """`model` as a Program: itself, or loaded from an OUT folder or any MODEL form."""
    if isinstance(model, Program):
        return model
    from ..loading import load_model

    return load_model(os.fspath(model))


def check_rank_counts(what: str, **counts) -> None:
    """Each of `counts` (ways, data_parallel, ...) a positive integer, or a one-line UsageError."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{what}: {name} must be a positive integer, got {value!r}")


def _inputs_builder(program: Program | None, info: dict):
    if program is not None:
        return input_builder(program)
    names = info.get("input_names") or ["input_ids"]
    if len(names) != 1:
        raise UsageError(
            "pipeline: training from a stage folder needs programs that take input_ids only", "pass the Program instead"
        )
    return lambda ids: (ids,)


def _rank_data(train: bool, program: Program | None, info: dict, batches: list) -> list[tuple]:
    """What the ranks load: (program inputs, labels) per training batch, or (inputs, None) to run."""
    if not train:
        return [(tuple(batches[0]), None)]
    build = _inputs_builder(program, info)
    return [(build(b["input_ids"]), b["labels"]) for b in batches]


def _launch(
    mode: str,
    model,
    batches: list,
    *,
    stages,
    microbatches,
    schedule,
    ranks,
    timeout,
    balance,
    options: dict,
) -> dict:
    """`options`: the ranks' optimizer and step options (`train_options`, `run_options`)."""
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise UsageError(f"pipeline: microbatches must be a positive integer, got {microbatches!r}")
    with tempfile.TemporaryDirectory(prefix="optpipe-pipeline-") as tmp:
        stage_dir, info, program = prepare_stages(model, stages, tmp, microbatches=microbatches, balance=balance)
        n = info["num_stages"]
        ranks = n if ranks is None else ranks
        if ranks < 1 or n % ranks:
            raise UsageError(
                f"pipeline: {n} stages cannot be spread over {ranks} ranks",
                "use a number of ranks that divides the number of stages",
            )
        if ranks < n and schedule != "1f1b":
            raise UsageError(
                "pipeline: more stages than ranks runs the interleaved 1F1B schedule",
                "use schedule=1f1b, or one rank per stage",
            )
        if mode == "train" and schedule == "1f1b" and microbatches < ranks:
            raise UsageError(
                f"pipeline: 1F1B needs at least as many micro-batches as ranks ({microbatches} < {ranks})",
                "use more microbatches, or schedule=gpipe",
            )
        if mode == "train" and schedule == "1f1b" and ranks == n and microbatches < n:
            raise UsageError(
                f"pipeline: 1F1B needs at least as many micro-batches as stages ({microbatches} < {n})",
                "use more microbatches, or schedule=gpipe",
            )
        data = _rank_data(mode == "train", program, info, batches)
        for inputs, _ in data:
            size = inputs[0].shape[0]
            if size % microbatches:
                raise UsageError(
                    f"pipeline: batch of {size} does not split into {microbatches} micro-batches",
                    "make the batch size a multiple of microbatches",
                )
        torch.save(data, os.path.join(tmp, "batches.pt"))
        spec = {
            "kind": "pipeline",
            "mode": mode,
            "stage_dir": stage_dir,
            "info": info,
            "batches": os.path.join(tmp, "batches.pt"),
            "microbatches": microbatches,
            "schedule": schedule,
            "timeout": timeout,
            **options,
        }
        run_ranks(
            spec,
            tmp,
            ranks,
            what="pipeline",
            timeout=timeout,
            describe=lambda r: f"rank {r} (stage {_held(r, ranks, n)})",
            neighbours=lambda r: _pipeline_neighbours(r, ranks, n),
        )
        return _gather(mode, tmp, ranks, info)


def _held(r: int, ranks: int, stages: int) -> str:
    return ", ".join(str(s) for s in range(r, stages, ranks))


def _pipeline_neighbours(r: int, ranks: int, stages: int) -> set[int]:
    """The ranks that rank r waits on: the previous and next stage's (interleaved stages wrap)."""
    if stages == ranks:
        return {p for p in (r - 1, r + 1) if 0 <= p < ranks}
    return {(r - 1) % ranks, (r + 1) % ranks} - {r}


def _gather(mode: str, folder: str, ranks: int, info: dict) -> dict:
    with open(os.path.join(folder, "result.json")) as f:
        result = json.load(f)
    if mode == "run":
        return {"output": torch.load(os.path.join(folder, "output.pt")), "seconds": result["seconds"]}
    weights, grads = {}, {}
    tied_owner = {t["param"]: t["owner"] for t in info.get("tied", [])}
    for r in range(ranks):
        state = torch.load(os.path.join(folder, f"rank_{r}.pt"))
        for stage, (w, g) in state.items():
            for name, t in w.items():
                if name not in weights or tied_owner.get(name) == stage:
                    weights[name] = t
            for name, t in g.items():
                if name not in grads or tied_owner.get(name) == stage:
                    grads[name] = t
    return {
        "losses": result["losses"],
        "weights": weights,
        "grads": grads,
        "stages": info["num_stages"],
        "ranks": ranks,
        "seconds": result["seconds"],
    }


# -- tensor parallelism -----------------------------------------------------------------------------------
def tensor_train(
    model,
    batches: Sequence[dict],
    *,
    ways: int | None = None,
    data_parallel: int = 1,
    lr: float | Sequence[float] = 1e-3,
    optimizer: str = "sgd",
    steps: int | None = None,
    objective: str = "clm",
    timeout: float = 60.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip: float | None = None,
    grad_accum: int = 1,
) -> dict:
    """Train `model` tensor-parallel: every block sharded over `ways` ranks, times `data_parallel`
    replicas that each take a slice of the batch (ranks = ways × data_parallel, a 2-d DeviceMesh
    ("dp", "tp")). Batches as in `pipeline_train`. Returns {"losses", "weights" (full tensors,
    reassembled from the shards), "grads" (of the last step), "ways", "data_parallel", "ranks",
    "seconds"}. `lr` and `clip` as in `pipeline_train`; `grad_accum`: each replica's rows in that
    many micro-batches, their gradients summed into one step."""
    options = train_options(
        "tensor parallel", batches, lr=lr, optimizer=optimizer, steps=steps, objective=objective, betas=betas,
        eps=eps, weight_decay=weight_decay, clip=clip, grad_accum=grad_accum,
    )  # fmt: skip
    return _launch_tensor("tensor-train", model, list(batches), ways, data_parallel, timeout, options)


def tensor_run(
    model,
    inputs: tuple | torch.Tensor,
    *,
    ways: int | None = None,
    data_parallel: int = 1,
    timeout: float = 60.0,
    repeat: int = 1,
) -> dict:
    """Run `model` forward tensor-parallel on `inputs` (the program's positional inputs; the batch is
    split over `data_parallel` replicas). Returns {"output", "seconds" (per run after a warm-up)}."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return _launch_tensor("tensor-run", model, [tuple(inputs)], ways, data_parallel, timeout, run_options(repeat))


def tensor_partitioned(program: Program, ways: int) -> Program:
    """`program` with a tensor-parallel plan for `ways` ranks (kept when it already has one)."""
    info = program.meta.get("partition") or {}
    if info.get("strategy") == "tensor" and info.get("ways") == ways:
        return program
    if info:
        raise UsageError(
            f"tensor parallel: the program already carries a {info.get('strategy', 'pipeline')} partition plan",
            "partition the program before that pass, with strategy=tensor",
        )
    from ..pipeline import Pipeline

    # fuse-attention (exact; a no-op on SDPA programs) so hand-written attention shards by heads too
    out, _ = Pipeline.parse(f"fuse-attention,partition{{strategy=tensor,ways={ways}}}").run(program, verify=False)
    return out


def _launch_tensor(mode: str, model, batches: list, ways, dp: int, timeout: float, options: dict) -> dict:
    """`options`: the ranks' optimizer and step options (`train_options`, `run_options`)."""
    program = as_program(model)
    planned = (program.meta.get("partition") or {}).get("ways")
    ways = ways or planned or 2
    check_rank_counts("tensor parallel", ways=ways, data_parallel=dp)
    program = tensor_partitioned(program, ways)
    info = program.meta["partition"]
    with tempfile.TemporaryDirectory(prefix="optpipe-tensor-") as tmp:
        data = _rank_data(mode == "tensor-train", program, info, batches)
        for inputs, _ in data:
            check_batch_split("tensor parallel", inputs[0].shape[0], dp, options.get("grad_accum", 1))
        program.save(os.path.join(tmp, "program.pt2"))
        torch.save(data, os.path.join(tmp, "batches.pt"))
        spec = {
            "kind": "tensor",
            "mode": mode,
            "program": os.path.join(tmp, "program.pt2"),
            "ways": ways,
            "dp": dp,
            "devices": info.get("devices") or ["cpu"] * ways,
            "batches": os.path.join(tmp, "batches.pt"),
            "timeout": timeout,
            **options,
        }
        ranks = ways * dp
        run_ranks(
            spec,
            tmp,
            ranks,
            what="tensor parallel",
            timeout=timeout,
            describe=lambda r: f"rank {r} (shard {r % ways} of {ways}, replica {r // ways})",
            neighbours=lambda r: set(range(ranks)) - {r} if ranks == 2 else set(),
        )
        with open(os.path.join(tmp, "result.json")) as f:
            result = json.load(f)
        if mode == "tensor-run":
            outputs = [torch.load(os.path.join(tmp, f"output_{d}.pt")) for d in range(dp)]
            return {"output": torch.cat(outputs) if dp > 1 else outputs[0], "seconds": result["seconds"]}
        states = [torch.load(os.path.join(tmp, f"rank_{r}.pt")) for r in range(ways)]  # replica 0
        return {
            "losses": result["losses"],
            "weights": partition_tensor.full_parameters(program, [w for w, _ in states]),
            "grads": partition_tensor.full_parameters(program, [g for _, g in states]),
            "ways": ways,
            "data_parallel": dp,
            "ranks": ranks,
            "seconds": result["seconds"],
        }


# -- a rank of a pipelined run (optpipe.runtime.rank) ---------------------------------------------------
def run_pipeline_rank(spec: dict, folder: str, rank: int) -> int:
    """Rank `rank` of a pipelined run: load its stages, run the schedule's steps, write its results
    (`rank_R.pt`: weights and last gradients per stage; the last stage's `result.json`, `output.pt`)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    load_op_modules()  # optpipe's ops, before stage archives load
    info = spec["info"]
    n = info["num_stages"]
    devices = info.get("devices") or ["cpu"] * n
    backend = "nccl" if all(d.startswith("cuda") for d in devices) else "gloo"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = list(range(rank, n, world))
    if backend == "nccl":  # NCCL wants each rank on its own current device
        torch.cuda.set_device(torch.device(devices[local[0]]))
    # start-up (imports, rendezvous) gets a generous bound; every wait of the run gets `timeout`
    timeout = float(spec["timeout"])
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(STARTUP_TIMEOUT, timeout)))
    group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    train = spec["mode"] == "train"
    modules, stages = {}, []
    for s in local:
        module = torch.export.load(os.path.join(spec["stage_dir"], f"stage_{s}.pt2")).module().to(devices[s])
        for p in module.parameters():
            p.requires_grad_(train and p.is_floating_point())
        modules[s] = module
        stages.append(PipelineStage(module, s, n, torch.device(devices[s]), group=group))
    res = _pipeline_steps(spec, _schedule(spec, stages, train), stages, modules, rank, world, group)
    if train:
        state = {s: (cpu_copies(mod.named_parameters()), res["grads"].get(s, {})) for s, mod in modules.items()}
        torch.save(state, os.path.join(folder, f"rank_{rank}.pt"))
    if n - 1 in modules:
        if res["output"] is not None:
            torch.save(res["output"], os.path.join(folder, "output.pt"))
        with open(os.path.join(folder, "result.json"), "w") as f:
            json.dump({"losses": res["losses"], "seconds": res["seconds"]}, f)
    dist.barrier(group=group)
    dist.destroy_process_group()
    return 0


def _schedule(spec: dict, stages: list, train: bool):
    """The pipelining schedule of this rank's stages (interleaved 1F1B when it holds several)."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    m = spec["microbatches"]
    objective = spec["objective"]
    loss_fn = (lambda out, target: task_loss(out, target, objective)) if train else None
    if len(stages) > 1:
        return ScheduleInterleaved1F1B(stages, m, loss_fn=loss_fn)
    if spec["schedule"] == "gpipe" or not train:
        return ScheduleGPipe(stages[0], m, loss_fn=loss_fn)
    return Schedule1F1B(stages[0], m, loss_fn=loss_fn)


def _pipeline_steps(spec: dict, schedule, stages: list, modules: dict, rank: int, world: int, group) -> dict:
    """The run's steps on this rank: {"losses" (last stage), "grads" (of the last step, per stage),
    "output" (last stage, inference), "seconds" (per step)}."""
    import torch.distributed as dist

    info, train, timeout = spec["info"], spec["mode"] == "train", float(spec["timeout"])
    first, last = 0 in modules, info["num_stages"] - 1 in modules
    params = [p for mod in modules.values() for p in mod.parameters() if p.requires_grad]
    opt = rank_optimizer(params, spec) if train and params else None
    data = torch.load(spec["batches"])
    res = {"losses": [], "grads": {}, "output": None, "seconds": []}
    steps = spec["steps"] + (0 if train else 1)  # inference: one warm-up run
    for step in range(steps):
        fault_point(rank, step, timeout)
        inputs, labels = data[step % len(data)]
        inputs = tuple(x.to(stages[0].device) for x in inputs) if first else ()
        labels = labels.to(stages[-1].device) if last and labels is not None else None
        dist.barrier(group=group)
        start = time.perf_counter()
        if train:
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            mb_losses: list = []
            schedule.step(*inputs, target=labels, losses=mb_losses if last else None)
            _sync_tied(modules, info, world, group)
            if step == steps - 1:
                res["grads"] = {s: _gradients(mod) for s, mod in modules.items()}
            grads, counted = _pipeline_norm_terms(modules, info)
            clip_to_global_norm(grads, counted, spec.get("clip"), stages[0].device, group if world > 1 else None)
            if opt is not None:
                step_lr(spec, step, opt)
                opt.step()
            if last:
                res["losses"].append(float(torch.stack([l.detach() for l in mb_losses]).mean()))
        else:
            with torch.no_grad():
                out = schedule.step(*inputs)
            if last:
                res["output"] = out.cpu()
        dist.barrier(group=group)
        if train or step > 0:
            res["seconds"].append(time.perf_counter() - start)
    return res


# -- a rank of a tensor-parallel run (optpipe.runtime.rank) ----------------------------------------------
def run_tensor_rank(spec: dict, folder: str, rank: int) -> int:
    """Rank `rank` of a tensor-parallel run: shard `rank % ways` of replica `rank // ways` on a 2-d
    DeviceMesh ("dp", "tp"); writes `rank_R.pt` (replica 0, training), `output_D.pt` (shard 0,
    inference) and rank 0's `result.json`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    load_op_modules()  # optpipe's ops, before the program loads

    from ..program import load_program

    ways, dp = spec["ways"], spec["dp"]
    device = torch.device(spec["devices"][rank % ways])
    if device.type == "cuda" and dp > 1:  # every rank needs a GPU of its own: the node's local rank's
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    timeout = float(spec["timeout"])
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(STARTUP_TIMEOUT, timeout)))
    mesh = init_device_mesh(device.type, (dp, ways), mesh_dim_names=("dp", "tp"))
    tp_rank, replica = mesh["tp"].get_local_rank(), mesh["dp"].get_local_rank()
    train = spec["mode"] == "tensor-train"
    program = load_program(spec["program"])
    gm = partition_tensor.rank_module(program, tp_rank, ways).to(device)
    full = {name: p.shape for name, p in program.gm.named_parameters()}
    sharded = {name for name, p in gm.named_parameters() if p.shape != full.get(name, p.shape)}
    del program
    with tensor_parallel_mesh(mesh["tp"]):
        res = _tensor_steps(spec, gm, mesh, device, rank, train, sharded)
    if train and replica == 0:
        torch.save((cpu_copies(gm.named_parameters()), res["grads"]), os.path.join(folder, f"rank_{rank}.pt"))
    if not train and tp_rank == 0:
        torch.save(res["output"].cpu(), os.path.join(folder, f"output_{replica}.pt"))
    if rank == 0:
        with open(os.path.join(folder, "result.json"), "w") as f:
            json.dump({"losses": res["losses"], "seconds": res["seconds"]}, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _tensor_steps(
    spec: dict, gm: torch.nn.Module, mesh, device: torch.device, rank: int, train: bool, sharded: set
) -> dict:
    """The run's steps on this shard: {"losses" (averaged over replicas), "grads" (of the last
    step), "output" (inference), "seconds" (per step)}. `sharded`: the names of the parameters
    this rank holds a shard of (the others are replicated over the shards)."""
    import torch.distributed as dist

    dp, replica = spec["dp"], mesh["dp"].get_local_rank()
    tp_first = mesh["tp"].get_local_rank() == 0
    params = [p for p in gm.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(train)
    opt = rank_optimizer(params, spec) if train and params else None
    data = torch.load(spec["batches"])
    dp_group = mesh["dp"].get_group() if dp > 1 else None
    res = {"losses": [], "grads": {}, "output": None, "seconds": []}
    steps = spec["steps"] + (0 if train else 1)  # inference: one warm-up run
    for step in range(steps):
        fault_point(rank, step, float(spec["timeout"]))
        inputs, labels = data[step % len(data)]
        inputs = tuple(x.chunk(dp)[replica].to(device) for x in inputs)
        dist.barrier()
        start = time.perf_counter()
        if train:
            opt.zero_grad(set_to_none=True)
            k = spec.get("grad_accum", 1)
            total = torch.zeros((), device=device)
            for part, part_labels in micro_batches(inputs, labels.chunk(dp)[replica].to(device), k):
                loss = task_loss(gm(*part), part_labels, spec["objective"]) / k  # the mean of k equal parts
                loss.backward()
                total += loss.detach()
            if dp_group is not None:  # data parallel: average gradients (and the loss) over replicas
                for p in params:
                    dist.all_reduce(p.grad, group=dp_group)
                    p.grad /= dp
                dist.all_reduce(total, group=dp_group)
                total /= dp
            if step == steps - 1:
                res["grads"] = _gradients(gm)
            grads = [p.grad for p in params if p.grad is not None]
            counted = [p.grad for n, p in gm.named_parameters() if p.grad is not None and (n in sharded or tp_first)]
            clip_to_global_norm(grads, counted, spec.get("clip"), device, mesh["tp"].get_group())
            step_lr(spec, step, opt)
            opt.step()
            res["losses"].append(float(total))
        else:
            with torch.no_grad():
                res["output"] = gm(*inputs)
        dist.barrier()
        if train or step > 0:
            res["seconds"].append(time.perf_counter() - start)
    return res


# -- shared by both kinds of rank ------------------------------------------------------------------------
def rank_optimizer(params: list, spec: dict) -> torch.optim.Optimizer:
    """The rank's optimizer at the first step's lr (`step_lr` sets each step's). AdamW's weight
    decay goes to matrices only, not to biases and norm scales (1-d), as `optpipe train` does."""
    if spec["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=step_lr(spec, 0))
    adamw = spec["adamw"]
    decay = adamw.get("weight_decay", 0.0)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=step_lr(spec, 0),
        betas=tuple(adamw.get("betas", (0.9, 0.999))),
        eps=adamw.get("eps", 1e-8),
        weight_decay=adamw.get("weight_decay", 0.0),
    )


def step_lr(spec: dict, step: int, optimizer: torch.optim.Optimizer | None = None) -> float:
    """The lr of `step` (spec["lr"]: one for every step, or a list with one per step); with
    `optimizer`, also set it there."""
    lr = spec["lr"]
    lr = float(lr[step % len(lr)]) if isinstance(lr, list) else float(lr)
    for group in optimizer.param_groups if optimizer is not None else ():
        group["lr"] = lr
    return lr


def clip_to_global_norm(grads: list, counted: list, max_norm: float | None, device, group=None) -> None:
    """Scale this rank's `grads` so that the model's whole gradient has norm at most `max_norm`,
    as `torch.nn.utils.clip_grad_norm_` does in one process. `counted`: the gradients whose squares
    this rank adds to the norm (across `group`, every element of the model counted once: a shard
    on its rank, a replicated tensor on one rank only). No-op when `max_norm` is falsy."""
    import torch.distributed as dist

    if not max_norm:
        return
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for g in counted:
        squares += g.detach().double().pow(2).sum()
    if group is not None:
        dist.all_reduce(squares, group=group)
    coef = min(1.0, float(max_norm) / (float(squares.sqrt()) + 1e-6))
    for g in grads:
        g.mul_(coef)


def train_options(
    what: str,
    batches,
    *,
    lr,
    optimizer: str,
    steps: int | None,
    objective: str,
    betas,
    eps: float,
    weight_decay: float,
    clip: float | None,
    grad_accum: int = 1,
) -> dict:
    """The ranks' training options (their spec's "lr", "optimizer", "steps", "objective", "adamw",
    "clip", "grad_accum"), as the three runtimes' train functions take them, checked (`what`
    names the runtime in the errors); `steps` defaults to one per batch."""
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"{what}: unknown optimizer {optimizer!r}", f"one of {', '.join(OPTIMIZERS)}")
    if not batches:
        raise UsageError(f"{what}: no batches to train on", "give at least one {input_ids, labels} batch")
    steps = len(batches) if steps is None else steps
    return {
        "lr": checked_lr(lr, steps, what),
        "optimizer": optimizer,
        "steps": steps,
        "objective": objective,
        "adamw": {"betas": list(betas), "eps": eps, "weight_decay": weight_decay},
        "clip": clip,
        "grad_accum": grad_accum,
    }


def run_options(repeat: int) -> dict:
    """The ranks' options of a forward-only run, `repeat` times (after a warm-up run)."""
    return {"lr": 0.0, "optimizer": "sgd", "steps": repeat, "objective": "clm", "adamw": {}}


def micro_batches(inputs: tuple, labels: torch.Tensor, k: int) -> list[tuple[tuple, torch.Tensor]]:
    """(inputs, labels) in `k` micro-batches of rows (gradient accumulation: one optimizer step)."""
    parts = [x.chunk(k) if isinstance(x, torch.Tensor) else (x,) * k for x in inputs]
    return list(zip(zip(*parts), labels.chunk(k)))


def check_batch_split(what: str, batch: int, dp: int, grad_accum: int = 1) -> None:
    """UsageError unless `batch` rows split over `dp` replicas and each replica's into `grad_accum`."""
    if batch % dp:
        raise UsageError(
            f"{what}: batch of {batch} does not split over {dp} data-parallel replicas",
            "make the batch size a multiple of data_parallel",
        )
    if (batch // dp) % grad_accum:
        raise UsageError(
            f"{what}: {batch // dp} rows per replica do not split into {grad_accum} accumulation steps",
            "make the batch size a multiple of data_parallel x grad_accum",
        )


def checked_lr(lr, steps: int, what: str) -> float | list[float]:
    """A run's `lr`: a number, or a schedule with one lr per step (`optpipe train` passes its
    warmup + cosine schedule); UsageError when the schedule's length is not `steps`."""
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
    lrs = [float(x) for x in lr]
    if len(lrs) != steps:
        raise UsageError(f"{what}: {len(lrs)} learning rates for {steps} steps", "give one lr, or one per step")
    return lrs


def cpu_copies(named) -> dict[str, torch.Tensor]:
    """CPU copies of named tensors (parameters), to save."""
    return {k: p.detach().cpu().clone() for k, p in named}


def _gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the gradients `module`'s parameters hold."""
    return {k: p.grad.detach().cpu().clone() for k, p in module.named_parameters() if p.grad is not None}


def _pipeline_norm_terms(modules: dict, info: dict) -> tuple[list, list]:
    """(this rank's gradients, those its share of the global norm sums): all of them but the
    copies of a tied parameter past its first stage (every stage holds the summed gradient)."""
    later_copies = set()
    for tied in info.get("tied", []):
        names = tied.get("names") or {str(s): tied["param"] for s in tied["stages"]}
        first = min(names, key=int)
        later_copies |= {(int(s), name) for s, name in names.items() if s != first}
    grads, counted = [], []
    for s, mod in modules.items():
        for name, p in mod.named_parameters():
            if p.grad is not None:
                grads.append(p.grad)
                if (int(s), name) not in later_copies:
                    counted.append(p.grad)
    return grads, counted


def _sync_tied(modules: dict, info: dict, world: int, group) -> None:
    """Sum the gradients of replicated (tied) parameters over their replicas on every rank."""
    import torch.distributed as dist

    for tied in info.get("tied", []):
        names = tied.get("names") or {str(s): tied["param"] for s in tied["stages"]}
        local = [mod.get_parameter(names[str(s)]) for s, mod in modules.items() if str(s) in names]
        grads = [p.grad for p in local if p.grad is not None]
        if local:
            total = torch.zeros_like(local[0]) if not grads else grads[0].clone()
            for g in grads[1:]:
                total += g
        else:
            total = torch.zeros(
                tied["shape"],
                dtype=getattr(torch, tied.get("dtype") or "float32"),
                device=next(next(iter(modules.values())).parameters()).device,
            )
        if world > 1:
            dist.all_reduce(total, group=group)
        for p in local:
            p.grad = total.clone()


__all__ = [
    "FAIL_MODE_ENV",  # the fault hooks of these runs (optpipe.runtime.launch)
    "FAIL_RANK_ENV",
    "FAIL_STEP_ENV",
    "OPTIMIZERS",
    "SCHEDULES",
    "PipelineError",  # what a failed run raises
    "partitioned",
    "pipeline_run",
    "pipeline_run_timed",
    "pipeline_train",
    "prepare_stages",
    "run_pipeline_rank",
    "run_tensor_rank",
    "tensor_partitioned",
    "tensor_run",
    "tensor_train",
]
