"""Text <-> token ids and chat prompts for tprun, without transformers.

The runtime must tokenize exactly as the model's own transformers tokenizer does, or prompts
silently drift from what the model was trained on. transformers 5 is a thin layer over the
`tokenizers` library plus a Jinja chat template, so this module reproduces the parts of that layer
that change the result, as transformers 5.23 does them for a checkpoint with ``tokenizer.json``:

* the post-processor in ``tokenizer.json`` alone decides BOS/EOS: transformers drops
  ``add_bos_token``/``add_eos_token`` from tokenizer_config.json when tokenizer.json exists;
* padding/truncation stored in tokenizer.json are off, as in a default ``tokenizer(text)`` call;
* named special tokens missing from the added vocabulary are added as special tokens;
* ``clean_up_tokenization_spaces`` defaults to False and is ignored for BPE models;
* the chat template runs in the same sandboxed Jinja environment with the same helpers.

tokenizer.json is the single source of truth, so one transformers 5 behaviour is deliberately not
copied: for some model-specific classes (``tokenizer_class: LlamaTokenizerFast`` and kin) it rebuilds
normalizer/pre-tokenizer/decoder in code and keeps only vocab, merges and post-processor from the
file, so a legacy Llama/Mistral tokenizer.json (Prepend+Replace normalizer) encodes a little
differently there; here it encodes as the file says, as transformers 4 and `tokenizers` do.

``IncrementalDecoder`` turns a growing list of generated ids into text deltas for streaming.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from formats import layout
from formats.errors import FormatError, TpDeployError
from formats.manifest import load_manifest

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                        "cls_token", "mask_token")
REPLACEMENT_CHAR = "\ufffd"


class ChatTemplateError(TpDeployError):
    """The chat template rejected the conversation (e.g. roles that do not alternate)."""


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise FormatError(f"{path} is missing; the workspace tokenizer is incomplete, "
                              "re-convert the checkpoint with `tpconv convert`")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON ({e}); re-convert the checkpoint") from e
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(tok_cfg: dict[str, Any], special_map: dict[str, Any]) -> dict[str, str]:
    """transformers' ``special_tokens_map``: named tokens plus model-specific ``*_token`` keys.

    Without ``added_tokens_decoder`` transformers treats the config as legacy and lets
    special_tokens_map.json override it, so the same precedence is kept here.
    """
    merged = dict(tok_cfg)
    if "added_tokens_decoder" not in tok_cfg:
        merged.update(special_map)
    named = {k: v for k, v in merged.items() if k in NAMED_SPECIAL_TOKENS or k.endswith("_token")}
    extra = merged.get("extra_special_tokens")
    if isinstance(extra, dict):  # transformers 5 files model-specific tokens (image_token...) here
        named.update(extra)
    return {k: text for k, v in named.items() if (text := _token_text(v)) is not None}


def _extra_special_tokens(tok_cfg: dict[str, Any]) -> list[str]:
    extra = tok_cfg.get("extra_special_tokens", tok_cfg.get("additional_special_tokens")) or []
    values = extra.values() if isinstance(extra, dict) else extra
    return [t for t in (_token_text(v) for v in values) if t is not None]


def _select_template(raw: Any, tools: Any, where: str) -> str | None:
    """The template transformers would use: a string, or the "default"/"tool_use" entry of a list."""
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys()
                                     for t in raw):
        raw = {t["name"]: t["template"] for t in raw}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise FormatError(f"{where}: chat_template must be a string or a list of "
                          '{"name", "template"} objects; re-convert the checkpoint')
    if tools is not None and "tool_use" in raw:
        return raw["tool_use"]
    if "default" not in raw:
        raise FormatError(f"{where}: chat_template holds templates {sorted(raw)} but none is "
                          'named "default"; add one or use a plain prompt')
    return raw["default"]


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template rejected the conversation: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Same as transformers' override: Jinja's own tojson HTML-escapes, which changes prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def _compile(source: str, where: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise FormatError(f"{where}: chat_template is not valid Jinja (line {e.lineno}: "
                          f"{e.message}); fix the template or use a plain prompt") from e


def _plain(value: Any) -> Any:
    """Rebuild template inputs from JSON types, as transformers does, so the sandbox never sees
    arbitrary objects (whose methods it cannot vet)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # enums, numpy scalars: strip back to the base type
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate, drop None-valued keys and alias reasoning fields, exactly as transformers does."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TpDeployError(f"messages must be a non-empty list of {{'role', 'content'}} objects, "
                            f"got {type(messages).__name__} {messages!r:.80}")
    checked = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise TpDeployError(f"messages[{i}] must be an object with 'role' and 'content', "
                                f"got {type(msg).__name__}")
        if not isinstance(msg.get("role"), str) or not msg["role"]:
            raise TpDeployError(f"messages[{i}] needs a non-empty string 'role', got "
                                f"{msg.get('role')!r}")
        content = msg.get("content")
        # An assistant turn that only calls tools has no content (OpenAI sends null).
        if ("content" not in msg and "tool_calls" not in msg) or not (
                content is None or isinstance(content, (str, list))):
            raise TpDeployError(f"messages[{i}] (role {msg['role']!r}) needs 'content': a string "
                                f"or a list of parts, got {content!r:.80}")
        msg = _plain({k: v for k, v in msg.items() if v is not None})
        reasoning = next((msg[k] for k in ("reasoning_content", "thinking", "reasoning")
                          if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        checked.append(msg)
    return checked


def _eos_ids(value: Any, where: str) -> set[int]:
    values = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise FormatError(f"{where}: eos_token_id must be an int or a list of ints, got {value!r}")
    return set(values)


class Tokenizer:
    """The workspace tokenizer: encode/decode, special tokens, EOS ids and the chat template."""

    def __init__(self, tokenizer_dir: Path, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.dir = Path(tokenizer_dir)
        if not (self.dir / "tokenizer.json").is_file():
            raise FormatError(f"{self.dir / 'tokenizer.json'} is missing; tprun needs it to "
                              "tokenize. Re-convert the checkpoint with `tpconv convert`")
        self._config_path = self.dir / "tokenizer_config.json"
        cfg = _read_json(self._config_path, required=False)
        gen = _read_json(self.dir / "generation_config.json", required=False)
        self.special_tokens = _special_tokens(
            cfg, _read_json(self.dir / "special_tokens_map.json", required=False))
        self._backend = self._load_backend(cfg)
        self._chat_template = cfg.get("chat_template")
        # transformers 5 skips the clean-up for BPE: it strips real spaces before punctuation.
        self._clean_up = bool(cfg.get("clean_up_tokenization_spaces", False)) and (
            type(self._backend.model).__name__ != "BPE" or bool(cfg.get(
                "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id = self._id_of(self.bos_token)
        pad_id = self._id_of(self.special_tokens.get("pad_token"))
        self.pad_token_id = pad_id if pad_id is not None else gen.get("pad_token_id")
        eos = _eos_ids(gen.get("eos_token_id"), str(self.dir / "generation_config.json"))
        eos |= _eos_ids(list(eos_token_ids), "eos_token_ids")
        if self._id_of(self.eos_token) is not None:
            eos.add(self._id_of(self.eos_token))
        self.eos_token_ids: frozenset[int] = frozenset(eos)

    @classmethod
    def from_workspace(cls, workspace: Path) -> Tokenizer:
        """The tokenizer of a workspace written by ``tpconv convert``."""
        model = load_manifest(Path(workspace)).model
        return cls(Path(workspace) / layout.TOKENIZER_DIR, tuple(model.eos_token_ids))

    def _load_backend(self, cfg: dict[str, Any]) -> _Backend:
        path = self.dir / "tokenizer.json"
        try:
            backend = _Backend.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on a bad file
            raise FormatError(f"{path} cannot be read by the tokenizers library ({e}); "
                              "re-save it with a current transformers and re-convert") from e
        # A plain transformers call neither pads nor truncates, whatever tokenizer.json says.
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        wanted = [*self.special_tokens.values(), *_extra_special_tokens(cfg)]
        missing = list(dict.fromkeys(t for t in wanted if t not in present))
        if missing:  # transformers makes them atomic and skippable, adding ids if new
            backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in missing])
        return backend

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def backend(self) -> _Backend:
        """The ``tokenizers.Tokenizer`` itself (its vocabulary and JSON, for structured outputs)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (``len(hf_tokenizer)``)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text``; with ``add_special_tokens`` the tokenizer.json post-processor runs."""
        if not isinstance(text, str):
            raise TpDeployError(f"can only encode a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    @property
    def chat_template(self) -> Any:
        """The template(s) as tokenizer_config.json holds them (to recognise a tool-call format)."""
        return self._chat_template

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None,
                            documents: list[dict[str, Any]] | None = None,
                            continue_final_message: bool = False, **kwargs: Any) -> str:
        """Render ``messages`` to the prompt string, as transformers' ``tokenize=False`` does;
        ``continue_final_message`` ends it inside the last message, so the model goes on with it."""
        source = _select_template(self._chat_template, tools, str(self._config_path))
        if source is None:
            raise FormatError(f"this model has no chat template in {self._config_path} "
                              "(key chat_template); use a plain prompt instead of messages")
        for name, items in (("tools", tools), ("documents", documents)):
            if items is not None and (not isinstance(items, (list, tuple)) or not all(
                    isinstance(x, Mapping) for x in items)):
                raise TpDeployError(f"{name} must be a list of JSON objects, got {items!r:.80}")
        template = _compile(source, str(self._config_path))
        checked = _check_messages(messages)
        variables = _plain({**self.special_tokens, **kwargs})  # caller's kwargs win, as in HF
        try:
            text = template.render(messages=checked, tools=_plain(tools),
                                   documents=_plain(documents),
                                   add_generation_prompt=add_generation_prompt, **variables)
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: e.g. str + list content
            raise ChatTemplateError(f"the chat template in {self._config_path} failed on this "
                                    f"conversation: {e}") from e
        return continue_final(text, checked[-1].get("content")) if continue_final_message else text

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Prompt ids; the template writes BOS itself, so no special tokens are added on top."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


def continue_final(rendered: str, final: Any) -> str:
    """``rendered`` cut right after the final message's text, dropping the template's end-of-turn.

    As transformers does: templates often strip a message, so the stripped text is looked for last;
    trailing spaces the template kept are kept too."""
    if not isinstance(final, str) or not final.strip():
        raise TpDeployError("continue_final_message needs a final message with text to continue")
    at = rendered.rfind(final.strip())
    if at < 0:
        raise ChatTemplateError("continue_final_message: the chat template rewrote the final message, so "
                                "there is no place to continue it from; send add_generation_prompt instead")
    kept = final.lstrip()
    end = at + (len(kept) if rendered[at:at + len(kept)] == kept else len(final.strip()))
    return rendered[:end]


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (meant for WordPiece output)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                     (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                     (" 're", "'re")):
        text = text.replace(old, new)
    return text


class IncrementalDecoder:
    """Text deltas for a stream of generated ids, whose concatenation equals ``decode(all_ids)``.

    Decoding one token alone is wrong in two ways: byte-level BPE splits a multi-byte character
    over tokens (alone, each decodes to U+FFFD), and SentencePiece decoders drop the leading space
    of the first token. So, as vLLM does, each step decodes a short window of already-emitted
    tokens plus the new ones and emits only the text beyond the window's own decoding; text ending
    in U+FFFD is held back until the character completes. ``finish`` releases what is still held.
    The work per token is a decode of a few tokens, however long the output grows.

    One divergence, as in vLLM: a byte-fallback (SentencePiece) decoder turns a run of byte tokens
    that is not valid UTF-8 into one U+FFFD per byte, including valid bytes before the bad one, which
    the stream has already shown as themselves (text cannot be taken back).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix = 0  # window start: context only, its text was emitted already
        self._read = 0  # tokens before this have been emitted
        self._prefix_text = ""  # decode(token_ids[_prefix:_read])

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one generated id; return the new text it completes ('' while held back)."""
        self.token_ids.append(int(token_id))
        text = self._decode(self.token_ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = text[len(self._prefix_text):]
        self._prefix, self._read = self._read, len(self.token_ids)
        self._prefix_text = self._decode(self.token_ids[self._prefix:self._read])
        return delta

    def finish(self) -> str:
        """The held-back tail (e.g. an incomplete character at the end), once generation ends."""
        text = self._decode(self.token_ids[self._prefix:])
        delta = text[len(self._prefix_text):]
        self._prefix, self._read, self._prefix_text = self._prefix, len(self.token_ids), text
        return delta
