"""The layers as a user meets them: `import optpipe` loads the compiler core only (no runtime, no
distributed machinery, no backend), and OUT folders written by an earlier optpipe still run.

The import-linter contracts, cycles, private names and function sizes are checked by `make lint`
(tools/layers.py), which CI runs before the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from optpipe.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "out_0_1_0"
"""OUT folders written by optpipe 0.1.0 before the runtime moved to optpipe/runtime/ (commit 8445a98),
with what its `optpipe run` / `optpipe generate` printed for them (`*.expected.json`)."""


def test_import_optpipe_loads_only_the_core_and_the_facade_reaches_the_runtime_on_call():
    code = (
        "import sys, json, torch; before = set(sys.modules); import optpipe; "
        "loaded = sorted(set(sys.modules) - before); "
        "from examples.tiny_gpt import build; model, inputs = build(); "
        "ids = optpipe.generate(optpipe.capture(model, inputs), [[1, 2, 3]], 2).new_ids; "
        "print(json.dumps([loaded, 'optpipe.runtime.generation' in sys.modules, ids]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent
    )
    loaded, runtime_after_call, ids = json.loads(proc.stdout)
    assert "optpipe" in loaded and "optpipe.program" in loaded
    assert not [m for m in loaded if m.startswith(("optpipe.runtime", "optpipe.targets", "optpipe.cli"))]
    # `import torch` brings torch.distributed's basics itself; optpipe must add none of it
    assert not [m for m in loaded if m.startswith("torch.distributed")]
    assert not [m for m in loaded if m.split(".")[0] in ("onnx", "onnxruntime", "onnxscript", "tvm", "transformers")]
    assert runtime_after_call and len(ids[0]) == 2


def _cli(*args: str) -> dict:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


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
        # recorded by 0.1.0, whose int8-dynamic quantized activations over each whole call; since
        # issue 16 every token is quantized on its own (a decode step gives the full run's numbers),
        # so the old program runs with the new activation rounding: equal within int8's noise
        out, ref = torch.tensor(doc["outputs"]), torch.tensor(expected["outputs"])
        sqnr = 10 * torch.log10(ref.pow(2).mean() / (out - ref).pow(2).mean())
        assert sqnr > 30, f"SQNR {sqnr:.1f} dB against the outputs 0.1.0 recorded"  # 39 dB here
    assert {p.name: p.stat().st_mtime_ns for p in (FIXTURES / name).iterdir()} == before  # the input is never modified
