"""Int4 source formats, each a small class that repacks one linear layer into the canonical layout.

A format knows its ``quantization_config``, the tensor suffixes it stores per linear, how to check
their shapes, and how to turn them into ``formats.int4``'s (qweight, scales, zeros). Adding a format
is one class here plus its test.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from converter.checkpoint import Checkpoint
from converter.quant_fp8 import block_fp8, compressed_tensors_fp8
from formats import int4
from formats.errors import FormatError, TpDeployError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of a packed int32 holds column AWQ_ORDER[i]
SUPPORTED_GROUPS = (32, 64, 128)  # what the W4A16 kernel tiles over K
GPTQ_CHECKPOINT_FORMATS = {"gptq": False, "gptq_v2": True}  # name -> zeros stored true (v2) or minus one (v1)


@dataclass(frozen=True)
class AwqGemm:
    """AutoAWQ GEMM: qweight/qzeros int32 (K, N/8) in AWQ's interleaved nibble order, scales (K/G, N)."""

    group_size: int
    zero_point: bool = True
    name: str = "awq-gemm"
    suffixes: tuple[str, ...] = ("qweight", "qzeros", "scales")
    scale_suffix: str = "scales"

    @classmethod
    def from_config(cls, qc: dict[str, Any], where: str) -> AwqGemm:
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise FormatError(f"{where}: AWQ version {version!r} is not supported (its packing differs); "
                              "supported: gemm. Re-quantize with version='gemm'")
        _check_bits(qc.get("bits", qc.get("w_bit")), where)
        if not qc.get("zero_point", True):
            raise FormatError(f"{where}: AWQ zero_point=false is not supported; supported: zero_point=true")
        return cls(_check_group(qc.get("group_size", qc.get("q_group_size")), where))

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        g = self.group_size
        return {"qweight": (k, n // 8), "qzeros": (k // g, n // 8), "scales": (k // g, n)}

    def to_canonical(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q = _unpack_awq(t["qweight"])  # (K, N)
        return {"qweight": int4.pack(q), "scales": t["scales"], "zeros": _unpack_awq(t["qzeros"])}


@dataclass(frozen=True)
class CompressedTensorsW4A16:
    """compressed-tensors pack-quantized: weight_packed int32 (N, K/8), 8 input values per word in order,
    stored as q + 8; weight_scale (N, K/G); weight_zero_point int32 (N/8, K/G), zp + 8 packed along N
    (asymmetric only; symmetric means zero 8)."""

    group_size: int
    zero_point: bool
    name: str = "compressed-tensors"
    scale_suffix: str = "weight_scale"

    @property
    def suffixes(self) -> tuple[str, ...]:
        return ("weight_packed", "weight_scale", "weight_shape") + (("weight_zero_point",) if self.zero_point else ())

    @classmethod
    def from_config(cls, qc: dict[str, Any], where: str) -> CompressedTensorsW4A16:
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise FormatError(f"{where}: {len(groups)} config_groups; supported: exactly one W4A16 group")
        group = next(iter(groups.values()))
        fmt, w = group.get("format") or qc.get("format"), group.get("weights") or {}
        if fmt != "pack-quantized":
            raise FormatError(f"{where}: format {fmt!r} is not supported; supported: pack-quantized (int4), "
                              "float-quantized (FP8)")
        if group.get("input_activations") or w.get("type", "int") != "int" or w.get("dynamic"):
            raise FormatError(f"{where}: only weight-only int quantization (W4A16) is supported")
        _check_bits(w.get("num_bits"), where)
        if w.get("strategy") != "group":
            raise FormatError(f"{where}: strategy {w.get('strategy')!r} is not supported; supported: group")
        if w.get("actorder") not in (None, False, "static"):
            raise FormatError(f"{where}: actorder={w.get('actorder')!r} (act-order with a g_idx permutation) is not "
                              "supported; supported: actorder null or 'static'")
        return cls(_check_group(w.get("group_size"), where), zero_point=not w.get("symmetric", True))

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        g = self.group_size
        out = {"weight_packed": (n, k // 8), "weight_scale": (n, k // g), "weight_shape": (2,)}
        if self.zero_point:
            out["weight_zero_point"] = (-(-n // 8), k // g)
        return out

    def to_canonical(self, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q = _unpack_rows(t["weight_packed"])  # (N, K) nibbles, q + 8
        n = q.shape[0]
        if self.zero_point:
            zeros = _unpack_rows(t["weight_zero_point"].T).T[:n]  # (N, K/G): zp + 8
        else:
            zeros = torch.full(t["weight_scale"].shape, 8, dtype=torch.uint8)
        return {"qweight": int4.pack(q.T), "scales": t["weight_scale"].T.contiguous(),
                "zeros": zeros.T.contiguous()}


@dataclass(frozen=True)
class Gptq:
    """GPTQ (AutoGPTQ, GPTQModel): qweight int32 (K/8, N) with input row k at bits 4*(k % 8) of word k // 8
    (the canonical packing already); qzeros int32 (K/G, N/8) packed along N the same way, stored as zero - 1
    in the v1 format and as the zero itself in ``gptq_v2``; scales (K/G, N); g_idx int32 (K,), the group of
    each input row. Act-order (``desc_act``) scatters a group's rows over K: they are gathered here, groups
    ordered by their first row, so each group is contiguous (see ``act_order_rows``)."""

    group_size: int  # canonical group; a per-channel source is stored as repeated groups of this size
    zero_point: bool
    act_order: bool = False
    v2: bool = False
    per_channel: bool = False  # group_size -1 in the checkpoint: one group spans the whole K
    scale_suffix: str = "scales"
    suffixes: tuple[str, ...] = ("qweight", "qzeros", "scales", "g_idx")

    @property
    def name(self) -> str:
        return "gptq-v2" if self.v2 else "gptq"

    @classmethod
    def from_config(cls, qc: dict[str, Any], where: str) -> Gptq:
        fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
        if fmt not in GPTQ_CHECKPOINT_FORMATS:
            raise FormatError(f"{where}: GPTQ checkpoint_format {fmt!r} is not supported (its packing differs); "
                              f"supported: {', '.join(GPTQ_CHECKPOINT_FORMATS)}")
        _check_bits(qc.get("bits"), where)
        if qc.get("dynamic"):
            raise FormatError(f"{where}: GPTQ 'dynamic' per-module overrides (mixed bits or groups) are not "
                              "supported; supported: one setting for every linear")
        if qc.get("lm_head"):
            raise FormatError(f"{where}: a quantized lm_head is not supported; supported: lm_head false")
        if str(qc.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
            raise FormatError(f"{where}: pack_dtype {qc['pack_dtype']!r} is not supported; supported: int32")
        group = qc.get("group_size")
        per_channel = group == -1
        return cls(0 if per_channel else _check_group(group, where, "; or -1 (per-channel)"),
                   zero_point=not qc.get("sym", True), act_order=bool(qc.get("desc_act")),
                   v2=GPTQ_CHECKPOINT_FORMATS[fmt], per_channel=per_channel)

    def for_inputs(self, ks: tuple[int, ...], where: str) -> Gptq:
        """Per-channel: the largest supported group dividing every linear's K (scales repeated over it),
        so the kernels see ordinary groups; the choice bounds --tp as any group size does."""
        if not self.per_channel:
            return self
        for g in sorted(SUPPORTED_GROUPS, reverse=True):
            if all(k % g == 0 for k in ks):
                return dataclasses.replace(self, group_size=g)
        raise FormatError(f"{where}: per-channel GPTQ needs every linear's input size {sorted(set(ks))} to be a "
                          f"multiple of one of {', '.join(map(str, SUPPORTED_GROUPS))}")

    def source_group(self, k: int) -> int:
        return k if self.per_channel else self.group_size

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        g = self.source_group(k)
        return {"qweight": (k // 8, n), "qzeros": (k // g, n // 8), "scales": (k // g, n), "g_idx": (k,)}

    def rows(self, g_idx: torch.Tensor, where: str) -> torch.Tensor | None:
        """The canonical row order of one linear (None: already in order), after checking ``g_idx``."""
        k = g_idx.numel()
        g = self.source_group(k)
        g_idx = g_idx.long()
        if g_idx.min() < 0 or g_idx.max() >= k // g or bool((torch.bincount(g_idx, minlength=k // g) != g).any()):
            raise FormatError(f"{where}: g_idx does not assign exactly {g} input rows to each of {k // g} groups")
        if torch.equal(g_idx, torch.arange(k) // g):
            return None
        if not self.act_order:
            raise FormatError(f"{where}: g_idx is not in input order but desc_act is false")
        return act_order_rows(g_idx)

    def to_canonical(self, t: dict[str, torch.Tensor], where: str = "",
                     columns: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``columns``: an output order folded in (w_gate/w_up take w_down's input order)."""
        k = t["g_idx"].numel()
        order = self.rows(t["g_idx"], where)
        zeros = _unpack_rows(t["qzeros"])[:, : t["scales"].shape[1]]  # (K/Gs, N)
        if not self.v2:
            zeros = zeros + 1  # v1 stored zero - 1; a stored 15 reads 16, as AutoGPTQ's kernels compute
        scales = t["scales"]
        qweight = t["qweight"]
        if order is not None or columns is not None:
            q = _unpack_rows(qweight.T.contiguous()).T  # (K, N) uint8
            if order is not None:
                groups = t["g_idx"].long()[order][:: self.source_group(k)]  # group of each canonical group
                q, scales, zeros = q[order], scales[groups], zeros[groups]
            if columns is not None:
                q, scales, zeros = q[:, columns], scales[:, columns], zeros[:, columns]
            qweight = int4.pack(q.contiguous())
        repeat = self.source_group(k) // self.group_size
        out = {"qweight": qweight, "scales": scales.repeat_interleave(repeat, 0).contiguous(),
               "zeros": zeros.repeat_interleave(repeat, 0).contiguous()}
        if self.act_order:
            out[int4.PERM] = (torch.arange(k) if order is None else order).to(torch.int32)
        return out


def act_order_rows(g_idx: torch.Tensor) -> torch.Tensor:
    """Rows sorted by group, groups ordered by their first row, rows in order within a group.

    Ordering groups by first row keeps the order independent of tp: whenever every group lies inside one
    rank's slice of K, the rows of rank r's groups land exactly in canonical rows [r K/tp, (r+1) K/tp).
    """
    k = g_idx.numel()
    rows = torch.arange(k)
    first = torch.full((int(g_idx.max()) + 1,), k).scatter_reduce(0, g_idx, rows, "amin")
    return torch.argsort(first[g_idx] * k + rows)


def _nibbles(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """(R, C/8) int32 words -> (R, C) uint8 values; value 8j + m is nibble i where order[i] == m.

    numpy's unsigned shifts: the words are stored signed, and torch's int32 ops are far slower on CPU.
    """
    r, c = packed.shape
    words = packed.contiguous().numpy().view(np.uint32)  # (R, C/8)
    out = np.empty((r, c, 8), dtype=np.uint8)  # values fit a byte: 2x the packed size, not 8x
    for m in range(8):
        out[:, :, m] = (words >> np.uint32(4 * order.index(m))) & 0xF
    return torch.from_numpy(out.reshape(r, c * 8))


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """compressed-tensors order: value c at bits 4*(c % 8) of word c // 8."""
    return _nibbles(packed)


def _unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ order: nibble i of word j holds column 8j + AWQ_ORDER[i]."""
    return _nibbles(packed, AWQ_ORDER)


def _check_bits(bits: Any, where: str) -> None:
    if bits != 4:
        raise FormatError(f"{where}: {bits}-bit weights are not supported; supported: 4 bits")


def _check_group(group: Any, where: str, also: str = " (per-channel quantization is not)") -> int:
    if group not in SUPPORTED_GROUPS:
        raise FormatError(f"{where}: group size {group} is not supported; supported: "
                          f"{', '.join(map(str, SUPPORTED_GROUPS))}{also}")
    return int(group)


# quant_method -> int4 format class; "fp8" (and compressed-tensors float-quantized) go to converter.quant_fp8.
FORMATS = {"awq": AwqGemm, "compressed-tensors": CompressedTensorsW4A16, "gptq": Gptq, "fp8": None}


def detect(hf: dict[str, Any], model_format: str, where: str):
    """The int4 format a config declares, or None for a plain checkpoint; refuses mismatches."""
    qc = hf.get("quantization_config")
    method = (qc or {}).get("quant_method")
    if model_format == "hf":
        if qc:
            raise TpDeployError(f"{where}: quantization_config.quant_method={method!r} but --model-format hf "
                                "was given; use --model-format auto")
        return None
    if model_format == "awq" and method != "awq":
        found = f"quant_method={method!r}" if qc else "no quantization_config (an unquantized model)"
        raise TpDeployError(f"{where}: --model-format awq needs an AWQ checkpoint, found {found}; "
                            "use --model-format auto")
    if not qc:
        return None
    if method not in FORMATS:
        raise FormatError(f"{where}: quantization_config.quant_method={method!r} is not supported; "
                          f"supported: {', '.join(FORMATS)}")
    where = f"{where}: quantization_config"
    if method == "fp8":
        return block_fp8(qc, where)
    if method == "compressed-tensors" and _ct_format(qc) == "float-quantized":
        return compressed_tensors_fp8(qc, where)
    return FORMATS[method].from_config(qc, where)


def _ct_format(qc: dict[str, Any]) -> Any:
    """compressed-tensors names the format per config group, and globally (the groups' own wins)."""
    groups = list((qc.get("config_groups") or {}).values())
    return (groups[0].get("format") if len(groups) == 1 else None) or qc.get("format")


class QuantizedReader:
    """Canonical int4 parts of one source linear at a time, cached until the layer is written."""

    def __init__(self, fmt, ckpt: Checkpoint):
        self.fmt, self.ckpt = fmt, ckpt
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def part(self, hf_base: str, part: str, fold_from: str | None = None) -> torch.Tensor:
        """``fold_from``: the linear whose act-order input order this one's output columns take."""
        if hf_base not in self._cache:
            raw = self._raw(hf_base)
            if fold_from is None:
                self._cache[hf_base] = self.fmt.to_canonical(raw)
            else:
                columns = self.fmt.rows(self.ckpt.read(f"{fold_from}.g_idx", 0, 0, self.ckpt.shape(
                    f"{fold_from}.g_idx")[0]), fold_from)
                self._cache[hf_base] = self.fmt.to_canonical(raw, hf_base, columns)
        return self._cache[hf_base][part]

    def _raw(self, hf_base: str) -> dict[str, torch.Tensor]:
        return {s: self.ckpt.read(f"{hf_base}.{s}", 0, 0, self.ckpt.shape(f"{hf_base}.{s}")[0])
                for s in self.fmt.suffixes}

    def release(self) -> None:
        self._cache.clear()
