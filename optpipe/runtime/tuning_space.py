"""What `optpipe tune` searches and what it must keep: the quality budget, the search space of
pipelines (attention form x pruning x quantization x the target's mode) and the static rules that
rule candidates out before anything is measured.

A candidate is a flat dict of choices (what Optuna samples), e.g.

    {"attention": "sliding-window", "window": 256, "layers": "1:-1", "prune": 0.25,
     "quantize": "int8-dynamic", "mode": "eager"}

and `pipeline_of(candidate)` turns it into the pipeline text `optimize` runs, always in the order
fuse-attention, attention, prune, quantize, dce (the order the passes' declarations allow).

A space file (`--space FILE.toml`) lists the choices per dimension; a dimension left out keeps its
default, a single value pins it:

    attention = ["dense", "sliding-window", "linear"]
    window = [128, 256]
    layers = [":", "1:-1"]
    prune = [0.0, 0.25]
    quantize = ["none", "int8-dynamic"]
    mode = ["eager", "compile"]
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import tomllib

from ..errors import UsageError

NO_PASSES = "dce"
"""The pipeline of the baseline: what `optimize` runs when no pass is chosen (it only drops dead
code), so that the baseline, too, is an OUT folder that `optimize --recipe` reproduces."""

QUALITY_KEYS = {"ppl": "ppl", "cosine": "cosine", "top1": "top1_agreement"}
"""Budget key -> the key of `evaluation.score`'s quality dict it judges."""
_BUDGET_FORM = "ppl=+3%, cosine=0.99 or top1=0.95"


@dataclass(frozen=True)
class QualityBudget:
    """The quality a recommended pipeline must keep, against the unoptimized model on the same data.

    `ppl`: the largest relative perplexity increase (0.03 for `ppl=+3%`); `cosine`, `top1`: the
    smallest embedding cosine / next-token top-1 agreement to the reference."""

    ppl: float | None = None
    cosine: float | None = None
    top1: float | None = None

    @classmethod
    def parse(cls, items: Sequence[str] | str) -> QualityBudget:
        items = [items] if isinstance(items, str) else list(items)
        values: dict[str, float] = {}
        for part in (p.strip() for item in items for p in item.split(",") if p.strip()):
            key, _, raw = part.partition("=")
            key, raw = key.strip().lower(), raw.strip()
            if key not in QUALITY_KEYS or not raw:
                raise UsageError(f"bad --budget {part!r}", f"use {_BUDGET_FORM}")
            try:
                values[key] = _percent(raw) if key == "ppl" else float(raw)
            except ValueError:
                raise UsageError(f"bad --budget value {raw!r} for {key}", f"use {_BUDGET_FORM}") from None
            if key != "ppl" and not 0 < values[key] <= 1:
                raise UsageError(f"--budget {key}={raw} is outside (0, 1]", f"e.g. {key}=0.99")
            if key == "ppl" and values[key] < 0:
                raise UsageError(f"--budget ppl={raw} is a decrease", "give the increase you accept, e.g. ppl=+3%")
        if not values:
            raise UsageError("tune needs a quality budget", f"e.g. --budget {_BUDGET_FORM}")
        return cls(**values)

    def names(self) -> list[str]:
        return [k for k in QUALITY_KEYS if getattr(self, k) is not None]

    def loss(self, quality: Mapping, baseline: Mapping) -> float:
        """One number to minimise for the first budget key: the relative perplexity increase, or
        1 - cosine / 1 - top-1 agreement (0: as good as the reference)."""
        key = self.names()[0]
        return _loss(key, quality, baseline)

    def slack(self, quality: Mapping, baseline: Mapping) -> float:
        """How far the candidate is past its budget, worst key first (<= 0: within budget). The unit
        of every key is its loss (relative ppl increase, 1 - cosine, 1 - top1)."""
        return max(_loss(k, quality, baseline) - self.allowance(k) for k in self.names())

    def allowance(self, key: str) -> float:
        value = getattr(self, key)
        return value if key == "ppl" else 1.0 - value

    def violations(self, quality: Mapping, baseline: Mapping) -> list[str]:
        out = []
        for key in self.names():
            if _loss(key, quality, baseline) > self.allowance(key) + 1e-12:
                out.append(f"{key} {_describe(key, quality, baseline)} is outside the budget {self.text(key)}")
        return out

    def text(self, key: str | None = None) -> str:
        keys = [key] if key else self.names()
        return ",".join(f"ppl=+{self.ppl * 100:g}%" if k == "ppl" else f"{k}={getattr(self, k):g}" for k in keys)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.names()}


