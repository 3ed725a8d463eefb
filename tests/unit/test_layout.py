"""The layout's promises, checked on the code itself: imports run one way and never in a circle, the loading
package stays free of staging and OpenCV (a training worker imports it; staging is the heavy half), `pipelines` and
`models` never name `flows` (not even in a string), and the README's map lists every folder.

Every import statement counts, also those inside functions: a lazy import still runs, only later.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.settings import PROJECT_ROOT

PACKAGES = ("models", "pipelines", "flows", "cli")
# Leaves every part may use; they import nothing else of the project.
LEAVES = {"pipelines.atomic", "pipelines.seeds", "pipelines.settings", "pipelines.watchdog", "pipelines.hashing"}
# What each part may import besides itself and the leaves, the README's map from the bottom up:
#   models <- dataset <- loading;  source <- staging -> dataset;
#   registry -> models;  training -> registry, loading, dataset, models;  inference -> training, registry, ...;
#   search -> training, registry, ...;  flows -> pipelines, models;  cli -> flows, pipelines, models.
ALLOWED = {
    "models": set(),
    "pipelines.dataset": set(),
    "pipelines.loading": {"pipelines.dataset"},
    "pipelines.source": set(),
    "pipelines.staging": {"pipelines.dataset", "pipelines.source"},
    "pipelines.registry": {"models"},
    "pipelines.training": {"pipelines.dataset", "pipelines.loading", "pipelines.registry", "models"},
    "pipelines.inference": {"pipelines.dataset", "pipelines.loading", "pipelines.registry", "pipelines.training",
                            "models"},
    "pipelines.search": {"pipelines.dataset", "pipelines.loading", "pipelines.registry", "pipelines.training",
                         "models"},
    "flows": {"pipelines", "models"},
    "cli": {"flows", "pipelines", "models"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((PROJECT_ROOT / pkg).rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports: `from a.b import c` is a.b.c when c is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: resolve against this module's package
                pkg = module_name(path).split(".")
                pkg = pkg if path.name == "__init__.py" else pkg[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + [node.module])
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def part_of(module: str) -> str:
    return next((p for p in sorted(ALLOWED, key=len, reverse=True) if module == p or module.startswith(p + ".")),
                module)


def test_find_cycle_reports_a_circle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_project_has_no_import_circle():
    assert find_cycle(import_graph()) is None


def test_imports_run_one_way():
    wrong = []
    for module, imports in import_graph().items():
        part = part_of(module)
        for target in imports:
            target_part = part_of(target)
            if module in LEAVES:
                ok = False
            else:
                ok = target in LEAVES or target_part == part or any(
                    target_part == a or target_part.startswith(a + ".") for a in ALLOWED.get(part, set()))
            if not ok:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layout: " + ", ".join(sorted(wrong))


def test_models_import_only_torch_and_the_standard_library():
    third_party = set()
    for name, path in project_modules().items():
        if not name.startswith("models"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            roots = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            third_party |= {r.split(".")[0] for r in roots}
    assert third_party - {"models", "torch", "__future__"} <= set(sys.stdlib_module_names)


@pytest.mark.parametrize("package", ["pipelines.loading", "pipelines.dataset"])
def test_loading_imports_neither_staging_nor_opencv(package):
    code = (f"import sys, {package}; "
            "print(sorted(m for m in sys.modules"
            " if m == 'cv2' or m.startswith(('pipelines.staging', 'pipelines.source'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PROJECT_ROOT)
    assert out.stdout.strip() == "[]"


def test_no_import_hidden_behind_a_string():
    """A module named in a string (importlib, __import__) is an import the graph above cannot see."""
    hidden = [name for name, path in project_modules().items()
              if "importlib.import_module" in path.read_text() or "__import__(" in path.read_text()]
    assert not hidden


@pytest.mark.parametrize("package", ["models", "pipelines"])
def test_the_lower_layers_never_name_flows(package):
    """Not in an import, not in a command string, not in a docstring: what runs below `flows/` stands alone."""
    naming = [str(p.relative_to(PROJECT_ROOT)) for p in sorted((PROJECT_ROOT / package).rglob("*.py"))
              if re.search(r"\bflows[./]|[\'\"]flows[\'\"]", p.read_text())]
    assert not naming


def test_every_part_is_on_the_readme_map_and_in_the_rules():
    """The README's map names each folder of `pipelines/` (and the top-level packages) that the rules above know."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    parts = {p.name for p in (PROJECT_ROOT / "pipelines").iterdir() if (p / "__init__.py").exists()}
    assert {f"pipelines.{name}" for name in parts} <= set(ALLOWED), "a package of pipelines/ the rules do not know"
    missing = [name for name in sorted(parts) + list(PACKAGES) if f"{name}/" not in readme]
    assert not missing, f"not on the README's map: {missing}"
