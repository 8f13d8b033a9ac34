"""Fused mixture-of-experts in Triton: two grouped GEMMs over tokens sorted by expert, fp32 accumulation.

The math and numerics are ``moe.moe_reference``'s (transformers' expert loop): for each local expert e,
h = act(x_e @ gate_e.T) * (x_e @ up_e.T) and y = h @ down_e.T, each rounded to x's dtype, times the
routing weight in x's dtype, summed over the top-k in fp32.

Layouts (``moe.py``): dense w_gate_up (E_r, 2I, H) and w_down (E_r, H, I), read through their strides
(the workspace's w_down is a permuted (H, E_r*I) view: never copied); or ``Int4Experts``, qweight
(E_r, K/8, N) with scales/zeros (E_r, K/G, N), dequantized in registers by w4a16's ``_dequant_tile``
(the same bits as ``formats.int4.dequantize``). That helper takes one row stride for the three parts and
unit column stride, which the workspace's views (and stacked tensors) have; ``_check`` says so otherwise.

Algorithm (the design of vLLM's fused_moe, written anew):
1. ``align`` (torch ops, no host sync): the T*k assignments (flat index t*k + j) are sorted by local
   expert and each expert's run is padded to a multiple of BLOCK_M with the sentinel T*k, so every
   BLOCK_M block of ``sorted_ids`` belongs to one expert, ``block_expert[b]``. The grid is sized by an
   upper bound on the block count, so nothing waits for the GPU; blocks past the end carry -1 and exit.
2. ``_gate_up_kernel``: a program owns (block, column tile) of the intermediate. It gathers its rows of x
   (token = assignment // k), runs the K loop against expert e's gate and up column tiles at once (one x
   tile, two fp32 accumulators), rounds both to x's dtype, and stores act(gate) * up at the
   assignment's row of h (T*k, I).
3. ``_down_kernel``: h @ down_e.T the same way, the routing weight multiplied in the epilogue, stored at
   the assignment's row of y (T*k, H), which starts at zero (off-rank assignments stay zero).
4. y.view(T, k, H) is summed over k in fp32 and cast to x's dtype (torch).
Every rounding of the reference happens here too (gate, up, act, act * up, down, * weight), so only the
order of the fp32 sums differs. Triton's CPU interpreter (how the tests run) truncates fp32 -> bf16 casts;
there ``_round`` rounds to nearest-even by hand, so the CPU tests check the numerics a GPU computes.

Launch configs come from a small fixed table keyed by the rows an expert gets on average (T*k / E_r, the
M of each expert's GEMM), no autotuning. The table is a first guess, not yet tuned on a GPU
(``tests/bench/bench_moe.py`` measures it). Grouped tile order (``w4a16._tile_ids``): GROUP_M row blocks,
mostly of one expert in prefill, take the same weight column tile back to back, so it is read from L2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from formats.errors import TpDeployError
from runtime.kernels import moe
from runtime.kernels.moe import Experts, Int4Experts
from runtime.kernels.w4a16 import _dequant_tile, _tile_ids

_INTERPRET = triton.knobs.runtime.interpret  # how triton.jit built the kernels below, fixed at import
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_MIN_DOT = 16  # tl.dot's smallest tile side


@dataclass(frozen=True)
class Config:
    block_m: int  # rows per block; each expert's run of rows is padded to a multiple of it
    block_n: int
    block_k: int  # a power of two >= 16; cut to divide G for int4 (a K tile inside one group)
    group_m: int = 8  # row blocks visited per weight column tile before moving along N (L2 reuse)
    num_warps: int = 4
    num_stages: int = 3


# (largest rows per expert, config), first match wins: decode has ~1 row per hit expert, so short blocks
# and long K steps (the weights are the traffic); prefill grows the blocks to reuse each weight tile.
# Shared memory per stage: the gate_up kernel holds two weight tiles, an int4 one as unpacked-height int32
# words (4 bytes each); 16x64x128 at 3 stages is w4a16's decode footprint (68 KiB a stage), which compiles
# on an H200, and the others stay below it.
_CONFIGS = ((16, Config(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=3)),
            (64, Config(block_m=32, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=4)),
            (math.inf, Config(block_m=64, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3)))


@triton.jit
def _block_rows(sorted_ptr, block_expert_ptr, pid_m, n_assign, BLOCK_M: tl.constexpr):
    """This block's expert (-1: unused) and assignment indices (int64; n_assign marks padding)."""
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    ids = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    return e, ids, ids < n_assign


