"""Joining the ranks' process group (gloo on CPU, NCCL on CUDA); the model's collectives are ``Comm``."""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from runtime.model.comm import Comm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(rank: int, world: int, port: int, device: torch.device) -> Comm:
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return Comm(rank, world, device)