def _percent(raw: str) -> float:
    raw = raw.lstrip("+")
    return float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)


def _loss(key: str, quality: Mapping, baseline: Mapping) -> float:
    if key == "ppl":
        ppl, base = quality.get("ppl"), baseline.get("ppl")
        if ppl is None or base is None:
            raise UsageError("the budget names ppl, but this model has no perplexity", "use --budget cosine=0.99")
        return ppl / base - 1.0 if math.isfinite(ppl) else math.inf
    value = quality.get(QUALITY_KEYS[key])
    if value is None:
        hint = "use --budget ppl=+3% or top1=0.95" if key == "cosine" else "use --budget cosine=0.99"
        raise UsageError(f"the budget names {key}, but the evaluation of this model gives none", hint)
    return 1.0 - value


def _describe(key: str, quality: Mapping, baseline: Mapping) -> str:
    if key == "ppl":
        return f"{quality['ppl']:.4g} ({(quality['ppl'] / baseline['ppl'] - 1) * 100:+.2f}%)"
    return f"{quality[QUALITY_KEYS[key]]:.4f}"


# -- the space -------------------------------------------------------------------------------------
ATTENTION_KINDS = ("dense", "sliding-window", "block-sparse", "linear")
QUANT_SCHEMES = ("none", "int8-dynamic", "int8-static", "int8-weight", "int4-weight")
MODES = {"cpu": ("eager", "compile"), "cuda": ("eager", "compile"), "tvm": ("0",), "tvm-cuda": ("0",)}


@dataclass(frozen=True)
class SearchSpace:
    """The choices per dimension. `window` applies to sliding-window, `block` to block-sparse,
    `layers` to every attention kind but dense; `mode` is the target's (torch: eager / compile;
    tvm: MetaSchedule trials; onnxruntime: one)."""

    attention: tuple[str, ...] = ("dense", "sliding-window", "linear")
    window: tuple[int, ...] = (64, 256)
    block: tuple[int, ...] = (64,)
    layers: tuple[str, ...] = (":", "1:-1")
    prune: tuple[float, ...] = (0.0, 0.25, 0.5)
    quantize: tuple[str, ...] = ("none", "int8-dynamic")
    mode: tuple[str, ...] = ("default",)

    @classmethod
    def default(cls, target: str) -> SearchSpace:
        return cls(mode=MODES.get(target, ("default",)))

    @classmethod
    def from_toml(cls, path: str | os.PathLike, target: str) -> SearchSpace:
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise UsageError(f"space file {path}: no such file", "give a TOML file, e.g. prune = [0.0, 0.25]") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"space file {path}: not valid TOML ({e})", "e.g. prune = [0.0, 0.25]") from None
        return cls.default(target).replaced(data, where=f"space file {path}")

    def replaced(self, data: Mapping, where: str = "space") -> SearchSpace:
        names = [f.name for f in dataclasses.fields(self)]
        changes = {}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in names:
                raise UsageError(f"{where}: unknown dimension {key!r}", f"dimensions: {', '.join(names)}")
            values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
            if not values:
                raise UsageError(f"{where}: {key} lists no choice", f"e.g. {key} = {list(getattr(self, name))!r}")
            changes[name] = tuple(_check_choice(name, v, where) for v in values)
        return dataclasses.replace(self, **changes)

    def dimensions(self) -> dict[str, tuple]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def has_no_pass(self) -> bool:
        """Whether the space holds the candidate of no pass at all (the baseline)."""
        return "dense" in self.attention and 0.0 in self.prune and "none" in self.quantize

    def distinct(self) -> int:
        """The candidates that differ, counting no pass once whatever the mode (it is the baseline)."""
        return self.size() - (len(self.mode) - 1 if self.has_no_pass() else 0)

    def size(self) -> int:
        """The number of candidates."""
        per_kind = {"dense": 1, "sliding-window": len(self.window), "block-sparse": len(self.block), "linear": 1}
        attention = sum(per_kind[k] * (1 if k == "dense" else len(self.layers)) for k in self.attention)
        return attention * len(self.prune) * len(self.quantize) * len(self.mode)


