"""Named presets (`--preset NAME`) and TOML recipes (`--recipe FILE`), both expanding to pipelines.

A recipe file:

    pipeline = "fuse-attention,dce"        # either a pipeline string ...
    target = "cpu"                         # optional defaults for the CLI
    mode = "eager"                         # the target's options: mode (torch), tune (tvm trials)
    budget = { sqnr = 20 }

    [[passes]]                             # ... or a list of passes with their options
    name = "fuse-attention"
"""

from __future__ import annotations

import os

import tomllib

from .errors import UsageError
from .registry import suggest

PRESETS: dict[str, tuple[str, str]] = {
    "canonicalize": ("fuse-attention,cse,dce", "canonical SDPA attention, shared subexpressions, no dead code"),
    "long-context": (
        "fuse-attention,attention{kind=sliding-window,window=256,layers=1:-1},dce",
        "sliding-window attention in all but the first and last layers",
    ),
}


def register_preset(name: str, pipeline: str, description: str) -> None:
    PRESETS[name] = (pipeline, description)


def preset_pipeline(name: str) -> str:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}", suggest(name, PRESETS, "presets"))
    return PRESETS[name][0]


def load_recipe(path: str | os.PathLike) -> dict:
    """Returns {"pipeline": str, "target": str|None, "budget": dict, "target_options": dict}."""
    from .pipeline_text import format_value

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"recipe {path}: no such file", 'give a TOML file with `pipeline = "..."`')
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"recipe {path}: not valid TOML ({e})", "see `optpipe optimize --help`") from None
    pipeline = data.get("pipeline")
    passes = data.get("passes")
    if bool(pipeline) == bool(passes):
        raise UsageError(
            f'recipe {path}: give exactly one of `pipeline = "..."` or `[[passes]]` tables',
            'e.g. pipeline = "fuse-attention,dce"',
        )
    if passes:
        parts = []
        for i, p in enumerate(passes):
            if not isinstance(p, dict) or "name" not in p:
                raise UsageError(f"recipe {path}: passes[{i}] has no name", 'each [[passes]] needs name = "..."')
            opts = {k: v for k, v in p.items() if k != "name"}
            body = ",".join(f"{k}={format_value(v)}" for k, v in opts.items())
            parts.append(f"{p['name']}{{{body}}}" if body else p["name"])
        pipeline = ",".join(parts)
    if not isinstance(pipeline, str):
        raise UsageError(f"recipe {path}: pipeline must be a string", 'e.g. pipeline = "fuse-attention,dce"')
    options = {k: data[k] for k in ("mode", "tune") if k in data}
    if "mode" in options and options["mode"] not in ("auto", "eager", "compile"):
        raise UsageError(
            f"recipe {path}: mode must be auto, eager or compile, got {options['mode']!r}", 'e.g. mode = "eager"'
        )
    if "tune" in options and (not isinstance(options["tune"], int) or options["tune"] < 0):
        raise UsageError(f"recipe {path}: tune must be a number of trials >= 0", "e.g. tune = 64")
    return {
        "pipeline": pipeline,
        "target": data.get("target"),
        "budget": data.get("budget") or {},
        "target_options": options,
    }
