"""Builds and loads ``cpu_gemm.c`` (the CPU path's dense fp32 GEMM) with the machine's C compiler.

Built once per machine, source and compiler: ``-march=native`` targets the CPU it runs on, so the cache key
holds the CPU's flags too. The library lands in ``$TPDEPLOY_KERNEL_CACHE`` (default
``$XDG_CACHE_HOME/tpdeploy/kernels``, else ``~/.cache/tpdeploy/kernels``), written to a temporary name and
renamed, so ranks starting together never load a half-written file. It links the ``libgomp.so.1`` torch has
already loaded (same soname), so its OpenMP threads are torch's, not a second pool spinning beside them.
Without a compiler (or on a build error) :func:`load` raises :class:`NativeUnavailable`; ``cpu_dense`` then
keeps oneDNN's layout.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_gemm.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_BUILD_TIMEOUT = 300  # seconds; a build takes about one


class NativeUnavailable(RuntimeError):
    """The native GEMM cannot be built or loaded here (the message says why)."""


@functools.cache
def load() -> ctypes.CDLL:
    """The loaded library (built first if this machine has none yet); raises :class:`NativeUnavailable`."""
    if not sys.platform.startswith("linux"):
        raise NativeUnavailable(f"built on Linux only (this is {sys.platform})")
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C compiler {compiler!r} on PATH (set CC)")
    path = cache_dir() / f"cpu_gemm-{_key(compiler)}.so"
    if not path.exists():
        try:
            _build(compiler, path)
        except OSError as e:  # the cache directory cannot be written
            raise NativeUnavailable(f"cannot write {path}: {e}") from e
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"{path} does not load: {e}") from e
    lib.tpdeploy_gemm_f32.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.tpdeploy_gemm_f32.restype = None
    return lib


def cache_dir() -> Path:
    if os.environ.get("TPDEPLOY_KERNEL_CACHE"):
        return Path(os.environ["TPDEPLOY_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tpdeploy" / "kernels"


def _key(compiler: str) -> str:
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(_run([compiler, "--version"]).encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _build(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        _run([compiler, *FLAGS, str(SOURCE), "-o", tmp])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _run(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeUnavailable(f"`{' '.join(cmd)}` failed: {e}") from e
    if done.returncode != 0:
        raise NativeUnavailable(f"`{' '.join(cmd)}` exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout
