"""``tpconv convert SRC -o OUT --tp 1,2,4``: several workspaces in one pass over the source.

Each source layer is read once (and released once) and written for every tp before the next layer, so
peak memory stays the single-conversion streaming bound while the source is read one time instead of
``len(tps)``. ``OUT/tp1``, ``OUT/tp2``, ... are each a complete workspace built atomically, byte for
byte what a separate ``--tp N`` conversion writes. Pipeline stages are not offered here (pp 1 only).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from converter.atomic import building, check_target, check_writable
from converter.convert import (
    ConvertOptions,
    ConvertSummary,
    Progress,
    _check_space,
    _hash_files,
    _manifest,
    _os_error,
    _write_manifest,
    _write_tokenizer,
    one_thread,
    plan_stages,
    planned_bytes,
)
from converter.shards import write_group
from converter.source import Source, open_source
from converter.writer import peak_rss_bytes
from formats import layout
from formats.errors import TpDeployError
from formats.manifest import RankEntry
from formats.shard_plan import file_groups
from formats.sharding import check_tp


def parse_tps(text: str) -> list[int]:
    """``--tp 4`` or ``--tp 1,2,4`` (distinct positive values)."""
    try:
        tps = [int(x) for x in str(text).split(",")]
    except ValueError:
        raise TpDeployError(f"--tp {text!r} is not a tensor-parallel degree or a comma-separated list of them, "
                            "e.g. 4 or 1,2,4") from None
    if len(set(tps)) != len(tps):
        raise TpDeployError(f"--tp {text!r} lists a value twice; give each tp once")
    return tps


def convert_many(opts: ConvertOptions, tps: list[int], on_start=None) -> list[ConvertSummary]:
    """Write ``opts.dst_path/tp{N}`` for every N in ``tps``, reading the source once."""
    t0 = time.perf_counter()
    root, src_dir = Path(opts.dst_path), Path(opts.src)
    if opts.pp != 1 or opts.pp_layers:
        raise TpDeployError("--tp with several values writes pp 1 workspaces; convert with --pp one tp at a time")
    targets = [root / f"tp{tp}" for tp in tps]
    for t in targets:  # every refusal before the first byte is written
        check_target(t, opts.force, src_dir)
    check_writable(root)
    src = open_source(src_dir, opts.model_format, opts.dtype)
    threads = one_thread()
    try:
        for tp in tps:
            check_tp(src.config, tp, src.int4.group_size if src.int4 else 0)
        stages = {tp: plan_stages(src, tp, 1) for tp in tps}
        total = sum(planned_bytes(src, tp, stages[tp]) for tp in tps)
        _check_space(root, total)
        progress = on_start(total) if on_start else (lambda n: None)
        with concurrent.futures.ThreadPoolExecutor(1) as pool, ExitStack() as stack:
            source_hashes = pool.submit(_hash_files, src.path, src.checkpoint.files)
            tmps = [stack.enter_context(building(t, opts.force, src_dir)) for t in targets]
            ranks = _write_all(src, tps, tmps, progress)
            summaries = []
            for tp, tmp, target in zip(tps, tmps, targets):
                tokenizer = _write_tokenizer(src, tmp)
                manifest = _manifest(src, tp, stages[tp], ranks[tp], tokenizer, source_hashes.result())
                _write_manifest(tmp, manifest)
                summaries.append(ConvertSummary(
                    workspace=str(target.absolute()), tp=tp, pp=1, dtype=manifest.weights.dtype,
                    files=sum(len(r.files) for r in ranks[tp]) + len(tokenizer) + 1,
                    bytes_per_rank=[r.bytes for r in ranks[tp]], seconds=0.0, peak_rss_bytes=0,
                    unused_source_tensors=src.unused, notes=src.notes))
    except OSError as e:
        raise _os_error(e, root) from e
    finally:
        src.checkpoint.close()
        torch.set_num_threads(threads)
    seconds, rss = round(time.perf_counter() - t0, 3), peak_rss_bytes()
    return [dataclasses.replace(s, seconds=seconds, peak_rss_bytes=rss) for s in summaries]


def _write_all(src: Source, tps: list[int], roots: list[Path], progress: Progress) -> dict[int, list[RankEntry]]:
    files = {tp: [[] for _ in range(tp)] for tp in tps}
    tensors = {tp: [[] for _ in range(tp)] for tp in tps}
    for tp, root in zip(tps, roots):
        for rank in range(tp):
            (root / layout.rank_dir(rank)).mkdir()
    for group in file_groups(src.config, quantized=src.int4 is not None):  # one layer at a time, every tp
        for tp, root in zip(tps, roots):
            for rank in range(tp):
                entry, entries = write_group(src, group, tp, rank, root)
                files[tp][rank].append(entry)
                tensors[tp][rank].extend(entries)
                progress(entry.bytes)
        src.release()
    return {tp: [RankEntry(r, tuple(files[tp][r]), tuple(tensors[tp][r]), 0, r) for r in range(tp)] for tp in tps}

