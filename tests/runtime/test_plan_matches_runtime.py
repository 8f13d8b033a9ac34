"""`tprun plan` and the runtime size the KV cache with one formula: what the plan says is what loads."""
import pytest
import torch

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.config import CacheConfig
from runtime.serve.plan import plan_memory
from runtime.worker.workspace import open_workspace

MIB = 1 << 20


@pytest.mark.parametrize("tp,kv", [(1, "auto"), (2, "int8"), (2, "int4")])
def test_allocated_cache_equals_the_plan(tiny, tmp_path, tp, kv):
    src = tiny("llama", heads=4, kv_heads=2, vocab=301, seed=2)
    ws = tmp_path / "ws"
    convert(ConvertOptions(src, ws, tp))
    cache = CacheConfig(kv, block_size=16, cache_max_entry_count=0.5, gpu_mem=300 * MIB)
    plan = plan_memory(open_workspace(ws), gpu_mem=cache.gpu_mem, cache=cache, compute_dtype=torch.float32,
                       max_model_len=128, max_batch_size=8, max_prefill_tokens=256)
    with LLM(ws, device="cpu", cache=cache, max_model_len=128, max_batch_size=8, max_prefill_tokens=256) as llm:
        runner = llm.driver.runner
        assert runner.cache.num_blocks == plan.num_blocks == llm.blocks.num_blocks
        assert runner.cache.nbytes == plan.ranks[0].kv_allocated
        for mem, rank in zip(runner.memory, plan.ranks):
            assert (mem.weights, mem.reserve, mem.blocks) == (rank.weights, rank.reserve, rank.kv_blocks)


def test_plan_command_prints_json_and_draws_the_chart(tiny, tmp_path):
    import json

    from click.testing import CliRunner

    from runtime.cli import main

    convert(ConvertOptions(tiny("llama", heads=4, kv_heads=2, vocab=301), tmp_path / "ws", 2))
    args = ["plan", str(tmp_path / "ws"), "--gpu-mem", "1GiB", "--quant-policy", "8", "--png", str(tmp_path / "p.png")]
    out = CliRunner().invoke(main, args + ["--json"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    assert plan["kv_dtype"] == "int8" and len(plan["ranks"]) == 2 and plan["num_blocks"] > 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = CliRunner().invoke(main, args[:4]).output
    assert "KV cache = λ 0.80 ×" in text and "maximum concurrency" in text
    bad = CliRunner().invoke(main, args[:4] + ["--tp", "4"])
    assert bad.exit_code == 2 and "--tp 4 does not match the workspace, converted for tp 2" in bad.output
