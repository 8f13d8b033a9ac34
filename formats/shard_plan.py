"""Which tensors each rank holds, in which file, and which source slices make each one.

The converter executes this plan; the tests invert it. Both read the same ``Piece`` records,
which the manifest also stores, so the sharding lives only in ``formats/``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from formats import fp8, int4, layout
from formats.config import ModelConfig
from formats.errors import ShardingError
from formats.head_padding import head_runs
from formats.pipeline import StageEntry
from formats.sharding import (
    DENSE_MLP,
    GLOBAL_RULES,
    LAYER_RULES,
    MOE_MLP,
    TIED_LM_HEAD,
    Experts,
    Replicate,
    expert_split,
    padded_size,
    rank_range,
    source_shape,
    source_units,
)

# Linear layers that int4 checkpoints quantize; embeddings, norms, biases, routers and lm_head stay dense.
QUANTIZED_LINEARS = ("attention.wqkv.weight", "attention.wo.weight",
                     "feed_forward.w_gate_up.weight", "feed_forward.w_down.weight",
                     "feed_forward.experts.w_gate_up.weight", "feed_forward.experts.w_down.weight")

# Act-order linears whose input gather cannot be folded into a neighbour: wqkv and w_gate_up read a
# normed hidden state and wo the attention output, so they carry a ``perm`` part. w_down's input is
# gate * up element-wise, so its reordering is folded into w_gate/w_up's output columns at conversion.
GATHERED_LINEARS = ("attention.wqkv.weight", "attention.wo.weight", "feed_forward.w_gate_up.weight")
FOLDED_INTO = {"feed_forward.w_gate.weight": "feed_forward.w_down.weight",
               "feed_forward.w_up.weight": "feed_forward.w_down.weight"}

_HEAD_KIND = {"wq": "q", "wo": "q", "wk": "kv", "wv": "kv"}  # linears whose split axis counts heads
QK_NORMS = ("attention.q_norm.weight", "attention.k_norm.weight")
SANDWICH_NORMS = ("post_attention_norm.weight", "post_ffn_norm.weight")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Piece:
    """Rank-tensor slice ``dst`` along ``axis`` holds source slice ``src``; uncovered rows are zero."""

    source: str
    axis: int
    src: tuple[int, int]
    dst: tuple[int, int]


@dataclass(frozen=True)
class RankTensor:
    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class FileGroup:
    """One file per rank; the unit of streaming (one decoder layer, the embedding, or the head)."""

    file: str
    tensors: tuple[str, ...]


def file_groups(cfg: ModelConfig, quantized: bool = False, stage: StageEntry | None = None,
                pp: int = 1, act_order: bool = False, fp8_linears: bool = False) -> list[FileGroup]:
    """Files of every rank of ``stage`` (None: the whole model), in conversion order; int4 linears become
    qweight/scales/zeros triples (plus ``perm`` for act-order wqkv and wo), FP8 linears (``fp8_linears``)
    their weight plus ``weight_scale``. Stage 0 holds the embedding, the last stage the head."""
    stage = stage or StageEntry(0, (0, cfg.num_layers))
    first, last = stage.stage == 0, stage.stage == pp - 1
    groups = [FileGroup(layout.EMBED_FILE, ("tok_embeddings.weight",))] if first else []
    for i in range(*stage.layers):
        names = _layer_tensors(cfg, cfg.is_moe(i), quantized, act_order, fp8_linears)
        groups.append(FileGroup(layout.layer_file(i), tuple(f"layers.{i}.{n}" for n in names)))
    if last:
        # A tied model's single stage reuses the embedding shard as lm_head (same vocab split, stored
        # once); a last stage without the embedding holds its own copy, made from the same source.
        head = ("norm.weight",) if cfg.tie_word_embeddings and first else ("norm.weight", "lm_head.weight")
        groups.append(FileGroup(layout.HEAD_FILE, head))
    return groups


def _layer_tensors(cfg: ModelConfig, moe: bool, quantized: bool, act_order: bool, fp8_linears: bool) -> list[str]:
    """A decoder layer's tensors (relative names); a mixture-of-experts layer has a router and experts instead of
    the dense MLP."""
    out = []
    for n in LAYER_RULES:
        if ((n == "attention.wqkv.bias" and not cfg.qkv_bias) or (n in QK_NORMS and not cfg.qk_norm)
                or (n in SANDWICH_NORMS and not cfg.sandwich_norms) or n in (DENSE_MLP if moe else MOE_MLP)):
            continue
        out += _int4_names(n) if quantized and n in QUANTIZED_LINEARS else [n]
        if fp8_linears and n in QUANTIZED_LINEARS:
            out.append(fp8.scale_name(n))
        if quantized and act_order and n in GATHERED_LINEARS:
            out.append(_part_name(n, int4.PERM))
    return out


def source_names(cfg: ModelConfig, quantized: bool = False, fp8_linears: bool = False) -> list[str]:
    """Every canonical source tensor the checkpoint must provide (FP8: each linear's weight, then its scale)."""
    names: list[str] = []
    for group in file_groups(cfg):
        for tensor in group.tensors:
            prefix, rule = _rule(tensor, cfg)
            if isinstance(rule, Experts):
                rule, _ = expert_split(rule, cfg, 1, 0)  # every expert, whole
            srcs = (rule.source,) if isinstance(rule, Replicate) else rule.sources
            for src in srcs:
                linear = quantized and tensor.removeprefix(prefix) in QUANTIZED_LINEARS
                names += _int4_names(prefix + src) if linear else [prefix + src]
                if fp8_linears and tensor.removeprefix(prefix) in QUANTIZED_LINEARS:
                    names.append(fp8.scale_name(prefix + src))
    return names


def rank_tensor(name: str, cfg: ModelConfig, tp: int, rank: int, group_size: int = 0) -> RankTensor:
    """The shape of ``name`` on ``rank`` and the source slices that fill it; ``group_size`` is the int4 group,
    or for an FP8 ``weight_scale`` the canonical block B (``fp8_block``)."""
    if fp8.is_scale(name):
        return _fp8_scale_rank_tensor(rank_tensor(fp8.weight_name(name), cfg, tp, rank), group_size)
    if int4.is_part(name):
        base, _, part = name.rpartition(".")
        dense = rank_tensor(base + ".weight", cfg, tp, rank)
        if part == int4.PERM:
            return _perm_rank_tensor(dense)
        return _int4_rank_tensor(dense, part, group_size)
    prefix, rule = _rule(name, cfg)
    if isinstance(rule, Replicate):
        shape = source_shape(rule.source, cfg)
        return RankTensor(name, shape, (Piece(prefix + rule.source, 0, (0, shape[0]), (0, shape[0])),))
    whole = False
    if isinstance(rule, Experts):
        rule, whole = expert_split(rule, cfg, tp, rank)
    pieces, offset = [], 0
    for src in rule.sources:
        units = source_units(src, rule.axis, cfg)
        start, stop = (0, units.count * units.size) if whole else rank_range(units, tp, rank)
        kind = _HEAD_KIND.get(src.split(".")[-2]) if cfg.source_heads else None
        if kind:  # padded heads: the checkpoint heads among them, the zero ones left uncovered
            d = units.size
            pieces += [Piece(prefix + src, rule.axis, (a * d, b * d), (offset + o * d, offset + (o + b - a) * d))
                       for a, b, o in head_runs(cfg, kind, start // d, stop // d)]
        else:
            pieces.append(Piece(prefix + src, rule.axis, (start, stop), (offset, offset + stop - start)))
        offset += stop - start
        if units.pad:  # vocab-parallel: every rank has the same padded row count
            offset = padded_size(units.count, tp) // tp * units.size
    shape = list(source_shape(rule.sources[0], cfg))
    shape[rule.axis] = offset
    return RankTensor(name, tuple(shape), tuple(pieces))


def int4_source_shape(name: str, cfg: ModelConfig, group_size: int) -> tuple[int, ...]:
    """Canonical int4 shape of a source linear part: qweight (K/8, N), scales and zeros (K/G, N)."""
    base, _, part = name.rpartition(".")
    n, k = source_shape(base + ".weight", cfg)
    return (k // (int4.PACK if part == "qweight" else group_size), n)


def fp8_block(cfg: ModelConfig, tp: int, source_block_k: int) -> int:
    """The canonical FP8 block B for ``tp``: it divides the source's block and the K every rank holds of every
    linear (column-parallel ones hold all of hidden; wo and w_down a tp-th of theirs), and, with padded heads,
    the head size, where zero heads are cut in."""
    ks = [cfg.hidden_size, cfg.num_heads * cfg.head_dim // tp, cfg.intermediate_size // tp]
    return fp8.canonical_block(source_block_k, ks + ([cfg.head_dim] if cfg.source_heads else []))


def _fp8_scale_rank_tensor(dense: RankTensor, block_k: int) -> RankTensor:
    """An FP8 scale (N, K/B) follows its weight's split: output rows as they are, input columns in blocks."""
    n, k = dense.shape
    pieces = []
    for p in dense.pieces:
        source = fp8.scale_name(p.source)
        if p.axis == 0:
            pieces.append(Piece(source, 0, p.src, p.dst))
            continue
        if any(x % block_k for x in (*p.src, *p.dst)):  # fp8_block makes this impossible; a guard, not a check
            raise ShardingError(f"{dense.name}: a row-parallel split at input features {p.src} is not on an FP8 "
                                f"scale block boundary (block {block_k})")
        pieces.append(Piece(source, 1, (p.src[0] // block_k, p.src[1] // block_k),
                            (p.dst[0] // block_k, p.dst[1] // block_k)))
    return RankTensor(fp8.scale_name(dense.name), (n, k // block_k), tuple(pieces))


def _int4_names(weight_name: str) -> list[str]:
    return [_part_name(weight_name, part) for part in int4.PARTS]


def _int4_rank_tensor(dense: RankTensor, part: str, group_size: int) -> RankTensor:
    """Derive an int4 part's split from the dense weight's: the int4 layout is (K, N), dense is (N, K).

    Output rows (dense axis 0) become columns, unchanged; input columns (dense axis 1) become rows,
    counted in packs of 8 (qweight) or groups (scales, zeros), so a row split must fall on a group.
    """
    div = int4.PACK if part == "qweight" else group_size
    n, k = dense.shape
    pieces = []
    for p in dense.pieces:
        if p.axis == 0:
            pieces.append(Piece(_part_name(p.source, part), 1, p.src, p.dst))
            continue
        if any(x % group_size for x in (*p.src, *p.dst)):
            raise ShardingError(f"{dense.name}: a row-parallel split at input features {p.src} is not on a "
                                f"quantization-group boundary (group size {group_size})")
        pieces.append(Piece(_part_name(p.source, part), 0, (p.src[0] // div, p.src[1] // div),
                            (p.dst[0] // div, p.dst[1] // div)))
    return RankTensor(_part_name(dense.name, part), (k // div, n), tuple(pieces))


def _perm_rank_tensor(dense: RankTensor) -> RankTensor:
    """A ``perm`` follows its linear's input axis: cut like a row-parallel weight's input, whole (from the
    first source: q, k and v share one order) for a column-parallel one. Values are rank-local."""
    k = dense.shape[1]
    rows = [p for p in dense.pieces if p.axis == 1]
    if rows:
        pieces = tuple(Piece(_part_name(p.source, int4.PERM), 0, p.src, p.dst) for p in rows)
    else:
        pieces = (Piece(_part_name(dense.pieces[0].source, int4.PERM), 0, (0, k), (0, k)),)
    return RankTensor(_part_name(dense.name, int4.PERM), (k,), pieces)


def _part_name(weight_name: str, part: str) -> str:
    return weight_name.removesuffix(".weight") + "." + part


def _rule(name: str, cfg: ModelConfig):
    m = _LAYER.match(name)
    if m:
        return f"layers.{m.group(1)}.", LAYER_RULES[m.group(2)]
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return "", TIED_LM_HEAD  # a last pipeline stage's own copy of the tied embedding
    return "", GLOBAL_RULES[name]
