"""Load the `MODEL` argument as a `Program`, whatever form it comes in.

The form is detected by content, never by file extension (a `.pt` may be an export archive, a
state dict or a pickled module):

- a torch.export archive (zip with an `archive_format` member)  -> `load_program`
- an optpipe OUT folder (holds `program.pt2`)                   -> that program
- a Python spec `path/to/file.py:factory` or `pkg.module:factory` -> the factory's model, captured
- a Hugging Face model folder (`config.json` + `*.safetensors`)  -> transformers, captured
- a state dict (`torch.save` zip or `.safetensors`) + `arch`      -> the arch's model with it, captured
- a whole pickled module                                          -> refused unless `trust_pickle`

`--input` specs, when given, define the example inputs (and which dims are dynamic) of every form
that is captured; for an archive they replace the named example inputs of the saved program.
Nothing here writes to the model's files. Every bad input is a one-line `UsageError` naming the path.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from .capture import capture
from .errors import UsageError, first_line
from .inputs import InputSpec, check_specs, dtype_name, dynamic_shapes_of, make_example_inputs, parse_input_spec
from .outdir import is_optpipe_out, verify_out
from .program import Program, load_program

# What `detect_format` returns.
EXPORT_ARCHIVE = "export-archive"
OPTPIPE_OUT = "optpipe-out"
HF_FOLDER = "hf-folder"
TORCH_SAVE = "torch-save"  # torch.save zip: a state dict, a checkpoint dict or a pickled module
PICKLE = "pickle"  # a bare pickle (torch.save's legacy format)
SAFETENSORS = "safetensors"
TORCHSCRIPT = "torchscript"
STATE_DICT_FORMATS = (TORCH_SAVE, PICKLE, SAFETENSORS)

FORMS_HINT = (
    "give a torch.export archive (.pt2), an optpipe OUT folder, a Hugging Face model folder, "
    "path/to/file.py:factory, or a state dict with --arch"
)
PICKLE_HINT = (
    "--trust-pickle loads it with torch.load(weights_only=False), which runs arbitrary code "
    "from the file; use it only for files you trust, or save model.state_dict() and pass --arch"
)
# Checkpoint dicts (nanoGPT's ckpt.pt, Lightning, ...) keep the weights under one of these keys.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
DEFAULT_SEQ = 128
PROGRAM_FILE = "program.pt2"
OUT_HINT = "it may be truncated or damaged; copy it again, or write it again with `optpipe optimize`"


def load_model(
    spec: str,
    *,
    inputs: Sequence[InputSpec | str] | Mapping | tuple | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
) -> Program:
    """Load `spec` (a path or a Python spec) as a Program.

    `inputs`: `--input` specs (`InputSpec`s or their text); they override the example inputs that
    come with the model. For the Python API, tensors (a dict by name, or a tuple) are taken too.
    `arch`: a Python spec that builds the model a state dict belongs to.
    `trust_pickle`: allow unpickling arbitrary objects (whole modules, pickle-only HF weights).

    >>> prog = load_model("examples/tiny_gpt.py:build")  # doctest: +SKIP
    >>> prog = load_model("gpt2-folder", inputs=[parse_input_spec("input_ids:int64[1,64]")])  # doctest: +SKIP
    """
    specs, tensors = _split_inputs(inputs)
    spec = os.fspath(spec)
    if not os.path.exists(spec) and _is_python_spec(spec):
        if arch is not None:
            raise UsageError(
                f"--arch is only used with a state dict, not with the Python spec {spec!r}",
                "drop --arch; the factory builds the model",
            )
        model, example = load_factory(spec)
        return _capture(model, _pick_example(tensors, example), specs, source=spec, meta={"source": spec})

    fmt = detect_format(spec)
    if arch is not None and fmt not in STATE_DICT_FORMATS:
        raise UsageError(f"--arch is only used with a state dict, but {spec} is a {fmt}", "drop --arch")
    if fmt == EXPORT_ARCHIVE:
        return _load_archive(spec, specs, tensors)
    if fmt == OPTPIPE_OUT:
        verify_out(spec)
        return _load_archive(os.path.join(spec, PROGRAM_FILE), specs, tensors, verified=True)
    if fmt == HF_FOLDER:
        return _load_hf_folder(spec, specs, tensors, trust_pickle)
    if fmt == TORCHSCRIPT:
        raise UsageError(
            f"{spec} is a TorchScript archive; optpipe captures models with torch.export, "
            "which cannot take TorchScript",
            "give the Python model: file.py:factory, or its state dict with --arch",
        )
    return _load_torch_file(spec, fmt, specs, tensors, arch, trust_pickle)


def _split_inputs(inputs) -> tuple[list[InputSpec], dict | tuple | None]:
    """(--input specs, example tensors given directly); at most one of them is non-empty."""
    if inputs is None:
        return [], None
    if isinstance(inputs, torch.Tensor):
        return [], (inputs,)
    if isinstance(inputs, Mapping):
        return [], dict(inputs)
    items = list(inputs)
    if items and all(isinstance(x, (InputSpec, str)) for x in items):
        specs = [parse_input_spec(x) if isinstance(x, str) else x for x in items]
        check_specs(specs)
        return specs, None
    return ([], tuple(items)) if items else ([], None)


def _pick_example(tensors, example):
    """Example tensors given to load_model win over those that came with the model."""
    return tensors if tensors is not None else example


# -- detecting the format -----------------------------------------------------------------------


def detect_format(path: str) -> str:
    """Which form of model `path` holds, from its content. Raises UsageError when it is none."""
    if not os.path.exists(path):
        hint = "a Python spec is path/to/file.py:factory or package.module:factory" if ":" in path else FORMS_HINT
        raise UsageError(f"no such file or folder: {path}", hint)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "program.pt2")):
            return OPTPIPE_OUT
        if os.path.isfile(os.path.join(path, "config.json")):
            return HF_FOLDER
        raise UsageError(
            f"{path} is a folder, but neither an optpipe OUT folder (program.pt2) nor a "
            "Hugging Face model folder (config.json)",
            FORMS_HINT,
        )
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        return _zip_format(path)
    if head[:1] == b"\x80":  # pickle protocol >= 2 opcode
        return PICKLE
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 8 + header_len <= os.path.getsize(path):
            return SAFETENSORS
    what = (
        "an empty file"
        if not head
        else ("text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else f"bytes {head[:4].hex()}...")
    )
    raise UsageError(f"unknown model format: {path} ({what}, not a torch or safetensors file)", FORMS_HINT)


def _zip_format(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:  # a damaged directory
        raise UsageError(
            f"corrupt archive: {path} is not a readable zip file ({e})",
            "the file may be truncated; save or copy it again",
        ) from e
    # torch archives put every member under one top folder (named after the file when saved).
    members = {name.split("/", 1)[-1] for name in names}
    if "archive_format" in members or any(n.endswith("serialized_exported_program.json") for n in names):
        return EXPORT_ARCHIVE
    if "constants.pkl" in members:
        return TORCHSCRIPT
    if "data.pkl" in members:
        return TORCH_SAVE
    raise UsageError(f"unknown model format: {path} is a zip archive, but not one that torch wrote", FORMS_HINT)


# -- torch.export archives and OUT folders ------------------------------------------------------


def load_out(folder: str) -> tuple[Program, str]:
    """(program, target name) of an OUT folder, its files checked against its manifest first: a
    damaged file or folder is a one-line UsageError naming it (a version drift, a warning)."""
    if not os.path.isfile(os.path.join(folder, PROGRAM_FILE)):
        raise UsageError(
            f"{folder} is not an optpipe OUT folder (no {PROGRAM_FILE})", "run `optpipe optimize ... -o OUT` first"
        )
    verify_out(folder)
    target = "cpu"
    path = os.path.join(folder, "target.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                target = json.load(f).get("target", "cpu")
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(f"damaged file: {path} is not readable JSON ({first_line(e)})", OUT_HINT) from e
    return _load_archive(os.path.join(folder, PROGRAM_FILE), [], verified=True), str(target)


def _load_archive(path: str, specs: list[InputSpec], tensors=None, *, verified: bool = False) -> Program:
    """`verified`: the manifest of the folder around `path` was checked already."""
    folder, name = os.path.split(os.path.abspath(path))
    if not verified and is_optpipe_out(folder):  # an OUT's program.pt2 named directly: check it too
        verify_out(folder, [name])
    if _zip_format(path) != EXPORT_ARCHIVE:
        raise UsageError(f"corrupt archive: {path} is a zip file, but not a torch.export archive", OUT_HINT)
    try:
        program = load_program(path)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(
            f"corrupt archive: cannot load the torch.export archive {path} ({first_line(e)})",
            "it may be truncated, or saved by another torch version; export it again",
        ) from e
    program.meta.setdefault("source", os.path.abspath(path))
    if specs or tensors is not None:
        _override_inputs(program, specs, tensors, path)
    elif not program.example_inputs and program.input_names:
        raise UsageError(
            f"{path} holds no example inputs", f"give --input for each of: {', '.join(program.input_names)}"
        )
    return program


def _override_inputs(program: Program, specs: list[InputSpec], tensors, path: str) -> None:
    """Replace the saved example inputs named by `specs` (or given as `tensors`). The saved
    program's dynamic dims stay what they are (re-capturing is not possible from an archive), so
    the new shapes are checked by running the program once."""
    if isinstance(tensors, tuple):
        tensors = dict(zip(program.input_names, tensors))
    new = tensors or make_example_inputs(specs, vocab_size=_program_vocab_size(program))
    unknown = [name for name in new if name not in program.input_names]
    if unknown:
        raise UsageError(f"{path} has no input {unknown[0]!r}", f"its inputs are: {describe_inputs(program)}")
    example = dict(zip(program.input_names, program.example_inputs))
    example.update(new)
    missing = [n for n in program.input_names if n not in example]
    if missing:
        raise UsageError(
            f"{path} holds no example for input {missing[0]!r}",
            f"give --input for each of: {', '.join(program.input_names)}",
        )
    new_inputs = tuple(example[n] for n in program.input_names)
    try:
        program.run(new_inputs)
    except Exception as e:
        raise UsageError(
            f"--input does not fit the program in {path}: {first_line(e)}",
            f"it was captured with {describe_inputs(program)}",
        ) from e
    program.example_inputs = new_inputs


def describe_inputs(program: Program) -> str:
    """The program's example inputs as --input specs, e.g. `input_ids:int64[batch=1,seq=16]`."""
    dynamic = program.dynamic_shapes or [None] * len(program.input_names)
    parts = []
    for i, name in enumerate(program.input_names):
        x = program.example_inputs[i] if i < len(program.example_inputs) else None
        if not isinstance(x, torch.Tensor):
            parts.append(name)
            continue
        dyn = (dynamic[i] if i < len(dynamic) else None) or {}
        parts.append(str(InputSpec(name, x.dtype, tuple(x.shape), dict(dyn))))
    return " ".join(parts)


