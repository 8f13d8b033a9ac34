"""The manifest: the one file that describes a workspace, written last by the converter.

Schema version 7 (versions 1, dense weights only, 2, without a digest, 3, without pipeline
stages, 4, without a cache key, 5 and 6 are still read: 1-3 are ``pp`` 1, one stage holding every layer). Readers
reject unknown versions and unknown keys, so a workspace written by a newer converter fails loudly
instead of half understood. Since version 3 the manifest carries ``digest``, the sha256 of its own
canonical JSON: the model fields decide every answer, so an edit by hand must not pass as converted.
Since version 4 it records ``pp``, each stage's layer range, and for every rank its stage and tensor
rank (global rank = stage × tp + tp_rank, see ``formats.pipeline``). Since version 5 it records
``cache_key``, the key of the conversion that wrote it (``converter.cachekey``). Since version 6 int4
formats say ``act_order`` (GPTQ ``desc_act``: reordered input rows and ``perm`` tensors), so an older
reader refuses a workspace whose activations it would not gather. Since version 7 the quantization may be
FP8 (``formats.fp8``: float8_e4m3fn weights, float32 scales), told apart from int4 by its ``layout``. Since
version 8 the model may be a mixture of experts (``model.moe``: router and expert tensors, ``formats.sharding``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from formats import fp8, layout
from formats.config import ModelConfig, _strict_keys
from formats.errors import FormatError
from formats.fp8 import Fp8Format
from formats.int4 import LAYOUT, Int4Format
from formats.pipeline import StageEntry, global_rank
from formats.shard_plan import Piece

SCHEMA_VERSION = 8
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)
DIGEST_SINCE = 3  # first schema version whose manifests carry their own digest
PIPELINE_SINCE = 4  # first schema version with pp, stages and each rank's (stage, tp_rank)
KEY_SINCE = 5  # first schema version with cache_key
ACT_ORDER_SINCE = 6  # first schema version whose int4 formats carry act_order
FP8_SINCE = 7  # first schema version that may hold FP8 weights (an Fp8Format, float8_e4m3fn tensors)
MOE_SINCE = 8  # first schema version whose model may be a mixture of experts (``model.moe``)
FORMAT_NAME = "tpdeploy-workspace"
# Dense tensor dtypes by their manifest name; int4 parts are stored as int32 (qweight) and uint8 (zeros).
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORED_DTYPES = {**FLOAT_DTYPES, "int32": torch.int32, "uint8": torch.uint8, "float8_e4m3fn": fp8.WEIGHT_DTYPE}
DTYPES = tuple(FLOAT_DTYPES)


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the workspace (or to the source directory, for source files)
    bytes: int
    sha256: str


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of one rank; ``pieces`` say which source slices it holds (source checkpoint names)."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    pieces: tuple[Piece, ...]
    quant: Int4Format | Fp8Format | None = None  # on int4 linears' parts, FP8 linears' weight and scale


@dataclass(frozen=True)
class RankEntry:
    rank: int  # global rank: its directory is rank{rank}
    files: tuple[FileEntry, ...]
    tensors: tuple[TensorEntry, ...]
    stage: int = 0
    tp_rank: int = 0

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)


@dataclass(frozen=True)
class WeightFormat:
    dtype: str  # dtype of every dense tensor (embeddings, norms, biases, int4 scales)
    quantization: Int4Format | Fp8Format | None = None


@dataclass(frozen=True)
class SourceInfo:
    path: str
    format: str  # "safetensors" or "pytorch-bin"
    files: tuple[FileEntry, ...]


@dataclass(frozen=True)
class Manifest:
    model: ModelConfig
    tp: int
    padded_vocab_size: int
    weights: WeightFormat
    source: SourceInfo
    tokenizer: tuple[FileEntry, ...]
    ranks: tuple[RankEntry, ...]
    converter_version: str
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT_NAME
    pp: int = 1
    stages: tuple[StageEntry, ...] = ()  # read from an older schema: one stage, every layer
    cache_key: str = ""  # read from an older schema: none, so never up to date

    def __post_init__(self):
        if not self.stages:
            object.__setattr__(self, "stages", (StageEntry(0, (0, self.model.num_layers)),))

    @property
    def world(self) -> int:
        """Ranks (processes) this workspace runs on: tp × pp."""
        return self.tp * self.pp

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return global_rank(stage, tp_rank, self.tp)

    def stage_ranks(self, stage: int) -> list[int]:
        return [self.rank_of(stage, t) for t in range(self.tp)]

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        if self.schema_version < PIPELINE_SINCE:
            del d["pp"], d["stages"]
            for r in d["ranks"]:
                del r["stage"], r["tp_rank"]
        if self.schema_version < KEY_SINCE:
            del d["cache_key"]
        if self.schema_version < ACT_ORDER_SINCE:
            for q in [d["weights"]["quantization"], *(t["quant"] for r in d["ranks"] for t in r["tensors"])]:
                if q is not None and "act_order" in q:
                    del q["act_order"]
        d["model"] = self.model.to_dict()
        if self.schema_version >= DIGEST_SINCE:
            d["digest"] = manifest_digest(d)
        return json.dumps(d, indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest.json") -> Manifest:
        """Parse and check the structure; whether ``digest`` matches is ``digest_problem``'s question."""
        if not isinstance(d, dict):
            raise FormatError(f"{where}: expected an object, got {type(d).__name__}")
        version = d.get("schema_version", SCHEMA_VERSION)
        if version not in READABLE_VERSIONS:  # first: a newer manifest's keys are not ours to judge
            raise FormatError(
                f"{where}: schema_version {version!r} is not supported (this tpdeploy reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}); re-convert the checkpoint with this version's tpconv")
        d = _strict_keys(_without_digest(d, version, where), cls, where)
        _check_version_keys(d, version, ("pp", "stages"), where)
        _check_version_keys(d, version, ("cache_key",), where, KEY_SINCE)
        if d.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise FormatError(f"{where}: format is {d['format']!r}, expected {FORMAT_NAME!r}")
        ranks = tuple(_rank(r, f"{where}: ranks[{i}]", version) for i, r in enumerate(d["ranks"]))
        w = dict(_strict_keys(d["weights"], WeightFormat, f"{where}: weights"))
        w["quantization"] = _int4(w.get("quantization"), f"{where}: weights.quantization", version)
        weights = WeightFormat(**w)
        if weights.dtype not in DTYPES:
            raise FormatError(f"{where}: weights.dtype {weights.dtype!r} not supported; one of {DTYPES}")
        if version < MOE_SINCE and isinstance(d["model"], dict) and "moe" in d["model"]:
            raise FormatError(f"{where}: model: unknown key(s) ['moe'] for schema_version {version}")
        model = ModelConfig.from_dict(d["model"], f"{where}: model")
        tp, pp = d["tp"], d.get("pp", 1)
        stages = _stages(d.get("stages"), pp, model.num_layers, where)
        _check_ranks(ranks, tp, pp, where)
        src = _strict_keys(d["source"], SourceInfo, f"{where}: source")
        return cls(
            model=model, tp=tp, padded_vocab_size=d["padded_vocab_size"], weights=weights,
            source=SourceInfo(src["path"], src["format"], _files(src["files"], f"{where}: source.files")),
            tokenizer=_files(d["tokenizer"], f"{where}: tokenizer"), ranks=ranks,
            converter_version=d["converter_version"], schema_version=version, pp=pp, stages=stages,
            cache_key=d.get("cache_key", ""),
        )


