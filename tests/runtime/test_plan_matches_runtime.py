"""`tprun plan` and the runtime size the KV cache with one formula: what the plan says is what loads."""
import pytest
import torch

from converter.convert import ConvertOptions, convert
from runtime.api import LLM
from runtime.config import CacheConfig
from runtime.serve.plan import plan_memory
from runtime.worker.workspace import open_workspace

MIB = 1 << 20


@pytest.mark.parametrize("tp,kv,pp_layers,moe", [(1, "auto", None, ""), (2, "int8", None, ""), (2, "int4", None, ""),
                                                 (2, "auto", "3,1", ""), (1, "int8", "1,2,1", ""),
                                                 (2, "auto", None, "tp"), (2, "int8", "2,2", "ep")])
def test_allocated_cache_equals_the_plan(tiny, tmp_path, tp, kv, pp_layers, moe):
    """Every (stage, rank) row: weights, reserve and proposed blocks as the ranks measure them; stages of
    uneven layer counts take different bytes per block, and the agreed block count is the minimum. Mixtures of
    experts (a slice of every expert per rank, or whole experts with --ep) count their experts' bytes."""
    moe_config = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [1]}
    src = tiny("qwen3_moe" if moe else "llama", heads=4, kv_heads=2, vocab=301, seed=2, num_layers=4,
               extra_config=moe_config if moe else None)
    ws = tmp_path / "ws"
    pp = 1 if pp_layers is None else len(pp_layers.split(","))
    convert(ConvertOptions(src, ws, tp, pp=pp, pp_layers=pp_layers, ep=moe == "ep"))
    cache = CacheConfig(kv, block_size=16, cache_max_entry_count=0.5, gpu_mem=300 * MIB)
    plan = plan_memory(open_workspace(ws), gpu_mem=cache.gpu_mem, cache=cache, compute_dtype=torch.float32,
                       max_model_len=128, max_batch_size=8, max_prefill_tokens=256)
    with LLM(ws, device="cpu", cache=cache, max_model_len=128, max_batch_size=8, max_prefill_tokens=256) as llm:
        runner = llm.driver.runner
        assert runner.cache.num_blocks == plan.num_blocks == llm.blocks.num_blocks
        assert runner.cache.nbytes == plan.ranks[0].kv_allocated
        assert len(runner.memory) == len(plan.ranks) == tp * pp
        for mem, rank in zip(runner.memory, plan.ranks):
            assert (mem.weights, mem.reserve, mem.blocks) == (rank.weights, rank.reserve, rank.kv_blocks)
            assert mem.stage == rank.stage and mem.bytes_per_block * plan.num_blocks == rank.kv_allocated


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
    convert(ConvertOptions(tiny("llama", heads=4, kv_heads=2, vocab=301), tmp_path / "pp", 2, pp=2))
    staged = CliRunner().invoke(main, ["plan", str(tmp_path / "pp"), "--gpu-mem", "1GiB"]).output
    assert "tp 2 x pp 2" in staged and " stage " in staged.splitlines()[1]
    assert [line.split()[:2] for line in staged.splitlines()[2:6]] == [["0", "0"], ["1", "0"], ["2", "1"], ["3", "1"]]
    bad = CliRunner().invoke(main, args[:4] + ["--tp", "4"])
    assert bad.exit_code == 2 and "this workspace was converted for --tp 2; you asked for 4: convert again" in bad.output
