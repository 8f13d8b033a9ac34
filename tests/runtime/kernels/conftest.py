"""Kernel tests run compiled on a GPU and in Triton's interpreter on CPU (tests/conftest.py sets it)."""
import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
