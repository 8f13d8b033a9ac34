"""Open and validate a source checkpoint before a single byte is written."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from converter.archs import (
    IGNORED,
    SKIPPED_TOWERS,
    Architecture,
    architecture_of,
    declared_dtype,
    fused_rows,
    model_config,
    text_model,
    with_expert_layout,
    with_prefix,
)
from converter.checkpoint import Checkpoint
from converter.quant import QuantizedReader, detect
from converter.quant_fp8 import is_fp8
from converter.source_tensors import check_tensors
from converter.tokenizer import check_tokenizer
from formats import fp8, int4
from formats.config import ModelConfig
from formats.errors import FormatError, TpDeployError
from formats.head_padding import pad_config
from formats.int4 import Int4Format
from formats.manifest import FLOAT_DTYPES
from formats.shard_plan import FOLDED_INTO, QUANTIZED_LINEARS, fp8_block
from formats.sharding import check_tp, source_shape


@dataclass
class Source:
    path: Path
    hf_config: dict[str, Any]
    config: ModelConfig
    arch: Architecture
    checkpoint: Checkpoint
    dtype: torch.dtype  # the dtype every dense output tensor is written in
    unused: list[str]  # source tensors no rule consumes (reported, not fatal)
    notes: list[str] = field(default_factory=list)  # said once on stderr (e.g. a vision tower left out)
    quant: Any = None  # a converter.quant format, or None for dense checkpoints
    int4: Int4Format | None = None
    _reader: QuantizedReader | None = None
    checkpoint_config: ModelConfig | None = None  # set by pad_heads: the heads as stored, for reading
    wo_groups: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # act-order: (first, last)
    # input row of every group of every layer's wo, to tell which tp keeps each group on one rank
    fp8: Any = None  # a converter.quant_fp8 source format: linears' weights copied as FP8, scales made canonical
    _fp8_scales: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # this layer's, by block
    _expert: tuple[tuple[str, str], torch.Tensor] | None = None  # the last expert read from a fused 3-D tensor

    def quantization(self, tp: int) -> Int4Format | fp8.Fp8Format | None:
        """What the manifest records for a workspace of ``tp`` ranks (the FP8 block depends on tp)."""
        return self.fp8.format(self.split_unit(tp)) if self.fp8 is not None else self.int4

    def split_unit(self, tp: int) -> int:
        """Input features per quantization unit the row splits respect: the int4 group, the FP8 block B, or 0."""
        if self.fp8 is not None:
            return fp8_block(self.config, tp, self.fp8.block[1])
        return self.int4.group_size if self.int4 else 0

    def is_fp8_weight(self, canonical: str) -> bool:
        return self.fp8 is not None and canonical.split(".", 2)[-1] in QUANTIZED_LINEARS

    def tp_problem(self, tp: int) -> str | None:
        """Act-order: a tp that cuts one of wo's scattered groups (w_down's are gathered by the fold)."""
        for i, (first, last) in enumerate(self.wo_groups):
            k = int(last.max()) + 1
            if k % tp == 0 and bool((first // (k // tp) != last // (k // tp)).any()):
                return (f"--tp {tp} would cut an act-order quantization group of layer {i}'s wo (o_proj) across "
                        "ranks (its rows are scattered over the input by desc_act, and the attention output "
                        "cannot be reordered across ranks)")
        return None

    @property
    def stored_config(self) -> ModelConfig:
        """The model as the checkpoint stores it: ``config`` before ``pad_heads`` added zero heads."""
        return self.checkpoint_config or self.config

    def check_tp(self, tp: int, heads_hint: str = "") -> None:
        """What ``tp`` cannot split: the shapes, int4 groups, and act-order groups scattered over ranks."""
        check_tp(self.config, tp, self.int4.group_size if self.int4 else 0, heads_hint, data=self.tp_problem)

    def pad_heads(self, tp: int) -> None:
        """Plan the workspace with zero heads added for ``tp`` (``formats.head_padding``); reads still
        address the checkpoint's own heads."""
        if self.int4 is not None and self.int4.act_order:  # a perm's rank-local indices assume unpadded heads
            raise TpDeployError(f"{self.path}: --pad-heads is not supported for act-order (desc_act) GPTQ "
                                "checkpoints; use a --tp that divides the heads")
        self.checkpoint_config = self.stored_config
        self.config = pad_config(self.checkpoint_config, tp)

    def expert_parallel(self) -> None:
        """Plan the workspace with whole experts per rank (``tpconv convert --ep``)."""
        if self.config.moe is None:
            raise TpDeployError(f"{self.path}: --ep shards the experts of a mixture-of-experts model; "
                                f"{self.config.architecture} has none")
        self.config = dataclasses.replace(self.config, moe=dataclasses.replace(self.config.moe, expert_parallel=True))

    def hf_name(self, canonical: str) -> str:
        if fp8.is_scale(canonical):
            return f"{self._hf_base(canonical.removesuffix('.' + fp8.SCALE))}.{self.fp8.scale_suffix}"
        if not int4.is_part(canonical):
            return self.arch.hf_name(canonical)
        base, _, part = canonical.rpartition(".")
        return f"{self._hf_base(base)}.{part}"

    def _hf_base(self, canonical_base: str) -> str:
        """HF module path of a linear (``model.layers.0.self_attn.q_proj``), whose suffixes the format knows."""
        return self.arch.hf_name(f"{canonical_base}.weight").removesuffix(".weight")

    def read(self, source: str, axis: int, start: int, stop: int, block: int = 0) -> torch.Tensor:
        """Elements [start, stop) along ``axis`` of a canonical source tensor (int4 parts repacked; FP8 scales
        made canonical for ``block``, in whose units they are addressed; rows of a fused q/k/v tensor gathered;
        Baichuan2's lm_head rows L2-normalised, as its NormHead does)."""
        if fp8.is_scale(source):
            return self._fp8_scale(source, block).narrow(axis, start, stop - start).contiguous()
        if not int4.is_part(source):
            name = self.hf_name(source)
            if "#" in name:
                return self._read_fused(name, axis, start, stop)
            if "@" in name:
                return self._read_expert(name).narrow(axis, start, stop - start).contiguous()
            t = self.checkpoint.read(name, axis, start, stop)
            if source == "lm_head.weight" and self.arch.normalize_lm_head:
                t = torch.nn.functional.normalize(t.float(), dim=1).to(t.dtype)
            return t
        base, _, part = source.rpartition(".")
        fold = FOLDED_INTO.get(base.split(".", 2)[2] + ".weight") if self.int4.act_order else None
        fold_from = self._hf_base(base.rsplit(".", 2)[0] + "." + fold.removesuffix(".weight")) if fold else None
        full = self._reader.part(self._hf_base(base), part, fold_from)
        if part == int4.PERM:  # rank-local: the activation this rank holds starts at input feature `start`
            return full[start:stop] - start
        return full.narrow(axis, start, stop - start).contiguous()

    def _fp8_scale(self, source: str, block: int) -> torch.Tensor:
        """The whole canonical (N, K/B) scale of one source linear, kept until the layer is written."""
        if (source, block) not in self._fp8_scales:
            n, k = source_shape(fp8.weight_name(source), self.stored_config)
            raw = read_whole(self.checkpoint, self.hf_name(source))
            self._fp8_scales[(source, block)] = self.fp8.to_canonical(raw, n, k, block)
        return self._fp8_scales[(source, block)]

    def _read_fused(self, name: str, axis: int, start: int, stop: int) -> torch.Tensor:
        fused, part = name.split("#")
        if axis != 0:
            cfg = self.stored_config
            rows = cfg.num_heads if part == "q" else cfg.num_kv_heads
            return self._read_fused(name, 0, 0, rows * cfg.head_dim).narrow(axis, start, stop - start)
        ranges = fused_rows(self.arch.qkv_layout, part, self.stored_config, start, stop)
        return torch.cat([self.checkpoint.read(fused, 0, a, b) for a, b in ranges])

    def _read_expert(self, name: str) -> torch.Tensor:
        """One expert's gate, up or down weight out of a fused 3-D expert tensor (``NAME@e:part``, see archs);
        the expert is read once for its gate and up rows and every rank's slices."""
        fused, _, which = name.partition("@")
        e, _, part = which.partition(":")
        if self._expert is None or self._expert[0] != (fused, e):
            self._expert = None
            self._expert = ((fused, e), self.checkpoint.read(fused, 0, int(e), int(e) + 1)[0])
        t = self._expert[1]
        if part:
            rows = t.shape[0] // 2
            t = t.narrow(0, int(part) * rows, rows)
        return t

    def out_dtype(self, tensor: str) -> torch.dtype:
        part = tensor.rpartition(".")[2]
        if part in ("qweight", int4.PERM):
            return torch.int32
        if part == "zeros":
            return torch.uint8
        if part == "scales":
            return getattr(torch, self.int4.scale_dtype)
        if fp8.is_scale(tensor):
            return fp8.SCALE_DTYPE
        return fp8.WEIGHT_DTYPE if self.is_fp8_weight(tensor) else self.dtype

    def release(self) -> None:
        """End of a layer: drop cached repacked tensors and .bin mappings."""
        self.checkpoint.release()
        self._fp8_scales.clear()
        self._expert = None
        if self._reader is not None:
            self._reader.release()


