"""runtime/ stays light: it never imports transformers or converter."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_forbidden_imports_in_source():
    pattern = re.compile(r"^\s*(import|from)\s+(transformers|converter)\b", re.M)
    offenders = [str(p) for p in (ROOT / "runtime").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_no_forbidden_modules_loaded():
    code = ("import sys, runtime.api, runtime.cli, runtime.engine, runtime.launch; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'converter')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
