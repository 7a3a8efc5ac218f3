"""`Program`: the IR that passes rewrite.

A Program is an unlifted `torch.fx.GraphModule` (from `torch.export(...).module()`: parameters are
attributes, so passes can add, replace or shrink weights and the result is an ordinary trainable
`nn.Module`) together with what is needed to run, verify, re-export and describe it: example inputs,
the dynamic-shape spec, source metadata and the history of passes applied.

`Program.save(path)` writes a real torch.export archive; `torch.export.load(path).module()` runs it
once `import optpipe` has registered optpipe's ops. optpipe's own metadata rides along as an extra
file inside the archive (`optpipe.json`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.export import Dim

META_FILE = "optpipe.json"


@dataclass
class Program:
    gm: torch.fx.GraphModule
    example_inputs: tuple
    input_names: list[str]
    dynamic_shapes: Any = None
    """Per-input dict {dim: name} of the dims captured as dynamic (None: all static)."""
    meta: dict = field(default_factory=dict)
    """Source metadata: "source", "config" (HF config dict), "tokenizer", "output" (which tensor path
    of the model's output was captured), "vocab_size", ... JSON-serialisable."""
    history: list[str] = field(default_factory=list)
    """Canonical pipeline elements applied so far, in order."""
    calibration: list[tuple] | None = field(default=None, repr=False)
    """Input sets that passes calibrate activation statistics on (int8-static scales, wanda
    importance); see `optpipe.calibration`. Not saved with the program."""
    companions: dict[str, Program] = field(default_factory=dict)
    """Programs that run beside this one, by name, saved in the same archive (`kv-cache` on an
    encoder-decoder keeps its encoder here: `program.meta["kv_cache"]["encoder"]`)."""

    # -- running -------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.gm(*args, **kwargs)

    def run(self, inputs: tuple | None = None):
        with torch.no_grad():
            return self.gm(*(self.example_inputs if inputs is None else inputs))

    @property
    def pipeline(self) -> str:
        return ",".join(self.history)

    def copy(self) -> Program:
        """A copy whose graph can be rewritten without touching this one. Parameters are shared
        (passes replace weights rather than mutate them in place), so this is cheap."""
        gm = self.gm
        with warnings.catch_warnings():  # deep-copying pytree specs trips a torch deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            graph = copy.deepcopy(gm.graph)
        new_gm = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
        _unregister_copied_constants(gm, new_gm)
        for attr in ("_in_spec", "_out_spec"):  # immutable pytree specs: share them
            if hasattr(gm, attr):
                setattr(new_gm, attr, getattr(gm, attr))
        if hasattr(gm, "meta"):
            new_gm.meta = dict(gm.meta)
        return Program(
            new_gm,
            self.example_inputs,
            list(self.input_names),
            self.dynamic_shapes,
            copy.deepcopy(self.meta),
            list(self.history),
            self.calibration,
            dict(self.companions),
        )

    def num_params(self) -> int:
        seen, total = set(), 0
        for t in list(self.gm.parameters()) + list(self.gm.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
        return total

    # -- export ----------------------------------------------------------------------------------
    def export(self) -> torch.export.ExportedProgram:
        """Re-export the (rewritten) graph as an ExportedProgram with the same dynamic dims."""
        ep, _ = export_module(self.gm, self.example_inputs, self.input_names, self.dynamic_shapes, strict_dims=True)
        return ep

    def save(self, path: str | os.PathLike) -> None:
        """Write `path` (a .pt2 torch.export archive) atomically."""
        path = os.fspath(path)
        ep = self.export()
        # keep the user's example inputs, not the widened ones export traced with (an older torch
        # without the setter keeps the traced ones)
        with contextlib.suppress(Exception):
            ep.example_inputs = (tuple(self.example_inputs), {})
        meta = {
            "format": "optpipe-program/1",
            "input_names": self.input_names,
            "dynamic_shapes": self.dynamic_shapes,
            "meta": self.meta,
            "history": self.history,
            "tied": tied_weight_groups(self.gm),
        }
        programs = {"model": ep}
        if self.companions:
            meta["companions"] = {name: c.save_info() for name, c in self.companions.items()}
            programs.update((name, c.export()) for name, c in self.companions.items())
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".program-", suffix=".pt2", dir=directory)
        os.close(fd)
        try:
            if len(programs) == 1:
                torch.export.save(ep, tmp, extra_files={META_FILE: json.dumps(meta)})
            else:  # one archive, several programs; torch.export.load still gives "model"
                from torch.export.pt2_archive._package import package_pt2

                package_pt2(tmp, exported_programs=programs, extra_files={META_FILE: json.dumps(meta)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def save_info(self) -> dict:
        """What `from_exported` needs beside the exported program (a companion's entry)."""
        return {"input_names": self.input_names, "dynamic_shapes": self.dynamic_shapes, "meta": self.meta}

    @classmethod
    def from_exported(cls, ep: torch.export.ExportedProgram, meta_json: str | None = None) -> Program:
        info = json.loads(meta_json) if meta_json else {}
        args, kwargs = ep.example_inputs or ((), {})
        if kwargs:
            names = list(info.get("input_names") or [])
            args = tuple(args) + tuple(kwargs[k] for k in names[len(args) :] if k in kwargs)
        sig_names = [
            s.arg.name
            for s in ep.graph_signature.input_specs
            if s.kind == torch.export.graph_signature.InputKind.USER_INPUT
        ]
        input_names = info.get("input_names") or sig_names
        dyn = info.get("dynamic_shapes")
        if dyn is not None:
            dyn = [{int(k): v for k, v in d.items()} if d else None for d in dyn]
        gm = ep.module()
        retie_weights(gm, info.get("tied") or [])
        return cls(gm, tuple(args), list(input_names), dyn, info.get("meta", {}), list(info.get("history", [])))


def _unregister_copied_constants(gm: torch.nn.Module, new_gm: torch.nn.Module) -> None:
    """GraphModule registers every plain tensor attribute it copies (export's lifted constants) as a
    buffer; keep them plain attributes, so that passes still tell constants from state."""
    buffers = {name for name, _ in gm.named_buffers(remove_duplicate=False)}
    for name, _ in list(new_gm.named_buffers(remove_duplicate=False)):
        if name not in buffers:
            owner_path, _, attr = name.rpartition(".")
            owner = new_gm.get_submodule(owner_path) if owner_path else new_gm
            tensor = owner._buffers.pop(attr)
            setattr(owner, attr, tensor)


def _widen(x: torch.Tensor, dims) -> torch.Tensor:
    for d in dims or {}:
        if x.shape[d] == 1:
            x = torch.cat([x, x], dim=d)
    return x


def export_module(module: torch.nn.Module, inputs: tuple, names: Sequence[str], dynamic, *, strict_dims: bool = False):
    """torch.export `module` (non-strict) with `dynamic` dims as Dim.AUTO.

    Returns (exported_program, dims that stayed dynamic). The example inputs are widened on size-1
    dynamic dims for tracing only.
    """
    dynamic = list(dynamic) if dynamic else [None] * len(inputs)
    trace_inputs = tuple(_widen(x, d) if isinstance(x, torch.Tensor) else x for x, d in zip(inputs, dynamic))
    shapes = tuple(dict.fromkeys(spec, Dim.AUTO) if spec else None for spec in dynamic)
    if any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values()):
        shapes = (shapes,)  # forward(*args): the spec of the one varargs tuple
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, trace_inputs, dynamic_shapes=shapes, strict=False)
    kept = []
    user_inputs = [n for n in ep.graph.nodes if n.op == "placeholder"][-len(inputs) :] if inputs else []
    for node, spec in zip(user_inputs, dynamic):
        val = node.meta.get("val")
        if not spec or not isinstance(val, torch.Tensor):
            kept.append(None)
            continue
        dyn = {d: name for d, name in spec.items() if _is_symbolic(val.shape[d])}
        kept.append(dyn or None)
    return ep, kept


def _is_symbolic(size) -> bool:
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols)


