"""Shared fixtures: tiny random checkpoints built per test, the real SmolLM2 built once per machine."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this when a kernel module is first imported: without a GPU, kernels (and the model path
# through them, TPDEPLOY_KERNELS=triton) run in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


_DISK_AT_START: dict[str, float] = {}


def pytest_sessionstart(session) -> None:
    _DISK_AT_START.update(_free_disk())


def pytest_terminal_summary(terminalreporter) -> None:
    """Free disk where the run writes, at its start and end (printed last, so a CI log's tail shows it): a
    run that fills the disk fails in ways that name anything but the disk."""
    for where, free in _free_disk().items():
        terminalreporter.write_line(f"free disk under {where}: {_DISK_AT_START.get(where, float('nan')):.1f} GiB "
                                    f"at the start, {free:.1f} GiB at the end")
    terminalreporter.write_line("(a run needs ~2 GiB of temp; without the fixture cache it also writes ~7 GiB there)")


def _free_disk() -> dict[str, float]:
    places = {"temp": Path(tempfile.gettempdir()), "the fixture cache": _cache_root()}
    return {f"{path} ({name})": shutil.disk_usage(path).free / 2**30 for name, path in places.items()}


def _cache_root() -> Path:
    from tests.fixtures.smollm2 import cache_dir

    path = cache_dir()
    while not path.exists():  # not built yet: measure the filesystem it will land on
        path = path.parent
    return path


@pytest.fixture
def tiny(tmp_path_factory):
    """Factory: ``tiny(arch="llama", **kw)`` writes a random HF checkpoint and returns its directory.

    The checkpoints go when the test ends: pytest keeps factory directories to the end of the session,
    and a run's hundreds of them (up to 290 MB each) filled a CI machine's disk.
    """
    from tests.fixtures.tiny import make_tiny

    made: list[Path] = []

    def build(arch: str = "llama", **kw) -> Path:
        made.append(tmp_path_factory.mktemp(f"tiny-{arch}"))
        return make_tiny(made[-1], arch, **kw)

    yield build
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct as a plain HF checkpoint (cached in ~/.cache/tpdeploy)."""
    from tests.fixtures.smollm2 import smollm2_path

    return smollm2_path()
