"""`load_model`: every form of MODEL loads, runs and matches the eager model; every bad input is a
one-line UsageError naming the path."""

import hashlib
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from optpipe.capture import capture
from optpipe.errors import UsageError
from optpipe.inputs import parse_input_spec
from optpipe.loading import EXPORT_ARCHIVE, OPTPIPE_OUT, PICKLE, SAFETENSORS, TORCH_SAVE, detect_format, load_model
from tests.fixtures import tiny_models
from tests.fixtures.tiny_models import MLP, TinyGPT, ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_models.py"


def spec(name: str) -> str:
    return f"{FIXTURE}:{name}"


def specs(*texts):
    return [parse_input_spec(t) for t in texts]


def eager(model, *args):
    with torch.no_grad():
        out = model(*args)
    return out[0] if isinstance(out, tuple) else out


def assert_runs_like(program, model, *args):
    torch.testing.assert_close(program.run(args), eager(model, *args))


def digest(path: Path) -> str:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file())).hexdigest()


def one_line_error(path, fn, *args, **kwargs) -> str:
    with pytest.raises(UsageError) as info:
        fn(*args, **kwargs)
    line = info.value.one_line()
    assert "\n" not in line
    assert str(path) in info.value.message
    return line


def make_gpt_model():
    torch.manual_seed(1)
    return TinyGPT().eval()


@pytest.fixture
def gpt_model():
    return make_gpt_model()


# -- Python specs ----------------------------------------------------------------------------------


def test_factory_returning_model_and_tuple():
    program = load_model(spec("mlp"))
    model, (x,) = tiny_models.mlp()
    assert program.input_names == ["x"]
    assert program.meta["source"] == spec("mlp")
    assert_runs_like(program, model, x)


def test_factory_returning_model_and_dict():
    program = load_model(spec("gpt_with_inputs"))
    model, example = tiny_models.gpt_with_inputs()
    assert program.input_names == ["idx"]
    assert_runs_like(program, model, example["idx"])


def test_factory_returning_model_needs_input():
    line = one_line_error(spec("gpt"), load_model, spec("gpt"))
    assert "--input" in line and "forward(idx, targets=None)" in line


def test_named_dims_become_dynamic():
    program = load_model(spec("gpt"), inputs=specs("idx:int64[batch=1,seq=8]"))
    assert program.dynamic_shapes == [{0: "batch", 1: "seq"}]
    assert program.meta["vocab_size"] == tiny_models.VOCAB  # ids were made in range
    model = tiny_models.gpt()
    assert_runs_like(program, model, program.example_inputs[0])
    assert_runs_like(program, model, ids(3, 13, seed=2))  # another batch and sequence length


def test_plain_dims_stay_static():
    program = load_model(spec("gpt"), inputs=specs("idx:int64[2,8]"))
    assert program.dynamic_shapes == [None]
    with pytest.raises((AssertionError, RuntimeError)):  # export's guard on the input's shape
        program.run((ids(2, 9),))


def test_input_overrides_factory_inputs():
    program = load_model(spec("gpt_with_inputs"), inputs=specs("idx:int64[batch=1,seq=5]"))
    assert tuple(program.example_inputs[0].shape) == (1, 5)


def test_input_name_must_be_a_forward_argument():
    line = one_line_error(spec("gpt"), load_model, spec("gpt"), inputs=specs("input_ids:int64[1,8]"))
    assert "no argument 'input_ids'" in line and "idx" in line


def test_input_shape_the_model_rejects():
    line = one_line_error(spec("mlp"), load_model, spec("mlp"), inputs=specs("x:float32[2,7]"))
    assert "shapes cannot be multiplied" in line


def test_module_spec(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURE.parent))
    program = load_model("tiny_models:mlp")
    model, (x,) = tiny_models.mlp()
    assert_runs_like(program, model, x)


def test_attribute_that_is_a_model_instance():
    program = load_model(spec("MODEL_INSTANCE"), inputs=specs("x:float32[batch=2,8]"))
    assert program.input_names == ["x"]


