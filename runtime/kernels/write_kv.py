"""Triton kernels that write a step's K/V into the paged cache (before attention reads it).

``write_kv``: one program per (token, KV head). A float cache gets the value cast to its dtype; int8
K/V and int4 values get codes and ``[scale, zero]`` computed exactly as ``runtime.kv.format.quantize``:
fp32 min/max over head_dim, scale and zero rounded to fp16 *before* the codes, round-half-up codes.
Divisions are IEEE round-to-nearest (``div_rn``), so the codes are bit-identical to the torch
reference on GPU as well as in the interpreter. int4 stores element 2j in the low nibble of byte j.

int4 keys are stored per block instead (``reference.write_channel_keys``; ``PagedBatch.keys`` says
where): ``_write_channel_keys_kernel``, one program per (block this step fills, KV head), gathers the
block's ``block_size`` keys from this step's rows or from the tail rows an earlier step left them in,
rounds them to fp16 as a tail holds them (after clamping to +-65504), and quantizes each channel over
the block's tokens, its range clipped by the ratio of ``paged.CLIP_RATIOS`` with the least squared
error (``_channel_codes``): codes as above, params ``(num_blocks, Hkv, D, 2)``. It is launched without
FMA contraction, so every operation rounds as torch's do and the codes are the reference's (the error
sums may differ in their last bit, which could only flip a choice between two ratios as good as each
other). Then ``_write_tail_kernel``, one program per (key of a block still partial, KV head), stores
that key in fp16 in its sequence's tail slot, ``k_tail (slots, Hkv, block_size, D)``; it runs second
because a filled block may read tail rows that this step then reuses. Values keep the per-token kernel.

Layouts: ``runtime/kv/format.py``; the torch reference is ``reference.write_kv``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from formats.errors import TpDeployError
from runtime.kernels.paged import CLIP_RATIOS, KeyWrites, LayerKV, check_keys
from runtime.kernels.tiles import check_cache

assert CLIP_RATIOS[0] == 1.0 and len(CLIP_RATIOS) == 6, "_channel_codes tries plain min-max, then five ratios"
_RATIOS = {f"R{i}": r for i, r in enumerate(CLIP_RATIOS[1:], 1)}


@triton.jit
def _load_clamped(ptr, mask):
    """fp32 values clamped to fp16's range first, so scale and zero stay finite in fp16 (masked: 0)."""
    return tl.minimum(tl.maximum(tl.load(ptr, mask=mask, other=0.0).to(tl.float32), -65504.0), 65504.0)


@triton.jit
def _quant_params(lo, hi, QMAX: tl.constexpr):
    """fp16-rounded scale and zero of one row (returned in fp32), as ``format.quantize``."""
    scale = tl.math.div_rn(hi - lo, QMAX * 1.0)
    scale = tl.minimum(tl.maximum(scale, 6.103515625e-05), 65504.0)  # [2**-14 (smallest normal fp16), fp16 max]
    return scale.to(tl.float16).to(tl.float32), lo.to(tl.float16).to(tl.float32)


@triton.jit
def _codes(x, scale, zero, QMAX: tl.constexpr):
    """Round-half-up codes in [0, QMAX] (uint8) for the stored (fp16-rounded) scale and zero."""
    c = tl.floor(tl.math.div_rn(x - zero, scale) + 0.5)
    return tl.minimum(tl.maximum(c, 0.0), QMAX * 1.0).to(tl.uint8)


