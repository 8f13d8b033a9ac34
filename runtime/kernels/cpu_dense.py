"""Dense float32 linears on CPU, their weights repacked once at load for decode-sized GEMMs.

``F.linear`` hands every call the (N, K) row-major weight, and at decode sizes (M of 1 to a few dozen rows)
the GEMM is bound by reading the weights: measured on the 2-vCPU EPYC VM over SmolLM2-135M's 121 linears,
43 / 55 / 89 ms per step at M = 1 / 8 / 32 (12.4 / 9.7 / 6.0 GB/s of weights). Two packed layouts:

* ``native`` (the default where a C compiler is found): ``cpu_gemm.c``, panels of 32 output columns read front
  to back, 17.6 / 21.9 / 46.0 ms at M = 1 / 8 / 32 and on par with oneDNN for prefill (M 128-512).
* ``onednn``: oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what torch's inductor
  does to frozen CPU weights): 25.8 / 28.4 / 53.2 ms. Used where the native GEMM cannot be built.

Either is the same fp32 GEMM as F.linear in another summation order (within ~5e-6 of a float64 product where
F.linear is within ~2e-6). bf16/fp16 keep ``F.linear``: without AVX512-BF16 oneDNN's 16-bit path is no faster
here. Dense workspaces only (and every lm_head): FP8 and int4 weights dequantized at load keep ``F.linear``.
Over SmolLM2's 30 layers another summation order moved FP8 SmolLM2's logits by up to 9e-3 (of ~32) from
transformers' F.linear ones, past the 2e-3 its tool-parity test holds; that speed-up is left for later.

``TPDEPLOY_CPU_DENSE`` = ``native``, ``onednn`` or ``plain`` (row-major weights, F.linear) forces one (the
tests' way to compare them); unset, the first of native and onednn that works here.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from formats.errors import TpDeployError
from runtime.kernels import cpu_native

log = logging.getLogger(__name__)

# The batch size oneDNN is told to expect when it picks the blocked layout; any M runs on it.
_EXPECTED_ROWS = 8
MODES = ("native", "onednn", "plain")


@dataclass(frozen=True)
class PackedDense:
    """One dense linear's (N, K) weight in a packed ``layout`` (``native``: (ceil(N/32), K, 32) panels;
    ``onednn``: oneDNN's opaque blocked layout)."""

    packed: torch.Tensor
    n: int
    k: int
    layout: str = "onednn"


def choose(dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor | PackedDense]:
    """What a dense linear weight becomes at load for compute ``dtype``."""
    if dtype != torch.float32:
        return lambda w: w
    mode = os.environ.get("TPDEPLOY_CPU_DENSE") or _default_mode()
    if mode not in MODES:
        raise TpDeployError(f"TPDEPLOY_CPU_DENSE={mode!r} is not known; use one of {', '.join(MODES)}")
    if mode == "native":
        try:  # forced: a machine that cannot build it says why instead of running another layout
            cpu_native.load()
        except cpu_native.NativeUnavailable as e:
            raise TpDeployError(f"TPDEPLOY_CPU_DENSE=native: {e}; unset it to use oneDNN's layout here") from e
        return pack_native
    if mode == "onednn" and _onednn_works():
        return pack
    return lambda w: w


def _default_mode() -> str:
    try:
        cpu_native.load()
        return "native"
    except cpu_native.NativeUnavailable as e:
        log.info("the native CPU GEMM is unavailable (%s); dense fp32 linears use oneDNN's layout", e)
        return "onednn"


def _onednn_works() -> bool:
    """Whether this torch build has the oneDNN ops (private ones: a build without them keeps F.linear)."""
    try:
        w = torch.ones(2, 3)
        return bool(torch.allclose(linear(torch.ones(1, 3), pack(w)), torch.full((1, 2), 3.0)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def pack(w: torch.Tensor) -> PackedDense:
    return PackedDense(torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _EXPECTED_ROWS), *w.shape)


def pack_native(w: torch.Tensor) -> PackedDense:
    """(N, K) -> (ceil(N/32), K, 32): panel p holds rows 32p..32p+31 of w as columns, zeros past N."""
    n, k = w.shape
    width = cpu_native.load().tpdeploy_gemm_panel_width()
    if n % width:  # a padded copy only where needed: each transient copy stays in a CPU rank's heap (heap.py)
        w = F.pad(w, (0, 0, 0, -n % width))
    return PackedDense(w.float().reshape(-1, width, k).transpose(1, 2).contiguous(), n, k, "native")


def linear(x: torch.Tensor, w: PackedDense, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) float32 -> (..., N), plus ``bias``."""
    if w.layout == "native":
        return _native_linear(x, w, bias)
    return torch.ops.mkldnn._linear_pointwise(x, w.packed, bias, "none", [], "")


def _native_linear(x: torch.Tensor, w: PackedDense, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise TypeError(f"the native dense GEMM takes float32 inputs, not {x.dtype}")
    rows = x.reshape(-1, w.k).contiguous()
    y = torch.empty(rows.shape[0], w.n, dtype=torch.float32)
    if rows.shape[0]:  # ctypes releases the GIL for the call: the server's event loop runs meanwhile
        cpu_native.load().tpdeploy_gemm_f32(rows.data_ptr(), rows.shape[0], w.k, w.packed.data_ptr(), y.data_ptr(),
                                        w.n, torch.get_num_threads())
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], w.n)
