"""The pipeline language: `pass{opt=value,...},pass,...` (MLIR-style), parsed and printed.

    fuse-attention,attention{kind=sliding-window,window=256,layers=2:},kv-cache{max-len=2048}

Values are typed by the pass's config dataclass: int, float, bool (true/false), str, Literal
choices, tuples (`[a,b]`) and classes with a `parse(str)` classmethod. Printing is canonical:
options in config field order, defaults left out, so `str(parse(s)) == s` for canonical `s`.
Errors show the text with a caret under the offending column and suggest the nearest name.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from typing import Any

from .errors import UsageError
from .registry import PassInfo, config_fields, get_pass, pass_names

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


class PipelineSyntaxError(UsageError):
    def __init__(self, text: str, column: int, message: str, hint: str | None = None):
        self.text, self.column = text, column
        caret = " " * column + "^"
        super().__init__(f"{message} at column {column + 1}:\n  {text}\n  {caret}", hint)

    def one_line(self) -> str:  # the caret needs its own lines; keep them
        head, rest = self.message.split("\n", 1)
        out = f"{head}\n{rest}"
        return f"{out}\n  hint: {self.hint}" if self.hint else out


@dataclass(frozen=True)
class RawElement:
    name: str
    options: tuple[tuple[str, str, int, int], ...]  # (key, raw value, key column, value column)
    column: int


def tokenize_elements(text: str) -> list[RawElement]:
    """Split `text` into pass elements with their raw (untyped) option strings."""
    elements, i, n = [], 0, len(text)

    def skip_ws(j):
        while j < n and text[j].isspace():
            j += 1
        return j

    def expect_name(j, what):
        m = _NAME.match(text, j)
        if not m:
            raise PipelineSyntaxError(text, j, f"expected {what}")
        return m.group(0), m.end()

    i = skip_ws(i)
    if i >= n:
        raise PipelineSyntaxError(text, 0, "empty pipeline", "e.g. fuse-attention,dce")
    while True:
        start = i
        name, i = expect_name(i, "a pass name")
        options = []
        i = skip_ws(i)
        if i < n and text[i] == "{":
            i = skip_ws(i + 1)
            while True:
                if i < n and text[i] == "}" and not options:
                    i += 1
                    break
                kstart = i
                key, i = expect_name(i, "an option name")
                i = skip_ws(i)
                if i >= n or text[i] != "=":
                    raise PipelineSyntaxError(text, i, f"expected '=' after option {key!r}")
                i = skip_ws(i + 1)
                vstart = i
                value, i = _scan_value(text, i)
                options.append((key, value, kstart, vstart))
                i = skip_ws(i)
                if i < n and text[i] == ",":
                    i = skip_ws(i + 1)
                    continue
                if i < n and text[i] == "}":
                    i += 1
                    break
                raise PipelineSyntaxError(
                    text, i, f"expected ',' or '}}' in options of {name!r}" if i < n else f"unclosed '{{' of {name!r}"
                )
        elements.append(RawElement(name, tuple(options), start))
        i = skip_ws(i)
        if i >= n:
            return elements
        if text[i] != ",":
            raise PipelineSyntaxError(text, i, "expected ',' between passes")
        i = skip_ws(i + 1)


def _scan_value(text: str, i: int) -> tuple[str, int]:
    n = len(text)
    if i < n and text[i] in "\"'":
        quote, j = text[i], i + 1
        while j < n and text[j] != quote:
            j += 1
        if j >= n:
            raise PipelineSyntaxError(text, i, "unterminated string")
        return text[i + 1 : j], j + 1
    if i < n and text[i] == "[":
        j = text.find("]", i)
        if j < 0:
            raise PipelineSyntaxError(text, i, "unclosed '['")
        return text[i : j + 1], j + 1
    j = i
    while j < n and text[j] not in ",{}[]" and not text[j].isspace():
        j += 1
    if j == i:
        raise PipelineSyntaxError(text, i, "expected a value")
    return text[i:j], j


# -- typed values ----------------------------------------------------------------------------------


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def convert_value(raw: str, tp) -> Any:
    """Convert the raw option string `raw` to type `tp`; ValueError with a readable reason."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert_value(raw, a)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"bad value {raw!r}")
    if origin is typing.Literal:
        if raw in [str(a) for a in args]:
            return next(a for a in args if str(a) == raw)
        close = difflib.get_close_matches(raw, [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"expected one of {', '.join(map(str, args))}{hint}")
    if origin in (tuple, list):
        inner = args[0] if args else str
        body = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
        items = [s.strip() for s in body.split(",") if s.strip()]
        return tuple(convert_value(s, inner) for s in items)
    if tp is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
    if tp is str:
        return raw
    if hasattr(tp, "parse"):
        return tp.parse(raw)
    raise ValueError(f"unsupported option type {tp}")


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, float) and v.is_integer():
        return repr(v)
    s = str(v)
    if s.startswith("[") and s.endswith("]") and s.count("[") == 1 and not any(c in s for c in "{} "):
        return s  # a bracketed list (e.g. a LayerSelection) reads back unquoted
    return f'"{s}"' if any(c in s for c in ",{}[] ") else s


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@dataclass(frozen=True)
class PassSpec:
    """One configured pass of a pipeline."""

    info: PassInfo
    config: Any

    @property
    def name(self) -> str:
        return self.info.name

    def options(self) -> dict[str, Any]:
        """Non-default options in option order (`config_fields`: a lossy budget last), kebab-case keys."""
        out = {}
        for f in config_fields(self.config):
            value = getattr(self.config, f.name)
            if value != _default(f):
                out[f.name.replace("_", "-")] = value
        return out

    def __str__(self) -> str:
        opts = self.options()
        if not opts:
            return self.name
        return self.name + "{" + ",".join(f"{k}={format_value(v)}" for k, v in opts.items()) + "}"

    def config_dict(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): _jsonable(getattr(self.config, f.name)) for f in config_fields(self.config)}


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return str(v)


