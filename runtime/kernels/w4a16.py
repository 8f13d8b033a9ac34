"""W4A16 linear in Triton: y = x @ dequant(W) (+ bias) over the canonical int4 layout, fp32 accumulation.

Layouts (``formats/int4.py``, ``docs/quantization.md``, layout ``tpdeploy-int4-v1``), W is (K, N), all row-major:

    x        (M, K)    fp16 / bf16 / fp32
    qweight  (K/8, N)  int32: row k of W is nibble k % 8 (bits 4*(k % 8) .. +3) of packed row k // 8
    scales   (K/G, N)  fp16 / bf16 / fp32
    zeros    (K/G, N)  uint8
    W[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n], rounded once to the scales' dtype

Algorithm. A program owns a (BLOCK_M, BLOCK_N) output tile and walks a run of K tiles. BLOCK_K divides
G, so a K tile lies inside one quantization group: its scales and zeros are one (BLOCK_N,) row each,
and since K is a multiple of G every tile is full; odd group counts and K/8 not a multiple of the
packed tile height need no K mask. The packed tile is addressed with row k // 8 repeated for the 8
rows sharing a word (GPTQ-Triton's unpack: the repeats hit the same cache lines, so each word leaves
DRAM once), shifted right by 4 * (k % 8) and masked to a nibble. Dequantization repeats
``formats.int4.dequantize`` exactly (the same fp32 product, the same one rounding to the scales'
dtype), so the weights equal the reference's bit for bit; they are cast to x's dtype and fed to
``tl.dot`` with an fp32 accumulator. The only difference from the reference is summation order and
precision.

Two paths, picked by M (``pick_config``):
* decode, M <= 16: one 16-row M tile (tl.dot's minimum height on tensor cores), wide N tiles, and
  split-K when N alone gives too few programs to fill the GPU: the K tiles are cut into SPLIT_K
  contiguous runs, each summed into an fp32 partial buffer (SPLIT_K, M, N); ``_reduce_kernel`` adds
  the partials in a fixed order, adds the bias and casts (deterministic, unlike fp32 atomics). Each
  weight word is read by exactly one program.
* prefill, M >= 17: a tiled GEMM with grouped tile order (GROUP_M M tiles share each weight column
  tile back to back, so it is read from L2), bias and cast fused in the epilogue; configs from a
  small fixed table by M, no autotuning, so results are reproducible.

Sources: Triton's matmul tutorial (grouped ordering); GemLite's and AutoGPTQ's Triton kernels (K-packed
unpack by repeated row addresses, one group per K tile); split-K with a partials buffer instead of atomics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from formats.errors import TpDeployError
from formats.int4 import PACK
from runtime.kernels.reference import Int4Weight

DECODE_MAX_M = 16  # one tl.dot-high M tile holds the whole batch, so weights are read once
_INTERPRET = triton.knobs.runtime.interpret  # how triton.jit built the kernels below, fixed at import
_CPU_PROGRAMS = 8  # interpreter "SM count": small grids, yet split-K still runs in the CPU tests
_REDUCE_BLOCK = 1024
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@dataclass(frozen=True)
class Config:
    """One launch: tile sizes, split-K factor and CUDA scheduling hints (ignored by the interpreter)."""

    block_m: int
    block_n: int
    block_k: int  # a power of two; cut to gcd(block_k, G) at launch so tiles never straddle a group
    split_k: int = 1  # > 1: K runs summed into fp32 partials, then one reduce launch; 0: fill the device
    group_m: int = 8  # M tiles visited per weight column tile before moving along N (L2 reuse)
    num_warps: int = 4
    num_stages: int = 3


_DECODE = Config(block_m=16, block_n=128, block_k=128, split_k=0, num_warps=4, num_stages=3)
# (largest M, config), first match wins: taller M tiles once M fills them.
_PREFILL = ((32, Config(block_m=32, block_n=128, block_k=64, num_warps=4, num_stages=4)),
            (64, Config(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)),
            (math.inf, Config(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)))


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, N, offs_n, mask_n, G: tl.constexpr, BLOCK_K: tl.constexpr,
                  W_DTYPE: tl.constexpr):
    """Rows k0 .. k0 + BLOCK_K of W as a (BLOCK_K, BLOCK_N) tile in W_DTYPE; the rows share one group."""
    rows = k0 + tl.arange(0, BLOCK_K)
    words = tl.load(qw_ptr + (rows // 8)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    # The word is signed, so >> drags the sign bit along; & 0xF keeps only the nibble either way.
    q = (words >> ((rows % 8) * 4)[:, None]) & 0xF  # (BLOCK_K, BLOCK_N) int32 in [0, 15]
    g = k0 // G
    z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.int32)
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)
    # The same arithmetic as formats.int4.dequantize, so the same bits: a 16-bit scale has <= 11
    # significant bits and |q - z| <= 15, so the fp32 product is exact and rounds once to the scale's
    # dtype; an fp32 scale's product rounds once in fp32 on both sides.
    w = (q - z[None, :]).to(tl.float32) * s.to(tl.float32)[None, :]
    return w.to(s.dtype).to(W_DTYPE)


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M consecutive programs walk down M on the same weight column tile."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    height = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % height, (pid % per_group) // height


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N, K, tiles_per_split,
                  G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """out[M tile, N tile] = x @ W over the K tiles of split program_id(1); fp32 partials if PARTIAL."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    rows = offs_m.to(tl.int64)  # M * K and M * N * SPLIT_K can pass 2**31 for long prefills
    first = tl.program_id(1) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, K // BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(first, last):
        k0 = t * BLOCK_K
        a = tl.load(x_ptr + rows[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=mask_m[:, None],
                    other=0.0)
        b = _dequant_tile(qw_ptr, s_ptr, z_ptr, k0, N, offs_n, mask_n, G, BLOCK_K, a.dtype)
        # ieee: fp32 activations must not drop to tf32 (ignored for 16-bit inputs).
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
    mask = mask_m[:, None] & mask_n[None, :]
    if PARTIAL:
        tl.store(out_ptr + (tl.program_id(1) * M + rows)[:, None] * N + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(part_ptr, bias_ptr, out_ptr, MN, N, split_k, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum over splits of part (SPLIT_K, M, N) in split order (+ bias), cast to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in range(1, split_k):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def w4a16_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None, *,
                 config: Config | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(W) (K, N) (+ bias) -> (..., N) in x's dtype; ``config`` overrides the table."""
    k, n = _check(x, w, bias)
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        g = w.group_size
        _launch(x2, w, bias, out, _fit(config, n, k, g, x.device) if config else pick_config(m, n, k, g, x.device))
    return out.view(*x.shape[:-1], n)


def pick_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> Config:
    """The launch config for this shape: decode for M <= 16, else the prefill row for M; fitted by ``_fit``."""
    cfg = _DECODE if m <= DECODE_MAX_M else next(c for top, c in _PREFILL if m <= top)
    return _fit(cfg, n, k, group_size, device)


def _fit(cfg: Config, n: int, k: int, group_size: int, device: torch.device) -> Config:
    """Cut BLOCK_K to divide G; resolve split_k=0 to enough programs for the device; no empty splits."""
    block_k = math.gcd(cfg.block_k, group_size)  # both powers-of-two multiples of 16 in practice
    k_tiles = k // block_k
    split = cfg.split_k or triton.cdiv(_target_programs(device), triton.cdiv(n, cfg.block_n))
    split = triton.cdiv(k_tiles, triton.cdiv(k_tiles, min(split, k_tiles)))  # runs of equal length but the last
    return replace(cfg, block_k=block_k, split_k=split)


def _target_programs(device: torch.device) -> int:
    """Two waves of programs on a GPU hide the tail of the last one; the interpreter runs them in turn."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return _CPU_PROGRAMS


def _launch(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None, out: torch.Tensor, cfg: Config) -> None:
    m, k = x.shape
    n = out.shape[1]
    k_tiles = k // cfg.block_k
    partial = cfg.split_k > 1
    # The interpreter's tl.dot multiplies bf16 tiles as their raw uint16 bits; widening to fp32 there is
    # exact (products of bf16 values fit fp32) and leaves the compiled path on bf16 tensor cores.
    dot_dtype = tl.float32 if _INTERPRET and x.dtype == torch.bfloat16 else _TL_DTYPES[x.dtype]
    target = torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x.device) if partial else out
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    qw, s, z = w.qweight.contiguous(), w.scales.contiguous(), w.zeros.contiguous()  # no-ops as loaded
    bias = bias.contiguous() if bias is not None else None
    _w4a16_kernel[grid](x, qw, s, z, bias if bias is not None and not partial else x, target, m, n, k,
                        triton.cdiv(k_tiles, cfg.split_k), G=w.group_size, BLOCK_M=cfg.block_m,
                        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, PARTIAL=partial,
                        HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages)
    if partial:
        _reduce_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](target, bias if bias is not None else x, out, m * n, n,
                                                            cfg.split_k, HAS_BIAS=bias is not None,
                                                            BLOCK=_REDUCE_BLOCK)


def _check(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None) -> tuple[int, int]:
    """(K, N) after checking that x, the int4 parts and bias agree; raises naming the bad value."""
    g, (kp, n) = w.group_size, w.qweight.shape
    k = kp * PACK
    if x.dtype not in _DTYPES:
        raise TpDeployError(f"w4a16_linear: x is {x.dtype}; allowed: float16, bfloat16, float32")
    if x.shape[-1] != k:
        raise TpDeployError(f"w4a16_linear: x has {x.shape[-1]} input features but qweight {tuple(w.qweight.shape)} "
                            f"packs K = {k}")
    if g <= 0 or g % 16 or k % g:
        raise TpDeployError(f"w4a16_linear: group_size={g} must be a positive multiple of 16 (tl.dot's minimum K "
                            f"tile) dividing K={k}; the int4 formats use 32, 64 or 128")
    if w.qweight.dtype != torch.int32 or w.zeros.dtype != torch.uint8 or w.scales.dtype not in _DTYPES:
        raise TpDeployError(f"w4a16_linear: parts are qweight {w.qweight.dtype}, scales {w.scales.dtype}, zeros "
                            f"{w.zeros.dtype}; the layout wants int32, a float dtype, uint8")
    for name, t in (("scales", w.scales), ("zeros", w.zeros)):
        if tuple(t.shape) != (k // g, n):
            raise TpDeployError(f"w4a16_linear: {name} is {tuple(t.shape)}, expected (K/G, N) = ({k // g}, {n})")
    if bias is not None and tuple(bias.shape) != (n,):
        raise TpDeployError(f"w4a16_linear: bias is {tuple(bias.shape)}, expected ({n},)")
    tensors = [x, w.qweight, w.scales, w.zeros] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) > 1 or (x.device.type != "cuda" and not _INTERPRET):
        raise TpDeployError(f"w4a16_linear: tensors on {sorted({str(t.device) for t in tensors})}; they must share "
                            "one CUDA device (or CPU with TRITON_INTERPRET=1 set before triton is imported)")
    return k, n
