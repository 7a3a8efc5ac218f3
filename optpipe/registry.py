"""Registries: passes (by kebab-case name), targets, presets.

A pass is a function `(program, config) -> PassResult` registered with `@register_pass(name,
Config, exact=...)`. It rewrites `program.gm` in place and reports what it did in counted stats.
Configs are frozen dataclasses; each field's help text is `field(metadata={"help": ...})`. A lossy
pass's config subclasses `LossyConfig`, whose fields are the budget the pipeline holds it to.

A pass may also declare where it can run (`needs`, `gives`, `takes`, `before`, `after`, `last`,
`cleanup`, see `PassOrder`); `optpipe.pipeline.order_problem` checks a pipeline against them.

The core imports pass and target modules only through these tables (built-ins by module path,
third-party ones through the `optpipe.passes` / `optpipe.targets` entry-point groups), so heavy
backends load only when used.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError

# Built-in pass families: pass name -> module that registers it (imported on first use).
BUILTIN_PASSES: dict[str, str] = {
    "fuse-attention": "optpipe.passes.fuse_attention",
    "dce": "optpipe.passes.cleanup",
    "cse": "optpipe.passes.cleanup",
    "attention": "optpipe.passes.attention",
    "kv-cache": "optpipe.passes.kv_cache",
    "quantize": "optpipe.passes.quantize",
    "prune": "optpipe.passes.prune",
    "partition": "optpipe.passes.partition",
    "sparse-prediction": "optpipe.passes.sparse_prediction",
}
# Modules that define optpipe's own ops (`torch.ops.optpipe.*`): `import optpipe` imports them, so a
# saved program that uses them loads in any process (`torch.export.load` needs the ops registered).
OP_MODULES = ("optpipe.passes.attention_ops", "optpipe.passes.kv_cache_ops", "optpipe.passes.quantize_ops")

BUILTIN_TARGETS: dict[str, str] = {
    "cpu": "optpipe.targets.torch_backend",
    "cuda": "optpipe.targets.torch_backend",
    "onnxruntime": "optpipe.targets.onnxruntime_backend",
    "tvm": "optpipe.targets.tvm_backend",
    "tvm-cuda": "optpipe.targets.tvm_backend",
}


@dataclass
class PassResult:
    """What a pass did. `modified` is True only when the graph actually changed."""

    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    """JSON-serialisable extras for the report (e.g. per-module-path decisions)."""


@dataclass(frozen=True, kw_only=True)
class LossyConfig:
    """Base of every lossy pass's config (`register_pass(..., exact=False)`): the pass's own quality
    budget, checked by the pipeline after the pass together with the global `--budget` (the pass's
    value wins where both are given). Options `min-sqnr` and `min-cosine`, listed after the pass's own.

    A subclass that defines `__post_init__` calls `super().__post_init__()`.
    """

    min_sqnr: float | None = field(
        default=None, metadata={"help": "verification budget: stop the pipeline when output SQNR (dB) falls below this"}
    )
    min_cosine: float | None = field(
        default=None,
        metadata={"help": "verification budget: stop the pipeline when output cosine similarity falls below this"},
    )

    def __post_init__(self):
        if self.min_cosine is not None and not -1 <= self.min_cosine <= 1:
            raise ValueError(f"min-cosine must be in [-1, 1], got {self.min_cosine}")


def config_fields(config) -> list[dataclasses.Field]:
    """The options of a pass config (class or instance) in their documented order: the pass's own
    fields, then, for a lossy pass, `LossyConfig`'s budget fields (a dataclass lists a base class's
    fields first; option listings and canonical pipeline text keep the budget last)."""
    cls = config if isinstance(config, type) else type(config)
    own = [f for f in dataclasses.fields(cls) if f.init]
    budget = {f.name for f in dataclasses.fields(LossyConfig)} if issubclass(cls, LossyConfig) else set()
    return [f for f in own if f.name not in budget] + [f for f in own if f.name in budget]


CAPABILITIES: dict[str, str] = {
    "sdpa-sites": "canonical SDPA attention sites",  # one aten.scaled_dot_product_attention per attention
    "float-linears": "float linear weights",
}
"""What a program can have that passes need, give or take (`PassOrder`): name -> what it is, quoted in
order errors. A freshly captured program has `BASE_CAPABILITIES`; third-party passes may use their
own names (`register_capability`)."""
BASE_CAPABILITIES: frozenset[str] = frozenset({"float-linears"})


def register_capability(name: str, description: str) -> None:
    """Describe capability `name` (a short kebab-case string) for order errors."""
    CAPABILITIES[name] = description


@dataclass(frozen=True)
class PassOrder:
    """Where a pass may run in a pipeline (LLVM/MLIR-style pass dependencies), checked before any pass
    runs (`optpipe.pipeline.order_problem`). Capabilities flow along the pipeline, starting from
    `BASE_CAPABILITIES` plus what the program's history gave:

    - `needs`: capabilities that must hold when the pass runs (an earlier pass gave them);
    - `gives`: capabilities the pass establishes; `takes`: capabilities it removes;
    - `before` / `after`: passes this one must run before / after when both are in the pipeline;
    - `last`: only `cleanup` passes may follow it (its result would not survive another rewrite);
    - `cleanup`: the pass only removes or merges nodes, so it may follow anything, `last` passes too;
    - `why`: one clause quoted when `before`, `after` or `last` refuses an order.
    """

    needs: tuple[str, ...] = ()
    gives: tuple[str, ...] = ()
    takes: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    last: bool = False
    cleanup: bool = False
    why: str = ""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable
    config_cls: type
    exact: bool
    summary: str
    doc: str
    module: str
    order: PassOrder = field(default_factory=PassOrder)

    def options(self) -> list[dict]:
        """Documented options: name (kebab-case), type, default, help."""
        rows = []
        for f in config_fields(self.config_cls):
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            )
            rows.append(
                {
                    "name": f.name.replace("_", "-"),
                    "type": _type_name(f.type),
                    "default": default,
                    "help": f.metadata.get("help", ""),
                }
            )
        return rows


def _type_name(tp) -> str:
    return tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))


_PASSES: dict[str, PassInfo] = {}
_TARGETS: dict[str, Any] = {}
_PLUGINS_LOADED = False


def register_pass(
    name: str,
    config: type,
    *,
    exact: bool,
    summary: str | None = None,
    needs: tuple[str, ...] = (),
    gives: tuple[str, ...] = (),
    takes: tuple[str, ...] = (),
    before: tuple[str, ...] = (),
    after: tuple[str, ...] = (),
    last: bool = False,
    cleanup: bool = False,
    why: str = "",
):
    """Decorator registering `fn(program, config) -> PassResult` as pass `name`. `config` is a frozen
    dataclass; a lossy pass's (`exact=False`) subclasses `LossyConfig`. The other keywords say where
    the pass may run (see `PassOrder`); a pass that declares none may run anywhere."""
    order = PassOrder(
        needs=_names(name, "needs", needs),
        gives=_names(name, "gives", gives),
        takes=_names(name, "takes", takes),
        before=_names(name, "before", before),
        after=_names(name, "after", after),
        last=last,
        cleanup=cleanup,
        why=why,
    )
    if order.last and order.cleanup:
        raise TypeError(f"pass {name!r}: a cleanup pass may follow anything, so it cannot also be last")
    if not dataclasses.is_dataclass(config) or not config.__dataclass_params__.frozen:
        raise TypeError(f"pass {name!r}: config {config.__name__} must be a frozen dataclass")
    if not exact and not issubclass(config, LossyConfig):
        raise TypeError(
            f"pass {name!r} is lossy (exact=False): its config {config.__name__} must subclass "
            "optpipe.registry.LossyConfig, whose min-sqnr / min-cosine are the budget it is verified against"
        )

    def wrap(fn):
        doc = (fn.__doc__ or "").strip()
        _PASSES[name] = PassInfo(name, fn, config, exact, summary or doc.split("\n")[0], doc, fn.__module__, order)
        return fn

    return wrap


def _names(pass_name: str, what: str, names) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"pass {pass_name!r}: {what} must be names (strings), got {names!r}")
    return names


HOOKS = {
    "save": "fn(program, folder): write the pass's own files into an OUT folder being written",
    "length_advice": "fn(n) -> list[str]: what the pass would say about a program at sequence length n",
    "break_even": "fn() -> dict[str, int]: per option value (e.g. attention kind), the length below which it is slower",
}
"""What a pass module may offer the core besides the rewrite itself (`@register_hook(pass, name)`)."""
_HOOKS: dict[tuple[str, str], Callable] = {}


def register_hook(pass_name: str, hook: str):
    """Decorator registering `fn` as pass `pass_name`'s `hook` (one of HOOKS)."""
    if hook not in HOOKS:
        raise ValueError(f"unknown pass hook {hook!r}; one of {', '.join(HOOKS)}")

    def wrap(fn):
        _HOOKS[(pass_name, hook)] = fn
        return fn

    return wrap


