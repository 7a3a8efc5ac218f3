"""Compile the tiny GPT for Apache TVM, save the OUT folder, and run the saved library.

    python examples/tvm_target.py --out tvm-out            # untuned
    python examples/tvm_target.py --out tvm-out --tune 64  # MetaSchedule, 64 trials

The same as `optpipe optimize examples/tiny_gpt.py:build --target tvm --pipeline fuse-attention,dce
-o tvm-out` followed by `optpipe run tvm-out`: the OUT folder holds the program, tvm/model.so and
tvm/model.json, and running it needs neither the model's Python code nor torch.export.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `examples.*`

from examples.tiny_gpt import build
from optpipe.optimization import optimize
from optpipe.program import load_program
from optpipe.registry import get_target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tvm-out", help="OUT folder to write (replaced if it exists)")
    parser.add_argument("--tune", type=int, default=0, help="MetaSchedule trials (0: untuned)")
    args = parser.parse_args(argv)

    model, inputs = build()
    res = optimize(
        model, inputs, pipeline="fuse-attention,dce", target="tvm", diffs=False, target_options={"tune": args.tune}
    )
    res.save(args.out, force=True)
    info, check = res.report["target_info"], res.report["target_check"]
    target = info["target"]
    print(
        f"compiled for {target['kind']} mcpu={target.get('mcpu')} ({info['mode']}, {info['compile_s']} s); "
        f"max |tvm - torch| = {check['max_abs']:.2g} over {check['inputs']} input sets"
    )

    # What `optpipe run OUT` does: the program's signature from program.pt2, the code from tvm/.
    program = load_program(os.path.join(args.out, "program.pt2"))
    compiled = get_target("tvm").load(args.out, program)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
    got = compiled(ids)
    print(
        f"reloaded {args.out}/tvm/model.so: logits {list(got.shape)}, "
        f"max |tvm - eager| = {(got - expected).abs().max().item():.2g}"
    )


if __name__ == "__main__":
    main()
