"""optpipe: a compiler-style model-optimization pipeline for PyTorch.

import optpipe
res = optpipe.optimize(model, (ids,), pipeline="fuse-attention,dce", target="cpu")
res.save("OUT")
prog = optpipe.capture(model, (ids,)); prog2, records = optpipe.Pipeline.parse(s).run(prog)
optpipe.diff(prog, prog2)      # the data of `optpipe diff --json`
"""

from __future__ import annotations

from .capture import capture
from .errors import OptpipeError, PassError, TargetError, UsageError, VerificationError
from .pipeline import PassRecord, Pipeline
from .program import Program, load_program
from .registry import LossyConfig, PassResult, register_pass, register_target
from .version import __version__


def load(path: str, **kwargs) -> Program:
    """Load any MODEL form of the CLI (export archive, OUT folder, file.py:factory, HF folder, ...)."""
    from .loading import load_model

    return load_model(path, **kwargs)


def optimize(*args, calibration=None, **kwargs):
    """Capture, run the verified pipeline, compile and check; see `optpipe.optimization.optimize`.
    `calibration` may also be a text/JSONL file, tokenized for the program like
    `optpipe.runtime.data.calibration_batches`."""
    import os

    from .optimization import optimize as _optimize

    if isinstance(calibration, (str, os.PathLike)):
        from .runtime.data import calibration_batches

        path = calibration
        calibration = lambda program: calibration_batches(path, program)
    return _optimize(*args, calibration=calibration, **kwargs)


def diff(a: Program, b: Program) -> dict:
    """Semantic diff of two programs keyed by module path (the data of `optpipe diff --json`)."""
    from .graph_diff import diff_programs

    return diff_programs(a, b).to_dict()


def generate(program: Program, prompts, max_new_tokens: int, **options):
    """Generate from a program (a kv-cache step program, or a plain causal LM); see
    optpipe.runtime.generation.generate for sampling, stop tokens and speculative decoding."""
    from .runtime.generation import generate as _generate

    return _generate(program, prompts, max_new_tokens, **options)


def train(model, data, out: str, **options):
    """Train `model` (an OUT folder, any MODEL form, or a Program) on text/JSONL `data`, writing
    OUT2=`out`; see optpipe.runtime.training.train and TrainConfig for the options."""
    from .runtime.training import train as _train

    return _train(model, data, out, **options)


def evaluate(model_or_out, data, **options) -> dict:
    """Quality on real data and cost on the target (the data of `optpipe eval --json`); see
    optpipe.runtime.evaluation.evaluate for the options (reference, seq_len, stride, batch, ...)."""
    from .runtime.evaluation import evaluate as _evaluate

    return _evaluate(model_or_out, data, **options)


def tune(model: str, data, out: str, *, budget, **options):
    """Search pipelines for `model` on a target, measured there and judged on `data` within
    `budget` (e.g. "ppl=+3%"), writing TUNE_OUT=`out` (the data of `optpipe tune`); see
    optpipe.runtime.tuning.tune and TuneSettings for the options (target, objective, trials, ...)."""
    from .runtime.tuning import tune as _tune

    return _tune(model, data, out, budget=budget, **options)


__all__ = [
    "LossyConfig",
    "OptpipeError",
    "PassError",
    "PassRecord",
    "PassResult",
    "Pipeline",
    "Program",
    "TargetError",
    "UsageError",
    "VerificationError",
    "__version__",
    "capture",
    "diff",
    "evaluate",
    "generate",
    "load",
    "load_program",
    "optimize",
    "register_pass",
    "register_target",
    "train",
    "tune",
]

from .registry import load_op_modules as _load_op_modules  # noqa: E402

_load_op_modules()  # torch.ops.optpipe.*: saved programs that use them load after `import optpipe`