def tied_weight_groups(module: torch.nn.Module) -> list[list[str]]:
    """Names that share one tensor (tied embeddings): export archives store them apart."""
    groups: dict[int, list[str]] = {}
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    ):
        groups.setdefault(id(t), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def retie_weights(module: torch.nn.Module, groups: list[list[str]]) -> None:
    for first, *others in groups:
        try:
            shared = module.get_parameter(first)
        except AttributeError:
            continue
        for name in others:
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            if isinstance(getattr(owner, attr, None), torch.nn.Parameter):
                setattr(owner, attr, shared)


def load_program(path: str | os.PathLike) -> Program:
    """Load a Program saved by `Program.save` (or any torch.export archive)."""
    if _programs_in(path) > 1:  # with companions (Program.save): read every program at once
        from torch.export.pt2_archive._package import load_pt2

        with _quiet_export_log():
            contents = load_pt2(os.fspath(path))
        meta = contents.extra_files.get(META_FILE) or None
        program = Program.from_exported(contents.exported_programs["model"], meta)
        for name, info in (json.loads(meta or "{}").get("companions") or {}).items():
            program.companions[name] = Program.from_exported(contents.exported_programs[name], json.dumps(info))
        return program
    extra = {META_FILE: ""}
    with _quiet_export_log():
        ep = torch.export.load(os.fspath(path), extra_files=extra)
    return Program.from_exported(ep, extra[META_FILE] or None)


def _programs_in(path) -> int:
    """How many exported programs a .pt2 archive holds (0 for what is not one)."""
    import zipfile

    try:
        with zipfile.ZipFile(os.fspath(path)) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return 0
    return sum(1 for n in names if "/models/" in n and n.endswith(".json"))


@contextlib.contextmanager
def _quiet_export_log():
    """torch.export.load logs a whole traceback before it raises on a damaged archive; the error
    it raises (chained to ours) carries the same, so keep stderr to the one-line error."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
