"""Execute the sharding plan of ``formats.shard_plan``: one file per rank per group, one tensor at a time."""
from __future__ import annotations

from pathlib import Path

import torch

from converter.resume import Journal
from converter.source import Source
from converter.writer import Declared, Written, write_safetensors
from formats import fp8, int4, layout
from formats.manifest import FileEntry, TensorEntry
from formats.shard_plan import FileGroup, Piece, RankTensor, rank_tensor


def write_group(src: Source, group: FileGroup, tp: int, tp_rank: int, root: Path,
                rank: int | None = None, journal: Journal | None = None) -> tuple[FileEntry, list[TensorEntry]]:
    """Write tensor rank ``tp_rank``'s file of ``group`` into global rank ``rank``'s directory (the same
    without pipeline stages) under ``root`` and describe it for the manifest; a file the journal of a
    resumed conversion vouches for is kept instead."""
    group_size = src.split_unit(tp)
    rank = tp_rank if rank is None else rank
    plans = {t: rank_tensor(t, src.config, tp, tp_rank, group_size) for t in group.tensors}
    rel = f"{layout.rank_dir(rank)}/{group.file}"
    written = journal.reuse(root, rel) if journal else None
    if written is None:
        declared = [Declared(t, src.out_dtype(t), p.shape) for t, p in plans.items()]
        written = write_safetensors(root / rel, declared,
                                    lambda d: _materialize(src, plans[d.name], d.dtype, group_size),
                                    metadata={"format": "pt", "tpdeploy_rank": str(rank)})
        if journal:
            journal.record(rel, written)
    return _entries(src, rel, written, plans, src.quantization(tp))


def _materialize(src: Source, plan: RankTensor, dtype: torch.dtype, block: int = 0) -> torch.Tensor:
    """Assemble one rank tensor from its source slices; rows no piece covers are vocab padding (zero).
    ``block``: the FP8 block B, in whose units scale pieces count their columns."""
    if not plan.pieces:  # a rank holding only zero (padded) heads of this tensor
        return torch.zeros(plan.shape, dtype=dtype)
    if len(plan.pieces) == 1 and plan.pieces[0].dst == (0, plan.shape[plan.pieces[0].axis]):
        p = plan.pieces[0]  # a whole slice: read it straight into its final buffer, no second copy
        return src.read(p.source, p.axis, *p.src, block=block).to(dtype)
    covered = sum(p.dst[1] - p.dst[0] for p in plan.pieces)
    if covered < plan.shape[plan.pieces[0].axis]:
        out = torch.zeros(plan.shape, dtype=dtype)
    else:
        out = torch.empty(plan.shape, dtype=dtype)
    for p in plan.pieces:
        piece = src.read(p.source, p.axis, *p.src, block=block)
        out.narrow(p.axis, p.dst[0], p.dst[1] - p.dst[0]).copy_(piece)  # copy_ casts when --dtype differs
        del piece
    return out


def _entries(src: Source, rel: str, written: Written, plans: dict[str, RankTensor],
             quant) -> tuple[FileEntry, list[TensorEntry]]:
    tensors = [
        TensorEntry(name=t, file=rel, dtype=str(src.out_dtype(t)).removeprefix("torch."), shape=p.shape,
                    sha256=written.tensor_sha256[t],
                    pieces=tuple(Piece(src.hf_name(x.source), x.axis, x.src, x.dst) for x in p.pieces),
                    quant=quant if int4.is_part(t) or fp8.is_scale(t) or src.is_fp8_weight(t) else None)
        for t, p in plans.items()
    ]
    return FileEntry(rel, written.nbytes, written.sha256), tensors
