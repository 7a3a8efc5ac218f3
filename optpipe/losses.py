"""The training losses every trainer uses — torch, ONNX Runtime and TVM alike — and the label value
they ignore. A loss is a mean (or, for data and pipeline parallelism, a sum and a count) over the
label tokens of an objective:

- `clm`: next-token cross-entropy, logits[:, :-1] against labels[:, 1:];
- `mlm`: cross-entropy at the labelled (masked) positions;
- `mlm+nsp`: `mlm`'s token loss; the trainer adds the next-sentence head's (`nsp_loss_sum`; the
  onnxruntime and tvm loss graphs take the head's labels as one more input);
- `seq2seq`: cross-entropy of the decoder's logits against the target ids (labels come unshifted:
  the decoder's inputs are the labels shifted right, so position t already predicts label t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import UsageError

IGNORE_INDEX = -100
"""Label value of positions that carry no loss (padding, unmasked MLM tokens)."""
OBJECTIVES = ("clm", "mlm", "seq2seq", "mlm+nsp")


def task_loss_sum(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies, number of label tokens) for `objective`."""
    if objective == "clm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((labels != IGNORE_INDEX).sum())


def task_loss(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """Mean cross-entropy over the label tokens: the loss every backend trains and reports (it
    exports to ONNX as it is: onnxruntime-training builds its gradient graph from it)."""
    if objective == "clm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    elif objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r}", f"one of {', '.join(OBJECTIVES)}")
    logits = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(
        logits if logits.dtype == torch.float32 else logits.float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def distill_kl_sum(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, objective: str, temperature: float
) -> torch.Tensor:
    """Σ over label positions of T²·KL(softmax(teacher/T) ‖ softmax(student/T))."""
    if objective == "clm":
        student, teacher, labels = student[:, :-1], teacher[:, :-1], labels[:, 1:]
    keep = labels.reshape(-1) != IGNORE_INDEX
    s = student.reshape(-1, student.shape[-1])[keep].float() / temperature
    t = teacher.reshape(-1, teacher.shape[-1])[keep].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    return kl * temperature**2


def nsp_loss_sum(nsp_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over sentence pairs of the next-sentence head's cross-entropy (BERT: label 0 = is next)."""
    return F.cross_entropy(nsp_logits.float(), labels.reshape(-1), reduction="sum")


def nsp_loss(nsp_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over sentence pairs of the next-sentence head's cross-entropy (what onnxruntime exports)."""
    return F.cross_entropy(nsp_logits.float(), labels.reshape(-1))


def has_nsp_head(program) -> bool:
    """Whether `program`'s second output is next-sentence logits [batch, 2], as mlm+nsp needs."""
    out = program.gm.graph.output_node().args[0]
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    val = outs[1].meta.get("val") if len(outs) > 1 and isinstance(outs[1], torch.fx.Node) else None
    return val is not None and val.dim() == 2 and val.shape[-1] == 2


def require_nsp_head(program, target: str) -> None:
    """UsageError in one line when `program` cannot train --objective mlm+nsp on `target`."""
    if not has_nsp_head(program):
        raise UsageError(
            f"target {target} cannot train --objective mlm+nsp: the program has no next-sentence head "
            f"(its output: {program.meta.get('output', 'one tensor')})",
            "capture BertForPreTraining (masked-LM and next-sentence heads), or train --objective mlm",
        )
