"""``tprun serve ./hf-model --tp 4``: a Hugging Face checkpoint is converted once, then reused.

The conversion runs ``tpconv convert`` in a separate process (the runtime never imports the converter,
and no conversion memory stays in the server) into ``$TPDEPLOY_CACHE/workspaces/<name>-<path hash>-tp<N>``.
``tpconv`` itself decides whether that workspace is up to date — the same source files, options and
tpconv version (its cache key), and every file still verifies — and exits at once when it is; when it
is stale it is converted again. What happened is said on stderr.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from formats import layout
from formats.errors import TpDeployError

STALE = "is not up to date"  # tpconv's refusal of an existing target of another key


def is_checkpoint(path: Path) -> bool:
    """A Hugging Face model directory rather than a workspace."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / layout.MANIFEST_NAME).is_file()


def cache_root() -> Path:
    return Path(os.environ.get("TPDEPLOY_CACHE", Path.home() / ".cache" / "tpdeploy")) / "workspaces"


def tpconv_command() -> list[str] | None:
    """The tpconv executable: on PATH, or beside this interpreter (a venv not activated)."""
    beside = Path(sys.executable).parent / "tpconv"
    found = shutil.which("tpconv") or (str(beside) if beside.is_file() else None)
    return [found] if found else None


def workspace_for(src: Path, tp: int, say=print) -> Path:
    """The workspace of checkpoint ``src`` at ``tp``: converted now, or the one converted before."""
    src = Path(src).resolve()
    digest = hashlib.sha256(str(src).encode()).hexdigest()[:8]
    dst = cache_root() / f"{src.name}-{digest}-tp{tp}"
    args = ["convert", str(src), "-o", str(dst), "--tp", str(tp)]
    tpconv = tpconv_command()
    if tpconv is None:
        raise TpDeployError(f"{src} is a Hugging Face checkpoint, not a workspace, and tpconv is not installed to "
                            f"convert it; install tpdeploy's converter, or convert it yourself: "
                            f"tpconv {' '.join(args)}")
    say(f"tprun: {src} is a Hugging Face checkpoint: converting it for tp {tp} into {dst} with tpconv in a separate "
        "process (reused next time while the checkpoint does not change)")
    out = _run(tpconv + args)
    if out.returncode == 2 and STALE in out.stderr:  # converted before, from other files or options
        say(f"tprun: {dst} is stale ({_last(out.stderr)}); converting again")
        out = _run(tpconv + args + ["--force"])
    if out.returncode != 0:
        raise TpDeployError(f"converting {src} failed (tpconv exit {out.returncode}): {_last(out.stderr)}; "
                            f"the command was: tpconv {' '.join(args)}")
    say(f"tprun: {_last(out.stdout) or 'converted'}")
    return dst


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _last(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if not ln.startswith("tpconv: [")]
    return lines[-1].removeprefix("tpconv: error: ") if lines else ""