@triton.jit
def _a_tile(a_ptr, rows, mask_m, stride_m, k0, K, BLOCK_K: tl.constexpr):
    """Gathered rows of the activations, columns k0 .. k0 + BLOCK_K (masked past K)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = mask_m[:, None] & (offs_k < K)[None, :]
    return tl.load(a_ptr + rows[:, None] * stride_m + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _b_tile(w_ptr, s_ptr, z_ptr, k0, K, offs_n, mask_n, stride_k, stride_n, G: tl.constexpr,
            BLOCK_K: tl.constexpr, INT4: tl.constexpr, W_DTYPE: tl.constexpr, BY_HAND: tl.constexpr):
    """One expert's W as a (BLOCK_K, BLOCK_N) tile, rows k0..: int4 dequantized, or dense (N, K) read transposed."""
    if INT4:  # K is a multiple of G, which BLOCK_K divides: no K mask; stride_k is the packed row stride
        w = _dequant_tile(w_ptr, s_ptr, z_ptr, k0, stride_k, offs_n, mask_n, G, BLOCK_K, tl.float32)  # exact
        b = _round(w, W_DTYPE, BY_HAND)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & mask_n[None, :]
        b = tl.load(w_ptr + offs_k[:, None] * stride_k + offs_n[None, :] * stride_n, mask=mask, other=0.0)
    return b


@triton.jit
def _round(v, DTYPE: tl.constexpr, BY_HAND: tl.constexpr):
    """v rounded to nearest-even in DTYPE. BY_HAND (bf16 in the interpreter, whose fp32 -> bf16 cast
    truncates): add half an ulp of bf16, plus one if the kept last bit is odd, and keep the top 16 bits."""
    if BY_HAND:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        r = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        r = v.to(DTYPE)
    return r


@triton.jit
def _act_mul(acc_gate, acc_up, DTYPE: tl.constexpr, ACT: tl.constexpr, BY_HAND: tl.constexpr):
    """act(gate) * up from fp32 sums, rounded to DTYPE after each step, as torch computes on DTYPE tensors."""
    g = _round(acc_gate, DTYPE, BY_HAND).to(tl.float32)
    if ACT == "silu":
        a = g * tl.sigmoid(g)
    else:  # gelu_tanh: x (1 + tanh(u)) / 2 = x sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3)
        a = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))  # 2 sqrt(2 / pi)
    up = _round(acc_up, DTYPE, BY_HAND).to(tl.float32)
    return _round(_round(a, DTYPE, BY_HAND).to(tl.float32) * up, DTYPE, BY_HAND)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, z_ptr, sorted_ptr, block_expert_ptr, h_ptr, n_assign, rows_padded, N, K,
                    topk, stride_xm, stride_we, stride_wk, stride_wn, stride_se, stride_ze, G: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    INT4: tl.constexpr, ACT: tl.constexpr, DOT_DTYPE: tl.constexpr, BY_HAND: tl.constexpr):
    """h[assignment, n tile] = act(x[token] @ gate_e) * (x[token] @ up_e) for one block of one expert; N = I,
    so gate is columns [0, N) of the expert's gate_up and up [N, 2N)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), rows_padded, N, BLOCK_M, BLOCK_N, GROUP_M)
    e, ids, mask_m = _block_rows(sorted_ptr, block_expert_ptr, pid_m, n_assign, BLOCK_M)
    if e < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_ptr += e * stride_we
    s_ptr += e * stride_se
    z_ptr += e * stride_ze
    tokens = ids // topk
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _a_tile(x_ptr, tokens, mask_m, stride_xm, k0, K, BLOCK_K)
        bg = _b_tile(w_ptr, s_ptr, z_ptr, k0, K, offs_n, mask_n, stride_wk, stride_wn, G, BLOCK_K, INT4, a.dtype,
                     BY_HAND)
        bu = _b_tile(w_ptr, s_ptr, z_ptr, k0, K, offs_n + N, mask_n, stride_wk, stride_wn, G, BLOCK_K, INT4, a.dtype,
                     BY_HAND)
        # ieee: fp32 activations must not drop to tf32 (ignored for 16-bit inputs).
        acc_g = tl.dot(a.to(DOT_DTYPE), bg.to(DOT_DTYPE), acc_g, input_precision="ieee")
        acc_u = tl.dot(a.to(DOT_DTYPE), bu.to(DOT_DTYPE), acc_u, input_precision="ieee")
    h = _act_mul(acc_g, acc_u, h_ptr.dtype.element_ty, ACT, BY_HAND)
    tl.store(h_ptr + ids[:, None] * N + offs_n[None, :], h, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, z_ptr, sorted_ptr, block_expert_ptr, weights_ptr, y_ptr, n_assign, rows_padded,
                 N, K, stride_we, stride_wk, stride_wn, stride_se, stride_ze, G: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, INT4: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, BY_HAND: tl.constexpr):
    """y[assignment, n tile] = (h[assignment] @ down_e) * routing weight, each rounded to y's dtype."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), rows_padded, N, BLOCK_M, BLOCK_N, GROUP_M)
    e, ids, mask_m = _block_rows(sorted_ptr, block_expert_ptr, pid_m, n_assign, BLOCK_M)
    if e < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_ptr += e * stride_we
    s_ptr += e * stride_se
    z_ptr += e * stride_ze
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _a_tile(h_ptr, ids, mask_m, K, k0, K, BLOCK_K)
        b = _b_tile(w_ptr, s_ptr, z_ptr, k0, K, offs_n, mask_n, stride_wk, stride_wn, G, BLOCK_K, INT4, a.dtype,
                    BY_HAND)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
    dtype = y_ptr.dtype.element_ty
    weight = _round(tl.load(weights_ptr + ids, mask=mask_m, other=0.0), dtype, BY_HAND).to(tl.float32)
    y = _round(_round(acc, dtype, BY_HAND).to(tl.float32) * weight[:, None], dtype, BY_HAND)
    tl.store(y_ptr + ids[:, None] * N + offs_n[None, :], y, mask=mask_m[:, None] & mask_n[None, :])


