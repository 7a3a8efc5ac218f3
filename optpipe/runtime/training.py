"""Training an optimized program where it runs: pre-training, fine-tuning, healing by distillation.

    optpipe train OUT --data FILE --objective clm --steps 500 -o OUT2 [--distill-from MODEL]
    optpipe.train("OUT", data="corpus.txt", objective="clm", steps=500, out="OUT2")

The program's GraphModule is an ordinary `nn.Module` whose parameters are attributes, so the torch
backend trains it directly (eager, or `torch.compile`d); onnxruntime trains artifacts generated from
the same graph (`optpipe.targets.onnxruntime_training.OrtTrainer`).

Objectives (losses are means over the label tokens, `-100` ignored):
- `clm`: next-token cross-entropy, logits[:, :-1] against ids[:, 1:];
- `mlm`: cross-entropy at the masked positions (masking strategies in `optpipe.runtime.data`);
- distillation (`distill_from`): `alpha·task + (1-alpha)·T²·KL(teacher_T ‖ student_T)` plus
  `hidden_weight ×` the normalised MSE between student and teacher outputs of the same modules
  (module paths from `nn_module_stack`): every transformer block, and the attention module of
  each layer a pass rewrote (attention transfer for swapped layers).

Runs a person can trust: a progress line (loss, tokens/s, ETA) on stderr, `metrics.jsonl`,
validation perplexity, checkpoints written atomically every N steps, `resume=True` continuing
bit-exactly after the process was killed, Ctrl-C saving a checkpoint first. Data parallelism runs
one process per rank under torch.distributed (`nproc`; torchrun ranks started by
`optpipe.runtime.launch`): each rank takes its slice of the global batch and the loss is normalised
by the global token count, so N ranks follow the 1-rank curve. Pipeline (`stages`) and tensor
(`tensor_parallel`) parallelism train through `optpipe.runtime.parallel`, sequence parallelism
(`sequence_parallel`) through `optpipe.runtime.sequence_parallel`.

What a run does is a `TrainConfig` (`optpipe.runtime.train_config`; the `optpipe train` options).

OUT2 holds `program.pt2` (the trained program), `train.json`, `metrics.jsonl`, `checkpoints/`, and
what `optpipe run`/`generate` need (`target.json`, `pipeline.txt`, `tokenizer.json`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F

from ..errors import OptpipeError, UsageError
from ..graph_toolkit import module_path, module_stack
from ..inputs import check_inputs, token_vocab
from ..losses import IGNORE_INDEX, distill_kl_sum, has_nsp_head, nsp_loss_sum, task_loss_sum
from ..outdir import write_manifest
from ..program import Program
from .data import TrainingData, input_builder, tokenizer_for_program
from .launch import run_ranks
from .nsp_data import NspData
from .parallel import pipeline_train, tensor_train
from .seq2seq_data import Seq2SeqData, options_for
from .sequence_parallel import sequence_planned_for, sequence_train
from .train_config import TARGETS, TrainConfig

BACKEND_TRAINED = ("onnxruntime", "tvm")
"""Targets that train through their own trainer (Target.trainer): forward, backward and AdamW there."""
_LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers?|blocks?)\.(\d+)(?:\.|$)")


# -- module taps (hidden-state matching) ---------------------------------------------------------
def block_paths(program: Program) -> list[str]:
    """Module paths of the transformer blocks (`…h.3`, `…layers.3`, `…layer.3`), in order."""
    seen: dict[str, None] = {}
    for node in program.gm.graph.nodes:
        for path, _ in module_stack(node):
            m = _LAYER_RE.search(path)
            if m and path[: m.end()].rstrip(".") == path:
                seen.setdefault(path, None)
    return list(seen)


def rewritten_paths(program: Program) -> list[str]:
    """Innermost module paths that own an optpipe op (what attention/quantize/... rewrote)."""
    seen: dict[str, None] = {}
    for node in program.gm.graph.nodes:
        if node.op == "call_function" and str(getattr(node.target, "namespace", "")) == "optpipe" and module_path(node):
            seen.setdefault(module_path(node), None)
    return list(seen)


def tapped_module(program: Program, paths: list[str]) -> tuple[torch.fx.GraphModule, list[str]]:
    """A GraphModule returning (*outputs, *taps): each tap is the last float tensor computed inside
    module `path` (its output). Parameters are shared with `program.gm`. Paths not found are
    dropped; the second result lists the paths tapped."""
    gm = program.gm
    with warnings.catch_warnings():  # deep-copying pytree specs trips a torch deprecation notice
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    last: dict[str, torch.fx.Node] = {}
    wanted = set(paths)
    for node in graph.nodes:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_floating_point() or val.dim() < 2:
            continue
        for path, _ in module_stack(node):
            if path in wanted:
                last[path] = node
    for node in list(graph.nodes):  # shape guards of the capture: the trainer feeds valid shapes
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    found = [p for p in paths if p in last]
    out = graph.output_node()
    flat = out.args[0]
    flat = list(flat) if isinstance(flat, (tuple, list)) else [flat]
    out.args = (tuple(flat) + tuple(last[p] for p in found),)
    graph._codegen = torch.fx.graph.CodeGen()
    new = torch.fx.GraphModule(gm, graph, class_name="Tapped")
    return new, found


# -- predicting only where the loss is -------------------------------------------------------------
SPARSE_GAIN = 0.02
"""`--sparse-prediction auto` applies the pass when it removes at least this share of a step's FLOPs."""


