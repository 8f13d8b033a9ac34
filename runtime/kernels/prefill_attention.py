"""Triton kernels for a prefill step over the paged KV cache: write this step's K/V, then attend.

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

``prefill_attention``: causal (optionally sliding-window) GQA attention of the packed new tokens of
every sequence over that sequence's whole context, read from the cache (chunked prefill: the new
tokens also see the tokens cached by earlier steps; the caller has already written this step's
K/V). FlashAttention-2 forward (Dao 2023; Triton's fused-attention tutorial): one program owns
BLOCK_M query rows of one sequence and one query head, streams BLOCK_N keys at a time, keeps the
online-softmax running max ``m``, sum ``l`` and fp32 accumulator, and divides once at the end.
Keys are looked up per key through the block table (``block_size`` may be smaller than BLOCK_N)
and int8/int4 are dequantized in registers in fp32, then cast to q's dtype, as the reference does;
int4 keys of a sequence's partial last block come from its tail slot ``pb.tails[b]`` instead
(``tiles.load_channel_keys``).

Grid ``(query tiles, Hq)``. A sequence with ``n`` new tokens owns ``ceil(n / BLOCK_M)`` tiles; the
wrapper maps tile -> (sequence, first packed row) with a few torch ops on the device
(``_tile_map``: cumsum + searchsorted, no host sync). The grid is sized by an upper bound on the
tile count, ``min(T, ceil(T / BLOCK_M) + B)``; the spare tiles get zero valid rows and do nothing.

Layouts: q, out ``(T, Hq, D)``; cache data ``(num_blocks, Hkv, block_size, packed_dim)``; params
``(num_blocks, Hkv, block_size, 2)`` fp16, but ``(num_blocks, Hkv, D, 2)`` for int4 keys, whose partial
blocks are in ``k_tail (slots, Hkv, block_size, D)`` fp16 (``runtime/kv/format.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from formats.errors import TpDeployError
from runtime.kernels.paged import CLIP_RATIOS, KeyWrites, LayerKV, PagedBatch, check_keys, check_tails
from runtime.kernels.tiles import check_channel_keys, load_channel_keys, load_tile, tail_args

_LOG2E = 1.4426950408889634  # 1/ln 2: softmax runs on exp2, so scores are pre-scaled by it
_MASKED = tl.constexpr(-1.0e30)  # finite: a row's all-masked first tile adds exp2(0) junk, not NaN; alpha=0 clears it
_BLOCK_N = 64  # keys per step: a whole number of MMA tiles, and K+V tiles of D=128 fp16 fit shared memory
_BLOCK_N_FP32_D128 = 32  # fp32 K+V tiles of 64 x 128 need 115 KB of shared memory; sm_86/89 have 100 KB
_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # others padded to a power of two in registers; 16: the tiny test models'
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
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


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_F32 widens bf16 operands first: the interpreter multiplies
    bf16 as raw uint16 bits; bf16 products are exact in fp32, so the result is what the GPU gives."""
    if DOT_F32:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _prefill_kernel(q_ptr, o_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, tail_ptr, tails_ptr,
                    tables_ptr, seq_lens_ptr, query_start_ptr, tile_seq_ptr, tile_row_ptr,
                    sq_t, sq_h, so_t, so_h, sd_b, sd_h, sd_o, kp_b, kp_h, kp_o, sp_b, sp_h, sp_o, kt_s, kt_h, kt_t,
                    st_b, qk_scale, window,
                    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                    BITS: tl.constexpr, WINDOWED: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHANNEL_KEYS: tl.constexpr):
    tile, h = tl.program_id(0), tl.program_id(1)
    kvh = h // GROUP
    b = tl.load(tile_seq_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    ctx = tl.load(seq_lens_ptr + b)
    slot = 0
    if CHANNEL_KEYS:  # int4 keys: positions from n_full on are in the sequence's tail slot
        slot = tl.load(tails_ptr + b).to(tl.int64)
    n_full = ctx // BLOCK_SIZE * BLOCK_SIZE
    q_end = tl.load(query_start_ptr + b + 1)
    n_rows = tl.minimum(q_end - row0, BLOCK_M)  # <= 0 for the spare tiles past the last one
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_P)  # head_dim padded to a power of two: masked on load and store
    row_ok = m < n_rows
    io_mask = row_ok[:, None] & (d[None, :] < D)
    rows = row0 + m
    first_pos = ctx - (q_end - row0)  # new tokens are the last q_end - query_start[b] of the context
    qpos = first_pos + m  # (BLOCK_M,)
    q = tl.load(q_ptr + rows[:, None] * sq_t + h * sq_h + d[None, :], mask=io_mask, other=0.0)

    hi = tl.where(n_rows > 0, first_pos + n_rows, 0)  # causal: nothing past the tile's last query
    lo = 0
    if WINDOWED:  # keys before the first query's window are invisible to every row of the tile
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_P), tl.float32)
    table = tables_ptr + b * st_b
    for start in range(lo, hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        k_ok = kpos < hi
        blk = tl.load(table + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        off = kpos % BLOCK_SIZE
        if CHANNEL_KEYS:
            k = load_channel_keys(k_ptr, kp_ptr, tail_ptr, blk, off, kpos, k_ok, kvh, slot, n_full,
                                  sd_b, sd_h, sd_o, 1, kp_b, kp_h, kp_o, 1, kt_s, kt_h, kt_t,
                                  D, D_P, BLOCK_N, BLOCK_SIZE >= BLOCK_N, q.dtype)
        else:
            k = load_tile(k_ptr, kp_ptr, blk, off, k_ok, kvh, sd_b, sd_h, sd_o, 1, kp_b, kp_h, kp_o, 1,
                          BITS, D, D_P, BLOCK_N, q.dtype)
        s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_F32) * qk_scale  # (BLOCK_M, BLOCK_N)
        visible = kpos[None, :] <= qpos[:, None]
        if WINDOWED:
            visible &= kpos[None, :] > qpos[:, None] - window
        s = tl.where(visible, s, _MASKED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_ptr, vp_ptr, blk, off, k_ok, kvh, sd_b, sd_h, sd_o, 1, sp_b, sp_h, sp_o, 1,
                      BITS, D, D_P, BLOCK_N, q.dtype)
        acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v, DOT_PRECISION, DOT_F32)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i == 0 only in spare tiles, whose rows are not stored
    tl.store(o_ptr + rows[:, None] * so_t + h * so_h + d[None, :], out.to(o_ptr.dtype.element_ty), mask=io_mask)


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


