"""End-to-end CLI: the OUT folder and report, and the bad-input table (one line, exit 2)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import tests.toy_passes  # noqa: F401  (test-broken-exact, test-add-noise)
from optpipe.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny_gpt.py") + ":build"
REPORT_KEYS = {"optpipe_version", "pipeline", "target", "model", "passes", "target_check"}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "OUT"
    ir = tmp_path_factory.mktemp("ir")
    r = cli(
        "optimize",
        TINY,
        "--target",
        "cpu",
        "--pipeline",
        "fuse-attention,dce",
        "-o",
        out,
        "--dump-ir",
        ir,
        "--mode",
        "eager",
    )
    assert r.exit_code == 0, r.output
    return out


def test_optimize_writes_the_full_out_folder(optimized):
    names = set(os.listdir(optimized))
    assert {"program.pt2", "pipeline.txt", "report.json", "report.html", "target.json", "ir"} <= names
    assert (optimized / "pipeline.txt").read_text().strip() == "fuse-attention,dce"
    assert sorted(os.listdir(optimized / "ir"))[:3] == [
        "000_fuse-attention.after.py",
        "000_fuse-attention.before.py",
        "000_fuse-attention.diff",
    ]
    assert not [n for n in os.listdir(optimized.parent) if n.startswith(".OUT")]  # no temp leftovers


def test_report_json_has_the_contract_keys(optimized):
    report = json.loads((optimized / "report.json").read_text())
    assert set(report) >= REPORT_KEYS
    assert set(report["model"]) >= {"params_before", "params_after", "flops_before", "flops_after"}
    assert report["model"]["params_after"] < report["model"]["params_before"]  # dce dropped the tril buffers
    fuse = report["passes"][0]
    assert {"name", "config", "exact", "modified", "stats", "seconds", "verify"} <= set(fuse)
    assert set(fuse["verify"]) >= {"max_abs", "sqnr_db", "cosine", "top1_agreement", "ok"}
    assert fuse["name"] == "fuse-attention" and fuse["exact"] and fuse["modified"] and fuse["verify"]["ok"]
    assert fuse["stats"]["fused"] == 2
    assert report["target_check"]["ok"] and report["target_check"]["max_abs"] <= 1e-4
    assert report["target_info"]["mode"] == "eager"
    html = (optimized / "report.html").read_text()
    assert "<svg" in html and "fuse-attention" in html


def test_program_pt2_is_a_plain_export_archive(optimized):
    import optpipe  # noqa: F401  registers optpipe ops
    from examples.tiny_gpt import build

    model, (ids,) = build()
    ep = torch.export.load(str(optimized / "program.pt2"))
    x = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(ep.module()(x), model(x), atol=1e-5, rtol=1e-4)
    assert "scaled_dot_product_attention" in ep.module().code


def test_run_in_a_fresh_process_without_the_model_code(optimized, tmp_path):
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run(
        [sys.executable, "-m", "optpipe", "run", str(optimized), "--input", "input_ids:int64[1,9]", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["outputs"]) == 1 and len(doc["outputs"][0][0]) == 9 and doc["seconds"] > 0


def test_run_with_literal_input_matches_the_model(optimized):
    from examples.tiny_gpt import build

    model, _ = build()
    r = cli("run", optimized, "--input", "input_ids=[[1,2,3,4]]", "--json")
    assert r.exit_code == 0, r.output
    out = torch.tensor(json.loads(r.stdout)["outputs"][0])
    torch.testing.assert_close(out, model(torch.tensor([[1, 2, 3, 4]])), atol=1e-5, rtol=1e-4)


def test_optimize_json_prints_only_json(tmp_path):
    r = CliRunner().invoke(
        main, ["optimize", TINY, "-p", "cse", "-o", str(tmp_path / "o"), "--mode", "eager", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["pipeline"] == "cse"


def test_passes_and_inspect_and_diff(optimized, tmp_path):
    r = cli("passes")
    assert r.exit_code == 0 and "fuse-attention" in r.output and "canonicalize" in r.output
    r = cli("passes", "fuse-attention")
    assert r.exit_code == 0 and "exact" in r.output
    r = cli("inspect", TINY, "--json")
    assert r.exit_code == 0, r.output
    json.loads(r.stdout)
    r = cli("diff", TINY, optimized, "--json", "--html", tmp_path / "d.html")
    assert r.exit_code == 0, r.output
    assert "scaled_dot_product_attention" in r.stdout and (tmp_path / "d.html").exists()


# ---- bad input: one line, exit 2 --------------------------------------------------------------------


def _one_line_error(r, code=2, *, pattern=None):
    assert r.exit_code == code, r.output
    err = r.stderr
    errors = [line for line in err.splitlines() if line.startswith("optpipe: error:")]
    assert len(errors) == 1, err  # other stderr lines are progress, or the caret under a pipeline
    assert "Traceback" not in err
    assert "Traceback" not in err
    if pattern:
        assert pattern in err, err
    return err


@pytest.fixture
def files(tmp_path):
    from examples.tiny_gpt import build

    model, _ = build()
    (tmp_path / "junk.pt").write_bytes(os.urandom(256))
    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(model, (torch.randint(0, 256, (1, 8)),), strict=False), str(good))
    data = good.read_bytes()
    (tmp_path / "corrupt.pt2").write_bytes(data[: len(data) // 2])
    torch.save(model, tmp_path / "pickled.pt")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    return tmp_path


@pytest.mark.parametrize(
    "case,args,pattern",
    [
        ("missing file", ["optimize", "{t}/nope.pt2", "-p", "dce", "-o", "{t}/o"], "nope.pt2"),
        ("unknown format", ["optimize", "{t}/junk.pt", "-p", "dce", "-o", "{t}/o"], "junk.pt"),
        ("corrupt archive", ["optimize", "{t}/corrupt.pt2", "-p", "dce", "-o", "{t}/o"], "corrupt.pt2"),
        ("pickle without --trust-pickle", ["optimize", "{t}/pickled.pt", "-p", "dce", "-o", "{t}/o"], "--trust-pickle"),
        ("bad --input", ["optimize", TINY, "--input", "input_ids:int65[1,8]", "-p", "dce", "-o", "{t}/o"], "int65"),
        ("unknown pass", ["optimize", TINY, "-p", "fuse-atention", "-o", "{t}/o"], "did you mean 'fuse-attention'"),
        (
            "bad option value",
            ["optimize", TINY, "-p", "test-add-noise{{scale=lots}}", "-o", "{t}/o"],
            "expected a number",
        ),
        ("malformed pipeline", ["optimize", TINY, "-p", "dce,,cse", "-o", "{t}/o"], "^"),
        ("OUT not from optpipe", ["optimize", TINY, "-p", "dce", "-o", "{t}/notes"], "--force"),
        ("bad budget", ["optimize", TINY, "-p", "dce", "--budget", "sqnr=high", "-o", "{t}/o"], "--budget"),
        ("run on a non-OUT", ["run", "{t}/notes"], "not an optpipe OUT"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(files, case, args, pattern):
    r = CliRunner().invoke(main, [a.format(t=files) for a in args])
    _one_line_error(r, 2, pattern=pattern)
    assert not (files / "o").exists()
    assert (files / "notes" / "keep.txt").read_text() == "mine"


def test_force_replaces_a_foreign_out(files):
    r = cli("optimize", TINY, "-p", "dce", "-o", files / "notes", "--force", "--mode", "eager")
    assert r.exit_code == 0, r.output
    assert (files / "notes" / "program.pt2").exists() and not (files / "notes" / "keep.txt").exists()


def test_failing_pass_leaves_no_partial_out_and_exit_1(files):
    r = CliRunner().invoke(main, ["optimize", TINY, "-p", "cse,test-broken-exact", "-o", str(files / "o")])
    _one_line_error(r, 1, pattern="test-broken-exact")
    assert not (files / "o").exists()
    assert not [n for n in os.listdir(files) if n.startswith(".o.")]


def test_rerun_replaces_an_optpipe_out_and_interrupt_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert cli("optimize", TINY, "-p", "dce", "-o", out, "--mode", "eager").exit_code == 0
    before = (out / "report.json").read_text()
    import optpipe.optimization as opt

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(opt.OptimizeResult, "save", interrupted)
    r = CliRunner().invoke(main, ["optimize", TINY, "-p", "cse", "-o", str(out), "--mode", "eager"])
    assert r.exit_code == 130 and "nothing was written" in r.output
    assert (out / "report.json").read_text() == before


def test_atomic_folder_cleans_up_on_interrupt(tmp_path):
    from optpipe.outdir import atomic_folder

    with pytest.raises(KeyboardInterrupt), atomic_folder(str(tmp_path / "o")) as tmp:
        with open(os.path.join(tmp, "half"), "w") as f:
            f.write("x")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_calibration_data_reaches_the_calibrating_pass(tmp_path):
    """`--calibration-data FILE`: text tokenized like the model's inputs, what int8-static calibrates on."""
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"Calibration paragraph {i}: compilers rewrite graphs." for i in range(40)))
    quick = os.path.join(ROOT, "examples", "heal.py") + ":build_quick"  # byte-level vocab (259)
    out = tmp_path / "OUT"
    r = cli(
        "optimize",
        quick,
        "--pipeline",
        "quantize{scheme=int8-static}",
        "--calibration-data",
        text,
        "--calibration-batches",
        "2",
        "--mode",
        "eager",
        "-o",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["passes"][0]["details"]["calibration"]["source"] == "attached calibration data"
    # int8 weights carry scales: more elements, fewer bytes; the report says both
    model = report["model"]
    assert model["params_after"] >= model["params_before"] and model["bytes_after"] < 0.6 * model["bytes_before"]
    r = cli(
        "optimize",
        quick,
        "--pipeline",
        "quantize{scheme=int8-static}",
        "--calibration-data",
        tmp_path / "missing.txt",
        "-o",
        tmp_path / "OUT2",
    )
    assert r.exit_code == 2 and "missing.txt" in r.output and "Traceback" not in r.output
