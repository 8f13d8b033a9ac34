"""The KV cache's size settings, and how much memory a rank can still use.

The arithmetic (λ × (T − S/P − reserve)) lives in ``runtime/serve/plan.py``, shared by ``tprun plan``
and the runner, so the plan and the server always agree."""
from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from formats.errors import TpDeployError
from runtime.kv.format import BLOCK_SIZE


@dataclass(frozen=True)
class CacheConfig:
    kv_dtype: str = "auto"  # auto (= compute dtype), fp32, fp16, bf16, int8, int4
    block_size: int = BLOCK_SIZE
    cache_max_entry_count: float = 0.8  # λ: fraction of the memory free after loading the weights
    kv_cache_tokens: int | None = None  # an exact size instead of λ (tests, CPU runs, reproducible plans)
    gpu_mem: int | None = None  # T: memory per rank to plan for, instead of measuring what is free

    def __post_init__(self):
        if not 0 < self.cache_max_entry_count <= 1:
            raise TpDeployError(f"--cache-max-entry-count must be in (0, 1], got {self.cache_max_entry_count}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise TpDeployError(f"--kv-cache-tokens must be >= 1, got {self.kv_cache_tokens}")
        if self.gpu_mem is not None and self.gpu_mem < 1:
            raise TpDeployError(f"--gpu-mem must be positive, got {self.gpu_mem}")


def free_bytes(device: torch.device, ranks_on_host: int) -> int:
    """Memory this rank may still use: the GPU's free memory, or its share of the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available // ranks_on_host