def _program_vocab_size(program: Program) -> int | None:
    meta = program.meta
    vocab = meta.get("vocab_size") or (meta.get("config") or {}).get("vocab_size")
    if vocab:
        return int(vocab)
    # Fall back on the saved token ids: any id below their max is in range.
    ids = [
        x
        for x in program.example_inputs
        if isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dtype != torch.bool and x.numel()
    ]
    return int(max(x.max() for x in ids)) + 1 if ids else None


# -- Python specs --------------------------------------------------------------------------------

_PYTHON_SPEC_RE = re.compile(r"^(?P<target>.+):(?P<attr>[A-Za-z_][\w.]*)$")
_MODULE_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*$")


def _is_python_spec(spec: str) -> bool:
    match = _PYTHON_SPEC_RE.match(spec)
    if not match:
        return False
    target = match["target"]
    return target.endswith(".py") or bool(_MODULE_RE.match(target))


def load_factory(spec: str) -> tuple[nn.Module, tuple | dict | None]:
    """Import `path/to/file.py:factory` or `package.module:factory` and build the model.

    The attribute may be a factory (called with no arguments) returning a model or
    `(model, example_inputs)`, or a model instance. Returns `(model, example_inputs or None)`,
    example inputs as a tuple or a dict of named tensors.
    """
    match = _PYTHON_SPEC_RE.match(spec)
    if not match or not _is_python_spec(spec):
        raise UsageError(f"bad Python spec {spec!r}", "expected path/to/file.py:factory or package.module:factory")
    target, attr = match["target"], match["attr"]
    module = _import_file(target, spec) if target.endswith(".py") else _import_module(target, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(
                n
                for n, v in vars(module).items()
                if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
            )
            raise UsageError(
                f"{target} has no attribute {attr!r}", f"callables defined there: {', '.join(names) or 'none'}"
            )
        obj = getattr(obj, part)

    if isinstance(obj, nn.Module):
        result = obj
    elif callable(obj):
        with _importable_from(_spec_dir(target)):
            try:
                result = obj()
            except Exception as e:
                raise UsageError(
                    f"{spec}: the factory raised {first_line(e)}",
                    "it must build the model when called with no arguments",
                ) from e
    else:
        raise UsageError(
            f"{spec} is a {type(obj).__name__}, not a model or a factory",
            "point at a function returning a model or (model, example_inputs)",
        )
    return _split_factory_result(result, spec)


def _split_factory_result(result, spec: str) -> tuple[nn.Module, tuple | dict | None]:
    if isinstance(result, nn.Module):
        return result, None
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module):
        model, example = result
        if isinstance(example, torch.Tensor):
            return model, (example,)
        if isinstance(example, Mapping):
            return model, dict(example)
        if isinstance(example, (tuple, list)):
            return model, tuple(example)
        raise UsageError(
            f"{spec}: the factory's example inputs are a {type(example).__name__}",
            "return (model, example_inputs) with a tuple or a dict of tensors",
        )
    raise UsageError(
        f"{spec}: the factory returned a {type(result).__name__}", "return a model, or (model, example_inputs)"
    )


