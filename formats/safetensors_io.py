"""Reading safetensors headers strictly, so a truncated or corrupt file is named, not crashed on.

File layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
then the tensor bytes; offsets are relative to the end of the header. As in the reference reader,
the tensors sorted by offset must tile the data section exactly: no overlap, gap or trailing byte, so
no tensor can read header bytes or another tensor's bytes.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from formats.errors import FormatError

# safetensors dtype code <-> torch dtype, for the dtypes a checkpoint of ours may hold.
ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
MAX_HEADER = 100 << 20  # the reference implementation's own limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor table and metadata of a safetensors file, every offset checked against the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise FormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise FormatError(f"{path}: corrupt or truncated safetensors header (declares {n} header "
                              f"bytes, file has {size}); re-download or re-save this file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # bad JSON, bad UTF-8, or an integer past Python's digit limit
            raise FormatError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{path}: __metadata__ must map names to strings, got {_show(meta)}; re-save this file")
    base = 8 + n
    tensors = {name: _entry(path, name, e, size - base) for name, e in header.items()}
    _check_tiling(path, tensors, size - base)
    return {k: TensorInfo(t.dtype, t.shape, base + t.begin, base + t.end) for k, t in tensors.items()}, meta


def _entry(path: Path, name: str, e: Any, data_len: int) -> TensorInfo:
    """One tensor, offsets still relative to the data section; JSON types checked, not coerced."""
    if not isinstance(e, dict):
        raise FormatError(f"{path}: tensor {name!r} has entry {_show(e)}, not an object; re-save this file")
    dtype = ST_TO_TORCH.get(e.get("dtype")) if isinstance(e.get("dtype"), str) else None
    if dtype is None:
        raise FormatError(f"{path}: tensor {name!r} has dtype {_show(e.get('dtype'))}; "
                          f"supported: {', '.join(ST_TO_TORCH)}")
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_size(s) for s in shape):
        raise FormatError(f"{path}: tensor {name!r} has shape {_show(shape)}; expected a list of "
                          "non-negative integers; re-save this file")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets))
            and offsets[0] <= offsets[1]):
        raise FormatError(f"{path}: tensor {name!r} has data_offsets {_show(offsets)}; expected [begin, end], "
                          "integers with 0 <= begin <= end counted from the end of the header; re-save this file")
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise FormatError(f"{path}: tensor {name!r} spans {end - begin} bytes but its shape "
                          f"{shape} and dtype {e['dtype']} need {expected}")
    if end > data_len:
        raise FormatError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data but the file has "
                          f"{data_len} data bytes; re-download or re-save this file")
    return TensorInfo(dtype, tuple(shape), begin, end)


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """Sorted by offset, tensors cover the data section exactly, as the reference reader demands.

    Its ``Metadata::validate`` requires each tensor to start where the previous one ended and the last
    to end at the end of the file; a gap or trailing bytes are refused, not skipped, because a file
    written that way is not what any safetensors writer produces.
    """
    pos, last = 0, None
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin < pos:
            raise FormatError(f"{path}: tensor {name!r} (data bytes {t.begin}-{t.end}) overlaps tensor {last!r} "
                              f"(which ends at {pos}); tensors may not share bytes; re-save this file")
        if t.begin > pos:
            where = f"between tensor {last!r} and tensor {name!r}" if last else f"before tensor {name!r}"
            raise FormatError(f"{path}: {t.begin - pos} bytes {where} belong to no tensor (a gap in the "
                              "data section); re-save this file")
        pos, last = t.end, name
    if pos != data_len:
        where = f"after tensor {last!r}" if last else "of data in a file with no tensors"
        raise FormatError(f"{path}: {data_len - pos} bytes {where} belong to no tensor (the data section must "
                          "end with the last tensor); re-download or re-save this file")


def _is_size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0  # JSON true is a bool, not 1


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