def test_file_spec_imports_its_neighbours_without_sys_path_changes(tmp_path):
    (tmp_path / "layers_for_loading_test.py").write_text(
        "import torch\nclass Double(torch.nn.Module):\n    def forward(self, x):\n        return 2 * x\n"
    )
    (tmp_path / "model.py").write_text(
        "import torch\nfrom layers_for_loading_test import Double\n"
        "def build():\n    return Double(), (torch.ones(2, 3),)\n"
    )
    before = list(sys.path)
    program = load_model(f"{tmp_path / 'model.py'}:build")
    assert sys.path == before
    torch.testing.assert_close(program.run((torch.full((2, 3), 3.0),)), torch.full((2, 3), 6.0))


# -- torch.export archives and OUT folders ---------------------------------------------------------


@pytest.fixture(scope="module")
def saved_program(tmp_path_factory):
    """A program captured from `make_gpt_model()` and saved as a .pt2 (shared: never written to)."""
    program = capture(
        make_gpt_model(),
        {"idx": ids(1, 8)},
        dynamic_shapes=[{0: "batch", 1: "seq"}],
        meta={"vocab_size": tiny_models.VOCAB},
    )
    path = tmp_path_factory.mktemp("archive") / "model.pt2"
    program.save(path)
    return path


def test_export_archive(saved_program, gpt_model):
    before = digest(saved_program)
    assert detect_format(str(saved_program)) == EXPORT_ARCHIVE
    program = load_model(str(saved_program))
    assert program.input_names == ["idx"]
    assert_runs_like(program, gpt_model, program.example_inputs[0])
    assert_runs_like(program, gpt_model, ids(2, 11, seed=3))
    assert digest(saved_program) == before


def test_export_archive_named_pt_is_detected_by_content(tmp_path, saved_program, gpt_model):
    path = tmp_path / "looks_like_a_state_dict.pt"
    path.write_bytes(saved_program.read_bytes())
    program = load_model(str(path))
    assert_runs_like(program, gpt_model, program.example_inputs[0])


def test_plain_torch_export_archive(tmp_path):
    model = MLP().eval()
    path = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 8),)), path)
    program = load_model(str(path))
    assert program.input_names == ["x"]
    assert_runs_like(program, model, program.example_inputs[0])


def test_input_overrides_archive_inputs(saved_program, gpt_model):
    program = load_model(str(saved_program), inputs=specs("idx:int64[batch=2,seq=5]"))
    (x,) = program.example_inputs
    assert tuple(x.shape) == (2, 5) and x.max() < tiny_models.VOCAB
    assert_runs_like(program, gpt_model, x)


def test_archive_input_errors(saved_program):
    line = one_line_error(saved_program, load_model, str(saved_program), inputs=specs("ids:int64[1,8]"))
    assert "no input 'ids'" in line and "idx:int64[batch=" in line
    line = one_line_error(saved_program, load_model, str(saved_program), inputs=specs("idx:int64[1,8,2]"))
    assert "does not fit" in line


def test_optpipe_out_folder(tmp_path, saved_program, gpt_model):
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "program.pt2").write_bytes(saved_program.read_bytes())
    (out / "pipeline.txt").write_text("")
    assert detect_format(str(out)) == OPTPIPE_OUT
    program = load_model(str(out))
    assert_runs_like(program, gpt_model, program.example_inputs[0])


# -- state dicts -----------------------------------------------------------------------------------


def test_state_dict_with_arch(tmp_path, gpt_model):
    path = tmp_path / "weights.pt"
    torch.save(gpt_model.state_dict(), path)
    before = digest(path)
    assert detect_format(str(path)) == TORCH_SAVE
    # The arch factory seeds another init: matching gpt_model proves the weights were loaded.
    program = load_model(str(path), arch=spec("gpt"), inputs=specs("idx:int64[batch=1,seq=8]"))
    assert program.meta["arch"] == spec("gpt")
    assert_runs_like(program, gpt_model, ids(2, 6, seed=4))
    assert digest(path) == before


