"""The shape of the code, measured from its AST: import cycles, function-local imports, long functions, module sizes.

The thresholds below are what the code has reached (issue 22); lower them as the code improves, never raise
them without saying why in the commit. `python -m tests.test_structure` prints the whole report.

Counted over the modules of `lslo/` and `lslo_kernels/`:
- an import cycle counts function-local imports too (a deferred import still ties the two modules);
- a function-local import of the project's own modules must carry a one-line comment (on its line or the line
  above) saying why it is deferred: CLI start-up time or an optional dependency;
- a function's length runs from its `def` to its last line, docstring included.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lslo", "lslo_kernels")

# Reached by issue 22's layout work (before it: 7 modules in one cycle, 83 local imports none commented, 12 long
# functions, analysis.py 1,642 lines). The targets: no cycle, <= ~30 local imports each with a comment,
# <= 6 functions over 80 lines, no module over ~900 lines. Three are met; what is left: the 4 local imports that
# defer lslo.evaluate (transformers, sacrebleu), lslo.serve (optional extra) and lslo.demo.run for CLI start-up,
# the two long Triton kernels (_expand_kernel, _fused_forward_kernel), the 3 kernel/body pairs still written twice,
# and lslo_kernels/triton_kernels.py (1,349 lines): its split into a kernels module reloaded by the launchers' module
# left kernels and their @triton.jit helpers built in different modes after a mode switch (interpreted kernels
# calling compiled helpers), so it was undone until the split reloads them as one.
MAX_CYCLIC_MODULES = 0
MAX_LOCAL_IMPORTS = 4
MAX_UNCOMMENTED_LOCAL_IMPORTS = 0
MAX_LONG_FUNCTIONS = 2
LONG_FUNCTION_LINES = 80
MAX_MODULE_LINES = 1349


@dataclass(frozen=True)
class Import:
    """One import of a project module: who imports, what, where, and whether it sits inside a function."""

    importer: str
    target: str
    line: int
    local: bool
    commented: bool


@dataclass
class Report:
    """Everything the tests assert on, for all modules of PACKAGES."""

    module_lines: dict[str, int] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)
    long_functions: list[tuple[str, str, int]] = field(default_factory=list)  # (module, qualified name, lines)

    @property
    def local_imports(self) -> list[Import]:
        return [imp for imp in self.imports if imp.local]

    def cycles(self) -> list[list[str]]:
        """Strongly connected components of more than one module in the import graph (local imports included)."""
        graph: dict[str, set[str]] = {name: set() for name in self.module_lines}
        for imp in self.imports:
            if imp.target != imp.importer:
                graph[imp.importer].add(imp.target)
        return [sorted(c) for c in _strongly_connected(graph) if len(c) > 1]


def _module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _resolve(node: ast.ImportFrom | ast.Import, importer: str, is_package: bool, modules: set[str]) -> list[str]:
    """Project modules that an import statement loads (names imported from a package that are modules count)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in modules]
    if node.level:
        base = importer.split(".")
        if not is_package:
            base.pop()
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    targets = []
    for alias in node.names:
        if f"{prefix}.{alias.name}" in modules:
            targets.append(f"{prefix}.{alias.name}")
        elif prefix in modules and not _is_extension(prefix, alias.name):
            targets.append(prefix)
    return sorted(set(targets))


def _is_extension(package: str, name: str) -> bool:
    """`from lslo_kernels import _C`: a compiled module, not a name defined by the package's `__init__`."""
    return any((ROOT.joinpath(*package.split("."))).glob(f"{name}.*.so")) or any(
        (ROOT.joinpath(*package.split("."))).glob(f"{name}.*.pyd")
    )


def _has_comment(lines: list[str], line: int) -> bool:
    here = lines[line - 1]
    above = lines[line - 2].strip() if line >= 2 else ""
    return "#" in here or above.startswith("#")


@dataclass
class _Module:
    """One module being measured: its name, whether it is a package's __init__, its lines."""

    name: str
    is_package: bool
    lines: list[str]