def open_source(src: Path, model_format: str = "auto", dtype: str = "auto") -> Source:
    """Config, tokenizer files and every needed tensor, checked before the first byte is written."""
    src = Path(src)
    if not src.is_dir():
        raise FormatError(f"source {src} is not a directory; pass a local Hugging Face checkpoint directory")
    hf = _with_quantize_config(text_model(_read_config(src)), src)
    check_tokenizer(src)
    where = str(src / "config.json")
    quant = detect(hf, model_format, where)
    fp8_source, quant = (quant, None) if is_fp8(quant) else (None, quant)
    arch_name, arch = architecture_of(hf, where)
    ckpt = Checkpoint(src)
    if hf.get("multimodal"):
        arch = with_prefix(arch, ckpt.names())
    if (quant or fp8_source) is not None and arch.qkv_layout is not None:
        raise FormatError(f"{where}: quantized {arch_name} checkpoints are not supported (their fused q/k/v "
                          "linears); convert the unquantized checkpoint")
    config = model_config(hf, where)
    arch = with_expert_layout(arch, config, ckpt.names())
    _check_moe_format(config, arch, quant, fp8_source, where)
    if quant is not None and hasattr(quant, "for_inputs"):
        moe = (config.moe.intermediate_size,) if config.moe else ()
        quant = quant.for_inputs((config.hidden_size, config.num_heads * config.head_dim,
                                  config.intermediate_size, *moe), where)
    dense, quantized = check_tensors(ckpt, config, arch, src, quant, fp8_source)
    unused = sorted(n for n in ckpt.names() - dense - quantized if not IGNORED.match(n))
    towers = [n for n in unused if SKIPPED_TOWERS.match(n)]
    notes = [(f"{hf['multimodal']}: converting its text model; the vision tower and projector ({len(towers)} "
              "tensors) are left out (tprun serves text)")] if towers else []
    unused = [n for n in unused if n not in towers]
    source = Source(src, hf, config, arch, ckpt, _pick_dtype(dtype, ckpt, dense, hf, src), unused, notes, quant)
    source.fp8 = fp8_source
    if quant is not None:
        scale = ckpt.dtype(next(n for n in sorted(quantized) if n.endswith("." + quant.scale_suffix)))
        source.int4 = Int4Format(quant.group_size, quant.zero_point, quant.name, str(scale).removeprefix("torch."),
                                 act_order=getattr(quant, "act_order", False))
        source._reader = QuantizedReader(quant, ckpt)
        if source.int4.act_order:
            source.wo_groups = _check_act_order(source)
    return source