def build_config(info: PassInfo, options: dict[str, Any], *, text: str = "", columns=None):
    """Instantiate `info`'s config from kebab-case options with raw-string or typed values."""
    fields = {f.name: f for f in dataclasses.fields(info.config_cls) if f.init}
    types = _field_types(info.config_cls)
    kwargs = {}
    columns = columns or {}
    for key, value in options.items():
        attr = key.replace("-", "_")
        key_col, value_col = columns.get(key, (0, 0))
        if attr not in fields:
            names = [k.replace("_", "-") for k in fields]
            close = difflib.get_close_matches(key, names, n=1)
            hint = (f"did you mean {close[0]!r}? " if close else "") + (
                f"options of {info.name}: {', '.join(names)}" if names else f"{info.name} takes no options"
            )
            if text:
                raise PipelineSyntaxError(text, key_col, f"unknown option {key!r} of pass {info.name!r}", hint)
            raise UsageError(f"unknown option {key!r} of pass {info.name!r}", hint)
        try:
            kwargs[attr] = convert_value(value, types[attr]) if isinstance(value, str) else value
        except ValueError as e:
            msg = f"bad value {value!r} for option {key!r} of {info.name}: {e}"
            if text:
                raise PipelineSyntaxError(text, value_col, msg, f"see `optpipe passes {info.name}`") from None
            raise UsageError(msg, f"see `optpipe passes {info.name}`") from None
    try:
        return info.config_cls(**kwargs)
    except (ValueError, TypeError) as e:
        if text:
            raise PipelineSyntaxError(
                text,
                columns.get("", (0, 0))[0],
                f"invalid options for {info.name}: {e}",
                f"see `optpipe passes {info.name}`",
            ) from None
        raise UsageError(f"invalid options for {info.name}: {e}", f"see `optpipe passes {info.name}`") from None


def parse_pipeline(text: str) -> list[PassSpec]:
    specs = []
    for el in tokenize_elements(text):
        try:
            info = get_pass(el.name)
        except UsageError as e:
            raise PipelineSyntaxError(text, el.column, f"unknown pass {el.name!r}", e.hint) from None
        seen = set()
        for key, _, kcol, _ in el.options:
            if key in seen:
                raise PipelineSyntaxError(text, kcol, f"option {key!r} given twice")
            seen.add(key)
        columns = {k: (kc, vc) for k, _, kc, vc in el.options}
        columns[""] = (el.column, el.column)
        config = build_config(info, {k: v for k, v, _, _ in el.options}, text=text, columns=columns)
        specs.append(PassSpec(info, config))
    return specs


def format_pipeline(specs) -> str:
    return ",".join(str(s) for s in specs)


__all__ = ["PassSpec", "PipelineSyntaxError", "build_config", "format_pipeline", "parse_pipeline", "pass_names"]