def manifest_digest(data: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), the digest itself left out."""
    body = {k: v for k, v in data.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def digest_problem(data: dict[str, Any], where: str) -> str | None:
    """Why a manifest's digest does not vouch for its contents, or None (older versions carry none)."""
    if data.get("schema_version", SCHEMA_VERSION) < DIGEST_SINCE or data.get("digest") == manifest_digest(data):
        return None
    return f"{where}: its digest does not match its contents (edited by hand?); re-convert the checkpoint"


def _without_digest(d: dict[str, Any], version: int, where: str) -> dict[str, Any]:
    """``d`` less its digest, which a version-3 manifest must carry and an older one cannot."""
    d = dict(d)
    digest = d.pop("digest", None)
    if version < DIGEST_SINCE:
        if digest is not None:
            raise FormatError(f"{where}: unknown key(s) ['digest'] for schema_version {version}")
    elif not isinstance(digest, str):
        raise FormatError(f"{where}: missing key(s) ['digest'] (every schema_version {DIGEST_SINCE} manifest "
                          "has one); re-convert the checkpoint")
    return d


def _check_version_keys(d: dict[str, Any], version: int, keys: tuple[str, ...], where: str,
                        since: int = PIPELINE_SINCE) -> None:
    """``keys`` are required from schema version ``since`` on and unknown before it."""
    present = sorted(k for k in keys if k in d)
    if version < since and present:
        raise FormatError(f"{where}: unknown key(s) {present} for schema_version {version}")
    missing = sorted(set(keys) - set(present))
    if version >= since and missing:
        raise FormatError(f"{where}: missing key(s) {missing} (every schema_version {since} manifest has "
                          "them); re-convert the checkpoint")


def _stages(items: Any, pp: Any, num_layers: int, where: str) -> tuple[StageEntry, ...]:
    if items is None:
        return (StageEntry(0, (0, num_layers)),)
    if not isinstance(pp, int) or pp < 1 or not isinstance(items, list) or len(items) != pp:
        raise FormatError(f"{where}: pp is {pp!r} but stages lists {len(items) if isinstance(items, list) else items!r}")
    stages, start = [], 0
    for i, s in enumerate(items):
        s = _strict_keys(s, StageEntry, f"{where}: stages[{i}]")
        layers = tuple(s["layers"]) if isinstance(s["layers"], list) else None
        if s["stage"] != i or layers is None or len(layers) != 2 or layers[0] != start or layers[1] <= start:
            raise FormatError(f"{where}: stages[{i}] is {s!r}; stages must be numbered in order and hold "
                              f"contiguous, non-empty layer ranges starting at {start}")
        stages.append(StageEntry(i, layers))
        start = layers[1]
    if start != num_layers:
        raise FormatError(f"{where}: the stages hold layers 0..{start} but the model has {num_layers}")
    return tuple(stages)


