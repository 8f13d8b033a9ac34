"""Plain-torch references: the math the runtime's CPU path runs and the Triton kernels must match."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from formats import int4


@dataclass(frozen=True)
class Int4Weight:
    """One int4 linear in the canonical layout (``formats.int4``): W is (K, N) after dequantization."""

    qweight: torch.Tensor  # (K/8, N) int32
    scales: torch.Tensor  # (K/G, N)
    zeros: torch.Tensor  # (K/G, N) uint8
    group_size: int


def w4a16_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ dequant(W) (K, N) (+ bias): dequantized in the scales' dtype, then in x's dtype."""
    weight = int4.dequantize(w.qweight, w.scales, w.zeros, w.group_size).to(x.dtype)  # (K, N)
    out = x @ weight
    return out if bias is None else out + bias


def linear(x: torch.Tensor, w: torch.Tensor | Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The one place the model multiplies by a weight, dense (N, K) or int4."""
    if isinstance(w, Int4Weight):
        return w4a16_linear(x, w, bias)
    return F.linear(x, w, bias)
