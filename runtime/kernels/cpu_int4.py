"""int4 linears on CPU without rebuilding every weight on every call.

Three ways, chosen once at load (``--cpu-int4``, ``choose``), each stated on stderr:

- ``packed``: torch's own CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``, the path gpt-fast and
  torchao use). The canonical ``tpdeploy-int4-v1`` weights are repacked once into its layout; its
  dequantization is ``(q - 8) * scale + zero``, so our ``(q - z) * s`` becomes zero = ``(8 - z) * s``,
  exact in fp32 and rounded to bf16 with the scales. The kernel is vectorised for bf16 activations only
  (fp16 and fp32 run ~25x slower), so activations are bf16 inside it: W4A16 in bf16, within two bf16
  steps of the reference (the Triton kernel's bf16 tolerance). It needs N % 16 == 0 and a group size of
  32, 64, 128 or 256.
- ``dequant-once``: the weights are dequantized at load into the compute dtype (dense speed and dense
  memory; ``tprun plan --cpu-int4 dequant-once`` counts them dense), exact as the reference.
- ``reference``: dequantize on every call (the test oracle, ``reference.w4a16_linear``).

``auto`` takes ``packed`` when the model computes in 16 bits (bf16, or fp16, whose CPU matmuls are slow
anyway) and the shapes fit, else ``dequant-once``: an fp32 run keeps fp32 numerics unless ``packed`` is
asked for. Measured (docs/benchmarks.md): packed runs SmolLM2-AWQ at 3.1x the dense fp32 tokens/s.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from formats import int4
from formats.errors import TpDeployError
from runtime.kernels.reference import Int4Weight
from runtime.kernels.reference import w4a16_linear as reference_linear

MODES = ("auto", "packed", "dequant-once", "reference")
_GROUPS = (32, 64, 128, 256)  # what the CPU kernel takes
_N_MULTIPLE = 16
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class PackedInt4:
    """One int4 linear in torch's CPU int4 layout; ``n`` output features."""

    packed: torch.Tensor  # uint8 (N, K/2)
    scales_zeros: torch.Tensor  # bf16 (K/G, N, 2)
    group_size: int
    n: int


def unsupported(w: Int4Weight) -> str | None:
    """Why the packed kernel cannot take ``w`` (None: it can)."""
    k, n = w.qweight.shape[0] * int4.PACK, w.qweight.shape[1]
    if w.group_size not in _GROUPS:
        return f"group size {w.group_size} (the CPU int4 kernel takes {', '.join(map(str, _GROUPS))})"
    if n % _N_MULTIPLE:
        return f"{n} output features on this rank (the CPU int4 kernel needs a multiple of {_N_MULTIPLE})"
    if k % w.group_size:
        return f"{k} input features, not a multiple of the group size {w.group_size}"
    return None


def pack(w: Int4Weight) -> PackedInt4:
    values = int4.unpack(w.qweight).to(torch.int32).t().contiguous()  # (N, K) in 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    scales = w.scales.float()
    zeros = (8.0 - w.zeros.float()) * scales  # (q - z) s == (q - 8) s + (8 - z) s
    sz = torch.stack([scales, zeros], dim=-1).to(torch.bfloat16).contiguous()
    return PackedInt4(packed, sz, w.group_size, values.shape[0])


def packed_linear(x: torch.Tensor, w: PackedInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), w.packed, w.group_size, w.scales_zeros)
    out = out.to(x.dtype)
    return out if bias is None else out + bias


def dequant_once(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense (N, K) weight for F.linear, dequantized as the reference does (in the scales' dtype)."""
    return int4.dequantize(w.qweight, w.scales, w.zeros, w.group_size).to(dtype).t().contiguous()


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ W for whatever ``choose`` made of an int4 linear."""
    if isinstance(w, PackedInt4):
        return packed_linear(x, w, bias)
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    return reference_linear(x, w, bias)


def loads_dense(mode: str, dtype: torch.dtype) -> bool:
    """Whether int4 linears sit dense in memory under ``mode`` (for the memory table; auto's shape fallback
    for the odd layer is not counted)."""
    return mode == "dequant-once" or (mode == "auto" and dtype not in _SIXTEEN_BIT)


def choose(mode: str, dtype: torch.dtype) -> Callable[[Int4Weight], object]:
    """The load-time preparation of each int4 linear for ``mode``; says once which path runs."""
    if mode not in MODES:
        raise TpDeployError(f"--cpu-int4 {mode!r} is not known; choose one of {', '.join(MODES)}")
    said: set[str] = set()

    def say(text: str) -> None:
        if text not in said:
            said.add(text)
            sys.stderr.write(f"tprun: int4 linears on CPU: {text}\n")

    def prepare(w: Int4Weight) -> object:
        if mode == "reference":
            say("dequantized on every call (--cpu-int4 reference)")
            return w
        why = unsupported(w) if mode != "dequant-once" else None
        if mode == "packed" and why:
            raise TpDeployError(f"--cpu-int4 packed cannot run this model: {why}; use --cpu-int4 dequant-once")
        if mode == "packed" or (mode == "auto" and why is None and dtype in _SIXTEEN_BIT):
            say("torch's packed int4 kernel, bf16 activations")
            return pack(w)
        reason = {"dequant-once": "as asked", "auto": why or f"the model computes in {str(dtype)[6:]}; "
                  "--cpu-int4 packed runs the int4 kernel in bf16 instead"}[mode]
        say(f"dequantized once at load into {str(dtype)[6:]} (dense memory; {reason})")
        return dequant_once(w, dtype)

    return prepare
