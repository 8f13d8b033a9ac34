"""W8A16 linear in Triton: y = x @ dequant(W).T (+ bias) over the canonical FP8 layout, fp32 accumulation.

Layouts (``formats/fp8.py``, ``docs/fp8.md``, layout ``tpdeploy-fp8-v1``), all row-major:

    x       (M, K)     fp16 / bf16 / fp32
    weight  (N, K)     float8_e4m3fn, the checkpoint's own bytes
    scale   (N, K/B)   float32: one scale per output row and block of B input columns
    W[n, k] = float32(weight[n, k]) * scale[n, k // B], rounded once to x's dtype

Algorithm. A program owns a (BLOCK_M, BLOCK_N) output tile (grouped tile order: GROUP_M M tiles share
each weight column tile back to back, so it is read from L2) and walks K in BLOCK_K steps. The weight
tile is loaded transposed, (BLOCK_K, BLOCK_N), from the (N, K) rows (K contiguous: one byte per element
off DRAM, half of a 16-bit weight), widened to fp32 and multiplied by its scale in registers: the same
fp32 product as ``formats.fp8.dequantize``, rounded once to x's dtype, so the weights equal the
reference's bit for bit and only the summation order differs. When BLOCK_K divides B (``ONE_SCALE``)
a K tile lies in one scale column and its scales are one (BLOCK_N,) row; otherwise (a B that is not a
multiple of 16, from a tiny or oddly split model) each element gathers its own scale. K and N need not be
multiples of the tiles: the last tiles are masked, so awkward shards (K 96 at tp 4) run as they are.
Activation scales of the source are not used: activations stay 16-bit (W8A16), dynamic or static.

No split-K: decode (M <= 16) takes 16-row tiles and wide K steps; configs come from a small fixed table
by M, no autotuning, so results are reproducible. Sources: Triton's matmul tutorial (grouped ordering);
the int4 kernel beside this one (``w4a16.py``) for the dequantize-in-registers structure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from formats import fp8
from formats.errors import TpDeployError
from runtime.kernels.cpu_fp8 import Fp8Weight
from runtime.kernels.w4a16 import _tile_ids

_INTERPRET = triton.knobs.runtime.interpret  # how triton.jit built the kernel below, fixed at import
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_MIN_DOT = 16  # tl.dot's smallest tile side


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int  # a power of two >= 16; cut to divide B when B allows (one scale row per tile)
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# (largest M, config), first match wins: decode reads each weight once in long K steps; prefill grows M tiles.
_CONFIGS = ((16, Config(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)),
            (64, Config(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4)),
            (math.inf, Config(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)))


@triton.jit
def _w8a16_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, KB, B: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, ONE_SCALE: tl.constexpr,
                  HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """out[M tile, N tile] = x @ W.T over all of K, fp32 accumulator, cast once at the end."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    rows, cols = offs_m.to(tl.int64), offs_n.to(tl.int64)  # M * K and N * K can pass 2**31
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_w = mask_k[:, None] & mask_n[None, :]
        q = tl.load(w_ptr + cols[None, :] * K + offs_k[:, None], mask=mask_w, other=0.0)  # (BLOCK_K, BLOCK_N)
        if ONE_SCALE:
            s = tl.load(s_ptr + cols * KB + k0 // B, mask=mask_n, other=0.0)
            w = q.to(tl.float32) * s[None, :]
        else:
            s = tl.load(s_ptr + cols[None, :] * KB + (offs_k // B)[:, None], mask=mask_w, other=0.0)
            w = q.to(tl.float32) * s
        # ieee: fp32 activations must not drop to tf32 (ignored for 16-bit inputs).
        acc = tl.dot(a.to(DOT_DTYPE), w.to(a.dtype).to(DOT_DTYPE), acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def w8a16_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None = None, *,
                 config: Config | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(W).T (+ bias) -> (..., N) in x's dtype; ``config`` overrides the table."""
    n, k = _check(x, w, bias)
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        _launch(x2, w, bias, out, config or pick_config(m))
    return out.view(*x.shape[:-1], n)


def pick_config(m: int) -> Config:
    return next(c for top, c in _CONFIGS if m <= top)


def _block_k(cfg: Config, b: int) -> tuple[int, bool]:
    """The K step and whether a step lies in one scale column: the largest power of two <= the config's
    that divides B, or the config's own when B has no such divisor >= 16 (then scales are gathered)."""
    step = cfg.block_k
    while step >= _MIN_DOT and b % step:
        step //= 2
    return (step, True) if step >= _MIN_DOT else (cfg.block_k, False)


def _launch(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None, out: torch.Tensor, cfg: Config) -> None:
    m, k = x.shape
    n = out.shape[1]
    block_k, one_scale = _block_k(cfg, w.block_k)
    # The interpreter's tl.dot multiplies bf16 tiles as their raw bits; widening to fp32 there is exact
    # (products of bf16 values fit fp32) and leaves the compiled path on bf16 tensor cores.
    dot_dtype = tl.float32 if _INTERPRET and x.dtype == torch.bfloat16 else _TL_DTYPES[x.dtype]
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    weight, scale = w.weight.contiguous(), w.scale.contiguous()  # no-ops as loaded
    bias = bias.contiguous() if bias is not None else None
    _w8a16_kernel[grid](x, weight, scale, bias if bias is not None else x, out, m, n, k, scale.shape[1],
                        B=w.block_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
                        ONE_SCALE=one_scale, HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _check(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None) -> tuple[int, int]:
    """(N, K) after checking that x, the FP8 weight, its scale and bias agree; raises naming the bad value."""
    n, k = w.weight.shape
    b = w.block_k
    if x.dtype not in _DTYPES:
        raise TpDeployError(f"w8a16_linear: x is {x.dtype}; allowed: float16, bfloat16, float32")
    if x.shape[-1] != k:
        raise TpDeployError(f"w8a16_linear: x has {x.shape[-1]} input features but the weight is {(n, k)} (N, K)")
    if w.weight.dtype != fp8.WEIGHT_DTYPE or w.scale.dtype != fp8.SCALE_DTYPE:
        raise TpDeployError(f"w8a16_linear: weight {w.weight.dtype}, scale {w.scale.dtype}; the layout wants "
                            "float8_e4m3fn and float32")
    if b < 1 or tuple(w.scale.shape) != (n, -(-k // b)):
        raise TpDeployError(f"w8a16_linear: scale is {tuple(w.scale.shape)} with block_k={b}, expected "
                            f"(N, ceil(K/B)) = ({n}, {-(-k // max(b, 1))})")
    if bias is not None and tuple(bias.shape) != (n,):
        raise TpDeployError(f"w8a16_linear: bias is {tuple(bias.shape)}, expected ({n},)")
    tensors = [x, w.weight, w.scale] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) > 1 or (x.device.type != "cuda" and not _INTERPRET):
        raise TpDeployError(f"w8a16_linear: tensors on {sorted({str(t.device) for t in tensors})}; they must share "
                            "one CUDA device (or CPU with TRITON_INTERPRET=1 set before triton is imported)")
    return n, k
