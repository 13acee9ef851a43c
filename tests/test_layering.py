"""House rules of the package's layers: the core works with Ray unavailable, and no dinomaly modules import
each other in a circle.

The circle check reads every `import` / `from ... import` statement of every dinomaly module with `ast`: at
module level, inside functions and methods, and under `if TYPE_CHECKING:`. Imports inside functions count
too: they are lazy so that heavy libraries (Ray, MLflow, timm) load only when used, not to hide a circle
between our own modules; one that closes a circle still makes two modules depend on each other, and it
fails at run time when either is imported while the other is half-initialised. `if TYPE_CHECKING:` imports
count as well, since an annotation that needs the other module is a dependency all the same.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dinomaly"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` (a package's name for its __init__.py)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


CORE_MODULES = sorted(name for name, path in module_files(PACKAGE).items() if "distributed" not in path.parts)

PROBE = """
import importlib, sys, traceback
sys.modules["ray"] = None  # any `import ray` now raises ImportError
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_core_imports_without_ray():
    assert "dinomaly.config" in CORE_MODULES
    result = subprocess.run([sys.executable, "-c", PROBE, *CORE_MODULES], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_probe_catches_a_ray_import(tmp_path):
    """The probe itself must fail on a module that imports Ray (else the test above proves nothing)."""
    (tmp_path / "uses_ray.py").write_text("import ray\n")
    result = subprocess.run([sys.executable, "-c", PROBE, "uses_ray"], capture_output=True, text=True,
                            cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    assert result.returncode == 1 and "uses_ray" in result.stdout


# --------------------------------------------------------------------------- import circles


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names an import statement names: `from a import b` -> a.b (a module, or a name in a)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the current package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[:len(package) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    return [f"{base}.{alias.name}" for alias in node.names]


def import_graph(package: Path) -> dict[str, dict[str, int]]:
    """module -> {module of the same package it imports: line of the first such import}.

    A name resolves to the longest prefix that is a module (a.b.func -> a.b). The parent packages that Python
    imports on the way are not edges: every package's __init__ would otherwise close a circle with the
    submodules it re-exports.
    """
    modules = module_files(package)
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _imported_names(node, name, path.name == "__init__.py"):
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, node.lineno)
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Each group of modules that import each other in a circle (strongly connected, Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    members = set(cycle)
    return "\n".join(f"  {source} -> {target} (line {line})" for source in cycle
                     for target, line in sorted(graph[source].items()) if target in members)


def test_no_import_cycles_among_dinomaly_modules():
    graph = import_graph(PACKAGE)
    assert "dinomaly.distributed.tune.sweep" in graph and "dinomaly.config" in graph["dinomaly.checkpoint"]
    cycles = import_cycles(graph)
    assert not cycles, "modules that import each other in a circle (function-level imports included):\n" + \
        "\n\n".join(_describe(cycle, graph) for cycle in cycles)


def test_the_cycle_finder_sees_lazy_relative_and_package_imports(tmp_path):
    """A circle closed by a function-level import, a relative import and a package __init__ is found."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import helper\n")
    (package / "sub" / "__init__.py").write_text("from .b import helper\n")
    (package / "sub" / "b.py").write_text("def helper():\n    from pkg import a\n    return a\n")
    (package / "c.py").write_text("import pkg.a\n")  # outside the circle
    assert import_cycles(import_graph(package)) == [["pkg.a", "pkg.sub", "pkg.sub.b"]]