def prefill_attention(q: torch.Tensor, kv: LayerKV, pb: PagedBatch, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """q (T, Hq, D) packed by ``pb.query_start`` -> (T, Hq, D); new tokens sit at the end of each context."""
    _check_attention(q, kv, pb, window)
    out = torch.empty_like(q)
    t, hq, dim = q.shape
    if t == 0:
        return out
    d_p = triton.next_power_of_2(dim)
    # >= 16 rows for tl.dot on GPU; D=256 halves the tiles so K, V and the accumulator fit (not yet timed)
    block_m = max(16, min(64 if d_p < 256 else 32, triton.next_power_of_2(pb.max_query_len)))
    block_n = _BLOCK_N_FP32_D128 if (q.dtype == torch.float32 and d_p >= 128) or d_p >= 256 else _BLOCK_N
    tile_seq, tile_row = _tile_map(pb.query_start, block_m, t)
    k_params, v_params = (kv.k_params, kv.v_params) if kv.quantized else (kv.k, kv.v)
    tail, tails, *t_strides = tail_args(kv, pb.tails, pb.seq_lens)
    tables = pb.block_tables
    _prefill_kernel[(tile_seq.shape[0], hq)](
        q, out, kv.k, kv.v, k_params, v_params, tail, tails, tables, pb.seq_lens, pb.query_start, tile_seq, tile_row,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *kv.k.stride()[:3], *k_params.stride()[:3],
        *v_params.stride()[:3], *t_strides, tables.stride(0), scale * _LOG2E, window or 0,
        GROUP=hq // kv.k.shape[1], BLOCK_SIZE=kv.block_size, D=dim, D_P=d_p, BITS=kv.bits,
        WINDOWED=window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 models get fp32 dots, not TF32
        DOT_F32=q.dtype == torch.bfloat16 and q.device.type == "cpu",  # on CPU = interpreted: see _dot
        BLOCK_M=block_m, BLOCK_N=block_n, CHANNEL_KEYS=kv.channel_keys)
    return out


def _tile_map(query_start: torch.Tensor, block_m: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each grid tile: its sequence and its first packed query row (spare tiles: last sequence, row T)."""
    news = query_start[1:] - query_start[:-1]  # (B,)
    tiles = (news + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)  # (B,) tile index one past each sequence's last tile
    num_seqs = news.shape[0]
    grid = min(num_tokens, -(-num_tokens // block_m) + num_seqs)  # every tile holds >= 1 of the T tokens
    idx = torch.arange(grid, device=query_start.device, dtype=ends.dtype)
    raw = torch.searchsorted(ends, idx, right=True)  # (grid,) == B for spare tiles
    seq = raw.clamp(max=num_seqs - 1)
    row = query_start[seq] + (idx - (ends[seq] - tiles[seq])) * block_m
    row = torch.where(raw < num_seqs, row, query_start[-1])
    return seq.to(torch.int32), row.to(torch.int32)


def _check_kv(kv: LayerKV, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, keys: KeyWrites | None) -> None:
    if k.shape != v.shape or k.dim() != 3:
        raise TpDeployError(f"write_kv: k and v must both be (T, Hkv, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    t, hkv, dim = k.shape
    _check_cache(kv, hkv, dim, "write_kv")
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


def _check_attention(q: torch.Tensor, kv: LayerKV, pb: PagedBatch, window: int | None) -> None:
    if q.dim() != 3 or q.dtype not in _FLOATS:
        raise TpDeployError(f"prefill_attention: q must be (T, Hq, D) in fp32/fp16/bf16, got "
                            f"{tuple(q.shape)} {q.dtype}")
    hkv = kv.k.shape[1]
    _check_cache(kv, hkv, q.shape[2], "prefill_attention")
    check_tails(kv, pb.tails, pb.seq_lens.shape[0], "prefill_attention")
    if q.shape[1] % hkv:
        raise TpDeployError(f"prefill_attention: {q.shape[1]} query heads are not a multiple of {hkv} KV heads")
    if q.stride(2) != 1:
        raise TpDeployError("prefill_attention: q's head_dim must be contiguous (stride 1)")
    if window is not None and window < 1:
        raise TpDeployError(f"prefill_attention: window must be >= 1 or None, got {window}")
    if pb.query_start.dtype != torch.int32 or pb.query_start.shape[0] != pb.seq_lens.shape[0] + 1:
        raise TpDeployError("prefill_attention: query_start must be (B + 1,) int32 for (B,) seq_lens")
    tables = pb.block_tables
    if tables.dtype != torch.int32 or pb.seq_lens.dtype != torch.int32 or tables.stride(1) != 1:
        raise TpDeployError(f"prefill_attention: block_tables (row-contiguous) and seq_lens must be int32, got "
                            f"{tables.dtype} stride {tables.stride()} and {pb.seq_lens.dtype}")


def _check_cache(kv: LayerKV, hkv: int, dim: int, who: str) -> None:
    if dim not in _HEAD_DIMS:
        raise TpDeployError(f"{who}: head_dim {dim} is not supported; the kernels are built for {_HEAD_DIMS}")
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
