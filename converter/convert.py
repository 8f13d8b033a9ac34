"""``tpconv convert``: stream a checkpoint into a workspace, one layer at a time, atomically."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from converter import __version__
from converter.atomic import building, check_target, check_writable
from converter.cachekey import KeyOptions, cache_key, hash_source, key_when_hashed
from converter.resume import Journal
from converter.shards import write_group
from converter.source import Source, open_source
from converter.tokenizer import write_tokenizer
from converter.writer import peak_rss_bytes, sha256_file
from formats import layout
from formats.errors import FormatError, OutOfSpaceError, TpDeployError
from formats.manifest import FileEntry, Manifest, RankEntry, SourceInfo, WeightFormat, read_manifest
from formats.pipeline import StageEntry, balance, check_pp, global_rank, parse_pp_layers, stages_from_counts
from formats.shard_plan import FileGroup, file_groups, rank_tensor
from formats.sharding import padded_size

PAD_HINT = "or pass --pad-heads to add zero heads that tp divides (same outputs; `tpconv inspect` shows the cost)"
FREE_SPACE_MARGIN = 64 << 20  # tokenizer, headers and manifest on top of the tensor bytes


@dataclass(frozen=True)
class ConvertOptions:
    src: Path
    dst_path: Path
    tp: int
    model_format: str = "auto"
    dtype: str = "auto"
    force: bool = False
    pp: int = 1
    pp_layers: str | None = None  # "10,10,8,2": layers per stage instead of the balance by bytes
    pad_heads: bool = False  # zero heads added so that tp divides them (formats.sharding.HeadPadding)
    resume: bool = False  # keep what a killed conversion of the same key wrote and verified
    ep: bool = False  # mixture of experts: whole experts per rank (expert parallel) instead of slices of each

    def key_options(self, tp: int | None = None) -> KeyOptions:
        layers = ",".join(x.strip() for x in self.pp_layers.split(",")) if self.pp_layers else None
        return KeyOptions(tp or self.tp, self.pp, layers, self.model_format, self.dtype, self.pad_heads,
                          self.ep)


@dataclass(frozen=True)
class ConvertSummary:
    workspace: str
    tp: int
    pp: int
    dtype: str
    files: int
    bytes_per_rank: list[int]
    seconds: float
    peak_rss_bytes: int
    unused_source_tensors: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)
    key: str = ""
    rank_sha256: list[str] = dataclasses.field(default_factory=list)  # see rank_digest
    status: str = "converted"  # or "up to date": the target already held this key's workspace
    resumed_files: int = 0  # rank files kept from a killed conversion (--resume)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_per_rank)


class Progress:
    """What a conversion reports as it goes; the CLI draws it (a bar on a terminal, lines otherwise)."""

    def wrote(self, nbytes: int) -> None:
        """``nbytes`` more bytes of rank files are on disk."""

    def group_done(self, label: str) -> None:
        """One file group (a decoder layer, the embedding, the head) is written for every rank."""


OnStart = Callable[[int, int], Progress]  # (total bytes, file groups) -> the conversion's Progress


def convert(opts: ConvertOptions, on_start: OnStart | None = None) -> ConvertSummary:
    """Validate everything, then write the workspace; nothing appears at dst_path unless complete.

    A target that already holds this conversion's workspace (same key, still verifies) is kept as it
    is unless ``force``: the summary says "up to date" and no tensor is read.
    """
    t0 = time.perf_counter()
    dst, src_dir = Path(opts.dst_path), Path(opts.src)
    if dst.exists() and not opts.force:
        check_target(dst, True, src_dir)  # every refusal except "exists" first
        current = up_to_date(dst, src_dir, opts.key_options(), t0)
        if isinstance(current, ConvertSummary):
            return current
        raise TpDeployError(f"--dst-path {dst} already exists and is not up to date ({current}); "
                            "pass --force to replace it")
    # Target first, then the whole source: every refusal comes before the first byte is written.
    check_target(dst, opts.force, src_dir)
    check_writable(dst)
    src = open_source(src_dir, opts.model_format, opts.dtype)
    threads = one_thread()
    try:
        if opts.pad_heads:
            src.pad_heads(opts.tp)
        if opts.ep:
            src.expert_parallel()
        src.check_tp(opts.tp, PAD_HINT)
        stages = plan_stages(src, opts.tp, opts.pp, opts.pp_layers)
        total = planned_bytes(src, opts.tp, stages)
        _check_space(dst, total)
        progress = on_start(total, len(stage_groups(src, stages))) if on_start else Progress()
        with concurrent.futures.ThreadPoolExecutor(1) as pool, \
                building(dst, opts.force, src_dir, opts.resume) as tmp:
            # Hashing the source overlaps with conversion: hashlib releases the GIL.
            source_hashes = pool.submit(hash_source, src.path)
            key = key_when_hashed(source_hashes, opts.key_options())
            journal = Journal.open(tmp, key, opts.resume)
            ranks = write_targets(src, [Target(opts.tp, stages, tmp, journal)], progress)[0]
            tokenizer = _write_tokenizer(src, tmp)
            manifest = _manifest(src, opts.tp, stages, ranks, tokenizer,
                                 checkpoint_hashes(src, source_hashes.result()), key.result())
            journal.close()
            _write_manifest(tmp, manifest)
    except OSError as e:
        raise _os_error(e, dst) from e
    finally:
        src.checkpoint.close()
        torch.set_num_threads(threads)
    return summary_of(dst, manifest, seconds=round(time.perf_counter() - t0, 3), peak_rss_bytes=peak_rss_bytes(),
                      unused_source_tensors=src.unused, notes=src.notes, resumed_files=journal.kept)


def up_to_date(dst: Path, src_dir: Path, key_opts: KeyOptions, t0: float) -> ConvertSummary | str:
    """The summary of the workspace at ``dst`` when it is this conversion's and verifies, else why not."""
    from converter.verify import verify  # verify reads workspaces only; imported here to keep convert's imports lean

    try:
        manifest, problem = read_manifest(dst)
    except FormatError as e:
        return str(e)
    if problem:
        return problem
    if not manifest.cache_key:
        return f"its manifest (schema {manifest.schema_version}) records no cache key"
    key = cache_key(hash_source(src_dir), key_opts)
    if manifest.cache_key != key:
        return "its cache key differs: the source files, the byte-changing options or tpconv changed"
    problems = verify(dst)
    if problems:
        return f"it no longer verifies: {problems[0]}"
    return summary_of(dst, manifest, seconds=round(time.perf_counter() - t0, 3), peak_rss_bytes=peak_rss_bytes(),
                      unused_source_tensors=[], status="up to date")


