"""One rank's worker: its own shard, its model, its KV cache; executes the steps rank 0 sends."""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from formats import int4
from formats.manifest import Manifest
from formats.sharding import kv_heads_per_rank
from runtime import kernels
from runtime.config import DEFAULTS, CacheConfig
from runtime.kv.batch import StepBatch
from runtime.kv.cache import PagedKVCache
from runtime.kv.format import KVShape, kv_format
from runtime.model.comm import Comm
from runtime.model.llama import Model
from runtime.worker.memory import free_bytes, kv_bytes, reserve_bytes, weights_bytes
from runtime.worker.workspace import load_rank


@dataclass(frozen=True)
class Step:
    """Everything every rank needs for one forward; rank 0 broadcasts it."""

    tokens: list[int]
    batch: StepBatch
    all_logits: bool = False


@dataclass(frozen=True)
class RunnerSpec:
    workspace: Path
    manifest: Manifest
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype
    cache: CacheConfig = field(default_factory=CacheConfig)
    max_batch_size: int = DEFAULTS.max_batch_size  # with max_prefill_tokens: the largest step (the reserve)
    max_prefill_tokens: int = DEFAULTS.max_prefill_tokens
    threads: int = 0  # CPU threads per rank (0: cores // tp)


def kv_shape(spec: RunnerSpec) -> KVShape:
    cfg, tp = spec.manifest.model, spec.manifest.tp
    fmt = kv_format(spec.cache.kv_dtype, spec.dtype, cfg.head_dim)
    return KVShape(cfg.num_layers, kv_heads_per_rank(cfg, tp), cfg.head_dim, fmt, spec.cache.block_size)


@dataclass(frozen=True)
class RankMemory:
    """What one rank holds, for the start-up table: T, S/P, reserve, and its KV cache."""

    rank: int
    total: int
    weights: int
    reserve: int
    blocks: int  # this rank's proposal
    bytes_per_block: int
    block_size: int
    blocks_agreed: int = 0

    @property
    def kv_bytes(self) -> int:
        return self.blocks_agreed * self.bytes_per_block

    @property
    def kv_tokens(self) -> int:
        return self.blocks_agreed * self.block_size


class ModelRunner:
    def __init__(self, spec: RunnerSpec, rank: int, comm: Comm):
        cfg, tp = spec.manifest.model, spec.manifest.tp
        self.device = torch.device("cuda", rank) if spec.device == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // tp))
        shape = kv_shape(spec)  # before loading: a bad --kv-dtype fails fast
        self.kernels = kernels.select(self.device)
        weights = load_rank(spec.workspace, spec.manifest, rank, self.device)
        # Dense tensors take the compute dtype; int4 parts keep theirs (scales dequantize exactly as stored).
        weights = {k: w if int4.is_part(k) or w.dtype == spec.dtype else w.to(spec.dtype) for k, w in weights.items()}
        self.model = Model(cfg, tp, rank, weights, comm, self.kernels, spec.manifest.weights.quantization)
        self.spec, self.rank, self.shape = spec, rank, shape
        self.cache: PagedKVCache | None = None

    def init_cache(self, comm: Comm) -> None:
        """Size the cache once every rank has loaded: each proposes λ × (free − reserve) (the formula of
        ``tprun plan``), and all ranks take the smallest proposal."""
        mine = self._memory(comm.world)
        everyone = comm.all_gather(mine)
        num_blocks = min(m.blocks for m in everyone)
        self.memory = [dataclasses.replace(m, blocks_agreed=num_blocks) for m in everyone]
        if self.rank == 0 and len({m.blocks for m in everyone}) > 1:
            limit = [m.blocks for m in everyone].index(num_blocks)
            sys.stderr.write(f"tprun: rank {limit} limits the KV cache to {num_blocks} blocks "
                             f"(proposed per rank: {[m.blocks for m in everyone]})\n")
        self.cache = PagedKVCache(self.shape, num_blocks, self.device, self.kernels,
                                  self.spec.manifest.model.sliding_window, self.spec.dtype)

    def _memory(self, world: int) -> "RankMemory":
        spec, shape = self.spec, self.shape
        weights = weights_bytes(spec.manifest, self.rank, spec.dtype)
        reserve = reserve_bytes(spec.manifest.model, spec.manifest.tp, spec.dtype, spec.max_prefill_tokens,
                                spec.max_batch_size, rank=self.rank)
        if spec.cache.gpu_mem is not None:
            total, free = spec.cache.gpu_mem, spec.cache.gpu_mem - weights
        else:  # measured now that the weights are loaded
            free = free_bytes(self.device, 1 if self.device.type == "cuda" else world)
            total = free + weights
        if spec.cache.kv_cache_tokens is not None:
            blocks = -(-spec.cache.kv_cache_tokens // shape.block_size)
        else:
            blocks = shape.blocks_for(kv_bytes(free, reserve, spec.cache.cache_max_entry_count))
        return RankMemory(self.rank, total, weights, reserve, blocks, shape.bytes_per_block, shape.block_size)

    def execute(self, step: Step) -> torch.Tensor | None:
        if not step.batch.seqs:
            return None
        tokens = torch.tensor(step.tokens, dtype=torch.long, device=self.device)
        logits = self.model.forward(tokens, step.batch, self.cache, step.all_logits)
        return None if logits is None else logits.float()
