"""Pipeline stages: which decoder layers each stage holds, and how global ranks map to (stage, tp rank).

A workspace converted with ``--tp T --pp P`` has ``T × P`` ranks. Global rank ``r`` is tensor rank
``r % T`` of stage ``r // T``: the ranks of one stage are adjacent, so a node of ``T`` GPUs holds one
whole stage and tensor parallelism (all-reduce every layer) stays inside a node while only hidden
states cross nodes, once per stage per step.

Stage 0 also holds the embedding, the last stage the final norm and ``lm_head`` (a tied model's last
stage holds its own vocab-parallel copy of the embedding as ``lm_head``). Boundaries are balanced by
bytes, not by layer count: the stage whose largest share is smallest wins, so the first and last
stages take fewer decoder layers when the embedding and head are large.
"""
from __future__ import annotations

from dataclasses import dataclass

from formats.errors import ShardingError


@dataclass(frozen=True)
class StageEntry:
    """One pipeline stage: decoder layers ``[layers[0], layers[1])``."""

    stage: int
    layers: tuple[int, int]

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


def global_rank(stage: int, tp_rank: int, tp: int) -> int:
    return stage * tp + tp_rank


def stage_of(rank: int, tp: int) -> tuple[int, int]:
    """(stage, tp rank) of a global rank."""
    return divmod(rank, tp)


def check_pp(num_layers: int, pp: int) -> None:
    if not 1 <= pp <= num_layers:
        raise ShardingError(f"--pp {pp} is not possible for a model of {num_layers} decoder layers: each stage needs "
                            f"at least one layer; valid --pp values: 1..{num_layers}")


def parse_pp_layers(text: str, num_layers: int, pp: int | None) -> list[int]:
    """``--pp-layers 10,10,8,2``: layers per stage, in order; must add up to the model's layers."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise ShardingError(f"--pp-layers {text!r} is not a comma-separated list of layer counts, e.g. "
                            f"{_example(num_layers, pp or 2)}") from None
    if pp is not None and len(counts) != pp:
        raise ShardingError(f"--pp-layers {text!r} lists {len(counts)} stages but --pp is {pp}; give {pp} counts, "
                            f"e.g. {_example(num_layers, pp)}")
    if min(counts) < 1 or sum(counts) != num_layers:
        raise ShardingError(f"--pp-layers {text!r} must give every stage at least one layer and add up to the model's "
                            f"{num_layers} decoder layers (they add up to {sum(counts)}); e.g. "
                            f"{_example(num_layers, len(counts))}")
    return counts


def stages_from_counts(counts: list[int]) -> tuple[StageEntry, ...]:
    out, start = [], 0
    for s, n in enumerate(counts):
        out.append(StageEntry(s, (start, start + n)))
        start += n
    return tuple(out)


def balance(layer_bytes: list[int], first_bytes: int, last_bytes: int, pp: int) -> list[int]:
    """Layers per stage: a contiguous split into ``pp`` non-empty stages minimising the largest stage's
    bytes, where stage 0 also carries ``first_bytes`` (the embedding) and the last ``last_bytes`` (norm,
    lm_head). Exact (dynamic programming over prefix sums); ties keep earlier stages smaller."""
    n = len(layer_bytes)
    check_pp(n, pp)
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def cost(stage: int, a: int, b: int) -> int:
        return prefix[b] - prefix[a] + (first_bytes if stage == 0 else 0) + (last_bytes if stage == pp - 1 else 0)

    inf = float("inf")
    # best[s][i]: the smallest largest-stage bytes placing the first i layers in stages 0..s
    best = [[inf] * (n + 1) for _ in range(pp)]
    cut = [[0] * (n + 1) for _ in range(pp)]
    for i in range(1, n + 1):
        best[0][i] = cost(0, 0, i)
    for s in range(1, pp):
        for i in range(s + 1, n + 1):
            for j in range(i - 1, s - 1, -1):  # stage s holds layers [j, i); later j first: earlier stages smaller
                v = max(best[s - 1][j], cost(s, j, i))
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    counts, i = [], n
    for s in range(pp - 1, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    counts.append(i)
    return counts[::-1]


def _example(num_layers: int, pp: int) -> str:
    pp = max(1, min(pp, num_layers))
    base, extra = divmod(num_layers, pp)
    return ",".join(str(base + (1 if s < extra else 0)) for s in range(pp))
