"""Paged decode attention (flash-decoding): one query per sequence over its block table.

Algorithm (Dao et al., "Flash-Decoding for long-context inference", 2023; vLLM's paged attention v2):

1. ``_split_kernel``, grid ``(B, Hkv, num_splits)``: each program takes one sequence, one KV head and
   a contiguous run of that sequence's keys (whole ``BLOCK_N`` tiles, so whole cache blocks), and runs
   the online softmax of the Triton fused-attention tutorial over it, with scores in log2 units
   (``exp2`` is the native instruction). It writes the partial ``(max, sum, acc)`` to fp32 scratch,
   or, with a single split, the normalised output directly (no second launch for short contexts).
2. ``_reduce_kernel``, grid ``(B, Hq)``: rescales the partials to the global max and normalises.

GQA: a program serves the whole group of ``Hq / Hkv`` query heads that share its KV head, so each
K/V tile is read from memory once per group, not once per query head. The group is padded to at
least 16 rows and multiplied with ``tl.dot``: tensor cores need M >= 16, and the padding rows cost
nothing that matters in a memory-bound kernel, whereas a broadcast-multiply of a (group, N, D) block
would spill registers on the GPU for groups of 8 at D=128. The interpreter runs the same code.

Layouts (``runtime/kv/format.py``): q ``(B, Hq, D)``; K/V data ``(num_blocks, Hkv, block_size,
packed_dim)`` in a float dtype, or uint8 int8 codes (``packed_dim = D``) or int4 pairs (``D / 2``,
element ``2j`` in the low nibble); params ``(num_blocks, Hkv, block_size, 2)`` fp16 ``[scale, zero]``
per token. int4 keys differ (``LayerKV.channel_keys``): params ``(num_blocks, Hkv, D, 2)``, one per
channel of a full block, and a sequence's partial last block (positions from ``seq_len // block_size *
block_size`` on) is read from its tail slot ``tails[b]`` of ``k_tail (slots, Hkv, block_size, D)`` fp16
instead of the codes (``tiles.load_channel_keys``). Codes are dequantized in registers as ``code * scale
+ zero`` in fp32, then cast to q's dtype, as the reference does. Only the blocks of a sequence's table
that hold keys it can see are read. A head_dim that is not a power of two (80, 96) is padded to one in
registers, masked on load and store.

Checked without a GPU (compiled for sm_90 by Triton 3.9, default 4 warps, arguments specialized as at
launch): no register spills at D=128 with fp16/bf16 q, int4 channel keys included (180 registers at
block_size 64); fp32 q and D=80 spill, as they did before int4 keys were per channel. Not yet timed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from formats.errors import TpDeployError
from runtime.kernels.paged import LayerKV, check_tails
from runtime.kernels.tiles import check_channel_keys, load_channel_keys, load_tile, tail_args

BLOCK_N = 64  # keys per tile: a whole number of 16-token cache blocks, or a slice of a larger one
_MIN_DOT_ROWS = 16  # tl.dot's smallest M on tensor cores: GQA groups are padded up to it
_LOG2E = 1.4426950408889634  # 1/ln 2: exp(x) == exp2(x * log2e)
_SMS = 132  # streaming multiprocessors of an H100 SXM, the GPU the heuristic is sized for
_WAVES = 2  # two programs per SM, so one's loads overlap the other's math
_MIN_TILES_PER_SPLIT = 4  # below 256 keys a split's partial write and reduce cost more than it saves
_MAX_SPLITS = 64  # beyond this the reduce's reads outweigh the extra parallelism at any length


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """a @ b with fp32 accumulation; F32 multiplies in true fp32 (no tf32), else in the inputs' 16-bit type."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, kp_ptr, vp_ptr, tail_ptr, tails_ptr, table_ptr, lens_ptr, out_ptr, m_ptr,
                  l_ptr, acc_ptr, qk_scale, window, num_splits, s_qb, s_qh, s_qd, s_b, s_h, s_t, s_d,
                  kp_b, kp_h, kp_t, kp_x, vp_b, vp_h, vp_t, vp_x, t_s, t_h, t_t, s_tb,
                  GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                  BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  SINGLE: tl.constexpr, DOT_F32: tl.constexpr, CHANNEL_KEYS: tl.constexpr):
    """Online softmax of one (sequence, KV head group) over one split's tiles of keys."""
    b, hk, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n = tl.load(lens_ptr + b)
    slot = 0
    if CHANNEL_KEYS:  # int4 keys: positions from n_full on are in the sequence's tail slot
        slot = tl.load(tails_ptr + b).to(tl.int64)
    n_full = n // BLOCK_SIZE * BLOCK_SIZE
    start = 0
    if HAS_WINDOW:  # key j is visible iff n - 1 - window < j <= n - 1
        start = tl.maximum(n - window, 0)
    first, end = start // BLOCK_N, tl.cdiv(n, BLOCK_N)
    per = tl.cdiv(end - first, num_splits)  # each sequence spreads its own tiles over all splits
    lo = first + s * per
    hi = tl.minimum(lo + per, end)

    rows = tl.arange(0, GROUP_P)
    heads = hk * GROUP + rows  # (GROUP_P,) query heads of this KV head; rows >= GROUP are padding
    d = tl.arange(0, D_P)
    io_mask = (rows[:, None] < GROUP) & (d[None, :] < D)
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :] * s_qd, mask=io_mask, other=0)

    m_i = tl.full((GROUP_P,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_P,), tl.float32)
    acc = tl.zeros((GROUP_P, D_P), tl.float32)
    for t in range(lo, hi):
        tok = t * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = (tok >= start) & (tok < n)
        blk = tl.load(table_ptr + b * s_tb + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        off = tok % BLOCK_SIZE
        if CHANNEL_KEYS:
            k = load_channel_keys(k_ptr, kp_ptr, tail_ptr, blk, off, tok, valid, hk, slot, n_full,
                                  s_b, s_h, s_t, s_d, kp_b, kp_h, kp_t, kp_x, t_s, t_h, t_t,
                                  D, D_P, BLOCK_N, BLOCK_SIZE >= BLOCK_N, q.dtype)
        else:
            k = load_tile(k_ptr, kp_ptr, blk, off, valid, hk, s_b, s_h, s_t, s_d, kp_b, kp_h, kp_t, kp_x,
                          BITS, D, D_P, BLOCK_N, q.dtype)
        qk = _dot(q, tl.trans(k), DOT_F32) * qk_scale  # (GROUP_P, BLOCK_N) log2 units
        qk = tl.where(valid[None, :], qk, float("-inf"))
        # every tile in [lo, hi) holds a visible key, so m_new is finite and alpha never NaN
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_ptr, vp_ptr, blk, off, valid, hk, s_b, s_h, s_t, s_d, vp_b, vp_h, vp_t, vp_x,
                      BITS, D, D_P, BLOCK_N, q.dtype)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_F32)
        m_i = m_new

    hq = tl.num_programs(1) * GROUP
    if SINGLE:  # an empty sequence (l_i == 0) gets zeros rather than 0/0
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + (b * hq + heads[:, None]) * D + d[None, :], o.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        part = (b * hq + heads) * num_splits + s  # (GROUP_P,) row of each head's partial
        tl.store(m_ptr + part, m_i, mask=rows < GROUP)
        tl.store(l_ptr + part, l_i, mask=rows < GROUP)
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=io_mask)


