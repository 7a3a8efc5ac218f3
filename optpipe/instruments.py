"""Instruments: hooks around every pass (TVM's PassContext instruments, MLIR's IR printing).

- `DumpIR(dir)`: NNN_<pass>.before.py / .after.py / .diff for every pass.
- `PrintAfterChange(stream)`: prints the graph code after a pass only when its hash changed.
- `PassTiming(stream)`: one line per pass with its wall time and stats.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import sys
from typing import TextIO


def graph_code(gm) -> str:
    return gm.code.strip() + "\n"


def graph_hash(gm) -> str:
    return hashlib.sha256(graph_code(gm).encode()).hexdigest()[:16]


class Instrument:
    def before_pass(self, index: int, spec, program) -> None:
        pass

    def after_pass(self, index: int, spec, program, record) -> None:
        pass


class DumpIR(Instrument):
    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self._before: str | None = None

    def before_pass(self, index, spec, program):
        os.makedirs(self.directory, exist_ok=True)
        self._before = graph_code(program.gm)

    def after_pass(self, index, spec, program, record):
        stem = os.path.join(self.directory, f"{index:03d}_{spec.name}")
        after = graph_code(program.gm)
        with open(stem + ".before.py", "w") as f:
            f.write(self._before or "")
        with open(stem + ".after.py", "w") as f:
            f.write(after)
        with open(stem + ".diff", "w") as f:
            f.writelines(
                difflib.unified_diff(
                    (self._before or "").splitlines(True),
                    after.splitlines(True),
                    f"{index:03d}_{spec.name}.before.py",
                    f"{index:03d}_{spec.name}.after.py",
                )
            )


class PrintAfterChange(Instrument):
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self._hash = None

    def before_pass(self, index, spec, program):
        self._hash = graph_hash(program.gm)

    def after_pass(self, index, spec, program, record):
        if graph_hash(program.gm) != self._hash:
            print(f"// ----- IR after {spec} -----", file=self.stream)
            print(graph_code(program.gm), file=self.stream)


class PassTiming(Instrument):
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr

    def after_pass(self, index, spec, program, record):
        stats = ", ".join(f"{k}={v}" for k, v in record.stats.items())
        print(f"  {index:03d} {spec.name:<20} {record.seconds * 1000:9.1f} ms  {stats}", file=self.stream)
