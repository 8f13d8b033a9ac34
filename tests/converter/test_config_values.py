"""Every config.json value the converter reads is checked for type and range in one place: a bad
value is a user error naming the field (exit 2), never a KeyError, TypeError or ZeroDivisionError."""
import json
import os
import re

import pytest

from tests.converter.test_errors import run_cli

DELETE = object()  # the key is removed from config.json
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
POS_INT = "expected a positive integer"

BAD = {
    "heads as string": ({"num_attention_heads": "9"}, r"field 'num_attention_heads' is '9' \(a string\); " + POS_INT),
    "heads zero": ({"num_attention_heads": 0}, r"field 'num_attention_heads' is 0 \(an integer\); " + POS_INT),
    "heads negative": ({"num_attention_heads": -4}, "field 'num_attention_heads' is -4"),
    "heads float": ({"num_attention_heads": 4.0}, r"field 'num_attention_heads' is 4.0 \(a number\); " + POS_INT),
    "heads bool": ({"num_attention_heads": True}, r"field 'num_attention_heads' is true \(a boolean\); " + POS_INT),
    "heads null": ({"num_attention_heads": None}, "required field 'num_attention_heads' is missing"),
    "heads as string with head_dim": ({"num_attention_heads": "4", "head_dim": 16}, "field 'num_attention_heads' is '4'"),
    "layers as string": ({"num_hidden_layers": "2"}, "field 'num_hidden_layers' is '2'"),
    "hidden as list": ({"hidden_size": [64]}, r"field 'hidden_size' is \[64\] \(a list\); " + POS_INT),
    "intermediate zero": ({"intermediate_size": 0}, "field 'intermediate_size' is 0"),
    "vocab negative": ({"vocab_size": -1}, "field 'vocab_size' is -1"),
    "max positions float": ({"max_position_embeddings": 1.5}, "field 'max_position_embeddings' is 1.5"),
    "kv heads zero": ({"num_key_value_heads": 0}, "field 'num_key_value_heads' is 0"),
    "kv heads not dividing": ({"num_key_value_heads": 3},
                              "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    "head_dim string": ({"head_dim": "16"}, "field 'head_dim' is '16'"),
    "head_dim zero": ({"head_dim": 0}, "field 'head_dim' is 0"),
    "hidden not dividing heads": ({"hidden_size": 66, "head_dim": DELETE},
                                  "hidden_size 66 is not a multiple of num_attention_heads 4"),
    "eps string": ({"rms_norm_eps": "1e-5"}, r"field 'rms_norm_eps' is '1e-5' \(a string\); expected a positive number"),
    "eps zero": ({"rms_norm_eps": 0}, "field 'rms_norm_eps' is 0"),
    "eps negative": ({"rms_norm_eps": -1e-5}, "field 'rms_norm_eps' is -1e-05"),
    "eps nan": ({"rms_norm_eps": float("nan")}, "field 'rms_norm_eps' is NaN"),
    "theta too large for a float": ({"rope_theta": 10 ** 400}, "field 'rope_theta' is 1000"),
    "tie string": ({"tie_word_embeddings": "false"}, r"field 'tie_word_embeddings' is 'false' \(a string\); expected true or false"),
    "tie int": ({"tie_word_embeddings": 1}, "field 'tie_word_embeddings' is 1"),
    "attention_bias string": ({"attention_bias": "true"}, "field 'attention_bias' is 'true'"),
    "use_sliding_window string": ({"use_sliding_window": "no"}, "field 'use_sliding_window' is 'no'"),
    "sliding_window string": ({"sliding_window": "4096"}, "field 'sliding_window' is '4096'"),
    "eos string": ({"eos_token_id": "2"}, r"field 'eos_token_id' is '2' \(a string\); expected a token id"),
    "eos list with string": ({"eos_token_id": [2, "3"]}, "field 'eos_token_id' is"),
    "eos negative": ({"eos_token_id": -1}, "field 'eos_token_id' is -1"),
    "bos float": ({"bos_token_id": 1.0}, "field 'bos_token_id' is 1.0"),
    "architectures of objects": ({"architectures": [{}]}, "architectures"),
    "llama3 without its fields": ({"rope_parameters": {"rope_type": "llama3", "factor": 8}},
                                  r"field 'rope_parameters' has rope_type 'llama3' but lacks \['high_freq_factor', "
                                  r"'low_freq_factor', 'original_max_position_embeddings'\]"),
    "llama3 factor string": ({"rope_parameters": {**LLAMA3, "factor": "8"}}, "field 'rope_parameters.factor' is '8'"),
    "llama3 factors inverted": ({"rope_parameters": {**LLAMA3, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
                                "high_freq_factor 1.0 must exceed low_freq_factor 4.0"),
    "llama3 original max float": ({"rope_parameters": {**LLAMA3, "original_max_position_embeddings": 8192.5}},
                                  "field 'rope_parameters.original_max_position_embeddings' is 8192.5"),
    "linear without factor": ({"rope_parameters": {"rope_type": "linear"}}, r"lacks \['factor'\]"),
    "linear factor zero": ({"rope_scaling": {"type": "linear", "factor": 0}}, "field 'rope_scaling.factor' is 0"),
    "rope theta string": ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}},
                          "field 'rope_parameters.rope_theta' is '1e4'"),
    "top-level rope theta zero": ({"rope_theta": 0}, "field 'rope_theta' is 0"),
    "rope not an object": ({"rope_parameters": "llama3"}, r"field 'rope_parameters' is 'llama3' \(a string\); expected an object"),
    "rope type not a string": ({"rope_parameters": {"rope_type": 3}}, "field 'rope_parameters.rope_type' is 3"),
    "rope type unknown": ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
}


def _edit(src, updates):
    cfg = json.loads((src / "config.json").read_text())
    for key, value in updates.items():
        if value is DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_config_values_are_named(tiny, tmp_path, case):
    updates, pattern = BAD[case]
    src = tiny()
    _edit(src, updates)
    code, out = run_cli("convert", src, "-o", tmp_path / "ws")
    assert code == 3, out  # a bad checkpoint, not a bad command
    assert out.startswith("tpconv: error:") and "Traceback" not in out, out
    assert "config.json" in out, out
    assert re.search(pattern, out), out
    assert os.listdir(tmp_path) == []


def test_unusual_but_valid_values_convert(tiny, tmp_path):
    """null for optional fields, int-valued floats, a list of eos ids, a v4 rope_scaling of null."""
    src = tiny()
    _edit(src, {"head_dim": None, "sliding_window": None, "eos_token_id": [2, 0], "rms_norm_eps": 1,
                "rope_parameters": {"rope_type": "default", "rope_theta": 500000}, "rope_scaling": None})
    code, out = run_cli("convert", src, "-o", tmp_path / "ws")
    assert code == 0, out
    model = json.loads((tmp_path / "ws" / "manifest.json").read_text())["model"]
    assert model["head_dim"] == 16 and model["eos_token_ids"] == [2, 0] and model["rope_theta"] == 500000.0
    assert model["rms_norm_eps"] == 1.0
