"""Tensor-parallel sharding rules, declared once as data for the canonical tensor names.

Canonical per-layer tensors (names below are relative to ``layers.{i}.``):

    attention.wqkv.weight     (q_r + 2 kv_r) * head_dim, hidden      column-parallel, fused per rank
    attention.wqkv.bias       (q_r + 2 kv_r) * head_dim              Qwen2 only
    attention.wo.weight       hidden, q_r * head_dim                 row-parallel (all-reduce after)
    feed_forward.w_gate_up.weight  2 * inter / tp, hidden            column-parallel, [gate_r; up_r]
    feed_forward.w_down.weight     hidden, inter / tp                row-parallel
    attention.q_norm.weight, attention.k_norm.weight  head_dim      replicated (Qwen3 only)
    attention_norm.weight, ffn_norm.weight                           replicated
    post_attention_norm.weight, post_ffn_norm.weight                 replicated (Gemma 3 only)

A mixture-of-experts layer (``cfg.is_moe(i)``) has, instead of the dense MLP's two tensors:

    feed_forward.router.weight           num_experts, hidden              replicated
    feed_forward.experts.w_gate_up.weight  E_r * 2 * I_r, hidden           per expert [gate_r; up_r], stacked
    feed_forward.experts.w_down.weight     hidden, E_r * I_r               per expert its I_r input columns

built from per-expert sources ``feed_forward.experts.{e}.w_gate/w_up/w_down.weight``. Tensor parallel
(default): E_r = num_experts and I_r = I / tp, every expert split like a dense MLP; expert parallel
(``MoeConfig.expert_parallel``): E_r = num_experts / tp whole experts (I_r = I), rank r holds experts
[r E_r, (r + 1) E_r). Either way one all-reduce after the layer sums the ranks' partial outputs.

plus ``tok_embeddings.weight`` and ``lm_head.weight`` (vocab-parallel: rows split, the vocabulary
padded with zero rows to a multiple of tp, so no rank holds a full copy) and ``norm.weight``
(replicated). A fused tensor is built from unfused *source* tensors (``wq``, ``wk``, ``wv``,
``w_gate``, ``w_up``); each rank tensor is a list of ``Piece`` s saying which slice of which
source it holds, which is also recorded in the manifest so shards can be reassembled.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from formats.config import ModelConfig
from formats.errors import ShardingError


@dataclass(frozen=True)
class Units:
    """How a source axis divides: ``count`` units of ``size`` elements (a head, a row, a token)."""

    count: int
    size: int
    what: str  # for messages: "attention heads", "KV heads", "intermediate rows"
    replicable: bool = False  # KV heads may be replicated when tp is a multiple of them
    pad: bool = False  # vocabulary: padded to a multiple of tp instead of refusing


@dataclass(frozen=True)
class Split:
    """Split each source along ``axis`` into tp parts; several sources are concatenated per rank."""

    axis: int
    sources: tuple[str, ...]  # unfused source names, relative to the layer prefix


@dataclass(frozen=True)
class Replicate:
    """Every rank holds the whole tensor."""

    source: str


@dataclass(frozen=True)
class Experts:
    """Per-expert ``parts`` (``w_gate``...) of every expert a rank holds, each split along ``axis`` (tensor
    parallel) or whole (expert parallel), concatenated expert by expert (``expert_split`` resolves it)."""

    axis: int
    parts: tuple[str, ...]


Rule = Split | Replicate | Experts

# The rules, once. Keys and sources are relative to "layers.{i}." for per-layer tensors.
LAYER_RULES: dict[str, Rule] = {
    "attention_norm.weight": Replicate("attention_norm.weight"),
    "attention.wqkv.weight": Split(0, ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")),
    "attention.wqkv.bias": Split(0, ("attention.wq.bias", "attention.wk.bias", "attention.wv.bias")),
    "attention.q_norm.weight": Replicate("attention.q_norm.weight"),
    "attention.k_norm.weight": Replicate("attention.k_norm.weight"),
    "attention.wo.weight": Split(1, ("attention.wo.weight",)),
    "ffn_norm.weight": Replicate("ffn_norm.weight"),
    "post_attention_norm.weight": Replicate("post_attention_norm.weight"),
    "post_ffn_norm.weight": Replicate("post_ffn_norm.weight"),
    "feed_forward.w_gate_up.weight": Split(0, ("feed_forward.w_gate.weight", "feed_forward.w_up.weight")),
    "feed_forward.w_down.weight": Split(1, ("feed_forward.w_down.weight",)),
    "feed_forward.router.weight": Replicate("feed_forward.router.weight"),
    "feed_forward.experts.w_gate_up.weight": Experts(0, ("w_gate", "w_up")),
    "feed_forward.experts.w_down.weight": Experts(1, ("w_down",)),
}
DENSE_MLP = ("feed_forward.w_gate_up.weight", "feed_forward.w_down.weight")
MOE_MLP = ("feed_forward.router.weight", "feed_forward.experts.w_gate_up.weight", "feed_forward.experts.w_down.weight")


def expert_source(e: int, part: str) -> str:
    return f"feed_forward.experts.{e}.{part}.weight"


def expert_split(rule: Experts, cfg: ModelConfig, tp: int, rank: int) -> tuple[Split, bool]:
    """The Split a rank's expert tensor is made of, and whether its sources are taken whole (expert parallel)."""
    experts = cfg.moe.expert_range(tp, rank)
    return Split(rule.axis, tuple(expert_source(e, p) for e in experts for p in rule.parts)), cfg.moe.expert_parallel

