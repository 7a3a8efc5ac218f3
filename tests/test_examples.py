"""Every example script runs."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args, tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_tiny_gpt_example(tmp_path):
    out = run_example("tiny_gpt.py", tmp_path=tmp_path)
    assert out.strip()


def test_python_api_example(tmp_path):
    out = run_example("python_api.py", tmp_path / "OUT", tmp_path=tmp_path)
    assert "fuse-attention" in out and "ok=True" in out
    assert (tmp_path / "OUT" / "program.pt2").exists() and (tmp_path / "OUT" / "report.html").exists()


def test_generate_example(tmp_path):
    out = run_example("generate.py", tmp_path / "OUT", tmp_path=tmp_path)
    assert "same tokens: True" in out and "identical to the target alone: True" in out
    assert (tmp_path / "OUT" / "program.pt2").exists()


@pytest.mark.slow
def test_evaluate_example(tmp_path):
    """Train briefly, optimize exactly and lossily, evaluate each OUT on the held-out split."""
    import json

    out = run_example("evaluate.py", "--steps", "10", "--json", "--workdir", tmp_path / "runs", tmp_path=tmp_path)
    res = json.loads(out.strip().splitlines()[-1])
    assert 1 < res["dense"]["quality"]["ppl"] < 259  # trained below the uniform byte distribution
    exact, int8 = res["exact"]["quality"], res["int8"]["quality"]
    assert exact["top1_agreement"] == 1.0 and exact["ppl"] == res["dense"]["quality"]["ppl"]
    assert 0.9 < int8["top1_agreement"] <= 1.0 and int8["kl"] >= 0
    assert all(r["cost"]["latency_ms_p50"] > 0 and r["cost"]["size_mb"] > 0 for r in res.values())


@pytest.mark.slow
def test_tune_example(tmp_path):
    """tune searches, recommends a pipeline within budget (or the baseline) and writes its outputs."""
    out = run_example("tune.py", tmp_path / "T", "--trials", "3", tmp_path=tmp_path)
    rows = [line.split(" | ") for line in out.splitlines() if line.count(" | ") == 7]
    assert rows[0][0] == "trial" and rows[1][0].startswith("baseline")
    assert sum(r[0].endswith("*") for r in rows[1:]) == 1  # one recommendation, marked
    assert "recommended pipeline:" in out
    for name in ("best.toml", "trials.jsonl", "report.html", "best/program.pt2"):
        assert (tmp_path / "T" / name).exists(), name


def test_prune_example(tmp_path):
    out = run_example("prune.py", "--repeat", "2", "--batch", "4", "-o", tmp_path / "OUT", tmp_path=tmp_path)
    assert "MLP channels; parameters" in out and "fewer" in out and "sentence-embedding cosine" in out
    assert (tmp_path / "OUT" / "program.pt2").exists()


def test_heal_example(tmp_path):
    """Pre-train, swap attention, heal by distillation: the quick run of examples/heal.py."""
    import json

    out = run_example("heal.py", "--quick", "--json", "--workdir", tmp_path / "runs", tmp_path=tmp_path)
    res = json.loads(out.strip().splitlines()[-1])
    assert 1 < res["dense"] < 259  # trained below the uniform byte distribution
    for kind, op in (("sliding-window", "optpipe.sparse_attention"), ("linear", "optpipe.linear_attention")):
        r = res[kind]  # a few steps teach attention little, so the swap costs little: no gap asserted here
        assert r["swapped"] > 1 and r["healed"] > 1
        healed = tmp_path / "runs" / f"{kind}-healed"
        assert (healed / "metrics.jsonl").exists()
        import optpipe

        assert op in optpipe.load(str(healed)).gm.code  # healing keeps the efficient attention
