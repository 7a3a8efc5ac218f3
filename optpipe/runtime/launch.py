"""The one torchrun launcher of optpipe: the parent side of every multi-process run (data-parallel
training, pipeline and tensor parallelism), and what the parent and its ranks share.

    run_ranks({"kind": "pipeline", ...}, folder, 2, what="pipeline", timeout=60.0,
              describe=lambda r: f"rank {r} (stage {r})", neighbours=lambda r: {1 - r})

writes the spec to `folder/spec.json` and runs
`python -m torch.distributed.run --standalone --nproc-per-node N -m optpipe.runtime.rank SPEC FOLDER`.
The spec's `kind` ("data", "pipeline" or "tensor") picks what each rank runs (`optpipe.runtime.rank`);
the ranks write their results into FOLDER, and a rank that fails writes one line about it to
`FOLDER/rank_R.error` (`record_rank_failure`).

Failure: torchrun stops the other ranks as soon as one exits with an error, and the parent raises one
PipelineError line naming the rank that failed first (torchrun's "Root Cause", else the lowest rank
that left a message), with that rank's own message. When the first ranks to fail timed out waiting
on a peer, the culprit is the peer they waited on that said nothing (alive but stuck), and the line
names it. With a `timeout`, the whole run is bounded by `2 × timeout + 120` seconds.

Fault injection for tests: `OPTPIPE_PIPELINE_FAIL_RANK=r` makes rank r of a pipeline or tensor-parallel
run exit abruptly before step `OPTPIPE_PIPELINE_FAIL_STEP` (default 0), or with
`OPTPIPE_PIPELINE_FAIL_MODE=hang` stay alive but stuck there (`fault_point`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

from ..errors import OptpipeError, PipelineError

RANK_MODULE = "optpipe.runtime.rank"
"""The module every torchrun rank runs (`python -m`)."""
STARTUP_TIMEOUT = 120.0
"""Seconds the ranks may take to start and meet (imports on a busy machine); `timeout` bounds the rest."""
FAIL_RANK_ENV = "OPTPIPE_PIPELINE_FAIL_RANK"
FAIL_STEP_ENV = "OPTPIPE_PIPELINE_FAIL_STEP"
FAIL_MODE_ENV = "OPTPIPE_PIPELINE_FAIL_MODE"
FAIL_EXIT_CODE = 43
STUCK_HINT = (
    "the stuck rank is alive but not communicating (a deadlock, or a rank far slower than the others: raise timeout)"
)
DIED_HINT = "a rank that leaves no message crashed or was killed (out of memory?)"
FAILED_HINT = "the error is that rank's own; the other ranks only stopped because it failed"


# -- the parent ---------------------------------------------------------------------------------------
def run_ranks(
    spec: dict,
    folder: str,
    ranks: int,
    *,
    what: str,
    describe: Callable[[int], str] | None = None,
    neighbours: Callable[[int], set[int]] | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run `spec` (a JSON-able dict with a `kind`) on `ranks` torchrun ranks writing into `folder`.

    `what` names the run in messages ("pipeline", "tensor parallel", ...); `describe(r)` names rank
    r ("rank 1 (stage 1)"; default "rank 1"); `neighbours(r)` are the ranks that rank r waits on
    (to find a stuck one). `timeout`: the ranks' own bound on every wait (None: unbounded run).
    `env`: variables added to the ranks' environment. Raises PipelineError when the run fails."""
    describe = describe or (lambda r: f"rank {r}")
    neighbours = neighbours or (lambda r: set())
    spec_path = os.path.join(folder, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    rank_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        "--max-restarts=0",
        "-m",
        RANK_MODULE,
        spec_path,
        folder,
    ]
    limit = None if timeout is None else timeout * 2 + 120
    try:
        proc = subprocess.run(cmd, env=rank_env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        raise PipelineError(
            f"{what}: the ranks did not finish within {limit:.0f} s",
            "a rank hangs; rerun with a smaller timeout to see which",
        ) from e
    if proc.returncode != 0:
        raise PipelineError(*_failure(proc.stderr, folder, ranks, describe, neighbours, what))


def _rank_errors(folder: str, ranks: int) -> dict[int, str]:
    """The one-line messages the ranks that failed left in `folder` (`record_rank_failure`)."""
    errors = {}
    for r in range(ranks):
        path = os.path.join(folder, f"rank_{r}.error")
        if os.path.isfile(path):
            with open(path) as f:
                errors[r] = f.read().strip()
    return errors


def _failure(stderr: str, folder: str, ranks: int, describe, neighbours, what: str) -> tuple[str, str]:
    """(one line naming the rank that failed first, with its own message when it left one; hint)."""
    errors = _rank_errors(folder, ranks)
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", stderr, re.S)
    first = int(root.group(1)) if root else (min(errors) if errors else None)
    code = int(root.group(2)) if root else None
    if first is None:
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["no message"]
        return f"{what} failed: {tail[0]}", DIED_HINT
    timed_out = sorted(r for r, e in errors.items() if "timed out" in e.lower())
    if timed_out and first in timed_out:
        # ranks blocked on a peer that is alive but stuck: the silent neighbour is the culprit
        suspects = {p for r in timed_out for p in neighbours(r) if p not in errors}
        if len(suspects) == 1:
            stuck = suspects.pop()
            waiting = ", ".join(map(str, timed_out))
            return (
                f"{what} {describe(stuck)} stopped responding: rank(s) {waiting} timed "
                f"out waiting for it; all ranks were stopped"
            ), STUCK_HINT
    if code is not None and code < 0:
        message, hint = f"was killed by signal {-code}", DIED_HINT
    elif errors.get(first):
        message, hint = errors[first], FAILED_HINT
    elif code == FAIL_EXIT_CODE:
        message, hint = f"exited with code {code} (fault injected by {FAIL_RANK_ENV})", DIED_HINT
    else:
        message, hint = (f"exited with code {code}" if code is not None else "failed"), DIED_HINT
    return f"{what} {describe(first)} {message}; the other ranks were stopped", hint


# -- what the ranks share with it --------------------------------------------------------------------
def record_rank_failure(folder: str, rank: int, kind: str, error: Exception) -> int:
    """Leave rank `rank`'s failure for the parent's message (`FOLDER/rank_R.error`, one line) and on
    stderr; returns the rank's exit code."""
    text = str(error).strip().splitlines()
    message = f"failed: {type(error).__name__}: {text[0].rstrip('.') if text else ''}"
    with open(os.path.join(folder, f"rank_{rank}.error"), "w") as f:
        f.write(message)
    print(f"optpipe {kind} (rank {rank}): {message}", file=sys.stderr, flush=True)
    return error.exit_code if isinstance(error, OptpipeError) else 1


def fault_point(rank: int, step: int, timeout: float) -> None:
    """Fault injection for tests (`OPTPIPE_PIPELINE_FAIL_RANK` / `_STEP` / `_MODE`)."""
    fail_rank = os.environ.get(FAIL_RANK_ENV)
    if fail_rank is not None and int(fail_rank) == rank and step == int(os.environ.get(FAIL_STEP_ENV, "0")):
        if os.environ.get(FAIL_MODE_ENV) == "hang":  # alive but stuck: the others' waits time out
            time.sleep(10 * timeout + 600)
        os._exit(FAIL_EXIT_CODE)  # die without a word, as a killed process would
