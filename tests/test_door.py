"""Inputs checked at the door, the OUT manifest, and the CLI's messages (issue 16).

Cheap on purpose: the OUT folders are copies of the saved fixtures in tests/fixtures/out_0_1_0/
(a manifest is written into a copy), not fresh `optimize` runs.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from optpipe.cli import Progress, escape, main, summary_markup
from optpipe.errors import MAX_LINE, OptpipeWarning, PassError, UsageError, clip, first_line
from optpipe.inputs import check_inputs, check_token_ids, program_inputs, token_vocab
from optpipe.loading import load_out
from optpipe.outdir import MANIFEST, atomic_folder, check_manifest, read_manifest, write_manifest
from optpipe.registry import PassResult, register_pass
from optpipe.report import pass_remarks, render_report_html

FIXTURES = Path(__file__).parent / "fixtures" / "out_0_1_0"
INT8 = FIXTURES / "tiny_gpt_int8"  # input_ids:int64[batch,seq<=64], vocab 256
KV = FIXTURES / "tiny_gpt_kv"


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def one_line_error(r, code: int, *needles: str) -> str:
    assert r.exit_code == code, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("optpipe: error:")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def program():
    return load_out(str(INT8))[0]


@pytest.fixture
def out(tmp_path):
    """An OUT folder with a manifest (the int8 fixture, copied)."""
    folder = tmp_path / "OUT"
    shutil.copytree(INT8, folder)
    write_manifest(str(folder))
    return folder


# -- inputs checked at the door --------------------------------------------------------------------------
def test_program_inputs_read_the_graph(program):
    (ids,) = program_inputs(program)
    assert str(ids) == "input_ids:int64[batch,seq≤64] (ids < 256)"
    assert token_vocab(program) == 256
    check_inputs(program, program.example_inputs)  # what it was saved with passes
    check_inputs(program, {"input_ids": torch.zeros(3, 64, dtype=torch.long)})  # any batch, seq up to 64


@pytest.mark.parametrize(
    "value,message",
    [
        (torch.tensor([1, 2, 3]), "'input_ids' has 1 dim(s) [3]; the program takes 2"),
        (torch.ones(1, 4), "'input_ids' is float32; the program takes int64"),
        (torch.tensor([[1, 2, 999]]), "token id 999 at [0, 2], outside the vocabulary 0..255"),
        (torch.tensor([[-1]]), "token id -1 at [0, 0]"),
        (torch.zeros(1, 65, dtype=torch.long), "dim 1 (seq) is 65; the program takes 1 to 64"),
    ],
)
def test_bad_inputs_are_named_with_what_was_expected(program, value, message):
    with pytest.raises(UsageError, match=None) as e:
        check_inputs(program, (value,), where="--input")
    assert message in e.value.one_line()
    assert "expected input_ids:int64[batch,seq≤64]" in e.value.one_line()


def test_shared_dynamic_dims_must_agree_and_names_must_exist():
    kv = load_out(str(KV))[0]
    inputs = dict(zip(kv.input_names, kv.example_inputs))
    with pytest.raises(UsageError, match="'position_ids' dim 0 \\(batch\\) is 2 but 1 in 'input_ids'"):
        check_inputs(kv, {**inputs, "position_ids": torch.zeros(2, 32, dtype=torch.long)})
    with pytest.raises(UsageError, match="'nope': the program has no such input"):
        check_inputs(kv, {**inputs, "nope": torch.zeros(1)})
    with pytest.raises(UsageError, match="token id 300 \\(prompt 1, position 0\\)"):
        check_token_ids(kv, [[1, 2], [300]])


@pytest.mark.parametrize(
    "value,needles",
    [
        ("input_ids=[1,2,3]", ["has 1 dim(s)"]),
        ("input_ids=[[1.5,2]]", ["the program takes int64, and 1.5 is not one"]),
    ],
)
def test_run_refuses_bad_inputs_in_one_line(out, value, needles):
    one_line_error(invoke("run", out, "--input", value), 2, "--input", *needles)


def test_generate_refuses_prompt_ids_outside_the_vocabulary():
    r = invoke("generate", KV, "--prompt-ids", "5,999", "--max-new-tokens", "2")
    one_line_error(r, 2, "--prompt-ids: token id 999", "vocabulary 0..255")


# -- the OUT manifest ------------------------------------------------------------------------------------
def test_atomic_folder_writes_a_manifest_of_every_file(tmp_path):
    with atomic_folder(str(tmp_path / "o")) as tmp:
        Path(tmp, "a.txt").write_text("a")
        Path(tmp, "ir").mkdir()
        Path(tmp, "ir", "000.diff").write_text("d")
    manifest = read_manifest(str(tmp_path / "o"))
    assert set(manifest["files"]) == {"a.txt", "ir/000.diff"}
    assert {"optpipe", "torch", "onnx", "onnxruntime", "tvm"} <= set(manifest["versions"])
    assert manifest["versions"]["torch"] == torch.__version__
    assert check_manifest(str(tmp_path / "o")) == []


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,needles",
    [
        (lambda o: _truncate(o / "program.pt2"), ["damaged file:", "program.pt2 has", "bytes"]),
        (lambda o: _flip(o / "program.pt2"), ["damaged file:", "program.pt2 does not match its sha256"]),
        (lambda o: (o / "target.json").unlink(), ["target.json is missing"]),
        (lambda o: (o / MANIFEST).write_text('{"files": '), ["damaged file:", "manifest.json is not readable JSON"]),
    ],
)
def test_a_damaged_out_is_named_in_one_line(out, damage, needles):
    damage(out)
    one_line_error(invoke("run", out), 2, *needles)
    one_line_error(invoke("inspect", out), 2, *needles)


def test_a_damaged_archive_without_manifest_is_one_line(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(INT8, folder)  # an OUT from before manifests
    _truncate(folder / "program.pt2")
    one_line_error(invoke("run", folder), 2, "corrupt archive", "program.pt2")


def test_version_drift_is_a_warning_and_old_outs_still_load(out, recwarn):
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["versions"]["torch"] = "2.0.0"
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert check_manifest(str(out)) == [f"torch 2.0.0 wrote it, {torch.__version__} reads it"]
    with pytest.warns(OptpipeWarning, match="torch 2.0.0 wrote it"):
        load_out(str(out))
    assert load_out(str(KV))[1] == "cpu"  # no manifest: loads as before


def test_version_drift_warning_is_one_cli_line(out):
    target = json.loads((out / "target.json").read_text())
    target["info"]["mode"] = "eager"  # the warning is what is tested, not torch.compile of the int8 model
    (out / "target.json").write_text(json.dumps(target))
    write_manifest(str(out))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["versions"]["torch"] = "2.0.0"
    (out / MANIFEST).write_text(json.dumps(manifest))
    r = invoke("run", out, "--input", "input_ids=[[1,2,3]]")
    assert r.exit_code == 0, r.output
    warning_lines = [line for line in r.stderr.splitlines() if "warning" in line]
    assert warning_lines == [
        f"optpipe: warning: {out} was written by other versions: torch 2.0.0 wrote it, {torch.__version__} "
        "reads it (if it misbehaves, write it again)"
    ]


# -- messages --------------------------------------------------------------------------------------------
def test_pipeline_text_is_not_eaten_as_rich_markup():
    progress = Progress()
    progress.console.file = buffer = io.StringIO()
    report = {
        "pipeline": "quantize{skip=[lm_head]}",
        "target_info": {"mode": "eager"},
        "model": {"params_before": 1, "params_after": 1, "bytes_before": 2**20, "bytes_after": 2**18},
        "target_check": {"max_abs": 0.0},
    }
    progress.say(summary_markup("out[1]", "cpu", report))
    assert "wrote out[1]: pipeline quantize{skip=[lm_head]} → cpu" in buffer.getvalue()
    assert "params 1 → 1 (1.00 MB → 0.25 MB)" in buffer.getvalue()
    assert escape("[bold]x") != "[bold]x"


def test_skipped_sites_and_unchanged_passes_are_reported():
    passes = [
        {
            "name": "quantize",
            "pipeline": "quantize{skip=[lm_head]}",
            "modified": False,
            "details": {
                "skipped": [{"site": f"h.{i}.mlp", "reason": "skip=*.mlp"} for i in range(5)]
                + [{"site": "lm_head", "reason": "skip=lm_head"}],
                "notes": [],
            },
        },
        {"name": "dce", "pipeline": "dce", "modified": True, "details": {"notes": ["removed 3 nodes"]}},
    ]
    assert pass_remarks(passes) == [
        "note: quantize{skip=[lm_head]} changed nothing: skip=*.mlp; skip=lm_head",
        "skipped: quantize{skip=[lm_head]}: 5 sites (h.0.mlp, h.1.mlp, h.2.mlp, …): skip=*.mlp",
        "skipped: quantize{skip=[lm_head]}: lm_head: skip=lm_head",
        "note: dce: removed 3 nodes",
    ]
    page = render_report_html({"passes": passes}, [None, None])
    assert "Skipped sites (6)" in page and "h.4.mlp" in page and "skip=lm_head" in page


def test_debug_shows_the_traceback_of_usage_errors_with_their_cause(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"PK\x03\x04" + b"\x00" * 40)  # a zip header and nothing else
    r = invoke("inspect", bad, env={"OPTPIPE_DEBUG": "1"})
    assert r.exit_code == 2
    assert "Traceback" in r.stderr and "BadZipFile" in r.stderr and "direct cause" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("optpipe: error: corrupt archive")
    one_line_error(invoke("inspect", bad), 2, "corrupt archive")


def test_long_messages_are_clipped_to_one_line():
    graph_dump = "graph():\n" + "\n".join(
        f"    %x{i} = call_function[target=aten.add](args = (%x,))" for i in range(400)
    )
    e = RuntimeError(f"Argument 'x' of Node 'y' was used before it has been defined!\n{graph_dump}")
    assert first_line(e) == "RuntimeError: Argument 'x' of Node 'y' was used before it has been defined!"
    long = RuntimeError("x" * 20000)
    assert len(first_line(long)) < MAX_LINE + 100 and "more characters" in first_line(long)
    assert "\n" not in PassError("a\nb" * 5000, "hint").one_line()
    assert len(clip("word " * 10000)) < MAX_LINE + 100


@dataclass(frozen=True)
class _NoOptions:
    pass


@register_pass("test-unordered-graph", _NoOptions, exact=True)
def unordered_graph(program, config):
    """Moves the output's producer before its own arguments: the graph lint fails, embedding the graph."""
    graph = program.gm.graph
    last = graph.output_node().args[0]
    last = last[0] if isinstance(last, (tuple, list)) else last
    next(iter(graph.nodes)).prepend(last)
    return PassResult(True, {})


