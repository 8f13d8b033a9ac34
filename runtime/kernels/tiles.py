"""The K/V tile loaders both attention kernels share (prefill and decode read the cache the same way).

A tile is ``BLOCK_N`` tokens of one KV head, gathered through the block table: float caches are read
as they are, int8 codes and int4 nibble pairs are dequantized in registers as ``code * scale + zero``
in fp32 (the reference's math) and cast to the caller's dtype. A head_dim that is not a power of two
(80, 96) is padded to ``D_P`` in registers and masked on load; padded columns never count (queries
are zero there, and those output columns are not stored).

``load_tile`` reads values of every cache, and keys of float and int8 caches: one ``[scale, zero]`` per
token. ``load_channel_keys`` reads the keys of an int4 cache (``LayerKV.channel_keys``): a full block's
codes share one ``[scale, zero]`` per channel, ``k_params[block, head, channel]``, and a sequence's
partial last block (positions from ``n_full = n // block_size * block_size`` on) is not in the codes
at all but in its fp16 tail slot, ``k_tail[slot, head, pos % block_size]``. Each token takes one of
the two sources under a mask, so the partial block's codes and params and the tail rows of full
blocks, which hold anything (the cache is ``torch.empty``), are never read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from formats.errors import TpDeployError
from runtime.kernels.paged import TAIL_DTYPE, LayerKV

HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # others padded to a power of two in registers; 16: the tiny test models'


@triton.jit
def load_tile(data_ptr, params_ptr, blk, off, valid, head, s_b, s_h, s_t, s_d, p_b, p_h, p_t, p_x,
              BITS: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, BLOCK_N: tl.constexpr,
              OUT_DTYPE: tl.constexpr):
    """K or V of the tokens at (blk, off) as (BLOCK_N, D_P) in OUT_DTYPE; invalid tokens read as 0."""
    row = blk * s_b + head * s_h + off * s_t  # (BLOCK_N,) int64 element offsets of each token's head
    if BITS == 4:
        codes = _nibbles(data_ptr, row, valid, s_d, D, D_P, BLOCK_N)
    else:
        d = tl.arange(0, D_P)
        codes = tl.load(data_ptr + row[:, None] + d[None, :] * s_d, mask=valid[:, None] & (d[None, :] < D), other=0)
    if BITS <= 8:
        prow = blk * p_b + head * p_h + off * p_t
        scale = tl.load(params_ptr + prow, mask=valid, other=0).to(tl.float32)
        zero = tl.load(params_ptr + prow + p_x, mask=valid, other=0).to(tl.float32)
        return (codes.to(tl.float32) * scale[:, None] + zero[:, None]).to(OUT_DTYPE)
    return codes.to(OUT_DTYPE)


@triton.jit
def _nibbles(data_ptr, row, ok, s_d, D: tl.constexpr, D_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """int4 codes of the rows at ``row`` as (BLOCK_N, D_P) uint8; rows not ``ok`` read as 0."""
    j = tl.arange(0, D_P // 2)
    byte = tl.load(data_ptr + row[:, None] + j[None, :] * s_d, mask=ok[:, None] & (j[None, :] < D // 2), other=0)
    # (BLOCK_N, D_P/2, 2) -> (BLOCK_N, D_P): low nibble is element 2j, high nibble 2j + 1
    return tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, D_P))


@triton.jit
def load_channel_keys(data_ptr, params_ptr, tail_ptr, blk, off, pos, valid, head, slot, n_full,
                      s_b, s_h, s_t, s_d, p_b, p_h, p_c, p_x, t_s, t_h, t_t,
                      D: tl.constexpr, D_P: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
                      OUT_DTYPE: tl.constexpr):
    """int4 keys at positions ``pos`` (cache slots (blk, off)) of a sequence whose full blocks end at
    ``n_full`` and whose tail slot is ``slot``, as (BLOCK_N, D_P) in OUT_DTYPE; invalid tokens read as 0.

    ONE_BLOCK: the tile lies inside one cache block (block_size >= BLOCK_N, tiles aligned), so its
    params are one (D_P,) row broadcast over the tokens instead of a gather per (token, channel)."""
    full = valid & (pos < n_full)
    codes = _nibbles(data_ptr, blk * s_b + head * s_h + off * s_t, full, s_d, D, D_P, BLOCK_N)
    d = tl.arange(0, D_P)
    if ONE_BLOCK:  # every full token of the tile has the same blk (invalid ones read 0)
        col = tl.max(tl.where(full, blk, 0), 0) * p_b + head * p_h + d * p_c
        ok = d < tl.max(full.to(tl.int32), 0) * D  # no column at all when the tile has no full token
        scale = tl.load(params_ptr + col, mask=ok, other=0).to(tl.float32)[None, :]
        zero = tl.load(params_ptr + col + p_x, mask=ok, other=0).to(tl.float32)[None, :]
    else:
        col = blk[:, None] * p_b + head * p_h + d[None, :] * p_c
        ok = full[:, None] & (d[None, :] < D)
        scale = tl.load(params_ptr + col, mask=ok, other=0).to(tl.float32)
        zero = tl.load(params_ptr + col + p_x, mask=ok, other=0).to(tl.float32)
    keys = (codes.to(tl.float32) * scale + zero).to(OUT_DTYPE)
    part = valid & (pos >= n_full)
    trow = slot * t_s + head * t_h + off * t_t
    tail = tl.load(tail_ptr + trow[:, None] + d[None, :], mask=part[:, None] & (d[None, :] < D), other=0)
    return tl.where(full[:, None], keys, tail.to(OUT_DTYPE))


def check_channel_keys(kv: LayerKV, head_dim: int, who: str) -> None:
    """Raise a TpDeployError unless an int4 cache's key params and tails have the layout
    ``load_channel_keys`` reads (no-op for other caches)."""
    if not kv.channel_keys:
        return
    nb, hkv, bs, _ = kv.k.shape
    if kv.k_params is None or kv.k_params.shape != (nb, hkv, head_dim, 2) or kv.k_params.stride(3) != 1:
        got = None if kv.k_params is None else tuple(kv.k_params.shape)
        raise TpDeployError(f"{who}: int4 key params must be ({nb}, {hkv}, {head_dim}, 2), one [scale, zero] "
                            f"per channel of a block, contiguous in the last dim; got {got}")
    tail = kv.k_tail
    if tail.dim() != 4 or tail.shape[1:] != (hkv, bs, head_dim) or tail.dtype != TAIL_DTYPE or tail.stride(3) != 1:
        raise TpDeployError(f"{who}: k_tail must be (slots, {hkv}, {bs}, {head_dim}) {TAIL_DTYPE} with a "
                            f"contiguous last dim, got {tuple(tail.shape)} {tail.dtype}")
    if kv.v_params is None or kv.v_params.shape != (nb, hkv, bs, 2):
        raise TpDeployError(f"{who}: int4 value params must be ({nb}, {hkv}, {bs}, 2), one [scale, zero] per token")


def tail_args(kv: LayerKV, tails: torch.Tensor | None, fallback: torch.Tensor) -> tuple:
    """(k_tail, tails, its three leading strides) for a kernel launch; placeholders (never read) for
    caches without channel keys."""
    if not kv.channel_keys:
        return kv.k, fallback, 0, 0, 0
    return (kv.k_tail, tails, *kv.k_tail.stride()[:3])


def check_cache(kv: LayerKV, hkv: int, dim: int, who: str) -> None:
    """Raise a TpDeployError unless the cache holds ``hkv`` heads of ``dim`` in a layout the kernels read."""
    if dim not in HEAD_DIMS:
        raise TpDeployError(f"{who}: head_dim {dim} is not supported; the kernels are built for {HEAD_DIMS}")
    packed = dim // 2 if kv.bits == 4 else dim
    if kv.k.shape[1] != hkv or kv.k.shape[3] != packed or kv.v.shape != kv.k.shape:
        raise TpDeployError(f"{who}: cache {tuple(kv.k.shape)} does not hold {hkv} KV heads of head_dim {dim} "
                            f"(packed_dim {packed} for {kv.bits}-bit)")
    if kv.k.stride(3) != 1 or kv.v.stride() != kv.k.stride():
        raise TpDeployError(f"{who}: K and V caches must share strides with a contiguous last dim")
    if kv.channel_keys:
        check_channel_keys(kv, dim, who)
        if kv.block_size & (kv.block_size - 1):
            raise TpDeployError(f"{who}: an int4 cache's block_size must be a power of two, got {kv.block_size}")
    elif kv.quantized and (kv.k_params is None or kv.k_params.stride() != kv.v_params.stride()):
        raise TpDeployError(f"{who}: a {kv.bits}-bit cache needs K and V params of the same layout")
