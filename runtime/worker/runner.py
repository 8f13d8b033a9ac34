"""One rank's worker: its own shard (one pipeline stage's layers, one tensor rank's slices), its model,
its KV cache; executes the steps rank 0 sends."""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from formats import layout
from formats.fp8 import Fp8Format
from formats.manifest import Manifest
from formats.sharding import kv_heads_per_rank
from runtime import kernels
from runtime.config import DEFAULTS, CacheConfig
from runtime.kernels.cpu_int4 import loads_dense
from runtime.kv.batch import StepBatch
from runtime.kv.cache import PagedKVCache
from runtime.kv.format import KVShape, kv_format
from runtime.model.comm import Comm
from runtime.model.llama import Model
from runtime.worker.heap import keep_freed_memory
from runtime.worker.memory import free_bytes, keeps_dtype, kv_bytes, reserve_bytes, tail_slots, weights_bytes
from runtime.worker.parallel import Topology
from runtime.worker.workspace import load_rank, release_pages


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
    threads: int = 0  # CPU threads per rank (0: cores // ranks on this host)
    dist_timeout: float = DEFAULTS.dist_timeout  # seconds: joining, and any one collective or transfer
    cpu_int4: str = DEFAULTS.cpu_int4  # how int4 linears run on CPU (kernels.cpu_int4)

    def settings(self) -> str:
        """What every rank must agree on (the start-up handshake compares it)."""
        c = self.cache
        return (f"dtype={str(self.dtype).removeprefix('torch.')} kv={c.kv_dtype} block={c.block_size} "
                f"lambda={c.cache_max_entry_count} kv_tokens={c.kv_cache_tokens} gpu_mem={c.gpu_mem} "
                f"batch={self.max_batch_size} prefill={self.max_prefill_tokens}")


def kv_shape(spec: RunnerSpec, stage: int = 0) -> KVShape:
    cfg, tp = spec.manifest.model, spec.manifest.tp
    fmt = kv_format(spec.cache.kv_dtype, spec.dtype, cfg.head_dim)
    layers = spec.manifest.stages[stage].num_layers
    return KVShape(layers, kv_heads_per_rank(cfg, tp), cfg.head_dim, fmt, spec.cache.block_size)


@dataclass(frozen=True)
class RankMemory:
    """What one rank holds, for the start-up table: T, S/P, reserve, and its KV cache."""

    rank: int
    stage: int
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


def device_for(spec: RunnerSpec, topo: Topology) -> torch.device:
    return torch.device("cuda", topo.local_rank) if spec.device == "cuda" else torch.device("cpu")


class ModelRunner:
    def __init__(self, spec: RunnerSpec, topo: Topology, comm: Comm, ranks_on_host: int = 1):
        cfg, tp = spec.manifest.model, spec.manifest.tp
        self.device = device_for(spec, topo)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // ranks_on_host))
            keep_freed_memory()  # activations live in host memory: each step reuses the last one's pages
        shape = kv_shape(spec, topo.stage)  # before loading: a bad --kv-dtype fails fast
        self.kernels = kernels.select(self.device, spec.cpu_int4, spec.dtype)
        maps: dict = {}
        weights = load_rank(spec.workspace, spec.manifest, topo.rank, self.device, maps)
        # Dense tensors take the compute dtype; int4 parts and FP8 weights and scales keep theirs (they
        # dequantize exactly as stored).
        weights = {k: w if keeps_dtype(k, w.dtype) or w.dtype == spec.dtype else w.to(spec.dtype)
                   for k, w in weights.items()}
        # Each layer file's pages leave the resident set once the layer is built (packed CPU weights are copies),
        # so loading never holds the model twice.
        self.model = Model(cfg, tp, topo.tp_rank, weights, comm, self.kernels, spec.manifest.weights.quantization,
                           spec.manifest.stages[topo.stage].layers,
                           built=lambda i: release_pages([maps[layout.layer_file(i)]]))
        del weights
        release_pages(maps.values())
        self.spec, self.topo, self.rank, self.shape = spec, topo, topo.rank, shape
        self.ranks_on_host = ranks_on_host
        self.cache: PagedKVCache | None = None

    def init_cache(self) -> None:
        """Size the cache once every rank has loaded: each proposes λ × (free − reserve) (the formula of
        ``tprun plan``), and all ranks take the smallest proposal."""
        mine = self._memory()
        everyone = [mine]
        if self.topo.world > 1:
            everyone = [None] * self.topo.world
            dist.all_gather_object(everyone, mine)
        num_blocks = min(m.blocks for m in everyone)
        self.memory = [dataclasses.replace(m, blocks_agreed=num_blocks) for m in everyone]
        if self.rank == 0 and len({m.blocks for m in everyone}) > 1:
            limit = [m.blocks for m in everyone].index(num_blocks)
            sys.stderr.write(f"tprun: rank {limit} limits the KV cache to {num_blocks} blocks "
                             f"(proposed per rank: {[m.blocks for m in everyone]})\n")
        cfg = self.spec.manifest.model
        windows = [cfg.window(i) for i in range(*self.spec.manifest.stages[self.topo.stage].layers)]
        self.cache = PagedKVCache(self.shape, num_blocks, self.device, self.kernels, windows, self.spec.dtype,
                                  cfg.attention_scale, tail_slots(self.spec.max_batch_size, self.spec.manifest.pp))

    def _memory(self) -> RankMemory:
        spec, shape = self.spec, self.shape
        fp8_model = isinstance(spec.manifest.weights.quantization, Fp8Format)  # dense on CPU (cpu_fp8)
        dense = self.kernels.name == "torch" and (fp8_model or loads_dense(kernels.cpu_int4_mode(spec.cpu_int4),
                                                                           spec.dtype))
        weights = weights_bytes(spec.manifest, self.rank, spec.dtype, int4_dense=dense)
        reserve = reserve_bytes(spec.manifest.model, spec.manifest.tp, spec.dtype, spec.max_prefill_tokens,
                                spec.max_batch_size, rank=self.rank, pp=spec.manifest.pp, kv=shape)
        if spec.cache.gpu_mem is not None:
            total, free = spec.cache.gpu_mem, spec.cache.gpu_mem - weights
        else:  # measured now that the weights are loaded
            free = free_bytes(self.device, 1 if self.device.type == "cuda" else self.ranks_on_host)
            total = free + weights
        if spec.cache.kv_cache_tokens is not None:
            blocks = -(-spec.cache.kv_cache_tokens // shape.block_size)
        else:
            blocks = shape.blocks_for(kv_bytes(free, reserve, spec.cache.cache_max_entry_count, total,
                                               spec.cache.gpu_memory_utilization))
        return RankMemory(self.rank, self.topo.stage, total, weights, reserve, blocks, shape.bytes_per_block,
                          shape.block_size)

    def execute(self, step: Step, hidden: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run this stage: the next stage's input (hidden states), or, on the last stage, the logits
        (float32, tensor rank 0 only; None elsewhere and for an empty step)."""
        if not step.batch.seqs:
            return None
        tokens = torch.tensor(step.tokens, dtype=torch.long, device=self.device) if self.model.first else None
        out = self.model.forward(tokens, step.batch, self.cache, step.all_logits, hidden)
        return None if out is None else out.float() if self.model.last else out