def _spec_dir(target: str) -> str:
    return os.path.dirname(os.path.abspath(target)) if target.endswith(".py") else os.getcwd()


@contextmanager
def _importable_from(directory: str):
    """Let a user's file import its neighbours (`from model import GPT`) without them editing
    sys.path; removed again afterwards so the user's folder does not shadow anything later."""
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def _import_file(path: str, spec: str):
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path} (in the Python spec {spec!r})", "expected path/to/file.py:factory")
    abspath = os.path.abspath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    # A private, per-path module name: the user's file must not shadow or replace a real module
    # of the same name (a `model.py` or `torch.py`), and it must stay in sys.modules so that its
    # classes can be pickled and found by torch.export.
    name = f"optpipe_spec_{stem}_{hashlib.sha1(abspath.encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, abspath)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    with _importable_from(os.path.dirname(abspath)):
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise UsageError(
                f"cannot import {path}: {first_line(e)}", "check that the file runs: python " + path
            ) from e
    return module


def _import_module(name: str, spec: str):
    # Like `uvicorn main:app`: a module in the current folder is found without installing it.
    with _importable_from(os.getcwd()):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                raise UsageError(
                    f"no module named {name!r} (in the Python spec {spec!r})",
                    "give a file path (path/to/file.py:factory) or install the package",
                ) from e
            raise UsageError(f"cannot import {name}: {first_line(e)}", "install what it needs") from e
        except Exception as e:
            raise UsageError(
                f"cannot import {name}: {first_line(e)}", f"check that `python -c 'import {name}'` works"
            ) from e


