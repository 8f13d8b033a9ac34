"""Reading safetensors headers strictly, so a truncated or corrupt file is named, not crashed on.

File layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
N bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``,
then the tensor bytes; offsets are relative to the end of the header.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from formats.errors import FormatError

# safetensors dtype code <-> torch dtype, for the dtypes a checkpoint of ours may hold.
ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    tensors = {name: _entry(path, name, e, 8 + n, size) for name, e in header.items()}
    return tensors, meta


def _entry(path: Path, name: str, e: dict, base: int, size: int) -> TensorInfo:
    try:
        dtype = ST_TO_TORCH[e["dtype"]]
        shape = tuple(int(s) for s in e["shape"])
        begin, end = (base + int(o) for o in e["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
        raise FormatError(f"{path}: tensor {name!r} has an unsupported or malformed entry {e} ({err})") from err
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise FormatError(f"{path}: tensor {name!r} spans {end - begin} bytes but its shape "
                          f"{list(shape)} and dtype {e['dtype']} need {expected}")
    if end > size:
        raise FormatError(f"{path}: truncated: tensor {name!r} ends at byte {end} but the file has "
                          f"{size} bytes; re-download or re-save this file")
    return TensorInfo(dtype, shape, begin, end)
