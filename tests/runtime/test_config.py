"""One engine configuration: its defaults are the only defaults, and every command agrees on them."""
from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from formats.errors import TpDeployError
from runtime.cli import LOAD, PLAN, SERVE, main
from runtime.config import DEFAULTS, CacheConfig, EngineConfig

COMMANDS = {"generate": LOAD, "perplexity": LOAD, "serve": SERVE, "plan": PLAN}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_engine_flag_has_the_configs_default(command):
    params = {p.name: p for p in main.commands[command].params if isinstance(p, click.Option)}
    for name in COMMANDS[command]:
        default = params[name].default
        expected = getattr(DEFAULTS, name)
        assert default == expected or (default is False and expected is False), (command, name)


def test_the_config_feeds_the_cache():
    config = EngineConfig(kv_dtype="int8", block_size=16, cache_max_entry_count=0.5, kv_cache_tokens=99, gpu_mem=7)
    assert config.cache == CacheConfig("int8", 16, 0.5, 99, 7)
    assert EngineConfig.of(CacheConfig("int4", 32), max_model_len=64).cache.kv_dtype == "int4"
    assert EngineConfig.of(CacheConfig("int4", 32), kv_dtype="int8").kv_dtype == "int8"  # names win


@pytest.mark.parametrize("fields, words", [
    ({"quant_policy": 8, "kv_dtype": "int4"}, "both set the KV precision"),
    ({"quant_policy": 3}, "--quant-policy 3 is not supported"),
    ({"block_size": 48}, "power of two"),
    ({"max_batch_size": 0}, "--max-batch-size must be >= 1"),
    ({"kv_dtype": "fp8"}, "--kv-dtype 'fp8'"),
    ({"device": "tpu"}, "cpu or cuda"),
    ({"cache_max_entry_count": 1.5}, "(0, 1]"),
])
def test_bad_settings_are_named(fields, words):
    with pytest.raises(TpDeployError, match=words.replace("(", r"\(").replace("[", r"\[")):
        EngineConfig(**fields)


def test_quant_policy_sets_the_kv_dtype_when_it_agrees():
    assert EngineConfig(quant_policy=8).kv_dtype == "int8"
    assert EngineConfig(quant_policy=4, kv_dtype="int4").kv_dtype == "int4"
    with pytest.raises(TpDeployError, match="unknown engine setting"):
        EngineConfig.of(max_num_seqs=4)


@pytest.mark.parametrize("command", ["plan", "serve", "generate"])
def test_conflicting_kv_flags_exit_2_in_every_command(command, tmp_path):
    extra = {"plan": ["--gpu-mem", "1GiB"], "serve": ["--port", "0"], "generate": ["--prompt", "hi"]}[command]
    result = CliRunner().invoke(main, [command, str(tmp_path), *extra, "--quant-policy", "8", "--kv-dtype", "int4"])
    assert result.exit_code == 2 and "both set the KV precision" in result.output, result.output


def test_a_bad_size_is_a_usage_error():
    result = CliRunner().invoke(main, ["plan", "ws", "--gpu-mem", "lots"])
    assert result.exit_code == 2 and "is not a size" in result.output


def test_fields_are_documented_flags():
    for f in dataclasses.fields(EngineConfig):
        assert f.metadata["help"], f.name
