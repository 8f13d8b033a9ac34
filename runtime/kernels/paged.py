"""What the kernels read and write: one layer's paged storage, a step's device view, and the
quantized element format (codes plus fp16 ``[scale, zero]``), whose torch reference is here.

The layout and the format are described in ``runtime/kv/format.py`` and ``docs/kv-cache.md``; the
cache (``runtime/kv``) owns the storage and builds the views, the kernels only read these types.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PARAM_DTYPE = torch.float16  # scale and zero: 2 bytes each keeps int8 at >= 1.85x fp16's tokens at D=64
_FP16_MAX = 65504.0
_MIN_SCALE = 2.0 ** -14  # smallest normal fp16: a constant row still dequantizes exactly to its value


@dataclass(frozen=True)
class LayerKV:
    """One layer's cache. k, v: (num_blocks, kv_heads, block_size, packed_dim); params (…, 2) fp16 or None."""

    k: torch.Tensor
    v: torch.Tensor
    k_params: torch.Tensor | None
    v_params: torch.Tensor | None
    bits: int  # 4 or 8: codes + params; 16 or 32: plain floats

    @property
    def block_size(self) -> int:
        return self.k.shape[2]

    @property
    def quantized(self) -> bool:
        return self.bits in (4, 8)


@dataclass(frozen=True)
class PagedBatch:
    """A StepBatch as device tensors: the kernels' view of a step."""

    block_tables: torch.Tensor  # (B, max_blocks) int32; rows padded with block 0 (never read: masked by length)
    seq_lens: torch.Tensor  # (B,) int32: context after this step
    query_start: torch.Tensor  # (B + 1,) int32: row of each sequence's first new token in the packed step
    slots: torch.Tensor  # (T,) int64: block * block_size + offset of every new token
    max_query_len: int
    max_seq_len: int
    decode_only: bool
    # A step mixing prompt chunks with decodes runs as two kernel calls: (decode token rows, their batch)
    # and (prefill token rows, their batch), so decoding rows keep the batched decode path.
    split: tuple[torch.Tensor, PagedBatch, torch.Tensor, PagedBatch] | None = None


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> codes uint8 (..., D or D/2) and params float16 (..., 2) = [scale, zero]."""
    qmax = (1 << bits) - 1
    x32 = x.float().clamp(-_FP16_MAX, _FP16_MAX)
    lo, hi = x32.amin(-1, keepdim=True), x32.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp(_MIN_SCALE, _FP16_MAX).to(PARAM_DTYPE)
    zero = lo.to(PARAM_DTYPE)
    codes = torch.floor((x32 - zero.float()) / scale.float() + 0.5).clamp(0, qmax).to(torch.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, torch.cat([scale, zero], dim=-1)


def dequantize(codes: torch.Tensor, params: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """codes (..., D or D/2) uint8 and params (..., 2) -> values (..., D) in ``dtype`` (math in fp32)."""
    if bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)
    p = params.float()
    return (codes.float() * p[..., :1] + p[..., 1:]).to(dtype)
