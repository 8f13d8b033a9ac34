"""``tpconv convert --pad-heads``: zero attention heads added so that tp divides them.

A model with 9 query heads in 3 KV groups (SmolLM2-135M) cannot be split over 2 ranks. Padding each KV
group with zero query heads, and adding whole zero groups, gives a model that computes exactly the same
thing and splits evenly: a zero query head attends uniformly, but its output columns of ``wo`` are zero,
so it adds nothing; a zero KV head serves only zero query heads. The padded model keeps the checkpoint's
GQA grouping (query head s of group j stays with KV head j), so the runtime needs nothing new: the
manifest's ``num_heads``/``num_kv_heads`` are the padded counts and ``source_heads`` the checkpoint's.

Padded query head p is group ``p // g'``, slot ``p % g'`` (g' = padded heads per group); it is the
checkpoint's head ``j·g + s`` when the group j < KV and the slot s < g (g = the checkpoint's heads per
group), else zero. Padded KV head p is the checkpoint's p when p < KV, else zero.
"""
from __future__ import annotations

import dataclasses

from formats.config import ModelConfig
from formats.errors import ShardingError

MAX_EXTRA = 4  # search bound on added groups and per-group heads, in multiples of tp


def padded_counts(heads: int, kv_heads: int, tp: int) -> tuple[int, int] | None:
    """The smallest (query heads, KV heads) at least the checkpoint's, in the same groups, that tp splits
    the way the runtime shards heads; None when the search bound finds none."""
    group = heads // kv_heads
    best = None
    for kv in range(kv_heads, kv_heads + MAX_EXTRA * tp + 1):
        for g in range(group, group + MAX_EXTRA * tp + 1):
            if kv % tp == 0 or (tp % kv == 0 and g % (tp // kv) == 0):  # KV split, or replicated within a group
                if best is None or (kv * g, kv) < (best[0], best[1]):
                    best = (kv * g, kv)
                break
    return best


def pad_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """``cfg`` with zero heads added for ``tp`` (unchanged when tp already divides them)."""
    found = padded_counts(cfg.num_heads, cfg.num_kv_heads, tp)
    if found is None:
        raise ShardingError(f"--pad-heads found no padding of the {cfg.num_heads} heads / {cfg.num_kv_heads} KV heads "
                            f"for --tp {tp}")
    if found == (cfg.num_heads, cfg.num_kv_heads):
        return cfg
    return dataclasses.replace(cfg, num_heads=found[0], num_kv_heads=found[1],
                               source_heads=(cfg.num_heads, cfg.num_kv_heads))


def head_source(cfg: ModelConfig, kind: str, p: int) -> int | None:
    """The checkpoint head padded head ``p`` holds (``kind`` "q" or "kv"), None for a zero head."""
    if cfg.source_heads is None:
        return p
    heads, kv_heads = cfg.source_heads
    if kind == "kv":
        return p if p < kv_heads else None
    padded_group, group = cfg.num_heads // cfg.num_kv_heads, heads // kv_heads
    j, s = divmod(p, padded_group)
    return j * group + s if j < kv_heads and s < group else None


def head_runs(cfg: ModelConfig, kind: str, start: int, stop: int) -> list[tuple[int, int, int]]:
    """Padded heads [start, stop) as runs of consecutive checkpoint heads: (first, stop, offset from start)."""
    runs: list[tuple[int, int, int]] = []
    for p in range(start, stop):
        h = head_source(cfg, kind, p)
        if h is None:
            continue
        if runs and runs[-1][1] == h and runs[-1][2] + (runs[-1][1] - runs[-1][0]) == p - start:
            runs[-1] = (runs[-1][0], h + 1, runs[-1][2])
        else:
            runs.append((h, h + 1, p - start))
    return runs


def padding_cost(cfg: ModelConfig) -> dict[str, float] | None:
    """What the zero heads cost, as a share of the unpadded model: attention weight bytes (= their FLOPs
    per token) and KV cache bytes per token; None without padding."""
    if cfg.source_heads is None:
        return None
    heads, kv_heads = cfg.source_heads
    d, h = cfg.head_dim, cfg.hidden_size
    before = (heads + 2 * kv_heads) * d * h + heads * d * h  # wqkv + wo
    after = (cfg.num_heads + 2 * cfg.num_kv_heads) * d * h + cfg.num_heads * d * h
    per_layer_other = 3 * cfg.intermediate_size * h
    return {"heads": heads, "kv_heads": kv_heads, "padded_heads": cfg.num_heads, "padded_kv_heads": cfg.num_kv_heads,
            "attention_weights_percent": round(100 * (after - before) / before, 1),
            "layer_weights_percent": round(100 * (after - before) / (before + per_layer_other), 1),
            "kv_cache_percent": round(100 * (cfg.num_kv_heads - kv_heads) / kv_heads, 1),
            "extra_params_per_layer": after - before}
