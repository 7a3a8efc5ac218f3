"""One process's training run: the reference the pipeline-, tensor- and sequence-parallel tests compare with."""

from __future__ import annotations

import copy

import torch

from optpipe.losses import task_loss


def one_process_run(program, batches, optimizer: str, lr, clip: float | None = None, eps: float = 1e-8):
    """Train a copy of `program.gm` on `batches` ({"input_ids", "labels"}, clm), one step each.
    `lr`: a number or one per step; `clip`: clip_grad_norm_ before each step (asserted to bind).
    Returns (the trained GraphModule, the losses, the last step's gradients before clipping, as the
    ranks report them, under every name of a tied weight)."""
    gm = copy.deepcopy(program.gm)
    for p in gm.parameters():
        p.requires_grad_(True)
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(batches)
    opt = (
        torch.optim.SGD(gm.parameters(), lr=lrs[0])
        if optimizer == "sgd"
        else torch.optim.AdamW(gm.parameters(), lr=lrs[0], eps=eps, weight_decay=0.0)
    )
    losses, grads = [], {}
    for b, step_lr in zip(batches, lrs):
        opt.zero_grad()
        loss = task_loss(gm(b["input_ids"]), b["labels"], "clm")
        loss.backward()
        losses.append(loss.item())
        grads = {n: p.grad.clone() for n, p in gm.named_parameters(remove_duplicate=False)}
        if clip:
            assert torch.nn.utils.clip_grad_norm_(gm.parameters(), clip) > clip  # the clipping binds
        opt.param_groups[0]["lr"] = step_lr
        opt.step()
    return gm, losses, grads
