"""Copy the tokenizer into the workspace in one normalized shape.

The runtime reads ``tokenizer.json`` with the ``tokenizers`` library and the chat template from
``tokenizer_config.json``; checkpoints written by transformers 5 keep the template in
``chat_template.jinja`` instead, so it is folded back inline here. A checkpoint with only a
sentencepiece ``tokenizer.model`` gets a tokenizer.json built from it (``converter.sentencepiece``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from formats.errors import FormatError

OPTIONAL_COPIES = ("special_tokens_map.json",)


def check_tokenizer(src: Path) -> None:
    """Everything ``write_tokenizer`` reads exists and parses; called before anything is written."""
    if not (src / "tokenizer.json").is_file():
        if (src / "tokenizer.model").is_file():  # sentencepiece only: it must convert, now
            _tokenizer_json(src)
        else:
            raise FormatError(
                f"{src} has neither tokenizer.json nor tokenizer.model; tprun tokenizes with the `tokenizers` "
                "library and needs one. Write it with transformers: AutoTokenizer.from_pretrained(SRC)"
                ".save_pretrained(SRC)")
    else:
        _read_json(src / "tokenizer.json")
    for name in ("tokenizer_config.json", "generation_config.json", *OPTIONAL_COPIES):
        if (src / name).is_file():
            _read_json(src / name)
    template = src / "chat_template.jinja"
    if template.is_file():
        try:
            template.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{template} is not UTF-8 text ({e}); re-save the chat template") from e


def write_tokenizer(src: Path, dst: Path, hf_config: dict[str, Any]) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and generation_config.json into ``dst``.

    The source was validated by ``check_tokenizer`` when it was opened.
    """
    dst.mkdir(parents=True)
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    else:
        (dst / "tokenizer.json").write_text(_tokenizer_json(src), encoding="utf-8")
    written = [dst / "tokenizer.json"]
    tok_cfg = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    template = src / "chat_template.jinja"
    if "chat_template" not in tok_cfg and template.is_file():
        tok_cfg["chat_template"] = template.read_text(encoding="utf-8")
    written.append(_write_json(dst / "tokenizer_config.json", tok_cfg))
    gen = src / "generation_config.json"
    gen_cfg = _read_json(gen) if gen.is_file() else {
        k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_config}
    written.append(_write_json(dst / "generation_config.json", gen_cfg))
    for name in OPTIONAL_COPIES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            written.append(dst / name)
    return written


def _tokenizer_json(src: Path) -> str:
    """tokenizer.json built from a sentencepiece-only checkpoint's tokenizer.model."""
    from converter.sentencepiece import sentencepiece_to_json

    cfg = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    return sentencepiece_to_json(src / "tokenizer.model", cfg)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON, bad UTF-8, or an integer past Python's digit limit
        raise FormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path
