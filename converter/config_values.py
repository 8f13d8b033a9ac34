"""config.json values: every field the architecture readers use is typed and ranged here, in one table,
so a bad value is named with what is allowed instead of surfacing as a KeyError, a TypeError or a
64-digit shape."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from formats.errors import FormatError


@dataclass(frozen=True)
class Expect:
    """What a config.json value must be: ``ok`` decides, ``text`` says what is allowed."""

    ok: Callable[[Any], bool]
    text: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is a bool, never a count


def _is_number(v: Any) -> bool:
    """A finite number that fits a float: json.loads also accepts NaN, Infinity and 400-digit integers."""
    if not (_is_int(v) or isinstance(v, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


POSITIVE_INT = Expect(lambda v: _is_int(v) and v > 0, "a positive integer")
POSITIVE_NUMBER = Expect(lambda v: _is_number(v) and v > 0, "a positive number")
BOOL = Expect(lambda v: isinstance(v, bool), "true or false")
OBJECT = Expect(lambda v: isinstance(v, dict), "an object")
STRING = Expect(lambda v: isinstance(v, str), "a string")
TOKEN_ID = Expect(lambda v: _is_int(v) and v >= 0, "a token id (a non-negative integer)")
TOKEN_IDS = Expect(lambda v: TOKEN_ID.ok(v) or isinstance(v, list) and all(map(TOKEN_ID.ok, v)),
                   "a token id or a list of token ids (non-negative integers)")
LAYER_LIST = Expect(lambda v: isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v),
                    "a list of layer indexes (non-negative integers)")
WINDOW = Expect(lambda v: _is_int(v) and v >= 0, "a non-negative integer (0 or null: full attention)")

# field -> (what it must be, required). null counts as absent, as transformers reads it.
CONFIG_FIELDS: dict[str, tuple[Expect, bool]] = {
    "num_hidden_layers": (POSITIVE_INT, True),
    "hidden_size": (POSITIVE_INT, True),
    "num_attention_heads": (POSITIVE_INT, True),
    "num_key_value_heads": (POSITIVE_INT, False),  # absent: one KV head per query head
    "head_dim": (POSITIVE_INT, False),  # absent: hidden_size / num_attention_heads
    "intermediate_size": (POSITIVE_INT, True),
    "vocab_size": (POSITIVE_INT, True),
    "max_position_embeddings": (POSITIVE_INT, True),
    "rms_norm_eps": (POSITIVE_NUMBER, True),
    "rope_theta": (POSITIVE_NUMBER, False),  # transformers 4; 5 keeps it in rope_parameters
    "rope_scaling": (OBJECT, False),
    "rope_parameters": (OBJECT, False),
    "tie_word_embeddings": (BOOL, False),
    "attention_bias": (BOOL, False),
    "mlp_bias": (BOOL, False),
    "sliding_window": (WINDOW, False),
    "use_sliding_window": (BOOL, False),
    "query_pre_attn_scalar": (POSITIVE_NUMBER, False),  # Gemma 3
    "rope_local_base_freq": (POSITIVE_NUMBER, False),
    "sliding_window_pattern": (POSITIVE_INT, False),
    "hidden_activation": (STRING, False),
    "num_experts": (POSITIVE_INT, False),  # mixture of experts: Qwen3-MoE (transformers 4)
    "num_local_experts": (POSITIVE_INT, False),  # Mixtral; Qwen3-MoE in transformers 5
    "num_experts_per_tok": (POSITIVE_INT, False),
    "moe_intermediate_size": (POSITIVE_INT, False),
    "decoder_sparse_step": (POSITIVE_INT, False),
    "mlp_only_layers": (LAYER_LIST, False),
    "norm_topk_prob": (BOOL, False),
    "bos_token_id": (TOKEN_ID, False),
    "eos_token_id": (TOKEN_IDS, False),
}
# Inside rope_scaling / rope_parameters (all optional there), and the keys each rope type needs.
ROPE_FIELDS: dict[str, Expect] = {
    "rope_type": STRING, "type": STRING, "rope_theta": POSITIVE_NUMBER, "factor": POSITIVE_NUMBER,
    "low_freq_factor": POSITIVE_NUMBER, "high_freq_factor": POSITIVE_NUMBER,
    "original_max_position_embeddings": POSITIVE_INT,
}
ROPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_config(hf: dict[str, Any], where: str) -> None:
    """Type and range of every field the converter reads, then the relations between them."""
    for key, (expect, required) in CONFIG_FIELDS.items():
        _check_value(hf.get(key), key, expect, required, where)
    for key in ("rope_scaling", "rope_parameters"):
        for sub, expect in ROPE_FIELDS.items():
            _check_value((hf.get(key) or {}).get(sub), f"{key}.{sub}", expect, False, where)
    heads, kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if heads % kv:
        raise FormatError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}; "
                          "each KV head serves a whole group of query heads")
    if hf.get("head_dim") is None and hf["hidden_size"] % heads:
        raise FormatError(f"{where}: hidden_size {hf['hidden_size']} is not a multiple of num_attention_heads "
                          f"{heads} and head_dim is not given; add the model's head_dim to config.json")


def _check_value(value: Any, key: str, expect: Expect, required: bool, where: str) -> None:
    if value is None:
        if required:
            raise FormatError(f"{where}: required field {key!r} is missing")
        return
    if not expect.ok(value):
        raise FormatError(f"{where}: field {key!r} is {show(value)} ({_kind(value)}); expected {expect.text}")


def show(v: Any) -> str:
    """The value as written in config.json (strings quoted the Python way), shortened."""
    text = repr(v) if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(v: Any) -> str:
    kinds = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
             (list, "a list"), (dict, "an object"))
    return next((k for t, k in kinds if isinstance(v, t)), type(v).__name__)