def test_a_pass_that_breaks_the_graph_fails_in_one_short_line():
    from optpipe import capture
    from optpipe.pipeline import Pipeline

    prog = capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), (torch.randn(2, 4),))
    with pytest.raises(PassError) as e:
        Pipeline.parse("test-unordered-graph").run(prog, verify=False)
    line = e.value.one_line()
    assert line.startswith("pass test-unordered-graph failed: RuntimeError:") and "\n" not in line
    assert len(line) < 2 * MAX_LINE


def test_the_vocabulary_is_found_through_a_quantized_embedding():
    from optpipe import capture
    from optpipe.pipeline import Pipeline

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 3)

        def forward(self, ids):
            return self.head(self.embed(ids.view(ids.shape[0], -1)))

    prog = capture(Tiny(), (torch.randint(0, 10, (1, 5)),), dynamic_shapes=[{0: "batch", 1: "seq"}])
    assert token_vocab(prog) == 10
    quantized, _ = Pipeline.parse("quantize{embeddings=true}").run(prog, verify=False)
    assert "embedding_int8" in quantized.gm.code
    assert token_vocab(quantized) == 10
    with pytest.raises(UsageError, match="token id 10 at \\[0, 1\\]"):
        check_inputs(quantized, (torch.tensor([[1, 10]]),))
