"""Read a local Hugging Face checkpoint's weights slice by slice, never the whole model at once.

safetensors files are read with positioned reads straight into the destination buffer (a row range
of a row-major tensor is one contiguous byte range), so memory follows the slice being written.
``pytorch_model*.bin`` files are memory-mapped with ``weights_only=True`` and re-mapped per layer
so touched pages do not accumulate.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from formats.errors import FormatError
from formats.safetensors_io import TensorInfo, read_header

ST_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class Checkpoint:
    """The tensor table of all weight files in a checkpoint directory."""

    def __init__(self, src: Path):
        self.src = Path(src)
        self.format, self.files = _discover(self.src)
        self._where: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        self._bin: dict[Path, dict[str, torch.Tensor]] = {}
        self._fds: dict[Path, int] = {}
        self._whole: tuple[str, torch.Tensor] | None = None  # last tensor read whole for column slicing
        for path in self.files:
            table = self._read_table(path)
            for name, info in table.items():
                if name in self._where:
                    raise FormatError(f"tensor {name!r} appears in both {self._where[name].name} and {path.name}")
                self._where[name], self._info[name] = path, info
        self._release_bins()

    def names(self) -> set[str]:
        return set(self._info)

    def dtype(self, name: str) -> torch.dtype:
        return self._info[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name].shape

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def read(self, name: str, axis: int, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of ``name`` along ``axis``, as a new contiguous tensor."""
        info, path = self._info[name], self._where[name]
        if self.format == "pytorch-bin":
            return self._bin_tensor(path, name).narrow(axis, start, stop - start).clone()
        if axis == 0:
            return self._pread_rows(path, info, start, stop)
        # Column slices are strided on disk: read the tensor once, keep it for the other ranks' slices.
        if self._whole is None or self._whole[0] != name:
            self._whole = None  # free the previous one before reading the next
            self._whole = (name, self._pread_rows(path, info, 0, info.shape[0]))
        return self._whole[1].narrow(axis, start, stop - start).contiguous()

    def read_scalar(self, name: str) -> torch.Tensor:
        """A 0-d tensor (an older per-tensor FP8 scale), which has no rows to slice."""
        info, path = self._info[name], self._where[name]
        if self.format == "pytorch-bin":
            return self._bin_tensor(path, name).clone()
        return self._pread_rows(path, TensorInfo(info.dtype, (1,), info.begin, info.end), 0, 1).reshape(())

    def release(self) -> None:
        """End of a layer: drop .bin memory maps and the kept whole tensor."""
        self._release_bins()
        self._whole = None

    def close(self) -> None:
        self._release_bins()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _pread_rows(self, path: Path, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        shape = (stop - start, *info.shape[1:])
        out = torch.empty(shape, dtype=info.dtype)
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        fd = self._fds.get(path) or self._fds.setdefault(path, os.open(path, os.O_RDONLY))
        offset, done = info.begin + start * row, 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n <= 0:
                raise FormatError(f"{path}: truncated while reading a tensor at byte {offset + done}")
            done += n
        return out

    def _read_table(self, path: Path) -> dict[str, TensorInfo]:
        if self.format == "safetensors":
            return read_header(path)[0]
        sd = self._bin_state(path)
        return {n: TensorInfo(t.dtype, tuple(t.shape), 0, t.numel() * t.element_size()) for n, t in sd.items()}

    def _bin_state(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._bin:
            self._bin[path] = _load_bin(path)
        return self._bin[path]

    def _bin_tensor(self, path: Path, name: str) -> torch.Tensor:
        return self._bin_state(path)[name]

    def _release_bins(self) -> None:
        self._bin.clear()


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "zipfile" not in str(e) and "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip format
    except Exception as e:  # torch raises many types for damaged archives; name the file either way
        raise FormatError(f"{path}: cannot read this PyTorch weight file ({type(e).__name__}: {e}); "
                          "it is truncated, corrupt or not a state dict; re-download or re-save it") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FormatError(f"{path}: expected a state dict of tensors, found {type(sd).__name__}")
    return sd


def _discover(src: Path) -> tuple[str, list[Path]]:
    """Weight files named by an index, or found by their conventional names."""
    for index, fmt in ((ST_INDEX, "safetensors"), (BIN_INDEX, "pytorch-bin")):
        if (src / index).is_file():
            return fmt, _files_from_index(src / index)
    st = sorted(src.glob("*.safetensors"))
    if st:
        return "safetensors", st
    bins = sorted(src.glob("pytorch_model*.bin"))
    if bins:
        return "pytorch-bin", bins
    raise FormatError(f"no weights found in {src}: expected model.safetensors, sharded *.safetensors "
                      f"with {ST_INDEX}, or pytorch_model*.bin")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FormatError(f"{index}: not a valid weight index (needs a 'weight_map' object): {e}") from e
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise FormatError(f"{index} names shard file(s) that do not exist: {', '.join(missing)}; "
                          "the download is incomplete, fetch the missing files")
    return [index.parent / f for f in files]
