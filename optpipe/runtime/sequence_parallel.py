"""Sequence (context) parallel execution of programs on torch.distributed: one sequence split over
`ways` ranks, times `data_parallel` replicas that each take a slice of the batch.

    res = sequence_train(program, batches, ways=2, optimizer="adamw", lr=1e-3)
    res["losses"], res["weights"], res["grads"]
    logits = sequence_run(program, (input_ids,), ways=4)["output"]

The program is planned by `partition{strategy=sequence,ways=N}` (run here, after `fuse-attention`,
unless it already carries that plan; see passes/partition_sequence.py), saved, and
`optpipe.runtime.launch` starts `ways × data_parallel` torchrun ranks (gloo on CPU, NCCL on CUDA).
Rank `replica·ways + s` holds shard s of replica `replica`'s batch slice and runs the rank program
(`partition_sequence.rank_module`) inside `sequence_parallel_comm`, whose exchanges (ring, halo,
prefix scan) are point-to-point messages to the neighbouring shards of its own replica.

Training: each batch (`{"input_ids", "labels"}`) is one optimizer step. A rank's loss is the sum of
its tokens' cross-entropies (the next-token label of a shard's last token is the next shard's
first) over the label tokens of the whole batch, so summing the gradients over all ranks (one
all-reduce per parameter) gives the single-process gradient, and every rank takes the same SGD or
AdamW step. Inference returns the whole-sequence output (the shards concatenated).

Failure: every wait is bounded by `timeout` seconds and torchrun stops the other ranks as soon as
one exits, so a rank that dies stops the run with one error line naming it (`optpipe.runtime.launch`;
`OPTPIPE_PIPELINE_FAIL_RANK=r` injects that fault in tests).
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..losses import IGNORE_INDEX
from ..passes import partition_sequence
from ..passes.partition_sequence_ops import DistributedComm, sequence_parallel_comm
from ..program import Program
from ..registry import load_op_modules
from .data import input_builder
from .launch import STARTUP_TIMEOUT, fault_point, run_ranks
from .parallel import (
    as_program,
    check_batch_split,
    check_rank_counts,
    clip_to_global_norm,
    cpu_copies,
    micro_batches,
    rank_optimizer,
    run_options,
    step_lr,
    train_options,
)


# -- the parent: plan, launch ranks, gather results ------------------------------------------------------
def sequence_train(
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
    """Train `model` (a Program, an OUT folder or any MODEL form) with its sequence split over
    `ways` ranks (times `data_parallel` replicas). Batches as in `pipeline_train`; the sequence
    length must divide by `ways` (by 2·`ways` for zig-zag shards). Returns {"losses", "weights" (after
    training), "grads" (of the last step), "ways", "data_parallel", "ranks", "order" (of the shards:
    zigzag or contiguous), "seconds" (per step)}. `lr` and `clip` as in `pipeline_train`, `grad_accum`
    as in `tensor_train`."""
    if objective not in ("clm", "mlm"):
        raise UsageError(f"sequence parallel: objective {objective!r} is not split over the sequence", "use clm or mlm")
    options = train_options(
        "sequence parallel", batches, lr=lr, optimizer=optimizer, steps=steps, objective=objective, betas=betas,
        eps=eps, weight_decay=weight_decay, clip=clip, grad_accum=grad_accum,
    )  # fmt: skip
    return launch_sequence("sequence-train", model, list(batches), ways, data_parallel, timeout, options)


def sequence_run(
    model, inputs: tuple | torch.Tensor, *, ways: int | None = None, data_parallel: int = 1, timeout=60.0, repeat=1
) -> dict:
    """Run `model` forward with the sequence of `inputs` (the program's positional inputs) split over
    `ways` ranks. Returns {"output" (whole sequence), "seconds" (per run after a warm-up), "order"}."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return launch_sequence("sequence-run", model, [tuple(inputs)], ways, data_parallel, timeout, run_options(repeat))


def sequence_partitioned(program: Program, ways: int) -> Program:
    """`program` with a sequence-parallel plan for `ways` ranks (kept when it already has one)."""
    info = program.meta.get("partition") or {}
    if info.get("strategy") == "sequence" and info.get("ways") == ways:
        return program
    if info.get("strategy") == "sequence":
        raise UsageError(
            f"sequence parallel: the program is planned for {info.get('ways')} sequence shards, not {ways}",
            f"run it on {info.get('ways')} ranks (--sequence-parallel {info.get('ways')}), or plan it again",
        )
    if info:
        raise UsageError(
            f"sequence parallel: the program already carries a {info.get('strategy', 'pipeline')} partition plan",
            "partition the program before that pass, with strategy=sequence",
        )
    from ..pipeline import Pipeline

    # fuse-attention (exact; a no-op on SDPA programs): hand-written causal attention becomes one SDPA node
    out, _ = Pipeline.parse(f"fuse-attention,partition{{strategy=sequence,ways={ways}}}").run(program, verify=False)
    return out


def sequence_planned_for(program: Program, ways: int, ids: torch.Tensor) -> Program:
    """`program` planned for `ways` sequence shards at the length of the training batches' `ids`
    (its own plan when it carries one for `ways`; else planned here on a copy whose example inputs
    are one row of `ids`, so the plan's lengths and bytes are the run's)."""
    length = int(ids.shape[partition_sequence.SEQ_DIM])
    if length % ways:
        raise UsageError(
            f"sequence parallel: sequence length {length} does not divide into {ways} shards",
            f"use a sequence length (--seq-len) that is a multiple of {ways}",
        )
    if program.meta.get("partition"):
        return sequence_partitioned(program, ways)
    local = program.copy()
    local.example_inputs = tuple(input_builder(program)(ids[:1]))
    return sequence_partitioned(local, ways)


def _rank_batches(train: bool, program: Program, batches: list, ways: int, dp: int, grad_accum: int = 1) -> list:
    """(program inputs, labels or None) per step; the batch must split over replicas (and each
    replica's rows into `grad_accum` micro-batches) and shards (zig-zag shards: into 2·ways chunks)."""
    build = input_builder(program)
    data = [(build(b["input_ids"]), b["labels"]) for b in batches] if train else [(tuple(batches[0]), None)]
    chunks = 2 * ways if program.meta["partition"].get("order") == "zigzag" else ways
    for inputs, _ in data:
        b, t = inputs[0].shape[0], inputs[0].shape[partition_sequence.SEQ_DIM]
        check_batch_split("sequence parallel", b, dp, grad_accum)
        if t % chunks:
            what = f"{ways} shards" if chunks == ways else f"{chunks} zig-zag chunks ({ways} shards)"
            raise UsageError(
                f"sequence parallel: sequence length {t} does not divide into {what}",
                f"use a sequence length that is a multiple of {chunks}",
            )
    return data


def launch_sequence(mode: str, model, batches: list, ways, dp: int, timeout: float, options: dict) -> dict:
    """Plan (when needed), save, start the ranks and gather what they wrote."""
    program = as_program(model)
    ways = ways or (program.meta.get("partition") or {}).get("ways") or 2
    check_rank_counts("sequence parallel", ways=ways, data_parallel=dp)
    program = sequence_partitioned(program, ways)
    info = program.meta["partition"]
    with tempfile.TemporaryDirectory(prefix="optpipe-sequence-") as tmp:
        data = _rank_batches(mode == "sequence-train", program, batches, ways, dp, options.get("grad_accum", 1))
        program.save(os.path.join(tmp, "program.pt2"))
        torch.save(data, os.path.join(tmp, "batches.pt"))
        spec = {
            "kind": "sequence",
            "mode": mode,
            "program": os.path.join(tmp, "program.pt2"),
            "ways": ways,
            "dp": dp,
            "devices": info.get("devices") or ["cpu"] * ways,
            "order": info.get("order", "contiguous"),
            "batches": os.path.join(tmp, "batches.pt"),
            "timeout": timeout,
            **options,
        }
        ranks = ways * dp
        run_ranks(
            spec,
            tmp,
            ranks,
            what="sequence parallel",
            timeout=timeout,
            describe=lambda r: f"rank {r} (sequence shard {r % ways} of {ways}, replica {r // ways})",
            neighbours=lambda r: {r // ways * ways + (r % ways + d) % ways for d in (-1, 1)} - {r},
        )
        with open(os.path.join(tmp, "result.json")) as f:
            result = json.load(f)
        if mode == "sequence-run":
            output = torch.load(os.path.join(tmp, "output.pt"))
            return {"output": output, "seconds": result["seconds"], "order": spec["order"]}
        weights, grads = torch.load(os.path.join(tmp, "rank_0.pt"))
        return {
            "losses": result["losses"],
            "weights": weights,
            "grads": grads,
            "ways": ways,
            "data_parallel": dp,
            "ranks": ranks,
            "order": spec["order"],
            "seconds": result["seconds"],
        }


# -- the loss of a shard ------------------------------------------------------------------------------------
def shard_labels(labels: torch.Tensor, objective: str) -> tuple[torch.Tensor, int]:
    """(the label each position predicts, number of label tokens in the whole batch): for clm the
    next token's (the last position has none), so a shard's last token takes the next shard's first."""
    if objective == "clm":
        ignore = torch.full_like(labels[:, :1], IGNORE_INDEX)
        labels = torch.cat([labels[:, 1:], ignore], 1)
    return labels, int((labels != IGNORE_INDEX).sum())


def shard_loss(logits: torch.Tensor, labels: torch.Tensor, tokens: int) -> torch.Tensor:
    """This shard's share of the mean cross-entropy over `tokens` label tokens (summing the shares
    over the ranks gives `task_loss`)."""
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / max(tokens, 1)


# -- a rank (optpipe.runtime.rank) -----------------------------------------------------------------------------
def run_sequence_rank(spec: dict, folder: str, rank: int) -> int:
    """Rank `rank` of a sequence-parallel run: shard `rank % ways` of replica `rank // ways`; writes
    rank 0's `rank_0.pt` (weights, last gradients; training), `output.pt` (inference: the whole
    sequence, gathered) and `result.json`."""
    import torch.distributed as dist

    load_op_modules()  # optpipe's ops, before the program loads
    from ..program import load_program

    ways = spec["ways"]
    device = torch.device(spec["devices"][rank % ways])
    if device.type == "cuda":  # every rank a GPU of its own: the node's local rank's
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    timeout = float(spec["timeout"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(STARTUP_TIMEOUT, timeout)))
    group = dist.new_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    replica, shard = divmod(rank, ways)
    comm = DistributedComm(shard, [replica * ways + s for s in range(ways)], group=group)
    gm = partition_sequence.rank_module(load_program(spec["program"])).to(device)
    with sequence_parallel_comm(comm):
        res = _sequence_steps(spec, gm, device, rank, group)
    if rank == 0:
        if spec["mode"] == "sequence-train":
            state = (cpu_copies(gm.named_parameters(remove_duplicate=False)), res["grads"])
            torch.save(state, os.path.join(folder, "rank_0.pt"))
        else:
            torch.save(res["output"], os.path.join(folder, "output.pt"))
        with open(os.path.join(folder, "result.json"), "w") as f:
            json.dump({"losses": res["losses"], "seconds": res["seconds"]}, f)
    dist.barrier(group=group)
    dist.destroy_process_group()
    return 0


def _local(x, spec: dict, rank: int, device):
    """This rank's part of a whole-batch tensor: its replica's rows, its shard of the sequence."""
    ways, dp = spec["ways"], spec["dp"]
    replica, shard = divmod(rank, ways)
    x = x.chunk(dp)[replica]
    length = x.shape[partition_sequence.SEQ_DIM]
    return partition_sequence.shard(x, shard, ways, length, spec.get("order", "contiguous")).to(device)


def _sequence_steps(spec: dict, gm: torch.nn.Module, device, rank: int, group) -> dict:
    """The run's steps on this rank: {"losses", "grads" (last step), "output" (gathered on rank 0),
    "seconds" (per step)}."""
    import torch.distributed as dist

    train = spec["mode"] == "sequence-train"
    params = [p for p in gm.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(train)
    opt = rank_optimizer(params, spec) if train and params else None
    data = torch.load(spec["batches"])
    res = {"losses": [], "grads": {}, "output": None, "seconds": []}
    steps = spec["steps"] + (0 if train else 1)  # inference: one warm-up run
    for step in range(steps):
        fault_point(rank, step, float(spec["timeout"]))
        inputs, labels = data[step % len(data)]
        local = tuple(_local(x, spec, rank, device) if isinstance(x, torch.Tensor) else x for x in inputs)
        dist.barrier(group=group)
        start = time.perf_counter()
        if train:
            opt.zero_grad(set_to_none=True)
            targets, tokens = shard_labels(labels, spec["objective"])
            parts = micro_batches(local, _local(targets, spec, rank, device), spec.get("grad_accum", 1))
            total = torch.zeros((), device=device)
            for part, part_targets in parts:
                loss = shard_loss(gm(*part), part_targets, tokens)  # over the whole batch's label tokens
                loss.backward()
                total += loss.detach()
            for p in params:  # every rank's tokens' share of the gradient: sum them
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=group)
            dist.all_reduce(total, group=group)
            if step == steps - 1:
                named = gm.named_parameters(remove_duplicate=False)
                res["grads"] = {k: p.grad.detach().cpu().clone() for k, p in named if p.grad is not None}
            grads = [p.grad for p in params]  # summed over the ranks: every rank holds the whole gradient
            clip_to_global_norm(grads, grads, spec.get("clip"), device)
            step_lr(spec, step, opt)
            opt.step()
            res["losses"].append(float(total))
        else:
            with torch.no_grad():
                res["output"] = _gathered(gm(*local), spec, group)
        dist.barrier(group=group)
        if train or step > 0:
            res["seconds"].append(time.perf_counter() - start)
    return res


def _gathered(output, spec: dict, group):
    """The whole batch's output from every rank's piece (an all-gather; shards along the sequence,
    replicas along the batch)."""
    import torch.distributed as dist

    ways, dp = spec["ways"], spec["dp"]
    leaves, tree = torch.utils._pytree.tree_flatten(output)
    out = []
    for t in leaves:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        parts = [torch.empty_like(t) for _ in range(ways * dp)]
        dist.all_gather(parts, t.contiguous(), group=group)
        order = spec.get("order", "contiguous")
        rows = [partition_sequence.unshard(parts[r * ways : (r + 1) * ways], order) for r in range(dp)]
        out.append(torch.cat(rows).cpu())
    return torch.utils._pytree.tree_unflatten(out, tree)


__all__ = [
    "launch_sequence",
    "run_sequence_rank",
    "sequence_partitioned",
    "sequence_planned_for",
    "sequence_run",
    "sequence_train",
    "shard_labels",
    "shard_loss",
]
