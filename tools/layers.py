"""Checks that keep the tree readable, run by `make lint` (and by tests/test_layers.py):

- the import-linter contracts of pyproject.toml (layers: core, runtime, passes, targets; no cycles),
  run on a view of the package as it is installed (`passes/` and `targets/` live at the top of the
  repository but are installed as `optpipe.passes` / `optpipe.targets`, which import-linter's
  scanner cannot see through setuptools' package-dir mapping);
- no private name used across modules: `from optpipe.x import _y`, `import optpipe.x as m; m._y`;
- no function longer than MAX_FUNCTION_LINES.

    python tools/layers.py            # all checks; exit 1 on any finding
    python tools/layers.py --report   # the numbers behind them (files, largest file, cycles, ...)
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {"optpipe": REPO / "optpipe", "optpipe.passes": REPO / "passes", "optpipe.targets": REPO / "targets"}
CHECKED_DIRS = ("optpipe", "passes", "targets", "tests", "examples", "benchmarks", "tools")
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


# -- module names ------------------------------------------------------------------------------------
def package_modules() -> dict[str, Path]:
    """Installed module name -> file, for optpipe and its mapped subpackages."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if package == "optpipe" and rel.parts[0] in ("passes", "targets"):
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def source_files() -> Iterator[Path]:
    for name in CHECKED_DIRS:
        yield from sorted((REPO / name).rglob("*.py"))


def _module_of(path: Path, modules: dict[str, Path]) -> str | None:
    for name, p in modules.items():
        if p == path:
            return name
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


# -- private names across modules ------------------------------------------------------------------------
def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports() -> list[Finding]:
    """Private names one module takes from another project module (tests, examples included)."""
    modules = package_modules()
    project = set(modules) | {"examples", "tests", "benchmarks"}
    findings = []
    for path in source_files():
        tree = ast.parse(path.read_text(), str(path))
        importer = _module_of(path, modules)
        aliases: dict[str, str] = {}  # local name -> project module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(importer, path.name == "__init__.py", node)
                if source.split(".")[0] not in {p.split(".")[0] for p in project}:
                    continue
                for alias in node.names:
                    if _private(alias.name) and f"{source}.{alias.name}" not in modules:
                        findings.append(Finding(_rel(path), node.lineno, f"imports private {source}.{alias.name}"))
                    elif f"{source}.{alias.name}" in modules or source.startswith(("tests", "examples")):
                        aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in {"optpipe", "tests", "examples"}:
                        aliases[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and _private(node.attr)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and aliases[node.value.id] != importer
            ):
                findings.append(Finding(_rel(path), node.lineno, f"uses private {aliases[node.value.id]}.{node.attr}"))
    return findings


# -- long functions -----------------------------------------------------------------------------------------
def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[Finding]:
    findings = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    findings.append(Finding(_rel(path), node.lineno, f"{node.name} is {lines} lines (> {limit})"))
    return findings


# -- import-linter -----------------------------------------------------------------------------------------
def installed_view(folder: Path) -> Path:
    """`folder/optpipe` laid out as installed: optpipe/'s files plus passes/ and targets/ inside it."""
    root = folder / "optpipe"
    root.mkdir()
    for entry in (REPO / "optpipe").iterdir():
        os.symlink(entry, root / entry.name)
    os.symlink(REPO / "passes", root / "passes")
    os.symlink(REPO / "targets", root / "targets")
    return folder


def lint_imports() -> int:
    """Run import-linter's contracts (pyproject.toml) on the installed view; its exit code."""
    with tempfile.TemporaryDirectory(prefix="optpipe-layers-") as tmp:
        view = installed_view(Path(tmp))
        env = dict(os.environ, PYTHONPATH=str(view))
        run = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
        cmd = [sys.executable, "-c", run, str(REPO / "pyproject.toml"), "--no-cache"]
        return subprocess.run(cmd, cwd=view, env=env).returncode


def import_graph():
    """grimp's graph of the installed view (function-level imports included)."""
    import grimp

    with tempfile.TemporaryDirectory(prefix="optpipe-layers-") as tmp:
        view = installed_view(Path(tmp))
        sys.path.insert(0, str(view))
        saved = {k: v for k, v in sys.modules.items() if k == "optpipe" or k.startswith("optpipe.")}
        try:
            for k in saved:
                del sys.modules[k]
            return grimp.build_graph("optpipe", cache_dir=None)
        finally:
            sys.path.remove(str(view))
            sys.modules.update(saved)


def module_cycles(graph) -> list[list[str]]:
    """Import cycles between modules (strongly connected groups of more than one module)."""
    import networkx as nx

    g = nx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            g.add_edge(module, imported)
    return [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def report() -> dict:
    core = sorted((REPO / "optpipe").glob("*.py"))
    every = list(source_files())
    sizes = sorted(((len(p.read_text().splitlines()), _rel(p)) for p in every if "tests" not in p.parts), reverse=True)
    return {
        "optpipe/ top-level modules": len(core),
        "largest file": f"{sizes[0][1]} ({sizes[0][0]} lines)",
        "functions over 80 lines": len(long_functions()),
        "import cycles": len(module_cycles(import_graph())),
        "cross-module private imports": len(private_imports()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="print the numbers, check nothing")
    args = parser.parse_args(argv)
    if args.report:
        for key, value in report().items():
            print(f"{key}: {value}")
        return 0
    findings = private_imports() + long_functions()
    for f in findings:
        print(f)
    cycles = module_cycles(import_graph())
    for c in cycles:
        print(f"import cycle: {' <-> '.join(c)}")
    contracts = lint_imports()
    return 1 if findings or cycles or contracts else 0


if __name__ == "__main__":
    sys.exit(main())
