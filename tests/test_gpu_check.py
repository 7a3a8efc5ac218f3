"""benchmarks/gpu_check.py (`make gpu-check`): it skips cleanly without a GPU, and its plumbing (the
checks' CPU halves, the comparisons, the table and the exit code) works in the `--device cpu` dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path needs a machine without CUDA")
def test_without_cuda_it_prints_one_line_and_exits_0():
    proc = run()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device; skipped"), lines
    if torch.version.cuda is None:
        assert "CPU-only build" in lines[0]


def test_list_names_every_cuda_path(capsys):
    assert load_script().main(["--list"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    for name in ("cuda-eager", "cuda-compile", "tvm-cuda", "int8-dynamic", "int8-static", "sparse-2:4"):
        assert name in names
    assert {"train-cuda", "train-amp", "dp-nccl", "pipeline-nccl", "tensor-nccl"} <= names
    kinds = ("sliding-window", "block-sparse", "random", "strided", "linear", "performer", "linformer")
    assert {f"attn-{k}" for k in kinds} | {"attn-sliding-window-padded"} <= names


def test_unknown_check_is_refused():
    with pytest.raises(SystemExit, match="unknown check"):
        load_script().main(["--device", "cpu", "--only", "cuda-eagr"])


def test_dry_run_compares_cpu_with_cpu(tmp_path):
    out = tmp_path / "rows.json"
    small = ["--batch", "1", "--seq", "32", "--attn-seq", "64", "--iters", "1", "--warmup", "0"]
    proc = run("--device", "cpu", "--only", "cuda-eager,int8-dynamic,attn-strided", *small, "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("| check | status | parity | cpu ms |")
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert [r["status"] for r in rows.values()] == ["ok", "ok", "ok"], rows
    assert rows["cuda-eager"]["parity"].startswith("max-abs 0")  # the same CPU eager program on both sides
    assert "SQNR vs cpu inf dB" in rows["int8-dynamic"]["parity"]
    assert "fwd+bwd" in rows["attn-strided"]["parity"]
    assert all(r["cpu_ms"] and r["gpu_ms"] for r in rows.values())


def test_failures_are_rows_and_make_the_exit_code_1(capsys):
    gc = load_script()

    def boom(ctx):
        raise ValueError("kernel exploded")

    def slow(ctx):
        import time

        time.sleep(5)

    gc.CHECKS.clear()
    gc.CHECKS.update(
        {
            "good": (lambda ctx: gc.Outcome(True, "max-abs 0", 2.0, 1.0), 10, ""),
            "bad": (lambda ctx: gc.Outcome(False, "max-abs 1"), 10, ""),
            "boom": (boom, 10, ""),
            "slow": (slow, 1, ""),
            "skip": (lambda ctx: (_ for _ in ()).throw(gc.Skip("needs 2 GPUs")), 10, ""),
        }
    )
    assert gc.main(["--device", "cpu", "--only", "good,skip"]) == 0
    table = capsys.readouterr().out
    assert "| good | ok | max-abs 0 | 2.00 | 1.00 | 2.00x |" in table
    assert "| skip | skipped: needs 2 GPUs |" in table
    assert gc.main(["--device", "cpu"]) == 1
    table = capsys.readouterr().out
    assert "| bad | MISMATCH |" in table
    assert "| boom | ERROR: ValueError: kernel exploded |" in table
    assert "| slow | ERROR: timed out after 1 s |" in table
