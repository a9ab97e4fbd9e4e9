"""The inference side stands alone: prediction imports no training code, and no module imports itself back.

`import_graph` counts every import of a cxrscreen module, inside functions too (they run when the function
does), except those under `if TYPE_CHECKING:` (never run).
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

from tests.processes import run_fresh_python

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cxrscreen"
TRAINING_SIDE = ("cxrscreen.training", "cxrscreen.engine", "cxrscreen.data.subsets", "cxrscreen.cli",
                 "cxrscreen.experiments", "cxrscreen.audit")


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the cxrscreen modules it imports (a `from pkg import name` counts pkg and pkg.name if a module)."""
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                if base is None:
                    continue
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            graph[mod] |= {n for n in names if n in mods and n != mod}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_import_cycles_are_found() -> None:
    """The checker itself: a two-module loop through a function-level import is a cycle, TYPE_CHECKING is not."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert import_cycles(graph) == [["a", "b"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    cycles = import_cycles(import_graph())
    assert cycles == [], f"import loops (counting imports inside functions): {cycles}"


def test_prediction_imports_no_training_code() -> None:
    """Loading the bundled model and predicting (severity and Grad-CAM included) imports nothing from training,
    the epoch loop, data subsets, the command line, the comparison or the audit."""
    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "from cxrscreen.predict.predictor import Predictor, load_model\n"
        "from cxrscreen.io.xray import XRay\n"
        "from cxrscreen.explain.cam import Explainer\n"
        "run = load_model()\n"
        "p = Predictor(run)\n"
        "rng = np.random.default_rng(0)\n"
        "x = XRay(path='synthetic.png', pixels=rng.random((96, 80), dtype=np.float32), meta={})\n"
        "res = p.predict_xray(x)\n"
        "Explainer(run)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cxrscreen'))))\n"
    )
    out = run_fresh_python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "cxrscreen.predict.predictor" in loaded
    assert [m for m in loaded if m.startswith(TRAINING_SIDE)] == []
