"""Let optpipe choose the pipeline: a measured, budgeted search on your target and your data.

    python examples/tune.py [TUNE_OUT] [--trials 6] [--budget ppl=+5%] [--threads 1]

Takes a small byte-level GPT (examples/heal.py's model), writes Python's own documentation as the
data (`pydoc_data`: text nobody here wrote), and runs `optpipe.tune`: every candidate pipeline
(pruning x int8 quantization here; attention forms join on longer sequences) is optimized,
measured on the cpu target and judged on the held-out split of the text; the fastest candidate
within the perplexity budget that beats the unoptimized model, re-measured side by side with it,
is recommended. Prints the Pareto front and what tune wrote:

    TUNE_OUT/best.toml    the recipe: optpipe optimize MODEL --recipe TUNE_OUT/best.toml -o OUT
    TUNE_OUT/best/        that OUT folder, built and verified
    TUNE_OUT/trials.jsonl one line per trial; TUNE_OUT/report.html the latency-vs-quality plot

The same from the command line:

    optpipe tune examples/heal.py:build_quick --data pydoc.txt --budget ppl=+5% --trials 6 -o TUNE_OUT
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from optpipe.runtime.data import pydoc_corpus
from optpipe.runtime.tuning import tune
from optpipe.runtime.tuning_report import FRONT_HEADER, front_rows
from optpipe.runtime.tuning_space import SearchSpace


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="TUNE_OUT (default: a temporary folder)")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--budget", default="ppl=+5%")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="optpipe-tune-"), "tune")
    corpus = os.path.join(os.path.dirname(os.path.abspath(out)), "pydoc.txt")
    pydoc_corpus(corpus)

    # at 32 tokens no sparse attention pays off (tune would rule them out itself); eager only, so
    # the example takes seconds: the default space also tries torch.compile
    space = SearchSpace(
        attention=("dense",), prune=(0.0, 0.25, 0.5), quantize=("none", "int8-dynamic"), mode=("eager",)
    )
    result = tune(
        os.path.join(ROOT, "examples", "heal.py:build_quick"),
        corpus,
        out,
        budget=args.budget,
        space=space,
        trials=args.trials,
        eval_tokens=1024,
        force=True,
        say=lambda text: print(f"  {text}", file=sys.stderr),
    )
    print(" | ".join(FRONT_HEADER))
    for row in front_rows(result.front, result.baseline, result.best):
        print(" | ".join(row))
    print(result.recommendation)
    print(f"recommended pipeline: {result.best['pipeline']}")
    print(f"wrote {out}: best.toml, best/, trials.jsonl, report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
