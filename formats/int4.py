"""The canonical int4 weight layout (``tpdeploy-int4-v1``): one layout, whatever the source format.

For a linear layer y = x @ W with W of shape (K=in, N=out):

    qweight  int32  (K/8, N)   eight consecutive input rows per int32: row k of the block sits at
                               bits 4*(k % 8) .. 4*(k % 8)+3 (little-endian nibbles, no interleave)
    scales   fp16/bf16 (K/G, N)  one scale per group of G input rows and output column
    zeros    uint8  (K/G, N)   zero point per group, 0..15 (symmetric sources store 8; GPTQ v1 can give 16)
    perm     int32  (K,)       act-order only (GPTQ ``desc_act``), wqkv, wo, w_gate_up: row k multiplies input
                               feature perm[k] of this rank's activation, gathered before the GEMM

    W[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n]     computed in the scales' dtype

Why this shape: a W4A16 kernel walks K in tiles and keeps N contiguous, so a (BLOCK_K/8, BLOCK_N)
tile of ``qweight`` is one coalesced load unpacked with shifts along K; scales and zeros for a tile
are one row per group. Column-parallel splits cut N (any multiple of 8 bytes is fine); row-parallel
splits cut K and must fall on group boundaries (G is a multiple of 8). Sources (AutoAWQ GEMM,
compressed-tensors pack-quantized, GPTQ) are repacked into this once, at conversion.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from formats.errors import FormatError

LAYOUT = "tpdeploy-int4-v1"
PACK = 8  # int4 values per int32
PARTS = ("qweight", "scales", "zeros")
PERM = "perm"  # act-order: the activation gather index of a linear whose groups were made contiguous
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # bit offset of row k % 8


@dataclass(frozen=True)
class Int4Format:
    """What the manifest records about int4 weights (globally and per tensor)."""

    group_size: int
    zero_point: bool  # False: the source was symmetric (zeros are all 8)
    source_format: str  # "awq-gemm", "compressed-tensors", "gptq" or "gptq-v2"
    scale_dtype: str = "float16"
    layout: str = LAYOUT
    bits: int = 4
    # Since schema 6. Input rows were reordered so groups are contiguous: wqkv, wo, w_gate_up carry ``perm``
    # part; w_down's reordering is folded into w_gate/w_up's output columns (no run-time gather).
    act_order: bool = False


def is_part(name: str) -> bool:
    """Whether a canonical tensor name is one of an int4 linear's parts (``...wqkv.qweight``)."""
    return name.rpartition(".")[2] in (*PARTS, PERM)


def pack(values: torch.Tensor) -> torch.Tensor:
    """(K, N) integers in [0, 15] -> (K/8, N) int32 in the canonical order (CPU; conversion time)."""
    k, n = values.shape
    if k % PACK:
        raise FormatError(f"int4 packing needs K divisible by {PACK}, got K={k}")
    # numpy's unsigned shifts run ~30x faster than torch's int32 ones on CPU; one row of the pack at a
    # time keeps temporaries at the packed size. The words are stored signed.
    v = values.cpu().numpy().reshape(k // PACK, PACK, n)  # (K/8, 8, N)
    out = np.zeros((k // PACK, n), dtype=np.uint32)
    for i in range(PACK):
        out |= v[:, i].astype(np.uint32) << np.uint32(4 * i)
    return torch.from_numpy(out.view(np.int32))


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """(K/8, N) int32 -> (K, N) int32 values in [0, 15]."""
    kp, n = qweight.shape
    if qweight.device.type == "cpu":  # numpy's unsigned shifts are much faster than torch's int32 ones on CPU
        words = qweight.contiguous().numpy().view(np.uint32)[:, None, :]  # (K/8, 1, N)
        shifts = np.arange(0, 32, 4, dtype=np.uint32)[None, :, None]
        return torch.from_numpy(((words >> shifts) & 0xF).astype(np.int32).reshape(kp * PACK, n))
    v = (qweight[:, None, :] >> _SHIFTS.to(qweight.device)[None, :, None]) & 0xF  # (K/8, 8, N)
    return v.reshape(kp * PACK, n)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """(K, N) weights in the scales' dtype; the one definition every path is checked against."""
    k, n = qweight.shape[0] * PACK, qweight.shape[1]
    q = unpack(qweight).view(k // group_size, group_size, n)  # (K/G, G, N)
    diff = (q - zeros.to(torch.int32)[:, None, :]).float()
    # |q - z| <= 15 and the scale has <= 11 significant bits, so the fp32 product is exact and
    # rounding it once to the scales' dtype is bit-identical to multiplying in that dtype (faster on CPU).
    return (diff * scales.float()[:, None, :]).to(scales.dtype).reshape(k, n)
