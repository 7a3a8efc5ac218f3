"""The target interface. Each backend (one module under targets/) subclasses `Target` and
registers itself with `optpipe.registry.register_target`.

Lowering is two steps: `check` names every node the target cannot take (with its module path and
the pass that introduced it) before any work is done; `compile` builds a runnable artifact, which
`save` writes into OUT and `load` brings back in a fresh process (`optpipe run`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class UnsupportedNode:
    node: str
    op: str
    module_path: str
    introduced_by: str | None

    def __str__(self) -> str:
        origin = f" (introduced by {self.introduced_by})" if self.introduced_by else ""
        return f"{self.op} at {self.module_path or '<top>'} [{self.node}]{origin}"


@dataclass
class Compiled:
    """A program compiled for a target: `fn(*inputs)` runs it; `info` goes into the report."""

    fn: Callable
    info: dict

    def __call__(self, *inputs):
        return self.fn(*inputs)


class Target:
    name: str = ""
    artifact: str | None = None
    """File or folder the target writes into OUT, besides program.pt2 (None: the program is it)."""

    def check(self, program) -> list[UnsupportedNode]:
        return []

    def compile(self, program, **options: Any) -> Compiled:
        raise NotImplementedError

    def save(self, compiled: Compiled, out_dir: str) -> None:
        pass

    def load(self, out_dir: str, program) -> Compiled:
        raise NotImplementedError

    def prepare_inputs(self, inputs: tuple) -> tuple:
        return inputs