def fused_moe(x: torch.Tensor, w_gate_up: Experts, w_down: Experts, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, expert_start: int = 0, activation: str = "silu", *,
              config: Config | None = None) -> torch.Tensor:
    """(T, H) in x's dtype: this rank's experts' share of the MoE output; ``config`` overrides the table."""
    e_r, inter, hidden = moe.check(x, w_gate_up, w_down, topk_ids, topk_weights, activation)
    _check(x, w_gate_up, w_down, topk_ids, topk_weights)
    t, k = topk_ids.shape
    cfg = config or pick_config(t * k, e_r)
    sorted_ids, block_expert = align(topk_ids, expert_start, e_r, cfg.block_m)
    x = x if x.stride(1) == 1 else x.contiguous()  # rows are gathered by stride; columns must be unit-stride
    n_assign, rows_padded = t * k, sorted_ids.numel()
    h = torch.empty((n_assign, inter), dtype=x.dtype, device=x.device)  # (T*k, I): off-rank rows never read
    grid, parts, strides, meta = _launch_args(w_gate_up, x.dtype, rows_padded, inter, hidden, cfg)
    _gate_up_kernel[grid](x, *parts, sorted_ids, block_expert, h, n_assign, rows_padded, inter, hidden, k,
                          x.stride(0), *strides, ACT=activation, **meta)
    y = torch.zeros((n_assign, hidden), dtype=x.dtype, device=x.device)  # (T*k, H): off-rank rows stay zero
    weights = topk_weights.flatten().contiguous()  # (T*k,)
    grid, parts, strides, meta = _launch_args(w_down, x.dtype, rows_padded, hidden, inter, cfg)
    _down_kernel[grid](h, *parts, sorted_ids, block_expert, weights, y, n_assign, rows_padded, hidden, inter,
                       *strides, **meta)
    return y.view(t, k, hidden).sum(1, dtype=torch.float32).to(x.dtype)


