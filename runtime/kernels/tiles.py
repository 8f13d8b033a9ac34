"""The K/V tile loader both attention kernels share (prefill and decode read the cache the same way).

A tile is ``BLOCK_N`` tokens of one KV head, gathered through the block table: float caches are read
as they are, int8 codes and int4 nibble pairs are dequantized in registers as ``code * scale + zero``
in fp32 (the reference's math) and cast to the caller's dtype. A head_dim that is not a power of two
(80, 96) is padded to ``D_P`` in registers and masked on load; padded columns never count (queries
are zero there, and those output columns are not stored).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tile(data_ptr, params_ptr, blk, off, valid, head, s_b, s_h, s_t, s_d, p_b, p_h, p_t, p_x,
               BITS: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, BLOCK_N: tl.constexpr,
               OUT_DTYPE: tl.constexpr):
    """K or V of the tokens at (blk, off) as (BLOCK_N, D_P) in OUT_DTYPE; invalid tokens read as 0."""
    row = blk * s_b + head * s_h + off * s_t  # (BLOCK_N,) int64 element offsets of each token's head
    if BITS == 4:
        j = tl.arange(0, D_P // 2)
        byte = tl.load(data_ptr + row[:, None] + j[None, :] * s_d, mask=valid[:, None] & (j[None, :] < D // 2),
                       other=0)
        # (BLOCK_N, D_P/2, 2) -> (BLOCK_N, D_P): low nibble is element 2j, high nibble 2j + 1
        codes = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, D_P))
    else:
        d = tl.arange(0, D_P)
        codes = tl.load(data_ptr + row[:, None] + d[None, :] * s_d, mask=valid[:, None] & (d[None, :] < D), other=0)
    if BITS <= 8:
        prow = blk * p_b + head * p_h + off * p_t
        scale = tl.load(params_ptr + prow, mask=valid, other=0).to(tl.float32)
        zero = tl.load(params_ptr + prow + p_x, mask=valid, other=0).to(tl.float32)
        return (codes.to(tl.float32) * scale[:, None] + zero[:, None]).to(OUT_DTYPE)
    return codes.to(OUT_DTYPE)