def summary_of(dst: Path, manifest: Manifest, **run: Any) -> ConvertSummary:
    """What a workspace is (from its manifest), with ``run``: how this conversion went (time, RSS, notes)."""
    return ConvertSummary(
        workspace=str(Path(dst).absolute()), tp=manifest.tp, pp=manifest.pp, dtype=manifest.weights.dtype,
        files=sum(len(r.files) for r in manifest.ranks) + len(manifest.tokenizer) + 1,
        bytes_per_rank=[r.bytes for r in manifest.ranks], key=manifest.cache_key,
        rank_sha256=[rank_digest(r) for r in manifest.ranks], **run)


def rank_digest(rank: RankEntry) -> str:
    """One sha256 for a rank's shard: over its files' paths and sha256s, in manifest order."""
    return hashlib.sha256("".join(f"{f.path} {f.sha256}\n" for f in rank.files).encode()).hexdigest()


def checkpoint_hashes(src: Source, top_level: tuple[FileEntry, ...]) -> tuple[FileEntry, ...]:
    """The manifest's source files (the weight files), reusing the hashes taken for the cache key."""
    known = {f.path: f for f in top_level}
    out = []
    for p in src.checkpoint.files:
        rel = str(p.relative_to(src.path))
        out.append(known.get(rel) or FileEntry(rel, p.stat().st_size, sha256_file(p)))
    return tuple(out)


def one_thread() -> int:
    """Run the copies on one intra-op thread; returns the count to restore. They are memory-bound, and
    torch's threads only fight the hashing thread for the cores (measured: ~2x faster on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def plan_stages(src: Source, tp: int, pp: int, pp_layers: str | None = None) -> tuple[StageEntry, ...]:
    """The stages' layer ranges: ``--pp-layers`` as given, or balanced by the bytes each stage holds."""
    cfg = src.config
    check_pp(cfg.num_layers, pp)
    if pp_layers is not None:
        return stages_from_counts(parse_pp_layers(pp_layers, cfg.num_layers, pp))
    if pp == 1:
        return stages_from_counts([cfg.num_layers])
    first = _groups(src, StageEntry(0, (0, 0)), pp)  # the embedding alone
    last = _groups(src, StageEntry(pp - 1, (0, 0)), pp)  # the head alone
    layers = _groups(src, StageEntry(0, (0, cfg.num_layers)), 1)[1:-1]
    counts = balance([_group_bytes(src, g, tp) for g in layers], sum(_group_bytes(src, g, tp) for g in first),
                     sum(_group_bytes(src, g, tp) for g in last), pp)
    return stages_from_counts(counts)


def planned_bytes(src: Source, tp: int, stages: tuple[StageEntry, ...] | None = None) -> int:
    """Tensor bytes the workspace will hold over all ranks (headers excluded)."""
    stages = stages or (StageEntry(0, (0, src.config.num_layers)),)
    return sum(_group_bytes(src, g, tp) for _, g in stage_groups(src, stages))


