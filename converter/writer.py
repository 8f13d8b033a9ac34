"""A streaming safetensors writer: the header first, then one tensor at a time, hashed on the way.

The header is computed from declared shapes, so no tensor needs to exist before it is written and
only one rank tensor is in memory at a time. Tensors are ordered by element size (largest first),
then name: with the header padded to 8 bytes, every tensor starts aligned to its element size, so
readers can map it without copying. Output is a standard safetensors file.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from formats.safetensors_io import TORCH_TO_ST

CHUNK = 16 << 20  # write and hash in slices so the two hashes overlap with the write


@dataclass(frozen=True)
class Declared:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Written:
    path: Path
    nbytes: int
    sha256: str
    tensor_sha256: dict[str, str]


def write_safetensors(path: Path, declared: list[Declared], produce: Callable[[Declared], torch.Tensor],
                      metadata: dict[str, str]) -> Written:
    """Write ``declared`` tensors, asking ``produce`` for each only when its turn comes."""
    order = sorted(declared, key=lambda d: (-d.dtype.itemsize, d.name))
    header, offset = {"__metadata__": metadata}, 0
    for d in order:
        header[d.name] = {"dtype": TORCH_TO_ST[d.dtype], "shape": list(d.shape),
                          "data_offsets": [offset, offset + d.nbytes]}
        offset += d.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    file_hash, tensor_hash = hashlib.sha256(), {}
    with open(path, "wb") as f, ThreadPoolExecutor(1) as hasher:
        head = len(raw).to_bytes(8, "little") + raw
        f.write(head)
        file_hash.update(head)
        for d in order:
            t = produce(d)
            assert t.dtype == d.dtype and tuple(t.shape) == d.shape, (d, t.dtype, t.shape)
            tensor_hash[d.name] = _write_tensor(f, t, file_hash, hasher)
        f.flush()
        os.fsync(f.fileno())
    return Written(path, len(head) + offset, file_hash.hexdigest(), tensor_hash)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is contiguous."""
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def _write_tensor(f, t: torch.Tensor, file_hash, hasher: ThreadPoolExecutor) -> str:
    """Write one tensor; its own hash runs on another core while this one writes and hashes the file."""
    h = hashlib.sha256()
    data = tensor_bytes(t)
    for i in range(0, len(data), CHUNK):
        chunk = data[i:i + CHUNK]
        pending = hasher.submit(h.update, chunk)  # hashlib and write() both release the GIL
        f.write(chunk)
        file_hash.update(chunk)
        pending.result()
    return h.hexdigest()


READ_CHUNK = 4 << 20  # one reused buffer: hashing a large source must not cost memory


def sha256_file(path: Path) -> str:
    h, buf = hashlib.sha256(), bytearray(READ_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's before exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