def _check_choice(name: str, value, where: str):
    allowed = {"attention": ATTENTION_KINDS, "quantize": QUANT_SCHEMES}
    if name in allowed and value not in allowed[name]:
        raise UsageError(f"{where}: {name} = {value!r} is not one of {', '.join(allowed[name])}", "see optpipe tune -h")
    if name in ("window", "block") and (not isinstance(value, int) or value < 1):
        raise UsageError(f"{where}: {name} = {value!r} must be a positive integer", f"e.g. {name} = [64, 256]")
    if name == "prune" and (not isinstance(value, (int, float)) or not 0 <= value < 1):
        raise UsageError(f"{where}: prune = {value!r} must be a sparsity in [0, 1)", "e.g. prune = [0.0, 0.25]")
    if name in ("layers", "mode"):
        return str(value)
    return float(value) if name == "prune" else value


def baseline_candidate(space: SearchSpace) -> dict:
    """No pass at all, on the target's first mode."""
    return {"attention": "dense", "prune": 0.0, "quantize": "none", "mode": space.mode[0]}


def pipeline_of(candidate: Mapping) -> str:
    """The pipeline text of a candidate, in the one order its passes allow."""
    parts = []
    kind = candidate.get("attention", "dense")
    if kind != "dense":
        opts = [f"kind={kind}"]
        if kind == "sliding-window":
            opts.append(f"window={candidate['window']}")
        if kind == "block-sparse":
            opts.append(f"block={candidate['block']}")
        if candidate.get("layers", ":") != ":":
            opts.append(f"layers={candidate['layers']}")
        parts += ["fuse-attention", "attention{" + ",".join(opts) + "}"]
    if candidate.get("prune", 0.0):
        parts.append(f"prune{{target=mlp,sparsity={candidate['prune']:g}}}")
    if candidate.get("quantize", "none") != "none":
        parts.append(f"quantize{{scheme={candidate['quantize']}}}")
    parts.append(NO_PASSES)
    return ",".join(parts)


def target_options(candidate: Mapping, target: str) -> dict:
    mode = candidate.get("mode", "default")
    if mode == "default":
        return {}
    if target.startswith("tvm"):
        return {"tune": int(mode)}
    return {"mode": mode}


def candidate_key(candidate: Mapping) -> str:
    """A canonical text of the choices that matter (a window of dense attention does not)."""
    return pipeline_of(candidate) + f" @ {candidate.get('mode', 'default')}"


def rule_out(
    space: SearchSpace, *, seq_len: int, target: str, break_even: Mapping[str, int]
) -> tuple[SearchSpace, list]:
    """Drop what cannot pay off at the user's shapes before measuring anything: attention kinds
    whose measured break-even length on CPU is above `seq_len`, and windows / blocks that cover the
    whole sequence (they compute dense attention). Returns the space left and one note per rule."""
    notes = []
    kinds = list(space.attention)
    if target == "cpu":
        for kind in list(kinds):
            even = break_even.get(kind)
            if even and seq_len < even:
                kinds.remove(kind)
                notes.append(
                    {
                        "dimension": "attention",
                        "value": kind,
                        "reason": f"below its CPU break-even of ~{even} tokens "
                        f"(seq-len {seq_len}; benchmarks/attention.py)",
                    }
                )
    windows = [w for w in space.window if w < seq_len]
    blocks = [b for b in space.block if 2 * b < seq_len]
    if "sliding-window" in kinds:
        for w in sorted(set(space.window) - set(windows)):
            notes.append({"dimension": "window", "value": w, "reason": f">= seq-len {seq_len}: dense attention"})
        if not windows:
            kinds.remove("sliding-window")
    if "block-sparse" in kinds:
        for b in sorted(set(space.block) - set(blocks)):
            reason = f"2 blocks >= seq-len {seq_len}: dense attention"
            notes.append({"dimension": "block", "value": b, "reason": reason})
        if not blocks:
            kinds.remove("block-sparse")
    kinds = kinds or ["dense"]
    return dataclasses.replace(
        space, attention=tuple(kinds), window=tuple(windows) or space.window[:1], block=tuple(blocks) or space.block[:1]
    ), notes


STATIC_GAIN = 1.03
"""The least FLOP reduction (baseline FLOPs / candidate FLOPs, static model at the user's batch and
sequence length) for an attention form to be measured: below it the form cannot pay off beyond the
noise of a latency measurement."""


