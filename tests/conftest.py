"""Shared fixtures: tiny random checkpoints built per test, the real SmolLM2 built once per machine."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this when a kernel module is first imported: without a GPU, kernels (and the model path
# through them, TPDEPLOY_KERNELS=triton) run in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny(tmp_path_factory):
    """Factory: ``tiny(arch="llama", **kw)`` writes a random HF checkpoint and returns its directory."""
    from tests.fixtures.tiny import make_tiny

    def build(arch: str = "llama", **kw) -> Path:
        return make_tiny(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **kw)

    return build


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct as a plain HF checkpoint (cached in ~/.cache/tpdeploy)."""
    from tests.fixtures.smollm2 import smollm2_path

    return smollm2_path()
