"""The package's structure: no import cycle, and a torch-free core that Slicer's own process can import.

The import graph is read from the source (every ``import`` statement, including those inside
functions), so a cycle cannot hide behind a function-level import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = "DiffusionAnomalyLib"
SLICER_LIB = ROOT / "DiffusionAnomaly" / "DiffusionAnomalyModuleLib"

#: what Slicer's own process may import: no torch, no MONAI, at any depth
CORE = {"card", "checkpoint", "ct_lesions", "ct_phantoms", "method_catalog", "errors", "export", "figures", "dicom_seg", "files", "measurements", "phantoms", "pipeline", "postprocessing",
        "preprocessing", "processes", "progress", "report", "roi", "totalsegmentator", "version", "volume"}
#: third-party packages that belong to the worker process only
HEAVY = {"torch", "monai"}


def _module_files() -> dict[str, Path]:
    """Module name -> file, for the engine and the Slicer module's Lib."""
    files = {}
    for path in sorted((ROOT / ENGINE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    for path in sorted(SLICER_LIB.glob("*.py")):
        name = "DiffusionAnomalyModuleLib" if path.stem == "__init__" else f"DiffusionAnomalyModuleLib.{path.stem}"
        files[name] = path
    return files


def _imports(name: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(package-internal modules, top-level third-party names) imported anywhere in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, external = set(), set()

    def resolve(target: str) -> None:
        if target in known:
            internal.add(target)
        elif target.split(".")[0] in (ENGINE, "DiffusionAnomalyModuleLib"):
            parent = target.rpartition(".")[0]
            if parent in known:
                internal.add(parent)
        else:
            external.add(target.split(".")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from . import volume` imports the submodule volume
                if f"{module}.{alias.name}" in known:
                    internal.add(f"{module}.{alias.name}")
                else:
                    resolve(module)
    internal.discard(name)
    return internal, external


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = _module_files()
    edges, external = {}, {}
    for name, path in files.items():
        edges[name], external[name] = _imports(name, path, set(files))
    return edges, external


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _closure(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(edges.get(v, ()))
    return seen


def test_the_graph_sees_function_level_imports(graph):
    edges, _ = graph
    assert f"{ENGINE}.training" in edges[f"{ENGINE}.cli"]  # cli imports training inside _cmd_train
    assert f"{ENGINE}.methods" in edges[ENGINE]  # the package's lazy __getattr__
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle(graph):
    edges, _ = graph
    assert _cycles(edges) == []


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_module_never_reaches_torch(graph, module):
    edges, external = graph
    reached = _closure(edges, f"{ENGINE}.{module}")
    compute = sorted(m for m in reached if m.startswith(ENGINE + ".") and m.split(".")[1] not in CORE)
    assert compute == [], f"{module} reaches compute modules {compute}"
    heavy = sorted((m, sorted(external[m] & HEAVY)) for m in reached if external[m] & HEAVY)
    assert heavy == [], f"{module} reaches torch/MONAI through {heavy}"


def test_slicer_lib_imports_only_the_core(graph):
    edges, external = graph
    for name in edges:
        if not name.startswith("DiffusionAnomalyModuleLib"):
            continue
        engine = {m for m in _closure(edges, name) if m.startswith(ENGINE + ".")}
        assert {m.split(".")[1] for m in engine} <= CORE, f"{name} reaches {sorted(engine)}"
        assert not external[name] & HEAVY, f"{name} imports {external[name] & HEAVY}"


def test_core_imports_without_torch_in_a_fresh_interpreter():
    code = ("import sys\n"
            + "".join(f"import {ENGINE}.{m}\n" for m in sorted(CORE))
            + "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_card_needs_only_the_standard_library(graph):
    """Slicer's process reads the card (notice, steps, model summary) before any package is installed."""
    edges, external = graph
    assert edges[f"{ENGINE}.card"] == set()
    assert external[f"{ENGINE}.card"] <= set(sys.stdlib_module_names)
