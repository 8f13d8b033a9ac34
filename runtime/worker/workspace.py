"""Open a workspace and map one rank's shard, and only that rank's.

On CPU every tensor is a view into a private (copy-on-write) memory map of its file: no copy, and
pages are read only when touched. On CUDA each tensor is copied from the map straight to the
worker's own device, so nothing lands on any other GPU.
"""
from __future__ import annotations

import mmap
from collections.abc import Iterable
from pathlib import Path

import torch

from formats import layout
from formats.errors import FormatError, TpDeployError
from formats.manifest import STORED_DTYPES, Manifest, RankEntry, load_manifest
from formats.safetensors_io import read_header


def open_workspace(path: Path, expected_tp: int | None = None) -> Manifest:
    """The manifest, after the tokenizer is found; shard sizes are checked by each rank on load.
    ``expected_tp`` (``--tp``/``--tensor-parallel-size``) must be the tp the workspace was converted for."""
    manifest = load_manifest(Path(path))
    if not (Path(path) / layout.TOKENIZER_DIR / "tokenizer.json").is_file():
        raise FormatError(f"{path}: {layout.TOKENIZER_DIR}/tokenizer.json is missing; re-convert the workspace")
    if expected_tp is not None and expected_tp != manifest.tp:
        stages = f" (x pp {manifest.pp})" if manifest.pp > 1 else ""
        raise TpDeployError(f"this workspace was converted for --tp {manifest.tp}{stages}; you asked for {expected_tp}: "
                            f"convert again with `tpconv convert SRC -o WS --tp {expected_tp}`, or drop --tp")
    return manifest


def check_rank_files(ws: Path, rank: RankEntry) -> None:
    """Quick size check of this rank's files (a full sha256 pass is `tpconv verify`)."""
    for f in rank.files:
        path = Path(ws) / f.path
        if not path.is_file():
            raise FormatError(f"{path} is missing; the workspace is incomplete, re-convert it")
        if path.stat().st_size != f.bytes:
            raise FormatError(f"{path} has {path.stat().st_size} bytes but manifest.json says {f.bytes}; "
                              "the file is truncated or replaced: run `tpconv verify` and re-convert")


def load_rank(ws: Path, manifest: Manifest, rank: int, device: torch.device,
              maps: dict[str, mmap.mmap] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``rank`` by canonical name, mapped (CPU) or copied to ``device`` (CUDA); each file's
    mapping goes into ``maps`` under its name (``layer-00003.safetensors``; for ``release_pages``)."""
    entry = manifest.ranks[rank]
    check_rank_files(ws, entry)
    tensors: dict[str, torch.Tensor] = {}
    for f in entry.files:
        path = Path(ws) / f.path
        header, _ = read_header(path)
        buf = _map(path)
        if maps is not None:
            maps[path.name] = buf
        for t in (t for t in entry.tensors if t.file == f.path):
            info = header.get(t.name)
            if info is None or info.dtype != STORED_DTYPES.get(t.dtype) or list(info.shape) != list(t.shape):
                raise FormatError(f"{path}: tensor {t.name!r} does not match manifest.json; run `tpconv verify`")
            view = torch.frombuffer(buf, dtype=info.dtype, count=info.nbytes // info.dtype.itemsize,
                                    offset=info.begin).view(info.shape) if info.nbytes else torch.empty(info.shape, dtype=info.dtype)
            tensors[t.name] = view if device.type == "cpu" else view.to(device, non_blocking=False)
    return tensors


def release_pages(maps: Iterable[mmap.mmap]) -> None:
    """Take the weight files' pages that loading read out of this process's resident set: once the model holds
    its own copies (weights packed for the CPU kernels, or converted to the compute dtype), the mapped bytes
    would otherwise count twice. Tensors still mapped (norms, unconverted weights) fault back in from the page
    cache when next read; the mappings are private and never written, so nothing is lost."""
    for m in maps:
        m.madvise(mmap.MADV_DONTNEED)


def _map(path: Path) -> mmap.mmap:
    # ACCESS_COPY: a writable private mapping, so torch.frombuffer shares it without a warning
    # and without ever writing back to the workspace.
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