def _visit(node: ast.AST, module: _Module, names: set[str], report: Report, scope: list[str], in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            for target in _resolve(child, module.name, module.is_package, names):
                commented = _has_comment(module.lines, child.lineno)
                report.imports.append(Import(module.name, target, child.lineno, in_function, commented))
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = child.end_lineno - child.lineno + 1
            if length > LONG_FUNCTION_LINES:
                report.long_functions.append((module.name, ".".join([*scope, child.name]), length))
            _visit(child, module, names, report, [*scope, child.name], True)
        elif isinstance(child, ast.ClassDef):
            _visit(child, module, names, report, [*scope, child.name], in_function)
        else:
            _visit(child, module, names, report, scope, in_function)


def measure() -> Report:
    """Parse every module of PACKAGES and measure it."""
    files = _module_files()
    names = set(files)
    report = Report()
    for name, path in files.items():
        text = path.read_text(encoding="utf-8")
        module = _Module(name, path.name == "__init__.py", text.splitlines())
        report.module_lines[name] = len(module.lines)
        _visit(ast.parse(text, filename=str(path)), module, names, report, [], False)
    return report


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative enough for a few dozen modules: recursion depth is the module count)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def format_report(report: Report) -> str:
    local = report.local_imports
    out = [
        f"modules: {len(report.module_lines)}, lines: {sum(report.module_lines.values())}",
        f"import cycles (local imports included): {report.cycles() or 'none'}",
        f"function-local project imports: {len(local)} ({sum(not i.commented for i in local)} without a comment)",
    ]
    per_module: dict[str, int] = {}
    for imp in local:
        per_module[imp.importer] = per_module.get(imp.importer, 0) + 1
    out += [f"  {module}: {count}" for module, count in sorted(per_module.items(), key=lambda kv: -kv[1])]
    out.append(f"functions over {LONG_FUNCTION_LINES} lines: {len(report.long_functions)}")
    out += [f"  {m}.{f}: {n}" for m, f, n in sorted(report.long_functions, key=lambda t: -t[2])]
    big = sorted(((n, m) for m, n in report.module_lines.items() if n > 900), reverse=True)
    out.append(f"modules over 900 lines: {len(big)}")
    out += [f"  {m}: {n}" for n, m in big]
    return "\n".join(out)


# --- tests ---------------------------------------------------------------------------------------------------------


def test_measure_sees_a_known_cycle_and_local_import(tmp_path, monkeypatch):
    # The measure itself: two modules importing each other, one of them inside a function without a comment;
    # an extension module (`_C`) imported from the package is not an edge to the package.
    package = tmp_path / "lslo"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (package / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    (package / "c.py").write_text("from . import _C  # compiled\n")
    (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("lslo",))
    measured = measure()
    assert measured.cycles() == [["lslo.a", "lslo.b"]]
    assert [(i.importer, i.target, i.commented) for i in measured.local_imports] == [("lslo.b", "lslo.a", False)]
    assert not [i for i in measured.imports if i.importer == "lslo.c"]


@pytest.fixture(scope="module")
def report() -> Report:
    return measure()


def test_import_cycles(report):
    cyclic = sum(len(c) for c in report.cycles())
    assert cyclic <= MAX_CYCLIC_MODULES, format_report(report)


def test_function_local_imports(report):
    local = report.local_imports
    assert len(local) <= MAX_LOCAL_IMPORTS, format_report(report)
    uncommented = [f"{i.importer}:{i.line} -> {i.target}" for i in local if not i.commented]
    assert len(uncommented) <= MAX_UNCOMMENTED_LOCAL_IMPORTS, uncommented


def test_long_functions(report):
    assert len(report.long_functions) <= MAX_LONG_FUNCTIONS, format_report(report)


def test_module_sizes(report):
    assert max(report.module_lines.values()) <= MAX_MODULE_LINES, format_report(report)


if __name__ == "__main__":
    print(format_report(measure()))
