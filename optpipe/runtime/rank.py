"""A torchrun rank of optpipe: `python -m optpipe.runtime.rank SPEC FOLDER`, started by
`optpipe.runtime.launch.run_ranks`. The spec's `kind` picks the work:

- "data": this rank's share of data-parallel training (`optpipe.runtime.training.run_data_rank`);
- "pipeline": this rank's stages of a pipelined run (`optpipe.runtime.parallel.run_pipeline_rank`);
- "tensor": this rank's shard of a tensor-parallel run (`optpipe.runtime.parallel.run_tensor_rank`);
- "sequence": this rank's sequence shard (`optpipe.runtime.sequence_parallel.run_sequence_rank`).

Whatever fails on a rank is left for the parent's one-line message (`launch.record_rank_failure`).
"""

from __future__ import annotations

import json
import os
import sys

from .launch import record_rank_failure
from .parallel import run_pipeline_rank, run_tensor_rank
from .sequence_parallel import run_sequence_rank
from .training import run_data_rank

RANK_MAINS = {
    "data": run_data_rank,
    "pipeline": run_pipeline_rank,
    "tensor": run_tensor_rank,
    "sequence": run_sequence_rank,
}
"""Spec kind -> `main(spec, folder, rank) -> exit code`."""


def main(spec_path: str, folder: str) -> int:
    """Run this rank (`RANK` from torchrun) of the job in `spec_path`; its exit code."""
    rank = int(os.environ.get("RANK", "0"))
    kind = "rank"
    try:
        with open(spec_path) as f:
            spec = json.load(f)
        kind = spec["kind"]
        return RANK_MAINS[kind](spec, folder, rank)
    except Exception as e:  # noqa: BLE001 - every failure is reported with the rank that saw it
        return record_rank_failure(folder, rank, kind, e)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
