"""``tpconv verify`` and ``tpconv inspect``: check a workspace against its manifest, and describe it."""
from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

import torch

from converter.writer import CHUNK
from formats.errors import FormatError
from formats.head_padding import padding_cost
from formats.int4 import Int4Format
from formats.manifest import STORED_DTYPES, FileEntry, Manifest, RankEntry, load_manifest, read_manifest
from formats.safetensors_io import TORCH_TO_ST, read_header


def verify(workspace: Path) -> list[str]:
    """Every problem found, each naming the file and, where it can, the tensor; empty when all match."""
    ws = Path(workspace)
    manifest, digest_problem = read_manifest(ws)  # a hand edit is a finding, not a reason to stop
    problems: list[str] = [digest_problem] if digest_problem else []
    for rank in manifest.ranks:
        for entry in rank.files:
            problems += _verify_shard(ws, entry, rank)
    for entry in manifest.tokenizer:
        problems += _verify_plain(ws, entry)
    return problems


def _verify_plain(ws: Path, entry: FileEntry) -> list[str]:
    path = ws / entry.path
    if not path.is_file():
        return [f"{entry.path}: missing"]
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    return [] if h == entry.sha256 else [f"{entry.path}: sha256 {h[:12]}… does not match the manifest's {entry.sha256[:12]}…"]


def _verify_shard(ws: Path, entry: FileEntry, rank: RankEntry) -> list[str]:
    path = ws / entry.path
    if not path.is_file():
        return [f"{entry.path}: missing"]
    size = path.stat().st_size
    if size != entry.bytes:
        return [f"{entry.path}: {size} bytes, the manifest says {entry.bytes} (truncated or replaced)"]
    try:
        header, _ = read_header(path)
    except FormatError as e:
        return [str(e)]
    expected = {t.name: t for t in rank.tensors if t.file == entry.path}
    problems = [f"{entry.path}: tensor {n!r} is not in the manifest" for n in sorted(set(header) - set(expected))]
    problems += [f"{entry.path}: tensor {n!r} from the manifest is missing" for n in sorted(set(expected) - set(header))]
    for name in sorted(set(header) & set(expected)):
        info, want = header[name], expected[name]
        if TORCH_TO_ST[info.dtype] != _st(want.dtype) or list(info.shape) != list(want.shape):
            problems.append(f"{entry.path}: tensor {name!r} is {info.dtype} {list(info.shape)}, "
                            f"the manifest says {want.dtype} {list(want.shape)}")
    file_hash, tensor_hashes = _hash_shard(path, header)
    for name in sorted(set(header) & set(expected)):
        if tensor_hashes[name] != expected[name].sha256:
            problems.append(f"{entry.path}: tensor {name!r} bytes do not match their sha256 (corrupted)")
    if file_hash != entry.sha256 and not problems:
        problems.append(f"{entry.path}: file sha256 does not match the manifest (header changed)")
    return problems


def _hash_shard(path: Path, header: dict) -> tuple[str, dict[str, str]]:
    """File hash and per-tensor hashes in one sequential read."""
    file_hash, tensor_hashes = hashlib.sha256(), {}
    with open(path, "rb") as f:
        start = min((i.begin for i in header.values()), default=path.stat().st_size)
        file_hash.update(f.read(start))
        for name, info in sorted(header.items(), key=lambda kv: kv[1].begin):
            h, left = hashlib.sha256(), info.nbytes
            while left:
                chunk = f.read(min(CHUNK, left))
                h.update(chunk)
                file_hash.update(chunk)
                left -= len(chunk)
            tensor_hashes[name] = h.hexdigest()
        file_hash.update(f.read())
    return file_hash.hexdigest(), tensor_hashes


def _st(dtype: str) -> str:
    t = getattr(torch, dtype, None)
    return TORCH_TO_ST.get(t, dtype) if isinstance(t, torch.dtype) else dtype


def inspect(workspace: Path) -> dict[str, Any]:
    """What a user asks first: which model, how it is split, and how even the ranks are."""
    m: Manifest = load_manifest(Path(workspace))
    per_rank = [r.bytes for r in m.ranks]
    stages = _stages(m)
    per_stage = [s["bytes"] for s in stages]
    return {
        "workspace": str(Path(workspace).absolute()),
        "model": m.model.to_dict(),
        "tp": m.tp,
        "pp": m.pp,
        "stages": stages,
        "stage_spread_percent": _spread(per_stage),
        "rank_stage": [[r.stage, r.tp_rank] for r in m.ranks],
        "tied_lm_head_copy": m.model.tie_word_embeddings and m.pp > 1,
        "dtype": m.weights.dtype,
        "quantization": None if m.weights.quantization is None else dataclasses.asdict(m.weights.quantization),
        "padded_vocab_size": m.padded_vocab_size,
        "bytes_per_rank": per_rank,
        "rank_spread_percent": _spread(per_rank),
        "tensors_per_rank": [len(r.tensors) for r in m.ranks],
        "head_padding": _padding(m),
        "experts": _experts(m),
        "source": {"path": m.source.path, "format": m.source.format,
                   "files": [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in m.source.files]},
        "schema_version": m.schema_version,
        "converter_version": m.converter_version,
    }


def _experts(m: Manifest) -> dict[str, Any] | None:
    """Where a mixture of experts lives: which experts each rank holds, and their bytes on it."""
    moe = m.model.moe
    if moe is None:
        return None
    per_rank = []
    for r in m.ranks:
        experts = moe.expert_range(m.tp, r.tp_rank)
        nbytes = sum(math.prod(t.shape) * STORED_DTYPES[t.dtype].itemsize for t in r.tensors if ".experts." in t.name)
        per_rank.append({"rank": r.rank, "experts": [experts.start, experts.stop], "expert_bytes": nbytes})
    return {"num_experts": moe.num_experts, "top_k": moe.top_k, "intermediate_size": moe.intermediate_size,
            "layers": len(moe.layers), "mode": "expert parallel" if moe.expert_parallel else "tensor parallel",
            "per_rank": per_rank}


def _padding(m: Manifest) -> dict[str, Any] | None:
    cost = padding_cost(m.model)
    if cost is None:
        return None
    q = m.weights.quantization
    dense = torch.finfo(getattr(torch, m.weights.dtype)).bits // 8
    bytes_per_param = 0.5 if isinstance(q, Int4Format) else 1 if q else dense  # int4, FP8, dense
    return {**cost, "extra_bytes": int(cost["extra_params_per_layer"] * m.model.num_layers * bytes_per_param)}


def _stages(m: Manifest) -> list[dict[str, Any]]:
    out = []
    for s in m.stages:
        holds = (["embedding"] if s.stage == 0 else []) + (["norm, lm_head"] if s.stage == m.pp - 1 else [])
        out.append({"stage": s.stage, "layers": list(s.layers), "num_layers": s.num_layers,
                    "bytes": sum(m.ranks[r].bytes for r in m.stage_ranks(s.stage)),
                    "ranks": m.stage_ranks(s.stage), "holds": " + ".join(holds)})
    return out


def _spread(sizes: list[int]) -> float:
    return round(100 * (max(sizes) - min(sizes)) / max(sizes), 3) if max(sizes) else 0.0
