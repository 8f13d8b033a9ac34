"""The canonical FP8 weight layout (``tpdeploy-fp8-v1``): one layout for per-tensor, per-channel and block FP8.

For a linear y = x @ W.T with W of shape (N=out, K=in), as the source stores it:

    weight        float8_e4m3fn  (N, K)     the source's own bytes, never dequantized or re-rounded
    weight_scale  float32        (N, K/B)   one scale per output row and block of B input columns

    W[n, k] = float32(weight[n, k]) * weight_scale[n, k // B]      one fp32 product, rounded once

Why this shape: every source scale (one per tensor, one per output row, one per 128 x 128 block) is a
function constant over such (1, B) cells, so it is expanded once at conversion and the kernels see one
layout. ``B`` (``block_k``) is chosen per workspace to divide every rank's K (``canonical_block``): a
block source's 128 is cut into finer blocks that repeat its scale when a tensor-parallel shard of K is not
a multiple of 128 (K 384 at tp 4 gives 96 per rank, so B = 32), which costs no precision, and any tp that
divides the model works. Rows stay the source's (N, K) so the dense sharding rules cut the weight as they
cut an unquantized one; the scale follows along N unchanged and along K in units of B.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

LAYOUT = "tpdeploy-fp8-v1"
SCALE = "weight_scale"  # canonical part name: "<linear>.weight_scale" beside "<linear>.weight"
WEIGHT_DTYPE = torch.float8_e4m3fn
SCALE_DTYPE = torch.float32


@dataclass(frozen=True)
class Fp8Format:
    """What the manifest records about FP8 weights (globally and on every FP8 weight and scale)."""

    block_k: int  # B: input columns per canonical scale column; divides every rank's K
    source_format: str  # "compressed-tensors" or "fp8-block" (quant_method fp8, DeepSeek / Qwen3 -FP8)
    strategy: str  # the source's scale granularity: "tensor", "channel" or "block"
    source_block: tuple[int, int] = (0, 0)  # block strategy: (rows, columns) per source scale, else (0, 0)
    # What the source quantized activations with ("static", "dynamic" or "none"); W8A16 ignores it.
    activations: str = "none"
    layout: str = LAYOUT
    scale_dtype: str = "float32"


def is_scale(name: str) -> bool:
    return name.endswith("." + SCALE)


def scale_name(weight_name: str) -> str:
    """``layers.0.attention.wqkv.weight`` -> ``layers.0.attention.wqkv.weight_scale``."""
    return weight_name.removesuffix(".weight") + "." + SCALE


def weight_name(scale: str) -> str:
    return scale.removesuffix("." + SCALE) + ".weight"


def canonical_block(source_block_k: int, rank_ks: Iterable[int]) -> int:
    """The largest B dividing the source's block (0: none, the scale is constant along K) and every rank's
    K, so a shard never starts inside a scale column and the expansion repeats scales exactly."""
    return math.gcd(source_block_k, *rank_ks)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block_k: int) -> torch.Tensor:
    """(N, K) float32 weights; the one definition the kernels and the converter's checks follow."""
    n, k = weight.shape
    s = scale.float().repeat_interleave(block_k, dim=1)  # (N, K)
    return weight.float() * s[:, :k]
