"""Test helpers: rebuild source tensors from a workspace's shards using only its manifest."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from formats.manifest import load_manifest


def source_state(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF checkpoint directory, read with the reference libraries."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        out.update(load_file(f))
    for f in sorted(Path(src).glob("pytorch_model*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


def reassemble(ws: Path) -> dict[str, torch.Tensor]:
    """Put every shard back into source-shaped tensors; replicated copies must agree exactly."""
    manifest = load_manifest(ws)
    shapes = _source_shapes(manifest)
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    for rank in manifest.ranks:
        files = {f.path: load_file(Path(ws) / f.path) for f in rank.files}  # the official reader
        for t in rank.tensors:
            shard = files[t.file][t.name]
            assert list(shard.shape) == list(t.shape) and str(shard.dtype) == f"torch.{t.dtype}"
            _check_padding_is_zero(shard, t)
            for p in t.pieces:
                dst = out.setdefault(p.source, torch.empty(shapes[p.source], dtype=shard.dtype))
                mask = seen.setdefault(p.source, torch.zeros(shapes[p.source][p.axis], dtype=torch.int32))
                region = shard.narrow(p.axis, p.dst[0], p.dst[1] - p.dst[0])
                target = dst.narrow(p.axis, p.src[0], p.src[1] - p.src[0])
                if mask[p.src[0]:p.src[1]].any():  # replicated KV heads: copies must be identical
                    assert bits_equal(target, region), f"replicas of {p.source} differ"
                target.copy_(region)
                mask[p.src[0]:p.src[1]] += 1
    for name, mask in seen.items():
        assert bool((mask > 0).all()), f"{name}: some rows are on no rank"
    return out


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (also for NaN payloads and signed zeros)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _source_shapes(manifest) -> dict[str, tuple[int, ...]]:
    """Source shapes from the manifest's own pieces: split axis = max src stop, others from the shard."""
    shapes: dict[str, list[int]] = {}
    for rank in manifest.ranks:
        for t in rank.tensors:
            for p in t.pieces:
                if p.source not in shapes:
                    shapes[p.source] = [*t.shape[:p.axis], 0, *t.shape[p.axis + 1:]]
                shapes[p.source][p.axis] = max(shapes[p.source][p.axis], p.src[1])
    return {k: tuple(v) for k, v in shapes.items()}


def _check_padding_is_zero(shard: torch.Tensor, t) -> None:
    """Rows no piece covers (vocabulary padding at the end, zero heads of --pad-heads between) are zero."""
    axis = t.pieces[0].axis if t.pieces else 0
    covered = torch.zeros(shard.shape[axis], dtype=torch.bool)
    for p in t.pieces:
        covered[p.dst[0]:p.dst[1]] = True
    pad = shard.index_select(axis, (~covered).nonzero().flatten())
    assert not pad.any(), f"{t.name}: padding rows are not zero"


def rank_file_bytes(ws: Path) -> dict[str, bytes]:
    """Every file of a workspace by relative path (for determinism checks)."""
    ws = Path(ws)
    return {str(p.relative_to(ws)): p.read_bytes() for p in sorted(ws.rglob("*")) if p.is_file()}


def manifest_json(ws: Path) -> dict:
    return json.loads((Path(ws) / "manifest.json").read_text())


def int4_slices(ws: Path):
    """For every int4 linear of every rank: (rank, source weight name, dequantized rank slice, piece).

    The slice is the rank's dequantized weight (K_r, N_r) cut to one piece, transposed to the source
    checkpoint's (out, in) orientation and widened to float32, ready to compare with the same rows or
    columns of the source's own dequantized weight.
    """
    from formats import int4

    manifest = load_manifest(ws)
    for rank in manifest.ranks:
        files = {f.path: load_file(Path(ws) / f.path) for f in rank.files}
        for t in (t for t in rank.tensors if t.name.endswith(".qweight")):
            base = t.name.removesuffix(".qweight")
            parts = {p: files[t.file][f"{base}.{p}"] for p in int4.PARTS}
            w = int4.dequantize(parts["qweight"], parts["scales"], parts["zeros"], t.quant.group_size)  # (K_r, N_r)
            for p in t.pieces:
                source = p.source.removesuffix(".qweight") + ".weight"
                if p.axis == 1:  # column-parallel: output columns [dst) hold source rows [src)
                    yield rank.rank, source, w[:, p.dst[0]:p.dst[1]].T.float(), (0, p.src)
                else:  # row-parallel: packs of 8 input rows (experts' down: one piece per expert, stacked)
                    rows = (p.src[0] * int4.PACK, p.src[1] * int4.PACK)
                    yield rank.rank, source, w[p.dst[0] * int4.PACK:p.dst[1] * int4.PACK].T.float(), (1, rows)
