"""Which tensors each rank holds, in which file, and which source slices make each one.

The converter executes this plan; the tests invert it. Both read the same ``Piece`` records,
which the manifest also stores, so the sharding lives only in ``formats/``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from formats import layout
from formats.config import ModelConfig
from formats.sharding import (
    GLOBAL_RULES, LAYER_RULES, Replicate, padded_size, rank_range, source_shape, source_units,
)

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


def file_groups(cfg: ModelConfig) -> list[FileGroup]:
    """Files of every rank, in conversion order."""
    per_layer = [n for n in LAYER_RULES if n != "attention.wqkv.bias" or cfg.qkv_bias]
    groups = [FileGroup(layout.EMBED_FILE, ("tok_embeddings.weight",))]
    for i in range(cfg.num_layers):
        groups.append(FileGroup(layout.layer_file(i), tuple(f"layers.{i}.{n}" for n in per_layer)))
    # Tied models reuse the embedding shard as lm_head: same vocab split, stored once.
    head = ("norm.weight",) if cfg.tie_word_embeddings else ("norm.weight", "lm_head.weight")
    groups.append(FileGroup(layout.HEAD_FILE, head))
    return groups


def source_names(cfg: ModelConfig) -> list[str]:
    """Every canonical source tensor the checkpoint must provide."""
    names: list[str] = []
    for group in file_groups(cfg):
        for tensor in group.tensors:
            prefix, rule = _rule(tensor)
            srcs = (rule.source,) if isinstance(rule, Replicate) else rule.sources
            names.extend(prefix + s for s in srcs)
    return names


def rank_tensor(name: str, cfg: ModelConfig, tp: int, rank: int) -> RankTensor:
    """The shape of ``name`` on ``rank`` and the source slices that fill it."""
    prefix, rule = _rule(name)
    if isinstance(rule, Replicate):
        shape = source_shape(rule.source, cfg)
        return RankTensor(name, shape, (Piece(prefix + rule.source, 0, (0, shape[0]), (0, shape[0])),))
    pieces, offset = [], 0
    for src in rule.sources:
        units = source_units(src, rule.axis, cfg)
        start, stop = rank_range(units, tp, rank)
        pieces.append(Piece(prefix + src, rule.axis, (start, stop), (offset, offset + stop - start)))
        offset += stop - start
        if units.pad:  # vocab-parallel: every rank has the same padded row count
            offset = padded_size(units.count, tp) // tp * units.size
    shape = list(source_shape(rule.sources[0], cfg))
    shape[rule.axis] = offset
    return RankTensor(name, tuple(shape), tuple(pieces))


def _rule(name: str):
    m = _LAYER.match(name)
    if m:
        return f"layers.{m.group(1)}.", LAYER_RULES[m.group(2)]
    return "", GLOBAL_RULES[name]
