"""The only tensor-parallel operations the model needs: all-reduce and a vocab gather (and, for
the worker, the broadcast that carries each step from rank 0).

``Comm`` wraps ``torch.distributed`` (gloo on CPU, NCCL on CUDA) over one pipeline stage's tensor-
parallel group: ``rank`` and ``world`` are the tensor rank and tp, ``leader`` the global rank of the
stage's tensor rank 0. With one rank it does nothing, so the model code reads the same at any tp. The
worker joins the process group and hands it one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# int64s in a message's first broadcast (8 KiB): a decode step of up to ~160 sequences fits, so a
# step usually costs one collective; a longer message (a long prompt's ids) sends the rest in a second.
_FIRST_BROADCAST = 1024


class Comm:
    def __init__(self, rank: int, world: int, device: torch.device | None = None, group=None, leader: int = 0):
        self.rank, self.world, self.group, self.leader = rank, world, group, leader
        self.device = device or torch.device("cpu")  # where the backend wants tensors (NCCL: the GPU)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum partial results of row-parallel layers across the stage's ranks, in place."""
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def gather_last_dim(self, t: torch.Tensor) -> torch.Tensor | None:
        """Concatenate each rank's vocabulary slice on tensor rank 0 (None elsewhere)."""
        if self.world == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(t, parts, dst=self.leader, group=self.group)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None

    def broadcast_ints(self, message: torch.Tensor | None) -> torch.Tensor:
        """Rank 0's 1-D int64 ``message`` (None on the other ranks) on every rank, on the CPU: one
        broadcast of a fixed-size buffer holding its length and start, a second for the rest if longer."""
        if self.world == 1:
            return message
        first = torch.zeros(_FIRST_BROADCAST, dtype=torch.int64)  # [length, message[:_FIRST_BROADCAST - 1]]
        if self.rank == 0:
            head = message[:_FIRST_BROADCAST - 1]
            first[0], first[1:1 + head.numel()] = message.numel(), head
        first = first.to(self.device)
        dist.broadcast(first, src=self.leader, group=self.group)
        first = first.cpu()
        n = int(first[0])
        if n < _FIRST_BROADCAST:
            return message if self.rank == 0 else first[1:1 + n]
        rest = (message[_FIRST_BROADCAST - 1:] if self.rank == 0
                else torch.empty(n - _FIRST_BROADCAST + 1, dtype=torch.int64)).to(self.device)
        dist.broadcast(rest, src=self.leader, group=self.group)
        return message if self.rank == 0 else torch.cat([first[1:], rest.cpu()])