def stage_groups(src: Source, stages: tuple[StageEntry, ...]) -> list[tuple[StageEntry, FileGroup]]:
    """Every file group of a workspace with these stages, with its stage, in conversion order."""
    return [(s, g) for s in stages for g in _groups(src, s, len(stages))]


def _groups(src: Source, stage: StageEntry, pp: int):
    return file_groups(src.config, src.int4 is not None, stage, pp, act_order=bool(src.int4 and src.int4.act_order),
                       fp8_linears=src.fp8 is not None)


def _group_bytes(src: Source, group, tp: int) -> int:
    """Bytes of one file group over the tp ranks of a stage."""
    group_size = src.split_unit(tp)
    return sum(math.prod(rank_tensor(t, src.config, tp, rank, group_size).shape) * src.out_dtype(t).itemsize
               for rank in range(tp) for t in group.tensors)


@dataclass(frozen=True)
class Target:
    """One workspace being written: its tp, its stages, its temporary root and its journal."""

    tp: int
    stages: tuple[StageEntry, ...]
    root: Path
    journal: Journal


def write_targets(src: Source, targets: list[Target], progress: Progress) -> list[list[RankEntry]]:
    """Every target's rank files, one source file group at a time: a group (a decoder layer, the embedding,
    the head) is read and released once and written for every rank of every target that holds it — the
    ranks of its stage in one workspace, or every tp of a one-pass conversion."""
    plans = [{g.file: (s, g) for s, g in stage_groups(src, t.stages)} for t in targets]
    files = [[[] for _ in range(t.tp * len(t.stages))] for t in targets]
    tensors = [[[] for _ in range(t.tp * len(t.stages))] for t in targets]
    for t in targets:
        for rank in range(t.tp * len(t.stages)):
            (t.root / layout.rank_dir(rank)).mkdir(exist_ok=True)  # exists when resumed
    for name in [g.file for g in _groups(src, StageEntry(0, (0, src.config.num_layers)), 1)]:
        for k, (t, plan) in enumerate(zip(targets, plans)):
            stage, group = plan[name]
            for tp_rank in range(t.tp):
                rank = global_rank(stage.stage, tp_rank, t.tp)
                entry, entries = write_group(src, group, t.tp, tp_rank, t.root, rank, t.journal)
                files[k][rank].append(entry)
                tensors[k][rank].extend(entries)
                progress.wrote(entry.bytes)
        src.release()
        progress.group_done(name)
    return [[RankEntry(r, tuple(f[r]), tuple(x[r]), *divmod(r, t.tp)) for r in range(len(f))]
            for t, f, x in zip(targets, files, tensors)]


def _write_tokenizer(src: Source, root: Path) -> tuple[FileEntry, ...]:
    paths = write_tokenizer(src.path, root / layout.TOKENIZER_DIR, src.hf_config)
    return tuple(FileEntry(str(p.relative_to(root)), p.stat().st_size, sha256_file(p)) for p in paths)


def _manifest(src: Source, tp: int, stages: tuple[StageEntry, ...], ranks: list[RankEntry],
              tokenizer: tuple[FileEntry, ...], source_files: tuple[FileEntry, ...], key: str) -> Manifest:
    return Manifest(pp=len(stages), stages=stages,
        model=src.config, tp=tp, padded_vocab_size=padded_size(src.config.vocab_size, tp),
        weights=WeightFormat(dtype=str(src.dtype).removeprefix("torch."), quantization=src.quantization(tp)),
        source=SourceInfo(str(src.path.absolute()), src.checkpoint.format, source_files),
        tokenizer=tokenizer, ranks=tuple(ranks), converter_version=__version__, cache_key=key,
    )


def _write_manifest(root: Path, manifest: Manifest) -> None:
    """Written last, so only a complete workspace ever has one."""
    path = root / layout.MANIFEST_NAME
    with open(path, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())


def _check_space(target: Path, needed: int) -> None:
    probe = target.absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + FREE_SPACE_MARGIN:
        raise OutOfSpaceError(f"not enough disk space at {probe}: the workspace needs {_gib(needed + FREE_SPACE_MARGIN)} "
                            f"and {_gib(free)} is free; free space or choose another --dst-path")


def _os_error(e: OSError, target: Path) -> TpDeployError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutOfSpaceError(f"writing {target} failed: {e.strerror} ({e.filename or 'output file'}); "
                             "nothing was left behind; free space (or raise the file size limit) and retry")
    return TpDeployError(f"writing {target} failed: {e.strerror} ({e.filename or target}); nothing was left behind")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"
