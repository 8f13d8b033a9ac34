"""The only tensor-parallel operations the model needs: all-reduce and a vocab gather.

``Comm`` wraps ``torch.distributed`` (gloo on CPU, NCCL on CUDA); with one rank it does nothing,
so the model code reads the same at any tp. The worker joins the process group and hands it one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class Comm:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum partial results of row-parallel layers across ranks, in place."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather_last_dim(self, t: torch.Tensor) -> torch.Tensor | None:
        """Concatenate each rank's vocabulary slice on rank 0 (None elsewhere)."""
        if self.world == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(t, parts, dst=0)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None

    def all_gather(self, value: object) -> list:
        """One small object from every rank, on every rank (ranks agreeing on a size)."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def broadcast_object(self, obj: object) -> object:
        """Rank 0 sends one step description; the others receive it."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
