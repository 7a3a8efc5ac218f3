"""The Python API end to end: capture a model, run a verified pipeline, look at what changed, save.

python examples/python_api.py [OUT]
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from tiny_gpt import build

import optpipe


def main(out: str) -> None:
    model, example_inputs = build()

    # 1. capture: torch.export (non-strict), dynamic batch/sequence dims
    program = optpipe.capture(model, example_inputs)
    print(f"captured {program.num_params():,} params; dynamic dims {program.dynamic_shapes}")

    # 2. a pipeline of verified passes
    pipeline = optpipe.Pipeline.parse("fuse-attention,cse,dce")
    optimized, records = pipeline.run(program)
    for r in records:
        print(
            f"  {r.element:<16} modified={r.modified!s:<5} stats={r.stats} "
            f"max-abs={r.verify['max_abs']:.1e} ok={r.verify['ok']}"
        )

    # 3. what changed, keyed by module path
    changes = optpipe.diff(program, optimized)
    for m in changes["modules"]:
        if m.get("added") or m.get("removed"):
            print(f"  {m['module']}: -{m.get('removed')} +{m.get('added')}")

    # 4. the optimized program runs at other shapes and matches the model
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        err = (optimized(x) - model(x)).abs().max().item()
    print(f"max-abs vs eager at batch 2, seq 40: {err:.2e}")

    # 5. the whole job, with a report, written atomically
    res = optpipe.optimize(program, pipeline=pipeline, target="cpu", target_options={"mode": "eager"})
    res.save(out)
    print(f"wrote {out}: {sorted(os.listdir(out))}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.mkdtemp(), "OUT"))