@triton.jit
def _write_kv_kernel(x_ptr, slot_ptr, data_ptr, params_ptr,
                     sx_t, sx_h, sd_b, sd_h, sd_o, sp_b, sp_h, sp_o,
                     BLOCK_SIZE: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, BITS: tl.constexpr):
    t, h = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    blk, off = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    src = x_ptr + t * sx_t + h * sx_h  # last dim contiguous (checked by the wrapper)
    dst = data_ptr + blk * sd_b + h * sd_h + off * sd_o
    if BITS > 8:
        d = tl.arange(0, D_P)
        tl.store(dst + d, tl.load(src + d, mask=d < D).to(data_ptr.dtype.element_ty), mask=d < D)
    else:
        QMAX: tl.constexpr = (1 << BITS) - 1
        if BITS == 8:
            d = tl.arange(0, D_P)
            x = _load_clamped(src + d, d < D)
            lo, hi = tl.min(tl.where(d < D, x, 65504.0), 0), tl.max(tl.where(d < D, x, -65504.0), 0)
            scale, zero = _quant_params(lo, hi, QMAX)
            tl.store(dst + d, _codes(x, scale, zero, QMAX), mask=d < D)
        else:  # int4: even elements -> low nibble, odd -> high nibble of the same byte
            j = tl.arange(0, D_P // 2)
            ok = j < D // 2
            even, odd = _load_clamped(src + 2 * j, ok), _load_clamped(src + 2 * j + 1, ok)
            lo = tl.minimum(tl.min(tl.where(ok, even, 65504.0), 0), tl.min(tl.where(ok, odd, 65504.0), 0))
            hi = tl.maximum(tl.max(tl.where(ok, even, -65504.0), 0), tl.max(tl.where(ok, odd, -65504.0), 0))
            scale, zero = _quant_params(lo, hi, QMAX)
            tl.store(dst + j, _codes(even, scale, zero, QMAX) | (_codes(odd, scale, zero, QMAX) << 4), mask=ok)
        pdst = params_ptr + blk * sp_b + h * sp_h + off * sp_o
        tl.store(pdst, scale.to(tl.float16))
        tl.store(pdst + 1, zero.to(tl.float16))


@triton.jit
def _fp16_keys(x_ptr, tail_ptr, new, x_row, tail_row, col, ok):
    """(BLOCK_SIZE, len(col)) keys of one block in fp32: rows of the step (``new``) clamped and rounded to
    fp16, as a tail stores them, or the fp16 tail rows an earlier step left them in."""
    x = _load_clamped(x_ptr + x_row[:, None] + col[None, :], new[:, None] & ok[None, :]).to(tl.float16)
    old = tl.load(tail_ptr + tail_row[:, None] + col[None, :], mask=(~new)[:, None] & ok[None, :], other=0.0)
    return tl.where(new[:, None], x, old).to(tl.float32)


@triton.jit
def _clip_trial(x, lo, hi, r, QMAX: tl.constexpr):
    """Scale, zero, codes (fp32) and squared error per column of x (BLOCK_SIZE, N) for the range [lo, hi]
    clipped by ratio r about its middle (``paged.quantize_channels``)."""
    span = (hi - lo) * r
    scale = tl.minimum(tl.maximum(tl.math.div_rn(span, QMAX * 1.0), 6.103515625e-05), 65504.0)
    scale = scale.to(tl.float16).to(tl.float32)[None, :]
    zero = (lo + ((hi - lo) - span) * 0.5).to(tl.float16).to(tl.float32)[None, :]
    c = tl.minimum(tl.maximum(tl.floor(tl.math.div_rn(x - zero, scale) + 0.5), 0.0), QMAX * 1.0)
    err = c * scale + zero - x
    return scale, zero, c, tl.sum(err * err, 0)


@triton.jit
def _clip_better(x, lo, hi, r, best_scale, best_zero, best_codes, best_err, QMAX: tl.constexpr):
    """Ratio r's trial where it has strictly less error than the best so far (ties keep the earlier ratio)."""
    scale, zero, c, err = _clip_trial(x, lo, hi, r, QMAX)
    better = err < best_err
    return (tl.where(better[None, :], scale, best_scale), tl.where(better[None, :], zero, best_zero),
            tl.where(better[None, :], c, best_codes), tl.where(better, err, best_err))


@triton.jit
def _channel_codes(x, QMAX: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr,
                   R5: tl.constexpr):
    """Per-channel (per column) scale, zero and codes of a block's keys x (BLOCK_SIZE, N): min-max over the
    tokens, then the clip ratios 1, R1..R5 tried in order (``paged.quantize_channels`` and its CLIP_RATIOS)."""
    lo = tl.min(x, 0)  # every token of a filled block is real: no row mask
    hi = tl.max(x, 0)  # padded columns (loaded as 0) are never stored
    scale, zero, c, err = _clip_trial(x, lo, hi, 1.0, QMAX)
    scale, zero, c, err = _clip_better(x, lo, hi, R1, scale, zero, c, err, QMAX)
    scale, zero, c, err = _clip_better(x, lo, hi, R2, scale, zero, c, err, QMAX)
    scale, zero, c, err = _clip_better(x, lo, hi, R3, scale, zero, c, err, QMAX)
    scale, zero, c, err = _clip_better(x, lo, hi, R4, scale, zero, c, err, QMAX)
    scale, zero, c, err = _clip_better(x, lo, hi, R5, scale, zero, c, err, QMAX)
    return tl.reshape(scale, (scale.shape[1],)), tl.reshape(zero, (zero.shape[1],)), c.to(tl.uint8)


@triton.jit
def _write_channel_keys_kernel(x_ptr, blocks_ptr, src_ptr, tail_ptr, data_ptr, params_ptr,
                               sx_t, sx_h, st_s, st_h, st_t, sd_b, sd_h, sd_o, sp_b, sp_h, sp_c,
                               BLOCK_SIZE: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, R1: tl.constexpr,
                               R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr, R5: tl.constexpr):
    """One (filled block, KV head): gather its keys (``KeyWrites.full_src``), quantize them per channel to
    int4 codes (element 2j in the low nibble) and store the codes and each channel's ``[scale, zero]``."""
    c, h = tl.program_id(0), tl.program_id(1)
    i = tl.arange(0, BLOCK_SIZE)
    src = tl.load(src_ptr + c * BLOCK_SIZE + i)  # (BLOCK_SIZE,) int64: a step row >= 0, or tail row -1 - src
    new = src >= 0
    old = tl.where(new, 0, -1 - src)
    x_row = tl.where(new, src, 0) * sx_t + h * sx_h
    tail_row = (old // BLOCK_SIZE) * st_s + h * st_h + (old % BLOCK_SIZE) * st_t
    j = tl.arange(0, D_P // 2)
    ok = j < D // 2
    s_even, z_even, even = _channel_codes(_fp16_keys(x_ptr, tail_ptr, new, x_row, tail_row, 2 * j, ok), 15,
                                          R1, R2, R3, R4, R5)
    s_odd, z_odd, odd = _channel_codes(_fp16_keys(x_ptr, tail_ptr, new, x_row, tail_row, 2 * j + 1, ok), 15,
                                       R1, R2, R3, R4, R5)
    blk = tl.load(blocks_ptr + c)
    dst = data_ptr + blk * sd_b + h * sd_h + i[:, None] * sd_o + j[None, :]
    tl.store(dst, even | (odd << 4), mask=ok[None, :])
    pdst = params_ptr + blk * sp_b + h * sp_h
    tl.store(pdst + 2 * j * sp_c, s_even.to(tl.float16), mask=ok)
    tl.store(pdst + 2 * j * sp_c + 1, z_even.to(tl.float16), mask=ok)
    tl.store(pdst + (2 * j + 1) * sp_c, s_odd.to(tl.float16), mask=ok)
    tl.store(pdst + (2 * j + 1) * sp_c + 1, z_odd.to(tl.float16), mask=ok)


@triton.jit
def _write_tail_kernel(x_ptr, rows_ptr, dst_ptr, tail_ptr, sx_t, sx_h, st_s, st_h, st_t,
                       BLOCK_SIZE: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr):
    """One (key of a partial block, KV head): clamped to fp16's range and stored in fp16 at its tail row."""
    t, h = tl.program_id(0), tl.program_id(1)
    row, dst = tl.load(rows_ptr + t), tl.load(dst_ptr + t)
    d = tl.arange(0, D_P)
    x = _load_clamped(x_ptr + row * sx_t + h * sx_h + d, d < D)
    tail = tail_ptr + (dst // BLOCK_SIZE) * st_s + h * st_h + (dst % BLOCK_SIZE) * st_t
    tl.store(tail + d, x.to(tl.float16), mask=d < D)


def write_kv(kv: LayerKV, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, keys: KeyWrites | None = None) -> None:
    """Store k, v (T, Hkv, D) at ``slots`` (T,) = block * block_size + offset, in the cache's precision;
    int4 keys go where ``keys`` (``PagedBatch.keys``) says instead."""
    _check_kv(kv, k, v, slots, keys)
    if k.shape[0] == 0:
        return
    t, hkv, dim = k.shape
    pairs = ((kv.k, kv.k_params, k), (kv.v, kv.v_params, v))
    if kv.channel_keys:
        _write_channel_keys(kv, _last_dim_contiguous(k), keys)
        pairs = pairs[1:]
    for data, params, x in pairs:
        x = _last_dim_contiguous(x)
        p = params if params is not None else data  # float caches have no params; the pointer goes unused
        _write_kv_kernel[(t, hkv)](x, slots, data, p, x.stride(0), x.stride(1),
                                   data.stride(0), data.stride(1), data.stride(2),
                                   p.stride(0), p.stride(1), p.stride(2),
                                   BLOCK_SIZE=kv.block_size, D=dim, D_P=triton.next_power_of_2(dim), BITS=kv.bits)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(2) == 1 else x.contiguous()  # views of a fused QKV output are fine as they are


def _write_channel_keys(kv: LayerKV, k: torch.Tensor, keys: KeyWrites) -> None:
    """Quantize the blocks this step fills, per channel, then store the keys of partial blocks in their tails;
    in that order, since a filled block may read tail rows that this step's tail writes then reuse."""
    hkv, dim = k.shape[1:]
    tail = kv.k_tail
    const = dict(BLOCK_SIZE=kv.block_size, D=dim, D_P=triton.next_power_of_2(dim))
    if keys.full_blocks.shape[0]:
        _write_channel_keys_kernel[(keys.full_blocks.shape[0], hkv)](
            k, keys.full_blocks, keys.full_src, tail, kv.k, kv.k_params, k.stride(0), k.stride(1), *tail.stride()[:3],
            *kv.k.stride()[:3], *kv.k_params.stride()[:3], **const, **_RATIOS,
            enable_fp_fusion=False)  # no FMA contraction: each operation rounds as torch's do, so codes match
    if keys.tail_rows.shape[0]:
        _write_tail_kernel[(keys.tail_rows.shape[0], hkv)](k, keys.tail_rows, keys.tail_dst, tail, k.stride(0),
                                                           k.stride(1), *tail.stride()[:3], **const)


def _check_kv(kv: LayerKV, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, keys: KeyWrites | None) -> None:
    if k.shape != v.shape or k.dim() != 3:
        raise TpDeployError(f"write_kv: k and v must both be (T, Hkv, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    t, hkv, dim = k.shape
    check_cache(kv, hkv, dim, "write_kv")
    if slots.shape != (t,) or slots.dtype != torch.int64:
        raise TpDeployError(f"write_kv: slots must be ({t},) int64, got {tuple(slots.shape)} {slots.dtype}")
    if kv.channel_keys:
        _check_key_writes(check_keys(keys), kv.block_size)


def _check_key_writes(keys: KeyWrites, block_size: int) -> None:
    c, tt = keys.full_blocks.shape[0], keys.tail_rows.shape[0]
    want = {"full_blocks": (c,), "full_src": (c, block_size), "tail_rows": (tt,), "tail_dst": (tt,)}
    for name, shape in want.items():
        x = getattr(keys, name)
        if x.shape != shape or x.dtype != torch.int64 or not x.is_contiguous():
            raise TpDeployError(f"write_kv: keys.{name} must be a contiguous {shape} int64 tensor, got "
                                f"{tuple(x.shape)} {x.dtype}")