@triton.jit
def _reduce_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, num_splits, D: tl.constexpr, D_P: tl.constexpr,
                   SPLITS_P: tl.constexpr):
    """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s for one (sequence, query head)."""
    row = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    sp = tl.arange(0, SPLITS_P)
    d = tl.arange(0, D_P)
    ok = sp < num_splits
    m = tl.load(m_ptr + row * num_splits + sp, mask=ok, other=float("-inf"))
    l = tl.load(l_ptr + row * num_splits + sp, mask=ok, other=0.0)
    acc = tl.load(acc_ptr + (row * num_splits + sp)[:, None] * D + d[None, :], mask=ok[:, None] & (d[None, :] < D),
                  other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # empty sequence: every weight 0, not NaN
    w = tl.exp2(m - m_max)  # empty splits (m = -inf) weigh 0
    total = tl.sum(l * w, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


def pick_num_splits(batch: int, kv_heads: int, max_keys: int) -> int:
    """Splits per sequence: enough programs to give every SM two, but never a split under 256 keys.

    Decode is memory-bound and a (sequence, KV head) program streams its keys alone, so a batch of
    one with 8 KV heads would use 8 of 132 SMs; splitting the keys is what fills the rest. Large
    batches already fill the GPU and short contexts are not worth a second launch: 1 split."""
    tiles = -(-max_keys // BLOCK_N)
    want = -(-_SMS * _WAVES // max(batch * kv_heads, 1))
    return max(1, min(want, tiles // _MIN_TILES_PER_SPLIT, _MAX_SPLITS))


def decode_attention(q: torch.Tensor, kv: LayerKV, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     window: int | None = None, tails: torch.Tensor | None = None,
                     num_splits: int | None = None) -> torch.Tensor:
    """q (B, Hq, D), one query per sequence at position seq_len - 1 -> (B, Hq, D) in q's dtype.

    ``tails`` (B,) int32: each sequence's tail slot, required for an int4 cache (``PagedBatch.tails``).
    ``num_splits`` None picks one from the table width (an upper bound of the longest sequence that
    needs no device-to-host sync); a sequence of length 0 gets zeros."""
    _check(q, kv, block_tables, seq_lens, window, tails, num_splits)
    batch, hq, dim = q.shape
    hkv, block_size = kv.k.shape[1], kv.block_size
    if num_splits is None:
        max_keys = block_tables.shape[1] * block_size
        num_splits = pick_num_splits(batch, hkv, max_keys if window is None else min(max_keys, window + BLOCK_N))
    group = hq // hkv
    out = torch.empty((batch, hq, dim), dtype=q.dtype, device=q.device)
    if num_splits == 1:
        m = l = acc = out  # unused: the split kernel normalises and writes out itself
    else:
        m = torch.empty((batch, hq, num_splits), dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty((batch, hq, num_splits, dim), dtype=torch.float32, device=q.device)
    params = (kv.k_params, kv.v_params) if kv.quantized else (kv.k, kv.v)  # placeholders for float caches
    p_strides = (*params[0].stride(), *params[1].stride()) if kv.quantized else (0,) * 8
    tail, tails, *t_strides = tail_args(kv, tails, seq_lens)
    d_p = triton.next_power_of_2(dim)
    _split_kernel[(batch, hkv, num_splits)](
        q, kv.k, kv.v, params[0], params[1], tail, tails, block_tables, seq_lens, out, m, l, acc,
        scale * _LOG2E, window or 0, num_splits, *q.stride(), *kv.k.stride(), *p_strides, *t_strides,
        block_tables.stride(0),
        GROUP=group, GROUP_P=max(_MIN_DOT_ROWS, triton.next_power_of_2(group)), D=dim, D_P=d_p, BITS=kv.bits,
        BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N, HAS_WINDOW=window is not None, SINGLE=num_splits == 1,
        DOT_F32=_dot_in_fp32(q), CHANNEL_KEYS=kv.channel_keys)
    if num_splits > 1:
        _reduce_kernel[(batch, hq)](m, l, acc, out, num_splits, D=dim, D_P=d_p,
                                    SPLITS_P=triton.next_power_of_2(num_splits))
    return out


def _dot_in_fp32(q: torch.Tensor) -> bool:
    """fp32 q multiplies in fp32, not tf32 (it is the precision tests hold the others to). bf16 too on
    CPU: Triton 3.9's interpreter multiplies bf16 as their raw uint16 bits (``create_dot``)."""
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and q.device.type == "cpu")


_Q_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q, kv: LayerKV, block_tables, seq_lens, window, tails, num_splits) -> None:
    """Raise a TpDeployError naming the first argument the kernels cannot take."""
    batch, hq, dim = q.shape if q.dim() == 3 else (None, None, None)
    if dim is None or q.dtype not in _Q_DTYPES:
        raise TpDeployError(f"decode_attention: q must be (B, Hq, D) fp32/fp16/bf16, got {tuple(q.shape)} {q.dtype}")
    _, hkv, block_size, packed = kv.k.shape
    if hq % hkv:
        raise TpDeployError(f"decode_attention: {hq} query heads are not a multiple of {hkv} KV heads")
    want = dim // 2 if kv.bits == 4 else dim
    if packed != want or kv.v.shape != kv.k.shape or kv.v.stride() != kv.k.stride():
        raise TpDeployError(f"decode_attention: K/V {tuple(kv.k.shape)}, {tuple(kv.v.shape)} do not hold "
                            f"head_dim {dim} at {kv.bits} bits (last dim {want}, K and V alike)")
    if kv.channel_keys:
        check_channel_keys(kv, dim, "decode_attention")
    elif kv.quantized and (kv.k_params is None or kv.v_params is None or kv.k_params.shape != kv.v_params.shape):
        raise TpDeployError(f"decode_attention: an int{kv.bits} cache needs K and V params of one layout")
    if block_size & (block_size - 1):
        raise TpDeployError(f"decode_attention: block_size must be a power of two, got {block_size}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise TpDeployError(f"decode_attention: block_tables {tuple(block_tables.shape)} and seq_lens "
                            f"{tuple(seq_lens.shape)} must be (B, max_blocks) and (B,) for B = {batch}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise TpDeployError(f"decode_attention: block_tables and seq_lens must be int32, "
                            f"got {block_tables.dtype} and {seq_lens.dtype}")
    check_tails(kv, tails, batch, "decode_attention")
    if window is not None and window < 1:
        raise TpDeployError(f"decode_attention: window must be >= 1 or None, got {window}")
    if num_splits is not None and num_splits < 1:
        raise TpDeployError(f"decode_attention: num_splits must be >= 1 or None, got {num_splits}")