# -- state dicts and pickles ---------------------------------------------------------------------


def _load_torch_file(
    path: str, fmt: str, specs: list[InputSpec], tensors, arch: str | None, trust_pickle: bool
) -> Program:
    obj = _read_safetensors(path) if fmt == SAFETENSORS else _torch_load(path, trust_pickle)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), nn.Module):
        obj = obj["model"]  # a trusted checkpoint dict holding the module itself
    if isinstance(obj, nn.Module):
        if arch is not None:
            raise UsageError(f"{path} holds a whole model, so --arch is not used", "drop --arch")
        return _capture(obj, tensors, specs, source=path, meta={"source": os.path.abspath(path)})
    state_dict = _find_state_dict(obj) if isinstance(obj, Mapping) else None
    if state_dict is None:
        what = (
            f"a dict with keys {', '.join(map(str, list(obj)[:5]))}"
            if isinstance(obj, Mapping)
            else f"a {type(obj).__name__}"
        )
        raise UsageError(f"{path} holds {what}, not a model or a state dict", FORMS_HINT)
    if arch is None:
        raise UsageError(
            f"{path} is a state dict ({len(state_dict)} tensors); it needs the model's code",
            "add --arch path/to/model.py:factory (a function that builds the model)",
        )
    model, example = load_factory(arch)
    _load_weights(model, state_dict, path, arch)
    meta = {"source": os.path.abspath(path), "arch": arch}
    return _capture(model, _pick_example(tensors, example), specs, source=path, meta=meta)


