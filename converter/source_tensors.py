"""Every tensor a conversion needs exists in the source with the shape and dtype config.json (and, for int4 and
FP8 checkpoints, their quantization format) implies: checked before the first byte is written."""
from __future__ import annotations

from pathlib import Path

from converter.archs import Architecture, fused_expert_shape, fused_shape
from converter.checkpoint import Checkpoint
from converter.quant_fp8 import IGNORED_SUFFIXES, check_scale_dtype
from formats import fp8
from formats.config import ModelConfig
from formats.errors import FormatError
from formats.manifest import FLOAT_DTYPES
from formats.shard_plan import source_names
from formats.sharding import source_shape


def check_tensors(ckpt: Checkpoint, cfg: ModelConfig, arch: Architecture, src: Path,
                   quant, fp8_source=None) -> tuple[set[str], set[str]]:
    """Every tensor the plan needs exists with the shape config.json implies: (dense, quantized source) names."""
    needed, quantized = set(), set()
    names = source_names(cfg, quantized=quant is not None, fp8_linears=fp8_source is not None)
    scales = {n for n in names if fp8.is_scale(n)}
    for canonical in names:
        if canonical in scales or fp8.scale_name(canonical) in scales:
            quantized |= _check_fp8(ckpt, cfg, arch, canonical, fp8_source)
            continue
        if canonical.endswith(".qweight"):
            quantized |= _check_quantized(ckpt, cfg, arch, canonical, quant)
            continue
        if canonical.endswith((".scales", ".zeros")):
            continue  # checked with their qweight
        name = arch.hf_name(canonical)
        if "#" in name or "@" in name:  # rows of a fused q/k/v or expert tensor: check the fused tensor itself
            fused = name.split("#")[0].split("@")[0]
            _check_dense(ckpt, fused, fused_expert_shape(fused, cfg) if "@" in name else fused_shape(cfg), src)
            needed.add(fused)
            continue
        if name not in ckpt.names():
            hint = " (or set tie_word_embeddings: true in config.json)" if canonical == "lm_head.weight" else ""
            raise FormatError(f"{src}: tensor {name!r} is missing from the weight files{hint}")
        _check_dense(ckpt, name, source_shape(canonical, cfg), src)
        needed.add(name)
    return needed, quantized


def _check_dense(ckpt: Checkpoint, name: str, want: tuple[int, ...], src: Path) -> None:
    if name not in ckpt.names():
        raise FormatError(f"{src}: tensor {name!r} is missing from the weight files")
    if ckpt.shape(name) != want:
        raise FormatError(f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(ckpt.shape(name))} but "
                          f"config.json implies {list(want)}")
    if ckpt.dtype(name) not in FLOAT_DTYPES.values():
        raise FormatError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {ckpt.dtype(name)}; "
                          "expected float32, float16 or bfloat16 (int4 checkpoints are recognized by the "
                          "quantization_config in config.json)")


def _check_quantized(ckpt: Checkpoint, cfg: ModelConfig, arch: Architecture, canonical: str, quant) -> set[str]:
    weight = canonical.removesuffix(".qweight") + ".weight"
    base = arch.hf_name(weight).removesuffix(".weight")
    n, k = source_shape(weight, cfg)
    if k % quant.group_size:
        raise FormatError(f"{base}: {k} input features are not a multiple of the group size {quant.group_size}")
    names = set()
    for suffix, want in quant.shapes(n, k).items():
        name = f"{base}.{suffix}"
        if name not in ckpt.names():
            raise FormatError(f"{ckpt.src}: tensor {name!r} is missing (expected for {quant.name} int4 linears)")
        if ckpt.shape(name) != want:
            raise FormatError(f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(ckpt.shape(name))}; "
                              f"{quant.name} with group size {quant.group_size} implies {list(want)}")
        names.add(name)
    return names


def _check_fp8(ckpt: Checkpoint, cfg: ModelConfig, arch: Architecture, canonical: str, fmt) -> set[str]:
    """An FP8 linear's weight (float8_e4m3fn, the dense shape) or its scale (the source format's shape), plus
    the activation scales beside it, which are known and unused."""
    weight = fp8.weight_name(canonical) if fp8.is_scale(canonical) else canonical
    n, k = source_shape(weight, cfg)
    base = arch.hf_name(weight).removesuffix(".weight")
    name = f"{base}.{fmt.scale_suffix}" if fp8.is_scale(canonical) else f"{base}.weight"
    if name not in ckpt.names():
        raise FormatError(f"{ckpt.src}: tensor {name!r} is missing (expected for {fmt.name} FP8 linears)")
    if not fp8.is_scale(canonical):
        _check_shape(ckpt, name, ((n, k),), "config.json")
        if ckpt.dtype(name) != fp8.WEIGHT_DTYPE:
            raise FormatError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {ckpt.dtype(name)}; FP8 linears "
                              "must be float8_e4m3fn (F8_E4M3)")
        return {name} | {f"{base}.{s}" for s in IGNORED_SUFFIXES if f"{base}.{s}" in ckpt.names()}
    _check_shape(ckpt, name, fmt.scale_shape(n, k), f"{fmt.name} FP8 ({fmt.strategy} scales)")
    check_scale_dtype(ckpt.dtype(name), f"{ckpt.file_of(name)}: tensor {name!r}")
    return {name}


def _check_shape(ckpt: Checkpoint, name: str, allowed: tuple[tuple[int, ...], ...], what: str) -> None:
    if ckpt.shape(name) not in allowed:
        raise FormatError(f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(ckpt.shape(name))}; {what} "
                          f"implies {' or '.join(str(list(a)) for a in allowed)}")
