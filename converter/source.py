"""Open and validate a source checkpoint before a single byte is written."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from converter.archs import IGNORED, Architecture, architecture_of, declared_dtype, model_config
from converter.checkpoint import Checkpoint
from formats.config import ModelConfig
from formats.errors import FormatError
from formats.plan import source_names
from formats.sharding import source_shape

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Source:
    path: Path
    hf_config: dict[str, Any]
    config: ModelConfig
    arch: Architecture
    checkpoint: Checkpoint
    dtype: torch.dtype  # the dtype every output tensor is written in
    unused: list[str]  # source tensors no rule consumes (reported, not fatal)

    def hf_name(self, canonical: str) -> str:
        return self.arch.hf_name(canonical)


def open_source(src: Path, model_format: str = "auto", dtype: str = "auto") -> Source:
    src = Path(src)
    if not src.is_dir():
        raise FormatError(f"source {src} is not a directory; pass a local Hugging Face checkpoint directory")
    hf = _read_config(src)
    quant = (hf.get("quantization_config") or {}).get("quant_method")
    if quant or model_format == "awq":
        raise FormatError(f"{src / 'config.json'}: quantization_config.quant_method={quant!r}; this tpconv "
                          "converts unquantized (fp32/fp16/bf16) checkpoints only (--model-format hf); "
                          "AWQ input is not supported yet")
    where = str(src / "config.json")
    arch = architecture_of(hf, where)[1]
    config = model_config(hf, where)
    ckpt = Checkpoint(src)
    needed = _check_tensors(ckpt, config, arch, src)
    unused = sorted(n for n in ckpt.names() - needed if not IGNORED.match(n))
    return Source(src, hf, config, arch, ckpt, _pick_dtype(dtype, ckpt, needed, hf, src), unused)


def _read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise FormatError(f"{src} has no config.json; is this a Hugging Face checkpoint directory?")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return hf


def _check_tensors(ckpt: Checkpoint, cfg: ModelConfig, arch: Architecture, src: Path) -> set[str]:
    """Every tensor the plan needs exists with the shape config.json implies."""
    needed = set()
    for canonical in source_names(cfg):
        name = arch.hf_name(canonical)
        if name not in ckpt.names():
            hint = " (or set tie_word_embeddings: true in config.json)" if canonical == "lm_head.weight" else ""
            raise FormatError(f"{src}: tensor {name!r} is missing from the weight files{hint}")
        want = source_shape(canonical, cfg)
        if ckpt.shape(name) != want:
            raise FormatError(f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(ckpt.shape(name))} but "
                              f"config.json implies {list(want)}")
        if ckpt.dtype(name) not in DTYPES.values():
            raise FormatError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {ckpt.dtype(name)}; "
                              "expected float32, float16 or bfloat16 (quantized checkpoints need --model-format awq)")
        needed.add(name)
    return needed


def _pick_dtype(dtype: str, ckpt: Checkpoint, needed: set[str], hf: dict[str, Any], src: Path) -> torch.dtype:
    """``auto`` keeps the stored dtype, so an unchanged dtype converts bit for bit."""
    if dtype != "auto":
        return DTYPES[dtype]
    stored = {ckpt.dtype(n) for n in needed}
    if len(stored) == 1:
        return stored.pop()
    declared = declared_dtype(hf)
    if declared in DTYPES:
        return DTYPES[declared]
    raise FormatError(f"{src}: weights are stored in mixed dtypes {sorted(map(str, stored))} and config.json "
                      "declares none; choose one with --dtype float16|bfloat16|float32")
