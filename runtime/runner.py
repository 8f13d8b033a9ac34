"""One rank's worker: its own shard, its model, its KV cache; executes the steps rank 0 sends."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from formats import int4
from formats.manifest import Manifest
from formats.sharding import kv_heads_per_rank
from runtime import kernels
from runtime.kv.batch import StepBatch
from runtime.kv.cache import PagedKVCache
from runtime.kv.format import KVShape, kv_format
from runtime.memory import CacheConfig, local_blocks
from runtime.model import Model
from runtime.parallel import Comm
from runtime.workspace import load_rank


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
    cache_cap_tokens: int = 1 << 20  # the most tokens the engine could ever hold at once
    threads: int = 0  # CPU threads per rank (0: cores // tp)


def kv_shape(spec: RunnerSpec) -> KVShape:
    cfg, tp = spec.manifest.model, spec.manifest.tp
    fmt = kv_format(spec.cache.kv_dtype, spec.dtype, cfg.head_dim)
    return KVShape(cfg.num_layers, kv_heads_per_rank(cfg, tp), cfg.head_dim, fmt, spec.cache.block_size)


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
        """Size the cache once every rank has loaded: all ranks take the smallest block count."""
        spec, rank, shape = self.spec, self.rank, self.shape
        ranks_on_host = 1 if self.device.type == "cuda" else comm.world
        per_rank = comm.all_gather_int(local_blocks(spec.cache, shape, self.device, ranks_on_host, spec.cache_cap_tokens))
        num_blocks = min(per_rank)
        if rank == 0 and len(set(per_rank)) > 1:
            sys.stderr.write(f"tprun: rank {per_rank.index(num_blocks)} limits the KV cache to {num_blocks} blocks "
                             f"(per rank: {per_rank})\n")
        self.cache = PagedKVCache(shape, num_blocks, self.device, self.kernels, spec.manifest.model.sliding_window,
                                  spec.dtype)

    def execute(self, step: Step) -> torch.Tensor | None:
        if not step.batch.seqs:
            return None
        tokens = torch.tensor(step.tokens, dtype=torch.long, device=self.device)
        logits = self.model.forward(tokens, step.batch, self.cache, step.all_logits)
        return None if logits is None else logits.float()