@dataclass(frozen=True)
class StaticCost:
    """What the static model (`optpipe.analysis.analyze`) counts for one program at the user's shapes."""

    flops: int
    params: int
    attention_flops: int = 0


def attention_choices(space: SearchSpace) -> list[dict]:
    """One candidate per attention form of the space other than dense, in every layer (the most
    that form can save): its window or block choice included."""
    per_kind = {"sliding-window": ("window", space.window), "block-sparse": ("block", space.block)}
    out = []
    for kind in space.attention:
        if kind == "dense":
            continue
        name, values = per_kind.get(kind, (None, (None,)))
        out += [{"attention": kind, **({name: v} if name else {})} for v in values]
    return out


def rule_out_static(
    space: SearchSpace,
    *,
    objective: str,
    baseline: StaticCost,
    cost_of: Callable[[dict], StaticCost | None],
    shape: str,
) -> tuple[SearchSpace, list]:
    """Drop what the static FLOP / parameter model shows cannot pay off for `objective` at `shape`
    (e.g. "batch 1 x seq-len 2048"): for latency and throughput, attention forms whose FLOPs are
    not at least `STATIC_GAIN` below the baseline's (attention is too small a share at this length,
    or the form computes as much); for size, attention forms and target modes, which do not shrink
    the parameters. `cost_of(candidate)` is the static cost of one attention choice (None: it could
    not be modelled; it is measured). Returns the space left and one note per choice dropped."""
    notes: list[dict] = []
    if objective == "size":
        return _rule_out_for_size(space, baseline, cost_of, notes), notes
    share = baseline.attention_flops / baseline.flops if baseline.flops else 0.0
    dropped = []
    for choice in attention_choices(space):
        cost = cost_of(choice)
        if cost is None or cost.flops <= 0 or baseline.flops / cost.flops >= STATIC_GAIN:
            continue
        dropped.append(choice)
        dim, value = _choice_dimension(choice)
        reason = (
            f"static model: {cost.flops / baseline.flops:.3f}x the baseline's FLOPs at {shape} (attention is "
            f"{share:.1%} of them), short of the {STATIC_GAIN:.2f}x reduction that can pay off"
        )
        notes.append({"dimension": dim, "value": value, "reason": reason})
    return _without(space, dropped), notes


def _rule_out_for_size(space: SearchSpace, baseline: StaticCost, cost_of, notes: list) -> SearchSpace:
    dropped = []
    for choice in attention_choices(space):
        cost = cost_of(choice)
        if cost is not None and cost.params >= baseline.params:
            dropped.append(choice)
            dim, value = _choice_dimension(choice)
            reason = f"static model: {cost.params} parameters (baseline {baseline.params}); the objective is size"
            notes.append({"dimension": dim, "value": value, "reason": reason})
    for mode in space.mode[1:]:
        notes.append({"dimension": "mode", "value": mode, "reason": "the target's mode does not change the size"})
    return dataclasses.replace(_without(space, dropped), mode=space.mode[:1])


def _choice_dimension(choice: Mapping) -> tuple[str, object]:
    for dim in ("window", "block"):
        if dim in choice:
            return dim, choice[dim]
    return "attention", choice["attention"]


def _without(space: SearchSpace, dropped: list[dict]) -> SearchSpace:
    """The space without the dropped attention choices (a kind goes when all its values went)."""
    windows = tuple(w for w in space.window if {"attention": "sliding-window", "window": w} not in dropped)
    blocks = tuple(b for b in space.block if {"attention": "block-sparse", "block": b} not in dropped)
    kinds = [
        k
        for k in space.attention
        if {"attention": k} not in dropped
        and not (k == "sliding-window" and not windows)
        and not (k == "block-sparse" and not blocks)
    ]
    return dataclasses.replace(
        space, attention=tuple(kinds or ["dense"]), window=windows or space.window[:1], block=blocks or space.block[:1]
    )


def describe_space(space: SearchSpace) -> str:
    dims = space.dimensions()
    return "; ".join(f"{k}: {', '.join(str(v) for v in vs)}" for k, vs in dims.items())


def parse_duration(text: str | None) -> float | None:
    """Seconds from `90`, `90s`, `20m`, `1.5h` (None stays None)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise UsageError(f"bad --time-budget {text!r}", "e.g. 90s, 20m or 1.5h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