def _check_ranks(ranks: tuple[RankEntry, ...], tp: int, pp: int, where: str) -> None:
    expected = [(r, *divmod(r, tp)) for r in range(tp * pp)]
    if [(r.rank, r.stage, r.tp_rank) for r in ranks] != expected:
        raise FormatError(f"{where}: tp {tp} x pp {pp} needs ranks 0..{tp * pp - 1} as (rank, stage, tp_rank) "
                          f"{expected}, but ranks list {[(r.rank, r.stage, r.tp_rank) for r in ranks]}")


def _files(items: list, where: str) -> tuple[FileEntry, ...]:
    return tuple(FileEntry(**_strict_keys(f, FileEntry, f"{where}[{i}]")) for i, f in enumerate(items))


def _rank(d: Any, where: str, version: int) -> RankEntry:
    d = _strict_keys(d, RankEntry, where)
    _check_version_keys(d, version, ("stage", "tp_rank"), where)
    tensors = []
    for i, t in enumerate(d["tensors"]):
        t = dict(_strict_keys(t, TensorEntry, f"{where}.tensors[{i}]"))
        t["shape"] = tuple(t["shape"])
        t["quant"] = _int4(t.get("quant"), f"{where}.tensors[{i}].quant", version)
        t["pieces"] = tuple(
            Piece(p["source"], p["axis"], tuple(p["src"]), tuple(p["dst"]))
            for p in (_strict_keys(p, Piece, f"{where}.tensors[{i}].pieces") for p in t["pieces"]))
        tensors.append(TensorEntry(**t))
    stage, tp_rank = d.get("stage", 0), d.get("tp_rank", d["rank"])
    return RankEntry(d["rank"], _files(d["files"], f"{where}.files"), tuple(tensors), stage, tp_rank)


def _int4(d: Any, where: str, version: int) -> Int4Format | Fp8Format | None:
    if d is None:
        return None
    if isinstance(d, dict) and d.get("layout") == fp8.LAYOUT:
        return _fp8(d, where, version)
    if isinstance(d, dict) and version < ACT_ORDER_SINCE and "act_order" in d:
        raise FormatError(f"{where}: unknown key(s) ['act_order'] for schema_version {version}")
    fmt = Int4Format(**_strict_keys(d, Int4Format, where))
    if fmt.layout != LAYOUT or fmt.bits != 4:
        raise FormatError(f"{where}: int4 layout {fmt.layout!r} ({fmt.bits} bits) is not supported; expected {LAYOUT!r}")
    return fmt


def _fp8(d: dict[str, Any], where: str, version: int) -> Fp8Format:
    if version < FP8_SINCE:
        raise FormatError(f"{where}: layout {fp8.LAYOUT!r} is unknown for schema_version {version} (FP8 weights "
                          f"came with version {FP8_SINCE})")
    d = dict(_strict_keys(d, Fp8Format, where))
    block = d.get("source_block", (0, 0))
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) for b in block)):
        raise FormatError(f"{where}: source_block is {block!r}; expected two integers")
    d["source_block"] = tuple(block)
    fmt = Fp8Format(**d)
    if not isinstance(fmt.block_k, int) or fmt.block_k < 1 or fmt.scale_dtype != "float32":
        raise FormatError(f"{where}: FP8 block_k {fmt.block_k!r} with {fmt.scale_dtype!r} scales is not supported; "
                          "expected a positive block_k and float32 scales")
    return fmt


def load_manifest(workspace: Path) -> Manifest:
    """Read and validate ``workspace/manifest.json`` with errors a user can act on.

    A version-3 manifest whose digest does not match its contents is refused: it was edited by hand.
    """
    manifest, problem = read_manifest(workspace)
    if problem:
        raise FormatError(problem)
    return manifest


def read_manifest(workspace: Path) -> tuple[Manifest, str | None]:
    """The manifest and, when its digest does not match, why (``tpconv verify`` reports it, exit 1)."""
    path = layout.manifest_path(workspace)
    if not Path(workspace).is_dir():
        raise FormatError(f"{workspace} is not a directory; pass a workspace written by `tpconv convert`")
    if not path.is_file():
        if (Path(workspace) / "config.json").is_file():  # a Hugging Face model directory
            raise FormatError(f"{workspace} is a checkpoint, not a workspace: convert it first with "
                              f"`tpconv convert {workspace} -o WS --tp N` and pass WS")
        raise FormatError(
            f"{workspace} is not a workspace: {layout.MANIFEST_NAME} is missing (an interrupted "
            "conversion never writes it); run `tpconv convert` again")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # bad JSON, bad UTF-8, or an integer past Python's digit limit
        raise FormatError(f"{path} is not valid JSON ({e}); the workspace is corrupt, re-convert it") from e
    try:
        manifest = Manifest.from_dict(data, str(path))
    except (KeyError, TypeError) as e:
        raise FormatError(f"{path}: malformed manifest ({type(e).__name__}: {e}); re-convert it") from e
    return manifest, digest_problem(data, str(path))
