"""The architecture as a test: runtime/ is layered and light, formats/ is the shared contract.

``runtime`` imports only downward — kernels ← kv ← config ← model ← worker ← engine ← api ← serve, cli — so the
tree reads as the data flow of a request; it never imports transformers or converter; formats imports
neither program; converter never imports runtime.
"""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Each top-level part of runtime/ and its layer: a part may import its own layer or lower ones.
LAYERS = {"kernels": 0, "kv": 1, "config": 2, "model": 3, "worker": 4, "engine": 5, "api": 6, "perplexity": 6,
          "serve": 7, "cli": 7, "__main__": 8}
PACKAGE_ROOT = "__init__"  # runtime/__init__.py: lazy re-exports of the public API, at the top


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _part(path: Path) -> str:
    return path.relative_to(ROOT / "runtime").parts[0].removesuffix(".py")


def test_every_runtime_part_has_a_layer():
    parts = {_part(p) for p in (ROOT / "runtime").rglob("*.py")} - {PACKAGE_ROOT}
    assert parts == set(LAYERS), "a new runtime/ part needs its place in LAYERS (and in shared/DESIGN.md)"


def test_runtime_imports_only_downward():
    upward = []
    for path in (ROOT / "runtime").rglob("*.py"):
        here = _part(path)
        if here == PACKAGE_ROOT:
            continue
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] == "runtime" and len(parts) > 1 and LAYERS[parts[1]] > LAYERS[here]:
                upward.append(f"{path.relative_to(ROOT)} imports {module}")
    assert upward == []


@pytest.mark.parametrize("package, forbidden", [
    ("runtime", ("transformers", "converter")),
    ("formats", ("runtime", "converter", "transformers")),
    ("converter", ("runtime",)),
])
def test_forbidden_imports_in_source(package, forbidden):
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in (ROOT / package).rglob("*.py")
                 for m in _imports(p) if m.split(".")[0] in forbidden]
    assert offenders == []


def test_no_forbidden_imports_by_text():
    """Also catches imports inside strings run by exec/subprocess, which the AST walk above skips."""
    pattern = re.compile(r"^\s*(import|from)\s+(transformers|converter)\b", re.M)
    offenders = [str(p) for p in (ROOT / "runtime").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_no_forbidden_modules_loaded():
    code = ("import sys, runtime.api, runtime.cli, runtime.engine.core, runtime.worker.launch, runtime.serve.app; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'converter')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