def _check_moe_format(config: ModelConfig, arch: Architecture, quant, fp8_source, where: str) -> None:
    """Mixture-of-experts weight formats tprun runs: dense (per-expert or fused 3-D) and int4 per-expert."""
    if config.moe is None:
        return
    if fp8_source is not None:
        raise FormatError(f"{where}: FP8 mixture-of-experts checkpoints are not supported yet; convert the "
                          "unquantized (or AWQ / compressed-tensors W4A16) checkpoint")
    if quant is not None and getattr(quant, "act_order", False):
        raise FormatError(f"{where}: act-order (desc_act) GPTQ mixture-of-experts checkpoints are not supported; "
                          "use one quantized without desc_act")
    if quant is not None and any("@" in v for v in arch.names.values()):
        raise FormatError(f"{where}: int4 experts stored as fused 3-D tensors are not supported; per-expert "
                          "int4 linears (AutoAWQ, compressed-tensors) are")


def _with_quantize_config(hf: dict[str, Any], src: Path) -> dict[str, Any]:
    """AutoGPTQ-era checkpoints keep their settings in quantize_config.json rather than config.json."""
    path = src / "quantize_config.json"
    if hf.get("quantization_config") or not path.is_file():
        return hf
    try:
        qc = json.loads(path.read_text())
    except ValueError as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(qc, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return {**hf, "quantization_config": {"quant_method": "gptq", **qc}}


def _check_act_order(source: Source) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Linears fused on one input (q/k/v, gate/up) share one row order, since one gather (or one fold)
    serves them all; returns wo's group spans for ``Source.tp_problem``."""
    def g_idx(canonical: str) -> torch.Tensor:
        name = source._hf_base(canonical) + ".g_idx"
        return source.checkpoint.read(name, 0, 0, source.checkpoint.shape(name)[0]).long()

    spans = []
    for i in range(source.config.num_layers):
        p = f"layers.{i}."
        for fused in (("attention.wq", "attention.wk", "attention.wv"), ("feed_forward.w_gate", "feed_forward.w_up")):
            first = g_idx(p + fused[0])
            for other in fused[1:]:
                if not torch.equal(first, g_idx(p + other)):
                    raise FormatError(f"{source.path}: {source._hf_base(p + other)}.g_idx differs from "
                                      f"{source._hf_base(p + fused[0])}.g_idx; act-order linears that read one input "
                                      "must share one order (GPTQ gives them one, from the same inputs)")
        for name in ("attention.wq", "attention.wo", "feed_forward.w_gate", "feed_forward.w_down"):
            source.quant.rows(g_idx(p + name), source._hf_base(p + name))
        wo = g_idx(p + "attention.wo")
        rows = torch.arange(wo.numel())
        n = int(wo.max()) + 1
        spans.append((torch.full((n,), wo.numel()).scatter_reduce(0, wo, rows, "amin"),
                      torch.zeros(n, dtype=torch.long).scatter_reduce(0, wo, rows, "amax")))
    return spans


def _read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise FormatError(f"{src} has no config.json; is this a Hugging Face checkpoint directory?")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:  # bad JSON, bad UTF-8, or an integer past Python's digit limit
        raise FormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return hf


def read_whole(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """A whole source tensor, 0-d ones (an older per-tensor scale) included."""
    shape = ckpt.shape(name)
    if shape == ():
        return ckpt.read_scalar(name)
    return ckpt.read(name, 0, 0, shape[0])


def _pick_dtype(dtype: str, ckpt: Checkpoint, needed: set[str], hf: dict[str, Any], src: Path) -> torch.dtype:
    """``auto`` keeps the stored dtype, so an unchanged dtype converts bit for bit."""
    if dtype != "auto":
        return FLOAT_DTYPES[dtype]
    stored = {ckpt.dtype(n) for n in needed}
    if len(stored) == 1:
        return stored.pop()
    declared = declared_dtype(hf)
    if declared in FLOAT_DTYPES:
        return FLOAT_DTYPES[declared]
    raise FormatError(f"{src}: weights are stored in mixed dtypes {sorted(map(str, stored))} and config.json "
                      "declares none; choose one with --dtype float16|bfloat16|float32")
