"""Mixture-of-experts feed-forward without Triton: the reference (one expert at a time) and the CPU path.

For token t, routed to experts topk_ids[t, j] with weights topk_weights[t, j] (normalised by the caller):

    out[t] = sum_j  topk_weights[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t])),   e = topk_ids[t, j]

over the experts this rank holds, [expert_start, expert_start + E_r): with expert parallelism the other
ids add nothing here and the model all-reduces the ranks' partial sums. Numerics follow transformers'
expert loop (``Qwen3MoeExperts``, ``MixtralExperts``), which the model is compared against: both linears
and act(gate) * up in x's dtype, the routing weight cast to x's dtype and multiplied in x's dtype, the
sum over j in fp32, cast to x's dtype once at the end.

Layouts. Dense weights are in transformers-5's (out, in) orientation and may be strided views:
    w_gate_up (E_r, 2I, H): rows [0, I) of an expert are gate, [I, 2I) up;  w_down (E_r, H, I).
``Int4Experts`` holds each expert in the canonical int4 layout (``formats.int4``), (in, out):
    qweight (E_r, K/8, N), scales and zeros (E_r, K/G, N); gate_up K = H, N = 2I; down K = I, N = H.

``moe_reference`` is the oracle; ``moe_torch`` the CPU path: one sort of the T*k assignments by
expert, one pair of F.linear per expert that received tokens on a contiguous slice of rows, one
``index_add_``. Both run the same per-expert function on the same rows in the same order, so they
agree bit for bit. The Triton kernel (``fused_moe.py``) is tested against ``moe_reference``.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from formats import int4
from formats.errors import TpDeployError

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Int4Experts:
    """A rank's experts of one projection in the canonical int4 layout; W_e is (K, N) after dequantization."""

    qweight: torch.Tensor  # (E_r, K/8, N) int32, may be a strided view
    scales: torch.Tensor  # (E_r, K/G, N) fp16 / bf16 / fp32
    zeros: torch.Tensor  # (E_r, K/G, N) uint8
    group_size: int


Experts = torch.Tensor | Int4Experts


def expert_dims(w: Experts) -> tuple[int, int, int]:
    """(E_r, N, K) in the dense (out, in) orientation, whatever the storage."""
    if isinstance(w, Int4Experts):
        e, kp, n = w.qweight.shape
        return e, n, kp * int4.PACK
    return tuple(w.shape)