def sparse_prediction_program(program: Program, config: TrainConfig, distilling: bool) -> tuple[Program | None, dict]:
    """The program `sparse-prediction` rewrites for training (its parameters are the program's own
    objects, so training one trains the other; the dense program is what is saved), or None; and a
    note saying whether it applies and why. Applies to mlm (clm rows label every position) on
    cpu/cuda without distillation (the teacher's logits are dense) nor --compile (data-dependent
    shapes), when the head's share of the FLOPs times the unmasked share is worth it."""
    from ..analysis import analyze
    from ..pipeline import Pipeline

    mode = config.sparse_prediction
    why_not = (
        "off"
        if mode == "off"
        else "the objective labels every position"
        if config.objective != "mlm"
        else f"--target {config.target} trains the dense program"
        if config.target not in ("cpu", "cuda")
        else "distillation compares dense logits"
        if distilling
        else "--compile needs static shapes"
        if config.compile
        else None
    )
    if why_not and mode == "on":
        raise UsageError(f"train --sparse-prediction on: {why_not}", "use --sparse-prediction auto")
    if why_not:
        return None, {"applied": False, "reason": why_not}
    try:
        sparse, records = Pipeline.parse("sparse-prediction").run(program, verify=False)
    except OptpipeError as e:
        if mode == "on":
            raise
        return None, {"applied": False, "reason": e.message}
    costs = analyze(program)
    head_paths = set(records[0].details.get("head_paths") or [])
    head = sum(n.flops for n in costs.nodes if n.module in head_paths)
    saved = head / max(costs.flops, 1) * (1 - config.mask_rate)
    note = {"head_flops_share": round(head / max(costs.flops, 1), 4), "flops_saved": round(saved, 4)}
    if mode == "auto" and saved < SPARSE_GAIN:
        return None, {"applied": False, "reason": f"it would save {saved:.1%} of the FLOPs", **note}
    _share_parameters(sparse, program)
    reason = (
        f"the LM head ({note['head_flops_share']:.0%} of the forward FLOPs) runs at the masked positions only, "
        f"about {saved:.0%} fewer FLOPs (--sparse-prediction off to keep it dense)"
    )
    return sparse, {"applied": True, "reason": reason, **note}


def _share_parameters(copy: Program, program: Program) -> None:
    """Make `copy`'s parameters the very objects of `program` (same names)."""
    for name, param in program.gm.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        module = copy.gm.get_submodule(owner) if owner else copy.gm
        if hasattr(module, leaf):
            setattr(module, leaf, param)


# -- parameters ----------------------------------------------------------------------------------
def select_trainable(program: Program, patterns, teacher: Program | None = None) -> list[str]:
    """Names of the parameters to train (globs over names, or `changed`)."""
    names = [n for n, _ in program.gm.named_parameters()]
    chosen: dict[str, None] = {}
    for pat in patterns:
        if pat == "changed":
            chosen.update(dict.fromkeys(changed_parameters(program, teacher)))
        else:
            chosen.update(dict.fromkeys(n for n in names if fnmatch.fnmatchcase(n, pat)))
    if not chosen:
        raise UsageError(
            f"train: no parameter matches --trainable {','.join(patterns)}",
            "use globs over parameter names (see `optpipe inspect`), or `changed`",
        )
    return [n for n in names if n in chosen]


