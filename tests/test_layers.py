"""The layers as a user meets them: `import optpipe` loads the compiler core only (no runtime, no
distributed machinery, no backend), and OUT folders written by an earlier optpipe still run.

The import-linter contracts, cycles, private names and function sizes are checked by `make lint`
(tools/layers.py), which CI runs before the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "out_0_1_0"
"""OUT folders written by optpipe 0.1.0 before the runtime moved to optpipe/runtime/ (commit 8445a98),
with what its `optpipe run` / `optpipe generate` printed for them (`*.expected.json`)."""


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return proc.stdout


def test_import_optpipe_loads_only_the_core():
    code = (
        "import sys, json, torch; before = set(sys.modules); import optpipe; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    loaded = json.loads(_python(code))
    assert "optpipe" in loaded and "optpipe.program" in loaded
    assert not [m for m in loaded if m.startswith(("optpipe.runtime", "optpipe.targets", "optpipe.cli"))]
    # `import torch` brings torch.distributed's basics itself; optpipe must add none of it
    assert not [m for m in loaded if m.startswith("torch.distributed")]
    assert not [m for m in loaded if m.split(".")[0] in ("onnx", "onnxruntime", "onnxscript", "tvm", "transformers")]


def test_the_facade_reaches_the_runtime_on_call():
    code = (
        "import sys, optpipe; assert 'optpipe.runtime.generation' not in sys.modules; "
        "from examples.tiny_gpt import build; model, inputs = build(); "
        "program = optpipe.capture(model, inputs); "
        "print(optpipe.generate(program, [[1, 2, 3]], 2).new_ids, 'optpipe.runtime.generation' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent
    ).stdout
    assert out.strip().endswith("True")


def _cli(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "optpipe", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", ["tiny_gpt_int8", "tiny_gpt_kv"])
def test_out_folders_written_by_0_1_0_still_load(name):
    expected = json.loads((FIXTURES / f"{name}.expected.json").read_text())
    out = str(FIXTURES / name)
    before = {p.name: p.stat().st_mtime_ns for p in (FIXTURES / name).iterdir()}
    if "new_ids" in expected:
        doc = _cli("generate", out, "--prompt-ids", "5,17,42,99,7", "--max-new-tokens", "12", "--json")
        assert doc["new_ids"] == expected["new_ids"]
    else:
        doc = _cli("run", out, "--input", "input_ids:int64[1,6]", "--json")
        import torch

        torch.testing.assert_close(
            torch.tensor(doc["outputs"]), torch.tensor(expected["outputs"]), rtol=1e-5, atol=1e-5
        )
    assert {p.name: p.stat().st_mtime_ns for p in (FIXTURES / name).iterdir()} == before  # the input is never modified
    assert os.listdir(FIXTURES / name)  # nothing was written next to it either
