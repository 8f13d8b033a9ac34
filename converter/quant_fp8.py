"""FP8 source formats, each a small class that turns one linear's source scale into the canonical one.

The weights are copied as stored (float8_e4m3fn, (N, K)); only the scales change shape, into
``formats.fp8``'s (N, K/B) float32. ``dequantize_source`` is each format's own definition, written from
the source's rule and not from the canonical layout, so ``tpconv verify --numerics`` compares two
independent readings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from formats import fp8
from formats.errors import FormatError

FP8_BLOCK = (128, 128)  # what DeepSeek-V3 and Qwen3 -FP8 releases use; the only block we have seen
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IGNORED_SUFFIXES = ("input_scale",)  # static activation scales: a W8A16 path has no use for them


@dataclass(frozen=True)
class _Fp8Source:
    """Shared by both sources: a scale per tensor, per output row, or per (rows x columns) block."""

    name: str
    scale_suffix: str
    strategy: str  # "tensor", "channel" or "block"
    block: tuple[int, int] = (0, 0)
    activations: str = "none"

    def scale_shape(self, n: int, k: int) -> tuple[tuple[int, ...], ...]:
        """Accepted shapes of one linear's source scale (per tensor: llm-compressor writes (1,), older tools ())."""
        if self.strategy == "tensor":
            return ((1,), ())
        if self.strategy == "channel":
            return ((n, 1),)
        return ((-(-n // self.block[0]), -(-k // self.block[1])),)

    def format(self, block_k: int) -> fp8.Fp8Format:
        return fp8.Fp8Format(block_k, self.name, self.strategy, self.block, self.activations)

    def dequantize_source(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(N, K) float32 by the source's rule: every weight times the scale of its tensor, row or block."""
        n, k = weight.shape
        s = scale.float()
        if self.strategy == "tensor":
            return weight.float() * s.reshape(())
        if self.strategy == "channel":
            return weight.float() * s.reshape(n, 1)
        rows = torch.arange(n) // self.block[0]
        cols = torch.arange(k) // self.block[1]
        return weight.float() * s[rows[:, None], cols[None, :]]

    def to_canonical(self, scale: torch.Tensor, n: int, k: int, block_k: int) -> torch.Tensor:
        """The source scale as (N, K/B) float32: repeated over rows and finer column blocks (exact)."""
        s = scale.float()
        if self.strategy != "block":
            return s.reshape(-1, 1).expand(n, k // block_k).contiguous()
        s = s.repeat_interleave(self.block[0], dim=0)[:n]  # (N, ceil(K/bk))
        return s.repeat_interleave(self.block[1] // block_k, dim=1)[:, : k // block_k].contiguous()


def compressed_tensors_fp8(qc: dict[str, Any], where: str) -> _Fp8Source:
    """compressed-tensors ``float-quantized`` (llm-compressor FP8, FP8_DYNAMIC, FP8_BLOCK): weight fp8 (N, K),
    ``weight_scale`` per tensor (1,), per channel (N, 1) or per block; activation scales are not used."""
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise FormatError(f"{where}: {len(groups)} config_groups; supported: exactly one FP8 group")
    group = next(iter(groups.values()))
    w, a = group.get("weights") or {}, group.get("input_activations") or {}
    if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("dynamic") or not w.get("symmetric", True):
        raise FormatError(f"{where}: float-quantized weights {_show(w)} are not supported; supported: static "
                          "symmetric 8-bit float weights (type float, num_bits 8)")
    strategy = w.get("strategy")
    block = (0, 0)
    if strategy == "block":
        block = tuple(w.get("block_structure") or ())
        _check_block(block, where, "weights.block_structure")
    elif strategy not in ("tensor", "channel"):
        raise FormatError(f"{where}: FP8 weight strategy {strategy!r} is not supported; supported: tensor, channel, "
                          "block")
    activations = "none" if not a else ("dynamic" if a.get("dynamic") else "static")
    return _Fp8Source("compressed-tensors", "weight_scale", strategy, block, activations)


def block_fp8(qc: dict[str, Any], where: str) -> _Fp8Source:
    """``quant_method: fp8`` with ``weight_block_size`` (DeepSeek-V3, Qwen3 -FP8): weight fp8 (N, K) and
    ``weight_scale_inv`` (ceil(N/128), ceil(K/128)), which despite its name multiplies: W = w * scale_inv."""
    if qc.get("fmt", "e4m3") != "e4m3":
        raise FormatError(f"{where}: fp8 fmt {qc.get('fmt')!r} is not supported; supported: e4m3")
    block = tuple(qc.get("weight_block_size") or ())
    if not block:
        raise FormatError(f"{where}: quant_method fp8 without weight_block_size (per-tensor fp8) is not supported; "
                          "supported: block FP8 (weight_block_size [128, 128]) or compressed-tensors FP8")
    _check_block(block, where, "weight_block_size")
    return _Fp8Source("fp8-block", "weight_scale_inv", "block", block, str(qc.get("activation_scheme", "dynamic")))


def _check_block(block: tuple, where: str, field: str) -> None:
    if block != FP8_BLOCK:
        raise FormatError(f"{where}: {field} {list(block)} is not supported; supported: {list(FP8_BLOCK)}")


def _show(w: dict[str, Any]) -> str:
    return str({k: w.get(k) for k in ("type", "num_bits", "dynamic", "symmetric")})


def is_fp8(quant: Any) -> bool:
    return isinstance(quant, _Fp8Source)


def check_scale_dtype(dtype: torch.dtype, name: str) -> None:
    if dtype not in SCALE_DTYPES:
        raise FormatError(f"{name} has dtype {dtype}; FP8 scales must be float32, bfloat16 or float16")
