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
    config = EngineConfig(kv_dtype="int8", block_size=16, cache_max_entry_count=0.5, kv_cache_tokens=99, gpu_mem=7,
                          gpu_memory_utilization=0.9)
    assert config.cache == CacheConfig("int8", 16, 0.5, 99, 7, 0.9)
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


@pytest.mark.parametrize("command", ["serve", "generate", "perplexity", "plan"])
def test_vllm_and_lmdeploy_spellings_are_the_same_flags(command):
    params = {p.name: p for p in main.commands[command].params if isinstance(p, click.Option)}
    assert {"--tp", "-tp", "--tensor-parallel-size"} <= set(params["tensor_parallel_size"].opts)
    assert "--kv-cache-dtype" in params["kv_dtype"].opts and "--gpu-memory-utilization" in params[
        "gpu_memory_utilization"].opts
    if command in ("serve", "plan"):
        assert "--max-num-seqs" in params["max_batch_size"].opts
        assert "--max-num-batched-tokens" in params["max_prefill_tokens"].opts


@pytest.mark.parametrize("command, extra", [("plan", ["--gpu-mem", "1GiB"]), ("generate", ["--prompt", "hi"]),
                                            ("serve", ["--port", "0"])])
def test_a_tp_other_than_the_workspaces_is_refused(tiny, tmp_path, command, extra):
    from converter.convert import ConvertOptions, convert

    convert(ConvertOptions(tiny("llama", heads=4, kv_heads=2), tmp_path / "ws", 2))
    for flag in ("--tp", "-tp", "--tensor-parallel-size"):
        result = CliRunner().invoke(main, [command, str(tmp_path / "ws"), *extra, flag, "4"])
        assert result.exit_code == 2, result.output
        assert "this workspace was converted for --tp 2; you asked for 4: convert again with" in result.output


def test_gpu_memory_utilization_is_a_share_of_all_memory(tiny, tmp_path):
    """vLLM's meaning: KV = u × T − weights − reserve (λ is a share of what is left after them)."""
    import json

    from converter.convert import ConvertOptions, convert

    convert(ConvertOptions(tiny("llama", heads=4, kv_heads=2), tmp_path / "ws", 1))
    base = ["plan", str(tmp_path / "ws"), "--gpu-mem", "1GiB", "--json"]
    plans = {u: json.loads(CliRunner().invoke(main, base + ["--gpu-memory-utilization", u]).output) for u in ("0.5", "0.9")}
    for u, plan in plans.items():
        r = plan["ranks"][0]
        assert r["kv_bytes"] == int(float(u) * (1 << 30)) - r["weights"] - r["reserve"], u
    text = CliRunner().invoke(main, base[:-1] + ["--gpu-memory-utilization", "0.9"]).output
    assert "--gpu-memory-utilization: a share of all memory" in text
    with pytest.raises(TpDeployError, match=r"\(0, 1\]"):
        EngineConfig(gpu_memory_utilization=1.2)


def test_llm_takes_vllms_keyword_names(tiny, tmp_path):
    from converter.convert import ConvertOptions, convert
    from runtime.api import LLM

    convert(ConvertOptions(tiny("llama", heads=4, kv_heads=2), tmp_path / "ws", 1))
    with LLM(model=str(tmp_path / "ws"), tensor_parallel_size=1, max_model_len=64, dtype="float32",
             gpu_memory_utilization=0.5, device="cpu", kv_cache_tokens=256) as llm:
        assert llm.get_tokenizer() is llm.tokenizer and llm.max_model_len == 64
    with pytest.raises(TpDeployError, match="converted for --tp 1; you asked for 2"):
        LLM(model=tmp_path / "ws", tensor_parallel_size=2, device="cpu")