GLOBAL_RULES: dict[str, Rule] = {
    "tok_embeddings.weight": Split(0, ("tok_embeddings.weight",)),
    "norm.weight": Replicate("norm.weight"),
    "lm_head.weight": Split(0, ("lm_head.weight",)),
}
TIED_LM_HEAD = Split(0, ("tok_embeddings.weight",))  # lm_head of a tied model, held apart from the embedding


def source_units(source: str, axis: int, cfg: ModelConfig) -> Units:
    """How the split axis of one source tensor divides into units that must stay whole."""
    leaf = source.split(".")[-2] if "." in source else source
    if ".experts." in source:
        return Units(cfg.moe.intermediate_size, 1, "expert intermediate rows")
    if leaf in ("wq", "wo"):
        return Units(cfg.num_heads, cfg.head_dim, "attention heads")
    if leaf in ("wk", "wv"):
        return Units(cfg.num_kv_heads, cfg.head_dim, "KV heads", replicable=True)
    if leaf in ("w_gate", "w_up", "w_down"):
        return Units(cfg.intermediate_size, 1, "intermediate rows")
    if leaf in ("tok_embeddings", "lm_head"):
        return Units(cfg.vocab_size, 1, "vocabulary rows", pad=True)
    raise KeyError(f"no sharding units declared for {source!r} (axis {axis})")