def get_hook(pass_name: str, hook: str) -> Callable | None:
    """Pass `pass_name`'s `hook`, loading the pass's module; None if the pass offers none."""
    get_pass(pass_name)
    return _HOOKS.get((pass_name, hook))


def load_op_modules() -> None:
    for name in OP_MODULES:
        importlib.import_module(name)


def register_target(name: str, target_cls):
    _TARGETS[name] = target_cls
    return target_cls


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for group in ("optpipe.passes", "optpipe.targets"):
        for ep in importlib.metadata.entry_points(group=group):
            try:
                ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plugin must not take the tool down
                import warnings

                warnings.warn(f"optpipe: plugin {ep.name!r} ({ep.value}) failed to load: {e}", stacklevel=2)


def pass_names() -> list[str]:
    _load_plugins()
    return sorted(set(BUILTIN_PASSES) | set(_PASSES))


def get_pass(name: str) -> PassInfo:
    if name not in _PASSES and name in BUILTIN_PASSES:
        importlib.import_module(BUILTIN_PASSES[name])
    if name not in _PASSES:
        _load_plugins()
    if name not in _PASSES:
        raise UsageError(f"unknown pass {name!r}", suggest(name, pass_names(), "passes"))
    return _PASSES[name]


def all_passes() -> list[PassInfo]:
    return [get_pass(n) for n in pass_names()]


def target_names() -> list[str]:
    _load_plugins()
    return sorted(set(BUILTIN_TARGETS) | set(_TARGETS))


def get_target(name: str):
    if name not in _TARGETS and name in BUILTIN_TARGETS:
        importlib.import_module(BUILTIN_TARGETS[name])
    if name not in _TARGETS:
        _load_plugins()
    if name not in _TARGETS:
        raise UsageError(f"unknown target {name!r}", suggest(name, target_names(), "targets"))
    return _TARGETS[name]()


def suggest(name: str, choices, what: str) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    listing = ", ".join(sorted(choices))
    return f"did you mean {close[0]!r}? {what}: {listing}" if close else f"{what}: {listing}"