def test_safetensors_state_dict_with_arch_and_factory_inputs(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = MLP().eval()
    path = tmp_path / "weights.bin"  # the extension says nothing
    save_file(model.state_dict(), path)
    assert detect_format(str(path)) == SAFETENSORS
    program = load_model(str(path), arch=spec("mlp"))  # inputs from the factory
    assert_runs_like(program, model, torch.randn(2, 8))


def test_checkpoint_dict_of_a_compiled_model(tmp_path, gpt_model):
    path = tmp_path / "ckpt.pt"
    weights = {f"_orig_mod.{k}": v for k, v in gpt_model.state_dict().items()}
    torch.save({"model": weights, "iter_num": 100, "config": {"n_layer": 2}}, path)
    program = load_model(str(path), arch=spec("gpt_with_inputs"))
    assert_runs_like(program, gpt_model, ids(1, 8))


def test_state_dict_without_arch(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(MLP().state_dict(), path)
    line = one_line_error(path, load_model, str(path))
    assert "--arch" in line


def test_state_dict_with_other_keys(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"encoder.weight": torch.ones(2), **MLP().state_dict()}, path)
    line = one_line_error(path, load_model, str(path), arch=spec("gpt_with_inputs"))
    assert "missing keys wte.weight" in line and "unexpected keys encoder.weight, fc1.weight" in line


def test_state_dict_with_other_sizes(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(tiny_models.wider_mlp().state_dict(), path)
    line = one_line_error(path, load_model, str(path), arch=spec("mlp"))
    assert "size mismatch for fc1.weight" in line


def test_arch_with_a_model_that_needs_no_state_dict(saved_program):
    one_line_error(saved_program, load_model, str(saved_program), arch=spec("gpt"))


# -- pickled modules ------------------------------------------------------------------------------


def test_pickled_module_refused_then_trusted(tmp_path, gpt_model):
    path = tmp_path / "model.pt"
    torch.save(gpt_model, path)
    before = digest(path)
    assert detect_format(str(path)) == TORCH_SAVE
    line = one_line_error(path, load_model, str(path), inputs=specs("idx:int64[batch=1,seq=8]"))
    assert "--trust-pickle" in line and "arbitrary code" in line and "TinyGPT" in line

    one_line_error(path, load_model, str(path), trust_pickle=True)  # no inputs to capture on
    program = load_model(str(path), trust_pickle=True, inputs=specs("idx:int64[batch=1,seq=8]"))
    assert_runs_like(program, gpt_model, ids(2, 12, seed=5))
    assert digest(path) == before


def test_legacy_pickle_format_state_dict(tmp_path):
    torch.manual_seed(2)
    model = MLP().eval()
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert detect_format(str(path)) == PICKLE
    program = load_model(str(path), arch=spec("mlp"))
    assert_runs_like(program, model, torch.randn(2, 8))


# -- Hugging Face folders --------------------------------------------------------------------------


def _save_tokenizer(folder: Path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    return folder, model


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=256,
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    return folder, model


def test_hf_causal_lm_folder(gpt2_folder):
    folder, model = gpt2_folder
    before = digest(folder)
    program = load_model(str(folder))
    assert program.input_names == ["input_ids"]  # a causal LM: no attention mask by default
    assert tuple(program.example_inputs[0].shape) == (1, 32)  # min(128, n_positions)
    assert program.dynamic_shapes == [{0: "batch", 1: "seq"}]
    assert program.meta["tokenizer"] == str(folder) and program.meta["source"] == str(folder)
    assert program.meta["vocab_size"] == 96 and program.meta["config"]["n_layer"] == 1
    x = ids(2, 9, seed=6) % 96  # another batch and length
    torch.testing.assert_close(program.run((x,)), eager(model, x).logits)
    assert digest(folder) == before


def test_hf_encoder_folder(bert_folder):
    folder, model = bert_folder
    program = load_model(str(folder))
    assert program.input_names == ["input_ids", "attention_mask"]
    assert tuple(program.example_inputs[0].shape) == (1, 128)  # min(128, max_position_embeddings)
    assert "tokenizer" not in program.meta
    x, mask = ids(2, 10, seed=7) % 96, torch.ones(2, 10, dtype=torch.int64)
    mask[1, 6:] = 0
    torch.testing.assert_close(program.run((x, mask)), eager(model, x, mask).last_hidden_state)


def test_hf_folder_with_input(gpt2_folder):
    folder, model = gpt2_folder
    program = load_model(str(folder), inputs=specs("input_ids:int64[2,7]"))
    assert program.dynamic_shapes == [None]
    (x,) = program.example_inputs
    assert tuple(x.shape) == (2, 7) and x.max() < 96
    torch.testing.assert_close(program.run(), eager(model, x).logits)


def test_hf_folder_with_only_pickled_weights(tmp_path, gpt2_folder):
    from safetensors.torch import load_file

    folder, model = gpt2_folder
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((folder / "config.json").read_bytes())
    torch.save(load_file(folder / "model.safetensors"), pickled / "pytorch_model.bin")
    line = one_line_error(pickled, load_model, str(pickled))
    assert "pytorch_model.bin" in line and "--trust-pickle" in line
    program = load_model(str(pickled), trust_pickle=True)
    x = program.example_inputs[0]
    torch.testing.assert_close(program.run(), eager(model, x).logits)


def test_hf_folder_without_transformers(gpt2_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    line = one_line_error(gpt2_folder[0], load_model, str(gpt2_folder[0]))
    assert "pip install transformers" in line


def test_hf_folder_without_weights(tmp_path, gpt2_folder):
    (tmp_path / "config.json").write_bytes((gpt2_folder[0] / "config.json").read_bytes())
    assert "no weights" in one_line_error(tmp_path, load_model, str(tmp_path))


# -- bad input -------------------------------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path, saved_program):
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    (tmp_path / "noise.pt").write_bytes(bytes(range(7, 255)) * 4)
    (tmp_path / "empty.pt").write_bytes(b"")
    data = saved_program.read_bytes()
    (tmp_path / "truncated.pt2").write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "hi")
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "syntax_error.py").write_text("def build(:\n")
    (tmp_path / "tensor.pt").write_bytes(b"")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    scripted = torch.jit.script(MLP())
    scripted.save(str(tmp_path / "scripted.pt"))
    return tmp_path


@pytest.mark.parametrize(
    "name, kwargs, problem",
    [
        ("missing.pt", {}, "no such file"),
        ("notes.pt", {}, "unknown model format"),
        ("noise.pt", {}, "unknown model format"),
        ("empty.pt", {}, "unknown model format"),
        ("truncated.pt2", {}, "corrupt archive"),
        ("other.zip", {}, "not one that torch wrote"),
        ("empty_folder", {}, "neither an optpipe OUT folder"),
        ("tensor.pt", {"arch": "ARCH"}, "holds a Tensor"),
        ("scripted.pt", {}, "TorchScript"),
        ("missing.py:build", {}, "no such file"),
        ("syntax_error.py:build", {}, "cannot import"),
    ],
)
def test_bad_model_files(bad_files, name, kwargs, problem):
    path = bad_files / name
    kwargs = {k: spec("mlp") if v == "ARCH" else v for k, v in kwargs.items()}
    line = one_line_error(bad_files / name.split(":")[0], load_model, str(path), **kwargs)
    assert problem in line
    assert "(hint: " in line


@pytest.mark.parametrize(
    "factory, problem",
    [
        ("no_such_factory", "has no attribute 'no_such_factory'"),
        ("broken", "the factory raised ValueError: no weights here"),
        ("not_a_model", "returned a int"),
        ("VOCAB", "not a model or a factory"),
    ],
)
def test_bad_factories(factory, problem):
    line = one_line_error(FIXTURE, load_model, spec(factory))
    assert problem in line


def test_missing_module_spec():
    line = one_line_error("no_such_module_for_optpipe", load_model, "no_such_module_for_optpipe.models:build")
    assert "no module named" in line


def test_bad_arch_spec(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(MLP().state_dict(), path)
    line = one_line_error(path.parent / "nope.py", load_model, str(path), arch=f"{path.parent / 'nope.py'}:build")
    assert "no such file" in line


# -- the Python API: inputs as text or as tensors --------------------------------------------------


def test_inputs_as_spec_text():
    program = load_model(spec("gpt"), inputs=["idx:int64[batch=1,seq=6]"])
    assert program.dynamic_shapes == [{0: "batch", 1: "seq"}]


def test_inputs_as_tensors(saved_program, gpt_model):
    program = load_model(spec("gpt"), inputs={"idx": ids(2, 6)})
    assert program.input_names == ["idx"] and tuple(program.example_inputs[0].shape) == (2, 6)
    archive = load_model(str(saved_program), inputs=(ids(1, 5),))
    assert tuple(archive.example_inputs[0].shape) == (1, 5)
    assert_runs_like(archive, gpt_model, archive.example_inputs[0])
