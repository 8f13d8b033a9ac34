"""One rank's worker: its own shard, its model, its KV cache; executes the steps rank 0 sends."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from formats import int4
from formats.manifest import Manifest
from formats.sharding import kv_heads_per_rank
from runtime.kv_cache import SequenceKVCache, StepBatch
from runtime.model import Model
from runtime.parallel import Comm
from runtime.workspace import load_rank


@dataclass(frozen=True)
class Step:
    """Everything every rank needs for one forward; rank 0 broadcasts it."""

    tokens: list[int]
    batch: StepBatch
    allocate: tuple[tuple[int, int], ...] = ()  # (seq_id, capacity) to allocate before running
    free: tuple[int, ...] = ()  # seq_ids whose cache is released before running
    all_logits: bool = False


@dataclass(frozen=True)
class RunnerSpec:
    workspace: Path
    manifest: Manifest
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype
    threads: int = field(default=0)  # CPU threads per rank (0: cores // tp)


class ModelRunner:
    def __init__(self, spec: RunnerSpec, rank: int, comm: Comm):
        cfg, tp = spec.manifest.model, spec.manifest.tp
        self.device = torch.device("cuda", rank) if spec.device == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // tp))
        weights = load_rank(spec.workspace, spec.manifest, rank, self.device)
        # Dense tensors take the compute dtype; int4 parts keep theirs (scales dequantize exactly as stored).
        weights = {k: w if int4.is_part(k) or w.dtype == spec.dtype else w.to(spec.dtype) for k, w in weights.items()}
        self.model = Model(cfg, tp, rank, weights, comm, spec.manifest.weights.quantization)
        self.cache = SequenceKVCache(cfg.num_layers, kv_heads_per_rank(cfg, tp), cfg.head_dim, spec.dtype,
                                     self.device, cfg.sliding_window)

    def execute(self, step: Step) -> torch.Tensor | None:
        for seq_id in step.free:
            self.cache.free(seq_id)
        for seq_id, capacity in step.allocate:
            self.cache.allocate(seq_id, capacity)
        if not step.batch.seqs:
            return None
        tokens = torch.tensor(step.tokens, dtype=torch.long, device=self.device)
        logits = self.model.forward(tokens, step.batch, self.cache, step.all_logits)
        return None if logits is None else logits.float()