def _torch_load(path: str, trust_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global it does not know: a module class, a custom object.
        if not trust_pickle:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise UsageError(
                f"{path} holds pickled Python objects{what}, not only tensors; refusing to unpickle it", PICKLE_HINT
            ) from e
    except Exception as e:
        raise UsageError(
            f"corrupt file: cannot read {path} with torch.load ({first_line(e)})",
            "the file may be truncated; save or copy it again",
        ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ImportError) as e:
        raise UsageError(
            f"cannot unpickle {path}: {first_line(e)}",
            "the model's class must be importable; or save model.state_dict() and pass --arch",
        ) from e
    except Exception as e:
        raise UsageError(f"cannot unpickle {path}: {first_line(e)}", FORMS_HINT) from e


def _read_safetensors(path: str) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise UsageError(
            f"{path} is a safetensors file, but safetensors is not installed", "pip install safetensors"
        ) from e
    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise UsageError(
            f"corrupt file: cannot read {path} as safetensors ({first_line(e)})",
            "the file may be truncated; save or copy it again",
        ) from e


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_state_dict(obj: Mapping) -> dict | None:
    if not _is_tensor_dict(obj):
        nested = [obj[k] for k in CHECKPOINT_KEYS if k in obj and _is_tensor_dict(obj[k])]
        if not nested:
            return None
        obj = nested[0]
    state_dict = dict(obj)
    # torch.compile'd models save their weights under `_orig_mod.`, never a real submodule name.
    if all(k.startswith("_orig_mod.") for k in state_dict):
        state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    return state_dict


def _load_weights(model: nn.Module, state_dict: dict, path: str, arch: str) -> None:
    expected = model.state_dict().keys()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing and unexpected and all(k.startswith("module.") for k in state_dict):
        # DistributedDataParallel checkpoints prefix every key with `module.`.
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = [
            f"{label} {_first_keys(keys)}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected))
            if keys
        ]
        raise UsageError(
            f"{path} does not fit the model from {arch}: {'; '.join(parts)}",
            "--arch must build the same architecture the state dict was saved from",
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise UsageError(
            f"{path} does not fit the model from {arch}: {lines[0] if lines else first_line(e)}",
            "--arch must build the same architecture (and sizes) the state dict was saved from",
        ) from e


def _first_keys(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# -- Hugging Face folders ------------------------------------------------------------------------


def _load_hf_folder(path: str, specs: list[InputSpec], tensors, trust_pickle: bool) -> Program:
    files = os.listdir(path)
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    pickled = [f for f in files if f.endswith((".bin", ".pth", ".pt", ".ckpt"))]
    if not has_safetensors:
        if not pickled:
            raise UsageError(
                f"{path} has config.json but no weights (*.safetensors)",
                "save the model with model.save_pretrained(folder)",
            )
        if not trust_pickle:
            raise UsageError(
                f"{path} holds only pickled weights ({pickled[0]}); refusing to unpickle them",
                "--trust-pickle lets transformers unpickle them, which can run arbitrary code "
                "from the files; or re-save the model with save_pretrained (safetensors)",
            )
    try:
        import transformers
    except ImportError as e:
        raise UsageError(
            f"{path} is a Hugging Face model folder, but transformers is not installed", "pip install transformers"
        ) from e

    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise UsageError(
            f"cannot read the Hugging Face config in {path}: {first_line(e)}",
            "optpipe loads only model types that the installed transformers knows (never remote code)",
        ) from e
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    model_class = model_class or transformers.AutoModel
    try:
        model = model_class.from_pretrained(path, config=config, local_files_only=True, use_safetensors=has_safetensors)
    except Exception as e:
        raise UsageError(
            f"cannot load the Hugging Face model in {path} as {model_class.__name__}: {first_line(e)}",
            "check that the weights match config.json",
        ) from e
    model.eval()

    vocab_size = getattr(config, "vocab_size", None)
    meta: dict[str, Any] = {"source": os.path.abspath(path)}
    if vocab_size:
        meta["vocab_size"] = int(vocab_size)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        meta["tokenizer"] = os.path.abspath(path)
    if tensors is not None:
        return _capture(model, tensors, [], source=path, meta=meta)
    if not specs:
        if not vocab_size:
            raise UsageError(
                f"{path}: cannot make default inputs for a {config.model_type} model (no vocab_size in its config)",
                "give --input for each forward() argument",
            )
        specs = default_hf_inputs(config, type(model).__name__)
    example = make_example_inputs(specs, vocab_size=vocab_size)
    return _capture(model, example, specs, source=path, meta=meta, prepared=True)


def default_hf_inputs(config, model_class_name: str = "") -> list[InputSpec]:
    """`input_ids:int64[batch=1,seq=min(128, max positions)]`, plus an all-ones `attention_mask`
    for encoders (BERT-like), where padding is the norm and the mask is part of the interface."""
    max_positions = getattr(config, "max_position_embeddings", None) or DEFAULT_SEQ
    seq = min(DEFAULT_SEQ, int(max_positions))
    dynamic = {0: "batch", 1: "seq"}
    specs = [InputSpec("input_ids", torch.int64, (1, seq), dynamic)]
    if _is_encoder(config, model_class_name):
        specs.append(InputSpec("attention_mask", torch.int64, (1, seq), dynamic))
    return specs


def _is_encoder(config, model_class_name: str) -> bool:
    if getattr(config, "is_decoder", False) or model_class_name.endswith(("ForCausalLM", "LMHeadModel")):
        return False
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "")
    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


# -- capture ----------------------------------------------------------------------------------


def _capture(
    model: nn.Module, example, specs: list[InputSpec], *, source: str, meta: dict, prepared: bool = False
) -> Program:
    """Capture `model` on the --input specs if given, else on the inputs that came with it.
    `prepared`: `example` was already made from `specs`."""
    meta = dict(meta)
    input_names = dynamic = None
    if specs:
        _check_input_names(model, specs, source)
        vocab_size = meta.get("vocab_size") or _embedding_vocab_size(model)
        if vocab_size:
            meta.setdefault("vocab_size", int(vocab_size))
        if not prepared:
            example = make_example_inputs(specs, vocab_size=vocab_size)
        input_names, dynamic = [s.name for s in specs], dynamic_shapes_of(specs)
    elif example is None:
        raise UsageError(
            f"{source} gives no example inputs; --input is required",
            f"add --input for each argument of forward({_signature_text(model)}), "
            "e.g. --input idx:int64[batch=1,seq=64]",
        )
    try:
        return capture(model, example, input_names=input_names, dynamic_shapes=dynamic, meta=meta)
    except UsageError as e:
        raise UsageError(f"{source}: {e.message}", e.hint) from e
    except Exception as e:
        given = " ".join(str(s) for s in specs) if specs else _describe_example(example)
        raise UsageError(
            f"{source}: the model failed on its example inputs ({first_line(e)})",
            f"inputs were {given}; check names, dtypes and shapes against forward({_signature_text(model)})",
        ) from e


def _check_input_names(model: nn.Module, specs: list[InputSpec], source: str) -> None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    for spec in specs:
        if spec.name not in params:
            raise UsageError(
                f"{source}: forward() has no argument {spec.name!r}", f"forward takes ({_signature_text(model)})"
            )


def _signature_text(model: nn.Module) -> str:
    try:
        return ", ".join(str(p) for p in inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return "..."


def _describe_example(example) -> str:
    items = example.items() if isinstance(example, Mapping) else enumerate(example or ())
    return " ".join(
        f"{k}:{dtype_name(v.dtype)}{list(v.shape)}" if isinstance(v, torch.Tensor) else f"{k}:{type(v).__name__}"
        for k, v in items
    )


def _embedding_vocab_size(model: nn.Module) -> int | None:
    """The token vocabulary, so that made-up ids stay in range: the input embedding's size."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = None
    if callable(get):
        try:
            embedding = get()
        except Exception:  # noqa: BLE001 - not every model implements it
            embedding = None
    if not isinstance(embedding, nn.Embedding):
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return embedding.num_embeddings if embedding is not None else None
