"""FP8 linears without Triton: the torch reference (dequantize per call) and the CPU path (dequantize once).

The CPU path dequantizes every FP8 linear once, at load, into the compute dtype, as ``--cpu-int4
dequant-once`` does for fp32 int4 models, and for the same reasons: torch has no fast CPU FP8 GEMM to
keep the weights packed for (its ``_scaled_mm`` is CUDA-only), rebuilding a weight on every call costs as
much as the decode matmul itself, and the dequantized weights are exactly the reference's (one fp32
product, then the cast), so nothing is lost but memory, which ``tprun plan`` states (dense on CPU).
``Fp8Weight`` and ``w8a16_linear`` belong with the other references in ``kernels/reference.py``; they sit
here until that file is free to edit.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from formats import fp8


@dataclass(frozen=True)
class Fp8Weight:
    """One FP8 linear in the canonical layout (``formats.fp8``): W is (N, K) after dequantization."""

    weight: torch.Tensor  # (N, K) float8_e4m3fn
    scale: torch.Tensor  # (N, K/B) float32
    block_k: int  # B


def w8a16_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ dequant(W).T (+ bias): dequantized in fp32 (``formats.fp8.dequantize``), then in x's dtype."""
    weight = fp8.dequantize(w.weight, w.scale, w.block_k).to(x.dtype)  # (N, K)
    out = x @ weight.t()
    return out if bias is None else out + bias


def dequant_once(dtype: torch.dtype) -> Callable[[Fp8Weight], torch.Tensor]:
    """The load-time preparation of each FP8 linear on CPU: a dense (N, K) weight for F.linear."""
    said = []

    def prepare(w: Fp8Weight) -> torch.Tensor:
        if not said:
            said.append(True)
            sys.stderr.write(f"tprun: FP8 linears on CPU: dequantized once at load into {str(dtype)[6:]} "
                             "(dense memory; torch has no CPU FP8 GEMM)\n")
        return fp8.dequantize(w.weight, w.scale, w.block_k).to(dtype).contiguous()

    return prepare


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ W.T for whatever the preparation made of an FP8 linear (dense, or kept FP8)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    return w8a16_linear(x, w, bias)
