"""The table behind ``tprun plan``: the server's memory arithmetic (``runtime.worker.memory``) per rank,
explained, without loading anything.

Per rank (LMDeploy's rule, ``--cache-max-entry-count λ``)::

    KV = λ × (T − S/P − reserve)

``T`` is the memory of one GPU, ``S/P`` the rank's weights as they sit in memory after loading
(``weights_bytes``), ``reserve`` the activation workspace of the largest step (``reserve_bytes``).
Every rank proposes ``KV // bytes_per_block`` blocks and all ranks allocate the smallest proposal.
``kv_bytes`` is the one formula: the planner feeds it ``T − S/P``, the server the free memory it
measures after loading. No model is loaded and no GPU is touched here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from formats.config import ModelConfig
from formats.errors import TpDeployError
from formats.fp8 import Fp8Format
from formats.manifest import Manifest
from formats.sharding import kv_heads_per_rank
from runtime.config import DEFAULTS, CacheConfig, EngineConfig, compute_dtype
from runtime.kv.format import KVShape, kv_format
from runtime.worker.memory import ALLOCATOR_SLACK, GIB, kv_bytes, reserve_bytes, tail_slots, weights_bytes


@dataclass(frozen=True)
class ModelSummary:
    architecture: str
    parameters: int
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    active_parameters: int | None = None  # a mixture of experts: those one token runs through (top-k experts)


@dataclass(frozen=True)
class RankPlan:
    rank: int
    stage: int  # pipeline stage; its layers set this rank's KV bytes per token
    layers: int
    bytes_per_token: float  # K and V of one token, this stage's layers, one rank's KV heads
    total: int  # T: memory of this rank's GPU
    weights: int  # S/P as loaded
    reserve: int
    kv_bytes: int  # this rank's KV budget (λ formula, or --kv-cache-tokens rounded up to blocks)
    kv_blocks: int  # blocks the budget holds: this rank's proposal before the ranks agree
    kv_tokens: int
    kv_allocated: int  # bytes of the agreed block count, what the rank really allocates
    unused: int  # total − weights − reserve − kv_allocated


@dataclass(frozen=True)
class MemoryPlan:
    model: ModelSummary
    tp: int
    pp: int
    gpu_mem: int  # T
    lam: float
    kv_source: str  # "cache_max_entry_count" (λ), "gpu_memory_utilization" or "kv_cache_tokens"
    kv_cache_tokens: int | None  # requested, when kv_source says so
    compute_dtype: str
    weight_format: str
    max_batch_size: int
    max_prefill_tokens: int
    ranks: tuple[RankPlan, ...]
    num_blocks: int  # agreed: the minimum over ranks
    limiting_rank: int
    block_size: int
    kv_dtype: str
    bytes_per_token: float  # K and V of one token on the limiting rank (its stage's layers, its KV heads)
    kv_tokens: int  # num_blocks × block_size
    max_model_len: int
    max_concurrency: int  # whole max_model_len requests the cache holds at once
    concurrency: float  # the same, as a fraction
    warnings: tuple[str, ...] = ()
    sliding_layers: int = 0  # layers attending to a window only, which still hold full-context blocks
    window: int | None = None
    cpu_dense_weights: int | None = None  # int4 workspaces: the limiting rank's weights dequantized (CPU)
    # int4 KV: the limiting rank's fp16 partial blocks of keys, one per sequence that may hold blocks (in its reserve)
    kv_tail_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan_for(manifest: Manifest, config: EngineConfig) -> MemoryPlan:
    """The plan of the server that ``config`` would start (its ``gpu_mem`` is required here)."""
    if config.gpu_mem is None:
        raise TpDeployError("planning needs the memory of one GPU: give --gpu-mem (e.g. 80GiB)")
    return plan_memory(manifest, gpu_mem=config.gpu_mem, cache=config.cache,
                       compute_dtype=compute_dtype(config.dtype, manifest.weights.dtype),
                       max_model_len=config.max_model_len, max_batch_size=config.max_batch_size,
                       max_prefill_tokens=config.max_prefill_tokens)


def plan_memory(manifest: Manifest, *, gpu_mem: int, cache: CacheConfig, compute_dtype: torch.dtype,
                max_model_len: int | None = None, max_batch_size: int = DEFAULTS.max_batch_size,
                max_prefill_tokens: int = DEFAULTS.max_prefill_tokens) -> MemoryPlan:
    """Every rank's weights, reserve and KV cache on a GPU of ``gpu_mem`` bytes, and the agreed cache."""
    cfg, tp = manifest.model, manifest.tp
    max_model_len = cfg.max_position_embeddings if max_model_len is None else max_model_len
    for flag, value in (("--gpu-mem", gpu_mem), ("--max-model-len", max_model_len),
                        ("--max-batch-size", max_batch_size), ("--max-prefill-tokens", max_prefill_tokens)):
        if value < 1:
            raise TpDeployError(f"{flag} must be a positive number, got {value}")
    fmt = kv_format(cache.kv_dtype, compute_dtype, cfg.head_dim)
    shapes = [KVShape(manifest.stages[r.stage].num_layers, kv_heads_per_rank(cfg, tp), cfg.head_dim, fmt,
                      cache.block_size) for r in manifest.ranks]
    budgets = [_rank_budget(manifest, r, gpu_mem, cache, shapes[r], compute_dtype, max_prefill_tokens, max_batch_size)
               for r in range(manifest.world)]
    proposals = [kv // shapes[r].bytes_per_block for r, (_, _, kv) in enumerate(budgets)]
    num_blocks = min(proposals)
    ranks = tuple(RankPlan(r, manifest.ranks[r].stage, shapes[r].num_layers, shapes[r].bytes_per_token, gpu_mem, w,
                           res, kv, proposals[r], proposals[r] * shapes[r].block_size,
                           num_blocks * shapes[r].bytes_per_block,
                           gpu_mem - w - res - num_blocks * shapes[r].bytes_per_block)
                  for r, (w, res, kv) in enumerate(budgets))
    shape = shapes[proposals.index(num_blocks)]
    kv_tokens = num_blocks * shape.block_size
    return MemoryPlan(
        model=_summary(cfg), tp=tp, pp=manifest.pp, gpu_mem=gpu_mem,
        lam=cache.gpu_memory_utilization or cache.cache_max_entry_count,
        kv_source="kv_cache_tokens" if cache.kv_cache_tokens is not None else
        "gpu_memory_utilization" if cache.gpu_memory_utilization is not None else "cache_max_entry_count",
        kv_cache_tokens=cache.kv_cache_tokens, compute_dtype=_dtype_name(compute_dtype),
        weight_format=_weight_format(manifest), max_batch_size=max_batch_size,
        max_prefill_tokens=max_prefill_tokens, ranks=ranks, num_blocks=num_blocks,
        limiting_rank=proposals.index(num_blocks), block_size=shape.block_size, kv_dtype=shape.fmt.name,
        bytes_per_token=shape.bytes_per_token, kv_tokens=kv_tokens, max_model_len=max_model_len,
        max_concurrency=kv_tokens // max_model_len, concurrency=kv_tokens / max_model_len,
        warnings=_warnings(kv_tokens, max_model_len),
        sliding_layers=sum(cfg.is_sliding(i) for i in range(cfg.num_layers)), window=cfg.sliding_window,
        kv_tail_bytes=shape.tail_bytes(tail_slots(max_batch_size, manifest.pp)),
        cpu_dense_weights=None if manifest.weights.quantization is None else weights_bytes(
            manifest, proposals.index(num_blocks), compute_dtype, int4_dense=True))


def _rank_budget(manifest: Manifest, rank: int, gpu_mem: int, cache: CacheConfig, shape: KVShape,
                 compute_dtype: torch.dtype, max_prefill_tokens: int, max_batch_size: int) -> tuple[int, int, int]:
    """(weights, reserve, KV budget) of one rank; raises when they cannot fit on the GPU."""
    weights = weights_bytes(manifest, rank, compute_dtype)
    reserve = reserve_bytes(manifest.model, manifest.tp, compute_dtype, max_prefill_tokens, max_batch_size, rank=rank,
                            pp=manifest.pp, kv=shape)
    if weights + reserve > gpu_mem:
        raise TpDeployError(
            f"rank {rank} needs {_gib(weights)} GiB of weights + {_gib(reserve)} GiB reserve = "
            f"{_gib(weights + reserve)} GiB, more than --gpu-mem {_gib(gpu_mem)} GiB (tp {manifest.tp}, pp {manifest.pp}); "
            f"use a larger --tp or --pp, int4 weights (tpconv convert an AWQ/W4A16 checkpoint) or a smaller "
            f"--max-prefill-tokens (now {max_prefill_tokens})")
    if cache.kv_cache_tokens is None:
        return weights, reserve, kv_bytes(gpu_mem - weights, reserve, cache.cache_max_entry_count, gpu_mem,
                                          cache.gpu_memory_utilization)
    kv = -(-cache.kv_cache_tokens // shape.block_size) * shape.bytes_per_block
    if weights + reserve + kv > gpu_mem:
        raise TpDeployError(
            f"rank {rank}: --kv-cache-tokens {cache.kv_cache_tokens} needs {_gib(kv)} GiB of KV cache on top of "
            f"{_gib(weights + reserve)} GiB of weights and reserve, more than --gpu-mem {_gib(gpu_mem)} GiB; "
            f"ask for at most {max(0, int((gpu_mem - weights - reserve) // shape.bytes_per_token))} tokens, "
            "or use a quantized --kv-dtype (int8, int4) or a larger --tp")
    return weights, reserve, kv


def _summary(cfg: ModelConfig) -> ModelSummary:
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    norms = 2 * h + (2 * d if cfg.qk_norm else 0) + (2 * h if cfg.sandwich_norms else 0)
    attention = qkv * h + (qkv if cfg.qkv_bias else 0) + cfg.num_heads * d * h + norms
    moe = cfg.moe
    moe_layers = len(moe.layers) if moe else 0
    dense = cfg.num_layers * attention + (cfg.num_layers - moe_layers) * 3 * h * cfg.intermediate_size
    dense += cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h  # embeddings, final norm
    if moe is None:
        return ModelSummary(cfg.architecture, dense, cfg.num_layers, h, cfg.num_heads, cfg.num_kv_heads, d,
                            cfg.vocab_size)
    expert = 3 * h * moe.intermediate_size
    router = moe_layers * moe.num_experts * h
    return ModelSummary(cfg.architecture, dense + router + moe_layers * moe.num_experts * expert, cfg.num_layers, h,
                        cfg.num_heads, cfg.num_kv_heads, d, cfg.vocab_size,
                        active_parameters=dense + router + moe_layers * moe.top_k * expert)


def _weight_format(manifest: Manifest) -> str:
    q = manifest.weights.quantization
    if q is None:
        return manifest.weights.dtype
    if isinstance(q, Fp8Format):
        return f"fp8 e4m3 ({q.strategy} scales, float32 per row and {q.block_k} input columns)"
    return f"int4 (group {q.group_size}, {q.scale_dtype} scales)"


def _warnings(kv_tokens: int, max_model_len: int) -> tuple[str, ...]:
    if kv_tokens >= max_model_len:
        return ()
    return (f"the KV cache holds {kv_tokens:,} tokens, less than one {max_model_len:,}-token request: lower "
            f"--max-model-len to {kv_tokens:,} or less, or make room with a larger --gpu-mem, "
            "--cache-max-entry-count, a quantized --kv-dtype (int8, int4) or a larger --tp",)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _num(n: float) -> str:
    """A byte count as 1,234, or 2.5 when not whole."""
    return f"{n:,.0f}" if float(n).is_integer() else f"{n:,.2f}"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_table(plan: MemoryPlan) -> str:
    """Per-rank table, then the totals in words: why the process takes the memory it takes."""
    m = plan.model
    active = "" if m.active_parameters is None else f" ({m.active_parameters / 1e6:,.1f}M active per token)"
    lines = [f"memory plan: {m.architecture}, {m.parameters / 1e6:,.1f}M parameters{active}, "
             f"tp {plan.tp} x pp {plan.pp}, "
             f"weights {plan.weight_format} (computing in {plan.compute_dtype}), KV {plan.kv_dtype}, "
             f"{_gib(plan.gpu_mem)} GiB per GPU",
             f"{'rank':>4} {'stage':>5} {'weights':>9} {'reserve':>9} {'KV cache':>9} {'KV tokens':>12} {'unused':>9} "
             f"{'total':>9} {'B/token':>9}"]
    uneven = len({r.kv_blocks for r in plan.ranks}) > 1  # only then does one rank limit the others
    for r in plan.ranks:
        mark = "  *" if r.rank == plan.limiting_rank and uneven else ""
        lines.append(f"{r.rank:>4} {r.stage:>5} {_gib(r.weights):>9} {_gib(r.reserve):>9} {_gib(r.kv_allocated):>9} "
                     f"{r.kv_tokens:>12,} {_gib(r.unused):>9} {_gib(r.total):>9} {_num(r.bytes_per_token):>9}{mark}")
    limited = f", * = rank {plan.limiting_rank} limits the cache" if uneven else ""
    lines.append(f"(GiB; KV tokens = what each rank's budget holds; every rank allocates {plan.num_blocks:,} "
                 f"blocks of {plan.block_size} = {plan.kv_tokens:,} tokens{limited})")
    return "\n".join(lines + [""] + _explain(plan))


def _explain(plan: MemoryPlan) -> list[str]:
    r, m = plan.ranks[plan.limiting_rank], plan.model
    heads = max(1, m.kv_heads // plan.tp)
    k, v = (_num(b / plan.block_size) for b in kv_format(plan.kv_dtype, torch.float32, m.head_dim)
            .block_bytes(m.head_dim, plan.block_size))
    lines = [f"weights  {_gib(r.weights)} GiB/rank (S/P, rank {r.rank}; "
             f"{_gib(sum(x.weights for x in plan.ranks))} GiB over all {len(plan.ranks)} ranks, as loaded in memory)",
             f"reserve  {_gib(r.reserve)} GiB for the largest step ({plan.max_prefill_tokens} prefill tokens, "
             f"{plan.max_batch_size} sequences of logits; {_gib(ALLOCATOR_SLACK)} GiB of it allocator slack)"]
    if plan.kv_source == "kv_cache_tokens":
        lines.append(f"KV cache = --kv-cache-tokens {plan.kv_cache_tokens:,} rounded up to {plan.num_blocks:,} "
                     f"blocks = {_gib(r.kv_allocated)} GiB → {plan.kv_tokens:,} tokens (λ is not used)")
    elif plan.kv_source == "gpu_memory_utilization":
        lines.append(f"KV cache = {plan.lam:.2f} × {_gib(r.total)} − {_gib(r.weights)} − {_gib(r.reserve)} GiB "
                     f"(--gpu-memory-utilization: a share of all memory, vLLM's meaning) = {_gib(r.kv_bytes)} GiB → "
                     f"{plan.kv_tokens:,} tokens")
    else:
        lines.append(f"KV cache = λ {plan.lam:.2f} × ({_gib(r.total)} − {_gib(r.weights)} − {_gib(r.reserve)}) "
                     f"GiB = {_gib(r.kv_bytes)} GiB → {plan.kv_tokens:,} tokens")
    per_head = f"K+V × {k} bytes" if k == v else f"(K {k} + V {v}) bytes"
    lines += [f"bytes per token {_num(plan.bytes_per_token)} = {r.layers} layers{_of_stage(plan, r)} × "
              f"{heads} KV heads/rank × {per_head} ({plan.kv_dtype}, head_dim {m.head_dim})",
              f"maximum concurrency for {plan.max_model_len}-token requests: {plan.max_concurrency} "
              f"({plan.concurrency:.2f})"]
    if plan.kv_tail_bytes:
        lines.append(f"int4 KV  keys are scaled per channel over each full {plan.block_size}-token block; each "
                     f"sequence's partial block stays fp16 until it fills: {_gib(plan.kv_tail_bytes)} GiB of the "
                     f"reserve for {tail_slots(plan.max_batch_size, plan.pp)} sequences")
    if plan.cpu_dense_weights is not None:
        lines.append(f"cpu      with --device cpu, --cpu-int4 dequant-once (auto's choice unless the model computes "
                     f"in bf16) holds the int4 linears dense: {_gib(plan.cpu_dense_weights)} GiB/rank instead of "
                     f"{_gib(r.weights)}; --cpu-int4 packed keeps them int4")
    if plan.sliding_layers:
        full = m.layers - plan.sliding_layers
        lines.append(f"sliding  {plan.sliding_layers} of {m.layers} layers attend to the last {plan.window:,} tokens only, "
                     f"yet every layer holds blocks for the whole context here: a pool recycling blocks older than "
                     f"the window would leave {full} layers' worth per token past the window, "
                     f"{m.layers / max(1, full):.1f}x the tokens (not built)")
    if plan.kv_source == "cache_max_entry_count":
        lines.append(f"note: the KV cache takes λ = {plan.lam:.2f} of all memory left after weights and reserve, by "
                     "design, so memory use grows with --gpu-mem, not with the model; lower "
                     "--cache-max-entry-count or set --kv-cache-tokens to use less")
        lines.append(f"unused   {_gib(r.unused)} GiB/rank: the 1 − λ share left for other processes, plus the "
                     "rounding down to whole blocks and to the smallest rank's count")
    return lines + [f"warning: {w}" for w in plan.warnings]


def _of_stage(plan: MemoryPlan, r: RankPlan) -> str:
    return f" (stage {r.stage})" if plan.pp > 1 else ""


def startup_table(llm) -> str:
    """Per rank: weights, reserve, KV bytes and tokens; and the concurrency that buys."""
    mem, n = llm.driver.runner.memory, llm.max_model_len
    kv = llm.driver.runner.cache.shape.fmt.name
    lines = [f"{'rank':>4} {'stage':>5} {'total GiB':>10} {'weights GiB':>12} {'reserve GiB':>12} {'KV GiB':>8} "
             f"{'KV tokens':>10}"]
    for m in mem:
        lines.append(f"{m.rank:>4} {m.stage:>5} {m.total / GIB:>10.2f} {m.weights / GIB:>12.2f} {m.reserve / GIB:>12.2f} "
                     f"{m.kv_bytes / GIB:>8.2f} {m.kv_tokens:>10}")
    tokens = mem[0].kv_tokens
    lines.append(f"KV cache: {kv}, {llm.blocks.num_blocks} blocks of {llm.blocks.block_size} tokens = {tokens} tokens "
                 f"per rank; maximum concurrency for {n}-token requests: {tokens / n:.2f}")
    return "\n".join(lines)
