"""The package's import graph, built from the source with `ast`: no cycles; the core imports neither Dagster nor the
Dagster skin; every layer imports only the layers beneath it; no function-level imports of project modules.

Layers, lowest first (a module may import its own layer and those beneath it):

    core: errors, contract, progress, models, storage,  the vocabulary and the plumbing
          heap
    core.llm                                            the LLM seam and its backends
    core.data, core.method                              the method's data and its method (method may use llm)
    core.stages, core.validation                        stage functions, output checks
    reports                                             lineage, interop, viewer: read the contract
    defs                                                the Dagster skin
    definitions, scale_out, cli                         entry points
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ndx_pipeline"

# module prefix → rank; the longest matching prefix decides
RANKS = {
    "ndx_pipeline.core": 0,
    "ndx_pipeline.core.llm": 1,
    "ndx_pipeline.core.data": 2,
    "ndx_pipeline.core.method": 2,
    "ndx_pipeline.core.stages": 3,
    "ndx_pipeline.core.validation": 3,
    "ndx_pipeline.reports": 4,
    "ndx_pipeline.defs": 5,
    "ndx_pipeline.definitions": 6,
    "ndx_pipeline.scale_out": 7,
    "ndx_pipeline.cli": 7,
    "ndx_pipeline": 0,  # the package root: a docstring, the heap setting made before polars loads, the lazy `defs`
}
# Within rank 2, data must not reach into the method or the LLMs (the method reads data, never the reverse).
FORBIDDEN = {
    "ndx_pipeline.core.data": ("ndx_pipeline.core.method", "ndx_pipeline.core.llm"),
    "ndx_pipeline.core.llm": ("ndx_pipeline.core.method", "ndx_pipeline.core.data"),
}
NO_DAGSTER = ("ndx_pipeline.core", "ndx_pipeline.reports")
# The one function-level project import allowed: the package root's PEP 562 `__getattr__` that loads `defs` on
# first access, so that importing the core never imports Dagster.
LAZY_ROOT = ("ndx_pipeline", "__getattr__")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> dict[str, list[tuple[str, str | None, int]]]:
    """module → [(imported module, enclosing function or None, line)] for every import in the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        me = module_name(root, path)
        package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
        found = []

        def visit(node, function):
            for child in ast.iter_child_nodes(node):
                inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
                if isinstance(child, ast.Import):
                    found.extend((a.name, function, child.lineno) for a in child.names)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(parts + ([base] if base else []))
                    found.append((base, function, child.lineno))
                    found.extend((f"{base}.{a.name}", function, child.lineno) for a in child.names)
                visit(child, inner)

        visit(ast.parse(path.read_text(encoding="utf-8")), None)
        out[me] = found
    return out


def rank(module: str) -> int | None:
    """The layer of `module`: its longest prefix in RANKS (the package root is the root module alone, not a
    fallback for the others); None for a module placed in no layer."""
    root = "ndx_pipeline"
    found = [p for p in RANKS if module == p or (p != root and module.startswith(p + "."))]
    return RANKS[max(found, key=len)] if found else None


def problems(root: Path) -> list[str]:
    graph = imports(root)
    mods = set(graph)
    top = root.name
    out, edges = [], {m: set() for m in mods}
    for me, found in graph.items():
        for target, function, line in found:
            project = target in mods
            if function is not None and (project or target == top or target.startswith(top + ".")) \
                    and (me, function) != LAZY_ROOT:
                out.append(f"{me}:{line} imports {target} inside {function}()")
            if me.startswith(NO_DAGSTER) and (target == "dagster" or target.startswith("dagster")):
                out.append(f"{me}:{line} imports {target}: the core and the reports stay free of Dagster")
            if not project or target == me or (me, function) == LAZY_ROOT:
                continue
            edges[me].add(target)
            if me.startswith(f"{top}.core") and target.startswith((f"{top}.defs", f"{top}.reports")):
                out.append(f"{me}:{line} imports {target}: the core imports nothing above it")
            if (rank(target) or 0) > (rank(me) or 0):
                out.append(f"{me}:{line} imports {target}, a layer above it")
            for lower, banned in FORBIDDEN.items():
                if (me == lower or me.startswith(lower + ".")) and target.startswith(banned):
                    out.append(f"{me}:{line} imports {target}: {lower} must not depend on it")
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return sorted(set(out))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def test_the_package_imports_point_one_way():
    found = problems(PACKAGE)
    assert not found, "\n".join(found)


def test_every_module_is_placed_in_a_layer():
    for module in imports(PACKAGE):
        assert rank(module) is not None, module
    # and a module outside every layer is found (the package root used to place every module)
    assert rank("ndx_pipeline.newcomer") is None and rank("ndx_pipeline.core.newcomer") == 0
    assert rank("ndx_pipeline") == 0 and rank("ndx_pipeline.defs.assets.extraction") == RANKS["ndx_pipeline.defs"]


# What the reports must not load: they read stored files, so `ndx-pipeline view` and `lineage` work where no LLM backend
# or model library is importable (lineage rebuilds a stored prompt from pure text functions).
REPORTS_LEAVE_UNLOADED = ("ndx_pipeline.core.llm.registry", "ndx_pipeline.core.llm.local",
                          "ndx_pipeline.core.llm.openai", "openai", "transformers", "torch")


def test_the_reports_load_no_llm_backend_and_no_model_library():
    code = ("import sys, ndx_pipeline.reports.viewer, ndx_pipeline.reports.lineage\n"
            f"print(' '.join(m for m in {REPORTS_LEAVE_UNLOADED!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [], f"importing the viewer and lineage loads {done.stdout.strip()}"


@pytest.fixture
def toy(tmp_path):
    """A small package that breaks each rule once."""
    root = tmp_path / "ndx_pipeline"
    files = {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/a.py": "import dagster\nfrom ndx_pipeline.core import b\n",
        "core/b.py": "from ndx_pipeline.core import a\n",
        "core/data/__init__.py": "",
        "core/data/x.py": "from ndx_pipeline.core.method import y\n",
        "core/method/__init__.py": "",
        "core/method/y.py": "def f():\n    from ndx_pipeline.core import a\n    import torch\n",
        "defs/__init__.py": "",
        "defs/d.py": "import dagster\n",
        "reports/__init__.py": "",
        "reports/r.py": "from ndx_pipeline.defs import d\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_checker_finds_each_kind_of_break(toy):
    found = "\n".join(problems(toy))
    assert "import cycle: ndx_pipeline.core.a -> ndx_pipeline.core.b" in found
    assert "ndx_pipeline.core.a:1 imports dagster" in found
    assert "ndx_pipeline.core.method.y:2 imports ndx_pipeline.core inside f()" in found
    assert "torch" not in found  # third-party imports inside functions are fine
    assert "ndx_pipeline.core.data.x:1 imports ndx_pipeline.core.method.y: ndx_pipeline.core.data must not" in found
    assert "ndx_pipeline.reports.r:1 imports ndx_pipeline.defs, a layer above it" in found
    assert "ndx_pipeline.defs.d:" not in found  # the skin may import Dagster
