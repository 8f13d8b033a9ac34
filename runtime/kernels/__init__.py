"""The one place that picks the kernels: Triton on CUDA, batched torch on CPU.

``TPDEPLOY_KERNELS=triton`` forces the Triton kernels (on CPU, with ``TRITON_INTERPRET=1``, which
is how the model path through the kernels is tested without a GPU); ``=torch`` forces the CPU path
(``torch_attention``: every sequence of a step in one batched computation); ``=reference`` the plain
torch references that both are tested against (``reference``: one prompt at a time).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from formats.errors import TpDeployError


@dataclass(frozen=True)
class Kernels:
    name: str
    write_kv: Callable
    prefill_attention: Callable
    decode_attention: Callable
    w4a16_linear: Callable
    prepare_int4: Callable = lambda w: w  # what an int4 linear becomes at load (CPU: ``cpu_int4.choose``)
    w8a16_linear: Callable | None = None  # FP8 linears kept FP8 (``cpu_fp8.Fp8Weight``)
    prepare_fp8: Callable = lambda w: w  # what an FP8 linear becomes at load (CPU: dense, ``cpu_fp8.dequant_once``)
    fused_moe: Callable | None = None  # a rank's experts of an MoE layer (``moe.moe_reference`` is the math)
    prepare_experts: Callable = lambda w: w  # what ``moe.Int4Experts`` become at load (CPU: dense, once)
    prepare_dense: Callable = lambda w: w  # what a dense linear weight becomes at load (CPU fp32: ``cpu_dense``)
    dense_linear: Callable | None = None  # runs what prepare_dense made when it is not a plain tensor


def select(device: torch.device, int4_mode: str = "auto", dtype: torch.dtype = torch.float32) -> Kernels:
    """``int4_mode``/``dtype``: how int4 linears run on CPU (``kernels.cpu_int4``) for this compute dtype."""
    choice = os.environ.get("TPDEPLOY_KERNELS", "triton" if device.type == "cuda" else "torch")
    if choice == "torch":
        from runtime.kernels import cpu_dense, cpu_fp8, cpu_int4, moe
        from runtime.kernels import reference as r
        from runtime.kernels import torch_attention as t
        return Kernels("torch", r.write_kv, t.prefill_attention, t.decode_attention, cpu_int4.linear,
                       cpu_int4.choose(cpu_int4_mode(int4_mode), dtype), cpu_fp8.linear, cpu_fp8.dequant_once(dtype),
                       moe.moe_torch, moe.prepare_experts_cpu(dtype), cpu_dense.choose(dtype), cpu_dense.linear)
    if choice == "reference":
        from runtime.kernels import cpu_fp8, moe
        from runtime.kernels import reference as r
        return Kernels("reference", r.write_kv, r.prefill_attention, r.decode_attention, r.w4a16_linear,
                       w8a16_linear=cpu_fp8.w8a16_linear, fused_moe=moe.moe_reference)
    if choice == "triton":
        try:
            from runtime.kernels import decode_attention, fused_moe, prefill_attention, w4a16, w8a16, write_kv
        except ImportError as e:
            raise TpDeployError(f"the Triton kernels need the `triton` package ({e}); install it, or set "
                                "TPDEPLOY_KERNELS=torch to run the torch kernels") from e
        return Kernels("triton", write_kv.write_kv, prefill_attention.prefill_attention,
                       decode_attention.decode_attention, w4a16.w4a16_linear, w8a16_linear=w8a16.w8a16_linear,
                       fused_moe=fused_moe.fused_moe)  # int4 experts stay packed: prepare_experts is the identity
    raise TpDeployError(f"TPDEPLOY_KERNELS={choice!r} is not known; use triton, torch or reference")


def cpu_int4_mode(mode: str) -> str:
    """``TPDEPLOY_CPU_INT4`` overrides ``--cpu-int4`` (the tests run every mode through one fixture)."""
    return os.environ.get("TPDEPLOY_CPU_INT4", mode)
