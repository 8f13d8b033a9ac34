"""Triton kernel for a prefill step over the paged KV cache (``write_kv.py`` writes the step's K/V first).

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
from runtime.kernels.paged import LayerKV, PagedBatch, check_tails
from runtime.kernels.tiles import check_cache, load_channel_keys, load_tile, tail_args

_LOG2E = 1.4426950408889634  # 1/ln 2: softmax runs on exp2, so scores are pre-scaled by it
_MASKED = tl.constexpr(-1.0e30)  # finite: a row's all-masked first tile adds exp2(0) junk, not NaN; alpha=0 clears it
_BLOCK_N = 64  # keys per step: a whole number of MMA tiles, and K+V tiles of D=128 fp16 fit shared memory
_BLOCK_N_FP32_D128 = 32  # fp32 K+V tiles of 64 x 128 need 115 KB of shared memory; sm_86/89 have 100 KB
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


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


def _check_attention(q: torch.Tensor, kv: LayerKV, pb: PagedBatch, window: int | None) -> None:
    if q.dim() != 3 or q.dtype not in _FLOATS:
        raise TpDeployError(f"prefill_attention: q must be (T, Hq, D) in fp32/fp16/bf16, got "
                            f"{tuple(q.shape)} {q.dtype}")
    hkv = kv.k.shape[1]
    check_cache(kv, hkv, q.shape[2], "prefill_attention")
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
