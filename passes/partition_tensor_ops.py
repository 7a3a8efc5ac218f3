"""The collectives in a tensor-parallel rank's graph (inserted by `partition{strategy=tensor}`,
passes/partition_tensor.py) and the mesh they communicate over.

`tp_copy` / `tp_reduce` are Megatron's `f` / `g` written with DTensor, so autograd gives their
backward. A rank program calls them by reference (`call_function` nodes), so they live where both
the pass that inserts them and the runtime that runs the ranks (`optpipe.runtime.parallel`, inside
`tensor_parallel_mesh(mesh)`) can reach them.
"""

from __future__ import annotations

import contextlib

import torch

from optpipe.errors import PipelineError

_TP_MESH = None


@contextlib.contextmanager
def tensor_parallel_mesh(mesh):
    """Within this block, `tp_copy`/`tp_reduce` (the collectives in a tensor-parallel rank's graph)
    communicate over `mesh`, a 1-d DeviceMesh of the ranks that share each block."""
    global _TP_MESH
    previous, _TP_MESH = _TP_MESH, mesh
    try:
        yield mesh
    finally:
        _TP_MESH = previous


def current_mesh():
    if _TP_MESH is None:
        raise PipelineError(
            "a tensor-parallel rank program ran outside tensor_parallel_mesh",
            "run it with optpipe.runtime.parallel.tensor_run / tensor_train",
        )
    return _TP_MESH


def tp_copy(x: torch.Tensor) -> torch.Tensor:
    """Megatron's `f` on DTensor: the replicated input of column-wise projections. Identity forward;
    backward all-reduces the gradient (a Partial sum over the ranks' heads)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = current_mesh()
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def tp_reduce(x: torch.Tensor) -> torch.Tensor:
    """Megatron's `g` on DTensor: the row-wise projection's partial sums redistributed Partial ->
    Replicate (an all-reduce) forward; backward passes the replicated gradient through."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = current_mesh()
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()