def pick_config(n_assign: int, n_experts: int) -> Config:
    """The table's config for T*k assignments over E_r local experts (rows per expert on average)."""
    rows = -(-n_assign // n_experts)
    return next(c for top, c in _CONFIGS if rows <= top)


def align(topk_ids: torch.Tensor, expert_start: int, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids (blocks * BLOCK_M,) int32, block_expert (blocks,) int32): each expert's assignments in a
    run padded to a multiple of BLOCK_M with T*k; -1 for blocks past the last run. No host sync."""
    n_assign = topk_ids.numel()
    order, experts, counts = moe.sort_by_expert(topk_ids, expert_start, n_experts)
    padded = (counts + block_m - 1) // block_m * block_m  # (E_r,)
    pad_end = padded.cumsum(0)
    # sum_e ceil(c_e / BM) <= (sum c_e + (BM - 1) * #nonempty) / BM, and at most min(E_r, T*k) are nonempty.
    blocks = (n_assign + min(n_experts, n_assign) * (block_m - 1)) // block_m
    local = experts < n_experts
    e = experts.clamp(max=n_experts - 1)
    rank = torch.arange(n_assign, device=order.device) - (counts.cumsum(0) - counts)[e]  # position in its run
    dest = torch.where(local, (pad_end - padded)[e] + rank, blocks * block_m)  # off-rank ones: a dropped slot
    sorted_ids = torch.full((blocks * block_m + 1,), n_assign, dtype=torch.int64, device=order.device)
    sorted_ids = sorted_ids.scatter_(0, dest, order)[:-1].to(torch.int32)
    starts = torch.arange(blocks, device=order.device) * block_m
    block_expert = torch.searchsorted(pad_end, starts, right=True)  # runs ending at or before the block's start
    return sorted_ids, torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)


def _launch_args(w: Experts, dtype: torch.dtype, rows_padded: int, n: int, k: int, cfg: Config
                 ) -> tuple[tuple, tuple, tuple, dict]:
    """(grid, weight parts, weight strides, constexprs) of one grouped GEMM: N = n, K = k over ``align``'s rows."""
    int4 = isinstance(w, Int4Experts)
    cfg = _fit(cfg, n, k, w.group_size if int4 else None)
    # The interpreter's tl.dot multiplies bf16 tiles as their raw uint16 bits and its casts to bf16 truncate:
    # there the tiles are widened to fp32 (exact) and _round rounds by hand; compiled, bf16 stays bf16.
    by_hand = _INTERPRET and dtype == torch.bfloat16
    grid = (triton.cdiv(rows_padded, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    if int4:  # the kernel's k stride is the packed row stride, the n stride 1 (``_check``)
        parts = _parts(w)
        strides = (w.qweight.stride(0), w.qweight.stride(1), 1, w.scales.stride(0), w.zeros.stride(0))
    else:  # (E_r, N, K) read as K x N tiles; the dense weight stands in for the parts it does not have
        parts, strides = (w, w, w), (w.stride(0), w.stride(2), w.stride(1), 0, 0)
    meta = dict(G=w.group_size if int4 else 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                GROUP_M=cfg.group_m, INT4=int4, DOT_DTYPE=tl.float32 if by_hand else _TL_DTYPES[dtype],
                BY_HAND=by_hand, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return grid, parts, strides, meta


def _fit(cfg: Config, n: int, k: int, group_size: int | None) -> Config:
    """Tiles no larger than the problem needs (>= tl.dot's 16); for int4, BLOCK_K divides G."""
    block_n = min(cfg.block_n, max(_MIN_DOT, triton.next_power_of_2(n)))
    block_k = min(cfg.block_k, max(_MIN_DOT, triton.next_power_of_2(k)))
    if group_size is not None:
        block_k = math.gcd(block_k, group_size)
    return replace(cfg, block_n=block_n, block_k=block_k)


def _parts(w: Experts) -> tuple[torch.Tensor, ...]:
    return (w.qweight, w.scales, w.zeros) if isinstance(w, Int4Experts) else (w,)


def _check(x: torch.Tensor, w_gate_up: Experts, w_down: Experts, topk_ids: torch.Tensor,
           topk_weights: torch.Tensor) -> None:
    """What the Triton path needs beyond ``moe.check``: one device, int4 strides and groups it can read."""
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if not isinstance(w, Int4Experts):
            continue
        parts = _parts(w)
        if any(p.stride(2) != 1 for p in parts) or len({p.stride(1) for p in parts}) > 1:
            raise TpDeployError(f"fused_moe: {name} int4 parts have strides {[p.stride() for p in parts]}; the kernel "
                                "needs unit column stride and one row stride for qweight, scales and zeros")
        if w.group_size % _MIN_DOT:
            raise TpDeployError(f"fused_moe: {name} group_size={w.group_size} must be a multiple of 16 (tl.dot's "
                                "minimum K tile); the int4 formats use 32, 64 or 128")
    tensors = [x, topk_ids, topk_weights, *_parts(w_gate_up), *_parts(w_down)]
    if len({t.device for t in tensors}) > 1 or (x.device.type != "cuda" and not _INTERPRET):
        raise TpDeployError(f"fused_moe: tensors on {sorted({str(t.device) for t in tensors})}; they must share one "
                            "CUDA device (or CPU with TRITON_INTERPRET=1 set before triton is imported)")