def changed_parameters(program: Program, teacher: Program | None) -> list[str]:
    """Parameters of the modules a pass rewrote (they own optpipe ops), plus parameters that are
    new or reshaped relative to `teacher`."""
    prefixes = tuple(p + "." for p in rewritten_paths(program))
    ref = dict(teacher.gm.named_parameters()) if teacher is not None else {}
    out = []
    for name, p in program.gm.named_parameters():
        if name.startswith(prefixes) or (ref and (name not in ref or ref[name].shape != p.shape)):
            out.append(name)
    if not out:
        raise UsageError(
            "train: --trainable changed, but no pass changed any parameter of this program",
            "train all parameters, or give globs",
        )
    return out


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def param_groups(named: list[tuple[str, torch.nn.Parameter]], config: TrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on biases/norms/1-d tensors; layer-wise lr scale."""
    layers = [layer_of(n) for n, _ in named]
    num_layers = max((l for l in layers if l is not None), default=-1) + 1
    groups: dict[tuple, dict] = {}
    for (name, p), layer in zip(named, layers):
        decay = config.weight_decay if p.dim() >= 2 else 0.0  # biases and norm scales are 1-d
        scale = 1.0
        if config.layer_decay is not None and num_layers:
            if layer is not None:
                scale = config.layer_decay ** (num_layers - layer)
            elif any(k in name for k in ("embed", "wte", "wpe", "position")):
                scale = config.layer_decay ** (num_layers + 1)
        g = groups.setdefault((decay, scale), {"params": [], "names": [], "weight_decay": decay, "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


# -- the run -------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out: str
    steps: int
    final_loss: float
    val_loss: float | None
    val_ppl: float | None
    tokens_per_s: float
    metrics: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("metrics")
        return d


class _Interrupted(Exception):
    pass


def train(
    model: str | Program,
    data: str | list[str],
    out: str,
    *,
    resume: bool = False,
    force: bool = False,
    nproc: int = 1,
    stages: int | None = None,
    microbatches: int = 4,
    schedule: str = "1f1b",
    tensor_parallel: int | None = None,
    sequence_parallel: int | None = None,
    progress: bool | None = None,
    stop_after: int | None = None,
    **options,
) -> TrainResult:
    """Train `model` (an OUT folder, any MODEL form, or a Program) on `data` and write OUT2=`out`.

    `options` are `TrainConfig` fields. `nproc>1` launches that many ranks with torchrun (gloo on
    CPU, NCCL on CUDA; `optpipe.runtime.launch`). `stages=N` trains pipeline-parallel over N ranks
    (`optpipe.runtime.parallel`, `microbatches` per step, `schedule` 1f1b or gpipe).
    `tensor_parallel=N` shards every block over N ranks (DTensor), times `nproc` data-parallel
    replicas. `sequence_parallel=N` splits every sequence over N ranks (`optpipe.runtime.sequence_parallel`),
    times `nproc` data-parallel replicas. `stop_after` ends the run after that many steps as if interrupted (tests)."""
    config = TrainConfig(**options)
    if sequence_parallel:
        combined = (("--stages", stages), ("--tensor-parallel", tensor_parallel))
        return _train_sequence_parallel(
            model, data, out, config, ways=sequence_parallel, force=force, resume=resume, nproc=nproc, combined=combined
        )
    if stages and tensor_parallel:
        raise UsageError(
            "train: --stages and --tensor-parallel together are not supported yet",
            "choose one; --nproc adds data parallelism to --tensor-parallel",
        )
    if tensor_parallel:
        return _train_tensor_parallel(
            model, data, out, config, ways=tensor_parallel, force=force, resume=resume, nproc=nproc
        )
    if stages:
        return _train_pipelined(
            model,
            data,
            out,
            config,
            stages=stages,
            microbatches=microbatches,
            schedule=schedule,
            force=force,
            resume=resume,
            nproc=nproc,
        )
    if nproc > 1 and not _distributed():
        return _launch_data_parallel(model, data, out, config, resume=resume, force=force, nproc=nproc)
    return Trainer(model, data, out, config, resume=resume, force=force, progress=progress).run(stop_after)


class Trainer:
    def __init__(self, model, data, out: str, config: TrainConfig, *, resume=False, force=False, progress=None):
        self.config, self.out = config, os.path.abspath(out)
        self.rank, self.world = _rank_world()
        self.device = (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            if config.target == "cuda"
            else torch.device("cpu")
        )
        if config.target == "cuda" and not torch.cuda.is_available():
            raise UsageError("train --target cuda: no CUDA device is available", "use --target cpu")
        _refuse_writing_into(self.out, model, config.distill_from)
        self.program, self.source_dir = _load_trainable(model)
        _check_lm_head(self.program, model)
        self.teacher = None
        if config.distill_from:
            self.teacher, _ = _load_trainable(config.distill_from)
        _prepare_out(self.out, resume=resume, force=force, rank=self.rank, check_only=True)  # before any work
        self.resume = resume
        self.progress = sys.stderr.isatty() if progress is None else progress
        seq_len = config.seq_len or int(self.program.example_inputs[0].shape[-1])
        if self.world > 1 and (config.batch_size // config.grad_accum) % self.world:
            raise UsageError(
                f"train: micro-batch {config.batch_size // config.grad_accum} is not divisible by {self.world} ranks",
                "make --batch-size a multiple of --grad-accum × --nproc",
            )
        self.data = _training_data(self.program, self.source_dir, data, config, seq_len)
        self.n_outputs = _output_count(self.program)
        if config.objective == "mlm+nsp":
            _check_nsp_head(self.program, model)
        self.pairs, self.loss_parts = 1, {}
        self.sparse, self.sparse_note = sparse_prediction_program(self.program, config, self.teacher is not None)
        self.inputs_for = input_builder(self.sparse or self.program)
        self.names = select_trainable(self.program, config.trainable, self.teacher)
        params = dict(self.program.gm.named_parameters())
        trainable = set(self.names)
        for name, p in params.items():
            p.requires_grad_(name in trainable)
        self._build_models()
        named = [(n, params[n]) for n in self.names]
        from ..registry import get_target

        get_target(config.target).check_trainable(self.program, config.objective)  # before any work
        if config.target in BACKEND_TRAINED:
            groups = param_groups(named, config)
            self.backend = get_target(config.target).trainer(
                self.program,
                objective=config.objective,
                trainable=self.names,
                lr=config.lr,
                betas=config.betas,
                eps=config.eps,
                weight_decay=config.weight_decay,
                clip=config.clip or None,
                lr_scales={n: g["lr_scale"] for g in groups for n in g["names"]},
                weight_decays={n: g["weight_decay"] for g in groups for n in g["names"]},
            )
            if resume and not hasattr(self.backend, "optimizer_state"):
                raise UsageError(
                    f"train --target {config.target} cannot --resume (its optimizer state is not checkpointed)",
                    "resume on --target cpu, or start the run again",
                )
            self.optimizer = None
        else:
            self.backend = None
            groups = param_groups(named, config)
            self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, foreach=False)
        _prepare_out(self.out, resume=resume, force=force, rank=self.rank)  # everything checked: now write
        self.step = 0
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")

    # models ------------------------------------------------------------------------------------
    def _build_models(self):
        config = self.config
        self.program.gm.to(self.device)
        self.tap_paths: list[str] = []
        self.tap_scale: list[float] | None = None
        if self.teacher is not None and config.hidden_weight > 0:
            wanted = block_paths(self.program) + [
                p for p in rewritten_paths(self.program) if any(k in p for k in ("attn", "attention"))
            ]
            student, found = tapped_module(self.program, wanted)
            teacher, tfound = tapped_module(self.teacher, found)
            keep = [p for p in found if p in tfound]
            if keep != found:
                student, found = tapped_module(self.program, keep)
                teacher, _ = tapped_module(self.teacher, keep)
            self.tap_paths = found
            self.student_fn, self.teacher_fn = student, teacher
        else:
            self.student_fn, _ = tapped_module(self.sparse or self.program, [])
            self.teacher_fn = tapped_module(self.teacher, [])[0] if self.teacher is not None else None
        if self.teacher_fn is not None:
            self.teacher_fn.to(self.device)
            for p in self.teacher_fn.parameters():
                p.requires_grad_(False)
        self.model = self.student_fn
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.student_fn, device_ids=None if self.device.type == "cpu" else [self.device]
            )
        if config.compile:
            self.model = torch.compile(self.model)

    # one optimizer step --------------------------------------------------------------------------
    def _micro_batches(self, batch: dict) -> Iterator[dict]:
        """This rank's slices of one global batch, one per accumulation step."""
        cfg = self.config
        micro = cfg.batch_size // cfg.grad_accum
        per_rank = micro // self.world
        for a in range(cfg.grad_accum):
            lo = a * micro + self.rank * per_rank
            yield {k: v[lo : lo + per_rank] for k, v in batch.items()}

    def _forward_loss(self, mb: dict, count: int) -> torch.Tensor:
        """Loss of a micro-batch, normalised by the global label count `count`, times the world
        size (DDP averages gradients over ranks)."""
        cfg = self.config
        mb = {k: v.to(self.device) for k, v in mb.items()}
        labels = mb["labels"]
        if self.sparse is not None:  # the head runs at the labelled positions only: their labels, in order
            mb["predict_mask"] = labels != IGNORE_INDEX
            labels = labels[mb["predict_mask"]]
        inputs = self.inputs_for(mb)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp):
            outs = self.model(*inputs)
            logits, taps = outs[0], outs[self.n_outputs :]
            total, _ = task_loss_sum(logits, labels, cfg.objective)
            if cfg.objective == "mlm+nsp":  # BERT's sum of the two means: the NSP part per pair
                nsp = nsp_loss_sum(outs[1], mb["next_sentence_label"])
                self.loss_parts["mlm_loss"] += float(total.detach()) / count
                self.loss_parts["nsp_loss"] += float(nsp.detach()) / self.pairs
                total = total + nsp * (count / self.pairs)
            if self.teacher_fn is not None:
                with torch.no_grad():
                    touts = self.teacher_fn(*inputs)
                kd = distill_kl_sum(logits, touts[0], labels, cfg.objective, cfg.temperature)
                total = cfg.alpha * total + (1 - cfg.alpha) * kd
                if taps and cfg.hidden_weight:
                    total = total + cfg.hidden_weight * self._hidden_loss_sum(taps, touts[1:])
        return total / count * self.world

    def _hidden_loss_sum(self, student_taps, teacher_taps) -> torch.Tensor:
        """Σ over tokens of the mean over taps of ‖s - t‖² / (hidden · var_t): each module's output
        matched in units of the teacher's spread (fixed per tap, so every rank uses the same scale)."""
        if self.tap_scale is None:
            batch = self.data.validation_batches(1, self.config.batch_size)
            with torch.no_grad():
                ref = (
                    self.teacher_fn(*self.inputs_for({k: v.to(self.device) for k, v in batch[0].items()}))[1:]
                    if batch
                    else teacher_taps
                )
            self.tap_scale = [float(t.float().var().clamp_min(1e-6)) for t in ref]
        total = sum(
            F.mse_loss(s.float(), t.float(), reduction="sum") / (scale * t.shape[-1])
            for s, t, scale in zip(student_taps, teacher_taps, self.tap_scale)
        )
        return total / len(student_taps)

    def _label_count(self, batch: dict) -> int:
        labels = batch["labels"]
        if self.config.objective == "clm":
            labels = labels[:, 1:]
        return max(1, int((labels != IGNORE_INDEX).sum()))

    def train_step(self, batch: dict, lr: float) -> float:
        """One optimizer step on one global batch; returns its mean loss over all ranks."""
        if self.backend is not None:
            return self._backend_step(batch, lr)
        count = self._label_count(batch)  # every rank holds the whole global batch: no all-reduce needed
        if "next_sentence_label" in batch:
            self.pairs = batch["next_sentence_label"].numel()
            self.loss_parts = {"mlm_loss": 0.0, "nsp_loss": 0.0}
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        micro = list(self._micro_batches(batch))
        for i, mb in enumerate(micro):
            sync = i == len(micro) - 1
            ctx = (
                self.model.no_sync()
                if self.world > 1 and not sync and hasattr(self.model, "no_sync")
                else contextlib.nullcontext()
            )
            with ctx:
                loss = self._forward_loss(mb, count)
                loss.backward()
            loss_sum += loss.detach().double().cpu() / self.world
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(loss_sum)
        if self.config.clip:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.config.clip, foreach=False
            )
        self.optimizer.step()
        return float(loss_sum)

    def _backend_step(self, batch: dict, lr: float) -> float:
        if self.world > 1 or self.teacher is not None:
            raise UsageError(
                f"train --target {self.config.target}: one process, no distillation",
                "distill or run data parallel on --target cpu/cuda",
            )
        count, losses = self._label_count(batch), 0.0
        if self.config.objective == "mlm+nsp":
            self.pairs = batch["next_sentence_label"].numel()
            self.loss_parts = {"mlm_loss": 0.0, "nsp_loss": 0.0}
        for mb in self._micro_batches(batch):
            n, nsp = self._label_count(mb), self._nsp_feeds(mb)
            losses += self.backend.accumulate(self.inputs_for(mb), mb["labels"], scale=n / count, **nsp) * n / count
            if nsp:  # the backend's means of this micro-batch, weighted as torch's sums are (_forward_loss)
                self.loss_parts["mlm_loss"] += self.backend.loss_parts["mlm_loss"] * n / count
                self.loss_parts["nsp_loss"] += self.backend.loss_parts["nsp_loss"] * nsp["nsp_scale"]
        self.backend.optimizer_step(lr)
        return losses

    def _nsp_feeds(self, mb: dict) -> dict:
        """mlm+nsp on a backend: the micro-batch's NSP labels, and its share of the batch's pairs (the
        weight of its mean NSP loss: the NSP part is a mean per pair, the MLM part per label token)."""
        if self.config.objective != "mlm+nsp":
            return {}
        labels = mb["next_sentence_label"]
        return {"next_sentence_label": labels, "nsp_scale": labels.numel() / self.pairs}

    def evaluate(self) -> tuple[float, float] | None:
        """(mean validation loss over the label tokens, perplexity) of the current weights."""
        batches = self.data.validation_batches(self.config.val_batches, self.config.batch_size)
        if self.backend is None:
            return validation_loss(
                self.student_fn,
                self.inputs_for,
                batches,
                self.config.objective,
                device=self.device,
                amp=self.config.amp,
            )
        if not batches:
            return None
        total, count = 0.0, 0
        for batch in batches:
            n = self._label_count(batch)
            nsp = {"next_sentence_label": batch["next_sentence_label"]} if self.config.objective == "mlm+nsp" else {}
            total += self.backend.eval_loss(self.inputs_for(batch), batch["labels"], **nsp) * n  # mlm+nsp: MLM part
            count += n
        loss = total / max(count, 1)
        return loss, math.exp(min(loss, 50.0))

    # checkpoints ----------------------------------------------------------------------------------
    def _state(self) -> dict:
        weights = (
            self.backend.state_dict()
            if self.backend is not None
            else {n: p.detach().cpu().clone() for n, p in self.program.gm.named_parameters()}
        )
        optimizer = (
            self.optimizer.state_dict()
            if self.optimizer is not None
            else self.backend.optimizer_state()
            if hasattr(self.backend, "optimizer_state")
            else None
        )
        return {
            "step": self.step,
            "weights": weights,
            "optimizer": optimizer,
            "data": self.data.state_dict(),
            "rng": torch.get_rng_state(),
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
        }

    def save_checkpoint(self) -> str | None:
        if self.rank != 0:
            return None
        root = os.path.join(self.out, "checkpoints")
        os.makedirs(root, exist_ok=True)
        final = os.path.join(root, f"step-{self.step:07d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save(self._state(), os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "state.pt"), "rb") as f:
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final) + "\n")
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        return final

    def load_checkpoint(self) -> bool:
        root = os.path.join(self.out, "checkpoints")
        try:
            with open(os.path.join(root, "latest")) as f:
                path = os.path.join(root, f.read().strip(), "state.pt")
        except FileNotFoundError:
            return False
        state = torch.load(path, weights_only=True)
        saved = json.loads(state["config"])
        mine = self.config.to_dict()
        differ = [
            k
            for k in saved
            if k not in ("steps", "log_every", "checkpoint_every", "val_every")
            and json.dumps(saved[k]) != json.dumps(mine.get(k))
        ]
        if differ:
            raise UsageError(
                f"train --resume: {', '.join(differ)} differ from the run in {self.out}",
                "resume with the same options (only --steps and logging may change)",
            )
        params = dict(self.program.gm.named_parameters(remove_duplicate=False))  # tied: every name
        with torch.no_grad():
            for name, value in state["weights"].items():
                params[name].copy_(value)
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.backend is not None:
            self.backend.load_state(state["weights"], state["optimizer"])
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        self.step = int(state["step"])
        _truncate_metrics(self.metrics_path, self.step)
        return True

    # the loop -----------------------------------------------------------------------------------
    def _write_run_info(self) -> None:
        """OUT/train.json (what this run trains, how), and on stderr what train chose by itself."""
        _write_json(
            os.path.join(self.out, "train.json"),
            {
                "config": self.config.to_dict(),
                "trainable": self.names,
                "taps": self.tap_paths,
                "sparse_prediction": self.sparse_note,
                "world_size": self.world,
                "model": self.program.meta.get("source"),
            },
        )
        if self.sparse_note.get("applied"):
            print(f"optpipe train: sparse-prediction: {self.sparse_note['reason']}", file=sys.stderr)

    def run(self, stop_after: int | None = None) -> TrainResult:
        cfg = self.config
        if self.resume and not self.load_checkpoint() and self.rank == 0:
            print(f"optpipe train: no checkpoint in {self.out}; starting from step 0", file=sys.stderr)
        if self.rank == 0:
            self._write_run_info()
        val_every = cfg.val_every or max(1, cfg.steps // 4)
        ckpt_every = cfg.checkpoint_every
        tokens_per_step = cfg.batch_size * self.data.seq_len
        rows, last_loss, val = [], float("nan"), None
        started, start_step = time.perf_counter(), self.step
        window_t, window_tokens = time.perf_counter(), 0
        interrupted = False
        previous = signal.getsignal(signal.SIGINT)
        if self.rank == 0 and self.world == 1:
            signal.signal(signal.SIGINT, _raise_interrupted)
        try:
            while self.step < cfg.steps:
                if stop_after is not None and self.step - start_step >= stop_after:
                    raise _Interrupted
                batch = self.data.next_batch(cfg.batch_size)
                if self.step == start_step:  # a wrong --seq-len or dtype fails here in one line, not in a kernel
                    check_inputs(self.sparse or self.program, self.inputs_for(batch), where="train --data")
                lr = cfg.lr_at(self.step)
                last_loss = self.train_step(batch, lr)
                if not math.isfinite(last_loss):
                    raise OptpipeError(
                        f"train: loss is {last_loss} at step {self.step + 1}", "lower --lr, or use --clip"
                    )
                self.step += 1
                window_tokens += tokens_per_step
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_tokens = now, 0
                    row = {"step": self.step, "loss": round(last_loss, 6), "lr": lr, "tokens_per_s": round(tps, 1)}
                    row.update({k: round(v, 6) for k, v in self.loss_parts.items()})  # mlm+nsp: each loss
                    if self.step % val_every == 0 or self.step == cfg.steps:
                        val = self.evaluate()
                        if val:
                            row.update(val_loss=round(val[0], 6), val_ppl=round(val[1], 4))
                    rows.append(row)
                    self._log(row, started, start_step)
                if ckpt_every and self.step % ckpt_every == 0:
                    self.save_checkpoint()
        except (_Interrupted, KeyboardInterrupt):
            interrupted = True
        finally:
            signal.signal(signal.SIGINT, previous) if self.rank == 0 and self.world == 1 else None
        if interrupted:
            path = self.save_checkpoint()
            if self.progress:
                print(file=sys.stderr)
            raise TrainingInterrupted(self.step, path)
        if self.progress and self.rank == 0:
            print(file=sys.stderr)
        if ckpt_every and self.step % ckpt_every:
            self.save_checkpoint()
        self._finish()
        elapsed = time.perf_counter() - started
        return TrainResult(
            self.out,
            self.step,
            last_loss,
            val[0] if val else None,
            val[1] if val else None,
            (self.step - start_step) * tokens_per_step / max(elapsed, 1e-9),
            rows,
        )

    def _log(self, row: dict, started: float, start_step: int) -> None:
        if self.rank != 0:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        done = self.step - start_step
        eta = (time.perf_counter() - started) / max(done, 1) * (self.config.steps - self.step)
        line = (
            f"step {self.step}/{self.config.steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
            f"{row['tokens_per_s']:.0f} tok/s  ETA {_duration(eta)}"
        )
        if "val_ppl" in row:
            line += f"  val ppl {row['val_ppl']:.2f}"
        if self.progress:
            print("\r" + line.ljust(100), end="", file=sys.stderr, flush=True)
            if "val_ppl" in row:
                print(file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def _finish(self) -> None:
        if self.backend is not None:
            self.backend.load_into(self.program)
        if self.rank != 0:
            return
        self.program.gm.to("cpu")
        for p in self.program.gm.parameters():
            p.requires_grad_(True)
        _write_trained(
            self.program,
            self.out,
            target="cuda" if self.config.target == "cuda" else "cpu",
            trained_on=self.config.target,
            tokenizer=self.data.tokenizer,
        )


@torch.no_grad()
def validation_loss(
    fn, inputs_for, batches, objective: str, *, device=None, amp: bool = False
) -> tuple[float, float] | None:
    """(mean loss over the label tokens of `batches`, perplexity) of module `fn` (outputs[0]: logits)."""
    if not batches:
        return None
    total, count = 0.0, 0
    for batch in batches:
        inputs = tuple(x.to(device) if device is not None else x for x in inputs_for(batch))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = fn(*inputs)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        s, n = task_loss_sum(logits, batch["labels"].to(logits.device), objective)
        total += float(s)
        count += n
    loss = total / max(count, 1)
    return loss, math.exp(min(loss, 50.0))


def evaluate(model, data, **options) -> dict:
    """Validation loss and perplexity of `model` on the validation split of `data`, with the same
    split, packing and masking `train` would use for these options (TrainConfig fields)."""
    config = TrainConfig(**options)
    program, folder = _load_trainable(model)
    seq_len = config.seq_len or int(program.example_inputs[0].shape[-1])
    tdata = _training_data(program, folder, data, config, seq_len)
    fn, _ = tapped_module(program, [])
    res = validation_loss(
        fn, input_builder(program), tdata.validation_batches(config.val_batches, config.batch_size), config.objective
    )
    if res is None:
        raise UsageError("evaluate: the data has no validation split", "use a val fraction > 0")
    return {"val_loss": res[0], "val_ppl": res[1]}


class TrainingInterrupted(OptpipeError):
    """The run was stopped (Ctrl-C); a checkpoint was written and `--resume` continues it."""

    exit_code = 130

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(
            f"training interrupted at step {step}; checkpoint {checkpoint or 'not written'}",
            "rerun the same command with --resume to continue",
        )
        self.step, self.checkpoint = step, checkpoint


# -- helpers ---------------------------------------------------------------------------------------
def _raise_interrupted(signum, frame):
    raise _Interrupted


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _truncate_metrics(path: str, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(rows)
    os.replace(tmp, path)


def _refuse_writing_into(out: str, *sources) -> None:
    """The trained program never overwrites the model (or teacher) it was read from."""
    for source in sources:
        if isinstance(source, str) and os.path.abspath(source) == out:
            raise UsageError(f"train: -o {out} is the model it reads", "write the trained program to another folder")


def _write_trained(program: Program, out: str, *, target: str, trained_on: str, tokenizer) -> None:
    """What makes OUT2 an OUT folder: program.pt2, target.json, pipeline.txt, tokenizer.json."""
    program.save(os.path.join(out, "program.pt2"))
    _write_json(os.path.join(out, "target.json"), {"target": target, "info": {"trained_on": trained_on}})
    with open(os.path.join(out, "pipeline.txt"), "w") as f:
        f.write(program.pipeline + "\n")
    files = ["program.pt2", "target.json", "pipeline.txt"]
    tok = getattr(tokenizer, "path", "")
    if tok and os.path.isfile(tok):
        shutil.copyfile(tok, os.path.join(out, "tokenizer.json"))
        files.append("tokenizer.json")
    # metrics.jsonl and checkpoints/ stay out: --resume rewrites them
    write_manifest(out, files=files)


def _prepare_out(out: str, *, resume: bool, force: bool, rank: int, check_only: bool = False) -> None:
    """Refuse an OUT2 that must not be replaced; unless `check_only`, (re)create it for a new run."""
    from ..outdir import MARKER, check_writable

    if resume:
        if not os.path.isdir(out):
            raise UsageError(f"train --resume: {out} does not exist", "start the run without --resume")
        return
    if rank != 0:
        return
    check_writable(out, force)
    if os.path.isdir(out) and os.path.isdir(os.path.join(out, "checkpoints")) and not force:
        raise UsageError(f"{out} holds a training run", "continue it with --resume, or pass --force to start over")
    if check_only:
        return
    if os.path.isdir(out) and os.listdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w") as f:
        f.write("written by optpipe; safe to replace with a new optpipe run\n")


def _load_trainable(model) -> tuple[Program, str | None]:
    """(Program, folder it came from) for an OUT folder, any MODEL form, or a Program."""
    if isinstance(model, Program):
        return model, None
    from ..loading import load_model

    program = load_model(model)
    if program.meta.get("kv_cache"):
        raise UsageError(
            f"{model} is a kv-cache step program (generation only)",
            "train the program before the kv-cache pass, then add kv-cache",
        )
    folder = model if os.path.isdir(model) else None
    return program, folder


def _training_data(program: Program, folder: str | None, data, config: TrainConfig, seq_len: int):
    """The data of a run: `TrainingData` (clm, mlm), `NspData` (mlm+nsp) or `Seq2SeqData` (seq2seq)."""
    tokenizer = tokenizer_for_program(program, folder)
    common = dict(
        seq_len=seq_len,
        seed=config.seed,
        val_fraction=config.val_fraction,
        text_key=config.text_key,
        vocab_size=_vocab(program),
    )
    masking = dict(mask=config.mask, mask_rate=config.mask_rate)
    if config.objective == "mlm+nsp":
        return NspData(data, tokenizer, **common, **masking)
    if config.objective == "seq2seq":
        return Seq2SeqData(data, tokenizer, options=options_for(program, config, tokenizer), **common)
    return TrainingData(data, tokenizer, objective=config.objective, **common, **masking)


def _check_lm_head(program: Program, source) -> None:
    """The first output must be logits over the vocabulary (not hidden states or an embedding)."""
    out = program.gm.graph.output_node().args[0]
    first = out[0] if isinstance(out, (tuple, list)) else out
    val = first.meta.get("val") if isinstance(first, torch.fx.Node) else None
    vocab = _vocab(program)
    if val is None or vocab is None:
        return
    if val.dim() != 3 or val.shape[-1] != vocab:
        raise UsageError(
            f"train: {source if isinstance(source, str) else 'the program'} outputs "
            f"{list(val.shape)}, not logits over its {vocab}-token vocabulary",
            "train a model with a language-model head (e.g. AutoModelForCausalLM, BertForMaskedLM)",
        )


def _output_count(program: Program) -> int:
    out = program.gm.graph.output_node().args[0]
    return len(out) if isinstance(out, (tuple, list)) else 1


def _check_nsp_head(program: Program, source) -> None:
    """mlm+nsp needs the next-sentence head as the second output ([batch, 2]) and token types."""
    name = source if isinstance(source, str) else "the program"
    if not has_nsp_head(program):
        raise UsageError(
            f"train --objective mlm+nsp: {name} has no next-sentence head (its output: "
            f"{program.meta.get('output', 'one tensor')})",
            "capture BertForPreTraining (masked-LM and next-sentence heads), e.g. "
            "BertForPreTraining.from_pretrained(BERT_FOLDER); or train --objective mlm",
        )
    if "token_type_ids" not in program.input_names:
        raise UsageError(
            f"train --objective mlm+nsp: {name} takes no token_type_ids (inputs: {', '.join(program.input_names)})",
            "capture it with token_type_ids in the example inputs",
        )


def _vocab(program: Program) -> int | None:
    cfg = program.meta.get("config") or {}
    return cfg.get("vocab_size") or program.meta.get("vocab_size") or token_vocab(program)


# -- model parallel (optpipe.runtime.parallel) -----------------------------------------------------
def _train_pipelined(
    model,
    data,
    out: str,
    config: TrainConfig,
    *,
    stages: int,
    microbatches: int,
    schedule: str,
    force: bool,
    resume: bool,
    nproc: int,
) -> TrainResult:
    """Pipeline-parallel training (one rank per stage, torch.distributed.pipelining)."""
    if config.batch_size % microbatches:
        raise UsageError(
            f"train --stages: batch size {config.batch_size} is not divisible by {microbatches} micro-batches",
            "make --batch-size a multiple of --microbatches",
        )

    def run(program, batches):
        res = pipeline_train(
            program,
            batches,
            stages=stages,
            microbatches=microbatches,
            schedule=schedule,
            **_adamw(config),
        )
        return res, {"stages": stages, "microbatches": microbatches, "schedule": schedule}

    return _train_parallel(
        "--stages",
        run,
        f"{stages} pipeline stages",
        model,
        data,
        out,
        config,
        force=force,
        refused=(("--resume", resume), ("--nproc", nproc > 1), ("--grad-accum", config.grad_accum > 1)),
        hint="the pipeline accumulates over its --microbatches" if config.grad_accum > 1 else None,
    )


def _check_replicas(flag: str, config: TrainConfig, nproc: int) -> None:
    if config.batch_size % nproc:
        raise UsageError(
            f"train {flag}: batch size {config.batch_size} does not split over {nproc} data-parallel replicas",
            "make --batch-size a multiple of --nproc",
        )
    if (config.batch_size // nproc) % config.grad_accum:
        raise UsageError(
            f"train {flag}: {config.batch_size // nproc} rows per replica do not split into "
            f"{config.grad_accum} accumulation steps",
            "make --batch-size a multiple of --nproc x --grad-accum",
        )


def _adamw(config: TrainConfig) -> dict:
    """The model-parallel runs' optimizer options: AdamW, the lr of every step from the schedule
    (warmup + cosine) and gradient clipping, as in one process."""
    return {
        "lr": [config.lr_at(step) for step in range(config.steps)],
        "optimizer": "adamw",
        "objective": config.objective,
        "betas": config.betas,
        "eps": config.eps,
        "weight_decay": config.weight_decay,
        "clip": config.clip or None,
    }


def _train_tensor_parallel(
    model, data, out: str, config: TrainConfig, *, ways: int, force: bool, resume: bool, nproc: int
) -> TrainResult:
    """Tensor-parallel training: every block sharded over `ways` ranks (DTensor), times `nproc`
    data-parallel replicas."""
    _check_replicas("--tensor-parallel", config, nproc)

    def run(program, batches):
        res = tensor_train(
            program,
            batches,
            ways=ways,
            data_parallel=nproc,
            grad_accum=config.grad_accum,
            **_adamw(config),
        )
        return res, {"tensor_parallel": ways, "data_parallel": nproc}

    where = f"{ways}-way tensor parallel" + (f" x {nproc} data-parallel replicas" if nproc > 1 else "")
    return _train_parallel(
        "--tensor-parallel", run, where, model, data, out, config, force=force, refused=(("--resume", resume),)
    )


def _train_sequence_parallel(
    model, data, out: str, config: TrainConfig, *, ways: int, force: bool, resume: bool, nproc: int, combined
) -> TrainResult:
    """Sequence-parallel training: every sequence split over `ways` ranks (ring / halo / prefix-scan
    exchanges; `partition{strategy=sequence}` planned here unless the program carries that plan),
    times `nproc` data-parallel replicas."""
    for flag, on in combined:
        if on:
            raise UsageError(
                f"train: --sequence-parallel and {flag} together are not supported yet",
                "choose one; --nproc adds data parallelism to --sequence-parallel",
            )
    if config.seq_len and config.seq_len % ways:
        raise UsageError(
            f"train --sequence-parallel: --seq-len {config.seq_len} does not divide into {ways} shards",
            f"use a --seq-len that is a multiple of {ways}",
        )
    _check_replicas("--sequence-parallel", config, nproc)

    def run(program, batches):
        planned = sequence_planned_for(program, ways, batches[0]["input_ids"])
        res = sequence_train(
            planned,
            batches,
            ways=ways,
            data_parallel=nproc,
            grad_accum=config.grad_accum,
            **_adamw(config),
        )
        return res, {"sequence_parallel": ways, "data_parallel": nproc, "partition": planned.meta["partition"]}

    where = f"{ways}-way sequence parallel" + (f" x {nproc} data-parallel replicas" if nproc > 1 else "")
    return _train_parallel(
        "--sequence-parallel", run, where, model, data, out, config, force=force, refused=(("--resume", resume),)
    )


def _train_parallel(
    flag: str, run, trained_on: str, model, data, out: str, config: TrainConfig, *, force: bool, refused, hint=None
) -> TrainResult:
    """Model-parallel training through optpipe.runtime.parallel (`run(program, batches) -> (result, info)`):
    AdamW at the scheduled lr of each step, with gradient clipping, weight decay on matrices only
    and (tensor, sequence) gradient accumulation, as in one process. It has no checkpoints,
    distillation, layer-wise lr decay or frozen parameters (yet): those are refused."""
    unsupported = [
        name
        for name, on in (
            *refused,
            ("--distill-from", config.distill_from),
            ("--checkpoint-every", config.checkpoint_every),
            ("--layer-decay", config.layer_decay is not None),
            ("--trainable", config.trainable != ("*",)),
            ("--target", config.target != "cpu"),
        )
        if on
    ]
    if unsupported:
        raise UsageError(
            f"train {flag} does not take {', '.join(unsupported)} yet",
            hint or f"train with the plain options, or without {flag}",
        )
    program, folder = _load_trainable(model)
    _check_lm_head(program, model)
    out = os.path.abspath(out)
    _refuse_writing_into(out, model)
    _prepare_out(out, resume=False, force=force, rank=0)
    seq_len = config.seq_len or int(program.example_inputs[0].shape[-1])
    data_ = _training_data(program, folder, data, config, seq_len)
    batches = [data_.next_batch(config.batch_size) for _ in range(config.steps)]
    started = time.perf_counter()
    res, info = run(program, batches)
    elapsed = time.perf_counter() - started
    params = dict(program.gm.named_parameters(remove_duplicate=False))  # tied weights under each name
    with torch.no_grad():
        for name, value in res["weights"].items():
            if name in params:
                params[name].copy_(value)
    tokens = config.batch_size * seq_len
    rows = [
        {
            "step": i + 1,
            "loss": round(float(loss), 6),
            "lr": config.lr_at(i),
            "tokens_per_s": round(tokens / max(t, 1e-9), 1),
        }
        for i, (loss, t) in enumerate(zip(res["losses"], res["seconds"]))
    ]
    val = validation_loss(
        tapped_module(program, [])[0],
        input_builder(program),
        data_.validation_batches(config.val_batches, config.batch_size),
        config.objective,
    )
    if val:
        rows[-1].update(val_loss=round(val[0], 6), val_ppl=round(val[1], 4))
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    _write_json(
        os.path.join(out, "train.json"), {"config": config.to_dict(), **info, "model": program.meta.get("source")}
    )
    _write_trained(program, out, target="cpu", trained_on=trained_on, tokenizer=data_.tokenizer)
    return TrainResult(
        out,
        config.steps,
        rows[-1]["loss"],
        val[0] if val else None,
        val[1] if val else None,
        tokens * config.steps / max(elapsed, 1e-9),
        rows,
    )


def _distributed() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _rank_world() -> tuple[int, int]:
    if not _distributed():
        return 0, 1
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("OPTPIPE_TRAIN_TARGET") == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=float(os.environ.get("OPTPIPE_DIST_TIMEOUT", 120)))
        )
    return dist.get_rank(), dist.get_world_size()


def _launch_data_parallel(model, data, out, config: TrainConfig, *, resume, force, nproc) -> TrainResult:
    """Run this training on `nproc` torchrun ranks (`run_data_rank`); returns rank 0's result."""
    if isinstance(model, Program):
        raise UsageError("train with nproc > 1 needs a model path (each rank loads it)", "save the program first")
    spec = {
        "kind": "data",
        "model": model,
        "data": data,
        "out": out,
        "resume": resume,
        "force": force,
        "config": config.to_dict(),
    }
    with tempfile.TemporaryDirectory(prefix="optpipe-train-") as tmp:
        run_ranks(spec, tmp, nproc, what="data-parallel training", env={"OPTPIPE_TRAIN_TARGET": config.target})
        with open(os.path.join(tmp, "result.json")) as f:
            res = json.load(f)
    return TrainResult(**res, metrics=_read_metrics(os.path.join(out, "metrics.jsonl")))


def _read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_data_rank(spec: dict, folder: str, rank: int) -> int:
    """Rank `rank` of a data-parallel run (`optpipe.runtime.rank`): its Trainer, joined to the others
    through torch.distributed; rank 0 writes `folder/result.json`."""
    import torch.distributed as dist

    trainer = Trainer(
        spec["model"],
        spec["data"],
        spec["out"],
        TrainConfig.from_dict(spec["config"]),
        resume=spec["resume"],
        force=spec["force"],
        progress=False,
    )
    result = trainer.run()
    if trainer.rank == 0:
        _write_json(os.path.join(folder, "result.json"), result.to_dict())
    dist.barrier()
    dist.destroy_process_group()
    return 0


__all__ = [
    "BACKEND_TRAINED",
    "TARGETS",  # optpipe.runtime.train_config's, with TrainConfig
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingInterrupted",
    "block_paths",
    "changed_parameters",
    "evaluate",
    "layer_of",
    "param_groups",
    "rewritten_paths",
    "run_data_rank",
    "select_trainable",
    "tapped_module",
    "train",
    "validation_loss",
]
