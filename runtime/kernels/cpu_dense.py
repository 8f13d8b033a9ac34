"""Dense float32 linears on CPU in oneDNN's blocked weight layout, reordered once at load.

``F.linear`` hands every call the (N, K) row-major weight, and at decode sizes (M of 1 to a few dozen rows)
the GEMM is bound by reading the weights: measured on the 2-vCPU EPYC VM over SmolLM2-135M's 121 linears,
43 / 55 / 89 ms per step at M = 1 / 8 / 32 (12.4 / 9.7 / 6.0 GB/s of weights). The same GEMMs on weights
reordered once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what torch's
inductor does to frozen CPU weights) take 24 / 23 / 49 ms, and prefill-sized GEMMs (M 256-2048) gain 10-25 %.
The math is the same fp32 GEMM in another summation order (within ~5e-6 of a float64 product where F.linear
is within ~2e-6). bf16/fp16 keep ``F.linear``: without AVX512-BF16 oneDNN's 16-bit path is no faster here.
Dense workspaces only (and every lm_head): FP8 and int4 weights dequantized at load keep ``F.linear``. Over
SmolLM2's 30 layers the other summation order moved FP8 SmolLM2's logits by up to 9e-3 (of ~32) from
transformers' F.linear ones, past the 2e-3 its tool-parity test holds; that speed-up is left for later.

``TPDEPLOY_CPU_DENSE=plain`` keeps the row-major weights (the tests' way to compare the two).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

# The batch size oneDNN is told to expect when it picks the blocked layout; any M runs on it.
_EXPECTED_ROWS = 8


@dataclass(frozen=True)
class PackedDense:
    """One dense linear's (N, K) weight in oneDNN's opaque blocked layout."""

    packed: torch.Tensor
    n: int
    k: int


def choose(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor | PackedDense]:
    """What a dense linear weight becomes at load for compute ``dtype``."""
    plain = os.environ.get("TPDEPLOY_CPU_DENSE") == "plain"
    if dtype != torch.float32 or plain or not _works():
        return lambda w: w
    return pack


def _works() -> bool:
    """Whether this torch build has the oneDNN ops (private ones: a build without them keeps F.linear)."""
    try:
        w = torch.ones(2, 3)
        return bool(torch.allclose(linear(torch.ones(1, 3), pack(w)), torch.full((1, 2), 3.0)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def pack(w: torch.Tensor) -> PackedDense:
    return PackedDense(torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _EXPECTED_ROWS), *w.shape)


def linear(x: torch.Tensor, w: PackedDense, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32 -> (M, N); ``bias`` added in the same call."""
    return torch.ops.mkldnn._linear_pointwise(x, w.packed, bias, "none", [], "")