def expert_weight(w: Experts, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Expert e as a contiguous dense (N, K) weight in ``dtype``; int4 is ``formats.int4.dequantize``d."""
    if isinstance(w, Int4Experts):
        dense = int4.dequantize(w.qweight[e], w.scales[e], w.zeros[e], w.group_size)  # (K, N) in the scales' dtype
        return dense.to(dtype).t().contiguous()
    return w[e].to(dtype)


def dequantize_experts(w: Int4Experts, dtype: torch.dtype) -> torch.Tensor:
    """All experts dense, (E_r, N, K) contiguous in ``dtype``: the orientation of dense expert weights."""
    return torch.stack([expert_weight(w, e, dtype) for e in range(w.qweight.shape[0])])


def prepare_experts_cpu(dtype: torch.dtype) -> Callable[[Experts], torch.Tensor]:
    """The load-time preparation of expert weights on CPU: int4 dequantized once (as ``cpu_fp8.dequant_once``)."""
    said = []

    def prepare(w: Experts) -> torch.Tensor:
        if isinstance(w, torch.Tensor):
            return w
        if not said:
            said.append(True)
            sys.stderr.write(f"tprun: int4 experts on CPU: dequantized once at load into {str(dtype)[6:]} "
                             "(dense memory; one F.linear per expert)\n")
        return dequantize_experts(w, dtype)

    return prepare


def check(x: torch.Tensor, w_gate_up: Experts, w_down: Experts, topk_ids: torch.Tensor,
          topk_weights: torch.Tensor, activation: str) -> tuple[int, int, int]:
    """(E_r, I, H) after checking that the inputs agree; raises naming the bad value."""
    if activation not in ACTIVATIONS:
        raise TpDeployError(f"fused_moe: activation={activation!r}; allowed: {', '.join(ACTIVATIONS)}")
    if x.dim() != 2 or x.dtype not in DTYPES:
        raise TpDeployError(f"fused_moe: x is {tuple(x.shape)} {x.dtype}; expected (T, H) float16, bfloat16 or float32")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0] or topk_ids.dtype.is_floating_point:
        raise TpDeployError(f"fused_moe: topk_ids is {tuple(topk_ids.shape)} {topk_ids.dtype}; expected (T, k) "
                            f"integers with T = {x.shape[0]}")
    if topk_weights.shape != topk_ids.shape:
        raise TpDeployError(f"fused_moe: topk_weights is {tuple(topk_weights.shape)}, topk_ids {tuple(topk_ids.shape)}")
    e_r, two_i, h = expert_dims(w_gate_up)
    inter = two_i // 2
    for name, w, want in (("w_gate_up", w_gate_up, (e_r, 2 * inter, x.shape[1])), ("w_down", w_down, (e_r, h, inter))):
        got = expert_dims(w)
        if got != want or two_i % 2:
            raise TpDeployError(f"fused_moe: {name} is (E_r, N, K) = {got}, expected {want} for x {tuple(x.shape)}")
        if isinstance(w, Int4Experts):
            _check_int4(name, w, got)
        elif w.dtype != x.dtype:
            raise TpDeployError(f"fused_moe: {name} is {w.dtype}, x {x.dtype}; dense experts compute in x's dtype")
    return e_r, inter, h


def _check_int4(name: str, w: Int4Experts, dims: tuple[int, int, int]) -> None:
    e_r, n, k = dims
    g = w.group_size
    if g <= 0 or g % int4.PACK or k % g:
        raise TpDeployError(f"fused_moe: {name} group_size={g} must be a positive multiple of 8 dividing K={k}")
    if w.qweight.dtype != torch.int32 or w.zeros.dtype != torch.uint8 or w.scales.dtype not in DTYPES:
        raise TpDeployError(f"fused_moe: {name} parts are qweight {w.qweight.dtype}, scales {w.scales.dtype}, zeros "
                            f"{w.zeros.dtype}; the layout wants int32, a float dtype, uint8")
    for part, t in (("scales", w.scales), ("zeros", w.zeros)):
        if tuple(t.shape) != (e_r, k // g, n):
            raise TpDeployError(f"fused_moe: {name}.{part} is {tuple(t.shape)}, expected (E_r, K/G, N) = "
                                f"{(e_r, k // g, n)}")


def _expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert on its rows: (M, H) -> (M, H), every step in x's dtype as transformers does."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)  # (M, I) each
    return F.linear(ACTIVATIONS[activation](gate) * up, down)


def moe_reference(x: torch.Tensor, w_gate_up: Experts, w_down: Experts, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, expert_start: int = 0, activation: str = "silu") -> torch.Tensor:
    """The plain math, one local expert at a time (the oracle): (T, H) in x's dtype."""
    e_r = check(x, w_gate_up, w_down, topk_ids, topk_weights, activation)[0]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(e_r):
        tokens, slots = torch.where(topk_ids == expert_start + e)  # tokens ascending, each at most once
        if tokens.numel():
            y = _expert_ffn(x[tokens], expert_weight(w_gate_up, e, x.dtype), expert_weight(w_down, e, x.dtype),
                            activation)
            out.index_add_(0, tokens, (y * topk_weights[tokens, slots, None].to(x.dtype)).float())
    return out.to(x.dtype)


def sort_by_expert(topk_ids: torch.Tensor, expert_start: int, n_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, experts, counts): flat assignment indices (t * k + j) sorted by local expert, stably (so
    tokens ascend within an expert), with off-rank ones last as expert ``n_experts``; each one's local
    expert; assignments per local expert (E_r,). Torch ops only, no host sync."""
    local = topk_ids.flatten().long() - expert_start  # (T*k,)
    key = torch.where((local >= 0) & (local < n_experts), local, n_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(n_experts + 1, dtype=torch.int64, device=key.device).scatter_add_(0, key, torch.ones_like(key))
    return order, key[order], counts[:n_experts]


def moe_torch(x: torch.Tensor, w_gate_up: Experts, w_down: Experts, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, expert_start: int = 0, activation: str = "silu") -> torch.Tensor:
    """The CPU path: rows sorted by expert, one F.linear pair per expert on a contiguous slice, one index_add_."""
    e_r = check(x, w_gate_up, w_down, topk_ids, topk_weights, activation)[0]
    order, _, counts = sort_by_expert(topk_ids, expert_start, e_r)
    counts = counts.tolist()
    order = order[:sum(counts)]  # off-rank assignments sorted last: dropped
    tokens = order // topk_ids.shape[1]
    xs = x[tokens]  # (A, H) grouped by expert, tokens ascending within each
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            ys[start:start + n] = _expert_ffn(xs[start:start + n], expert_weight(w_gate_up, e, x.dtype),
                                              expert_weight(w_down, e, x.dtype), activation)
        start += n
    weights = topk_weights.flatten()[order].to(x.dtype)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    # Rows are added in the reference's order (expert by expert), so the fp32 sums agree bit for bit.
    return out.index_add_(0, tokens, (ys * weights[:, None]).float()).to(x.dtype)
