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
from converter.cachekey import hash_source, key_when_hashed
from converter.convert import (
    PAD_HINT,
    ConvertOptions,
    ConvertSummary,
    OnStart,
    Progress,
    Target,
    _check_space,
    _manifest,
    _os_error,
    _write_manifest,
    _write_tokenizer,
    checkpoint_hashes,
    one_thread,
    plan_stages,
    planned_bytes,
    stage_groups,
    summary_of,
    up_to_date,
    write_targets,
)
from converter.resume import Journal
from converter.source import open_source
from converter.writer import peak_rss_bytes
from formats.errors import TpDeployError


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


def convert_many(opts: ConvertOptions, tps: list[int], on_start: OnStart | None = None) -> list[ConvertSummary]:
    """Write ``opts.dst_path/tp{N}`` for every N in ``tps``, reading the source once.

    When every target is already up to date (``convert``'s rule, per tp) nothing is read or written.
    """
    t0 = time.perf_counter()
    root, src_dir = Path(opts.dst_path), Path(opts.src)
    if opts.pp != 1 or opts.pp_layers:
        raise TpDeployError("--tp with several values writes pp 1 workspaces; convert with --pp one tp at a time")
    if opts.pad_heads:  # the padded model differs per tp, so the layers cannot be shared
        raise TpDeployError("--pad-heads pads for one tp; convert with --pad-heads one tp at a time")
    targets = [root / f"tp{tp}" for tp in tps]
    if not opts.force and all(t.exists() for t in targets):
        current = [up_to_date(t, src_dir, opts.key_options(tp), t0) for tp, t in zip(tps, targets)]
        if all(isinstance(c, ConvertSummary) for c in current):
            return current
    for t in targets:  # every refusal before the first byte is written
        check_target(t, opts.force, src_dir)
    check_writable(root)
    src = open_source(src_dir, opts.model_format, opts.dtype)
    threads = one_thread()
    try:
        if opts.ep:
            src.expert_parallel()
        for tp in tps:
            src.check_tp(tp, PAD_HINT)
        stages = {tp: plan_stages(src, tp, 1) for tp in tps}
        total = sum(planned_bytes(src, tp, stages[tp]) for tp in tps)
        _check_space(root, total)
        # one group at a time for every tp: as many steps as one workspace has groups
        progress = on_start(total, len(stage_groups(src, stages[tps[0]]))) if on_start else Progress()
        with concurrent.futures.ThreadPoolExecutor(1) as pool, ExitStack() as stack:
            source_hashes = pool.submit(hash_source, src.path)
            keys = {tp: key_when_hashed(source_hashes, opts.key_options(tp)) for tp in tps}
            tmps = [stack.enter_context(building(t, opts.force, src_dir, opts.resume)) for t in targets]
            journals = {tp: Journal.open(tmp, keys[tp], opts.resume) for tp, tmp in zip(tps, tmps)}
            written = [Target(tp, stages[tp], tmp, journals[tp]) for tp, tmp in zip(tps, tmps)]
            ranks = dict(zip(tps, write_targets(src, written, progress)))
            summaries = []
            for tp, tmp, target in zip(tps, tmps, targets):
                tokenizer = _write_tokenizer(src, tmp)
                manifest = _manifest(src, tp, stages[tp], ranks[tp], tokenizer,
                                     checkpoint_hashes(src, source_hashes.result()), keys[tp].result())
                journals[tp].close()
                _write_manifest(tmp, manifest)
                summaries.append(summary_of(target, manifest, seconds=0.0, peak_rss_bytes=0,
                                            unused_source_tensors=src.unused, notes=src.notes,
                                            resumed_files=journals[tp].kept))
    except OSError as e:
        raise _os_error(e, root) from e
    finally:
        src.checkpoint.close()
        torch.set_num_threads(threads)
    seconds, rss = round(time.perf_counter() - t0, 3), peak_rss_bytes()
    return [dataclasses.replace(s, seconds=seconds, peak_rss_bytes=rss) for s in summaries]