def source_shape(source: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The shape a canonical source tensor must have in the checkpoint."""
    h, d = cfg.hidden_size, cfg.head_dim
    heads, kv_heads = cfg.checkpoint_heads
    leaf, kind = source.split(".")[-2:]
    if ".experts." in source:
        inter = cfg.moe.intermediate_size
        return (h, inter) if leaf == "w_down" else (inter, h)
    if leaf == "router":
        return (cfg.moe.num_experts, h)
    rows = {
        "wq": heads * d, "wk": kv_heads * d, "wv": kv_heads * d,
        "wo": h, "w_gate": cfg.intermediate_size, "w_up": cfg.intermediate_size, "w_down": h,
        "tok_embeddings": cfg.vocab_size, "lm_head": cfg.vocab_size,
        "attention_norm": h, "ffn_norm": h, "norm": h, "q_norm": d, "k_norm": d,
        "post_attention_norm": h, "post_ffn_norm": h,
    }[leaf]
    if kind == "bias" or leaf.endswith("norm"):
        return (rows,)
    cols = {"wo": heads * d, "w_down": cfg.intermediate_size}.get(leaf, h)
    return (rows, cols)


def rank_range(units: Units, tp: int, rank: int) -> tuple[int, int]:
    """Element range [start, stop) of ``rank``'s part of a split axis (before any padding)."""
    if units.pad:
        per = padded_size(units.count, tp) // tp
        start = min(rank * per, units.count)
        return start * units.size, min(start + per, units.count) * units.size
    if units.count % tp == 0:
        per = units.count // tp
        return rank * per * units.size, (rank + 1) * per * units.size
    if units.replicable and tp % units.count == 0:
        u = rank // (tp // units.count)  # ranks sharing one replicated KV head are adjacent
        return u * units.size, (u + 1) * units.size
    raise ShardingError(f"--tp {tp} does not divide the {units.count} {units.what}")


def padded_size(n: int, tp: int) -> int:
    """Smallest multiple of tp that holds n (the vocabulary is padded with zero rows to it)."""
    return -(-n // tp) * tp


# What the checkpoint's own data forbids beyond the shapes (act-order groups scattered over ranks):
# tp -> the problem, or None.
DataCheck = Callable[[int], "str | None"]


def _tp_problem(cfg: ModelConfig, tp: int, group_size: int = 0, data: DataCheck | None = None) -> str | None:
    if tp < 1:
        return f"--tp must be a positive integer, got {tp}"
    if cfg.num_heads % tp:
        return f"--tp {tp} does not divide the {cfg.num_heads} attention heads of this model"
    kv = cfg.num_kv_heads
    if kv % tp and tp % kv:
        return (f"--tp {tp} neither divides nor is a multiple of the {kv} KV heads of this model "
                "(KV heads are split when kv_heads % tp == 0 and replicated when tp % kv_heads == 0)")
    if cfg.has_dense_mlp and cfg.intermediate_size % tp:
        return f"--tp {tp} does not divide the intermediate size {cfg.intermediate_size} of this model"
    problem = _moe_problem(cfg, tp, group_size)
    if problem:
        return problem
    if group_size:  # int4 row-parallel layers (wo, w_down) split their input on group boundaries
        rows = [(cfg.num_heads * cfg.head_dim, "wo (o_proj)")]
        rows += [(cfg.intermediate_size, "w_down (down_proj)")] if cfg.has_dense_mlp else []
        for k, what in rows:
            if (k // tp) % group_size:
                return (f"--tp {tp} gives each rank {k // tp} of the {k} input features of {what}, not a multiple "
                        f"of the quantization group size {group_size} (row-parallel int4 layers split on groups)")
    return data(tp) if data else None


def _moe_problem(cfg: ModelConfig, tp: int, group_size: int) -> str | None:
    moe = cfg.moe
    if moe is None:
        return None
    if moe.expert_parallel:
        if moe.num_experts % tp:
            return f"--tp {tp} with --ep does not divide the {moe.num_experts} experts of this model"
        return None
    inter = moe.intermediate_size
    if inter % tp:
        return (f"--tp {tp} does not divide the expert intermediate size {inter} of this model "
                "(or shard whole experts with --ep)")
    if group_size and (inter // tp) % group_size:
        return (f"--tp {tp} gives each rank {inter // tp} of the {inter} input features of each expert's w_down, "
                f"not a multiple of the quantization group size {group_size} (or shard whole experts with --ep)")
    return None


def valid_tp_values(cfg: ModelConfig, group_size: int = 0, data: DataCheck | None = None) -> list[int]:
    return [t for t in range(1, cfg.num_heads + 1) if _tp_problem(cfg, t, group_size, data) is None]


def check_tp(cfg: ModelConfig, tp: int, group_size: int = 0, heads_hint: str = "",
             data: DataCheck | None = None) -> None:
    """Raise a ShardingError naming the problem and the tp values that would work (and ``heads_hint``
    when it is the attention heads that tp does not divide)."""
    problem = _tp_problem(cfg, tp, group_size, data)
    if problem:
        valid = ", ".join(map(str, valid_tp_values(cfg, group_size, data))) or "none"
        hint = f"; {heads_hint}" if heads_hint and tp > 0 and _heads_problem(cfg, tp) else ""
        raise ShardingError(f"{problem}; valid --tp values: {valid}{hint}")


def _heads_problem(cfg: ModelConfig, tp: int) -> bool:
    kv = cfg.num_kv_heads
    return bool(cfg.num_heads % tp or (kv % tp and tp % kv))


def kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    return max(1, cfg.num_kv_heads // tp)


def heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    return cfg.num_heads // tp
