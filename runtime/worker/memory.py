"""A rank's memory: the KV cache's size settings, what the weights and the largest step take, and
what is left — per rank KV = λ × (T − S/P − reserve).

Pure arithmetic on the manifest: ``tprun plan`` (``runtime.serve.plan``) and the runner both use these
functions, so the plan and the server always agree."""
from __future__ import annotations

import math

import psutil
import torch

from formats import fp8, int4
from formats.config import ModelConfig
from formats.manifest import FLOAT_DTYPES, STORED_DTYPES, Manifest
from formats.sharding import heads_per_rank, kv_heads_per_rank, padded_size
from runtime.kv.format import KVShape

# PyTorch's caching allocator rounds large blocks up to 2 MiB segments and cannot always reuse a freed
# block for a differently sized request (fragmentation); cuBLAS workspaces (up to 32 MiB per handle on
# Hopper), NCCL's channel buffers and Triton's launch scratch come out of the same memory. 256 MiB
# covers these plus the short-lived temporaries the per-layer estimate leaves out (RMSNorm's fp32 copy,
# RoPE outputs). The CUDA context itself (~0.5 GiB) is not counted: the server measures free memory
# after it exists, and `tprun plan --gpu-mem` means the memory the process can use.
ALLOCATOR_SLACK = 256 << 20
GIB = 1 << 30
_LOGIT_BYTES = 4  # the runner hands logits to sampling as float32, whatever the compute dtype

def weights_bytes(manifest: Manifest, rank: int, compute_dtype: torch.dtype, int4_dense: bool = False) -> int:
    """Bytes of ``rank``'s weights once loaded: dense float tensors in the compute dtype, int4 parts and FP8
    weights and scales as stored (the runner converts the former and keeps the latter, see
    ``runtime/worker/runner.py``), or, with ``int4_dense`` (CPU: ``--cpu-int4 dequant-once``, and FP8
    linears always), each quantized linear as a dense weight."""
    total = 0
    for t in manifest.ranks[rank].tensors:
        if int4_dense and int4.is_part(t.name):
            if t.name.endswith(".qweight"):  # (K/8, N) -> K x N dense values
                total += t.shape[0] * int4.PACK * t.shape[1] * compute_dtype.itemsize
            continue
        if int4_dense and (fp8.is_scale(t.name) or t.dtype == "float8_e4m3fn"):
            total += 0 if fp8.is_scale(t.name) else math.prod(t.shape) * compute_dtype.itemsize
            continue
        itemsize = STORED_DTYPES[t.dtype].itemsize if keeps_dtype(t.name, t.dtype) else compute_dtype.itemsize
        total += math.prod(t.shape) * itemsize
    return total


def keeps_dtype(name: str, dtype: str | torch.dtype) -> bool:
    """Whether a loaded tensor stays in its stored dtype: quantized weights and their scales do (they
    dequantize exactly as stored); dense float tensors take the compute dtype."""
    dtype = str(dtype).removeprefix("torch.")
    return int4.is_part(name) or fp8.is_scale(name) or dtype not in FLOAT_DTYPES


def reserve_bytes(cfg: ModelConfig, tp: int, compute_dtype: torch.dtype, max_prefill_tokens: int,
                  max_batch_size: int, *, rank: int = 0, pp: int = 1, kv: KVShape | None = None) -> int:
    """Activation workspace of the largest step (the server's dummy forward), analytically, per rank; with
    ``kv``, this rank's KV cache shape, also what does not grow with the cache (int4 keys' fp16 tails).

    Layers run one after another, so one layer's live tensors bound the peak; summing them all is an
    over-estimate of at most a few tensors (which of them overlap depends on the allocator).
    """
    c = compute_dtype.itemsize
    tokens = max(max_prefill_tokens, max_batch_size)  # a prefill chunk, or one token per decoding sequence
    d, inter = cfg.head_dim, cfg.intermediate_size // tp
    hq, hkv = heads_per_rank(cfg, tp), kv_heads_per_rank(cfg, tp)
    per_token = (2 * cfg.hidden_size  # hidden states and the residual sum being formed (replicated)
                 + (hq + 2 * hkv) * d  # fused qkv output, this rank's heads
                 + hq * d  # attention output before wo
                 + max(3 * inter, _moe_per_token(cfg, tp)))  # the MLP's gate_up output and act(gate) * up
    layer = tokens * per_token * c
    vocab = padded_size(cfg.vocab_size, tp)
    stage, tp_rank = divmod(rank, tp)
    last = stage == pp - 1
    logits = max_batch_size * (vocab // tp) * _LOGIT_BYTES if last else 0  # this rank's vocabulary slice
    if rank == 0 or (last and tp_rank == 0):  # the gathered full-vocabulary logits: gathered, sent, sampled
        logits += max_batch_size * vocab * _LOGIT_BYTES
    tails = kv.tail_bytes(tail_slots(max_batch_size, pp)) if kv is not None else 0
    return layer + logits + tails + ALLOCATOR_SLACK


def tail_slots(max_batch_size: int, pp: int) -> int:
    """Sequences that may hold cache blocks at once (each holds an int4 key tail): a batch for every pipeline
    step in flight, and one prompt scored by ``Engine.prompt_logits`` beside them."""
    return max_batch_size * pp + 1


def _moe_per_token(cfg: ModelConfig, tp: int) -> int:
    """A mixture-of-experts MLP's live values per token, in compute-dtype units: its k copies of the hidden state
    sorted by expert, their gate_up and act(gate) * up outputs and down outputs, the float32 sum, and the router's
    float32 logits and probabilities."""
    moe = cfg.moe
    if moe is None:
        return 0
    inter = moe.intermediate_size if moe.expert_parallel else moe.intermediate_size // tp
    return moe.top_k * (2 * cfg.hidden_size + 3 * inter) + 2 * cfg.hidden_size + 4 * moe.num_experts


def kv_bytes(available_after_weights: int, reserve: int, lam: float, total: int = 0,
             utilization: float | None = None) -> int:
    """λ × (memory left after the weights − reserve), floored; the one formula `tprun plan` and the server share.

    With ``utilization`` (vLLM's --gpu-memory-utilization: the share of ALL ``total`` memory the process may
    use) the KV cache is what is left of it: utilization × total − weights − reserve."""
    if utilization is not None:
        weights = total - available_after_weights
        return max(0, math.floor(utilization * total - weights - reserve))
    return max(0, math.floor(lam * (available_after_weights - reserve)))


def free_bytes(device: torch.device, ranks_on_host: int) -> int:
    """Memory this rank may still use: the GPU's free memory, or its share of the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available // ranks_on_host

