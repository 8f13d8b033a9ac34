"""The cache key of a conversion: same key, same workspace bytes.

A CI job keys its cache on ``tpconv key SRC --tp N ...`` and skips the conversion on a hit; ``tpconv
convert`` records the key in the manifest and exits at once when the target already holds a workspace
with the same key that still verifies. The key is the sha256 of

* the key scheme and the converter's version and manifest schema (a new tpconv may write other bytes),
* every option that changes bytes (tp, pp, the stage split, model format, dtype, padded heads), and
* the name and sha256 of every file at the top of the source directory (weights, index, config,
  tokenizer, chat template; subdirectories and hidden files are never read by the converter).

Options that change no byte (``--force``, ``--json``, ``--resume``, the output path) are left out.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from converter import __version__
from converter.writer import sha256_file
from formats.errors import FormatError
from formats.manifest import SCHEMA_VERSION, FileEntry

KEY_SCHEME = 1  # bump when what goes into the key changes


@dataclass(frozen=True)
class KeyOptions:
    """The conversion options that decide the workspace's bytes, as the user gave them."""

    tp: int
    pp: int = 1
    pp_layers: str | None = None
    model_format: str = "auto"
    dtype: str = "auto"
    pad_heads: bool = False
    ep: bool = False


def source_files(src: Path) -> list[Path]:
    """The files the key covers: every regular, non-hidden file directly in ``src``, sorted by name."""
    src = Path(src)
    if not src.is_dir():
        raise FormatError(f"source {src} is not a directory; pass a local Hugging Face checkpoint directory")
    return sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))


def hash_source(src: Path, on_file: Callable[[Path], None] | None = None) -> tuple[FileEntry, ...]:
    """Name, size and sha256 of every file the key covers."""
    entries = []
    for p in source_files(src):
        entries.append(FileEntry(p.name, p.stat().st_size, sha256_file(p)))
        if on_file:
            on_file(p)
    return tuple(entries)


def cache_key(files: tuple[FileEntry, ...], opts: KeyOptions) -> str:
    """The key of converting a source whose files hash to ``files`` with ``opts``."""
    body = {
        "scheme": KEY_SCHEME, "converter": __version__, "schema": SCHEMA_VERSION,
        "options": {"tp": opts.tp, "pp": opts.pp, "pp_layers": opts.pp_layers, "model_format": opts.model_format,
                    "dtype": opts.dtype, "pad_heads": opts.pad_heads, "ep": opts.ep},
        "files": [[f.path, f.bytes, f.sha256] for f in files],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def key_when_hashed(files: concurrent.futures.Future, opts: KeyOptions) -> concurrent.futures.Future:
    """The key, as a future that completes when ``files`` (``hash_source``, on another thread) does."""
    key: concurrent.futures.Future = concurrent.futures.Future()

    def done(f: concurrent.futures.Future) -> None:
        if f.exception() is not None:
            key.set_exception(f.exception())
        else:
            key.set_result(cache_key(f.result(), opts))
    files.add_done_callback(done)
    return key


def combined_key(keys: list[str]) -> str:
    """One key for several workspaces written in one pass (``--tp 1,2,4``): the sha256 of their keys."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()
