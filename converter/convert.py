"""``tpconv convert``: stream a checkpoint into a workspace, one layer at a time, atomically."""
from __future__ import annotations

import concurrent.futures
import errno
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from converter import __version__
from converter.atomic import building, check_target, check_writable
from converter.shards import write_group
from converter.source import Source, open_source
from converter.tokenizer import write_tokenizer
from converter.writer import peak_rss_bytes, sha256_file
from formats import layout
from formats.errors import TpDeployError
from formats.manifest import FileEntry, Manifest, RankEntry, SourceInfo, WeightFormat
from formats.shard_plan import file_groups, rank_tensor
from formats.sharding import check_tp, padded_size

FREE_SPACE_MARGIN = 64 << 20  # tokenizer, headers and manifest on top of the tensor bytes


@dataclass(frozen=True)
class ConvertOptions:
    src: Path
    dst_path: Path
    tp: int
    model_format: str = "auto"
    dtype: str = "auto"
    force: bool = False


@dataclass(frozen=True)
class ConvertSummary:
    workspace: str
    tp: int
    dtype: str
    files: int
    bytes_per_rank: list[int]
    seconds: float
    peak_rss_bytes: int
    unused_source_tensors: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_per_rank)


Progress = Callable[[int], None]  # called with the bytes just written


def convert(opts: ConvertOptions, on_start: Callable[[int], Progress] | None = None) -> ConvertSummary:
    """Validate everything, then write the workspace; nothing appears at dst_path unless complete."""
    t0 = time.perf_counter()
    dst, src_dir = Path(opts.dst_path), Path(opts.src)
    # Target first, then the whole source: every refusal comes before the first byte is written.
    check_target(dst, opts.force, src_dir)
    check_writable(dst)
    src = open_source(src_dir, opts.model_format, opts.dtype)
    # The copies here are memory-bound; torch's intra-op threads only fight the hashing thread
    # for the cores (measured: about twice as fast single-threaded on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_tp(src.config, opts.tp, src.int4.group_size if src.int4 else 0)
        total = planned_bytes(src, opts.tp)
        _check_space(dst, total)
        progress = on_start(total) if on_start else (lambda n: None)
        with concurrent.futures.ThreadPoolExecutor(1) as pool, building(dst, opts.force, src_dir) as tmp:
            # Hashing the source overlaps with conversion: hashlib releases the GIL.
            source_hashes = pool.submit(_hash_files, src.path, src.checkpoint.files)
            ranks = _write_ranks(src, opts.tp, tmp, progress)
            tokenizer = _write_tokenizer(src, tmp)
            manifest = _manifest(src, opts.tp, ranks, tokenizer, source_hashes.result())
            _write_manifest(tmp, manifest)
    except OSError as e:
        raise _os_error(e, dst) from e
    finally:
        src.checkpoint.close()
        torch.set_num_threads(threads)
    return ConvertSummary(
        workspace=str(dst.absolute()), tp=opts.tp, dtype=manifest.weights.dtype,
        files=sum(len(r.files) for r in ranks) + len(tokenizer) + 1,
        bytes_per_rank=[r.bytes for r in ranks], seconds=round(time.perf_counter() - t0, 3),
        peak_rss_bytes=peak_rss_bytes(),
        unused_source_tensors=src.unused,
    )


def planned_bytes(src: Source, tp: int) -> int:
    """Tensor bytes the workspace will hold over all ranks (headers excluded)."""
    n, group_size = 0, src.int4.group_size if src.int4 else 0
    for group in file_groups(src.config, quantized=src.int4 is not None):
        for rank in range(tp):
            for t in group.tensors:
                n += math.prod(rank_tensor(t, src.config, tp, rank, group_size).shape) * src.out_dtype(t).itemsize
    return n


def _write_ranks(src: Source, tp: int, root: Path, progress: Progress) -> list[RankEntry]:
    files: list[list[FileEntry]] = [[] for _ in range(tp)]
    tensors: list[list] = [[] for _ in range(tp)]
    for rank in range(tp):
        (root / layout.rank_dir(rank)).mkdir()
    for group in file_groups(src.config, quantized=src.int4 is not None):  # one layer at a time, all ranks
        for rank in range(tp):
            entry, entries = write_group(src, group, tp, rank, root)
            files[rank].append(entry)
            tensors[rank].extend(entries)
            progress(entry.bytes)
        src.release()
    return [RankEntry(r, tuple(files[r]), tuple(tensors[r])) for r in range(tp)]


def _write_tokenizer(src: Source, root: Path) -> tuple[FileEntry, ...]:
    paths = write_tokenizer(src.path, root / layout.TOKENIZER_DIR, src.hf_config)
    return tuple(FileEntry(str(p.relative_to(root)), p.stat().st_size, sha256_file(p)) for p in paths)


def _hash_files(base: Path, paths: list[Path]) -> tuple[FileEntry, ...]:
    return tuple(FileEntry(str(p.relative_to(base)), p.stat().st_size, sha256_file(p)) for p in paths)


def _manifest(src: Source, tp: int, ranks: list[RankEntry], tokenizer: tuple[FileEntry, ...],
              source_files: tuple[FileEntry, ...]) -> Manifest:
    return Manifest(
        model=src.config, tp=tp, padded_vocab_size=padded_size(src.config.vocab_size, tp),
        weights=WeightFormat(dtype=str(src.dtype).removeprefix("torch."), quantization=src.int4),
        source=SourceInfo(str(src.path.absolute()), src.checkpoint.format, source_files),
        tokenizer=tokenizer, ranks=tuple(ranks), converter_version=__version__,
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
        raise TpDeployError(f"not enough disk space at {probe}: the workspace needs {_gib(needed + FREE_SPACE_MARGIN)} "
                            f"and {_gib(free)} is free; free space or choose another --dst-path")


def _os_error(e: OSError, target: Path) -> TpDeployError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return TpDeployError(f"writing {target} failed: {e.strerror} ({e.filename or 'output file'}); "
                             "nothing was left behind; free space (or raise the file size limit) and retry")
    return TpDeployError(f"writing {target} failed: {e.strerror} ({e.filename or target}); nothing was left behind")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"
