"""Where things live inside a workspace directory.

    workspace/
      manifest.json            written last: without it the directory is not a workspace
      rank0/ rank1/ ...        one directory per tensor-parallel rank, only that rank's tensors
        embed.safetensors      vocab-parallel embedding shard
        layer-00000.safetensors ... one file per decoder layer
        head.safetensors       final norm (+ lm_head shard when untied)
      tokenizer/               tokenizer.json, tokenizer_config.json (chat template inline),
                               generation_config.json
"""
from __future__ import annotations

from pathlib import Path

MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
EMBED_FILE = "embed.safetensors"
HEAD_FILE = "head.safetensors"


def rank_dir(rank: int) -> str:
    """Relative directory of one rank's shard."""
    return f"rank{rank}"


def layer_file(layer: int) -> str:
    """File name of one decoder layer inside a rank directory (zero-padded so names sort)."""
    return f"layer-{layer:05d}.safetensors"


def manifest_path(workspace: Path) -> Path:
    return Path(workspace) / MANIFEST_NAME
